"""UpdateLog: the SQLite update store, checked through its API and through a second door.

Durability is checked with an independent ``sqlite3.connect(path)``; document content is
compared with plain strings and dicts written in the test, never with the store's output.
"""

from __future__ import annotations

import sqlite3
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import pytest
from pycrdt import Doc, Map, Text, merge_updates

import crdtsync.store as store_module
from crdtsync.errors import StoreError
from crdtsync.store import EMPTY_UPDATE, UpdateLog, compact_updates, merge_in_batches


class Recorder:
    """A pycrdt Doc whose every transaction's update is recorded, with a text model."""

    def __init__(self, client_id: int) -> None:
        self.doc = Doc(client_id=client_id)
        self.text = self.doc.get("notes", type=Text)
        self.meta = self.doc.get("meta", type=Map)
        self.updates: list[bytes] = []
        self._sub = self.doc.observe(lambda event: self.updates.append(event.update))

    def type(self, chars: str) -> bytes:
        """Append ``chars`` at the end in one transaction; return its update."""
        self.text.insert(len(str(self.text)), chars)
        return self.updates[-1]

    def delete(self, start: int, stop: int) -> bytes:
        del self.text[start:stop]
        return self.updates[-1]

    def set(self, key: str, value: object) -> bytes:
        self.meta[key] = value
        return self.updates[-1]


def replay(updates: list[bytes]) -> Doc:
    doc = Doc()
    with doc.transaction():
        for update in updates:
            doc.apply_update(update)
    return doc


def text_of(doc: Doc) -> str:
    return str(doc.get("notes", type=Text))


def meta_of(doc: Doc) -> dict:
    return doc.get("meta", type=Map).to_py()


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "store.db"


@pytest.fixture
def log(path: Path) -> Iterator[UpdateLog]:
    with UpdateLog(path) as opened:
        yield opened


def rows_seen_by_another_connection(path: Path, doc: str) -> list[bytes]:
    conn = sqlite3.connect(path)
    try:
        rows = conn.execute(
            "SELECT data FROM updates WHERE doc = ? ORDER BY seq", (doc,)
        ).fetchall()
    finally:
        conn.close()
    return [r[0] for r in rows]


# -- appending and loading ---------------------------------------------------------------------


def test_appended_updates_load_back_in_order(log: UpdateLog) -> None:
    writer = Recorder(1)
    first = log.append("team/todo", writer.type("buy "))
    rest = log.append_many([("team/todo", writer.type("milk")), ("other", b"\x00\x00")])
    assert first < rest[0] < rest[1]

    loaded = log.load("team/todo")

    assert loaded.name == "team/todo"
    assert loaded.snapshot is None
    assert loaded.updates == writer.updates
    assert loaded.last_seq == rest[0]
    assert text_of(replay(loaded.all_updates())) == "buy milk"
    assert log.load("other").updates == [b"\x00\x00"]
    assert log.documents() == ["other", "team/todo"]


def test_load_after_seq_returns_only_newer_updates(log: UpdateLog) -> None:
    seqs = [log.append("d", bytes([0, 0, i])) for i in range(4)]
    newer = log.load("d", after_seq=seqs[1])
    assert newer.updates == [b"\x00\x00\x02", b"\x00\x00\x03"]
    assert newer.last_seq == seqs[3]
    nothing = log.load("d", after_seq=seqs[3])
    assert nothing.updates == []
    assert nothing.last_seq == seqs[3]


def test_unknown_document_loads_empty(log: UpdateLog) -> None:
    loaded = log.load("never/written")
    assert (loaded.snapshot, loaded.updates, loaded.last_seq) == (None, [], 0)
    assert loaded.merged() == EMPTY_UPDATE


def test_committed_append_is_visible_to_an_independent_connection(
    path: Path, log: UpdateLog
) -> None:
    writer = Recorder(1)
    log.append("d", writer.type("durable"))
    log.append_many([("d", writer.type("!")), ("e", b"\x00\x00")])
    # the UpdateLog is still open: what another connection sees was committed
    assert rows_seen_by_another_connection(path, "d") == writer.updates
    assert rows_seen_by_another_connection(path, "e") == [b"\x00\x00"]


