"""Access tokens (crdtsync.auth): rights, document patterns, verification, keys, the CLI."""

from __future__ import annotations

import base64
import hashlib
import hmac
import itertools
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import jwt
import pytest
import trustme
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from websockets.datastructures import Headers

from crdtsync import cli
from crdtsync.auth import (
    MAX_PATTERNS,
    MAX_TOKEN_BYTES,
    NO_RIGHTS,
    Grants,
    Rights,
    TokenVerifier,
    VerificationKey,
    _compile,
    load_keys,
    mint_token,
    redact,
    split_key_entry,
    token_from_request,
)
from crdtsync.errors import AccessDenied, TokenRefused

NOW = 1_700_000_000.0
SECRET = "correct horse battery staple 0123"  # 33 bytes
OTHER_SECRET = "another secret of thirty-two b.."
DOCS = {"team/*": "rw", "public/**": "r", "team/secret": "-"}


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def refusal(verifier: TokenVerifier, token: Any, now: float = NOW) -> TokenRefused:
    with pytest.raises(TokenRefused) as excinfo:
        verifier.verify(token, now=now)
    if isinstance(token, str) and len(token) > 20:
        # the token is a credential: never in a message that may be logged or sent
        assert token not in str(excinfo.value)
        for part in token.split("."):
            assert len(part) < 8 or part not in str(excinfo.value)
    return excinfo.value


def hs_verifier(**options: Any) -> TokenVerifier:
    return TokenVerifier(load_keys([SECRET], []), **options)


def mint(key: str | bytes = SECRET, **overrides: Any) -> str:
    values: dict[str, Any] = {"subject": "alice", "docs": DOCS, "ttl_s": 3600, "now": NOW}
    values.update(overrides)
    return mint_token(key, **values)


def sign_hs256(payload: dict[str, Any] | bytes, secret: bytes, header: dict[str, Any]) -> str:
    """A token signed by hand, for what PyJWT refuses to produce."""
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(body)}"
    signature = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(signature)}"


def claims_token(claims: dict[str, Any], secret: str = SECRET, **headers: Any) -> str:
    return jwt.encode(claims, secret, algorithm="HS256", headers=headers or None)


# -- keys made for the tests -----------------------------------------------------------------


def private_pem(key: Any) -> bytes:
    return bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )


def public_pem(key: Any) -> bytes:
    return bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )


@pytest.fixture(scope="module")
def rsa_keys() -> list[rsa.RSAPrivateKey]:
    return [rsa.generate_private_key(public_exponent=65537, key_size=2048) for _ in range(2)]


