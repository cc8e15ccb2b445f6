"""What a replica holds per document, per link and per kept folder (issue 11's parts).

Plain state, no behaviour beyond its own invariants: the :class:`~crdtsync.client.Replica`
and its parts (:mod:`.folders`, :mod:`.presence`) act on it; one document's protocol on a
link is :class:`crdtsync.docsync.DocumentSync`.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from pycrdt import Doc, Subscription, get_state, get_update
from websockets.asyncio.client import ClientConnection

from crdtsync.docsync import AckOrder, DocumentSync, HeldUpdates
from crdtsync.folders import Cursor
from crdtsync.store import EMPTY_UPDATE, merge_in_batches
from crdtsync.sync import SyncSession

from .backoff import Backoff
from .presence import Presence

__all__ = [
    "DocumentStatus",
    "FolderStatus",
    "KeptFolder",
    "Link",
    "LocalDocument",
    "MuxLink",
    "StoredDoc",
    "ThreadSafeDoc",
]


class ThreadSafeDoc(Doc[Any]):
    """A ``pycrdt.Doc`` whose root transactions are serialised across threads.

    pycrdt transactions are not per thread: a second thread's ``doc.transaction()``
    joins whatever transaction is open, and pycrdt releases its lock before it clears
    the current transaction. A reentrant lock held for the whole root transaction, from
    before pycrdt opens it to after pycrdt has cleaned it up, makes each thread wait for
    its own transaction instead (used by :class:`~crdtsync.client.SyncReplica`).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["allow_multithreading"] = True
        super().__init__(*args, **kwargs)
        self._thread_lock = threading.RLock()

    def transaction(self, origin: Any = None) -> Any:
        return _LockedTransaction(self, origin)


class _LockedTransaction:
    def __init__(self, doc: ThreadSafeDoc, origin: Any) -> None:
        self._doc = doc
        self._origin = origin
        self._inner: Any = None

    def __enter__(self) -> Any:
        self._doc._thread_lock.acquire()
        try:
            self._inner = Doc.transaction(self._doc, self._origin)
            return self._inner.__enter__()
        except BaseException:
            self._doc._thread_lock.release()
            raise

    def __exit__(self, *exc: Any) -> Any:
        try:
            return self._inner.__exit__(*exc)
        finally:
            self._doc._thread_lock.release()


@dataclass(frozen=True, slots=True)
class DocumentStatus:
    """What a replica knows about one document's sync state.

    Attributes:
        connected: a websocket to the relay is open.
        synced: the initial sync of this connection finished (the relay answered our step 1).
        pending: local transactions the relay has not yet acknowledged as durably stored.
        acknowledgements: True if the relay confirms durable storage, False if it does
            not (e.g. the reference y-websocket server), None until known.
        last_error: the last connection or store problem, if any.
        quarantined: updates from the relay (or found in the file) that would have
            broken the document, kept aside instead of applied (see
            :meth:`Replica.quarantined`).
        refused: local updates the relay refused to store (they stay pending).
        stopped: the replica gave up syncing this document (the relay refused it in a way
            that retrying cannot change, e.g. its name; ``last_error`` says why).
        relay: the relay in use (connected to, or tried next); of several, the one
            failover chose; None offline.
    """

    connected: bool
    synced: bool
    pending: int
    acknowledgements: bool | None
    last_error: str | None
    quarantined: int = 0
    refused: int = 0
    stopped: bool = False
    relay: str | None = None


@dataclass(eq=False)
class Link:
    """One document's link to the relay: a connection of its own, or a channel of the
    multiplexed one (``channel`` set: its frames go through ``mux``)."""

    ws: ClientConnection
    session: SyncSession
    channel: int | None = None
    mux: MuxLink | None = None
    closed: bool = False  # (a channel) closed: nothing more is sent on it
    keeper: asyncio.Task[None] | None = None  # (a channel) renews its presence
    sync: DocumentSync | None = None  # the document's protocol on this link (set at once)
    outbox: deque[bytes] = field(default_factory=deque)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    deferred: asyncio.TimerHandle | None = None  # the sync's paced answer or resync, waiting

    @property
    def doc_sync(self) -> DocumentSync:
        assert self.sync is not None
        return self.sync


