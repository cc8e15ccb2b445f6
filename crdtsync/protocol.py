"""The y-websocket wire protocol: message dataclasses to and from bytes, bounds-checked.

Framing follows y-protocols (``sync.js``, ``awareness.js``, ``auth.js``) and lib0's
encoding: every message starts with a var-uint message type; byte arrays and strings
are var-uint length prefixed. Types 0-3 are the stock protocol; :data:`MessageType.CRDTSYNC`
(100) carries crdtsync's extensions, sent only to peers that asked for them
(DESIGN: wire protocol). The type sits above Hocuspocus's 4-10.

Decoding never lets a foreign exception escape: anything that does not decode
exactly (unknown type, truncated length, trailing bytes, over-long var-uint)
raises :class:`~crdtsync.errors.MalformedMessage` with what was wrong and where.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

from pycrdt import YMessageType, YSyncMessageType

from .errors import LimitExceeded, MalformedMessage, MessageTooLarge

__all__ = [
    "CLIENT_KEY_BYTES",
    "EXTENSION_VERSION",
    "MAX_CLAIMS_PER_MESSAGE",
    "AwarenessEntry",
    "AwarenessMessage",
    "ExtAck",
    "ExtClaim",
    "ExtHello",
    "ExtRefused",
    "ExtType",
    "ExtUpdate",
    "Message",
    "MessageType",
    "PermissionDenied",
    "QueryAwareness",
    "SyncStep1",
    "SyncStep2",
    "SyncUpdate",
    "decode_awareness",
    "decode_message",
    "decode_state_vector",
    "encode_awareness",
    "encode_state_vector",
    "read_var_uint",
    "write_var_uint",
]

EXTENSION_VERSION = 1
# lib0 var-uints carry at most 53 bits in JS (Number.MAX_SAFE_INTEGER): 8 bytes of 7 bits.
_MAX_VAR_UINT_BYTES = 8
MAX_SAFE_INTEGER = 2**53 - 1


class MessageType(IntEnum):
    """Top-level message types (y-websocket; 100 is crdtsync's extension)."""

    SYNC = YMessageType.SYNC
    AWARENESS = YMessageType.AWARENESS
    AUTH = 2
    QUERY_AWARENESS = 3
    CRDTSYNC = 100


class ExtType(IntEnum):
    """Sub-types of :data:`MessageType.CRDTSYNC` messages."""

    HELLO = 0  # relay -> replica: extensions confirmed, before anything else
    UPDATE = 1  # replica -> relay: an update with a key to acknowledge
    ACK = 2  # relay -> replica: the update with this key is durably stored
    CLAIM = 3  # replica -> relay: client ids it owns, each with the key proving it
    REFUSED = 4  # relay -> replica: (part of) the update with this key was refused, and why


class AuthType(IntEnum):
    PERMISSION_DENIED = 0


def write_var_uint(num: int) -> bytes:
    """Encode a non-negative integer as a lib0 var-uint."""
    if num < 0:
        raise ValueError(f"var-uint must be non-negative, got {num}")
    out = bytearray()
    while num > 127:
        out.append(0x80 | (num & 0x7F))
        num >>= 7
    out.append(num)
    return bytes(out)


def read_var_uint(data: bytes, pos: int) -> tuple[int, int]:
    """Decode a var-uint at ``pos``; return ``(value, next_pos)``.

    Raises:
        MalformedMessage: the buffer ends inside the number, or it is longer than 53 bits.
    """
    num = 0
    shift = 0
    end = len(data)
    for i in range(_MAX_VAR_UINT_BYTES):
        if pos + i >= end:
            raise MalformedMessage(f"var-uint truncated at byte {pos + i} of {end}")
        byte = data[pos + i]
        num |= (byte & 0x7F) << shift
        if byte < 0x80:
            if num > MAX_SAFE_INTEGER:
                raise MalformedMessage(f"var-uint at byte {pos} exceeds 2^53-1")
            return num, pos + i + 1
        shift += 7
    raise MalformedMessage(f"var-uint at byte {pos} is longer than {_MAX_VAR_UINT_BYTES} bytes")


def _read_var_bytes(data: bytes, pos: int, what: str) -> tuple[bytes, int]:
    length, pos = read_var_uint(data, pos)
    end = pos + length
    if end > len(data):
        raise MalformedMessage(f"{what} declares {length} bytes, {len(data) - pos} present")
    return data[pos:end], end


def _read_var_string(data: bytes, pos: int, what: str) -> tuple[str, int]:
    raw, pos = _read_var_bytes(data, pos, what)
    try:
        return raw.decode("utf-8"), pos
    except UnicodeDecodeError as exc:
        raise MalformedMessage(f"{what} is not valid UTF-8: {exc.reason}") from exc


def _var_bytes(payload: bytes) -> bytes:
    return write_var_uint(len(payload)) + payload


def _framed(header: bytes, payload: bytes) -> bytes:
    """``header`` then ``payload`` with its length: one copy of a payload of megabytes."""
    return b"".join((header, write_var_uint(len(payload)), payload))


_STEP2 = bytes((MessageType.SYNC, YSyncMessageType.SYNC_STEP2))
_UPDATE = bytes((MessageType.SYNC, YSyncMessageType.SYNC_UPDATE))
_AWARENESS = bytes((MessageType.AWARENESS,))


@dataclass(frozen=True, slots=True)
class SyncStep1:
    """Sync step 1: "here is my state vector, send me what I lack"."""

    state_vector: bytes

    def encode(self) -> bytes:
        return bytes((MessageType.SYNC, YSyncMessageType.SYNC_STEP1)) + _var_bytes(
            self.state_vector
        )


@dataclass(frozen=True, slots=True)
class SyncStep2:
    """Sync step 2: the answer to a step 1, an update with what the asker lacked."""

    update: bytes

    def encode(self) -> bytes:
        return _framed(_STEP2, self.update)


@dataclass(frozen=True, slots=True)
class SyncUpdate:
    """A document update, streamed after the initial sync."""

    update: bytes

    def encode(self) -> bytes:
        return _framed(_UPDATE, self.update)

    @staticmethod
    def header(length: int) -> bytes:
        """What precedes an update of ``length`` bytes in its message (a sender of a
        large update can send the two apart instead of copying them into one)."""
        return _UPDATE + write_var_uint(length)


@dataclass(frozen=True, slots=True)
class AwarenessMessage:
    """An awareness (presence) update, relayed and never stored."""

    payload: bytes

    def encode(self) -> bytes:
        return _framed(_AWARENESS, self.payload)


@dataclass(frozen=True, slots=True)
class QueryAwareness:
    """A request for every current awareness state of the room."""

    def encode(self) -> bytes:
        return bytes((MessageType.QUERY_AWARENESS,))


@dataclass(frozen=True, slots=True)
class PermissionDenied:
    """Auth message "permission denied" (y-protocols auth.js), with a reason."""

    reason: str

    def encode(self) -> bytes:
        return bytes((MessageType.AUTH, AuthType.PERMISSION_DENIED)) + _var_bytes(
            self.reason.encode("utf-8")
        )


@dataclass(frozen=True, slots=True)
class ExtHello:
    """The relay confirms crdtsync's extensions (sent first, and only when asked for)."""

    version: int = EXTENSION_VERSION

    def encode(self) -> bytes:
        return bytes((MessageType.CRDTSYNC, ExtType.HELLO)) + write_var_uint(self.version)


@dataclass(frozen=True, slots=True)
class ExtUpdate:
    """An update whose durable storage the sender wants acknowledged under ``key``."""

    key: int
    update: bytes

    def encode(self) -> bytes:
        return (
            bytes((MessageType.CRDTSYNC, ExtType.UPDATE))
            + write_var_uint(self.key)
            + _var_bytes(self.update)
        )


@dataclass(frozen=True, slots=True)
class ExtAck:
    """The update sent under ``key`` is durably stored by the relay."""

    key: int

    def encode(self) -> bytes:
        return bytes((MessageType.CRDTSYNC, ExtType.ACK)) + write_var_uint(self.key)


CLIENT_KEY_BYTES = 32
MAX_CLAIMS_PER_MESSAGE = 1024


@dataclass(frozen=True, slots=True)
class ExtClaim:
    """The sender owns these client ids: ``(client id, key)`` pairs (crdtsync.integrity).

    ``fresh``: those of them that have no content yet anywhere (only their owner can
    write them, and it has not): the relay may record their owner at once.
    """

    claims: tuple[tuple[int, bytes], ...]
    fresh: tuple[int, ...] = ()

    def encode(self) -> bytes:
        out = [bytes((MessageType.CRDTSYNC, ExtType.CLAIM)), write_var_uint(len(self.claims))]
        for client, key in self.claims:
            out.append(write_var_uint(client))
            out.append(_var_bytes(key))
        out.append(write_var_uint(len(self.fresh)))
        out.extend(write_var_uint(client) for client in self.fresh)
        return b"".join(out)


@dataclass(frozen=True, slots=True)
class ExtRefused:
    """Content of the update sent under ``key`` (0: an unkeyed one) was refused, and why.

    ``unproven``: (part of) it was refused only because the sender had not proven that
    it owns the client ids: its claim was lost or overtaken; claim again and resend.
    """

    key: int
    reason: str
    unproven: bool = False

    def encode(self) -> bytes:
        return (
            bytes((MessageType.CRDTSYNC, ExtType.REFUSED))
            + write_var_uint(self.key)
            + write_var_uint(int(self.unproven))
            + _var_bytes(self.reason.encode("utf-8"))
        )


_SYNC_KINDS: dict[int, tuple[type[SyncStep1 | SyncStep2 | SyncUpdate], str]] = {
    YSyncMessageType.SYNC_STEP1: (SyncStep1, "sync step 1 state vector"),
    YSyncMessageType.SYNC_STEP2: (SyncStep2, "sync step 2 update"),
    YSyncMessageType.SYNC_UPDATE: (SyncUpdate, "sync update"),
}

Message = (
    SyncStep1
    | SyncStep2
    | SyncUpdate
    | AwarenessMessage
    | QueryAwareness
    | PermissionDenied
    | ExtHello
    | ExtUpdate
    | ExtAck
    | ExtClaim
    | ExtRefused
)


def decode_message(data: bytes, *, max_bytes: int | None = None) -> Message:
    """Decode one websocket binary frame into a message.

    Args:
        data: the whole frame payload.
        max_bytes: refuse frames larger than this.

    Raises:
        MessageTooLarge: ``data`` is longer than ``max_bytes``.
        MalformedMessage: anything that does not decode exactly, trailing bytes included.
    """
    if max_bytes is not None and len(data) > max_bytes:
        raise MessageTooLarge(f"message of {len(data)} bytes exceeds the limit of {max_bytes}")
    if not data:
        raise MalformedMessage("empty message")
    kind, pos = read_var_uint(data, 0)
    msg: Message
    if kind == MessageType.SYNC:
        sub, pos = read_var_uint(data, pos)
        kind_cls = _SYNC_KINDS.get(sub)
        if kind_cls is None:
            raise MalformedMessage(f"unknown sync message type {sub}")
        cls, what = kind_cls
        payload, pos = _read_var_bytes(data, pos, what)
        msg = cls(payload)
    elif kind == MessageType.AWARENESS:
        payload, pos = _read_var_bytes(data, pos, "awareness payload")
        msg = AwarenessMessage(payload)
    elif kind == MessageType.QUERY_AWARENESS:
        msg = QueryAwareness()
    elif kind == MessageType.AUTH:
        sub, pos = read_var_uint(data, pos)
        if sub != AuthType.PERMISSION_DENIED:
            raise MalformedMessage(f"unknown auth message type {sub}")
        reason, pos = _read_var_string(data, pos, "permission-denied reason")
        msg = PermissionDenied(reason)
    elif kind == MessageType.CRDTSYNC:
        sub, pos = read_var_uint(data, pos)
        if sub == ExtType.HELLO:
            version, pos = read_var_uint(data, pos)
            msg = ExtHello(version)
        elif sub == ExtType.UPDATE:
            key, pos = read_var_uint(data, pos)
            payload, pos = _read_var_bytes(data, pos, "update")
            msg = ExtUpdate(key, payload)
        elif sub == ExtType.ACK:
            key, pos = read_var_uint(data, pos)
            msg = ExtAck(key)
        elif sub == ExtType.CLAIM:
            count, pos = read_var_uint(data, pos)
            if count > MAX_CLAIMS_PER_MESSAGE:
                raise MalformedMessage(
                    f"claim message declares {count} client ids, more than {MAX_CLAIMS_PER_MESSAGE}"
                )
            claims = []
            for _ in range(count):
                client, pos = read_var_uint(data, pos)
                key_bytes, pos = _read_var_bytes(data, pos, "client key")
                if len(key_bytes) != CLIENT_KEY_BYTES:
                    raise MalformedMessage(
                        f"client key for client {client} has {len(key_bytes)} bytes, "
                        f"not {CLIENT_KEY_BYTES}"
                    )
                claims.append((client, key_bytes))
            fresh = []
            count, pos = read_var_uint(data, pos)
            if count > len(claims):
                raise MalformedMessage(
                    f"claim message names {count} fresh ids of {len(claims)} claimed"
                )
            claimed = {client for client, _ in claims}
            for _ in range(count):
                client, pos = read_var_uint(data, pos)
                if client not in claimed:
                    raise MalformedMessage(f"fresh id {client} is not claimed")
                fresh.append(client)
            msg = ExtClaim(tuple(claims), tuple(fresh))
        elif sub == ExtType.REFUSED:
            key, pos = read_var_uint(data, pos)
            flags, pos = read_var_uint(data, pos)
            reason, pos = _read_var_string(data, pos, "refusal reason")
            msg = ExtRefused(key, reason, bool(flags & 1))
        else:
            raise MalformedMessage(f"unknown crdtsync extension message type {sub}")
    else:
        raise MalformedMessage(f"unknown message type {kind}")
    if pos != len(data):
        raise MalformedMessage(f"{len(data) - pos} trailing bytes after a {type(msg).__name__}")
    return msg


@dataclass(frozen=True, slots=True)
class AwarenessEntry:
    """One client's awareness state; ``state is None`` means the client left.

    ``size`` is the length of the state's JSON text as received (0 when encoded here).
    """

    client_id: int
    clock: int
    state: Any
    size: int = field(default=0, compare=False)

    @property
    def removed(self) -> bool:
        return self.state is None


def decode_awareness(payload: bytes, *, max_state_bytes: int | None = None) -> list[AwarenessEntry]:
    """Decode an awareness update (y-protocols awareness.js ``encodeAwarenessUpdate``).

    Raises:
        MalformedMessage: truncated payload, trailing bytes or a state that is not JSON.
        LimitExceeded: a state over ``max_state_bytes`` (not parsed), or one nested too
            deeply for Python's JSON parser (presence is dropped, not the connection).
    """
    count, pos = read_var_uint(payload, 0)
    entries: list[AwarenessEntry] = []
    # Each entry needs at least three bytes: a bound that stops a huge declared count early.
    if count * 3 > len(payload) - pos:
        raise MalformedMessage(f"awareness update declares {count} entries in {len(payload)} bytes")
    for _ in range(count):
        client_id, pos = read_var_uint(payload, pos)
        clock, pos = read_var_uint(payload, pos)
        raw, pos = _read_var_bytes(payload, pos, "awareness state")
        if max_state_bytes is not None and len(raw) > max_state_bytes:
            raise LimitExceeded(
                f"presence state of client {client_id} has {len(raw)} bytes, "
                f"over the limit of {max_state_bytes}"
            )
        try:
            state = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise MalformedMessage(f"awareness state is not valid UTF-8: {exc.reason}") from exc
        except RecursionError as exc:
            raise LimitExceeded(
                f"presence state of client {client_id} nests too deeply to decode"
            ) from exc
        except ValueError as exc:
            raise MalformedMessage(f"awareness state of client {client_id} is not JSON") from exc
        entries.append(AwarenessEntry(client_id, clock, state, len(raw)))
    if pos != len(payload):
        raise MalformedMessage(f"{len(payload) - pos} trailing bytes after an awareness update")
    return entries


def encode_awareness(entries: list[AwarenessEntry]) -> bytes:
    """Encode awareness entries as an awareness update payload."""
    out = [write_var_uint(len(entries))]
    for entry in entries:
        out.append(write_var_uint(entry.client_id))
        out.append(write_var_uint(entry.clock))
        out.append(_var_bytes(json.dumps(entry.state, separators=(",", ":")).encode("utf-8")))
    return b"".join(out)


def decode_state_vector(sv: bytes) -> dict[int, int]:
    """Decode a Yjs state vector (client id -> next expected clock).

    Raises:
        MalformedMessage: truncated, trailing bytes, or numbers over 2^53-1.
    """
    count, pos = read_var_uint(sv, 0)
    if count * 2 > len(sv) - pos:
        raise MalformedMessage(f"state vector declares {count} clients in {len(sv)} bytes")
    out: dict[int, int] = {}
    for _ in range(count):
        client, pos = read_var_uint(sv, pos)
        clock, pos = read_var_uint(sv, pos)
        out[client] = clock
    if pos != len(sv):
        raise MalformedMessage(f"{len(sv) - pos} trailing bytes after a state vector")
    return out


def encode_state_vector(state: dict[int, int]) -> bytes:
    """Encode a state vector (client id -> clock) the way Yjs does."""
    out = [write_var_uint(len(state))]
    for client, clock in state.items():
        out.append(write_var_uint(client))
        out.append(write_var_uint(clock))
    return b"".join(out)
