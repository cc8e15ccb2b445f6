"""The y-websocket codec: exact bytes out, every message back in, and nothing else accepted.

Expected bytes are written out by hand from y-protocols' framing (lib0 var-uints) or taken
from pycrdt's own encoders, never from the encoder under test. Every valid message is also
fed to the decoder cut at every length (h11's one-byte-at-a-time idea) and with trailing data.
"""

from __future__ import annotations

import json
from contextlib import suppress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pycrdt import (
    Array,
    Awareness,
    Doc,
    Map,
    Text,
    create_awareness_message,
    create_sync_message,
    create_update_message,
    handle_sync_message,
)

from crdtsync.errors import MalformedMessage, MessageTooLarge
from crdtsync.protocol import (
    AwarenessEntry,
    AwarenessMessage,
    ExtAck,
    ExtClaim,
    ExtHello,
    ExtRefused,
    ExtUpdate,
    Message,
    PermissionDenied,
    QueryAwareness,
    SyncStep1,
    SyncStep2,
    SyncUpdate,
    decode_awareness,
    decode_message,
    decode_state_vector,
    encode_awareness,
    encode_state_vector,
    read_var_uint,
    write_var_uint,
)

MAX_SAFE = 2**53 - 1


def doc_with_text(client_id: int, text: str) -> Doc:
    doc = Doc(client_id=client_id)
    doc.get("text", type=Text).insert(0, text)
    return doc


# A small real update (client 5 inserts "hi" into root text "t"), written out byte by byte:
# 1 client block, 1 struct, client 5, clock 0, info 0x04 (string, no origins), parent is a
# root name "t", string "hi", empty delete set.
HI_UPDATE = b"\x01\x01\x05\x00\x04\x01\x01t\x02hi\x00"


def test_hand_written_update_is_what_pycrdt_writes() -> None:
    # premise for the byte-level tests below: HI_UPDATE is a real update, not a guess
    doc = Doc(client_id=5)
    doc.get("t", type=Text).insert(0, "hi")
    assert doc.get_update() == HI_UPDATE


# -- exact bytes of every message --------------------------------------------------------------

EXACT_ENCODINGS: list[tuple[Message, bytes]] = [
    (SyncStep1(b"\x00"), b"\x00\x00\x01\x00"),
    (SyncStep1(b"\x01\x05\x02"), b"\x00\x00\x03\x01\x05\x02"),
    (SyncStep2(b"\x00\x00"), b"\x00\x01\x02\x00\x00"),
    (SyncStep2(HI_UPDATE), b"\x00\x01\x0c" + HI_UPDATE),
    (SyncUpdate(HI_UPDATE), b"\x00\x02\x0c" + HI_UPDATE),
    (AwarenessMessage(b"\x00"), b"\x01\x01\x00"),
    (QueryAwareness(), b"\x03"),
    (PermissionDenied("no"), b"\x02\x00\x02no"),
    (PermissionDenied("é"), b"\x02\x00\x02\xc3\xa9"),
    (PermissionDenied(""), b"\x02\x00\x00"),
    (ExtHello(), b"\x64\x00\x01"),
    (ExtHello(300), b"\x64\x00\xac\x02"),
    (ExtUpdate(0, HI_UPDATE), b"\x64\x01\x00\x0c" + HI_UPDATE),
    (ExtUpdate(128, b"\x00\x00"), b"\x64\x01\x80\x01\x02\x00\x00"),
    (ExtAck(7), b"\x64\x02\x07"),
    (ExtAck(MAX_SAFE), b"\x64\x02" + b"\xff" * 7 + b"\x0f"),
    (ExtClaim(((5, b"k" * 32),)), b"\x64\x03\x01\x05\x20" + b"k" * 32 + b"\x00"),
    (ExtClaim(((5, b"k" * 32),), (5,)), b"\x64\x03\x01\x05\x20" + b"k" * 32 + b"\x01\x05"),
    (ExtRefused(3, "no"), b"\x64\x04\x03\x00\x02no"),
    (ExtRefused(0, "", unproven=True), b"\x64\x04\x00\x01\x00"),
]


@pytest.mark.parametrize(("message", "expected"), EXACT_ENCODINGS, ids=repr)
def test_message_encodes_to_exact_bytes(message: Message, expected: bytes) -> None:
    assert message.encode() == expected


@pytest.mark.parametrize(("message", "expected"), EXACT_ENCODINGS, ids=repr)
def test_message_decodes_from_exact_bytes(message: Message, expected: bytes) -> None:
    assert decode_message(expected) == message


