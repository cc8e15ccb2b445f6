"""The integrity rule (crdtsync.integrity): one content per (client, clock), judged per update.

Honest updates come from real pycrdt documents, in every form a real system produces them
(per-transaction updates, a Doc's full encoding, ``merge_updates``, catch-ups diffed
against a state vector, another Doc's re-encoding). Hostile ones come from a second Doc
that uses the same client id, or are built by hand, byte by byte, when no pycrdt Doc can
write them. A relay is modelled by :class:`Relay`: a ledger and the updates it stored,
handed to ``judge`` lazily as server/relay.py does.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import random
import re
import struct
from collections.abc import Callable, Iterable
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, note, settings
from hypothesis import strategies as st
from pycrdt import (
    Array,
    Doc,
    Map,
    Text,
    XmlElement,
    XmlFragment,
    XmlText,
    get_update,
    merge_updates,
)

from crdtsync.integrity import (
    KEY_OWNER,
    MAX_RANGES_PER_CLIENT,
    WILDCARD,
    Ledger,
    Refusal,
    Verdict,
    Writer,
    client_id_of_key,
    decode_ranges,
    encode_ranges,
    read_units,
)
from crdtsync.protocol import decode_state_vector, encode_state_vector, write_var_uint
from crdtsync.updates import UpdateInfo, check_update

C = 7  # the client id fought over
D = 8  # another writer
E = 9  # a third one
ANON = Writer()  # a stock client: proves nothing
OWNER = Writer(frozenset({C}))  # proved the key that C is derived from

PROPERTY = settings(
    max_examples=100,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


# -- a relay's view of one document ------------------------------------------------------------


class Relay:
    """A ledger and the updates stored under it, judged the way the relay judges them.

    The stored content is handed over lazily, as server/relay.py does, and may only be
    loaded (once) when ``overlaps`` says the judgement needs it.
    """

    def __init__(self, ledger: Ledger | None = None, stored: Iterable[bytes] = ()) -> None:
        self.ledger = ledger if ledger is not None else Ledger()
        self.stored: list[bytes] = list(stored)

    def offer(self, update: bytes, writer: Writer | None = ANON) -> Verdict:
        info = check_update(update)
        needed = self.ledger.overlaps(info)
        loads: list[int] = []

        def load() -> list[bytes]:
            loads.append(len(self.stored))
            return list(self.stored)

        verdict = self.ledger.judge(update, info, writer, load)
        assert len(loads) <= (1 if needed else 0), f"stored content loaded {loads}"
        if verdict.update is not None:
            self.stored.append(verdict.update)
        return verdict

    def store_all(self, updates: Iterable[bytes], writer: Writer | None = ANON) -> None:
        """Offer honest updates that must each be accepted whole."""
        for i, update in enumerate(updates):
            verdict = self.offer(update, writer)
            assert verdict.refusals == [], f"update {i} ({update.hex()}) refused: {verdict}"

    def doc(self) -> Doc[Any]:
        """A fresh Doc fed exactly what was stored, in order (it must never raise)."""
        return doc_of(self.stored)

    def snapshot(self) -> tuple[Any, ...]:
        """The parts of the ledger a judgement may change."""
        ledger = self.ledger
        return (
            {c: list(r) for c, r in ledger.ranges.items()},
            dict(ledger.owners),
            set(ledger.types),
            {c: set(k) for c, k in ledger.claims.items()},
        )


def doc_of(updates: Iterable[bytes]) -> Doc[Any]:
    doc: Doc[Any] = Doc()
    for update in updates:
        doc.apply_update(update)
    return doc


def transact(doc: Doc[Any], edit: Callable[[], object]) -> bytes:
    """Run ``edit`` in one transaction of ``doc``; return that transaction's update."""
    updates: list[bytes] = []
    subscription = doc.observe(lambda event: updates.append(event.update))
    try:
        with doc.transaction():
            edit()
    finally:
        doc.unobserve(subscription)
    assert len(updates) == 1, "the edit changed nothing"
    return updates[0]


def keystrokes(doc: Doc[Any], text: str, root: str = "t") -> list[bytes]:
    """Type ``text`` at the end of ``doc``'s text ``root``, one transaction per character."""
    t = doc.get(root, type=Text)
    return [transact(doc, lambda ch=ch: t.insert(len(t), ch)) for ch in text]


def text_of(doc: Doc[Any], root: str = "t") -> str:
    return str(doc.get(root, type=Text))


def map_of(doc: Doc[Any], root: str = "m") -> dict[str, Any]:
    return doc.get(root, type=Map).to_py() or {}


def xml_of(node: Any) -> Any:
    """An XML tree as plain values (attributes are shown in hash order by ``str``)."""
    if isinstance(node, XmlText):
        return node.diff()
    children = [xml_of(child) for child in node.children]
    if isinstance(node, XmlElement):
        return (node.tag, dict(node.attributes), children)
    return children


def view(doc: Doc[Any]) -> dict[str, Any]:
    """The content of the roots the tests write: text, map, array and XML fragment."""
    return {
        "t": text_of(doc),
        "m": map_of(doc),
        "a": doc.get("a", type=Array).to_py() or [],
        "x": xml_of(doc.get("x", type=XmlFragment)),
    }


def sv(state: dict[int, int]) -> bytes:
    return encode_state_vector(state)


def units(update: bytes, client: int) -> dict[int, Any]:
    return read_units(update, {client: [(0, 2**32)]}).get(client, {})


