"""The checker alone: presence by Yjs ids, divergence, acknowledged vs lost files."""

from __future__ import annotations

from pycrdt import Doc, Map, Text

from crdtsync.testing.checker import EditRecord, check_history, final_state


def recorded(doc: Doc, edit_id: str, replica: str, fn, acknowledged: bool = False) -> EditRecord:
    updates: list[bytes] = []
    sub = doc.observe(lambda e: updates.append(e.update))
    with doc.transaction():
        fn()
    doc.unobserve(sub)
    return EditRecord.from_update(edit_id, replica, 0, updates[0], acknowledged)


def sync(a: Doc, b: Doc) -> None:
    a.apply_update(b.get_update(a.get_state()))
    b.apply_update(a.get_update(b.get_state()))


def test_overwritten_edit_is_still_present_by_its_ids():
    a, b = Doc(), Doc()
    first = recorded(a, "a1", "A", lambda: a.get("m", type=Map).__setitem__("k", "from a"))
    sync(a, b)
    second = recorded(b, "b1", "B", lambda: b.get("m", type=Map).__setitem__("k", "from b"))
    sync(a, b)
    assert a.get("m", type=Map)["k"] == "from b"  # a's value is hidden...
    finals = [final_state("A", a.get_update()), final_state("B", b.get_update())]
    assert check_history([first, second], finals) == []  # ...but not lost


def test_missing_edit_is_named_with_where_it_is_still_present():
    a, b = Doc(), Doc()
    edit = recorded(a, "a1", "A", lambda: a.get("t", type=Text).insert(0, "hello"))
    finals = [final_state("A", a.get_update()), final_state("B", b.get_update())]
    violations = check_history([edit], finals)
    kinds = [v.kind for v in violations]
    assert kinds == ["diverged", "lost-applied"]
    assert "A has structs" in violations[0].message
    assert "(edits a1)" in violations[0].message
    assert violations[1].message.startswith("edit a1 (applied and committed on A at step 0)")
    assert "missing from B" in violations[1].message
    assert "still present at A" in violations[1].message


def test_lost_delete_is_reported():
    a, b = Doc(), Doc()
    a.get("t", type=Text).insert(0, "abc")
    sync(a, b)
    edit = recorded(a, "del", "A", lambda: a.get("t", type=Text).__delitem__(slice(0, 1)))
    finals = [final_state("A", a.get_update()), final_state("B", b.get_update())]
    violations = check_history([edit], finals)
    assert [v.kind for v in violations] == ["diverged", "lost-applied"]
    assert "deletion of" in violations[1].message


def test_unacknowledged_edits_of_a_lost_file_may_be_gone_but_acknowledged_ones_not():
    a, b = Doc(), Doc()
    kept = recorded(a, "ok", "A", lambda: a.get("t", type=Text).insert(0, "x"))
    acked = recorded(a, "acked", "A", lambda: a.get("t", type=Text).insert(0, "y"), True)
    finals = [final_state("B", b.get_update())]
    violations = check_history([kept, acked], finals, lost_files=["A"])
    assert [(v.kind, v.edit) for v in violations] == [("lost-acknowledged", "acked")]


def test_structs_waiting_behind_a_gap_do_not_count_as_present():
    source = Doc()
    updates: list[bytes] = []
    source.observe(lambda e: updates.append(e.update))
    text = source.get("t", type=Text)
    for ch in "abc":
        text += ch
    partial = Doc()
    partial.apply_update(updates[0])
    partial.apply_update(updates[2])  # "c" waits for "b"
    edit_c = EditRecord.from_update("c", "S", 2, updates[2])
    violations = check_history([edit_c], [final_state("P", partial.get_update())])
    assert [v.kind for v in violations] == ["lost-applied"]


def test_violations_in_one_of_many_documents_name_it_and_edits_are_keyed_by_it():
    a, b = Doc(), Doc()
    updates: list[bytes] = []
    sub = a.observe(lambda e: updates.append(e.update))
    with a.transaction():
        a.get("t", type=Text).insert(0, "hello")
    a.unobserve(sub)
    edit = EditRecord.from_update("a1", "A", 3, updates[0], True, document="team/0007")
    assert edit.key == ("team/0007", "a1")
    finals = [final_state("A", a.get_update()), final_state("B", b.get_update())]
    violations = check_history([edit], finals, document="team/0007")
    assert [(v.kind, v.document) for v in violations] == [
        ("diverged", "team/0007"),
        ("lost-acknowledged", "team/0007"),
    ]
    assert all(v.message.startswith("document team/0007: ") for v in violations)
    assert "edit a1 (acknowledged by the relay on A at step 3)" in violations[1].message
    # Without a document (one-document campaigns) the messages are as they were.
    plain = check_history([edit], finals)
    assert [v.document for v in plain] == [None, None]
    assert plain[1].message.startswith("edit a1 (acknowledged")
