"""Attacks on access control, as an outsider (or a token holder) would try them.

Real relay processes on loopback (``relay_factory``), or an in-process ``Relay`` where a
hook is needed. Each test shows a protection holding, and fails if it is removed: it
asserts on what the store holds, what the attacker received, close codes. Eight of them
reproduced bugs this review found, fixed since (a revoked token coming straight back, a
read-only connection's claims filling the document's client ids, a revoked hook raising
CancelledError ending the checks, tokens left in DEBUG logs three ways, a token in a
replica's status, an exp too large for a float answered 500).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import os
import re
import ssl
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import jwt
import pytest
import trustme
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from helpers import eventually, timeout_s
from pycrdt import Doc, Text, merge_updates
from stock import close_of, messages_within, read_document, stored_text, text_update
from websockets.asyncio.client import connect
from websockets.asyncio.server import serve
from websockets.exceptions import ConnectionClosed, InvalidStatus

import crdtsync.server.relay as relay_module
from crdtsync.client import Replica
from crdtsync.integrity import client_id_of_key
from crdtsync.protocol import (
    ExtClaim,
    ExtHello,
    ExtRefused,
    ExtUpdate,
    PermissionDenied,
    SyncStep1,
    SyncStep2,
    SyncUpdate,
    decode_message,
)
from crdtsync.server import Relay
from crdtsync.settings import RelaySettings

pytestmark = pytest.mark.anyio

SECRET = "attack-secret-of-at-least-32-bytes-0123456789"
OTHER_SECRET = "not-the-relay-secret-but-32-bytes-long-9876"
AUDIENCE = "crdtsync-attacks"
ADMIN_DOCS = {"**": "rw"}


# -- helpers ---------------------------------------------------------------------------------


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def claims_for(
    docs: Any, subject: str | None = "alice", ttl_s: float | None = 600, **extra: Any
) -> dict[str, Any]:
    now = time.time()
    payload: dict[str, Any] = {"iat": int(now), "aud": AUDIENCE, "docs": docs}
    if subject is not None:
        payload["sub"] = subject
    if ttl_s is not None:
        payload["exp"] = now + ttl_s
    payload.update(extra)
    return payload


def sign(payload: dict[str, Any], key: str | bytes = SECRET, **headers: Any) -> str:
    return jwt.encode(payload, key, algorithm="HS256", headers=headers or None)


def tok(docs: Any, subject: str | None = "alice", ttl_s: float | None = 600, **extra: Any) -> str:
    return sign(claims_for(docs, subject, ttl_s, **extra))


def forge(header: dict[str, Any], payload: dict[str, Any], signature: bytes | None) -> str:
    """A compact JWS by hand (no library refuses what we ask for)."""
    signing_input = f"{b64url(json.dumps(header).encode())}.{b64url(json.dumps(payload).encode())}"
    return f"{signing_input}.{b64url(signature) if signature is not None else ''}"


def hs256(signing_input: str, key: bytes) -> bytes:
    return hmac.new(key, signing_input.encode(), hashlib.sha256).digest()


async def outcome(url: str, headers: Any = None) -> str:
    """What a handshake gets: ``"HTTP <status>: <body>"``, or ``"open"`` (then closed)."""
    try:
        async with connect(url, additional_headers=headers, open_timeout=timeout_s(10)):
            return "open"
    except InvalidStatus as exc:
        return f"HTTP {exc.response.status_code}: {exc.response.body.decode().strip()}"


async def seed(relay: Any, name: str, text: str) -> None:
    admin = tok(ADMIN_DOCS, subject="admin")
    async with connect(f"{relay.url}/{name}?token={admin}") as ws:
        await read_document(ws)
        await ws.send(SyncUpdate(text_update(Doc(), text)).encode())
        await read_document(ws)  # answered after the update: it was stored


async def raw_http(port: int, request: bytes, seconds: float = 3.0) -> bytes:
    """Send raw bytes to the relay's port; what comes back before it closes (or a timeout)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        chunks: list[bytes] = []
        try:
            async with asyncio.timeout(timeout_s(seconds)):
                while chunk := await reader.read(65536):
                    chunks.append(chunk)
        except TimeoutError:
            pass
        return b"".join(chunks)
    finally:
        writer.close()


async def raw_upgrade(port: int, target: str, seconds: float = 3.0) -> tuple[str, bytes]:
    """A websocket handshake by hand, for request targets a client library refuses to
    send (``#``, non-ASCII): the status line, and the bytes that follow the headers."""
    request = (
        f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
        "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        "Sec-WebSocket-Version: 13\r\n\r\n"
    ).encode()
    answer = await raw_http(port, request, seconds)
    head, _, rest = answer.partition(b"\r\n\r\n")
    return head.split(b"\r\n", 1)[0].decode(errors="replace"), rest


def client_frame(payload: bytes, opcode: int = 0x2) -> bytes:
    """One masked websocket frame, as a client sends it (RFC 6455 section 5.2)."""
    mask = os.urandom(4)
    n = len(payload)
    if n < 126:
        head = bytes((0x80 | opcode, 0x80 | n))
    elif n < 65536:
        head = bytes((0x80 | opcode, 0x80 | 126)) + n.to_bytes(2, "big")
    else:
        head = bytes((0x80 | opcode, 0x80 | 127)) + n.to_bytes(8, "big")
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


async def raw_websocket(
    port: int, target: str
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A websocket opened by hand: it answers nothing (no pong, no close) unless told."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        (
            f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
            "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
    )
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout_s(5))
    assert head.startswith(b"HTTP/1.1 101"), head
    return reader, writer


def http_url(relay: Any) -> str:
    url: str = relay.url
    return url.replace("ws://", "http://", 1)


def get(url: str, headers: dict[str, str] | None = None) -> tuple[int, str]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s(10)) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


@pytest.fixture
def token_relay(relay_factory):
    return relay_factory("relay.db", "--token-secret", SECRET, "--token-audience", AUDIENCE)


def in_process_settings(tmp_path: Path, **overrides: Any) -> RelaySettings:
    return RelaySettings(
        port=0,
        store=tmp_path / "inproc.db",
        token_secrets=[SECRET],
        token_audience=AUDIENCE,
        compaction_workers=0,
        **overrides,
    )


# -- forged, malformed and hostile tokens ---------------------------------------------------


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


