"""Killed relays, killed replicas and offline edits, with real processes and files."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import pytest
from helpers import JsonLineProcess, eventually
from pycrdt import Doc, Map, Text

from crdtsync.client import Replica
from crdtsync.store import UpdateLog
from crdtsync.testing.proxy import FaultProxy

pytestmark = pytest.mark.anyio

WORKER = str(Path(__file__).with_name("replica_worker.py"))


def stored_marks(path: Path, doc: str) -> dict[str, int]:
    """The ``marks`` map of ``doc`` as stored in a SQLite file, read through a fresh UpdateLog."""
    with UpdateLog(path) as log:
        updates = log.load(doc).all_updates()
    d = Doc()
    with d.transaction():
        for update in updates:
            d.apply_update(update)
    return {k: int(v) for k, v in d.get("marks", type=Map).to_py().items()}


def worker(tmp_path: Path, name: str, relay_url: str | None, *extra: str) -> JsonLineProcess:
    args = [WORKER, "--db", str(tmp_path / f"{name}.db"), "--doc", "shared", "--prefix", name]
    if relay_url:
        args += ["--relay", relay_url]
    return JsonLineProcess([*args, *extra], tmp_path, name)


async def test_offline_edits_reach_peer_and_pending_survives_restart(relay, tmp_path):
    doc_name = "team/offline"
    async with Replica(tmp_path / "b.db", relay=relay.url) as b:
        doc_b = await b.open(doc_name)
        async with Replica(tmp_path / "a.db", relay=relay.url) as a:
            doc_a = await a.open(doc_name)
            doc_a.get("text", type=Text).insert(0, "shared base.")
            await a.wait_synced(doc_name, timeout=10)
            await eventually(lambda: str(doc_b.get("text", type=Text)) == "shared base.")

            relay.kill()
            await eventually(lambda: not a.status(doc_name).connected, what="A offline")
            text_a = doc_a.get("text", type=Text)
            text_a.insert(0, "A1 ")
            text_a.insert(0, "A2 ")
            doc_a.get("map", type=Map)["a"] = "offline"
            del text_a[0:3]  # removes "A2 "; a delete-only transaction still counts as a change
            assert a.pending(doc_name) == 4
            doc_b.get("text", type=Text).insert(len("shared base."), " B1")
            doc_b.get("map", type=Map)["b"] = "offline too"

        # A's process "restarts": a new Replica on the same file, still offline.
        async with Replica(tmp_path / "a.db") as a_offline:
            assert a_offline.pending(doc_name) == 4
            await a_offline.open(doc_name)
            assert a_offline.pending(doc_name) == 4

        relay.restart()
        async with Replica(tmp_path / "a.db", relay=relay.url) as a:
            doc_a = await a.open(doc_name)
            assert a.pending(doc_name) == 4
            await a.wait_synced(doc_name, timeout=15)
            assert a.pending(doc_name) == 0
            await b.wait_synced(doc_name, timeout=15)

            def state(doc: Doc) -> tuple[str, dict[str, object]]:
                return str(doc.get("text", type=Text)), doc.get("map", type=Map).to_py()

            await eventually(lambda: state(doc_a) == state(doc_b), what="convergence")
            assert state(doc_a) == ("A1 shared base. B1", {"a": "offline", "b": "offline too"})
        # The acknowledgement itself is durable: a later run still sees 0 pending.
        async with Replica(tmp_path / "a.db") as again:
            assert again.pending(doc_name) == 0


@pytest.mark.slow
async def test_acknowledged_edits_survive_relay_sigkill_mid_stream(relay, tmp_path):
    # Long enough streams (3 s or more each) that the last worker to start has had an
    # acknowledgement before the first one ends, on a loaded 2-core machine too.
    count = 1500
    workers = [
        worker(tmp_path, f"w{i}", relay.url, "--count", str(count), "--delay", "0.002")
        for i in range(3)
    ]
    try:
        # Kill the relay while every worker is mid-stream and has had edits acknowledged.
        acked_before = {}
        for w in workers:
            acked_before[w] = w.wait_for("acked", timeout=30)["upto"]
        relay.kill()
        for w, name in zip(workers, ("w0", "w1", "w2"), strict=True):
            upto = max(e["upto"] for e in w.events if e.get("event") == "acked")
            assert upto >= acked_before[w]
            marks = stored_marks(relay.store, "shared")
            missing = [i for i in range(upto + 1) if f"{name}-{i}" not in marks]
            assert missing == [], f"{name}: acknowledged edits lost by the killed relay"
        assert not any(w.find("done") for w in workers), "the kill came after the stream ended"

        relay.restart()
        for w in workers:
            w.wait_for("done", timeout=60)
    finally:
        for w in workers:
            w.stop()
    marks = stored_marks(relay.store, "shared")
    for name in ("w0", "w1", "w2"):
        assert sorted(v for k, v in marks.items() if k.startswith(f"{name}-")) == list(range(count))
    # and a fresh replica loads exactly that state from the restarted relay
    async with Replica(tmp_path / "check.db", relay=relay.url) as check:
        doc = await check.open("shared")
        await eventually(lambda: len(doc.get("marks", type=Map)) == 3 * count, what="all marks")
        assert doc.get("marks", type=Map).to_py() == marks


async def test_replica_sigkilled_after_applying_keeps_edit_and_uploads_it(relay, tmp_path):
    w = worker(tmp_path, "victim", None, "--count", "100000", "--delay", "0.001")
    try:
        seen = w.wait_for("applied", timeout=30, i=50)
        w.kill()
    finally:
        w.stop()
    applied = max(e["i"] for e in w.events if e.get("event") == "applied")
    assert applied >= seen["i"]
    # Another door: the file itself, read by a fresh UpdateLog after the SIGKILL.
    marks = stored_marks(tmp_path / "victim.db", "shared")
    assert all(f"victim-{i}" in marks for i in range(applied + 1))

    async with (
        Replica(tmp_path / "victim.db", relay=relay.url) as victim,
        Replica(tmp_path / "peer.db", relay=relay.url) as peer,
    ):
        await victim.open("shared")
        assert victim.pending("shared") >= applied + 1
        await victim.wait_synced("shared", timeout=15)
        doc = await peer.open("shared")
        key = f"victim-{applied}"
        await eventually(lambda: key in doc.get("marks", type=Map), what=key)


async def test_replica_behind_a_reordering_link_converges_without_reconnecting(relay, tmp_path):
    proxy = FaultProxy(relay.url, rng=random.Random(5), name="reorder")
    async with proxy:  # noqa: SIM117  (proxy.url exists only once the proxy started)
        async with (
            Replica(tmp_path / "w.db", relay=relay.url) as writer,
            Replica(tmp_path / "r.db", relay=proxy.url) as reader,
        ):
            doc_w = await writer.open("shuffled")
            doc_r = await reader.open("shuffled")
            await eventually(lambda: reader.status("shuffled").synced, what="reader synced")
            proxy.set_reorder(1.0, window=4)
            marks = doc_w.get("marks", type=Map)
            for i in range(120):
                marks["done"] = i % 2 == 0  # the same key overwritten: what Yrs got wrong
                marks[f"k{i}"] = i
                await asyncio.sleep(0.002)
            await writer.wait_synced("shuffled", timeout=15)
            await eventually(
                lambda: doc_r.get("marks", type=Map).to_py() == marks.to_py(),
                timeout=15,
                what="reader equals writer",
            )
            assert proxy.stats["reordered"] > 0  # the premise: deliveries really were reordered
            assert proxy.stats["connections"] == 1  # healed without reconnecting
