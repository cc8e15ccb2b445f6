"""Access control with real relay processes: scoped tokens, read-only connections, expiry,
revocation, token subjects owning client ids, and TLS (README: access tokens)."""

from __future__ import annotations

import asyncio
import ssl
import time
from typing import Any

import pytest
import trustme
from helpers import ProcessFailed, eventually, timeout_s
from pycrdt import Doc, Text
from stock import close_of, messages_within, read_document, stored_text, text_update
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from crdtsync.auth import mint_token
from crdtsync.client import Replica
from crdtsync.protocol import (
    PermissionDenied,
    SyncUpdate,
)
from crdtsync.server import Relay
from crdtsync.settings import RelaySettings

pytestmark = pytest.mark.anyio

SECRET = "test-secret-of-at-least-32-bytes-0123456789"
OTHER_SECRET = "another-secret-of-at-least-32-bytes-987654"
AUDIENCE = "crdtsync-tests"
DOCS = ("team/plans", "public/news")
GRANTS: dict[str, dict[str, str]] = {
    "read-write": {"team/*": "rw", "public/**": "rw"},
    "read-only": {"team/*": "r", "public/**": "r"},
    "none": {"team/*": "-", "public/**": "-"},
    "wrong pattern": {"team/plans/*": "rw", "public": "rw"},  # neither names these documents
}
VALIDITY = ("valid", "expired", "bad signature", "wrong audience", "missing")
REASONS = {  # the refusal reason a relay gives for each kind of invalid token (401)
    "expired": "expired",
    "bad signature": "bad_signature",
    "wrong audience": "wrong_audience",
    "missing": "missing",
}


def token(grant: dict[str, str], validity: str = "valid", subject: str = "alice") -> str | None:
    if validity == "missing":
        return None
    now = time.time() - 7200 if validity == "expired" else None
    return mint_token(
        OTHER_SECRET if validity == "bad signature" else SECRET,
        subject=subject,
        docs=grant,
        ttl_s=600,
        audience="someone-else" if validity == "wrong audience" else AUDIENCE,
        now=now,
    )


async def try_session(url: str) -> None:
    """Connect and sync once; whatever happens (only the relay's log matters)."""
    try:
        async with connect(url) as ws:
            await read_document(ws)
    except (InvalidStatus, ConnectionClosed):
        pass


@pytest.fixture
def token_relay(relay_factory):
    return relay_factory("relay.db", "--token-secret", SECRET, "--token-audience", AUDIENCE)


async def seed(relay: Any) -> None:
    admin = token({"**": "rw"}, subject="admin")
    for name in DOCS:
        async with connect(f"{relay.url}/{name}?token={admin}") as ws:
            await read_document(ws)
            await ws.send(SyncUpdate(text_update(Doc(), f"seed of {name}.")).encode())
            await read_document(ws)  # answered after the update: it was stored