async def test_forged_and_hostile_tokens_get_401_and_never_write(relay_factory, tmp_path, rsa_key):
    public_pem = rsa_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    pem_file = tmp_path / "idp.pem"
    pem_file.write_bytes(public_pem)
    relay = relay_factory(
        "relay.db",
        "--token-secret", SECRET,
        "--token-public-key", f"kid=idp,{pem_file}",
        "--token-audience", AUDIENCE,
    )  # fmt: skip
    good = claims_for(ADMIN_DOCS, subject="mallory")
    rs256 = jwt.encode(good, rsa_key, algorithm="RS256", headers={"kid": "idp"})
    assert await outcome(f"{relay.url}/doc?token={rs256}") == "open"  # the key works

    def signed_input(header: dict[str, Any], payload: dict[str, Any]) -> str:
        return f"{b64url(json.dumps(header).encode())}.{b64url(json.dumps(payload).encode())}"

    hs512_input = signed_input({"alg": "HS512"}, good)
    pem_hs = signed_input({"alg": "HS256", "typ": "JWT"}, good)
    pem_kid_hs = signed_input({"alg": "HS256", "kid": "idp"}, good)
    many = {f"p{i}/**": "rw" for i in range(1001)}
    deep = b'{"alg":"HS256","x":' + b"[" * 3000 + b"]" * 3000 + b"}"
    nested = f"{b64url(deep)}.{b64url(b'{}')}.c2ln"
    attacks: dict[str, tuple[str, str]] = {
        # signature tricks
        "alg none": (forge({"alg": "none", "typ": "JWT"}, good, None), "bad_signature"),
        "alg None": (forge({"alg": "None"}, good, None), "bad_signature"),
        "alg none, signature kept": (forge({"alg": "none"}, good, b"x" * 32), "bad_signature"),
        "HS256 empty signature": (forge({"alg": "HS256"}, good, None), "bad_signature"),
        "HS512 with the secret": (
            f"{hs512_input}.{b64url(hmac.new(SECRET.encode(), hs512_input.encode(), 'sha512').digest())}",  # noqa: E501
            "bad_signature",
        ),
        "another secret": (sign(good, OTHER_SECRET), "bad_signature"),
        "HS256 keyed with the public key PEM": (
            f"{pem_hs}.{b64url(hs256(pem_hs, public_pem))}",
            "bad_signature",
        ),
        "HS256 under the RSA key's kid": (
            f"{pem_kid_hs}.{b64url(hs256(pem_kid_hs, public_pem))}",
            "bad_signature",
        ),
        "HS256 under the RSA kid, keyed with the secret": (
            sign(good, SECRET, kid="idp"),
            "bad_signature",
        ),
        "kid elsewhere": (sign(good, SECRET, kid="../../../etc/passwd"), "unknown_key"),
        "kid not a string": (forge({"alg": "HS256", "kid": 7}, good, b"s"), "malformed"),
        "crit header": (sign(good, SECRET, crit=["exp"]), "malformed"),
        "b64 false": (sign(good, SECRET, b64=False), "malformed"),
        "RS256 signature under HS256": (
            forge({"alg": "HS256"}, good, base64.urlsafe_b64decode(rs256.split(".")[2] + "==")),
            "bad_signature",
        ),
        # form
        "JWE-like five parts": (rs256 + ".a.b", "malformed"),
        "two parts": (".".join(rs256.split(".")[:2]), "malformed"),
        "padding": (rs256 + "==", "malformed"),
        "nested header": (nested, "malformed"),
        # claims, validly signed with the relay's secret
        "no exp": (tok(ADMIN_DOCS, ttl_s=None), "no_expiry"),
        "exp a string": (sign({**good, "exp": str(int(time.time()) + 600)}), "bad_claims"),
        "exp true": (sign({**good, "exp": True}), "bad_claims"),
        "exp null": (sign({**good, "exp": None}), "bad_claims"),
        "exp exactly now, past the leeway": (sign({**good, "exp": time.time() - 30}), "expired"),
        "nbf past the leeway": (sign({**good, "nbf": time.time() + 60}), "not_yet_valid"),
        "no aud": (sign({k: v for k, v in good.items() if k != "aud"}), "wrong_audience"),
        "aud list without ours": (sign({**good, "aud": ["x", "y"]}), "wrong_audience"),
        "aud an object": (sign({**good, "aud": {"a": AUDIENCE}}), "bad_claims"),
        "sub a number": (sign({**good, "sub": 7}), "bad_claims"),
        "sub over 256 bytes": (sign({**good, "sub": "é" * 129}), "bad_claims"),
        "no docs": (sign({k: v for k, v in good.items() if k != "docs"}), "bad_claims"),
        "docs a list": (sign({**good, "docs": ["**"]}), "bad_claims"),
        "docs a string": (sign({**good, "docs": "**"}), "bad_claims"),
        "rights not a string": (sign({**good, "docs": {"**": True}}), "bad_claims"),
        "rights w without r": (sign({**good, "docs": {"**": "w"}}), "bad_claims"),
        "rights repeated": (sign({**good, "docs": {"**": "rrw"}}), "bad_claims"),
        "pattern ***": (sign({**good, "docs": {"***": "rw"}}), "bad_claims"),
        "pattern ..": (sign({**good, "docs": {"../**": "rw"}}), "bad_claims"),
        "pattern with a space": (sign({**good, "docs": {"a **": "rw"}}), "bad_claims"),
    }
    # More than the relay reads of a request line or header (8 KiB): refused before it
    # is parsed at all, in either place.
    too_many = sign({**good, "docs": many})
    assert (await outcome(f"{relay.url}/doc?token={too_many}")).startswith("HTTP 414")
    assert (await outcome(f"{relay.url}/doc", {"Authorization": f"Bearer {too_many}"})).startswith(
        "HTTP 431"
    )
    results = {}
    for what, (token, _) in attacks.items():
        results[what] = await outcome(f"{relay.url}/doc?token={token}")
        if results[what] == "open":
            continue
        # the same in a header (both transports are refused alike)
        if "." in token:
            via_header = await outcome(f"{relay.url}/doc", {"Authorization": f"Bearer {token}"})
            assert via_header == results[what], what
    expected = {
        what: f"HTTP 401: token refused ({reason})" for what, (_, reason) in attacks.items()
    }
    got = {what: r.split(":", 2)[0] + ":" + r.split(":", 2)[1] for what, r in results.items()}
    assert got == expected
    # Nothing any of them did reached the store.
    assert stored_text(relay.store, "doc") == ""


async def test_oversized_tokens_are_refused_and_the_relay_stays_up(token_relay):
    relay = token_relay
    huge_docs = {f"d{i:04d}/{'x' * 40}/**": "rw" for i in range(400)}  # ~20 KB
    huge = tok(huge_docs)
    assert len(huge) > 16 * 1024
    for url, headers in (
        (f"{relay.url}/doc?token={huge}", None),
        (f"{relay.url}/doc", {"Authorization": f"Bearer {huge}"}),
        (f"{relay.url}/doc?token={'a' * 200_000}", None),
        (f"{relay.url}/doc", {"Authorization": "Bearer " + "a.b." + "c" * 9000}),
    ):
        try:
            got = await outcome(url, headers)
        except Exception as exc:  # a refused handshake in any form, never an upgrade
            got = type(exc).__name__
        assert got != "open"
        if got.startswith("HTTP "):
            assert got.split(":")[0] in ("HTTP 401", "HTTP 414", "HTTP 431"), got
    # Still serving.
    rw = tok({"**": "rw"})
    async with connect(f"{relay.url}/doc?token={rw}") as ws:
        await read_document(ws)