def test_long_payload_length_is_a_multi_byte_var_uint() -> None:
    payload = bytes(range(256)) * 2  # 512 bytes: length 0x80 0x04
    assert SyncUpdate(payload).encode() == b"\x00\x02\x80\x04" + payload


def test_sync_step1_matches_pycrdt_create_sync_message() -> None:
    doc = doc_with_text(1234567, "hello")
    assert SyncStep1(doc.get_state()).encode() == create_sync_message(doc)


def test_sync_step2_matches_pycrdt_answer_to_step1() -> None:
    doc = doc_with_text(1234567, "hello")
    asker = doc_with_text(7654321, "other")
    step1 = create_sync_message(asker)
    # pycrdt takes the sync message without its leading message type, answers with a whole one
    reply = handle_sync_message(step1[1:], doc)
    assert reply == SyncStep2(doc.get_update(asker.get_state())).encode()


def test_sync_update_matches_pycrdt_create_update_message() -> None:
    doc = doc_with_text(99, "héllo wörld")
    update = doc.get_update()
    assert SyncUpdate(update).encode() == create_update_message(update)


def test_awareness_message_matches_pycrdt_create_awareness_message() -> None:
    payload = encode_awareness([AwarenessEntry(1, 2, {"name": "ann"})])
    assert AwarenessMessage(payload).encode() == create_awareness_message(payload)


def test_pycrdt_handles_our_sync_messages_like_its_own() -> None:
    source = doc_with_text(5, "from source")
    target = Doc(client_id=6)
    # pycrdt's handler applies our step 2 and our update messages (after the type byte)
    assert handle_sync_message(SyncStep2(source.get_update()).encode()[1:], target) is None
    assert str(target.get("text", type=Text)) == "from source"


# -- round trips, prefixes and trailing bytes ---------------------------------------------------

ROUND_TRIP_MESSAGES: list[Message] = [
    SyncStep1(b""),
    SyncStep1(doc_with_text(2**32 + 5, "x").get_state()),
    SyncStep2(b"\x00\x00"),
    SyncStep2(doc_with_text(17, "a" * 300).get_update()),
    SyncUpdate(HI_UPDATE),
    SyncUpdate(b""),
    AwarenessMessage(encode_awareness([AwarenessEntry(3, 4, {"cursor": [1, 2]})])),
    AwarenessMessage(b""),
    QueryAwareness(),
    PermissionDenied("read-only access to 'team/todo' ✋"),
    PermissionDenied(""),
    ExtHello(),
    ExtHello(0),
    ExtHello(MAX_SAFE),
    ExtUpdate(0, HI_UPDATE),
    ExtUpdate(MAX_SAFE, b"\x00\x00"),
    ExtUpdate(5, b""),
    ExtAck(0),
    ExtAck(2**40),
    ExtClaim(()),
    ExtClaim(((MAX_SAFE, bytes(32)), (1, b"\xff" * 32))),
    ExtRefused(2**40, "client 7 clock 0 rewritten ✋", unproven=False),
    ExtRefused(1, "client 7 belongs to another writer", unproven=True),
]

CLAIM_REFUSED = [
    (b"\x64\x03\x01\x05\x1f" + b"k" * 31, "client key for client 5 has 31 bytes, not 32"),
    (b"\x64\x03\x81\x08", "claim message declares 1025 client ids, more than 1024"),
    (b"\x64\x03\x01\x05\x20" + b"k" * 32 + b"\x01\x06", "fresh id 6 is not claimed"),
]


@pytest.mark.parametrize(("data", "message"), CLAIM_REFUSED)
def test_malformed_claim_is_refused_naming_the_problem(data: bytes, message: str) -> None:
    with pytest.raises(MalformedMessage, match=message):
        decode_message(data)


@pytest.mark.parametrize("message", ROUND_TRIP_MESSAGES, ids=repr)
def test_message_round_trips_through_bytes(message: Message) -> None:
    assert decode_message(message.encode()) == message


@pytest.mark.parametrize("message", ROUND_TRIP_MESSAGES, ids=repr)
def test_every_proper_prefix_of_a_message_is_malformed(message: Message) -> None:
    data = message.encode()
    checked = 0
    for cut in range(len(data)):
        with pytest.raises(MalformedMessage):
            decode_message(data[:cut])
        checked += 1
    assert checked == len(data) > 0


