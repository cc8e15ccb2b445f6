"""SyncSession: one peer x one document, bytes in, bytes and events out; no I/O.

Both sides of a connection use it: the relay (answers from its store) and the replica
(answers from its ``Doc``). Like ``websockets.protocol.Protocol``, it never performs
I/O and never lets an exception escape ``receive_data``: a message it refuses becomes
a :class:`Failed` event with a close code and a reason, and the session then ignores
further input. The adapter moves bytes and carries out the events' decisions:

    session.receive_data(frame)
    for event in session.events_received():
        ...                            # e.g. StateRequested -> session.answer_state_request(...)
    for frame in session.data_to_send():
        await websocket.send(frame)

The session never touches a store. An update arrives as :class:`UpdateReceived`
(already validated: DESIGN's definition of a valid update), the adapter stores or
applies it, and, on the relay, calls :meth:`SyncSession.acknowledge` once it is durable.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

from pycrdt import get_state, get_update

from .errors import (
    AccessDenied,
    CloseCode,
    CrdtsyncError,
    LimitExceeded,
    MalformedMessage,
    ProtocolError,
    close_reason,
)
from .integrity import client_id_of_key
from .protocol import (
    MAX_CLAIMS_PER_MESSAGE,
    AwarenessEntry,
    AwarenessMessage,
    ExtAck,
    ExtClaim,
    ExtHello,
    ExtLinkUpdate,
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
    encode_state_vector,
)
from .updates import UpdateInfo, check_update

__all__ = [
    "DEFAULT_MAX_MESSAGE_BYTES",
    "Acknowledged",
    "AwarenessQueried",
    "AwarenessReceived",
    "ClientsClaimed",
    "Event",
    "ExtensionsConfirmed",
    "Failed",
    "LimitHit",
    "PermissionRefused",
    "Refused",
    "StateRequested",
    "SyncSession",
    "UpdateReceived",
    "check_message_update",
    "split_update",
]

DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
DEFAULT_ANSWER_PIECE_BYTES = 512 * 1024  # under every client's default frame limit (1 MiB)
DEFAULT_MAX_PRESENCE_BYTES = 1024 * 1024  # one presence message
DEFAULT_MAX_PRESENCE_STATE_BYTES = 64 * 1024  # one client's presence state (JSON)
READ_ONLY_REASON = "read-only access to this document"
MAX_CLAIMED_CLIENTS = 4096  # client ids one connection may prove (a replica's pending history)


@dataclass(frozen=True, slots=True)
class StateRequested:
    """The peer sent sync step 1: answer with :meth:`SyncSession.answer_state_request`."""

    state_vector: bytes


@dataclass(frozen=True, slots=True)
class UpdateReceived:
    """A validated update from the peer.

    ``key`` is set when the peer wants it acknowledged (crdtsync extension);
    ``answer`` is true for a sync step 2 (the answer to our step 1); ``owners``: what a
    region's link sent it with (:class:`~crdtsync.protocol.ExtLinkUpdate`), else None.
    """

    update: bytes
    info: UpdateInfo
    key: int | None = None
    answer: bool = False
    owners: tuple[tuple[int, str], ...] | None = None


@dataclass(frozen=True, slots=True)
class Acknowledged:
    """The relay durably stored the update we sent under ``key``."""

    key: int


@dataclass(frozen=True, slots=True)
class ExtensionsConfirmed:
    """The relay confirmed crdtsync's extensions (acknowledgements will come)."""

    version: int


@dataclass(frozen=True, slots=True)
class AwarenessReceived:
    """An awareness update (presence): relay it, never store it."""

    payload: bytes
    entries: list[AwarenessEntry]


@dataclass(frozen=True, slots=True)
class AwarenessQueried:
    """The peer asked for every current awareness state."""


@dataclass(frozen=True, slots=True)
class PermissionRefused:
    """The relay refused us (y-protocols auth "permission denied")."""

    reason: str


