"""Attacks on the integrity guarantees, as an outside room member would try them.

Real relay processes on loopback, real SQLite files. An attack that succeeds is kept as a
strict xfail ("BUG: ..."): the test states what the README promises and fails while the
promise is broken. An attack that is handled is kept only where it covers more than
tests/e2e/test_integrity.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import sqlite3
import time
import urllib.request
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from helpers import ProcessFailed, eventually, timeout_s
from pycrdt import Array, Doc, Map, Text, merge_updates
from websockets.asyncio.client import ClientConnection, connect
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from crdtsync.client import Replica
from crdtsync.client.backoff import Backoff
from crdtsync.integrity import client_id_of_key, read_units
from crdtsync.protocol import (
    AwarenessMessage,
    ExtAck,
    ExtClaim,
    ExtHello,
    ExtUpdate,
    PermissionDenied,
    SyncStep1,
    SyncStep2,
    SyncUpdate,
    decode_awareness,
    decode_message,
    write_var_uint,
)
from crdtsync.store import UpdateLog
from crdtsync.testing.proxy import FaultProxy
from crdtsync.updates import check_update

pytestmark = pytest.mark.anyio


# -- updates built by hand (lib0 v1) -----------------------------------------------------

GC, STRING, ANY, TYPE = 0, 4, 8, 7


def vu(num: int) -> bytes:
    return write_var_uint(num)


def vs(text: str) -> bytes:
    raw = text.encode()
    return vu(len(raw)) + raw


def block(client: int, clock: int, *structs: bytes) -> bytes:
    return vu(len(structs)) + vu(client) + vu(clock) + b"".join(structs)


def update_of(*blocks: bytes, ds: bytes = b"\x00") -> bytes:
    update = vu(len(blocks)) + b"".join(blocks) + ds
    check_update(update)  # every hand-built update here is valid: the relay must judge it
    return update


def gc(length: int) -> bytes:
    return bytes([GC]) + vu(length)


def in_root(ref: int, content: bytes, root: str = "t") -> bytes:
    return bytes([ref]) + vu(1) + vs(root) + content


def in_parent(ref: int, parent: tuple[int, int], content: bytes) -> bytes:
    return bytes([ref]) + vu(0) + vu(parent[0]) + vu(parent[1]) + content


def after(ref: int, origin: tuple[int, int], content: bytes) -> bytes:
    return bytes([ref | 0x80]) + vu(origin[0]) + vu(origin[1]) + content


def transact(doc: Doc[Any], edit: Callable[[], object]) -> bytes:
    """Run ``edit`` in one transaction of ``doc``; return that transaction's update."""
    updates: list[bytes] = []
    sub = doc.observe(lambda event: updates.append(event.update))
    try:
        with doc.transaction():
            edit()
    finally:
        doc.unobserve(sub)
    assert len(updates) == 1
    return updates[0]


def deletion(client: int, clock: int, length: int) -> bytes:
    """A delete-only update (anyone may delete anything: that is no attack by itself)."""
    return update_of(ds=vu(1) + vu(client) + vu(1) + vu(clock) + vu(length))


def fast_backoff() -> Backoff:
    return Backoff(initial_s=0.02, max_s=0.2)


# -- peers --------------------------------------------------------------------------------


class RawPeer:
    """A websocket peer that sends whatever it is told and records what it receives.

    Stock protocol by default; ``extensions=True`` asks for crdtsync's (``?crdtsync=1``).
    """

    def __init__(self, url: str, *, extensions: bool = False) -> None:
        self.url = url + ("?crdtsync=1" if extensions else "")
        self.ws: ClientConnection | None = None
        self.messages: list[Any] = []
        self.closed: tuple[int, str] | None = None
        self._reader: asyncio.Task[None] | None = None

    async def __aenter__(self) -> RawPeer:
        self.ws = await asyncio.wait_for(
            connect(self.url, max_size=None, close_timeout=timeout_s(2)), timeout_s(10)
        )
        self._reader = asyncio.create_task(self._read())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.ws is not None
        assert self._reader is not None
        await self.ws.close()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(self._reader, timeout_s(10))

    async def _read(self) -> None:
        assert self.ws is not None
        try:
            async for data in self.ws:
                self.messages.append(decode_message(data))  # type: ignore[arg-type]
            rcvd = self.ws.protocol.close_rcvd
        except ConnectionClosed as exc:
            rcvd = exc.rcvd
        self.closed = (rcvd.code, rcvd.reason) if rcvd else (1006, "")

    async def send(self, *frames: bytes) -> None:
        assert self.ws is not None
        for frame in frames:
            await self.ws.send(frame)

    async def send_updates(self, *updates: bytes) -> None:
        await self.send(*(SyncUpdate(u).encode() for u in updates))

    def of(self, kind: type) -> list[Any]:
        return [m for m in self.messages if isinstance(m, kind)]

    @property
    def denied(self) -> list[str]:
        return [m.reason for m in self.of(PermissionDenied)]

    def updates(self) -> list[bytes]:
        return [m.update for m in self.messages if isinstance(m, (SyncStep2, SyncUpdate))]

    async def synced(self) -> None:
        """Ask for the whole document and wait for the answer."""
        await self.send(SyncStep1(b"\x00").encode())
        await eventually(lambda: self.of(SyncStep2), what="the relay's step 2")

    def document(self) -> Doc[Any]:
        doc: Doc[Any] = Doc()
        for update in self.updates():
            doc.apply_update(update)
        return doc


