"""Drive the Node side of the interop kit: the reference y-websocket server and stock Yjs clients.

The Node scripts live next to this file (``reference_server.mjs``, ``yjs_client.mjs``) and
need the npm packages pinned in ``package.json``; install them with :data:`INSTALL_COMMAND`.

Every process is started with ``start_new_session=True``, announces itself with one JSON
line on stdout (read under a deadline), and is stopped with SIGTERM, then SIGKILL after a
bounded wait. Every wait here is bounded; all timeouts are multiples of seconds scaled by
the ``CRDTSYNC_TEST_TIMEOUT_FACTOR`` environment variable (default 1), like websockets'
``MS`` unit. Errors carry the tail of the process's stderr.

Example::

    server = ReferenceServer()
    server.start()
    alice = YjsClient(server.url, "notes")
    alice.start()
    alice.wait_synced()
    alice.edit(["text_insert", "text", 0, "hi"])
    ...
    alice.close()
    server.stop()
"""

from __future__ import annotations

import base64
import collections
import contextlib
import itertools
import json
import os
import queue
import re
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any

__all__ = [
    "INSTALL_COMMAND",
    "INTEROP_DIR",
    "PINNED_PACKAGES",
    "TRACES_DIR",
    "MakeYjsClient",
    "NodeProcess",
    "NodeProcessError",
    "ReferenceServer",
    "YjsClient",
    "YjsCommandFailed",
    "missing_requirements",
    "scaled",
]

INTEROP_DIR = Path(__file__).resolve().parent
NODE_MODULES = INTEROP_DIR / "node_modules"
#: What CI (``.ci/run``) runs before the suite, from the repository root.
INSTALL_COMMAND = "npm ci --prefix tests/interop"
#: Real editing traces (DESIGN: Real data); override with CRDTSYNC_TRACES_DIR.
TRACES_DIR = Path(
    os.environ.get("CRDTSYNC_TRACES_DIR", INTEROP_DIR.parents[2] / "shared" / "data" / "traces")
)

#: Oldest Node that runs the kit: reference_server.mjs uses ``module.register`` (20.6).
MIN_NODE_VERSION = (20, 6)

#: The packages the scripts import, with the exact versions package.json pins.
PINNED_PACKAGES: dict[str, str] = json.loads((INTEROP_DIR / "package.json").read_text("utf-8"))[
    "dependencies"
]

STDERR_TAIL_LINES = 60


def scaled(seconds: float) -> float:
    """Return ``seconds`` multiplied by ``CRDTSYNC_TEST_TIMEOUT_FACTOR`` (default 1).

    Raises:
        ValueError: the variable is set but is not a positive number.
    """
    raw = os.environ.get("CRDTSYNC_TEST_TIMEOUT_FACTOR", "1")
    try:
        factor = float(raw)
    except ValueError:
        raise ValueError(f"CRDTSYNC_TEST_TIMEOUT_FACTOR must be a number, got {raw!r}") from None
    if not factor > 0:
        raise ValueError(f"CRDTSYNC_TEST_TIMEOUT_FACTOR must be positive, got {raw!r}")
    return seconds * factor


