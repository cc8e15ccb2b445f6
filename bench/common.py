"""Shared pieces of the benchmark suite: server processes, the Node driver, reports.

Not a test module and not part of the installed package: the scripts next to it import
it by path (``python bench/<scenario>.py`` puts ``bench/`` on ``sys.path``).

Every server binds 127.0.0.1 on a port it picks itself (port 0) and announces with one
JSON line ``{"event": "listening", "url": ...}``; it runs in its own session
(``start_new_session``) and is stopped with SIGTERM, then SIGKILL, even on error. Every
wait is bounded.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from crdtsync.testing.processes import read_json_line, stop_process

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
NODE_DIR = BENCH_DIR / "node"
DRIVER = NODE_DIR / "driver.mjs"
TRACES_DIR = Path(
    os.environ.get("CRDTSYNC_TRACES_DIR", REPO_DIR.parent / "shared" / "data" / "traces")
)
AUTOMERGE_PAPER = TRACES_DIR / "automerge-paper.json.gz"

SERVER_NAMES = ("crdtsync", "reference", "pycrdt-websocket")
# Run only when asked for (--servers crdtsync-asgi,...): the relay mounted in a FastAPI
# app under uvicorn (bench/asgi_server.py).
OPTIONAL_SERVERS = ("crdtsync-asgi",)
CLK_TCK = os.sysconf("SC_CLK_TCK")


# -- environment ----------------------------------------------------------------------


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _node_package_version(name: str) -> str | None:
    try:
        data = json.loads((NODE_DIR / "node_modules" / name / "package.json").read_text())
    except (OSError, ValueError):
        return None
    return str(data.get("version"))


def node_version() -> str | None:
    node = shutil.which("node")
    if node is None:
        return None
    out = subprocess.run([node, "--version"], capture_output=True, text=True, timeout=30)
    return out.stdout.strip() or None


def pycrdt_websocket_available() -> bool:
    return _version("pycrdt-websocket") is not None


def node_missing() -> str | None:
    """Why the Node side cannot run, or None."""
    if shutil.which("node") is None:
        return "node is not on PATH (Node >= 20.6 is needed)"
    for pkg in ("yjs", "ws", "y-protocols", "lib0", "@y/websocket-server"):
        if _node_package_version(pkg) is None:
            return f"bench/node/node_modules lacks {pkg}: run `npm ci --prefix bench/node`"
    return None


def cpu_busy_fraction(seconds: float = 1.0) -> float:
    """Fraction of all CPUs busy over ``seconds`` (whole machine, from /proc/stat)."""

    def sample() -> tuple[int, int]:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
        idle = fields[3] + fields[4]
        return sum(fields), idle

    total0, idle0 = sample()
    time.sleep(seconds)
    total1, idle1 = sample()
    total = total1 - total0
    return 0.0 if total <= 0 else 1.0 - (idle1 - idle0) / total


def wait_for_quiet(max_wait_s: float, busy_below: float = 0.25) -> float:
    """Wait (bounded) until the machine is mostly idle; return the last busy fraction.

    Other work on the machine (a test suite, another benchmark) skews every figure here,
    so scenarios start on a quiet machine when they can and say so when they cannot.
    """
    deadline = time.monotonic() + max_wait_s
    busy = cpu_busy_fraction()
    while busy >= busy_below and time.monotonic() < deadline:
        busy = cpu_busy_fraction(2.0)
    return busy


def machine_info() -> dict[str, Any]:
    """How and where this was measured: printed at the top of every report."""
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    commit = None
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(
            ["git", "-C", str(REPO_DIR), "rev-parse", "--short", "HEAD"],
            capture_output=True, text=True, timeout=10,
        )  # fmt: skip
        commit = out.stdout.strip() or None
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "node": node_version(),
        "pycrdt": _version("pycrdt"),
        "websockets": _version("websockets"),
        "pycrdt-websocket": _version("pycrdt-websocket") or "not installed",
        "yjs": _node_package_version("yjs"),
        "ws": _node_package_version("ws"),
        "@y/websocket-server": _node_package_version("@y/websocket-server"),
        "crdtsync": _version("crdtsync"),
        "crdtsync commit": commit,
        "load average": " ".join(f"{x:.2f}" for x in os.getloadavg()),
    }


# -- processes ----------------------------------------------------------------------


def _status_kb(pid: int, key: str) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _group_pids(pgid: int) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[2]) == pgid:  # field 5 of stat: pgrp
            pids.append(int(entry))
    return pids


def _cpu_s(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    # utime + stime, plus cutime + cstime of children it has waited for (exited workers)
    return sum(int(x) for x in fields[11:15]) / CLK_TCK


@dataclass
class Server:
    """One server under test, run as its own process group on 127.0.0.1."""

    name: str
    cmd: list[str]
    workdir: Path
    url: str = ""
    proc: subprocess.Popen[bytes] | None = None
    stderr_path: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, timeout_s: float = 60.0) -> Server:
        self.stderr_path = self.workdir / f"{self.name}.stderr"
        with open(self.stderr_path, "ab") as err:
            self.proc = subprocess.Popen(
                self.cmd,
                cwd=self.workdir,
                stdout=subprocess.PIPE,
                stderr=err,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        try:
            line = read_json_line(self.proc, "listening", timeout_s)
        except RuntimeError as exc:
            self.stop()
            why = f"{self.name} did not start: {exc}; stderr: {self.stderr()}"
            raise RuntimeError(why) from None
        self.url = str(line["url"])
        if not self.url.startswith("ws://127.0.0.1:"):
            self.stop()
            raise RuntimeError(f"{self.name} announced {self.url}, not a 127.0.0.1 address")
        return self

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def rss_kb(self) -> int | None:
        """VmRSS of the server process itself."""
        return _status_kb(self.pid, "VmRSS")

    def hwm_kb(self) -> int | None:
        """VmHWM (peak RSS) of the server process itself."""
        return _status_kb(self.pid, "VmHWM")

    def group_rss_kb(self) -> int:
        """VmRSS summed over its whole process group (e.g. the relay's compaction worker)."""
        return sum(_status_kb(pid, "VmRSS") or 0 for pid in _group_pids(self.pid))

    def cpu_s(self) -> float:
        """CPU seconds (user + system) used so far by the process group's live members."""
        return sum(_cpu_s(pid) for pid in _group_pids(self.pid))

    def main_cpu_s(self) -> float:
        """CPU seconds of the server process alone (without its worker processes)."""
        return _cpu_s(self.pid) if self.proc is not None else 0.0

    def stderr(self, limit: int = 3000) -> str:
        if self.stderr_path is None:
            return ""
        try:
            return self.stderr_path.read_text(errors="replace")[-limit:]
        except OSError:
            return ""


def make_server(name: str, workdir: Path, relay_args: Sequence[str] = ()) -> Server:
    """A not-yet-started server: ``crdtsync``, ``reference`` or ``pycrdt-websocket``."""
    if name == "crdtsync":
        store = workdir / "relay.db"
        cmd = [
            sys.executable, "-m", "crdtsync", "relay",
            "--host", "127.0.0.1", "--port", "0", "--store", str(store),
            "--log-level", "WARNING", *relay_args,
        ]  # fmt: skip
        return Server(name, cmd, workdir, extra={"store": store})
    if name == "crdtsync-asgi":
        store = workdir / "relay.db"
        cmd = [sys.executable, str(BENCH_DIR / "asgi_server.py"), "--store", str(store)]
        cmd += relay_args
        return Server(name, cmd, workdir, extra={"store": store})
    if name == "reference":
        node = shutil.which("node") or "node"
        cmd = [node, str(NODE_DIR / "reference_server.mjs"), "--host", "127.0.0.1", "--port", "0"]
        return Server(name, cmd, workdir)
    if name == "pycrdt-websocket":
        cmd = [sys.executable, str(BENCH_DIR / "pycrdt_websocket_server.py"), "--port", "0"]
        return Server(name, cmd, workdir)
    raise ValueError(f"unknown server {name!r}")


@contextlib.contextmanager
def running(name: str, relay_args: Sequence[str] = ()) -> Iterator[Server]:
    """Start a server in a fresh temporary directory (outside the repo); always stop it."""
    with tempfile.TemporaryDirectory(prefix=f"crdtsync-bench-{name}-") as tmp:
        server = make_server(name, Path(tmp), relay_args)
        try:
            server.start()
            yield server
        finally:
            server.stop()


def run_driver(args: Sequence[str], timeout_s: float) -> dict[str, Any]:
    """Run the Node driver to completion (bounded); return its ``result`` JSON line."""
    node = shutil.which("node") or "node"
    cmd = [node, str(DRIVER), *args]
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(
            cmd,
            cwd=NODE_DIR,
            stdout=subprocess.PIPE,
            stderr=err,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            out, _ = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            stop_process(proc)
            return {"finished": False, "error": f"driver killed after {timeout_s:.0f} s"}
        finally:
            if proc.poll() is None:
                stop_process(proc)
        err.seek(0)
        stderr = err.read().decode(errors="replace")
    result: dict[str, Any] | None = None
    for line in out.decode(errors="replace").splitlines():
        with contextlib.suppress(ValueError):
            data = json.loads(line)
            if isinstance(data, dict) and data.get("event") == "result":
                result = data
    if result is None:
        return {"finished": False, "error": f"driver printed no result; stderr: {stderr[-2000:]}"}
    return result


# -- reports ------------------------------------------------------------------------


class Report:
    """Markdown lines printed as they come and, with ``--markdown-out``, written to a file."""

    def __init__(self, title: str) -> None:
        self.lines: list[str] = []
        self.add(f"## {title}", "")

    def add(self, *lines: str) -> None:
        for line in lines:
            print(line, flush=True)
            self.lines.append(line)

    def table(self, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        def cell(v: Any) -> str:
            return "—" if v is None else str(v)

        self.add(
            "| " + " | ".join(header) + " |",
            "| " + " | ".join("---" for _ in header) + " |",
            *("| " + " | ".join(cell(v) for v in row) + " |" for row in rows),
            "",
        )

    def machine(self, info: dict[str, Any] | None = None, busy: float | None = None) -> None:
        info = info or machine_info()
        self.add("Measured on: " + ", ".join(f"{k} {v}" for k, v in info.items() if v is not None))
        if busy is not None:
            note = " (other work was running: figures are pessimistic)" if busy >= 0.25 else ""
            self.add(f"Machine CPU busy just before the run: {busy:.0%}{note}")
        self.add("")

    def write(self, path: str | None) -> None:
        if path:
            Path(path).write_text("\n".join(self.lines) + "\n")


def fmt(value: float | None, digits: int = 2, unit: str = "") -> str | None:
    if value is None:
        return None
    return f"{value:,.{digits}f}{unit}"


def ratio(a: float | None, b: float | None) -> str | None:
    if a is None or b is None or b == 0:
        return None
    return f"{a / b:.2f}"


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def base_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--markdown-out", help="also write the report (Markdown) to this file")
    p.add_argument(
        "--servers",
        default=",".join(SERVER_NAMES),
        help=f"comma-separated subset of {','.join(SERVER_NAMES + OPTIONAL_SERVERS)}",
    )
    p.add_argument(
        "--quiet-wait-s",
        type=float,
        default=30.0,
        help="wait up to this long for the machine to be idle before each server (0: don't)",
    )
    return p


def selected_servers(arg: str, report: Report) -> list[str]:
    """The servers to run; pycrdt-websocket is skipped with a note when not installed."""
    names = [n.strip() for n in arg.split(",") if n.strip()]
    for n in names:
        if n not in SERVER_NAMES + OPTIONAL_SERVERS:
            known = ", ".join(SERVER_NAMES + OPTIONAL_SERVERS)
            raise SystemExit(f"unknown server {n!r}; choose from {known}")
    if "pycrdt-websocket" in names and not pycrdt_websocket_available():
        report.add(
            "Note: pycrdt-websocket is not installed, so it is skipped "
            "(`pip install pycrdt-websocket` to include it; benchmarking only, not a dependency).",
            "",
        )
        names.remove("pycrdt-websocket")
    return names


def require_node(report: Report) -> None:
    why = node_missing()
    if why is not None:
        report.add(f"Cannot run: {why}")
        raise SystemExit(2)


def crdtsync_health(server: Server) -> dict[str, Any] | None:
    """The relay's own counters (``/healthz?verbose=1``), or None."""
    import urllib.request

    url = server.url.replace("ws://", "http://", 1) + "/healthz?verbose=1"
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            data = json.loads(resp.read())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None