def health(relay: Any) -> dict[str, Any]:
    url = relay.url.replace("ws://", "http://", 1)
    with urllib.request.urlopen(f"{url}/healthz?verbose=1", timeout=10) as resp:
        data: dict[str, Any] = json.loads(resp.read())
    return data


def stored_updates(path: Path, name: str) -> list[bytes]:
    with UpdateLog(path) as log:
        return log.load(name).all_updates()


def tail_length(path: Path, name: str) -> int:
    with UpdateLog(path) as log:
        return log.tail_length(name)


def has_snapshot(path: Path, name: str) -> bool:
    with UpdateLog(path) as log:
        return log.load(name).snapshot is not None


def contents_per_clock(updates: list[bytes], client: int, clocks: range) -> dict[int, set[Any]]:
    """Every distinct content the stored updates give each clock of ``client``."""
    out: dict[int, set[Any]] = {k: set() for k in clocks}
    for update in updates:
        found = read_units(update, {client: [(clocks.start, clocks.stop)]}).get(client, {})
        for clock, unit in found.items():
            out[clock].add(repr(unit))
    return out


async def compacted(relay: Any, name: str) -> None:
    """Wait until the relay folded ``name``'s whole tail into its snapshot."""
    await eventually(
        lambda: has_snapshot(relay.store, name) and tail_length(relay.store, name) == 0,
        timeout=20,
        what=f"compaction of {name}",
    )


# == client ids: who may write where ======================================================


async def test_id_seen_in_awareness_before_the_first_edit_cannot_be_taken(relay, tmp_path):
    room = "atk/awareness-id"
    async with (
        FaultProxy(relay.url, rng=random.Random(1)) as proxy,
        Replica(tmp_path / "r.db", relay=proxy.url) as replica,
        RawPeer(f"{relay.url}/{room}") as attacker,
    ):
        doc = await replica.open(room)
        await eventually(lambda: replica.status(room).acknowledgements, what="relay hello")
        replica.awareness(room).set_local_state({"user": "ann", "cursor": 0})

        def seen() -> int | None:
            for message in attacker.of(AwarenessMessage):
                for entry in decode_awareness(message.payload):
                    if entry.state is not None:
                        return entry.client_id
            return None

        victim = await eventually(seen, what="the replica's presence")
        assert victim == doc.client_id
        proxy.partition()
        await eventually(lambda: not replica.status(room).connected, what="replica offline")
        doc.get("t", type=Text).insert(0, "mine")  # offline: the replica's first edit
        # Nothing is stored under that id yet: the first write wins it.
        await attacker.send_updates(update_of(block(victim, 0, in_root(STRING, vs("EVIL")))))
        await eventually(
            lambda: attacker.updates() or attacker.of(PermissionDenied),
            what="the forged write fanned out or refused",
        )
        proxy.heal()
        await eventually(
            lambda: replica.status(room).refused or replica.pending(room) == 0,
            what="the replica's edit acknowledged or refused",
        )
        status = replica.status(room)
        assert (status.refused, status.pending) == (0, 0), status.last_error
        # The replica counts its edit as stored: the relay must hold it.
        await attacker.synced()
        assert str(attacker.document().get("t", type=Text)) == "mine"


