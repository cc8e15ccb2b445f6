"""Cold start: time from spawning a relay process to the first answered sync step 1.

    python bench/coldstart.py [--runs 7] [--servers crdtsync,reference,hocuspocus]
                              [--trace-updates 20000] [--docs 100000] [--timeout-s 30]

One driver (this process: asyncio, ``websockets``, ``crdtsync.protocol`` framing) measures
every server the same way. Before each start it picks a free 127.0.0.1 port and passes
it to the server, so it never waits for the server's ready line: the clock starts right
before ``subprocess.Popen``, the driver then tries a TCP connect to that port every
``--poll-ms`` (1 ms) until one succeeds, opens the websocket on that socket, sends sync
step 1 with an empty state vector (for Hocuspocus, an Auth message and then step 1, both
at once, in its document-name-prefixed framing) and stops the clock at the first sync
step 2 it receives. The ready line ({"event": "listening"}) is timestamped on the side.
The server is then stopped (SIGTERM to its session, then SIGKILL) before the next start.

Documents:

- ``empty``: a document the server has never seen (crdtsync: on a store file that does
  not exist yet, as on a first start);
- ``stored``: the first ``--trace-updates`` txns of the automerge-paper trace, made into
  one update per txn by pycrdt (untimed). crdtsync: written with ``UpdateLog.append_many``
  and compacted into a snapshot (what the relay keeps after its own compaction);
  ``stored-log``: the same updates left uncompacted in the log (a relay stopped before it
  compacted). The reference server (memory-only in this bench) and Hocuspocus (no
  built-in store) are started with ``--load-dir``: a bench-provided loader reads the
  document's state (one Yjs update in a file) when the document is first opened;
- ``many``: crdtsync on a store holding ``--docs`` small documents (one update each,
  written with ``UpdateLog.append_many``, 10,000 per transaction); the cold start is for
  one of them.

Each crdtsync start gets a fresh copy of its prepared store (untimed), so no start sees
what an earlier one wrote (a compaction, the WAL). Files are in the page cache: this is a
process cold start, not a disk cold start. One untimed warm-up round, then the rounds,
interleaved: each starts every case once, in an order rotated from round to round. crdtsync
runs with its bytecode cached in a temporary ``PYTHONPYCACHEPREFIX`` (as a wheel install
has its ``.pyc``); the ``empty, no .pyc`` case is the same start with
``PYTHONDONTWRITEBYTECODE=1``. Beside each time: when the port first accepted a TCP
connection, when the ready line came, and the server's CPU time at the answer.

Also reported: ``python -c pass`` and ``node -e 0`` (spawn to exit) as floors,
``python -X importtime -c "import crdtsync.cli"``'s top cumulative imports, the imports
of a real ``crdtsync relay`` start, and the relay's start-up phases timed in one process.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gzip
import json
import os
import select
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import common
from common import Report, fmt

SERVERS = ("crdtsync", "reference", "hocuspocus")
HOCUSPOCUS_SERVER = common.NODE_DIR / "hocuspocus_server.mjs"
REFERENCE_SERVER = common.NODE_DIR / "reference_server.mjs"
TARGET_RATIO = 1.2  # crdtsync / reference, same kind of document (the issue)
TARGET_MANY = 1.1  # "a 100,000-document store starts as fast as an empty one": within 10 %
MAX_MESSAGES = 1000  # messages read before giving up on a step 2
EMPTY_DOC = "coldstart/empty"
STORED_DOC = "coldstart/stored"


def many_doc_name(i: int) -> str:
    return f"many/{i:06d}"


# -- the driver ---------------------------------------------------------------------------


def python_env(pycache: Path, pyc: bool = True) -> dict[str, str]:
    """The environment of a crdtsync process.

    With ``pyc``, bytecode is read from and written to ``pycache``
    (``PYTHONPYCACHEPREFIX``, outside the repo; filled by the warm-up round), as a
    deployment's wheel install has its ``.pyc`` files. Without, as this environment sets
    ``PYTHONDONTWRITEBYTECODE=1`` and crdtsync is an editable install of the repo, every
    start compiles crdtsync's own modules from source (third-party ones have their
    ``.pyc`` from pip).
    """
    env = dict(os.environ)
    if pyc:
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env["PYTHONPYCACHEPREFIX"] = str(pycache)
    else:
        env.pop("PYTHONPYCACHEPREFIX", None)
        env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


def group_cpu_ms(pgid: int) -> float:
    """CPU time (ms) of every live thread of every live process in a session/group, from
    /proc/<pid>/task/<tid>/schedstat (ns, unlike /proc/<pid>/stat's clock ticks)."""
    total_ns = 0
    for pid in common._group_pids(pgid):
        with contextlib.suppress(OSError):
            for tid in os.listdir(f"/proc/{pid}/task"):
                with (
                    contextlib.suppress(OSError, ValueError, IndexError),
                    open(f"/proc/{pid}/task/{tid}/schedstat") as f,
                ):
                    total_ns += int(f.read().split()[0])
    return total_ns / 1e6


def free_port() -> int:
    """A port that was free on 127.0.0.1 a moment ago (the server binds it next)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _var_string(text: str) -> bytes:
    from crdtsync.protocol import write_var_uint

    raw = text.encode()
    return write_var_uint(len(raw)) + raw


def step2_size(data: bytes, prefixed: bool) -> int | None:
    """The update size if ``data`` is a sync step 2, else None (``prefixed``: Hocuspocus
    framing, a var-string document name before the y-websocket message)."""
    from crdtsync.protocol import read_var_uint

    try:
        pos = 0
        if prefixed:
            n, pos = read_var_uint(data, pos)
            pos += n
        kind, pos = read_var_uint(data, pos)
        if kind != 0:  # not a sync message
            return None
        sub, pos = read_var_uint(data, pos)
        if sub != 1:  # step 1 or update
            return None
        size, _ = read_var_uint(data, pos)
        return size
    except Exception:  # a malformed frame is just not the answer
        return None


@dataclass
class Case:
    """One thing to start: a server on one kind of document."""

    key: str
    server: str
    kind: str
    doc: str
    store: Path | None = None  # crdtsync: a prepared store, copied before each start
    load_dir: Path | None = None  # reference / Hocuspocus: the bench's file loader
    pyc: bool = True  # crdtsync: with its bytecode cached (False: compiled at every start)
    times_ms: list[float] = field(default_factory=list)
    ready_ms: list[float] = field(default_factory=list)
    tcp_ms: list[float] = field(default_factory=list)
    cpu_ms: list[float] = field(default_factory=list)
    answer_bytes: int | None = None
    errors: list[str] = field(default_factory=list)

    def env(self, pycache: Path) -> dict[str, str]:
        return python_env(pycache, self.pyc) if self.server == "crdtsync" else dict(os.environ)

    def command(self, port: int, workdir: Path) -> list[str]:
        node = shutil.which("node") or "node"
        if self.server == "crdtsync":
            store = workdir / "relay.db"
            if self.store is not None:
                shutil.copyfile(self.store, store)
            return [
                sys.executable, "-m", "crdtsync", "relay", "--host", "127.0.0.1",
                "--port", str(port), "--store", str(store), "--log-level", "WARNING",
            ]  # fmt: skip
        script = REFERENCE_SERVER if self.server == "reference" else HOCUSPOCUS_SERVER
        cmd = [node, str(script), "--host", "127.0.0.1", "--port", str(port)]
        if self.load_dir is not None:
            cmd += ["--load-dir", str(self.load_dir)]
        return cmd


async def _connect_when_bound(
    proc: subprocess.Popen[bytes], port: int, poll_s: float, deadline: float
) -> socket.socket:
    """A TCP connection to ``port`` as soon as it accepts one (bounded in count and time)."""
    loop = asyncio.get_running_loop()
    max_attempts = int((deadline - time.monotonic()) / max(poll_s, 1e-4)) + 10
    for _ in range(max_attempts):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            await asyncio.wait_for(
                loop.sock_connect(sock, ("127.0.0.1", port)),
                max(0.001, deadline - time.monotonic()),
            )
            return sock
        except (ConnectionRefusedError, TimeoutError, OSError) as exc:
            sock.close()
            if proc.poll() is not None:
                raise RuntimeError(f"server exited ({proc.returncode}) before binding") from exc
            if time.monotonic() >= deadline:
                break
        await asyncio.sleep(poll_s)
    raise RuntimeError("port never accepted a connection")


async def measure_once(
    case: Case, workdir: Path, pycache: Path, poll_s: float, timeout_s: float, record: bool = True
) -> None:
    """Start ``case``'s server, time spawn -> first step 2, stop it. Records into ``case``."""
    from websockets.asyncio.client import connect

    from crdtsync.protocol import SyncStep1

    port = free_port()
    cmd = case.command(port, workdir)  # (copies the store: before the clock)
    prefixed = case.server == "hocuspocus"
    hello = SyncStep1(b"\x00").encode()
    first: list[bytes] = []
    if prefixed:
        name = _var_string(case.doc)
        # Auth (2), token subtype (0), an empty token: what HocuspocusProvider sends first
        first.append(name + bytes((2, 0)) + _var_string(""))
        hello = name + hello
    first.append(hello)
    loop = asyncio.get_running_loop()
    stdout_buf = bytearray()
    ready_at: list[float] = []
    # A blocking spawn on purpose: nothing else runs on this loop, and the clock starts here.
    with open(workdir / "server.stderr", "wb") as err:  # noqa: ASYNC230
        t0 = time.perf_counter()
        proc = subprocess.Popen(  # noqa: ASYNC220
            cmd,
            cwd=workdir,
            stdout=subprocess.PIPE,
            stderr=err,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            env=case.env(pycache),
        )
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    os.set_blocking(fd, False)

    def on_stdout() -> None:
        with contextlib.suppress(BlockingIOError):
            chunk = os.read(fd, 65536)
            if not chunk:
                loop.remove_reader(fd)
                return
            if not ready_at and b"\n" in chunk:
                ready_at.append(time.perf_counter())
            if len(stdout_buf) < 65536:
                stdout_buf.extend(chunk)

    loop.add_reader(fd, on_stdout)
    deadline = time.monotonic() + timeout_s
    try:
        sock = await _connect_when_bound(proc, port, poll_s, deadline)
        t_tcp = time.perf_counter()
        async with connect(
            f"ws://127.0.0.1:{port}/{case.doc}",
            sock=sock,
            compression=None,
            max_size=None,
            open_timeout=max(0.1, deadline - time.monotonic()),
            close_timeout=1,
        ) as ws:
            for frame in first:
                await ws.send(frame)
            size = None
            for _ in range(MAX_MESSAGES):
                data = await asyncio.wait_for(ws.recv(), max(0.001, deadline - time.monotonic()))
                if isinstance(data, bytes):
                    size = step2_size(data, prefixed)
                    if size is not None:
                        break
            t_done = time.perf_counter()
            cpu_ms = group_cpu_ms(proc.pid)  # (after the clock: the /proc walk costs)
            if size is None:
                raise RuntimeError(f"no sync step 2 in {MAX_MESSAGES} messages")
        if not record:  # the warm-up round
            return
        case.cpu_ms.append(cpu_ms)
        case.times_ms.append((t_done - t0) * 1000)
        case.tcp_ms.append((t_tcp - t0) * 1000)
        case.answer_bytes = size
        # the ready line normally came before the answer; give it a moment if not
        for _ in range(100):
            if ready_at or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.01)
        if ready_at:
            case.ready_ms.append((ready_at[0] - t0) * 1000)
    except Exception as exc:  # reported; the round goes on
        why = ("warm-up: " if not record else "") + f"{type(exc).__name__}: {exc}"
        with contextlib.suppress(OSError):
            why += "; stderr: " + (workdir / "server.stderr").read_text(errors="replace")[-500:]
        case.errors.append(why)
    finally:
        with contextlib.suppress(Exception):
            loop.remove_reader(fd)
        common.stop_process(proc)


