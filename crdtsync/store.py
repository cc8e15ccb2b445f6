"""The SQLite update store: per document, an append-only update log plus a compacted snapshot.

One file holds every document. The relay appends each validated update here before it
fans it out; a replica appends each local transaction here before the edit call returns.

Durability (SQLite ``synchronous`` in WAL mode, https://sqlite.org/pragma.html#pragma_synchronous):

- ``NORMAL`` (default): a committed append survives a killed process (the WAL is
  written before ``commit`` returns); the last commits may be lost on power loss.
- ``FULL``: every commit is fsynced; survives power loss too, at a cost per commit.

Every method that says "commits" has finished its SQLite transaction when it returns.
The store touches only its own file, synchronously; callers choose where it runs.
"""

from __future__ import annotations

import fcntl
import functools
import json
import os
import secrets
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Literal

from pycrdt import Doc, merge_updates

from .errors import MalformedMessage, PositionConflict, StoreError
from .integrity import ClientsAsRead, Ledger, decode_ranges, encode_ranges
from .protocol import decode_state_vector
from .updates import check_update

if TYPE_CHECKING:
    from sqlite_utils import Database
    from sqlite_utils.migrations import Migrations

__all__ = [
    "EMPTY_UPDATE",
    "CompactionResult",
    "DocumentLog",
    "LinkCheckpoint",
    "QuarantinedUpdate",
    "Since",
    "Staged",
    "Synchronous",
    "UpdateLog",
    "checkpoint_file",
    "compact_file",
    "compact_updates",
    "lock_store",
    "merge_in_batches",
    "positions_path",
    "read_positions",
    "record_positions",
    "restored_from_backup",
]

Synchronous = Literal["OFF", "NORMAL", "FULL", "EXTRA"]
EMPTY_UPDATE = b"\x00\x00"
MERGE_BATCH = 64  # DESIGN: merge_updates is super-linear; merge in bounded batches, as a tree
COMPACT_TRANSACTION_BYTES = 1024 * 1024  # updates applied in one scratch transaction
SNAPSHOT_CHUNK_BYTES = 1024 * 1024  # a larger snapshot is written a chunk per transaction
UPDATE_CHUNK_BYTES = 1024 * 1024  # a staged update is written a chunk per transaction
STAGE_PAUSE_S = 0.001  # between a staged update's chunks: others' writes go first
# A replica keeps the keys of its latest ids of a document (claimed on every connect).
KEPT_OWN_CLIENTS = 16

MIGRATION_SET = "crdtsync"


def m001_update_log(db: Database) -> None:
    db.execute(
        """CREATE TABLE documents (
            name TEXT PRIMARY KEY,
            snapshot BLOB,
            snapshot_seq INTEGER NOT NULL DEFAULT 0
        )"""
    )
    db.execute(
        """CREATE TABLE updates (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            doc TEXT NOT NULL,
            data BLOB NOT NULL
        )"""
    )
    db.execute("CREATE INDEX updates_doc_seq ON updates (doc, seq)")
    # Local transactions a replica has not yet seen acknowledged by a relay.
    db.execute(
        """CREATE TABLE pending (
            doc TEXT NOT NULL,
            seq INTEGER NOT NULL,
            PRIMARY KEY (doc, seq)
        ) WITHOUT ROWID"""
    )


def m002_integrity(db: Database) -> None:
    # The relay's integrity ledger (crdtsync.integrity), written in the same commit as the
    # updates it describes. A document with content but no row in ledger_docs was stored
    # before ledgers existed: its ledger is built from its content on first use.
    db.execute(
        """CREATE TABLE ledger_clients (
            doc TEXT NOT NULL,
            client INTEGER NOT NULL,
            ranges BLOB NOT NULL,
            owner TEXT,
            PRIMARY KEY (doc, client)
        ) WITHOUT ROWID"""
    )
    db.execute(
        """CREATE TABLE ledger_types (
            doc TEXT NOT NULL,
            client INTEGER NOT NULL,
            clock INTEGER NOT NULL,
            claimed INTEGER NOT NULL,
            PRIMARY KEY (doc, client, clock)
        ) WITHOUT ROWID"""
    )
    db.execute("CREATE TABLE ledger_docs (doc TEXT PRIMARY KEY) WITHOUT ROWID")
    # A replica's own client ids and the keys that prove them (crdtsync.integrity).
    db.execute(
        """CREATE TABLE own_clients (
            doc TEXT NOT NULL,
            client INTEGER NOT NULL,
            key BLOB NOT NULL,
            PRIMARY KEY (doc, client)
        ) WITHOUT ROWID"""
    )
    # Updates a replica refused to apply, kept aside with the reason.
    db.execute(
        """CREATE TABLE quarantine (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            doc TEXT NOT NULL,
            data BLOB NOT NULL,
            reason TEXT NOT NULL,
            at REAL NOT NULL
        )"""
    )
    db.execute("CREATE INDEX quarantine_doc ON quarantine (doc)")


def m003_snapshot_chunks(db: Database) -> None:
    # A large snapshot is written in chunks, each in its own short transaction, then made
    # current by setting documents.snapshot_gen (DESIGN: bounded work): one write of
    # megabytes held SQLite's write lock, and every other document's appends waited.
    db.execute(
        """CREATE TABLE snapshot_chunks (
            id INTEGER PRIMARY KEY,
            doc TEXT NOT NULL,
            gen INTEGER NOT NULL,
            idx INTEGER NOT NULL,
            data BLOB NOT NULL
        )"""
    )
    db.execute("CREATE UNIQUE INDEX snapshot_chunks_key ON snapshot_chunks (doc, gen, idx)")
    db.execute("ALTER TABLE documents ADD COLUMN snapshot_gen INTEGER")


def m004_update_chunks(db: Database) -> None:
    # A large update is staged in chunks, each in its own short transaction, then
    # appended as a row that names its chunks (UpdateLog.stage): one commit of a 60 MB
    # update held the write lock for ~135 ms, and every other document's appends waited.
    db.execute(
        """CREATE TABLE update_chunks (
            id INTEGER PRIMARY KEY,
            gen INTEGER NOT NULL,
            idx INTEGER NOT NULL,
            data BLOB NOT NULL
        )"""
    )
    db.execute("CREATE UNIQUE INDEX update_chunks_key ON update_chunks (gen, idx)")
    db.execute("ALTER TABLE updates ADD COLUMN chunks INTEGER")
    db.execute("CREATE INDEX updates_chunks ON updates (chunks) WHERE chunks IS NOT NULL")


def m005_identity(db: Database) -> None:
    # Which store this is (crdtsync.backend.StoreIdentity): an id made with the file,
    # and an epoch raised when it is restored from a backup (UpdateLog.new_epoch).
    db.execute("CREATE TABLE store_identity (id TEXT NOT NULL, epoch INTEGER NOT NULL)")
    db.execute("INSERT INTO store_identity (id, epoch) VALUES (?, 1)", (secrets.token_hex(16),))
    # UpdateLog.changes reads compacted documents by the position their snapshot covers.
    db.execute("CREATE INDEX documents_snapshot_seq ON documents (snapshot_seq)")