def test_appends_survive_closing_and_reopening(path: Path) -> None:
    writer = Recorder(1)
    with UpdateLog(path) as log:
        log.append("d", writer.type("kept"))
    assert rows_seen_by_another_connection(path, "d") == writer.updates
    with UpdateLog(path) as log:
        assert text_of(replay(log.load("d").all_updates())) == "kept"


def test_store_file_is_in_wal_mode(path: Path, log: UpdateLog) -> None:
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    finally:
        conn.close()


# -- pending acknowledgements ------------------------------------------------------------------


def test_local_appends_are_pending_until_acknowledged(log: UpdateLog) -> None:
    seqs = [log.append_local("d", bytes([0, 0, i])) for i in range(3)]
    log.append("d", b"\x00\x00\x09")  # a remote update: never pending
    log.append_local("other", b"\x00\x00")
    assert log.pending_count("d") == 3
    assert log.pending_seqs("d") == seqs
    assert log.load("d").updates == [
        b"\x00\x00\x00",
        b"\x00\x00\x01",
        b"\x00\x00\x02",
        b"\x00\x00\x09",
    ]

    assert log.acknowledge("d", [seqs[1]]) == 1
    assert log.pending_count("d") == 2
    assert log.pending_seqs("d") == [seqs[0], seqs[2]]
    assert log.pending_count("other") == 1


def test_acknowledging_twice_changes_nothing(log: UpdateLog) -> None:
    seqs = [log.append_local("d", b"\x00\x00") for _ in range(2)]
    assert log.acknowledge("d", [seqs[0]]) == 1
    assert log.acknowledge("d", [seqs[0]]) == 0
    assert log.acknowledge("d", [seqs[0], seqs[0]]) == 0
    assert log.pending_seqs("d") == [seqs[1]]


def test_acknowledging_an_unknown_seq_changes_nothing(log: UpdateLog) -> None:
    seq = log.append_local("d", b"\x00\x00")
    assert log.acknowledge("d", [seq + 1000]) == 0
    assert log.acknowledge("other-doc", [seq]) == 0  # keyed by document too
    assert log.acknowledge("d", []) == 0
    assert log.pending_seqs("d") == [seq]


def test_reordered_acknowledgements_settle_to_zero(log: UpdateLog) -> None:
    seqs = [log.append_local("d", b"\x00\x00") for _ in range(5)]
    assert log.acknowledge("d", [seqs[4], seqs[2]]) == 2
    assert log.acknowledge("d", [seqs[0]]) == 1
    assert log.acknowledge("d", [seqs[3], seqs[1], seqs[4]]) == 2  # seqs[4] is a duplicate
    assert log.pending_count("d") == 0


def test_pending_count_survives_reopening(path: Path) -> None:
    with UpdateLog(path) as log:
        seqs = [log.append_local("d", b"\x00\x00") for _ in range(3)]
        log.acknowledge("d", [seqs[0]])
    with UpdateLog(path) as log:
        assert log.pending_count("d") == 2
        assert log.pending_seqs("d") == seqs[1:]
        log.acknowledge("d", seqs)
    with UpdateLog(path) as log:
        assert log.pending_count("d") == 0
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("SELECT count(*) FROM pending").fetchone() == (0,)
    finally:
        conn.close()


# -- compaction ------------------------------------------------------------------------------------


def edit_history() -> tuple[Recorder, str, dict]:
    """A document built in many transactions, with deletes; and its plain-value model."""
    writer = Recorder(42)
    model = ""
    for i in range(30):
        chunk = f"line {i}\n"
        writer.type(chunk)
        model += chunk
        if i % 7 == 6:
            writer.delete(0, 5)
            model = model[5:]
    writer.set("title", "Zoë's notes")
    writer.set("count", 3)
    writer.set("count", 4)
    return writer, model, {"title": "Zoë's notes", "count": 4}


def test_compaction_keeps_the_document_and_empties_the_tail(log: UpdateLog) -> None:
    writer, model, meta = edit_history()
    log.append_many(("d", u) for u in writer.updates)
    assert log.tail_length("d") == len(writer.updates) > 30  # premise: a long tail

    result = log.compact("d")

    assert result.folded == len(writer.updates)
    loaded = log.load("d")
    assert loaded.updates == []
    assert loaded.snapshot is not None
    assert result.snapshot_bytes == len(loaded.snapshot)
    assert log.tail_length("d") == 0
    doc = replay(loaded.all_updates())
    assert text_of(doc) == model
    assert meta_of(doc) == meta


