"""One document's sync protocol as a replica runs it (crdtsync.docsync): no socket, no loop.

The relay's side is written by hand with a relay-side SyncSession; the replica's side is
a DocumentSync over a pycrdt Doc, fed events and a clock.
"""

from __future__ import annotations

import os
from typing import Any

import pytest
from pycrdt import Doc, Text, get_update, merge_updates

from crdtsync.docsync import (
    DEFER_S,
    MAX_RECLAIMS,
    AckOrder,
    DocumentSync,
    HeldUpdates,
    split_clients,
)
from crdtsync.integrity import client_id_of_key
from crdtsync.protocol import (
    ExtAck,
    ExtClaim,
    ExtHello,
    ExtRefused,
    ExtUpdate,
    SyncStep1,
    SyncStep2,
    SyncUpdate,
    decode_message,
)
from crdtsync.sync import SyncSession
from crdtsync.updates import check_update


class Host:
    """The document side, recording what the sync asked of it."""

    def __init__(self) -> None:
        key = os.urandom(32)
        self.client = client_id_of_key(key)
        self.key = key
        self.doc: Doc[Any] = Doc(client_id=self.client)
        self.confirmed: list[int] = []
        self.refusals: list[str] = []
        self.denials: list[str] = []
        self.synced_count = 0
        self.decided_count = 0
        self.applied: list[bytes] = []

    def state(self) -> bytes:
        return self.doc.get_state()

    def update_since(self, state: bytes) -> bytes:
        return self.doc.get_update(state)

    def admit_and_apply(self, update: bytes, info: Any) -> set[int]:
        self.applied.append(update)
        self.doc.apply_update(update)
        return set()

    def apply_known(self, update: bytes) -> None:
        self.doc.apply_update(update)

    def claims(self) -> tuple[dict[int, bytes], frozenset[int]]:
        return {self.client: self.key}, frozenset()

    def confirm(self, seqs: list[int]) -> None:
        self.confirmed.extend(seqs)

    def decided(self) -> None:
        self.decided_count += 1

    def synced(self) -> None:
        self.synced_count += 1

    def refused(self, reason: str) -> None:
        self.refusals.append(reason)

    def denied(self, reason: str) -> None:
        self.denials.append(reason)


class Link:
    """A DocumentSync and the relay's messages to it, delivered in any order."""

    def __init__(self, pending: list[int] | None = None) -> None:
        self.host = Host()
        self.pending = list(pending or [])
        self.order = AckOrder(lambda: self.pending)
        self.session = SyncSession(extensions=True)
        self.sync = DocumentSync(self.session, self.host, self.order, HeldUpdates())
        self.now = 0.0
        self.sync.start()

    def deliver(self, *frames: bytes) -> None:
        for frame in frames:
            self.session.receive_data(frame)
            for event in self.session.events_received():
                self.sync.handle(event, self.now)

    def sent(self) -> list[Any]:
        return [decode_message(f) for f in self.session.data_to_send()]

    def edit(self, text: str, seq: int) -> bytes:
        before = self.host.doc.get_state()
        t = self.host.doc.get("text", type=Text)
        t.insert(len(t), text)
        update = self.host.doc.get_update(before)
        self.pending.append(seq)
        self.order.added(seq)
        self.sync.local(seq, update)
        return update


HELLO = ExtHello(1).encode()
EMPTY_STATE = Doc().get_state()


def step1(state: bytes = EMPTY_STATE) -> bytes:
    return SyncStep1(state).encode()


def test_hello_first_turns_acknowledgements_on_and_claims_come_before_content() -> None:
    link = Link()
    assert isinstance(link.sent()[0], SyncStep1)  # the link asks at once
    link.edit("x", 1)
    assert link.sent() == []  # undecided: the answer to the relay's step 1 carries it
    link.deliver(HELLO, step1())
    assert link.sync.acks is True
    assert link.host.decided_count == 1
    claim, catch_up = link.sent()
    assert claim == ExtClaim(((link.host.client, link.host.key),))
    assert isinstance(catch_up, ExtUpdate)
    assert link.sync.in_flight == {catch_up.key: [1]}
    link.deliver(_ack(catch_up.key))
    assert link.host.confirmed == [1]
    assert link.sync.waiting_for_acks is False


def test_a_relay_whose_first_message_is_not_the_hello_never_acknowledges() -> None:
    link = Link()
    link.sent()
    link.edit("x", 1)
    link.deliver(step1())  # the reference server: step 1 first, never a hello
    assert link.sync.acks is False
    (answer,) = link.sent()
    assert isinstance(answer, SyncStep2)  # unkeyed, no claim
    link.edit("y", 2)
    (update,) = link.sent()
    assert isinstance(update, SyncUpdate)
    assert link.sync.in_flight == {}