@pytest.mark.parametrize("message", ROUND_TRIP_MESSAGES, ids=repr)
@pytest.mark.parametrize("extra", [b"\x00", b"\x01\x02\x03"])
def test_trailing_bytes_after_a_message_are_refused(message: Message, extra: bytes) -> None:
    name = type(message).__name__
    with pytest.raises(MalformedMessage, match=f"^{len(extra)} trailing bytes after a {name}$"):
        decode_message(message.encode() + extra)


def test_empty_frame_is_malformed() -> None:
    with pytest.raises(MalformedMessage, match=r"^empty message$"):
        decode_message(b"")


def test_truncated_payload_names_declared_and_present_lengths() -> None:
    with pytest.raises(MalformedMessage, match=r"^sync update declares 12 bytes, 5 present$"):
        decode_message(b"\x00\x02\x0c" + HI_UPDATE[:5])


# -- unknown types ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"\x04", "unknown message type 4"),
        (b"\x63", "unknown message type 99"),
        (b"\x65", "unknown message type 101"),
        (b"\x80\x01", "unknown message type 128"),
        (b"\x00\x03\x00", "unknown sync message type 3"),
        (b"\x02\x01\x00", "unknown auth message type 1"),
        (b"\x64\x63", "unknown crdtsync extension message type 99"),
    ],
)
def test_unknown_message_type_is_malformed(data: bytes, message: str) -> None:
    with pytest.raises(MalformedMessage, match=f"^{message}$"):
        decode_message(data)


def test_permission_denied_reason_must_be_utf8() -> None:
    with pytest.raises(MalformedMessage, match=r"^permission-denied reason is not valid UTF-8"):
        decode_message(b"\x02\x00\x02\xff\xfe")


# -- size limit ---------------------------------------------------------------------------------


def test_message_at_the_size_limit_is_accepted() -> None:
    data = SyncUpdate(HI_UPDATE).encode()
    assert decode_message(data, max_bytes=len(data)) == SyncUpdate(HI_UPDATE)


def test_message_one_byte_over_the_limit_is_too_large() -> None:
    data = SyncUpdate(HI_UPDATE).encode()
    limit = len(data) - 1
    with pytest.raises(
        MessageTooLarge, match=f"^message of {len(data)} bytes exceeds the limit of {limit}$"
    ):
        decode_message(data, max_bytes=limit)


def test_size_limit_is_checked_before_parsing_garbage() -> None:
    # a large garbage frame costs nothing to refuse: the size is the first check
    with pytest.raises(MessageTooLarge, match=r"^message of 1000 bytes exceeds the limit of 999$"):
        decode_message(b"\xff" * 1000, max_bytes=999)


def test_too_large_is_not_malformed_and_vice_versa() -> None:
    assert not issubclass(MessageTooLarge, MalformedMessage)
    assert MessageTooLarge.close_code == 1009
    assert MalformedMessage.close_code == 1007


# -- var-uints ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "encoded"),
    [
        (0, b"\x00"),
        (1, b"\x01"),
        (127, b"\x7f"),
        (128, b"\x80\x01"),
        (300, b"\xac\x02"),
        (16383, b"\xff\x7f"),
        (16384, b"\x80\x80\x01"),
        (2**32, b"\x80\x80\x80\x80\x10"),
        (MAX_SAFE, b"\xff" * 7 + b"\x0f"),
    ],
)
def test_var_uint_encodes_and_decodes_exactly(value: int, encoded: bytes) -> None:
    assert write_var_uint(value) == encoded
    assert read_var_uint(encoded, 0) == (value, len(encoded))
    # and in the middle of a buffer, returning the position after it
    assert read_var_uint(b"\xaa" + encoded + b"\x55", 1) == (value, 1 + len(encoded))


def test_var_uint_above_max_safe_integer_is_refused() -> None:
    encoded = b"\x80" * 7 + b"\x10"  # 2^53, eight bytes
    assert encoded == write_var_uint(2**53)
    with pytest.raises(MalformedMessage, match=r"^var-uint at byte 0 exceeds 2\^53-1$"):
        read_var_uint(encoded, 0)


def test_nine_byte_var_uint_is_refused_even_for_a_small_value() -> None:
    encoded = b"\x80" * 8 + b"\x00"  # an over-long zero
    with pytest.raises(MalformedMessage, match=r"^var-uint at byte 0 is longer than 8 bytes$"):
        read_var_uint(encoded, 0)


def test_var_uint_that_ends_early_is_truncated() -> None:
    with pytest.raises(MalformedMessage, match=r"^var-uint truncated at byte 3 of 3$"):
        read_var_uint(b"\x00\x80\x80", 1)