def test_compaction_is_visible_to_an_independent_connection(path: Path, log: UpdateLog) -> None:
    writer, model, _ = edit_history()
    log.append_many(("d", u) for u in writer.updates)
    log.compact("d")
    conn = sqlite3.connect(path)
    try:
        (snapshot,) = conn.execute("SELECT snapshot FROM documents WHERE name = 'd'").fetchone()
        assert conn.execute("SELECT count(*) FROM updates WHERE doc = 'd'").fetchone() == (0,)
    finally:
        conn.close()
    assert text_of(replay([snapshot])) == model


def test_compacting_twice_and_appending_between_keeps_everything(log: UpdateLog) -> None:
    writer = Recorder(5)
    log.append("d", writer.type("one "))
    log.compact("d")
    log.append("d", writer.type("two "))
    log.append("d", writer.delete(0, 4))
    log.append("d", writer.type("three"))
    assert log.compact("d").folded == 3
    assert text_of(replay(log.load("d").all_updates())) == "two three"
    assert log.compact("d").folded == 0  # nothing new: nothing to do


def test_compaction_leaves_other_documents_alone(log: UpdateLog) -> None:
    a, b = Recorder(1), Recorder(2)
    log.append("a", a.type("alpha"))
    log.append("b", b.type("beta"))
    log.compact("a")
    assert log.load("b").updates == b.updates
    assert log.load("b").snapshot is None


def test_update_appended_during_compaction_stays_in_the_tail(
    path: Path, log: UpdateLog, monkeypatch: pytest.MonkeyPatch
) -> None:
    writer = Recorder(9)
    for word in ("early ", "words "):
        log.append("d", writer.type(word))
    late = writer.type("late")
    real_compact_updates = store_module.compact_updates
    appended: list[int] = []

    def compact_then_race(updates, doc=None):
        snapshot = real_compact_updates(updates, doc)
        # another writer (another connection, as another process would be) appends now:
        # after compaction read the tail, before it replaces it
        with UpdateLog(path) as other:
            appended.append(other.append("d", late))
        return snapshot

    monkeypatch.setattr(store_module, "compact_updates", compact_then_race)
    result = log.compact("d")

    assert appended  # premise: the race really happened
    assert result.folded == 2
    loaded = log.load("d")
    assert loaded.updates == [late]
    assert loaded.last_seq == appended[0]
    assert text_of(replay(loaded.all_updates())) == "early words late"
    assert text_of(replay([loaded.snapshot])) == "early words "


def test_concurrent_compactions_of_one_document_lose_nothing(
    path: Path, log: UpdateLog, monkeypatch: pytest.MonkeyPatch
) -> None:
    writer = Recorder(3)
    for word in ("a", "b", "c"):
        log.append("d", writer.type(word))
    real_compact_updates = store_module.compact_updates
    raced: list[int] = []
    started = False

    def slow_compaction(updates, doc=None):
        nonlocal started
        snapshot = real_compact_updates(updates, doc)
        if not started:
            started = True
            # meanwhile, another process appends and runs a whole compaction of its own
            with UpdateLog(path) as other:
                other.append("d", writer.type("d"))
                other.append("d", writer.type("e"))
                raced.append(other.compact("d").folded)
        return snapshot

    monkeypatch.setattr(store_module, "compact_updates", slow_compaction)
    log.compact("d")

    assert raced == [5]  # premise: the other compaction folded all five updates
    assert text_of(replay(log.load("d").all_updates())) == "abcde"


def test_compaction_keeps_structs_that_wait_for_a_missing_update(log: UpdateLog) -> None:
    writer = Recorder(11)
    u1, u2, u3 = writer.type("one "), writer.type("two "), writer.type("three")
    log.append("d", u1)
    log.append("d", u3)  # u2 has not arrived: u3's structs wait behind a clock gap
    # premise: a scratch Doc alone would drop u3 (it shows and encodes only "one ")
    scratch = replay([u1, u3])
    assert text_of(scratch) == "one "
    assert text_of(replay([scratch.get_update(), u2])) == "one two "

    log.compact("d")

    loaded = log.load("d")
    assert loaded.updates == []
    assert text_of(replay([*loaded.all_updates(), u2])) == "one two three"


