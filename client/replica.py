"""Replica: documents in a local SQLite file, synced with a relay when one is reachable.

Every local transaction is committed to the file from the replica's ``doc.observe``
callback, before the edit call (or ``with doc.transaction()`` block) returns, so a
killed process never loses an edit the app saw applied. pycrdt runs the app's own
type observers (``text.observe``...) *before* ``doc.observe`` callbacks: an app
observer sees the edit slightly before it is on disk.

Remote updates are applied in transactions flagged as remote and are never sent back.
Local edits never wait for the network: they are stored, counted as pending, and
sent when a connection is up.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import logging
import os
import ssl
import threading
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

from pycrdt import Awareness, Doc, Subscription, TransactionEvent, get_state, get_update
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus, InvalidURI

from crdtsync.docsync import DEFER_S, AckOrder, DocumentSync, HeldUpdates
from crdtsync.errors import (
    AcknowledgementsUnsupported,
    CloseCode,
    FoldersUnsupported,
    InvalidDocumentName,
    MalformedMessage,
    Retry,
    StoreError,
    SyncTimeout,
    close_reason,
    retry_after_close,
)
from crdtsync.folders import Cursor, document_digest, validate_prefix
from crdtsync.integrity import KEY_OWNER, Ledger, Writer, client_id_of_key
from crdtsync.protocol import (
    CLIENT_KEY_BYTES,
    MUX_VERSION,
    ExtChanged,
    ExtChannel,
    ExtClose,
    ExtDigests,
    ExtHello,
    ExtOpen,
    ExtSubscribe,
    ExtType,
    ExtUnsubscribe,
    MessageType,
    channel_header,
    decode_message,
    decode_state_vector,
    encode_state_vector,
    read_var_uint,
)
from crdtsync.settings import validate_document_name
from crdtsync.store import (
    EMPTY_UPDATE,
    QuarantinedUpdate,
    Synchronous,
    UpdateLog,
    merge_in_batches,
)
from crdtsync.sync import (
    MAX_CLAIMED_CLIENTS,
    AwarenessQueried,
    AwarenessReceived,
    Failed,
    SyncSession,
)
from crdtsync.updates import UpdateInfo, check_update

from .backoff import Backoff

__all__ = ["DocumentStatus", "FolderStatus", "Replica", "ThreadSafeDoc", "TokenSource"]

log = logging.getLogger("crdtsync.replica")

EXTENSION_QUERY = "crdtsync=1"
MUX_QUERY = "mux=1"  # with EXTENSION_QUERY on "/": one connection for every document
MAX_STORED_SYNCS = 64  # kept documents the app has not opened, synced at once
DIGEST_BATCH = 512  # documents described per digest message
AWARENESS_TIMEOUT_S = 30.0  # y-protocols: a state not renewed for 30 s is gone
# After the relay refused our rights (HTTP 403, close 4403 or 1008): try again this much
# later, with a fresh token, never in a tight loop and never giving up for good.
ACCESS_RETRY_S = 60.0
# A token, or a function giving one (asked again before each connection attempt and
# after the relay said the token expired); it may be a coroutine function.
TokenSource = str | Callable[[], "str | Awaitable[str]"]
HEALTHY_AFTER_S = 5.0  # a connection synced and up this long resets the reconnect backoff


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
    """

    connected: bool
    synced: bool
    pending: int
    acknowledgements: bool | None
    last_error: str | None
    quarantined: int = 0
    refused: int = 0
    stopped: bool = False


@dataclass(eq=False)
class _Connection:
    """One document's link to the relay: a connection of its own, or a channel of the
    multiplexed one (``channel`` set: its frames go through ``mux``)."""

    ws: ClientConnection
    session: SyncSession
    channel: int | None = None
    mux: _Mux | None = None
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


class _Host:
    """The replica's side of one document's sync on one link (crdtsync.docsync)."""

    __slots__ = ("conn", "d", "replica")

    def __init__(self, replica: Replica, d: _Document, conn: _Connection) -> None:
        self.replica, self.d, self.conn = replica, d, conn

    def state(self) -> bytes:
        return self.d.doc.get_state()

    def update_since(self, state: bytes) -> bytes:
        return self.d.doc.get_update(state)

    def admit_and_apply(self, update: bytes, info: UpdateInfo) -> set[int]:
        return self.replica._admit_and_apply(self.d, update, info)

    def apply_known(self, update: bytes) -> None:
        self.replica._apply_remote(self.d, update)

    def claims(self) -> tuple[dict[int, bytes], frozenset[int]]:
        return self.replica._claims(self.d)

    def confirm(self, seqs: list[int]) -> None:
        self.replica._confirm(self.d, seqs)

    def decided(self) -> None:
        self.d.acks = self.conn.doc_sync.acks
        self.replica._notify(self.d)

    def synced(self) -> None:
        self.replica._on_synced(self.d)

    def refused(self, reason: str) -> None:
        self.d.refused += 1
        self.d.last_error = f"the relay refused content: {reason}"
        self.replica._notify(self.d)

    def denied(self, reason: str) -> None:
        self.d.last_error = f"permission denied: {reason}"


@dataclass(eq=False)
class _Mux:
    """The multiplexed connection: documents as channels, folders kept (issue 11)."""

    ws: ClientConnection
    outbox: deque[bytes] = field(default_factory=deque)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    next_channel: int = 1
    channels: dict[int, tuple[_Document, _Connection]] = field(default_factory=dict)
    next_folder: int = 1
    folders: dict[int, _KeptFolder] = field(default_factory=dict)


@dataclass(eq=False)
class _KeptFolder:
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


class _StoredDoc:
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
class _Document:
    name: str
    doc: Doc[Any]
    pending: int
    tail: int
    order: AckOrder  # local transactions not yet confirmed
    subscription: Subscription | None = None
    conn: _Connection | None = None
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
    awareness: Awareness | None = None
    # What the integrity check learned of this document's shared types (crdtsync.integrity).
    types: set[tuple[int, int]] = field(default_factory=set)
    claims: dict[int, set[int]] = field(default_factory=dict)
    quarantined: int = 0
    refused: int = 0
    # Remote updates that start after a gap, kept until it is filled.
    held: HeldUpdates = field(default_factory=HeldUpdates)
    backoff: Backoff | None = None  # (a channel) reopening after the relay closed it


