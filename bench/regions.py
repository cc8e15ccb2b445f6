"""Regions (issue 12): propagation between regions, catch-up after a partition, and a
region's local fan-out while one of its links catches up.

Real relay processes (``crdtsync.testing.regions``: one SQLite store each, a fault
proxy on every link); replicas are ``crdtsync.client.Replica`` objects in this process.

    python bench/regions.py                       # all three, default sizes
    python bench/regions.py --only propagation --delay-ms 100 --writes 200
    python bench/regions.py --only catchup --updates 10000

Propagation: a writer in eu inserts a token, waits for eu's acknowledgement; a reader in
us notes when the token arrives. Reported from the acknowledgement (and from the edit),
p50/p99, against the link's injected delay (the floor: one way, link to relay).

Catch-up: eu and us partitioned; writers in both regions make ``--updates`` updates in
all (half each, in ``--docs`` documents); then the partition heals. Reported: seconds
until both stores hold the same content, and the bytes both links shipped, against the
bytes of the updates themselves (the stores' own rows).

Fan-out while catching up: in eu, a writer and a reader of another document (one token
every 20 ms); its delivery latency p50/p99 while idle, and while eu's link to us ships a
backlog of ``--updates`` updates.

Presence: ``--clients`` stock clients of eu, spread over ``--docs`` documents, each
setting its presence ``--rate`` times a second (a cursor moving); eu's link carries it
to us. Reported: the latency of one client's states from eu to a stock client of us
(p50/p99; the link flushes every 100 ms), and another room's fan-out latency in us
(two replicas, a token every 20 ms) idle and during the flood.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from pycrdt import Text

from crdtsync.client import Replica
from crdtsync.store import UpdateLog
from crdtsync.testing.regions import Regions, same_content

EXTRA: dict[str, Any] = {}


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


async def wait_caught_up(regions: Regions, source: str, target: str, limit_s: float) -> None:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if await regions[source].caught_up(target):
            return
        await asyncio.sleep(0.05)
    raise TimeoutError(f"{source}->{target} not caught up in {limit_s} s")


async def propagation(folder: Path, delay_s: float, writes: int) -> dict[str, Any]:
    async with Regions(folder, ("eu", "us"), settings={"anti_entropy_s": 0, **EXTRA}) as regions:
        for proxy in regions.links.values():
            proxy.set_delay(delay_s)
        await wait_caught_up(regions, "eu", "us", 30)
        token = regions.token()
        arrived: dict[str, float] = {}
        async with (
            Replica(folder / "w.db", relay=regions["eu"].url, token=token) as writer,
            Replica(folder / "r.db", relay=regions["us"].url, token=token) as reader,
        ):
            doc = "bench/propagation"
            mine = (await writer.open(doc)).get("t", type=Text)
            theirs = (await reader.open(doc)).get("t", type=Text)

            everything = asyncio.Event()

            def seen(_: object) -> None:
                now = time.perf_counter()
                for token_ in str(theirs).split(";"):
                    if token_ and token_ not in arrived:
                        arrived[token_] = now
                if len(arrived) >= writes:
                    everything.set()

            theirs.observe(seen)
            edited: dict[str, float] = {}
            acked: dict[str, float] = {}
            for i in range(writes):
                name = f"p{i}"
                edited[name] = time.perf_counter()
                mine.insert(len(mine), name + ";")
                await writer.wait_synced(doc, timeout=30)
                acked[name] = time.perf_counter()
                await asyncio.sleep(0.02)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(everything.wait(), 30)
        from_ack = [(arrived[n] - acked[n]) * 1000 for n in acked if n in arrived]
        from_edit = [(arrived[n] - edited[n]) * 1000 for n in edited if n in arrived]
        return {
            "delay_ms": delay_s * 1000,
            "writes": writes,
            "from_ack_p90_ms": round(pct(from_ack, 0.9), 1),
            "over_200_ms": sum(1 for v in from_ack if v > 200),
            "arrived": len(arrived),
            "from_ack_p50_ms": round(pct(from_ack, 0.5), 1),
            "from_ack_p99_ms": round(pct(from_ack, 0.99), 1),
            "from_edit_p50_ms": round(pct(from_edit, 0.5), 1),
            "from_edit_p99_ms": round(pct(from_edit, 0.99), 1),
        }


def rows_bytes(regions: Regions, name: str) -> tuple[int, int]:
    """(rows, bytes) written by region ``name``'s own clients."""
    with UpdateLog(regions[name].directory / "store.db") as log:
        count, size = log.conn.execute(
            "SELECT count(*), coalesce(sum(length(data)), 0) FROM updates WHERE origin IS NULL"
        ).fetchone()
    return int(count), int(size)