def test_gapped_content_survives_repeated_compactions(log: UpdateLog) -> None:
    writer = Recorder(11)
    u1, u2, u3 = writer.type("one "), writer.type("two "), writer.type("three")
    other = Recorder(12)
    log.append("d", u1)
    log.append("d", u3)
    log.compact("d")
    log.append("d", other.set("k", "v"))
    log.compact("d")
    log.append("d", u2)  # the missing update finally arrives
    log.compact("d")
    doc = replay(log.load("d").all_updates())
    assert text_of(doc) == "one two three"
    assert meta_of(doc) == {"k": "v"}


def test_compaction_keeps_a_delete_of_an_item_not_yet_seen(log: UpdateLog) -> None:
    writer = Recorder(12)
    insert = writer.type("abc")
    delete = writer.delete(1, 2)  # delete-only transaction: "b"
    other = Recorder(13)
    log.append("d", other.type("x"))
    log.append("d", delete)  # arrives before the insert it deletes from
    # premise: a scratch Doc forgets the delete
    assert text_of(replay([replay([delete]).get_update(), insert])) == "abc"

    log.compact("d")

    # the expected order of concurrent inserts, from the two plain updates without the delete
    assert text_of(replay([other.updates[0], insert])) == "abcx"
    doc = replay([*log.load("d").all_updates(), insert])
    assert text_of(doc) == "acx"


def test_compaction_from_a_live_document_keeps_it(log: UpdateLog) -> None:
    writer, model, meta = edit_history()
    log.append_many(("d", u) for u in writer.updates)

    result = log.compact("d", live=writer.doc)

    assert result.folded == len(writer.updates)
    assert log.load("d").updates == []
    doc = replay(log.load("d").all_updates())
    assert text_of(doc) == model
    assert meta_of(doc) == meta


def test_compact_updates_with_a_live_doc_encodes_it() -> None:
    writer, model, meta = edit_history()
    snapshot = compact_updates(writer.updates, writer.doc)
    doc = replay([snapshot])
    assert text_of(doc) == model
    assert meta_of(doc) == meta


def test_compact_updates_of_nothing_is_the_empty_update() -> None:
    assert compact_updates([]) == b"\x00\x00"


def test_compact_updates_is_smaller_than_a_merge_of_a_long_history() -> None:
    writer, model, _ = edit_history()
    snapshot = compact_updates(writer.updates)
    assert text_of(replay([snapshot])) == model
    assert len(snapshot) <= len(merge_updates(*writer.updates))


def test_compaction_with_a_damaged_update_in_the_log_keeps_it(path: Path, log: UpdateLog) -> None:
    writer = Recorder(4)
    log.append("d", writer.type("good"))
    damaged = b"\x01\x02garbage"
    log.append("d", damaged)  # e.g. stored by an older version, before validation existed

    with suppress(StoreError):  # refusing with our error is fine; a foreign error is not
        log.compact("d")

    assert damaged in rows_seen_by_another_connection(path, "d") or damaged in (
        log.load("d").snapshot or b""
    )
    assert text_of(replay(log.load("d").all_updates()[:1])) == "good"


# -- schema and file errors ----------------------------------------------------------------------


def test_store_written_by_a_newer_version_is_refused(path: Path) -> None:
    UpdateLog(path).close()
    conn = sqlite3.connect(path)
    with conn:
        conn.execute(
            "INSERT INTO _sqlite_migrations (migration_set, name, applied_at) "
            "VALUES ('crdtsync', 'm999_from_the_future', '2030-01-01')"
        )
    conn.close()

    with pytest.raises(StoreError, match=r"m999_from_the_future.*newer") as excinfo:
        UpdateLog(path)
    assert excinfo.value.path == str(path)


def test_unknown_migration_of_another_set_is_not_ours(path: Path) -> None:
    UpdateLog(path).close()
    conn = sqlite3.connect(path)
    with conn:
        conn.execute(
            "INSERT INTO _sqlite_migrations (migration_set, name, applied_at) "
            "VALUES ('someone-else', 'm999_theirs', '2030-01-01')"
        )
    conn.close()
    with UpdateLog(path) as log:
        assert log.documents() == []


