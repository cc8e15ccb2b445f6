"""Scenario: many documents per replica (issue 11): coming back in sync, and relay memory.

    python bench/folders.py [--docs 10000] [--changed-percent 1] [--open-docs 2000]

1. A replica keeps the folder ``notes/`` holding ``--docs`` small documents (each a short
   Text), synced with a relay (SQLite). It goes offline; another replica changes
   ``--changed-percent`` of them (half inserts, half delete-only). Timed: the first
   replica starts again (same file) until ``wait_synced_in("notes/")`` returns: one
   connection, the folder's cursor, only the changed documents exchanged. Counted: bytes
   and messages both ways, channels opened.
2. The same return, today's way: a copy of the first replica's file taken before step 1's
   return, and a replica with ``multiplex=False`` (one connection per document, as the
   stock y-websocket provider) that opens every document and waits until each is synced
   (acknowledged and answered), ``--wave`` documents at a time (the relay's limits raised so
   that it takes them). Same figures.
3. Relay memory: the relay's RSS with ``--open-docs`` documents open on one multiplexed
   connection (a channel each, idle), minus its RSS with that connection open and no
   document; and with the replica keeping the whole folder idle (no document open).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import common
from common import Report, fmt

PREFIX = "notes/"


def _names(n: int) -> list[str]:
    return [f"{PREFIX}{i:06d}" for i in range(n)]


async def _populate(url: str, path: Path, names: list[str]) -> None:
    from pycrdt import Text

    from crdtsync.client import Replica

    async with Replica(path, relay=url) as replica:
        await replica.keep(PREFIX)
        for start in range(0, len(names), 500):
            batch = names[start : start + 500]
            for name in batch:
                (await replica.open(name)).get("text", type=Text).insert(0, f"note {name}")
            for name in batch:
                await replica.wait_synced(name, timeout=120)
                await replica.close(name)
        await replica.wait_synced_in(PREFIX, timeout=600)


async def _change(url: str, path: Path, names: list[str]) -> None:
    from pycrdt import Text

    from crdtsync.client import Replica

    async with Replica(path, relay=url) as replica:
        await replica.keep(PREFIX)
        await replica.wait_synced_in(PREFIX, timeout=600)
        for i, name in enumerate(names):
            text = (await replica.open(name)).get("text", type=Text)
            if i % 2:
                del text[0:2]  # a delete-only change: the state vector does not move
            else:
                text.insert(0, "changed ")
        for name in names:
            await replica.wait_synced(name, timeout=120)


async def _return_multiplexed(url: str, path: Path) -> dict[str, Any]:
    from crdtsync.client import Replica

    t0 = time.perf_counter()
    async with Replica(path, relay=url) as replica:
        await replica.wait_synced_in(PREFIX, timeout=600)
        seconds = time.perf_counter() - t0
        stats = dict(replica.stats)
    return {"seconds": seconds, **stats}


async def _return_per_document(url: str, path: Path, names: list[str], wave: int) -> dict[str, Any]:
    from crdtsync.client import Replica

    t0 = time.perf_counter()
    async with Replica(path, relay=url, multiplex=False) as replica:
        for start in range(0, len(names), wave):
            batch = names[start : start + wave]
            for name in batch:
                await replica.open(name)
            deadline = time.monotonic() + 600
            while not all(replica.status(n).synced for n in batch):
                if time.monotonic() > deadline:
                    raise TimeoutError("per-document sync did not finish")
                await asyncio.sleep(0.01)
            for name in batch:
                await replica.wait_synced(name, timeout=120)
                await replica.close(name)
        seconds = time.perf_counter() - t0
        stats = dict(replica.stats)
    return {"seconds": seconds, **stats}


async def _memory(server: Any, path: Path, names: list[str]) -> dict[str, Any]:
    from crdtsync.client import Replica

    await asyncio.sleep(2)
    idle_kb = server.rss_kb()
    async with Replica(path, relay=server.url) as replica:
        await replica.wait_synced_in(PREFIX, timeout=600)
        await asyncio.sleep(2)
        kept_kb = server.rss_kb()
        for name in names:
            await replica.open(name)
        deadline = time.monotonic() + 600
        while not all(replica.status(n).synced for n in names):
            if time.monotonic() > deadline:
                raise TimeoutError("documents did not open")
            await asyncio.sleep(0.05)
        await asyncio.sleep(2)
        open_kb = server.rss_kb()
    return {"idle_kb": idle_kb, "kept_kb": kept_kb, "open_kb": open_kb}


async def run(args: Any, report: Report) -> None:
    names = _names(args.docs)
    changed = names[:: max(1, round(100 / args.changed_percent))]
    raised = ["--max-connections", "30000"]
    # (one connection per document needs the relay's per-address limit raised too)
    os.environ["CRDTSYNC_MAX_CONNECTIONS_PER_ADDRESS"] = "30000"
    with tempfile.TemporaryDirectory(prefix="crdtsync-bench-folders-") as tmp:
        work = Path(tmp)
        a, b = work / "a.db", work / "b.db"
        with common.running("crdtsync", raised) as server:
            t0 = time.perf_counter()
            await _populate(server.url, a, names)
            populate_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            await _change(server.url, b, changed)  # b keeps the folder first: a full fetch
            fetch_s = time.perf_counter() - t0
            for suffix in ("", "-wal", "-shm"):
                if (work / f"a.db{suffix}").exists():
                    shutil.copy(work / f"a.db{suffix}", work / f"copy.db{suffix}")
            mux = await _return_multiplexed(server.url, a)
            per_doc = await _return_per_document(server.url, work / "copy.db", names, args.wave)
            # Memory in a fresh relay process on the same store: the first one's heap
            # still holds what the thousands of connections above left freed.
            server.stop()
            fresh = common.make_server("crdtsync", server.workdir, raised).start()
            try:
                memory = await _memory(fresh, a, names[: args.open_docs])
            finally:
                fresh.stop()
        report.add(
            f"{args.docs} documents under `{PREFIX}`; {len(changed)} changed while the replica "
            f"was away (half delete-only). Setup, untimed in the comparison: the first replica "
            f"wrote them in {populate_s:.1f} s; a second replica keeping the folder fetched all "
            f"of them and made the changes in {fetch_s:.1f} s.",
            "",
        )

        def row(name: str, r: dict[str, Any]) -> list[Any]:
            return [
                name,
                fmt(r["seconds"], 2, " s"),
                r.get("connections", 0),
                r.get("channels_opened", 0) or "—",
                r.get("messages_in", 0) + r.get("messages_out", 0),
                fmt((r.get("bytes_in", 0) + r.get("bytes_out", 0)) / 1024, 1, " KiB"),
            ]

        report.table(
            ["return after offline", "time", "connections", "channels", "messages", "bytes"],
            [
                row("one connection, folder cursor", mux),
                row("one connection per document", per_doc),
            ],
        )
        report.add(f"Speed-up: {per_doc['seconds'] / mux['seconds']:.0f}x (target: 20x).", "")
        idle, kept_kb, open_kb = memory["idle_kb"], memory["kept_kb"], memory["open_kb"]
        per_open = kept = None
        if open_kb is not None and kept_kb is not None:
            per_open = (open_kb - kept_kb) * 1024 / args.open_docs
        if kept_kb is not None and idle is not None:
            kept = (kept_kb - idle) * 1024 / args.docs
        report.table(
            ["relay memory (RSS of a fresh relay process)", "KiB", "bytes per document"],
            [
                ["no connection", idle, "—"],
                [
                    f"one replica keeping the folder of {args.docs}, none open",
                    kept_kb,
                    fmt(kept, 0),
                ],
                [
                    f"... and {args.open_docs} of them open (channels), idle",
                    open_kb,
                    fmt(per_open, 0),
                ],
            ],
        )
        report.add(
            "A kept folder costs the relay one subscription per connection, not one per "
            "document: an idle kept document holds nothing there. An open document is a "
            "channel (its session, budget and room membership). Target: under 1 KB.",
            "",
        )


def main(argv: list[str] | None = None) -> int:
    p = common.base_parser(__doc__.splitlines()[0])
    p.add_argument("--docs", type=int, default=10_000)
    p.add_argument("--changed-percent", type=float, default=1.0)
    p.add_argument("--open-docs", type=int, default=2_000)
    p.add_argument("--wave", type=int, default=500)
    p.add_argument("--timeout-s", type=float, default=1800.0)
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    report = Report("Many documents per replica: returning after offline, and relay memory")
    if args.quiet_wait_s > 0:
        common.wait_for_quiet(args.quiet_wait_s)
    report.machine(busy=common.cpu_busy_fraction())

    async def bounded() -> None:
        async with asyncio.timeout(args.timeout_s):
            await run(args, report)

    try:
        asyncio.run(bounded())
    except TimeoutError:
        report.add(f"Did not finish within {args.timeout_s:.0f} s.")
        report.write(args.markdown_out)
        return 1
    report.write(args.markdown_out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