def write(path: Path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


# -- rights ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("r", Rights(read=True, write=False, peer=False)),
        ("rw", Rights(read=True, write=True, peer=False)),
        ("wr", Rights(read=True, write=True, peer=False)),
        ("rwp", Rights(read=True, write=True, peer=True)),
        ("rp", Rights(read=True, write=False, peer=True)),
        ("", NO_RIGHTS),
        ("-", NO_RIGHTS),
    ],
)
def test_rights_parse(text: str, expected: Rights) -> None:
    assert Rights.parse(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("w", "'w' and 'p' need 'r'"),
        ("p", "'w' and 'p' need 'r'"),
        ("wp", "'w' and 'p' need 'r'"),
        ("rr", "each at most once"),
        ("rx", "must be letters r, w, p"),
        ("R", "must be letters r, w, p"),
        (" r", "must be letters r, w, p"),
        ("--", "must be letters r, w, p"),
    ],
)
def test_rights_parse_refuses_bad_letters(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        Rights.parse(text)


def test_rights_defaults_intersection_and_text() -> None:
    assert Rights() == Rights(read=True, write=True, peer=False)
    assert Rights(read=False, write=False, peer=False) == NO_RIGHTS
    assert Rights.parse("rwp") & Rights.parse("rp") == Rights.parse("rp")
    assert Rights.parse("rw") & NO_RIGHTS == NO_RIGHTS
    assert [str(Rights.parse(t)) for t in ("r", "wr", "prw", "-")] == ["r", "rw", "rwp", "-"]
    with pytest.raises(ValueError, match="need the read right"):
        Rights(read=False, write=True)
    with pytest.raises(ValueError, match="need the read right"):
        Rights(read=False, write=False, peer=True)
    with pytest.raises(AttributeError):
        Rights().read = False  # type: ignore[misc]


# -- document patterns -----------------------------------------------------------------------


def rights(docs: dict[str, str], document: str) -> str:
    return str(Grants(docs).rights_for(document))


@pytest.mark.parametrize(
    ("pattern", "matching", "not_matching"),
    [
        ("team/*", ["team/a", "team/a.b", "team/*"], ["team/a/b", "team", "teams/a", "x/team/a"]),
        ("team/**", ["team/a", "team/a/b/c"], ["team", "teams/a", "x/team/a"]),
        ("**", ["a", "a/b", "a/b/c"], []),
        ("*", ["a", "abc"], ["a/b"]),
        ("a*b", ["ab", "axb", "axxb"], ["ax/b", "a", "b", "abc"]),
        ("a**b", ["ab", "ax/yb"], ["ax/yc"]),
        ("a/**/b", ["a/x/b", "a/x/y/b"], ["a/b", "a/x/c"]),
        ("*/docs/*", ["u1/docs/d", "u2/docs/x"], ["u1/docs", "u1/x/docs/d", "u1/docs/d/e"]),
        ("**/secret", ["secret/secret", "a/b/secret"], ["secret", "a/secrets", "a/secret/x"]),
        ("d-*-x*", ["d-1-x", "d-a-b-x2", "d--x"], ["d-1-y", "d-1/-x", "e-1-x"]),
        ("team/a", ["team/a"], ["team/ab", "team/a/b", "team"]),
    ],
)
def test_pattern_semantics(pattern: str, matching: list[str], not_matching: list[str]) -> None:
    grants = Grants({pattern: "r"})
    for name in matching:
        assert grants.rights_for(name) == Rights.parse("r"), name
    for name in not_matching:
        assert grants.rights_for(name) == NO_RIGHTS, name


def test_readme_example() -> None:
    assert rights(DOCS, "team/todo") == "rw"
    assert rights(DOCS, "team/secret") == "-"  # exact deny beats the team/* grant
    assert rights(DOCS, "team/a/b") == "-"  # * stays within one segment
    assert rights(DOCS, "public/blog/2024/post") == "r"
    assert rights(DOCS, "private/x") == "-"  # no match: nothing


def test_exact_pattern_beats_any_wildcard_pattern() -> None:
    docs = {"team/secret": "r", "team/secre*": "rw", "**": "rwp"}
    assert rights(docs, "team/secret") == "r"
    assert rights(docs, "team/other") == "rwp"  # only ** matches
    assert rights(docs, "team/secrets") == "rw"


def test_more_literal_characters_win() -> None:
    docs = {"team/*": "rw", "**/secret": "-"}
    assert rights(docs, "team/secret") == "-"  # 7 literal characters beat 5
    docs = {"public/**": "r", "public/drafts/**": "-"}
    assert rights(docs, "public/drafts/a") == "-"
    assert rights(docs, "public/final/a") == "r"


def test_fewer_globstars_then_fewer_stars_win() -> None:
    docs = {"team/**": "r", "team/*": "rw"}  # same literals: fewer ** wins
    assert rights(docs, "team/a") == "rw"
    assert rights(docs, "team/a/b") == "r"
    docs = {"x*": "rw", "*x*": "r"}  # same literals, no **: fewer * wins
    assert rights(docs, "xa") == "rw"
    assert rights(docs, "ax") == "r"


def test_ties_take_the_intersection() -> None:
    docs = {"a*": "rwp", "*a": "rp"}  # one literal, one * each
    assert rights(docs, "aa") == "rp"
    assert rights(docs, "ab") == "rwp"
    assert rights(docs, "ba") == "rp"
    docs = {"team/*x": "rw", "team/x*": "-"}
    assert rights(docs, "team/xx") == "-"


def test_order_of_the_claim_never_matters() -> None:
    items = [("team/*", "rw"), ("*/a", "r"), ("team/**", "rwp"), ("**/a", "-"), ("t*/a", "rp")]
    names = ["team/a", "team/b", "team/a/b", "x/a", "tx/a", "team/a/a", "nope"]
    results = {
        tuple(rights(dict(order), name) for name in names)
        for order in itertools.permutations(items)
    }
    assert len(results) == 1


def test_names_longer_than_any_valid_name_get_nothing() -> None:
    assert Grants({"**": "rw"}).rights_for("a" * 600) == NO_RIGHTS


def test_many_globstars_against_a_long_name() -> None:
    # a backtracking regex would try ~C(512, 50) splits here; the automaton is linear
    fifty = "/".join(["**"] * 50)
    assert rights({fifty: "r"}, "a/" * 255 + "a") == "r"  # 256 segments: enough slashes
    assert rights({fifty: "r"}, "a/" * 20 + "a") == "-"  # 20 slashes: too few
    chain = "a" + "**a" * 150 + "**b"  # 451 bytes, literal prefix and suffix that pass
    assert rights({chain: "r"}, "a" * 511 + "b") == "r"
    assert rights({chain: "r"}, "a" * 75 + "b" * 300 + "a" * 75 + "b") == "-"  # 150 a: too few
    stars = "a" + "*a" * 200 + "*"  # single-segment wildcards
    assert rights({stars: "r"}, "a" * 512) == "r"
    assert rights({stars: "r"}, "a" * 300 + "/" + "a" * 211) == "-"


def glob_to_regex(pattern: str) -> str:
    parts = re.split(r"(\*\*|\*)", pattern)
    table = {"**": ".*", "*": "[^/]*"}
    return "".join(table.get(part, re.escape(part)) for part in parts)


@hypothesis_settings(max_examples=400, deadline=None)
@given(
    tokens=st.lists(st.sampled_from(["a", "b", "/", "*", "**"]), min_size=1, max_size=8),
    name=st.text(alphabet="ab/", max_size=10),
)
def test_matching_agrees_with_a_reference_regex(tokens: list[str], name: str) -> None:
    pattern = "".join(tokens)
    if "*" not in pattern or "***" in pattern:
        return
    expected = re.fullmatch(glob_to_regex(pattern), name) is not None
    assert _compile(pattern, Rights()).matches(name) == expected


@pytest.mark.parametrize(
    ("docs", "message"),
    [
        ({"": "r"}, "document name is empty"),
        ({"a//b": "r"}, "empty, '.' or '..' segment"),
        ({"/a": "r"}, "empty, '.' or '..' segment"),
        ({"a/": "r"}, "empty, '.' or '..' segment"),
        ({"a/../b": "r"}, "empty, '.' or '..' segment"),
        ({"a b": "r"}, "contains ' '"),
        ({"a?": "r"}, r"contains '\?'"),
        ({"a/***": "r"}, r"never '\*\*\*'"),
        ({"a" * 513: "r"}, "exceeds 512 bytes"),
        ({"team/*": "w"}, "'w' and 'p' need 'r'"),
        ({"team/*": 1}, "rights must be a string"),
        ({"team/*": None}, "rights must be a string"),
        ({1: "r"}, "patterns must be strings"),
        ({f"d{i}": "r" for i in range(MAX_PATTERNS + 1)}, "1001 patterns; at most 1000"),
    ],
    ids=lambda value: repr(value)[:30],
)
def test_bad_grants_are_refused(docs: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Grants(docs)


@pytest.mark.parametrize("docs", [["team/*"], "team/*", None, 3])
def test_grants_need_a_mapping(docs: Any) -> None:
    with pytest.raises(ValueError, match="must be an object mapping"):
        Grants(docs)


def test_grants_accept_the_maximum_and_rights_objects() -> None:
    grants = Grants({f"d{i}/*": "r" for i in range(MAX_PATTERNS)})
    assert len(grants) == MAX_PATTERNS
    assert grants.rights_for("d999/x") == Rights.parse("r")
    mixed = Grants({"a/*": Rights(write=False), "b": "wr"})
    assert mixed.to_claim() == {"a/*": "r", "b": "rw"}
    assert mixed == Grants({"b": "rw", "a/*": "r"})


# -- verification ----------------------------------------------------------------------------


def test_mint_and_verify_round_trip() -> None:
    token = mint(issuer="https://id.example", audience="relay")
    claims = hs_verifier(issuer="https://id.example", audience="relay").verify(token, now=NOW)
    assert claims.subject == "alice"
    assert claims.exp == NOW + 3600
    assert claims.grants == Grants(DOCS)
    assert claims.grants.rights_for("team/todo") == Rights.parse("rw")
    assert claims.claims["iss"] == "https://id.example"
    assert claims.claims["iat"] == NOW


def test_subject_is_optional() -> None:
    claims = hs_verifier().verify(mint(subject=None), now=NOW)
    assert claims.subject is None


def test_token_refused_is_access_denied_with_a_fixed_reason() -> None:
    exc = refusal(hs_verifier(), None)
    assert isinstance(exc, AccessDenied)
    assert exc.close_code == 1008
    assert exc.reason == "missing"
    assert exc.reason in TokenRefused.REASONS
    assert len(TokenRefused.REASONS) == 11  # README: access tokens lists each
    with pytest.raises(ValueError, match="unknown token refusal reason"):
        TokenRefused("nope", "x")  # type: ignore[arg-type]


@pytest.mark.parametrize("token", [None, ""])
def test_missing(token: str | None) -> None:
    assert refusal(hs_verifier(), token).reason == "missing"


@pytest.mark.parametrize(
    "token",
    [
        "abc",
        "a.b",
        "a.b.c.d",
        "a.b.c d",
        "é.b.c",
        f"{b64(b'not json')}.{b64(b'{}')}.{b64(b'sig')}",
        f"{b64(b'[1]')}.{b64(b'{}')}.{b64(b'sig')}",
        b"a.b.c",
    ],
    ids=repr,
)
def test_malformed(token: Any) -> None:
    assert refusal(hs_verifier(), token).reason == "malformed"


def test_oversized_token_is_malformed_even_when_signed() -> None:
    docs = {f"documents/number-{i}/**": "rw" for i in range(600)}
    token = mint(docs=docs)
    assert len(token) > MAX_TOKEN_BYTES
    exc = refusal(hs_verifier(), token)
    assert (exc.reason, str(exc)) == ("malformed", "access token malformed: over 16384 bytes")
    assert refusal(hs_verifier(), "a" * (MAX_TOKEN_BYTES + 1)).reason == "malformed"


def test_payload_that_is_no_object_is_malformed() -> None:
    token = sign_hs256(b"[1, 2]", SECRET.encode(), {"alg": "HS256", "typ": "JWT"})
    assert refusal(hs_verifier(), token).reason == "malformed"


def test_header_extensions_are_refused() -> None:
    token = sign_hs256(
        {"docs": {}, "exp": NOW + 60},
        SECRET.encode(),
        {"alg": "HS256", "crit": ["exp"], "exp": 1},
    )
    assert refusal(hs_verifier(), token).reason == "malformed"


def test_expired_and_leeway() -> None:
    verifier = hs_verifier(leeway_s=30)
    token = mint(ttl_s=100)  # exp = NOW + 100
    assert verifier.verify(token, now=NOW + 99).exp == NOW + 100
    assert verifier.verify(token, now=NOW + 129).subject == "alice"  # within the leeway
    exc = refusal(verifier, token, now=NOW + 130)
    assert (exc.reason, str(exc)) == ("expired", "access token expired")
    strict = hs_verifier(leeway_s=0)
    assert strict.verify(token, now=NOW + 99.9).subject == "alice"
    assert refusal(strict, token, now=NOW + 100).reason == "expired"


def test_not_yet_valid_and_leeway() -> None:
    token = claims_token({"docs": DOCS, "exp": NOW + 3600, "nbf": NOW + 100})
    assert refusal(hs_verifier(leeway_s=30), token).reason == "not_yet_valid"
    assert hs_verifier(leeway_s=30).verify(token, now=NOW + 70).exp == NOW + 3600
    assert refusal(hs_verifier(leeway_s=0), token, now=NOW + 99).reason == "not_yet_valid"


def test_verify_uses_the_clock_by_default() -> None:
    assert hs_verifier().verify(mint_token(SECRET, subject="a", docs={}, ttl_s=60)).exp
    expired = mint(ttl_s=60)  # minted in 2023
    with pytest.raises(TokenRefused, match="expired"):
        hs_verifier().verify(expired)


def test_bad_signature() -> None:
    verifier = hs_verifier()
    assert refusal(verifier, mint(OTHER_SECRET)).reason == "bad_signature"
    head, payload, signature = mint().split(".")
    forged = json.dumps({"sub": "mallory", "docs": {"**": "rwp"}, "exp": NOW + 60}).encode()
    exc = refusal(verifier, f"{head}.{b64(forged)}.{signature}")
    assert (exc.reason, str(exc)) == ("bad_signature", "access token signature does not verify")
    assert refusal(verifier, f"{head}.{payload}.").reason == "bad_signature"


def test_expired_token_with_a_bad_signature_is_a_bad_signature() -> None:
    token = mint(OTHER_SECRET, ttl_s=1)
    assert refusal(hs_verifier(), token, now=NOW + 10_000).reason == "bad_signature"


def test_unsigned_and_unsupported_algorithms_are_bad_signatures() -> None:
    payload = {"docs": {"**": "rwp"}, "exp": NOW + 60}
    unsigned = jwt.encode(payload, None, algorithm="none")
    assert refusal(hs_verifier(), unsigned).reason == "bad_signature"
    hs512 = jwt.encode(payload, SECRET * 2, algorithm="HS512")
    exc = refusal(hs_verifier(), hs512)
    assert (exc.reason, str(exc)) == (
        "bad_signature",
        "access token signature does not verify: algorithm not accepted",
    )


def test_wrong_audience() -> None:
    verifier = hs_verifier(audience="relay")
    assert refusal(verifier, mint(audience="other")).reason == "wrong_audience"
    assert refusal(verifier, mint()).reason == "wrong_audience"  # aud required
    listed = claims_token({"docs": DOCS, "exp": NOW + 60, "aud": ["other", "relay"]})
    assert verifier.verify(listed, now=NOW).subject is None
    # RFC 7519 4.1.3: a token for an audience is refused where no audience is configured
    assert refusal(hs_verifier(), mint(audience="relay")).reason == "wrong_audience"
    typed = claims_token({"docs": DOCS, "exp": NOW + 60, "aud": 5})
    assert refusal(verifier, typed).reason == "bad_claims"


def test_wrong_issuer() -> None:
    verifier = hs_verifier(issuer="https://id.example")
    assert refusal(verifier, mint(issuer="https://evil.example")).reason == "wrong_issuer"
    assert refusal(verifier, mint()).reason == "wrong_issuer"
    assert hs_verifier().verify(mint(issuer="anyone"), now=NOW).subject == "alice"


def test_no_expiry() -> None:
    token = mint(ttl_s=None)
    exc = refusal(hs_verifier(), token)
    assert (exc.reason, str(exc)) == ("no_expiry", "access token has no expiry (exp)")
    claims = hs_verifier(allow_no_exp=True).verify(token, now=NOW + 10**9)
    assert claims.exp is None


@pytest.mark.parametrize(
    ("claims", "detail"),
    [
        ({"exp": NOW + 60}, "no docs claim"),
        ({"exp": NOW + 60, "docs": ["team/*"]}, "docs: docs must be an object"),
        ({"exp": NOW + 60, "docs": {"team/*": 1}}, "rights must be a string"),
        ({"exp": NOW + 60, "docs": {"team/*": "w"}}, "need 'r'"),
        ({"exp": NOW + 60, "docs": {"a//b": "r"}}, "segment"),
        ({"exp": NOW + 60, "docs": {}, "sub": 7}, "sub is not a string"),
        ({"exp": "tomorrow", "docs": {}}, "exp is not a number"),
        ({"exp": True, "docs": {}}, "exp is not a number"),
        ({"exp": None, "docs": {}}, "exp is null"),
        ({"exp": NOW + 60, "nbf": "now", "docs": {}}, "nbf is not a number"),
        ({"exp": NOW + 60, "iat": [1], "docs": {}}, "iat is not a number"),
    ],
    ids=lambda value: repr(value)[:40],
)
def test_bad_claims(claims: dict[str, Any], detail: str) -> None:
    exc = refusal(hs_verifier(), claims_token(claims))
    assert exc.reason == "bad_claims"
    assert detail in str(exc)


def test_non_finite_exp_is_a_bad_claim() -> None:
    token = sign_hs256(b'{"exp": Infinity, "docs": {}}', SECRET.encode(), {"alg": "HS256"})
    assert refusal(hs_verifier(), token).reason == "bad_claims"


def test_verifier_needs_keys_and_a_sane_leeway() -> None:
    with pytest.raises(ValueError, match="at least one key"):
        TokenVerifier([])
    with pytest.raises(ValueError, match="leeway"):
        TokenVerifier(load_keys([SECRET], []), leeway_s=-1)


# -- keys, rotation, algorithms --------------------------------------------------------------


def test_two_shared_secrets_for_rotation() -> None:
    verifier = TokenVerifier(load_keys([SECRET, OTHER_SECRET], []))
    assert verifier.verify(mint(SECRET), now=NOW).subject == "alice"
    assert verifier.verify(mint(OTHER_SECRET), now=NOW).subject == "alice"
    third = "a third secret, also 32 bytes ok"
    assert refusal(verifier, mint(third)).reason == "bad_signature"


def test_two_rsa_keys_with_kids(tmp_path: Path, rsa_keys: list[rsa.RSAPrivateKey]) -> None:
    old, new = rsa_keys
    files = [
        "kid=k2023," + write(tmp_path / "old.pem", public_pem(old)),
        "kid=k2024," + write(tmp_path / "new.pem", public_pem(new)),
    ]
    keys = load_keys([], files)
    assert [(k.algorithm, k.kid) for k in keys] == [("RS256", "k2023"), ("RS256", "k2024")]
    verifier = TokenVerifier(keys)
    assert verifier.verify(mint(private_pem(old), kid="k2023"), now=NOW).subject == "alice"
    assert verifier.verify(mint(private_pem(new), kid="k2024"), now=NOW).subject == "alice"
    # the kid picks the key: the other key's signature does not count
    assert refusal(verifier, mint(private_pem(new), kid="k2023")).reason == "bad_signature"
    exc = refusal(verifier, mint(private_pem(new), kid="k1999"))
    assert (exc.reason, str(exc)) == (
        "unknown_key",
        "access token names an unknown key id: 'k1999'",
    )
    # without a kid, every RS256 key is tried
    assert verifier.verify(mint(private_pem(new)), now=NOW).subject == "alice"


def test_kid_on_a_token_needs_a_key_with_that_kid() -> None:
    verifier = hs_verifier()  # its key has no kid
    assert refusal(verifier, mint(kid="k1")).reason == "unknown_key"
    with_kid = TokenVerifier(load_keys(["kid=k1," + SECRET], []))
    assert with_kid.verify(mint(kid="k1"), now=NOW).subject == "alice"
    assert with_kid.verify(mint(), now=NOW).subject == "alice"  # no kid: tried by algorithm


def test_kid_of_a_key_of_another_algorithm_is_a_bad_signature(
    tmp_path: Path, rsa_keys: list[rsa.RSAPrivateKey]
) -> None:
    verifier = TokenVerifier(
        load_keys([], ["kid=main," + write(tmp_path / "k.pem", public_pem(rsa_keys[0]))])
    )
    exc = refusal(verifier, mint(kid="main"))
    assert (exc.reason, str(exc)) == (
        "bad_signature",
        "access token signature does not verify: key 'main' is not HS256",
    )


def test_algorithm_confusion_is_refused(tmp_path: Path, rsa_keys: list[rsa.RSAPrivateKey]) -> None:
    # the attack: sign HS256 with the relay's *public* key text as the HMAC secret
    pem = public_pem(rsa_keys[0])
    path = write(tmp_path / "public.pem", pem)
    payload = {"sub": "mallory", "docs": {"**": "rwp"}, "exp": NOW + 60}
    forged = sign_hs256(payload, pem, {"alg": "HS256", "typ": "JWT"})
    forged_kid = sign_hs256(payload, pem, {"alg": "HS256", "kid": "main"})
    for verifier in (
        TokenVerifier(load_keys([], [path])),
        TokenVerifier(load_keys([], ["kid=main," + path])),
        TokenVerifier(load_keys([SECRET], ["kid=main," + path])),
    ):
        for token in (forged, forged_kid):
            assert refusal(verifier, token).reason in ("bad_signature", "unknown_key")
    # nor can a PEM be configured as a shared secret
    with pytest.raises(ValueError, match="looks like a PEM key"):
        load_keys([pem.decode()], [])


@pytest.mark.parametrize(
    ("make", "algorithm"),
    [
        (lambda: ec.generate_private_key(ec.SECP256R1()), "ES256"),
        (lambda: ec.generate_private_key(ec.SECP384R1()), "ES384"),
        (ed25519.Ed25519PrivateKey.generate, "EdDSA"),
    ],
    ids=["ES256", "ES384", "EdDSA"],
)
def test_ec_and_eddsa_keys(tmp_path: Path, make: Any, algorithm: str) -> None:
    key = make()
    (loaded,) = load_keys([], [write(tmp_path / "key.pem", public_pem(key))])
    assert loaded.algorithm == algorithm
    token = mint(private_pem(key), audience="relay")
    assert jwt.get_unverified_header(token)["alg"] == algorithm
    claims = TokenVerifier([loaded], audience="relay").verify(token, now=NOW)
    assert claims.grants.rights_for("public/a") == Rights.parse("r")
    assert refusal(TokenVerifier([loaded]), mint(private_pem(make()))).reason == "bad_signature"


def test_certificate_files_and_mixed_algorithms(tmp_path: Path) -> None:
    ca = trustme.CA()
    cert = ca.issue_cert("id.example")
    path = write(tmp_path / "cert.pem", cert.cert_chain_pems[0].bytes())
    verifier = TokenVerifier(load_keys([SECRET], ["kid=idp," + path]))
    token = mint(cert.private_key_pem.bytes(), kid="idp")
    assert verifier.verify(token, now=NOW).subject == "alice"
    assert verifier.verify(mint(), now=NOW).subject == "alice"


def test_verification_key_repr_hides_the_secret() -> None:
    (key,) = load_keys(["kid=k1," + SECRET], [])
    assert SECRET not in repr(key)
    assert key == VerificationKey("HS256", SECRET.encode(), "k1")
    assert VerificationKey.secret(SECRET, "k1") == key


# -- key entries and files -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        ("plain", (None, "plain")),
        ("kid=k1,value", ("k1", "value")),
        ("kid=k1,a:b,c=d", ("k1", "a:b,c=d")),
        ("kid=a=b:c,/path/with,comma:colon.pem", ("a=b:c", "/path/with,comma:colon.pem")),
        ("kid=x,kid=y,z", ("x", "kid=y,z")),
        ("./kid=odd.pem", (None, "./kid=odd.pem")),
        ("k1:/path/key.pem", (None, "k1:/path/key.pem")),
    ],
)
def test_split_key_entry(entry: str, expected: tuple[str | None, str]) -> None:
    assert split_key_entry(entry) == expected


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ("", "empty key entry"),
        ("kid=k1", "needs a comma"),
        ("kid=,value", "kid must be"),
        ("kid=a b,value", "kid must be"),
        ("kid=" + "k" * 257 + ",value", "kid must be"),
        ("kid=k1,", "has no value"),
    ],
)
def test_split_key_entry_errors(entry: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        split_key_entry(entry)


def test_secret_with_colons_and_commas_round_trips() -> None:
    secret = "a:b,c=d and enough more bytes to be ok"
    verifier = TokenVerifier(load_keys(["kid=k1," + secret], []))
    assert verifier.verify(mint(secret, kid="k1"), now=NOW).subject == "alice"


def test_short_secrets_are_refused_without_being_repeated() -> None:
    with pytest.raises(ValueError, match="HS256 needs at least 32") as excinfo:
        load_keys([SECRET, "kid=k2,tooshort-secret"], [])
    message = str(excinfo.value)
    assert message.startswith("token secret #2 (kid 'k2') is 15 bytes")
    assert "tooshort" not in message
    with pytest.raises(ValueError, match="token secret #1: a key entry starting"):
        load_keys(["kid=k1"], [])


def test_public_key_file_errors(tmp_path: Path, rsa_keys: list[rsa.RSAPrivateKey]) -> None:
    missing = tmp_path / "missing.pem"
    with pytest.raises(ValueError, match=f"cannot read token public key {missing}: No such file"):
        load_keys([], [str(missing)])
    garbage = write(tmp_path / "garbage.pem", b"-----BEGIN PUBLIC KEY-----\nnope\n")
    with pytest.raises(ValueError, match="is not a PEM public key or certificate"):
        load_keys([], [garbage])
    private = write(tmp_path / "private.pem", private_pem(rsa_keys[0]))
    with pytest.raises(ValueError, match="is a private key: give the relay the public key"):
        load_keys([], [private])
    small = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    with pytest.raises(ValueError, match="RSA key of 1024 bits; at least 2048"):
        load_keys([], [write(tmp_path / "small.pem", public_pem(small))])
    p521 = ec.generate_private_key(ec.SECP521R1())
    with pytest.raises(ValueError, match="curve secp521r1 is not supported"):
        load_keys([], [write(tmp_path / "p521.pem", public_pem(p521))])
    ed = ed448.Ed448PrivateKey.generate()
    with pytest.raises(ValueError, match="Ed448PublicKey is not supported"):
        load_keys([], [write(tmp_path / "ed448.pem", public_pem(ed))])
    with pytest.raises(ValueError, match="needs a comma"):
        load_keys([], ["kid=k1"])


# -- requests --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "headers", "expected"),
    [
        ("/team/doc?token=abc.def.ghi", {}, "abc.def.ghi"),
        ("/team/doc?crdtsync=1&token=abc", {}, "abc"),
        ("/team/doc?%74oken=abc", {}, "abc"),
        ("/team/doc", {}, None),
        ("/team/doc?token=", {}, None),
        ("/team/doc?tokens=abc", {}, None),
        ("/team/doc", {"Authorization": "Bearer abc"}, "abc"),
        ("/team/doc", {"authorization": "bearer   abc  "}, "abc"),
        ("/team/doc", {"Authorization": "Basic dXNlcjpwdw=="}, None),
        ("/team/doc?token=abc", {"Authorization": "Bearer abc"}, "abc"),
        ("/team/doc?token=abc", {"Authorization": "Basic xyz"}, "abc"),
    ],
)
def test_token_from_request(path: str, headers: dict[str, str], expected: str | None) -> None:
    assert token_from_request(path, headers) == expected


