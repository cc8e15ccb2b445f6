"""Test helpers: bounded waits, and the process toolkit (crdtsync.testing.processes).

Relay processes, JSON-line reads, stops and the one time unit come from the toolkit that
the benchmarks and ``crdtsync check`` use too; they are re-exported here for the tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from crdtsync.testing.processes import (
    ProcessFailed,
    RelayProcess,
    descendants,
    read_json_line,
    stop_process,
    timeout_s,
)

EXAMPLES_DIR = Path(__file__).resolve().parent.parent / "examples"

__all__ = [
    "AsgiRelayProcess",
    "JsonLineProcess",
    "ProcessFailed",
    "RelayProcess",
    "descendants",
    "eventually",
    "read_json_line",
    "stop_process",
    "timeout_s",
]


async def eventually(
    predicate: Callable[[], Any], timeout: float = 10.0, what: str = "condition"
) -> Any:
    """Poll ``predicate`` until it returns something truthy; fail showing the last value."""
    deadline = time.monotonic() + timeout_s(timeout)
    last: Any = None
    while time.monotonic() < deadline:
        last = predicate()
        if isinstance(last, Awaitable):
            last = await last
        if last:
            return last
        await asyncio.sleep(0.02)
    raise AssertionError(
        f"timed out after {timeout_s(timeout)} s waiting for {what}; last: {last!r}"
    )


class JsonLineProcess:
    """A child process that reports JSON lines on stdout, collected by a reader thread."""

    def __init__(self, args: list[str], cwd: Path, name: str) -> None:
        import threading

        self.stderr_path = cwd / f"{name}.stderr"
        with open(self.stderr_path, "ab") as err:
            self.proc = subprocess.Popen(
                [sys.executable, *args],
                cwd=cwd,
                stdout=subprocess.PIPE,
                stderr=err,
                start_new_session=True,
            )
        self.events: list[dict[str, Any]] = []
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                event = json.loads(line)
            except ValueError:
                continue
            with self._cond:
                self.events.append(event)
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def find(self, event: str, **fields: Any) -> dict[str, Any] | None:
        with self._cond:
            for e in reversed(self.events):
                if e.get("event") == event and all(e.get(k) == v for k, v in fields.items()):
                    return e
        return None

    def wait_for(self, event: str, timeout: float = 30.0, **fields: Any) -> dict[str, Any]:
        """Block until an event line matching ``event`` and ``fields`` arrived."""
        deadline = time.monotonic() + timeout_s(timeout)
        with self._cond:
            while True:
                found = self.find(event, **fields)
                if found is not None:
                    return found
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and not self._thread.is_alive()):
                    break
                self._cond.wait(min(left, 0.2))
        raise AssertionError(
            f"no {event!r} {fields} from {self.proc.args}; last events: {self.events[-3:]}; "
            f"stderr: {self.stderr_path.read_text(errors='replace')[-3000:]}"
        )

    def kill(self) -> None:
        """SIGKILL the process (and its group), then collect what it printed."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.stop()

    def stop(self) -> None:
        """SIGTERM, then SIGKILL; the reader thread sees EOF before the pipe is closed."""
        stop_process(self.proc, 5.0)
        self._thread.join(timeout_s(5))


class AsgiRelayProcess:
    """``examples/fastapi_app.py`` under uvicorn on 127.0.0.1 (a free port): the relay
    mounted at ``/sync`` behind the example's API keys. ``url`` is where documents are
    (``ws://127.0.0.1:PORT/sync``); clients add ``params`` (the key) to their query."""

    def __init__(self, store: Path, cwd: Path, user: str = "tester", **env: str) -> None:
        self.store = store
        self.cwd = cwd
        self.key = secrets.token_urlsafe(12)
        self.params = {"key": self.key}
        self.env = {
            **os.environ,
            "EXAMPLE_API_KEYS": f"{user}:{self.key}",
            "CRDTSYNC_STORE": str(store),
            **env,
        }
        self.url = ""
        self.http = ""
        self.log = cwd / f"uvicorn-{store.stem}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> AsgiRelayProcess:
        """Start uvicorn and wait (bounded) until it says where it listens."""
        cmd = [
            sys.executable, "-m", "uvicorn", "fastapi_app:app",
            "--app-dir", str(EXAMPLES_DIR), "--host", "127.0.0.1", "--port", "0",
            "--ws-max-size", str(20 * 1024 * 1024), "--ws-max-queue", "4",
            "--timeout-graceful-shutdown", "10",
        ]  # fmt: skip
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                cmd, cwd=self.cwd, env=self.env, stdout=log, stderr=log, start_new_session=True
            )
        deadline = time.monotonic() + timeout_s(30)
        while time.monotonic() < deadline:
            found = re.search(r"Uvicorn running on http://127\.0\.0\.1:(\d+)", self.output())
            if found:
                self.http = f"http://127.0.0.1:{found[1]}/sync"
                self.url = f"ws://127.0.0.1:{found[1]}/sync"
                return self
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        self.terminate()
        raise AssertionError(f"uvicorn did not start; its log:\n{self.output()[-4000:]}")

    def output(self) -> str:
        """uvicorn's log so far (both streams)."""
        try:
            return self.log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def terminate(self) -> int | None:
        """SIGTERM (uvicorn's graceful shutdown: the relay drains), SIGKILL past a grace."""
        if self.proc is None:
            return None
        stop_process(self.proc, grace_s=timeout_s(20))
        return self.proc.returncode