async def test_hostile_docs_claim_is_cheap_to_match(token_relay):
    """As many distinct multi-wildcard patterns as fit in a header (8 KiB), none matching
    a 508-byte name: every pattern runs its automaton over the whole name."""
    relay = token_relay
    letters = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
    docs: dict[str, str] = {}
    for a in letters:
        for b in letters:
            if len(docs) < 340:
                docs[f"**{a}**{b}**"] = "r"
    docs["**"] = "-"  # and a catch-all denial (least specific: decided last)
    hostile = tok(docs)
    assert len(hostile) < 8000
    name = "/".join(["0123456789"] * 46) + "/0"  # 508 bytes, nothing any pattern wants
    started = time.monotonic()
    for _ in range(5):
        got = await outcome(f"{relay.url}/{name}", {"Authorization": f"Bearer {hostile}"})
        assert got.startswith("HTTP 403"), got
    assert time.monotonic() - started < timeout_s(5)


async def test_token_transport_tricks(token_relay):
    relay = token_relay
    await seed(relay, "team/plans", "seed.")
    rw = tok({"team/*": "rw"})
    ro = tok({"team/*": "r"})
    other_rw = tok({"team/*": "rw"}, subject="bob")
    url = f"{relay.url}/team/plans"
    cases: dict[str, tuple[str, Any, str]] = {
        "query and header differ": (
            f"{url}?token={ro}",
            {"Authorization": f"Bearer {rw}"},
            "HTTP 401: token refused (malformed)",
        ),
        "two query tokens": (
            f"{url}?token={ro}&token={rw}",
            None,
            "HTTP 401: token refused (malformed)",
        ),
        "two query tokens, equal": (
            f"{url}?token={rw}&token={rw}",
            None,
            "HTTP 401: token refused (malformed)",
        ),
        "two Bearer headers": (
            url,
            [("Authorization", f"Bearer {ro}"), ("Authorization", f"Bearer {other_rw}")],
            "HTTP 401: token refused (malformed)",
        ),
        "Bearer with two words": (
            url,
            {"Authorization": f"Bearer {rw} {rw}"},
            "HTTP 401: token refused (malformed)",
        ),
        "empty Bearer": (url, {"Authorization": "Bearer "}, "HTTP 401: token refused (m"),
        "Basic scheme is no token": (
            url,
            {"Authorization": f"Basic {rw}"},
            "HTTP 401: token refused (missing)",
        ),
        "scheme-less header is no token": (
            url,
            {"Authorization": rw},
            "HTTP 401: token refused (missing)",
        ),
        "TOKEN= is another parameter": (
            f"{url}?TOKEN={rw}",
            None,
            "HTTP 401: token refused (missing)",
        ),
        "token in the fragment-like tail": (
            f"{url}?x=1%23token={rw}",
            None,
            "HTTP 401: token refused (missing)",
        ),
        "lowercase bearer": (url, {"Authorization": f"bearer {rw}"}, "open"),
        "empty query token, header given": (
            f"{url}?token=",
            {"Authorization": f"Bearer {rw}"},
            "open",
        ),
        "same token both ways": (f"{url}?token={rw}", {"Authorization": f"Bearer {rw}"}, "open"),
    }
    got = {}
    for what, (u, headers, _) in cases.items():
        got[what] = await outcome(u, headers)
    for what, (_, _, expected) in cases.items():
        assert got[what].startswith(expected), (what, got[what])
    # A read-only token in the header and a read-write one in the query never combine.
    assert stored_text(relay.store, "team/plans") == "seed."


# -- document names against patterns ------------------------------------------------------


async def test_patterns_do_not_reach_other_documents(token_relay):
    relay = token_relay
    protected = {
        "team/secret": "SECRET-1.",
        "team/a/b": "SECRET-2.",
        "teamx/a": "SECRET-3.",
        "team": "SECRET-4.",
        "Team/open": "SECRET-5.",
    }
    for name, text in protected.items():
        await seed(relay, name, text)
    grant = {"team/*": "rw", "team/secret": "-"}
    attacker = tok(grant, subject="mallory")
    attempts = [
        "team/secret", "team/a/b", "teamx/a", "team", "Team/open", "TEAM/secret",
        "team/secret/", "team//secret", "team/./secret", "team/../team/secret",
        "team/a/../secret", "./team/secret", "team/secret/.", "team/secret%00",
        "team/secret#frag", "team/secret?x=y", "team/secret;x", "team/a%2Fb/c",
        "team/%2E%2E/team/secret", "team%2Fsecret", "team/secret%2F", "team/%73ecret",
        "team/*", "team/**", "team/a/b/", "/team/a/b", "team/" + "s" * 600,
    ]  # fmt: skip
    leaked: dict[str, str] = {}
    opened: list[str] = []
    for name in attempts:
        url = f"{relay.url}/{name}" + ("&" if "?" in name else "?") + f"token={attacker}"
        if "#" in name:
            continue  # by hand, below
        try:
            async with connect(url) as ws:
                try:
                    text, _ = await read_document(ws, seconds=5)
                except ConnectionClosed:
                    continue  # an invalid name: closed before anything was sent
                opened.append(name)
                if "SECRET" in text:
                    leaked[name] = text
                await ws.send(SyncUpdate(text_update(Doc(), f"[mallory at {name}]")).encode())
                await read_document(ws)
        except InvalidStatus as exc:
            assert exc.response.status_code in (403, 414), (name, exc.response.status_code)
            assert "SECRET" not in exc.response.body.decode()
    # Targets a client library will not send: a fragment, raw UTF-8, a relative path.
    for target in (
        f"/team/secret#x?token={attacker}",
        f"/team/a#/../secret?token={attacker}",
        f"/team/é?token={attacker}",
        f"team/secret?token={attacker}",
        f"Xteam/secret?token={attacker}",
    ):
        status, rest = await raw_upgrade(relay.port, target, seconds=1.0)
        if status.startswith("HTTP/1.1 101"):
            # upgraded only to be closed at once (1008: an invalid name), nothing sent
            assert rest[:1] == b"\x88", (target, rest)
            assert rest[2:4] == (1008).to_bytes(2, "big"), (target, rest)
        else:
            assert status == "" or " 403 " in status or " 400 " in status, (target, status)
        assert b"SECRET" not in rest
    assert leaked == {}
    # What "team/*" grants: one segment under team/. These names are documents of their
    # own ("%" escapes and "*" are kept verbatim, never decoded into another name).
    assert sorted(opened) == sorted(
        ["team/secret%00", "team/secret;x", "team/secret%2F", "team/%73ecret", "team/*",
         "team/**"]
    )  # fmt: skip
    for name, text in protected.items():
        assert stored_text(relay.store, name) == text, name