@pytest.mark.parametrize(
    ("path", "headers"),
    [
        ("/d?token=abc", {"Authorization": "Bearer xyz"}),
        ("/d?token=abc&token=xyz", {}),
        ("/d", {"Authorization": "Bearer"}),
        ("/d", {"Authorization": "Bearer a b"}),
    ],
)
def test_token_from_request_refuses_ambiguity(path: str, headers: dict[str, str]) -> None:
    with pytest.raises(TokenRefused) as excinfo:
        token_from_request(path, headers)
    assert excinfo.value.reason == "malformed"
    assert "abc" not in str(excinfo.value)
    assert "xyz" not in str(excinfo.value)


def test_token_from_websockets_headers() -> None:
    headers = Headers([("AUTHORIZATION", "Bearer abc")])
    assert token_from_request("/d", headers) == "abc"
    twice = Headers([("Authorization", "Bearer abc"), ("Authorization", "Bearer abc")])
    with pytest.raises(TokenRefused, match="more than one Bearer header"):
        token_from_request("/d", twice)


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/team/doc?token=abc.def.ghi", "/team/doc?token=***"),
        ("/d?crdtsync=1&token=abc&x=%41", "/d?crdtsync=1&token=***&x=%41"),
        ("/d?token=a&token=b", "/d?token=***&token=***"),
        ("/d?%74oken=abc", "/d?%74oken=***"),
        ("/d?token=", "/d?token=***"),
        ("/d", "/d"),
        ("/d?", "/d?"),
        ("/d?tokens=abc&mytoken=x&token", "/d?tokens=abc&mytoken=x&token"),
        ("/d?x=token=abc", "/d?x=token=abc"),
    ],
)
def test_redact(path: str, expected: str) -> None:
    assert redact(path) == expected