def test_non_database_file_is_refused_naming_the_path(path: Path) -> None:
    path.write_bytes(b"this is not an SQLite database, just text\n" * 50)
    with pytest.raises(StoreError, match=f"{path}.*not a database") as excinfo:
        UpdateLog(path)
    assert excinfo.value.path == str(path)
    # and the file was left as it was
    assert path.read_bytes() == b"this is not an SQLite database, just text\n" * 50


def test_fresh_file_gets_the_schema(path: Path) -> None:
    UpdateLog(path).close()
    conn = sqlite3.connect(path)
    try:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        applied = conn.execute("SELECT migration_set, name FROM _sqlite_migrations").fetchall()
    finally:
        conn.close()
    assert {"documents", "updates", "pending", "ledger_clients", "quarantine"} <= tables
    assert "link_checkpoints" in tables
    assert applied == [
        ("crdtsync", "m001_update_log"),
        ("crdtsync", "m002_integrity"),
        ("crdtsync", "m003_snapshot_chunks"),
        ("crdtsync", "m004_update_chunks"),
        ("crdtsync", "m005_identity"),
        ("crdtsync", "m006_kept_folders"),
        ("crdtsync", "m007_regions"),
    ]


# -- settings of the store ---------------------------------------------------------------------


@pytest.mark.parametrize("value", ["normal", "fast", "", "FULLY"])
def test_unknown_synchronous_value_is_a_value_error(path: Path, value: str) -> None:
    with pytest.raises(
        ValueError, match=f"^synchronous must be OFF, NORMAL, FULL or EXTRA, not {value!r}$"
    ):
        UpdateLog(path, synchronous=value)  # type: ignore[arg-type]
    assert not path.exists()


@pytest.mark.parametrize(("value", "level"), [("OFF", 0), ("NORMAL", 1), ("FULL", 2), ("EXTRA", 3)])
def test_synchronous_value_is_applied(path: Path, value: str, level: int) -> None:
    with UpdateLog(path, synchronous=value) as log:  # type: ignore[arg-type]
        assert log.conn.execute("PRAGMA synchronous").fetchone() == (level,)


# -- merging in batches ----------------------------------------------------------------------


def many_updates(count: int) -> tuple[list[bytes], str]:
    writer = Recorder(77)
    model = ""
    for i in range(count):
        chunk = chr(ord("a") + i % 26)
        writer.type(chunk)
        model += chunk
        if i % 10 == 9:
            writer.delete(0, 1)
            model = model[1:]
    return writer.updates, model


@pytest.mark.parametrize("count", [1, 2, 3, 63, 64, 65, 100, 128, 129, 300])
def test_merge_in_batches_equals_a_single_merge(count: int) -> None:
    updates, _ = many_updates(count)
    updates = updates[:count]  # exactly ``count`` updates (deletes are updates too)
    assert len(updates) == count
    expected = replay(updates)

    merged = merge_in_batches(updates)

    assert text_of(replay([merged])) == text_of(expected)
    assert text_of(replay([merge_updates(*updates)])) == text_of(expected)
    assert replay([merged]).get_state() == expected.get_state()


@pytest.mark.parametrize("count", [1, 2, 3, 4, 5, 17, 300])
@pytest.mark.parametrize("batch", [2, 3, 64])
def test_merge_in_batches_gives_the_modelled_text(count: int, batch: int) -> None:
    updates, model = many_updates(count)
    assert len(updates) >= count
    assert text_of(replay([merge_in_batches(updates, batch)])) == model


@pytest.mark.parametrize("batch", [8, 64])
def test_merge_in_batches_matches_applying_every_prefix_of_a_log(batch: int) -> None:
    updates, _ = many_updates(300)
    updates = updates[:300]
    doc = Doc()
    checked = 0
    for count, update in enumerate(updates, start=1):
        doc.apply_update(update)  # the expectation: one Doc that applied them in order
        merged = merge_in_batches(updates[:count], batch)
        assert text_of(replay([merged])) == text_of(doc), count
        checked += 1
    assert checked == 300


def test_merge_in_batches_of_nothing_is_the_empty_update() -> None:
    assert merge_in_batches([]) == b"\x00\x00"


