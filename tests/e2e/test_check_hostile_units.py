"""The pieces of the hostile check, without processes: content by id, the checker, the attacker.

The convergence check used to compare state vectors and delete sets only; a rewrite keeps
both equal while the documents differ. These tests pin what the checker now sees, and
that the hostile participant builds the attacks it claims to (the nested rewrite is the
pair pycrdt cannot apply).
"""

from __future__ import annotations

import asyncio
import random

import pytest
from pycrdt import Array, Doc, Map, Text, get_state

from crdtsync.protocol import decode_state_vector
from crdtsync.testing.checker import (
    EditRecord,
    ForeignWrite,
    check_history,
    converged,
    final_state,
    stored_conflicts,
)
from crdtsync.testing.content import compatible, read_units
from crdtsync.testing.hostile import Attacker, RoomView
from crdtsync.testing.worker import SyncWatch
from crdtsync.testing.workload import default_workload

WRITER = 4242


def transaction_updates(doc: Doc, *edits) -> list[bytes]:
    """Run each edit in its own transaction; return the updates."""
    updates: list[bytes] = []
    sub = doc.observe(lambda event: updates.append(event.update))
    for fn in edits:
        with doc.transaction():
            fn()
    doc.unobserve(sub)
    return updates


def any_object_update(entries: list[tuple[str, str]]) -> bytes:
    """One map entry ``m["k"]`` holding an Any object with ``entries`` in this order."""

    def string(text: str) -> bytes:
        raw = text.encode()
        return bytes([len(raw)]) + raw

    value = bytes([118, len(entries)]) + b"".join(
        string(key) + bytes([119]) + string(v) for key, v in entries
    )
    # 1 client block: 1 struct, client 7, clock 0; info 0x28 = Any content + parent sub;
    # parent info 1 = a root type's name; then 1 Any value; empty delete set.
    return bytes([1, 1, 7, 0, 0x28, 1]) + string("m") + string("k") + bytes([1]) + value + b"\0"


def test_an_item_reads_the_same_whole_or_split_and_after_a_delete():
    doc = Doc(client_id=WRITER)
    text = doc.get("text", type=Text)
    updates = transaction_updates(doc, lambda: text.insert(0, "ab"), lambda: text.insert(2, "c😀d"))
    as_sent = {k: v for u in updates for k, v in read_units(u).items()}
    whole = read_units(doc.get_update())  # pycrdt squashed the two inserts into one item
    assert set(whole) == set(as_sent)
    assert all(compatible(whole[k], as_sent[k]) for k in as_sent)
    del text[1:3]  # splits the item; the deleted part keeps its ids, not its value
    after = read_units(doc.get_update())
    assert all(compatible(after[k], as_sent[k]) for k in as_sent)


def test_any_objects_compare_by_value_regardless_of_key_order():
    a = read_units(any_object_update([("x", "1"), ("y", "2")]))
    b = read_units(any_object_update([("y", "2"), ("x", "1")]))
    c = read_units(any_object_update([("x", "1"), ("y", "3")]))
    assert compatible(a[(7, 0)], b[(7, 0)])
    assert not compatible(a[(7, 0)], c[(7, 0)])


def original_and_rewrite() -> tuple[Doc, bytes, bytes]:
    """A writer's text edit, and a hostile's different content at the same ids."""
    writer = Doc(client_id=WRITER)
    (original,) = transaction_updates(
        writer, lambda: writer.get("text", type=Text).insert(0, "hello")
    )
    forger = Doc(client_id=WRITER)
    (rewrite,) = transaction_updates(
        forger, lambda: forger.get("hostile-text", type=Text).insert(0, "XXXXX")
    )
    return writer, original, rewrite


