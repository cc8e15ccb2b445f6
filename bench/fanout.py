"""Scenario 2: one writer, 50 readers, 2,000 small updates, through each server.

    python bench/fanout.py [--readers 50] [--updates 2000] [--rate 500] [--timeout-s 60]

The Node driver connects 50 readers and one writer to a fresh room. The writer inserts
"<seq>@<send time>;" at the end of a Y.Text, one transaction (one sync-update message)
per update; readers record the receipt time of each update, so latency = receipt - send
time on the one clock the driver process shares. Three runs per server:

- **burst, light readers**: the writer sends as fast as it can (50 updates per
  event-loop turn); readers decode each update (Y.decodeUpdate) to read its timestamp but
  do not apply it, so the one-core driver is not what limits delivery. updates/s
  delivered = 100,000 deliveries / (last receipt - first send).
- **burst, Yjs readers**: the same with readers that apply every update to a Y.Doc and
  read the timestamp in a text observer (what a browser client does).
- **paced, light readers**: the writer sends at a steady ``--rate`` (500/s = 25,000
  deliveries/s, under every server's capacity) to measure latency without a backlog.
"""

from __future__ import annotations

import sys
import time
from typing import Any

import common
from common import Report, fmt, ratio

TARGET = "crdtsync's relay matches or beats the reference server"

RUNS = (
    ("burst, light readers", {"rate": 0, "reader-mode": "raw"}),
    ("burst, Yjs readers", {"rate": 0, "reader-mode": "apply"}),
    ("paced, light readers", {"reader-mode": "raw"}),  # rate from --rate
)


def run_one(name: str, args: Any) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    with common.running(name) as server:
        time.sleep(1.0)
        for label, opts in RUNS:
            if not server.alive():
                out[label] = {"finished": False, "error": "server died: " + server.stderr(500)}
                continue
            rate = opts.get("rate", args.rate)
            cpu0 = server.cpu_s()
            driver_args = [
                "fanout", "--url", server.url,
                "--readers", str(args.readers), "--updates", str(args.updates),
                "--rate", str(rate), "--reader-mode", str(opts["reader-mode"]),
                "--timeout-s", str(args.timeout_s),
            ]  # fmt: skip
            result = common.run_driver(driver_args, args.timeout_s + 60)
            result["server_cpu_s"] = server.cpu_s() - cpu0
            out[label] = result
        out["_server"] = {"peak_rss_kb": server.hwm_kb()}
    return out


def main(argv: list[str] | None = None) -> int:
    p = common.base_parser(__doc__.splitlines()[0])
    p.add_argument("--readers", type=int, default=50)
    p.add_argument("--updates", type=int, default=2000)
    p.add_argument("--rate", type=float, default=500.0, help="updates/s of the paced run")
    p.add_argument("--timeout-s", type=float, default=60.0, help="per driver run (default 60)")
    args = p.parse_args(argv)
    report = Report(f"Fan-out: 1 writer, {args.readers} readers, {args.updates:,} small updates")
    common.require_node(report)
    servers = common.selected_servers(args.servers, report)
    report.machine(busy=common.cpu_busy_fraction())
    report.add(
        "How: one Node driver process holds the writer and all readers (one clock). The "
        "writer inserts `<seq>@<send time>;` at the end of a Y.Text, one update per "
        "message; latency is receipt minus send time; updates/s delivered is "
        f"{args.readers * args.updates:,} deliveries over first send to last receipt. "
        "Light readers decode each update without applying it (the driver's one core must "
        "not be the limit); Yjs readers apply each update to a Y.Doc. "
        f"Paced: {args.rate:g} updates/s. Server CPU: user+system seconds of the server "
        "process group during that run.",
        "",
    )
    results: dict[str, dict[str, dict[str, Any]]] = {}
    for name in servers:
        if args.quiet_wait_s > 0:
            common.wait_for_quiet(args.quiet_wait_s)
        print(f"... {name}", file=sys.stderr, flush=True)
        try:
            results[name] = run_one(name, args)
        except RuntimeError as exc:
            results[name] = {label: {"finished": False, "error": str(exc)} for label, _ in RUNS}

    rows = []
    for label, _ in RUNS:
        for name, runs in results.items():
            r = runs.get(label, {})
            lat = r.get("latency_ms") or {}
            note = None if r.get("finished") else (r.get("error") or "did not finish")
            if r.get("readers_closed_early"):
                note = (note or "") + f" {r['readers_closed_early']} readers closed early"
            if not r.get("finished") and r.get("delivered") is not None:
                note = (note or "") + f" ({r['delivered']:,} of {r.get('expected', 0):,} delivered)"
            rows.append(
                (
                    label,
                    name,
                    fmt(r.get("delivered_per_s"), 0),
                    fmt(lat.get("p50"), 1),
                    fmt(lat.get("p99"), 1),
                    fmt(lat.get("max"), 1),
                    fmt(r.get("server_cpu_s")),
                    note,
                )
            )
    report.table(
        ["run", "server", "updates/s delivered", "p50 ms", "p99 ms", "max ms", "server CPU s",
         "notes"],
        rows,
    )  # fmt: skip
    c, ref = results.get("crdtsync", {}), results.get("reference", {})
    for label, _ in RUNS:
        cr, rr = c.get(label, {}), ref.get(label, {})
        thr = ratio(cr.get("delivered_per_s"), rr.get("delivered_per_s"))
        clat, rlat = cr.get("latency_ms") or {}, rr.get("latency_ms") or {}
        p50 = ratio(clat.get("p50"), rlat.get("p50"))
        p99 = ratio(clat.get("p99"), rlat.get("p99"))
        cpu = ratio(cr.get("server_cpu_s"), rr.get("server_cpu_s"))
        report.add(
            f"- {label}: crdtsync / reference: throughput **{thr}** (higher is better), "
            f"p50 latency {p50}, p99 latency {p99} (lower is better), server CPU {cpu}."
        )
    cb, rb = c.get(RUNS[0][0], {}), ref.get(RUNS[0][0], {})
    if cb.get("delivered_per_s") and rb.get("delivered_per_s"):
        met = cb["delivered_per_s"] >= rb["delivered_per_s"]
        report.add("", f"Target ({TARGET}, burst throughput): {'met' if met else 'NOT met'}.")
    report.add("")
    report.write(args.markdown_out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