# bench/node/reference_server.mjs registers a module resolve hook (a stub for y-leveldb,
# which bench/node does not install) before its imports; Node 20 runs such hooks on a
# separate thread. These floors estimate what that costs the reference server's start.
_REF_HOOK = """
import { register } from 'node:module'
const STUB = 'export class LeveldbPersistence {}'
const HOOKS = `export async function resolve (specifier, context, next) {
  if (specifier === 'y-leveldb') {
    return { url: 'data:text/javascript,' + encodeURIComponent(STUB), shortCircuit: true }
  }
  return next(specifier, context)
}`.replace('STUB', JSON.stringify(STUB))
register('data:text/javascript,' + encodeURIComponent(HOOKS))
"""
_REF_IMPORTS = (
    "await import('ws'); await import('yjs'); await import('y-protocols/sync'); "
    "await import('y-protocols/awareness'); await import('lib0/encoding');"
)


def node_floors(servers: Sequence[str]) -> dict[str, list[str]]:
    node = shutil.which("node")
    if node is None or servers == ["crdtsync"]:
        return {}
    floors = {"node -e 0": [node, "-e", "0"]}
    if "reference" in servers:
        es = [node, "--input-type=module", "-e"]
        floors["node: import ws, yjs, y-protocols, lib0"] = [*es, _REF_IMPORTS]
        floors["node: the same after reference_server.mjs's register() hook"] = [
            *es,
            _REF_HOOK + _REF_IMPORTS,
        ]
    return floors