def test_merge_in_batches_of_one_update_returns_it() -> None:
    assert merge_in_batches([b"\x01\x01\x05\x00\x04\x01\x01t\x02hi\x00"]) == (
        b"\x01\x01\x05\x00\x04\x01\x01t\x02hi\x00"
    )


class _LoopGuard(Exception):
    pass


@contextmanager
def bounded_lines(limit: int) -> Iterator[None]:
    """Abort the code inside after ``limit`` traced lines of crdtsync.store: a hang fails fast."""
    count = 0

    def local(frame, event, arg) -> Callable | None:
        nonlocal count
        if event == "line":
            count += 1
            if count > limit:
                raise _LoopGuard(f"still running after {limit} lines")
        return local

    def tracer(frame, event, arg) -> Callable | None:
        if frame.f_code.co_filename == store_module.__file__:
            return local
        return None

    previous = sys.gettrace()
    sys.settrace(tracer)
    try:
        yield
    finally:
        sys.settrace(previous)


@pytest.mark.parametrize("batch", [1, 0, -1])
def test_merge_in_batches_refuses_a_batch_below_two(batch: int) -> None:
    updates, _ = many_updates(3)
    with bounded_lines(10_000), pytest.raises(ValueError, match="batch"):
        merge_in_batches(updates, batch)


def test_large_snapshot_is_written_in_chunks_and_the_tail_removed_in_small_steps(tmp_path):
    """A compaction's writes are short transactions: a snapshot over 1 MiB is stored in
    chunks, made current in one small commit, and the folded tail rows are deleted a few
    at a time; the document reads the same before and after, and again after a second
    compaction (which removes the first one's chunks)."""
    path = tmp_path / "chunks.db"
    doc: Doc[Any] = Doc()
    updates: list[bytes] = []
    doc.observe(lambda event: updates.append(event.update))
    text = doc.get("text", type=Text)
    for i in range(600):
        text.insert(len(text), f"{i:05d}" + "c" * 5000)  # ~3 MB in all: 3 chunks
    with UpdateLog(path) as log:
        log.append_many([("big", u) for u in updates])
        before = log.load("big").merged()
        result = log.compact("big")
        assert result.folded == 600
        rows = log.conn.execute(
            "SELECT count(*), max(length(data)) FROM snapshot_chunks WHERE doc = 'big'"
        ).fetchone()
        assert rows[0] == 3
        assert rows[1] <= 1024 * 1024
        assert log.conn.execute("SELECT count(*) FROM updates").fetchone()[0] == 0
        assert log.tail_length("big") == 0
        assert log.size("big") == (0, result.snapshot_bytes)
        after: Doc[Any] = Doc()
        after.apply_update(log.load("big").merged())
        reference: Doc[Any] = Doc()
        reference.apply_update(before)
        assert str(after.get("text", type=Text)) == str(reference.get("text", type=Text))
        # More content and a second compaction: the first generation's chunks go.
        text.insert(0, "head ")
        log.append_many([("big", updates[-1])])
        log.compact("big")
        gens = log.conn.execute(
            "SELECT count(DISTINCT gen) FROM snapshot_chunks WHERE doc = 'big'"
        ).fetchone()[0]
        assert gens == 1
        again: Doc[Any] = Doc()
        again.apply_update(log.load("big").merged())
        assert str(again.get("text", type=Text)) == str(text)


def test_compaction_whose_chunks_were_taken_is_abandoned(tmp_path):
    """Chunks of a compaction still being written look abandoned to another compaction's
    cleanup; the first one then does not make its incomplete snapshot current."""
    path = tmp_path / "race.db"
    doc: Doc[Any] = Doc()
    updates: list[bytes] = []
    doc.observe(lambda event: updates.append(event.update))
    text = doc.get("text", type=Text)
    for _ in range(300):
        text.insert(len(text), "r" * 5000)
    with UpdateLog(path) as log, UpdateLog(path) as other:
        log.append_many([("doc", u) for u in updates])
        real_write = log._write
        writes = 0

        @contextmanager
        def write_then_interfere() -> Iterator[sqlite3.Connection]:
            nonlocal writes
            with real_write() as conn:
                yield conn
            writes += 1
            if writes == 1:  # the first chunk is written: another process cleans up
                other._clean("doc")

        log._write = write_then_interfere  # type: ignore[method-assign]
        assert log.compact("doc").folded == 0  # abandoned, not made current
        log._write = real_write  # type: ignore[method-assign]
        stored: Doc[Any] = Doc()
        stored.apply_update(log.load("doc").merged())
        assert str(stored.get("text", type=Text)) == str(text)
        assert log.compact("doc").folded == 300  # the next one goes through


