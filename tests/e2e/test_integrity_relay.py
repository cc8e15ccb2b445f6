"""The integrity rule end to end: no room member can poison a document, impersonate a
writer or brick a replica; honest overlaps are never refused (real relays, real files)."""

from __future__ import annotations

import asyncio
import json
import os
import random
import urllib.request
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
from helpers import eventually, timeout_s
from pycrdt import Array, Doc, Map, Text
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from crdtsync.client import Replica
from crdtsync.integrity import KEY_OWNER, client_id_of_key
from crdtsync.protocol import (
    ExtAck,
    ExtClaim,
    ExtRefused,
    ExtUpdate,
    PermissionDenied,
    SyncStep1,
    SyncStep2,
    SyncUpdate,
    decode_message,
)
from crdtsync.store import UpdateLog
from crdtsync.testing.proxy import FaultProxy
from crdtsync.updates import check_update

pytestmark = pytest.mark.anyio

ROOM = "team/poison"
C = 424_242  # the client id both halves of the poisoning pair write under


def poisoning_pair() -> tuple[bytes, bytes]:
    """Two valid updates giving (C, 0) different content: pycrdt cannot apply both."""
    a = Doc(client_id=C)
    a.get("text", type=Text).insert(0, "x")
    b = Doc(client_id=C)
    b.get("m", type=Map)["k"] = Array(["child"])
    return a.get_update(), b.get_update()


# updates.py's pair: applying PRIOR then CRASH to one pycrdt Doc kills the process (SIGSEGV)
PRIOR = bytes.fromhex("010203020002080101610000")
CRASH = bytes.fromhex("02010301880303037e7e7e01020424000203016b02626300")


def health(relay: Any) -> dict[str, Any]:
    url = relay.url.replace("ws://", "http://", 1)
    with urllib.request.urlopen(f"{url}/healthz?verbose=1", timeout=10) as resp:
        data: dict[str, Any] = json.loads(resp.read())
    return data


class StockClient:
    """A y-websocket client speaking the stock protocol only (no ``?crdtsync``)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.denied: list[str] = []
        self.updates: list[bytes] = []
        self.closed: tuple[int, str] | None = None

    async def send(self, *updates: bytes, expect_denied: int = 0) -> None:
        """Join, send each update, then read until ``expect_denied`` refusals arrived."""
        async with asyncio.timeout(timeout_s(15)), connect(self.url) as ws:
            await ws.send(SyncStep1(b"\x00").encode())
            for update in updates:
                await ws.send(SyncUpdate(update).encode())
            try:
                while len(self.denied) < expect_denied or not self.updates:
                    msg = decode_message(await ws.recv())  # type: ignore[arg-type]
                    if isinstance(msg, PermissionDenied):
                        self.denied.append(msg.reason)
                    elif isinstance(msg, (SyncStep2, SyncUpdate)):
                        self.updates.append(msg.update)
            except ConnectionClosed as exc:
                self.closed = (exc.rcvd.code, exc.rcvd.reason) if exc.rcvd else (1006, "")


def stored_document(path: Path, name: str) -> Doc[Any]:
    """The document as the relay's store holds it (a fresh connection to the file)."""
    doc: Doc[Any] = Doc()
    with UpdateLog(path) as log, doc.transaction():
        for update in log.load(name).all_updates():
            doc.apply_update(update)
    return doc


