"""Bounded work: no connection can exhaust or stall the relay, and no relay can freeze a
replica (real relay processes on loopback; scaled-down versions of the hostile cases)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sqlite3
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from helpers import descendants, eventually, timeout_s
from pycrdt import Array, Doc, Text
from websockets.asyncio.client import connect
from websockets.asyncio.server import serve
from websockets.exceptions import ConnectionClosed, InvalidStatus

from crdtsync.client import Backoff, Replica
from crdtsync.protocol import (
    AwarenessEntry,
    AwarenessMessage,
    ExtHello,
    MessageType,
    SyncStep1,
    SyncStep2,
    SyncUpdate,
    decode_message,
    encode_awareness,
    write_var_uint,
)
from crdtsync.store import UpdateLog

pytestmark = pytest.mark.anyio

ROOM = "limits/room"


def health(relay: Any) -> dict[str, Any]:
    url = relay.url.replace("ws://", "http://", 1)
    with urllib.request.urlopen(f"{url}/healthz?verbose=1", timeout=10) as resp:
        data: dict[str, Any] = json.loads(resp.read())
    return data


def presence(client_id: int, clock: int, state: Any) -> bytes:
    return AwarenessMessage(encode_awareness([AwarenessEntry(client_id, clock, state)])).encode()


async def close_code_after(url: str, *frames: bytes, read_s: float = 10.0) -> tuple[int, str]:
    """Send frames, then read until the relay closes; the close code and reason."""
    async with asyncio.timeout(timeout_s(read_s)), connect(url, max_size=2**27) as ws:
        try:
            for frame in frames:
                await ws.send(frame)
            while True:
                await ws.recv()
        except ConnectionClosed as exc:
            assert exc.rcvd is not None
            return exc.rcvd.code, exc.rcvd.reason
    raise AssertionError("unreachable")


async def honest_round_trip(relay: Any, tmp_path: Path, name: str) -> None:
    """An honest replica in another room still gets its edits stored."""
    async with Replica(tmp_path / f"{name}.db", relay=relay.url) as replica:
        doc = await replica.open(f"other/{name}")
        doc.get("text", type=Text).insert(0, "still served")
        await replica.wait_synced(f"other/{name}", timeout=timeout_s(15))


async def test_presence_flood_is_capped_and_honest_peers_stay(relay, tmp_path):
    async with Replica(tmp_path / "a.db", relay=relay.url) as honest:
        await honest.open(ROOM)
        async with asyncio.timeout(timeout_s(20)), connect(f"{relay.url}/{ROOM}") as ws:
            await ws.send(SyncStep1(b"\x00").encode())
            # 200 client ids with 2 KB states each from one connection (8 are kept), and
            # one state over the 16 KiB limit (dropped, not decoded).
            for i in range(200):
                await ws.send(presence(1000 + i, 1, {"user": "x" * 2000}))
            await ws.send(presence(5000, 1, {"big": "y" * 20_000}))
            await ws.send(SyncStep1(b"\x00").encode())  # still open: it answers
            while not isinstance(decode_message(await ws.recv()), SyncStep2):  # type: ignore[arg-type]
                pass
        stats = health(relay)
        assert stats["limits_hit"] > 0
        await eventually(
            lambda: len(honest.awareness(ROOM).states) <= 1 + 8,
            what="the honest replica holds at most the capped states",
        )
        assert honest.status(ROOM).connected
    await honest_round_trip(relay, tmp_path, "presence")


async def test_connection_that_keeps_going_over_presence_caps_is_closed_with_1008(relay, tmp_path):
    frames = [presence(1, clock, {"user": "y" * 20_000}) for clock in range(1, 80)]
    code, reason = await close_code_after(
        f"{relay.url}/{ROOM}", SyncStep1(b"\x00").encode(), *frames
    )
    assert code == 1008
    assert reason.startswith("over limits: presence state of client 1 has 20")
    await honest_round_trip(relay, tmp_path, "closed")


async def test_presence_nested_deeper_than_json_can_decode_is_dropped_quietly(relay, tmp_path):
    deep = "[" * 5000 + "]" * 5000  # valid JSON, 10 KB: Python's parser gives up
    payload = write_var_uint(1) + write_var_uint(7) + write_var_uint(1)
    payload += write_var_uint(len(deep)) + deep.encode()
    frame = bytes([MessageType.AWARENESS]) + write_var_uint(len(payload)) + payload
    async with asyncio.timeout(timeout_s(10)), connect(f"{relay.url}/{ROOM}") as ws:
        await ws.send(frame)
        await ws.send(SyncStep1(b"\x00").encode())
        while not isinstance(decode_message(await ws.recv()), SyncStep2):  # type: ignore[arg-type]
            pass
    assert "Traceback" not in relay.stderr()
    assert health(relay)["limits_hit"] == 1


@pytest.mark.parametrize(
    ("make", "code", "reason"),
    [
        (
            lambda: _many_clients(20_001),
            1008,
            "update has 20001 struct blocks (client ids), over the limit of 10000",
        ),
        (
            lambda: _many_values(2_000_001),
            1008,
            "update has more than 2000000 structs and values",
        ),
    ],
    ids=["too_many_clients", "too_many_values"],
)
async def test_heavy_update_is_refused_before_the_relay_walks_it(
    relay, tmp_path, make, code, reason
):
    async with Replica(tmp_path / "a.db", relay=relay.url) as honest:
        doc = await honest.open(ROOM)
        got = await close_code_after(f"{relay.url}/{ROOM}", SyncUpdate(make()).encode())
        assert got == (code, reason)
        doc.get("text", type=Text).insert(0, "same room, still fine")
        await honest.wait_synced(ROOM, timeout=timeout_s(10))
        assert honest.status(ROOM).connected
    await honest_round_trip(relay, tmp_path, "heavy")


def _many_clients(n: int) -> bytes:
    """One small GC struct for each of ``n`` client ids (valid, tiny per client)."""
    out = [write_var_uint(n)]
    for client in range(1, n + 1):
        out.append(b"\x01" + write_var_uint(client) + b"\x00" + b"\x00\x01")
    out.append(b"\x00")
    return b"".join(out)


def _many_values(n: int) -> bytes:
    """One Any item holding ``n`` integers (a few bytes each)."""
    body = b"\x08\x01" + write_var_uint(1) + b"a" + write_var_uint(n) + b"\x7d\x01" * n
    return b"\x01\x01" + write_var_uint(77) + b"\x00" + body + b"\x00"


async def test_update_over_the_update_size_limit_is_refused_with_1009(relay_factory, tmp_path):
    relay = relay_factory("small.db")
    big = Doc()
    big.get("text", type=Text).insert(0, "z" * (17 * 1024 * 1024))
    code, reason = await close_code_after(
        f"{relay.url}/{ROOM}", SyncUpdate(big.get_update()).encode()
    )
    assert code == 1009
    assert "exceeds the limit of 16777216" in reason


async def test_sync_requests_are_paced_and_answered_once_per_batch(relay, tmp_path):
    answers = 0
    async with asyncio.timeout(timeout_s(20)), connect(f"{relay.url}/{ROOM}") as ws:
        for _ in range(200):
            await ws.send(SyncStep1(b"\x00").encode())
        # With 2 requests/s after a burst of 10, 200 requests get far fewer answers in 2 s.
        loop = asyncio.get_running_loop()
        end = loop.time() + 2.0
        while (left := end - loop.time()) > 0:
            try:
                msg = decode_message(await asyncio.wait_for(ws.recv(), left))  # type: ignore[arg-type]
            except TimeoutError:
                break
            answers += isinstance(msg, SyncStep2)
    assert 1 <= answers <= 20
    await honest_round_trip(relay, tmp_path, "requests")


async def test_connections_per_address_are_capped(relay_factory, tmp_path, monkeypatch):
    monkeypatch.setenv("CRDTSYNC_MAX_CONNECTIONS_PER_ADDRESS", "5")
    relay = relay_factory("addr.db")
    async with asyncio.timeout(timeout_s(20)):
        held = [await connect(f"{relay.url}/{ROOM}/{i}") for i in range(5)]
        try:
            with pytest.raises(InvalidStatus) as refused:
                await connect(f"{relay.url}/{ROOM}/6")
            assert refused.value.response.status_code == 429
        finally:
            for ws in held:
                await ws.close()
        # slots come back when connections close
        await eventually(lambda: health(relay)["connections"] == 0)
        ws = await connect(f"{relay.url}/{ROOM}/7")
        await ws.close()


async def test_connection_that_never_syncs_is_closed(relay_factory, tmp_path, monkeypatch):
    monkeypatch.setenv("CRDTSYNC_SYNC_TIMEOUT_S", "1")
    relay = relay_factory("idle.db")
    code, reason = await close_code_after(f"{relay.url}/{ROOM}")
    assert (code, reason) == (1008, "no sync message within 1 s")
    # a client that syncs stays
    async with Replica(tmp_path / "a.db", relay=relay.url) as replica:
        await replica.open(ROOM)
        await asyncio.sleep(1.5)  # past the timeout: the replica must still be connected
        assert replica.status(ROOM).connected


async def test_documents_named_like_health_paths_sync_and_health_stays_http(relay, tmp_path):
    async with Replica(tmp_path / "a.db", relay=relay.url) as a:
        doc = await a.open("healthz")
        doc.get("text", type=Text).insert(0, "a document called healthz")
        await a.wait_synced("healthz", timeout=timeout_s(10))
    assert health(relay)["status"] == "ok"


@pytest.mark.parametrize("value", ["0", "", "yes"])
async def test_only_crdtsync_1_asks_for_extensions(relay, value):
    async with (
        asyncio.timeout(timeout_s(10)),
        connect(f"{relay.url}/{ROOM}?crdtsync={value}") as ws,
    ):
        first = decode_message(await ws.recv())  # type: ignore[arg-type]
    assert isinstance(first, SyncStep1)  # no hello: a stock client
    async with asyncio.timeout(timeout_s(10)), connect(f"{relay.url}/{ROOM}?crdtsync=1") as ws:
        assert isinstance(decode_message(await ws.recv()), ExtHello)  # type: ignore[arg-type]


async def test_document_client_ids_are_capped(relay_factory, tmp_path, monkeypatch):
    monkeypatch.setenv("CRDTSYNC_MAX_DOCUMENT_CLIENTS", "3")
    relay = relay_factory("clients.db")
    async with asyncio.timeout(timeout_s(20)), connect(f"{relay.url}/{ROOM}") as ws:
        for client in range(1, 5):
            d = Doc(client_id=client)
            d.get("list", type=Array).append(client)
            await ws.send(SyncUpdate(d.get_update()).encode())
        while True:
            msg = decode_message(await ws.recv())  # type: ignore[arg-type]
            if type(msg).__name__ == "PermissionDenied":
                assert "already has 3 client ids" in msg.reason  # type: ignore[union-attr]
                break
    async with Replica(tmp_path / "r.db", relay=relay.url) as replica:
        doc = await replica.open(ROOM)
        await eventually(lambda: sorted(doc.get("list", type=Array).to_py()) == [1.0, 2.0, 3.0])


# -- the replica's side: a relay cannot freeze it ------------------------------------------


class FakeRelay:
    """A misbehaving relay: ``behave(ws)`` runs for each connection."""

    def __init__(self, behave: Any) -> None:
        self.behave = behave
        self.connections = 0
        self.received: list[bytes] = []
        self.url = ""

    async def __aenter__(self) -> FakeRelay:
        async def handler(ws: Any) -> None:
            self.connections += 1
            with contextlib.suppress(ConnectionClosed):
                await self.behave(self, ws)

        self._server = await serve(handler, "127.0.0.1", 0)
        port = next(iter(self._server.sockets)).getsockname()[1]
        self.url = f"ws://127.0.0.1:{port}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._server.close()
        await self._server.wait_closed()


async def test_replica_answers_a_flood_of_sync_requests_at_a_bounded_rate(tmp_path):
    async def flood(fake: FakeRelay, ws: Any) -> None:
        await ws.send(ExtHello().encode())
        for _ in range(3000):
            await ws.send(SyncStep1(b"\x00").encode())
        async for data in ws:
            fake.received.append(data)

    async with FakeRelay(flood) as fake, Replica(tmp_path / "r.db", relay=fake.url) as replica:
        doc = await replica.open(ROOM)
        doc.get("text", type=Text).insert(0, "x" * 1000)
        await asyncio.sleep(2.0)  # the flood arrives and is (not) answered meanwhile
        doc.get("text", type=Text).insert(0, "y")  # the app's loop is not blocked
        answers = [m for m in fake.received if m[:2] == bytes([MessageType.CRDTSYNC, 1])]
        assert 1 <= len(answers) <= 10


async def test_replica_keeps_gap_updates_aside_and_applies_them_once_filled(tmp_path):
    """A relay sending thousands of updates that each start after a gap: the replica keeps
    a bounded number aside (Yrs would retry each one with every later update: quadratic),
    asks again (paced), and applies them in order once the gap is filled."""
    author: Doc[Any] = Doc(client_id=777)
    text = author.get("text", type=Text)
    updates: list[bytes] = []
    for i in range(3001):
        before = author.get_state()
        text.insert(len(text), "g" if i else "first")
        updates.append(author.get_update(before))

    async def gaps(fake: FakeRelay, ws: Any) -> None:
        await ws.send(ExtHello().encode())
        await ws.send(SyncStep2(b"\x00\x00").encode())
        for update in updates[1:]:  # every one after the missing first: all wait on it
            await ws.send(SyncUpdate(update).encode())
        async for data in ws:
            fake.received.append(data)

    async with FakeRelay(gaps) as fake, Replica(tmp_path / "r.db", relay=fake.url) as replica:
        doc = await replica.open(ROOM)
        mine = doc.get("text", type=Text)
        await eventually(lambda: len(fake.received) >= 1)
        await asyncio.sleep(1.0)  # the updates arrive meanwhile
        held = replica._docs[ROOM].held
        assert 1 <= len(held) <= 256  # bounded: the rest comes with the answer to step 1
        assert len(mine) == 0
        asks = [m for m in fake.received if m[:2] == bytes([0, 0])]
        assert 1 <= len(asks) <= 5  # asked again, paced
        mine.insert(0, "local")  # the app's loop is not blocked

    # The gap filled last: what was kept aside applies, in order.

    async def fill_last(fake: FakeRelay, ws: Any) -> None:
        await ws.send(ExtHello().encode())
        await ws.send(SyncStep2(b"\x00\x00").encode())
        for update in updates[1:200]:
            await ws.send(SyncUpdate(update).encode())
        await ws.send(SyncUpdate(updates[0]).encode())
        async for data in ws:
            fake.received.append(data)

    async with (
        FakeRelay(fill_last) as fake,
        Replica(tmp_path / "r2.db", relay=fake.url) as replica,
    ):
        doc = await replica.open(ROOM)
        mine = doc.get("text", type=Text)
        await eventually(lambda: len(mine) == len("first") + 199)
        assert str(mine) == "first" + "g" * 199
        assert len(replica._docs[ROOM].held) == 0


async def test_replica_backs_off_from_a_relay_that_fails_after_every_handshake(tmp_path):
    async def garbage(fake: FakeRelay, ws: Any) -> None:
        await ws.send(b"\xff\xff\xff")

    backoff = lambda: Backoff(0.05, 2.0)  # noqa: E731
    async with (
        FakeRelay(garbage) as fake,
        Replica(tmp_path / "r.db", relay=fake.url, backoff=backoff) as replica,
    ):
        await replica.open(ROOM)
        await asyncio.sleep(3.0)
        # 0.05, 0.1, 0.2 ... 2 s: a handful, not hundreds
        assert 2 <= fake.connections <= 10
        assert "relay sent bad data" in (replica.status(ROOM).last_error or "") or (
            "closed" in (replica.status(ROOM).last_error or "")
        )


async def test_edit_while_another_process_locks_the_file_does_not_block_the_loop(tmp_path):
    path = tmp_path / "locked.db"
    async with Replica(path, store_busy_timeout_s=0.1) as replica:
        doc = await replica.open(ROOM)
        locker = sqlite3.connect(path, timeout=1)
        locker.execute("BEGIN EXCLUSIVE")
        try:
            doc.get("text", type=Text).insert(0, "kept in memory")
            status = replica.status(ROOM)
            assert status.pending == 1  # counted, not lost
            assert "locked" in (status.last_error or "")
        finally:
            locker.execute("ROLLBACK")
            locker.close()
        await eventually(lambda: replica.status(ROOM).last_error is None, what="saved on retry")
        assert replica.store is not None
        assert replica.store.pending_count(ROOM) == 1


async def test_concurrent_joins_share_reads_merged_off_the_loop(relay_factory, tmp_path):
    """20 joiners of a 1.1 MB document (over a megabyte: merged in the work process): a
    few shared reads."""
    store = tmp_path / "big.db"
    writer: Doc[Any] = Doc()
    updates: list[bytes] = []
    writer.observe(lambda event: updates.append(event.update))
    text = writer.get("text", type=Text)
    for _ in range(200):  # (few, large appends: pycrdt applies many appends slowly)
        text.insert(len(text), "x" * 5500)
    with UpdateLog(store) as log:
        log.append_many([(ROOM, u) for u in updates])
    relay = relay_factory("big.db", "--compact-after-updates", "1000000")

    async def join(i: int) -> int:
        async with (
            asyncio.timeout(timeout_s(30)),
            connect(f"{relay.url}/{ROOM}", max_size=None) as ws,
        ):
            await ws.send(SyncStep1(b"\x00").encode())
            while True:
                msg = decode_message(await ws.recv())  # type: ignore[arg-type]
                if isinstance(msg, SyncStep2):
                    reader: Doc[Any] = Doc()
                    reader.apply_update(msg.update)
                    return len(str(reader.get("text", type=Text)))

    other = asyncio.create_task(honest_round_trip(relay, tmp_path, "during-joins"))
    lengths = await asyncio.gather(*(join(i) for i in range(20)))
    await other
    assert lengths == [200 * 5500] * 20
    stats = health(relay)
    # 20 joins shared a handful of reads (the other room's replica reads too)
    assert 1 <= stats["document_reads"] <= 8
    assert stats["document_reads_in_worker"] >= 1


@pytest.mark.long  # ~20 s: in .ci/run's longer set (the default suite stays under 10 min)
async def test_resent_documents_are_compared_off_the_loop_and_rewrites_still_refused(
    relay, tmp_path
):
    """A stock client resending a whole document (as each reconnect does) costs the relay
    a comparison in its work process, not its event loop; a rewrite is still refused."""
    author: Doc[Any] = Doc(client_id=4242)
    text = author.get("text", type=Text)
    url = f"{relay.url}/{ROOM}"
    async with asyncio.timeout(timeout_s(60)), connect(url, max_size=2**27) as ws:
        await ws.send(SyncStep1(b"\x00").encode())
        for i in range(200):
            before = author.get_state()
            text.insert(len(text), f"line {i} " + "y" * 500 + "\n")
            await ws.send(SyncUpdate(author.get_update(before)).encode())
        whole = author.get_update()
        async with Replica(tmp_path / "same.db", relay=relay.url) as same:
            doc = await same.open(ROOM)
            await eventually(lambda: len(doc.get("text", type=Text)) == len(text))
            other = asyncio.create_task(honest_round_trip(relay, tmp_path, "during-repeats"))
            for _ in range(10):
                await ws.send(SyncUpdate(whole).encode())
            await other
            # A different content at the same ids: refused, whatever the path.
            forger: Doc[Any] = Doc(client_id=4242)
            forger.get("text", type=Text).insert(0, "z" * len(text))
            await ws.send(SyncUpdate(forger.get_update()).encode())
            # (The resender's comparisons are paced: its share of the work process.)
            await eventually(lambda: health(relay)["updates_refused"] == 1, timeout=60)
            assert same.status(ROOM).connected
            assert str(doc.get("text", type=Text)) == str(text)
    stats = health(relay)
    assert stats["comparisons_in_worker"] >= 11
    assert stats["updates_refused"] == 1


async def test_document_over_its_stored_quota_refuses_new_content_but_not_deletions(
    relay_factory, tmp_path, monkeypatch
):
    monkeypatch.setenv("CRDTSYNC_MAX_DOCUMENT_BYTES", str(64 * 1024))
    relay = relay_factory("quota.db")
    async with (
        Replica(tmp_path / "a.db", relay=relay.url) as a,
        Replica(tmp_path / "b.db", relay=relay.url) as b,
    ):
        doc_a = await a.open(ROOM)
        doc_b = await b.open(ROOM)
        text_a = doc_a.get("text", type=Text)
        text_a.insert(0, "k" * 40_000)
        await a.wait_synced(ROOM, timeout=timeout_s(10))
        text_a.insert(0, "o" * 40_000)  # past the quota: refused, kept pending in a
        await eventually(lambda: a.status(ROOM).refused >= 1)
        assert a.status(ROOM).pending >= 1
        text_b = doc_b.get("text", type=Text)
        await eventually(lambda: len(text_b) == 40_000)
        # Deletions still go through (they are how the document gets smaller).
        del text_b[0:10_000]
        await b.wait_synced(ROOM, timeout=timeout_s(10))
        assert b.status(ROOM).refused == 0
        await eventually(lambda: "k" * 30_000 in str(text_a))
    # What the store holds: the first 40,000 characters, less the deleted ones.
    async with Replica(tmp_path / "c.db", relay=relay.url) as c:
        doc_c = await c.open(ROOM)
        await eventually(lambda: c.status(ROOM).synced)
        assert str(doc_c.get("text", type=Text)) == "k" * 30_000
    await honest_round_trip(relay, tmp_path, "quota")


async def test_content_refused_over_the_quota_is_stored_once_it_fits(
    relay_factory, tmp_path, monkeypatch
):
    """A refusal over the quota leaves nothing behind: the content is not recorded as
    stored (its resend would have been taken for a repeat and acknowledged unstored),
    and once the quota allows it, the replica's resend stores it."""
    monkeypatch.setenv("CRDTSYNC_MAX_DOCUMENT_BYTES", str(64 * 1024))
    relay = relay_factory("quota2.db")
    async with Replica(tmp_path / "a.db", relay=relay.url) as a:
        text = (await a.open(ROOM)).get("text", type=Text)
        text.insert(0, "k" * 40_000)
        await a.wait_synced(ROOM, timeout=timeout_s(10))
        text.insert(40_000, "o" * 40_000)
        await eventually(lambda: a.status(ROOM).refused >= 1)
    # Reconnecting: still over the quota, still refused, still pending.
    async with Replica(tmp_path / "a.db", relay=relay.url) as a:
        await a.open(ROOM)
        await eventually(lambda: a.status(ROOM).refused >= 1)
        assert a.pending(ROOM) == 1
    # A larger quota: the resend is stored.
    monkeypatch.setenv("CRDTSYNC_MAX_DOCUMENT_BYTES", str(1024 * 1024))
    relay.restart()
    async with Replica(tmp_path / "a.db", relay=relay.url) as a:
        await a.open(ROOM)
        await a.wait_synced(ROOM, timeout=timeout_s(10))
    async with Replica(tmp_path / "fresh.db", relay=relay.url) as fresh:
        doc = await fresh.open(ROOM)
        await eventually(lambda: len(doc.get("text", type=Text)) == 80_000)
        assert str(doc.get("text", type=Text)) == "k" * 40_000 + "o" * 40_000


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