def test_checker_names_the_hostile_content_that_replaced_an_acknowledged_edit():
    writer, original, rewrite = original_and_rewrite()
    victim = Doc()
    victim.apply_update(rewrite)
    victim.apply_update(original)  # pycrdt skips it: it holds those ids already
    finals = [
        final_state("replica-0", writer.get_update()),
        final_state("replica-1", victim.get_update()),
    ]
    assert finals[0].state_vector == finals[1].state_vector  # ids alone see nothing wrong
    assert not converged(finals[0], finals[1])
    edit = EditRecord.from_update("e1", "replica-0", 3, original, acknowledged=True)
    write = ForeignWrite.from_update("hostile-3", 5, "rewrite", WRITER, rewrite)
    violations = check_history([edit], finals, writes=[write])
    assert [v.kind for v in violations] == ["diverged", "lost-acknowledged"]
    assert "hold different content" in violations[0].message
    assert "content that hostile-3 wrote under client 4242 (rewrite at step 5)" in (
        violations[0].message
    )
    lost = violations[1].message
    assert lost.startswith("edit e1 (acknowledged by the relay on replica-0 at step 3)")
    assert "missing from replica-1" in lost
    assert "content that hostile-3 wrote under client 4242 (rewrite at step 5)" in lost
    assert "still present at replica-0" in lost


def test_a_store_holding_two_contents_for_one_id_is_a_violation():
    _, original, rewrite = original_and_rewrite()
    edit = EditRecord.from_update("e1", "replica-0", 3, original)
    write = ForeignWrite.from_update("hostile-3", 5, "rewrite", WRITER, rewrite)
    assert stored_conflicts("the store", [original, original]) == []
    (violation,) = stored_conflicts("the store", [original, rewrite], [edit], [write])
    assert violation.kind == "store-conflict"
    assert "the store holds two different contents for 4242:0..4" in violation.message
    assert "edit e1 of replica-0" in violation.message
    assert "hostile-3 wrote under client 4242" in violation.message


def view_of(*updates: bytes) -> RoomView:
    view = RoomView(own_client=999)
    for update in updates:
        assert view.receive(update) is None
    return view


def test_nested_rewrite_is_the_pair_pycrdt_cannot_apply():
    writer = Doc(client_id=WRITER)
    updates = transaction_updates(
        writer,
        lambda: writer.get("text", type=Text).insert(0, "abc"),
        lambda: writer.get("map", type=Map).__setitem__("k", 1),
    )
    attacker = Attacker(view_of(*updates), default_workload, random.Random(1))
    attack = attacker.next("rewrite", "nested")
    assert (attack.kind, attack.variant, attack.client) == ("rewrite", "nested", WRITER)
    assert attack.start is not None
    assert attack.start < 4 < attack.end  # it covers the writer's last clock and one more
    with pytest.raises(RuntimeError, match="must be deleted or shared ref type"):
        writer.apply_update(attack.updates[0])


def test_impersonation_writes_at_the_writers_next_clocks():
    writer = Doc(client_id=WRITER)
    updates = transaction_updates(writer, lambda: writer.get("text", type=Text).insert(0, "abc"))
    attack = Attacker(view_of(*updates), default_workload, random.Random(2)).next(
        "impersonate", "value"
    )
    assert (attack.kind, attack.client, attack.start) == ("impersonate", WRITER, 3)
    peer = Doc()
    peer.apply_update(updates[0])
    peer.apply_update(attack.updates[0])  # new clocks: accepted as the writer's own
    assert decode_state_vector(peer.get_state())[WRITER] == attack.end


def test_replay_sends_what_was_received_byte_for_byte():
    writer = Doc(client_id=WRITER)
    updates = transaction_updates(writer, lambda: writer.get("array", type=Array).append(1))
    attack = Attacker(view_of(*updates), default_workload, random.Random(3)).next("replay")
    assert attack.kind == "replay"
    assert attack.updates == updates


def test_gap_leaves_content_a_fresh_peer_cannot_integrate_until_filled():
    attacker = Attacker(view_of(), default_workload, random.Random(4))
    gap = attacker.next("gap")
    assert gap.kind == "gap"
    assert gap.variant in ("start", "skip")
    peer = Doc()
    for update in gap.updates:
        peer.apply_update(update)
    assert decode_state_vector(get_state(peer.get_update())).get(gap.client, 0) < gap.end
    for _ in range(50):  # a fill is drawn three times in ten
        fill = attacker.next("gap")
        if fill.variant == "fill" and fill.client == gap.client:
            break
    else:
        pytest.fail("no fill drawn in 50 gap attacks")
    peer.apply_update(fill.updates[0])
    assert decode_state_vector(peer.get_state())[gap.client] == gap.end