async def test_poisoning_pair_from_a_room_member_is_refused_and_every_replica_stays_usable(
    relay_factory, tmp_path
):
    relay = relay_factory("relay.db", "--compact-after-updates", "4")
    first, rewrite = poisoning_pair()
    async with (
        Replica(tmp_path / "a.db", relay=relay.url) as ra,
        Replica(tmp_path / "b.db", relay=relay.url) as rb,
    ):
        doc_a, doc_b = await ra.open(ROOM), await rb.open(ROOM)
        attacker = StockClient(f"{relay.url}/{ROOM}")
        await attacker.send(first, rewrite, expect_denied=1)
        assert attacker.closed is None  # a stock client is told, not closed (it would resend)
        assert "client 424242 clock 0 rewritten" in attacker.denied[0]
        for doc in (doc_a, doc_b):
            await eventually(lambda doc=doc: str(doc.get("text", type=Text)) == "x")

        doc_a.get("text", type=Text).insert(0, "a ")
        doc_b.get("list", type=Array).append("b")
        await ra.wait_synced(ROOM, timeout=timeout_s(10))
        await rb.wait_synced(ROOM, timeout=timeout_s(10))
        for doc in (doc_a, doc_b):
            await eventually(
                lambda doc=doc: (
                    str(doc.get("text", type=Text)) == "a x"
                    and doc.get("list", type=Array).to_py() == ["b"]
                ),
                what="both replicas hold the honest edits and the first write",
            )
        for replica in (ra, rb):
            status = replica.status(ROOM)
            assert (status.last_error, status.quarantined) == (None, 0)

        async with Replica(tmp_path / "late.db", relay=relay.url) as late:
            doc_late = await late.open(ROOM)
            await eventually(lambda: str(doc_late.get("text", type=Text)) == "a x")
            assert doc_late.get("m", type=Map).to_py() == {}  # nothing of the rewrite
            assert late.status(ROOM).quarantined == 0

    # Reopened offline, every replica file opens and holds the same document.
    for name in ("a", "b", "late"):
        async with Replica(tmp_path / f"{name}.db") as offline:
            doc = await offline.open(ROOM)
            assert str(doc.get("text", type=Text)) == "a x"
            assert offline.status(ROOM).quarantined == 0
    assert health(relay)["updates_refused"] == 1

    # The relay compacted the document (its rooms closed) without a failure, and the
    # store holds nothing of the rewrite.
    await eventually(lambda: _snapshot_of(relay.store, ROOM) is not None, what="compaction")
    assert "failed" not in relay.stderr()
    stored = stored_document(relay.store, ROOM)
    assert str(stored.get("text", type=Text)) == "a x"
    assert stored.get("m", type=Map).to_py() == {}


def _snapshot_of(path: Path, name: str) -> bytes | None:
    with UpdateLog(path) as log:
        return log.load(name).snapshot


async def test_rewrite_sent_first_as_the_answer_to_the_relays_step_1_is_refused_too(
    relay, tmp_path
):
    first, rewrite = poisoning_pair()
    async with Replica(tmp_path / "a.db", relay=relay.url) as ra:
        doc_a = await ra.open(ROOM)
        doc_a.get("text", type=Text).insert(0, "a")
        await ra.wait_synced(ROOM, timeout=timeout_s(10))
        await StockClient(f"{relay.url}/{ROOM}").send(first)
        # A stock client answers the relay's step 1 with a step 2: the same rule holds.
        async with asyncio.timeout(timeout_s(15)), connect(f"{relay.url}/{ROOM}") as ws:
            await ws.send(SyncStep2(rewrite).encode())
            while True:
                msg = decode_message(await ws.recv())  # type: ignore[arg-type]
                if isinstance(msg, PermissionDenied):
                    break
        doc_a.get("text", type=Text).insert(0, "b")
        await ra.wait_synced(ROOM, timeout=timeout_s(10))
        assert ra.status(ROOM).quarantined == 0
    assert str(stored_document(relay.store, ROOM).get("text", type=Text)) in ("bxa", "bax")


