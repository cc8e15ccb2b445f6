"""Scenario 4: the crdtsync Replica alone (no relay): durable local edits, and opening history.

    python bench/replica.py [--inserts 20000] [--history 100000] [--repeats 5]

1. Durable local transactions/s: ``--inserts`` single-character ``Text`` inserts, each its
   own transaction, each committed to the replica's SQLite file from ``doc.observe``
   before the insert returns (synchronous=NORMAL; FULL on a tenth as many). Reported with
   the latency of one insert call (p50/p99/max: the max includes the compaction that a
   replica runs inline every ``compact_after_updates`` transactions).
2. Opening a document with a ``--history``-update history: the history is built with a
   Replica (one single-character insert per transaction), the Replica is closed, then
   ``await replica.open(name)`` alone is timed, in a fresh Python process per repeat and
   in a fresh Replica in this process. Twice: with the Replica's default compaction
   (snapshot + short tail) and with compaction off (the raw 100,000-row log), which is
   what a replica that never compacted would have to load.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import common
from common import Report, fmt

TARGET_MS = 100.0
NO_COMPACTION = 10**12
YIELD_EVERY = 100  # inserts between event-loop turns
DEFAULT_COMPACT_AFTER = 2000  # Replica's compact_after_updates default


def _files_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.parent.glob(path.name + "*") if p.is_file())


async def durable_inserts(
    path: Path, n: int, synchronous: str, compact_after: int | None = None
) -> dict[str, Any]:
    import pycrdt

    from crdtsync.client import Replica

    kwargs: dict[str, Any] = {"synchronous": synchronous}
    if compact_after is not None:
        kwargs["compact_after_updates"] = compact_after
    lat = []
    turns = []
    async with Replica(path, **kwargs) as replica:
        doc = await replica.open("bench/inserts")
        text = doc.get("text", type=pycrdt.Text)
        start = len(text)
        t0 = time.perf_counter()
        for i in range(n):
            t = time.perf_counter()
            text.insert(start + i, "abcdefghijklmnopqrstuvwxyz"[i % 26])
            lat.append(time.perf_counter() - t)
            if i % YIELD_EVERY == YIELD_EVERY - 1:
                # an app's edits come from events: give the loop a turn now and then (the
                # replica compacts in a loop callback, never inside the edit call)
                t = time.perf_counter()
                await asyncio.sleep(0)
                turns.append(time.perf_counter() - t)
        seconds = time.perf_counter() - t0
        pending = replica.pending("bench/inserts")
    lat.sort()
    return {
        "turn_max_ms": max(turns, default=0.0) * 1000,
        "turns_s": sum(turns),
        "n": n,
        "seconds": seconds,
        "per_s": n / seconds,
        "p50_ms": lat[len(lat) // 2] * 1000,
        "p99_ms": lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1000,
        "max_ms": lat[-1] * 1000,
        "pending": pending,
    }


async def open_once(path: Path, name: str) -> tuple[float, int]:
    import pycrdt

    from crdtsync.client import Replica

    async with Replica(path) as replica:
        t0 = time.perf_counter()
        doc = await replica.open(name)
        seconds = time.perf_counter() - t0
        length = len(doc.get("text", type=pycrdt.Text))
    return seconds, length


def open_in_fresh_process(path: Path, name: str) -> tuple[float, int]:
    """Time ``await replica.open(name)`` in a new interpreter (imports done before the clock)."""
    out = subprocess.run(
        [sys.executable, __file__, "--open-only", str(path), name],
        capture_output=True, text=True, timeout=120, cwd=path.parent,
    )  # fmt: skip
    if out.returncode != 0:
        raise RuntimeError(f"open in a fresh process failed: {out.stderr[-1500:]}")
    data = json.loads(out.stdout.strip().splitlines()[-1])
    return float(data["seconds"]), int(data["length"])


def update_rows(path: Path, name: str) -> tuple[int, bool]:
    """(updates in the log tail, has a snapshot) of one document, read with sqlite3."""
    import sqlite3

    conn = sqlite3.connect(path)
    try:
        tail = conn.execute("SELECT count(*) FROM updates WHERE doc = ?", (name,)).fetchone()[0]
        snap = conn.execute(
            "SELECT snapshot IS NOT NULL FROM documents WHERE name = ?", (name,)
        ).fetchone()
    finally:
        conn.close()
    return int(tail), bool(snap and snap[0])


async def history_case(
    tmp: Path, label: str, history: int, repeats: int, compact_after: int | None
) -> dict[str, Any]:
    path = tmp / ("history-" + "".join(ch if ch.isalnum() else "-" for ch in label) + ".db")
    built = await durable_inserts(path, history, "NORMAL", compact_after)
    name = "bench/inserts"
    tail, snapshot = update_rows(path, name)
    size = _files_bytes(path)
    fresh = []
    for _ in range(repeats):
        seconds, length = open_in_fresh_process(path, name)
        fresh.append(seconds)
    same = []
    for _ in range(repeats):
        seconds, length = await open_once(path, name)
        same.append(seconds)
    return {
        "label": label,
        "build": built,
        "tail": tail,
        "snapshot": snapshot,
        "bytes": size,
        "length": length,
        "fresh_ms": [s * 1000 for s in fresh],
        "same_ms": [s * 1000 for s in same],
    }


async def run(args: Any, report: Report) -> None:
    with tempfile.TemporaryDirectory(prefix="crdtsync-bench-replica-") as tmp_s:
        tmp = Path(tmp_s)
        normal = await durable_inserts(tmp / "normal.db", args.inserts, "NORMAL")
        full = await durable_inserts(tmp / "full.db", max(1, args.inserts // 10), "FULL")
        report.add("### Durable local transactions (no relay)", "")
        report.table(
            ["synchronous", "transactions", "seconds", "transactions/s", "insert p50 ms",
             "insert p99 ms", "insert max ms", "longest loop turn ms", "pending after"],
            [
                (s, f"{r['n']:,}", fmt(r["seconds"]), fmt(r["per_s"], 0), fmt(r["p50_ms"], 3),
                 fmt(r["p99_ms"], 3), fmt(r["max_ms"], 1), fmt(r["turn_max_ms"], 1),
                 f"{r['pending']:,}")
                for s, r in (("NORMAL", normal), ("FULL", full))
            ],
        )  # fmt: skip
        report.add(
            "(Each insert is one transaction: pycrdt edit, `doc.observe`, SQLite INSERT of "
            f"the update and of its pending mark, COMMIT. The loop yields every {YIELD_EVERY} "
            "inserts (`await asyncio.sleep(0)`), included in the time; the longest such turn "
            "is where the replica's compaction (every `compact_after_updates`, default 2,000) "
            "runs. `pending` counts transactions no relay has acknowledged; there is no relay "
            "here, so all of them.)",
            "",
        )

        cases = []
        # The default compaction runs every 2,000 local transactions, so a document can also
        # open with a snapshot plus up to 1,999 tail updates: the third case is that worst case.
        variants = (
            ("default compaction", None, args.history),
            ("default compaction, longest tail", None, args.history + DEFAULT_COMPACT_AFTER - 1),
            ("compaction off", NO_COMPACTION, args.history),
        )
        for label, compact_after, n in variants:
            print(f"... history, {label}", file=sys.stderr, flush=True)
            cases.append(await history_case(tmp, label, n, args.repeats, compact_after))
        report.add(f"### Opening a document with a {args.history:,}-update history", "")
        rows = []
        for c in cases:
            rows.append(
                (
                    c["label"],
                    f"{c['tail']:,} updates" + (" + snapshot" if c["snapshot"] else ""),
                    fmt(c["bytes"] / 1e6, 2),
                    f"{fmt(common.median(c['fresh_ms']), 1)} (min {fmt(min(c['fresh_ms']), 1)})",
                    f"{fmt(common.median(c['same_ms']), 1)} (min {fmt(min(c['same_ms']), 1)})",
                    fmt(c["build"]["seconds"], 1),
                    f"{c['length']:,}",
                )
            )
        report.table(
            ["replica", "stored as", "file MB", "open ms, fresh process: median",
             "open ms, fresh Replica: median", "build s", "text length"],
            rows,
        )  # fmt: skip
        meds = [common.median(c["fresh_ms"]) for c in cases]
        verdicts = ["met" if m < TARGET_MS else "NOT met" for m in meds]
        report.add(
            f"Target (a {args.history:,}-update document opens in under {TARGET_MS:g} ms, "
            f"fresh process): default compaction {meds[0]:.1f} ms: {verdicts[0]}; with the "
            f"longest tail {meds[1]:.1f} ms: {verdicts[1]}; compaction off {meds[2]:.1f} ms: "
            f"{verdicts[2]}.",
            "",
        )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--open-only"]:
        # child of open_in_fresh_process: import first, then time open() alone
        import pycrdt  # noqa: F401

        import crdtsync.client  # noqa: F401

        seconds, length = asyncio.run(open_once(Path(argv[1]), argv[2]))
        print(json.dumps({"seconds": seconds, "length": length}))
        return 0
    p = common.base_parser(__doc__.splitlines()[0])
    p.add_argument("--inserts", type=int, default=20_000)
    p.add_argument("--history", type=int, default=100_000)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--timeout-s", type=float, default=600.0)
    args = p.parse_args(argv)
    report = Report("Replica: durable local transactions and opening a long history")
    if args.quiet_wait_s > 0:
        common.wait_for_quiet(args.quiet_wait_s)
    report.machine(busy=common.cpu_busy_fraction())
    report.add(
        "How: `crdtsync.client.Replica` with no relay, files in a temporary directory "
        f"(filesystem of {tempfile.gettempdir()}), pycrdt Text, one single-character insert per "
        "transaction. Open times cover `await replica.open(name)` only (imports and "
        f"`Replica.start` excluded), {args.repeats} repeats each.",
        "",
    )

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
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    sys.exit(main())
