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
    "DIGEST_BYTES",
    "EXTENSION_VERSION",
    "MAX_CLAIMS_PER_MESSAGE",
    "MAX_NAMES_PER_MESSAGE",
    "MAX_OWNER_BYTES",
    "MUX_VERSION",
    "AwarenessEntry",
    "AwarenessMessage",
    "ExtAck",
    "ExtChanged",
    "ExtChannel",
    "ExtClaim",
    "ExtClose",
    "ExtDigests",
    "ExtHello",
    "ExtLink",
    "ExtLinkDigests",
    "ExtLinkUpdate",
    "ExtLinked",
    "ExtOpen",
    "ExtRefused",
    "ExtSubscribe",
    "ExtType",
    "ExtUnsubscribe",
    "ExtUpdate",
    "Message",
    "MessageType",
    "PermissionDenied",
    "QueryAwareness",
    "SyncStep1",
    "SyncStep2",
    "SyncUpdate",
    "channel_header",
    "decode_awareness",
    "decode_message",
    "decode_state_vector",
    "encode_awareness",
    "encode_state_vector",
    "read_var_uint",
    "write_var_uint",
]

EXTENSION_VERSION = 1
# The hello on a multiplexed connection (issue 11) says version 2 or more: a server that
# confirms extensions but knows nothing of channels (it took "/" for a document) says 1.
MUX_VERSION = 2
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
    # A multiplexed connection (issue 11): documents as numbered channels on one socket.
    OPEN = 5  # replica -> relay: open channel N on a document
    CLOSE = 6  # either way: channel N is closed (by the relay: refused, with code and reason)
    CHANNEL = 7  # either way: one message of channel N's document (the rest of the frame)
    # Folders: every document under a prefix, announced as it changes.
    SUBSCRIBE = 8  # replica -> relay: keep folder N (a prefix) from a cursor of this store
    CHANGED = 9  # relay -> replica: documents of folder N that changed, up to a cursor
    DIGESTS = 10  # replica -> relay: what it holds of folder N (when the cursor is no use)
    UNSUBSCRIBE = 11  # either way: folder N is no longer kept (by the relay: refused, why)
    # Region links (issue 12): a relay of another region ships its region's updates.
    LINK = 12  # source -> target: who the source store is; or: record this checkpoint
    LINKED = 13  # target -> source: who the target store is, and what it recorded
    LINK_DIGESTS = 14  # source -> target: documents; target -> source: their digests
    LINK_UPDATE = 15  # source -> target, on a channel: an update and its ids' owners there


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


DIGEST_BYTES = 16  # crdtsync.folders.document_digest
MAX_NAMES_PER_MESSAGE = 1024  # documents named by one CHANGED or DIGESTS message


def channel_header(channel: int) -> bytes:
    """What precedes a channel's message in a multiplexed frame (:class:`ExtChannel`)."""
    return bytes((MessageType.CRDTSYNC, ExtType.CHANNEL)) + write_var_uint(channel)


@dataclass(frozen=True, slots=True)
class ExtOpen:
    """Open channel ``channel`` on ``document`` (a multiplexed connection)."""

    channel: int
    document: str

    def encode(self) -> bytes:
        return (
            bytes((MessageType.CRDTSYNC, ExtType.OPEN))
            + write_var_uint(self.channel)
            + _var_bytes(self.document.encode("utf-8"))
        )


@dataclass(frozen=True, slots=True)
class ExtClose:
    """Channel ``channel`` is closed; from the relay, with a websocket close code and why."""

    channel: int
    code: int = 1000
    reason: str = ""

    def encode(self) -> bytes:
        return (
            bytes((MessageType.CRDTSYNC, ExtType.CLOSE))
            + write_var_uint(self.channel)
            + write_var_uint(self.code)
            + _var_bytes(self.reason.encode("utf-8"))
        )


@dataclass(frozen=True, slots=True)
class ExtChannel:
    """One message of channel ``channel``'s document: ``frame`` is what a connection of
    its own would carry (a stock or extension message), to the end of the frame."""

    channel: int
    frame: bytes

    def encode(self) -> bytes:
        return channel_header(self.channel) + self.frame