async def send_and_wait_stored(peer: RawPeer, *updates: bytes) -> None:
    """Send updates as a stock client, one at a time, each after the last one's echo."""
    for update in updates:
        before = len(peer.updates())
        await peer.send_updates(update)
        await eventually(lambda before=before: len(peer.updates()) > before, what="the echo")


async def test_gap_write_under_a_replicas_id_before_its_first_edit_leaves_its_edits_visible(
    relay, tmp_path
):
    room = "atk/awareness-gap"
    async with (
        Replica(tmp_path / "r.db", relay=relay.url) as replica,
        RawPeer(f"{relay.url}/{room}") as attacker,
    ):
        await attacker.synced()
        doc = await replica.open(room)
        await eventually(lambda: replica.status(room).synced, what="replica synced")
        replica.awareness(room).set_local_state({"user": "ann"})

        def seen() -> int | None:
            for message in attacker.of(AwarenessMessage):
                for entry in decode_awareness(message.payload):
                    if entry.state is not None:
                        return entry.client_id
            return None

        victim = await eventually(seen, what="the replica's presence")
        await attacker.send_updates(update_of(block(victim, 10, in_root(STRING, vs("?")))))
        await eventually(
            lambda: (
                attacker.denied
                or replica.status(room).quarantined
                or doc.get_update() != b"\x00\x00"
            ),
            what="the forgery refused, or arrived at the replica",
        )
        doc.get("t", type=Text).insert(0, "mine")
        await replica.wait_synced(room, timeout=timeout_s(10))
        async with Replica(tmp_path / "late.db", relay=relay.url) as late:
            doc_late = await late.open(room)
            await eventually(lambda: late.status(room).synced, what="late joiner synced")
            await eventually(
                lambda: "mine" in str(doc_late.get("t", type=Text)),
                timeout=3,
                what=f"the acknowledged edit at a late joiner (replica state {doc.get_state()!r})",
            )


@pytest.mark.xfail(
    strict=True,
    reason=(
        "BUG: a store written before ledgers gets its ledger rebuilt with no owners, so "
        "anyone may write at an offline replica's next clocks; the replica's catch-up, "
        "diffed against the relay's state vector, then carries nothing and is acknowledged: "
        "the replica counts its edit as stored while the relay holds the forgery"
    ),
)
async def test_store_from_before_ledgers_keeps_an_offline_replicas_edit(relay, tmp_path):
    room = "atk/old-store"
    async with (
        FaultProxy(relay.url, rng=random.Random(2)) as proxy,
        Replica(tmp_path / "r.db", relay=proxy.url, backoff=fast_backoff) as replica,
    ):
        doc = await replica.open(room)
        text = doc.get("t", type=Text)
        text.insert(0, "a")
        await replica.wait_synced(room, timeout=timeout_s(10))
        proxy.partition()
        await eventually(lambda: not replica.status(room).connected, what="replica offline")
        before = doc.get_state()
        text.insert(1, "mine")
        relay.kill()
        with contextlib.closing(sqlite3.connect(relay.store)) as db, db:
            for table in ("ledger_clients", "ledger_types", "ledger_docs"):
                db.execute(f"DELETE FROM {table}")  # as an older version left it
        relay.restart()
        impostor: Doc[Any] = Doc(client_id=doc.client_id)
        async with RawPeer(f"{relay.url}/{room}") as attacker:
            await attacker.synced()
            impostor.apply_update(attacker.document().get_update())
            forged = transact(impostor, lambda: impostor.get("t", type=Text).insert(1, "EVIL"))
            assert check_update(forged).starts == {doc.client_id: 1}
            await send_and_wait_stored(attacker, forged)
            assert not attacker.denied
            proxy.heal()
            await eventually(
                lambda: replica.status(room).refused or replica.pending(room) == 0,
                what="the replica's edit acknowledged or refused",
            )
            assert doc.get_state() != before
            await attacker.synced()
            assert str(attacker.document().get("t", type=Text)) == str(text) == "amine"


# == rewrites the relay stores: two contents for one (client, clock) ======================

V = 5555  # a stock (anonymous) client's id: an honest browser tab
SMILE = "\U0001f600"  # two UTF-16 units: a surrogate pair