def reencodings(updates: list[bytes], writer: Doc[Any] | None = None) -> dict[str, bytes]:
    """The forms in which a real system repeats ``updates`` (all of the same content)."""
    replica = doc_of(updates)
    merged = merge_updates(*updates)
    forms = {
        "replica get_update": replica.get_update(),
        "merge_updates": merged,
        "merge of merges": merge_updates(
            merge_updates(*updates[: len(updates) // 2 or 1]),
            merge_updates(*updates[len(updates) // 2 or 1 :] or updates[:1]),
        ),
        "get_update(merged, empty state)": get_update(merged, sv({})),
    }
    if writer is not None:
        forms["writer get_update"] = writer.get_update()
    return forms


def assert_repeats_accepted(updates: list[bytes], writer: Doc[Any] | None = None) -> None:
    """Every re-encoding of stored ``updates`` is accepted, trimmed, and changes nothing.

    And the other way round: a ledger that stored a re-encoding first accepts the
    original updates, trimmed.
    """
    forms = reencodings(updates, writer)
    relay = Relay()
    relay.store_all(updates)
    before = relay.snapshot()
    expected = view(relay.doc())
    for name, form in forms.items():
        verdict = relay.offer(form)
        assert verdict.refusals == [], f"{name} refused: {verdict.refusals}"
        assert verdict.trimmed, name
        assert_only_deletes(verdict, form, name)
        assert relay.snapshot() == before, name
    assert view(relay.doc()) == expected
    for name, form in forms.items():
        other = Relay()
        other.store_all([form])
        for i, update in enumerate(updates):
            verdict = other.offer(update)
            assert verdict.refusals == [], f"update {i} after {name}: {verdict.refusals}"
            assert_only_deletes(verdict, update, f"update {i} after {name}")
        assert view(other.doc()) == expected, name


def assert_only_deletes(verdict: Verdict, offered: bytes, what: str) -> None:
    """Nothing new was offered: the verdict keeps no struct, only the delete set, if any."""
    deletes = check_update(offered).deletes
    if not deletes:
        assert verdict.update is None, f"{what}: kept {verdict.update!r}"
        return
    assert verdict.update is not None, what
    kept = check_update(verdict.update)
    assert kept.state == {}, f"{what}: kept structs {kept.state}"
    assert kept.deletes == deletes, what


def same_content(a: bytes | None, b: bytes | None) -> bool:
    """Whether two updates carry the same units and deletes (pycrdt writes the keys of an
    object in hash order, which changes from one encoding to the next)."""
    if a is None or b is None:
        return a is b
    info = check_update(a)
    if info != check_update(b):
        return False
    wanted = {c: info.ranges(c) for c in info.state}
    return read_units(a, wanted) == read_units(b, wanted)


def refused_clients(verdict: Verdict) -> set[int]:
    return {r.client for r in verdict.refusals}


# -- updates built by hand (lib0 v1), for content no pycrdt Doc writes -------------------------

STRING, ANY, TYPE = 4, 8, 7


def vu(num: int) -> bytes:
    return write_var_uint(num)


def vs(text: str) -> bytes:
    raw = text.encode()
    return vu(len(raw)) + raw


def block(client: int, clock: int, *structs: bytes) -> bytes:
    return vu(len(structs)) + vu(client) + vu(clock) + b"".join(structs)


def update_of(*blocks: bytes) -> bytes:
    return vu(len(blocks)) + b"".join(blocks) + b"\x00"  # no delete set


def in_root(ref: int, content: bytes, root: str = "t", key: str | None = None) -> bytes:
    """An item with no neighbours in root type ``root`` (under map key ``key``)."""
    info = ref | (0x20 if key is not None else 0)
    return bytes([info]) + vu(1) + vs(root) + (vs(key) if key is not None else b"") + content


def in_parent(ref: int, parent: tuple[int, int], content: bytes, key: str | None = None) -> bytes:
    """An item with no neighbours in the type that item ``parent`` created."""
    info = ref | (0x20 if key is not None else 0)
    return (
        bytes([info])
        + vu(0)
        + vu(parent[0])
        + vu(parent[1])
        + (vs(key) if key is not None else b"")
        + content
    )


def after(ref: int, origin: tuple[int, int], content: bytes) -> bytes:
    """An item whose left origin is ``origin``."""
    return bytes([ref | 0x80]) + vu(origin[0]) + vu(origin[1]) + content


def anys(*values: bytes) -> bytes:
    return vu(len(values)) + b"".join(values)


def any_int(num: int) -> bytes:  # lib0 var-int, as Yjs writes small integers
    assert 0 <= num < 64
    return bytes([125, num])


def any_f32(num: float) -> bytes:
    return bytes([124]) + struct.pack(">f", num)


def any_f64(num: float) -> bytes:
    return bytes([123]) + struct.pack(">d", num)


def any_str(text: str) -> bytes:
    return bytes([119]) + vs(text)


def any_obj(*items: tuple[str, bytes]) -> bytes:
    return bytes([118]) + vu(len(items)) + b"".join(vs(k) + v for k, v in items)


ARRAY_TYPE = vu(0)  # type content: type ref 0 (YArray)


# -- the poisoning pair ------------------------------------------------------------------------


def poisoning_pair() -> tuple[bytes, bytes]:
    """Two writers of client C at clock 0: a Text insert, and a Map->Array with a child."""
    first: Doc[Any] = Doc(client_id=C)
    text_update = transact(first, lambda: first.get("t", type=Text).insert(0, "h"))
    second: Doc[Any] = Doc(client_id=C)
    m = second.get("m", type=Map)

    def nested() -> None:
        m["k"] = Array()
        m["k"].append(1)

    nested_update = transact(second, nested)
    return text_update, nested_update


def test_the_poisoning_pair_names_one_clock_twice() -> None:
    text_update, nested_update = poisoning_pair()
    assert text_update == bytes.fromhex("0101070004010174016800")
    assert nested_update == bytes.fromhex("010207002701016d016b0008000700017c3f80000000")
    assert check_update(text_update) == UpdateInfo(state={C: 1}, starts={C: 0}, deletes={})
    assert check_update(nested_update) == UpdateInfo(
        state={C: 2}, starts={C: 0}, deletes={}, types=[(C, 0)], parents=[(C, 1, C, 0)]
    )


def test_pycrdt_cannot_apply_the_poisoning_pair_text_first() -> None:
    text_update, nested_update = poisoning_pair()
    doc = doc_of([text_update])
    with pytest.raises(
        RuntimeError, match=r"block parent <7#0> must be deleted or shared ref type"
    ):
        doc.apply_update(nested_update)


@pytest.mark.parametrize("first", ["text", "nested"])
def test_second_of_the_poisoning_pair_is_refused_and_pycrdt_applies_what_was_accepted(
    first: str,
) -> None:
    text_update, nested_update = poisoning_pair()
    winner, loser = (
        (text_update, nested_update) if first == "text" else (nested_update, text_update)
    )
    relay = Relay()
    assert relay.offer(winner) == Verdict(winner, [])
    verdict = relay.offer(loser)
    end = 2 if first == "text" else 1
    assert verdict.update is None
    assert len(verdict.refusals) == 1
    refusal = verdict.refusals[0]
    assert (refusal.client, refusal.start, refusal.end) == (C, 0, end)
    assert refusal.reason.startswith(f"client {C} clock 0 rewritten: it differs from")
    assert not verdict.accepted_whole
    assert relay.stored == [winner]
    assert relay.ledger.ranges == {C: [(0, 1 if first == "text" else 2)]}
    expected = {"t": "h", "m": {}} if first == "text" else {"t": "", "m": {"k": [1.0]}}
    for order in (relay.stored, relay.stored[::-1]):
        doc = doc_of(order)
        assert {"t": text_of(doc), "m": map_of(doc)} == expected


def test_rewrite_of_stored_clock_is_refused_and_rest_of_update_kept() -> None:
    text_update, nested_update = poisoning_pair()
    other: Doc[Any] = Doc(client_id=D)
    other.apply_update(text_update)
    ot = other.get("t", type=Text)
    typed = keystrokes(other, "xy")  # "hxy"
    relay = Relay()
    relay.store_all([text_update, *typed])
    more = transact(other, lambda: ot.insert(len(ot), "z"))  # (D, 2)
    delete = transact(other, lambda: ot.__delitem__(slice(1, 2)))  # deletes (D, 0): "x"
    hostile = merge_updates(nested_update, more, delete)
    assert check_update(hostile).state == {C: 2, D: 3}

    verdict = relay.offer(hostile)

    assert refused_clients(verdict) == {C}
    assert (verdict.refusals[0].start, verdict.refusals[0].end) == (0, 2)
    assert verdict.update is not None
    kept = check_update(verdict.update)
    assert (kept.state, kept.starts, kept.deletes) == ({D: 3}, {D: 2}, {D: [(0, 1)]})
    assert text_of(relay.doc()) == text_of(other) == "hyz"
    assert relay.ledger.ranges == {C: [(0, 1)], D: [(0, 3)]}
    for order in itertools.permutations(relay.stored):  # pycrdt takes them in any order
        doc = doc_of([*order, *order])  # twice: pycrdt may hold some back until the next
        assert text_of(doc) == "hyz"
        assert map_of(doc) == {}


# -- honest repeats: accepted, nothing refused -------------------------------------------------


def test_full_doc_update_after_many_keystrokes_is_trimmed_to_nothing() -> None:
    writer: Doc[Any] = Doc(client_id=C)
    typed = keystrokes(writer, "the quick brown fox jumps over the lazy dog " * 3)
    relay = Relay()
    relay.store_all(typed)
    assert relay.ledger.ranges == {C: [(0, len(typed))]}
    full = writer.get_update()
    assert len(check_update(full).starts) == 1
    assert relay.offer(full) == Verdict(None, [], trimmed=True)
    assert len(relay.stored) == len(typed)


def test_keystrokes_repeat_in_every_form_without_refusal() -> None:
    writer: Doc[Any] = Doc(client_id=C)
    typed = keystrokes(writer, "hello world")
    t = writer.get("t", type=Text)
    typed.append(transact(writer, lambda: t.insert(5, ",")))
    typed.append(transact(writer, lambda: t.insert(0, ">> ")))
    assert_repeats_accepted(typed, writer)


def test_merge_of_stored_updates_with_skips_is_trimmed_to_nothing() -> None:
    writer: Doc[Any] = Doc(client_id=C)
    typed = keystrokes(writer, "abcdefghi")
    relay = Relay()
    relay.store_all(typed)
    gappy = merge_updates(*typed[:3], *typed[6:])  # a skip where d, e, f are
    assert check_update(gappy).holes == {C: [(3, 6)]}
    assert relay.offer(gappy) == Verdict(None, [], trimmed=True)


def test_merged_update_with_a_skip_keeps_only_the_content_after_the_stored_part() -> None:
    writer: Doc[Any] = Doc(client_id=C)
    typed = keystrokes(writer, "abcdefghi")
    relay = Relay()
    relay.store_all(typed[:3])
    gappy = merge_updates(*typed[:3], *typed[6:])
    verdict = relay.offer(gappy)
    assert verdict.refusals == []
    assert verdict.trimmed
    assert verdict.update is not None
    kept = check_update(verdict.update)
    assert (kept.starts, kept.state, kept.holes) == ({C: 6}, {C: 9}, {})
    assert relay.ledger.ranges == {C: [(0, 3), (6, 9)]}
    relay.store_all(typed[3:6])  # the hole fills
    assert relay.ledger.ranges == {C: [(0, 9)]}
    assert text_of(doc_of(relay.stored)) == "abcdefghi"


def test_catch_up_carrying_other_writers_content_keeps_only_the_new_part() -> None:
    a: Doc[Any] = Doc(client_id=C)
    b: Doc[Any] = Doc(client_id=D)
    relay = Relay()
    relay.store_all(keystrokes(a, "abc"))
    b.apply_update(a.get_update())
    relay.store_all(keystrokes(b, "de"))
    a.apply_update(b.get_update(a.get_state()))
    mine = keystrokes(a, "fg")
    b.apply_update(a.get_update(b.get_state()))
    b_more = keystrokes(b, "hi")  # not sent yet
    # b reconnects and answers the relay's step 1 from an old state vector: everything
    # of a's and its own since then, of which only "hi" is new to the relay
    relay.store_all(mine)
    catch_up = b.get_update(sv({C: 1, D: 0}))
    assert check_update(catch_up).starts == {C: 1, D: 0}
    verdict = relay.offer(catch_up)
    assert verdict.refusals == []
    assert verdict.trimmed
    assert verdict.update is not None
    kept = check_update(verdict.update)
    assert (kept.starts, kept.state) == ({D: 2}, {D: 4})
    assert relay.offer(b_more[0]) == Verdict(None, [], trimmed=True)
    assert text_of(relay.doc()) == text_of(b) == "abcdefghi"


def test_catch_up_carrying_an_owned_id_is_trimmed_not_refused() -> None:
    owner: Doc[Any] = Doc(client_id=C)
    relay = Relay()
    relay.store_all(keystrokes(owner, "mine"), OWNER)
    stock: Doc[Any] = Doc(client_id=D)
    stock.apply_update(owner.get_update())
    keystrokes(stock, "!")
    verdict = relay.offer(stock.get_update(), ANON)  # a stock client's whole state
    assert verdict.refusals == []
    assert verdict.update is not None
    assert check_update(verdict.update).state == {D: 1}
    assert relay.ledger.owners == {C: KEY_OWNER}


def test_deleted_text_re_encoded_by_a_doc_matches_the_live_original() -> None:
    writer: Doc[Any] = Doc(client_id=C)
    typed = keystrokes(writer, "hello brave new world")
    t = writer.get("t", type=Text)
    typed.append(transact(writer, lambda: t.__delitem__(slice(5, 11))))  # " brave"
    typed.append(transact(writer, lambda: t.__delitem__(slice(0, 1))))  # "h"
    assert text_of(writer) == "ello new world"
    snapshot = writer.get_update()
    gone = units(snapshot, C)
    assert gone[0] is WILDCARD
    assert gone[5] is WILDCARD
    assert gone[10] is WILDCARD
    assert units(typed[5], C)[5] != WILDCARD
    assert_repeats_accepted(typed, writer)


def test_text_deleted_and_collected_in_a_nested_type_matches_the_live_original() -> None:
    writer: Doc[Any] = Doc(client_id=C)
    m = writer.get("m", type=Map)
    updates = [transact(writer, lambda: m.__setitem__("k", Text("nested")))]
    updates.append(transact(writer, lambda: m["k"].insert(6, " text")))
    updates.append(transact(writer, lambda: m.pop("k")))  # the type and its text go
    updates.append(transact(writer, lambda: m.__setitem__("k", "plain")))
    gone = units(writer.get_update(), C)
    assert all(gone[k] is WILDCARD for k in range(1, 7))  # premise: GC'd
    assert_repeats_accepted(updates, writer)


def test_overwritten_map_keys_repeat_without_refusal() -> None:
    writer: Doc[Any] = Doc(client_id=C)
    m = writer.get("m", type=Map)
    updates = []
    for value in (1, "two", [3], {"four": 4}, None, True, "last"):
        updates.append(transact(writer, lambda value=value: m.__setitem__("k", value)))
        updates.append(transact(writer, lambda value=value: m.__setitem__("j", value)))
    updates.append(transact(writer, lambda: m.pop("j")))
    assert map_of(writer) == {"k": "last"}
    assert_repeats_accepted(updates, writer)


def test_nested_types_repeat_without_refusal() -> None:
    writer: Doc[Any] = Doc(client_id=C)
    m = writer.get("m", type=Map)
    updates = [transact(writer, lambda: m.__setitem__("list", Array([1, 2])))]
    updates.append(transact(writer, lambda: m["list"].append(Map({"deep": Text("x")}))))
    updates.append(transact(writer, lambda: m["list"][2]["deep"].insert(1, "yz")))
    updates.append(transact(writer, lambda: m["list"][2].__setitem__("n", Array())))
    updates.append(transact(writer, lambda: m["list"][2]["n"].append("leaf")))
    updates.append(transact(writer, lambda: m["list"].__delitem__(0)))
    assert map_of(writer) == {"list": [2.0, {"deep": "xyz", "n": ["leaf"]}]}
    info = check_update(merge_updates(*updates))
    assert len(info.types) == 4
    assert info.parents
    assert_repeats_accepted(updates, writer)


ANY_VALUES: list[Any] = [
    0,
    -1,
    7,
    2**31,
    -(2**40),
    2**53 - 1,
    0.1,
    -2.5,
    1e300,
    float("inf"),
    -0.0,
    True,
    False,
    None,
    "",
    "string",
    b"",
    b"\x00\xffbytes",
    [],
    [1, "a", None, [2.5, [True]], {"k": b"v"}],
    {},
    {"z": 1, "a": {"nested": [1, 2, {"deep": None}]}, "m": "x", "b": False},
]


def test_any_values_of_every_kind_repeat_without_refusal() -> None:
    writer: Doc[Any] = Doc(client_id=C)
    m = writer.get("m", type=Map)
    a = writer.get("a", type=Array)
    updates = [transact(writer, lambda: a.extend(ANY_VALUES))]
    for i, value in enumerate(ANY_VALUES):
        updates.append(transact(writer, lambda i=i, value=value: m.__setitem__(f"k{i}", value)))
    assert_repeats_accepted(updates, writer)


def test_equal_any_values_in_other_encodings_are_equal() -> None:
    # How Yjs writes {"a": 1, "b": "s"}, and how pycrdt re-encodes it: a float for the
    # integer, and the keys in another order
    yjs = update_of(
        block(C, 0, in_root(ANY, anys(any_obj(("a", any_int(1)), ("b", any_str("s")))), "m", "k"))
    )
    pycrdt = update_of(
        block(C, 0, in_root(ANY, anys(any_obj(("b", any_str("s")), ("a", any_f32(1.0)))), "m", "k"))
    )
    wide = update_of(
        block(C, 0, in_root(ANY, anys(any_obj(("a", any_f64(1.0)), ("b", any_str("s")))), "m", "k"))
    )
    for first, then in [(yjs, pycrdt), (pycrdt, yjs), (yjs, wide), (wide, pycrdt)]:
        relay = Relay()
        relay.store_all([first])
        assert relay.offer(then) == Verdict(None, [], trimmed=True)
    relay = Relay()
    relay.store_all([yjs])
    assert relay.offer(doc_of([yjs]).get_update()) == Verdict(None, [], trimmed=True)


def test_non_bmp_characters_repeat_without_refusal() -> None:
    writer: Doc[Any] = Doc(client_id=C)
    typed = keystrokes(writer, "a😀b🎉 ünï𝄞")
    t = writer.get("t", type=Text)
    typed.append(transact(writer, lambda: t.insert(len("a😀".encode()), "é")))
    typed.append(transact(writer, lambda: t.__delitem__(slice(1, 1 + len("😀".encode())))))
    assert text_of(writer) == "aéb🎉 ünï𝄞"
    assert check_update(merge_updates(*typed)).state == {C: 13}  # UTF-16 code units
    assert_repeats_accepted(typed, writer)


def test_surrogate_halves_replaced_as_yjs_splits_them_match_the_pair() -> None:
    # Yjs, splitting "😀" between its UTF-16 halves, writes U+FFFD for each half
    writer: Doc[Any] = Doc(client_id=C)
    whole = transact(writer, lambda: writer.get("t", type=Text).insert(0, "a😀b"))
    split = update_of(block(C, 2, after(STRING, (C, 1), vs("\ufffdb"))))
    relay = Relay()
    relay.store_all([whole])
    assert relay.offer(split) == Verdict(None, [], trimmed=True)
    relay = Relay()
    relay.store_all([split])
    verdict = relay.offer(whole)
    assert verdict.refusals == []


def test_pycrdt_diff_inside_a_surrogate_pair_rewrites_a_clock_and_is_refused() -> None:
    # pycrdt's get_update cut at clock 2, between the halves of "😀" (clocks 1-2), puts
    # "b" (clock 3) at clock 2: a different content for a stored clock
    writer: Doc[Any] = Doc(client_id=C)
    whole = transact(writer, lambda: writer.get("t", type=Text).insert(0, "a😀b"))
    cut = get_update(whole, sv({C: 2}))
    assert cut == bytes.fromhex("010107028407010162" + "00")
    relay = Relay()
    relay.store_all([whole])
    verdict = relay.offer(cut)
    assert refused_clients(verdict) == {C}
    assert verdict.refusals[0].reason.startswith(f"client {C} clock 2 rewritten")
    assert text_of(relay.doc()) == "a😀b"


def test_trim_between_surrogate_halves_keeps_later_clocks_in_place() -> None:
    # the relay holds "a" and the first half of "😀" (as U+FFFD, the way Yjs splits it);
    # the whole text then comes: the new part starts between the halves, where pycrdt
    # cannot cut, and must not end up one clock early
    writer: Doc[Any] = Doc(client_id=C)
    whole = transact(writer, lambda: writer.get("t", type=Text).insert(0, "a😀b"))
    head = update_of(block(C, 0, in_root(STRING, vs("a\ufffd"))))
    relay = Relay()
    relay.store_all([head])
    verdict = relay.offer(whole)
    assert verdict.refusals == []
    assert verdict.update is not None
    kept = units(verdict.update, C)
    assert [kept[k][5] for k in (2, 3)] == [0xDE00, ord("b")]  # clocks 2 and 3 unmoved
    assert relay.ledger.ranges == {C: [(0, 4)]}


def test_xml_content_repeats_without_refusal() -> None:
    writer: Doc[Any] = Doc(client_id=C)
    fragment = writer.get("x", type=XmlFragment)
    updates = [transact(writer, lambda: fragment.children.append(XmlElement("p", {"a": "1"})))]
    element = fragment.children[0]
    updates.append(transact(writer, lambda: element.attributes.__setitem__("b", "2")))
    updates.append(transact(writer, lambda: element.children.append(XmlText("hello"))))
    xml_text = element.children[0]
    updates.append(transact(writer, lambda: xml_text.insert(5, " world", {"bold": True})))
    updates.append(transact(writer, lambda: xml_text.format(0, 5, {"italic": {"x": 1}})))
    updates.append(transact(writer, lambda: xml_text.insert_embed(2, {"img": "u.png"})))
    updates.append(transact(writer, lambda: element.children.append(XmlElement("br"))))
    updates.append(transact(writer, lambda: element.attributes.__setitem__("a", "3")))
    italic = {"italic": {"x": 1.0}}
    assert view(writer)["x"] == [
        (
            "p",
            {"a": "3", "b": "2"},
            [
                [
                    ("he", italic),
                    ({"img": "u.png"}, italic),
                    ("llo", italic),
                    (" world", {"bold": True}),
                ],
                ("br", {}, []),
            ],
        )
    ]
    refs = {u[4] for u in units(merge_updates(*updates), C).values() if u is not WILDCARD}
    assert refs == {4, 5, 6, 7, 8}  # string, embed, format, type, any
    assert_repeats_accepted(updates, writer)  # compares the XML of what was stored too


def test_two_writers_interleaved_content_repeats_without_refusal() -> None:
    a: Doc[Any] = Doc(client_id=C)
    b: Doc[Any] = Doc(client_id=D)
    updates: list[bytes] = []
    for i, word in enumerate(["one", "two", "three", "four", "five", "six"]):
        writer, reader = (a, b) if i % 2 == 0 else (b, a)
        t = writer.get("t", type=Text)
        for ch in word + " ":
            position = len(t) // 2  # in the middle: between the other writer's letters
            updates.append(transact(writer, lambda t=t, p=position, ch=ch: t.insert(p, ch)))
        updates.append(
            transact(writer, lambda w=writer, i=i: w.get("m", type=Map).__setitem__(str(i), i))
        )
        reader.apply_update(writer.get_update(reader.get_state()))
    assert text_of(a) == text_of(b)
    assert_repeats_accepted(updates, a)
    assert_repeats_accepted(updates, b)


def test_subdocument_repeated_through_a_re_encoding_is_accepted() -> None:
    writer: Doc[Any] = Doc(client_id=C)
    m = writer.get("m", type=Map)
    created = transact(writer, lambda: m.__setitem__("sub", Doc(guid="g")))
    compacted = doc_of([created]).get_update()
    assert created != compacted  # pycrdt writes shouldLoad true, then false
    for first, then in [
        (created, compacted),
        (compacted, created),
        (compacted, writer.get_update()),
    ]:
        relay = Relay()
        relay.store_all([first])
        assert relay.offer(then) == Verdict(None, [], trimmed=True)


def test_nan_value_repeat_is_accepted() -> None:
    writer: Doc[Any] = Doc(client_id=C)
    created = transact(writer, lambda: writer.get("a", type=Array).append(float("nan")))
    assert created == bytes.fromhex("0101070008010161017b7ff800000000000000")
    relay = Relay()
    relay.store_all([created])
    assert relay.offer(created) == Verdict(None, [], trimmed=True)


# -- rewrites: refused -------------------------------------------------------------------------


def _rewrite_pair(case: str) -> tuple[list[bytes], bytes, bytes]:
    """``(base, original, rewrite)``: two updates of client C for clock 0 after ``base``."""
    base_doc: Doc[Any] = Doc(client_id=D)
    base: list[bytes] = []
    if case in ("different origin", "different right origin"):
        base = keystrokes(base_doc, "ab")
    elif case == "different parent":
        bm = base_doc.get("m", type=Map)
        base = [
            transact(base_doc, lambda: (bm.__setitem__("p", Array()), bm.__setitem__("q", Array())))
        ]
    docs = []
    for _ in range(2):
        doc: Doc[Any] = Doc(client_id=C)
        for update in base:
            doc.apply_update(update)
        docs.append(doc)
    one, two = docs
    if case == "different char":
        edits = [
            lambda d: d.get("t", type=Text).insert(0, "a"),
            lambda d: d.get("t", type=Text).insert(0, "b"),
        ]
    elif case == "different origin":
        # the rewrite's doc holds only "a": its "x" follows (D, 0), the original's (D, 1)
        two = Doc(client_id=C)
        two.apply_update(base[0])
        edits = [
            lambda d: d.get("t", type=Text).insert(2, "x"),
            lambda d: d.get("t", type=Text).insert(1, "x"),
        ]
    elif case == "different right origin":
        # between "a" and "b" in the original; after "a" with nothing to its right in the
        # rewrite's doc, which holds only "a"
        two = Doc(client_id=C)
        two.apply_update(base[0])
        edits = [
            lambda d: d.get("t", type=Text).insert(1, "x"),
            lambda d: d.get("t", type=Text).insert(1, "x"),
        ]
    elif case == "different parent":
        edits = [
            lambda d: d.get("m", type=Map)["p"].append(1),
            lambda d: d.get("m", type=Map)["q"].append(1),
        ]
    elif case == "different map key":
        edits = [
            lambda d: d.get("m", type=Map).__setitem__("a", 1),
            lambda d: d.get("m", type=Map).__setitem__("b", 1),
        ]
    elif case == "different any value":
        edits = [
            lambda d: d.get("m", type=Map).__setitem__("a", 1),
            lambda d: d.get("m", type=Map).__setitem__("a", 2),
        ]
    elif case == "different nested any value":
        edits = [
            lambda d: d.get("m", type=Map).__setitem__("a", {"x": [1, {"y": "z"}]}),
            lambda d: d.get("m", type=Map).__setitem__("a", {"x": [1, {"y": "Z"}]}),
        ]
    elif case == "bool instead of number":
        edits = [
            lambda d: d.get("m", type=Map).__setitem__("a", 1),
            lambda d: d.get("m", type=Map).__setitem__("a", True),
        ]
    elif case == "same value under another root":
        edits = [
            lambda d: d.get("t", type=Text).insert(0, "a"),
            lambda d: d.get("u", type=Text).insert(0, "a"),
        ]
    elif case == "another shared type kind":
        edits = [
            lambda d: d.get("m", type=Map).__setitem__("k", Array()),
            lambda d: d.get("m", type=Map).__setitem__("k", Map()),
        ]
    elif case == "another xml element name":
        edits = [
            lambda d: d.get("x", type=XmlFragment).children.append(XmlElement("p")),
            lambda d: d.get("x", type=XmlFragment).children.append(XmlElement("q")),
        ]
    else:
        raise AssertionError(case)
    original = transact(one, lambda: edits[0](one))
    rewrite = transact(two, lambda: edits[1](two))
    return base, original, rewrite


DIFFER = {  # the fields of the unit at clock 0 that differ
    "different char": ["value"],
    "different origin": ["origin"],
    "different right origin": ["right origin"],
    "different parent": ["parent"],
    "different map key": ["parent key"],
    "different any value": ["value"],
    "different nested any value": ["value"],
    "bool instead of number": ["value"],
    "same value under another root": ["parent"],
    "another shared type kind": ["value"],
    "another xml element name": ["value"],
}
REWRITES = list(DIFFER)


@pytest.mark.parametrize("case", REWRITES)
@pytest.mark.parametrize("owner", [ANON, OWNER], ids=["anonymous", "owner"])
def test_rewrite_of_a_stored_clock_is_refused(case: str, owner: Writer) -> None:
    base, original, rewrite = _rewrite_pair(case)
    o_info, r_info = check_update(original), check_update(rewrite)
    assert o_info.starts == r_info.starts == {C: 0}  # premise: the same clock
    fields = ["origin", "right origin", "parent", "parent key", "content kind", "value"]
    o_unit, r_unit = units(original, C)[0], units(rewrite, C)[0]
    differ = [f for f, a, b in zip(fields, o_unit, r_unit, strict=True) if a != b]
    assert differ == DIFFER[case]
    relay = Relay()
    relay.store_all(base)
    relay.store_all([original], owner)
    before = relay.snapshot()
    expected = view(relay.doc())
    verdict = relay.offer(rewrite, owner)  # even the owner may not rewrite its own clock
    assert verdict.update is None
    assert verdict.refusals == [
        Refusal(C, 0, r_info.state[C], verdict.refusals[0].reason),
    ]
    assert verdict.refusals[0].reason.startswith(f"client {C} clock 0 rewritten: it differs")
    assert not verdict.refusals[0].unproven  # no proof makes a rewrite acceptable
    assert relay.snapshot() == before
    assert view(relay.doc()) == expected
    # and the other way round: whichever came first stays
    relay = Relay()
    relay.store_all(base)
    relay.store_all([rewrite])
    assert refused_clients(relay.offer(original)) == {C}


def test_rewrite_at_a_later_clock_of_a_longer_update_is_refused_whole() -> None:
    writer: Doc[Any] = Doc(client_id=C)
    typed = keystrokes(writer, "abc")
    forger: Doc[Any] = Doc(client_id=C)
    forger.apply_update(merge_updates(*typed[:2]))
    forged = keystrokes(forger, "Xyz")  # clock 2: "X" where "c" is stored
    relay = Relay()
    relay.store_all(typed)
    verdict = relay.offer(merge_updates(*typed[:2], *forged))
    assert verdict.update is None
    assert [(r.client, r.start, r.end) for r in verdict.refusals] == [(C, 0, 5)]
    assert verdict.refusals[0].reason == (
        f"client {C} clock 2 rewritten: it differs from the stored content (X instead of c)"
    )
    assert relay.ledger.ranges == {C: [(0, 3)]}


def test_deleted_stored_unit_matches_anything() -> None:
    # what the store holds only as deleted cannot be told apart: no refusal, nothing kept
    writer: Doc[Any] = Doc(client_id=C)
    t = writer.get("t", type=Text)
    keystrokes(writer, "ab")
    transact(writer, lambda: t.__delitem__(slice(0, 2)))
    relay = Relay()
    relay.store_all([writer.get_update()])
    forger: Doc[Any] = Doc(client_id=C)
    forged = keystrokes(forger, "XY")
    assert relay.offer(merge_updates(*forged)) == Verdict(None, [], trimmed=True)
    assert text_of(relay.doc()) == ""


# -- impersonation -----------------------------------------------------------------------------


def test_new_clocks_of_an_owned_client_id_are_refused_for_another_writer() -> None:
    owner: Doc[Any] = Doc(client_id=C)
    relay = Relay()
    relay.store_all(keystrokes(owner, "ab"), OWNER)
    assert relay.ledger.owners == {C: KEY_OWNER}
    forger: Doc[Any] = Doc(client_id=C)
    forger.apply_update(owner.get_update())
    forged = keystrokes(forger, "X")[0]
    before = relay.snapshot()
    for writer in (ANON, Writer(frozenset({D})), Writer(subject="alice")):
        verdict = relay.offer(forged, writer)
        assert verdict.update is None
        assert [(r.client, r.start, r.end, r.reason) for r in verdict.refusals] == [
            (C, 2, 3, f"client {C} belongs to another writer: new content at clocks 2-2 refused")
        ]
        assert verdict.refusals[0].unproven  # a writer that can prove the key may retry
        assert relay.snapshot() == before
    # the owner's own next clocks
    assert relay.offer(forged, OWNER) == Verdict(forged, [])
    assert relay.ledger.ranges == {C: [(0, 3)]}


def test_owner_continues_writing_its_own_client_id() -> None:
    owner: Doc[Any] = Doc(client_id=C)
    relay = Relay()
    typed = keystrokes(owner, "hello, world")
    for update in typed:
        assert relay.offer(update, OWNER) == Verdict(update, [])
    assert relay.ledger.owners == {C: KEY_OWNER}
    assert text_of(relay.doc()) == "hello, world"


def test_refused_impersonation_keeps_the_rest_of_the_update() -> None:
    owner: Doc[Any] = Doc(client_id=C)
    relay = Relay()
    relay.store_all(keystrokes(owner, "ab"), OWNER)
    forger: Doc[Any] = Doc(client_id=C)
    forger.apply_update(owner.get_update())
    forged = keystrokes(forger, "X")[0]
    other: Doc[Any] = Doc(client_id=D)
    other.apply_update(owner.get_update())
    honest = keystrokes(other, "d")[0]
    verdict = relay.offer(merge_updates(forged, honest), ANON)
    assert refused_clients(verdict) == {C}
    assert verdict.update is not None
    assert check_update(verdict.update).state == {D: 1}
    assert text_of(relay.doc()) == "abd"


def test_anonymously_written_client_id_stays_writable() -> None:
    first: Doc[Any] = Doc(client_id=C)
    typed = keystrokes(first, "abcd")
    relay = Relay()
    relay.store_all(typed[:2], ANON)
    relay.store_all(typed[2:3], Writer(frozenset({D})))  # a key for another id
    assert relay.ledger.owners == {}
    relay.store_all(typed[3:], ANON)
    assert text_of(relay.doc()) == "abcd"


def test_first_write_with_a_token_makes_an_anonymously_written_id_the_subjects() -> None:
    first: Doc[Any] = Doc(client_id=C)
    typed = keystrokes(first, "abcd")
    relay = Relay()
    relay.store_all(typed[:2], ANON)
    relay.store_all(typed[2:3], Writer(subject="bob"))  # the token proves its subject
    assert relay.ledger.owners == {C: "sub:bob"}
    assert refused_clients(relay.offer(typed[3], Writer(subject="eve"))) == {C}
    assert refused_clients(relay.offer(typed[3], ANON)) == {C}
    relay.store_all(typed[3:], Writer(subject="bob"))
    assert text_of(relay.doc()) == "abcd"


def test_first_proven_write_of_an_anonymously_written_id_makes_it_owned() -> None:
    writer: Doc[Any] = Doc(client_id=C)
    typed = keystrokes(writer, "abc")
    relay = Relay()
    relay.store_all(typed[:1], ANON)
    relay.store_all(typed[1:2], OWNER)
    assert relay.ledger.owners == {C: KEY_OWNER}
    assert refused_clients(relay.offer(typed[2], ANON)) == {C}
    assert relay.offer(typed[1], ANON) == Verdict(None, [], trimmed=True)  # a repeat is no write


def test_judging_without_a_writer_checks_content_only() -> None:
    owner: Doc[Any] = Doc(client_id=C)
    typed = keystrokes(owner, "ab")
    relay = Relay()
    relay.store_all(typed[:1], OWNER)
    assert relay.offer(typed[1], None) == Verdict(typed[1], [])
    assert relay.ledger.owners == {C: KEY_OWNER}
    text_update, nested_update = poisoning_pair()
    relay = Relay()
    relay.store_all([text_update], None)
    assert relay.ledger.owners == {}
    assert refused_clients(relay.offer(nested_update, None)) == {C}


def test_writer_permissions() -> None:
    assert ANON.owner_for(C) is None
    assert OWNER.owner_for(C) == KEY_OWNER
    assert OWNER.owner_for(D) is None
    assert Writer(subject="alice").owner_for(C) == "sub:alice"  # its first write owns it
    assert Writer(frozenset({C}), "alice").owner_for(C) == KEY_OWNER  # a proven key first
    assert ANON.may_write(C, None)
    assert OWNER.may_write(D, None)
    assert OWNER.may_write(C, KEY_OWNER)
    assert not ANON.may_write(C, KEY_OWNER)
    assert not Writer(frozenset({D})).may_write(C, KEY_OWNER)
    assert Writer(subject="alice").may_write(C, "sub:alice")
    assert not Writer(subject="bob").may_write(C, "sub:alice")
    assert not ANON.may_write(C, "sub:alice")
    assert not OWNER.may_write(C, "sub:alice")


def test_client_owned_by_a_token_subject_is_writable_by_that_subject_only() -> None:
    writer: Doc[Any] = Doc(client_id=C)
    typed = keystrokes(writer, "ab")
    relay = Relay(Ledger(owners={C: "sub:alice"}))
    assert refused_clients(relay.offer(typed[0], Writer(subject="bob"))) == {C}
    assert refused_clients(relay.offer(typed[0], OWNER)) == {C}
    assert relay.offer(typed[0], Writer(subject="alice")) == Verdict(typed[0], [])
    assert relay.ledger.owners == {C: "sub:alice"}


# -- parents named by id -----------------------------------------------------------------------


def _shared_array(client: int = D) -> tuple[Doc[Any], bytes]:
    doc: Doc[Any] = Doc(client_id=client)
    m = doc.get("m", type=Map)
    return doc, transact(doc, lambda: m.__setitem__("list", Array()))


def test_item_in_a_stored_shared_type_is_accepted() -> None:
    _, created = _shared_array()
    relay = Relay()
    relay.store_all([created])
    assert relay.ledger.types == {(D, 0)}
    writer: Doc[Any] = Doc(client_id=C)
    writer.apply_update(created)
    child = transact(writer, lambda: writer.get("m", type=Map)["list"].append("x"))
    assert check_update(child).parents == [(C, 0, D, 0)]
    info = check_update(child)
    assert not relay.ledger.overlaps(info)  # a known type needs no stored content
    assert relay.ledger.judge(child, info, ANON, []) == Verdict(child, [])
    relay.stored.append(child)
    assert map_of(relay.doc()) == {"list": ["x"]}


def test_item_in_a_stored_type_the_ledger_did_not_know_is_accepted() -> None:
    # a replica's ledger (of_state) knows clocks, not types: it reads them from the content
    _, created = _shared_array()
    relay = Relay(Ledger.of_state({D: 1}), [created])
    child = update_of(block(C, 0, in_parent(ANY, (D, 0), anys(any_str("x")))))
    assert relay.ledger.overlaps(check_update(child))
    assert relay.offer(child) == Verdict(child, [])
    assert relay.ledger.types == {(D, 0)}
    assert map_of(relay.doc()) == {"list": ["x"]}


def test_item_naming_a_stored_non_type_as_parent_is_refused() -> None:
    writer: Doc[Any] = Doc(client_id=D)
    relay = Relay()
    relay.store_all(keystrokes(writer, "ab"))
    child = update_of(block(C, 0, in_parent(ANY, (D, 1), anys(any_int(1)))))
    assert relay.ledger.overlaps(check_update(child))
    verdict = relay.offer(child)
    assert verdict == Verdict(
        None,
        [
            Refusal(
                C,
                0,
                1,
                f"item at client {C} clock 0 names ({D}, 1) as parent, which is not a shared type",
            )
        ],
    )
    with pytest.raises(RuntimeError, match="must be deleted or shared ref type"):
        doc_of([*relay.stored, child])  # premise: what it would have done
    assert text_of(relay.doc()) == "ab"


def test_item_naming_a_deleted_type_as_parent_is_accepted_where_it_is_known_as_a_type() -> None:
    # a deletes the list while b inserts into it; the relay holds a's compacted state
    a, created = _shared_array(D)
    b: Doc[Any] = Doc(client_id=C)
    b.apply_update(created)
    child = transact(b, lambda: b.get("m", type=Map)["list"].append("x"))
    transact(a, lambda: a.get("m", type=Map).pop("list"))
    snapshot = a.get_update()
    assert units(snapshot, D)[0] is WILDCARD  # premise: the type is gone
    # A relay that saw the list created knows it was a type: the child is harmless.
    relay = Relay()
    relay.store_all([created, snapshot])
    assert relay.offer(child) == Verdict(child, [])
    assert map_of(relay.doc()) == {}
    # One that only ever saw it deleted (a refill from a compacted copy) cannot tell a
    # deleted type from a deleted string, which a peer may still hold live: it refuses.
    relay = Relay()
    relay.store_all([snapshot])
    assert relay.ledger.types == set()
    [refusal] = relay.offer(child).refusals
    assert "a deleted item not known as a shared type" in refusal.reason
    # A replica judges its own document only, where the parent is deleted: it applies it.
    replica = Relay()
    replica.ledger.shared = False
    replica.store_all([snapshot])
    assert replica.offer(child) == Verdict(child, [])


def test_item_naming_a_deleted_non_type_as_parent_is_refused_by_a_relay_only() -> None:
    writer: Doc[Any] = Doc(client_id=D)
    keystrokes(writer, "ab")
    t = writer.get("t", type=Text)
    transact(writer, lambda: t.__delitem__(slice(0, 2)))
    child = update_of(block(C, 0, in_parent(ANY, (D, 1), anys(any_int(1)))))
    # A peer that still holds "b" live could not apply the child (the relay's concern)...
    relay = Relay()
    relay.store_all([writer.get_update()])
    [refusal] = relay.offer(child).refusals
    assert "a deleted item not known as a shared type" in refusal.reason
    # ...a replica where "b" is deleted can: Yjs and Yrs drop the child.
    replica = Relay()
    replica.ledger.shared = False
    replica.store_all([writer.get_update()])
    assert replica.offer(child) == Verdict(child, [])
    assert text_of(replica.doc()) == ""


def test_item_naming_a_clock_of_another_client_the_document_does_not_hold_is_refused() -> None:
    relay = Relay()
    relay.store_all(keystrokes(Doc(client_id=D), "ab"))
    for parent in [(D, 2), (E, 0)]:
        child = update_of(block(C, 0, in_parent(ANY, parent, anys(any_int(1)))))
        assert not relay.ledger.overlaps(check_update(child))
        verdict = relay.offer(child)
        assert verdict == Verdict(
            None,
            [
                Refusal(
                    C,
                    0,
                    1,
                    f"item at client {C} clock 0 names {parent} as parent, which this document "
                    "does not hold",
                )
            ],
        )
    assert relay.ledger.ranges == {D: [(0, 2)]}


def test_insert_into_another_writers_type_that_comes_before_the_type_waits_for_it() -> None:
    # b got the list from a directly (peer to peer, another relay), not through this relay:
    # its insert is refused until it comes with or after the list
    _, created = _shared_array(D)
    b: Doc[Any] = Doc(client_id=C)
    b.apply_update(created)
    child = transact(b, lambda: b.get("m", type=Map)["list"].append("x"))
    refusal = Refusal(
        C,
        0,
        1,
        f"item at client {C} clock 0 names ({D}, 0) as parent, which this document does not hold",
    )
    relay = Relay()
    assert relay.offer(child) == Verdict(None, [refusal])
    assert relay.offer(b.get_update()) == Verdict(b.get_update(), [])  # b's answer to step 1
    assert map_of(relay.doc()) == {"list": ["x"]}
    relay = Relay()
    assert relay.offer(child) == Verdict(None, [refusal])
    assert relay.offer(created) == Verdict(created, [])
    assert relay.offer(child) == Verdict(child, [])  # resent
    assert map_of(relay.doc()) == {"list": ["x"]}


def _claimed() -> tuple[Relay, bytes, bytes]:
    """C creates a list (clock 0) and inserts into it (clock 1); the insert arrives first."""
    writer: Doc[Any] = Doc(client_id=C)
    m = writer.get("m", type=Map)
    created = transact(writer, lambda: m.__setitem__("list", Array()))
    child = transact(writer, lambda: m["list"].append("x"))
    assert check_update(child).parents == [(C, 1, C, 0)]
    relay = Relay()
    verdict = relay.offer(child)
    assert verdict == Verdict(child, [])
    return relay, created, child


def test_item_naming_its_own_unstored_clock_is_accepted_as_a_claim() -> None:
    relay, created, _ = _claimed()
    assert relay.ledger.claims == {C: {0}}
    assert relay.ledger.new_types == [(C, 0, True)]
    assert relay.ledger.ranges == {C: [(1, 2)]}
    assert relay.offer(created) == Verdict(created, [])  # the claimed type arrives
    assert relay.ledger.claims == {}
    assert relay.ledger.types == {(C, 0)}
    assert relay.ledger.new_types == [(C, 0, True), (C, 0, False)]
    assert map_of(relay.doc()) == {"list": ["x"]}


def test_non_type_content_on_a_claimed_clock_is_refused() -> None:
    relay, created, _ = _claimed()
    forger: Doc[Any] = Doc(client_id=C)
    text = transact(forger, lambda: forger.get("t", type=Text).insert(0, "h"))
    verdict = relay.offer(text)
    assert verdict == Verdict(
        None,
        [
            Refusal(
                C,
                0,
                1,
                f"client {C} clock 0 was named as a parent before it was written, and the "
                "content now written there is not a shared type",
            )
        ],
    )
    assert relay.ledger.claims == {C: {0}}
    assert relay.offer(created) == Verdict(created, [])
    assert map_of(relay.doc()) == {"list": ["x"]}


def test_other_type_content_on_a_claimed_clock_is_accepted() -> None:
    # the claim asks for a shared type, not for the one the child expected
    relay, _, _ = _claimed()
    other: Doc[Any] = Doc(client_id=C)
    other_type = transact(other, lambda: other.get("n", type=Map).__setitem__("q", Text()))
    assert relay.offer(other_type) == Verdict(other_type, [])
    assert relay.ledger.claims == {}
    doc = relay.doc()  # the child, an array value in a text, applies; pycrdt hides it
    assert doc.get("n", type=Map).to_py() == {"q": ""}


@pytest.mark.xfail(
    strict=True,
    reason=(
        "BUG (found by test_random_honest_histories_are_stored_whole): client 902 sets "
        "map key n to a type (902, 1), then overwrites it with another (902, 2); the relay "
        "gets the first only deleted, in a merged update, so it never learns (902, 1) was a "
        "type; client 1's concurrent insert into it is refused as 'a deleted item not "
        "known as a shared type' and stays pending for good. The relay cannot tell a "
        "deleted type from deleted Any content (a child of which would break a peer that "
        "still holds it live); a replica that knew it as a type could vouch for it"
    ),
)
def test_insert_into_a_type_the_relay_only_saw_deleted_is_accepted() -> None:
    relay = Relay()
    deliveries = [
        "0101010008010161017e00",
        "0101010008010161017e00",
        "010186070004010174016100",
        "0101010008010161017e00",
        "02038607000401017401612101016d016e01a786070100010100010101610102010100018607010101",
        "000101010001",
        "01010107440105016100",
        "010101062801016d0161017e00",
        "01010104440103016100",
    ]
    for hex_update in deliveries:
        assert not relay.offer(bytes.fromhex(hex_update)).refusals
    verdict = relay.offer(bytes.fromhex("010101080800860701017900"))
    assert not verdict.refusals


def test_deleted_content_on_a_claimed_clock_is_accepted() -> None:
    writer: Doc[Any] = Doc(client_id=C)
    m = writer.get("m", type=Map)
    transact(writer, lambda: m.__setitem__("n", Array()))  # clock 0, never reaches the relay
    child = transact(writer, lambda: m["n"].append(None))  # clock 1, names clock 0
    transact(writer, lambda: m.__setitem__("n", Array()))  # clock 2: clock 0 deleted
    state = writer.get_update()  # the writer's answer to the relay's step 1
    assert child == bytes.fromhex("0101070108000700017e00")
    assert state == bytes.fromhex("010307002101016d016e010001a70700000107010002")
    assert units(state, C)[0] is WILDCARD  # premise
    assert map_of(doc_of([child, state])) == {"n": []}  # pycrdt applies both
    relay = Relay()
    assert relay.offer(child) == Verdict(child, [])
    assert relay.ledger.claims == {C: {0}}
    verdict = relay.offer(state)
    assert verdict.refusals == []


def test_item_naming_a_non_type_written_by_the_same_update_is_refused() -> None:
    # C writes "a" at clock 0 and, in the same update, an item whose parent is clock 0
    poison = update_of(
        block(C, 0, in_root(STRING, vs("a")), in_parent(ANY, (C, 0), anys(any_int(1))))
    )
    with pytest.raises(RuntimeError, match="must be deleted or shared ref type"):
        doc_of([poison])
    relay = Relay()
    verdict = relay.offer(poison)
    assert verdict.update is None
    assert refused_clients(verdict) == {C}
    assert relay.ledger.ranges == {}
    assert relay.ledger.claims == {}


def test_child_of_a_type_refused_in_the_same_update_is_refused_too() -> None:
    owner: Doc[Any] = Doc(client_id=C)
    relay = Relay()
    relay.store_all(keystrokes(owner, "a"), OWNER)
    # someone else creates a type under C's next clock, and an item of D inside it
    forged = update_of(
        block(C, 1, in_root(TYPE, ARRAY_TYPE, "m", "list")),
        block(D, 0, in_parent(ANY, (C, 1), anys(any_int(1)))),
    )
    verdict = relay.offer(forged, ANON)
    assert refused_clients(verdict) == {C, D}
    assert verdict.update is None
    assert relay.ledger.ranges == {C: [(0, 1)]}


def test_child_of_a_type_created_in_the_same_update_is_accepted() -> None:
    update = update_of(
        block(C, 0, in_root(TYPE, ARRAY_TYPE, "m", "list")),
        block(D, 0, in_parent(ANY, (C, 0), anys(any_int(1)))),
    )
    relay = Relay()
    assert relay.offer(update) == Verdict(update, [])
    assert relay.ledger.types == {(C, 0)}
    assert map_of(relay.doc()) == {"list": [1]}


@pytest.mark.parametrize("stored", ["nothing", "the deleting snapshot"])
def test_merge_of_a_deleted_type_and_a_concurrent_insert_into_it(stored: str) -> None:
    a, created = _shared_array(D)
    b: Doc[Any] = Doc(client_id=C)
    b.apply_update(created)
    child = transact(b, lambda: b.get("m", type=Map)["list"].append("x"))
    transact(a, lambda: a.get("m", type=Map).pop("list"))
    snapshot = a.get_update()
    merged = merge_updates(snapshot, child)
    assert map_of(doc_of([merged])) == {}  # pycrdt applies it
    relay = Relay()
    if stored != "nothing":
        relay.store_all([snapshot])
    verdict = relay.offer(merged)
    if stored == "nothing":
        assert verdict.refusals == []  # the list arrives deleted with its child
    else:
        # The store holds the list deleted and never saw it as a type: see
        # test_item_naming_a_deleted_type_as_parent_is_accepted.
        assert [r.client for r in verdict.refusals] == [C]


def test_repeat_naming_a_deleted_parent_of_its_own_client_records_no_claim() -> None:
    writer: Doc[Any] = Doc(client_id=C)
    m = writer.get("m", type=Map)
    transact(writer, lambda: m.__setitem__("list", Array()))
    child = transact(writer, lambda: m["list"].append("x"))
    transact(writer, lambda: m.pop("list"))
    relay = Relay()
    relay.store_all([writer.get_update()])  # the compacted state: the list is gone
    relay.ledger.clean()
    assert relay.offer(child) == Verdict(None, [], trimmed=True)
    assert relay.ledger.claims == {}
    assert relay.ledger.new_types == []


def test_type_repeated_over_a_collected_clock_lets_pycrdt_drop_its_children() -> None:
    # a GC'd clock matches anything, so a type can be "repeated" there; an item naming it
    # as parent is then accepted, and pycrdt drops it instead of failing
    gc = update_of(block(E, 0, bytes([0]) + vu(1)))
    as_type = update_of(block(E, 0, in_root(TYPE, ARRAY_TYPE, "m", "list")))
    child = update_of(block(D, 0, in_parent(ANY, (E, 0), anys(any_int(1)))))
    relay = Relay()
    relay.store_all([gc])
    assert relay.offer(as_type) == Verdict(None, [], trimmed=True)
    assert relay.offer(child) == Verdict(child, [])
    for order in (relay.stored, relay.stored[::-1]):
        assert map_of(doc_of(order)) == {}


# -- gaps --------------------------------------------------------------------------------------


def test_gap_update_is_accepted_and_recorded_with_a_hole_then_filled() -> None:
    writer: Doc[Any] = Doc(client_id=C)
    t = writer.get("t", type=Text)
    words = [transact(writer, lambda w=w: t.insert(len(t), w)) for w in ("ab", "cd", "ef")]
    relay = Relay()
    assert relay.offer(words[2]) == Verdict(words[2], [])
    assert relay.ledger.ranges == {C: [(4, 6)]}
    assert relay.offer(words[0]) == Verdict(words[0], [])
    assert relay.ledger.ranges == {C: [(0, 2), (4, 6)]}
    assert relay.offer(words[2]) == Verdict(None, [], trimmed=True)
    assert relay.offer(words[1]) == Verdict(words[1], [])
    assert relay.ledger.ranges == {C: [(0, 6)]}
    assert relay.offer(writer.get_update()) == Verdict(None, [], trimmed=True)
    assert text_of(relay.doc()) == "abcdef"


def test_rewrite_of_a_clock_after_a_hole_is_refused() -> None:
    writer: Doc[Any] = Doc(client_id=C)
    typed = keystrokes(writer, "abcdef")
    relay = Relay()
    relay.store_all([typed[0], typed[4]])  # clocks 0 and 4
    forger: Doc[Any] = Doc(client_id=C)
    forger.apply_update(merge_updates(*typed[:4]))
    forged = keystrokes(forger, "X")[0]  # clock 4
    verdict = relay.offer(merge_updates(*typed[:4], forged))
    assert refused_clients(verdict) == {C}
    assert verdict.refusals[0].reason.startswith(f"client {C} clock 4 rewritten")
    assert relay.ledger.ranges == {C: [(0, 1), (4, 5)]}
    relay.store_all(typed)
    assert text_of(relay.doc()) == "abcdef"


def _at_the_gap_limit() -> Relay:
    """A relay holding every other clock of C: MAX_RANGES_PER_CLIENT ranges."""
    relay = Relay()
    for k in range(MAX_RANGES_PER_CLIENT):
        relay.store_all([update_of(block(C, 2 * k, in_root(STRING, vs("a"))))])
    assert len(relay.ledger.ranges[C]) == MAX_RANGES_PER_CLIENT
    return relay


def test_client_at_the_gap_limit_is_refused_another_gap() -> None:
    relay = _at_the_gap_limit()
    end = 2 * MAX_RANGES_PER_CLIENT - 1
    verdict = relay.offer(update_of(block(C, end + 5, in_root(STRING, vs("a")))))
    assert verdict == Verdict(
        None,
        [
            Refusal(
                C,
                end + 5,
                end + 6,
                f"client {C} would leave more than {MAX_RANGES_PER_CLIENT} gaps in its clocks: "
                "fill them first",
            )
        ],
    )
    assert len(relay.ledger.ranges[C]) == MAX_RANGES_PER_CLIENT


@pytest.mark.parametrize("where", ["fill", "append"])
def test_client_at_the_gap_limit_may_still_fill_a_gap_or_append(where: str) -> None:
    relay = _at_the_gap_limit()
    clock = 1 if where == "fill" else 2 * MAX_RANGES_PER_CLIENT - 1
    update = update_of(block(C, clock, after(STRING, (C, clock - 1), vs("a"))))
    assert relay.offer(update) == Verdict(update, [])


# -- what the verdict keeps --------------------------------------------------------------------


def test_trimmed_update_is_exactly_the_new_suffix() -> None:
    writer: Doc[Any] = Doc(client_id=C)
    typed = keystrokes(writer, "abc")
    relay = Relay()
    relay.store_all(typed)
    more = keystrokes(writer, "def")
    verdict = relay.offer(writer.get_update())
    assert verdict.refusals == []
    assert verdict.trimmed
    assert verdict.update is not None
    assert units(verdict.update, C) == units(merge_updates(*more), C)  # "def", one item
    kept = check_update(verdict.update)
    assert (kept.starts, kept.state) == ({C: 3}, {C: 6})
    assert text_of(relay.doc()) == "abcdef"
    assert verdict.accepted_whole


def test_fully_repeated_update_with_deletes_keeps_only_the_deletes() -> None:
    writer: Doc[Any] = Doc(client_id=C)
    typed = keystrokes(writer, "abc")
    relay = Relay()
    relay.store_all(typed)
    t = writer.get("t", type=Text)
    transact(writer, lambda: t.__delitem__(slice(1, 2)))
    verdict = relay.offer(writer.get_update())
    assert verdict.refusals == []
    assert verdict.trimmed
    assert verdict.update == b"\x00\x01\x07\x01\x01\x01"  # no structs; delete (C, 1)
    assert text_of(relay.doc()) == "ac"


def test_empty_and_delete_only_updates_are_kept_as_they_are() -> None:
    relay = Relay()
    assert relay.offer(b"\x00\x00") == Verdict(b"\x00\x00", [])
    deletes = b"\x00\x01\x07\x01\x00\x01"
    assert relay.offer(deletes) == Verdict(deletes, [])
    assert relay.ledger.ranges == {}


# -- the ledger, rebuilt and stored ------------------------------------------------------------


def _mixed_history() -> list[bytes]:
    a: Doc[Any] = Doc(client_id=C)
    b: Doc[Any] = Doc(client_id=D)
    updates = keystrokes(a, "abc")
    m = a.get("m", type=Map)
    updates.append(transact(a, lambda: m.__setitem__("list", Array([Text("t")]))))
    updates.append(transact(a, lambda: m["list"][0].insert(1, "u")))
    b.apply_update(a.get_update())
    updates.append(transact(b, lambda: b.get("m", type=Map)["list"].append(Map({"k": 1}))))
    updates += keystrokes(b, "de")
    updates.append(transact(a, lambda: a.get("t", type=Text).__delitem__(slice(0, 1))))
    return updates


def test_of_updates_builds_the_ledger_that_judging_one_by_one_builds() -> None:
    updates = _mixed_history()
    order = [updates[i] for i in (4, 0, 5, 2, 1, 7, 3, 6, 8)]  # with gaps on the way
    assert sorted(order) == sorted(updates)
    judged = Relay()
    judged.store_all(order)
    rebuilt = Ledger.of_updates(order)
    assert rebuilt.ranges == judged.ledger.ranges == {C: [(0, 7)], D: [(0, 4)]}
    assert rebuilt.types == judged.ledger.types == {(C, 3), (C, 4), (D, 0)}
    assert rebuilt.claims == judged.ledger.claims == {}
    assert rebuilt.owners == judged.ledger.owners == {}
    assert rebuilt.dirty == {C, D}
    assert not rebuilt.known


def test_of_state_holds_every_clock_below_the_state_vector() -> None:
    ledger = Ledger.of_state({C: 3, D: 0, E: 1})
    assert ledger.ranges == {C: [(0, 3)], E: [(0, 1)]}
    assert ledger.types == set()
    assert ledger.owners == {}


def test_clean_forgets_what_changed() -> None:
    relay = Relay()
    relay.store_all(_mixed_history()[:4])
    assert relay.ledger.dirty == {C}
    assert relay.ledger.new_types == [(C, 3, False), (C, 4, False)]
    relay.ledger.clean()
    assert relay.ledger.dirty == set()
    assert relay.ledger.new_types == []
    assert relay.ledger.types == {(C, 3), (C, 4)}


def test_client_id_of_key_is_a_53_bit_hash_of_the_key() -> None:
    key = bytes(range(32))
    expected = int.from_bytes(
        hashlib.sha256(b"crdtsync client id\x00" + key).digest()[:8], "big"
    ) & (2**53 - 1)
    assert client_id_of_key(key) == expected == client_id_of_key(bytes(range(32)))
    assert client_id_of_key(key) == 800836872305318  # fixed: ids must not change
    rng = random.Random(1)
    ids = {client_id_of_key(rng.randbytes(32)) for _ in range(2000)}
    assert len(ids) == 2000
    assert all(0 <= i < 2**53 for i in ids)
    assert max(ids).bit_length() == 53  # all 53 bits are used


@pytest.mark.parametrize("size", [0, 16, 31, 33, 64])
def test_client_id_of_key_refuses_keys_that_are_not_32_bytes(size: int) -> None:
    with pytest.raises(ValueError, match=f"a client key has 32 bytes, not {size}"):
        client_id_of_key(bytes(size))


def test_encode_ranges_packs_unsigned_64_bit_pairs() -> None:
    assert encode_ranges([]) == b""
    assert decode_ranges(b"") == []
    assert encode_ranges([(1, 2)]) == struct.pack("<2Q", 1, 2)
    assert decode_ranges(encode_ranges([(0, 5), (7, 2**32)])) == [(0, 5), (7, 2**32)]


@PROPERTY
@given(st.lists(st.tuples(st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1)), max_size=20))
def test_decode_ranges_undoes_encode_ranges(ranges: list[tuple[int, int]]) -> None:
    data = encode_ranges(ranges)
    assert len(data) == 16 * len(ranges)
    assert decode_ranges(data) == ranges


# -- after refusals, honest writers go on ------------------------------------------------------


def test_honest_writer_continues_after_a_refused_rewrite() -> None:
    honest: Doc[Any] = Doc(client_id=C)
    relay = Relay()
    relay.store_all(keystrokes(honest, "safe"))
    forger: Doc[Any] = Doc(client_id=C)
    forger.apply_update(merge_updates(*relay.stored[:2]))
    forged = merge_updates(*keystrokes(forger, "XXXXXX"))  # clocks 2-7: 2-3 rewritten
    before = relay.snapshot()
    assert refused_clients(relay.offer(forged)) == {C}
    assert relay.snapshot() == before
    for update in keystrokes(honest, " and sound"):
        assert relay.offer(update) == Verdict(update, [])  # the fast path
    assert relay.offer(honest.get_update()) == Verdict(None, [], trimmed=True)
    assert text_of(relay.doc()) == "safe and sound"
    assert refused_clients(relay.offer(forged)) == {C}


def test_owner_continues_after_a_refused_impersonation() -> None:
    owner: Doc[Any] = Doc(client_id=C)
    relay = Relay()
    relay.store_all(keystrokes(owner, "ab"), OWNER)
    forger: Doc[Any] = Doc(client_id=C)
    forger.apply_update(owner.get_update())
    forged = merge_updates(*keystrokes(forger, "XY"))
    assert refused_clients(relay.offer(forged, ANON)) == {C}
    assert relay.ledger.ranges == {C: [(0, 2)]}
    for update in keystrokes(owner, "cd"):
        assert relay.offer(update, OWNER) == Verdict(update, [])
    assert text_of(relay.doc()) == "abcd"


def test_stored_content_is_never_loaded_for_appends_and_gaps() -> None:
    def load() -> list[bytes]:
        raise AssertionError("the stored content was loaded")

    ledger = Ledger()
    writer: Doc[Any] = Doc(client_id=C)
    typed = keystrokes(writer, "abcdef")
    for update in [*typed[:3], typed[5], typed[3]]:
        assert ledger.judge(update, check_update(update), ANON, load) == Verdict(update, [])
    assert ledger.ranges == {C: [(0, 4), (5, 6)]}


def test_overlaps_says_when_the_stored_content_is_needed() -> None:
    writer: Doc[Any] = Doc(client_id=C)
    typed = keystrokes(writer, "abcd")
    relay = Relay()
    relay.store_all(typed[:2])
    ledger = relay.ledger
    assert not ledger.overlaps(check_update(typed[2]))  # append
    assert not ledger.overlaps(check_update(typed[3]))  # gap
    assert ledger.overlaps(check_update(typed[1]))  # repeat
    assert ledger.overlaps(check_update(merge_updates(*typed)))
    assert not ledger.overlaps(check_update(get_update(merge_updates(*typed), sv({C: 2}))))
    named = update_of(block(D, 0, in_parent(ANY, (C, 0), anys(any_int(1)))))
    assert ledger.overlaps(check_update(named))  # a stored clock not known as a type
    unknown = update_of(block(D, 0, in_parent(ANY, (E, 0), anys(any_int(1)))))
    assert not ledger.overlaps(check_update(unknown))


# -- properties: random honest histories -------------------------------------------------------

ALPHABET = "ab é😀"
KEYS = "abc"
any_leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**53) + 1, 2**53 - 1),
    st.floats(allow_nan=False, width=64),
    st.text(ALPHABET, max_size=4),
    st.binary(max_size=4),
)
any_value = st.recursive(
    any_leaf,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(KEYS, max_size=2), inner, max_size=3)
    ),
    max_leaves=6,
)


