"""SyncReplica: the Replica for apps without an event loop, run on a private loop thread.

Every method is a one-line forward to :class:`~crdtsync.client.Replica` on that thread,
so the logic lives in one place (httpx's ``BaseClient`` lesson).

Threads and transactions: pycrdt transactions are not per thread (a second thread's
``doc.transaction()`` joins whatever transaction is open). The app edits documents in
its own threads while the loop thread applies remote updates, so documents opened here
are :class:`~crdtsync.client.ThreadSafeDoc`: each thread waits for a transaction of its
own. The local write still happens in the editing thread, before the edit returns.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any, TypeVar

from pycrdt import Doc

from .documents import DocumentStatus, FolderStatus
from .replica import Replica, TokenSource

__all__ = ["SyncReplica"]

T = TypeVar("T")


class SyncReplica:
    """A blocking facade over :class:`Replica`; use as ``with SyncReplica(path, relay=...)``.

    Arguments are those of :class:`Replica`. ``timeout_s`` bounds every blocking call.
    """

    def __init__(
        self,
        path: str | Path,
        relay: str | Sequence[str] | None = None,
        token: TokenSource | None = None,
        *,
        timeout_s: float = 30.0,
        **options: Any,
    ) -> None:
        self.timeout_s = timeout_s
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="crdtsync-replica", daemon=True
        )
        self._replica = Replica(path, relay, token, multithreaded=True, **options)
        self._started = False

    def _run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        future: Future[T] = asyncio.run_coroutine_threadsafe(coro, self._loop)
        return future.result(self.timeout_s if timeout is None else timeout)

    def start(self) -> None:
        """Start the loop thread and open the local file."""
        if not self._started:
            self._thread.start()
            self._started = True
        self._run(self._replica.start())

    def stop(self) -> None:
        """Close every document and the file, then stop the loop thread."""
        if not self._started:
            return
        try:
            self._run(self._replica.stop())
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(self.timeout_s)
            self._loop.close()
            self._started = False

    def __enter__(self) -> SyncReplica:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def open(self, name: str) -> Doc[Any]:
        """See :meth:`Replica.open`."""
        return self._run(self._replica.open(name))

    def close(self, name: str) -> None:
        """See :meth:`Replica.close`."""
        self._run(self._replica.close(name))

    def pending(self, name: str) -> int:
        """See :meth:`Replica.pending`."""
        return self._run(_value(self._replica.pending, name))

    def status(self, name: str) -> DocumentStatus:
        """See :meth:`Replica.status`."""
        return self._run(_value(self._replica.status, name))

    def wait_synced(self, name: str, timeout: float | None = None) -> None:
        """See :meth:`Replica.wait_synced` (raises ``SyncTimeout`` after ``timeout``)."""
        limit = None if timeout is None else timeout + self.timeout_s
        self._run(self._replica.wait_synced(name, timeout), limit)

    def keep(self, prefix: str) -> None:
        """See :meth:`Replica.keep`."""
        self._run(self._replica.keep(prefix))

    def unkeep(self, prefix: str) -> None:
        """See :meth:`Replica.unkeep`."""
        self._run(self._replica.unkeep(prefix))

    def kept(self) -> list[str]:
        """See :meth:`Replica.kept`."""
        return self._run(_call(self._replica.kept))

    def documents(self, prefix: str = "") -> list[str]:
        """See :meth:`Replica.documents`."""
        return self._run(_value(self._replica.documents, prefix))

    def pending_in(self, prefix: str) -> int:
        """See :meth:`Replica.pending_in`."""
        return self._run(_value(self._replica.pending_in, prefix))

    def folder_status(self, prefix: str) -> FolderStatus:
        """See :meth:`Replica.folder_status`."""
        return self._run(_value(self._replica.folder_status, prefix))

    def wait_synced_in(self, prefix: str, timeout: float | None = None) -> None:
        """See :meth:`Replica.wait_synced_in` (raises ``SyncTimeout`` after ``timeout``)."""
        limit = None if timeout is None else timeout + self.timeout_s
        self._run(self._replica.wait_synced_in(prefix, timeout), limit)


async def _call(fn: Callable[[], T]) -> T:
    """Call a plain method on the loop thread, where the replica's state lives."""
    return fn()


async def _value(fn: Callable[[str], T], name: str) -> T:
    """Call a plain method on the loop thread, where the replica's state lives."""
    return fn(name)