class Replica:
    """A local replica of documents, optionally synced through one relay.

    Use it as ``async with Replica("notes.db", relay="ws://127.0.0.1:8765") as replica``.

    Args:
        path: the replica's SQLite file (created if missing).
        relay: ``ws://`` or ``wss://`` URL of a relay; None works fully offline.
        token: a token (README: access tokens), or a function returning one (a
            coroutine function too), asked before each connection attempt: an
            expired token is replaced without reconnecting by hand. Sent in an
            ``Authorization: Bearer`` header. A refusal for rights (HTTP 401/403,
            close 4401/4403/1008) is reported in ``status()`` and retried.
        ssl_context: TLS settings for a ``wss://`` relay, e.g. a context trusting
            your own CA (``ssl.create_default_context(cafile=...)``); by default the
            system's trusted CAs verify the relay's certificate.
        synchronous: local durability: ``NORMAL`` survives a killed process, ``FULL``
            survives power loss too.
        max_message_bytes: the largest message accepted from the relay.
        compact_after_updates: fold the local log into a snapshot after this many appends.
        backoff: reconnect delays (exponential, jittered).
        params: extra query parameters for the relay URL.
        multithreaded: documents may be edited from threads other than the event
            loop's (``SyncReplica`` sets this); they are :class:`ThreadSafeDoc`.
        store_busy_timeout_s: the longest an edit waits for the local file when another
            process holds its lock; then the edit stays in memory, is retried and
            reported (``status().last_error``), and the app's loop goes on.
        max_update_bytes, max_update_clients, max_update_structs: the largest update
            accepted from a relay (bytes, client ids, structs and values); a larger one
            is refused, reported, and never applied.
    """

    def __init__(
        self,
        path: str | Path,
        relay: str | None = None,
        token: TokenSource | None = None,
        *,
        ssl_context: ssl.SSLContext | None = None,
        synchronous: Synchronous = "NORMAL",
        max_message_bytes: int = 64 * 1024 * 1024,
        compact_after_updates: int = 2000,
        backoff: Callable[[], Backoff] | None = None,
        params: dict[str, str] | None = None,
        open_timeout_s: float = 10.0,
        multithreaded: bool = False,
        store_busy_timeout_s: float = 0.25,
        max_update_bytes: int = 16 * 1024 * 1024,
        max_update_clients: int = 100_000,
        max_update_structs: int = 10_000_000,
        multiplex: bool = True,
    ) -> None:
        if relay is not None and not relay.startswith(("ws://", "wss://")):
            raise ValueError(f"relay must be a ws:// or wss:// URL, not {relay!r}")
        if ssl_context is not None and relay is not None and not relay.startswith("wss://"):
            # (it would connect in plain text, token and all, and ignore the context)
            raise ValueError(f"ssl_context needs a wss:// relay, not {relay!r}")
        self.path = Path(path)
        self.relay = relay.rstrip("/") if relay else None
        self.token = token
        self.ssl_context = ssl_context
        self.synchronous = synchronous
        self.max_message_bytes = max_message_bytes
        self.compact_after_updates = compact_after_updates
        self._backoff = backoff or Backoff
        self.params = dict(params or {})
        self.open_timeout_s = open_timeout_s
        self.store: UpdateLog | None = None
        self._docs: dict[str, _Document] = {}
        self._flush_handle: asyncio.Handle | None = None
        self._retry_handle: asyncio.TimerHandle | None = None
        self.multithreaded = multithreaded
        self.store_busy_timeout_s = store_busy_timeout_s
        self._validate = functools.partial(
            check_update,
            max_bytes=max_update_bytes,
            max_clients=max_update_clients,
            max_structs=max_update_structs,
        )
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        self.multiplex = multiplex
        self.last_error: str | None = None  # of the multiplexed connection
        self._mux: _Mux | None = None
        self._mux_task: asyncio.Task[None] | None = None
        self._mux_supported: bool | None = None  # decided by the relay's first answer
        self._stopped = False
        self._kept: dict[str, _KeptFolder] = {}
        self._stored: dict[str, _Document] = {}  # kept documents synced without a Doc
        self._stored_queue: deque[str] = deque()
        self._stored_wanted: set[str] = set()
        self._reopen: dict[str, asyncio.TimerHandle] = {}
        self._progress = asyncio.Condition()
        # The document of the largest frame sent on the multiplexed connection (blamed
        # when the relay closes it with 1009, message too big).
        self._too_big: _Document | None = None
        self._largest_sent = 0
        # What went over the network (issue 11's benchmarks and tests count it).
        self.stats: Counter[str] = Counter()

    # -- lifecycle ----------------------------------------------------------------------

    async def start(self) -> None:
        """Open the local file. Raises :class:`StoreError` if it cannot be used."""
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        if self.store is None:
            self.store = UpdateLog(
                self.path,
                synchronous=self.synchronous,
                busy_timeout_s=self.store_busy_timeout_s,
            )
        self._stopped = False
        for prefix in self.store.kept_folders():
            await self.keep(prefix)

    async def stop(self) -> None:
        """Close every document (local edits are already on disk) and the file."""
        self._stopped = True
        for name in list(self._docs):
            await self.close(name)
        task, self._mux_task = self._mux_task, None
        if task is not None:
            mux = self._mux
            if mux is not None:
                # A normal close (1000) first, as for one document's connection.
                with contextlib.suppress(ConnectionClosed, TimeoutError, OSError):
                    async with asyncio.timeout(1.0):
                        await mux.ws.close()
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for name in list(self._stored):
            self._drop_stored(name)
        self._flush_remote()
        for timer in self._reopen.values():
            timer.cancel()
        self._reopen.clear()
        self._mux_supported = None
        self._kept.clear()
        if self.store is not None:
            self.store.close()
            self.store = None

    async def __aenter__(self) -> Replica:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def _ack_order(self, name: str) -> AckOrder:
        # Loaded on first use: opening a document with a long offline history stays fast.
        return AckOrder(lambda: self._store().pending_seqs(name))

    def _store(self) -> UpdateLog:
        if self.store is None:
            raise RuntimeError("replica not started: use 'async with Replica(...)'")
        return self.store

    # -- documents ----------------------------------------------------------------------

    async def open(self, name: str) -> Doc[Any]:
        """Load document ``name`` from the local file (no network) and start syncing it.

        Returns the same ``pycrdt.Doc`` for every call until :meth:`close`. The doc has
        a fresh client id on every open.

        Raises:
            InvalidDocumentName: the name is not a valid document name.
            StoreError: the local file cannot be read.
        """
        validate_document_name(name)
        existing = self._docs.get(name)
        if existing is not None:
            return existing.doc
        store = self._store()
        if name in self._stored:
            # Synced at the store level until now: a Doc takes over (its own channel's
            # first sync settles what its folder announced).
            self._drop_stored(name)
        stored = store.load(name)
        pending = store.pending_count(name)
        # A fresh client id on every open: reusing one after a lost tail of the file
        # would create clashing ids that diverge silently (DESIGN: replica). It is derived
        # from a key kept in the file, which proves to any relay that the id is ours.
        client_id, key = _new_client_id()
        store.add_own_client(name, client_id, key, forget_others=pending == 0)
        doc: Doc[Any] = (
            ThreadSafeDoc(client_id=client_id) if self.multithreaded else Doc(client_id=client_id)
        )
        d_types: set[tuple[int, int]] = set()
        d_claims: dict[int, set[int]] = {}
        quarantined = self._load(
            name, doc, stored.snapshot, stored.seqs, stored.updates, d_types, d_claims
        )
        d = _Document(
            name,
            doc,
            pending=store.pending_count(name),
            tail=len(stored.updates) - quarantined,
            order=self._ack_order(name),
        )
        d.types, d.claims = d_types, d_claims
        d.quarantined = store.quarantine_count(name)
        if quarantined:
            d.last_error = f"{quarantined} stored updates quarantined at open (see quarantined())"
        self._docs[name] = d
        d.subscription = doc.observe(lambda event: self._on_transaction(d, event))
        d.awareness = Awareness(doc, outdated_timeout=int(AWARENESS_TIMEOUT_S * 1000))
        d.awareness.observe(lambda topic, change: self._on_awareness_change(d, topic, change))
        self._start_sync(d)
        return doc

    def _load(
        self,
        name: str,
        doc: Doc[Any],
        snapshot: bytes | None,
        seqs: list[int],
        updates: list[bytes],
        types: set[tuple[int, int]],
        claims: dict[int, set[int]],
    ) -> int:
        """Apply the stored document to ``doc``, each tail update checked first.

        A tail update that would break the document (written by a version before the
        integrity check, or damaged) is quarantined instead: open never fails on
        content. Returns how many were quarantined.
        """
        if snapshot:
            doc.apply_update(snapshot)  # our own compaction of a Doc that applied it
        guard = Ledger.of_state(decode_state_vector(doc.get_state()))
        guard.types, guard.claims, guard.shared = types, claims, False
        batch: list[tuple[int, bytes]] = []
        quarantined = 0

        def apply_batch() -> None:
            nonlocal quarantined
            with doc.transaction():
                for seq, update in batch:
                    try:
                        doc.apply_update(update)
                    except Exception as exc:  # pycrdt refused it after all: keep it aside
                        self._quarantine_stored(name, update, f"pycrdt refused it: {exc}", seq)
                        quarantined += 1
            batch.clear()

        for seq, update in zip(seqs, updates, strict=True):
            try:
                info = check_update(update)
            except MalformedMessage as exc:
                self._quarantine_stored(name, update, f"damaged: {exc}", seq)
                quarantined += 1
                continue
            content: list[bytes] = []
            if guard.overlaps(info):
                apply_batch()
                content = [_content_for(doc, info)]
            verdict = guard.judge(update, info, None, content)
            if verdict.refusals:
                reason = "; ".join(r.reason for r in verdict.refusals)
                self._quarantine_stored(name, update, reason, seq, verdict.update)
                quarantined += 1
            if verdict.update is not None:
                batch.append((seq, verdict.update))
        if batch:
            apply_batch()
        return quarantined

    def _quarantine_stored(
        self, name: str, update: bytes, reason: str, seq: int, keep: bytes | None = None
    ) -> None:
        log.warning("quarantined stored update %d of %r: %s", seq, name, reason)
        self._store().quarantine(
            name, update, reason, now=time.time(), replace_seq=seq, replacement=keep
        )

    def quarantined(self, name: str) -> list[QuarantinedUpdate]:
        """Updates of ``name`` kept aside because they would have broken the document.

        Each comes with the reason; they stay in the file for inspection and are never
        applied. Works for documents that are not open too.
        """
        return self._store().quarantined(name)

    async def close(self, name: str) -> None:
        """Stop syncing ``name`` and forget its ``Doc``; its data stays in the file."""
        d = self._docs.pop(name, None)
        if d is None:
            return
        conn = d.conn
        if (
            conn is not None
            and d.awareness is not None
            and d.awareness.get_local_state() is not None
        ):
            # Tell the room we left, as stock clients do; best effort within a short bound.
            d.awareness.set_local_state(None)
            if conn.mux is None:
                with contextlib.suppress(ConnectionClosed, TimeoutError, OSError):
                    async with asyncio.timeout(1.0):
                        for frame in conn.session.data_to_send():
                            await conn.ws.send(frame)
        if d.subscription is not None:
            d.doc.unobserve(d.subscription)
        d.closing = True
        timer = self._reopen.pop(name, None)
        if timer is not None:
            timer.cancel()
        if conn is not None and conn.mux is not None:
            self._end_channel(d, conn, say=True)  # the connection goes on for the others
        elif conn is not None:
            # A normal close (1000) first: cancelling the task inside websockets'
            # context would end the connection with 1011, which reads as a failure.
            with contextlib.suppress(ConnectionClosed, TimeoutError, OSError):
                async with asyncio.timeout(1.0):
                    await conn.ws.close()
        if d.task is not None:
            d.task.cancel()
            try:
                await d.task
            except asyncio.CancelledError:
                current = asyncio.current_task()
                if current is not None and current.cancelling():
                    raise  # our caller cancelled close() itself: let it through
            except Exception:
                # The sync loop reports its errors in status(); closing never raises them.
                log.exception("sync task of %r ended with an error", name)
        self._flush_remote()
        self._retry_unsaved(d)
        try:
            store = self._store()
            if d.remote_buffer:  # no longer open: _flush_remote skipped it
                store.append_many([(d.name, u) for u in d.remote_buffer])
                d.tail += len(d.remote_buffer)
                d.remote_buffer.clear()
            if d.tail >= self.compact_after_updates:
                # A compaction scheduled for this document would find it closed: do it
                # now, so that the next open does not replay a long tail.
                store.compact(d.name, live=d.doc)
        except StoreError as exc:
            log.warning("closing %r: %s", name, exc)
        if not self._stopped and any(name.startswith(p) for p in self._kept):
            # A kept document goes on syncing without its Doc: what it still had to send,
            # and what reached its channel after it closed, are exchanged once more.
            self._want_stored(name)

    def pending(self, name: str) -> int:
        """Local transactions of ``name`` not yet acknowledged as durably stored by the relay.

        Counts transactions, not state-vector clocks; survives restarts (it lives in
        the local file). Works for documents that are not open too.
        """
        d = self._docs.get(name)
        if d is not None:
            return d.pending + len(d.unsaved)
        return self._store().pending_count(name)

    def status(self, name: str) -> DocumentStatus:
        """Connection, sync and acknowledgement state of an open document."""
        d = self._doc(name)
        return DocumentStatus(
            connected=d.conn is not None,
            synced=d.synced,
            pending=d.pending + len(d.unsaved),
            acknowledgements=d.acks,
            last_error=d.last_error,
            quarantined=d.quarantined,
            refused=d.refused,
            stopped=d.stop_reconnecting,
        )

    def awareness(self, name: str) -> Awareness:
        """The presence (cursors, user names) of an open document: a ``pycrdt.Awareness``.

        Set your own state with ``set_local_state({...})``; it is sent to the relay and
        renewed while connected. Other clients' states arrive in ``states``. Presence is
        relayed, never stored.
        """
        awareness = self._doc(name).awareness
        assert awareness is not None  # set by open()
        return awareness

    async def wait_synced(self, name: str, timeout: float | None = None) -> None:
        """Wait until the relay has durably stored every local change of ``name``.

        Raises:
            AcknowledgementsUnsupported: the relay does not confirm storage (e.g. the
                reference y-websocket server), so this could never finish.
            SyncTimeout: ``timeout`` seconds passed with changes still pending.
        """
        d = self._doc(name)

        def done() -> bool:
            if d.acks is False and (d.pending or d.unsaved):
                raise AcknowledgementsUnsupported(
                    f"the relay for {name!r} does not acknowledge durable storage; "
                    f"{d.pending + len(d.unsaved)} changes cannot be confirmed"
                )
            return d.pending == 0 and not d.unsaved

        try:
            async with asyncio.timeout(timeout), d.changed:
                await d.changed.wait_for(done)
        except TimeoutError:
            raise SyncTimeout(
                f"{d.pending + len(d.unsaved)} changes to {name!r} still pending after {timeout} s"
                + (f" (last error: {d.last_error})" if d.last_error else "")
            ) from None

    def _doc(self, name: str) -> _Document:
        try:
            return self._docs[name]
        except KeyError:
            raise KeyError(f"document {name!r} is not open") from None

    def _notify(self, d: _Document) -> None:
        async def notify() -> None:
            async with d.changed:
                d.changed.notify_all()
            if self._kept:
                async with self._progress:
                    self._progress.notify_all()

        with contextlib.suppress(RuntimeError):  # no running loop: nobody can be waiting
            asyncio.get_running_loop().create_task(notify())

    # -- local transactions ---------------------------------------------------------------

    def _on_transaction(self, d: _Document, event: TransactionEvent) -> None:
        # Never raise here: pycrdt would turn it into an error of the app's edit call.
        # Runs in the thread that edited; the write happens here, before the edit returns.
        if d.applying_remote and threading.get_ident() == self._loop_thread:
            return  # the loop thread applying a remote update (another thread may be editing)
        update = event.update
        if update == EMPTY_UPDATE:
            return
        try:
            seq: int | None = self._store().append_local(d.name, update)
            error = None
        except (StoreError, RuntimeError) as exc:
            seq, error = None, str(exc)
        if threading.get_ident() == self._loop_thread or self._loop is None:
            self._local_done(d, update, seq, error)
        else:
            self._loop.call_soon_threadsafe(self._local_done, d, update, seq, error)

    def _local_done(self, d: _Document, update: bytes, seq: int | None, error: str | None) -> None:
        if seq is None:
            # The edit is in the Doc; keep its update, retry, and report (DESIGN: replica).
            d.unsaved.append(update)
            d.last_error = error
            self._schedule_retry()
            self._notify(d)
            return
        d.pending += 1
        d.order.added(seq)
        d.tail += 1
        self._send_local(d, seq, update)
        self._maybe_compact(d)

    def _maybe_compact(self, d: _Document) -> None:
        if d.tail >= self.compact_after_updates and not d.compaction_scheduled:
            # Not now: the Doc may be mid-commit and cannot be encoded until that returns.
            with contextlib.suppress(RuntimeError):
                asyncio.get_running_loop().call_soon(self._compact, d)
                d.compaction_scheduled = True

    def _on_awareness_change(self, d: _Document, topic: str, change: tuple[Any, Any]) -> None:
        changes, origin = change
        if topic != "update" or origin != "local":
            return
        clients = changes["added"] + changes["updated"] + changes["removed"]
        if threading.get_ident() == self._loop_thread or self._loop is None:
            self._send_awareness(d, clients)
        else:
            self._loop.call_soon_threadsafe(self._send_awareness, d, clients)

    def _send_awareness(self, d: _Document, clients: list[int]) -> None:
        conn = d.conn
        if conn is None or d.awareness is None or not clients:
            return
        conn.session.send_awareness(d.awareness.encode_awareness_update(clients))
        self._queue_frames(conn)

    async def _keep_awareness(self, d: _Document) -> None:
        """Renew our presence and expire silent peers' (y-protocols awareness timing)."""
        awareness = d.awareness
        assert awareness is not None
        while True:
            await asyncio.sleep(AWARENESS_TIMEOUT_S / 2)
            state = awareness.get_local_state()
            if state is not None:
                awareness.set_local_state(state)
            now_ms = time.time() * 1000
            outdated = [
                client
                for client, meta in awareness.meta.items()
                if client != awareness.client_id
                and client in awareness.states
                and now_ms - meta["lastUpdated"] >= AWARENESS_TIMEOUT_S * 1000
            ]
            if outdated:
                awareness.remove_awareness_states(outdated, "timeout")

    def _send_local(self, d: _Document, seq: int, update: bytes) -> None:
        conn = d.conn
        if conn is None:
            return  # the next link's catch-up carries it
        conn.doc_sync.local(seq, update)
        self._queue_frames(conn)

    def _queue_frames(self, conn: _Connection) -> None:
        frames = conn.session.data_to_send()
        mux = conn.mux
        if mux is None:
            conn.outbox.extend(frames)
            conn.wake.set()
        elif frames and not conn.closed:
            assert conn.channel is not None
            header = channel_header(conn.channel)
            mux.outbox.extend(header + frame for frame in frames)
            mux.wake.set()

    def _schedule_retry(self) -> None:
        if self._retry_handle is not None:
            return
        with contextlib.suppress(RuntimeError):
            loop = asyncio.get_running_loop()
            self._retry_handle = loop.call_later(0.5, self._retry_all)

    def _retry_all(self) -> None:
        self._retry_handle = None
        for d in self._docs.values():
            self._retry_unsaved(d)

    def _retry_unsaved(self, d: _Document) -> None:
        while d.unsaved:
            update = d.unsaved[0]
            try:
                seq = self._store().append_local(d.name, update)
            except (StoreError, RuntimeError) as exc:
                d.last_error = str(exc)
                self._schedule_retry()
                return
            d.unsaved.pop(0)
            d.pending += 1
            d.order.added(seq)
            self._send_local(d, seq, update)
        d.last_error = None
        self._notify(d)

    def _compact(self, d: _Document) -> None:
        d.compaction_scheduled = False
        if self._docs.get(d.name) is not d or self.store is None:
            return  # closed meanwhile
        if d.tail < self.compact_after_updates:
            return  # another compaction got there first
        self._flush_remote()
        try:
            self._store().compact(d.name, live=d.doc)
        except StoreError as exc:
            d.last_error = str(exc)
            return
        d.tail = 0

    # -- remote updates ---------------------------------------------------------------------

    def _admit(
        self, d: _Document, update: bytes, info: UpdateInfo
    ) -> tuple[bytes | None, set[int]]:
        """Check a remote update against the document before it reaches the file or the Doc.

        Content that pycrdt could not apply, or would crash on (a rewrite of clocks the
        document holds, a parent that is not a shared type: crdtsync.integrity), is cut
        away and quarantined with the reason. Returns what may be applied and the
        clients whose content was refused.
        """
        state = decode_state_vector(d.doc.get_state())
        clients = set(info.starts) | {parent[2] for parent in info.parents}
        own = d.doc.client_id
        guard = Ledger(
            ranges={c: [(0, state[c])] for c in clients if state.get(c)},
            owners={own: KEY_OWNER},  # only this replica writes its current id
            types=d.types,
            claims=d.claims,
            shared=False,
        )
        verdict = guard.judge(update, info, Writer(), lambda: [_content_for(d.doc, info)])
        if verdict.refusals:
            self._quarantine_remote(d, update, "; ".join(r.reason for r in verdict.refusals))
        return verdict.update, {r.client for r in verdict.refusals}

    def _quarantine_remote(self, d: _Document, update: bytes, reason: str) -> None:
        log.warning("quarantined an update from the relay for %r: %s", d.name, reason)
        d.quarantined += 1
        d.last_error = f"quarantined an update from the relay: {reason}"
        try:
            self._store().quarantine(d.name, update, reason, now=time.time())
        except StoreError as exc:
            log.error("could not keep the quarantined update of %r: %s", d.name, exc)
        self._notify(d)

    def _apply_remote(self, d: _Document, update: bytes) -> None:
        d.applying_remote = True
        try:
            d.doc.apply_update(update)
        except Exception as exc:
            # Checked first (_admit), so this is a pycrdt failure the check does not
            # know: keep the update aside rather than in the file it would break.
            self._quarantine_remote(d, update, f"pycrdt refused it: {exc}")
            return
        finally:
            d.applying_remote = False
        # Store the update as received (a gap-waiting update is not in the Doc's own
        # encoding), batched per event-loop turn; losing it in a crash loses nothing,
        # since the relay sends it again on the next sync.
        d.remote_buffer.append(update)
        if self._flush_handle is None:
            self._flush_handle = asyncio.get_running_loop().call_soon(self._flush_remote)

    def _flush_remote(self) -> None:
        self._flush_handle = None
        docs = self._synced_docs()
        items = [(d.name, u) for d in docs for u in d.remote_buffer]
        if not items:
            return
        try:
            self._store().append_many(items)
        except (StoreError, RuntimeError) as exc:
            for d in docs:
                if d.remote_buffer:
                    d.last_error = f"could not store remote updates: {exc}"
            return
        finally:
            for d in docs:
                d.remote_buffer.clear()
        for d in self._docs.values():
            d.tail += sum(1 for name, _ in items if name == d.name)
            # A replica that mostly receives must compact too, or opening it gets slow.
            self._maybe_compact(d)

    # -- connection -------------------------------------------------------------------------

    def _url(self, name: str) -> str:
        params = [EXTENSION_QUERY]
        params += [f"{quote(k, safe='')}={quote(v, safe='')}" for k, v in self.params.items()]
        return f"{self.relay}/{name}?{'&'.join(params)}"

    async def _token(self) -> str | None:
        """The token for the next connection attempt (asking its source again)."""
        if self.token is None or isinstance(self.token, str):
            return self.token
        token = self.token()
        if inspect.isawaitable(token):
            token = await token
        if not isinstance(token, str):
            raise TypeError(f"the token function returned {type(token).__name__}, not str")
        return token

    @staticmethod
    def _authorization(token: str | None) -> dict[str, str] | None:
        """The header carrying ``token``; its value never goes into an error message."""
        if not token:
            return None
        token = token.strip()  # e.g. read from a file with its newline
        if not token.isascii() or not token.isprintable() or " " in token:
            raise ValueError("the token has characters an HTTP header cannot carry")
        return {"Authorization": f"Bearer {token}"}

    async def _connect_loop(self, d: _Document) -> None:
        backoff = self._backoff()
        while not d.stop_reconnecting and not d.closing:
            delay: float | None = None  # None: the backoff's next delay
            try:
                headers = self._authorization(await self._token())
                async with connect(
                    self._url(d.name),
                    additional_headers=headers,
                    max_size=self.max_message_bytes,
                    open_timeout=self.open_timeout_s,
                    compression=None,
                    ssl=self.ssl_context if self.relay and self.relay.startswith("wss:") else None,
                ) as ws:
                    self.stats["connections"] += 1
                    began = time.monotonic()
                    try:
                        await self._run_connection(d, ws)
                    finally:
                        # Only a connection that synced and stayed up resets the backoff: a
                        # relay that fails right after each handshake is retried ever slower.
                        if d.synced and time.monotonic() - began >= HEALTHY_AFTER_S:
                            backoff.reset()
            except ConnectionClosed as exc:
                d.last_error = _describe_close(exc)
                retry = retry_after_close(exc.rcvd.code if exc.rcvd is not None else None)
                if retry is Retry.NEVER:
                    d.stop_reconnecting = True  # status() says why
                elif retry is Retry.LATER:
                    delay = ACCESS_RETRY_S
            except InvalidStatus as exc:
                status = exc.response.status_code
                body = exc.response.body.decode("utf-8", "replace").strip()[:200]
                d.last_error = f"the relay refused the connection: HTTP {status} {body}".rstrip()
                if status == 403 or (status == 401 and isinstance(self.token, str)):
                    delay = ACCESS_RETRY_S  # the same token would be refused again now
            except (OSError, InvalidHandshake, InvalidURI, TimeoutError) as exc:
                d.last_error = f"cannot connect to {self.relay}: {_describe_connect_error(exc)}"
            except Exception as exc:
                # Whatever went wrong, syncing goes on after a backoff and the app can
                # see why in status(): a sync task never dies silently.
                log.exception("syncing %r failed", d.name)
                d.last_error = f"sync failed: {type(exc).__name__}: {exc}"
            finally:
                if d.conn is not None:
                    d.conn = None
                d.synced = False
                self._notify(d)
            if d.closing:
                return
            if d.stop_reconnecting:
                log.warning("stopped syncing %r: %s", d.name, d.last_error)
                return
            next_delay = backoff.next_delay()
            await asyncio.sleep(next_delay if delay is None else max(delay, next_delay))

    async def _writer(self, conn: _Connection) -> None:
        while True:
            await conn.wake.wait()
            conn.wake.clear()
            while conn.outbox:
                frame = conn.outbox.popleft()
                self.stats["messages_out"] += 1
                self.stats["bytes_out"] += len(frame)
                await conn.ws.send(frame)

    async def _run_connection(self, d: _Document, ws: ClientConnection) -> None:
        session = SyncSession(
            max_message_bytes=self.max_message_bytes, extensions=True, validate=self._validate
        )
        conn = _Connection(ws, session)
        d.conn = conn
        d.last_error = None
        self._link(d, conn)
        if d.awareness is not None and d.awareness.get_local_state() is not None:
            session.send_awareness(d.awareness.encode_awareness_update([d.awareness.client_id]))
        self._queue_frames(conn)
        writer = asyncio.create_task(self._writer(conn))
        keeper = asyncio.create_task(self._keep_awareness(d))
        try:
            async for data in ws:
                self.stats["messages_in"] += 1
                self.stats["bytes_in"] += len(data)
                session.receive_data(data)
                for event in session.events_received():
                    self._on_event(d, conn, event)
                    if isinstance(event, Failed):
                        await ws.close(event.close_code, event.reason)
                        return
                self._queue_frames(conn)
                if writer.done():
                    writer.result()  # surface the send error
        finally:
            if conn.deferred is not None:
                conn.deferred.cancel()
            keeper.cancel()
            writer.cancel()
            # Collect the helpers' outcomes without swallowing a cancellation of our own:
            # suppressing CancelledError here once let close() wait forever.
            await asyncio.gather(writer, keeper, return_exceptions=True)

    def _link(self, d: _Document, conn: _Connection) -> DocumentSync:
        """Start ``d``'s sync protocol on ``conn`` (crdtsync.docsync)."""
        conn.sync = DocumentSync(conn.session, _Host(self, d, conn), d.order, d.held)
        conn.sync.start()
        return conn.sync

    def _defer(self, d: _Document, conn: _Connection) -> None:
        """Run the sync's paced answer or resync later; one timer per link."""
        if conn.deferred is not None:
            return

        def run() -> None:
            conn.deferred = None
            if d.conn is not conn:
                return  # that connection is gone; the next one syncs from scratch
            conn.doc_sync.run_deferred()
            self._queue_frames(conn)

        conn.deferred = asyncio.get_running_loop().call_later(DEFER_S, run)

    def _claims(self, d: _Document) -> tuple[dict[int, bytes], frozenset[int]]:
        """Our client ids of ``d`` to prove, with their keys: the current id and the ids
        of earlier opens whose edits may still be pending."""
        claims = self._store().own_clients(d.name)
        current = d.doc.client_id
        others = sorted(c for c in claims if c != current)[-(MAX_CLAIMED_CLIENTS - 1) :]
        ordered = {c: claims[c] for c in [current, *others] if c in claims}
        # The current id before its first edit is fresh: the relay records its owner at
        # once, so that nobody who saw it (in our presence) can write there first.
        fresh = current in ordered and not decode_state_vector(d.doc.get_state()).get(current)
        return ordered, frozenset({current}) if fresh else frozenset()

    def _confirm(self, d: _Document, seqs: list[int]) -> None:
        """Count transactions the relay confirmed (in order) as stored, in the file."""
        try:
            d.pending -= self._store().acknowledge(d.name, seqs)
        except StoreError as exc:
            d.last_error = str(exc)
        self._notify(d)

    def _admit_and_apply(self, d: _Document, update: bytes, info: UpdateInfo) -> set[int]:
        accepted, refused = self._admit(d, update, info)
        if accepted is not None:
            self._apply_remote(d, accepted)
        return refused

    def _on_synced(self, d: _Document) -> None:
        first = not d.synced
        d.synced = True
        self._notify(d)
        if first and self._kept and d.name not in self._stored:
            self._settled(d.name)

    def _on_event(self, d: _Document, conn: _Connection, event: Any) -> None:
        sync = conn.doc_sync
        sync.handle(event, time.monotonic())
        if sync.timer_wanted:
            self._defer(d, conn)
        if isinstance(event, AwarenessReceived):
            if d.awareness is not None:
                d.awareness.apply_awareness_update(event.payload, "remote")
        elif isinstance(event, AwarenessQueried):
            if d.awareness is not None and d.awareness.get_local_state() is not None:
                conn.session.send_awareness(
                    d.awareness.encode_awareness_update([d.awareness.client_id])
                )
        elif isinstance(event, Failed):
            d.last_error = f"relay sent bad data: {event.reason}"

    # -- one multiplexed connection for every document (issue 11) ---------------------------

    def _start_sync(self, d: _Document) -> None:
        """Sync ``d`` through the relay: a channel of the multiplexed connection, or a
        connection of its own where the relay has none (the reference server)."""
        if self.relay is None:
            return
        if self.multiplex and self._mux_supported is not False:
            if self._mux_task is None:
                self._mux_task = asyncio.get_running_loop().create_task(
                    self._mux_loop(), name="crdtsync:mux"
                )
            elif self._mux is not None:
                self._open_channel(self._mux, d)
            return
        d.task = asyncio.get_running_loop().create_task(
            self._connect_loop(d), name=f"crdtsync:{d.name}"
        )

    def _mux_url(self) -> str:
        params = [EXTENSION_QUERY, MUX_QUERY]
        params += [f"{quote(k, safe='')}={quote(v, safe='')}" for k, v in self.params.items()]
        return f"{self.relay}/?{'&'.join(params)}"

    def _synced_docs(self) -> list[_Document]:
        return [*self._docs.values(), *self._stored.values()]

    def _say_error(self, error: str) -> None:
        self.last_error = error
        for d in self._docs.values():
            d.last_error = error
            self._notify(d)

    async def _mux_loop(self) -> None:
        """Keep the multiplexed connection up (backoff, tokens, as one document's loop)."""
        backoff = self._backoff()
        while not self._stopped:
            delay: float | None = None
            try:
                headers = self._authorization(await self._token())
                async with connect(
                    self._mux_url(),
                    additional_headers=headers,
                    max_size=self.max_message_bytes,
                    open_timeout=self.open_timeout_s,
                    # (a server without multiplexing may keep talking: no long goodbye)
                    close_timeout=2.0,
                    compression=None,
                    ssl=self.ssl_context if self.relay and self.relay.startswith("wss:") else None,
                ) as ws:
                    async with asyncio.timeout(self.open_timeout_s):
                        first = await ws.recv()
                    if not _is_hello(first):
                        # A relay without multiplexing that took "/" as a document (the
                        # reference server): one connection per document, as stock clients.
                        self._fall_back("the relay does not multiplex documents")
                        return
                    self._mux_supported = True
                    self.stats["connections"] += 1
                    mux = _Mux(ws)
                    self._mux = mux
                    self._too_big, self._largest_sent = None, 0
                    began = time.monotonic()
                    try:
                        await self._run_mux(mux)
                    finally:
                        self._mux = None
                        self._mux_down(mux)
                        if time.monotonic() - began >= HEALTHY_AFTER_S:
                            backoff.reset()
            except ConnectionClosed as exc:
                code = exc.rcvd.code if exc.rcvd is not None else None
                reason = exc.rcvd.reason if exc.rcvd is not None else ""
                if (
                    code == CloseCode.POLICY_VIOLATION
                    and self._mux_supported is None
                    and "document name" in reason
                ):
                    # A crdtsync relay from before multiplexing: "/" is no document there.
                    self._fall_back("the relay does not multiplex documents")
                    return
                self._say_error(_describe_close(exc))
                culprit = self._too_big
                self._too_big = None
                if code == CloseCode.MESSAGE_TOO_BIG and culprit is not None:
                    # One document's frame was over the relay's limit: that document stops
                    # (resending it would be refused again), the others reconnect.
                    culprit.stop_reconnecting = True
                    culprit.last_error = _describe_close(exc)
                    self._notify(culprit)
                elif retry_after_close(code) is not Retry.BACKOFF:
                    delay = ACCESS_RETRY_S
            except InvalidStatus as exc:
                status = exc.response.status_code
                body = exc.response.body.decode("utf-8", "replace").strip()[:200]
                self._say_error(f"the relay refused the connection: HTTP {status} {body}".rstrip())
                if status == 403 or (status == 401 and isinstance(self.token, str)):
                    delay = ACCESS_RETRY_S
            except (OSError, InvalidHandshake, InvalidURI, TimeoutError) as exc:
                self._say_error(f"cannot connect to {self.relay}: {_describe_connect_error(exc)}")
            except Exception as exc:
                log.exception("the multiplexed connection failed")
                self._say_error(f"sync failed: {type(exc).__name__}: {exc}")
            next_delay = backoff.next_delay()
            await asyncio.sleep(next_delay if delay is None else max(delay, next_delay))

    def _fall_back(self, reason: str) -> None:
        """No multiplexing at this relay: every open document gets a connection of its own;
        kept folders cannot be announced (said in their errors)."""
        log.info("%s: one connection per document", reason)
        self._mux_supported = False
        self._mux_task = None
        for d in self._docs.values():
            if d.task is None:
                d.task = asyncio.get_running_loop().create_task(
                    self._connect_loop(d), name=f"crdtsync:{d.name}"
                )
        for folder in self._kept.values():
            folder.error = f"{reason}: folders cannot be kept through it"
        self._notify_progress()

    async def _run_mux(self, mux: _Mux) -> None:
        writer = asyncio.create_task(self._mux_writer(mux))
        try:
            for d in list(self._docs.values()):
                if not d.stop_reconnecting:
                    self._open_channel(mux, d)
            for folder in self._kept.values():
                self._subscribe(mux, folder)
            async for data in mux.ws:
                self.stats["messages_in"] += 1
                self.stats["bytes_in"] += len(data)
                if isinstance(data, str):
                    await mux.ws.close(CloseCode.UNSUPPORTED_DATA, "text frames are not supported")
                    return
                try:
                    msg = decode_message(data, max_bytes=self.max_message_bytes)
                except MalformedMessage as exc:
                    await mux.ws.close(CloseCode.PROTOCOL_ERROR, close_reason(str(exc)))
                    return
                if isinstance(msg, ExtChannel):
                    self._on_channel_data(mux, msg.channel, msg.frame)
                elif isinstance(msg, ExtClose):
                    self._on_channel_closed(mux, msg)
                elif isinstance(msg, ExtChanged):
                    self._on_changed(mux, msg)
                elif isinstance(msg, ExtHello):
                    pass  # a repeat of the relay's confirmation (a duplicating path)
                elif not isinstance(msg, ExtUnsubscribe):
                    await mux.ws.close(
                        CloseCode.PROTOCOL_ERROR,
                        close_reason(f"{type(msg).__name__} outside a channel"),
                    )
                    return
                else:
                    refused = mux.folders.pop(msg.folder, None)
                    if refused is not None:
                        folder = refused
                        folder.number = None
                        folder.error = f"the relay refused the folder: {msg.code} {msg.reason}"
                        log.warning("folder %r: %s", folder.prefix, folder.error)
                        self._notify_progress()
                if writer.done():
                    writer.result()  # surface the send error
        finally:
            writer.cancel()
            await asyncio.gather(writer, return_exceptions=True)

    async def _mux_writer(self, mux: _Mux) -> None:
        while True:
            await mux.wake.wait()
            mux.wake.clear()
            while mux.outbox:
                frame = mux.outbox.popleft()
                self.stats["messages_out"] += 1
                self.stats["bytes_out"] += len(frame)
                if len(frame) > self._largest_sent:
                    self._largest_sent = len(frame)
                    self._too_big = self._document_of(mux, frame)
                await mux.ws.send(frame)

    @staticmethod
    def _document_of(mux: _Mux, frame: bytes) -> _Document | None:
        """The document a channel frame belongs to (None for other frames)."""
        if frame[:2] != bytes((MessageType.CRDTSYNC, ExtType.CHANNEL)):
            return None
        try:
            channel, _ = read_var_uint(frame, 2)
        except MalformedMessage:
            return None
        entry = mux.channels.get(channel)
        return entry[0] if entry is not None else None

    def _mux_down(self, mux: _Mux) -> None:
        """The multiplexed connection ended: every channel with it; kept documents synced
        at the store level are dropped (their folders' cursors did not pass them)."""
        for d, conn in list(mux.channels.values()):
            self._end_channel(d, conn, say=False)
        for name in list(self._stored):
            self._drop_stored(name)
        self._stored_queue.clear()
        self._stored_wanted.clear()
        for folder in self._kept.values():
            folder.number = None
            folder.caught_up = False
            folder.batches.clear()
            if folder.digests is not None:
                folder.digests.cancel()
                folder.digests = None
        for timer in self._reopen.values():
            timer.cancel()
        self._reopen.clear()
        self._notify_progress()

    def _open_channel(self, mux: _Mux, d: _Document) -> None:
        """Open ``d`` on the connection: one message, no handshake."""
        if d.conn is not None or d.closing:
            return
        number = mux.next_channel
        mux.next_channel += 1
        session = SyncSession(
            max_message_bytes=self.max_message_bytes, extensions=True, validate=self._validate
        )
        conn = _Connection(mux.ws, session, channel=number, mux=mux)
        mux.channels[number] = (d, conn)
        self.stats["channels_opened"] += 1
        d.conn = conn
        mux.outbox.append(ExtOpen(number, d.name).encode())
        self._link(d, conn)
        if d.awareness is not None:
            if d.awareness.get_local_state() is not None:
                session.send_awareness(d.awareness.encode_awareness_update([d.awareness.client_id]))
            conn.keeper = asyncio.get_running_loop().create_task(self._keep_awareness(d))
        self._queue_frames(conn)

    def _end_channel(self, d: _Document, conn: _Connection, *, say: bool) -> None:
        mux = conn.mux
        assert mux is not None
        assert conn.channel is not None
        entry = mux.channels.get(conn.channel)
        if entry is not None and entry[1] is conn:
            del mux.channels[conn.channel]
        if say and not conn.closed:
            mux.outbox.append(ExtClose(conn.channel).encode())
            mux.wake.set()
        conn.closed = True
        if conn.deferred is not None:
            conn.deferred.cancel()
        if conn.keeper is not None:
            conn.keeper.cancel()
        if d.conn is conn:
            d.conn = None
            d.synced = False
            self._notify(d)

    def _on_channel_data(self, mux: _Mux, number: int, frame: bytes) -> None:
        entry = mux.channels.get(number)
        if entry is None:
            return  # a channel we closed: its last messages crossed our close
        d, conn = entry
        session = conn.session
        session.receive_data(frame)
        for event in session.events_received():
            self._on_event(d, conn, event)
            if isinstance(event, Failed):
                # The relay sent this document bad data: close it alone, open it again later.
                self._end_channel(d, conn, say=True)
                self._reopen_later(d, self._channel_backoff(d).next_delay())
                return
        self._queue_frames(conn)
        if d.name in self._stored:
            self._maybe_drop_stored(d)

    def _on_channel_closed(self, mux: _Mux, msg: ExtClose) -> None:
        entry = mux.channels.get(msg.channel)
        if entry is None:
            return
        d, conn = entry
        self._end_channel(d, conn, say=False)
        d.last_error = f"relay closed the document: {msg.code} {msg.reason}".rstrip()
        log.info("%s", d.last_error)
        retry = retry_after_close(msg.code)
        if d.name in self._stored:
            self._drop_stored(d.name)
            if retry is Retry.BACKOFF:
                # (e.g. 1013: the store failed for it) tried again, still owed to its folder
                delay = self._channel_backoff(d).next_delay()
                asyncio.get_running_loop().call_later(delay, self._want_stored, d.name)
                return
            # A kept document the relay will not serve (rights changed since it was
            # announced): given up here, announced again if it changes.
            self._settled(d.name)
            return
        if retry is Retry.NEVER:
            d.stop_reconnecting = True
        else:
            later = ACCESS_RETRY_S if retry is Retry.LATER else None
            self._reopen_later(d, later or self._channel_backoff(d).next_delay())
        self._notify(d)

    def _channel_backoff(self, d: _Document) -> Backoff:
        if d.backoff is None:
            d.backoff = self._backoff()
        return d.backoff

    def _reopen_later(self, d: _Document, delay: float) -> None:
        def reopen() -> None:
            self._reopen.pop(d.name, None)
            if self._docs.get(d.name) is d and self._mux is not None:
                self._open_channel(self._mux, d)

        old = self._reopen.pop(d.name, None)
        if old is not None:
            old.cancel()
        self._reopen[d.name] = asyncio.get_running_loop().call_later(delay, reopen)

    # -- folders kept offline ---------------------------------------------------------------

    async def keep(self, prefix: str) -> None:
        """Keep every document whose name starts with ``prefix`` synced in the local file,
        including documents created later anywhere; remembered in the file (kept again at
        the next start). Documents the app never opens are synced without a ``Doc``.

        Raises:
            InvalidDocumentName: ``prefix`` cannot start a document name.
        """
        validate_prefix(prefix)
        store = self._store()
        store.keep_folder(prefix)
        if prefix in self._kept:
            return
        stored = store.kept_folders()[prefix]
        folder = _KeptFolder(prefix, Cursor(*stored))
        self._kept[prefix] = folder
        if self.relay is None:
            return
        if self._mux_supported is False:
            folder.error = "the relay does not multiplex documents: folders cannot be kept"
        elif self._mux is not None:
            self._subscribe(self._mux, folder)
        elif self.multiplex and self._mux_task is None:
            self._mux_task = asyncio.get_running_loop().create_task(
                self._mux_loop(), name="crdtsync:mux"
            )

    async def unkeep(self, prefix: str) -> None:
        """No longer keep ``prefix`` synced (its documents stay in the file)."""
        folder = self._kept.pop(prefix, None)
        self._store().forget_folder(prefix)
        if folder is None:
            return
        mux = self._mux
        if mux is not None and folder.number is not None:
            mux.folders.pop(folder.number, None)
            mux.outbox.append(ExtUnsubscribe(folder.number).encode())
            mux.wake.set()
        if folder.digests is not None:
            folder.digests.cancel()

    def kept(self) -> list[str]:
        """The prefixes this replica keeps."""
        return sorted(self._kept)

    def documents(self, prefix: str = "") -> list[str]:
        """Names of the documents under ``prefix`` held in the local file (no network)."""
        store = self._store()
        names: list[str] = []
        after = ""
        while True:
            page = store.documents_in(prefix, after, 5000)
            names.extend(page)
            if len(page) < 5000:
                return names
            after = page[-1]

    def pending_in(self, prefix: str) -> int:
        """Local transactions of documents under ``prefix`` not yet acknowledged by the
        relay (open or not); survives restarts."""
        unsaved = sum(len(d.unsaved) for d in self._docs.values() if d.name.startswith(prefix))
        return self._store().pending_in(prefix) + unsaved

    def folder_status(self, prefix: str) -> FolderStatus:
        """What the replica knows about a kept folder's sync."""
        folder = self._kept.get(prefix)
        if folder is None:
            raise KeyError(f"folder {prefix!r} is not kept")
        return FolderStatus(
            subscribed=folder.number is not None,
            caught_up=folder.caught_up,
            to_sync=self._to_sync_in(prefix),
            pending=self.pending_in(prefix),
            error=folder.error,
        )

    def _to_sync_in(self, prefix: str) -> int:
        folder = self._kept[prefix]
        announced: set[str] = set()
        for _, names in folder.batches:
            announced |= names
        announced |= {n for n in self._stored_wanted if n.startswith(prefix)}
        announced |= {n for n in self._stored if n.startswith(prefix)}
        return len(announced)

    async def wait_synced_in(self, prefix: str, timeout: float | None = None) -> None:
        """Wait until the folder ``prefix`` is in sync: the relay's announcements caught
        up, every announced document synced here, every local change acknowledged.

        Raises:
            KeyError: the folder is not kept.
            FoldersUnsupported: the relay cannot keep folders.
            SyncTimeout: ``timeout`` seconds passed first.
        """
        if prefix not in self._kept:
            raise KeyError(f"folder {prefix!r} is not kept")

        def done() -> bool:
            folder = self._kept.get(prefix)
            if folder is None:
                raise KeyError(f"folder {prefix!r} is no longer kept")
            if self._mux_supported is False:
                raise FoldersUnsupported(folder.error or "the relay cannot keep folders")
            return (
                folder.caught_up and self._to_sync_in(prefix) == 0 and self.pending_in(prefix) == 0
            )

        try:
            async with asyncio.timeout(timeout), self._progress:
                await self._progress.wait_for(done)
        except TimeoutError:
            status = self.folder_status(prefix)
            raise SyncTimeout(
                f"folder {prefix!r} not in sync after {timeout} s: {status}"
            ) from None

    def _notify_progress(self) -> None:
        async def notify() -> None:
            async with self._progress:
                self._progress.notify_all()

        with contextlib.suppress(RuntimeError):
            asyncio.get_running_loop().create_task(notify())

    def _subscribe(self, mux: _Mux, folder: _KeptFolder) -> None:
        number = mux.next_folder
        mux.next_folder += 1
        mux.folders[number] = folder
        folder.number = number
        folder.caught_up = False
        folder.error = None
        folder.batches.clear()
        c = folder.cursor
        mux.outbox.append(
            ExtSubscribe(number, folder.prefix, c.store, c.epoch, c.position).encode()
        )
        mux.wake.set()
        # Documents edited here while offline go up whatever the relay announces.
        for name in self._store().pending_documents_in(folder.prefix):
            if name not in self._docs:
                self._want_stored(name)

    def _on_changed(self, mux: _Mux, msg: ExtChanged) -> None:
        folder = mux.folders.get(msg.folder)
        if folder is None:
            return
        if msg.digests_wanted:
            if folder.digests is None:
                folder.digests = asyncio.get_running_loop().create_task(
                    self._send_digests(mux, msg.folder, folder)
                )
            return
        outstanding = set()
        self.stats["documents_announced"] += len(msg.documents)
        digests = dict(zip(msg.documents, msg.digests, strict=True)) if msg.digests else {}
        for name in msg.documents:
            if not name.startswith(folder.prefix):
                continue  # not this folder's: a relay's mistake, never synced into it
            try:
                validate_document_name(name)
            except InvalidDocumentName:
                continue
            d = self._docs.get(name)
            if d is not None:
                if not d.synced:
                    outstanding.add(name)  # its channel's sync brings it
                continue
            s = self._stored.get(name)
            if s is not None:
                # Being synced without a Doc: its channel may close before the change
                # reaches it there, so it asks once more (and stays until answered).
                outstanding.add(name)
                if s.conn is not None and s.synced:
                    s.synced = False
                    s.conn.doc_sync.resync()
                    self._queue_frames(s.conn)
                continue
            if name in digests and self._digest(name) == digests[name]:
                self.stats["documents_already_held"] += 1
                continue  # held here as the relay holds it (e.g. our own edits)
            outstanding.add(name)
            self._want_stored(name)
        cursor = None
        if msg.cursor or msg.caught_up:
            cursor = Cursor(msg.store, msg.epoch, msg.cursor)
        folder.batches.append((cursor, outstanding))
        if msg.caught_up:
            folder.caught_up = True
        self._advance(folder)

    def _advance(self, folder: _KeptFolder) -> None:
        """Record the cursor of every announcement whose documents are all synced here."""
        moved = False
        while folder.batches and not folder.batches[0][1]:
            cursor = folder.batches.popleft()[0]
            if (cursor is not None and cursor.position >= folder.cursor.position) or (
                cursor is not None and cursor.store != folder.cursor.store
            ):
                folder.cursor = cursor
                moved = True
        if moved:
            c = folder.cursor
            self._flush_remote()  # what the cursor passed is in the file first
            try:
                self._store().set_folder_cursor(folder.prefix, c.store, c.epoch, c.position)
            except StoreError as exc:
                folder.error = f"could not record the folder's cursor: {exc}"
        self._notify_progress()

    def _settled(self, name: str) -> None:
        """``name`` is synced here (or given up): the announcements naming it are done."""
        for folder in self._kept.values():
            if not name.startswith(folder.prefix):
                continue
            for _, names in folder.batches:
                names.discard(name)
            self._advance(folder)

    def _digest(self, name: str) -> bytes | None:
        """The digest of ``name`` as this replica holds it (None: it cannot be read)."""
        try:
            return document_digest(self._store().load(name).all_updates())
        except (StoreError, MalformedMessage) as exc:
            log.warning("cannot read %r for its digest: %s", name, exc)
            return None

    async def _send_digests(self, mux: _Mux, number: int, folder: _KeptFolder) -> None:
        """Describe what this replica holds of a folder, a page at a time."""
        try:
            store = self._store()
            after = ""
            while True:
                page = store.documents_in(folder.prefix, after, DIGEST_BATCH)
                entries = []
                for name in page:
                    d = self._docs.get(name)
                    if d is not None:
                        digest = document_digest([d.doc.get_update()])
                    else:
                        digest = document_digest(store.load(name).all_updates())
                    entries.append((name, digest))
                last = len(page) < DIGEST_BATCH
                if mux.folders.get(number) is not folder:
                    return
                mux.outbox.append(ExtDigests(number, tuple(entries), last).encode())
                mux.wake.set()
                if last:
                    return
                after = page[-1]
                await asyncio.sleep(0)  # other documents' traffic goes on meanwhile
        except StoreError as exc:
            folder.error = f"could not read the folder's documents: {exc}"
        finally:
            if folder.digests is asyncio.current_task():
                folder.digests = None

    # -- kept documents the app has not opened: synced at the store level -------------------

    def _want_stored(self, name: str) -> None:
        if name in self._stored or name in self._stored_wanted or name in self._docs:
            return
        self._stored_wanted.add(name)
        self._stored_queue.append(name)
        self._pump_stored()

    def _pump_stored(self) -> None:
        mux = self._mux
        while mux is not None and self._stored_queue and len(self._stored) < MAX_STORED_SYNCS:
            name = self._stored_queue.popleft()
            self._stored_wanted.discard(name)
            if name in self._docs or name in self._stored:
                continue  # open meanwhile: its channel's first sync settles it
            store = self._store()
            try:
                stored = store.load(name)
                pending = store.pending_count(name)
            except StoreError as exc:
                log.warning("cannot sync kept document %r: %s", name, exc)
                self._settled(name)
                continue
            doc = _StoredDoc(stored.all_updates())
            d = _Document(
                name,
                doc,  # type: ignore[arg-type]
                pending=pending,
                tail=len(stored.updates),
                order=self._ack_order(name),
            )
            self._stored[name] = d
            self._open_channel(mux, d)

    def _maybe_drop_stored(self, d: _Document) -> None:
        """A kept document synced at the store level goes once it has nothing to wait for."""
        if not d.synced or len(d.held):
            return
        conn = d.conn
        if conn is not None and conn.doc_sync.waiting_for_acks:
            return  # its acknowledgements are on their way (what was refused stays pending)
        self._drop_stored(d.name)
        self._settled(d.name)

    def _drop_stored(self, name: str) -> None:
        d = self._stored.get(name)
        if d is None:
            return
        if d.conn is not None:
            self._end_channel(d, d.conn, say=self._mux is not None)
        self._flush_remote()
        del self._stored[name]
        if d.tail >= self.compact_after_updates:
            try:
                self._store().compact(name)
            except StoreError as exc:
                log.warning("compacting kept document %r: %s", name, exc)
        self._pump_stored()