async def test_sigterm_with_queued_resends_exits_within_the_drain_timeout(
    relay_factory, tmp_path, monkeypatch
):
    """A connection that queued many resends of a stored document, each compared in the
    work process at its paced share, cannot keep a stopping relay alive; the relay's
    work processes go with it."""
    monkeypatch.setenv("CRDTSYNC_DRAIN_TIMEOUT_S", "2")
    relay = relay_factory("term.db")
    author: Doc[Any] = Doc(client_id=99)
    text = author.get("text", type=Text)
    for _ in range(300):  # 300,000 characters: each resend costs the work process ~1 s
        text.insert(len(text), "q" * 1000)
    whole = author.get_update()

    async def resend(ws: Any) -> None:
        for _ in range(40):
            await ws.send(SyncUpdate(whole).encode())

    async with asyncio.timeout(timeout_s(60)):
        ws = await connect(f"{relay.url}/{ROOM}", max_size=2**27)
        await ws.send(SyncStep1(b"\x00").encode())
        await ws.send(SyncUpdate(whole).encode())
        await eventually(lambda: health(relay)["updates_stored"] == 1)
        sending = asyncio.create_task(resend(ws))
        await eventually(lambda: health(relay)["comparisons_in_worker"] >= 2)
        sending.cancel()
        ws.transport.abort()  # gone, with its resends read or on their way
        workers = descendants(relay.proc.pid)
        assert workers  # the work process (and multiprocessing's resource tracker)
        relay.proc.send_signal(signal.SIGTERM)
        started = asyncio.get_running_loop().time()
        while relay.proc.poll() is None:
            assert asyncio.get_running_loop().time() - started < timeout_s(20), "no exit"
            await asyncio.sleep(0.1)
        assert relay.proc.returncode == 0
        await eventually(lambda: not any(_alive(p) for p in workers), timeout=10)