def _byte_offset(text: str, index: int) -> int:
    return len(text[:index].encode())


def _random_edit(data: st.DataObject, doc: Doc[Any]) -> Callable[[], object] | None:
    """One edit of ``doc`` drawn from ``data`` (None: nothing to do)."""
    t = doc.get("t", type=Text)
    m = doc.get("m", type=Map)
    a = doc.get("a", type=Array)
    kind = data.draw(
        st.sampled_from(
            ["insert", "insert", "delete", "set", "unset", "push", "pop", "nest", "nested"]
        )
    )
    current = str(t)
    if kind == "insert":
        index = data.draw(st.integers(0, len(current)))
        chars = data.draw(st.text(ALPHABET, min_size=1, max_size=3))
        return lambda: t.insert(_byte_offset(current, index), chars)
    if kind == "delete" and current:
        start = data.draw(st.integers(0, len(current) - 1))
        stop = data.draw(st.integers(start + 1, min(len(current), start + 3)))
        return lambda: t.__delitem__(
            slice(_byte_offset(current, start), _byte_offset(current, stop))
        )
    if kind == "set":
        key = data.draw(st.sampled_from(KEYS))
        value = data.draw(any_value)
        return lambda: m.__setitem__(key, value)
    if kind == "unset":
        present = sorted(k for k in m if k in KEYS)
        if present:
            key = data.draw(st.sampled_from(present))
            return lambda: m.pop(key)
    if kind == "push":
        index = data.draw(st.integers(0, len(a)))
        value = data.draw(any_value)
        return lambda: a.insert(index, value)
    if kind == "pop" and len(a):
        index = data.draw(st.integers(0, len(a) - 1))
        return lambda: a.__delitem__(index)
    if kind == "nest":
        shape = data.draw(st.sampled_from(["array", "text", "map"]))
        make = {"array": Array, "text": Text, "map": Map}[shape]
        return lambda: m.__setitem__("n", make())
    if kind == "nested" and "n" in m:
        nested = m["n"]
        if isinstance(nested, Array):
            value = data.draw(any_value)
            return lambda: nested.append(value)
        if isinstance(nested, Text):
            chars = data.draw(st.text(ALPHABET, min_size=1, max_size=2))
            return lambda: nested.insert(0, chars)
        if isinstance(nested, Map):
            key = data.draw(st.sampled_from(KEYS))
            number = data.draw(st.integers(0, 9))
            return lambda: nested.__setitem__(key, number)
    return None


