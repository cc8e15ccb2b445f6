"""The relay's store, as one interface: what every backend gives the relay (issue 10).

The relay keeps three things per document behind this interface: its update log (a
snapshot plus the tail of updates since), its integrity ledger
(:class:`~crdtsync.integrity.Ledger`), and its *position*. Two backends implement it:
an SQLite file (``crdtsync.server.stores.SqliteStore``: the embedded default, one relay
process per file) and Redis (any number of relay processes on one Redis).

Positions. Every append gives each appended update a position in its document: positive,
strictly increasing within the document, never reused. A load says which position its
content reached; a follower resumes after a position; an append can be made conditional
on a document still being at the position its ledger was judged at, which is how the
integrity rule holds when several processes write one document (the first committed
write wins; the other is judged again against what won). SQLite's positions are its
global sequence numbers (so a position is also a change cursor); Redis's are each
document's own count.

Changes. :meth:`RelayStore.changes` lists the documents changed since a cursor, in the
order of their last change: what region peering reads to know what to send.

Identity. A store has an id, made when it is created (an emptied Redis or a new file gets
a new one), and an epoch, raised when a store is restored from a backup
(:meth:`RelayStore.new_epoch`): a peer that remembers positions of this store knows
from either that they no longer hold.

Nothing here does I/O: the backends live in the server layer.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeGuard

from .errors import CrdtsyncError, PositionConflict
from .integrity import ClientsAsRead, Ledger
from .store import CompactionResult, DocumentLog, LinkCheckpoint, Since, Staged

__all__ = [
    "Change",
    "ClientsAsRead",
    "Entry",
    "FeedGap",
    "Follower",
    "Gap",
    "LinkCheckpoint",
    "PositionConflict",
    "RelayStore",
    "Since",
    "StoreIdentity",
    "is_redis_address",
]


def is_redis_address(address: object) -> TypeGuard[str]:
    """Whether ``address`` names a Redis store (``redis://``, ``rediss://``, ``unix://``)
    rather than an SQLite file."""
    return isinstance(address, str) and address.startswith(("redis://", "rediss://", "unix://"))


class FeedGap(CrdtsyncError):
    """The store no longer lists its appends as far back as was asked
    (:meth:`RelayStore.feed`): they were trimmed, or written before it listed them."""


@dataclass(frozen=True, slots=True)
class StoreIdentity:
    """Which store this is: ``id`` is made with the store, ``epoch`` rises at a restore."""

    id: str
    epoch: int


@dataclass(frozen=True, slots=True)
class Entry:
    """One appended update of a followed document, at its position."""

    document: str
    position: int
    update: bytes


@dataclass(frozen=True, slots=True)
class Gap:
    """A follower can no longer tell what came after ``position`` of ``document`` (it was
    compacted away, or lost): load the document again and follow from what the load says."""

    document: str
    position: int


@dataclass(frozen=True, slots=True)
class Change:
    """``document`` changed; ``cursor`` orders changes: pass the last one to see later ones."""

    document: str
    cursor: int


class Follower(Protocol):
    """New entries of a set of documents, from given positions, as they are appended."""

    def add(self, document: str, position: int) -> None:
        """Follow ``document`` from after ``position`` (again, if it was followed)."""

    def remove(self, document: str) -> None:
        """Stop following ``document``; what was read of it and not yet returned is dropped."""

    async def read(self, timeout_s: float) -> list[Entry | Gap]:
        """The next entries, in each document's order; empty after ``timeout_s`` with none.

        A document's entries come once each, in position order, with no position
        skipped unnoticed: where entries are missing, a :class:`Gap` comes instead and
        the document is followed from nothing until it is added again.

        Raises:
            StoreError: the store cannot be read (the follower can be read again later).
        """
        ...

    async def close(self) -> None:
        """Stop following everything."""


class RelayStore(Protocol):
    """What the relay needs of its store; every method raises StoreError on failure.

    Attributes:
        address: where the store is (a file path, or a ``redis://`` URL); work
            processes open it from this.
        shared: other processes may append to the same documents (the relay then
            follows the documents it serves, and makes its appends conditional).
    """

    address: str
    shared: bool

    async def identity(self) -> StoreIdentity:
        """This store's identity (made on first use)."""
        ...

    async def new_epoch(self) -> StoreIdentity:
        """Raise the epoch: run after restoring the store from a backup."""
        ...

    async def append(
        self,
        rows: Sequence[tuple[str, bytes | Staged]],
        ledgers: Mapping[str, Ledger] | None = None,
        expected: Mapping[str, int | ClientsAsRead] | None = None,
        origins: Sequence[str | None] | None = None,
    ) -> list[int]:
        """Append updates to their documents, and write what changed in ``ledgers``
        (then marked clean), durably and all at once; return the updates' positions.
        ``origins``: per row, the region it came from over a link (None: this one's).

        Each document's updates and ledger are written together or not at all. With
        ``expected`` (document -> position, or the ledger entries of some clients as
        the judgement read them), a document no longer as expected gets nothing
        written; the others are appended.

        Raises:
            PositionConflict: documents of ``expected`` moved on (its ``appended`` holds
                the positions of the rows that were appended, 0 for the others).
                :class:`~crdtsync.errors.DocumentsFailed`, one of them: some documents
                failed on their own (nothing of them written), the others as said.
            StoreError: the store failed: the caller takes nothing as appended (some
                documents may have been: a repeat of them later is harmless).
        """
        ...

    async def load(self, document: str) -> DocumentLog:
        """Snapshot and tail of ``document`` in one consistent read; ``last_seq`` is the
        position its content reached."""
        ...

    async def load_ledger(self, document: str) -> tuple[Ledger, int]:
        """``document``'s integrity ledger, and the position it describes."""
        ...

    async def position(self, document: str) -> int:
        """The position ``document`` reached (0: nothing stored)."""
        ...

    async def size(self, document: str) -> tuple[int, int]:
        """``(tail updates, bytes stored)`` of ``document``."""
        ...

    def follow(self) -> Follower:
        """A follower of no document yet (:meth:`Follower.add` documents to it)."""
        ...

    async def compact(self, document: str) -> CompactionResult:
        """Fold ``document``'s tail into its snapshot; safe against concurrent appends and
        compactions, and against a process killed at any point."""
        ...

    async def changes(self, cursor: int, limit: int) -> list[Change]:
        """Documents changed after ``cursor``, oldest change first, at most ``limit``;
        each document once, at its latest change."""
        ...

    async def last_change(self) -> int:
        """The cursor of the latest change: :meth:`changes` after it lists only later ones."""
        ...

    async def feed(self, cursor: int, limit: int) -> tuple[list[Change], int]:
        """Every append after ``cursor`` in order (a document once per append, at most
        ``limit``), and the cursor the listing is complete up to: what a region's link
        ships in order, so that its checkpoint covers everything before it.

        Raises:
            FeedGap: the store no longer lists appends that far back (the link then
                compares state vectors instead).
        """
        ...

    async def since(self, document: str, cursor: int, until: int | None = None) -> Since:
        """``document``'s updates appended after change cursor ``cursor`` (up to
        ``until``), with their origins; ``complete`` False if a compaction folded some of
        them away."""
        ...

    async def link_checkpoint(self, direction: str, region: str) -> LinkCheckpoint | None:
        """A link's checkpoint as this store recorded it (None: none)."""
        ...

    async def set_link_checkpoint(self, checkpoint: LinkCheckpoint) -> None:
        """Record a link's checkpoint, durably."""
        ...

    async def lease(self, name: str, holder: str, ttl_s: float) -> bool:
        """Take or renew the lease ``name`` for ``holder`` (for ``ttl_s``); whether it
        holds it. One relay process per region runs each link (one process per SQLite
        file: always granted there)."""
        ...

    async def close(self) -> None:
        """Release the store (what was appended is durable already)."""
        ...