def test_message_type_above_max_safe_integer_is_refused() -> None:
    with pytest.raises(MalformedMessage, match=r"exceeds 2\^53-1"):
        decode_message(write_var_uint(2**53))


def test_ack_key_above_max_safe_integer_is_refused() -> None:
    with pytest.raises(MalformedMessage, match=r"^var-uint at byte 2 exceeds 2\^53-1$"):
        decode_message(b"\x64\x02" + write_var_uint(2**53))


def test_negative_var_uint_is_a_caller_error() -> None:
    with pytest.raises(ValueError, match=r"^var-uint must be non-negative, got -1$"):
        write_var_uint(-1)


# -- awareness payloads ---------------------------------------------------------------------------

AWARENESS_ENTRIES = [
    AwarenessEntry(42, 1, {"user": {"name": "Zoë 🚀", "color": "#ff0"}, "cursor": None}),
    AwarenessEntry(2**53 - 1, 2**40, {"nested": [1, [2, [3, {"deep": ["ü", 2.5, True]}]]]}),
    AwarenessEntry(7, 3, None),  # the client left
    AwarenessEntry(8, 0, "just a string"),
    AwarenessEntry(9, 1, []),
]


def test_awareness_entries_round_trip_with_unicode_and_nested_json() -> None:
    assert decode_awareness(encode_awareness(AWARENESS_ENTRIES)) == AWARENESS_ENTRIES


def test_awareness_encoding_matches_pycrdt_awareness() -> None:
    state = {"user": {"name": "Zoë 🚀", "cursor": [1, {"x": None}]}}
    awareness = Awareness(Doc(client_id=42))
    awareness.set_local_state(state)
    clock = awareness.meta[42]["clock"]
    ours = encode_awareness([AwarenessEntry(42, clock, state)])
    assert ours == awareness.encode_awareness_update([42])


def test_pycrdt_awareness_applies_our_encoding() -> None:
    awareness = Awareness(Doc(client_id=1))
    awareness.apply_awareness_update(encode_awareness(AWARENESS_ENTRIES[:2]), origin="test")
    assert awareness.states[42] == AWARENESS_ENTRIES[0].state
    assert awareness.states[2**53 - 1] == AWARENESS_ENTRIES[1].state


def test_awareness_decodes_raw_utf8_json_as_yjs_writes_it() -> None:
    # Yjs writes JSON.stringify(state): raw UTF-8, no \\u escapes
    text = '{"name":"Zoë 🚀"}'.encode()
    payload = b"\x01\x05\x02" + write_var_uint(len(text)) + text
    assert decode_awareness(payload) == [AwarenessEntry(5, 2, {"name": "Zoë 🚀"})]


def test_removed_awareness_entry_is_json_null() -> None:
    assert encode_awareness([AwarenessEntry(7, 3, None)]) == b"\x01\x07\x03\x04null"
    (entry,) = decode_awareness(b"\x01\x07\x03\x04null")
    assert entry.removed is True


def test_empty_awareness_update_is_zero_entries() -> None:
    assert encode_awareness([]) == b"\x00"
    assert decode_awareness(b"\x00") == []


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (b"", "var-uint truncated at byte 0 of 0"),
        (b"\x03\x05\x02\x04null", "awareness update declares 3 entries in 8 bytes"),
        (b"\x02\x05\x02\x04null\x06", "var-uint truncated at byte 9 of 9"),
        (b"\x02\x05\x02\x04null\x06\x01\x05", "awareness state declares 5 bytes, 0 present"),
        (b"\x01\x05\x02\x03nul", "awareness state of client 5 is not JSON"),
        (b"\x01\x05\x02\x04nul!", "awareness state of client 5 is not JSON"),
        (b"\x01\x05\x02\x02\xff\xfe", "awareness state is not valid UTF-8"),
        (b"\x01\x05\x02\x04null\x00", "1 trailing bytes after an awareness update"),
        (b"\x80\x80\x80\x01", "awareness update declares 2097152 entries in 4 bytes"),
    ],
)
def test_malformed_awareness_payload_is_refused(payload: bytes, message: str) -> None:
    with pytest.raises(MalformedMessage, match=f"^{message}"):
        decode_awareness(payload)


def test_every_proper_prefix_of_an_awareness_payload_is_malformed() -> None:
    payload = encode_awareness(AWARENESS_ENTRIES)
    for cut in range(len(payload)):
        with pytest.raises(MalformedMessage):
            decode_awareness(payload[:cut])