def spawn_to_exit_ms(cmd: Sequence[str], timeout_s: float = 30.0) -> float | None:
    """Spawn to exit of a short command, from this process. The exit is seen through a
    pidfd (``Popen.wait(timeout)`` polls with sleeps of up to 50 ms: it would add its own
    delay to a 20 ms figure)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True, cwd=common.NODE_DIR,
    )  # fmt: skip
    try:
        if hasattr(os, "pidfd_open"):
            pidfd = os.pidfd_open(proc.pid)
            try:
                ready, _, _ = select.select([pidfd], [], [], timeout_s)
            finally:
                os.close(pidfd)
            if not ready:
                return None
            t1 = time.perf_counter()
            rc = proc.wait(timeout_s)
        else:
            rc = proc.wait(timeout_s)
            t1 = time.perf_counter()
    except subprocess.TimeoutExpired:
        return None
    finally:
        common.stop_process(proc, grace_s=1.0)
    return (t1 - t0) * 1000 if rc == 0 else None


# -- preparing the documents (untimed) ----------------------------------------------------


def trace_updates(path: Path, count: int) -> tuple[list[bytes], bytes, int]:
    """The first ``count`` txns of a trace as pycrdt updates (one per txn), the
    document's state as one update, and the text's length."""
    import pycrdt

    with gzip.open(path, "rt", encoding="utf-8") as f:
        data = json.load(f)
    txns = data["txns"][:count]
    ascii_only = all(p[2].isascii() for t in txns for p in t["patches"])
    doc: pycrdt.Doc[Any] = pycrdt.Doc()
    text = doc.get("text", type=pycrdt.Text)
    updates: list[bytes] = []
    sub = doc.observe(lambda event: updates.append(event.update))
    mirror = ""  # pycrdt 0.14 indexes Text in UTF-8 bytes: only needed for non-ASCII
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
    doc.unobserve(sub)
    return updates, doc.get_update(), len(str(text))


def prepare(args: argparse.Namespace, root: Path, servers: Sequence[str]) -> dict[str, Any]:
    """Write the stores and files the stored cases start from; say what they hold."""
    from crdtsync.store import UpdateLog

    info: dict[str, Any] = {}
    t = time.perf_counter()
    updates, state, length = trace_updates(Path(args.trace), args.trace_updates)
    info["trace_s"] = time.perf_counter() - t
    info["updates"] = len(updates)
    info["update_bytes"] = sum(len(u) for u in updates)
    info["state_bytes"] = len(state)
    info["text_chars"] = length

    load_dir = root / "load"
    load_dir.mkdir()
    (load_dir / (_quote(STORED_DOC) + ".bin")).write_bytes(state)
    info["load_dir"] = load_dir

    if "crdtsync" in servers:
        log_store = root / "stored-log.db"
        with UpdateLog(log_store) as log:
            log.append_many([(STORED_DOC, u) for u in updates])
        info["stored_log"] = log_store
        compact_store = root / "stored-compact.db"
        with UpdateLog(compact_store) as log:
            log.append_many([(STORED_DOC, u) for u in updates])
            result = log.compact(STORED_DOC)
            info["snapshot_bytes"] = (
                result.snapshot_bytes if hasattr(result, "snapshot_bytes") else None
            )
            info["compaction"] = result
        info["stored_compact"] = compact_store

        import pycrdt

        t = time.perf_counter()
        many_store = root / "many.db"
        batch = 10_000
        with UpdateLog(many_store) as log:
            for start in range(0, args.docs, batch):
                items = []
                for i in range(start, min(start + batch, args.docs)):
                    d: pycrdt.Doc[Any] = pycrdt.Doc()
                    d["text"] = pycrdt.Text(f"document {i} of the cold-start benchmark")
                    items.append((many_doc_name(i), d.get_update()))
                log.append_many(items)
        info["many_s"] = time.perf_counter() - t
        info["many_store"] = many_store
        for key in ("stored_log", "stored_compact", "many_store"):
            info[key + "_bytes"] = info[key].stat().st_size
    return info


def _quote(name: str) -> str:
    """``encodeURIComponent`` of a document name, as the Node loaders spell the file."""
    from urllib.parse import quote

    return quote(name, safe="-_.!~*'()")


# -- import times and start-up phases -----------------------------------------------------

ImportRow = tuple[str, float, float]  # module, cumulative ms, self ms


def parse_importtime(text: str) -> list[list[ImportRow]]:
    """``-X importtime`` output, one list per process (each starts with its header line;
    a child started with the same flags, e.g. multiprocessing's resource tracker, writes
    to the same stderr), in the order printed."""
    procs: list[list[ImportRow]] = []
    for line in text.splitlines():
        if not line.startswith("import time:") or "|" not in line:
            continue
        parts = line[len("import time:") :].split("|")
        try:
            self_us, cum_us = int(parts[0]), int(parts[1])
        except ValueError:
            procs.append([])  # the header line: a new process
            continue
        if not procs:
            procs.append([])
        # "| <indent>name": one space after the bar, then two per nesting level
        procs[-1].append((parts[2][1:].rstrip(), cum_us / 1000, self_us / 1000))
    return procs


def top_cumulative(rows: list[ImportRow], n: int) -> list[ImportRow]:
    return sorted(rows, key=lambda r: -r[1])[:n]


def import_times(cmd: Sequence[str], env: dict[str, str], timeout_s: float) -> list[ImportRow]:
    """The main process's ``-X importtime`` rows of a command run to its end."""
    out = subprocess.run(
        cmd, capture_output=True, text=True, timeout=timeout_s, cwd=tempfile.gettempdir(), env=env
    )
    procs = parse_importtime(out.stderr)
    return procs[0] if procs else []


