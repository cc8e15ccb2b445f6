"""Test helpers: real relay processes on loopback, bounded waits, one time unit."""

from __future__ import annotations

import asyncio
import json
import os
import selectors
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

# Every timeout is a multiple of this unit; slow machines scale it up.
UNIT_S = float(os.environ.get("CRDTSYNC_TEST_TIMEOUT_FACTOR", "1"))


def timeout_s(n: float) -> float:
    """``n`` seconds, scaled by CRDTSYNC_TEST_TIMEOUT_FACTOR."""
    return n * UNIT_S


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


def read_json_line(
    proc: subprocess.Popen[bytes], event: str, timeout: float, lines: list[str] | None = None
) -> dict[str, Any]:
    """Read the process's stdout until a JSON line with ``{"event": event}`` appears."""
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout_s(timeout)
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    try:
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
    finally:
        sel.close()
    raise AssertionError(f"no {event!r} line from pid {proc.pid} within {timeout_s(timeout)} s")


def stderr_tail(proc: subprocess.Popen[bytes], limit: int = 4000) -> str:
    """The end of a finished process's stderr (or a note that it still runs)."""
    if proc.poll() is None or proc.stderr is None:
        return "(process still running)"
    return proc.stderr.read()[-limit:].decode(errors="replace")


def stop_process(proc: subprocess.Popen[bytes], grace_s: float = 5.0) -> None:
    """SIGTERM, wait a bounded time, then SIGKILL; close our end of its pipes."""
    try:
        _stop(proc, grace_s)
    finally:
        for pipe in (proc.stdin, proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()


def _stop(proc: subprocess.Popen[bytes], grace_s: float) -> None:
    if proc.poll() is not None:
        return
    with _suppress_lookup():
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout_s(grace_s))
    except subprocess.TimeoutExpired:
        with _suppress_lookup():
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout_s(grace_s))


class _suppress_lookup:
    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> bool:
        return exc_type is ProcessLookupError


class RelayProcess:
    """A ``crdtsync relay`` process on 127.0.0.1 that announces the port it bound.

    ``kill()`` sends SIGKILL; ``restart()`` starts it again on the same port and store.
    """

    def __init__(self, store: Path, cwd: Path, *args: str) -> None:
        self.store = store
        self.cwd = cwd
        self.args = list(args)
        self.port = 0
        self.url = ""
        self.proc: subprocess.Popen[bytes] | None = None
        self.logs: list[str] = []
        self.stderr_path = cwd / f"relay-{store.stem}.stderr"

    def start(self) -> RelayProcess:
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
        except AssertionError:
            stop_process(self.proc)
            raise AssertionError(f"relay did not start; stderr: {self.stderr()}") from None
        self.url = line["url"]
        self.port = int(self.url.rsplit(":", 1)[1])
        return self

    def kill(self) -> None:
        """SIGKILL: no shutdown, no flush; what was committed must survive."""
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGKILL)
        stop_process(self.proc)

    def terminate(self) -> int:
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
        with _suppress_lookup():
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.stop()

    def stop(self) -> None:
        """SIGTERM, then SIGKILL; the reader thread sees EOF before the pipe is closed."""
        _stop(self.proc, 5.0)
        self._thread.join(timeout_s(5))
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def descendants(pid: int) -> list[int]:
    """The process ids below ``pid`` (a relay's work and compaction processes), Linux."""
    try:
        kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return []
    return [int(k) for k in kids] + [g for k in kids for g in descendants(int(k))]
