"""Test helpers: bounded waits, and the process toolkit (crdtsync.testing.processes).

Relay processes, JSON-line reads, stops and the one time unit come from the toolkit that
the benchmarks and ``crdtsync check`` use too; they are re-exported here for the tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
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

__all__ = [
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