def relay_import_times(root: Path, env: dict[str, str], timeout_s: float) -> list[list[ImportRow]]:
    """The imports of a real ``crdtsync relay`` start, up to its ready line, per process."""
    workdir = root / "importtime"
    workdir.mkdir(exist_ok=True)
    cmd = [
        sys.executable, "-X", "importtime", "-m", "crdtsync", "relay", "--host", "127.0.0.1",
        "--port", "0", "--store", str(workdir / "relay.db"), "--log-level", "WARNING",
    ]  # fmt: skip
    server = common.Server("crdtsync-importtime", cmd, workdir)
    # common.Server.start has no env parameter: set this process's for the spawn only
    saved = dict(os.environ)
    try:
        os.environ.clear()
        os.environ.update(env)
        server.start(timeout_s)
    finally:
        os.environ.clear()
        os.environ.update(saved)
        server.stop()
    return parse_importtime(server.stderr(10_000_000))


PHASES = r"""
import json, sys, time
t = [("start", time.perf_counter())]
import asyncio
import crdtsync.cli as cli
t.append(("import crdtsync.cli", time.perf_counter()))
parser = cli.build_parser()
t.append(("cli.build_parser() (imports crdtsync.testing.campaign for FAULT_KINDS)",
          time.perf_counter()))
args = parser.parse_args(["relay", "--host", "127.0.0.1", "--port", "0",
                          "--store", sys.argv[1], "--log-level", "WARNING"])
t.append(("parse_args()", time.perf_counter()))
settings = cli._relay_settings(args)
t.append(("cli._relay_settings(): import crdtsync.settings (pydantic-settings), "
          "RelaySettings.load(), token_verifier() (imports crdtsync.auth), and what else "
          "it imports", time.perf_counter()))
from crdtsync.server import Relay
t.append(("import crdtsync.server (server/relay.py), if not imported yet", time.perf_counter()))
from crdtsync.store import UpdateLog
UpdateLog(sys.argv[2]).close()
t.append(("(aside) UpdateLog() on a new file: WAL, schema migrations; closed",
          time.perf_counter()))
UpdateLog(sys.argv[2]).close()
t.append(("(aside) UpdateLog() again, the file exists; closed", time.perf_counter()))
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
ProcessPoolExecutor(1, mp_context=get_context("spawn")).shutdown()
t.append(("(aside) ProcessPoolExecutor(spawn) created and shut down (starts "
          "multiprocessing's resource tracker process)", time.perf_counter()))

async def main():
    relay = Relay(settings)
    t.append(("Relay(settings)", time.perf_counter()))
    await relay.start()
    t.append(("await relay.start(): store lock, UpdateLog, compaction pool object, "
              "websockets serve()", time.perf_counter()))
    await relay.stop()

asyncio.run(main())
print(json.dumps([(name, round((b - a) * 1000, 2)) for (name, b), (_, a) in zip(t[1:], t)]))
"""