@dataclass(frozen=True, slots=True)
class ClientsClaimed:
    """The peer proved that it owns these client ids (each key checked).

    ``clients``: every id proved on this connection; ``fresh``: those of this message
    that have no content anywhere yet (their owner can be recorded at once).
    """

    clients: frozenset[int]
    fresh: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class Refused:
    """The relay refused content of the update we sent under ``key`` (0: unkeyed).

    ``unproven``: only for want of our proof of owning the client ids (claim again).
    """

    key: int
    reason: str
    unproven: bool = False


@dataclass(frozen=True, slots=True)
class LimitHit:
    """The peer went over a cap; what it sent was dropped (the adapter may count it)."""

    reason: str


@dataclass(frozen=True, slots=True)
class Failed:
    """The session refused the peer's input; close the connection with this code and reason."""

    error: CrdtsyncError
    close_code: int
    reason: str


Event = (
    StateRequested
    | UpdateReceived
    | Acknowledged
    | ExtensionsConfirmed
    | AwarenessReceived
    | AwarenessQueried
    | PermissionRefused
    | ClientsClaimed
    | Refused
    | LimitHit
    | Failed
)


MAX_ANSWER_PIECES = 32  # each piece is one pass of pycrdt over the whole answer


@dataclass(frozen=True, slots=True)
class _Terms:
    """What a session is made with, fixed: one object shared by the sessions made alike
    (a relay makes thousands the same way), not seven attributes each."""

    max_message_bytes: int
    answer_piece_bytes: int
    max_presence_bytes: int
    max_presence_state_bytes: int
    validate: Callable[[bytes], UpdateInfo]
    extensions: bool
    can_write: bool


def check_message_update(
    data: bytes, validate: Callable[[bytes], UpdateInfo]
) -> tuple[int, UpdateInfo | CrdtsyncError] | None:
    """Validate the update a message carries, ahead of :meth:`SyncSession.receive_data`.

    For a worker process: the relay checks large updates off its event loop and hands
    the result to the session (see ``SyncSession(validate=...)``). Returns the update's
    length with its :class:`UpdateInfo` or the error checking it raised, or None when the
    message carries no update or does not decode (the session then finds out itself).
    """
    try:
        msg = decode_message(data)
    except CrdtsyncError:
        return None
    if isinstance(msg, (SyncStep2, SyncUpdate, ExtUpdate, ExtLinkUpdate)):
        try:
            return len(msg.update), validate(msg.update)
        except CrdtsyncError as exc:
            return len(msg.update), exc
    return None