@dataclass(frozen=True, slots=True)
class ExtSubscribe:
    """Keep folder ``folder``: every document whose name starts with ``prefix``.

    ``store``, ``epoch`` and ``cursor`` say what the sender has seen of that store's
    changes (``store`` empty: nothing yet); the relay lists what changed after it.
    """

    folder: int
    prefix: str
    store: str = ""
    epoch: int = 0
    cursor: int = 0

    def encode(self) -> bytes:
        return b"".join(
            (
                bytes((MessageType.CRDTSYNC, ExtType.SUBSCRIBE)),
                write_var_uint(self.folder),
                _var_bytes(self.prefix.encode("utf-8")),
                _var_bytes(self.store.encode("utf-8")),
                write_var_uint(self.epoch),
                write_var_uint(self.cursor),
            )
        )


@dataclass(frozen=True, slots=True)
class ExtChanged:
    """Documents of folder ``folder`` changed; after them the relay's listing reached
    ``cursor`` of store ``store`` (epoch ``epoch``).

    ``caught_up``: the listing of what changed before the subscription is done (later
    messages are live announcements). ``digests_wanted``: the cursor sent was of no use
    here (another store, a restored one, none): send digests of what you hold.
    ``digests``: none, or one per document (crdtsync.folders): a receiver that holds a
    document with the same digest has nothing to exchange for it.
    """

    folder: int
    documents: tuple[str, ...]
    store: str
    epoch: int
    cursor: int
    caught_up: bool = False
    digests_wanted: bool = False
    digests: tuple[bytes, ...] = ()

    def encode(self) -> bytes:
        out = [
            bytes((MessageType.CRDTSYNC, ExtType.CHANGED)),
            write_var_uint(self.folder),
            write_var_uint(
                int(self.caught_up) | int(self.digests_wanted) << 1 | int(bool(self.digests)) << 2
            ),
            _var_bytes(self.store.encode("utf-8")),
            write_var_uint(self.epoch),
            write_var_uint(self.cursor),
            write_var_uint(len(self.documents)),
        ]
        out.extend(_var_bytes(name.encode("utf-8")) for name in self.documents)
        if self.digests:
            if len(self.digests) != len(self.documents):
                raise ValueError("one digest per document, or none")
            out.extend(self.digests)
        return b"".join(out)


@dataclass(frozen=True, slots=True)
class ExtDigests:
    """What the sender holds of folder ``folder``: ``(document, digest)`` pairs; ``last``:
    the final batch (the relay then names what the sender lacks)."""

    folder: int
    entries: tuple[tuple[str, bytes], ...]
    last: bool = False

    def encode(self) -> bytes:
        out = [
            bytes((MessageType.CRDTSYNC, ExtType.DIGESTS)),
            write_var_uint(self.folder),
            write_var_uint(int(self.last)),
            write_var_uint(len(self.entries)),
        ]
        for name, digest in self.entries:
            out.append(_var_bytes(name.encode("utf-8")))
            out.append(_var_bytes(digest))
        return b"".join(out)


@dataclass(frozen=True, slots=True)
class ExtUnsubscribe:
    """Folder ``folder`` is no longer kept; from the relay, with a close code and why."""

    folder: int
    code: int = 1000
    reason: str = ""

    def encode(self) -> bytes:
        return (
            bytes((MessageType.CRDTSYNC, ExtType.UNSUBSCRIBE))
            + write_var_uint(self.folder)
            + write_var_uint(self.code)
            + _var_bytes(self.reason.encode("utf-8"))
        )


@dataclass(frozen=True, slots=True)
class ExtLink:
    """From a region's link to the relay of another region (the target).

    The source store is ``store`` at ``epoch``. Without a ``cursor`` the link asks what
    the target recorded of this source; with one, it asks the target to record that
    everything of the source's changes up to ``cursor`` is stored there (sent only once
    every update up to it was acknowledged).
    """

    store: str
    epoch: int
    cursor: int | None = None

    def encode(self) -> bytes:
        return b"".join(
            (
                bytes((MessageType.CRDTSYNC, ExtType.LINK)),
                _var_bytes(self.store.encode("utf-8")),
                write_var_uint(self.epoch),
                write_var_uint(0 if self.cursor is None else 1),
                write_var_uint(self.cursor or 0),
            )
        )