async def test_token_matrix_gives_exactly_the_rights_granted(token_relay):
    relay = token_relay
    await seed(relay)
    outcomes: dict[tuple[str, str, str], str] = {}
    for name in DOCS:
        for grant_name, grant in GRANTS.items():
            for validity in VALIDITY:
                tok = token(grant, validity)
                url = f"{relay.url}/{name}" + (f"?token={tok}" if tok else "")
                marker = f"[{grant_name}/{validity}]"
                try:
                    async with connect(url) as ws:
                        text, _ = await read_document(ws)
                        assert f"seed of {name}." in text
                        await ws.send(SyncUpdate(text_update(Doc(), marker)).encode())
                        # a second write: still one permission-denied, and still open
                        await ws.send(SyncUpdate(text_update(Doc(), marker)).encode())
                        after = await messages_within(ws, 0.3)
                        denied = [m for m in after if isinstance(m, PermissionDenied)]
                        await read_document(ws)  # still served
                        outcomes[name, grant_name, validity] = (
                            f"read-only ({len(denied)} denied)" if denied else "read-write"
                        )
                        assert ws.close_code is None
                except InvalidStatus as exc:
                    body = exc.response.body.decode()
                    outcomes[name, grant_name, validity] = f"HTTP {exc.response.status_code}"
                    if exc.response.status_code == 401:
                        assert body.startswith(f"token refused ({REASONS[validity]}): "), body
                    else:
                        assert f"no access to {name!r}" in body, body
    expected: dict[tuple[str, str, str], str] = {}
    for name in DOCS:
        for grant_name in GRANTS:
            for validity in VALIDITY:
                if validity != "valid":
                    outcome = "HTTP 401"
                elif grant_name == "read-write":
                    outcome = "read-write"
                elif grant_name == "read-only":
                    outcome = "read-only (1 denied)"
                else:
                    outcome = "HTTP 403"
                expected[name, grant_name, validity] = outcome
    assert outcomes == expected
    # The store holds the seeds and the read-write writes only.
    for name in DOCS:
        text = stored_text(relay.store, name)
        assert f"seed of {name}." in text
        assert text.count("[read-write/valid]") == 2
        for grant_name in ("read-only", "none", "wrong pattern"):
            assert f"[{grant_name}/" not in text


@pytest.mark.parametrize(
    ("validity", "reason"),
    [
        ("expired", "expired"),
        ("bad signature", "bad_signature"),
        ("wrong audience", "wrong_audience"),
        ("missing", "missing"),
    ],
)
async def test_refused_tokens_say_why(token_relay, validity, reason):
    tok = token(GRANTS["read-write"], validity)
    headers = {"Authorization": f"Bearer {tok}"} if tok else None
    with pytest.raises(InvalidStatus) as caught:
        async with connect(f"{token_relay.url}/team/plans", additional_headers=headers):
            pass
    assert caught.value.response.status_code == 401
    assert caught.value.response.body.decode().startswith(f"token refused ({reason}): ")


async def test_token_never_appears_in_the_relay_log(relay_factory, monkeypatch):
    monkeypatch.setenv("CRDTSYNC_LOG_LEVEL", "DEBUG")
    relay = relay_factory("relay.db", "--token-secret", SECRET, "--token-audience", AUDIENCE)
    good = token(GRANTS["read-write"])
    bad = token(GRANTS["read-write"], "bad signature")
    for tok in (good, bad):
        await try_session(f"{relay.url}/team/plans?token={tok}")
    relay.terminate()
    log = relay.stderr(1_000_000)
    assert log, "the relay logged nothing at DEBUG"
    for tok in (good, bad):
        assert tok is not None
        assert tok not in log
        assert tok.split(".")[2] not in log  # not even the signature


async def test_connection_is_closed_when_its_token_expires_and_a_replica_gets_a_fresh_one(
    relay_factory, tmp_path, monkeypatch
):
    monkeypatch.setenv("CRDTSYNC_TOKEN_LEEWAY_S", "0")
    relay = relay_factory("relay.db", "--token-secret", SECRET, "--token-audience", AUDIENCE)
    short = mint_token(SECRET, subject="s", docs={"**": "rw"}, ttl_s=4, audience=AUDIENCE)
    async with connect(f"{relay.url}/team/plans?token={short}") as ws:
        await read_document(ws)
        assert await close_of(ws, 15) == (4401, "token expired")

    asked: list[float] = []

    def fresh_token() -> str:
        asked.append(time.monotonic())
        return mint_token(SECRET, subject="bob", docs={"team/*": "rw"}, ttl_s=3, audience=AUDIENCE)

    async with Replica(tmp_path / "bob.db", relay=relay.url, token=fresh_token) as replica:
        doc = await replica.open("team/plans")
        text = doc.get("text", type=Text)
        deadline = time.monotonic() + timeout_s(30)
        n = 0
        while len(asked) < 3 and time.monotonic() < deadline:  # across two expiries at least
            text.insert(len(text), f"{n}.")
            n += 1
            await asyncio.sleep(0.1)
        assert len(asked) >= 3, "the replica did not ask for a fresh token after expiry"
        await replica.wait_synced("team/plans", timeout=timeout_s(15))
    expected = "".join(f"{i}." for i in range(n))
    assert stored_text(relay.store, "team/plans") == expected  # nothing lost across expiries