async def test_segfault_pair_from_a_room_member_leaves_relay_and_replicas_running(relay, tmp_path):
    async with (
        Replica(tmp_path / "a.db", relay=relay.url) as ra,
        Replica(tmp_path / "b.db", relay=relay.url) as rb,
    ):
        doc_a, doc_b = await ra.open(ROOM), await rb.open(ROOM)
        for order in ((PRIOR, CRASH), (CRASH, PRIOR)):
            # CRASH is refused as invalid (it names its own future as origin): the
            # attacker is closed with 1007; PRIOR (a gap update) is kept.
            attacker = StockClient(f"{relay.url}/{ROOM}")
            await attacker.send(*order, expect_denied=1)
            assert attacker.closed is not None
            assert attacker.closed[0] == 1007
            assert "origin clock 3 of its own client" in attacker.closed[1]
        doc_a.get("text", type=Text).insert(0, "still alive")
        await ra.wait_synced(ROOM, timeout=timeout_s(10))
        await eventually(lambda: str(doc_b.get("text", type=Text)) == "still alive")
        async with Replica(tmp_path / "late.db", relay=relay.url) as late:
            doc_late = await late.open(ROOM)
            await eventually(lambda: str(doc_late.get("text", type=Text)) == "still alive")
    async with Replica(tmp_path / "late.db") as offline:
        assert str((await offline.open(ROOM)).get("text", type=Text)) == "still alive"


async def test_impersonating_an_offline_replica_is_refused_and_its_edit_survives(relay, tmp_path):
    async with FaultProxy(relay.url, rng=random.Random(7)) as proxy:
        async with Replica(tmp_path / "r.db", relay=proxy.url) as owner:
            doc = await owner.open(ROOM)
            text = doc.get("text", type=Text)
            text.insert(0, "owner ")
            await owner.wait_synced(ROOM, timeout=timeout_s(10))

            proxy.partition()
            await eventually(lambda: not owner.status(ROOM).connected, what="owner offline")
            before = doc.get_state()
            text.insert(len("owner "), "offline")  # at the owner's next clocks
            assert owner.pending(ROOM) == 1

            # Someone who saw the owner's id and clock writes there first.
            impostor = Doc(client_id=doc.client_id)
            impostor.apply_update(stored_document(relay.store, ROOM).get_update())
            impostor.get("text", type=Text).insert(0, "EVIL ")
            forged = impostor.get_update(before)
            assert check_update(forged).starts == {doc.client_id: len("owner ")}
            attacker = StockClient(f"{relay.url}/{ROOM}")
            await attacker.send(forged, expect_denied=1)
            assert f"client {doc.client_id} belongs to another writer" in attacker.denied[0]

            proxy.heal()
            await owner.wait_synced(ROOM, timeout=timeout_s(15))
            assert owner.status(ROOM).refused == 0

        async with Replica(tmp_path / "other.db", relay=relay.url) as other:
            other_doc = await other.open(ROOM)
            await eventually(lambda: str(other_doc.get("text", type=Text)) == "owner offline")
    assert str(stored_document(relay.store, ROOM).get("text", type=Text)) == "owner offline"


async def test_relay_restarted_on_an_emptied_store_is_refilled_by_its_replicas_with_no_refusal(
    relay, tmp_path
):
    async with (
        Replica(tmp_path / "a.db", relay=relay.url) as ra,
        Replica(tmp_path / "b.db", relay=relay.url) as rb,
    ):
        doc_a, doc_b = await ra.open(ROOM), await rb.open(ROOM)
        doc_a.get("text", type=Text).insert(0, "from a. ")
        doc_b.get("map", type=Map)["b"] = Map({"nested": "yes"})
        await ra.wait_synced(ROOM, timeout=timeout_s(10))
        await rb.wait_synced(ROOM, timeout=timeout_s(10))
        await eventually(lambda: doc_a.get("map", type=Map).to_py() == {"b": {"nested": "yes"}})

        relay.kill()
        for suffix in ("", "-wal", "-shm"):
            Path(f"{relay.store}{suffix}").unlink(missing_ok=True)  # noqa: ASYNC240
        # Offline edits on both sides, one of them deleting the other writer's text.
        await eventually(lambda: not ra.status(ROOM).connected and not rb.status(ROOM).connected)
        del doc_b.get("text", type=Text)[0:5]
        doc_a.get("text", type=Text).insert(0, "again ")
        relay.restart()

        # Both catch-ups repeat content the other one sends too: nothing may be refused.
        await ra.wait_synced(ROOM, timeout=timeout_s(15))
        await rb.wait_synced(ROOM, timeout=timeout_s(15))
        await eventually(
            lambda: (
                doc_a.get_update()
                and str(doc_a.get("text", type=Text)) == str(doc_b.get("text", type=Text))
            )
        )
        expected = str(doc_a.get("text", type=Text))
        for replica in (ra, rb):
            assert (replica.status(ROOM).refused, replica.status(ROOM).quarantined) == (0, 0)
    assert health(relay)["updates_refused"] == 0
    stored = stored_document(relay.store, ROOM)
    assert str(stored.get("text", type=Text)) == expected
    assert stored.get("map", type=Map).to_py() == {"b": {"nested": "yes"}}