# -- read-only connections ------------------------------------------------------------------


async def test_read_only_token_cannot_write_by_any_message_kind(token_relay):
    relay = token_relay
    await seed(relay, "team/plans", "seed.")
    ro = tok({"team/*": "r"}, subject="reader")
    rw = tok({"team/*": "rw"}, subject="watcher")
    async with connect(f"{relay.url}/team/plans?token={rw}") as watcher:
        await read_document(watcher)
        # A stock client: a step 2 with content, updates, an update that goes through the
        # relay's worker-process check (>= 256 KiB), awareness with a big state.
        async with connect(f"{relay.url}/team/plans?token={ro}") as ws:
            await read_document(ws)
            await ws.send(SyncStep2(text_update(Doc(), "[ro step2]")).encode())
            for n in range(3):
                await ws.send(SyncUpdate(text_update(Doc(), f"[ro update {n}]")).encode())
            await ws.send(SyncUpdate(text_update(Doc(), "[ro big]" + "x" * 300_000)).encode())
            text, seen = await read_document(ws)
            denied = [m for m in seen if isinstance(m, PermissionDenied)]
            denied += [m for m in await messages_within(ws, 0.3) if isinstance(m, PermissionDenied)]
            assert len(denied) == 1  # once, and the connection stays open
            assert "[ro" not in text
        # A crdtsync replica: keyed updates, unkeyed updates, a step 2, claims then writes.
        async with connect(f"{relay.url}/team/plans?crdtsync=1&token={ro}") as ws:
            first = decode_message(await ws.recv())
            assert isinstance(first, ExtHello)
            key = os.urandom(32)
            own = client_id_of_key(key)
            await ws.send(ExtClaim(((own, key),), (own,)).encode())
            doc: Doc[Any] = Doc(client_id=own)
            for k in range(1, 4):
                await ws.send(ExtUpdate(k, text_update(doc, f"[ro ext {k}]")).encode())
            await ws.send(SyncUpdate(text_update(doc, "[ro ext unkeyed]")).encode())
            await ws.send(SyncStep2(text_update(doc, "[ro ext step2]")).encode())
            text, seen = await read_document(ws)
            refused = [m for m in seen if isinstance(m, ExtRefused)]
            refused += [m for m in await messages_within(ws, 0.3) if isinstance(m, ExtRefused)]
            assert sorted(m.key for m in refused if m.key) == [1, 2, 3]
            assert "[ro" not in text
        fanned = await messages_within(watcher, 0.5)
        got: Doc[Any] = Doc()
        for m in fanned:
            if isinstance(m, SyncUpdate | SyncStep2):
                got.apply_update(m.update)
        assert "[ro" not in str(got.get("text", type=Text))
    assert stored_text(relay.store, "team/plans") == "seed."


async def test_read_only_connection_cannot_lock_writers_out_with_claims(relay_factory, monkeypatch):
    monkeypatch.setenv("CRDTSYNC_MAX_DOCUMENT_CLIENTS", "16")
    relay = relay_factory("relay.db", "--token-secret", SECRET, "--token-audience", AUDIENCE)
    ro = tok({"team/*": "r"}, subject="reader")
    rw = tok({"team/*": "rw"}, subject="writer")
    async with connect(f"{relay.url}/team/plans?crdtsync=1&token={ro}") as ws:
        assert isinstance(decode_message(await ws.recv()), ExtHello)
        keys = [os.urandom(32) for _ in range(16)]
        claims = tuple((client_id_of_key(k), k) for k in keys)
        await ws.send(ExtClaim(claims, tuple(c for c, _ in claims)).encode())
        await read_document(ws)  # handled in order: the claim was recorded before this
    # A writer with the right to write comes along.
    async with connect(f"{relay.url}/team/plans?token={rw}") as ws:
        await read_document(ws)
        await ws.send(SyncUpdate(text_update(Doc(), "the writer's text")).encode())
        _, seen = await read_document(ws)
        seen += await messages_within(ws, 0.3)
    assert stored_text(relay.store, "team/plans") == "the writer's text", [
        m for m in seen if isinstance(m, PermissionDenied)
    ]


# -- client ids owned by subjects ---------------------------------------------------------


async def test_a_subject_cannot_write_under_another_subjects_client_id(token_relay):
    relay = token_relay
    alice_tok = tok({"team/*": "rw"}, subject="alice")
    bob_tok = tok({"team/*": "rw"}, subject="bob")
    subless = tok({"team/*": "rw"}, subject=None)
    url = f"{relay.url}/team/plans"
    alice: Doc[Any] = Doc(client_id=4242)
    async with connect(f"{url}?token={alice_tok}") as ws:
        await read_document(ws)
        await ws.send(SyncUpdate(text_update(alice, "A1.")).encode())
        await read_document(ws)

    def as_alice(text: str) -> bytes:
        forged: Doc[Any] = Doc(client_id=4242)
        forged.apply_update(alice.get_update())
        return text_update(forged, text)

    # Bob's own writes, each bundled with content under alice's id (at her next clocks).
    async with connect(f"{url}?token={bob_tok}") as ws:
        await read_document(ws)
        await ws.send(SyncStep2(as_alice("[bob as alice, step 2]")).encode())
        bob: Doc[Any] = Doc(client_id=777)
        bob.apply_update(alice.get_update())
        mixed = merge_updates(text_update(bob, "B1."), as_alice("[bob as alice, mixed]"))
        await ws.send(SyncUpdate(mixed).encode())
        await read_document(ws)
    # ... and as a crdtsync replica, proving a key of his own first.
    async with connect(f"{url}?crdtsync=1&token={bob_tok}") as ws:
        assert isinstance(decode_message(await ws.recv()), ExtHello)
        key = os.urandom(32)
        await ws.send(ExtClaim(((client_id_of_key(key), key),), ()).encode())
        await ws.send(ExtUpdate(5, as_alice("[bob as alice, keyed]")).encode())
        _, seen = await read_document(ws)
        seen += await messages_within(ws, 0.3)
        refusals = [m for m in seen if isinstance(m, ExtRefused)]
        assert [m.key for m in refusals] == [5]
        assert refusals[0].unproven
    # A token without a subject owns nothing, so it cannot take alice's ids either.
    async with connect(f"{url}?token={subless}") as ws:
        await read_document(ws)
        await ws.send(SyncUpdate(as_alice("[subless as alice]")).encode())
        await read_document(ws)
    # Alice goes on under her id, on a new connection.
    async with connect(f"{url}?token={alice_tok}") as ws:
        await read_document(ws)
        await ws.send(SyncUpdate(text_update(alice, "A2.")).encode())
        await read_document(ws)
    text = stored_text(relay.store, "team/plans")
    assert "as alice" not in text
    assert "A1." in text
    assert "A2." in text
    assert "B1." in text  # bob's own part was kept