async def test_replica_refused_for_rights_reports_it_and_retries_slowly(token_relay, tmp_path):
    tok = token(GRANTS["none"])
    assert tok is not None
    async with Replica(tmp_path / "r.db", relay=token_relay.url, token=tok) as replica:
        doc = await replica.open("team/plans")
        doc.get("text", type=Text).insert(0, "kept locally")
        # Refused as a channel of the replica's connection (4403), which goes on.
        await eventually(
            lambda: "4403 no access" in (replica.status("team/plans").last_error or ""),
            what="the refusal in the status",
        )
        status = replica.status("team/plans")
        assert not status.connected
        assert status.pending == 1  # the edit is kept, not dropped
        assert not replica._docs["team/plans"].stop_reconnecting  # retried, later


async def test_read_only_replica_keeps_its_edits_pending_and_reads_the_document(
    token_relay, tmp_path
):
    await seed(token_relay)
    tok = token(GRANTS["read-only"])
    async with Replica(tmp_path / "r.db", relay=token_relay.url, token=tok) as replica:
        doc = await replica.open("team/plans")
        text = doc.get("text", type=Text)
        await eventually(lambda: str(text).startswith("seed of team/plans."), what="the seed")
        text.insert(0, "mine: ")
        await eventually(
            lambda: replica.status("team/plans").refused >= 1, what="the refusal in the status"
        )
        status = replica.status("team/plans")
        assert status.connected  # read-only connections stay open
        assert status.pending == 1
    assert stored_text(token_relay.store, "team/plans") == "seed of team/plans."


async def test_a_subject_owns_the_client_ids_it_writes(token_relay):
    alice = token(GRANTS["read-write"], subject="alice")
    bob = token(GRANTS["read-write"], subject="bob")
    alice_doc: Doc[Any] = Doc(client_id=424242)
    async with connect(f"{token_relay.url}/team/plans?token={alice}") as ws:
        await read_document(ws)
        await ws.send(SyncUpdate(text_update(alice_doc, "alice wrote this. ")).encode())
        await read_document(ws)
    # Bob writes under alice's client id (he holds her document): refused.
    bob_doc: Doc[Any] = Doc(client_id=424242)
    bob_doc.apply_update(alice_doc.get_update())
    async with connect(f"{token_relay.url}/team/plans?token={bob}") as ws:
        await read_document(ws)
        await ws.send(SyncUpdate(text_update(bob_doc, "bob as alice. ")).encode())
        denied = [m for m in await messages_within(ws, 1.0) if isinstance(m, PermissionDenied)]
        assert denied, "bob's write under alice's client id was not refused"
    # Alice, on another connection, goes on under her id.
    async with connect(f"{token_relay.url}/team/plans?token={alice}") as ws:
        await read_document(ws)
        await ws.send(SyncUpdate(text_update(alice_doc, "alice again.")).encode())
        await read_document(ws)
    assert stored_text(token_relay.store, "team/plans") == "alice wrote this. alice again."