def _is_hello(data: bytes | str) -> bool:
    """Whether a relay's first message confirms the multiplexed connection."""
    if isinstance(data, str):
        return False
    try:
        msg = decode_message(data)
    except MalformedMessage:
        return False
    return isinstance(msg, ExtHello) and msg.version >= MUX_VERSION


def _describe_connect_error(exc: BaseException) -> str:
    """A connection failure in words; a certificate the relay's CA does not vouch for
    says so plainly (the usual cause: a self-signed or private CA not trusted here)."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return (
            f"TLS certificate verification failed ({exc.verify_message}): pass "
            "ssl_context=ssl.create_default_context(cafile=<your CA>) if the relay "
            "uses a private CA"
        )
    return str(exc) or type(exc).__name__


def _describe_close(exc: ConnectionClosed) -> str:
    frame = exc.rcvd
    if frame is None:
        return "connection lost"
    return f"relay closed the connection: {frame.code} {frame.reason}".rstrip()


def _new_client_id() -> tuple[int, bytes]:
    """A fresh client id and the key it is derived from (crdtsync.integrity)."""
    while True:
        key = os.urandom(CLIENT_KEY_BYTES)
        client_id = client_id_of_key(key)
        if client_id:
            return client_id, key


def _content_for(doc: Doc[Any], info: UpdateInfo) -> bytes:
    """The document's content of the clients an update touches (whole: a cut inside a
    string can land between surrogate halves, which pycrdt 0.14 gets wrong).

    What the integrity check compares an overlapping update with (and looks parents up
    in); every other client is left out of the encoding.
    """
    sv = decode_state_vector(doc.get_state())
    for client in [*info.starts, *(parent[2] for parent in info.parents)]:
        if client in sv:
            sv[client] = 0
    return doc.get_update(encode_state_vector(sv))
