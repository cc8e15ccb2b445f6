"""Scenario 1: a real editing trace relayed from one client to another through each server.

    python bench/trace_relay.py [--trace FILE.json.gz] [--timeout-s 120] [--profile]

The Node driver (bench/node/driver.mjs) turns every txn of the trace into one Yjs update
with a local Y.Doc (before the clock starts), connects a reader and a writer to a fresh
room, then the writer sends one sync-update message per txn at full speed while the
reader applies what it receives. The figure is the time from the first send until the
reader's text equals the trace's endContent. The same driver runs against crdtsync's
relay, the reference y-websocket server and pycrdt-websocket's server.

Next to it, the floors: pycrdt applying the same trace locally (no network, one
transaction per txn, in this process) and the driver's Yjs doing the reader's work alone.

With ``redis-server`` on the machine, one more row: crdtsync as two relay processes on
one Redis (a redis-server of the bench's own, AOF fsynced always), the writer on relay 1
and the reader on relay 2 (``--no-redis`` leaves it out).

``--profile`` adds one more crdtsync run under py-spy (``pip install py-spy``) and prints
where the relay's time goes; that run's timing is not reported as a figure.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import common
from common import Report, fmt, ratio

TARGET = "crdtsync's relay matches or beats the reference server (ratio <= 1.00)"
REDIS_ROW = "crdtsync, 2 relays on Redis"


def pycrdt_floor(path: Path) -> dict[str, Any]:
    """Replay the trace into a pycrdt Doc, one transaction per txn, with no network."""
    import pycrdt

    with gzip.open(path, "rt", encoding="utf-8") as f:
        data = json.load(f)
    txns, end = data["txns"], data["endContent"]
    ascii_only = end.isascii() and all(p[2].isascii() for t in txns for p in t["patches"])
    doc = pycrdt.Doc()
    text = doc.get("text", type=pycrdt.Text)
    mirror = ""  # only kept for non-ASCII traces: pycrdt 0.14 indexes Text in UTF-8 bytes
    t0 = time.perf_counter()
    for txn in txns:
        with doc.transaction():
            for pos, delete, insert in txn["patches"]:
                if ascii_only:
                    bpos, bdel = pos, delete
                else:
                    bpos = len(mirror[:pos].encode())
                    bdel = len(mirror[pos : pos + delete].encode())
                    mirror = mirror[:pos] + insert + mirror[pos + delete :]
                if bdel:
                    del text[bpos : bpos + bdel]
                if insert:
                    text.insert(bpos, insert)
    seconds = time.perf_counter() - t0
    ok = str(text) == end
    return {"txns": len(txns), "seconds": seconds, "ok": ok}


def run_one(name: str, trace: Path, timeout_s: float, relay_args: list[str]) -> dict[str, Any]:
    with common.running(name, relay_args) as server:
        time.sleep(1.0)  # let it settle (imports, JIT) before the clock
        cpu0, main0 = server.cpu_s(), server.main_cpu_s()
        rss0 = server.rss_kb()
        result = common.run_driver(
            ["trace", "--url", server.url, "--trace", str(trace), "--timeout-s", str(timeout_s)],
            timeout_s + 120,  # + the driver's own setup (generating the updates)
        )
        result["server_cpu_s"] = server.cpu_s() - cpu0
        result["server_main_cpu_s"] = server.main_cpu_s() - main0
        result["server_rss_start_kb"] = rss0
        result["server_peak_rss_kb"] = server.hwm_kb()
        result["server_alive"] = server.alive()
        if name == "crdtsync":
            result["health"] = common.crdtsync_health(server)
            store = server.extra["store"]
            result["store_bytes"] = sum(
                p.stat().st_size for p in store.parent.glob(store.name + "*") if p.is_file()
            )
        if not result.get("finished"):
            result["stderr"] = server.stderr(1500)
    return result


def run_two_relays(trace: Path, timeout_s: float, relay_args: list[str]) -> dict[str, Any]:
    """The trace written to relay 1 and read on relay 2, two crdtsync relays on one Redis."""
    from crdtsync.testing.redis import RedisServer

    with tempfile.TemporaryDirectory(prefix="crdtsync-bench-redis-") as tmp:
        redis = RedisServer(Path(tmp) / "redis").start()
        servers: list[common.Server] = []
        try:
            for i in range(2):
                workdir = Path(tmp) / f"relay-{i}"
                workdir.mkdir()
                cmd = [
                    sys.executable, "-m", "crdtsync", "relay",
                    "--host", "127.0.0.1", "--port", "0", "--store", redis.url,
                    "--log-level", "WARNING", *relay_args,
                ]  # fmt: skip
                servers.append(common.Server(f"crdtsync-{i}", cmd, workdir).start())
            time.sleep(1.0)
            redis_cpu0 = common._cpu_s(redis.proc.pid) if redis.proc else 0.0
            cpu0 = [server.cpu_s() for server in servers]
            result = common.run_driver(
                ["trace", "--url", servers[0].url, "--reader-url", servers[1].url,
                 "--trace", str(trace), "--timeout-s", str(timeout_s)],
                timeout_s + 120,
            )  # fmt: skip
            result["server_cpu_s"] = sum(
                s.cpu_s() - c for s, c in zip(servers, cpu0, strict=True)
            ) + ((common._cpu_s(redis.proc.pid) if redis.proc else 0.0) - redis_cpu0)
            result["server_main_cpu_s"] = result["server_cpu_s"]
            result["server_peak_rss_kb"] = max(s.hwm_kb() or 0 for s in servers)
            result["health"] = common.crdtsync_health(servers[0])
            if not result.get("finished"):
                result["stderr"] = " | ".join(s.stderr(700) for s in servers)
            return result
        finally:
            for server in servers:
                server.stop()
            redis.stop()


def _frame_name(frame: str) -> str:
    """``func (/path/to/file.py:12)`` -> ``func (file.py)``: one row per function."""
    func, sep, where = frame.partition(" (")
    if not sep:
        return frame
    return f"{func} ({where.split(':')[0].rsplit('/', 1)[-1]})"


def profile_crdtsync(trace: Path, timeout_s: float, relay_args: list[str], report: Report) -> None:
    """One crdtsync run under py-spy; print the hottest functions (self and total)."""
    pyspy = shutil.which("py-spy")
    if pyspy is None:
        report.add("Profile skipped: py-spy is not installed (`pip install py-spy`).", "")
        return
    with common.running("crdtsync", relay_args) as server, tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "relay.txt"
        spy = subprocess.Popen(
            [pyspy, "record", "--pid", str(server.pid), "--rate", "250", "--format", "raw",
             "--output", str(out), "--nonblocking"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
        )  # fmt: skip
        try:
            time.sleep(1.0)
            driver_args = ["trace", "--url", server.url, "--trace", str(trace)]
            result = common.run_driver(
                [*driver_args, "--timeout-s", str(timeout_s)], timeout_s + 120
            )
        finally:
            if spy.poll() is None:
                os.killpg(spy.pid, signal.SIGINT)  # py-spy writes its output on SIGINT
            try:
                _, err = spy.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                common.stop_process(spy)
                err = b""
        if not out.exists():
            why = err.decode(errors="replace")[-500:]
            report.add(f"Profile failed: py-spy wrote nothing ({why})")
            return
        self_time: Counter[str] = Counter()
        total_time: Counter[str] = Counter()
        samples = 0
        for line in out.read_text(errors="replace").splitlines():
            stack, _, count = line.rpartition(" ")
            if not stack or not count.isdigit():
                continue
            n = int(count)
            samples += n
            frames = [_frame_name(f) for f in stack.split(";")]
            self_time[frames[-1]] += n
            for f in set(frames):
                total_time[f] += n
    e2e = result.get("end_to_end_ms")
    report.add(
        f"### Where crdtsync's relay spends its time (py-spy, {samples} samples at 250 Hz, "
        f"whole run incl. idle; run took {fmt(e2e / 1000 if e2e else None)} s under the profiler)",
        "",
    )
    report.table(
        ["function (file)", "self %", "total %"],
        [
            (f"`{f}`", f"{100 * n / samples:.1f}", f"{100 * total_time[f] / samples:.1f}")
            for f, n in self_time.most_common(20)
        ],
    )
    # leave out the frames every sample has (event loop, CLI entry): they say nothing
    inner = [(f, n) for f, n in total_time.most_common() if n < 0.9 * samples][:20]
    report.table(
        ["function (file), by total", "total %"],
        [(f"`{f}`", f"{100 * n / samples:.1f}") for f, n in inner],
    )


def main(argv: list[str] | None = None) -> int:
    p = common.base_parser(__doc__.splitlines()[0])
    p.add_argument("--trace", default=str(common.AUTOMERGE_PAPER), help="a .json.gz trace")
    p.add_argument("--timeout-s", type=float, default=120.0, help="per server (default 120)")
    p.add_argument("--profile", action="store_true", help="also profile crdtsync with py-spy")
    p.add_argument("--relay-arg", action="append", default=[], help="extra `crdtsync relay` flag")
    p.add_argument(
        "--no-redis", action="store_true", help="leave out crdtsync's two relays on one Redis"
    )
    args = p.parse_args(argv)
    trace = Path(args.trace)
    report = Report(f"Trace relay: {trace.name}, writer to reader through each server")
    common.require_node(report)
    if not trace.exists():
        report.add(f"Cannot run: trace {trace} not found")
        return 2
    servers = common.selected_servers(args.servers, report)
    busy = common.cpu_busy_fraction()
    report.machine(busy=busy)
    report.add(
        "How: the Node driver makes one Yjs update per trace txn with a local Y.Doc (untimed), "
        "then one writer sends them as sync-update messages at full speed (1,000 per "
        "event-loop turn) to a fresh room while one reader in the same Node process applies "
        "what it receives; the clock stops when the reader's text equals endContent. Servers "
        "are memory-only except crdtsync, which commits every update to SQLite (WAL, "
        f"synchronous=NORMAL) before fanning it out. Timeout {args.timeout_s:.0f} s per server. "
        "Server CPU is user+system seconds of the server's process group during the run.",
        "",
    )

    floor = pycrdt_floor(trace)
    report.add(
        f"Floor, pycrdt local replay (no network, {floor['txns']:,} transactions): "
        f"{floor['seconds']:.2f} s, final text {'correct' if floor['ok'] else 'WRONG'}.",
    )

    results: dict[str, dict[str, Any]] = {}
    for name in servers:
        if args.quiet_wait_s > 0:
            common.wait_for_quiet(args.quiet_wait_s)
        print(f"... {name}", file=sys.stderr, flush=True)
        try:
            results[name] = run_one(name, trace, args.timeout_s, args.relay_arg)
        except RuntimeError as exc:
            results[name] = {"finished": False, "error": str(exc)}
    from crdtsync.testing.redis import redis_server_binary

    if "crdtsync" in servers and not args.no_redis and redis_server_binary() is not None:
        if args.quiet_wait_s > 0:
            common.wait_for_quiet(args.quiet_wait_s)
        print("... crdtsync, 2 relays on Redis", file=sys.stderr, flush=True)
        try:
            results[REDIS_ROW] = run_two_relays(trace, args.timeout_s, args.relay_arg)
        except RuntimeError as exc:
            results[REDIS_ROW] = {"finished": False, "error": str(exc)}
    any_result = next((r for r in results.values() if "generate_ms" in r), None)
    if any_result:
        report.add(
            f"Floor, the driver's Yjs applying the {any_result['updates_sent']:,} updates "
            f"({any_result['update_bytes'] / 1e6:.1f} MB) with no network: "
            f"{any_result['local_apply_ms'] / 1000:.2f} s (making them took "
            f"{any_result['generate_ms'] / 1000:.2f} s, untimed).",
        )
    report.add("")

    rows = []
    for name, r in results.items():
        e2e = r.get("end_to_end_ms")
        note = "" if r.get("finished") else (r.get("error") or "did not finish")
        if not r.get("finished") and "reader_updates" in r:
            note += f" (reader had {r['reader_updates']:,} of {r.get('txns', 0):,} updates)"
        workers = (r.get("server_cpu_s") or 0) - (r.get("server_main_cpu_s") or 0)
        if workers > 0.05:
            main_s = r["server_main_cpu_s"]
            note += f" CPU {main_s:.2f} s in the server process, {workers:.2f} s in its workers;"
        if name == REDIS_ROW:
            note += " CPU: both relays and redis-server;"
        if name == "crdtsync" and r.get("health"):
            h = r["health"]
            if h.get("commits"):
                note += f" {h['updates_stored']:,} updates stored in {h['commits']:,} commits"
        rows.append(
            (
                name,
                "yes" if r.get("finished") else "no",
                fmt(e2e / 1000 if e2e else None),
                fmt(r["txns"] / (e2e / 1000) if e2e else None, 0),
                fmt(r.get("send_ms", 0) / 1000 if r.get("send_ms") else None),
                fmt(r.get("server_cpu_s")),
                fmt(r["server_peak_rss_kb"] / 1024, 0) if r.get("server_peak_rss_kb") else None,
                note.strip() or None,
            )
        )
    report.table(
        ["server", "finished", "end-to-end s", "updates/s", "writer send s", "server CPU s",
         "server peak RSS MB", "notes"],
        rows,
    )  # fmt: skip
    c, ref = results.get("crdtsync", {}), results.get("reference", {})
    r = ratio(c.get("end_to_end_ms"), ref.get("end_to_end_ms"))
    if r is not None:
        verdict = "met" if float(r) <= 1.0 else "NOT met"
        report.add(
            f"Ratio crdtsync / reference (end-to-end time, lower is better): **{r}**. "
            f"Target: {TARGET}: {verdict}."
        )
        rc = ratio(c.get("server_cpu_s"), ref.get("server_cpu_s"))
        report.add(f"Ratio crdtsync / reference, server CPU seconds: {rc}.")
    else:
        report.add("Ratio crdtsync / reference: not available (a run did not finish).")
    two = results.get(REDIS_ROW, {})
    r2 = ratio(two.get("end_to_end_ms"), ref.get("end_to_end_ms"))
    if r2 is not None:
        verdict = "met" if float(r2) <= 1.0 else "NOT met"
        report.add(
            f"Ratio crdtsync on two relays + Redis (relay 1 to relay 2) / reference on one "
            f"process: **{r2}**. Target: no slower than the reference server: {verdict}."
        )
    if c.get("store_bytes"):
        report.add(f"crdtsync store after the run: {c['store_bytes'] / 1e6:.1f} MB (db + WAL).")
    report.add("")

    if args.profile and "crdtsync" in servers:
        profile_crdtsync(trace, args.timeout_s, args.relay_arg, report)
    report.write(args.markdown_out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