def _sync(source: Doc[Any], target: Doc[Any]) -> None:
    target.apply_update(source.get_update(target.get_state()))


NOT_HELD = re.compile(
    r"item at client (\d+) clock \d+ names \((\d+), (\d+)\) as parent, "
    r"which this document does not hold"
)
SAME_UPDATE = re.compile(
    r"item at client (\d+) clock \d+ names \((\d+), (\d+)\) as parent, "
    r"which the same update writes as no shared type"
)
DELETED_PARENT = re.compile(
    r"item at client (\d+) clock \d+ names \((\d+), (\d+)\) as parent, "
    r"a deleted item not known as a shared type"
)
CLAIM_BROKEN = re.compile(
    r"client (\d+) clock (\d+) was named as a parent before it was written, "
    r"and the content now written there is not a shared type"
)


class Deliveries:
    """Feeds a relay and checks each verdict; keeps a log for the failure message.

    ``causal``: every update reaches the relay after the updates it depends on.
    Otherwise one refusal is expected, by design: an item that names as parent a shared
    type of another client that the relay does not hold yet. Two more are let through
    because they are known bugs, pinned by their own xfail tests, which the properties
    would otherwise find again now and then: a deleted parent in the same update
    (test_merge_of_a_deleted_type_and_a_concurrent_insert_into_it_is_accepted) and a
    deleted claimed clock (test_deleted_content_on_a_claimed_clock_is_accepted). All
    three reach the relay again later, with what they need.
    """

    def __init__(self, causal: bool) -> None:
        self.causal = causal
        self.relay = Relay()
        self.log: list[str] = []
        self.refused: dict[str, int] = {"early child": 0, "known bug": 0}

    def offer(self, what: str, update: bytes) -> Verdict:
        info = check_update(update)
        ledger = self.relay.ledger
        held = copy.deepcopy(ledger.ranges)
        claims = copy.deepcopy(ledger.claims)
        # judging with all stored content must agree with judging as the relay does
        full = copy.deepcopy(ledger).judge(update, info, ANON, list(self.relay.stored))
        verdict = self.relay.offer(update)
        self.log.append(f"{what}: {update.hex()} -> {verdict.refusals or 'ok'}")
        note(self.log[-1])
        context = f"delivery {len(self.log)} ({what}); deliveries:\n" + "\n".join(self.log)
        for refusal in verdict.refusals:
            kind = self._why(refusal, update, held, claims)
            assert kind is not None, f"honest update refused: {context}"
            self.refused[kind] += 1
            event(f"refused: {kind}")
        assert (verdict.refusals, verdict.trimmed) == (full.refusals, full.trimmed), context
        assert same_content(verdict.update, full.update), (
            f"judged differently with all stored content: {verdict} vs {full}; {context}"
        )
        return verdict

    def _why(
        self,
        refusal: Refusal,
        update: bytes,
        held: dict[int, list[tuple[int, int]]],
        claims: dict[int, set[int]],
    ) -> str | None:
        """Which expected refusal this is (None: none)."""
        match = NOT_HELD.fullmatch(refusal.reason)
        if match is not None and not self.causal:
            client, parent = int(match[1]), (int(match[2]), int(match[3]))
            if client == refusal.client != parent[0] and not any(
                lo <= parent[1] < hi for lo, hi in held.get(parent[0], [])
            ):
                return "early child"
        match = SAME_UPDATE.fullmatch(refusal.reason)
        if match is not None:
            parent = (int(match[2]), int(match[3]))
            if units(update, parent[0]).get(parent[1]) is WILDCARD:
                return "known bug"
        if DELETED_PARENT.fullmatch(refusal.reason) is not None:
            # test_insert_into_a_type_the_relay_only_saw_deleted_is_accepted
            return "known bug"
        match = CLAIM_BROKEN.fullmatch(refusal.reason)
        if match is not None:
            claimed = (int(match[1]), int(match[2]))
            if (
                claimed[1] in claims.get(claimed[0], ())
                and units(update, claimed[0]).get(claimed[1]) is WILDCARD
            ):
                return "known bug"
        return None