@dataclass(eq=False)
class MuxLink:
    """The multiplexed connection: documents as channels, folders kept (issue 11)."""

    ws: ClientConnection
    outbox: deque[bytes] = field(default_factory=deque)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    next_channel: int = 1
    channels: dict[int, tuple[LocalDocument, Link]] = field(default_factory=dict)
    next_folder: int = 1
    folders: dict[int, KeptFolder] = field(default_factory=dict)


@dataclass(eq=False)
class KeptFolder:
    """A folder kept in sync: its cursor (in the file) and what its announcements named
    that is not yet synced here, in order (the cursor passes an announcement once all
    of it is)."""

    prefix: str
    cursor: Cursor
    number: int | None = None  # on the current connection
    caught_up: bool = False
    batches: deque[tuple[Cursor | None, set[str]]] = field(default_factory=deque)
    digests: asyncio.Task[None] | None = None
    error: str | None = None


@dataclass(frozen=True, slots=True)
class FolderStatus:
    """What a replica knows about a kept folder.

    Attributes:
        subscribed: the relay is announcing the folder's changes to this replica.
        caught_up: the relay listed everything that changed while this replica was away.
        to_sync: documents announced and not yet synced here.
        pending: local transactions in the folder not yet acknowledged.
        error: why the folder is not kept in sync, if it is not.
    """

    subscribed: bool
    caught_up: bool
    to_sync: int
    pending: int
    error: str | None


class StoredDoc:
    """A kept document the app has not opened, as the sync logic sees a ``Doc``: its
    stored updates, merged when asked (no ``Doc`` is built; issue 11)."""

    client_id = -1  # no client of this replica writes through it

    def __init__(self, updates: list[bytes]) -> None:
        self._parts = [u for u in updates if u]

    def _update(self) -> bytes:
        if len(self._parts) > 1:
            self._parts = [merge_in_batches(self._parts)]
        return self._parts[0] if self._parts else EMPTY_UPDATE

    def get_state(self) -> bytes:
        return get_state(self._update())

    def get_update(self, state: bytes | None = None) -> bytes:
        update = self._update()
        return update if state is None else get_update(update, state)

    def apply_update(self, update: bytes) -> None:
        self._parts.append(update)


@dataclass(eq=False)
class LocalDocument:
    """A document the replica syncs: open in the app (a ``Doc``), or kept and synced at
    the store level (a :class:`StoredDoc`); what it holds across links."""

    name: str
    doc: Doc[Any]
    pending: int
    tail: int
    order: AckOrder  # local transactions not yet confirmed
    subscription: Subscription | None = None
    conn: Link | None = None
    task: asyncio.Task[None] | None = None
    applying_remote: bool = False
    unsaved: list[bytes] = field(default_factory=list)  # local updates a store error kept
    remote_buffer: list[bytes] = field(default_factory=list)
    last_error: str | None = None
    acks: bool | None = None
    synced: bool = False
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)
    stop_reconnecting: bool = False
    closing: bool = False  # Replica.close() is closing it: no reconnect, nothing to report
    compaction_scheduled: bool = False
    presence: Presence | None = None  # (open in the app)
    # What the integrity check learned of this document's shared types (crdtsync.integrity).
    types: set[tuple[int, int]] = field(default_factory=set)
    claims: dict[int, set[int]] = field(default_factory=dict)
    quarantined: int = 0
    refused: int = 0
    # Remote updates that start after a gap, kept until it is filled.
    held: HeldUpdates = field(default_factory=HeldUpdates)
    backoff: Backoff | None = None  # (a channel) reopening after the relay closed it