async def test_replica_quarantines_what_a_relay_without_the_rule_sends_and_keeps_syncing(
    relay_factory, tmp_path
):
    relay = relay_factory("open.db", "--no-integrity")
    first, rewrite = poisoning_pair()
    async with Replica(tmp_path / "a.db", relay=relay.url) as ra:
        doc_a = await ra.open(ROOM)
        doc_a.get("text", type=Text).insert(0, "a")
        await ra.wait_synced(ROOM, timeout=timeout_s(10))
        await StockClient(f"{relay.url}/{ROOM}").send(first, rewrite)
        await eventually(lambda: ra.status(ROOM).quarantined >= 1, what="quarantine")
        # The relay may send the pair apart (a rewrite of what the replica holds) or
        # merged into one frame (a child naming a parent that is no shared type).
        assert "424242" in (ra.status(ROOM).last_error or "")
        kept = ra.quarantined(ROOM)
        assert kept
        assert all("424242" in q.reason for q in kept)

        text_a = doc_a.get("text", type=Text)
        text_a.insert(len(str(text_a)), "b")  # still editable and synced
        await ra.wait_synced(ROOM, timeout=timeout_s(10))

        # A late joiner gets both in one merged answer: it keeps what it can and says so.
        async with Replica(tmp_path / "late.db", relay=relay.url) as late:
            doc_late = await late.open(ROOM)
            await eventually(lambda: late.status(ROOM).quarantined >= 1, what="late quarantine")
            await eventually(lambda: "ab" in str(doc_late.get("text", type=Text)))
            doc_late.get("text", type=Text).insert(0, "L")
            await late.wait_synced(ROOM, timeout=timeout_s(10))
    async with Replica(tmp_path / "a.db") as offline:
        doc = await offline.open(ROOM)
        assert "ab" in str(doc.get("text", type=Text))


async def test_open_quarantines_updates_a_file_already_holds_and_succeeds(tmp_path):
    first, rewrite = poisoning_pair()
    path = tmp_path / "old.db"
    with UpdateLog(path) as log:
        # As a version before the check stored them: the rewrite, then the segfault pair.
        log.append_many([(ROOM, first), (ROOM, rewrite), (ROOM, PRIOR), (ROOM, CRASH)])
    async with Replica(path) as replica:
        doc = await replica.open(ROOM)
        assert str(doc.get("text", type=Text)) == "x"
        status = replica.status(ROOM)
        assert status.quarantined == 2
        assert "2 stored updates quarantined at open" in (status.last_error or "")
        reasons = [q.reason for q in replica.quarantined(ROOM)]
        assert "client 424242 clock 0 rewritten" in reasons[0]
        assert "damaged" in reasons[1]
        assert "origin clock 3 of its own client" in reasons[1]
        doc.get("text", type=Text).insert(1, "y")
    async with Replica(path) as again:  # the file now opens cleanly
        doc = await again.open(ROOM)
        assert str(doc.get("text", type=Text)) == "xy"
        assert again.status(ROOM).quarantined == 2
        assert again.status(ROOM).last_error is None


