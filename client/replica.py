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
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from http import HTTPStatus
from pathlib import Path
from typing import Any
from urllib.parse import quote

from pycrdt import Awareness, Doc, TransactionEvent
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus, InvalidURI

from crdtsync.docsync import DEFER_S, AckOrder, DocumentSync
from crdtsync.errors import (
    AcknowledgementsUnsupported,
    CloseCode,
    MalformedMessage,
    Retry,
    StoreError,
    SyncTimeout,
    close_reason,
    retry_after_close,
)
from crdtsync.integrity import KEY_OWNER, Ledger, Writer, client_id_of_key
from crdtsync.protocol import (
    CLIENT_KEY_BYTES,
    MUX_VERSION,
    ExtChanged,
    ExtChannel,
    ExtClose,
    ExtHello,
    ExtOpen,
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
from .documents import (
    DocumentStatus,
    FolderStatus,
    Link,
    LocalDocument,
    MuxLink,
    ThreadSafeDoc,
)
from .folders import Folders
from .presence import Presence
from .relays import RelayChoice

__all__ = ["DocumentStatus", "FolderStatus", "Replica", "ThreadSafeDoc", "TokenSource"]

log = logging.getLogger("crdtsync.replica")

EXTENSION_QUERY = "crdtsync=1"
STORE_UNAVAILABLE = "store unavailable"  # how a relay's close reason says its store failed
PROBE_DOCUMENT = "crdtsync-probe"  # asked for when probing a relay without multiplexing
MUX_QUERY = "mux=1"  # with EXTENSION_QUERY on "/": one connection for every document
MAX_STORED_SYNCS = 64  # kept documents the app has not opened, synced at once
DIGEST_BATCH = 512  # documents described per digest message
# After the relay refused our rights (HTTP 403, close 4403 or 1008): try again this much
# later, with a fresh token, never in a tight loop and never giving up for good.
ACCESS_RETRY_S = 60.0
# A token, or a function giving one (asked again before each connection attempt and
# after the relay said the token expired); it may be a coroutine function.
TokenSource = str | Callable[[], "str | Awaitable[str]"]
HEALTHY_AFTER_S = 5.0  # a connection synced and up this long resets the reconnect backoff


class LinkHost:
    """The replica's side of one document's sync on one link (crdtsync.docsync)."""

    __slots__ = ("conn", "d", "replica")

    def __init__(self, replica: Replica, d: LocalDocument, conn: Link) -> None:
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
        # Our presence names our client id: it goes out after our claim of that id (a
        # room member that saw it first could write there before us), so only now.
        if self.d.presence is not None:
            self.d.presence.announce(self.conn.session)
        self.replica._notify(self.d)

    def synced(self) -> None:
        self.replica._on_synced(self.d)

    def refused(self, reason: str) -> None:
        self.d.refused += 1
        self.d.last_error = f"the relay refused content: {reason}"
        self.replica._notify(self.d)

    def denied(self, reason: str) -> None:
        self.d.last_error = f"permission denied: {reason}"


class Replica:
    """A local replica of documents, optionally synced through one relay.

    Use it as ``async with Replica("notes.db", relay="ws://127.0.0.1:8765") as replica``.

    Args:
        path: the replica's SQLite file (created if missing).
        relay: ``ws://`` or ``wss://`` URL of a relay; None works fully offline. Several
            (a list, in order of preference: relays of other regions, or other relay
            processes of one region): the first that answers is used, the next when it
            fails, and the first again once it answers (asked every ``relay_probe_s``).
            An acknowledgement from any of them counts; ``status()`` says which is used.
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
        relay: str | Sequence[str] | None = None,
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
        relay_probe_s: float = 15.0,
    ) -> None:
        urls = [relay] if isinstance(relay, str) else list(relay or ())
        if relay is not None and not urls:
            raise ValueError("relay: an empty list names no relay (None works offline)")
        for url in urls:
            if not isinstance(url, str) or not url.startswith(("ws://", "wss://")):
                raise ValueError(f"relay must be a ws:// or wss:// URL, not {url!r}")
            if ssl_context is not None and not url.startswith("wss://"):
                # (it would connect in plain text, token and all, and ignore the context)
                raise ValueError(f"ssl_context needs a wss:// relay, not {url!r}")
        self.path = Path(path)
        # (in order, once each: a relay named twice is one relay)
        unique = list(dict.fromkeys(u.rstrip("/") for u in urls))
        self._relays = RelayChoice(unique, relay_probe_s) if unique else None
        self._leaving: asyncio.Task[None] | None = None
        self._prober: asyncio.Task[None] | None = None
        self.token = token
        self.ssl_context = ssl_context
        self.synchronous = synchronous
        self.max_message_bytes = max_message_bytes
        self.compact_after_updates = compact_after_updates
        self._backoff = backoff or Backoff
        self.params = dict(params or {})
        self.open_timeout_s = open_timeout_s
        self.store: UpdateLog | None = None
        self._docs: dict[str, LocalDocument] = {}
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
        self._mux: MuxLink | None = None
        self._mux_task: asyncio.Task[None] | None = None
        self._mux_supported: bool | None = None  # decided by the relay's first answer
        self._stopped = False
        self._folders = Folders(self)
        self._reopen: dict[str, asyncio.TimerHandle] = {}
        # The document of the largest frame sent on the multiplexed connection (blamed
        # when the relay closes it with 1009, message too big).
        self._too_big: LocalDocument | None = None
        self._largest_sent = 0
        # What went over the network (issue 11's benchmarks and tests count it).
        self.stats: Counter[str] = Counter()

    @property
    def relay(self) -> str | None:
        """The relay in use (of several: the one connected to, or tried next); None offline."""
        return self._relays.current if self._relays is not None else None

    @property
    def relays(self) -> tuple[str, ...]:
        """Every relay this replica may use, in order of preference."""
        return self._relays.urls if self._relays is not None else ()

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
        if self._relays is not None and len(self._relays.urls) > 1 and self._prober is None:
            self._prober = asyncio.get_running_loop().create_task(
                self._probe_home(self._relays), name="crdtsync:probe-home"
            )
        for prefix in self.store.kept_folders():
            await self.keep(prefix)

    async def stop(self) -> None:
        """Close every document (local edits are already on disk) and the file."""
        self._stopped = True
        leaving, self._leaving = self._leaving, None
        if leaving is not None:
            leaving.cancel()
        prober, self._prober = self._prober, None
        if prober is not None:
            prober.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await prober
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
        self._folders.stop()
        self._flush_remote()
        for timer in self._reopen.values():
            timer.cancel()
        self._reopen.clear()
        self._mux_supported = None
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
        if name in self._folders.stored:
            # Synced at the store level until now: a Doc takes over (its own channel's
            # first sync settles what its folder announced).
            self._folders.drop(name)
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
        d = LocalDocument(
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
        d.presence = Presence(
            doc, lambda update: self._send_presence(d, update), self._loop, self._loop_thread
        )
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
        # Tell the room we left, as stock clients do; best effort within a short bound.
        if conn is not None and d.presence is not None and d.presence.leave() and conn.mux is None:
            # (Its removal was queued for the writer, which is about to be cancelled.)
            frames = [*conn.outbox, *conn.session.data_to_send()]
            conn.outbox.clear()
            with contextlib.suppress(ConnectionClosed, TimeoutError, OSError):
                async with asyncio.timeout(1.0):
                    for frame in frames:
                        await conn.ws.send(frame)
        if d.subscription is not None:
            d.doc.unobserve(d.subscription)
        if d.presence is not None:
            d.presence.close()
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
        if not self._stopped and any(name.startswith(p) for p in self._folders.folders):
            # A kept document goes on syncing without its Doc: what it still had to send,
            # and what reached its channel after it closed, are exchanged once more.
            self._folders.want(name)

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
            relay=self.relay,
        )

    def awareness(self, name: str) -> Awareness:
        """The presence (cursors, user names) of an open document: a ``pycrdt.Awareness``.

        Set your own state with ``set_local_state({...})``; it is sent to the relay and
        renewed while connected. Other clients' states arrive in ``states``. Presence is
        relayed, never stored.
        """
        presence = self._doc(name).presence
        assert presence is not None  # set by open()
        return presence.awareness

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

    def _doc(self, name: str) -> LocalDocument:
        try:
            return self._docs[name]
        except KeyError:
            raise KeyError(f"document {name!r} is not open") from None

    def _notify(self, d: LocalDocument) -> None:
        async def notify() -> None:
            async with d.changed:
                d.changed.notify_all()
            if self._folders.folders:
                async with self._folders.progress:
                    self._folders.progress.notify_all()

        with contextlib.suppress(RuntimeError):  # no running loop: nobody can be waiting
            asyncio.get_running_loop().create_task(notify())

    # -- local transactions ---------------------------------------------------------------

    def _on_transaction(self, d: LocalDocument, event: TransactionEvent) -> None:
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

    def _local_done(
        self, d: LocalDocument, update: bytes, seq: int | None, error: str | None
    ) -> None:
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

    def _maybe_compact(self, d: LocalDocument) -> None:
        if d.tail >= self.compact_after_updates and not d.compaction_scheduled:
            # Not now: the Doc may be mid-commit and cannot be encoded until that returns.
            with contextlib.suppress(RuntimeError):
                asyncio.get_running_loop().call_soon(self._compact, d)
                d.compaction_scheduled = True

    def _send_presence(self, d: LocalDocument, update: bytes) -> None:
        conn = d.conn
        if conn is None or conn.doc_sync.acks is None:
            return  # the link announces our state once the relay spoke (LinkHost.decided)
        conn.session.send_awareness(update)
        self._queue_frames(conn)

    def _send_local(self, d: LocalDocument, seq: int, update: bytes) -> None:
        conn = d.conn
        if conn is None:
            return  # the next link's catch-up carries it
        conn.doc_sync.local(seq, update)
        self._queue_frames(conn)

    def _queue_frames(self, conn: Link) -> None:
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

    def _retry_unsaved(self, d: LocalDocument) -> None:
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

    def _compact(self, d: LocalDocument) -> None:
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
        self, d: LocalDocument, update: bytes, info: UpdateInfo
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

    def _quarantine_remote(self, d: LocalDocument, update: bytes, reason: str) -> None:
        log.warning("quarantined an update from the relay for %r: %s", d.name, reason)
        d.quarantined += 1
        d.last_error = f"quarantined an update from the relay: {reason}"
        try:
            self._store().quarantine(d.name, update, reason, now=time.time())
        except StoreError as exc:
            log.error("could not keep the quarantined update of %r: %s", d.name, exc)
        self._notify(d)

    def _apply_remote(self, d: LocalDocument, update: bytes) -> None:
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

    def _url(self, relay: str, name: str) -> str:
        params = [EXTENSION_QUERY]
        params += [f"{quote(k, safe='')}={quote(v, safe='')}" for k, v in self.params.items()]
        return f"{relay}/{name}?{'&'.join(params)}"

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

    async def _connect_loop(self, d: LocalDocument) -> None:
        backoff = self._backoff()
        relays = self._relays
        assert relays is not None
        tried = 0  # relays this loop saw fail since its last healthy connection
        while not d.stop_reconnecting and not d.closing:
            delay: float | None = None  # None: the backoff's next delay
            relay = relays.current
            failed = False  # the relay failed (not us, not our rights): another may not
            self.stats["connect_attempts"] += 1
            try:
                headers = self._authorization(await self._token())
                async with connect(
                    self._url(relay, d.name),
                    additional_headers=headers,
                    max_size=self.max_message_bytes,
                    open_timeout=self.open_timeout_s,
                    compression=None,
                    ssl=self.ssl_context if relay.startswith("wss:") else None,
                ) as ws:
                    if relays.current != relay:
                        # The replica moved while this connected (the probe closed the
                        # links it found; this one was not one yet): follow it.
                        await ws.close(CloseCode.NORMAL, "moving to another relay")
                        continue
                    self.stats["connections"] += 1
                    began = time.monotonic()
                    try:
                        await self._run_connection(d, ws)
                    finally:
                        # Only a connection that synced and stayed up resets the backoff: a
                        # relay that fails right after each handshake is retried ever slower.
                        if d.synced and time.monotonic() - began >= HEALTHY_AFTER_S:
                            backoff.reset()
                            relays.connected(relay)
                            tried = 0
            except ConnectionClosed as exc:
                d.last_error = _describe_close(exc)
                failed = _relay_failed(exc)
                retry = retry_after_close(exc.rcvd.code if exc.rcvd is not None else None)
                if retry is Retry.NEVER:
                    d.stop_reconnecting = True  # status() says why
                elif retry is Retry.LATER:
                    delay = ACCESS_RETRY_S
            except InvalidStatus as exc:
                status = exc.response.status_code
                body = exc.response.body.decode("utf-8", "replace").strip()[:200]
                d.last_error = f"the relay refused the connection: HTTP {status} {body}".rstrip()
                failed = _relay_failed(exc)
                if status == 403 or (status == 401 and isinstance(self.token, str)):
                    delay = ACCESS_RETRY_S  # the same token would be refused again now
            except (OSError, InvalidHandshake, InvalidURI, TimeoutError) as exc:
                d.last_error = f"cannot connect to {relay}: {_describe_connect_error(exc)}"
                failed = True
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
            tried += failed
            if _now_elsewhere(relays, relay, failed) and tried < len(relays.urls):
                continue  # (another relay: at once)
            tried = 0
            next_delay = backoff.next_delay()
            await asyncio.sleep(next_delay if delay is None else max(delay, next_delay))

    async def _writer(self, conn: Link) -> None:
        while True:
            await conn.wake.wait()
            conn.wake.clear()
            while conn.outbox:
                frame = conn.outbox.popleft()
                self.stats["messages_out"] += 1
                self.stats["bytes_out"] += len(frame)
                await conn.ws.send(frame)

    async def _run_connection(self, d: LocalDocument, ws: ClientConnection) -> None:
        session = SyncSession(
            max_message_bytes=self.max_message_bytes, extensions=True, validate=self._validate
        )
        conn = Link(ws, session)
        d.conn = conn
        d.last_error = None
        self._link(d, conn)
        presence = d.presence
        assert presence is not None  # (an open document: only those have a connection)
        self._queue_frames(conn)
        writer = asyncio.create_task(self._writer(conn))
        keeper = asyncio.create_task(presence.keep())
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

    def _link(self, d: LocalDocument, conn: Link) -> DocumentSync:
        """Start ``d``'s sync protocol on ``conn`` (crdtsync.docsync)."""
        conn.sync = DocumentSync(conn.session, LinkHost(self, d, conn), d.order, d.held)
        conn.sync.start()
        return conn.sync

    def _defer(self, d: LocalDocument, conn: Link) -> None:
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

    def _claims(self, d: LocalDocument) -> tuple[dict[int, bytes], frozenset[int]]:
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

    def _confirm(self, d: LocalDocument, seqs: list[int]) -> None:
        """Count transactions the relay confirmed (in order) as stored, in the file."""
        try:
            d.pending -= self._store().acknowledge(d.name, seqs)
        except StoreError as exc:
            d.last_error = str(exc)
        self._notify(d)

    def _admit_and_apply(self, d: LocalDocument, update: bytes, info: UpdateInfo) -> set[int]:
        accepted, refused = self._admit(d, update, info)
        if accepted is not None:
            self._apply_remote(d, accepted)
        return refused

    def _on_synced(self, d: LocalDocument) -> None:
        first = not d.synced
        d.synced = True
        self._notify(d)
        if first and self._folders.folders and d.name not in self._folders.stored:
            self._folders.settled(d.name)

    def _on_event(self, d: LocalDocument, conn: Link, event: Any) -> None:
        sync = conn.doc_sync
        sync.handle(event, time.monotonic())
        if sync.timer_wanted:
            self._defer(d, conn)
        if isinstance(event, AwarenessReceived):
            if d.presence is not None:
                d.presence.received(event.payload)
        elif isinstance(event, AwarenessQueried):
            if d.presence is not None:
                d.presence.announce(conn.session)
        elif isinstance(event, Failed):
            d.last_error = f"relay sent bad data: {event.reason}"

    # -- one multiplexed connection for every document (issue 11) ---------------------------

    def _ensure_mux(self) -> None:
        """Run the multiplexed connection (once: it reconnects by itself)."""
        if self._mux_task is None:
            self._mux_task = asyncio.get_running_loop().create_task(
                self._mux_loop(), name="crdtsync:mux"
            )

    def _start_sync(self, d: LocalDocument) -> None:
        """Sync ``d`` through the relay: a channel of the multiplexed connection, or a
        connection of its own where the relay has none (the reference server)."""
        if self.relay is None:
            return
        if self.multiplex and self._mux_supported is not False:
            if self._mux_task is None:
                self._ensure_mux()
            elif self._mux is not None:
                self._open_channel(self._mux, d)
            return
        d.task = asyncio.get_running_loop().create_task(
            self._connect_loop(d), name=f"crdtsync:{d.name}"
        )

    def _mux_url(self, relay: str) -> str:
        params = [EXTENSION_QUERY, MUX_QUERY]
        params += [f"{quote(k, safe='')}={quote(v, safe='')}" for k, v in self.params.items()]
        return f"{relay}/?{'&'.join(params)}"

    def _synced_docs(self) -> list[LocalDocument]:
        return [*self._docs.values(), *self._folders.stored.values()]

    def _say_error(self, error: str) -> None:
        self.last_error = error
        for d in self._docs.values():
            d.last_error = error
            self._notify(d)

    async def _mux_loop(self) -> None:
        """Keep the multiplexed connection up (backoff, tokens, as one document's loop)."""
        backoff = self._backoff()
        relays = self._relays
        assert relays is not None
        while not self._stopped:
            delay: float | None = None
            relay = relays.current
            failed = False  # the relay failed (not us, not our rights): another may not
            self.stats["connect_attempts"] += 1
            try:
                headers = self._authorization(await self._token())
                async with connect(
                    self._mux_url(relay),
                    additional_headers=headers,
                    max_size=self.max_message_bytes,
                    open_timeout=self.open_timeout_s,
                    # (a server without multiplexing may keep talking: no long goodbye)
                    close_timeout=2.0,
                    compression=None,
                    ssl=self.ssl_context if relay.startswith("wss:") else None,
                ) as ws:
                    async with asyncio.timeout(self.open_timeout_s):
                        first = await ws.recv()
                    if not _is_hello(first):
                        # A relay without multiplexing that took "/" as a document (the
                        # reference server): one connection per document, as stock clients.
                        self._fall_back("the relay does not multiplex documents")
                        return
                    self._mux_supported = True
                    if relays.current != relay:
                        await ws.close(CloseCode.NORMAL, "moving to another relay")
                        continue
                    self.stats["connections"] += 1
                    mux = MuxLink(ws)
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
                            relays.connected(relay)
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
                failed = _relay_failed(exc)
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
                failed = _relay_failed(exc)
                if status == 403 or (status == 401 and isinstance(self.token, str)):
                    delay = ACCESS_RETRY_S
            except (OSError, InvalidHandshake, InvalidURI, TimeoutError) as exc:
                self._say_error(f"cannot connect to {relay}: {_describe_connect_error(exc)}")
                failed = True
            except Exception as exc:
                log.exception("the multiplexed connection failed")
                self._say_error(f"sync failed: {type(exc).__name__}: {exc}")
            if _now_elsewhere(relays, relay, failed):
                continue  # (another relay: at once)
            next_delay = backoff.next_delay()
            await asyncio.sleep(next_delay if delay is None else max(delay, next_delay))

    async def _probe_home(self, relays: RelayChoice) -> None:
        """While on another relay than the first, ask the first every ``probe_s`` (a
        handshake and the relay's first message, then closed); once it answers, move
        back: the connections to the other relay are closed and reconnect, to the first,
        at once."""
        while not self._stopped:
            await asyncio.sleep(min(1.0, relays.probe_s))
            if not relays.probe_due(time.monotonic()):
                continue
            home = relays.home
            answered = False
            mux = self.multiplex and self._mux_supported is not False
            # (per document: one the app opened, which its token may read)
            name = next(iter(self._docs), PROBE_DOCUMENT)
            try:
                headers = self._authorization(await self._token())
                async with connect(
                    self._mux_url(home) if mux else self._url(home, name),
                    additional_headers=headers,
                    open_timeout=self.open_timeout_s,
                    close_timeout=1.0,
                    compression=None,
                    ssl=self.ssl_context if home.startswith("wss:") else None,
                ) as ws:
                    # A handshake alone is no answer: a relay may accept, then drop.
                    async with asyncio.timeout(self.open_timeout_s):
                        first = await ws.recv()
                    answered = _is_hello(first) or not mux
            except Exception as exc:  # (any failure: the home is not back)
                log.debug("the first relay %s does not answer yet: %s", home, exc)
            if relays.probed(answered, time.monotonic()):
                log.info("back to the first relay %s", home)
                await self._leave_relay()

    async def _leave_relay(self) -> None:
        """Close every connection to the relay in use (1000): the loops connect again at
        once, to the relay now chosen."""
        links = [
            d.conn.ws for d in self._docs.values() if d.conn is not None and d.conn.mux is None
        ]
        if self._mux is not None:
            links.append(self._mux.ws)
        for ws in links:
            with contextlib.suppress(ConnectionClosed, TimeoutError, OSError):
                async with asyncio.timeout(2.0):
                    await ws.close(CloseCode.NORMAL, "moving to another relay")

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
        self._folders.unsupported(reason)

    async def _run_mux(self, mux: MuxLink) -> None:
        writer = asyncio.create_task(self._mux_writer(mux))
        try:
            for d in list(self._docs.values()):
                if not d.stop_reconnecting:
                    self._open_channel(mux, d)
            self._folders.connected(mux)
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
                    self._folders.on_changed(mux, msg)
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
                        self._folders.notify()
                if writer.done():
                    writer.result()  # surface the send error
        finally:
            writer.cancel()
            await asyncio.gather(writer, return_exceptions=True)

    async def _mux_writer(self, mux: MuxLink) -> None:
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
    def _document_of(mux: MuxLink, frame: bytes) -> LocalDocument | None:
        """The document a channel frame belongs to (None for other frames)."""
        if frame[:2] != bytes((MessageType.CRDTSYNC, ExtType.CHANNEL)):
            return None
        try:
            channel, _ = read_var_uint(frame, 2)
        except MalformedMessage:
            return None
        entry = mux.channels.get(channel)
        return entry[0] if entry is not None else None

    def _mux_down(self, mux: MuxLink) -> None:
        """The multiplexed connection ended: every channel with it; kept documents synced
        at the store level are dropped (their folders' cursors did not pass them)."""
        for d, conn in list(mux.channels.values()):
            self._end_channel(d, conn, say=False)
        self._folders.connection_lost()
        for timer in self._reopen.values():
            timer.cancel()
        self._reopen.clear()

    def _open_channel(self, mux: MuxLink, d: LocalDocument) -> None:
        """Open ``d`` on the connection: one message, no handshake."""
        if d.conn is not None or d.closing:
            return
        number = mux.next_channel
        mux.next_channel += 1
        session = SyncSession(
            max_message_bytes=self.max_message_bytes, extensions=True, validate=self._validate
        )
        conn = Link(mux.ws, session, channel=number, mux=mux)
        mux.channels[number] = (d, conn)
        self.stats["channels_opened"] += 1
        d.conn = conn
        mux.outbox.append(ExtOpen(number, d.name).encode())
        self._link(d, conn)
        if d.presence is not None:
            conn.keeper = asyncio.get_running_loop().create_task(d.presence.keep())
        self._queue_frames(conn)

    def _end_channel(self, d: LocalDocument, conn: Link, *, say: bool) -> None:
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

    def _on_channel_data(self, mux: MuxLink, number: int, frame: bytes) -> None:
        entry = mux.channels.get(number)
        if entry is None:
            return  # a channel we closed: its last messages crossed our close
        d, conn = entry
        session = conn.session
        session.receive_data(frame)
        for event in session.events_received():
            self._on_event(d, conn, event)
            if isinstance(event, Failed):
                # The relay sent this document bad data: close it alone, open it again
                # later (one synced without a Doc: given up, reported on its folder).
                if d.name in self._folders.stored:
                    self._folders.failed(d.name, event.reason)
                    return
                self._end_channel(d, conn, say=True)
                self._reopen_later(d, self._channel_backoff(d).next_delay())
                return
        self._queue_frames(conn)
        if d.name in self._folders.stored:
            self._folders.maybe_drop(d)

    def _on_channel_closed(self, mux: MuxLink, msg: ExtClose) -> None:
        entry = mux.channels.get(msg.channel)
        if entry is None:
            return
        relays = self._relays
        if (
            msg.code in (CloseCode.INTERNAL_ERROR, CloseCode.TRY_AGAIN_LATER)
            and msg.reason.startswith(STORE_UNAVAILABLE)
            and relays is not None
            and relays.others_left()
            and self._leaving is None
        ):
            # The relay in use cannot reach its store (it closes each document, not the
            # connection): another relay may, so the whole connection moves, at once.
            # (With every relay failed in a row, the document retries here instead.)
            relays.failed(relays.current, time.monotonic())
            log.info("the relay's store is unavailable: moving to %s", relays.current)
            self._leaving = asyncio.get_running_loop().create_task(self._leave_relay())
            self._leaving.add_done_callback(lambda _: setattr(self, "_leaving", None))
        d, conn = entry
        self._end_channel(d, conn, say=False)
        d.last_error = f"relay closed the document: {msg.code} {msg.reason}".rstrip()
        log.info("%s", d.last_error)
        retry = retry_after_close(msg.code)
        if d.name in self._folders.stored:
            self._folders.drop(d.name)
            if retry is Retry.BACKOFF:
                # (e.g. 1013: the store failed for it) tried again, still owed to its folder
                delay = self._channel_backoff(d).next_delay()
                asyncio.get_running_loop().call_later(delay, self._folders.want, d.name)
                return
            # A kept document the relay will not serve (rights changed since it was
            # announced): given up here, announced again if it changes.
            self._folders.settled(d.name)
            return
        if retry is Retry.NEVER:
            d.stop_reconnecting = True
        else:
            later = ACCESS_RETRY_S if retry is Retry.LATER else None
            self._reopen_later(d, later or self._channel_backoff(d).next_delay())
        self._notify(d)

    def _channel_backoff(self, d: LocalDocument) -> Backoff:
        if d.backoff is None:
            d.backoff = self._backoff()
        return d.backoff

    def _reopen_later(self, d: LocalDocument, delay: float) -> None:
        def reopen() -> None:
            self._reopen.pop(d.name, None)
            if self._docs.get(d.name) is d and self._mux is not None:
                self._open_channel(self._mux, d)

        old = self._reopen.pop(d.name, None)
        if old is not None:
            old.cancel()
        self._reopen[d.name] = asyncio.get_running_loop().call_later(delay, reopen)

    # -- folders kept offline (client/folders.py) -------------------------------------------

    async def keep(self, prefix: str) -> None:
        """Keep every document whose name starts with ``prefix`` synced in the local file,
        including documents created later anywhere; remembered in the file (kept again at
        the next start). Documents the app never opens are synced without a ``Doc``.

        Raises:
            InvalidDocumentName: ``prefix`` cannot start a document name.
        """
        await self._folders.keep(prefix)

    async def unkeep(self, prefix: str) -> None:
        """No longer keep ``prefix`` synced (its documents stay in the file)."""
        await self._folders.unkeep(prefix)

    def kept(self) -> list[str]:
        """The prefixes this replica keeps."""
        return self._folders.kept()

    def documents(self, prefix: str = "") -> list[str]:
        """Names of the documents under ``prefix`` held in the local file (no network)."""
        return self._folders.documents(prefix)

    def pending_in(self, prefix: str) -> int:
        """Local transactions of documents under ``prefix`` not yet acknowledged by the
        relay (open or not); survives restarts."""
        return self._folders.pending_in(prefix)

    def folder_status(self, prefix: str) -> FolderStatus:
        """What the replica knows about a kept folder's sync."""
        return self._folders.folder_status(prefix)

    async def wait_synced_in(self, prefix: str, timeout: float | None = None) -> None:
        """Wait until the folder ``prefix`` is in sync: the relay's announcements caught
        up, every announced document synced here, every local change acknowledged.

        Raises:
            KeyError: the folder is not kept.
            FoldersUnsupported: the relay cannot keep folders.
            SyncTimeout: ``timeout`` seconds passed first.
        """
        await self._folders.wait_synced_in(prefix, timeout)


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


# Close codes after which another relay may do better: going away (1001), dropped (1006,
# or no close frame at all), an internal error (1011), restarting (1012), overloaded
# (1013), a bad gateway (1014). Not refusals of this replica or its rights.
_RELAY_TROUBLE = frozenset({1001, 1006, 1011, 1012, 1013, 1014})


def _relay_failed(exc: ConnectionClosed | InvalidStatus) -> bool:
    """Whether ``exc`` says the relay is in trouble (not this replica, not its rights)."""
    if isinstance(exc, InvalidStatus):
        status = exc.response.status_code
        return status >= 500 or status == HTTPStatus.TOO_MANY_REQUESTS
    code = exc.rcvd.code if exc.rcvd is not None else None
    return code is None or code in _RELAY_TROUBLE


def _now_elsewhere(relays: RelayChoice, relay: str, failed: bool) -> bool:
    """After a connection to ``relay`` ended: whether to connect again at once, because
    the replica moved to another relay (``relay`` failed and another is left to try, or
    the first relay came back meanwhile)."""
    if failed:
        return relays.failed(relay, time.monotonic())
    return relays.current != relay


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