def _deletes_only(clients: range) -> bytes:
    """An update with no structs and a delete range for each client (none it holds)."""
    out = [b"\x00", write_var_uint(len(clients))]
    for client in clients:
        out.append(write_var_uint(client) + b"\x01" + b"\x00\x05")
    return b"".join(out)


async def test_deletions_of_content_a_document_does_not_hold_count_against_its_quota(
    relay_factory, monkeypatch
):
    monkeypatch.setenv("CRDTSYNC_MAX_DOCUMENT_BYTES", str(64 * 1024))
    relay = relay_factory("quota3.db")
    updates = [_deletes_only(range(1 + i * 2000, 2001 + i * 2000)) for i in range(10)]
    fit = sum(1 for i in range(10) if sum(map(len, updates[: i + 1])) <= 64 * 1024)
    assert fit < 10
    async with asyncio.timeout(timeout_s(30)), connect(f"{relay.url}/{ROOM}") as ws:
        await ws.send(SyncStep1(b"\x00").encode())
        for update in updates:
            await ws.send(SyncUpdate(update).encode())
        await eventually(lambda: health(relay)["updates_refused"] == 10 - fit)
    assert health(relay)["updates_stored"] == fit


async def test_update_repeating_more_stored_clocks_than_the_limit_is_refused(
    relay_factory, monkeypatch
):
    monkeypatch.setenv("CRDTSYNC_MAX_REPEAT_UNITS", "1000")
    relay = relay_factory("repeat.db")
    author: Doc[Any] = Doc(client_id=5)
    author.get("text", type=Text).insert(0, "r" * 5000)
    whole = author.get_update()
    async with asyncio.timeout(timeout_s(30)), connect(f"{relay.url}/{ROOM}") as ws:
        await ws.send(SyncStep1(b"\x00").encode())
        await ws.send(SyncUpdate(whole).encode())
        await eventually(lambda: health(relay)["updates_stored"] == 1)
        await ws.send(SyncUpdate(whole).encode())  # 5,000 repeated clocks: over the limit
        while True:
            msg = decode_message(await ws.recv())  # type: ignore[arg-type]
            if msg.__class__.__name__ == "PermissionDenied":
                assert "repeats 5000 stored clocks, over the limit of 1000" in msg.reason
                break
    stats = health(relay)
    assert stats["comparisons_in_worker"] == 0
    assert stats["updates_refused"] == 1