# -- staged (chunked) updates ------------------------------------------------------------------


def _text_update(size: int) -> bytes:
    doc: Doc[Any] = Doc()
    doc.get("text", type=Text).insert(0, "s" * size)
    return doc.get_update()


def test_a_staged_update_is_appended_in_order_and_read_back_whole(log: UpdateLog, monkeypatch):
    monkeypatch.setattr(store_module, "UPDATE_CHUNK_BYTES", 1000)
    big = _text_update(4500)
    log.append("d", EMPTY_UPDATE)
    staged = log.stage(big)
    assert staged.size == len(big)
    assert log.load("d").updates == [EMPTY_UPDATE]  # staged is not appended
    seqs = log.append_many([("d", staged), ("e", b"\x00\x00"), ("d", EMPTY_UPDATE)])
    assert seqs == sorted(seqs)
    assert log.load("d").updates == [EMPTY_UPDATE, big, EMPTY_UPDATE]
    assert log.load("d", after_seq=seqs[0]).updates == [EMPTY_UPDATE]
    assert log.size("d") == (3, len(big) + 4)
    assert log.size_within("d", 3, len(big) + 4) == (3, len(big) + 4)
    assert log.size_within("d", 3, len(big) + 3) is None


def test_compaction_deletes_a_staged_updates_chunks(log: UpdateLog, monkeypatch):
    monkeypatch.setattr(store_module, "UPDATE_CHUNK_BYTES", 100)
    big = _text_update(2000)  # about 20 chunks: deleted over several transactions
    log.append_many([("d", log.stage(big)), ("d", EMPTY_UPDATE)])
    other = log.stage(_text_update(500))
    log.append_many([("e", other)])
    result = log.compact("d")
    assert result.folded == 2
    rows = log.conn.execute("SELECT DISTINCT gen FROM update_chunks").fetchall()
    assert rows == [(other.gen,)]  # another document's chunks stay
    doc: Doc[Any] = Doc()
    doc.apply_update(log.load("d").merged())
    assert str(doc.get("text", type=Text)) == "s" * 2000


def test_chunks_never_appended_are_dropped(log: UpdateLog, monkeypatch):
    monkeypatch.setattr(store_module, "UPDATE_CHUNK_BYTES", 100)
    update = _text_update(300)
    kept = log.stage(update)
    log.append_many([("d", kept)])
    lost = log.stage(_text_update(300))  # a relay killed before its append
    failed = log.stage(_text_update(300))  # an append that failed
    assert log.drop_unused_chunks([failed.gen, kept.gen]) > 0
    gens = {g for (g,) in log.conn.execute("SELECT gen FROM update_chunks")}
    assert gens == {kept.gen, lost.gen}
    assert log.drop_unused_chunks() > 0
    assert {g for (g,) in log.conn.execute("SELECT gen FROM update_chunks")} == {kept.gen}
    assert log.load("d").updates == [update]


def test_a_staging_that_fails_partway_leaves_no_chunks(log: UpdateLog, monkeypatch):
    """A full disk at the 4th chunk: the 3 written are deleted at once, or, when the
    delete fails too (deleting needs room as well), by a later drop_abandoned."""
    monkeypatch.setattr(store_module, "UPDATE_CHUNK_BYTES", 100)
    calls = {"inserts": 0, "fail_deletes": True}
    real_write = log._write

    @contextmanager
    def failing_write() -> Iterator[sqlite3.Connection]:
        with real_write() as conn:
            yield _Failing(conn, calls)

    monkeypatch.setattr(log, "_write", failing_write)
    with pytest.raises(StoreError, match="disk full"):
        log.stage(_text_update(1000))
    assert log.conn.execute("SELECT count(*) FROM update_chunks").fetchone()[0] == 3
    assert len(log.abandoned) == 1  # the delete failed too: kept for later
    calls["fail_deletes"] = False
    log.drop_abandoned()
    assert log.conn.execute("SELECT count(*) FROM update_chunks").fetchone()[0] == 0
    assert log.abandoned == set()