async def test_an_exception_in_the_sync_task_is_reported_retried_and_never_raised_on_close(
    relay, tmp_path
):
    replica = Replica(tmp_path / "r.db", relay=relay.url)
    original = replica._on_event
    failures = []

    def failing_once(*args: Any) -> None:
        if not failures:
            failures.append(1)
            raise RuntimeError("boom in the sync task")
        original(*args)

    replica._on_event = failing_once  # type: ignore[method-assign]
    async with replica:
        doc = await replica.open(ROOM)
        await eventually(
            lambda: "boom in the sync task" in (replica.status(ROOM).last_error or ""),
            what="the error in status()",
        )
        doc.get("text", type=Text).insert(0, "after the error")
        await replica.wait_synced(ROOM, timeout=timeout_s(10))  # it retried
    # leaving the context (stop/close) raised nothing


async def test_update_overtaking_its_claim_is_refused_as_unproven_and_the_replica_retries(
    relay, tmp_path
):
    """A reordering path can deliver a replica's update before its claim: the relay says
    "unproven" (not "rewritten"), and a crdtsync replica claims again and resends."""
    async with Replica(tmp_path / "r.db", relay=relay.url) as owner:
        doc = await owner.open(ROOM)
        doc.get("text", type=Text).insert(0, "mine")
        await owner.wait_synced(ROOM, timeout=timeout_s(10))
        client = doc.client_id
        assert owner.store is not None
        key = owner.store.own_clients(ROOM)[client]
    follow = Doc(client_id=client)
    follow.apply_update(stored_document(relay.store, ROOM).get_update())
    before = follow.get_state()
    follow.get("text", type=Text).insert(4, "!")
    update = follow.get_update(before)
    async with asyncio.timeout(timeout_s(10)), connect(f"{relay.url}/{ROOM}?crdtsync=1") as ws:
        await ws.send(ExtUpdate(1, update).encode())  # before the claim
        await ws.send(ExtClaim(((client, key),)).encode())
        await ws.send(ExtUpdate(2, update).encode())  # after it
        replies = []
        while len(replies) < 2:
            msg = decode_message(await ws.recv())  # type: ignore[arg-type]
            if isinstance(msg, (ExtRefused, ExtAck)):
                replies.append(msg)
    refused, acked = replies
    assert isinstance(refused, ExtRefused)
    assert (refused.key, refused.unproven) == (1, True)
    assert acked == ExtAck(2)
    assert str(stored_document(relay.store, ROOM).get("text", type=Text)) == "mine!"


async def recv_reply(ws: Any) -> ExtRefused | ExtAck:
    while True:
        msg = decode_message(await ws.recv())  # type: ignore[arg-type]
        if isinstance(msg, (ExtRefused, ExtAck)):
            return msg


