"""Bad input to a real relay: the offender is closed with a clear reason, nobody else notices."""

from __future__ import annotations

import asyncio
import hashlib
import json
import sqlite3
import urllib.request

import pytest
from helpers import eventually, timeout_s
from pycrdt import Doc, Text
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from crdtsync.client import Replica
from crdtsync.protocol import SyncStep1, SyncUpdate
from crdtsync.store import UpdateLog
from crdtsync.updates import check_update

pytestmark = pytest.mark.anyio


def store_digest(path) -> tuple[int, str]:
    """Row count and content hash of the relay's store, read through a fresh connection."""
    conn = sqlite3.connect(path)
    try:
        rows = conn.execute("SELECT doc, data FROM updates ORDER BY seq").fetchall()
        snaps = conn.execute("SELECT name, snapshot FROM documents ORDER BY name").fetchall()
    finally:
        conn.close()
    h = hashlib.sha256()
    for name, data in rows + snaps:
        h.update(name.encode() + b"\0" + (data or b""))
    return len(rows), h.hexdigest()


def valid_update(text: str = "hello") -> bytes:
    doc = Doc()
    doc.get("text", type=Text).insert(0, text)
    return doc.get_update()


async def close_of(url: str, *frames: bytes | str, max_size: int | None = 2**26) -> tuple[int, str]:
    """Send frames after the relay's greeting; return the close code and reason we get."""
    async with asyncio.timeout(timeout_s(10)), connect(url, max_size=max_size) as ws:
        await ws.recv()  # the relay's own step 1
        try:
            for frame in frames:
                await ws.send(frame)
            while True:
                await ws.recv()
        except ConnectionClosed as exc:
            assert exc.rcvd is not None, "the relay dropped the connection without a close frame"
            return exc.rcvd.code, exc.rcvd.reason
    raise AssertionError("unreachable")


GARBAGE = [
    pytest.param(b"", 1007, "empty message", id="empty"),
    pytest.param(
        b"\x00\x02\x10abc", 1007, "sync update declares 16 bytes, 3 present", id="truncated"
    ),
    pytest.param(b"\xff\xff\xff\xff\xff\xff\xff\xff\xff", 1007, "longer than 8 bytes", id="varint"),
    pytest.param(b"\x07", 1007, "unknown message type 7", id="unknown-type"),
    pytest.param(b"\x00\x09\x00", 1007, "unknown sync message type 9", id="unknown-sync-type"),
    pytest.param(
        b"\x64\x01\x01\x02\x00\x00", 1002, "without asking for extensions", id="unasked-extension"
    ),
    pytest.param(
        SyncUpdate(b"\x05garbage-garbage").encode(), 1007, "invalid update", id="garbage-update"
    ),
    pytest.param(SyncUpdate(valid_update() + b"xx").encode(), 1007, "trailing", id="trailing"),
    pytest.param(SyncStep1(b"\x05\x01").encode(), 1007, "state vector", id="bad-state-vector"),
    pytest.param("a text frame", 1003, "text frames", id="text-frame"),
]


@pytest.mark.parametrize(("frame", "code", "reason"), GARBAGE)
async def test_relay_closes_connection_on_bad_frame_and_keeps_serving(
    relay, tmp_path, frame, code, reason
):
    async with Replica(tmp_path / "good.db", relay=relay.url) as good:
        doc = await good.open("room")
        doc.get("text", type=Text).insert(0, "before ")
        await good.wait_synced("room", timeout=10)
        before = store_digest(relay.store)

        got_code, got_reason = await close_of(f"{relay.url}/room", frame)
        assert got_code == code
        assert reason in got_reason

        assert store_digest(relay.store) == before  # nothing of the bad frame was stored
        doc.get("text", type=Text).insert(7, "after")
        await good.wait_synced("room", timeout=10)
        async with Replica(tmp_path / "late.db", relay=relay.url) as late:
            late_doc = await late.open("room")
            await eventually(lambda: str(late_doc.get("text", type=Text)) == "before after")


async def test_relay_refuses_oversized_frame_with_1009(relay_factory, tmp_path):
    relay = relay_factory("small.db", "--max-message-bytes", "4096")
    big = SyncUpdate(valid_update("x" * 10_000)).encode()
    code, reason = await close_of(f"{relay.url}/room", big)
    assert code == 1009
    assert "4096" in reason  # websockets names the limit it enforced
    assert store_digest(relay.store)[0] == 0


