"""Access tokens: verify a signed JWT and say what it grants on which document.

A token is a JWT signed by a key the relay is configured with. Its ``docs`` claim maps
document patterns to rights::

    {"sub": "alice", "exp": 1767225600,
     "docs": {"team/*": "rw", "public/**": "r", "team/secret": "-"}}

- Rights are letters: ``r`` read, ``w`` write, ``p`` peer (reserved for region-to-region
  links); ``w`` and ``p`` need ``r``. ``""`` or ``"-"`` is an explicit "nothing", so a
  more specific pattern can deny what a broader one grants.
- In a pattern, ``*`` matches any characters within one ``/``-separated segment (also
  none), ``**`` any characters at all, ``/`` included (also none); other characters match
  themselves. ``team/**`` matches ``team/a/b`` but not ``team``.
- The most specific matching pattern decides (see :class:`Grants`); no match grants
  nothing.

Pure except where asked to read key files (:func:`load_keys`). PyJWT and cryptography are
imported only when a key is loaded, a token verified or minted: a relay without tokens,
and the CLI, start without them.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, unquote_plus

from .errors import TokenRefusalReason, TokenRefused
from .settings import MAX_DOCUMENT_NAME_BYTES, validate_document_name

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.types import (
        PrivateKeyTypes,
        PublicKeyTypes,
    )

__all__ = [
    "MAX_PATTERNS",
    "MAX_TOKEN_BYTES",
    "MIN_SECRET_BYTES",
    "NO_RIGHTS",
    "Grants",
    "Rights",
    "TokenClaims",
    "TokenVerifier",
    "VerificationKey",
    "check_secret_entry",
    "load_keys",
    "mint_token",
    "redact",
    "split_key_entry",
    "token_from_request",
    "verifier_from_values",
]

MAX_TOKEN_BYTES = 16 * 1024
MAX_PATTERNS = 1_000
MAX_PATTERN_BYTES = MAX_DOCUMENT_NAME_BYTES
# RFC 7518 section 3.2: an HMAC key at least as long as the hash output (SHA-256)
MIN_SECRET_BYTES = 32
MIN_RSA_BITS = 2048
MAX_KID_CHARS = 256
TOKEN_PARAMETER = "token"
SUPPORTED_ALGORITHMS = frozenset({"HS256", "RS256", "ES256", "ES384", "EdDSA"})

# A compact JWS: three base64url parts. Checked before PyJWT sees the text, so nothing
# else can reach its parsers (or its error messages). An empty signature is let through
# to be refused as unsigned ("bad_signature"), not as malformed.
_COMPACT_JWS = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*\.[A-Za-z0-9_-]*")
_KID_CHARS = re.compile(r"[!-+\--~]+")  # printable ASCII without space and ","


MAX_SUBJECT_BYTES = 256


def _short(text: str, limit: int = 40) -> str:
    """``repr(text)``, cut to about ``limit`` characters (messages end up in close frames)."""
    return repr(text) if len(text) <= limit else repr(text[:limit]) + "..."


# -- rights and grants -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Rights:
    """What a token allows on one document. ``write`` and ``peer`` need ``read``."""

    read: bool = True
    write: bool = True
    peer: bool = False  # reserved for region-to-region links

    def __post_init__(self) -> None:
        if (self.write or self.peer) and not self.read:
            raise ValueError("write and peer rights need the read right")

    @classmethod
    def parse(cls, text: str) -> Rights:
        """Rights from letters ``r``, ``w``, ``p`` in any order; ``""`` or ``"-"``: none.

        Raises:
            ValueError: an unknown or repeated letter, or ``w``/``p`` without ``r``.
        """
        if text in ("", "-"):
            return NO_RIGHTS
        letters = set(text)
        if len(letters) != len(text) or not letters <= {"r", "w", "p"}:
            raise ValueError(
                f"rights {_short(text)} must be letters r, w, p (each at most once), "
                "or '-' for none"
            )
        if "r" not in letters:
            raise ValueError(f"rights {_short(text)}: 'w' and 'p' need 'r'")
        return cls(read=True, write="w" in letters, peer="p" in letters)

    def __and__(self, other: Rights) -> Rights:
        """The rights both allow (still valid: write and peer imply read on each side)."""
        return Rights(
            self.read and other.read, self.write and other.write, self.peer and other.peer
        )

    def __str__(self) -> str:
        text = ("r" if self.read else "") + ("w" if self.write else "") + ("p" if self.peer else "")
        return text or "-"


NO_RIGHTS = Rights(read=False, write=False, peer=False)


@dataclass(frozen=True, slots=True)
class _Pattern:
    """One wildcard pattern, compiled to what matching needs (see :func:`_compile`)."""

    text: str
    rights: Rights
    specificity: tuple[int, int, int]
    prefix: str  # literal text before the first wildcard
    suffix: str  # literal text after the last wildcard
    literals: int  # literal characters: the shortest name it can match
    slashes: int  # literal "/": a name has exactly as many without "**", at least as many with
    globstar: bool
    simple: bool  # one wildcard: prefix, suffix and the counts decide alone
    accept: int  # the automaton's final state bit
    literal_masks: dict[str, int]  # character -> states entered by matching it
    star_mask: int  # states that are a "*" (loop on anything but "/")
    globstar_mask: int  # states that are a "**" (loop on anything)

    def matches(self, name: str) -> bool:
        if (
            len(name) < self.literals
            or not name.startswith(self.prefix)
            or not name.endswith(self.suffix)
        ):
            return False
        slashes = name.count("/")
        if slashes < self.slashes or (not self.globstar and slashes != self.slashes):
            return False
        if self.simple:
            return True
        return self._run(name)

    def _run(self, name: str) -> bool:
        # A bit-parallel NFA (shift-and): bit i set means "the first i tokens match what was
        # read so far". Each character costs a few integer operations whatever the pattern,
        # so matching is linear in the name: a backtracking regex of 50 "**" is exponential.
        stars = self.star_mask | self.globstar_mask
        states = 1 | ((1 << 1) & stars)
        literal_masks = self.literal_masks
        loop_any = self.globstar_mask
        loop_not_slash = self.globstar_mask | self.star_mask
        for char in name:
            loop = loop_any if char == "/" else loop_not_slash
            states = ((states << 1) & literal_masks.get(char, 0)) | (states & loop)
            # a wildcard also matches nothing (never two wildcard tokens in a row: one step)
            states |= (states << 1) & stars
            if not states:
                return False
        return bool(states & self.accept)


_WILDCARD_RUN = re.compile(r"\*+")


def _compile(text: str, rights: Rights) -> _Pattern:
    """Compile a wildcard pattern (it holds at least one ``*``; runs of 3+ are refused)."""
    literal_masks: dict[str, int] = {}
    star_mask = globstar_mask = 0
    position = 0  # tokens so far: the state a token leads to is its bit
    stars = globstars = 0
    last = 0
    for match in _WILDCARD_RUN.finditer(text):
        for char in text[last : match.start()]:
            position += 1
            literal_masks[char] = literal_masks.get(char, 0) | (1 << position)
        position += 1
        if len(match.group()) == 1:
            stars += 1
            star_mask |= 1 << position
        else:
            globstars += 1
            globstar_mask |= 1 << position
        last = match.end()
    for char in text[last:]:
        position += 1
        literal_masks[char] = literal_masks.get(char, 0) | (1 << position)
    literal_text = text.replace("*", "")
    return _Pattern(
        text=text,
        rights=rights,
        specificity=(len(literal_text), -globstars, -stars),
        prefix=text[: text.index("*")],
        suffix=text[text.rindex("*") + 1 :],
        literals=len(literal_text),
        slashes=literal_text.count("/"),
        globstar=globstars > 0,
        simple=stars + globstars == 1,
        accept=1 << position,
        literal_masks=literal_masks,
        star_mask=star_mask,
        globstar_mask=globstar_mask,
    )


def _check_pattern(pattern: object) -> str:
    if not isinstance(pattern, str):
        raise ValueError("docs patterns must be strings")
    if len(pattern.encode("utf-8")) > MAX_PATTERN_BYTES:
        raise ValueError(f"document pattern {_short(pattern)} exceeds {MAX_PATTERN_BYTES} bytes")
    # "*" is a name character, so a pattern is checked as a name: the same characters and
    # no empty, "." or ".." segment (such a pattern could never match a valid name)
    try:
        validate_document_name(pattern)
    except ValueError as exc:
        raise ValueError(f"document pattern {_short(pattern)}: {exc}") from None
    if "***" in pattern:
        raise ValueError(f"document pattern {_short(pattern)}: '*' or '**', never '***'")
    return pattern


class Grants:
    """The rights a token gives, per document pattern; :meth:`rights_for` decides.

    Specificity, highest first, decides which matching pattern counts:

    1. a pattern without wildcards (an exact name) beats every wildcard pattern;
    2. then more literal (non-wildcard) characters;
    3. then fewer ``**``;
    4. then fewer ``*``;
    5. equal on all of these: the intersection of their rights (the least), so the
       order of the claim's keys never matters.

    Patterns are compiled once, here; matching a name is then a dictionary lookup for
    exact patterns and, for wildcard ones in specificity order until a level matches, a
    prefix/suffix check and (with several wildcards) an automaton linear in the name.

    Raises:
        ValueError: ``docs`` is not a mapping of string patterns to rights, has more
            than :data:`MAX_PATTERNS` entries, or holds an invalid pattern or rights.
    """

    __slots__ = ("_docs", "_exact", "_levels")

    def __init__(self, docs: Mapping[str, str | Rights]) -> None:
        if not isinstance(docs, Mapping):
            raise ValueError("docs must be an object mapping document patterns to rights")
        if len(docs) > MAX_PATTERNS:
            raise ValueError(f"docs has {len(docs)} patterns; at most {MAX_PATTERNS}")
        exact: dict[str, Rights] = {}
        wildcard: list[_Pattern] = []
        canonical: dict[str, str] = {}
        for pattern, value in docs.items():
            _check_pattern(pattern)
            if isinstance(value, Rights):
                rights = value
            elif isinstance(value, str):
                try:
                    rights = Rights.parse(value)
                except ValueError as exc:
                    raise ValueError(f"document pattern {_short(pattern)}: {exc}") from None
            else:
                raise ValueError(f"document pattern {_short(pattern)}: rights must be a string")
            canonical[pattern] = str(rights)
            if "*" in pattern:
                wildcard.append(_compile(pattern, rights))
            else:
                exact[pattern] = rights
        wildcard.sort(key=lambda p: p.specificity, reverse=True)
        levels: list[tuple[_Pattern, ...]] = []
        for item in wildcard:
            if levels and levels[-1][0].specificity == item.specificity:
                levels[-1] += (item,)
            else:
                levels.append((item,))
        self._docs = canonical
        self._exact = exact
        self._levels = tuple(levels)

    def allow_peer(self) -> bool:
        """Whether any pattern grants the peer right (a region's link may connect; each
        document it writes still needs the right on that document)."""
        return any(r.peer for r in self._exact.values()) or any(
            p.rights.peer for level in self._levels for p in level
        )

    def rights_for(self, document: str) -> Rights:
        """The rights on ``document``: those of the most specific matching pattern.

        No matching pattern, or a name longer than any valid one: :data:`NO_RIGHTS`.
        """
        rights = self._exact.get(document)
        if rights is not None:
            return rights
        if len(document) > MAX_DOCUMENT_NAME_BYTES:  # no valid name: bound the work
            return NO_RIGHTS
        for level in self._levels:
            found: Rights | None = None
            for pattern in level:
                if pattern.matches(document):
                    found = pattern.rights if found is None else found & pattern.rights
            if found is not None:
                return found
        return NO_RIGHTS

    def to_claim(self) -> dict[str, str]:
        """The ``docs`` claim these grants come from, rights written canonically."""
        return dict(self._docs)

    def __len__(self) -> int:
        return len(self._docs)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Grants) and self._docs == other._docs

    __hash__ = None  # type: ignore[assignment]  # mutable-looking: compare, don't hash

    def __repr__(self) -> str:
        return f"Grants({self._docs!r})"


# -- keys ------------------------------------------------------------------------------------


def split_key_entry(entry: str) -> tuple[str | None, str]:
    """Split a key entry ``"kid=NAME,VALUE"`` or ``"VALUE"`` into ``(kid, value)``.

    The value (a secret or a file path) is everything after the first comma, so it may
    hold ``:`` and ``,``; a kid holds no comma. An entry that starts with ``kid=`` is
    always read this way: a secret or path that itself starts with ``kid=`` needs a kid
    in front (``kid=main,kid=...``) or, for a path, ``./``. Messages never repeat the
    value (it may be a secret).

    Raises:
        ValueError: an empty value, or a ``kid=`` entry without a comma or a valid kid.
    """
    if not entry.startswith("kid="):
        if not entry:
            raise ValueError("empty key entry")
        return None, entry
    kid, comma, value = entry[len("kid=") :].partition(",")
    if not comma:
        raise ValueError("a key entry starting with 'kid=' needs a comma: kid=NAME,VALUE")
    if not kid or len(kid) > MAX_KID_CHARS or not _KID_CHARS.fullmatch(kid):
        raise ValueError(
            f"kid must be 1-{MAX_KID_CHARS} printable ASCII characters without space or ','"
        )
    if not value:
        raise ValueError(f"key entry for kid {_short(kid)} has no value after the comma")
    return kid, value


def _secret_bytes(secret: str | bytes, where: str) -> bytes:
    data = secret.encode("utf-8") if isinstance(secret, str) else secret
    if len(data) < MIN_SECRET_BYTES:
        raise ValueError(
            f"{where} is {len(data)} bytes; HS256 needs at least {MIN_SECRET_BYTES} "
            "(RFC 7518 section 3.2)"
        )
    if b"-----BEGIN" in data:
        raise ValueError(f"{where} looks like a PEM key, not a shared secret")
    return data


def check_secret_entry(entry: str, where: str = "token secret") -> tuple[str | None, bytes]:
    """``(kid, secret)`` of a ``[kid=NAME,]SECRET`` entry (no I/O, no jwt import).

    Raises:
        ValueError: a bad entry or a secret under 32 bytes, named by ``where``.
    """
    try:
        kid, secret = split_key_entry(entry)
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None
    return kid, _secret_bytes(secret, where + (f" (kid {_short(kid)})" if kid else ""))


@dataclass(frozen=True, slots=True)
class VerificationKey:
    """One key a token may be signed with: the algorithm follows from the key type.

    ``key`` is the HS256 secret (bytes) or a cryptography public key object.
    """

    algorithm: str
    key: Any = field(repr=False)  # never in a repr or a log: it may be a secret
    kid: str | None = None

    @classmethod
    def secret(cls, secret: str | bytes, kid: str | None = None) -> VerificationKey:
        """An HS256 key (at least 32 bytes).

        Raises:
            ValueError: the secret is too short or looks like a PEM key.
        """
        return cls(
            "HS256", _secret_bytes(secret, "token secret" + (f" {kid!r}" if kid else "")), kid
        )

    @classmethod
    def public(cls, key: PublicKeyTypes, kid: str | None = None) -> VerificationKey:
        """A key for RS256, ES256, ES384 or EdDSA, from a cryptography public key.

        Raises:
            ValueError: an unsupported key type or curve, or RSA under 2048 bits.
        """
        return cls(_algorithm_of(key), key, kid)


def _algorithm_of(key: Any) -> str:
    """The one algorithm a key is used with (never the token header's say)."""
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

    if isinstance(key, rsa.RSAPublicKey | rsa.RSAPrivateKey):
        if key.key_size < MIN_RSA_BITS:
            raise ValueError(f"RSA key of {key.key_size} bits; at least {MIN_RSA_BITS}")
        return "RS256"
    if isinstance(key, ec.EllipticCurvePublicKey | ec.EllipticCurvePrivateKey):
        if isinstance(key.curve, ec.SECP256R1):
            return "ES256"
        if isinstance(key.curve, ec.SECP384R1):
            return "ES384"
        raise ValueError(f"EC curve {key.curve.name} is not supported; use P-256 or P-384")
    if isinstance(key, ed25519.Ed25519PublicKey | ed25519.Ed25519PrivateKey):
        return "EdDSA"
    raise ValueError(
        f"{type(key).__name__} is not supported; use RSA, EC P-256/P-384 or Ed25519 keys"
    )


def _load_public_pem(data: bytes, where: str) -> PublicKeyTypes:
    from cryptography import x509
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    if b"PRIVATE KEY-----" in data:
        raise ValueError(
            f"{where} is a private key: give the relay the public key "
            "(openssl pkey -in KEY -pubout)"
        )
    try:
        if b"-----BEGIN CERTIFICATE-----" in data:
            return x509.load_pem_x509_certificate(data).public_key()
        return load_pem_public_key(data)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise ValueError(f"{where} is not a PEM public key or certificate") from None


def load_keys(secrets: Sequence[str], public_key_files: Sequence[str]) -> list[VerificationKey]:
    """Keys from ``[kid=NAME,]SECRET`` entries and ``[kid=NAME,]PATH`` PEM files.

    A file holds a public key (``BEGIN PUBLIC KEY``) or a certificate; its type decides
    the algorithm: RSA (2048+ bits) RS256, EC P-256 ES256, P-384 ES384, Ed25519 EdDSA.

    Raises:
        ValueError: a bad entry, a secret under 32 bytes, an unreadable file, a file that
            is no public key, or an unsupported key type.
    """
    keys: list[VerificationKey] = []
    for index, entry in enumerate(secrets, 1):
        kid, secret = check_secret_entry(entry, f"token secret #{index}")
        keys.append(VerificationKey("HS256", secret, kid))
    for entry in public_key_files:
        kid, path = split_key_entry(entry)
        where = f"token public key {path}"
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            raise ValueError(f"cannot read {where}: {exc.strerror or exc}") from None
        public = _load_public_pem(data, where)
        try:
            keys.append(VerificationKey.public(public, kid))
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None
    return keys


# -- verifying -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TokenClaims:
    """What a verified token says."""

    subject: str | None  # the "sub" claim
    exp: float | None  # expiry, seconds since the epoch; None if allowed without
    grants: Grants  # from the "docs" claim
    claims: Mapping[str, Any] = field(repr=False)  # the whole payload, as decoded


_MESSAGES: dict[TokenRefusalReason, str] = {
    "missing": "access token required",
    "malformed": "access token malformed",
    "expired": "access token expired",
    "not_yet_valid": "access token not yet valid",
    "bad_signature": "access token signature does not verify",
    "wrong_audience": "access token is for another audience",
    "wrong_issuer": "access token is from another issuer",
    "unknown_key": "access token names an unknown key id",
    "no_expiry": "access token has no expiry (exp)",
    "bad_claims": "access token claims invalid",
    "revoked": "access token revoked",
}


def _refuse(reason: TokenRefusalReason, detail: str = "") -> TokenRefused:
    message = _MESSAGES[reason]
    return TokenRefused(reason, f"{message}: {detail}" if detail else message)


def _number(claims: Mapping[str, Any], name: str) -> float | None:
    value = claims.get(name)
    if value is None:
        if name in claims:
            raise _refuse("bad_claims", f"{name} is null")
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _refuse("bad_claims", f"{name} is not a number")
    try:
        number = float(value)  # an int beyond a float's range raises OverflowError
    except OverflowError:
        raise _refuse("bad_claims", f"{name} is out of range") from None
    if not math.isfinite(number):
        raise _refuse("bad_claims", f"{name} is not a finite number")
    return number


class TokenVerifier:
    """Verifies access tokens against a set of keys (several at once for rotation).

    Which keys are tried: a token with a ``kid`` header only the keys with that kid
    (none: "unknown_key"); one without, every key of its header's algorithm. A key is
    only ever used with the algorithm of its type, so an HS256 token can never be checked
    with a public key's PEM text as the secret.

    Checks, in order (the first failure is the reason): form and size ("missing",
    "malformed"), key and signature ("unknown_key", "bad_signature"), then the claims:
    ``iss`` ("wrong_issuer", if an issuer is set), ``aud`` ("wrong_audience": it must
    name the audience if one is set, and be absent if none is, RFC 7519 section 4.1.3),
    ``exp`` ("no_expiry", "expired"), ``nbf`` ("not_yet_valid"), then ``sub`` and
    ``docs`` ("bad_claims"). ``leeway_s`` widens both time checks.

    Raises:
        ValueError: no keys, or a negative leeway.
    """

    def __init__(
        self,
        keys: Iterable[VerificationKey],
        *,
        issuer: str | None = None,
        audience: str | None = None,
        leeway_s: float = 30.0,
        allow_no_exp: bool = False,
    ) -> None:
        self.keys = tuple(keys)
        if not self.keys:
            raise ValueError("a token verifier needs at least one key")
        if not leeway_s >= 0:
            raise ValueError(f"leeway must be 0 or more seconds, got {leeway_s}")
        self.issuer = issuer
        self.audience = audience
        self.leeway_s = float(leeway_s)
        self.allow_no_exp = allow_no_exp
        self._by_kid: dict[str, list[VerificationKey]] = {}
        self._by_algorithm: dict[str, list[VerificationKey]] = {}
        for key in self.keys:
            if key.algorithm not in SUPPORTED_ALGORITHMS:
                raise ValueError(f"unsupported key algorithm {key.algorithm!r}")
            if key.kid is not None:
                self._by_kid.setdefault(key.kid, []).append(key)
            self._by_algorithm.setdefault(key.algorithm, []).append(key)

    def verify(self, token: str | None, now: float | None = None) -> TokenClaims:
        """Verify ``token`` at time ``now`` (default: the clock); return its claims.

        Raises:
            TokenRefused: with the reason; its message never holds the token.
        """
        if token is None or token == "":
            raise _refuse("missing")
        if not isinstance(token, str):
            raise _refuse("malformed", "not a string")
        if len(token) > MAX_TOKEN_BYTES:
            raise _refuse("malformed", f"over {MAX_TOKEN_BYTES} bytes")
        if not _COMPACT_JWS.fullmatch(token):
            raise _refuse("malformed", "not a compact JWS")
        claims = self._verified_payload(token)
        return self._check_claims(claims, time.time() if now is None else now)

    def _verified_payload(self, token: str) -> dict[str, Any]:
        import jwt

        try:
            header = jwt.get_unverified_header(token)
        except jwt.InvalidTokenError:
            raise _refuse("malformed", "undecodable header") from None
        if "crit" in header or "b64" in header:
            raise _refuse("malformed", "header extensions (crit, b64) are not accepted")
        algorithm = header.get("alg")
        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise _refuse("malformed", "kid is not a string")
        if not isinstance(algorithm, str) or algorithm not in SUPPORTED_ALGORITHMS:
            raise _refuse("bad_signature", "algorithm not accepted")
        if kid is not None:
            named = self._by_kid.get(kid)
            if not named:
                raise _refuse("unknown_key", _short(kid))
            candidates = [key for key in named if key.algorithm == algorithm]
            if not candidates:
                raise _refuse("bad_signature", f"key {_short(kid)} is not {algorithm}")
        else:
            candidates = self._by_algorithm.get(algorithm, [])
            if not candidates:
                raise _refuse("bad_signature", f"no {algorithm} key")
        for key in candidates:
            try:
                payload: dict[str, Any] = jwt.decode(
                    token,
                    key.key,
                    algorithms=[key.algorithm],
                    # claims are checked by _check_claims, with our reasons and clock
                    options={
                        "verify_signature": True,
                        "verify_exp": False,
                        "verify_nbf": False,
                        "verify_iat": False,
                        "verify_aud": False,
                        "verify_iss": False,
                        "verify_sub": False,
                        "verify_jti": False,
                        "require": [],
                        "enforce_minimum_key_length": True,
                    },
                )
            except jwt.InvalidSignatureError:
                continue
            except jwt.InvalidTokenError:
                # signature fine (or not reached) but the payload is no JSON object
                raise _refuse("malformed", "undecodable payload") from None
            return payload
        raise _refuse("bad_signature")

    def _check_claims(self, claims: dict[str, Any], now: float) -> TokenClaims:
        if self.issuer is not None and claims.get("iss") != self.issuer:
            raise _refuse("wrong_issuer")
        audience = claims.get("aud")
        if audience is not None or "aud" in claims:
            if isinstance(audience, str):
                audiences = [audience]
            elif isinstance(audience, list) and all(isinstance(a, str) for a in audience):
                audiences = audience
            else:
                raise _refuse("bad_claims", "aud is not a string or a list of strings")
            if self.audience not in audiences:
                raise _refuse("wrong_audience")
        elif self.audience is not None:
            raise _refuse("wrong_audience", "no aud claim")
        exp = _number(claims, "exp")
        if exp is None:
            if not self.allow_no_exp:
                raise _refuse("no_expiry")
        elif exp <= now - self.leeway_s:
            raise _refuse("expired")
        nbf = _number(claims, "nbf")
        if nbf is not None and nbf > now + self.leeway_s:
            raise _refuse("not_yet_valid")
        _number(claims, "iat")  # only its type: a clock ahead of ours is no reason to refuse
        subject = claims.get("sub")
        if subject is not None and not isinstance(subject, str):
            raise _refuse("bad_claims", "sub is not a string")
        if subject is not None and len(subject.encode("utf-8")) > MAX_SUBJECT_BYTES:
            # (the relay records it as the owner of each client id the subject writes)
            raise _refuse("bad_claims", f"sub is longer than {MAX_SUBJECT_BYTES} bytes")
        if "docs" not in claims:
            raise _refuse("bad_claims", "no docs claim")
        try:
            grants = Grants(claims["docs"])
        except ValueError as exc:
            raise _refuse("bad_claims", f"docs: {exc}") from None
        return TokenClaims(subject=subject, exp=exp, grants=grants, claims=claims)


def verifier_from_values(
    *,
    secrets: Sequence[str],
    public_key_files: Sequence[str],
    issuer: str | None = None,
    audience: str | None = None,
    leeway_s: float = 30.0,
    allow_no_exp: bool = False,
) -> TokenVerifier | None:
    """The verifier for these settings values; None when no key is configured.

    Tokens are required exactly when at least one key is configured.

    Raises:
        ValueError: as :func:`load_keys`.
    """
    if not secrets and not public_key_files:
        return None
    return TokenVerifier(
        load_keys(secrets, public_key_files),
        issuer=issuer,
        audience=audience,
        leeway_s=leeway_s,
        allow_no_exp=allow_no_exp,
    )


# -- requests --------------------------------------------------------------------------------


def _query_tokens(path: str) -> list[str]:
    _, question, query = path.partition("?")
    if not question:
        return []
    return [value for name, value in parse_qsl(query, keep_blank_values=True) if name == "token"]


def _header(headers: Mapping[str, str], name: str) -> list[str]:
    # websockets' Headers are case-insensitive and may repeat a name; a dict is neither
    get_all = getattr(headers, "get_all", None)
    if callable(get_all):
        return [str(value) for value in get_all(name)]
    lowered = name.lower()
    return [value for key, value in headers.items() if key.lower() == lowered]


def token_from_request(path: str, headers: Mapping[str, str]) -> str | None:
    """The access token of a websocket request, or None if it carries none.

    A token may come as the ``token`` query parameter (y-websocket providers send
    ``params: {token}`` so) or as ``Authorization: Bearer <token>``. Both may be given
    if they are equal; an empty one counts as absent. Other authorization schemes are
    ignored (a proxy may use them).

    Raises:
        TokenRefused: "malformed" when the two differ, a parameter or header repeats,
            or a Bearer header is empty or holds a space.
    """
    found: list[str] = [value for value in _query_tokens(path) if value]
    if len(found) > 1:
        raise _refuse("malformed", "more than one token parameter")
    bearer: list[str] = []
    for value in _header(headers, "Authorization"):
        scheme, _, credentials = value.strip().partition(" ")
        if scheme.lower() != "bearer":
            continue
        credentials = credentials.strip()
        if not credentials or " " in credentials:
            raise _refuse("malformed", "empty or spaced Bearer credentials")
        bearer.append(credentials)
    if len(bearer) > 1:
        raise _refuse("malformed", "more than one Bearer header")
    if found and bearer and found[0] != bearer[0]:
        raise _refuse("malformed", "query token and Bearer header differ")
    tokens = bearer or found
    return tokens[0] if tokens else None


def redact(path: str) -> str:
    """``path`` with the value of every ``token`` query parameter replaced by ``***``.

    The rest is kept byte for byte. Parameter names are compared decoded, as
    :func:`token_from_request` reads them (``%74oken=`` is a token too).
    """
    head, question, query = path.partition("?")
    if not question:
        return path
    parts = query.split("&")
    for index, part in enumerate(parts):
        name, equals, _ = part.partition("=")
        if equals and unquote_plus(name) == TOKEN_PARAMETER:
            parts[index] = f"{name}=***"
    return f"{head}?{'&'.join(parts)}"


# -- minting (development and tests) --------------------------------------------------------


def _signing_key(key: str | bytes) -> tuple[str, Any]:
    """``(algorithm, key)`` for a secret or a private key PEM."""
    data = key.encode("utf-8") if isinstance(key, str) else key
    if b"-----BEGIN" not in data:
        return "HS256", _secret_bytes(data, "token secret")
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    private: PrivateKeyTypes
    try:
        private = load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise ValueError("not an unencrypted PEM private key of a supported type") from None
    return _algorithm_of(private), private


def mint_token(
    key: str | bytes,
    *,
    subject: str | None,
    docs: Mapping[str, str],
    ttl_s: float | None,
    issuer: str | None = None,
    audience: str | None = None,
    kid: str | None = None,
    now: float | None = None,
) -> str:
    """Sign a token for development and tests.

    ``key`` is an HS256 secret (at least 32 bytes) or a private key PEM (RSA, EC P-256 or
    P-384, Ed25519: the algorithm follows). ``ttl_s`` None mints a token without expiry
    (refused unless the verifier allows it).

    Raises:
        ValueError: a bad key, ``docs`` or ``ttl_s``.
    """
    algorithm, signing_key = _signing_key(key)
    grants = Grants(docs)  # refuse now what a verifier would refuse later
    if ttl_s is not None and not ttl_s > 0:
        raise ValueError(f"ttl must be positive, got {ttl_s}")
    issued = int(time.time() if now is None else now)
    payload: dict[str, Any] = {"iat": issued, "docs": grants.to_claim()}
    if subject is not None:
        payload["sub"] = subject
    if ttl_s is not None:
        payload["exp"] = issued + math.ceil(ttl_s)
    if issuer is not None:
        payload["iss"] = issuer
    if audience is not None:
        payload["aud"] = audience
    import jwt

    headers = {"kid": kid} if kid is not None else None
    return jwt.encode(payload, signing_key, algorithm=algorithm, headers=headers)
