"""Folders and the multiplexed connection's messages (issue 11), without sockets."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pycrdt import Array, Doc, Map, Text, merge_updates

from crdtsync.errors import InvalidDocumentName, MalformedMessage, ProtocolError
from crdtsync.folders import Cursor, FolderIndex, document_digest, validate_prefix
from crdtsync.protocol import (
    DIGEST_BYTES,
    MAX_NAMES_PER_MESSAGE,
    ExtChanged,
    ExtChannel,
    ExtClose,
    ExtDigests,
    ExtOpen,
    ExtSubscribe,
    ExtUnsubscribe,
    SyncStep1,
    decode_message,
    write_var_uint,
)
from crdtsync.store import UpdateLog
from crdtsync.sync import Failed, SyncSession

MESSAGES = [
    ExtOpen(1, "team/notes"),
    ExtOpen(2**40, "ünïcode/名前"),
    ExtClose(3),
    ExtClose(3, 4403, "no access to 'x'"),
    ExtChannel(7, SyncStep1(b"\x00").encode()),
    ExtSubscribe(1, "team/"),
    ExtSubscribe(9, "", "store-id", 3, 12345),
    ExtChanged(1, (), "s", 1, 0, digests_wanted=True),
    ExtChanged(2, ("a", "b/c"), "s", 2, 99, caught_up=True),
    ExtChanged(2, ("a", "b/c"), "s", 2, 99, digests=(b"\x01" * 16, b"\x02" * 16)),
    ExtDigests(4, (("a", b"\x00" * DIGEST_BYTES),), last=True),
    ExtDigests(4, ()),
    ExtUnsubscribe(5),
    ExtUnsubscribe(5, 1008, "folder prefix 'x/../': bad"),
]


@pytest.mark.parametrize("msg", MESSAGES, ids=lambda m: type(m).__name__)
def test_messages_round_trip(msg: Any) -> None:
    assert decode_message(msg.encode()) == msg


@pytest.mark.parametrize("msg", MESSAGES, ids=lambda m: type(m).__name__)
def test_every_truncation_is_refused_cleanly(msg: Any) -> None:
    data = msg.encode()
    for end in range(len(data)):
        if isinstance(msg, ExtChannel) and end > 3:
            continue  # a channel's frame is the rest: its own decoding refuses a cut
        with pytest.raises(MalformedMessage):
            decode_message(data[:end])


def test_counts_and_sizes_are_bounded() -> None:
    too_many = bytes((100, 9, 1, 0, 0, 0, 0)) + write_var_uint(MAX_NAMES_PER_MESSAGE + 1)
    with pytest.raises(MalformedMessage, match="more than"):
        decode_message(too_many)
    short = ExtDigests(1, (("a", b"\x00" * DIGEST_BYTES),)).encode()
    bad = short.replace(bytes((DIGEST_BYTES,)) + b"\x00" * DIGEST_BYTES, b"\x01\x00")
    with pytest.raises(MalformedMessage, match="not 16"):
        decode_message(bad)
    with pytest.raises(MalformedMessage, match="carries nothing"):
        decode_message(bytes((100, 7, 1)))
    with pytest.raises(MalformedMessage, match="digests"):
        decode_message(ExtChanged(1, ("a",), "s", 1, 1, digests=(b"x" * 16,)).encode()[:-1])
    with pytest.raises(ValueError, match="one digest per document"):
        ExtChanged(1, ("a", "b"), "s", 1, 1, digests=(b"x" * 16,)).encode()


@pytest.mark.parametrize("msg", MESSAGES, ids=lambda m: type(m).__name__)
def test_a_documents_session_refuses_connection_messages(msg: Any) -> None:
    """Channels and folders wrap sessions: one inside a document is a protocol error."""
    session = SyncSession(extensions=True)
    session.receive_data(msg.encode())
    (event,) = session.events_received()
    assert isinstance(event, Failed)
    assert isinstance(event.error, ProtocolError)


def _doc(client: int) -> Doc[Any]:
    return Doc(client_id=client)


def test_a_digest_does_not_depend_on_how_the_document_is_encoded() -> None:
    doc = _doc(1)
    updates: list[bytes] = []
    doc.observe(lambda e: updates.append(e.update))
    text = doc.get("text", type=Text)
    text += "hello world"
    doc.get("map", type=Map)["k"] = Array([1, 2])
    with doc.transaction():
        del text[0:6]
    text.insert(0, "brave ")
    one = document_digest(updates)
    assert one == document_digest([merge_updates(*updates)])
    assert one == document_digest([doc.get_update()])  # a Doc's own snapshot
    assert one == document_digest(list(reversed(updates)))
    assert one == document_digest([*updates[:2], merge_updates(*updates[2:])])
    other = _doc(2)
    other.apply_update(doc.get_update())
    assert document_digest([other.get_update()]) == one


def test_a_delete_only_change_changes_the_digest() -> None:
    doc = _doc(1)
    text = doc.get("text", type=Text)
    text += "abc"
    before_update = doc.get_update()
    state = doc.get_state()
    del text[0:1]
    assert doc.get_state() == state  # the state vector did not move ...
    assert document_digest([doc.get_update()]) != document_digest([before_update])  # ... this did


def test_empty_documents_have_one_digest() -> None:
    assert document_digest([]) == document_digest([b"\x00\x00"]) == document_digest([b""])


EDITS = st.tuples(st.integers(0, 20), st.text(alphabet="abc xyz", max_size=4), st.booleans())


@settings(max_examples=40, deadline=None)
@given(st.lists(EDITS, max_size=12))
def test_two_replicas_with_the_same_edits_have_the_same_digest(ops: list[Any]) -> None:
    # (ASCII: pycrdt 0.14 indexes Text in UTF-8 bytes)
    a, b = _doc(1), _doc(2)
    updates: list[bytes] = []
    a.observe(lambda e: updates.append(e.update))
    text = a.get("t", type=Text)
    for pos, chars, delete in ops:
        if delete and len(text):
            del text[pos % len(text)]
        elif chars:
            text.insert(pos % (len(text) + 1), chars)
    for update in reversed(updates):
        b.apply_update(update)
    assert str(b.get("t", type=Text)) == str(text)
    assert document_digest([b.get_update()]) == document_digest(updates)


def test_prefixes() -> None:
    assert validate_prefix("") == ""
    assert validate_prefix("team/") == "team/"
    assert validate_prefix("team/no") == "team/no"
    for bad in ("team//", "../", "a/./", "x" * 600, "sp ace/"):
        with pytest.raises(InvalidDocumentName):
            validate_prefix(bad)


def test_cursor_is_valid_only_on_its_store_and_epoch() -> None:
    cursor = Cursor("s1", 2, 10)
    assert cursor.valid_on("s1", 2)
    assert not cursor.valid_on("s1", 3)
    assert not cursor.valid_on("s2", 2)
    assert not Cursor("", 0, 0).valid_on("", 0)


def test_a_cursor_of_a_restored_store_replaces_a_higher_one_of_its_former_epoch() -> None:
    recorded = Cursor("s1", 1, 500)
    assert Cursor("s1", 1, 500).replaces(recorded)
    assert Cursor("s1", 1, 501).replaces(recorded)
    assert not Cursor("s1", 1, 499).replaces(recorded)  # an older announcement
    assert Cursor("s1", 2, 40).replaces(recorded)  # restored: positions count again
    assert Cursor("s2", 1, 3).replaces(recorded)  # another store
    assert Cursor("s1", 1, 0).replaces(Cursor("", 0, 0))  # the first one


def test_folder_index_finds_every_folder_of_a_name() -> None:
    index: FolderIndex[str] = FolderIndex()
    index.add("", "all")
    index.add("team/", "t1")
    index.add("team/", "t2")
    index.add("team/a", "ta")
    index.add("other/", "o")
    assert sorted(index.matching("team/abc")) == [
        ("", "all"),
        ("team/", "t1"),
        ("team/", "t2"),
        ("team/a", "ta"),
    ]
    for i in range(100):  # more prefixes than the name is long: the other way round
        index.add(f"p{i}/", f"x{i}")
    assert sorted(index.matching("team/a")) == [
        ("", "all"),
        ("team/", "t1"),
        ("team/", "t2"),
        ("team/a", "ta"),
    ]
    index.discard("team/", "t1")
    index.discard("team/", "t2")
    index.discard("team/", "missing")
    assert [s for _, s in index.matching("team/b")] == ["all"]
    assert len(index) == 103


def test_a_replicas_file_lists_folders_and_their_pending_changes(tmp_path: Path) -> None:
    with UpdateLog(tmp_path / "r.db") as log:
        for name in ("team/a", "team/b", "teams/x", "other/c", "team/c"):
            log.append_local(name, b"\x00\x00")
        log.append("team/d", b"\x00\x00")  # a remote one: nothing pending
        assert log.documents_in("team/") == ["team/a", "team/b", "team/c", "team/d"]
        assert log.documents_in("team/", after="team/b", limit=1) == ["team/c"]
        assert log.documents_in("") == sorted(log.documents())
        assert log.documents_in("team_") == []  # "_" is no wildcard
        assert log.pending_in("team/") == 3
        assert log.pending_documents_in("team/") == ["team/a", "team/b", "team/c"]
        log.keep_folder("team/")
        log.keep_folder("team/")
        assert log.kept_folders() == {"team/": ("", 0, 0)}
        log.set_folder_cursor("team/", "store", 2, 42)
        log.keep_folder("team/")  # keeping again keeps the cursor
        assert log.kept_folders() == {"team/": ("store", 2, 42)}
        log.forget_folder("team/")
        assert log.kept_folders() == {}
