"""Scenario 3: server memory while serving 1,000 documents one after another.

    python bench/memory.py [--docs 1000] [--rounds 2] [--settle-s 5]

For each server: RSS (VmRSS from /proc/PID/status) once it is idle after start; then the
Node driver serves ``--docs`` documents one after another (each: connect, sync, write one
small update, wait for the server's echo of it, disconnect); RSS right after the last
one; then RSS after ``--settle-s`` seconds with every document closed (time for GC and,
for crdtsync, for the compactions that follow a room's last disconnect). A second round
of as many new documents tells retained memory (it keeps growing) from an allocator's
high-water mark (it stays flat).

For crdtsync the RSS of the relay process is the figure; its compaction worker process
(a ProcessPoolExecutor child in the same process group) is reported separately.
"""

from __future__ import annotations

import sys
import time
from typing import Any

import common
from common import Report, fmt

TARGET_MB = 20.0


def mb(kb: int | None) -> float | None:
    return None if kb is None else kb / 1024


def run_one(name: str, args: Any) -> dict[str, Any]:
    samples: list[tuple[str, int, int | None, int]] = []  # label, docs served, rss, group
    driver_runs: list[dict[str, Any]] = []
    health = None
    with common.running(name) as server:
        time.sleep(args.settle_s)
        samples.append(("start", 0, server.rss_kb(), server.group_rss_kb()))
        for rnd in range(args.rounds):
            result = common.run_driver(
                ["docs", "--url", server.url, "--docs", str(args.docs),
                 "--prefix", f"mem-round-{rnd}", "--timeout-s", str(args.timeout_s)],
                args.timeout_s + 30,
            )  # fmt: skip
            driver_runs.append(result)
            served = args.docs * (rnd + 1)
            samples.append(
                (f"after {served:,} docs", served, server.rss_kb(), server.group_rss_kb())
            )
            time.sleep(args.settle_s)
            samples.append(
                (f"{served:,} docs, all closed, +{args.settle_s:g} s", served, server.rss_kb(),
                 server.group_rss_kb())
            )  # fmt: skip
            if not result.get("finished") or not server.alive():
                break
        if name == "crdtsync":
            health = common.crdtsync_health(server)
        peak = server.hwm_kb()
    return {"samples": samples, "runs": driver_runs, "peak_kb": peak, "health": health}


def main(argv: list[str] | None = None) -> int:
    p = common.base_parser(__doc__.splitlines()[0])
    p.add_argument("--docs", type=int, default=1000, help="documents per round (default 1000)")
    p.add_argument("--rounds", type=int, default=2, help="rounds of new documents (default 2)")
    p.add_argument("--settle-s", type=float, default=5.0, help="idle wait before sampling")
    p.add_argument("--timeout-s", type=float, default=300.0, help="per round (default 300)")
    args = p.parse_args(argv)
    report = Report(f"Memory: {args.docs:,} documents served one after another, per round")
    common.require_node(report)
    servers = common.selected_servers(args.servers, report)
    report.machine(busy=common.cpu_busy_fraction())
    report.add(
        "How: RSS is VmRSS of the server process from /proc/PID/status. Each document: the "
        "Node driver connects to a new room, syncs, writes one small update, waits for the "
        "server's echo of it, disconnects, then goes on to the next. Samples: idle after "
        f"start (+{args.settle_s:g} s), right after the last document of a round, and "
        f"{args.settle_s:g} s later. crdtsync's relay keeps its store in a SQLite file in a "
        "temporary directory; the others keep documents in memory.",
        "",
    )
    results: dict[str, dict[str, Any]] = {}
    for name in servers:
        if args.quiet_wait_s > 0:
            common.wait_for_quiet(args.quiet_wait_s)
        print(f"... {name}", file=sys.stderr, flush=True)
        try:
            results[name] = run_one(name, args)
        except RuntimeError as exc:
            results[name] = {"error": str(exc), "samples": [], "runs": []}

    for name, r in results.items():
        if r.get("error"):
            report.add(f"### {name}: failed: {r['error']}", "")
            continue
        samples = r["samples"]
        start = samples[0][2] if samples else None
        rows = []
        for label, served, rss, group in samples:
            delta = None if rss is None or start is None else rss - start
            other = group - (rss or 0)
            rows.append(
                (
                    label,
                    fmt(mb(rss), 1),
                    fmt(mb(delta), 1) if delta is not None else None,
                    fmt(delta / served if delta is not None and served else None, 1),
                    fmt(mb(other), 1) if other > 0 else None,
                )
            )
        report.add(f"### {name}", "")
        report.table(
            ["when", "RSS MB", "Δ from start MB", "Δ KB per document served",
             "other processes of its group MB"],
            rows,
        )  # fmt: skip
        notes = []
        for i, run in enumerate(r["runs"]):
            if not run.get("finished"):
                notes.append(f"round {i + 1} did not finish: {run.get('error')}")
            elif run.get("no_echo"):
                notes.append(f"round {i + 1}: {run['no_echo']} documents got no echo")
            if run.get("ms"):
                notes.append(
                    f"round {i + 1}: {run.get('docs', 0):,} documents in {run['ms'] / 1000:.1f} s "
                    f"({run['ms'] / max(1, run.get('docs', 1)):.1f} ms each)"
                )
        if r.get("health"):
            h = r["health"]
            notes.append(
                f"relay counters at the end: {h.get('rooms')} rooms in memory, "
                f"{h.get('connections')} connections, {h.get('updates_stored'):,} updates stored"
            )
        notes.append(f"peak RSS (VmHWM) {fmt(mb(r['peak_kb']), 1)} MB")
        report.add(*(f"- {n}" for n in notes), "")

    c = results.get("crdtsync")
    if c and c.get("samples") and len(c["samples"]) >= 3:
        start = c["samples"][0][2]
        closed = c["samples"][2][2]
        if start is not None and closed is not None:
            grew = (closed - start) / 1024
            verdict = "met" if grew <= TARGET_MB else "NOT met"
            report.add(
                f"Target (crdtsync relay RSS after {args.docs:,} documents, all closed, within "
                f"{TARGET_MB:g} MB of its RSS at start): grew {grew:.1f} MB: {verdict}."
            )
            ref = results.get("reference")
            if ref and len(ref.get("samples", [])) >= 3 and ref["samples"][0][2] is not None:
                rgrew = (ref["samples"][2][2] - ref["samples"][0][2]) / 1024
                report.add(f"Reference server, same measure: grew {rgrew:.1f} MB.")
    report.add("")
    report.write(args.markdown_out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