@PROPERTY
@given(data=st.data())
def test_random_honest_histories_are_stored_whole(data: st.DataObject) -> None:
    """Writers edit and sync; the relay gets their updates, repeats, merges and catch-ups.

    Causal deliveries are never refused (but for known bugs, see :class:`Deliveries`). In
    random order, only children that arrive before the type they are in (another
    client's) are refused, and come again later. Either way the relay ends up with
    exactly the writers' content.
    """
    causal = data.draw(st.booleans(), label="causal")
    ids = data.draw(
        st.lists(st.integers(1, 2**53 - 1), min_size=2, max_size=3, unique=True), label="clients"
    )
    docs: list[Doc[Any]] = [Doc(client_id=i) for i in ids]
    produced: list[bytes] = []  # every writer's transactions and what else a system sends
    undelivered: list[bytes] = []
    states: list[bytes] = [sv({})]
    out = Deliveries(causal)
    for _ in range(data.draw(st.integers(10, 60), label="steps")):
        action = data.draw(st.sampled_from(["edit", "edit", "edit", "sync", "deliver", "deliver"]))
        if action == "edit":
            doc = data.draw(st.sampled_from(docs))
            edit = _random_edit(data, doc)
            if edit is None:
                continue
            update = transact(doc, edit)
            produced.append(update)
            if causal:
                out.offer("own", update)
            else:
                undelivered.append(update)
        elif action == "sync":
            source, target = data.draw(st.permutations(docs))[:2]
            seen: list[bytes] = []
            sub = target.observe(lambda event, seen=seen: seen.append(event.update))
            _sync(source, target)
            target.unobserve(sub)
            produced.extend(seen)  # the target's own record of what it received
            states.append(target.get_state())
        else:
            form = data.draw(
                st.sampled_from(["next", "next", "duplicate", "merge", "diff", "full"])
            )
            if form == "next" and undelivered:
                update = undelivered.pop(data.draw(st.integers(0, len(undelivered) - 1)))
                out.offer(form, update)
            elif form == "duplicate" and produced:
                out.offer(form, data.draw(st.sampled_from(produced)))
            elif form == "merge" and produced:
                parts = data.draw(st.lists(st.sampled_from(produced), min_size=1, max_size=6))
                out.offer(form, merge_updates(*parts))
            elif form == "diff":
                doc = data.draw(st.sampled_from(docs))
                produced.append(doc.get_update(data.draw(st.sampled_from(states))))
                out.offer(form, produced[-1])
            elif form == "full":
                produced.append(data.draw(st.sampled_from(docs)).get_update())
                out.offer(form, produced[-1])
    rng = random.Random(data.draw(st.integers(0, 2**32), label="final order"))
    rng.shuffle(undelivered)
    for update in undelivered:
        out.offer("last", update)
    for _ in range(2):
        for source in docs:
            for target in docs:
                if source is not target:
                    _sync(source, target)
    for doc in docs:
        out.offer("final full", doc.get_update())
    expected = view(docs[0])
    assert all(view(doc) == expected for doc in docs[1:]), "the writers did not converge"
    relay = out.relay
    state = decode_state_vector(docs[0].get_state())
    assert relay.ledger.ranges == {c: [(0, clock)] for c, clock in state.items() if clock}
    note(f"expected refusals: {out.refused}")
    relay.doc()  # applying what was stored, in order, never raises
    # pycrdt 0.14.13 may keep content that arrived before what it follows pending, even
    # once the gap is filled (tests/test_proxy.py pins one such case): the content is
    # compared as compaction would see it, in one update
    stored = doc_of([merge_updates(*relay.stored)])
    assert view(stored) == expected, "the stored updates do not give the writers' content"


