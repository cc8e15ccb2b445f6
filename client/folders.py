"""Folders kept offline: every document under a prefix held in sync (issue 11).

The replica's part that subscribes kept folders on the multiplexed connection, follows
the relay's announcements (a cursor per folder, recorded once every document an
announcement named is synced here), answers with digests when the cursor is not valid
there, and syncs kept documents the app has not opened at the store level (no ``Doc``;
at most :data:`MAX_STORED_SYNCS` at once).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from typing import TYPE_CHECKING

from crdtsync.errors import (
    FoldersUnsupported,
    InvalidDocumentName,
    MalformedMessage,
    StoreError,
    SyncTimeout,
)
from crdtsync.folders import Cursor, document_digest, validate_prefix
from crdtsync.protocol import ExtChanged, ExtDigests, ExtSubscribe, ExtUnsubscribe
from crdtsync.settings import validate_document_name

from .documents import FolderStatus, KeptFolder, LocalDocument, MuxLink, StoredDoc

if TYPE_CHECKING:
    from .replica import Replica

__all__ = ["DIGEST_BATCH", "MAX_STORED_SYNCS", "Folders"]

log = logging.getLogger("crdtsync.replica")

MAX_STORED_SYNCS = 64  # kept documents the app has not opened, synced at once
DIGEST_BATCH = 512  # documents described per digest message


class Folders:
    """The kept folders of one replica, and its documents synced without a ``Doc``."""

    def __init__(self, replica: Replica) -> None:
        self.r = replica
        self.folders: dict[str, KeptFolder] = {}
        self.stored: dict[str, LocalDocument] = {}  # kept documents synced without a Doc
        self.queue: deque[str] = deque()  # ... waiting for a place among them
        self.wanted: set[str] = set()  # ... the same names, for lookups
        self.progress = asyncio.Condition()

    def connected(self, mux: MuxLink) -> None:
        """A multiplexed connection is up: subscribe every kept folder on it."""
        for folder in self.folders.values():
            self.subscribe(mux, folder)
        self.pump()  # what was wanted while offline (e.g. a kept document closed then)

    def connection_lost(self) -> None:
        """The multiplexed connection ended: documents synced at the store level are
        dropped (their folders' cursors did not pass them); folders subscribe again."""
        for name in list(self.stored):
            self.drop(name)
        self.queue.clear()
        self.wanted.clear()
        for folder in self.folders.values():
            folder.number = None
            folder.caught_up = False
            folder.batches.clear()
            if folder.digests is not None:
                folder.digests.cancel()
                folder.digests = None
        self.notify()

    def failed(self, name: str, reason: str) -> None:
        """A document synced without a ``Doc`` got data this replica refuses: given up
        (announced again when it changes), and said in its folders' status."""
        log.warning("kept document %r not synced: %s", name, reason)
        for folder in self.folders.values():
            if name.startswith(folder.prefix):
                folder.error = f"document {name!r} not synced: {reason}"
        self.drop(name)
        self.settled(name)

    def stop(self) -> None:
        """The replica stops: drop what is synced at the store level, forget the folders
        (the file remembers them for the next start)."""
        for name in list(self.stored):
            self.drop(name)
        self.folders.clear()

    def unsupported(self, reason: str) -> None:
        """The relay cannot multiplex: no folder can be kept through it."""
        for folder in self.folders.values():
            folder.error = f"{reason}: folders cannot be kept through it"
        self.notify()

    async def keep(self, prefix: str) -> None:
        """Keep every document whose name starts with ``prefix`` synced in the local file,
        including documents created later anywhere; remembered in the file (kept again at
        the next start). Documents the app never opens are synced without a ``Doc``.

        Raises:
            InvalidDocumentName: ``prefix`` cannot start a document name.
        """
        validate_prefix(prefix)
        store = self.r._store()
        store.keep_folder(prefix)
        if prefix in self.folders:
            return
        stored = store.kept_folders()[prefix]
        folder = KeptFolder(prefix, Cursor(*stored))
        self.folders[prefix] = folder
        if self.r.relay is None:
            return
        if self.r._mux_supported is False:
            folder.error = "the relay does not multiplex documents: folders cannot be kept"
        elif self.r._mux is not None:
            self.subscribe(self.r._mux, folder)
        elif self.r.multiplex:
            self.r._ensure_mux()

    async def unkeep(self, prefix: str) -> None:
        """No longer keep ``prefix`` synced (its documents stay in the file)."""
        folder = self.folders.pop(prefix, None)
        self.r._store().forget_folder(prefix)
        if folder is None:
            return
        mux = self.r._mux
        if mux is not None and folder.number is not None:
            mux.folders.pop(folder.number, None)
            mux.outbox.append(ExtUnsubscribe(folder.number).encode())
            mux.wake.set()
        if folder.digests is not None:
            folder.digests.cancel()

    def kept(self) -> list[str]:
        """The prefixes this replica keeps."""
        return sorted(self.folders)

    def documents(self, prefix: str = "") -> list[str]:
        """Names of the documents under ``prefix`` held in the local file (no network)."""
        store = self.r._store()
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
        unsaved = sum(len(d.unsaved) for d in self.r._docs.values() if d.name.startswith(prefix))
        return self.r._store().pending_in(prefix) + unsaved

    def folder_status(self, prefix: str) -> FolderStatus:
        """What the replica knows about a kept folder's sync."""
        folder = self.folders.get(prefix)
        if folder is None:
            raise KeyError(f"folder {prefix!r} is not kept")
        return FolderStatus(
            subscribed=folder.number is not None,
            caught_up=folder.caught_up,
            to_sync=self.to_sync_in(prefix),
            pending=self.pending_in(prefix),
            error=folder.error,
        )

    def to_sync_in(self, prefix: str) -> int:
        folder = self.folders[prefix]
        announced: set[str] = set()
        for _, names in folder.batches:
            announced |= names
        announced |= {n for n in self.wanted if n.startswith(prefix)}
        announced |= {n for n in self.stored if n.startswith(prefix)}
        return len(announced)

    async def wait_synced_in(self, prefix: str, timeout: float | None = None) -> None:
        """Wait until the folder ``prefix`` is in sync: the relay's announcements caught
        up, every announced document synced here, every local change acknowledged.

        Raises:
            KeyError: the folder is not kept.
            FoldersUnsupported: the relay cannot keep folders.
            SyncTimeout: ``timeout`` seconds passed first.
        """
        if prefix not in self.folders:
            raise KeyError(f"folder {prefix!r} is not kept")

        def done() -> bool:
            folder = self.folders.get(prefix)
            if folder is None:
                raise KeyError(f"folder {prefix!r} is no longer kept")
            if self.r._mux_supported is False:
                raise FoldersUnsupported(folder.error or "the relay cannot keep folders")
            return (
                folder.caught_up and self.to_sync_in(prefix) == 0 and self.pending_in(prefix) == 0
            )

        try:
            async with asyncio.timeout(timeout), self.progress:
                await self.progress.wait_for(done)
        except TimeoutError:
            status = self.folder_status(prefix)
            raise SyncTimeout(
                f"folder {prefix!r} not in sync after {timeout} s: {status}"
            ) from None

    def notify(self) -> None:
        async def notify() -> None:
            async with self.progress:
                self.progress.notify_all()

        with contextlib.suppress(RuntimeError):
            asyncio.get_running_loop().create_task(notify())

    def subscribe(self, mux: MuxLink, folder: KeptFolder) -> None:
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
        for name in self.r._store().pending_documents_in(folder.prefix):
            if name not in self.r._docs:
                self.want(name)

    def on_changed(self, mux: MuxLink, msg: ExtChanged) -> None:
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
        self.r.stats["documents_announced"] += len(msg.documents)
        digests = dict(zip(msg.documents, msg.digests, strict=True)) if msg.digests else {}
        for name in msg.documents:
            if not name.startswith(folder.prefix):
                continue  # not this folder's: a relay's mistake, never synced into it
            try:
                validate_document_name(name)
            except InvalidDocumentName:
                continue
            d = self.r._docs.get(name)
            if d is not None:
                if not d.synced:
                    outstanding.add(name)  # its channel's sync brings it
                continue
            s = self.stored.get(name)
            if s is not None:
                # Being synced without a Doc: its channel may close before the change
                # reaches it there, so it asks once more (and stays until answered).
                outstanding.add(name)
                if s.conn is not None and s.synced:
                    s.synced = False
                    s.conn.doc_sync.resync()
                    self.r._queue_frames(s.conn)
                continue
            if name in digests and self._digest(name) == digests[name]:
                self.r.stats["documents_already_held"] += 1
                continue  # held here as the relay holds it (e.g. our own edits)
            outstanding.add(name)
            self.want(name)
        cursor = None
        if msg.cursor or msg.caught_up:
            cursor = Cursor(msg.store, msg.epoch, msg.cursor)
        folder.batches.append((cursor, outstanding))
        if msg.caught_up:
            folder.caught_up = True
        self._advance(folder)

    def _advance(self, folder: KeptFolder) -> None:
        """Record the cursor of every announcement whose documents are all synced here."""
        moved = False
        while folder.batches and not folder.batches[0][1]:
            cursor = folder.batches.popleft()[0]
            if cursor is not None and cursor.replaces(folder.cursor):
                folder.cursor = cursor
                moved = True
        if moved:
            c = folder.cursor
            self.r._flush_remote()  # what the cursor passed is in the file first
            try:
                self.r._store().set_folder_cursor(folder.prefix, c.store, c.epoch, c.position)
            except StoreError as exc:
                folder.error = f"could not record the folder's cursor: {exc}"
        self.notify()

    def settled(self, name: str) -> None:
        """``name`` is synced here (or given up): the announcements naming it are done."""
        for folder in self.folders.values():
            if not name.startswith(folder.prefix):
                continue
            for _, names in folder.batches:
                names.discard(name)
            self._advance(folder)

    def _digest(self, name: str) -> bytes | None:
        """The digest of ``name`` as this replica holds it (None: it cannot be read)."""
        try:
            return document_digest(self.r._store().load(name).all_updates())
        except (StoreError, MalformedMessage) as exc:
            log.warning("cannot read %r for its digest: %s", name, exc)
            return None

    async def _send_digests(self, mux: MuxLink, number: int, folder: KeptFolder) -> None:
        """Describe what this replica holds of a folder, a page at a time."""
        try:
            store = self.r._store()
            after = ""
            while True:
                page = store.documents_in(folder.prefix, after, DIGEST_BATCH)
                entries = []
                for name in page:
                    d = self.r._docs.get(name)
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

    # -- kept documents the app has not opened: synced at the store level ---------------

    def want(self, name: str) -> None:
        if name in self.stored or name in self.wanted or name in self.r._docs:
            return
        self.wanted.add(name)
        self.queue.append(name)
        self.pump()

    def pump(self) -> None:
        mux = self.r._mux
        while mux is not None and self.queue and len(self.stored) < MAX_STORED_SYNCS:
            name = self.queue.popleft()
            self.wanted.discard(name)
            if name in self.r._docs or name in self.stored:
                continue  # open meanwhile: its channel's first sync settles it
            store = self.r._store()
            try:
                stored = store.load(name)
                pending = store.pending_count(name)
            except StoreError as exc:
                log.warning("cannot sync kept document %r: %s", name, exc)
                self.settled(name)
                continue
            doc = StoredDoc(stored.all_updates())
            d = LocalDocument(
                name,
                doc,  # type: ignore[arg-type]
                pending=pending,
                tail=len(stored.updates),
                order=self.r._ack_order(name),
            )
            self.stored[name] = d
            self.r._open_channel(mux, d)

    def maybe_drop(self, d: LocalDocument) -> None:
        """A kept document synced at the store level goes once it has nothing to wait for.

        Updates still held after the relay answered our step 1 wait on a gap the relay
        itself has (content it never received): waiting would hold a place among
        MAX_STORED_SYNCS for good. They go; the relay announces the document again when
        the gap is filled.
        """
        if not d.synced:
            return
        conn = d.conn
        if conn is not None and conn.doc_sync.waiting_for_acks:
            return  # its acknowledgements are on their way (what was refused stays pending)
        self.drop(d.name)
        self.settled(d.name)

    def drop(self, name: str) -> None:
        d = self.stored.get(name)
        if d is None:
            return
        if d.conn is not None:
            self.r._end_channel(d, d.conn, say=self.r._mux is not None)
        self.r._flush_remote()
        del self.stored[name]
        if d.tail >= self.r.compact_after_updates:
            try:
                self.r._store().compact(name)
            except StoreError as exc:
                log.warning("compacting kept document %r: %s", name, exc)
        self.pump()