def test_a_late_hello_claims_and_covers_what_went_unkeyed_with_one_catch_up() -> None:
    link = Link(pending=[])
    link.sent()
    link.edit("offline", 7)
    link.deliver(step1())  # a reordering path: step 1 overtook the hello
    assert link.sync.acks is False
    link.sent()
    link.deliver(HELLO)
    assert link.sync.acks is True
    assert link.host.decided_count == 2
    claim, catch_up = link.sent()
    assert isinstance(claim, ExtClaim)
    assert isinstance(catch_up, ExtUpdate)
    assert link.sync.in_flight[catch_up.key] == [7]
    assert b"offline" in catch_up.update


def test_acknowledgements_confirm_in_order_only() -> None:
    order = AckOrder(lambda: [1, 2, 3])
    assert order.acknowledge([3]) == []  # the second never arrived: nobody can integrate 3
    assert order.acknowledge([1]) == [1]
    assert order.acknowledge([1]) == []  # a duplicated acknowledgement changes nothing
    assert order.acknowledge([2]) == [2, 3]
    assert order.pending() == []
    order.added(4)
    assert order.pending() == [4]


def test_order_loads_pending_transactions_once_and_only_when_needed() -> None:
    loads = []

    def load() -> list[int]:
        loads.append(1)
        return [5]

    order = AckOrder(load)
    order.added(6)  # not loaded yet: the file has it already
    assert loads == []
    assert order.pending() == [5]
    assert order.pending() == [5]
    assert loads == [1]


def test_unproven_refusal_claims_again_and_resends_a_bounded_number_of_times() -> None:
    link = Link()
    link.sent()
    link.deliver(HELLO, step1())
    link.sent()
    link.edit("x", 1)
    (last,) = link.sent()
    for _ in range(MAX_RECLAIMS):
        link.deliver(_refused(last.key, unproven=True))
        claim, last = link.sent()
        assert isinstance(claim, ExtClaim)
        assert isinstance(last, ExtUpdate)
        assert link.sync.in_flight == {last.key: [1]}
    link.deliver(_refused(last.key, unproven=True))
    assert link.sent() == []  # no more: it is reported, and stays pending
    assert len(link.host.refusals) == 1
    assert link.sync.in_flight == {}
    assert link.host.confirmed == []


def test_unproven_refusal_before_the_relays_step_1_leaves_the_content_to_the_answer() -> None:
    link = Link()
    link.sent()
    link.deliver(HELLO)
    link.sent()
    link.edit("x", 1)
    (update,) = link.sent()
    link.deliver(_refused(update.key, unproven=True))
    (claim,) = link.sent()
    assert isinstance(claim, ExtClaim)
    link.deliver(step1())
    (catch_up,) = link.sent()
    assert link.sync.in_flight == {catch_up.key: [1]}


def test_a_plain_refusal_is_reported_and_the_edit_stays_pending() -> None:
    link = Link()
    link.sent()
    link.deliver(HELLO, step1())
    link.sent()
    link.edit("x", 1)
    (update,) = link.sent()
    link.deliver(_refused(update.key, unproven=False))
    assert link.host.refusals == ["nope"]
    assert link.order.pending() == [1]


def test_an_update_after_a_gap_is_held_until_the_gap_is_filled_then_applied_in_order() -> None:
    writer: Doc[Any] = Doc(client_id=4242)
    text = writer.get("text", type=Text)
    parts = []
    for ch in "abc":
        before = writer.get_state()
        text.insert(len(text), ch)
        parts.append(writer.get_update(before))
    link = Link()
    link.sent()
    link.deliver(HELLO, step1())
    link.sent()
    link.deliver(SyncStep2(b"\x00\x00").encode())  # our step 1 answered: nothing yet
    assert link.sync.resyncing is False
    link.deliver(SyncUpdate(parts[2]).encode(), SyncUpdate(parts[1]).encode())
    assert len(link.sync.held) == 2
    assert str(link.host.doc.get("text", type=Text)) == ""
    (ask,) = link.sent()  # asked once, not once per held update
    assert isinstance(ask, SyncStep1)
    link.deliver(SyncUpdate(parts[0]).encode())
    assert str(link.host.doc.get("text", type=Text)) == "abc"
    assert len(link.sync.held) == 0


