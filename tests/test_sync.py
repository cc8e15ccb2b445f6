"""SyncSession: bytes in, bytes and events out, driven in memory with no sockets.

``SessionPair`` wires two sessions back to back (h11's ``ConnectionPair``): each side
answers ``StateRequested`` from its own pycrdt ``Doc`` and applies ``UpdateReceived`` to
it, the way a replica does. Expectations come from plain Python values (strings, dicts,
hand-written bytes), never from the session under test.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pycrdt import Array, Doc, Map, Text, handle_sync_message

from crdtsync.errors import MalformedMessage, MessageTooLarge, ProtocolError
from crdtsync.protocol import (
    AwarenessEntry,
    AwarenessMessage,
    ExtAck,
    ExtHello,
    ExtRefused,
    ExtUpdate,
    PermissionDenied,
    QueryAwareness,
    SyncStep1,
    SyncStep2,
    SyncUpdate,
    decode_message,
    encode_awareness,
)
from crdtsync.sync import (
    Acknowledged,
    AwarenessQueried,
    AwarenessReceived,
    Event,
    ExtensionsConfirmed,
    Failed,
    PermissionRefused,
    StateRequested,
    SyncSession,
    UpdateReceived,
    split_update,
)
from crdtsync.updates import check_update

REMOTE = "remote"  # transaction origin of applied remote updates


@dataclass
class Peer:
    """One side: a session and the Doc it answers from and applies to."""

    name: str
    session: SyncSession
    doc: Doc
    events: list[Event] = field(default_factory=list)
    received: list[bytes] = field(default_factory=list)  # frames that reached this side
    applying_remote: bool = False

    def handle(self) -> None:
        for event in self.session.events_received():
            self.events.append(event)
            if isinstance(event, StateRequested):
                self.session.answer_state_request(self.doc.get_update(event.state_vector))
            elif isinstance(event, UpdateReceived):
                self.applying_remote = True
                try:
                    with self.doc.transaction(origin=REMOTE):
                        self.doc.apply_update(event.update)
                finally:
                    self.applying_remote = False

    def stream_local_edits(self) -> None:
        """Send every local transaction as it happens (never the ones we applied)."""

        def on_transaction(event) -> None:
            if not self.applying_remote:
                self.session.send_update(event.update)

        self._subscription = self.doc.observe(on_transaction)


class SessionPair:
    """Two sessions wired back to back in memory."""

    def __init__(self, a: Peer, b: Peer) -> None:
        self.a = a
        self.b = b

    @classmethod
    def of_docs(cls, doc_a: Doc, doc_b: Doc, **session_args) -> SessionPair:
        return cls(
            Peer("a", SyncSession(**session_args), doc_a),
            Peer("b", SyncSession(**session_args), doc_b),
        )

    def pump(self, max_rounds: int = 50) -> int:
        """Move frames both ways until neither side has anything to send; return the count."""
        moved = 0
        for _ in range(max_rounds):
            from_a = self.a.session.data_to_send()
            from_b = self.b.session.data_to_send()
            if not from_a and not from_b:
                return moved
            for receiver, frames in ((self.b, from_a), (self.a, from_b)):
                for frame in frames:
                    receiver.received.append(frame)
                    receiver.session.receive_data(frame)
                    moved += 1
                receiver.handle()
        raise AssertionError(f"sessions still talking after {max_rounds} rounds")

    def sync(self) -> int:
        self.a.session.send_step1(self.a.doc.get_state())
        self.b.session.send_step1(self.b.doc.get_state())
        return self.pump()


def text_of(doc: Doc, name: str = "notes") -> str:
    return str(doc.get(name, type=Text))


def make_update(client_id: int, text: str, root: str = "notes") -> bytes:
    doc = Doc(client_id=client_id)
    doc.get(root, type=Text).insert(0, text)
    return doc.get_update()


def received(session: SyncSession, *frames: bytes | str) -> list[Event]:
    for frame in frames:
        session.receive_data(frame)
    return session.events_received()


def only_failure(events: list[Event]) -> Failed:
    assert len(events) == 1, events
    (event,) = events
    assert isinstance(event, Failed), event
    return event


# -- convergence ------------------------------------------------------------------------------


def test_two_documents_converge_through_step1_and_step2() -> None:
    doc_a, doc_b = Doc(client_id=1), Doc(client_id=2)
    doc_a.get("notes", type=Text).insert(0, "written on A")
    doc_b.get("meta", type=Map)["owner"] = "B"
    doc_a.get("log", type=Array).append("marker-a")
    doc_b.get("log", type=Array).append("marker-b")
    pair = SessionPair.of_docs(doc_a, doc_b)
    assert text_of(doc_b) == ""  # premise: B lacks A's text, A lacks B's map
    assert doc_a.get("meta", type=Map).to_py() == {}

    pair.sync()

    for doc in (doc_a, doc_b):
        assert text_of(doc) == "written on A"
        assert doc.get("meta", type=Map).to_py() == {"owner": "B"}
        assert sorted(doc.get("log", type=Array).to_py()) == ["marker-a", "marker-b"]
    assert doc_a.get("log", type=Array).to_py() == doc_b.get("log", type=Array).to_py()
    assert pair.a.session.synced is True
    assert pair.b.session.synced is True
    assert pair.a.session.failure is None
    assert pair.b.session.failure is None


def test_step1_is_answered_by_exactly_one_step2() -> None:
    pair = SessionPair.of_docs(Doc(client_id=1), Doc(client_id=2))
    pair.a.doc.get("notes", type=Text).insert(0, "abc")
    pair.b.session.send_step1(pair.b.doc.get_state())
    pair.pump()
    # B asked with an empty state vector; A answers with its whole document
    assert pair.b.received == [SyncStep2(pair.a.doc.get_update(b"\x00")).encode()]
    assert [type(e) for e in pair.a.events] == [StateRequested]
    assert pair.a.events[0] == StateRequested(b"\x00")


def test_second_sync_sends_only_empty_answers() -> None:
    pair = SessionPair.of_docs(Doc(client_id=1), Doc(client_id=2))
    pair.a.doc.get("notes", type=Text).insert(0, "abc")
    pair.b.doc.get("other", type=Text).insert(0, "xyz")
    pair.sync()
    pair.a.received.clear()
    pair.b.received.clear()

    pair.sync()

    empty_answer = b"\x00\x01\x02\x00\x00"  # step 2 carrying the empty update
    assert pair.a.received == [SyncStep1(pair.b.doc.get_state()).encode(), empty_answer]
    assert pair.b.received == [SyncStep1(pair.a.doc.get_state()).encode(), empty_answer]


def test_step2_matches_what_pycrdt_answers() -> None:
    doc = Doc(client_id=9)
    doc.get("notes", type=Text).insert(0, "hello")
    asker = Doc(client_id=10)
    session = SyncSession()
    (event,) = received(session, SyncStep1(asker.get_state()).encode())
    assert isinstance(event, StateRequested)
    session.answer_state_request(doc.get_update(event.state_vector))
    # pycrdt's handler takes the sync message without its leading message type
    pycrdt_answer = handle_sync_message(SyncStep1(asker.get_state()).encode()[1:], doc)
    assert session.data_to_send() == [pycrdt_answer]


def test_local_edits_stream_to_the_peer_after_sync() -> None:
    pair = SessionPair.of_docs(Doc(client_id=1), Doc(client_id=2))
    pair.a.stream_local_edits()
    pair.b.stream_local_edits()
    pair.sync()
    pair.a.doc.get("notes", type=Text).insert(0, "hello")
    pair.pump()
    pair.b.doc.get("notes", type=Text).insert(5, " world")
    pair.pump()
    assert text_of(pair.a.doc) == "hello world"
    assert text_of(pair.b.doc) == "hello world"


def test_applied_remote_update_is_not_sent_back() -> None:
    pair = SessionPair.of_docs(Doc(client_id=1), Doc(client_id=2))
    pair.a.stream_local_edits()
    pair.b.stream_local_edits()
    pair.a.doc.get("notes", type=Text).insert(0, "once")
    frames = pair.pump()
    assert frames == 1  # A's update went to B, and B sent nothing back
    assert text_of(pair.b.doc) == "once"
    assert pair.a.received == []


def test_update_received_reports_its_clocks() -> None:
    session = SyncSession()
    update = make_update(77, "hello")
    (event,) = received(session, SyncUpdate(update).encode())
    assert event == UpdateReceived(update, check_update(update), key=None, answer=False)
    assert event.info.state == {77: 5}


def test_step2_from_a_writer_is_an_answer() -> None:
    session = SyncSession()
    update = make_update(77, "hello")
    (event,) = received(session, SyncStep2(update).encode())
    assert isinstance(event, UpdateReceived)
    assert event.answer is True
    assert event.update == update
    assert session.synced is True


# -- extensions --------------------------------------------------------------------------------


def test_send_hello_needs_extensions() -> None:
    with pytest.raises(RuntimeError, match=r"^send_hello\(\) on a session without extensions$"):
        SyncSession().send_hello()


def test_send_hello_sends_the_extension_confirmation() -> None:
    session = SyncSession(extensions=True)
    session.send_hello()
    assert session.data_to_send() == [b"\x64\x00\x01"]


@pytest.mark.parametrize(
    "message",
    [ExtHello(), ExtUpdate(1, make_update(5, "x")), ExtAck(3)],
    ids=lambda m: type(m).__name__,
)
def test_extension_message_to_a_stock_session_fails_with_1002(message) -> None:
    session = SyncSession(extensions=False)
    failure = only_failure(received(session, message.encode()))
    assert failure.close_code == 1002
    assert type(failure.error) is ProtocolError
    name = type(message).__name__
    assert failure.reason == (f"crdtsync extension message {name} without asking for extensions")
    assert session.failure == failure
    assert session.data_to_send() == []


def test_acknowledge_sends_nothing_without_extensions() -> None:
    session = SyncSession(extensions=False)
    session.acknowledge(7)
    assert session.data_to_send() == []


def test_acknowledge_sends_an_ack_with_extensions() -> None:
    session = SyncSession(extensions=True)
    session.acknowledge(7)
    session.acknowledge(300)
    assert session.data_to_send() == [b"\x64\x02\x07", b"\x64\x02\xac\x02"]


def test_keyed_update_needs_extensions() -> None:
    with pytest.raises(RuntimeError, match=r"^an acknowledged update needs extensions$"):
        SyncSession().send_update(make_update(5, "x"), key=1)


def test_keyed_update_is_acknowledged_through_the_pair() -> None:
    replica = Peer("replica", SyncSession(extensions=True), Doc(client_id=1))
    relay = Peer("relay", SyncSession(extensions=True), Doc(client_id=2))
    pair = SessionPair(replica, relay)
    relay.session.send_hello()
    update = make_update(1, "keep me")
    replica.session.send_update(update, key=41)
    pair.pump()
    assert replica.events == [ExtensionsConfirmed(1)]
    assert relay.events == [UpdateReceived(update, check_update(update), key=41)]
    assert text_of(relay.doc) == "keep me"

    relay.session.acknowledge(41)  # the adapter says: stored durably
    pair.pump()
    assert replica.events == [ExtensionsConfirmed(1), Acknowledged(41)]


# -- permissions -----------------------------------------------------------------------------

READ_ONLY_FRAME = b"\x02\x00\x21read-only access to this document"


def test_read_only_peer_updates_are_dropped_with_one_permission_denied() -> None:
    session = SyncSession(can_write=False)
    for n in range(3):
        assert received(session, SyncUpdate(make_update(5, f"sneaky {n}")).encode()) == []
    assert session.failure is None  # the connection stays open: a stock client would loop
    assert session.writes_dropped == 3
    assert session.data_to_send() == [READ_ONLY_FRAME]  # said once
    assert decode_message(READ_ONLY_FRAME) == PermissionDenied("read-only access to this document")
    (event,) = received(session, SyncStep1(b"\x00").encode())
    assert event == StateRequested(b"\x00")


def test_read_only_peer_keyed_updates_are_each_refused() -> None:
    session = SyncSession(can_write=False, extensions=True)
    assert received(session, ExtUpdate(1, make_update(5, "x")).encode()) == []
    assert received(session, ExtUpdate(2, make_update(5, "y")).encode()) == []
    assert session.failure is None
    assert [decode_message(f) for f in session.data_to_send()] == [
        ExtRefused(1, "read-only access to this document", False),
        ExtRefused(2, "read-only access to this document", False),
    ]


def test_read_only_peer_step2_answer_is_dropped_without_failure() -> None:
    session = SyncSession(can_write=False)
    events = received(session, SyncStep2(make_update(5, "offline edit")).encode())
    assert events == []
    assert session.failure is None
    assert session.data_to_send() == []
    assert session.synced is True
    # and the session keeps serving the reader
    (event,) = received(session, SyncStep1(b"\x00").encode())
    assert event == StateRequested(b"\x00")


def test_read_only_reader_still_gets_the_document() -> None:
    writer = Peer("relay", SyncSession(can_write=False), Doc(client_id=1))
    reader = Peer("reader", SyncSession(), Doc(client_id=2))
    writer.doc.get("notes", type=Text).insert(0, "read me")
    reader.doc.get("draft", type=Text).insert(0, "mine")  # the reader's own offline edit
    pair = SessionPair(writer, reader)
    pair.sync()
    assert text_of(reader.doc) == "read me"
    assert text_of(writer.doc, "draft") == ""  # the reader's answer was dropped, not applied
    assert [type(e) for e in writer.events] == [StateRequested]
    assert writer.session.failure is None


def test_permission_denied_from_the_relay_is_reported() -> None:
    session = SyncSession()
    events = received(session, PermissionDenied("token expired").encode())
    assert events == [PermissionRefused("token expired")]


def test_deny_sends_permission_denied_frame() -> None:
    session = SyncSession()
    session.deny("no")
    assert session.data_to_send() == [b"\x02\x00\x02no"]


# -- refused input -----------------------------------------------------------------------------


def test_text_frame_fails_with_1003() -> None:
    session = SyncSession()
    failure = only_failure(received(session, "hello"))
    assert failure.close_code == 1003
    assert failure.reason == "text frames are not part of the y-websocket protocol"


def test_oversized_frame_fails_with_1009() -> None:
    session = SyncSession(max_message_bytes=10)
    failure = only_failure(received(session, SyncUpdate(make_update(5, "too long")).encode()))
    assert failure.close_code == 1009
    assert type(failure.error) is MessageTooLarge


def test_malformed_update_fails_with_1007_naming_the_update() -> None:
    session = SyncSession()
    truncated = make_update(5, "hello")[:-3]
    failure = only_failure(received(session, SyncUpdate(truncated).encode()))
    assert failure.close_code == 1007
    assert type(failure.error) is MalformedMessage
    assert failure.reason.startswith("invalid update: update truncated")


def test_garbage_state_vector_fails_before_anyone_diffs_with_it() -> None:
    session = SyncSession()
    failure = only_failure(received(session, SyncStep1(b"\x05\x01").encode()))
    assert failure.close_code == 1007
    assert failure.reason == "state vector declares 5 clients in 2 bytes"


def test_truncated_frame_fails_with_1007() -> None:
    session = SyncSession()
    failure = only_failure(received(session, b"\x00\x02\x10\x01"))
    assert failure.close_code == 1007
    assert failure.reason == "sync update declares 16 bytes, 1 present"


def test_input_after_a_failure_is_ignored() -> None:
    session = SyncSession()
    failure = only_failure(received(session, "text"))
    good = SyncUpdate(make_update(5, "late")).encode()
    assert received(session, good, SyncStep1(b"\x00").encode(), b"\xff") == []
    assert session.data_to_send() == []
    assert session.failure == failure
    assert session.messages_received == 0


def test_only_the_first_failure_is_kept() -> None:
    session = SyncSession()
    session.receive_data(b"\x04")
    session.fail(ProtocolError("second"), 1002)
    (failure,) = session.events_received()
    assert failure.reason == "unknown message type 4"
    assert session.failure == failure


def test_failure_reason_fits_a_close_frame() -> None:
    session = SyncSession()
    session.fail(ProtocolError("é" * 200))
    (failure,) = session.events_received()
    assert failure.reason == "é" * 60 + "..."
    assert len(failure.reason.encode()) == 123
    assert failure.close_code == 1002


# -- awareness ----------------------------------------------------------------------------------


def test_awareness_is_reported_with_its_entries() -> None:
    entries = [AwarenessEntry(5, 1, {"name": "Zoë"}), AwarenessEntry(6, 2, None)]
    payload = encode_awareness(entries)
    session = SyncSession()
    assert received(session, AwarenessMessage(payload).encode()) == [
        AwarenessReceived(payload, entries)
    ]


def test_malformed_awareness_fails_with_1007() -> None:
    session = SyncSession()
    failure = only_failure(received(session, AwarenessMessage(b"\x01\x05\x02\x01{").encode()))
    assert failure.close_code == 1007
    assert failure.reason == "awareness state of client 5 is not JSON"


def test_query_awareness_is_reported() -> None:
    session = SyncSession()
    assert received(session, QueryAwareness().encode()) == [AwarenessQueried()]


# -- splitting large answers ---------------------------------------------------------------------


def chain_of_clients(count: int, chars: int = 150) -> tuple[bytes, str, dict[str, str]]:
    """An update written by ``count`` clients in turn, each building on the one before.

    Returns the whole update, the expected text of root "notes" (from a plain string
    model) and the expected map "who".
    """
    model = ""
    who: dict[str, str] = {}
    previous: Doc | None = None
    for i in range(count):
        doc = Doc(client_id=1000 + i)
        if previous is not None:
            doc.apply_update(previous.get_update())
        text = doc.get("notes", type=Text)
        piece = f"<{i}:" + chr(ord("a") + i) * chars + ">"
        text.insert(len(model), piece)
        model += piece
        if i == 3:
            del text[0:10]  # a delete of another client's content: in every piece's delete set
            model = model[10:]
        doc.get("who", type=Map)[f"c{i}"] = f"client {i}"
        who[f"c{i}"] = f"client {i}"
        previous = doc
    assert previous is not None
    return previous.get_update(), model, who


def apply_all(updates) -> Doc:
    doc = Doc()
    for update in updates:
        doc.apply_update(update)
    return doc


def test_small_update_is_one_piece() -> None:
    update = make_update(5, "small")
    assert split_update(update, len(update)) == [update]


def test_large_single_client_update_stays_whole() -> None:
    update = make_update(5, "x" * 2000)
    assert split_update(update, 100) == [update]


def test_split_multi_client_update_fits_and_converges_in_any_order() -> None:
    update, expected_text, expected_who = chain_of_clients(6)
    max_bytes = 400
    assert len(update) > max_bytes  # premise: there is something to split
    whole = apply_all([update])
    assert text_of(whole) == expected_text
    assert whole.get("who", type=Map).to_py() == expected_who

    pieces = split_update(update, max_bytes)

    assert len(pieces) >= 3
    assert [len(p) for p in pieces if len(p) > max_bytes] == []
    orders = 0
    for order in itertools.permutations(pieces):
        doc = apply_all(order)
        assert text_of(doc) == expected_text, order
        assert doc.get("who", type=Map).to_py() == expected_who
        orders += 1
    assert orders == len(list(itertools.permutations(range(len(pieces)))))


def test_split_pieces_converge_in_shuffled_order_for_many_clients() -> None:
    update, expected_text, expected_who = chain_of_clients(12, chars=60)
    pieces = split_update(update, 200)
    assert len(pieces) >= 6  # small neighbours are packed together, yet many pieces remain
    assert max(len(p) for p in pieces) <= 200
    rng = random.Random(20240611)
    for _ in range(40):
        shuffled = pieces[:]
        rng.shuffle(shuffled)
        doc = apply_all(shuffled)
        assert text_of(doc) == expected_text
        assert doc.get("who", type=Map).to_py() == expected_who


def test_split_diff_against_a_state_vector_completes_the_askers_document() -> None:
    # the realistic answer: only what the asker lacks, so most clients start past clock 0
    writers = [Doc(client_id=2000 + i) for i in range(5)]
    asker = Doc(client_id=1)
    for round_ in range(2):
        for i, doc in enumerate(writers):
            for other in writers:
                doc.apply_update(other.get_update())
            text = doc.get("notes", type=Text)
            text.insert(len(str(text)), f"[{round_}.{i}" + "z" * 80 + "]")
        if round_ == 0:
            for doc in writers:
                asker.apply_update(doc.get_update())
    full = writers[-1]
    for doc in writers:
        full.apply_update(doc.get_update())
    expected = text_of(full)
    diff = full.get_update(asker.get_state())
    info = check_update(diff)
    assert len(info.starts) == 5  # premise: a real diff, every client starts past clock 0
    assert min(info.starts.values()) > 0
    assert len(diff) > 300

    pieces = split_update(diff, 300, info)

    assert len(pieces) >= 2
    assert max(len(p) for p in pieces) <= 300
    for order in itertools.permutations(pieces):
        doc = Doc()
        doc.apply_update(asker.get_update())
        for piece in order:
            doc.apply_update(piece)
        assert text_of(doc) == expected


def test_split_keeps_an_oversized_client_as_one_piece() -> None:
    big = Doc(client_id=50)
    big.get("notes", type=Text).insert(0, "B" * 2000)
    small = Doc(client_id=51)
    small.get("other", type=Text).insert(0, "s" * 50)
    tiny = Doc(client_id=52)
    tiny.get("third", type=Text).insert(0, "t" * 50)
    for d in (small, tiny):
        big.apply_update(d.get_update())
    update = big.get_update()

    pieces = split_update(update, 500)

    oversized = [p for p in pieces if len(p) > 500]
    assert len(oversized) == 1
    assert check_update(oversized[0]).state == {50: 2000}
    rng = random.Random(7)
    rng.shuffle(pieces)
    doc = apply_all(pieces)
    assert text_of(doc) == "B" * 2000
    assert text_of(doc, "other") == "s" * 50
    assert text_of(doc, "third") == "t" * 50


def test_answer_puts_last_piece_as_step2_and_earlier_as_updates() -> None:
    update, expected_text, _ = chain_of_clients(6)
    relay = SyncSession(answer_piece_bytes=400)
    relay.answer_state_request(update)
    frames = relay.data_to_send()

    messages = [decode_message(f) for f in frames]
    assert len(messages) >= 3
    assert [type(m) for m in messages] == [SyncUpdate] * (len(messages) - 1) + [SyncStep2]
    assert all(len(m.update) <= 400 for m in messages)
    assert text_of(apply_all(m.update for m in messages)) == expected_text

    # the asker is marked synced on step 2, and by then it has everything
    asker = Peer("asker", SyncSession(), Doc(client_id=9))
    for frame in frames[:-1]:
        asker.session.receive_data(frame)
        asker.handle()
        assert asker.session.synced is False
    asker.session.receive_data(frames[-1])
    asker.handle()
    assert asker.session.synced is True
    assert text_of(asker.doc) == expected_text
    assert [e.answer for e in asker.events] == [False] * (len(frames) - 1) + [True]


def test_small_answer_is_one_step2() -> None:
    update = make_update(5, "small")
    session = SyncSession()
    session.answer_state_request(update)
    assert session.data_to_send() == [b"\x00\x01" + bytes((len(update),)) + update]


# -- garbage in: events or Failed, never an exception ---------------------------------------------

_PREFIXES = [b"\x00\x00", b"\x00\x01", b"\x00\x02", b"\x01", b"\x02\x00", b"\x03", b"\x64\x01"]


@settings(max_examples=200, deadline=None)
@given(
    frames=st.lists(
        st.one_of(
            st.binary(max_size=40),
            st.tuples(st.sampled_from(_PREFIXES), st.binary(max_size=40)).map(b"".join),
        ),
        min_size=1,
        max_size=4,
    ),
    can_write=st.booleans(),
    extensions=st.booleans(),
)
def test_random_frames_never_raise_out_of_the_session(
    frames: list[bytes], can_write: bool, extensions: bool
) -> None:
    session = SyncSession(can_write=can_write, extensions=extensions, max_message_bytes=60)
    events: list[Event] = []
    for frame in frames:
        session.receive_data(frame)
        events.extend(session.events_received())
    failures = [e for e in events if isinstance(e, Failed)]
    assert len(failures) <= 1
    if failures:
        assert events[-1] is failures[0]  # nothing is reported after a failure
        assert failures[0].close_code in (1002, 1003, 1007, 1008, 1009)