# -- properties: a second writer of one client id ----------------------------------------------


def _fork_edit(data: st.DataObject, doc: Doc[Any], fork: str) -> Callable[[], object]:
    """An edit whose every new unit differs from any unit the other fork writes.

    The honest fork writes lowercase letters, lowercase keys and numbers; the rewriting
    fork uppercase letters, uppercase keys and strings. No edit deletes in the same
    transaction as it inserts, no nested types (no parents by id).
    """
    t = doc.get("t", type=Text)
    m = doc.get("m", type=Map)
    a = doc.get("a", type=Array)
    upper = fork == "R"
    kind = data.draw(st.sampled_from(["insert", "insert", "delete", "set", "push"]))
    current = str(t)
    if kind == "delete" and current:
        start = data.draw(st.integers(0, len(current) - 1))
        return lambda: t.__delitem__(slice(start, start + 1))
    if kind == "set":
        key = data.draw(st.sampled_from("XY" if upper else "xy"))
        value: Any = (
            data.draw(st.text("PQ", min_size=1, max_size=2))
            if upper
            else data.draw(st.integers(0, 9))
        )
        return lambda: m.__setitem__(key, value)
    if kind == "push":
        index = data.draw(st.integers(0, len(a)))
        value = "R" if upper else data.draw(st.integers(0, 9))
        return lambda: a.insert(index, value)
    index = data.draw(st.integers(0, len(current)))
    chars = data.draw(st.text("XYZ" if upper else "xyz", min_size=1, max_size=3))
    return lambda: t.insert(index, chars)