async def test_other_rooms_keep_syncing_while_a_large_document_is_compacted(
    relay_factory, tmp_path
):
    """Compaction (merge in the worker, snapshot written in ~1 MiB transactions) never
    holds the store long enough to stop another room: edits there are stored and
    acknowledged while it runs, and the compacted document reads back whole."""
    relay = relay_factory("relay.db", "--compact-after-updates", "24")
    doc: Doc[Any] = Doc()
    text = doc.get("text", type=Text)

    def append(i: int) -> bytes:
        before = doc.get_state()
        text.insert(len(text), f"{i:04d}" + "x" * 400_000)
        return SyncUpdate(doc.get_update(before)).encode()

    async def answered(ws: Any) -> None:
        # The relay handles a connection's messages in order: this comes after the updates.
        await ws.send(SyncStep1(doc.get_state()).encode())
        async with asyncio.timeout(timeout_s(30)):
            while not isinstance(decode_message(await ws.recv()), SyncStep2):
                pass

    acked_while_compacting = 0
    async with (
        connect(f"{relay.url}/{ROOM}", max_size=None) as ws,
        Replica(tmp_path / "other.db", relay=relay.url) as replica,
    ):
        for i in range(23):  # 24 x 400 KB appends: a 9.6 MB tail (pycrdt compacts it in ~0.1 GB)
            await ws.send(append(i))
        await answered(ws)
        assert health(relay)["compactions"] == 0
        other = (await replica.open("other/room")).get("text", type=Text)
        await ws.send(append(23))  # the 24th: the relay compacts the document
        async with asyncio.timeout(timeout_s(60)):
            for n in range(2_000):
                before = await asyncio.to_thread(health, relay)
                other.insert(len(other), f"{n} ")
                await replica.wait_synced("other/room", timeout=timeout_s(15))
                after = await asyncio.to_thread(health, relay)
                if before["compacting"] and after["compacting"]:
                    acked_while_compacting += before["compactions"] == after["compactions"]
                if after["compactions"] + after["compactions_failed"] >= 1:
                    break
        await answered(ws)
    final = health(relay)
    assert final["compactions"] >= 1, final
    assert final["compactions_failed"] == 0, final
    assert acked_while_compacting >= 1, ("no edit of another room stored while compacting", final)
    assert str(other).startswith("0 1 2 ")
    with sqlite3.connect(relay.store) as db:
        (tail,) = db.execute(
            "SELECT count(*) FROM updates u JOIN documents d ON u.doc = d.name "
            "WHERE d.name = ? AND u.seq > d.snapshot_seq",
            (ROOM,),
        ).fetchone()
    assert tail < 24, "the document was not compacted"
    joiner: Doc[Any] = Doc()
    async with connect(f"{relay.url}/{ROOM}", max_size=None) as ws:
        await ws.send(SyncStep1(b"\x00").encode())
        async with asyncio.timeout(timeout_s(30)):
            # (an answer may come in pieces: step 2, then updates)
            while len(joiner.get("text", type=Text)) < len(text):
                msg = decode_message(await ws.recv())
                if isinstance(msg, SyncStep2 | SyncUpdate):
                    joiner.apply_update(msg.update)
    assert str(joiner.get("text", type=Text)) == str(text)