def test_a_delete_set_beside_only_gapped_content_applies_at_once() -> None:
    """The answer to a replica that missed a delete, from a relay that keeps a gapped
    update (a stock client's, never filled): the gapped client's content and the delete
    set, nothing else. The content waits for its gap; the delete applies now."""
    link = Link()
    link.sent()
    link.deliver(HELLO, step1())
    link.sent()
    link.edit("hello", 1)
    link.sent()
    gapped_writer: Doc[Any] = Doc(client_id=4242)
    gapped_text = gapped_writer.get("text", type=Text)
    gapped_text.insert(0, "z")
    after_first = gapped_writer.get_state()
    gapped_text.insert(1, "z")
    other: Doc[Any] = Doc()
    other.apply_update(link.host.doc.get_update())
    before = other.get_state()
    del other.get("text", type=Text)[0:1]  # another replica's delete, stored
    # The relay's store as it answers (merged updates: a Doc would not encode the gap).
    stored = merge_updates(
        link.host.doc.get_update(),
        gapped_writer.get_update(after_first),  # clock 1 without clock 0
        other.get_update(before),
    )
    answer = get_update(stored, link.host.doc.get_state())
    info = check_update(answer)
    assert set(info.starts) == {4242}  # the premise: only the gapped content ...
    assert info.deletes  # ... and the delete set
    link.deliver(SyncStep2(answer).encode())
    assert str(link.host.doc.get("text", type=Text)) == "ello"
    assert len(link.sync.held) == 1  # the gapped content still waits
    assert link.host.applied
    assert not check_update(link.host.applied[-1]).state  # the delete set alone


def test_held_updates_are_bounded_in_count_and_bytes() -> None:
    held = HeldUpdates(limit=2)
    info = check_update(Doc().get_update())
    assert held.hold(b"1", info)
    assert held.hold(b"2", info)
    assert not held.hold(b"3", info)
    assert len(held) == 2
    sized = HeldUpdates(limit=100, max_bytes=10)
    assert sized.hold(b"x" * 6, info)
    assert not sized.hold(b"y" * 6, info)  # 12 bytes > 10
    assert sized.hold(b"z" * 4, info)
    assert len(sized.take_ready({})) == 2  # (no starts: ready at once) and the room is back
    assert sized.hold(b"w" * 10, info)


def test_a_transaction_acknowledged_twice_is_confirmed_once_and_forgotten() -> None:
    order = AckOrder(lambda: [1, 2])
    assert order.acknowledge([1, 2]) == [1, 2]
    assert order.acknowledge([1, 2]) == []  # a second update carried them too
    order.added(2)  # (a late notice of a transaction already loaded from the file)
    order.added(3)
    assert order.pending() == [3]
    assert order.acknowledge([3]) == [3]
    assert order._acked == set()


def test_a_flood_of_step_1s_is_answered_at_a_bounded_rate_and_the_latest_once_later() -> None:
    link = Link()
    link.sent()
    link.deliver(HELLO, step1())
    link.sent()
    link.edit("x", 1)
    link.sent()
    states = []
    for i in range(50):
        other: Doc[Any] = Doc(client_id=1000 + i)
        other.get("text", type=Text).insert(0, "z")
        states.append(other.get_state())
        link.deliver(step1(states[-1]))
    answered = len(link.sent())
    assert answered <= 5  # the bucket's burst
    assert link.sync.timer_wanted
    assert link.sync.relay_state == states[-1]
    link.now += DEFER_S
    link.sync.run_deferred()
    (late,) = link.sent()
    assert isinstance(late, ExtUpdate)  # once, for the latest request
    assert link.sync.timer_wanted is False


def test_split_clients_keeps_the_rest_applicable() -> None:
    a: Doc[Any] = Doc(client_id=1)
    a.get("text", type=Text).insert(0, "aa")
    b: Doc[Any] = Doc(client_id=2)
    b.apply_update(a.get_update())
    b.get("text", type=Text).insert(2, "bb")
    update = b.get_update()
    info = check_update(update)
    part, rest = split_clients(update, info, {2})
    assert rest is not None
    assert set(check_update(part).state) == {2}
    assert set(check_update(rest).state) == {1}
    assert split_clients(update, info, {1, 2}) == (update, None)


@pytest.mark.parametrize("first", ["hello", "step1"])
def test_local_edits_before_the_relay_spoke_wait_for_the_catch_up(first: str) -> None:
    link = Link()
    link.sent()
    link.edit("a", 1)
    link.edit("b", 2)
    assert link.sent() == []
    link.deliver(HELLO if first == "hello" else step1())
    if first == "hello":
        link.deliver(step1())
    sent = link.sent()
    updates = [m for m in sent if isinstance(m, (ExtUpdate, SyncStep2))]
    assert len(updates) == 1  # one update carries both
    relay: Doc[Any] = Doc()
    relay.apply_update(updates[0].update)
    assert str(relay.get("text", type=Text)) == "ab"


def _ack(key: int) -> bytes:
    return ExtAck(key).encode()


def _refused(key: int, *, unproven: bool) -> bytes:
    return ExtRefused(key, "nope", unproven).encode()