def gc_copy_of_live_text(unknown_delete: bool = False) -> bytes:
    """V wrote "abc" (V:0-2) and "c" was deleted and compacted: V:2 is stored as deleted.

    The forgery says V:0-1 are garbage collected and puts a surrogate pair at V:2-3, so
    that the cut at V:3 (the first new clock) lands between its halves: pycrdt cannot
    cut there, the relay undoes the cut and stores the whole block, GC over live text.
    """
    ds = vu(1) + vu(999) + vu(1) + vu(0) + vu(1) if unknown_delete else b"\x00"
    return update_of(block(V, 0, gc(2), after(STRING, (V, 1), vs(SMILE + "X"))), ds=ds)


async def test_gc_copy_of_live_text_is_never_stored(relay_factory, tmp_path):
    relay = relay_factory("gc.db", "--compact-after-updates", "2")
    room = "atk/gc-copy"
    honest: Doc[Any] = Doc(client_id=V)
    written = transact(honest, lambda: honest.get("t", type=Text).insert(0, "abc"))
    async with RawPeer(f"{relay.url}/{room}") as tab, RawPeer(f"{relay.url}/{room}") as attacker:
        await tab.synced()
        await attacker.synced()
        await send_and_wait_stored(tab, written)
        await send_and_wait_stored(attacker, deletion(V, 2, 1))
        await compacted(relay, room)
        # The delete of a clock nobody wrote keeps the forgery out of the scratch Doc at
        # the next compaction: it is merged over the new snapshot as it is.
        await attacker.send_updates(gc_copy_of_live_text(unknown_delete=True))
        await eventually(lambda: attacker.denied, what="the forgery refused")
        assert "cannot be cut exactly" in attacker.denied[0]
        stored = contents_per_clock(stored_updates(relay.store, room), V, range(2))
        async with Replica(tmp_path / "late.db", relay=relay.url) as late:
            doc = await late.open(room)
            await eventually(lambda: late.status(room).synced, what="late joiner synced")
            late_text = str(doc.get("t", type=Text))
        assert str(tab.document().get("t", type=Text)).startswith("ab")  # the tab shows it
    await compacted(relay, room)  # the room emptied: the tail is folded
    async with Replica(tmp_path / "later.db", relay=relay.url) as later:
        doc = await later.open(room)
        await eventually(lambda: later.status(room).synced, what="later joiner synced")
        later_text = str(doc.get("t", type=Text))
    # Both joiners must show V's text, as the tab that typed it does.
    assert (late_text[:2], later_text[:2]) == ("ab", "ab"), (late_text, later_text)
    assert {k: len(v) for k, v in stored.items()} == {0: 1, 1: 1}, stored


# == parents: a child of a deleted non-type ===============================================

A = 7777  # the attacker's own (anonymous) client id
E = 8888  # another one


async def test_child_of_a_deleted_string_does_not_split_an_offline_replica_off(
    relay_factory, tmp_path
):
    relay = relay_factory("parent.db", "--compact-after-updates", "4")
    room = "atk/deleted-parent"
    async with (
        Replica(tmp_path / "h.db", relay=relay.url, backoff=fast_backoff) as honest,
        RawPeer(f"{relay.url}/{room}") as attacker,
    ):
        await attacker.synced()
        doc_h = await honest.open(room)
        text_h = doc_h.get("t", type=Text)
        text_h.insert(0, "hello")
        await honest.wait_synced(room, timeout=timeout_s(10))
        async with Replica(tmp_path / "r.db", relay=relay.url) as r:
            doc_r = await r.open(room)
            await eventually(lambda: str(doc_r.get("t", type=Text)) == "hello")
        # r is offline now; its file holds "hello", undeleted.
        del text_h[0:5]
        await honest.wait_synced(room, timeout=timeout_s(10))
        h = doc_h.client_id
        # The attacker makes the relay compact (4 updates) with deletes of deleted text.
        await send_and_wait_stored(attacker, deletion(h, 0, 1), deletion(h, 1, 1))
        await compacted(relay, room)
        poison = update_of(
            block(
                A,
                0,
                in_parent(STRING, (h, 2), vs("x")),  # a child of the deleted "l"
                in_root(STRING, vs("hi")),  # ordinary text at A:1-2
            )
        )
        await attacker.send_updates(poison)
        await eventually(lambda: attacker.denied, what="the child refused")
        assert "a deleted item not known as a shared type" in attacker.denied[0]
        async with Replica(tmp_path / "r.db", relay=relay.url, backoff=fast_backoff) as r:
            doc_r = await r.open(room)
            await eventually(lambda: r.status(room).synced, what="r synced")
            text_h.insert(0, "ok")
            await honest.wait_synced(room, timeout=timeout_s(10))
            assert r.status(room).quarantined == 0
            await eventually(
                lambda: str(doc_r.get("t", type=Text)) == str(text_h),
                timeout=3,
                what="the replica that was offline converging",
            )