async def test_an_anonymous_relay_ignores_tokens_entirely(relay_factory):
    """No key configured: a self-made token gives no subject (nobody owns what it writes)."""
    relay = relay_factory()
    forged = sign(claims_for(ADMIN_DOCS, subject="alice"), OTHER_SECRET)
    writer: Doc[Any] = Doc(client_id=9191)
    async with connect(f"{relay.url}/doc?token={forged}") as ws:
        await read_document(ws)
        await ws.send(SyncUpdate(text_update(writer, "first.")).encode())
        await read_document(ws)
    other: Doc[Any] = Doc(client_id=9191)
    other.apply_update(writer.get_update())
    async with connect(f"{relay.url}/doc", additional_headers={"Authorization": "Bearer x"}) as ws:
        await read_document(ws)
        await ws.send(SyncUpdate(text_update(other, "second.")).encode())
        await read_document(ws)
    # The forged "alice" owns nothing: anyone may continue an unowned id (README: integrity).
    assert stored_text(relay.store, "doc") == "first.second."


# -- expiry -----------------------------------------------------------------------------------


async def test_nothing_sent_after_expiry_is_stored(relay_factory, monkeypatch):
    monkeypatch.setenv("CRDTSYNC_TOKEN_LEEWAY_S", "0")
    relay = relay_factory("relay.db", "--token-secret", SECRET, "--token-audience", AUDIENCE)
    exp = time.time() + 1.5
    short = sign({**claims_for({"**": "rw"}), "exp": exp})
    sent: dict[int, float] = {}
    async with connect(f"{relay.url}/doc?token={short}") as ws:
        await read_document(ws)
        doc: Doc[Any] = Doc()
        closed_at = None
        try:
            async with asyncio.timeout(timeout_s(8)):
                n = 0
                while True:
                    update = text_update(doc, f"<{n}>")
                    sent[n] = time.time()
                    await ws.send(SyncUpdate(update).encode())
                    n += 1
                    with_close = await messages_within(ws, 0.02)
                    del with_close
        except ConnectionClosed as exc:
            closed_at = time.time()
            assert exc.rcvd is not None
            assert (exc.rcvd.code, exc.rcvd.reason) == (4401, "token expired")
    assert closed_at is not None
    assert closed_at < exp + timeout_s(1.5)
    stored = [int(m) for m in re.findall(r"<(\d+)>", stored_text(relay.store, "doc"))]
    assert stored, "nothing stored before expiry either"
    late = [n for n in stored if sent[n] > exp + 0.2]
    assert late == [], f"stored after exp: {late} (exp {exp}, sent {[sent[n] for n in late]})"


async def test_leeway_stretches_validity_by_the_leeway_only(relay_factory, monkeypatch):
    monkeypatch.setenv("CRDTSYNC_TOKEN_LEEWAY_S", "2")
    relay = relay_factory("relay.db", "--token-secret", SECRET, "--token-audience", AUDIENCE)
    base = claims_for({"**": "rw"})
    now = time.time()
    assert (await outcome(f"{relay.url}/d?token={sign({**base, 'exp': now - 2.0})}")).startswith(
        "HTTP 401: token refused (expired)"
    )  # exactly at exp + leeway
    assert (await outcome(f"{relay.url}/d?token={sign({**base, 'nbf': now + 4})}")).startswith(
        "HTTP 401: token refused (not_yet_valid)"
    )
    assert await outcome(f"{relay.url}/d?token={sign({**base, 'nbf': now + 1})}") == "open"
    # Expired a second ago: within the leeway, so let in, and closed when the leeway ends.
    late = sign({**base, "exp": time.time() - 1.0})
    async with connect(f"{relay.url}/d?token={late}") as ws:
        opened = time.monotonic()
        await read_document(ws)
        assert await close_of(ws, 5) == (4401, "token expired")
        assert time.monotonic() - opened < timeout_s(2.5)


async def test_an_expired_connection_that_ignores_the_close_gets_and_stores_nothing(
    relay_factory, monkeypatch
):
    """A raw client never answers the 4401 close and keeps sending: what it sends after
    expiry is not stored, and nothing written after expiry reaches it."""
    monkeypatch.setenv("CRDTSYNC_TOKEN_LEEWAY_S", "0")
    monkeypatch.setenv("CRDTSYNC_CLOSE_TIMEOUT_S", "1")
    relay = relay_factory("relay.db", "--token-secret", SECRET, "--token-audience", AUDIENCE)
    exp = time.time() + 1.0
    short = sign({**claims_for({"**": "rw"}, subject="stubborn"), "exp": exp})
    reader, writer = await raw_websocket(relay.port, f"/doc?token={short}")
    try:
        writer.write(client_frame(SyncStep1(b"\x00").encode()))
        await asyncio.sleep(max(0.0, exp - time.time()) + 0.3)
        # Past expiry: it keeps writing, as if nothing happened.
        stubborn: Doc[Any] = Doc()
        for n in range(5):
            writer.write(client_frame(SyncUpdate(text_update(stubborn, f"LATE-{n}.")).encode()))
        # Another writer, with a good token, writes after the expiry.
        async with connect(f"{relay.url}/doc?token={tok({'**': 'rw'}, 'bob')}") as ws:
            await read_document(ws)
            await ws.send(SyncUpdate(text_update(Doc(), "AFTER-EXPIRY.")).encode())
            await read_document(ws)
        received = b""
        try:
            async with asyncio.timeout(timeout_s(5)):
                while chunk := await reader.read(65536):
                    received += chunk
        except (TimeoutError, ConnectionError):
            pass
    finally:
        writer.close()
    assert b"\x88" + bytes((2 + len("token expired"),)) + (4401).to_bytes(2, "big") in received
    assert b"AFTER-EXPIRY" not in received
    assert stored_text(relay.store, "doc") == "AFTER-EXPIRY."


@pytest.mark.parametrize("exp", [1e300, 2**63, 1.7976931348623157e308])
async def test_tokens_expiring_in_the_far_future_work_and_harm_nothing(token_relay, exp):
    relay = token_relay
    forever = sign({**claims_for({"**": "rw"}), "exp": exp})
    async with connect(f"{relay.url}/doc?token={forever}") as ws:
        await read_document(ws)
        await ws.send(SyncUpdate(text_update(Doc(), "ok.")).encode())
        await read_document(ws)
    assert stored_text(relay.store, "doc") == "ok."
    assert await outcome(f"{relay.url}/doc?token={tok({'**': 'r'})}") == "open"


async def test_an_integer_exp_too_large_for_a_float_is_a_bad_claim(token_relay):
    huge = sign({**claims_for({"**": "rw"}), "exp": 10**400})
    got = await outcome(f"{token_relay.url}/doc?token={huge}")
    assert got.startswith("HTTP 401: token refused (bad_claims)"), got