def m006_kept_folders(db: Database) -> None:
    # Folders a replica keeps (issue 11), with how far the relay's announcements went: a
    # cursor of the store that made them (crdtsync.folders.Cursor; store '' = none yet).
    db.execute(
        """CREATE TABLE kept_folders (
            prefix TEXT PRIMARY KEY,
            store TEXT NOT NULL DEFAULT '',
            epoch INTEGER NOT NULL DEFAULT 0,
            cursor INTEGER NOT NULL DEFAULT 0
        ) WITHOUT ROWID"""
    )


def m007_regions(db: Database) -> None:
    # Regions (issue 12): the region an update came from (NULL: written here, by a client
    # of this region), so a link ships only what originated in its source region; and
    # each link's checkpoint as this store recorded it ('in': what this store committed
    # of a source region's store; 'out': what a target region acknowledged of this one's),
    # with the other store's identity, so a store replaced or restored is recognised.
    db.execute("ALTER TABLE updates ADD COLUMN origin TEXT")
    db.execute(
        """CREATE TABLE link_checkpoints (
            direction TEXT NOT NULL,
            region TEXT NOT NULL,
            store TEXT NOT NULL,
            epoch INTEGER NOT NULL,
            cursor INTEGER NOT NULL,
            PRIMARY KEY (direction, region)
        ) WITHOUT ROWID"""
    )


# The schema's steps, in order (sqlite-utils' migrations: one row each in _sqlite_migrations).
MIGRATIONS = (
    m001_update_log,
    m002_integrity,
    m003_snapshot_chunks,
    m004_update_chunks,
    m005_identity,
    m006_kept_folders,
    m007_regions,
)


@functools.cache
def _migration_set() -> Migrations:
    from sqlite_utils.migrations import Migrations

    migrations = Migrations(MIGRATION_SET)
    for step in MIGRATIONS:
        migrations()(step)
    return migrations


def merge_in_batches(updates: Sequence[bytes], batch: int = MERGE_BATCH) -> bytes:
    """Merge many updates as a tree of bounded ``merge_updates`` calls.

    One call over thousands of updates is super-linear (DESIGN: measured facts);
    batches of 64 merged level by level stay near-linear.
    """
    if batch < 2:
        raise ValueError(f"batch must be at least 2, got {batch}")
    level = list(updates)
    if not level:
        return EMPTY_UPDATE
    while len(level) > 1:
        level = [
            level[i]
            if i + 1 == min(i + batch, len(level))
            else merge_updates(*level[i : i + batch])
            for i in range(0, len(level), batch)
        ]
    return level[0]


def _covered(state: dict[int, int], info_state: dict[int, int]) -> bool:
    return all(end <= state.get(client, 0) for client, end in info_state.items())


def compact_updates(updates: Sequence[bytes], doc: Doc[Any] | None = None) -> bytes:
    """Fold updates into one snapshot through a short-lived scratch ``Doc``.

    With ``doc`` (a live document that already holds every one of ``updates``, e.g. a
    replica's), no scratch document is built: its own encoding is the snapshot.

    A scratch ``Doc`` encodes a far smaller snapshot than a merge (DESIGN: 0.38 MB vs
    4.5 MB for the automerge-paper trace), but it silently drops content it cannot
    integrate yet: structs after a clock gap and deletes of unknown items. Those
    updates are found by comparing each update's extent with the scratch doc's state
    and are merged into the snapshot as they are, so nothing waiting is lost.
    """
    infos = [check_update(update) for update in updates]  # refuse damage before pycrdt sees it
    if doc is None:
        if not updates:
            return EMPTY_UPDATE
        doc = Doc()
        # Transactions of about a megabyte: one transaction over everything held memory
        # quadratic in its size (pycrdt 0.14: 1.9 GB to fold 200 updates of 100 KB,
        # 57 MB one transaction each); many tiny updates still share one.
        batches: list[list[bytes]] = [[]]
        batch_bytes = 0
        for update in updates:
            if batch_bytes >= COMPACT_TRANSACTION_BYTES:
                batches.append([])
                batch_bytes = 0
            batches[-1].append(update)
            batch_bytes += len(update)
        for batch in batches:
            with doc.transaction():
                for update in batch:
                    doc.apply_update(update)
    snapshot = doc.get_update()
    state = decode_state_vector(doc.get_state())
    leftovers = [
        update
        for update, info in zip(updates, infos, strict=True)
        if not _covered(state, info.state)
        or any(
            clock + length > state.get(client, 0)
            for client, ranges in info.deletes.items()
            for clock, length in ranges
        )
    ]
    if leftovers:
        snapshot = merge_in_batches([snapshot, *leftovers])
    return snapshot


def lock_store(path: str | Path) -> IO[bytes]:
    """Hold an exclusive lock on ``<store>.lock`` for as long as the returned file stays
    open: the relay serving a SQLite file holds it (it keeps the integrity ledgers in
    memory), and so does a tool that writes ledgers (``crdtsync store import``).

    Raises:
        StoreError: another process holds it.
    """
    lock = open(f"{path}.lock", "ab")  # noqa: SIM115 - kept open: the lock lives with it
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        lock.close()
        raise StoreError(
            f"store {path} is served by another relay process (one relay per SQLite file; "
            "several relay processes share a Redis store instead)",
            path=str(path),
        ) from exc
    return lock


@dataclass(frozen=True, slots=True)
class DocumentLog:
    """A document as stored: its snapshot (if compacted) and the update tail since."""

    name: str
    snapshot: bytes | None
    updates: list[bytes]
    last_seq: int
    snapshot_seq: int = 0
    seqs: list[int] = field(default_factory=list)  # the tail's sequence numbers

    def all_updates(self) -> list[bytes]:
        """The snapshot followed by the tail, ready to apply or merge."""
        return ([self.snapshot] if self.snapshot else []) + self.updates

    def merged(self) -> bytes:
        """One update holding the whole document (tree merge; never a Doc)."""
        return merge_in_batches(self.all_updates())


@dataclass(frozen=True, slots=True)
class Since:
    """What a document received after a change cursor (regions: what a link ships).

    ``updates``: ``(change, update, origin)`` in order (``change``: the cursor of the
    change that appended it, as :meth:`UpdateLog.changes` gives), origin None for what was
    written in this store's own region. ``complete``: False when a compaction folded
    some of what came after the cursor into the snapshot (the link then falls back to
    comparing state vectors for this document)."""

    document: str
    updates: list[tuple[int, bytes, str | None]]
    complete: bool


@dataclass(frozen=True, slots=True)
class LinkCheckpoint:
    """How far a link between two regions' stores got, as one end recorded it:
    ``cursor`` is a change cursor of the source store named by ``store`` and ``epoch``
    (at the source, ``store``/``epoch`` name the target that acknowledged it)."""

    # "in", "out"; also "sweep": a sweep the link to ``region`` still owes (``store`` is
    # "pending" until it is done)
    direction: Literal["in", "out", "sweep"]
    region: str  # the other end's region
    store: str
    epoch: int
    cursor: int