async def write_updates(replica: Replica, docs: list[str], updates: int, tag: str) -> None:
    texts = [(await replica.open(d)).get("t", type=Text) for d in docs]
    for i in range(updates):
        texts[i % len(texts)].insert(0, f"{tag}{i};")
        await asyncio.sleep(0)  # (each edit its own update)
    for d in docs:
        await replica.wait_synced(d, timeout=120)


async def catchup(folder: Path, updates: int, docs: int, delay_s: float) -> dict[str, Any]:
    settings = {"anti_entropy_s": 0, "compact_after_updates": 100_000}
    async with Regions(folder, ("eu", "us"), settings=settings) as regions:
        await wait_caught_up(regions, "eu", "us", 30)
        await wait_caught_up(regions, "us", "eu", 30)
        token = regions.token()
        names = [f"bench/catchup/{k}" for k in range(docs)]
        regions.partition("eu", "us")
        async with (
            Replica(folder / "weu.db", relay=regions["eu"].url, token=token) as weu,
            Replica(folder / "wus.db", relay=regions["us"].url, token=token) as wus,
        ):
            await asyncio.gather(
                write_updates(weu, names, updates // 2, "e"),
                write_updates(wus, names, updates - updates // 2, "u"),
            )
        written = [rows_bytes(regions, r) for r in ("eu", "us")]
        before = dict(regions.shipped)
        regions.heal()
        for proxy in regions.links.values():
            proxy.set_delay(delay_s)
        started = time.perf_counter()
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            copies = [await regions.documents(n) for n in names]
            if all(same_content(c.values()) for c in copies):
                break
            await asyncio.sleep(0.1)
        seconds = time.perf_counter() - started
        shipped = sum(regions.shipped[k] - before[k] for k in regions.shipped)
        deletes = 0  # (inserts only: no delete set)
        own = sum(b for _, b in written)
        return {
            "updates": sum(n for n, _ in written),
            "updates_bytes": own,
            "delay_ms": delay_s * 1000,
            "seconds": round(seconds, 2),
            "bytes_shipped": shipped,
            "ratio": round(shipped / max(1, own + deletes), 3),
            "links": {k: regions[k].link(t) for k, t in (("eu", "us"), ("us", "eu"))},
        }


async def room_latency(
    regions: Regions, folder: Path, token: str, seconds: float, region: str = "eu"
) -> list[float]:
    """Delivery latency (ms) of one token every 20 ms, between two replicas of ``region``."""
    doc = f"bench/room/{random.randrange(10**9)}"
    got: dict[str, float] = {}
    sent: dict[str, float] = {}
    url = regions[region].url
    async with (
        Replica(folder / f"a{doc[-4:]}.db", relay=url, token=token) as a,
        Replica(folder / f"b{doc[-4:]}.db", relay=url, token=token) as b,
    ):
        mine = (await a.open(doc)).get("t", type=Text)
        theirs = (await b.open(doc)).get("t", type=Text)
        await asyncio.sleep(0.3)

        def seen(_: object) -> None:
            now = time.perf_counter()
            for t in str(theirs).split(";"):
                if t and t not in got:
                    got[t] = now

        theirs.observe(seen)
        end = time.monotonic() + seconds
        i = 0
        while time.monotonic() < end:
            name = f"x{i}"
            sent[name] = time.perf_counter()
            mine.insert(len(mine), name + ";")
            i += 1
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.5)
    return [(got[n] - sent[n]) * 1000 for n in sent if n in got]


async def fanout_during_catchup(folder: Path, updates: int, docs: int) -> dict[str, Any]:
    settings = {"anti_entropy_s": 0, "compact_after_updates": 100_000}
    async with Regions(folder, ("eu", "us"), settings=settings) as regions:
        await wait_caught_up(regions, "eu", "us", 30)
        token = regions.token()
        idle = await room_latency(regions, folder, token, 5.0)
        regions.partition("eu", "us")
        names = [f"bench/backlog/{k}" for k in range(docs)]
        async with Replica(folder / "backlog.db", relay=regions["eu"].url, token=token) as w:
            await write_updates(w, names, updates, "b")
        regions.heal()
        for proxy in regions.links.values():
            proxy.set_delay(0.1)
        deadline = time.monotonic() + 30
        while regions["eu"].link("us")["state"] != "catching up":  # (connected, behind)
            if time.monotonic() > deadline:
                raise TimeoutError("the link never started catching up")
            await asyncio.sleep(0.01)
        busy_task = asyncio.create_task(room_latency(regions, folder, token, 2.0))
        await asyncio.sleep(1.0)
        link = regions["eu"].link("us")
        busy = await busy_task
        return {
            "idle_p50_ms": round(pct(idle, 0.5), 2),
            "idle_p99_ms": round(pct(idle, 0.99), 2),
            "catching_up_p50_ms": round(pct(busy, 0.5), 2),
            "catching_up_p99_ms": round(pct(busy, 0.99), 2),
            "link_state_1s_in": link["state"],
            "link_cursor_1s_in": link["cursor"],
            "samples": [len(idle), len(busy)],
            "mean_ratio": round(statistics.mean(busy) / statistics.mean(idle), 3),
        }


async def presence_flood(folder: Path, clients: int, docs: int, rate: float) -> dict[str, Any]:
    from websockets.asyncio.client import connect

    from crdtsync.protocol import (
        AwarenessEntry,
        AwarenessMessage,
        SyncStep1,
        decode_awareness,
        decode_message,
        encode_awareness,
    )

    settings = {"anti_entropy_s": 0}
    async with Regions(folder, ("eu", "us"), settings=settings) as regions:
        await wait_caught_up(regions, "eu", "us", 30)
        await wait_caught_up(regions, "us", "eu", 30)
        token = regions.token()
        idle = await room_latency(regions, folder, token, 5.0, region="us")
        names = [f"bench/presence/{k}" for k in range(docs)]
        arrivals: list[float] = []
        stop = asyncio.Event()

        async def watch() -> None:
            async with connect(f"{regions['us'].url}/{names[0]}?token={token}") as ws:
                await ws.send(SyncStep1(b"\x00").encode())
                while not stop.is_set():
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(0.5):
                            msg = decode_message(await ws.recv())  # type: ignore[arg-type]
                            if isinstance(msg, AwarenessMessage):
                                now = time.perf_counter()
                                for e in decode_awareness(msg.payload):
                                    if e.client_id == 1_000_000 and e.state:
                                        arrivals.append((now - e.state["t"]) * 1000)

        async def client(i: int) -> None:
            url = f"{regions['eu'].url}/{names[i % docs]}?token={token}"
            async with connect(url) as ws:
                await ws.send(SyncStep1(b"\x00").encode())
                clock = 0
                while not stop.is_set():
                    clock += 1
                    state = {"t": time.perf_counter(), "cursor": clock, "user": f"u{i}"}
                    entry = AwarenessEntry(1_000_000 + i, clock, state)
                    await ws.send(AwarenessMessage(encode_awareness([entry])).encode())
                    await asyncio.sleep(1 / rate)

        tasks = [asyncio.create_task(watch())]
        tasks += [asyncio.create_task(client(i)) for i in range(clients)]
        await asyncio.sleep(2.0)
        busy = await room_latency(regions, folder, token, 5.0, region="us")
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        link = regions["eu"].link("us")
        return {
            "clients": clients,
            "documents": docs,
            "states_per_s": clients * rate,
            "presence_eu_to_us_p50_ms": round(pct(arrivals, 0.5), 1),
            "presence_eu_to_us_p99_ms": round(pct(arrivals, 0.99), 1),
            "presence_samples": len(arrivals),
            "us_room_idle_p50_ms": round(pct(idle, 0.5), 2),
            "us_room_idle_p99_ms": round(pct(idle, 0.99), 2),
            "us_room_flood_p50_ms": round(pct(busy, 0.5), 2),
            "us_room_flood_p99_ms": round(pct(busy, 0.99), 2),
            "link_presence_sent": link["presence_sent"],
            "link_presence_dropped": link["presence_dropped"],
            "link_state": link["state"],
        }


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", choices=["propagation", "catchup", "fanout", "presence"])
    p.add_argument("--clients", type=int, default=100)
    p.add_argument("--rate", type=float, default=10.0)
    p.add_argument("--delay-ms", type=float, default=100.0)
    p.add_argument("--writes", type=int, default=200)
    p.add_argument("--updates", type=int, default=10_000)
    p.add_argument("--docs", type=int, default=20)
    args = p.parse_args()
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="crdtsync-bench-regions-") as tmp:
        folder = Path(tmp)
        if args.only in (None, "propagation"):
            sub = folder / "propagation"
            out["propagation"] = await propagation(sub, args.delay_ms / 1000, args.writes)
            print(json.dumps({"propagation": out["propagation"]}), flush=True)
        if args.only in (None, "catchup"):
            sub = folder / "catchup"
            out["catchup"] = await catchup(sub, args.updates, args.docs, args.delay_ms / 1000)
            print(json.dumps({"catchup": out["catchup"]}), flush=True)
        if args.only in (None, "fanout"):
            sub = folder / "fanout"
            out["fanout"] = await fanout_during_catchup(sub, args.updates, args.docs)
            print(json.dumps({"fanout": out["fanout"]}), flush=True)
        if args.only in (None, "presence"):
            sub = folder / "presence"
            out["presence"] = await presence_flood(sub, args.clients, args.docs, args.rate)
            print(json.dumps({"presence": out["presence"]}), flush=True)


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