# -- revocation -------------------------------------------------------------------------------


async def test_a_revoked_token_cannot_come_back(tmp_path):
    revoked_subjects: set[str] = set()

    async def revoked(claims: Any, document: str) -> bool:
        return claims.subject in revoked_subjects

    relay = Relay(in_process_settings(tmp_path, token_recheck_s=1.0), revoked=revoked)
    await relay.start()
    try:
        alice = tok({"**": "rw"}, subject="alice")
        async with connect(f"{relay.url}/doc?token={alice}") as ws:
            await read_document(ws)
            revoked_subjects.add("alice")
            assert await close_of(ws, 10) == (4401, "token revoked")
        # The same token, straight back in.
        try:
            async with connect(f"{relay.url}/doc?token={alice}") as ws:
                await read_document(ws)
                await ws.send(SyncUpdate(text_update(Doc(), "after revocation")).encode())
                await read_document(ws)
        except (InvalidStatus, ConnectionClosed):
            pass
        assert "after revocation" not in stored_text(tmp_path / "inproc.db", "doc")
    finally:
        await relay.stop()


async def test_slow_and_failing_revocation_hooks_do_not_stall_the_relay(tmp_path, monkeypatch):
    monkeypatch.setattr(relay_module, "AUTHORIZE_TIMEOUT_S", 0.5)
    revoked_subjects: set[str] = set()
    asked: list[str] = []

    async def revoked(claims: Any, document: str) -> bool:
        asked.append(claims.subject)
        if claims.subject == "slow":
            await asyncio.sleep(3600)  # cut by the hook timeout
        if claims.subject == "broken":
            raise RuntimeError("revocation service down")
        return claims.subject in revoked_subjects

    relay = Relay(in_process_settings(tmp_path, token_recheck_s=0.2), revoked=revoked)
    await relay.start()
    try:
        conns = {}
        for subject in ("slow", "broken", "alice"):
            conns[subject] = await connect(f"{relay.url}/doc?token={tok({'**': 'rw'}, subject)}")
            await read_document(conns[subject])
        await eventually(lambda: asked.count("slow") >= 2, what="two rounds")
        # The relay keeps serving meanwhile: a new connection syncs at once.
        started = time.monotonic()
        async with connect(f"{relay.url}/doc?token={tok({'**': 'rw'}, 'carol')}") as ws:
            await read_document(ws)
        assert time.monotonic() - started < timeout_s(1)
        revoked_subjects.add("alice")
        assert await close_of(conns["alice"], 5) == (4401, "token revoked")
        # A failing or slow hook keeps the connection (the token itself is still good).
        for subject in ("slow", "broken"):
            assert conns[subject].close_code is None
            await read_document(conns[subject])
        for ws in conns.values():
            await ws.close()
    finally:
        await relay.stop()
    await eventually(
        lambda: (
            not [
                t
                for t in asyncio.all_tasks()
                if "_recheck_tokens" in getattr(t.get_coro(), "__qualname__", "")
            ]
        ),
        what="no revocation checks left running after stop()",
    )


async def test_revocation_survives_a_hook_that_raises_cancelled_error(tmp_path):
    revoked_subjects: set[str] = set()
    raised: list[bool] = []

    async def revoked(claims: Any, document: str) -> bool:
        if claims.subject == "flaky" and not raised:
            raised.append(True)
            raise asyncio.CancelledError()  # e.g. a client library cancelled underneath
        return claims.subject in revoked_subjects

    relay = Relay(in_process_settings(tmp_path, token_recheck_s=0.2), revoked=revoked)
    await relay.start()
    try:
        async with (
            connect(f"{relay.url}/doc?token={tok({'**': 'rw'}, 'flaky')}") as flaky,
            connect(f"{relay.url}/doc?token={tok({'**': 'rw'}, 'alice')}") as alice,
        ):
            await read_document(flaky)
            await read_document(alice)
            await eventually(lambda: raised, what="the hook's CancelledError")
            await asyncio.sleep(0.3)
            revoked_subjects.add("alice")
            assert await close_of(alice, 3) == (4401, "token revoked")
    finally:
        await relay.stop()


# -- metrics ------------------------------------------------------------------------------------


async def test_metrics_leak_no_names_and_need_their_token(relay_factory, monkeypatch):
    metrics_token = "metrics-scrape-token-0123456789abcdef"
    monkeypatch.setenv("CRDTSYNC_METRICS_TOKEN", metrics_token)
    relay = relay_factory("relay.db", "--token-secret", SECRET, "--token-audience", AUDIENCE)
    secret_doc, secret_sub = "private/ZZdocZZ", "ZZsubjectZZ"
    await seed(relay, secret_doc, "x")
    async with connect(f"{relay.url}/{secret_doc}?token={tok({'**': 'r'}, secret_sub)}") as ws:
        await read_document(ws)
        await ws.send(SyncUpdate(text_update(Doc(), "dropped")).encode())
        await outcome(f"{relay.url}/private/ZZrefusedZZ?token={tok({'x': 'r'}, secret_sub)}")
        await outcome(f"{relay.url}/private/ZZunauthZZ?token=ZZbadtokenZZ")
        url = f"{http_url(relay)}/metrics"
        refused = {
            "no header": get(url),
            "wrong token": get(url, {"Authorization": "Bearer wrong"}),
            "a prefix": get(url, {"Authorization": f"Bearer {metrics_token[:-1]}"}),
            "a longer one": get(url, {"Authorization": f"Bearer {metrics_token}x"}),
            "in the query": get(f"{url}?token={metrics_token}"),
            "an access token": get(url, {"Authorization": f"Bearer {tok(ADMIN_DOCS)}"}),
            "Basic": get(url, {"Authorization": f"Basic {metrics_token}"}),
        }
        assert {k: v[0] for k, v in refused.items()} == dict.fromkeys(refused, 401)
        assert all(metrics_token not in body for _, body in refused.values())
        status, body = get(url, {"Authorization": f"Bearer {metrics_token}"})
        assert status == 200
        assert "crdtsync_connections" in body
        # a websocket to /metrics is a document, and needs an access token like any
        assert (await outcome(f"{relay.url}/metrics")).startswith("HTTP 401")
    _, health = get(f"{http_url(relay)}/healthz?verbose=1")
    for text in (body, health):
        assert "ZZ" not in text