def missing_requirements() -> str | None:
    """Say why the interop kit cannot run here, or return None when it can.

    Checks that ``node`` is on PATH and new enough, and that every pinned package is
    installed in ``tests/interop/node_modules`` at its pinned version. The reason names
    the command that fixes it.
    """
    node = shutil.which("node")
    if node is None:
        return (
            f"node is not on PATH: install Node >= {MIN_NODE_VERSION[0]}.{MIN_NODE_VERSION[1]}, "
            f"then run `{INSTALL_COMMAND}` from the repository root"
        )
    try:
        out = subprocess.run(
            [node, "--version"], capture_output=True, text=True, timeout=scaled(10), check=True
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError) as exc:
        return f"`node --version` failed: {exc}"
    match = re.fullmatch(r"v(\d+)\.(\d+)\.\d+.*", out)
    if match is None or (int(match[1]), int(match[2])) < MIN_NODE_VERSION:
        return (
            f"node {out} is too old for the interop kit: it needs "
            f">= {MIN_NODE_VERSION[0]}.{MIN_NODE_VERSION[1]}"
        )
    for name, pinned in PINNED_PACKAGES.items():
        manifest = NODE_MODULES / name / "package.json"
        if not manifest.is_file():
            return (
                f"npm package {name} is not installed in {NODE_MODULES}: "
                f"run `{INSTALL_COMMAND}` from the repository root"
            )
        installed = json.loads(manifest.read_text("utf-8")).get("version")
        if installed != pinned:
            return (
                f"npm package {name} is {installed} in {NODE_MODULES}, package.json pins "
                f"{pinned}: run `{INSTALL_COMMAND}` from the repository root"
            )
    return None


class NodeProcessError(RuntimeError):
    """A Node process of the kit died, timed out or said something that is not JSON.

    The message ends with the tail of the process's stderr.
    """


class YjsCommandFailed(RuntimeError):
    """The Yjs client answered a command with ``{"ok": false, "error": ...}``."""

    def __init__(self, cmd: dict[str, Any], answer: dict[str, Any]) -> None:
        super().__init__(f"{cmd.get('cmd')!r} failed: {answer.get('error')}")
        self.cmd = cmd
        self.answer = answer


_EOF = object()