# == honest traffic that must never be refused =============================================


async def test_refill_repeating_a_nan_value_is_not_refused(relay, tmp_path):
    # Two replicas refill an emptied relay with the same NaN: nan != nan must not make the
    # second one a "rewrite" (it did until the ledger named NaN: found by this file).
    room = "atk/nan"
    async with (
        Replica(tmp_path / "a.db", relay=relay.url, backoff=fast_backoff) as ra,
        Replica(tmp_path / "b.db", relay=relay.url, backoff=fast_backoff) as rb,
    ):
        doc_a, doc_b = await ra.open(room), await rb.open(room)
        doc_a.get("m", type=Map)["x"] = float("nan")
        await ra.wait_synced(room, timeout=timeout_s(10))
        await eventually(lambda: "x" in doc_b.get("m", type=Map), what="b holds the value")
        relay.kill()
        for suffix in ("", "-wal", "-shm"):
            Path(f"{relay.store}{suffix}").unlink(missing_ok=True)  # noqa: ASYNC240
        await eventually(lambda: not ra.status(room).connected and not rb.status(room).connected)
        doc_b.get("m", type=Map)["y"] = 1  # b's own offline edit, pending
        relay.restart()
        await ra.wait_synced(room, timeout=timeout_s(10))
        await eventually(
            lambda: rb.status(room).refused or rb.pending(room) == 0, what="b acked or refused"
        )
        assert (ra.status(room).refused, rb.status(room).refused) == (0, 0)
        assert health(relay)["updates_refused"] == 0


# == the ledger is a per-process cache ======================================================


async def test_a_second_relay_process_on_one_store_refuses_to_start(relay_factory, tmp_path):
    """Each relay process caches the ledgers of its open rooms: two on one SQLite file
    could both accept a different first write of the same clocks. The second one refuses
    to start, with a clear reason (several processes share a Redis store instead)."""
    relay_factory("shared.db")
    with pytest.raises(ProcessFailed, match="served by another relay process"):
        relay_factory("shared.db")


# == limits an attacker can use up =========================================================


@pytest.mark.xfail(
    strict=True,
    reason=(
        "BUG: any anonymous room member can fill a document's client-id cap "
        "(max_document_clients, 50,000) with 5 updates of 10,000 one-clock ids; every "
        "replica opened afterwards has a fresh client id and all its edits are refused"
    ),
)
async def test_client_id_cap_cannot_be_used_up_by_one_member(relay, tmp_path):
    room = "atk/client-cap"
    async with RawPeer(f"{relay.url}/{room}") as attacker:
        await attacker.synced()
        for first in range(100_000, 150_000, 10_000):  # 3-byte ids: the answers stay small
            ids = range(first, first + 10_000)
            await send_and_wait_stored(attacker, update_of(*(block(c, 0, gc(1)) for c in ids)))
        assert not attacker.denied
    async with Replica(tmp_path / "r.db", relay=relay.url) as replica:
        doc = await replica.open(room)
        doc.get("t", type=Text).insert(0, "honest")
        await eventually(
            lambda: replica.status(room).refused or replica.pending(room) == 0,
            what="the edit acknowledged or refused",
        )
        status = replica.status(room)
        assert (status.refused, status.pending) == (0, 0), status.last_error


async def round_trip(url: str, room: str, client: int) -> float:
    """Seconds for a stock client's update in ``room`` to come back from the fan-out."""
    doc: Doc[Any] = Doc(client_id=client)
    update = transact(doc, lambda: doc.get("t", type=Text).insert(0, "ping"))
    async with RawPeer(f"{url}/{room}") as peer:
        await peer.synced()
        started = time.monotonic()
        await send_and_wait_stored(peer, update)
        return time.monotonic() - started