# -- state vectors -------------------------------------------------------------------------------


def test_state_vector_of_one_client_decodes_to_its_clock() -> None:
    doc = doc_with_text(1234, "hello")  # 5 characters: next clock 5
    assert decode_state_vector(doc.get_state()) == {1234: 5}


def test_state_vector_of_merged_documents_names_every_client() -> None:
    a = doc_with_text(2**53 - 1, "abc")
    b = Doc(client_id=300)
    b.get("list", type=Array).extend([1, 2, 3, 4])
    b.get("map", type=Map)["k"] = "v"
    a.apply_update(b.get_update())
    assert decode_state_vector(a.get_state()) == {2**53 - 1: 3, 300: 5}


def test_empty_document_state_vector_is_zero_clients() -> None:
    assert Doc().get_state() == b"\x00"
    assert decode_state_vector(b"\x00") == {}
    assert encode_state_vector({}) == b"\x00"


def test_encoded_state_vector_is_byte_identical_to_pycrdt() -> None:
    a = doc_with_text(11, "abc")
    b = doc_with_text(2**40, "de")
    a.apply_update(b.get_update())
    sv = a.get_state()
    assert encode_state_vector(decode_state_vector(sv)) == sv


def test_encoded_state_vector_drives_pycrdt_diff() -> None:
    doc = doc_with_text(11, "abcdef")
    # a peer that has the first 4 characters only gets "ef"
    partial = Doc()
    partial.apply_update(doc.get_update(encode_state_vector({11: 4})))
    assert str(partial.get("text", type=Text)) == ""  # premise: "ef" alone waits for its origin
    partial.apply_update(doc_with_text(11, "abcd").get_update())
    assert str(partial.get("text", type=Text)) == "abcdef"


def test_state_vector_encoding_is_exact() -> None:
    assert encode_state_vector({5: 2, 300: 128}) == b"\x02\x05\x02\xac\x02\x80\x01"


@pytest.mark.parametrize(
    ("sv", "message"),
    [
        (b"", "var-uint truncated at byte 0 of 0"),
        (b"\x01\x05", "state vector declares 1 clients in 2 bytes"),
        (b"\x02\x05\x02\x06", "state vector declares 2 clients in 4 bytes"),
        (b"\x01\x05\x02\x00", "1 trailing bytes after a state vector"),
        (b"\x01" + write_var_uint(2**53) + b"\x01", r"exceeds 2\^53-1"),
        (b"\xff\xff\xff\x7f", "state vector declares 268435455 clients in 4 bytes"),
    ],
)
def test_malformed_state_vector_is_refused(sv: bytes, message: str) -> None:
    with pytest.raises(MalformedMessage, match=message):
        decode_state_vector(sv)


# -- garbage in: a Message or our error, nothing else ------------------------------------------

# Half pure noise, half noise behind a real message type, so the fuzz reaches every branch.
_PREFIXES = [b"\x00\x00", b"\x00\x01", b"\x00\x02", b"\x01", b"\x02\x00", b"\x03", b"\x64"]
_FRAMES = st.one_of(
    st.binary(max_size=64),
    st.tuples(
        st.sampled_from([*_PREFIXES, b"\x64\x00", b"\x64\x01", b"\x64\x02"]), st.binary(max_size=32)
    ).map(b"".join),
)


@settings(max_examples=300, deadline=None)
@given(data=_FRAMES, max_bytes=st.one_of(st.none(), st.integers(min_value=0, max_value=80)))
def test_random_bytes_decode_to_a_message_or_our_error(data: bytes, max_bytes: int | None) -> None:
    try:
        msg = decode_message(data, max_bytes=max_bytes)
    except MessageTooLarge:
        assert max_bytes is not None
        assert len(data) > max_bytes
        return
    except MalformedMessage:
        return
    # whatever decoded is a whole message: its canonical encoding decodes back to it
    assert decode_message(msg.encode()) == msg


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=48))
def test_random_bytes_decode_as_awareness_or_state_vector_or_raise_malformed(data: bytes) -> None:
    for decode in (decode_awareness, decode_state_vector):
        with suppress(MalformedMessage):
            decode(data)


def test_decoded_awareness_state_is_plain_json() -> None:
    # the state is a plain JSON value that json can write back: no custom objects leak
    (entry,) = decode_awareness(encode_awareness([AWARENESS_ENTRIES[1]]))
    assert json.loads(json.dumps(entry.state)) == AWARENESS_ENTRIES[1].state
