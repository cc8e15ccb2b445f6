"""The relay's stores: the :class:`crdtsync.backend.RelayStore` backends, chosen by address.

``SqliteStore`` is the embedded default: one SQLite file (crdtsync.store.UpdateLog), one
relay process per file. Its calls are short SQLite transactions made on the caller's
thread, as the relay has always made them (a coroutine that never suspends costs about
a microsecond): nothing about a single-process deployment gets slower.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import weakref
from collections.abc import Mapping, Sequence
from concurrent.futures import Executor
from pathlib import Path
from typing import TYPE_CHECKING

from crdtsync.backend import (
    Change,
    ClientsAsRead,
    Entry,
    Follower,
    Gap,
    LinkCheckpoint,
    RelayStore,
    Since,
    StoreIdentity,
    is_redis_address,
)
from crdtsync.integrity import Ledger
from crdtsync.store import (
    CompactionResult,
    DocumentLog,
    Staged,
    Synchronous,
    UpdateLog,
    compact_file,
)

__all__ = ["SqliteFollower", "SqliteStore", "is_redis_address", "open_store"]

FOLLOW_POLL_S = 0.5  # how often a follower looks for other processes' appends
CHANGES_PAGE = 4096  # changes a follower reads at a time


def open_store(
    address: str | Path, *, synchronous: Synchronous = "NORMAL", cpu: Executor | None = None
) -> RelayStore:
    """The store at ``address``: a ``redis://``, ``rediss://`` or ``unix://`` URL (Redis,
    see crdtsync.server.redis_store), else a file path (SQLite, with ``synchronous``).
    ``cpu``: where compactions fold updates (a process pool; None: a thread).

    Raises:
        StoreError: it cannot be opened.
    """
    if is_redis_address(address):
        from .redis_store import RedisStore  # redis-py is imported only for a Redis store

        return RedisStore(address, cpu=cpu)
    return SqliteStore(address, synchronous=synchronous, cpu=cpu)


class SqliteStore:
    """:class:`~crdtsync.backend.RelayStore` on one SQLite file.

    Positions are the file's global sequence numbers. Followers see this object's own
    appends at once and other processes' within ``FOLLOW_POLL_S``. ``cpu``: where
    compactions run (see :meth:`compact`).

    Raises:
        StoreError: the file cannot be opened (see :class:`~crdtsync.store.UpdateLog`).
    """

    shared = False

    def __init__(
        self,
        path: str | Path,
        *,
        synchronous: Synchronous = "NORMAL",
        autocheckpoint: bool = True,
        cpu: Executor | None = None,
    ) -> None:
        self.address = str(path)
        self.synchronous: Synchronous = synchronous
        self._cpu = cpu
        self.log = UpdateLog(path, synchronous=synchronous, autocheckpoint=autocheckpoint)
        self._owns_log = True
        self._followers: weakref.WeakSet[SqliteFollower] = weakref.WeakSet()

    @classmethod
    def over(cls, log: UpdateLog, *, synchronous: Synchronous = "NORMAL") -> SqliteStore:
        """A view of an open :class:`UpdateLog` (the relay's own); closing it leaves the
        log open."""
        store = cls.__new__(cls)
        store.address = log.path
        store.synchronous = synchronous
        store._cpu = None
        store.log = log
        store._owns_log = False
        store._followers = weakref.WeakSet()
        return store

    async def identity(self) -> StoreIdentity:
        """This store's identity (made with the file)."""
        return StoreIdentity(*self.log.identity())

    async def new_epoch(self) -> StoreIdentity:
        """Raise the epoch: run after restoring the file from a backup."""
        return StoreIdentity(*self.log.new_epoch())

    async def append(
        self,
        rows: Sequence[tuple[str, bytes | Staged]],
        ledgers: Mapping[str, Ledger] | None = None,
        expected: Mapping[str, int | ClientsAsRead] | None = None,
        origins: Sequence[str | None] | None = None,
    ) -> list[int]:
        """See :meth:`crdtsync.backend.RelayStore.append` (one SQLite commit)."""
        positions = self.log.append_many(rows, ledgers, expected, origins)
        if positions:
            for follower in self._followers:
                follower.wake()
        return positions

    async def load(self, document: str) -> DocumentLog:
        """Snapshot and tail of ``document``; ``last_seq`` is its position."""
        return self.log.load(document)

    async def load_ledger(self, document: str) -> tuple[Ledger, int]:
        """``document``'s integrity ledger and the position it describes."""
        return self.log.ledger_at(document)

    async def position(self, document: str) -> int:
        """The position ``document`` reached (0: nothing stored)."""
        return self.log.position(document)

    async def size(self, document: str) -> tuple[int, int]:
        """``(tail updates, bytes stored)`` of ``document``."""
        return self.log.size(document)

    def follow(self) -> SqliteFollower:
        """A follower of no document yet."""
        follower = SqliteFollower(self)
        self._followers.add(follower)
        return follower

    async def compact(self, document: str) -> CompactionResult:
        """Fold ``document``'s tail into its snapshot, on a connection of its own, in
        ``cpu`` (a process pool keeps the caller's loop free: pycrdt holds the GIL while
        it merges) or, without one, a thread."""
        return await asyncio.get_running_loop().run_in_executor(
            self._cpu, compact_file, self.address, document, self.synchronous
        )

    async def last_change(self) -> int:
        """The cursor of the latest change (a position)."""
        return self.log.last_position()

    async def changes(self, cursor: int, limit: int) -> list[Change]:
        """Documents changed after ``cursor``, oldest change first (cursor: a position)."""
        return [Change(doc, p) for doc, p in self.log.changes(cursor, limit)]

    async def feed(self, cursor: int, limit: int) -> tuple[list[Change], int]:
        """Every append after ``cursor`` in order (its rows: positions are cursors)."""
        listed, end = self.log.feed(cursor, limit)
        return [Change(doc, c) for doc, c in listed], end

    async def since(self, document: str, cursor: int, until: int | None = None) -> Since:
        """``document``'s updates after change cursor ``cursor`` (a position), with origins."""
        return self.log.since(document, cursor, until)

    async def link_checkpoint(self, direction: str, region: str) -> LinkCheckpoint | None:
        """A link's checkpoint as this file recorded it."""
        return self.log.link_checkpoint(direction, region)

    async def set_link_checkpoint(self, checkpoint: LinkCheckpoint) -> None:
        """Record a link's checkpoint (one commit)."""
        self.log.set_link_checkpoint(checkpoint)

    async def lease(self, name: str, holder: str, ttl_s: float) -> bool:
        """Always held: one relay process serves an SQLite file."""
        return True

    async def close(self) -> None:
        """Close the file."""
        if self._owns_log:
            self.log.close()


class SqliteFollower:
    """:class:`~crdtsync.backend.Follower` of an :class:`SqliteStore`.

    It reads the documents changed since it last looked (:meth:`UpdateLog.changes`), then
    each followed one's tail after its position; a document whose snapshot covers more
    than its position was compacted past what the follower saw: a :class:`Gap`.
    """

    def __init__(self, store: SqliteStore) -> None:
        self._store = store
        self._positions: dict[str, int] = {}
        self._fresh: set[str] = set()  # added since the last look: read whatever moved
        self._seen = store.log.last_position()  # changes after this are new to us
        self._wake = asyncio.Event()
        self._closed = False

    def wake(self) -> None:
        """Look again now: the store appended (called by :meth:`SqliteStore.append`)."""
        self._wake.set()

    def add(self, document: str, position: int) -> None:
        """Follow ``document`` from after ``position``."""
        self._positions[document] = position
        self._fresh.add(document)
        self._wake.set()

    def remove(self, document: str) -> None:
        """Stop following ``document``."""
        self._positions.pop(document, None)
        self._fresh.discard(document)

    async def read(self, timeout_s: float) -> list[Entry | Gap]:
        """The next entries (see :meth:`crdtsync.backend.Follower.read`)."""
        deadline = time.monotonic() + timeout_s
        while not self._closed:
            self._wake.clear()
            found = self._look()
            if found:
                return found
            left = deadline - time.monotonic()
            if left <= 0:
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), min(left, FOLLOW_POLL_S))
        return []

    def _look(self) -> list[Entry | Gap]:
        log = self._store.log
        moved = set(self._fresh)
        self._fresh.clear()
        while True:
            page = log.changes(self._seen, CHANGES_PAGE)
            moved.update(doc for doc, _ in page if doc in self._positions)
            if page:
                self._seen = page[-1][1]
            if len(page) < CHANGES_PAGE:
                break
        found: list[Entry | Gap] = []
        for doc in sorted(moved):
            position = self._positions.get(doc)
            if position is None:
                continue
            tail = log.load(doc, after_seq=position)
            if tail.snapshot_seq > position:
                found.append(Gap(doc, position))
                del self._positions[doc]
                continue
            found.extend(
                Entry(doc, seq, data) for seq, data in zip(tail.seqs, tail.updates, strict=True)
            )
            if tail.seqs:
                self._positions[doc] = tail.seqs[-1]
        return found

    async def close(self) -> None:
        """Stop following everything."""
        self._closed = True
        self._positions.clear()
        self._wake.set()


if TYPE_CHECKING:

    def _conforms(store: SqliteStore, follower: SqliteFollower) -> tuple[RelayStore, Follower]:
        return store, follower  # mypy holds the backend to the interface here