@PROPERTY
@given(data=st.data())
def test_rewrites_by_a_second_writer_of_one_client_id_are_always_refused(
    data: st.DataObject,
) -> None:
    proven = data.draw(st.booleans(), label="the honest writer proves its key")
    honest: Doc[Any] = Doc(client_id=C)
    other: Doc[Any] = Doc(client_id=D)
    sent: list[tuple[str, bytes]] = []  # (fork, update) in the order written

    def sync_honest_and_other() -> None:
        _sync(other, honest)
        _sync(honest, other)

    for _ in range(data.draw(st.integers(0, 6), label="common edits")):
        doc, fork = data.draw(st.sampled_from([(honest, "H"), (other, "O")]))
        sent.append((fork, transact(doc, _fork_edit(data, doc, fork))))
        if data.draw(st.booleans()):
            sync_honest_and_other()
    fork_clock = decode_state_vector(honest.get_state()).get(C, 0)
    rewriter: Doc[Any] = Doc(client_id=C)
    rewriter.apply_update(honest.get_update())
    for _ in range(data.draw(st.integers(1, 20), label="edits after the fork")):
        doc, fork = data.draw(
            st.sampled_from([(honest, "H"), (rewriter, "R"), (rewriter, "R"), (other, "O")])
        )
        sent.append((fork, transact(doc, _fork_edit(data, doc, fork))))
        if data.draw(st.booleans()):
            sync_honest_and_other()
        if data.draw(st.booleans()):  # the rewriter gets the other writer's own edits
            for fork, update in sent:
                if fork == "O":
                    rewriter.apply_update(update)
    # deliveries: every update at least once, in random order, some duplicated, some
    # merged with the next updates of the same fork
    deliveries: list[tuple[str, bytes]] = []
    order = data.draw(st.permutations(range(len(sent))), label="delivery order")
    for i in order:
        fork, update = sent[i]
        if data.draw(st.booleans(), label="merge with the fork's next updates"):
            later = [u for f, u in sent[i + 1 : i + 3] if f == fork]
            if later:
                update = merge_updates(update, *later)
        deliveries.append((fork, update))
        if data.draw(st.integers(0, 4)) == 0:
            deliveries.append((fork, update))
    writers = {"H": OWNER if proven else ANON, "R": ANON, "O": ANON}
    relay = Relay()
    replica: Doc[Any] = Doc()  # fed exactly what was accepted
    stored: dict[int, str] = {}  # clock of C -> the fork whose content the relay holds there
    deleted: set[int] = set()  # clocks of C the relay holds as deleted
    owned = False
    log: list[str] = []
    for n, (fork, update) in enumerate(deliveries):
        info = check_update(update)
        clocks = [k for lo, hi in info.ranges(C) for k in range(lo, hi)] if C in info.state else []
        mine = units(update, C)
        # a unit deleted on either side matches anything (the rewriter's Doc, fed the
        # other writer's items next to clocks it wrote differently, may write some)
        rewritten = [
            k
            for k in clocks
            if stored.get(k, fork) != fork and mine[k] is not WILDCARD and k not in deleted
        ]
        new = [k for k in clocks if k not in stored]
        expect_refused = bool(rewritten) or (fork == "R" and owned and bool(new))
        verdict = relay.offer(update, writers[fork])
        log.append(f"{n}: {fork} {update.hex()} clocks {clocks} -> {verdict.refusals}")
        note(log[-1])
        context = f"fork at clock {fork_clock}; deliveries:\n" + "\n".join(log)
        assert refused_clients(verdict) == ({C} if expect_refused else set()), context
        if not expect_refused:
            for k in new:
                stored[k] = fork
                if mine[k] is WILDCARD:
                    deleted.add(k)
            if proven and fork == "H" and new:
                owned = True
        if verdict.update is not None:
            replica.apply_update(verdict.update)  # never raises
    view(replica)
    assert sorted(k for k, fork in stored.items() if k >= fork_clock) == [
        k for lo, hi in relay.ledger.ranges.get(C, []) for k in range(lo, hi) if k >= fork_clock
    ]
    if proven and owned:
        assert relay.ledger.owners == {C: KEY_OWNER}