@dataclass(frozen=True, slots=True)
class ExtLinked:
    """The target's answer: its own store (``store`` at ``epoch``), and the checkpoint
    it holds of the source: ``cursor`` of the source store ``source`` at
    ``source_epoch`` (``source`` empty: none)."""

    store: str
    epoch: int
    source: str = ""
    source_epoch: int = 0
    cursor: int = 0

    def encode(self) -> bytes:
        return b"".join(
            (
                bytes((MessageType.CRDTSYNC, ExtType.LINKED)),
                _var_bytes(self.store.encode("utf-8")),
                write_var_uint(self.epoch),
                _var_bytes(self.source.encode("utf-8")),
                write_var_uint(self.source_epoch),
                write_var_uint(self.cursor),
            )
        )


@dataclass(frozen=True, slots=True)
class ExtLinkDigests:
    """A link's anti-entropy (issue 12): the source names documents (``digests`` empty);
    the target answers with each one's digest (crdtsync.folders.document_digest) in the
    same order, or leaves out the documents it may not tell (``digests`` then lists
    ``(name, digest)`` pairs in ``names`` order: only those it tells)."""

    names: tuple[str, ...]
    digests: tuple[bytes, ...] = ()

    def encode(self) -> bytes:
        if self.digests and len(self.digests) != len(self.names):
            raise ValueError("one digest per document, or none")
        out = [
            bytes((MessageType.CRDTSYNC, ExtType.LINK_DIGESTS)),
            write_var_uint(int(bool(self.digests))),
            write_var_uint(len(self.names)),
        ]
        out.extend(_var_bytes(name.encode("utf-8")) for name in self.names)
        out.extend(self.digests)
        return b"".join(out)


MAX_OWNER_BYTES = 1024  # one owner's name ("key", "sub:<token subject>")


@dataclass(frozen=True, slots=True)
class ExtLinkUpdate:
    """A link's update (issue 12), acknowledged under ``key`` as :class:`ExtUpdate`, with
    the owners its client ids have in the source region (``(client id, owner)`` pairs:
    crdtsync.integrity's ``"key"`` or ``"sub:<subject>"``), so that the target records
    them too and no writer there may take those ids' next clocks."""

    key: int
    update: bytes
    owners: tuple[tuple[int, str], ...] = ()

    def encode(self) -> bytes:
        out = [
            bytes((MessageType.CRDTSYNC, ExtType.LINK_UPDATE)),
            write_var_uint(self.key),
            _var_bytes(self.update),
            write_var_uint(len(self.owners)),
        ]
        for client, owner in self.owners:
            out += (write_var_uint(client), _var_bytes(owner.encode("utf-8")))
        return b"".join(out)


def _read_owners(data: bytes, pos: int) -> tuple[tuple[tuple[int, str], ...], int]:
    count, pos = read_var_uint(data, pos)
    if count > len(data) - pos:  # (each pair takes two bytes at least)
        raise MalformedMessage(f"link update names {count} owners in {len(data) - pos} bytes")
    owners = []
    for _ in range(count):
        client, pos = read_var_uint(data, pos)
        owner, pos = _read_var_string(data, pos, "owner")
        if len(owner) > MAX_OWNER_BYTES or not (owner == "key" or owner.startswith("sub:")):
            raise MalformedMessage(f"owner of client {client} is no owner: {owner[:40]!r}")
        owners.append((client, owner))
    return tuple(owners), pos