async def test_joining_a_document_with_many_clients_does_not_freeze_the_relay(relay):
    room = "atk/many-clients"
    ids = range(10**15, 10**15 + 4_000)  # 7-byte ids, 150 characters each
    wide = update_of(*(block(c, 0, in_root(STRING, vs("x" * 150))) for c in ids))
    async with RawPeer(f"{relay.url}/{room}") as attacker:
        await attacker.synced()
        await send_and_wait_stored(attacker, wide)
    assert await round_trip(relay.url, "atk/elsewhere", 1) < timeout_s(5)
    try:
        async with RawPeer(f"{relay.url}/{room}") as joiner:
            await joiner.send(SyncStep1(b"\x00").encode())  # the answer is 660 KB, in pieces
            # Meanwhile, another room must still be served.
            elsewhere = asyncio.create_task(round_trip(relay.url, "atk/elsewhere", 2))
            done, _ = await asyncio.wait({elsewhere}, timeout=timeout_s(5))
            elsewhere.cancel()
            assert done, "another room got no answer within 5 s"
    finally:
        relay.kill()  # a frozen relay cannot run its SIGTERM handler


# == handled: kept for what tests/e2e/test_integrity.py does not cover =====================


def keys_for(count: int, seed: int) -> dict[int, bytes]:
    """``count`` client ids with the keys that prove them."""
    rng = random.Random(seed)
    out: dict[int, bytes] = {}
    while len(out) < count:
        key = rng.randbytes(32)
        out[client_id_of_key(key)] = key
    return out


async def test_claims_out_of_turn_are_closed_and_the_relay_serves_on(relay):
    room = "atk/claims"
    (cid, key), *_ = keys_for(1, 1).items()
    bad_key = bytes(32)
    # A stock client (no ?crdtsync) never speaks extensions: a claim is a protocol error.
    async with RawPeer(f"{relay.url}/{room}") as stock:
        await stock.send(ExtClaim(((cid, key),)).encode())
        await eventually(lambda: stock.closed, what="stock client closed")
    assert stock.closed is not None
    assert stock.closed[0] == 1002
    # A claim whose key does not derive the id.
    async with RawPeer(f"{relay.url}/{room}", extensions=True) as liar:
        await eventually(lambda: liar.of(ExtHello), what="hello")
        await liar.send(ExtClaim(((cid, bad_key),)).encode())
        await eventually(lambda: liar.closed, what="liar closed")
    assert liar.closed is not None
    assert liar.closed[0] == 1008
    assert "does not match its key" in liar.closed[1]
    # Genuine keys, but more ids than one connection may prove (4096): 5 x 1024.
    many = sorted(keys_for(5 * 1024, 2).items())
    async with RawPeer(f"{relay.url}/{room}", extensions=True) as hoarder:
        await eventually(lambda: hoarder.of(ExtHello), what="hello")
        for i in range(0, len(many), 1024):
            with contextlib.suppress(ConnectionClosed):
                await hoarder.send(ExtClaim(tuple(many[i : i + 1024])).encode())
        await eventually(lambda: hoarder.closed, what="hoarder closed")
    assert hoarder.closed is not None
    assert hoarder.closed[0] == 1008
    assert "more than 4096" in hoarder.closed[1]
    assert await round_trip(relay.url, room, 3) < timeout_s(10)
    assert stored_updates(relay.store, room) != []  # only the round trip's update


async def test_owner_recorded_on_a_previous_connection_survives_a_sigkill_restart(relay, tmp_path):
    room = "atk/owner-restart"
    async with (
        FaultProxy(relay.url, rng=random.Random(4)) as proxy,
        Replica(tmp_path / "r.db", relay=proxy.url, backoff=fast_backoff) as replica,
    ):
        doc = await replica.open(room)
        text = doc.get("t", type=Text)
        text.insert(0, "a")
        await replica.wait_synced(room, timeout=timeout_s(10))
        proxy.partition()
        await eventually(lambda: not replica.status(room).connected, what="replica offline")
        text.insert(1, "mine")
        relay.kill()  # SIGKILL: the owner must come back from the store's ledger
        relay.restart()
        impostor: Doc[Any] = Doc(client_id=doc.client_id)
        async with RawPeer(f"{relay.url}/{room}") as attacker:
            await attacker.synced()
            impostor.apply_update(attacker.document().get_update())
            forged = transact(impostor, lambda: impostor.get("t", type=Text).insert(1, "EVIL"))
            await attacker.send_updates(forged)
            await eventually(lambda: attacker.denied, what="the forgery refused")
            assert f"client {doc.client_id} belongs to another writer" in attacker.denied[0]
            proxy.heal()
            await replica.wait_synced(room, timeout=timeout_s(10))
            assert replica.status(room).refused == 0
            await attacker.synced()
            assert str(attacker.document().get("t", type=Text)) == "amine"


