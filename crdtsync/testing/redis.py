"""A ``redis-server`` process of the caller's own, for tests, benchmarks and ``crdtsync check``.

Never the machine's shared instance: each :class:`RedisServer` runs Debian's (or any)
``redis-server`` binary on a free loopback port, with its own directory, appending every
write to its AOF and fsyncing it before answering (``appendfsync always``), so that a
SIGKILL and a restart from the same directory lose nothing Redis acknowledged.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from .processes import stop_process

__all__ = ["RedisServer", "RedisUnavailable", "redis_server_binary"]

START_TIMEOUT_S = 20.0


class RedisUnavailable(RuntimeError):
    """No ``redis-server`` binary, or it did not start."""


def redis_server_binary() -> str | None:
    """The ``redis-server`` to run: ``$CRDTSYNC_REDIS_SERVER``, else the one on PATH."""
    return os.environ.get("CRDTSYNC_REDIS_SERVER") or shutil.which("redis-server")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    """One ``redis-server`` on 127.0.0.1, data in ``directory``.

    Args:
        directory: its working directory (AOF, log); created if missing.
        port: None picks a free port at the first start (kept across restarts).
        extra: more ``redis-server`` arguments (e.g. ``["--maxmemory-policy", "allkeys-lru"]``).
    """

    def __init__(
        self, directory: Path, *, port: int | None = None, extra: list[str] | None = None
    ) -> None:
        self.directory = Path(directory)
        self.port = port
        self.extra = list(extra or [])
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:<port>/0``."""
        if self.port is None:
            raise RuntimeError("redis-server not started")
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        """Start (or restart from the same directory) and wait until it answers PING.

        Raises:
            RedisUnavailable: no binary, or it did not answer in time.
        """
        binary = redis_server_binary()
        if binary is None:
            raise RedisUnavailable("redis-server not found (apt-get install redis-server)")
        self.directory.mkdir(parents=True, exist_ok=True)
        for attempt in range(5):
            port = self.port if self.port is not None else _free_port()
            argv = [
                binary,
                "--bind", "127.0.0.1",
                "--port", str(port),
                "--dir", str(self.directory),
                "--appendonly", "yes",
                "--appendfsync", "always",
                "--save", "",
                "--daemonize", "no",
                "--logfile", "redis.log",
                *self.extra,
            ]  # fmt: skip
            self.proc = subprocess.Popen(
                argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
            )
            if self._wait_ready(port):
                self.port = port
                return self
            self.kill()
            if self.port is not None and attempt >= 2:
                break
        raise RedisUnavailable(f"redis-server did not start; its log: {self.log_tail()}")

    def _wait_ready(self, port: int) -> bool:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                return False
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", port), timeout=1.0) as s,
            ):
                s.sendall(b"PING\r\n")
                if s.recv(64).startswith((b"+PONG", b"-NOAUTH")):  # (up, with a password)
                    return True
            time.sleep(0.02)
        return False

    def log_tail(self, limit: int = 2000) -> str:
        try:
            return (self.directory / "redis.log").read_text(errors="replace")[-limit:]
        except FileNotFoundError:
            return ""

    def kill(self) -> None:
        """SIGKILL: what was acknowledged is in the AOF (fsynced), the rest is gone."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        self.stop()

    def stop(self, grace_s: float = 10.0) -> None:
        """SIGTERM (Redis finishes its AOF), then SIGKILL after ``grace_s``."""
        if self.proc is not None:
            stop_process(self.proc, grace_s)
        self.proc = None

    def wipe(self) -> None:
        """Stop, and delete everything it stored: the next start is an empty Redis."""
        self.kill()
        for path in self.directory.iterdir():
            if path.is_dir():
                shutil.rmtree(path)
            elif path.name != "redis.log":
                path.unlink()

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