def relay_phases(
    root: Path, env: dict[str, str], timeout_s: float
) -> list[tuple[str, float]] | str:
    """The relay's start-up steps timed in one fresh process (best effort: it calls
    ``crdtsync.cli`` internals, which may change). The "(aside)" steps are not part of
    a start; they time parts of ``relay.start()`` on their own."""
    workdir = root / "phases"
    workdir.mkdir(exist_ok=True)
    try:
        out = subprocess.run(
            [sys.executable, "-c", PHASES, str(workdir / "relay.db"), str(workdir / "other.db")],
            capture_output=True, text=True, timeout=timeout_s, cwd=workdir, env=env,
        )  # fmt: skip
        return [(str(n), float(ms)) for n, ms in json.loads(out.stdout.strip().splitlines()[-1])]
    except (subprocess.SubprocessError, ValueError, IndexError, OSError) as exc:
        return f"phases not measured: {exc}"


# -- main -----------------------------------------------------------------------------------


def stats(values: Sequence[float]) -> tuple[float | None, float | None, float | None]:
    if not values:
        return None, None, None
    return common.median(values), min(values), max(values)


def make_cases(servers: Sequence[str], info: dict[str, Any], docs: int) -> list[Case]:
    cases: list[Case] = []
    for server in servers:
        if server == "crdtsync":
            cases += [
                Case("crdtsync/empty", server, "empty", EMPTY_DOC),
                Case("crdtsync/stored", server, "stored", STORED_DOC, store=info["stored_compact"]),
                Case("crdtsync/stored-log", server, "stored-log", STORED_DOC,
                     store=info["stored_log"]),
                Case("crdtsync/many", server, "many", many_doc_name(docs // 2),
                     store=info["many_store"]),
                Case("crdtsync/empty-nopyc", server, "empty, no .pyc", EMPTY_DOC, pyc=False),
            ]  # fmt: skip
        else:
            cases += [
                Case(f"{server}/empty", server, "empty", EMPTY_DOC),
                Case(f"{server}/stored", server, "stored", STORED_DOC, load_dir=info["load_dir"]),
            ]
    return cases


def run_rounds(
    cases: list[Case], floors: dict[str, list[str]], args: argparse.Namespace, root: Path
) -> tuple[dict[str, list[float]], list[float]]:
    """A warm-up round (untimed), then ``--runs`` rounds, each after a (bounded) wait for
    a quiet machine; returns the floors' times and how busy the machine was before each
    round."""
    floor_ms: dict[str, list[float]] = {k: [] for k in floors}
    busy: list[float] = []
    pycache = root / "pycache"
    loop = asyncio.new_event_loop()
    try:
        for rnd in range(-1, args.runs):
            print(f"... round {rnd + 1}/{args.runs}" + (" (warm-up)" if rnd < 0 else ""),
                  file=sys.stderr, flush=True)  # fmt: skip
            if rnd >= 0:
                if args.quiet_wait_s > 0:
                    busy.append(common.wait_for_quiet(min(args.quiet_wait_s, 10.0)))
                for name, cmd in floors.items():
                    ms = spawn_to_exit_ms(cmd)
                    if ms is not None:
                        floor_ms[name].append(ms)
            shift = max(rnd, 0) % len(cases)
            for case in cases[shift:] + cases[:shift]:
                workdir = root / f"run-{rnd + 1}-{case.key.replace('/', '-')}"
                workdir.mkdir()
                try:
                    loop.run_until_complete(
                        measure_once(
                            case,
                            workdir,
                            pycache,
                            args.poll_ms / 1000,
                            args.timeout_s,
                            record=rnd >= 0,
                        )
                    )
                finally:
                    shutil.rmtree(workdir, ignore_errors=True)
                time.sleep(0.2)  # let the stopped server's exit settle
    finally:
        loop.close()
    return floor_ms, busy


def describe(report: Report, args: argparse.Namespace, info: dict[str, Any], prep_s: float,
             servers: Sequence[str]) -> None:  # fmt: skip
    report.add(
        "How: one driver (Python asyncio + websockets, the bench process) for every "
        "server. Per start it picks a free 127.0.0.1 port, starts the clock, spawns the "
        "server with that port (`subprocess.Popen`, own session), tries a TCP connect "
        f"every {args.poll_ms:g} ms until one succeeds, opens the websocket on it, "
        "sends sync step 1 with an empty state vector (Hocuspocus: its Auth message and "
        "step 1 together, document-name prefixed) and stops the clock at the first sync "
        "step 2 received. The driver never waits for the ready line; when it came "
        "(`listening` JSON line on stdout) is reported beside, as is when the port first "
        "accepted a TCP connection. One untimed warm-up round (page cache, crdtsync's "
        f"bytecode cache), then {args.runs} rounds; each starts every case once, in an "
        "order rotated per round, and stops the server (SIGTERM, SIGKILL) before the next. "
        "Each crdtsync start gets a fresh copy of its prepared store (untimed; in the page "
        "cache). crdtsync runs from this repo (editable install) with its bytecode cached "
        "in a temporary `PYTHONPYCACHEPREFIX`, as a wheel install would have it; "
        "`empty, no .pyc` is the same start with `PYTHONDONTWRITEBYTECODE=1` (this "
        "environment's default), which compiles crdtsync's modules at every start.",
        "",
        f"Prepared (untimed, {prep_s:.1f} s): the first {info['updates']:,} txns of "
        f"{Path(args.trace).name} as {info['updates']:,} pycrdt updates "
        f"({info['update_bytes'] / 1e3:,.0f} kB, a text of {info['text_chars']:,} chars; "
        f"its state as one update: {info['state_bytes'] / 1e3:,.0f} kB).",
    )
    if "crdtsync" in servers:
        comp = info["compaction"]
        report.add(
            "crdtsync `stored`: those updates appended with `UpdateLog.append_many`, then "
            f"`UpdateLog.compact()` (folded {comp.folded:,} updates into a "
            f"{comp.snapshot_bytes / 1e3:,.0f} kB snapshot; store "
            f"{info['stored_compact_bytes'] / 1e6:.1f} MB). `stored-log`: the same updates "
            f"left in the log ({info['stored_log_bytes'] / 1e6:.1f} MB): over 1,024 updates, "
            "so the relay reads the document in its work process, which it spawns on that "
            f"first use; its answer is the merged updates (deleted content not collected). "
            f"`many`: {args.docs:,} documents of one small update each (`append_many`, "
            f"10,000 per transaction, {info['many_s']:.1f} s; "
            f"{info['many_store_bytes'] / 1e6:.1f} MB); the document synced is "
            f"`{many_doc_name(args.docs // 2)}`.",
        )
    if any(s != "crdtsync" for s in servers):
        report.add(
            "reference and Hocuspocus `stored`: neither has a store in this bench (the "
            "reference server's y-leveldb and Hocuspocus's SQLite extension need native "
            "modules that bench/node does not build), so each gets a bench-provided loader "
            "(`--load-dir`) that reads the document's state, one Yjs update in a file, "
            "when the document is first opened and applies it before answering "
            "(reference: `setPersistence` with a synchronous `bindState`; Hocuspocus: "
            "an `onLoadDocument` hook). `empty`: memory only, as everywhere in bench/.",
        )
    report.add("")


def report_results(report: Report, cases: list[Case], floor_ms: dict[str, list[float]],
                   args: argparse.Namespace) -> None:  # fmt: skip
    rows = []
    for case in cases:
        med, lo, hi = stats(case.times_ms)
        note = f"{len(case.errors)} failed: {case.errors[0][:300]}" if case.errors else None
        rows.append((
            case.server, case.kind, f"`{case.doc}`", fmt(med, 1), fmt(lo, 1), fmt(hi, 1),
            fmt(stats(case.tcp_ms)[0], 1), fmt(stats(case.ready_ms)[0], 1),
            fmt(stats(case.cpu_ms)[0], 0),
            f"{case.answer_bytes:,}" if case.answer_bytes is not None else None,
            f"{len(case.times_ms)}/{args.runs}", note,
        ))  # fmt: skip
    report.table(
        ["server", "document", "name", "median ms", "min ms", "max ms", "port open ms",
         "ready line ms", "server CPU ms", "answer bytes", "runs", "notes"],
        rows,
    )  # fmt: skip
    report.add(
        "Spawn to the first step 2 (median, min, max); port open and ready line: medians, "
        "from spawn; server CPU: median CPU time of the server's live processes and "
        "threads when the answer arrived (all cores: a second process or thread counts; "
        "an exited one does not); answer bytes: the update in the step 2.",
        "",
        f"Floors (spawn to exit, median of {args.runs}, min): "
        + ", ".join(
            f"`{k}` {fmt(stats(v)[0], 1)} ms ({fmt(stats(v)[1], 1)})" for k, v in floor_ms.items()
        )
        + ".",
        "",
    )
    by_key = {c.key: c for c in cases}

    def med_of(key: str) -> float | None:
        c = by_key.get(key)
        return stats(c.times_ms)[0] if c else None

    lines = []
    for kind, ref_kind in (("empty", "empty"), ("stored", "stored"), ("stored-log", "stored"),
                           ("empty-nopyc", "empty")):  # fmt: skip
        c, ref = med_of(f"crdtsync/{kind}"), med_of(f"reference/{ref_kind}")
        hp = med_of(f"hocuspocus/{ref_kind}")
        r = common.ratio(c, ref)
        if r is not None:
            verdict = "met" if float(r) <= TARGET_RATIO else "NOT met"
            lines.append(
                f"- crdtsync `{kind}` / reference `{ref_kind}`: **{r}** "
                f"(target <= {TARGET_RATIO}: {verdict}); crdtsync / Hocuspocus "
                f"`{ref_kind}`: {common.ratio(c, hp) or '—'}"
            )
    r = common.ratio(med_of("crdtsync/many"), med_of("crdtsync/empty"))
    if r is not None:
        verdict = "met" if float(r) <= TARGET_MANY else "NOT met"
        lines.append(
            f"- crdtsync `many` ({args.docs:,} documents) / crdtsync `empty`: **{r}** "
            f"(target: as fast as an empty store, here <= {TARGET_MANY}: {verdict})"
        )
    if lines:
        report.add("Ratios of the medians (lower is better):", "", *lines, "")


def report_imports(report: Report, root: Path, args: argparse.Namespace) -> None:
    pycache = root / "pycache"
    env_pyc, env_nopyc = python_env(pycache, True), python_env(pycache, False)
    cmd = [sys.executable, "-X", "importtime", "-c", "import crdtsync.cli"]
    import_times(cmd, env_pyc, args.timeout_s)  # (fills the bytecode cache if needed)
    with_pyc = import_times(cmd, env_pyc, args.timeout_s)
    without = {m.strip(): c for m, c, _ in import_times(cmd, env_nopyc, args.timeout_s)}
    report.add(
        '### `python -X importtime -c "import crdtsync.cli"`: top 15 by cumulative time',
        "",
        "One run each; indentation shows nesting. With crdtsync's bytecode cached, and "
        "without (crdtsync compiled from source; third-party packages have their .pyc).",
        "",
    )
    report.table(
        ["module", "cumulative ms", "self ms", "cumulative ms, no .pyc"],
        [
            (f"`{m}`".replace("` ", "`\u00a0"), f"{c:.1f}", f"{s:.1f}",
             fmt(without.get(m.strip()), 1))
            for m, c, s in top_cumulative(with_pyc, 15)
        ],
    )  # fmt: skip
    try:
        procs = relay_import_times(root, env_pyc, args.timeout_s)
    except RuntimeError as exc:
        report.add(f"Relay import times not measured: {exc}", "")
        procs = []
    if procs:
        main_rows = procs[0]
        crdtsync_rows = [r for r in main_rows if r[0].strip().startswith("crdtsync")]
        first_level = [r for r in main_rows if not r[0].startswith(" ")]
        report.add(
            "### Imports of a real `python -X importtime -m crdtsync relay` start, up to "
            f"its ready line (bytecode cached): {len(main_rows)} modules, sum of self times "
            f"{sum(r[2] for r in main_rows):.0f} ms",
            "",
        )
        report.table(
            ["imported at the top level (in order)", "cumulative ms"],
            [(f"`{m}`", f"{c:.1f}") for m, c, _ in first_level if c >= 1.0],
        )
        report.table(
            ["crdtsync modules, by self time", "self ms", "cumulative ms"],
            [(f"`{m.strip()}`", f"{s:.1f}", f"{c:.1f}")
             for m, c, s in sorted(crdtsync_rows, key=lambda r: -r[2])[:12]],
        )  # fmt: skip
        for child in procs[1:]:
            roots = [r for r in child if not r[0].startswith(" ")]
            report.add(
                f"A child process also started (its last top-level import: "
                f"`{roots[-1][0] if roots else '?'}`): {len(child)} modules, "
                f"{sum(r[2] for r in child):.0f} ms of imports in a second interpreter "
                "during the relay's start.",
                "",
            )
    phases = relay_phases(root, env_pyc, args.timeout_s)
    if isinstance(phases, str):
        report.add(phases, "")
    else:
        report.add(
            "### crdtsync relay start-up steps, timed in one fresh process (bytecode "
            "cached; `crdtsync relay`'s order; the interpreter's own start is the "
            '`python -c pass` floor; "(aside)" rows time parts of `start()` alone)',
            "",
        )
        report.table(["step", "ms"], [(n, f"{ms:.1f}") for n, ms in phases])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=7, help="starts per case (7)")
    p.add_argument("--servers", default=",".join(SERVERS), help=f"subset of {','.join(SERVERS)}")
    p.add_argument("--trace", default=str(common.AUTOMERGE_PAPER), help="a .json.gz trace")
    p.add_argument("--trace-updates", type=int, default=20_000, help="txns stored (20000)")
    p.add_argument("--docs", type=int, default=100_000, help="documents in the big store")
    p.add_argument("--timeout-s", type=float, default=30.0, help="per start (30)")
    p.add_argument("--poll-ms", type=float, default=1.0, help="connect retry interval (1)")
    p.add_argument("--markdown-out", help="also write the report (Markdown) to this file")
    p.add_argument(
        "--quiet-wait-s", type=float, default=30.0,
        help="wait up to this long for an idle machine before the runs (0: don't)",
    )  # fmt: skip
    args = p.parse_args(argv)
    if not 1 <= args.runs <= 1000:
        p.error("--runs must be 1..1000")
    if not 1 <= args.docs <= 10_000_000:
        p.error("--docs must be 1..10,000,000")
    if not 1 <= args.trace_updates <= 10_000_000:
        p.error("--trace-updates must be 1..10,000,000")
    if not 0.1 <= args.poll_ms <= 1000:
        p.error("--poll-ms must be 0.1..1000")
    servers = [s.strip() for s in args.servers.split(",") if s.strip()]
    for s in servers:
        if s not in SERVERS:
            p.error(f"unknown server {s!r}; choose from {', '.join(SERVERS)}")

    report = Report("Cold start: process spawn to the first answered sync step 1")
    if any(s != "crdtsync" for s in servers):
        common.require_node(report)
        if "hocuspocus" in servers and common._node_package_version("@hocuspocus/server") is None:
            report.add(
                "Cannot run: bench/node lacks @hocuspocus/server: `npm ci --prefix bench/node`"
            )
            return 2
    if not Path(args.trace).exists():
        report.add(f"Cannot run: trace {args.trace} not found")
        return 2

    with tempfile.TemporaryDirectory(prefix="crdtsync-bench-coldstart-") as tmp:
        root = Path(tmp)
        t = time.perf_counter()
        info = prepare(args, root, servers)
        prep_s = time.perf_counter() - t
        cases = make_cases(servers, info, args.docs)
        floors = node_floors(servers)
        floors["python -c pass"] = [sys.executable, "-c", "pass"]

        busy = common.wait_for_quiet(args.quiet_wait_s) if args.quiet_wait_s > 0 else None
        machine = common.machine_info()
        machine["@hocuspocus/server"] = common._node_package_version("@hocuspocus/server")
        report.machine(machine, busy)
        describe(report, args, info, prep_s, servers)
        floor_ms, round_busy = run_rounds(cases, floors, args, root)
        if round_busy:
            report.add(
                "Machine CPU busy before each round (after a wait of up to 10 s for it to "
                "drop under 25 %): " + ", ".join(f"{b:.0%}" for b in round_busy) + ".",
                "",
            )
        report_results(report, cases, floor_ms, args)
        if "crdtsync" in servers:
            report_imports(report, root, args)
        report.write(args.markdown_out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