@dataclass(frozen=True, slots=True)
class Staged:
    """An update written in chunks by :meth:`UpdateLog.stage`, not yet part of any log:
    :meth:`UpdateLog.append_many` appends it (in place of its bytes) in one small commit."""

    gen: int
    size: int


@dataclass(frozen=True, slots=True)
class QuarantinedUpdate:
    """An update a replica refused to apply (it would have broken the document), and why."""

    id: int
    doc: str
    data: bytes
    reason: str
    at: float


@dataclass(frozen=True, slots=True)
class CompactionResult:
    """What a compaction did: how many tail updates it folded, and the snapshot size."""

    name: str
    folded: int
    snapshot_bytes: int


@contextmanager
def _store_errors(path: str) -> Iterator[None]:
    """Translate sqlite3 errors into StoreError naming the file (the one place it happens)."""
    try:
        yield
    except sqlite3.Error as exc:
        raise StoreError(f"store {path}: {exc}", path=path) from exc


class UpdateLog:
    """Documents stored as snapshot + append-only update log in one SQLite file (WAL).

    Args:
        path: the SQLite file; created with its schema if missing.
        synchronous: SQLite ``synchronous``: ``NORMAL`` survives a killed process,
            ``FULL`` survives power loss too.
        busy_timeout_s: how long a write waits for another process's lock (compaction).
        autocheckpoint: let commits copy the write-ahead log into the database when it
            grows (SQLite's default). The relay turns it off and calls
            :func:`checkpoint_file` from a thread: a commit that checkpoints megabytes
            holds up the event loop it runs on.

    Raises:
        StoreError: the file is not a database, is corrupt, or has a newer schema.

    Not thread-safe: one thread uses an ``UpdateLog`` at a time (a lock guards misuse).
    """

    def __init__(
        self,
        path: str | Path,
        *,
        synchronous: Synchronous = "NORMAL",
        busy_timeout_s: float = 10.0,
        autocheckpoint: bool = True,
    ) -> None:
        if synchronous not in ("OFF", "NORMAL", "FULL", "EXTRA"):
            raise ValueError(f"synchronous must be OFF, NORMAL, FULL or EXTRA, not {synchronous!r}")
        self.path = str(path)
        self._lock = threading.RLock()
        self.abandoned: set[int] = set()  # generations of failed stagings (stage)
        self.db: Database | None = None  # sqlite-utils' view, made when migrations run
        with _store_errors(self.path):
            # isolation_level=None: we issue BEGIN/COMMIT ourselves; commits are where we say.
            conn = sqlite3.connect(
                self.path, check_same_thread=False, timeout=busy_timeout_s, isolation_level=None
            )
            try:
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute(f"PRAGMA synchronous={synchronous}")
                if not autocheckpoint:
                    conn.execute("PRAGMA wal_autocheckpoint=0")
                if not self._schema_is_current(conn):
                    from sqlite_utils import Database

                    self.db = Database(conn, execute_plugins=False)
                    _migration_set().apply(self.db)
            except BaseException:
                conn.close()
                raise
        self.conn = conn

    def _schema_is_current(self, conn: sqlite3.Connection) -> bool:
        """Whether every migration is applied, read with plain sqlite3: a relay or a
        replica opening a current store never imports sqlite-utils (about 27 ms of
        each start, most of a serverless cold start's budget beyond the interpreter).

        Raises:
            StoreError: the store has schema steps this code does not know.
        """
        try:
            rows = conn.execute(
                "SELECT name FROM _sqlite_migrations WHERE migration_set = ?", (MIGRATION_SET,)
            ).fetchall()
        except sqlite3.OperationalError:  # no migrations table: a new file
            return False
        applied = {name for (name,) in rows}
        known = {step.__name__ for step in MIGRATIONS}
        newer = applied - known
        if newer:
            raise StoreError(
                f"store {self.path} has schema steps this crdtsync does not know: "
                f"{', '.join(sorted(newer))} (written by a newer version)",
                path=self.path,
            )
        return applied == known

    def close(self) -> None:
        """Close the file. Committed data is already durable (per ``synchronous``)."""
        with self._lock:
            self.conn.close()

    def __enter__(self) -> UpdateLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        with self._lock, _store_errors(self.path):
            conn = self.conn
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    # -- appending ------------------------------------------------------------------

    def append(self, doc: str, update: bytes) -> int:
        """Append one update to ``doc``'s log; commits. Returns its sequence number."""
        return self.append_many([(doc, update)])[0]

    def append_many(
        self,
        items: Iterable[tuple[str, bytes | Staged]],
        ledgers: Mapping[str, Ledger] | None = None,
        expected: Mapping[str, int | ClientsAsRead] | None = None,
        origins: Sequence[str | None] | None = None,
    ) -> list[int]:
        """Append updates to their documents' logs in one transaction; commits once.

        Returns the sequence numbers, in order. This is how the relay persists one
        event-loop turn's worth of updates with a single commit. An update may be
        :class:`Staged` (written ahead by :meth:`stage`). ``ledgers`` are the integrity
        ledgers of the documents concerned: what changed in them is written in the same
        commit, then marked clean. With ``expected`` (document -> position, see
        :meth:`position`, or :class:`~crdtsync.integrity.ClientsAsRead`: its ledger
        entries of those clients), a document no longer there gets nothing written
        (neither updates nor ledger); the others are appended.

        ``origins``: per row, the region it came from (None: written in this one).

        Raises:
            PositionConflict: documents of ``expected`` moved on (what was appended of
                the others is in its ``appended``).
        """
        rows = list(items)
        if origins is not None and len(origins) != len(rows):
            raise ValueError(f"{len(origins)} origins for {len(rows)} rows")
        if not rows and not ledgers:
            return []
        moved: dict[str, int] = {}
        all_rows = rows
        with self._write() as conn:
            if expected:
                now = {doc: _position(conn, doc) for doc in expected}
                moved = {
                    doc: p
                    for doc, p in now.items()
                    if not _as_expected(conn, doc, p, expected[doc])
                }
                if moved:
                    if origins is not None:
                        origins = [
                            o for row, o in zip(rows, origins, strict=False) if row[0] not in moved
                        ]
                    rows = [row for row in rows if row[0] not in moved]
                    ledgers = {d: g for d, g in (ledgers or {}).items() if d not in moved}
            # One executemany instead of a Python loop of executes: this is the relay's
            # hot path. Under the write lock AUTOINCREMENT hands out consecutive numbers.
            if rows and origins is not None and any(origins):
                conn.executemany(
                    "INSERT INTO updates (doc, data, chunks, origin) VALUES (?, ?, ?, ?)",
                    [
                        (doc, b"", data.gen, origin)
                        if isinstance(data, Staged)
                        else (doc, data, None, origin)
                        for (doc, data), origin in zip(rows, origins, strict=False)
                    ],
                )
                last = conn.execute(
                    "SELECT seq FROM sqlite_sequence WHERE name = 'updates'"
                ).fetchone()
            elif rows:
                if any(isinstance(data, Staged) for _, data in rows):
                    conn.executemany(
                        "INSERT INTO updates (doc, data, chunks) VALUES (?, ?, ?)",
                        [
                            (doc, b"", data.gen) if isinstance(data, Staged) else (doc, data, None)
                            for doc, data in rows
                        ],
                    )
                else:
                    conn.executemany("INSERT INTO updates (doc, data) VALUES (?, ?)", rows)
                last = conn.execute(
                    "SELECT seq FROM sqlite_sequence WHERE name = 'updates'"
                ).fetchone()
            for doc, ledger in (ledgers or {}).items():
                _write_ledger(conn, doc, ledger)
        for ledger in (ledgers or {}).values():
            ledger.clean()
            ledger.known = True
        positions = list(range(last[0] - len(rows) + 1, last[0] + 1)) if rows else []
        if moved:
            given = iter(positions)
            raise PositionConflict(
                f"store {self.path}: {len(moved)} document(s) moved on: "
                + ", ".join(sorted(moved)[:3]),
                moved,
                [0 if doc in moved else next(given) for doc, _ in all_rows],
                self.path,
            )
        return positions

    def stage(self, update: bytes) -> Staged:
        """Write ``update`` in chunks, a short transaction each, for :meth:`append_many`
        to append later in one small commit; thread-safe (the relay stages from a
        thread while its loop goes on appending other documents' updates).

        Chunks never appended (a crash, a failed append) are dropped by
        :meth:`drop_unused_chunks`.
        """
        gen = secrets.randbits(62)
        view = memoryview(update)
        try:
            for idx, start in enumerate(range(0, len(update), UPDATE_CHUNK_BYTES)):
                if idx:
                    # A lock is not fair: taken back at once, the next chunk's kept the
                    # loop's appends waiting for most of the staging (50 ms of 85 for 60 MB).
                    time.sleep(STAGE_PAUSE_S)
                with self._write() as conn:
                    conn.execute(
                        "INSERT INTO update_chunks (gen, idx, data) VALUES (?, ?, ?)",
                        (gen, idx, view[start : start + UPDATE_CHUNK_BYTES]),
                    )
        except BaseException:
            # The chunks already written would stay until the next start: on a full
            # disk, taking the space every other document's appends need. (Deleting
            # needs room in the WAL too: what cannot go now goes at drop_abandoned.)
            self.abandoned.add(gen)
            self.drop_abandoned()
            raise
        return Staged(gen, len(update))

    def drop_abandoned(self) -> None:
        """Try again to delete the chunks of stagings that failed (see :meth:`stage`)."""
        if not self.abandoned:
            return
        gens = list(self.abandoned)
        try:
            self.drop_unused_chunks(gens)
        except StoreError:
            return
        self.abandoned.difference_update(gens)

    def drop_unused_chunks(self, gens: Iterable[int] | None = None) -> int:
        """Delete staged chunks that no update names: those of ``gens``, or all of them.

        Without ``gens``, only safe while nobody else stages in this file (the relay
        calls it at start, holding the store's lock). A few rows per transaction.
        Returns how many chunks went.
        """
        unused = "gen NOT IN (SELECT chunks FROM updates WHERE chunks IS NOT NULL)"
        if gens is None:
            query, args = f"SELECT id FROM update_chunks WHERE {unused} LIMIT 8", []
        else:
            args = list(gens)
            if not args:
                return 0
            marks = ",".join("?" * len(args))
            query = f"SELECT id FROM update_chunks WHERE gen IN ({marks}) AND {unused} LIMIT 8"
        gone = 0
        while True:
            # (Read first: a relay's start writes nothing when nothing was left over.)
            with self._lock, _store_errors(self.path):
                ids = self.conn.execute(query, args).fetchall()
            if not ids:
                return gone
            with self._write() as conn:
                conn.executemany("DELETE FROM update_chunks WHERE id = ?", ids)
            gone += len(ids)

    def append_local(self, doc: str, update: bytes) -> int:
        """Append a replica's own transaction and mark it pending, atomically; commits."""
        with self._write() as conn:
            cur = conn.execute("INSERT INTO updates (doc, data) VALUES (?, ?)", (doc, update))
            seq = cur.lastrowid or 0
            conn.execute("INSERT INTO pending (doc, seq) VALUES (?, ?)", (doc, seq))
        return seq

    # -- integrity ledger (relay) ------------------------------------------------------

    def load_ledger(self, doc: str) -> Ledger:
        """Read ``doc``'s integrity ledger (:class:`~crdtsync.integrity.Ledger`).

        A document stored before ledgers existed gets its ledger built from its stored
        content, written once (commits). A document with no content gets an empty,
        unwritten ledger: its first append writes it.

        Raises:
            StoreError: the file cannot be read, or the stored content is damaged.
        """
        return self.ledger_at(doc)[0]

    def ledger_at(self, doc: str) -> tuple[Ledger, int]:
        """:meth:`load_ledger`, and the :meth:`position` it describes (one read)."""
        with self._lock, _store_errors(self.path):
            conn = self.conn
            conn.execute("BEGIN")
            try:
                position = _position(conn, doc)
                known = conn.execute("SELECT 1 FROM ledger_docs WHERE doc = ?", (doc,)).fetchone()
                clients = conn.execute(
                    "SELECT client, ranges, owner FROM ledger_clients WHERE doc = ?", (doc,)
                ).fetchall()
                types = conn.execute(
                    "SELECT client, clock, claimed FROM ledger_types WHERE doc = ?", (doc,)
                ).fetchall()
            finally:
                conn.execute("COMMIT")
        if known:
            ledger = Ledger(known=True)
            for client, ranges, owner in clients:
                ledger.ranges[client] = decode_ranges(ranges)  # empty: owned, nothing yet
                if owner is not None:
                    ledger.owners[client] = owner
            for client, clock, claimed in types:
                if claimed:
                    ledger.claims.setdefault(client, set()).add(clock)
                else:
                    ledger.types.add((client, clock))
            return ledger, position
        log = self.load(doc)
        updates = log.all_updates()
        try:
            ledger = Ledger.of_updates(updates)
        except MalformedMessage as exc:
            raise StoreError(
                f"store {self.path}: document {doc!r} has a damaged update: {exc}", path=self.path
            ) from exc
        if updates:
            with self._write() as conn:
                _write_ledger(conn, doc, ledger)
            ledger.clean()
            ledger.known = True
        return ledger, log.last_seq

    # -- own client ids and quarantine (replica) ------------------------------------------

    def own_clients(self, doc: str) -> dict[int, bytes]:
        """The replica's own client ids of ``doc`` and the keys that prove them."""
        with self._lock, _store_errors(self.path):
            rows = self.conn.execute(
                "SELECT client, key FROM own_clients WHERE doc = ?", (doc,)
            ).fetchall()
        return {r[0]: r[1] for r in rows}

    def add_own_client(self, doc: str, client: int, key: bytes, *, forget_others: bool) -> None:
        """Record a new own client id of ``doc``; commits.

        With ``forget_others`` (nothing of theirs is pending), the document's other own
        ids are dropped once it has :data:`KEPT_OWN_CLIENTS` of them: until then they are
        kept, since a relay that lost what it had acknowledged (a store emptied, or
        restored from a backup, and refilled by its peer regions with the ids' owners)
        takes their content back from this replica only with their proof.
        """
        with self._write() as conn:
            if forget_others:
                (count,) = conn.execute(
                    "SELECT count(*) FROM own_clients WHERE doc = ?", (doc,)
                ).fetchone()
                if count >= KEPT_OWN_CLIENTS:
                    conn.execute("DELETE FROM own_clients WHERE doc = ?", (doc,))
            conn.execute(
                "INSERT OR REPLACE INTO own_clients (doc, client, key) VALUES (?, ?, ?)",
                (doc, client, key),
            )

    def quarantine(
        self,
        doc: str,
        data: bytes,
        reason: str,
        *,
        now: float,
        replace_seq: int | None = None,
        replacement: bytes | None = None,
    ) -> int:
        """Keep ``data`` aside with ``reason``; commits. Returns the quarantine id.

        With ``replace_seq``, the log row of that sequence number (where ``data`` was
        stored) is replaced by ``replacement`` (the part that was safe to keep) or,
        if None, removed together with its pending mark, in the same transaction.
        """
        with self._write() as conn:
            cur = conn.execute(
                "INSERT INTO quarantine (doc, data, reason, at) VALUES (?, ?, ?, ?)",
                (doc, data, reason, now),
            )
            if replace_seq is not None:
                if replacement is None:
                    conn.execute("DELETE FROM updates WHERE seq = ?", (replace_seq,))
                    conn.execute(
                        "DELETE FROM pending WHERE doc = ? AND seq = ?", (doc, replace_seq)
                    )
                else:
                    conn.execute(
                        "UPDATE updates SET data = ? WHERE seq = ?", (replacement, replace_seq)
                    )
        return int(cur.lastrowid or 0)

    def quarantined(self, doc: str) -> list[QuarantinedUpdate]:
        """The updates of ``doc`` kept aside, oldest first."""
        with self._lock, _store_errors(self.path):
            rows = self.conn.execute(
                "SELECT id, doc, data, reason, at FROM quarantine WHERE doc = ? ORDER BY id",
                (doc,),
            ).fetchall()
        return [QuarantinedUpdate(*row) for row in rows]

    def quarantine_count(self, doc: str) -> int:
        """How many updates of ``doc`` are kept aside."""
        with self._lock, _store_errors(self.path):
            row = self.conn.execute(
                "SELECT count(*) FROM quarantine WHERE doc = ?", (doc,)
            ).fetchone()
        return int(row[0])

    # -- pending acknowledgements (replica) ----------------------------------------

    def acknowledge(self, doc: str, seqs: Iterable[int]) -> int:
        """Mark local transactions as durably stored by the relay; commits.

        Idempotent: acknowledging a sequence number twice, or one never pending,
        changes nothing. Returns how many were pending and no longer are.
        """
        with self._write() as conn:
            cur = conn.executemany(
                "DELETE FROM pending WHERE doc = ? AND seq = ?", ((doc, s) for s in seqs)
            )
            return cur.rowcount

    def pending_seqs(self, doc: str) -> list[int]:
        """Sequence numbers of ``doc``'s local transactions not yet acknowledged."""
        with self._lock, _store_errors(self.path):
            rows = self.conn.execute(
                "SELECT seq FROM pending WHERE doc = ? ORDER BY seq", (doc,)
            ).fetchall()
        return [r[0] for r in rows]

    def pending_count(self, doc: str) -> int:
        """How many of ``doc``'s local transactions are not yet acknowledged."""
        with self._lock, _store_errors(self.path):
            row = self.conn.execute("SELECT count(*) FROM pending WHERE doc = ?", (doc,)).fetchone()
        return int(row[0])

    # -- reading --------------------------------------------------------------------

    def load(self, doc: str, *, after_seq: int = 0) -> DocumentLog:
        """Read ``doc``'s snapshot and update tail in one consistent read.

        With ``after_seq``, only tail updates after that sequence number are returned
        (the snapshot is returned only if it is newer than ``after_seq``).
        """
        with self._lock, _store_errors(self.path):
            conn = self.conn
            conn.execute("BEGIN")
            try:
                row = conn.execute(
                    "SELECT snapshot, snapshot_seq, snapshot_gen FROM documents WHERE name = ?",
                    (doc,),
                ).fetchone()
                snapshot, snapshot_seq, gen = row if row else (None, 0, None)
                if snapshot_seq > after_seq:
                    # The tail up to the snapshot is in it (what is left of those rows
                    # waits for deletion); start from the snapshot.
                    after_seq = snapshot_seq
                    if gen is not None:
                        snapshot = b"".join(
                            r[0]
                            for r in conn.execute(
                                "SELECT data FROM snapshot_chunks WHERE doc = ? AND gen = ? "
                                "ORDER BY idx",
                                (doc, gen),
                            )
                        )
                else:
                    snapshot = None
                rows = conn.execute(
                    "SELECT seq, data, chunks FROM updates WHERE doc = ? AND seq > ? ORDER BY seq",
                    (doc, after_seq),
                ).fetchall()
                if any(gen is not None for _, _, gen in rows):
                    rows = [
                        (seq, data if gen is None else _chunked(conn, gen), gen)
                        for seq, data, gen in rows
                    ]
            finally:
                conn.execute("COMMIT")
        last = rows[-1][0] if rows else max(snapshot_seq, after_seq)
        return DocumentLog(
            doc, snapshot, [r[1] for r in rows], last, snapshot_seq, [r[0] for r in rows]
        )

    def size(self, doc: str) -> tuple[int, int]:
        """``(updates, bytes)`` of ``doc`` as stored: tail rows, and their bytes plus the
        snapshot's (SQLite keeps blob lengths in the row header: no blob is read)."""
        with self._lock, _store_errors(self.path):
            seq, snap = self._snapshot_of(doc)
            rows, tail_bytes = self.conn.execute(
                f"SELECT count(*), coalesce(sum({_ROW_BYTES}), 0) FROM updates "
                "WHERE doc = ? AND seq > ?",
                (doc, seq),
            ).fetchone()
        return int(rows), int(tail_bytes) + snap

    def size_within(self, doc: str, max_updates: int, max_bytes: int) -> tuple[int, int] | None:
        """:meth:`size` if ``doc`` has at most ``max_updates`` tail updates and
        ``max_bytes`` in all, else None; reads at most ``max_updates + 1`` row headers
        (:meth:`size` counts every row: tens of milliseconds for a long tail)."""
        with self._lock, _store_errors(self.path):
            seq, snap = self._snapshot_of(doc)
            rows, tail_bytes = self.conn.execute(
                f"SELECT count(*), coalesce(sum(n), 0) FROM (SELECT {_ROW_BYTES} AS n "
                "FROM updates WHERE doc = ? AND seq > ? LIMIT ?)",
                (doc, seq, max_updates + 1),
            ).fetchone()
        if rows > max_updates or snap + tail_bytes > max_bytes:
            return None
        return int(rows), int(snap + tail_bytes)

    def _snapshot_of(self, doc: str) -> tuple[int, int]:
        """``(snapshot_seq, snapshot bytes)`` of ``doc``, without reading the snapshot."""
        row = self.conn.execute(
            "SELECT snapshot_seq, coalesce(length(snapshot), 0), snapshot_gen FROM documents "
            "WHERE name = ?",
            (doc,),
        ).fetchone()
        if row is None:
            return 0, 0
        seq, size, gen = row
        if gen is not None:
            size = self.conn.execute(
                "SELECT coalesce(sum(length(data)), 0) FROM snapshot_chunks "
                "WHERE doc = ? AND gen = ?",
                (doc, gen),
            ).fetchone()[0]
        return int(seq), int(size)

    def tail_length(self, doc: str) -> int:
        """How many updates wait in ``doc``'s log since its snapshot."""
        with self._lock, _store_errors(self.path):
            seq = self._snapshot_of(doc)[0]
            row = self.conn.execute(
                "SELECT count(*) FROM updates WHERE doc = ? AND seq > ?", (doc, seq)
            ).fetchone()
        return int(row[0])

    def documents_in(self, prefix: str, after: str = "", limit: int = 1000) -> list[str]:
        """Names of documents under ``prefix`` stored here, in order, after ``after``."""
        low = max(prefix, after)
        with self._lock, _store_errors(self.path):
            rows = self.conn.execute(
                "SELECT name FROM (SELECT name FROM documents WHERE name >= ?1 "
                "UNION SELECT DISTINCT doc FROM updates WHERE doc >= ?1) "
                "WHERE name > ?2 AND substr(name, 1, ?3) = ?4 ORDER BY 1 LIMIT ?5",
                (low, after, len(prefix), prefix, limit),
            ).fetchall()
        return [r[0] for r in rows]

    def pending_in(self, prefix: str) -> int:
        """Local transactions of documents under ``prefix`` not yet acknowledged."""
        with self._lock, _store_errors(self.path):
            row = self.conn.execute(
                "SELECT count(*) FROM pending WHERE substr(doc, 1, ?) = ?", (len(prefix), prefix)
            ).fetchone()
        return int(row[0])

    def pending_documents_in(self, prefix: str) -> list[str]:
        """Documents under ``prefix`` with local transactions not yet acknowledged."""
        with self._lock, _store_errors(self.path):
            rows = self.conn.execute(
                "SELECT DISTINCT doc FROM pending WHERE substr(doc, 1, ?) = ? ORDER BY 1",
                (len(prefix), prefix),
            ).fetchall()
        return [r[0] for r in rows]

    def kept_folders(self) -> dict[str, tuple[str, int, int]]:
        """Kept folders: prefix -> ``(store, epoch, cursor)`` of their announcements."""
        with self._lock, _store_errors(self.path):
            rows = self.conn.execute("SELECT prefix, store, epoch, cursor FROM kept_folders")
            return {r[0]: (r[1], int(r[2]), int(r[3])) for r in rows.fetchall()}

    def keep_folder(self, prefix: str) -> None:
        """Record ``prefix`` as kept (its cursor, if it has one, stays)."""
        with self._write() as conn:
            conn.execute("INSERT OR IGNORE INTO kept_folders (prefix) VALUES (?)", (prefix,))

    def forget_folder(self, prefix: str) -> None:
        """No longer keep ``prefix`` (its documents stay)."""
        with self._write() as conn:
            conn.execute("DELETE FROM kept_folders WHERE prefix = ?", (prefix,))

    def set_folder_cursor(self, prefix: str, store: str, epoch: int, cursor: int) -> None:
        """Record how far ``prefix``'s announcements went (all of them synced here)."""
        with self._write() as conn:
            conn.execute(
                "UPDATE kept_folders SET store = ?, epoch = ?, cursor = ? WHERE prefix = ?",
                (store, epoch, cursor, prefix),
            )

    def documents(self) -> list[str]:
        """Every document name with a snapshot or updates in this file."""
        with self._lock, _store_errors(self.path):
            rows = self.conn.execute(
                "SELECT name FROM documents UNION SELECT DISTINCT doc FROM updates ORDER BY 1"
            ).fetchall()
        return [r[0] for r in rows]

    def position(self, doc: str) -> int:
        """The sequence number ``doc``'s content reached: its last update's, or what its
        snapshot covers (0: nothing stored). Every append moves it; a compaction does not."""
        with self._lock, _store_errors(self.path):
            return _position(self.conn, doc)

    def changes(self, cursor: int, limit: int, prefix: str = "") -> list[tuple[str, int]]:
        """``(document, position)`` of the documents whose position is past ``cursor``,
        lowest first, at most ``limit`` (crdtsync.backend: positions are this file's
        global sequence numbers, so they are also change cursors); only names starting
        with ``prefix``.

        A document's position is its newest row: a tail update, or the snapshot that
        compacted its newest ones (compaction deletes the rows it folds in, so a tail
        row is always newer than its document's snapshot). Each of the two queries
        walks its rows in position order from ``cursor`` and stops at ``limit``
        documents, skipping rows that are not their document's newest (an index probe
        each), so listing a whole folder page by page reads each row about once, not
        once per page (100,000 documents in pages of 1,000: 0.2 s, was 9.4 s).
        """
        with self._lock, _store_errors(self.path):
            tails = self.conn.execute(
                "SELECT u.doc, u.seq FROM updates u WHERE u.seq > ?1 "
                "AND substr(u.doc, 1, ?2) = ?3 "
                "AND NOT EXISTS (SELECT 1 FROM updates n WHERE n.doc = u.doc AND n.seq > u.seq) "
                "ORDER BY u.seq LIMIT ?4",  # (a tail row is newer than its snapshot)
                (cursor, len(prefix), prefix, limit),
            ).fetchall()
            snapshots = self.conn.execute(
                "SELECT d.name, d.snapshot_seq FROM documents d WHERE d.snapshot_seq > ?1 "
                "AND substr(d.name, 1, ?2) = ?3 "
                "AND NOT EXISTS (SELECT 1 FROM updates n "
                "WHERE n.doc = d.name AND n.seq >= d.snapshot_seq) "
                "ORDER BY d.snapshot_seq LIMIT ?4",
                (cursor, len(prefix), prefix, limit),
            ).fetchall()
        rows = sorted([*tails, *snapshots], key=lambda row: row[1])[:limit]
        return [(doc, int(p)) for doc, p in rows]

    def since(self, doc: str, cursor: int, until: int | None = None) -> Since:
        """``doc``'s updates appended after change cursor ``cursor`` (a position here),
        up to ``until`` if given, with their origins; incomplete if its snapshot covers
        anything after ``cursor``."""
        with self._lock, _store_errors(self.path):
            conn = self.conn
            conn.execute("BEGIN")
            try:
                row = conn.execute(
                    "SELECT snapshot_seq FROM documents WHERE name = ?", (doc,)
                ).fetchone()
                covered = row[0] if row else 0
                rows = conn.execute(
                    "SELECT seq, data, chunks, origin FROM updates "
                    "WHERE doc = ? AND seq > ? AND seq <= ? ORDER BY seq",
                    (doc, max(cursor, covered), 2**63 - 1 if until is None else until),
                ).fetchall()
                updates = [
                    (seq, data if gen is None else _chunked(conn, gen), origin)
                    for seq, data, gen, origin in rows
                ]
            finally:
                conn.execute("COMMIT")
        return Since(doc, updates, covered <= cursor)

    def feed(self, cursor: int, limit: int) -> tuple[list[tuple[str, int]], int]:
        """The appends after change cursor ``cursor``, in order: ``(document, cursor)``
        once per appended update, at most ``limit``; and the cursor the listing is
        complete up to. A document compacted meanwhile (its rows folded into its
        snapshot) is listed at the position its snapshot covers, if that is in range.
        """
        with self._lock, _store_errors(self.path):
            conn = self.conn
            conn.execute("BEGIN")
            try:
                rows = conn.execute(
                    "SELECT doc, seq FROM updates WHERE seq > ? ORDER BY seq LIMIT ?",
                    (cursor, limit),
                ).fetchall()
                if len(rows) == limit:
                    end = int(rows[-1][1])
                else:
                    row = conn.execute(
                        "SELECT seq FROM sqlite_sequence WHERE name = 'updates'"
                    ).fetchone()
                    end = max(cursor, int(row[0]) if row else 0)
                folded = conn.execute(
                    "SELECT name, snapshot_seq FROM documents "
                    "WHERE snapshot_seq > ? AND snapshot_seq <= ?",
                    (cursor, end),
                ).fetchall()
            finally:
                conn.execute("COMMIT")
        listed = sorted([*rows, *folded], key=lambda row: row[1])
        return [(str(doc), int(c)) for doc, c in listed], end

    def link_checkpoint(self, direction: str, region: str) -> LinkCheckpoint | None:
        """The checkpoint recorded for the link to (``out``) or from (``in``) ``region``."""
        with self._lock, _store_errors(self.path):
            row = self.conn.execute(
                "SELECT store, epoch, cursor FROM link_checkpoints "
                "WHERE direction = ? AND region = ?",
                (direction, region),
            ).fetchone()
        if row is None:
            return None
        return LinkCheckpoint(direction, region, str(row[0]), int(row[1]), int(row[2]))  # type: ignore[arg-type]

    def set_link_checkpoint(self, checkpoint: LinkCheckpoint) -> None:
        """Record a link's checkpoint (replacing the last one); commits."""
        with self._write() as conn:
            conn.execute(
                "INSERT INTO link_checkpoints (direction, region, store, epoch, cursor) "
                "VALUES (?, ?, ?, ?, ?) ON CONFLICT (direction, region) DO UPDATE SET "
                "store = excluded.store, epoch = excluded.epoch, cursor = excluded.cursor",
                (
                    checkpoint.direction,
                    checkpoint.region,
                    checkpoint.store,
                    checkpoint.epoch,
                    checkpoint.cursor,
                ),
            )

    def last_position(self) -> int:
        """The highest position this file ever gave out (0: none)."""
        with self._lock, _store_errors(self.path):
            row = self.conn.execute(
                "SELECT seq FROM sqlite_sequence WHERE name = 'updates'"
            ).fetchone()
        return int(row[0]) if row else 0

    def identity(self) -> tuple[str, int]:
        """``(id, epoch)`` of this store (crdtsync.backend.StoreIdentity)."""
        with self._lock, _store_errors(self.path):
            row = self.conn.execute("SELECT id, epoch FROM store_identity").fetchone()
        return str(row[0]), int(row[1])

    def new_epoch(self) -> tuple[str, int]:
        """Raise the epoch (after restoring this file from a backup); commits."""
        with self._write() as conn:
            conn.execute("UPDATE store_identity SET epoch = epoch + 1")
            row = conn.execute("SELECT id, epoch FROM store_identity").fetchone()
        return str(row[0]), int(row[1])

    # -- compaction -------------------------------------------------------------------

    def compact(self, doc: str, *, live: Doc[Any] | None = None) -> CompactionResult:
        """Fold ``doc``'s log into its snapshot, atomically; commits.

        Reads the snapshot and tail, builds the new snapshot (through a scratch
        ``Doc``, see :func:`compact_updates`, or from ``live``, a document that already
        holds all of that content, e.g. a replica's), then in one transaction
        replaces the snapshot and deletes exactly the tail rows it read. Updates
        appended meanwhile stay in the tail. A crash at any point leaves either the
        old snapshot and tail or the new ones.

        CPU-heavy for long tails: run it off the event loop (see :func:`compact_file`).
        """
        log = self.load(doc)
        if not log.updates:
            return CompactionResult(doc, 0, len(log.snapshot or b""))
        try:
            snapshot = compact_updates(log.all_updates(), live)
        except MalformedMessage as exc:
            raise StoreError(
                f"store {self.path}: document {doc!r} has a damaged update in its log, "
                f"left uncompacted: {exc}",
                path=self.path,
            ) from exc
        # Every write below is its own short transaction: a compaction never holds the
        # write lock long enough to make other documents' appends wait (DESIGN: bounded
        # work). The snapshot becomes current in one small commit; crashing anywhere
        # leaves either the old snapshot and tail or the new ones (plus rows to clean).
        gen = None
        if len(snapshot) > SNAPSHOT_CHUNK_BYTES:
            gen = secrets.randbits(62)
            for idx, start in enumerate(range(0, len(snapshot), SNAPSHOT_CHUNK_BYTES)):
                with self._write() as conn:
                    conn.execute(
                        "INSERT INTO snapshot_chunks (doc, gen, idx, data) VALUES (?, ?, ?, ?)",
                        (doc, gen, idx, snapshot[start : start + SNAPSHOT_CHUNK_BYTES]),
                    )
        with self._write() as conn:
            row = conn.execute(
                "SELECT snapshot_seq FROM documents WHERE name = ?", (doc,)
            ).fetchone()
            current = (row[0] if row else 0) == log.snapshot_seq
            if current and gen is not None:
                # Another compaction's cleanup may have taken chunks of ours (it saw them
                # as an abandoned generation): then this one is abandoned.
                (count,) = conn.execute(
                    "SELECT count(*) FROM snapshot_chunks WHERE doc = ? AND gen = ?", (doc, gen)
                ).fetchone()
                current = count == -(-len(snapshot) // SNAPSHOT_CHUNK_BYTES)
            if current:
                conn.execute(
                    "INSERT INTO documents (name, snapshot, snapshot_seq, snapshot_gen) "
                    "VALUES (?, ?, ?, ?) ON CONFLICT(name) DO UPDATE SET "
                    "snapshot = excluded.snapshot, snapshot_seq = excluded.snapshot_seq, "
                    "snapshot_gen = excluded.snapshot_gen",
                    (doc, None if gen is not None else snapshot, log.last_seq, gen),
                )
        self._clean(doc)
        if not current:
            # Another compaction folded this document meanwhile; writing ours would
            # replace its newer snapshot with an older one.
            return CompactionResult(doc, 0, len(log.snapshot or b""))
        return CompactionResult(doc, len(log.updates), len(snapshot))

    def _clean(self, doc: str) -> None:
        """Delete what the current snapshot made obsolete, a few rows per transaction:
        tail rows it holds, and chunks of other snapshots (older ones, or a compaction's
        that lost the race or crashed)."""
        while True:
            with self._write() as conn:
                row = conn.execute(
                    "SELECT snapshot_seq, snapshot_gen FROM documents WHERE name = ?", (doc,)
                ).fetchone()
                seq, gen = row if row else (0, None)
                done = 0
                chunk = conn.execute(
                    "SELECT id FROM snapshot_chunks WHERE doc = ? AND gen IS NOT ? LIMIT 8",
                    (doc, gen),
                ).fetchall()
                if chunk:
                    conn.executemany("DELETE FROM snapshot_chunks WHERE id = ?", chunk)
                    done += len(chunk)
                tail = conn.execute(
                    "SELECT seq, chunks FROM updates WHERE doc = ? AND seq <= ? LIMIT 256",
                    (doc, seq),
                ).fetchall()
                gens = [g for _, g in tail if g is not None]
                staged = (
                    conn.execute(
                        f"SELECT id FROM update_chunks WHERE gen IN ({','.join('?' * len(gens))}) "
                        "LIMIT 8",
                        gens,
                    ).fetchall()
                    if gens
                    else []
                )
                if staged:
                    # A staged update's chunks first, a few per transaction; its row
                    # goes in a later round, once they are all gone.
                    conn.executemany("DELETE FROM update_chunks WHERE id = ?", staged)
                    done += len(staged)
                elif tail:
                    conn.executemany("DELETE FROM updates WHERE seq = ?", [(s,) for s, _ in tail])
                    done += len(tail)
            if not done:
                return


# A row's bytes: its data, or the sum of its chunks' (a staged update's data is empty).
_ROW_BYTES = (
    "CASE WHEN chunks IS NULL THEN length(data) ELSE (SELECT coalesce(sum(length(c.data)), 0) "
    "FROM update_chunks c WHERE c.gen = updates.chunks) END"
)


def _position(conn: sqlite3.Connection, doc: str) -> int:
    """:meth:`UpdateLog.position`, inside the caller's transaction."""
    (last,) = conn.execute("SELECT max(seq) FROM updates WHERE doc = ?", (doc,)).fetchone()
    row = conn.execute("SELECT snapshot_seq FROM documents WHERE name = ?", (doc,)).fetchone()
    return max(last or 0, row[0] if row else 0)


def _chunked(conn: sqlite3.Connection, gen: int) -> bytes:
    """A staged update's bytes, from its chunks (inside the caller's transaction)."""
    return b"".join(
        r[0]
        for r in conn.execute("SELECT data FROM update_chunks WHERE gen = ? ORDER BY idx", (gen,))
    )


def _as_expected(
    conn: sqlite3.Connection, doc: str, position: int, expected: int | ClientsAsRead
) -> bool:
    """Whether ``doc`` (now at ``position``) is as an append's condition expects."""
    if isinstance(expected, int):
        return position == expected
    if expected.position is not None and position != expected.position:
        return False
    for client, (ranges, owner) in expected.clients.items():
        row = conn.execute(
            "SELECT ranges, owner FROM ledger_clients WHERE doc = ? AND client = ?",
            (doc, client),
        ).fetchone()
        found = (None, None) if row is None else (bytes(row[0]), row[1])
        if found != (ranges, owner):
            return False
    return True


def _write_ledger(conn: sqlite3.Connection, doc: str, ledger: Ledger) -> None:
    """Write what changed in ``doc``'s ledger, inside the caller's transaction."""
    if not ledger.known:
        conn.execute("INSERT OR IGNORE INTO ledger_docs (doc) VALUES (?)", (doc,))
    if ledger.dirty:
        conn.executemany(
            "INSERT INTO ledger_clients (doc, client, ranges, owner) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (doc, client) DO UPDATE SET ranges = excluded.ranges, "
            "owner = excluded.owner",
            [
                (doc, c, encode_ranges(ledger.ranges.get(c, [])), ledger.owners.get(c))
                for c in ledger.dirty
            ],
        )
    if ledger.new_types:
        conn.executemany(
            "INSERT INTO ledger_types (doc, client, clock, claimed) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (doc, client, clock) DO UPDATE SET claimed = excluded.claimed",
            [(doc, c, k, int(claimed)) for c, k, claimed in ledger.new_types],
        )


def compact_file(path: str, doc: str, synchronous: Synchronous = "NORMAL") -> CompactionResult:
    """Compact one document of the store at ``path``: a subprocess-friendly entry point.

    ``merge_updates`` and ``Doc.apply_update`` hold the GIL, so the relay runs this in
    a worker process to keep fan-out going (DESIGN: measured facts).
    """
    with UpdateLog(path, synchronous=synchronous) as log:
        return log.compact(doc)


_checkpointers = threading.local()


def checkpoint_file(path: str) -> tuple[int, int]:
    """Copy what the write-ahead log holds into the database, without blocking writers.

    A PASSIVE checkpoint on a connection of the calling thread's own (sqlite3 releases
    the GIL while it works, so a thread keeps an event loop free). Returns the WAL's
    frames and how many of them are now in the database.
    """
    conns: dict[str, sqlite3.Connection] = getattr(_checkpointers, "conns", None) or {}
    _checkpointers.conns = conns
    with _store_errors(path):
        conn = conns.get(path)
        if conn is None:
            conn = conns[path] = sqlite3.connect(path, timeout=1.0, isolation_level=None)
        _, frames, copied = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
    return int(frames), int(copied)


# -- restores --------------------------------------------------------------------------

POSITIONS_SUFFIX = ".positions"  # beside a relay's store file: what it last held


def positions_path(store: str | Path) -> Path:
    """The file beside ``store`` recording the highest position its relay saw committed."""
    return Path(f"{store}{POSITIONS_SUFFIX}")


def read_positions(store: str | Path) -> tuple[str, int] | None:
    """``(store id, position)`` recorded beside ``store``; None if there is none (a new
    store, or a file nobody could read: nothing is concluded from it)."""
    try:
        data = json.loads(positions_path(store).read_text())
        return str(data["store"]), int(data["position"])
    except (OSError, ValueError, KeyError, TypeError, OverflowError, RecursionError):
        return None  # (e.g. "position": 1e400, or nesting past the parser's depth)


def record_positions(store: str | Path, store_id: str, position: int) -> None:
    """Record that ``store`` held ``position`` (committed): written atomically and
    durably, so it is never ahead of what the store itself held."""
    target = positions_path(store)
    partial = target.with_name(target.name + ".partial")
    data = json.dumps({"store": store_id, "position": position}).encode()
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(partial, target)


def restored_from_backup(log: UpdateLog) -> bool:
    """Whether ``log``'s file holds less than it once did: its highest position is below
    the one recorded beside it for the same store (a copy from a backup put back, or
    committed transactions lost, e.g. to a power loss with ``synchronous=NORMAL``). Then
    positions it gave out will be given again to other content: its epoch must rise.
    """
    recorded = read_positions(log.path)
    if recorded is None:
        return False
    store_id, position = recorded
    return store_id == log.identity()[0] and log.last_position() < position
