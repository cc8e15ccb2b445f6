"""Cross-process fan-out: one writer, 50 readers spread over 3 server processes on one Redis.

    python bench/fanout_cluster.py [--readers 50] [--updates 2000] [--rate 500] [--instances 3]
                                   [--setups crdtsync-redis,crdtsync-sqlite,hocuspocus-redis]
                                   [--timeout-s 60]

The same Node driver as ``fanout.py`` (``bench/node/driver.mjs fanout``) with ``--url`` a
list: the writer connects to instance 1, reader i to instance (i mod 3) + 1 (50 readers:
17 on instance 1, 17 on 2, 16 on 3), so two thirds of the deliveries cross processes
through the shared store. Setups:

- ``crdtsync-redis``: 3 ``crdtsync relay`` processes with ``--store redis://...`` on one
  ``redis-server`` of the benchmark's own (crdtsync.testing.redis.RedisServer: loopback,
  ``appendonly yes``, ``appendfsync always``); every update is appended to the document's
  stream (fsynced) before any relay fans it out.
- ``crdtsync-sqlite``: one relay on a SQLite file, as ``fanout.py`` runs it (all 51
  clients on it: the single-process baseline).
- ``hocuspocus-redis``: 3 ``@hocuspocus/server`` 3.4.4 instances with
  ``@hocuspocus/extension-redis`` 3.4.4 (pub/sub) on one ``redis-server`` of its own
  (started the same way); the driver speaks Hocuspocus's framing (``--framing
  hocuspocus``: the document name before every message, an Auth message first). Memory
  only: Hocuspocus has no store here, Redis carries its sync messages between instances.
- ``hocuspocus`` (not run by default): one Hocuspocus instance, no Redis.
- ``crdtsync-redis-everysec`` (not run by default): as ``crdtsync-redis`` with Redis's
  ``appendfsync everysec`` (an append acknowledged before it is on disk): what the fsync
  of every append costs.

``--profile``: afterwards, one more ``crdtsync-redis`` setup whose relay 1 (the writer's)
and relay 2 (readers only) are recorded with py-spy (``pip install py-spy``) during each
run; the report gets their hottest functions.

Two runs per setup, as in ``fanout.py``: **burst, light readers** (the writer sends as fast
as it can, 50 updates per event-loop turn; readers decode each update without applying
it) and **paced, light readers** (``--rate`` updates/s). Every server process and each
redis-server runs in its own session and is stopped (SIGTERM, then SIGKILL to its process
group) even on error; every wait is bounded.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import common
from common import Report, Server, fmt, ratio

from crdtsync.testing.processes import stop_process
from crdtsync.testing.redis import RedisServer

TARGET = "cross-process fan-out at least 2x Hocuspocus+Redis's deliveries/s with a lower p99"
HOCUSPOCUS_SERVER = common.NODE_DIR / "hocuspocus_server.mjs"

SETUPS = {
    "crdtsync-redis": "crdtsync, {n} relays on Redis",
    "crdtsync-redis-everysec": "crdtsync, {n} relays on Redis (appendfsync everysec)",
    "crdtsync-sqlite": "crdtsync, 1 relay on SQLite",
    "hocuspocus-redis": "Hocuspocus + Redis, {n} instances",
    "hocuspocus": "Hocuspocus, 1 instance",
}
DEFAULT_SETUPS = ("crdtsync-redis", "crdtsync-sqlite", "hocuspocus-redis")

RUNS = (
    ("burst, light readers", {"rate": 0, "reader-mode": "raw"}),
    ("paced, light readers", {"reader-mode": "raw"}),  # rate from --rate
)


@dataclass
class Cluster:
    """The server processes of one setup (and the redis-server they share, if any)."""

    name: str
    servers: list[Server]
    redis: RedisServer | None
    framing: str

    @property
    def urls(self) -> str:
        return ",".join(s.url for s in self.servers)

    def dead(self) -> str | None:
        for s in self.servers:
            if not s.alive():
                return f"{s.name} died: {s.stderr(500)}"
        if self.redis is not None and (
            self.redis.proc is None or self.redis.proc.poll() is not None
        ):
            return "redis-server died: " + self.redis.log_tail(500)
        return None

    def cpu_s(self) -> tuple[float, float | None]:
        """CPU seconds so far: the server process groups, and the redis-server."""
        servers = sum(s.cpu_s() for s in self.servers)
        redis = None
        if self.redis is not None and self.redis.proc is not None:
            redis = common._cpu_s(self.redis.proc.pid)
        return servers, redis

    def peak_rss_kb(self) -> int:
        return sum(s.hwm_kb() or 0 for s in self.servers)


def _crdtsync(name: str, workdir: Path, store: str) -> Server:
    workdir.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable, "-m", "crdtsync", "relay",
        "--host", "127.0.0.1", "--port", "0", "--store", store, "--log-level", "WARNING",
    ]  # fmt: skip
    return Server(name, cmd, workdir)


def _hocuspocus(name: str, workdir: Path, redis: RedisServer | None) -> Server:
    workdir.mkdir(parents=True, exist_ok=True)
    node = shutil.which("node") or "node"
    cmd = [node, str(HOCUSPOCUS_SERVER), "--host", "127.0.0.1", "--port", "0"]
    if redis is not None:
        cmd += ["--redis-host", "127.0.0.1", "--redis-port", str(redis.port)]
    return Server(name, cmd, workdir)


@contextlib.contextmanager
def running_setup(setup: str, instances: int) -> Iterator[Cluster]:
    """Start one setup in a fresh temporary directory; always stop every process of it."""
    with (
        tempfile.TemporaryDirectory(prefix=f"crdtsync-bench-cluster-{setup}-") as tmp,
        contextlib.ExitStack() as stack,
    ):
        root = Path(tmp)
        redis = None
        if "-redis" in setup:
            # (redis-server: a later option overrides RedisServer's appendfsync always)
            extra = ["--appendfsync", "everysec"] if setup.endswith("-everysec") else []
            redis = RedisServer(root / "redis", extra=extra)
            stack.callback(redis.stop)  # (registered first: stopped last)
            redis.start()
        n = instances if redis is not None else 1
        servers: list[Server] = []
        for i in range(1, n + 1):
            work = root / f"server-{i}"
            if setup.startswith("crdtsync-redis"):
                assert redis is not None
                server = _crdtsync(f"relay-{i}", work, redis.url)
            elif setup == "crdtsync-sqlite":
                server = _crdtsync(f"relay-{i}", work, str(work / "relay.db"))
            else:
                server = _hocuspocus(f"hocuspocus-{i}", work, redis)
            stack.callback(server.stop)  # (before start: a half-started one is stopped too)
            server.start()
            servers.append(server)
        framing = "hocuspocus" if setup.startswith("hocuspocus") else "y-websocket"
        yield Cluster(setup, servers, redis, framing)


def run_setup(setup: str, args: Any) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    with running_setup(setup, args.instances) as cluster:
        time.sleep(1.0)
        for label, opts in RUNS:
            why = cluster.dead()
            if why is not None:
                out[label] = {"finished": False, "error": why}
                continue
            rate = opts.get("rate", args.rate)
            cpu0, redis0 = cluster.cpu_s()
            driver_args = [
                "fanout", "--url", cluster.urls, "--framing", cluster.framing,
                "--readers", str(args.readers), "--updates", str(args.updates),
                "--rate", str(rate), "--reader-mode", str(opts["reader-mode"]),
                "--timeout-s", str(args.timeout_s),
            ]  # fmt: skip
            result = common.run_driver(driver_args, args.timeout_s + 60)
            cpu1, redis1 = cluster.cpu_s()
            result["server_cpu_s"] = cpu1 - cpu0
            result["redis_cpu_s"] = None if redis0 is None or redis1 is None else redis1 - redis0
            result["instances"] = len(cluster.servers)
            out[label] = result
            if args.pause_s > 0:
                time.sleep(args.pause_s)  # let deferred work (compaction, stores) settle
        out["_cluster"] = {"peak_rss_kb": cluster.peak_rss_kb()}
    return out


def _frame_name(frame: str) -> str:
    """``func (/path/to/file.py:12)`` -> ``func (file.py)``: one row per function."""
    func, sep, where = frame.partition(" (")
    if not sep:
        return frame
    return f"{func} ({where.split(':')[0].rsplit('/', 1)[-1]})"


def _spy(pyspy: str, pid: int, out: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [pyspy, "record", "--pid", str(pid), "--rate", "250", "--format", "raw",
         "--output", str(out), "--nonblocking"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
    )  # fmt: skip


def _stop_spy(spy: subprocess.Popen[bytes]) -> str:
    if spy.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(spy.pid, signal.SIGINT)  # py-spy writes its output on SIGINT
    try:
        _, err = spy.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        stop_process(spy)
        err = b""
    return (err or b"").decode(errors="replace")[-500:]


def profile_crdtsync_redis(args: Any, report: Report) -> None:
    """crdtsync on Redis once more, relays 1 and 2 under py-spy during each run."""
    pyspy = shutil.which("py-spy")
    if pyspy is None:
        report.add("Profile skipped: py-spy is not installed (`pip install py-spy`).", "")
        return
    n_spied = min(2, args.instances)
    with (
        running_setup("crdtsync-redis", args.instances) as cluster,
        tempfile.TemporaryDirectory(prefix="crdtsync-bench-spy-") as tmp,
    ):
        time.sleep(1.0)
        for label, opts in RUNS:
            outs = [Path(tmp) / f"{label}-{i}.txt" for i in range(n_spied)]
            spies = [_spy(pyspy, cluster.servers[i].pid, outs[i]) for i in range(n_spied)]
            errors = []
            try:
                time.sleep(0.5)
                driver_args = [
                    "fanout", "--url", cluster.urls, "--readers", str(args.readers),
                    "--updates", str(args.updates), "--rate", str(opts.get("rate", args.rate)),
                    "--reader-mode", str(opts["reader-mode"]), "--timeout-s", str(args.timeout_s),
                ]  # fmt: skip
                result = common.run_driver(driver_args, args.timeout_s + 60)
            finally:
                errors = [_stop_spy(spy) for spy in spies]
            if args.profile_dir:
                keep = Path(args.profile_dir)
                keep.mkdir(parents=True, exist_ok=True)
                for out in outs:
                    if out.exists():
                        shutil.copyfile(out, keep / out.name.replace(", ", "-").replace(" ", "-"))
            lat = result.get("latency_ms") or {}
            report.add(
                f"### Profile, {label} (crdtsync on Redis, under py-spy at 250 Hz: "
                f"{fmt(result.get('delivered_per_s'), 0)} deliveries/s, p99 "
                f"{fmt(lat.get('p99'), 1)} ms)",
                "",
            )
            for i, out in enumerate(outs):
                who = "relay 1 (writer and its readers)" if i == 0 else f"relay {i + 1} (readers)"
                if not out.exists():
                    report.add(f"{who}: py-spy wrote nothing ({errors[i]})", "")
                    continue
                self_time: Counter[str] = Counter()
                total_time: Counter[str] = Counter()
                samples = 0
                for line in out.read_text(errors="replace").splitlines():
                    stack, _, count = line.rpartition(" ")
                    if not stack or not count.isdigit():
                        continue
                    k = int(count)
                    samples += k
                    frames = [_frame_name(f) for f in stack.split(";")]
                    self_time[frames[-1]] += k
                    for f in set(frames):
                        total_time[f] += k
                if samples == 0:
                    report.add(f"{who}: no samples", "")
                    continue
                report.add(f"{who}: {samples} busy samples ({samples / 250:.1f} s on CPU or in "
                           "a call)", "")  # fmt: skip
                # (frames nearly every sample has, the event loop and CLI entry, say nothing)
                inner = [(f, k) for f, k in total_time.most_common() if k < 0.7 * samples][:12]
                report.table(
                    ["function (file), by self", "self %", "", "function (file), by total",
                     "total %"],
                    [
                        (
                            *(
                                (f"`{f}`", f"{100 * k / samples:.1f}")
                                if j < len(self_time)
                                else ("", "")
                            ),
                            "",
                            *((f"`{inner[j][0]}`", f"{100 * inner[j][1] / samples:.1f}")
                              if j < len(inner) else ("", "")),
                        )
                        for j, (f, k) in enumerate(self_time.most_common(12))
                    ],
                )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--markdown-out", help="also write the report (Markdown) to this file")
    p.add_argument(
        "--quiet-wait-s",
        type=float,
        default=30.0,
        help="wait up to this long for the machine to be idle before each setup (0: don't)",
    )
    p.add_argument(
        "--setups",
        default=",".join(DEFAULT_SETUPS),
        help=f"comma-separated subset of {','.join(SETUPS)}",
    )
    p.add_argument("--readers", type=int, default=50)
    p.add_argument("--updates", type=int, default=2000)
    p.add_argument("--rate", type=float, default=500.0, help="updates/s of the paced run")
    p.add_argument("--instances", type=int, default=3, help="server processes per Redis setup")
    p.add_argument("--timeout-s", type=float, default=60.0, help="per driver run (default 60)")
    p.add_argument("--pause-s", type=float, default=2.0, help="pause between runs of a setup")
    p.add_argument(
        "--profile", action="store_true", help="also profile crdtsync on Redis with py-spy"
    )
    p.add_argument("--profile-dir", help="with --profile: keep py-spy's raw stacks here")
    args = p.parse_args(argv)
    setups = [s.strip() for s in args.setups.split(",") if s.strip()]
    for s in setups:
        if s not in SETUPS:
            raise SystemExit(f"unknown setup {s!r}; choose from {', '.join(SETUPS)}")
    if args.instances < 1 or args.readers < 1 or args.updates < 1:
        raise SystemExit("--instances, --readers and --updates must be positive")

    n = args.instances
    report = Report(
        f"Cross-process fan-out: 1 writer, {args.readers} readers over {n} processes, "
        f"{args.updates:,} small updates"
    )
    common.require_node(report)
    if any(s.startswith("hocuspocus") for s in setups):
        for pkg in ("@hocuspocus/server", "@hocuspocus/extension-redis"):
            if common._node_package_version(pkg) is None:
                report.add(f"Cannot run: bench/node lacks {pkg}: `npm ci --prefix bench/node`")
                return 2
    info = common.machine_info()
    for pkg in ("@hocuspocus/server", "@hocuspocus/extension-redis", "ioredis"):
        info[pkg] = common._node_package_version(pkg)
    redis_bin = shutil.which("redis-server")
    if redis_bin is not None:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run(
                [redis_bin, "--version"], capture_output=True, text=True, timeout=10
            )
            info["redis-server"] = out.stdout.split(" v=", 1)[-1].split()[0]
    report.machine(info, busy=common.cpu_busy_fraction())
    per = [sum(1 for i in range(args.readers) if i % n == k) for k in range(n)]
    report.add(
        "How: one Node driver process (`bench/node/driver.mjs fanout`, the one used by "
        "`fanout.py`) holds the writer and all readers (one clock). The writer inserts "
        "`<seq>@<send time>;` at the end of a Y.Text, one update per message, on instance 1; "
        f"reader i connects to instance (i mod {n}) + 1 ({' / '.join(map(str, per))} readers "
        f"on instances 1..{n}), so most deliveries cross processes. Latency is receipt minus "
        f"send time; updates/s delivered is {args.readers * args.updates:,} deliveries over "
        "first send to last receipt. Light readers decode each update (Y.decodeUpdate) "
        "without applying it. Burst: as fast as the writer can (50 updates per event-loop "
        f"turn); paced: {args.rate:g} updates/s. crdtsync on Redis: {n} `crdtsync relay "
        "--store redis://...` processes on one redis-server of the bench's own (loopback, "
        "`appendonly yes`, `appendfsync always`): every update is appended (fsynced) to the "
        "document's stream before it is fanned out, and each relay follows the stream for "
        "its own readers. crdtsync on SQLite: one relay, every client on it (as `fanout.py`). "
        f"Hocuspocus + Redis: {n} `@hocuspocus/server` 3.4.4 processes with "
        "`@hocuspocus/extension-redis` 3.4.4 on a redis-server of its own (started the same "
        "way; Hocuspocus only publishes there: each change publishes a sync step 1 and the "
        "other instances answer through pub/sub); the driver speaks Hocuspocus's framing "
        "(document name before every message, an Auth message first), no store. Server CPU: "
        "user+system seconds of the server processes (with their workers) during the run; "
        "Redis CPU: the redis-server's. All on one machine: the driver, the servers and "
        "Redis share its cores.",
        "",
    )
    results: dict[str, dict[str, dict[str, Any]]] = {}
    for setup in setups:
        if args.quiet_wait_s > 0:
            common.wait_for_quiet(args.quiet_wait_s)
        print(f"... {setup}", file=sys.stderr, flush=True)
        try:
            results[setup] = run_setup(setup, args)
        except RuntimeError as exc:  # (RedisUnavailable, a server that did not start)
            results[setup] = {label: {"finished": False, "error": str(exc)} for label, _ in RUNS}

    rows = []
    for label, _ in RUNS:
        for setup, runs in results.items():
            r = runs.get(label, {})
            lat = r.get("latency_ms") or {}
            note = None if r.get("finished") else (r.get("error") or "did not finish")
            if r.get("readers_closed_early"):
                note = (note or "") + f" {r['readers_closed_early']} readers closed early"
            if r.get("finished") and r.get("delivered", 0) > r.get("expected", 0):
                note = f"{r['delivered'] - r['expected']:,} deliveries more than sent"
            if not r.get("finished") and r.get("delivered") is not None:
                note = (note or "") + f" ({r['delivered']:,} of {r.get('expected', 0):,} delivered)"
            rows.append(
                (
                    label,
                    SETUPS[setup].format(n=n),
                    fmt(r.get("delivered_per_s"), 0),
                    fmt(lat.get("p50"), 1),
                    fmt(lat.get("p99"), 1),
                    fmt(lat.get("max"), 1),
                    fmt(r.get("server_cpu_s")),
                    fmt(r.get("redis_cpu_s")),
                    note,
                )
            )
    report.table(
        ["run", "setup", "updates/s delivered", "p50 ms", "p99 ms", "max ms", "server CPU s",
         "Redis CPU s", "notes"],
        rows,
    )  # fmt: skip
    by_rows = []
    for label, _ in RUNS:
        for setup, runs in results.items():
            by_server: list[dict[str, Any]] = runs.get(label, {}).get("by_server") or []
            if len(by_server) < 2:
                continue
            by_rows.append(
                (
                    label,
                    SETUPS[setup].format(n=n),
                    *(
                        f"{fmt(x.get('p50'), 1)} / {fmt(x.get('p99'), 1)} / {fmt(x.get('max'), 1)}"
                        for x in by_server
                    ),
                )
            )
    if by_rows:
        report.add(
            "Latency by instance, p50 / p99 / max ms of the readers on each (instance 1 holds "
            "the writer: its readers get updates without crossing processes):",
            "",
        )
        width = max(len(r) for r in by_rows) - 2
        report.table(
            ["run", "setup", *(f"instance {i + 1}" for i in range(width))],
            [(*r, *([None] * (width + 2 - len(r)))) for r in by_rows],
        )
    c, h = results.get("crdtsync-redis", {}), results.get("hocuspocus-redis", {})
    s = results.get("crdtsync-sqlite", {})
    for label, _ in RUNS:
        cr, hr, sr = c.get(label, {}), h.get(label, {}), s.get(label, {})
        clat, hlat = cr.get("latency_ms") or {}, hr.get("latency_ms") or {}
        report.add(
            f"- {label}: crdtsync on Redis / Hocuspocus + Redis: throughput "
            f"**{ratio(cr.get('delivered_per_s'), hr.get('delivered_per_s'))}** (higher is "
            f"better), p50 {ratio(clat.get('p50'), hlat.get('p50'))}, p99 "
            f"**{ratio(clat.get('p99'), hlat.get('p99'))}** (lower is better); crdtsync on "
            f"Redis / on SQLite: throughput "
            f"{ratio(cr.get('delivered_per_s'), sr.get('delivered_per_s'))}, p99 "
            f"{ratio(clat.get('p99'), (sr.get('latency_ms') or {}).get('p99'))}."
        )
    burst = RUNS[0][0]
    cb, hb = c.get(burst, {}), h.get(burst, {})
    if cb.get("finished") and hb.get("delivered_per_s") and cb.get("delivered_per_s"):
        thr_ok = cb["delivered_per_s"] >= 2 * hb["delivered_per_s"]
        p99_ok = True
        for label, _ in RUNS:
            cl = (c.get(label, {}).get("latency_ms") or {}).get("p99")
            hl = (h.get(label, {}).get("latency_ms") or {}).get("p99")
            if cl is None or not c.get(label, {}).get("finished"):
                p99_ok = False
            elif hl is not None and h.get(label, {}).get("finished"):
                p99_ok = p99_ok and cl < hl
        met = thr_ok and p99_ok
        report.add(
            "",
            f"Target ({TARGET}; throughput of the burst run, p99 of both runs): "
            f"{'met' if met else 'NOT met'} (throughput {'met' if thr_ok else 'NOT met'}, "
            f"p99 {'met' if p99_ok else 'NOT met'}).",
        )
    elif c and h:
        report.add("", f"Target ({TARGET}): not measured (a burst run did not finish).")
    report.add("")
    if args.profile:
        if args.quiet_wait_s > 0:
            common.wait_for_quiet(args.quiet_wait_s)
        print("... profile of crdtsync-redis", file=sys.stderr, flush=True)
        try:
            profile_crdtsync_redis(args, report)
        except RuntimeError as exc:
            report.add(f"Profile failed: {exc}", "")
    report.write(args.markdown_out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