def test_redact_hides_every_token_token_from_request_reads() -> None:
    for path in ("/d?token=secret.value.x", "/d?a=1&%74oken=secret.value.x"):
        assert token_from_request(path, {}) == "secret.value.x"
        assert "secret" not in redact(path)


# -- minting ---------------------------------------------------------------------------------


def test_mint_token_claims() -> None:
    token = mint(ttl_s=90.5, issuer="iss", audience="aud", kid="k1")
    assert jwt.get_unverified_header(token) == {"alg": "HS256", "typ": "JWT", "kid": "k1"}
    payload = jwt.decode(token, options={"verify_signature": False})
    assert payload == {
        "sub": "alice",
        "iat": int(NOW),
        "exp": int(NOW) + 91,
        "iss": "iss",
        "aud": "aud",
        "docs": DOCS,
    }
    assert "exp" not in jwt.decode(mint(ttl_s=None), options={"verify_signature": False})


@pytest.mark.parametrize(
    ("key", "overrides", "message"),
    [
        ("short", {}, "is 5 bytes; HS256 needs at least 32"),
        (SECRET, {"ttl_s": 0}, "ttl must be positive"),
        (SECRET, {"ttl_s": -5}, "ttl must be positive"),
        (SECRET, {"docs": {"a b": "r"}}, "contains ' '"),
        (SECRET, {"docs": {"a": "x"}}, "must be letters"),
        (
            b"-----BEGIN PRIVATE KEY-----\nnope\n-----END PRIVATE KEY-----\n",
            {},
            "not an unencrypted",
        ),
    ],
)
def test_mint_token_refuses_bad_input(key: Any, overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        mint(key, **overrides)


def test_mint_token_refuses_encrypted_and_unsupported_private_keys() -> None:
    encrypted = ed25519.Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"pw"),
    )
    with pytest.raises(ValueError, match="not an unencrypted PEM private key"):
        mint(encrypted)
    with pytest.raises(ValueError, match="Ed448PrivateKey is not supported"):
        mint(private_pem(ed448.Ed448PrivateKey.generate()))