async def test_conflicting_first_writes_from_two_connections_at_once_store_one(relay):
    room = "atk/same-turn"
    one: Doc[Any] = Doc(client_id=V)
    two: Doc[Any] = Doc(client_id=V)
    a = transact(one, lambda: one.get("t", type=Text).insert(0, "one"))
    b = transact(two, lambda: two.get("m", type=Map).__setitem__("k", Array([1])))
    async with RawPeer(f"{relay.url}/{room}") as p1, RawPeer(f"{relay.url}/{room}") as p2:
        await asyncio.gather(p1.synced(), p2.synced())
        for _ in range(5):  # both at once, as close together as two sockets get
            await asyncio.gather(p1.send_updates(a), p2.send_updates(b))
        await eventually(lambda: len(p1.denied) + len(p2.denied) >= 5, what="refusals")
    stored = stored_updates(relay.store, room)
    assert {k: len(v) for k, v in contents_per_clock(stored, V, range(3)).items()} == {
        0: 1,
        1: 1,
        2: 1,
    }
    doc: Doc[Any] = Doc()
    for update in stored:
        doc.apply_update(update)  # never raises: one content per clock


async def test_rewrites_of_compacted_content_are_refused_in_every_form(relay_factory, tmp_path):
    # The relay compares with a snapshot its scratch Doc wrote, not with the original
    # update: each forgery differs from V's stored item in one respect only.
    relay = relay_factory("forms.db", "--compact-after-updates", "1")
    room = "atk/forms"
    base = [
        in_root(ANY, vu(1) + bytes([125, 1]), root="a"),  # V:0 = 1 in root array "a"
        in_root(STRING, vs("xy")),  # V:1-2 = "xy" in root text "t"
    ]
    honest = update_of(block(V, 0, *base))
    forgeries = {
        "true instead of 1": [in_root(ANY, vu(1) + bytes([120]), root="a"), base[1]],
        "'1' instead of 1": [in_root(ANY, vu(1) + bytes([119]) + vs("1"), root="a"), base[1]],
        "another root name": [in_root(ANY, vu(1) + bytes([125, 1]), root="b"), base[1]],
        "a map key": [
            bytes([ANY | 0x20]) + vu(1) + vs("a") + vs("k") + vu(1) + bytes([125, 1]),
            base[1],
        ],
        "an origin": [base[0], after(STRING, (V, 0), vs("xy"))],
        "another character": [base[0], in_root(STRING, vs("xz"))],
        "a surrogate pair": [base[0], in_root(STRING, vs(SMILE))],
    }
    async with RawPeer(f"{relay.url}/{room}") as tab:
        await tab.synced()
        await send_and_wait_stored(tab, honest)
        await compacted(relay, room)
        for name, structs in forgeries.items():
            new = in_root(STRING, vs("!"), root="z")  # new content after it: kept
            forged = update_of(block(V, 0, *structs, new))
            before = len(tab.denied)
            await tab.send_updates(forged)
            await eventually(lambda before=before: len(tab.denied) > before, what=name)
            assert "rewritten" in tab.denied[-1], name
    stored = stored_updates(relay.store, room)
    assert all(len(v) == 1 for v in contents_per_clock(stored, V, range(3)).values())
    doc: Doc[Any] = Doc()
    for update in stored:
        doc.apply_update(update)
    assert doc.get("a", type=Array).to_py() == [1]
    assert str(doc.get("t", type=Text)) == "xy"


# == the replica against a relay that sends poison =========================================