class NodeProcess:
    """One ``node`` script run from the kit's folder, spoken to in JSON lines.

    stdout is read line by line by a thread into a queue; stderr by another thread into a
    bounded tail (also kept for the failure report). Nothing here blocks without a deadline.
    """

    def __init__(self, script: str, args: Sequence[str], *, name: str, stdin: bool) -> None:
        self.script = script
        self.args = list(args)
        self.name = name
        self._with_stdin = stdin
        self._proc: subprocess.Popen[bytes] | None = None
        self._lines: queue.Queue[object] = queue.Queue()
        self._stderr: collections.deque[str] = collections.deque(maxlen=STDERR_TAIL_LINES)
        self._threads: list[threading.Thread] = []

    # -- lifecycle --------------------------------------------------------------------
    def start(self) -> None:
        """Start the process (the caller then reads its announcement line).

        Raises:
            RuntimeError: it is already running.
        """
        if self.running:
            raise RuntimeError(f"{self.name} is already running")
        node = shutil.which("node")
        if node is None:
            raise NodeProcessError("node is not on PATH")
        env = dict(os.environ)
        env.pop("YPERSISTENCE", None)  # the reference server stays memory-only
        env.pop("NODE_OPTIONS", None)  # no debugger or loader from the caller's shell
        self._lines = queue.Queue()
        self._stderr.clear()
        self._proc = subprocess.Popen(
            [node, str(INTEROP_DIR / self.script), *self.args],
            cwd=INTEROP_DIR,
            env=env,
            stdin=subprocess.PIPE if self._with_stdin else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        assert self._proc.stdout is not None
        assert self._proc.stderr is not None
        self._threads = [
            threading.Thread(
                target=self._read_stdout,
                args=(self._proc.stdout,),
                daemon=True,
                name=f"{self.name}-stdout",
            ),
            threading.Thread(
                target=self._read_stderr,
                args=(self._proc.stderr,),
                daemon=True,
                name=f"{self.name}-stderr",
            ),
        ]
        for thread in self._threads:
            thread.start()

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    @property
    def returncode(self) -> int | None:
        return None if self._proc is None else self._proc.poll()

    def stop(self, timeout: float | None = None) -> int | None:
        """SIGTERM, wait up to ``timeout`` (default scaled 5 s), then SIGKILL; reap it.

        Returns the exit status (negative for a signal), or None if never started.
        """
        if self._proc is None:
            return None
        if self._proc.poll() is None:
            self._signal(signal.SIGTERM)
            try:
                self._proc.wait(timeout=scaled(5) if timeout is None else timeout)
            except subprocess.TimeoutExpired:
                self._stderr.append(f"[nodekit] {self.name} ignored SIGTERM; sent SIGKILL")
                self.kill()
        return self._reap()

    def wait_exit(self, timeout: float) -> int | None:
        """Wait up to ``timeout`` seconds for the process to exit; return its status or None."""
        if self._proc is None:
            return None
        try:
            return self._proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def kill(self) -> int | None:
        """SIGKILL the process (a crash, as far as its peers can tell) and reap it."""
        if self._proc is None:
            return None
        if self._proc.poll() is None:
            self._signal(signal.SIGKILL)
        return self._reap()

    def _signal(self, signum: signal.Signals) -> None:
        assert self._proc is not None
        # The process leads its own session (start_new_session), so its group is its own.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self._proc.pid, signum)

    def _reap(self) -> int | None:
        assert self._proc is not None
        try:
            code = self._proc.wait(timeout=scaled(10))
        except subprocess.TimeoutExpired:
            raise NodeProcessError(self._describe("did not exit after SIGKILL")) from None
        if self._proc.stdin is not None:
            with contextlib.suppress(OSError):
                self._proc.stdin.close()
        for thread in self._threads:
            thread.join(timeout=scaled(5))
        for stream in (self._proc.stdout, self._proc.stderr):
            if stream is not None:
                stream.close()
        return code

    # -- I/O --------------------------------------------------------------------------
    def _read_stdout(self, stream: IO[bytes]) -> None:
        try:
            for raw in stream:
                self._lines.put(raw.decode("utf-8", errors="replace").rstrip("\r\n"))
        except (OSError, ValueError):
            pass
        finally:
            self._lines.put(_EOF)

    def _read_stderr(self, stream: IO[bytes]) -> None:
        with contextlib.suppress(OSError, ValueError):
            for raw in stream:
                self._stderr.append(raw.decode("utf-8", errors="replace").rstrip("\r\n"))

    def stderr_tail(self) -> str:
        """The last lines the process wrote to stderr (at most STDERR_TAIL_LINES)."""
        return "\n".join(self._stderr)

    def _describe(self, what: str) -> str:
        code = self.returncode
        state = "running" if code is None else f"exit status {code}"
        tail = self.stderr_tail() or "(nothing)"
        return f"{self.name} (pid {self.pid}, {state}) {what}\n--- stderr tail ---\n{tail}"

    def write_line(self, line: str) -> None:
        """Write one line to the process's stdin.

        Raises:
            NodeProcessError: the process has exited or closed its stdin.
        """
        if self._proc is None or self._proc.stdin is None:
            raise RuntimeError(f"{self.name} has no stdin (not started, or started without)")
        try:
            self._proc.stdin.write(line.encode("utf-8") + b"\n")
            self._proc.stdin.flush()
        except (BrokenPipeError, ValueError, OSError) as exc:
            raise NodeProcessError(self._describe(f"cannot take input ({exc})")) from exc

    def read_json(self, deadline: float) -> dict[str, Any]:
        """Return the next stdout line as a JSON object, waiting until ``deadline``.

        ``deadline`` is a ``time.monotonic()`` value.

        Raises:
            NodeProcessError: timeout, end of output, or a line that is not a JSON object.
        """
        remaining = deadline - time.monotonic()
        try:
            item = self._lines.get(timeout=max(remaining, 0))
        except queue.Empty:
            raise NodeProcessError(
                self._describe(f"said nothing on stdout for {max(remaining, 0):.1f} s")
            ) from None
        if item is _EOF:
            self._lines.put(_EOF)  # keep reporting the end to later readers
            # give the process a moment to exit so the message shows its status
            if self._proc is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self._proc.wait(timeout=scaled(1))
            raise NodeProcessError(self._describe("closed its stdout"))
        assert isinstance(item, str)
        try:
            value = json.loads(item)
        except json.JSONDecodeError:
            raise NodeProcessError(
                self._describe(f"wrote a line that is not JSON: {item!r}")
            ) from None
        if not isinstance(value, dict):
            raise NodeProcessError(self._describe(f"wrote a JSON line that is no object: {item!r}"))
        return value


class ReferenceServer:
    """The reference y-websocket server (``@y/websocket-server``, memory only) on loopback.

    ``start()`` binds port 0 unless a port is given and reads the announced URL;
    ``restart()`` after ``kill()`` or ``stop()`` binds the same port again (its rooms are
    gone: the reference server keeps documents in memory only).
    """

    def __init__(self, *, host: str = "127.0.0.1", name: str = "reference-server") -> None:
        self.host = host
        self.name = name
        self.url: str | None = None
        self.port: int | None = None
        self._process: NodeProcess | None = None

    def start(self, port: int = 0, timeout: float | None = None) -> str:
        """Start the server on ``port`` (0: any free port) and return its ``ws://`` URL.

        Raises:
            NodeProcessError: it exited, or did not announce itself within ``timeout``
                (default scaled 15 s).
        """
        process = NodeProcess(
            "reference_server.mjs",
            ["--host", self.host, "--port", str(port)],
            name=self.name,
            stdin=False,
        )
        self._process = process
        process.start()
        deadline = time.monotonic() + (scaled(15) if timeout is None else timeout)
        try:
            line = process.read_json(deadline)
            if line.get("event") != "listening" or not isinstance(line.get("url"), str):
                raise NodeProcessError(process._describe(f"announced {line!r}, not 'listening'"))
        except BaseException:
            process.kill()
            raise
        self.url = line["url"]
        self.port = int(self.url.rsplit(":", 1)[1])
        return self.url

    def restart(self, timeout: float | None = None) -> str:
        """Stop the server if it runs, then start it again on the port it announced."""
        if self.port is None:
            raise RuntimeError(f"{self.name} has never listened; call start() first")
        self.stop()
        return self.start(self.port, timeout)

    def kill(self) -> int | None:
        """SIGKILL the server (a crash): connections drop without a close frame."""
        return None if self._process is None else self._process.kill()

    def stop(self, timeout: float | None = None) -> int | None:
        """SIGTERM the server, then SIGKILL after ``timeout``; return its exit status."""
        return None if self._process is None else self._process.stop(timeout)

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.running

    def stderr_tail(self) -> str:
        return "" if self._process is None else self._process.stderr_tail()


class YjsClient:
    """A stock Yjs client (y-websocket's ``WebsocketProvider``) in a Node process.

    ``call(cmd)`` sends one command and returns its answer; the helpers (``edit``,
    ``wait_text``...) raise :class:`YjsCommandFailed` on ``{"ok": false}``. Commands and
    answers are listed at the top of ``yjs_client.mjs``. Text indices are UTF-16 code
    units (Yjs's unit) unless ``index_unit="codepoint"`` is passed to ``edit``.
    """

    _ids = itertools.count(1)

    def __init__(
        self,
        url: str,
        room: str,
        *,
        params: dict[str, str] | None = None,
        offline: bool = False,
        resync_ms: int | None = None,
        max_backoff_ms: int | None = None,
        name: str | None = None,
    ) -> None:
        args = ["--url", url, "--room", room]
        if params:
            args += ["--params", *(f"{k}={v}" for k, v in params.items())]
        if offline:
            args.append("--offline")
        if resync_ms is not None:
            args += ["--resync-ms", str(resync_ms)]
        if max_backoff_ms is not None:
            args += ["--max-backoff-ms", str(max_backoff_ms)]
        self.name = name or f"yjs-client[{room}]"
        self.client_id: int | None = None
        self.provider_url: str | None = None
        self._process = NodeProcess("yjs_client.mjs", args, name=self.name, stdin=True)

    def start(self, timeout: float | None = None) -> YjsClient:
        """Start the client and wait for its ``ready`` line (default scaled 15 s)."""
        self._process.start()
        deadline = time.monotonic() + (scaled(15) if timeout is None else timeout)
        try:
            ready = self._process.read_json(deadline)
            if ready.get("event") != "ready":
                raise NodeProcessError(self._process._describe(f"announced {ready!r}"))
        except BaseException:
            self._process.kill()
            raise
        self.client_id = ready["client_id"]
        self.provider_url = ready["url"]
        return self

    def call(self, cmd: dict[str, Any], timeout: float | None = None) -> dict[str, Any]:
        """Send one command and return its answer, ``{"ok": false, ...}`` included.

        ``timeout`` (seconds) defaults to the command's own ``timeout_ms`` plus a scaled
        5 s margin, or scaled 10 s. An answer to an earlier command that timed out is
        skipped (answers carry the command's id).

        Raises:
            NodeProcessError: no answer in time, or the process died (with stderr tail).
        """
        request_id = next(self._ids)
        message = {**cmd, "id": request_id}
        if timeout is None:
            timeout_ms = cmd.get("timeout_ms")
            timeout = (
                timeout_ms / 1000 + scaled(5) if isinstance(timeout_ms, int | float) else scaled(10)
            )
        deadline = time.monotonic() + timeout
        self._process.write_line(json.dumps(message))
        while True:
            try:
                answer = self._process.read_json(deadline)
            except NodeProcessError as exc:
                raise NodeProcessError(f"{cmd.get('cmd')!r}: {exc}") from None
            if answer.get("id") == request_id:
                answer.pop("id")
                return answer

    def check(self, cmd: dict[str, Any], timeout: float | None = None) -> dict[str, Any]:
        """Like :meth:`call`, but raise :class:`YjsCommandFailed` unless the answer is ok."""
        answer = self.call(cmd, timeout)
        if answer.get("ok") is not True:
            raise YjsCommandFailed(cmd, answer)
        return answer

    # -- helpers, one per command -----------------------------------------------------
    def connect(self) -> dict[str, Any]:
        return self.check({"cmd": "connect"})

    def disconnect(self) -> dict[str, Any]:
        return self.check({"cmd": "disconnect"})

    def status(self) -> dict[str, Any]:
        return self.check({"cmd": "status"})

    def errors(self) -> list[dict[str, Any]]:
        """What the provider reported through console.error/console.warn, and uncaught errors."""
        errors: list[dict[str, Any]] = self.check({"cmd": "errors"})["errors"]
        return errors

    def wait_synced(self, timeout: float = 10) -> dict[str, Any]:
        """Wait until ``provider.synced`` (the server's step 2 arrived); scaled seconds."""
        return self.check({"cmd": "wait_synced", "timeout_ms": _ms(timeout)})

    def wait_status(
        self, *, connected: bool | None = None, synced: bool | None = None, timeout: float = 10
    ) -> dict[str, Any]:
        """Wait until the provider's connected/synced flags are as given (None: any)."""
        cmd: dict[str, Any] = {"cmd": "wait_status", "timeout_ms": _ms(timeout)}
        if connected is not None:
            cmd["connected"] = connected
        if synced is not None:
            cmd["synced"] = synced
        return self.check(cmd)

    def edit(self, *ops: Sequence[Any], index_unit: str = "utf16") -> dict[str, Any]:
        """Apply ``ops`` in one ``doc.transact`` (see yjs_client.mjs for the op list)."""
        return self.check(
            {"cmd": "edit", "ops": [list(op) for op in ops], "index_unit": index_unit}
        )

    def state(
        self,
        *,
        text: Sequence[str] | None = None,
        map: Sequence[str] | None = None,
        array: Sequence[str] | None = None,
    ) -> dict[str, Any]:
        """``toJSON`` of the named root types, or of every root the doc knows if none named."""
        cmd: dict[str, Any] = {"cmd": "state"}
        for key, names in (("text", text), ("map", map), ("array", array)):
            if names is not None:
                cmd[key] = list(names)
        answer = self.check(cmd)
        answer.pop("ok")
        return answer

    def wait_text(self, name: str, equals: str, timeout: float = 10) -> dict[str, Any]:
        return self.check(
            {"cmd": "wait_text", "name": name, "equals": equals, "timeout_ms": _ms(timeout)}
        )

    def wait_state(
        self,
        *,
        text: dict[str, str] | None = None,
        map: dict[str, Any] | None = None,
        array: dict[str, list[Any]] | None = None,
        timeout: float = 10,
    ) -> dict[str, Any]:
        """Wait until the named roots equal the given JSON (a timeout shows the last state)."""
        return self.check(
            {
                "cmd": "wait_state",
                "text": text or {},
                "map": map or {},
                "array": array or {},
                "timeout_ms": _ms(timeout),
            }
        )

    def state_vector(self) -> bytes:
        return base64.b64decode(self.check({"cmd": "state_vector"})["state_vector"])

    def update(self, state_vector: bytes | None = None) -> bytes:
        cmd: dict[str, Any] = {"cmd": "update"}
        if state_vector is not None:
            cmd["state_vector"] = base64.b64encode(state_vector).decode("ascii")
        return base64.b64decode(self.check(cmd)["update"])

    def apply_update(self, update: bytes) -> dict[str, Any]:
        return self.check(
            {"cmd": "apply_update", "update": base64.b64encode(update).decode("ascii")}
        )

    def wait_covers(self, state_vector: bytes, timeout: float = 10) -> dict[str, Any]:
        """Wait until this doc holds every clock of ``state_vector`` (e.g. a peer's)."""
        return self.check(
            {
                "cmd": "wait_covers",
                "state_vector": base64.b64encode(state_vector).decode("ascii"),
                "timeout_ms": _ms(timeout),
            }
        )

    def awareness_set(self, state: dict[str, Any] | None) -> dict[str, Any]:
        return self.check({"cmd": "awareness_set", "state": state})

    def awareness_states(self) -> dict[int, Any]:
        states = self.check({"cmd": "awareness_states"})["states"]
        return {int(client): state for client, state in states.items()}

    def apply_trace(
        self,
        path: Path | str,
        limit: int | None = None,
        *,
        name: str = "text",
        timeout: float = 120,
    ) -> dict[str, Any]:
        """Type the first ``limit`` txns of a gzipped editing trace into Y.Text ``name``."""
        cmd: dict[str, Any] = {"cmd": "apply_trace", "path": str(path), "name": name}
        if limit is not None:
            cmd["limit"] = limit
        return self.check(cmd, timeout=scaled(timeout))

    # -- end --------------------------------------------------------------------------
    def close(self, timeout: float | None = None) -> int | None:
        """Ask the client to quit; SIGTERM then SIGKILL if it does not within ``timeout``."""
        timeout = scaled(5) if timeout is None else timeout
        if self._process.running:
            with contextlib.suppress(NodeProcessError):
                self.call({"cmd": "quit"}, timeout=timeout)
                # it closes its websocket (bounded at 0.5 s) before exiting
                self._process.wait_exit(timeout)
        return self._process.stop(timeout)

    def kill(self) -> int | None:
        """SIGKILL the client: its socket drops without a close frame."""
        return self._process.kill()

    @property
    def running(self) -> bool:
        return self._process.running

    def stderr_tail(self) -> str:
        return self._process.stderr_tail()


#: The type of the ``make_yjs_client`` fixture: ``make(url, room, **YjsClient kwargs)``.
MakeYjsClient = Callable[..., YjsClient]


def _ms(timeout_s: float) -> int:
    return max(1, round(scaled(timeout_s) * 1000))