# -- property: Any values ----------------------------------------------------------------------


def _canonical(value: Any) -> Any:
    """Yjs equality of an Any value as pycrdt writes it (ints become floats)."""
    if value is None:
        return ("null",)
    if isinstance(value, bool):
        return ("b", value)
    if isinstance(value, (int, float)):
        return ("n", float(value))
    if isinstance(value, (bytes, bytearray)):
        return ("y", bytes(value))
    if isinstance(value, str):
        return ("s", value)
    if isinstance(value, list):
        return ("a", tuple(_canonical(v) for v in value))
    return ("o", tuple(sorted((k, _canonical(v)) for k, v in value.items())))


@PROPERTY
@given(any_value, any_value)
def test_any_value_repeats_are_trimmed_and_other_values_refused(first: Any, second: Any) -> None:
    writer: Doc[Any] = Doc(client_id=C)
    original = transact(writer, lambda: writer.get("m", type=Map).__setitem__("k", first))
    relay = Relay()
    relay.store_all([original])
    for form, repeat in reencodings([original]).items():
        assert relay.offer(repeat) == Verdict(None, [], trimmed=True), form
    forger: Doc[Any] = Doc(client_id=C)
    other = transact(forger, lambda: forger.get("m", type=Map).__setitem__("k", second))
    verdict = relay.offer(other)
    if _canonical(first) == _canonical(second):
        assert verdict == Verdict(None, [], trimmed=True)
    else:
        assert refused_clients(verdict) == {C}, f"{first!r} rewritten as {second!r} accepted"
    assert doc_of(relay.stored).get("m", type=Map).to_py() == writer.get("m", type=Map).to_py()


def test_a_replica_awaiting_its_claims_writes_no_unowned_id() -> None:
    """A crdtsync connection before its claims: the first content of an id would be
    stored with no owner (its later claim skips ids with content), so it is refused as
    unproven, on the fast path and in the full judgement alike; ids owned by its token's
    subject stay writable, and once it claimed (however little) it writes as before."""
    awaiting = Writer(subject=None, awaiting_claims=True)
    owner: Doc[Any] = Doc(client_id=C)
    first = keystrokes(owner, "a")[0]
    relay = Relay()
    verdict = relay.offer(first, awaiting)
    assert verdict.update is None
    assert [(r.client, r.unproven) for r in verdict.refusals] == [(C, True)]
    assert "not proven yet" in verdict.refusals[0].reason
    assert (relay.ledger.ranges, relay.ledger.owners) == ({}, {})
    assert relay.offer(first, Writer(frozenset({C}))) == Verdict(first, [])
    assert relay.ledger.owners == {C: KEY_OWNER}
    # nothing to prove, claimed: a stock writer's unowned content may be relayed again
    other: Doc[Any] = Doc(client_id=D)
    relayed = keystrokes(other, "b")[0]
    assert relay.offer(relayed, Writer()) == Verdict(relayed, [])
    assert Writer(subject="ann", awaiting_claims=True).may_write(D, "sub:ann")
    assert not Writer(subject="ann", awaiting_claims=True).may_write(D, None)