def _read_names(data: bytes, pos: int, what: str) -> tuple[list[str], int]:
    count, pos = read_var_uint(data, pos)
    if count > MAX_NAMES_PER_MESSAGE:
        raise MalformedMessage(f"{what} names {count} documents, more than {MAX_NAMES_PER_MESSAGE}")
    names = []
    for _ in range(count):
        name, pos = _read_var_string(data, pos, "document name")
        names.append(name)
    return names, pos


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
    | ExtLink
    | ExtLinked
    | ExtLinkDigests
    | ExtLinkUpdate
    | ExtUpdate
    | ExtAck
    | ExtClaim
    | ExtRefused
    | ExtOpen
    | ExtClose
    | ExtChannel
    | ExtSubscribe
    | ExtChanged
    | ExtDigests
    | ExtUnsubscribe
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
        elif sub == ExtType.OPEN:
            channel, pos = read_var_uint(data, pos)
            name, pos = _read_var_string(data, pos, "document name")
            msg = ExtOpen(channel, name)
        elif sub == ExtType.CLOSE:
            channel, pos = read_var_uint(data, pos)
            code, pos = read_var_uint(data, pos)
            reason, pos = _read_var_string(data, pos, "close reason")
            msg = ExtClose(channel, code, reason)
        elif sub == ExtType.CHANNEL:
            channel, pos = read_var_uint(data, pos)
            if pos == len(data):
                raise MalformedMessage(f"channel {channel} message carries nothing")
            msg = ExtChannel(channel, data[pos:])
            pos = len(data)
        elif sub == ExtType.SUBSCRIBE:
            folder, pos = read_var_uint(data, pos)
            prefix, pos = _read_var_string(data, pos, "folder prefix")
            store, pos = _read_var_string(data, pos, "store id")
            epoch, pos = read_var_uint(data, pos)
            cursor, pos = read_var_uint(data, pos)
            msg = ExtSubscribe(folder, prefix, store, epoch, cursor)
        elif sub == ExtType.CHANGED:
            folder, pos = read_var_uint(data, pos)
            flags, pos = read_var_uint(data, pos)
            store, pos = _read_var_string(data, pos, "store id")
            epoch, pos = read_var_uint(data, pos)
            cursor, pos = read_var_uint(data, pos)
            names, pos = _read_names(data, pos, "change message")
            digests: list[bytes] = []
            if flags & 4:
                end = pos + DIGEST_BYTES * len(names)
                if end > len(data):
                    raise MalformedMessage("change message ends inside its digests")
                digests = [data[i : i + DIGEST_BYTES] for i in range(pos, end, DIGEST_BYTES)]
                pos = end
            msg = ExtChanged(
                folder,
                tuple(names),
                store,
                epoch,
                cursor,
                bool(flags & 1),
                bool(flags & 2),
                tuple(digests),
            )
        elif sub == ExtType.DIGESTS:
            folder, pos = read_var_uint(data, pos)
            last, pos = read_var_uint(data, pos)
            count, pos = read_var_uint(data, pos)
            if count > MAX_NAMES_PER_MESSAGE:
                raise MalformedMessage(
                    f"digest message names {count} documents, more than {MAX_NAMES_PER_MESSAGE}"
                )
            entries = []
            for _ in range(count):
                name, pos = _read_var_string(data, pos, "document name")
                digest, pos = _read_var_bytes(data, pos, "digest")
                if len(digest) != DIGEST_BYTES:
                    raise MalformedMessage(
                        f"digest of {name!r} has {len(digest)} bytes, not {DIGEST_BYTES}"
                    )
                entries.append((name, digest))
            msg = ExtDigests(folder, tuple(entries), bool(last & 1))
        elif sub == ExtType.UNSUBSCRIBE:
            folder, pos = read_var_uint(data, pos)
            code, pos = read_var_uint(data, pos)
            reason, pos = _read_var_string(data, pos, "reason")
            msg = ExtUnsubscribe(folder, code, reason)
        elif sub == ExtType.LINK:
            store, pos = _read_var_string(data, pos, "store id")
            epoch, pos = read_var_uint(data, pos)
            has_cursor, pos = read_var_uint(data, pos)
            cursor, pos = read_var_uint(data, pos)
            msg = ExtLink(store, epoch, cursor if has_cursor & 1 else None)
        elif sub == ExtType.LINKED:
            store, pos = _read_var_string(data, pos, "store id")
            epoch, pos = read_var_uint(data, pos)
            source, pos = _read_var_string(data, pos, "source store id")
            source_epoch, pos = read_var_uint(data, pos)
            cursor, pos = read_var_uint(data, pos)
            msg = ExtLinked(store, epoch, source, source_epoch, cursor)
        elif sub == ExtType.LINK_DIGESTS:
            flags, pos = read_var_uint(data, pos)
            names, pos = _read_names(data, pos, "digest message")
            told: list[bytes] = []
            if flags & 1:
                end = pos + DIGEST_BYTES * len(names)
                if end > len(data):
                    raise MalformedMessage("digest message ends inside its digests")
                told = [data[i : i + DIGEST_BYTES] for i in range(pos, end, DIGEST_BYTES)]
                pos = end
            msg = ExtLinkDigests(tuple(names), tuple(told))
        elif sub == ExtType.LINK_UPDATE:
            key, pos = read_var_uint(data, pos)
            payload, pos = _read_var_bytes(data, pos, "update")
            owners, pos = _read_owners(data, pos)
            msg = ExtLinkUpdate(key, payload, owners)
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