def test_an_attack_without_a_target_falls_back_to_an_honest_edit():
    attack = Attacker(view_of(), default_workload, random.Random(5)).next("rewrite")
    assert attack.kind == "honest"
    assert attack.note.startswith("no rewrite target yet")


def test_sync_watch_names_why_a_replica_stopped_syncing():
    async def main() -> tuple[str | None, str | None]:
        async def sync_loop() -> None:
            await asyncio.sleep(0)
            raise RuntimeError("Cannot apply update: block parent <1#0> must be deleted")

        task = asyncio.create_task(sync_loop(), name="crdtsync:team/doc")
        watch = SyncWatch("team/doc")
        assert watch.task is task  # found by the name Replica.open gives it
        before = watch.stopped(None)
        await asyncio.wait_for(watch.ended(), timeout=5)
        return before, watch.stopped("connection lost")

    before, after = asyncio.run(main())
    assert before is None
    assert after == "RuntimeError: Cannot apply update: block parent <1#0> must be deleted"


class _Replica:
    """What SyncWatch reads of a Replica: whether it multiplexes, its open documents."""

    def __init__(self) -> None:
        self._mux_supported: bool | None = None
        self._docs: dict[str, object] = {}


def test_sync_watch_follows_the_multiplexed_connection_and_a_fallback_to_one_per_document():
    async def main() -> list[str | None]:
        replica = _Replica()
        seen: list[str | None] = []
        watch = SyncWatch("team/doc", replica)  # before any sync task exists
        assert watch.task is None
        assert watch.stopped(None) is None
        fall_back = asyncio.Event()
        mux = asyncio.create_task(fall_back.wait(), name="crdtsync:mux")
        assert watch.task is mux  # looked up again: every document syncs through it
        seen.append(watch.stopped(None))
        # The relay does not multiplex: the connection task ends, and the document gets
        # a connection of its own (crdtsync:<document>). That is no stop.
        replica._mux_supported = False
        fall_back.set()
        await mux
        seen.append(watch.stopped(None))
        fail = asyncio.Event()

        async def own_connection() -> None:
            await fail.wait()
            raise RuntimeError("Cannot apply update")

        own = asyncio.create_task(own_connection(), name="crdtsync:team/doc")
        assert watch.task is own
        seen.append(watch.stopped(None))
        fail.set()
        await asyncio.wait_for(watch.ended(), timeout=5)
        seen.append(watch.stopped("connection lost"))
        return seen

    assert asyncio.run(main()) == [None, None, None, "RuntimeError: Cannot apply update"]


def test_sync_watch_sees_the_multiplexed_connection_end_and_a_document_given_up():
    class Given:
        stop_reconnecting = True

    async def main() -> tuple[str | None, str | None, str | None]:
        replica = _Replica()
        folder = SyncWatch(None, replica)  # a kept folder: the connection alone

        async def mux_loop() -> None:
            await asyncio.sleep(0)
            raise OSError("the loop broke")

        task = asyncio.create_task(mux_loop(), name="crdtsync:mux")
        watch = SyncWatch("team/doc", replica)
        await asyncio.wait_for(folder.ended(), timeout=5)
        assert task.done()
        broken = folder.stopped("x"), watch.stopped("x")
        replica._docs["team/doc"] = Given()  # the relay refused it for good (Retry.NEVER)
        other = SyncWatch("team/doc", _Replica())
        given = SyncWatch("team/doc", replica).stopped("relay closed 'team/doc': 1009")
        assert other.stopped(None) is None  # (no task at all: nothing to say)
        return broken[0], broken[1], given

    folder, document, given = asyncio.run(main())
    assert folder == document == "OSError: the loop broke"
    assert given == "it gave up on the document: relay closed 'team/doc': 1009"