async def test_first_content_of_an_id_sent_before_the_claims_gets_no_ownerless_record(
    relay, tmp_path
):
    """Seen in crdtsync check (hostile participant, seed 8): a reordering path delivered
    the relay's step 1 before its hello, so the replica answered unkeyed and unclaimed;
    the relay stored its id with no owner, and its claim (which skips ids with content)
    came too late: a stock client then wrote at the replica's next clocks. Until a
    crdtsync connection's claims arrive, the first content of an id is refused as
    unproven; once claimed, the id is the key's, and a stranger's write there is refused.
    A replica that proves nothing says so (an empty claim) and may then relay
    ownerless content as before."""
    key = os.urandom(32)
    client = client_id_of_key(key)
    doc = Doc(client_id=client)
    doc.get("text", type=Text).insert(0, "first")
    first = doc.get_update()
    async with asyncio.timeout(timeout_s(10)), connect(f"{relay.url}/{ROOM}?crdtsync=1") as ws:
        await ws.send(SyncStep2(first).encode())  # unkeyed, as a replica that took no hello
        await ws.send(ExtUpdate(1, first).encode())
        assert await recv_reply(ws) == ExtRefused(0, mock.ANY, True)
        assert await recv_reply(ws) == ExtRefused(1, mock.ANY, True)
        assert stored_document(relay.store, ROOM).get_state() == Doc().get_state()
        await ws.send(ExtClaim(((client, key),)).encode())
        await ws.send(ExtUpdate(2, first).encode())
        assert await recv_reply(ws) == ExtAck(2)
    # A stock client (it proves nothing) at the owner's next clock is refused.
    forged = Doc(client_id=client)
    forged.apply_update(first)
    before = forged.get_state()
    forged.get("text", type=Text).insert(5, " forged")
    async with asyncio.timeout(timeout_s(10)), connect(f"{relay.url}/{ROOM}") as ws:
        await ws.send(SyncUpdate(forged.get_update(before)).encode())
        while not isinstance(decode_message(await ws.recv()), PermissionDenied):  # type: ignore[arg-type]
            pass
    assert str(stored_document(relay.store, ROOM).get("text", type=Text)) == "first"
    # A replica with nothing to prove relays someone else's ownerless content after its
    # empty claim (a kept document it never opened, refilling an emptied store).
    other = Doc(client_id=77)
    other.get("text", type=Text).insert(0, "relayed ")
    async with asyncio.timeout(timeout_s(10)), connect(f"{relay.url}/{ROOM}?crdtsync=1") as ws:
        await ws.send(ExtClaim(()).encode())
        await ws.send(ExtUpdate(1, other.get_update()).encode())
        assert await recv_reply(ws) == ExtAck(1)
    assert "relayed" in str(stored_document(relay.store, ROOM).get("text", type=Text))


async def test_replica_whose_hello_is_overtaken_claims_late_and_keeps_its_id(relay, tmp_path):
    """The whole seed-8 path, end to end: a path that delivers the relay's step 1 ahead of
    its hello (and holds the hello until the relay refused what the replica answered
    unclaimed). The replica must not count that refusal, must claim once the hello
    comes, and its edit must be stored owned by its key."""
    from websockets.asyncio.server import serve

    held_hello = asyncio.Event()

    async def reordering(client: Any) -> None:
        assert client.request is not None
        async with connect(f"{relay.url}{client.request.path}") as upstream:

            async def up() -> None:
                async for message in client:
                    await upstream.send(message)

            async def down() -> None:
                hello = None
                async for message in upstream:
                    if hello is None and not held_hello.is_set():
                        hello = message  # the first message: the hello, held back
                        held_hello.set()
                        continue
                    await client.send(message)
                    if hello is not None and isinstance(
                        decode_message(message),  # type: ignore[arg-type]
                        ExtRefused,
                    ):
                        await client.send(hello)
                        hello = None

            tasks = [asyncio.ensure_future(up()), asyncio.ensure_future(down())]
            try:
                await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for task in tasks:
                    task.cancel()

    async with Replica(tmp_path / "r.db") as offline:  # no relay: an edit made offline
        doc = await offline.open(ROOM)
        doc.get("text", type=Text).insert(0, "offline edit")
        client = doc.client_id
    async with serve(reordering, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        async with Replica(tmp_path / "r.db", relay=f"ws://127.0.0.1:{port}", multiplex=False) as r:
            await r.open(ROOM)
            # (wait_synced would say "no acknowledgements" while the hello is held back)
            await eventually(lambda: r.status(ROOM).pending == 0, timeout=timeout_s(15))
            status = r.status(ROOM)
            assert (status.refused, status.pending, status.last_error) == (0, 0, None)
    assert held_hello.is_set()
    assert health(relay)["updates_refused"] >= 1  # the premise: the unclaimed answer came first
    ledger = UpdateLog(relay.store).load_ledger(ROOM)
    assert ledger.owners.get(client) == KEY_OWNER
    assert str(stored_document(relay.store, ROOM).get("text", type=Text)) == "offline edit"