async def test_revoked_token_closes_its_connections(tmp_path):
    revoked_subjects: set[str] = set()

    async def revoked(claims: Any, document: str) -> bool:
        await asyncio.sleep(0)
        return claims.subject in revoked_subjects

    settings = RelaySettings(
        port=0,
        store=tmp_path / "relay.db",
        token_secrets=[SECRET],
        token_audience=AUDIENCE,
        token_recheck_s=0.2,
        compaction_workers=0,
    )
    relay = Relay(settings, revoked=revoked)
    await relay.start()
    try:
        alice, bob = (
            token(GRANTS["read-write"], subject="alice"),
            token(GRANTS["read-write"], subject="bob"),
        )
        async with (
            connect(f"{relay.url}/team/plans?token={alice}") as wa,
            connect(f"{relay.url}/team/plans?token={bob}") as wb,
        ):
            await read_document(wa)
            await read_document(wb)
            revoked_subjects.add("mallory")
            assert await messages_within(wa, 0.6) == []  # nobody revoked yet
            revoked_subjects.add("alice")
            assert await close_of(wa, 10) == (4401, "token revoked")
            assert wb.close_code is None
            await read_document(wb)  # bob is still served
    finally:
        await relay.stop()


async def test_async_authorize_hook_narrows_token_rights(tmp_path):
    async def authorize(request: Any, document: str) -> Any:
        from crdtsync.auth import Rights

        await asyncio.sleep(0)
        return Rights(read=True, write=not document.startswith("public/"))

    settings = RelaySettings(
        port=0, store=tmp_path / "relay.db", token_secrets=[SECRET], token_audience=AUDIENCE,
        compaction_workers=0,
    )  # fmt: skip
    relay = Relay(settings, authorize=authorize)
    await relay.start()
    try:
        tok = token(GRANTS["read-write"])
        async with connect(f"{relay.url}/public/news?token={tok}") as ws:
            await read_document(ws)
            await ws.send(SyncUpdate(text_update(Doc(), "nope")).encode())
            got = await messages_within(ws, 0.5)
            assert any(isinstance(m, PermissionDenied) for m in got)
        await eventually(lambda: relay.health()["writes_dropped"] == 1, what="the count")
    finally:
        await relay.stop()


# -- TLS ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


async def test_replica_syncs_over_wss_with_the_test_ca_and_refuses_another(
    relay_factory, tmp_path, ca
):
    cert = ca.issue_cert("127.0.0.1", "localhost")
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.cert_chain_pems[0].write_to_path(cert_file)
    for blob in cert.cert_chain_pems[1:]:
        blob.write_to_path(cert_file, append=True)
    cert.private_key_pem.write_to_path(key_file)
    relay = relay_factory("relay.db", "--tls-cert", str(cert_file), "--tls-key", str(key_file))
    assert relay.url.startswith("wss://")
    trusting = ssl.create_default_context()
    ca.configure_trust(trusting)
    async with Replica(tmp_path / "a.db", relay=relay.url, ssl_context=trusting) as a:
        doc = await a.open("secure")
        doc.get("text", type=Text).insert(0, "over TLS")
        await a.wait_synced("secure", timeout=timeout_s(15))
    async with Replica(tmp_path / "b.db", relay=relay.url, ssl_context=trusting) as b:
        text = (await b.open("secure")).get("text", type=Text)
        await eventually(lambda: str(text) == "over TLS", what="the edit over wss://")
    other = ssl.create_default_context()
    trustme.CA().configure_trust(other)
    async with Replica(tmp_path / "c.db", relay=relay.url, ssl_context=other) as c:
        await c.open("secure")
        await eventually(
            lambda: "certificate verification failed" in (c.status("secure").last_error or ""),
            what="a clear certificate error",
        )
        assert not c.status("secure").connected
    # A plain ws:// client cannot talk to it either.
    with pytest.raises(Exception):  # noqa: B017, PT011 (the handshake fails, how varies)
        async with connect(relay.url.replace("wss://", "ws://")):
            pass


async def test_relay_with_a_bad_certificate_refuses_to_start(relay_factory, tmp_path):
    bad = tmp_path / "bad.pem"
    bad.write_text("not a certificate")
    with pytest.raises(ProcessFailed, match="cannot load TLS certificate"):
        relay_factory("relay.db", "--tls-cert", str(bad), "--tls-key", str(bad))
