"""Child processes for tests, benchmarks and ``crdtsync check``: the one toolkit.

Every process starts in its own session, announces itself on stdout with a JSON line (a
relay its bound URL, a worker or hostile participant ``ready``) under a deadline, and is
stopped with SIGTERM to its whole session, then SIGKILL. The campaign drives children
from asyncio (:class:`ChildProcess` and its kinds); tests and benchmarks drive them with
plain ``subprocess`` (:func:`read_json_line`, :func:`stop_process`, :class:`RelayProcess`).
Every wait is bounded; :func:`timeout_s` scales them all on a slow machine.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import selectors
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "ChildProcess",
    "CommandChild",
    "HostileChild",
    "ProcessFailed",
    "RelayChild",
    "RelayProcess",
    "WorkerChild",
    "descendants",
    "read_json_line",
    "stop_process",
    "timeout_s",
]


class ProcessFailed(RuntimeError):
    """A child process died, said something unexpected, or did not answer in time."""


def timeout_s(n: float) -> float:
    """``n`` seconds, scaled by ``CRDTSYNC_TEST_TIMEOUT_FACTOR`` (default 1): every wait of
    the tests and benchmarks is a multiple of it, so a slow machine scales them all."""
    return n * float(os.environ.get("CRDTSYNC_TEST_TIMEOUT_FACTOR", "1"))


def read_json_line(
    proc: subprocess.Popen[bytes], event: str, timeout: float, lines: list[str] | None = None
) -> dict[str, Any]:
    """Read ``proc``'s stdout until a JSON line ``{"event": event, ...}``; other lines are
    skipped (and kept in ``lines``).

    Raises:
        ProcessFailed: the process ended, or no such line came within ``timeout`` (scaled).
    """
    assert proc.stdout is not None
    limit = timeout_s(timeout)
    deadline = time.monotonic() + limit
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        while (left := deadline - time.monotonic()) > 0:
            if not sel.select(left):
                break
            line = proc.stdout.readline()
            if not line:
                break
            text = line.decode(errors="replace").strip()
            if lines is not None:
                lines.append(text)
            try:
                data = json.loads(text)
            except ValueError:
                continue
            if isinstance(data, dict) and data.get("event") == event:
                return data
    raise ProcessFailed(f"no {event!r} line from pid {proc.pid} within {limit:g} s")


def stop_process(proc: subprocess.Popen[Any], grace_s: float = 5.0) -> None:
    """SIGTERM ``proc``'s session, wait a bounded time, then SIGKILL what is left of it
    (its leader may be gone while its workers live on); close our end of its pipes."""
    try:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout_s(grace_s))
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout_s(grace_s))
    finally:
        for pipe in (proc.stdin, proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()


def descendants(pid: int) -> list[int]:
    """The process ids below ``pid`` (a relay's work and compaction processes), Linux."""
    try:
        kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return []
    return [int(k) for k in kids] + [g for k in kids for g in descendants(int(k))]


class RelayProcess:
    """A ``crdtsync relay`` process on 127.0.0.1 that announces the port it bound.

    ``kill()`` sends SIGKILL; ``restart()`` starts it again on the same port and store.
    """

    def __init__(self, store: Path | str, cwd: Path, *args: str) -> None:
        self.store = store
        self.cwd = cwd
        self.args = list(args)
        self.port = 0
        self.url = ""
        self.proc: subprocess.Popen[bytes] | None = None
        self.logs: list[str] = []
        stem = Path(store).stem if isinstance(store, Path) else "redis"
        self.stderr_path = cwd / f"relay-{stem}.stderr"

    def start(self) -> RelayProcess:
        """Start it and wait for its ``listening`` line.

        Raises:
            ProcessFailed: it did not start (its stderr is in the message).
        """
        cmd = [
            sys.executable, "-m", "crdtsync", "relay",
            "--host", "127.0.0.1", "--port", str(self.port), "--store", str(self.store),
            *self.args,
        ]  # fmt: skip
        # stderr goes to a file: an unread pipe would fill up and block the relay.
        with open(self.stderr_path, "ab") as err:
            self.proc = subprocess.Popen(
                cmd, cwd=self.cwd, stdout=subprocess.PIPE, stderr=err, start_new_session=True
            )
        try:
            line = read_json_line(self.proc, "listening", timeout=30, lines=self.logs)
        except ProcessFailed:
            stop_process(self.proc)
            raise ProcessFailed(f"relay did not start; stderr: {self.stderr()}") from None
        self.url = line["url"]
        self.port = int(self.url.rsplit(":", 1)[1])
        return self

    def kill(self) -> None:
        """SIGKILL: no shutdown, no flush; what was committed must survive."""
        assert self.proc is not None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        stop_process(self.proc)

    def terminate(self) -> int:
        """SIGTERM (a drain), then SIGKILL past the grace; its exit status."""
        assert self.proc is not None
        stop_process(self.proc)
        return self.proc.returncode

    def restart(self) -> RelayProcess:
        if self.proc is not None and self.proc.poll() is None:
            self.kill()
        return self.start()

    def stderr(self, limit: int = 4000) -> str:
        """The end of the relay's stderr log (all runs)."""
        try:
            return self.stderr_path.read_text(errors="replace")[-limit:]
        except FileNotFoundError:
            return ""


class ChildProcess:
    """A process that speaks JSON lines on stdout; stderr goes to a log file."""

    def __init__(self, argv: Sequence[str], *, cwd: Path, log: Path) -> None:
        self.argv = list(argv)
        self.cwd = cwd
        self.log = log
        self.proc: asyncio.subprocess.Process | None = None

    async def spawn(self, stdin: bool = False) -> None:
        # A local log file opens instantly; the child writes to it directly.
        with open(self.log, "ab") as err:  # noqa: ASYNC230
            self.proc = await asyncio.create_subprocess_exec(
                *self.argv,
                cwd=self.cwd,
                stdin=asyncio.subprocess.PIPE if stdin else asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=err,
                start_new_session=True,
                limit=64 * 1024 * 1024,
            )

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    def stderr_tail(self, limit: int = 2000) -> str:
        try:
            return self.log.read_text(errors="replace")[-limit:]
        except FileNotFoundError:
            return ""

    async def read_json(self, timeout_s: float) -> dict[str, Any]:
        """The next JSON object line on stdout (other lines are skipped)."""
        assert self.proc is not None
        assert self.proc.stdout is not None
        async with asyncio.timeout(timeout_s):
            while True:
                line = await self.proc.stdout.readline()
                if not line:
                    raise ProcessFailed(
                        f"{self.argv[:4]} exited ({self.proc.returncode}); "
                        f"stderr: {self.stderr_tail()}"
                    )
                try:
                    data = json.loads(line)
                except ValueError:
                    continue
                if isinstance(data, dict):
                    return data

    def death(self) -> str:
        """How the process ended, for a report: exit status or signal, and its last words."""
        code = None if self.proc is None else self.proc.returncode
        if code is None:
            how = "is still running"
        elif code < 0:
            try:
                how = f"was killed by {signal.Signals(-code).name}"
            except ValueError:
                how = f"was killed by signal {-code}"
        else:
            how = f"exited with status {code}"
        lines = [line for line in self.stderr_tail().splitlines() if line.strip()]
        return how + (f" ({lines[-1].strip()})" if lines else "")

    async def kill(self) -> None:
        """SIGKILL the whole process group: no shutdown code runs."""
        if self.proc is None or self.proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        await self.proc.wait()

    async def stop(self, grace_s: float = 5.0) -> None:
        """SIGTERM, a bounded wait, then SIGKILL."""
        if self.proc is None or self.proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            async with asyncio.timeout(grace_s):
                await self.proc.wait()
        except TimeoutError:
            await self.kill()


class RelayChild(ChildProcess):
    """A relay process; restarts reuse the port and store of its first start."""

    def __init__(
        self,
        command: Sequence[str],
        store: Path | str,
        *,
        cwd: Path,
        log: Path,
        extra: Sequence[str] = (),
    ) -> None:
        super().__init__([], cwd=cwd, log=log)
        self.command = list(command)
        self.store = store
        self.extra = list(extra)
        self.port = 0
        self.url = ""

    async def start(self, timeout_s: float = 30.0) -> str:
        self.argv = [
            *self.command,
            "--host", "127.0.0.1", "--port", str(self.port), "--store", str(self.store),
            *self.extra,
        ]  # fmt: skip
        await self.spawn()
        line = await self.read_json(timeout_s)
        if line.get("event") != "listening":
            raise ProcessFailed(f"relay announced {line!r} instead of listening")
        self.url = str(line["url"])
        self.port = int(self.url.rsplit(":", 1)[1])
        return self.url


class CommandChild(ChildProcess):
    """A child that announces ``ready`` and then answers one JSON line per command."""

    def __init__(self, argv: Sequence[str], *, cwd: Path, log: Path) -> None:
        super().__init__(argv, cwd=cwd, log=log)
        self.client_id: int | None = None

    async def start(self, timeout_s: float = 30.0) -> None:
        await self.spawn(stdin=True)
        ready = await self.read_json(timeout_s)
        if ready.get("event") != "ready":
            raise ProcessFailed(f"worker announced {ready!r}; stderr: {self.stderr_tail()}")
        self.client_id = int(ready["client_id"])

    async def call(self, cmd: dict[str, Any], timeout_s: float = 30.0) -> dict[str, Any]:
        """Send one command and return its answer."""
        assert self.proc is not None
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write((json.dumps(cmd) + "\n").encode())
            await self.proc.stdin.drain()
        except (BrokenPipeError, ConnectionResetError) as exc:
            raise ProcessFailed(f"worker is gone: {exc}; stderr: {self.stderr_tail()}") from exc
        try:
            return await self.read_json(timeout_s)
        except TimeoutError:
            raise ProcessFailed(
                f"worker did not answer {cmd.get('cmd')!r} in {timeout_s} s; "
                f"stderr: {self.stderr_tail()}"
            ) from None

    async def quit(self) -> None:
        if not self.running:
            return
        with contextlib.suppress(ProcessFailed, TimeoutError):
            await self.call({"cmd": "quit"}, timeout_s=10)
        await self.stop()


class WorkerChild(CommandChild):
    """A replica worker (``crdtsync.testing.worker``) answering one JSON line per command."""

    def __init__(
        self,
        *,
        db: Path,
        relay: str,
        doc: str | None,
        workload: str,
        seed: int,
        cwd: Path,
        log: Path,
        keep: str | None = None,
        max_open: int | None = None,
        token: str | None = None,
    ) -> None:
        """One document (``doc``), or many: every document under ``keep``, at most
        ``max_open`` of them open at once. ``token``: for relays that require one."""
        which = ["--doc", doc] if doc is not None else []
        which += ["--keep", keep] if keep is not None else []
        argv = [
            sys.executable, "-m", "crdtsync.testing.worker", "--db", str(db), "--relay", relay,
            *which, "--workload", workload, "--seed", str(seed),
        ]  # fmt: skip
        argv += ["--max-open", str(max_open)] if max_open is not None else []
        argv += ["--token", token] if token is not None else []
        super().__init__(argv, cwd=cwd, log=log)


class HostileChild(CommandChild):
    """A hostile participant (``crdtsync.testing.hostile``): a stock client that attacks."""

    def __init__(
        self, *, relay: str, doc: str, workload: str, seed: int, cwd: Path, log: Path
    ) -> None:
        argv = [
            sys.executable, "-m", "crdtsync.testing.hostile", "--relay", relay, "--doc", doc,
            "--workload", workload, "--seed", str(seed),
        ]  # fmt: skip
        super().__init__(argv, cwd=cwd, log=log)