async def test_replica_drops_presence_nested_too_deep_and_goes_on(tmp_path):
    """A relay sending presence nested 20,000 arrays deep, 40 KB (under the size cap:
    issue 8 saw a RecursionError in the replica): dropped; the presence after it and the
    connection go on."""
    deep = "[" * 20_000 + "]" * 20_000
    payload = write_var_uint(1) + write_var_uint(7) + write_var_uint(1)
    payload += write_var_uint(len(deep)) + deep.encode()
    frame = bytes([MessageType.AWARENESS]) + write_var_uint(len(payload)) + payload

    async def behave(fake: FakeRelay, ws: Any) -> None:
        await ws.send(ExtHello().encode())
        await ws.send(SyncStep1(b"\x00").encode())
        for _ in range(20):
            await ws.send(frame)
        await ws.send(presence(8, 1, {"user": "after"}))
        async for data in ws:
            fake.received.append(data)

    async with (
        FakeRelay(behave) as fake,
        # (one connection per document: the fake relay counts connections)
        Replica(tmp_path / "r.db", relay=fake.url, multiplex=False) as replica,
    ):
        await replica.open(ROOM)
        states = replica.awareness(ROOM).states
        await eventually(lambda: states.get(8) == {"user": "after"}, what="the later presence")
        assert 7 not in states
        status = replica.status(ROOM)
        assert status.connected
        assert "Recursion" not in (status.last_error or "")
        assert fake.connections == 1  # never dropped the connection over it