class PoisonRelay:
    """A y-websocket relay that acknowledges everything and answers with poison.

    Confirms extensions, sends its step 1, answers the replica's step 1 with ``answer``,
    then sends each of ``live`` as a live update; counts the replica's step 1 requests.
    """

    def __init__(self, answer: bytes, live: list[bytes]) -> None:
        self.answer = answer
        self.live = live
        self.step1s = 0
        self.connections = 0
        self.close_codes: list[int | None] = []  # how the replica closed each connection
        self.url = ""

    async def _handle(self, ws: ServerConnection) -> None:
        self.connections += 1
        assert ws.request is not None
        if "crdtsync" in ws.request.path:
            await ws.send(ExtHello().encode())
        await ws.send(SyncStep1(b"\x00").encode())
        answered = False
        with contextlib.suppress(ConnectionClosed):
            async for data in ws:
                msg = decode_message(data)  # type: ignore[arg-type]
                if isinstance(msg, SyncStep1):
                    self.step1s += 1
                    await ws.send(SyncStep2(self.answer).encode())
                    if not answered:
                        answered = True
                        for update in self.live:
                            await ws.send(SyncUpdate(update).encode())
                elif isinstance(msg, ExtUpdate):
                    await ws.send(ExtAck(msg.key).encode())
        self.close_codes.append(ws.close_code)

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[PoisonRelay]:
        async with serve(self._handle, "127.0.0.1", 0) as server:
            port = next(iter(server.sockets)).getsockname()[1]
            self.url = f"ws://127.0.0.1:{port}"
            yield self


C = 424_242  # the client id of the poisoning pair
# updates.py's pair: applying PRIOR then CRASH to one pycrdt Doc kills the process (SIGSEGV)
PRIOR = bytes.fromhex("010203020002080101610000")
CRASH = bytes.fromhex("02010301880303037e7e7e01020424000203016b02626300")


async def test_replica_fed_poison_in_every_form_keeps_its_file_and_its_edits(tmp_path):
    room = "atk/poisoned"
    path = tmp_path / "r.db"
    async with Replica(path) as offline:  # the replica's own edits, made offline first
        doc = await offline.open(room)
        doc.get("t", type=Text).insert(0, "mine")
        me = doc.client_id
    # a rewrite of the replica's own clocks
    impostor: Doc[Any] = Doc(client_id=me)
    rewrite = transact(impostor, lambda: impostor.get("t", type=Text).insert(0, "EVIL"))
    # a child naming the replica's own string as its parent
    child = update_of(block(A, 0, in_parent(STRING, (me, 1), vs("x"))))
    # the poisoning pair of client C, merged into one blob, and apart
    first: Doc[Any] = Doc(client_id=C)
    text_c = transact(first, lambda: first.get("t", type=Text).insert(0, "c"))
    second: Doc[Any] = Doc(client_id=C)
    map_c = transact(second, lambda: second.get("m", type=Map).__setitem__("k", Array(["z"])))
    # content after a gap, then a fill that gives the pending clocks other content
    gap = update_of(block(V, 2, after(STRING, (V, 1), vs("gh"))))
    fill = update_of(block(V, 0, in_root(STRING, vs("EF")), after(STRING, (V, 1), vs("GH"))))
    marker = update_of(block(E, 0, in_root(STRING, vs("."), root="end")))
    live = [rewrite, child, merge_updates(text_c, map_c), text_c, map_c, gap, fill, marker]
    fake = PoisonRelay(answer=merge_updates(rewrite, child), live=live)
    async with fake.running(), Replica(path, relay=fake.url, backoff=fast_backoff) as replica:
        doc = await replica.open(room)
        text = doc.get("t", type=Text)
        await eventually(lambda: str(doc.get("end", type=Text)) == ".", what="the last update")
        status = replica.status(room)
        shown = str(text)
        assert "mine" in shown
        assert "EVIL" not in shown
        assert doc.get("m", type=Map).to_py() == {}
        reasons = [q.reason for q in replica.quarantined(room)]
        assert status.quarantined == len(reasons) >= 5, reasons
        assert status.connected
        assert fake.step1s <= 3  # the gap asked for one resync at most: no loop
    async with Replica(path) as again:  # the file opens, and shows what the Doc showed
        doc = await again.open(room)
        assert str(doc.get("t", type=Text)) == shown
        assert again.status(room).quarantined == status.quarantined

    # The segfault pair: the second half is invalid. The replica closes with 1007, never
    # applies it, and retries with backoff (each connection gets the pair again); its
    # file still opens. (It reconnects, and the reconnect clears last_error.)
    crash = PoisonRelay(answer=b"\x00\x00", live=[PRIOR, CRASH])
    async with crash.running(), Replica(path, relay=crash.url) as replica:
        await replica.open(room)
        await eventually(lambda: crash.close_codes.count(1007) >= 2, what="two refusals")
    async with Replica(path) as again:
        doc = await again.open(room)
        assert str(doc.get("t", type=Text)) == shown
        assert again.status(room).quarantined == status.quarantined