class _Failing:
    """A connection whose 4th chunk insert, and (while told so) every delete, fails."""

    def __init__(self, conn: sqlite3.Connection, calls: dict[str, Any]) -> None:
        self._conn = conn
        self._calls = calls

    def execute(self, sql: str, *args: Any) -> Any:
        if sql.startswith("INSERT INTO update_chunks"):
            self._calls["inserts"] += 1
            if self._calls["inserts"] == 4:
                raise StoreError("disk full (test)")
        return self._conn.execute(sql, *args)

    def executemany(self, sql: str, *args: Any) -> Any:
        if sql.startswith("DELETE") and self._calls["fail_deletes"]:
            raise StoreError("disk full (test)")
        return self._conn.executemany(sql, *args)


def _changes_by_aggregation(log: UpdateLog, cursor: int, prefix: str) -> list[tuple[str, int]]:
    """The obvious query (every row past the cursor, grouped): the oracle for changes()."""
    rows = log.conn.execute(
        "SELECT doc, max(seq) AS p FROM ("
        "SELECT doc, seq FROM updates WHERE seq > ?1 "
        "UNION ALL SELECT name, snapshot_seq FROM documents WHERE snapshot_seq > ?1"
        ") WHERE substr(doc, 1, ?2) = ?3 GROUP BY doc ORDER BY p",
        (cursor, len(prefix), prefix),
    ).fetchall()
    return [(doc, int(p)) for doc, p in rows]


@pytest.mark.parametrize("seed", range(6))
def test_changes_pages_list_what_the_aggregate_lists_through_appends_and_compactions(
    tmp_path: Path, seed: int
) -> None:
    import random

    rng = random.Random(seed)
    names = [f"{folder}/{i}" for folder in ("a", "ab", "b") for i in range(6)]
    docs = {name: Doc() for name in names}
    with UpdateLog(tmp_path / "c.db") as log:
        for _ in range(120):
            name = rng.choice(names)
            if rng.random() < 0.15:
                log.compact(name)
                continue
            before = docs[name].get_state()
            docs[name].get("text", type=Text).insert(0, "x")
            log.append_many([(name, docs[name].get_update(before))])
            for prefix in ("", "a", "a/", "b/"):
                cursor = rng.choice([0, *(p for _, p in _changes_by_aggregation(log, 0, ""))])
                expected = _changes_by_aggregation(log, cursor, prefix)
                listed: list[tuple[str, int]] = []
                at = cursor
                for _ in range(len(names) + 1):  # pages of 2, bounded
                    page = log.changes(at, 2, prefix)
                    if not page:
                        break
                    listed += page
                    at = page[-1][1]
                assert listed == expected, (cursor, prefix)


# -- restores ---------------------------------------------------------------------------


def test_a_file_holding_less_than_its_recorded_positions_is_restored(tmp_path: Path) -> None:
    from crdtsync.store import (
        positions_path,
        read_positions,
        record_positions,
        restored_from_backup,
    )

    path = tmp_path / "relay.db"
    with UpdateLog(path) as log:
        assert read_positions(path) is None
        assert not restored_from_backup(log)  # nothing recorded: nothing concluded
        doc: Doc[Any] = Doc()
        doc.get("t", type=Text).insert(0, "a")
        log.append("doc", doc.get_update())
        store_id, _ = log.identity()
        record_positions(path, store_id, log.last_position())
        assert read_positions(path) == (store_id, 1)
        assert not restored_from_backup(log)  # holds what it held
        record_positions(path, store_id, 5)
        assert restored_from_backup(log)  # it once held position 5
        record_positions(path, "another store", 5)
        assert not restored_from_backup(log)  # another store's record says nothing
        positions_path(path).write_text("{not json")
        assert read_positions(path) is None
        positions_path(path).write_text(f'{{"store": "{store_id}", "position": 1e400}}')
        assert read_positions(path) is None
        positions_path(path).write_text("[" * 100_000)
        assert read_positions(path) is None
        assert not restored_from_backup(log)