async def test_metrics_scrape_stays_fast_with_many_rooms(relay_factory, monkeypatch):
    monkeypatch.setenv("CRDTSYNC_MAX_CONNECTIONS_PER_ADDRESS", "1000")
    relay = relay_factory()
    conns = []
    try:
        for i in range(200):
            conns.append(await connect(f"{relay.url}/room-{i}"))
        loop = asyncio.get_running_loop()
        started = time.monotonic()
        for _ in range(3):
            status, body = await loop.run_in_executor(None, get, f"{http_url(relay)}/metrics")
            assert status == 200
        assert time.monotonic() - started < timeout_s(3)
        assert "crdtsync_rooms 200.0" in body
        assert "room-" not in body
    finally:
        for ws in conns:
            await ws.close()


# -- logs -----------------------------------------------------------------------------------


@pytest.fixture
def debug_relay(relay_factory, monkeypatch):
    monkeypatch.setenv("CRDTSYNC_LOG_LEVEL", "DEBUG")
    return relay_factory("relay.db", "--token-secret", SECRET, "--token-audience", AUDIENCE)


def secrets_of(token: str) -> list[str]:
    """The parts of a token that must never be logged: itself and its signature."""
    return [token, token.split(".")[-1]]


async def test_tokens_are_not_logged_on_any_path_the_relay_reads_them(debug_relay):
    relay = debug_relay
    good = tok({"**": "rw"}, subject="logged")
    ro = tok({"**": "r"}, subject="ro")
    expired = sign({**claims_for({"**": "rw"}), "exp": time.time() - 3600})
    forged = sign(claims_for({"**": "rw"}), OTHER_SECRET)
    plain_url = f"{relay.url}/team/plans"
    for url, headers in (
        (f"{plain_url}?token={good}", None),
        (f"{plain_url}?crdtsync=1&token={good}&x=1", None),
        (f"{plain_url}?token={expired}", None),
        (f"{plain_url}?token={forged}", None),
        (f"{plain_url}?token={ro}&token={good}", None),  # refused (two)
        (f"{plain_url};token={good}", None),
        (plain_url, {"Authorization": f"Bearer {good}"}),
        (plain_url, {"authorization": f"bearer   {expired}"}),
        (f"{plain_url}?token={good}", {"Authorization": f"Bearer {ro}"}),  # differ
    ):
        try:
            async with connect(url, additional_headers=headers) as ws:
                await read_document(ws)
        except (InvalidStatus, ConnectionClosed):
            pass
    # Malformed requests that the HTTP parser refuses (logged with the request line).
    for raw in (
        f"GET /team/plans?token={good}#frag HTTP/1.1\r\nHost: x\r\n\r\n".encode(),
        f"GET /team/plans?token={good} HTTP/2.0\r\n\r\n".encode(),
        f"GET /team/plans?token={good}\r\n\r\n".encode(),
        f"GET /team/plans?token={good} HTTP/1.1\r\nHost: x\r\nBad Header: 1\r\n\r\n".encode(),
        f"GET /team/plans?token={good} HTTP/1.1\r\nHost: x\r\n\r\n".encode(),  # no upgrade
        f"POST /team/plans?token={good} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n\r\n".encode(),
        f"GET /metrics HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {good}\r\n\r\n".encode(),
    ):
        await raw_http(relay.port, raw, seconds=1.0)
    await eventually(lambda: "HTTP/2.0" in relay.stderr(1_000_000), what="the parser's line")
    relay.terminate()
    log = relay.stderr(1_000_000)
    assert "token=***" in log  # the redaction ran (and the lines were logged at all)
    for token in (good, ro, expired, forged):
        for secret in secrets_of(token):
            assert secret not in log


async def test_percent_encoded_token_parameter_is_not_logged(debug_relay):
    relay = debug_relay
    good = tok({"**": "rw"}, subject="encoded")
    async with connect(f"{relay.url}/team/plans?%74oken={good}") as ws:
        await read_document(ws)  # the relay took it as the token: the handshake passed
    relay.terminate()
    log = relay.stderr(1_000_000)
    assert good.split(".")[-1] not in log


@pytest.mark.parametrize("scheme", ["Basic", "Token", "Bearer two words"])
async def test_authorization_headers_are_masked_whole(debug_relay, scheme):
    relay = debug_relay
    good = tok({"**": "rw"})
    credential = {
        "Basic": base64.b64encode(b"proxyuser:proxy-password-123").decode(),
        "Token": tok({"**": "rw"}, subject="other-scheme"),
        "Bearer two words": tok({"**": "rw"}, subject="second-word"),
    }[scheme]
    header = (
        f"Bearer {good} {credential}" if scheme == "Bearer two words" else f"{scheme} {credential}"
    )
    try:
        async with connect(
            f"{relay.url}/team/plans?token={good}", additional_headers=[("Authorization", header)]
        ) as ws:
            await read_document(ws)
    except InvalidStatus as exc:
        assert exc.response.status_code == 401  # two words: malformed
    relay.terminate()
    log = relay.stderr(1_000_000)
    assert "< Authorization: ***" in log  # the header line was logged, masked
    assert credential.split(".")[-1] not in log


async def test_token_in_a_malformed_header_line_is_not_logged(debug_relay):
    relay = debug_relay
    good = tok({"**": "rw"})
    for raw in (
        f"GET /team/plans HTTP/1.1\r\nHost: x\r\nAuthorization : Bearer {good}\r\n\r\n",
        f"GET /team/plans HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer\r\n {good}\r\n\r\n",
    ):
        await raw_http(relay.port, raw.encode(), seconds=1.0)
    await eventually(
        lambda: "invalid HTTP header line" in relay.stderr(1_000_000), what="the parser's line"
    )
    relay.terminate()
    log = relay.stderr(1_000_000)
    assert good.split(".")[-1] not in log


# -- TLS ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def tls_files(ca: trustme.CA, tmp_path: Path) -> tuple[Path, Path]:
    cert = ca.issue_cert("127.0.0.1", "localhost")
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.cert_chain_pems[0].write_to_path(cert_file)
    for blob in cert.cert_chain_pems[1:]:
        blob.write_to_path(cert_file, append=True)
    cert.private_key_pem.write_to_path(key_file)
    return cert_file, key_file