# -- the CLI ---------------------------------------------------------------------------------


@pytest.fixture
def no_crdtsync_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for key in list(os.environ):
        if key.startswith("CRDTSYNC_"):
            monkeypatch.delenv(key)


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_token_with_a_secret(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_cli(
        [
            "token",
            "--secret",
            SECRET,
            "--sub",
            "alice",
            "--doc",
            "team/*=rw",
            "--doc",
            "public/**=r",
            "--doc",
            "a=b/*=",
            "--iss",
            "me",
            "--aud",
            "relay",
            "--ttl",
            "60",
        ],
        capsys,
    )
    assert (code, err) == (0, "")
    token = out.strip()
    assert out == token + "\n"
    claims = hs_verifier(issuer="me", audience="relay").verify(token)
    assert claims.subject == "alice"
    assert claims.grants.to_claim() == {"team/*": "rw", "public/**": "r", "a=b/*": "-"}
    assert claims.exp is not None
    assert claims.exp - claims.claims["iat"] == 60


def test_cli_token_with_a_private_key_and_kid(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key = ed25519.Ed25519PrivateKey.generate()
    private = write(tmp_path / "private.pem", private_pem(key))
    public = write(tmp_path / "public.pem", public_pem(key))
    verifier = TokenVerifier(load_keys([], ["kid=k1," + public]), allow_no_exp=True)
    for argv in (
        ["--private-key", private, "--kid", "k1"],
        ["--private-key", "kid=k1," + private],
        ["--private-key", "kid=k1," + private, "--kid", "k1"],
    ):
        code, out, err = run_cli(["token", *argv, "--doc", "**=rwp", "--no-exp"], capsys)
        assert (code, err) == (0, "")
        claims = verifier.verify(out.strip())
        assert (claims.subject, claims.exp) == (None, None)
        assert claims.grants.rights_for("x/y") == Rights.parse("rwp")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--secret", "short", "--doc", "a=r"], "token secret is 5 bytes"),
        (["--secret", SECRET, "--doc", "a"], "--doc 'a' is not PATTERN=RIGHTS"),
        (["--secret", SECRET, "--doc", "=r"], "--doc '=r' is not PATTERN=RIGHTS"),
        (["--secret", SECRET, "--doc", "a=r", "--doc", "a=rw"], "given twice"),
        (["--secret", SECRET, "--doc", "a b=r"], "contains ' '"),
        (["--secret", SECRET, "--doc", "a=w"], "'w' and 'p' need 'r'"),
        (["--secret", "kid=k1", "--doc", "a=r"], "needs a comma"),
        (["--secret", f"kid=a,{SECRET}", "--kid", "b", "--doc", "a=r"], "--kid 'b' differs"),
        (["--private-key", "/nonexistent/key.pem", "--doc", "a=r"], "cannot read private key"),
    ],
)
def test_cli_token_bad_input_is_one_line_and_exit_2(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run_cli(["token", *argv], capsys)
    assert (code, out) == (2, "")
    assert err.startswith("crdtsync token: ")
    assert message in err
    assert err.count("\n") == 1


@pytest.mark.parametrize(
    "argv",
    [
        ["--doc", "a=r"],  # no key
        ["--secret", SECRET, "--private-key", "k.pem", "--doc", "a=r"],
        ["--secret", SECRET],  # no --doc
        ["--secret", SECRET, "--doc", "a=r", "--ttl", "0"],
        ["--secret", SECRET, "--doc", "a=r", "--ttl", "5", "--no-exp"],
    ],
)
def test_cli_token_usage_errors_exit_2(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as excinfo:
        cli.main(["token", *argv])
    assert excinfo.value.code == 2


@pytest.mark.usefixtures("no_crdtsync_environment")
def test_cli_relay_token_flags_reach_the_settings(
    tmp_path: Path, rsa_keys: list[rsa.RSAPrivateKey]
) -> None:
    public = write(tmp_path / "public.pem", public_pem(rsa_keys[0]))
    args = cli.build_parser().parse_args(
        [
            "relay",
            "--token-secret",
            SECRET,
            "--token-secret",
            "kid=k2," + OTHER_SECRET,
            "--token-public-key",
            "kid=rsa," + public,
            "--token-issuer",
            "https://id.example",
            "--token-audience",
            "relay",
        ]
    )
    settings = cli._relay_settings(args)
    assert settings is not None
    assert settings.token_secrets == [SECRET, "kid=k2," + OTHER_SECRET]
    assert settings.token_public_keys == ["kid=rsa," + public]
    assert (settings.token_issuer, settings.token_audience) == ("https://id.example", "relay")
    assert settings.tokens_required
    verifier = settings.token_verifier()
    assert verifier is not None
    assert [k.kid for k in verifier.keys] == [None, "k2", "rsa"]


@pytest.mark.usefixtures("no_crdtsync_environment")
@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["--token-secret", "0123456789"],
            "crdtsync relay: invalid setting token_secrets: token secret #1 is 10 bytes",
        ),
        (
            ["--token-public-key", "/nonexistent/key.pem"],
            "crdtsync relay: invalid token key: cannot read token public key /nonexistent",
        ),
        (
            ["--token-public-key", "kid=k1"],
            "crdtsync relay: invalid setting token_public_keys: a key entry starting",
        ),
    ],
)
def test_cli_relay_bad_token_flags_exit_2(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run_cli(["relay", *argv], capsys)
    assert (code, out) == (2, "")
    assert err.startswith(message)
    assert err.count("\n") == 1
    assert "0123456789" not in err


def test_importing_the_cli_does_not_import_jwt_or_cryptography() -> None:
    code = (
        "import sys, crdtsync.cli, crdtsync.auth, crdtsync.settings\n"
        "crdtsync.cli.build_parser()\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('jwt', 'cryptography')))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert result.stdout.strip() == "[]"
