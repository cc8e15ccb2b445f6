"""Validate Yjs/Yrs v1 update binaries before they are stored or fanned out.

The relay stores and forwards updates without applying them (DESIGN: Relay), so it must
refuse anything a peer could not apply, or would apply differently from another peer.
:func:`check_update` walks the whole v1 encoding in pure Python, the way Yjs
``readClientsStructRefs`` and ``readDeleteSet`` (``UpdateDecoderV1``, lib0 ``decoding``)
read it, then asks pycrdt's ``get_state`` for a second opinion.

Layout (lib0 var-uints unless noted)::

    update     = structs delete_set                      nothing may follow
    structs    = n_clients { n_structs client clock struct* }
    struct     = info:u8 ...                             content ref = info & 0x1F
      GC       = info=0  len
      Skip     = info=10 len                             a hole left by mergeUpdates
      Item     = [origin:ID if info&0x80] [right_origin:ID if info&0x40]
                 [parent_info (1: root name string, 0: parent ID) if neither origin]
                 [parent_sub:string if neither origin and info&0x20] content
    delete_set = n_clients { client n_ranges { clock len } }

A valid update (DESIGN: measured facts) is exactly framed, within the size limit,
decodes with ``get_state`` and names no client id above 2^53-1. Measured against
pycrdt 0.14.13 (Yrs 0.28) and read in Yjs 13.6, these are refused as well, because a
peer would crash on them or two peers would read them differently:

- An ``Any`` value nested deeper than :data:`MAX_ANY_DEPTH`: Yrs decodes ``Any``
  recursively, and ``get_state`` on 30,000 nested arrays (a 60 KB update) kills the
  process with SIGSEGV. Nothing is handed to pycrdt before this walk has passed.
- A clock at or above 2^32 (:data:`MAX_CLOCK`): Yrs clocks are ``u32`` and wrap
  silently (``get_state`` reports a struct at clock 2^32 as clock 1), and a struct
  ending past 2^32 makes ``Doc.apply_update`` panic.
- JSON content (ref 2): Yrs 0.28 reads ``count + 1`` strings where Yjs reads ``count``;
  neither library writes it any more (Yjs 13 writes ``Any`` content). XML hook types:
  Yjs reads a hook name after the type ref, Yrs does not; pycrdt cannot create them.
- Unknown content refs, type refs (Yrs accepts 9 and 15, Yjs throws) and ``Any`` type
  bytes; GC and skip info bytes with item flag bits set (Yjs ignores them, Yrs reads an
  item); a parent-info value other than 0 or 1 (Yrs wraps it to ``u32``).
- A client id with two struct blocks: Yjs keeps the last block, Yrs concatenates them.
- An item whose origin, right origin or parent is an ID of its own client at or after its
  own clock: nothing can refer to what did not exist yet, and with a suitable document
  Yrs crashes on it (SIGSEGV: ``01 02 03 02 00 02 08 01 01 61 00 00`` applied, then
  ``02 01 03 01 88 03 03 03 7e 7e 7e 01 02 04 24 00 02 03 01 6b 02 62 63 00``).
- Invalid UTF-8 (Yjs decodes it to U+FFFD, Yrs refuses it), JSON that JavaScript's
  ``JSON.parse`` would refuse (NaN, Infinity), subdocument options that are not an object.
- Structs that make ``Doc.apply_update`` panic: a GC or skip of length 0 when the delete
  set names its client (divide by zero), and a struct block with no structs, or with only
  zero-length items, when the document already knows the client (``01 00 07 00 00`` is
  enough). No library or merge writes them.

Zero-length items next to others are accepted (Yrs notes that old Yjs bugs wrote them)
and, like skips, do not count in :attr:`UpdateInfo.state` or :attr:`UpdateInfo.starts`:
Yrs drops them while decoding, so ``get_state`` does not count them either.

Beyond any one update: two updates that give the same client and clock different
structs can still crash Yrs 0.28 (SIGSEGV) when both are applied to one document. Only
a policy across updates (who may write which client id) can rule that out.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any, NoReturn

from pycrdt import get_state

from .errors import LimitExceeded, MalformedMessage, MessageTooLarge

__all__ = [
    "MAX_ANY_DEPTH",
    "MAX_CLIENT_ID",
    "MAX_CLOCK",
    "AnyType",
    "ContentRef",
    "TypeRef",
    "UpdateInfo",
    "check_update",
]

_MAX_SAFE_INTEGER = 2**53 - 1  # JS Number.MAX_SAFE_INTEGER: lib0 refuses larger var-ints
MAX_CLIENT_ID = _MAX_SAFE_INTEGER  # Yrs keeps only 53 bits of larger ids, JS rounds them
MAX_CLOCK = 2**32 - 1  # Yrs clocks are u32: no struct or delete range may end past this
MAX_ANY_DEPTH = 64  # arrays/objects nested in one Any value; Yrs recurses without a limit
_MAX_VAR_UINT_BYTES = 10  # 70 bits: enough to read and report any u64 a peer might send


class ContentRef(IntEnum):
    """``info & 0x1F`` of a struct: GC, skip, or the content of an item (Yjs ``contentRefs``)."""

    GC = 0
    DELETED = 1
    JSON = 2
    BINARY = 3
    STRING = 4
    EMBED = 5
    FORMAT = 6
    TYPE = 7
    ANY = 8
    DOC = 9
    SKIP = 10


class TypeRef(IntEnum):
    """Shared-type kinds of type content (Yjs ``typeRefs``); Yjs knows no others."""

    ARRAY = 0
    MAP = 1
    TEXT = 2
    XML_ELEMENT = 3  # followed by the node name
    XML_FRAGMENT = 4
    XML_HOOK = 5  # followed by the hook name in Yjs, not in Yrs: refused
    XML_TEXT = 6


class AnyType(IntEnum):
    """Type byte of a lib0 ``Any`` value (lib0 ``encoding.writeAny``)."""

    UNDEFINED = 127
    NULL = 126
    INTEGER = 125  # signed lib0 var-int
    FLOAT32 = 124
    FLOAT64 = 123
    BIGINT = 122  # 8 bytes
    FALSE = 121
    TRUE = 120
    STRING = 119
    OBJECT = 118  # var-uint n, then n (key string, Any)
    ARRAY = 117  # var-uint n, then n Any
    BYTES = 116


# Client ids take 5 (Yjs) to 8 (pycrdt) var-uint bytes and repeat in nearly every update of
# a room: decoding them through a regex match and a small memo costs a third of the byte
# loop. The memo is bounded (cleared when full), so random ids cannot grow it.
_match_var_uint = re.compile(rb"[\x80-\xff]{1,9}[\x00-\x7f]").match
_client_ids: dict[bytes, int] = {}
_CLIENT_MEMO_SIZE = 4096

# Plain ints for the Any loop: comparing with an IntEnum member costs an attribute lookup.
_ANY_STRING = int(AnyType.STRING)
_ANY_INTEGER = int(AnyType.INTEGER)
_ANY_OBJECT = int(AnyType.OBJECT)
_CONTAINER_ANY = frozenset((int(AnyType.ARRAY), _ANY_OBJECT))
_ANY_BYTES = int(AnyType.BYTES)
_FIXED_ANY_SIZES = {int(AnyType.FLOAT32): 4, int(AnyType.FLOAT64): 8, int(AnyType.BIGINT): 8}
_NO_PAYLOAD_ANY = frozenset(
    int(kind) for kind in (AnyType.UNDEFINED, AnyType.NULL, AnyType.FALSE, AnyType.TRUE)
)


_NO_HOLES: dict[int, list[tuple[int, int]]] = {}  # shared: never mutated (read-only)
_NOTHING: list[Any] = []  # shared: never mutated (read-only)


@dataclass(slots=True)  # not frozen: a frozen __init__ costs a microsecond per update
class UpdateInfo:
    """What a valid update contains, read without applying it (treat it as read-only).

    Attributes:
        state: client id -> clock just past the last struct of that client. Skips and
            zero-length structs do not count. ``pycrdt.get_state`` reports less: like
            Yjs ``encodeStateVectorFromUpdate`` it counts a client only from clock 0 up to
            its first skip, what a fresh document could apply.
        starts: client id -> clock of the first struct of that client. A client whose
            start is above the receiver's clock for it leaves a gap.
        deletes: the delete set, client id -> ``[(clock, length), ...]`` in update order;
            empty ranges are left out.
        holes: client id -> ``[(start, end), ...]``: clock ranges between ``starts`` and
            ``state`` that the update does not carry (skips, as ``mergeUpdates`` writes
            them). Empty for nearly every update.
        types: ``(client, clock)`` of every item whose content is a shared type (the
            only items another item may name as its parent).
        parents: ``(client, clock, parent_client, parent_clock)`` of every item that
            names its parent by ID (an item inserted into a nested type with no
            neighbour to its left or right).
        gone: ``(client, start, end)`` of garbage-collected structs and deleted items
            (their content is gone: as parents they make a child deleted too).
    """

    state: dict[int, int]
    starts: dict[int, int]
    deletes: dict[int, list[tuple[int, int]]]
    holes: dict[int, list[tuple[int, int]]] = field(default_factory=dict)
    types: list[tuple[int, int]] = field(default_factory=list)
    parents: list[tuple[int, int, int, int]] = field(default_factory=list)
    gone: list[tuple[int, int, int]] = field(default_factory=list)

    @property
    def is_empty(self) -> bool:
        """No structs and no deletes: applying the update changes nothing (e.g. ``b"\\0\\0"``)."""
        return not self.state and not self.deletes

    def ranges(self, client: int) -> list[tuple[int, int]]:
        """The clock ranges of ``client`` that this update carries content for, ascending."""
        start, end = self.starts[client], self.state[client]
        holes = self.holes.get(client)
        if not holes:
            return [(start, end)]
        out = []
        for hole_start, hole_end in holes:
            if hole_start > start:
                out.append((start, hole_start))
            start = max(start, hole_end)
        if end > start:
            out.append((start, end))
        return out


def check_update(
    update: bytes | bytearray | memoryview,
    *,
    max_bytes: int | None = None,
    max_clients: int | None = None,
    max_structs: int | None = None,
) -> UpdateInfo:
    """Check that ``update`` is one well-formed v1 update and say what it contains.

    Args:
        update: the update as received (``bytearray`` and ``memoryview`` are copied).
        max_bytes: refuse updates longer than this.
        max_clients: refuse updates naming more client ids than this (struct blocks, and
            separately delete-set entries): pycrdt's work and the state vector grow with it.
        max_structs: refuse updates with more structs than this, counting each value of
            an ``Any`` item as one (30 million integers fit in a few megabytes).

    Returns:
        The clocks and delete set the update carries.

    Raises:
        MessageTooLarge: ``update`` is longer than ``max_bytes``.
        LimitExceeded: over ``max_clients`` or ``max_structs`` (found before the whole
            update is walked).
        MalformedMessage: anything else that is not exactly one valid v1 update: truncated,
            trailing bytes, unknown refs, client ids above 2^53-1, clocks at or above 2^32,
            ``Any`` values nested deeper than 64, invalid UTF-8 or JSON, encodings that
            Yjs and Yrs read differently or that crash pycrdt (see the module docstring),
            or refused by pycrdt's ``get_state``. The message names the problem and where.
        TypeError: ``update`` is not bytes-like (a caller's mistake, not the peer's).
    """
    if type(update) is not bytes:
        if not isinstance(update, (bytes, bytearray, memoryview)):
            raise TypeError(f"update must be bytes, not {type(update).__name__}")
        update = bytes(update)
    if max_bytes is not None and len(update) > max_bytes:
        raise MessageTooLarge(f"update of {len(update)} bytes exceeds the limit of {max_bytes}")
    # Our walk first: it bounds nesting and clocks before Yrs sees a byte (see module doc).
    info = _scan(update, max_clients, max_structs)
    try:
        get_state(update)
    except ValueError as exc:
        raise MalformedMessage(f"update refused by pycrdt get_state: {exc}") from exc
    except BaseException as exc:
        # A Rust panic reaches Python as pyo3's PanicException, a BaseException that
        # cannot be imported by name. The walk above should leave none; if one slips
        # through, it is still the peer's bad update, not our crash.
        if type(exc).__name__ == "PanicException":
            raise MalformedMessage(f"update refused by pycrdt get_state: {exc}") from exc
        raise
    return info


def _scan(data: bytes, max_clients: int | None, max_structs: int | None) -> UpdateInfo:
    """Walk the whole update; return its clocks and delete set.

    One function with inlined var-uint fast paths: this runs once per keystroke on the
    relay. Reads past the end raise ``IndexError``, turned into one truncation message
    below; multi-byte reads (strings, var-uint tails, fixed-size numbers) check bounds
    themselves and say what they were reading.
    """
    n = len(data)
    pos = 0
    # Where we are, for the truncation message: 0 struct count, 1 block header, 2 struct,
    # 3 delete set. Kept as plain locals: assigning them costs next to nothing.
    stage = 0
    block_at = start = ds_at = 0
    client = -1
    state: dict[int, int] = {}
    starts: dict[int, int] = {}
    deletes: dict[int, list[tuple[int, int]]] = {}
    holes: dict[int, list[tuple[int, int]]] = {}
    types: list[tuple[int, int]] = []
    parents: list[tuple[int, int, int, int]] = []
    gone: list[tuple[int, int, int]] = []
    try:
        num_clients = data[0]
        pos = 1
        if num_clients > 0x7F:
            num_clients, pos = _uint_tail(data, pos, num_clients)
        if max_clients is not None and num_clients > max_clients:
            raise LimitExceeded(
                f"update has {num_clients} struct blocks (client ids), over the limit of "
                f"{max_clients}"
            )
        structs_left: float = max_structs if max_structs is not None else float("inf")
        # Each client block takes at least 3 bytes: stop a huge declared count early.
        if num_clients * 3 > n - pos:
            raise MalformedMessage(
                f"update declares {num_clients} struct blocks at byte 0, "
                f"only {n - pos} bytes follow"
            )
        seen: set[int] = set()
        for _ in range(num_clients):
            block_at = pos
            stage = 1
            num_structs = data[pos]
            pos += 1
            if num_structs > 0x7F:
                num_structs, pos = _uint_tail(data, pos, num_structs)
            client = data[pos]
            if client > 0x7F:
                client_at = pos
                client, pos = _read_client(data, pos)
                if client > MAX_CLIENT_ID:
                    raise MalformedMessage(
                        f"client id {client} exceeds 2^53-1 (struct block at byte {client_at})"
                    )
            else:
                pos += 1
            clock = data[pos]
            pos += 1
            if clock > 0x7F:
                clock, pos = _uint_tail(data, pos, clock)
            if client in seen:
                # Yjs keeps only the last block of a client, Yrs concatenates them.
                raise MalformedMessage(
                    f"client {client} has a second struct block at byte {block_at}"
                )
            seen.add(client)
            structs_left -= num_structs
            if structs_left < 0:
                raise LimitExceeded(f"update has more than {max_structs} structs")
            if num_structs > n - pos:  # every struct takes at least one byte
                raise MalformedMessage(
                    f"struct block at byte {block_at} declares {num_structs} structs, "
                    f"only {n - pos} bytes follow"
                )
            stage = 2
            first = -1  # clock of the first struct that counts (not a skip, not empty)
            end = -1  # clock just past the last struct that counts
            filler = False  # a skip struct: a block of skips alone is not empty
            for _ in range(num_structs):
                start = pos
                info = data[pos]
                pos += 1
                ref = info & 0x1F
                if ref == 0 or ref == 10:  # ContentRef.GC, ContentRef.SKIP
                    if info != ref:
                        raise MalformedMessage(
                            f"{'GC' if ref == 0 else 'skip'} struct at byte {start} has item "
                            f"flag bits set (info byte 0x{info:02x})"
                        )
                    length = data[pos]
                    pos += 1
                    if length > 0x7F:
                        length, pos = _uint_tail(data, pos, length)
                    if not length:
                        # Yrs keeps it, and a delete set naming its client then makes
                        # Doc.apply_update panic (divide by zero). No merge writes one.
                        raise MalformedMessage(
                            f"{'GC' if ref == 0 else 'skip'} struct at byte {start} has length 0"
                        )
                    if ref == 0:
                        if first < 0:
                            first = clock
                        end = clock + length
                        gone.append((client, clock, end))
                    elif first >= 0:  # a skip after content: a hole (one before is a start)
                        holes.setdefault(client, []).append((clock, clock + length))
                    clock += length
                    filler = True
                    continue
                if ref > 10:
                    raise MalformedMessage(
                        f"struct at byte {start} has unknown content ref {ref} "
                        f"(info byte 0x{info:02x})"
                    )
                # An item: origins, or else where it lives, then its content.
                if info & 0x80:
                    pos = _read_id(data, pos, "origin", client, clock, start)
                if info & 0x40:
                    pos = _read_id(data, pos, "right origin", client, clock, start)
                if not info & 0xC0:
                    parent_info = data[pos]
                    pos += 1
                    if parent_info == 1:
                        pos = _skip_string(data, pos, "root type name")
                    elif parent_info == 0:
                        parent_at = pos
                        pos = _read_id(data, pos, "parent", client, clock, start)
                        parent_client, after = _read_client_at(data, parent_at)
                        parents.append((client, clock, parent_client, _read_uint_at(data, after)))
                    else:
                        # Yjs treats anything but 1 as an ID, Yrs wraps it to u32 first.
                        raise MalformedMessage(
                            f"item at byte {start} has parent info {parent_info}, expected 0 or 1"
                        )
                    if info & 0x20:
                        pos = _skip_string(data, pos, "parent key")
                # Content, the most frequent kinds first. ``length`` is the clock length.
                if ref == 4:  # ContentRef.STRING: clock length counts UTF-16 code units
                    str_at = pos
                    size = data[pos]
                    pos += 1
                    if size > 0x7F:
                        size, pos = _uint_tail(data, pos, size)
                    str_end = pos + size
                    if str_end > n:
                        raise MalformedMessage(
                            f"update truncated: string at byte {str_at} declares {size} "
                            f"bytes, {n - pos} present"
                        )
                    try:
                        text = data[pos:str_end].decode()
                    except UnicodeDecodeError as exc:
                        raise MalformedMessage(
                            f"string at byte {str_at} is not valid UTF-8"
                        ) from exc
                    pos = str_end
                    length = len(text) if text.isascii() else len(text.encode("utf-16-le")) >> 1
                elif ref == 8:  # ContentRef.ANY
                    length = data[pos]
                    pos += 1
                    if length > 0x7F:
                        length, pos = _uint_tail(data, pos, length)
                    if length > n - pos:
                        raise MalformedMessage(
                            f"item at byte {start} declares {length} values, "
                            f"only {n - pos} bytes follow"
                        )
                    structs_left -= length
                    if structs_left < 0:
                        raise LimitExceeded(
                            f"update has more than {max_structs} structs and values"
                        )
                    pos = _skip_any(data, pos, length)
                elif ref == 1:  # ContentRef.DELETED
                    length = data[pos]
                    pos += 1
                    if length > 0x7F:
                        length, pos = _uint_tail(data, pos, length)
                    if length:
                        gone.append((client, clock, clock + length))
                else:
                    pos = _skip_rare_content(data, pos, ref, start)
                    length = 1
                    if ref == 7:  # ContentRef.TYPE: a shared type others may name as parent
                        types.append((client, clock))
                if length:
                    if first < 0:
                        first = clock
                    end = clock + length
                clock += length
            if clock > MAX_CLOCK:
                raise MalformedMessage(
                    f"structs of client {client} (block at byte {block_at}) end at clock "
                    f"{clock}, past 2^32-1"
                )
            if end >= 0:
                state[client] = end
                starts[client] = first
                client_holes = holes.get(client)
                if client_holes and client_holes[-1][1] >= end:
                    # trailing skips are no hole: the content ends before them
                    holes[client] = [h for h in client_holes if h[0] < end]
                    if not holes[client]:
                        del holes[client]
            elif not filler:
                # Yrs drops zero-length items while decoding; a block left with nothing
                # makes Doc.apply_update panic when the document knows the client.
                raise MalformedMessage(
                    f"struct block at byte {block_at} of client {client} has "
                    + ("no structs" if not num_structs else "only zero-length items")
                )

        stage = 3
        ds_at = pos
        num_clients = data[pos]
        pos += 1
        if num_clients > 0x7F:
            num_clients, pos = _uint_tail(data, pos, num_clients)
        if max_clients is not None and num_clients > max_clients:
            raise LimitExceeded(
                f"update's delete set names {num_clients} client ids, over the limit of "
                f"{max_clients}"
            )
        if num_clients * 2 > n - pos:  # client id and range count: at least 2 bytes each
            raise MalformedMessage(
                f"delete set at byte {ds_at} declares {num_clients} clients, "
                f"only {n - pos} bytes follow"
            )
        for _ in range(num_clients):
            client_at = pos
            client = data[pos]
            if client > 0x7F:
                client, pos = _read_client(data, pos)
                if client > MAX_CLIENT_ID:
                    raise MalformedMessage(
                        f"client id {client} exceeds 2^53-1 (delete set at byte {client_at})"
                    )
            else:
                pos += 1
            num_ranges = data[pos]
            pos += 1
            if num_ranges > 0x7F:
                num_ranges, pos = _uint_tail(data, pos, num_ranges)
            if num_ranges * 2 > n - pos:
                raise MalformedMessage(
                    f"delete set entry at byte {client_at} declares {num_ranges} ranges, "
                    f"only {n - pos} bytes follow"
                )
            ranges = deletes.get(client)
            for _ in range(num_ranges):
                start = pos
                del_clock = data[pos]
                pos += 1
                if del_clock > 0x7F:
                    del_clock, pos = _uint_tail(data, pos, del_clock)
                del_len = data[pos]
                pos += 1
                if del_len > 0x7F:
                    del_len, pos = _uint_tail(data, pos, del_len)
                if del_clock + del_len > MAX_CLOCK:
                    raise MalformedMessage(
                        f"delete range at byte {start} of client {client} ends at clock "
                        f"{del_clock + del_len}, past 2^32-1"
                    )
                if del_len:
                    if ranges is None:
                        # Yjs and Yrs both merge repeated clients of a delete set.
                        ranges = deletes[client] = []
                    ranges.append((del_clock, del_len))
    except IndexError as exc:
        where = (
            "the struct block count",
            f"the header of the struct block at byte {block_at}",
            f"the struct at byte {start} of client {client}",
            f"the delete set at byte {ds_at}",
        )[stage]
        raise MalformedMessage(f"update truncated: {n} bytes end inside {where}") from exc
    if pos != n:
        extra = n - pos
        raise MalformedMessage(
            f"update has {extra} trailing byte{'' if extra == 1 else 's'} after the delete set"
        )
    # Shared empties for what nearly every update lacks: an UpdateInfo lives until its
    # turn is committed, and four containers more per update cost the GC ~10% of the
    # relay's CPU on the automerge-paper trace (bench/trace_relay.py).
    return UpdateInfo(
        state,
        starts,
        deletes,
        holes or _NO_HOLES,
        types or _NOTHING,
        parents or _NOTHING,
        gone or _NOTHING,
    )


def _uint_tail(data: bytes, pos: int, first: int) -> tuple[int, int]:
    """Finish a var-uint whose first byte ``first`` (at ``pos - 1``) has its high bit set.

    Values are returned in full (up to 70 bits) so that callers can name them in errors.

    Raises:
        MalformedMessage: the data ends inside it, or it is longer than 10 bytes.
    """
    at = pos - 1
    num = first & 0x7F
    shift = 7
    n = len(data)
    while True:
        if pos >= n:
            raise MalformedMessage(
                f"update truncated: var-uint at byte {at} runs past the end ({n} bytes)"
            )
        byte = data[pos]
        pos += 1
        num |= (byte & 0x7F) << shift
        if byte < 0x80:
            return num, pos
        shift += 7
        if shift >= 7 * _MAX_VAR_UINT_BYTES:
            raise MalformedMessage(
                f"var-uint at byte {at} is longer than {_MAX_VAR_UINT_BYTES} bytes"
            )


def _read_client(data: bytes, pos: int) -> tuple[int, int]:
    """Decode the multi-byte var-uint client id at ``pos``; return ``(client, next_pos)``.

    Raises:
        MalformedMessage: the data ends inside it, or it is longer than 10 bytes.
    """
    match = _match_var_uint(data, pos)
    if match is None:
        return _uint_tail(data, pos + 1, data[pos])  # raises the precise error
    raw = match.group()
    client = _client_ids.get(raw)
    if client is None:
        client = _uint_tail(raw, 1, raw[0])[0]
        if len(_client_ids) >= _CLIENT_MEMO_SIZE:
            _client_ids.clear()
        _client_ids[raw] = client
    return client, match.end()


def _read_client_at(data: bytes, pos: int) -> tuple[int, int]:
    """Read the var-uint at ``pos`` of an already validated ID; return ``(value, next_pos)``."""
    if data[pos] < 0x80:
        return data[pos], pos + 1
    return _read_client(data, pos)


def _read_uint_at(data: bytes, pos: int) -> int:
    """Read the var-uint at ``pos`` of an already validated ID."""
    if data[pos] < 0x80:
        return data[pos]
    return _uint_tail(data, pos + 1, data[pos])[0]


def _read_id(data: bytes, pos: int, what: str, client: int, clock: int, start: int) -> int:
    """Skip the ID that an item at ``clock`` of ``client`` refers to; return the next position.

    Raises:
        MalformedMessage: client above 2^53-1, clock above 2^32-1, truncated, or an ID of
            the item's own client at or after its clock: an item can only refer to
            items created before it, and Yrs 0.28 crashes (SIGSEGV) on some that do not.
        IndexError: the data ends at ``pos`` (the caller reports it as truncation).
    """
    at = pos
    id_client = data[pos]
    if id_client > 0x7F:
        id_client, pos = _read_client(data, pos)
        if id_client > MAX_CLIENT_ID:
            raise MalformedMessage(f"client id {id_client} exceeds 2^53-1 ({what} at byte {at})")
    else:
        pos += 1
    id_clock = data[pos]
    pos += 1
    if id_clock > 0x7F:
        id_clock, pos = _uint_tail(data, pos, id_clock)
        if id_clock > MAX_CLOCK:
            raise MalformedMessage(f"{what} clock {id_clock} at byte {at} exceeds 2^32-1")
    if id_client == client and id_clock >= clock:
        raise MalformedMessage(
            f"item at byte {start} (client {client}, clock {clock}) has {what} clock "
            f"{id_clock} of its own client, not created before it"
        )
    return pos


def _skip_bytes(data: bytes, pos: int, what: str) -> tuple[int, int]:
    """Return ``(start, end)`` of the var-uint-prefixed byte string at ``pos``.

    Raises:
        MalformedMessage: the declared length runs past the end.
    """
    size = data[pos]
    start = pos + 1
    if size > 0x7F:
        size, start = _uint_tail(data, start, size)
    end = start + size
    if end > len(data):
        raise MalformedMessage(
            f"update truncated: {what} at byte {pos} declares {size} bytes, "
            f"{len(data) - start} present"
        )
    return start, end


def _skip_string(data: bytes, pos: int, what: str) -> int:
    """Skip a var-string at ``pos`` after checking it is UTF-8; return the next position.

    Raises:
        MalformedMessage: truncated, or not valid UTF-8 (Yrs refuses it; Yjs would
            silently read U+FFFD, so the two would disagree).
    """
    start, end = _skip_bytes(data, pos, what)
    try:
        data[start:end].decode()
    except UnicodeDecodeError as exc:
        raise MalformedMessage(f"{what} at byte {pos} is not valid UTF-8") from exc
    return end


def _reject_constant(name: str) -> NoReturn:
    # JSON.parse and serde_json refuse NaN and Infinity; Python's json accepts them.
    raise ValueError(f"{name} is not JSON")


def _check_json(data: bytes, pos: int, what: str) -> int:
    """Skip a var-string at ``pos`` that must hold one JSON value; return the next position.

    Raises:
        MalformedMessage: truncated, not UTF-8, or not JSON.
    """
    start, end = _skip_bytes(data, pos, what)
    try:
        json.loads(data[start:end].decode(), parse_constant=_reject_constant)
    except UnicodeDecodeError as exc:
        raise MalformedMessage(f"{what} at byte {pos} is not valid UTF-8") from exc
    except (ValueError, RecursionError) as exc:
        raise MalformedMessage(f"{what} at byte {pos} is not valid JSON") from exc
    return end


def _skip_rare_content(data: bytes, pos: int, ref: int, start: int) -> int:
    """Skip item content other than strings, ``Any`` values and deleted runs (length 1).

    Raises:
        MalformedMessage: the content is malformed or refused (see the module docstring).
    """
    if ref == ContentRef.TYPE:
        at = pos
        type_ref = data[pos]
        pos += 1
        if type_ref > 0x7F:
            type_ref, pos = _uint_tail(data, pos, type_ref)
        if type_ref == TypeRef.XML_ELEMENT:
            return _skip_string(data, pos, "XML node name")
        if type_ref == TypeRef.XML_HOOK:
            _skip_string(data, pos, "XML hook name")
            raise MalformedMessage(
                f"XML hook type at byte {at} is refused: Yjs reads a hook name after it, "
                "Yrs does not"
            )
        if type_ref > TypeRef.XML_TEXT:
            # Yjs calls typeRefs[type_ref] and throws; Yrs accepts some (9, 15) silently.
            raise MalformedMessage(f"type content at byte {at} has unknown type ref {type_ref}")
        return pos
    if ref == ContentRef.FORMAT:
        pos = _skip_string(data, pos, "format key")
        return _check_json(data, pos, "format value")
    if ref == ContentRef.EMBED:
        return _check_json(data, pos, "embed")
    if ref == ContentRef.BINARY:
        return _skip_bytes(data, pos, "binary content")[1]
    if ref == ContentRef.DOC:
        pos = _skip_string(data, pos, "subdocument guid")
        if data[pos] != AnyType.OBJECT:
            # Yjs reads opts.shouldLoad: null or undefined options throw.
            raise MalformedMessage(
                f"subdocument options at byte {pos} are not an object (type byte {data[pos]})"
            )
        return _skip_any(data, pos, 1)
    # ContentRef.JSON, the only ref left: parse it as Yjs does so that the message can
    # point at real damage first, then refuse it (see the module docstring).
    count = data[pos]
    pos += 1
    if count > 0x7F:
        count, pos = _uint_tail(data, pos, count)
    if count > len(data) - pos:
        raise MalformedMessage(
            f"item at byte {start} declares {count} JSON values, "
            f"only {len(data) - pos} bytes follow"
        )
    for _ in range(count):
        at = pos
        begin, pos = _skip_bytes(data, pos, "JSON value")
        if data[begin:pos] != b"undefined":
            _check_json(data, at, "JSON value")
    raise MalformedMessage(
        f"JSON content at byte {start} is refused: Yjs reads {count} values, Yrs {count + 1}"
    )


def _skip_any(data: bytes, pos: int, count: int) -> int:
    """Skip ``count`` consecutive lib0 ``Any`` values at ``pos``; return the next position.

    Iterative, with the nesting bounded by :data:`MAX_ANY_DEPTH`, so that a hostile
    value can neither exhaust Python's stack here nor Yrs's afterwards.

    Raises:
        MalformedMessage: unknown type byte, too deep, integer beyond 2^53-1, bad UTF-8
            or a declared length past the end.
        IndexError: the data ends where a type byte or a length should be.
    """
    n = len(data)
    stack: list[tuple[int, bool]] = []  # the enclosing containers' (remaining, is_object)
    remaining = count
    in_object = False
    while True:
        if not remaining:
            if not stack:
                return pos
            remaining, in_object = stack.pop()
            continue
        remaining -= 1
        if in_object:
            pos = _skip_string(data, pos, "object key")
        at = pos
        kind = data[pos]
        pos += 1
        if kind == _ANY_STRING:
            pos = _skip_string(data, pos, "string value")
        elif kind == _ANY_INTEGER:
            pos = _skip_var_int(data, pos)
        elif kind in _NO_PAYLOAD_ANY:
            pass
        elif kind in _CONTAINER_ANY:
            if len(stack) >= MAX_ANY_DEPTH:
                raise MalformedMessage(
                    f"Any value at byte {at} nests deeper than {MAX_ANY_DEPTH} levels"
                )
            size = data[pos]
            pos += 1
            if size > 0x7F:
                size, pos = _uint_tail(data, pos, size)
            if size > n - pos:
                raise MalformedMessage(
                    f"Any value at byte {at} declares {size} entries, only {n - pos} bytes follow"
                )
            stack.append((remaining, in_object))
            remaining = size
            in_object = kind == _ANY_OBJECT
        elif kind in _FIXED_ANY_SIZES:
            pos += _FIXED_ANY_SIZES[kind]
            if pos > n:
                raise MalformedMessage(
                    f"update truncated: {AnyType(kind).name.lower()} at byte {at} needs "
                    f"{_FIXED_ANY_SIZES[kind]} bytes, {n - at - 1} present"
                )
        elif kind == _ANY_BYTES:
            pos = _skip_bytes(data, pos, "byte array value")[1]
        else:
            # lib0's readAny indexes a table with it and throws; Yrs refuses it.
            raise MalformedMessage(f"Any value at byte {at} has unknown type byte {kind}")


def _skip_var_int(data: bytes, pos: int) -> int:
    """Skip a signed lib0 var-int (sign in bit 6 of the first byte); return the next position.

    Raises:
        MalformedMessage: its magnitude exceeds 2^53-1 (lib0 throws), it is longer than
            10 bytes, or the data ends inside it.
    """
    at = pos
    byte = data[pos]
    pos += 1
    if byte < 0x80:
        return pos
    num = byte & 0x3F
    shift = 6
    n = len(data)
    while True:
        if pos >= n:
            raise MalformedMessage(
                f"update truncated: var-int at byte {at} runs past the end ({n} bytes)"
            )
        byte = data[pos]
        pos += 1
        num |= (byte & 0x7F) << shift
        if num > _MAX_SAFE_INTEGER:
            raise MalformedMessage(f"integer at byte {at} exceeds 2^53-1 in magnitude")
        if byte < 0x80:
            return pos
        shift += 7
        if pos - at >= _MAX_VAR_UINT_BYTES:
            raise MalformedMessage(
                f"var-int at byte {at} is longer than {_MAX_VAR_UINT_BYTES} bytes"
            )