async def test_tls_relay_gets_nothing_from_untrusting_or_plain_clients(
    relay_factory, tmp_path, ca, monkeypatch
):
    monkeypatch.setenv("CRDTSYNC_LOG_LEVEL", "DEBUG")
    cert_file, key_file = tls_files(ca, tmp_path)
    relay = relay_factory(
        "relay.db",
        "--tls-cert", str(cert_file), "--tls-key", str(key_file),
        "--token-secret", SECRET, "--token-audience", AUDIENCE,
    )  # fmt: skip
    good = tok({"**": "rw"}, subject="tls")
    # A replica trusting another CA: never connects, so never sends its edit or token.
    other = ssl.create_default_context()
    trustme.CA().configure_trust(other)
    async with Replica(tmp_path / "c.db", relay=relay.url, token=good, ssl_context=other) as c:
        doc = await c.open("secure")
        doc.get("text", type=Text).insert(0, "must not arrive")
        await eventually(
            lambda: "certificate verification failed" in (c.status("secure").last_error or ""),
            what="the certificate error",
        )
        assert not c.status("secure").connected
        assert c.status("secure").pending >= 1
    # A plain ws:// client sends its token in clear to a TLS port: refused, and not logged.
    with pytest.raises(Exception):  # noqa: B017, PT011
        async with connect(relay.url.replace("wss://", "ws://") + f"/secure?token={good}"):
            pass
    await raw_http(
        relay.port, f"GET /secure?token={good} HTTP/1.1\r\nHost: x\r\n\r\n".encode(), 1.0
    )
    # A trusting client is served.
    trusting = ssl.create_default_context()
    ca.configure_trust(trusting)
    async with connect(f"{relay.url}/secure?token={good}", ssl=trusting) as ws:
        text, _ = await read_document(ws)
        assert text == ""
    relay.terminate()
    assert stored_text(relay.store, "secure") == ""
    log = relay.stderr(1_000_000)
    for secret in secrets_of(good):
        assert secret not in log


async def test_stalled_tls_handshakes_do_not_block_others(relay_factory, tmp_path, ca):
    cert_file, key_file = tls_files(ca, tmp_path)
    relay = relay_factory("relay.db", "--tls-cert", str(cert_file), "--tls-key", str(key_file))
    stalled = []
    try:
        for i in range(40):
            _, writer = await asyncio.open_connection("127.0.0.1", relay.port)
            if i % 2:
                writer.write(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")  # half a hello
            stalled.append(writer)
        trusting = ssl.create_default_context()
        ca.configure_trust(trusting)
        started = time.monotonic()
        async with connect(f"{relay.url}/doc", ssl=trusting) as ws:
            await read_document(ws)
        assert time.monotonic() - started < timeout_s(2)
    finally:
        for writer in stalled:
            writer.close()


# -- the replica side -----------------------------------------------------------------------


async def test_replica_survives_token_functions_that_fail(token_relay, tmp_path):
    calls: list[str] = []

    async def flaky_token() -> Any:
        n = len(calls)
        kind = ["raise", "none", "bytes", "int", "good"][min(n, 4)]
        calls.append(kind)
        if kind == "raise":
            raise RuntimeError("identity provider down")
        if kind == "none":
            return None
        if kind == "bytes":
            return tok({"**": "rw"}).encode()
        if kind == "int":
            return 42
        return tok({"**": "rw"}, subject="replica")

    async with Replica(tmp_path / "r.db", relay=token_relay.url, token=flaky_token) as replica:
        doc = await replica.open("doc")
        doc.get("text", type=Text).insert(0, "kept through failures")
        await replica.wait_synced("doc", timeout=timeout_s(20))
    assert calls[:5] == ["raise", "none", "bytes", "int", "good"]
    assert stored_text(token_relay.store, "doc") == "kept through failures"


async def test_replica_with_a_hanging_token_function_closes_promptly(token_relay, tmp_path):
    async def never() -> str:
        await asyncio.sleep(3600)
        return ""

    started = time.monotonic()
    async with Replica(tmp_path / "r.db", relay=token_relay.url, token=never) as replica:
        doc = await replica.open("doc")
        doc.get("text", type=Text).insert(0, "offline")
        await asyncio.sleep(0.2)
        assert not replica.status("doc").connected
    assert time.monotonic() - started < timeout_s(3)
    # The edit is kept in the file: a later replica with a token delivers it.
    token = tok({"**": "rw"})
    async with Replica(tmp_path / "r.db", relay=token_relay.url, token=token) as replica:
        await replica.open("doc")
        await replica.wait_synced("doc", timeout=timeout_s(15))
    assert stored_text(token_relay.store, "doc") == "offline"


async def test_replica_never_puts_its_token_in_its_status(token_relay, tmp_path):
    """Found by this review: a token read from a file (trailing newline) made websockets
    raise InvalidHeaderValue, whose message (the header, token included) went into
    status().last_error. The token is now stripped; one a header cannot carry is refused
    with a message that does not repeat it."""
    token = tok({"**": "rw"}, subject="from-a-file") + "\n"  # Path(...).read_text()
    async with Replica(tmp_path / "r.db", relay=token_relay.url, token=token) as replica:
        doc = await replica.open("doc")
        doc.get("text", type=Text).insert(0, "synced")
        await replica.wait_synced("doc", timeout=timeout_s(10))
    broken = tok({"**": "rw"}, subject="broken")
    broken = broken[:20] + "\x01" + broken[20:]
    async with Replica(tmp_path / "b.db", relay=token_relay.url, token=broken) as replica:
        await replica.open("doc")
        await eventually(lambda: replica.status("doc").last_error, what="an error")
        error = replica.status("doc").last_error or ""
        assert "header" in error
        assert broken.split(".")[-1] not in error


async def refused_replica(tmp_path: Path, answer: str) -> tuple[int, int]:
    """A replica against a fake relay that refuses it with ``answer`` for 3 s: how many
    connection attempts it made, and how many times it asked its token function."""
    attempts: list[float] = []
    asked: list[int] = []
    code = int(answer.split()[0])

    def process_request(conn: Any, request: Any) -> Any:
        attempts.append(time.monotonic())
        if code < 1000:
            return conn.respond(code, "no\n")
        return None

    async def handler(ws: Any) -> None:
        await ws.close(code, "refused")

    def fresh() -> str:
        asked.append(1)
        return tok({"**": "rw"})

    async with serve(handler, "127.0.0.1", 0, process_request=process_request) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        source = tok({"**": "rw"}) if answer == "401 fixed" else fresh
        path = tmp_path / f"r-{answer.replace(' ', '-')}.db"
        async with Replica(path, relay=f"ws://127.0.0.1:{port}", token=source) as r:
            doc = await r.open("doc")
            doc.get("text", type=Text).insert(0, "pending")
            await asyncio.sleep(3.0)
            assert r.status("doc").pending == 1, answer  # kept
            assert r._docs["doc"].stop_reconnecting is False, answer  # retried, never given up
    return len(attempts), len(asked)


async def test_replica_never_hammers_a_relay_that_refuses_it(tmp_path):
    answers = ["401", "401 fixed", "403", "4401", "4403", "1008"]
    counts = dict(
        zip(
            answers,
            await asyncio.gather(*(refused_replica(tmp_path, a) for a in answers)),
            strict=True,
        )
    )
    for answer, (attempts, asked) in counts.items():
        # Exponential backoff from 50 ms: at most ~8 attempts in 3 s; a refusal of rights
        # (403, 4403, 1008, a fixed token's 401) waits 60 s: one attempt.
        limit = 10 if answer in ("401", "4401") else 1
        assert 1 <= attempts <= limit, (answer, attempts)
        if answer != "401 fixed":
            assert asked == attempts, answer  # a fresh token for every attempt
