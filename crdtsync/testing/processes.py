"""Child processes a campaign drives: relays and replica workers, on loopback only.

Every process starts in its own session, announces itself on stdout (a relay its bound
URL, a worker or hostile participant ``ready``) under a deadline, and is stopped with
SIGTERM, then SIGKILL.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "ChildProcess",
    "CommandChild",
    "HostileChild",
    "ProcessFailed",
    "RelayChild",
    "WorkerChild",
]


class ProcessFailed(RuntimeError):
    """A child process died, said something unexpected, or did not answer in time."""


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
        store: Path,
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
        doc: str,
        workload: str,
        seed: int,
        cwd: Path,
        log: Path,
    ) -> None:
        argv = [
            sys.executable, "-m", "crdtsync.testing.worker", "--db", str(db), "--relay", relay,
            "--doc", doc, "--workload", workload, "--seed", str(seed),
        ]  # fmt: skip
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
