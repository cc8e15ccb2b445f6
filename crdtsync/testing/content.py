"""What content a Yjs v1 update holds at each ``(client, clock)``, for the checker.

State vectors and delete sets say *which* ids a participant holds, not *what* it holds
there: two participants can share both and still show different documents if someone
wrote two different contents under one ``(client, clock)`` (a hostile or buggy writer).
This module reads the structs of an update into one :class:`Unit` per clock, so the
checker can compare content id by id.

A unit is what Yjs keeps invariant when it splits and squashes items: the item's left
origin, right origin, parent and parent key (written only when the item has no
origins), and one clock's worth of content. The first unit of an item carries the
item's own origins; a later unit at offset ``i`` has the left origin ``(client, clock
- 1)`` and the item's right origin, exactly what Yjs writes for the right half of a
split item. So the same item encoded whole by one participant and in pieces by another
reads as the same units.

Deleted content (``ContentDeleted``, what garbage collection leaves of a deleted item)
keeps its origins but not its value: its value matches anything. A ``GC`` struct keeps
nothing: it matches anything. Values are compared as values: numbers by value, objects
regardless of key order (Yrs keeps ``Any`` objects in hash maps, so two processes may
write one object's keys in different orders).

Deliberately independent of the relay's own reader (``crdtsync.integrity``): the checker
is the oracle for the relay, so it must not share the relay's mistakes. Input is
trusted to be a valid update (the checker validates with ``check_update`` first);
anything that does not decode raises :class:`ValueError`.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["DELETED", "Unit", "Units", "compatible", "describe_unit", "read_units"]

Id = tuple[int, int]
# Hashable, order-free stand-ins for lib0 Any values (see _freeze).
Frozen = Any


class _Deleted:
    """The value of deleted content: gone, so it matches any value."""

    _instance: _Deleted | None = None

    def __new__(cls) -> _Deleted:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "DELETED"


DELETED = _Deleted()
_REPLACEMENT = ("s", 0xFFFD)  # U+FFFD: what Yjs leaves of a surrogate pair split in two


@dataclass(frozen=True, slots=True)
class Unit:
    """One clock of one item: where it was inserted and what it holds.

    Attributes:
        origin: the id of the left neighbour at insertion, if any.
        right_origin: the id of the right neighbour at insertion, if any.
        parent: the root type's name or the parent item's id; only when the item has
            neither origin (Yjs writes it only then).
        parent_sub: the map key, under the same condition.
        value: one clock's worth of content (a tagged, hashable value), or
            :data:`DELETED`.
    """

    origin: Id | None
    right_origin: Id | None
    parent: str | Id | None
    parent_sub: str | None
    value: Frozen


# (client, clock) -> the unit there; None for a GC struct (nothing left to compare).
Units = dict[Id, Unit | None]


def compatible(a: Unit | None, b: Unit | None) -> bool:
    """Could ``a`` and ``b`` be the same clock of the same item?

    Garbage-collected units match anything, deleted values match any value; everything
    else must be equal.
    """
    if a is None or b is None:
        return True
    if (a.origin, a.right_origin, a.parent, a.parent_sub) != (
        b.origin,
        b.right_origin,
        b.parent,
        b.parent_sub,
    ):
        return False
    if a.value is DELETED or b.value is DELETED or a.value == b.value:
        return True
    return _REPLACEMENT in (a.value, b.value) and a.value[0] == b.value[0] == "s"


def describe_unit(unit: Unit | None) -> str:
    """A short human description of a unit, for violation messages."""
    if unit is None:
        return "collected content"
    value = unit.value
    if value is DELETED:
        what = "deleted content"
    elif value[0] == "s":
        what = f"text {chr(value[1])!r}" if value[1] < 0xD800 or value[1] > 0xDFFF else "text"
    elif value[0] == "type":
        what = f"a shared type ({_TYPE_NAMES.get(value[1], value[1])})"
    else:
        what = f"a {value[0]} value"
    if unit.origin is not None:
        where = f"after {unit.origin[0]}:{unit.origin[1]}"
    elif unit.right_origin is not None:
        where = f"before {unit.right_origin[0]}:{unit.right_origin[1]}"
    elif isinstance(unit.parent, str):
        where = f"in root {unit.parent!r}"
    elif unit.parent is not None:
        where = f"in {unit.parent[0]}:{unit.parent[1]}"
    else:
        where = "somewhere"
    return f"{what} {where}"


_TYPE_NAMES = {0: "array", 1: "map", 2: "text", 3: "xml element", 4: "xml fragment", 6: "xml text"}


def read_units(update: bytes, state: Mapping[int, int] | None = None) -> Units:
    """Read every struct of ``update`` into units.

    Args:
        update: one v1 update (validated beforehand).
        state: if given, keep only clocks below ``state[client]``: what is integrated,
            not what waits behind a gap.

    Raises:
        ValueError: the update does not decode.
    """
    reader = _Reader(update)
    units: Units = {}
    try:
        for client, clock, length, items in reader.structs():
            limit = None if state is None else state.get(client, 0)
            for offset in range(length):
                if limit is not None and clock + offset >= limit:
                    break
                units[(client, clock + offset)] = items[offset] if items is not None else None
    except (IndexError, UnicodeDecodeError, struct.error) as exc:
        raise ValueError(f"update does not decode at byte {reader.pos}: {exc}") from exc
    return units


class _Reader:
    """lib0 decoding of the struct section of a v1 update (Yjs ``UpdateDecoderV1``)."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def uint(self) -> int:
        num = 0
        shift = 0
        while True:
            byte = self.data[self.pos]
            self.pos += 1
            num |= (byte & 0x7F) << shift
            if byte < 0x80:
                return num
            shift += 7
            if shift > 70:
                raise ValueError(f"var-uint at byte {self.pos} is too long")

    def var_int(self) -> int:
        byte = self.data[self.pos]
        self.pos += 1
        num = byte & 0x3F
        negative = bool(byte & 0x40)
        shift = 6
        while byte & 0x80:
            byte = self.data[self.pos]
            self.pos += 1
            num |= (byte & 0x7F) << shift
            shift += 7
            if shift > 70:
                raise ValueError(f"var-int at byte {self.pos} is too long")
        return -num if negative else num

    def raw(self) -> bytes:
        size = self.uint()
        end = self.pos + size
        if end > len(self.data):
            raise ValueError(f"{size} bytes declared at byte {self.pos}, fewer present")
        out = self.data[self.pos : end]
        self.pos = end
        return out

    def string(self) -> str:
        return self.raw().decode("utf-8")

    def id(self) -> Id:
        return (self.uint(), self.uint())

    def fixed(self, fmt: str) -> Any:
        size = struct.calcsize(fmt)
        (value,) = struct.unpack_from(fmt, self.data, self.pos)
        self.pos += size
        return value

    def any(self, depth: int = 0) -> Frozen:
        if depth > 256:
            raise ValueError("Any value nested too deeply")
        kind = self.data[self.pos]
        self.pos += 1
        if kind == 127:
            return ("undefined",)
        if kind == 126:
            return None
        if kind == 125:
            return _number(self.var_int())
        if kind == 124:
            return _number(self.fixed(">f"))
        if kind == 123:
            return _number(self.fixed(">d"))
        if kind == 122:
            return _number(self.fixed(">q"))
        if kind in (121, 120):
            return ("bool", kind == 120)  # tagged: True == 1 in Python, not in Yjs
        if kind == 119:
            return self.string()
        if kind == 118:
            size = self.uint()
            entries = [(self.string(), self.any(depth + 1)) for _ in range(size)]
            return ("object", frozenset(entries))
        if kind == 117:
            return ("array", tuple(self.any(depth + 1) for _ in range(self.uint())))
        if kind == 116:
            return ("bytes", self.raw())
        raise ValueError(f"unknown Any type {kind} at byte {self.pos - 1}")

    def structs(self) -> Iterator[tuple[int, int, int, list[Unit] | None]]:
        """Yield ``(client, clock, length, units)`` per struct; units None for GC; no skips."""
        for _ in range(self.uint()):
            count = self.uint()
            client = self.uint()
            clock = self.uint()
            for _ in range(count):
                info = self.data[self.pos]
                self.pos += 1
                ref = info & 0x1F
                if ref in (0, 10):  # GC, skip
                    length = self.uint()
                    if ref == 0:
                        yield client, clock, length, None
                    clock += length
                    continue
                origin = self.id() if info & 0x80 else None
                right = self.id() if info & 0x40 else None
                parent: str | Id | None = None
                parent_sub = None
                if not info & 0xC0:
                    parent = self.string() if self.uint() == 1 else self.id()
                    if info & 0x20:
                        parent_sub = self.string()
                values = self.content(ref)
                first = Unit(origin, right, parent, parent_sub, values[0])
                units = [first] + [
                    Unit((client, clock + i - 1), right, None, None, value)
                    for i, value in enumerate(values[1:], 1)
                ]
                yield client, clock, len(units), units
                clock += len(units)

    def content(self, ref: int) -> list[Frozen]:
        """One frozen value per clock of an item's content."""
        if ref == 1:  # deleted
            return [DELETED] * self.uint()
        if ref == 4:  # string: one clock per UTF-16 code unit
            text = self.string().encode("utf-16-le")
            return [
                ("s", int.from_bytes(text[i : i + 2], "little")) for i in range(0, len(text), 2)
            ]
        if ref == 8:  # Any
            return [("any", self.any()) for _ in range(self.uint())]
        if ref == 2:  # JSON (legacy)
            return [("json", self.string()) for _ in range(self.uint())]
        if ref == 3:
            return [("binary", self.raw())]
        if ref == 5:
            return [("embed", self.string())]
        if ref == 6:
            return [("format", self.string(), self.string())]
        if ref == 7:
            type_ref = self.uint()
            name = self.string() if type_ref in (3, 5) else None
            return [("type", type_ref, name)]
        if ref == 9:
            return [("doc", self.string(), self.any())]
        raise ValueError(f"unknown content ref {ref} at byte {self.pos}")


def _number(value: float) -> Frozen:
    """Numbers by value: Yrs writes 1 as a float32 where Yjs may write an integer."""
    if isinstance(value, float) and math.isnan(value):
        return ("nan",)
    return value