async def test_replica_does_not_resend_an_oversized_update_forever(relay_factory, tmp_path):
    relay = relay_factory("small.db", "--max-message-bytes", "4096")
    async with Replica(tmp_path / "r.db", relay=relay.url) as replica:
        doc = await replica.open("room")
        doc.get("text", type=Text).insert(0, "y" * 10_000)
        await eventually(lambda: replica.status("room").last_error, what="an error in the status")
        status = replica.status("room")
        assert "1009" in (status.last_error or "")
        assert status.pending == 1
        # It stopped: no reconnect loop hammering the relay with the same update.
        await eventually(lambda: not replica.status("room").connected)
        assert replica._docs["room"].stop_reconnecting


@pytest.mark.parametrize(
    "path",
    ["/", "/a/../b", "/a//b", "/./a", "/a/", "/a|b", "/" + "n" * 600, "/a\\b"],
)
async def test_relay_refuses_invalid_document_names(relay, path):
    try:
        code, reason = await close_of(f"{relay.url}{path}")
    except InvalidStatus as exc:  # a name the HTTP layer already refuses
        assert exc.response.status_code == 400
        return
    except ConnectionClosed as exc:
        assert exc.rcvd is not None
        code, reason = exc.rcvd.code, exc.rcvd.reason
    assert code == 1008
    assert "document name" in reason


async def test_relay_keeps_no_room_state_after_last_client_leaves(relay, tmp_path):
    """Open and close many documents, then check the relay holds no room for any."""
    async with Replica(tmp_path / "r.db", relay=relay.url) as replica:
        for i in range(30):
            name = f"doc-{i}"
            doc = await replica.open(name)
            doc.get("text", type=Text).insert(0, f"content {i}")
            await replica.wait_synced(name, timeout=10)
            await replica.close(name)
    # The relay reports its rooms on /healthz?verbose: none may remain.
    http = relay.url.replace("ws://", "http://")

    def rooms() -> int:
        with urllib.request.urlopen(f"{http}/healthz?verbose=1", timeout=timeout_s(5)) as resp:
            return int(json.loads(resp.read())["rooms"])

    await eventually(lambda: rooms() == 0, what="no rooms left")


async def test_update_after_a_clock_gap_is_kept_until_the_gap_fills(relay_factory, tmp_path):
    """Policy: the relay stores a gapped update (Yjs keeps such content pending) and
    compaction keeps it; once the missing update arrives, everyone has all of it."""
    relay = relay_factory("gap.db", "--compact-after-updates", "1")
    source = Doc()
    text = source.get("text", type=Text)
    updates: list[bytes] = []
    source.observe(lambda event: updates.append(event.update))
    for ch in "abc":
        text += ch
    first, missing, gapped = updates
    async with asyncio.timeout(timeout_s(10)), connect(f"{relay.url}/gap") as ws:
        await ws.recv()  # the relay's step 1
        await ws.send(SyncUpdate(first).encode())
        await ws.send(SyncUpdate(gapped).encode())

        def stored_extent() -> tuple[bool, int]:
            with UpdateLog(relay.store) as log:
                stored = log.load("gap")
            info = check_update(stored.merged())
            return stored.snapshot is not None, info.state.get(source.client_id, 0)

        # Compacted (the premise), and the gapped "c" (clock 2) is still in the store.
        await eventually(lambda: stored_extent() == (True, 3), what="compacted with 'c'")
    async with Replica(tmp_path / "early.db", relay=relay.url) as early:
        doc = await early.open("gap")
        await eventually(lambda: early.status("gap").synced, what="synced")
        assert str(doc.get("text", type=Text)) == "a"  # "c" waits for "b"
    async with asyncio.timeout(timeout_s(10)), connect(f"{relay.url}/gap") as ws:
        await ws.recv()
        await ws.send(SyncUpdate(missing).encode())
    async with Replica(tmp_path / "late.db", relay=relay.url) as late:
        doc = await late.open("gap")
        await eventually(lambda: str(doc.get("text", type=Text)) == "abc", what="abc")