def split_update(update: bytes, max_bytes: int, info: UpdateInfo | None = None) -> list[bytes]:
    """Split an update into pieces of about ``max_bytes`` where possible.

    Pieces are cut by client: ``get_update(update, sv)`` with every other client's
    clock at its end leaves a group of clients' structs (and the delete set, which each
    piece repeats). Clients are grouped by count, one pass of pycrdt per group, at most
    :data:`MAX_ANSWER_PIECES` groups: cutting one client at a time cost one pass over the
    whole answer per client (minutes for a few thousand clients, found by an attack
    test). A single client's structs stay whole, so a piece may exceed ``max_bytes``;
    applying the pieces in any order gives the same document, as with any set of Yjs
    updates. Clients whose content starts after a gap, which pycrdt's state vector does
    not show, come with every piece (harmless: updates are idempotent).
    """
    if len(update) <= max_bytes:
        return [update]
    if info is not None:
        ends = dict(info.state)
        starts = dict(info.starts)
    else:
        ends = decode_state_vector(get_state(update))  # clients from clock 0: enough here
        starts = {}
    if len(ends) <= 1:
        return [update]
    clients = sorted(ends)
    groups = min(MAX_ANSWER_PIECES, len(clients), -(-len(update) // max_bytes))
    pieces: list[bytes] = []
    for g in range(groups):
        group = clients[g * len(clients) // groups : (g + 1) * len(clients) // groups]
        sv = dict(ends)
        for client in group:
            sv[client] = starts.get(client, 0)
        pieces.append(get_update(update, encode_state_vector(sv)))
    return pieces


class SyncSession:
    """The sync logic of one connection, for one document, on either side.

    (Slotted: a relay keeps one per open document, thousands on one connection.)

    Args:
        max_message_bytes: refuse incoming frames larger than this (close 1009).
        answer_piece_bytes: cut large step-2 answers into pieces of about this size.
        extensions: this side speaks crdtsync's extensions (the relay: the peer
            asked for them; the replica: it asked). Extension messages from a peer
            that did not ask are refused, and none are ever sent to it.
        can_write: the peer may send updates. Otherwise its updates are dropped and
            the connection stays open (stock clients resend their offline edits in
            every step 2: closing would loop): a stock peer gets one permission-denied
            message, a crdtsync peer a refusal per keyed update (its edits stay
            pending); its step 2 answers are dropped without a word.
        validate: checks an update and says what it holds (caps may be bound in).
        max_presence_bytes, max_presence_state_bytes: presence messages and states over
            these are dropped unread (a :class:`LimitHit` event), never decoded.
    """

    __slots__ = (
        "_events",
        "_out",
        "_terms",
        "claimed",
        "failure",
        "messages_received",
        "synced",
        "writes_dropped",
    )

    _made: ClassVar[dict[_Terms, _Terms]] = {}  # the terms sessions were made with

    def __init__(
        self,
        *,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        answer_piece_bytes: int = DEFAULT_ANSWER_PIECE_BYTES,
        extensions: bool = False,
        can_write: bool = True,
        validate: Callable[[bytes], UpdateInfo] = check_update,
        max_presence_bytes: int = DEFAULT_MAX_PRESENCE_BYTES,
        max_presence_state_bytes: int = DEFAULT_MAX_PRESENCE_STATE_BYTES,
    ) -> None:
        terms = _Terms(
            max_message_bytes,
            answer_piece_bytes,
            max_presence_bytes,
            max_presence_state_bytes,
            validate,
            extensions,
            can_write,
        )
        made = SyncSession._made
        try:
            terms = made.setdefault(terms, terms)
        except TypeError:
            pass  # (a validator that cannot be hashed: these terms stay this session's)
        else:
            if len(made) > 64:
                made.clear()  # (sessions made with many validators: tests, not a relay)
        self._terms = terms
        # Frames to send and events, since the last call: None while there are none
        # (an idle session holds no lists; a relay keeps thousands of sessions).
        self._out: list[bytes] | None = None
        self._events: list[Event] | None = None
        self.failure: Failed | None = None
        self.synced = False  # we received a step 2 (the answer to our step 1)
        self.messages_received = 0
        self.claimed: frozenset[int] = frozenset()  # client ids the peer proved
        self.writes_dropped = 0  # updates of a read-only peer, dropped

    @property
    def max_message_bytes(self) -> int:
        return self._terms.max_message_bytes

    @property
    def answer_piece_bytes(self) -> int:
        return self._terms.answer_piece_bytes

    @property
    def max_presence_bytes(self) -> int:
        return self._terms.max_presence_bytes

    @property
    def max_presence_state_bytes(self) -> int:
        return self._terms.max_presence_state_bytes

    @property
    def _validate(self) -> Callable[[bytes], UpdateInfo]:
        return self._terms.validate

    @property
    def extensions(self) -> bool:
        return self._terms.extensions

    @property
    def can_write(self) -> bool:
        return self._terms.can_write

    # -- input ------------------------------------------------------------------------

    def receive_data(
        self, data: bytes | str, checked: tuple[int, UpdateInfo | Exception] | None = None
    ) -> None:
        """Take one websocket message from the peer. Never raises for the peer's input.

        ``checked``: the result of checking this message's update ahead (e.g. in a worker
        process, :func:`check_message_update`): its length and its info or error, used
        instead of checking it again.
        """
        if self.failure is not None:
            return
        if isinstance(data, str):
            self.fail(
                ProtocolError("text frames are not part of the y-websocket protocol"),
                CloseCode.UNSUPPORTED_DATA,
            )
            return
        try:
            self._handle(decode_message(data, max_bytes=self.max_message_bytes), checked)
        except CrdtsyncError as exc:
            self.fail(exc)

    def fail(self, exc: CrdtsyncError, close_code: int | None = None) -> None:
        """Record a failure: the adapter closes the connection with its code and reason."""
        if self.failure is not None:
            return
        code = close_code if close_code is not None else getattr(exc, "close_code", None)
        if code is None:
            code = CloseCode.INTERNAL_ERROR
        self.failure = Failed(exc, int(code), close_reason(str(exc)))
        self._event(self.failure)

    def _drop_write(self, key: int | None) -> None:
        """A read-only peer's update: dropped, and said so (once to a stock client)."""
        self.writes_dropped += 1
        if key is not None:
            self._frame(ExtRefused(key, READ_ONLY_REASON, False).encode())
        elif self.writes_dropped == 1:
            self._frame(PermissionDenied(READ_ONLY_REASON).encode())

    def _check_update(
        self, update: bytes, checked: tuple[int, UpdateInfo | Exception] | None
    ) -> UpdateInfo:
        try:
            if checked is not None and checked[0] == len(update):
                if isinstance(checked[1], Exception):
                    raise checked[1]
                return checked[1]
            return self._validate(update)
        except MalformedMessage as exc:
            raise MalformedMessage(f"invalid update: {exc}") from exc

    def _handle(
        self, msg: Message, checked: tuple[int, UpdateInfo | Exception] | None = None
    ) -> None:
        self.messages_received += 1
        if isinstance(msg, SyncStep1):
            decode_state_vector(msg.state_vector)  # refuse garbage before anyone diffs with it
            self._event(StateRequested(msg.state_vector))
        elif isinstance(msg, SyncStep2):
            # A read-only peer still answers our step 1 (stock clients always do); its
            # answer is dropped, not refused: only its streamed updates are writes.
            if self.can_write:
                self._event(
                    UpdateReceived(msg.update, self._check_update(msg.update, checked), answer=True)
                )
            self.synced = True
        elif isinstance(msg, SyncUpdate):
            if not self.can_write:
                self._drop_write(None)
                return
            self._event(UpdateReceived(msg.update, self._check_update(msg.update, checked)))
        elif isinstance(msg, AwarenessMessage):
            if len(msg.payload) > self.max_presence_bytes:
                self._event(
                    LimitHit(
                        f"presence message of {len(msg.payload)} bytes, over the limit of "
                        f"{self.max_presence_bytes}"
                    )
                )
                return
            try:
                entries = decode_awareness(
                    msg.payload, max_state_bytes=self.max_presence_state_bytes
                )
            except LimitExceeded as exc:
                self._event(LimitHit(str(exc)))
                return
            self._event(AwarenessReceived(msg.payload, entries))
        elif isinstance(msg, QueryAwareness):
            self._event(AwarenessQueried())
        elif isinstance(msg, PermissionDenied):
            self._event(PermissionRefused(msg.reason))
        elif not self.extensions:
            raise ProtocolError(
                f"crdtsync extension message {type(msg).__name__} without asking for extensions"
            )
        elif isinstance(msg, ExtHello):
            self._event(ExtensionsConfirmed(msg.version))
        elif isinstance(msg, ExtUpdate | ExtLinkUpdate):
            if not self.can_write:
                self._drop_write(msg.key)
                return
            info = self._check_update(msg.update, checked)
            owners = msg.owners if isinstance(msg, ExtLinkUpdate) else None
            self._event(UpdateReceived(msg.update, info, key=msg.key, owners=owners))
        elif isinstance(msg, ExtAck):
            self._event(Acknowledged(msg.key))
        elif isinstance(msg, ExtClaim):
            if not self.can_write:
                return  # proofs of ownership matter to writes only: a reader's change nothing
            for client, key in msg.claims:
                if client_id_of_key(key) != client:
                    raise AccessDenied(f"claim of client {client} does not match its key")
            claimed = self.claimed | {client for client, _ in msg.claims}
            if len(claimed) > MAX_CLAIMED_CLIENTS:
                raise AccessDenied(
                    f"claims for more than {MAX_CLAIMED_CLIENTS} client ids on one connection"
                )
            self.claimed = claimed
            self._event(ClientsClaimed(claimed, msg.fresh))
        elif isinstance(msg, ExtRefused):
            self._event(Refused(msg.key, msg.reason, msg.unproven))
        else:
            # Channels and folders belong to a multiplexed connection, around sessions.
            raise ProtocolError(f"{type(msg).__name__} inside one document's messages")

    # -- output -----------------------------------------------------------------------

    def events_received(self) -> list[Event]:
        """Events since the last call, in order."""
        events, self._events = self._events, None
        return [] if events is None else events

    def data_to_send(self) -> list[bytes]:
        """Frames to send since the last call, in order."""
        out, self._out = self._out, None
        return [] if out is None else out

    def _frame(self, frame: bytes) -> None:
        if self._out is None:
            self._out = [frame]
        else:
            self._out.append(frame)

    def _event(self, event: Event) -> None:
        if self._events is None:
            self._events = [event]
        else:
            self._events.append(event)

    def send_hello(self) -> None:
        """Confirm extensions to a peer that asked for them (relay; first message)."""
        if not self.extensions:
            raise RuntimeError("send_hello() on a session without extensions")
        self._frame(ExtHello().encode())

    def send_step1(self, state_vector: bytes) -> None:
        """Send sync step 1: our state vector, asking for what we lack."""
        self._frame(SyncStep1(state_vector).encode())

    def answer_state_request(self, update: bytes, info: UpdateInfo | None = None) -> None:
        """Answer a step 1 with what the peer lacks, cut into pieces under the size limit.

        The last piece goes as sync step 2, the others as updates, so a client that
        marks itself synced on step 2 has everything by then.
        """
        self.answer_with_pieces(split_update(update, self.answer_piece_bytes, info))

    def answer_with_pieces(self, pieces: list[bytes]) -> None:
        """Answer a step 1 with an answer already cut (:func:`split_update`), e.g. one
        shared by several peers that asked the same."""
        for piece in pieces[:-1]:
            self._frame(SyncUpdate(piece).encode())
        self._frame(SyncStep2(pieces[-1]).encode())

    def send_update(self, update: bytes, key: int | None = None) -> None:
        """Stream an update; with ``key``, ask for an acknowledgement (extensions only)."""
        if key is None:
            self._frame(SyncUpdate(update).encode())
        elif not self.extensions:
            raise RuntimeError("an acknowledged update needs extensions")
        else:
            self._frame(ExtUpdate(key, update).encode())

    def acknowledge(self, key: int) -> None:
        """Tell the peer its update ``key`` is durably stored (extensions only)."""
        if self.extensions:
            self._frame(ExtAck(key).encode())

    def send_awareness(self, payload: bytes) -> None:
        """Send an awareness update."""
        self._frame(AwarenessMessage(payload).encode())

    def send_query_awareness(self) -> None:
        """Ask the peer for every current awareness state."""
        self._frame(QueryAwareness().encode())

    def send_claim(self, claims: dict[int, bytes], fresh: frozenset[int] = frozenset()) -> None:
        """Prove ownership of client ids to the relay (extensions only; after its hello).

        ``fresh``: the claimed ids that have no content yet (the relay records their
        owner at once, so that nobody can write there first).
        """
        if not self.extensions:
            raise RuntimeError("claims need extensions")
        items = list(claims.items())
        if not items:
            # Still said: until a replica's claims arrive, the relay takes no content
            # of ids without an owner from it (crdtsync.integrity.Writer).
            self._frame(ExtClaim(()).encode())
        for i in range(0, len(items), MAX_CLAIMS_PER_MESSAGE):
            part = tuple(items[i : i + MAX_CLAIMS_PER_MESSAGE])
            self._frame(ExtClaim(part, tuple(c for c, _ in part if c in fresh)).encode())

    def refuse(self, key: int | None, reason: str, *, unproven: bool = False) -> None:
        """Tell the peer content it sent was refused: an extension message to crdtsync
        peers, the y-protocols "permission denied" to stock clients (which only log it
        and keep their connection: closing would make them resend it forever)."""
        if self.extensions:
            self._frame(ExtRefused(key or 0, reason, unproven).encode())
        else:
            self._frame(PermissionDenied(reason).encode())

    def deny(self, reason: str) -> None:
        """Send "permission denied" (stock clients only log it; the adapter then closes)."""
        self._frame(PermissionDenied(reason).encode())
