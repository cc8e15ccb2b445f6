"""Replicas syncing through a real relay process on loopback."""

from __future__ import annotations

import asyncio

import pytest
from helpers import eventually
from pycrdt import Array, Doc, Map, Text

from crdtsync.client import Replica
from crdtsync.store import UpdateLog

pytestmark = pytest.mark.anyio


def snapshot(doc: Doc) -> dict[str, object]:
    """A plain-data view of the shared roots used by these tests."""
    return {
        "text": str(doc.get("text", type=Text)),
        "map": doc.get("map", type=Map).to_py(),
        "list": doc.get("list", type=Array).to_py(),
    }


async def test_two_replicas_editing_concurrently_converge(relay, tmp_path):
    async with (
        Replica(tmp_path / "a.db", relay=relay.url) as a,
        Replica(tmp_path / "b.db", relay=relay.url) as b,
    ):
        doc_a = await a.open("team/notes")
        doc_b = await b.open("team/notes")
        await eventually(lambda: a.status("team/notes").synced and b.status("team/notes").synced)
        for i in range(20):
            doc_a.get("text", type=Text).insert(0, f"a{i} ")
            doc_b.get("text", type=Text).insert(0, f"b{i} ")
            doc_a.get("map", type=Map)[f"a{i}"] = i
            doc_b.get("map", type=Map)[f"b{i}"] = {"nested": [i, str(i)]}
        doc_a.get("list", type=Array).append(Map({"inner": Text("from a")}))
        doc_b.get("list", type=Array).append(Array(["from b"]))
        await a.wait_synced("team/notes", timeout=10)
        await b.wait_synced("team/notes", timeout=10)
        await eventually(lambda: snapshot(doc_a) == snapshot(doc_b), what="convergence")
        state = snapshot(doc_a)
        text = state["text"]
        assert isinstance(text, str)
        assert all(f"a{i} " in text and f"b{i} " in text for i in range(20))
        assert len(state["map"]) == 40  # type: ignore[arg-type]
        assert {"inner": "from a"} in state["list"]  # type: ignore[operator]
        assert ["from b"] in state["list"]  # type: ignore[operator]
        assert a.pending("team/notes") == 0


async def test_replica_that_only_receives_compacts_its_log(relay, tmp_path):
    async with (
        Replica(tmp_path / "w.db", relay=relay.url) as writer,
        Replica(tmp_path / "r.db", relay=relay.url, compact_after_updates=5) as reader,
    ):
        doc_w = await writer.open("feed")
        doc_r = await reader.open("feed")
        await eventually(lambda: reader.status("feed").synced, what="reader synced")
        for i in range(200):
            doc_w.get("text", type=Text).insert(0, f"{i};")
            await asyncio.sleep(0)
        await writer.wait_synced("feed", timeout=10)
        expected = str(doc_w.get("text", type=Text))
        await eventually(lambda: str(doc_r.get("text", type=Text)) == expected, what="all 200")
    with UpdateLog(tmp_path / "r.db") as log:
        stored = log.load("feed")
    assert stored.snapshot is not None  # it compacted although it never edited
    assert len(stored.updates) < 5
    check = Doc()
    for update in stored.all_updates():
        check.apply_update(update)
    assert str(check.get("text", type=Text)) == expected


async def test_presence_reaches_peer_and_is_removed_when_replica_closes(relay, tmp_path):
    async with (
        Replica(tmp_path / "a.db", relay=relay.url) as a,
        Replica(tmp_path / "b.db", relay=relay.url) as b,
    ):
        doc_a = await a.open("room")
        await b.open("room")
        await eventually(lambda: a.status("room").synced and b.status("room").synced)
        a.awareness("room").set_local_state({"user": "ann", "cursor": 3})
        seen = b.awareness("room").states
        await eventually(lambda: seen.get(doc_a.client_id) == {"user": "ann", "cursor": 3})
        await a.close("room")
        await eventually(lambda: doc_a.client_id not in seen, what="ann's presence removed")
    # Presence is relayed, never stored.
    with UpdateLog(relay.store) as log:
        assert log.load("room").all_updates() == []


async def test_relay_with_full_durability_syncs(relay_factory, tmp_path):
    relay = relay_factory("full.db", "--synchronous", "FULL")
    async with Replica(tmp_path / "a.db", relay=relay.url, synchronous="FULL") as a:
        doc = await a.open("full")
        doc.get("text", type=Text).insert(0, "fsynced")
        await a.wait_synced("full", timeout=10)
        assert a.store is not None
        assert a.store.conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    with UpdateLog(relay.store) as log:
        check = Doc()
        for update in log.load("full").all_updates():
            check.apply_update(update)
    assert str(check.get("text", type=Text)) == "fsynced"
