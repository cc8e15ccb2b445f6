"""The relay: a stateless y-websocket endpoint that persists every update, then fans it out.

Stateless (DESIGN: relay): no ``Doc`` per room. A room is the set of connections on one
document plus its awareness states; it disappears with its last connection. Each
incoming update is validated by the session, appended to the store together with the
rest of this event-loop turn's updates (one commit), and only then broadcast and
acknowledged. Sync step 1 is answered from the store (snapshot + tail, merged and
diffed against the asker's state vector), after the connection joined the room's
fan-out, so no update slips between the two.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import functools
import gc
import hmac
import inspect
import ipaddress
import json
import logging
import os
import random
import signal
import ssl
import time
import uuid
import weakref
from collections import Counter, deque
from collections.abc import (
    AsyncIterable,
    AsyncIterator,
    Awaitable,
    Callable,
    Collection,
    Iterable,
    Iterator,
    Sequence,
)
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from http import HTTPStatus
from multiprocessing import get_context
from typing import IO, TYPE_CHECKING, Any, Protocol, TypeVar
from urllib.parse import parse_qs

from pycrdt import get_state, get_update
from websockets.asyncio.server import Server, ServerConnection, broadcast, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response
from websockets.typing import Data, DataLike, StatusLike

from crdtsync.auth import Rights, TokenClaims, TokenVerifier, token_from_request
from crdtsync.backend import Change, Entry, Follower, Gap, LinkCheckpoint, RelayStore
from crdtsync.backoff import Backoff
from crdtsync.errors import (
    AccessDenied,
    CloseCode,
    CrdtsyncError,
    DocumentsFailed,
    InvalidDocumentName,
    MalformedMessage,
    PositionConflict,
    StoreError,
    StoreUnreachable,
    TokenRefused,
    close_reason,
)
from crdtsync.folders import Cursor, FolderIndex, document_digest, in_folder, validate_prefix
from crdtsync.integrity import (
    ClientsAsRead,
    Comparison,
    Ledger,
    Lookup,
    Shipped,
    Writer,
    compare_stored,
)
from crdtsync.limits import Strikes, TokenBucket
from crdtsync.protocol import (
    MAX_NAMES_PER_MESSAGE,
    MUX_VERSION,
    AwarenessEntry,
    AwarenessMessage,
    ExtChanged,
    ExtChannel,
    ExtClose,
    ExtDigests,
    ExtHello,
    ExtLink,
    ExtLinkDigests,
    ExtLinked,
    ExtOpen,
    ExtSubscribe,
    ExtUnsubscribe,
    SyncUpdate,
    channel_header,
    decode_awareness,
    decode_message,
    encode_awareness,
)
from crdtsync.settings import RelaySettings, validate_document_name, validate_region
from crdtsync.store import (
    CompactionResult,
    Staged,
    UpdateLog,
    checkpoint_file,
    compact_file,
    lock_store,
    merge_in_batches,
    read_positions,
    record_positions,
    restored_from_backup,
)
from crdtsync.sync import (
    AwarenessQueried,
    AwarenessReceived,
    ClientsClaimed,
    Failed,
    LimitHit,
    PermissionRefused,
    Refused,
    StateRequested,
    SyncSession,
    UpdateReceived,
    check_message_update,
    split_update,
)
from crdtsync.updates import UpdateInfo, check_update
from crdtsync.work import (
    Read,
    answer_read,
    changes_file,
    compare_file,
    digest_file,
    forget_read,
    read_file,
    release,
    worker_init,
)

from .metrics import RelayMetrics, Snapshot, exposition
from .stores import SqliteStore

if TYPE_CHECKING:
    from .links import Link
    from .redis_store import RedisPresence, RedisStore

__all__ = ["EXTENSION_QUERY", "Access", "Relay", "Rights", "allow_all"]

log = logging.getLogger("crdtsync.relay")
_T = TypeVar("_T")

EXTENSION_QUERY = "crdtsync"  # ?crdtsync=1 asks for extensions (DESIGN: wire protocol)
MUX_QUERY = "mux"  # "/?crdtsync=1&mux=1": a multiplexed connection (issue 11)
REGION_QUERY = "region"  # "...&region=eu": another region's link (issue 12; needs "p")
LINK_SETTLE_S = 60.0  # a link's checkpoint waits at most this long for its updates to be stored
MAX_OWN_WRITES_NOTED = 4096  # per multiplexed connection (Relay._note_own_writes)
MAX_EARLY_BYTES = 256 * 1024  # per multiplexed connection: messages ahead of their open
PRESENCE_BYTES_PER_CHANNEL = 4096  # a multiplexed connection's presence share per channel
CHANGES_PAGE = 1024  # changes read from the store at a time (listings, the watcher)
CHANGES_POLL_S = 0.25  # how often a shared store's changes are read while folders are kept
MAX_HELD_FRAMES = 10_000  # a peer that never sends step 1 goes live after this many
HOLD_LIMIT_S = 5.0  # ... or after this long
# A stored document larger than this is merged in a worker process, off the event loop
# (merge_updates holds the GIL: a thread would not help; DESIGN: measured facts).
PACE_MIN_S = 0.005  # a connection is paced once it owes at least this much time
PACE_BATCH = 64  # updates charged to a connection's budget together
PACE_BATCH_BYTES = 256 * 1024
_ANONYMOUS = Writer()
_SHIPPED = Shipped()  # a link's update that named no owners
_AWAITING_CLAIMS = Writer(awaiting_claims=True)  # (shared: a Writer is immutable)
MAX_CACHED_ANSWERS = 8  # per room, for the latest read only
# A stored document of at most this many tail updates and bytes is read and merged on
# the loop (measured: 1,000 updates of 1 KB merge in 5 ms, 20,000 one-character ones in
# 17 ms); beyond, in the work process. The first read of a document of a megabyte never
# waits for the work process to start (~110 ms at a cold start: bench/coldstart.py).
READ_INLINE_UPDATES = 32_768
# An update of this many bytes is staged in the store from a thread before its commit
# (Relay._stage_and_commit): one commit of 60 MB held SQLite's write lock ~135 ms.
STAGE_UPDATE_BYTES = 2 * 1024 * 1024
READ_INLINE_BYTES = 1024 * 1024
# Frames of at least LARGE_FRAME_BYTES go out in fragments of FRAGMENT_BYTES (Peer.push).
# (Not smaller ones: a peer closed while a fragmented frame is under way gets 1011, all
# websockets can send then, instead of the code its close was meant to have.)
LARGE_FRAME_BYTES = 4 * 1024 * 1024
FRAGMENT_BYTES = 1024 * 1024
MAX_QUEUED_MESSAGES = 4  # per connection, read but not yet handled (see serve())
BIG_CONNECTION_BYTES = 8 * 1024 * 1024  # one that received this much: collect at its end
BACKLOG_CHECK_S = 1.0  # how often every peer's backlog is checked, and the relay's total


AUTHORIZE_TIMEOUT_S = 10.0  # an authorize or revoked hook that takes longer fails
# A shared store (Redis): a turn whose documents another relay process appended to
# meanwhile is judged again against what won; after this many tries its writers get 1013.
COMMIT_ATTEMPTS = 8
COMMIT_RETRY_S = 0.002  # the first wait before judging again (doubled, with jitter)
MAX_COMMIT_ITEMS = 4096  # items one append to a shared store carries at most
# A repeat of at least this many stored clocks is compared in the work process (shared store).
OFFLOAD_REPEAT_UNITS = 10_000
# Items waiting for the shared store: from HIGH on, connections are not read until it is
# down to LOW (their senders slow down through TCP), for STORE_WAIT_S at most; beyond
# MAX (many connections at once), writers get 1013.
QUEUE_HIGH_ITEMS = 16_384
QUEUE_LOW_ITEMS = 4_096
STORE_WAIT_S = 30.0
MAX_QUEUED_ITEMS = 200_000
STALE = -1  # a cached ledger's position when it no longer describes one (never matches)
FOLLOW_READ_S = 1.0  # the follower's longest wait (it checks the store's health as often)
FOLLOW_BACKOFF_S = (0.1, 5.0)  # first and longest wait after the follower failed
# Presence from other relay processes not renewed for this long is forgotten (its relay
# died, or missed the removal): clients renew theirs every 15 s (y-protocols).
REMOTE_PRESENCE_TIMEOUT_S = 30.0
MAX_PRESENCE_QUEUED = 10_000  # presence messages waiting to be published (oldest dropped)


@dataclass(frozen=True, eq=False, slots=True)
class LargeFrame:
    """A frame of megabytes kept as its header and its payload: never joined into one
    bytes object (a copy of 60 MB held the loop ~25 ms); sent in fragments."""

    header: bytes
    payload: bytes

    def __len__(self) -> int:
        return len(self.header) + len(self.payload)

    @classmethod
    def update(cls, update: bytes) -> LargeFrame:
        """The sync update message carrying ``update`` (as :class:`SyncUpdate` encodes it)."""
        return cls(SyncUpdate.header(len(update)), update)


Frame = bytes | LargeFrame


async def _fragments(frame: Frame) -> AsyncIterator[bytes | memoryview]:
    """A large frame's fragments, one per event-loop turn: websockets writes the next
    one at once when the socket took the last, so a 60 MB frame to five fast readers went
    out in one turn of about 250 ms."""
    if isinstance(frame, LargeFrame):
        view = memoryview(frame.payload)
        yield frame.header + view[:FRAGMENT_BYTES]
        first = FRAGMENT_BYTES
    else:
        view = memoryview(frame)
        first = 0
    for start in range(first, len(view), FRAGMENT_BYTES):
        if start:
            await asyncio.sleep(0)
        yield view[start : start + FRAGMENT_BYTES]


def tls_context(settings: RelaySettings) -> ssl.SSLContext | None:
    """The server TLS context of ``tls_cert`` and ``tls_key``; None without TLS.

    Raises:
        ValueError: a file unreadable, or not a matching PEM certificate and key.
    """
    if settings.tls_cert is None or settings.tls_key is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(settings.tls_cert, settings.tls_key)
    except (OSError, ssl.SSLError) as exc:
        raise ValueError(
            f"cannot load TLS certificate {settings.tls_cert} with key {settings.tls_key}: {exc}"
        ) from exc
    return context


def allow_all(request: Request, document: str) -> Rights:
    """An authorizer that lets everyone read and write (the default without tokens)."""
    return Rights()


# (request, document) -> rights; may be a coroutine function.
Authorizer = Callable[[Request, str], "Rights | Awaitable[Rights]"]
# (claims, document) -> whether the token was revoked; may be a coroutine function.
RevocationCheck = Callable[[TokenClaims, str], "bool | Awaitable[bool]"]


@dataclass(frozen=True, slots=True)
class Access:
    """What one connection may do, decided at its handshake (README: access tokens)."""

    rights: Rights
    claims: TokenClaims | None = None  # its verified token, when the relay requires one

    @property
    def subject(self) -> str | None:
        return self.claims.subject if self.claims is not None else None


@dataclass(eq=False, slots=True)
class Budget:
    """What one connection may cost (crdtsync.limits): paced streams and refusals.

    A multiplexed connection's channels share its budget (writes, work and strikes); each
    channel has sync requests and presence of its own instead, what a connection per
    document would have (:meth:`Peer.sync_requests`, :meth:`Peer.presence_bucket`).
    """

    updates: TokenBucket
    update_bytes: TokenBucket
    sync_requests: TokenBucket
    presence: TokenBucket
    strikes: Strikes
    work: TokenBucket  # seconds of the work process this connection's updates took

    @classmethod
    def of(cls, s: RelaySettings) -> Budget:
        return cls(
            TokenBucket(s.updates_per_s, s.updates_per_s),
            TokenBucket(s.update_bytes_per_s, max(s.update_bytes_per_s, s.max_update_bytes)),
            TokenBucket(s.sync_requests_per_s, s.sync_request_burst),
            TokenBucket(s.presence_per_s, s.presence_burst),
            Strikes(s.max_strikes, s.strike_window_s),
            TokenBucket(s.work_share, max(1.0, 4 * s.work_share)),
        )


class Transport(Protocol):
    """What the relay needs of a connection's transport (asyncio's, or an ASGI one's)."""

    def get_write_buffer_size(self) -> int: ...
    def is_closing(self) -> bool: ...
    def abort(self) -> None: ...


class Responder(Protocol):
    """A connection as a handshake or a plain HTTP request is answered through it."""

    @property
    def remote_address(self) -> Any: ...
    def respond(self, status: StatusLike, text: str) -> Response: ...


class Socket(Protocol):
    """A websocket as the relay serves it: websockets' ``ServerConnection`` (the standalone
    relay), or an ASGI server's (``crdtsync.server.asgi``). Only a ``ServerConnection`` is
    written to directly (``broadcast``); the others get every frame through ``Wire``'s
    queue, in order."""

    id: uuid.UUID
    request: Request | None

    @property
    def remote_address(self) -> Any: ...
    @property
    def close_code(self) -> int | None: ...
    @property
    def close_reason(self) -> str | None: ...
    @property
    def transport(self) -> Transport | None: ...
    async def send(
        self,
        message: DataLike | Iterable[DataLike] | AsyncIterable[DataLike],
        *,
        text: bool | None = None,
    ) -> None: ...
    async def close(self, code: int = 1000, reason: str = "") -> None: ...
    def respond(self, status: StatusLike, text: str) -> Response: ...
    def __aiter__(self) -> AsyncIterator[Data]: ...


@dataclass(eq=False, slots=True)
class Wire:
    """One websocket as the peers on it send through it: a document's own connection
    (one peer), or a multiplexed one (a peer per open channel, issue 11).

    Frames queued behind a large one that goes out in fragments wait in ``outbox``, for
    every peer on the wire: a frame broadcast to a socket in the middle of a fragmented
    send is skipped by websockets, so nothing may overtake the queue.
    """

    ws: Socket
    budget: Budget  # what the connection may cost (a multiplexed one's channels share it)
    address: str = ""  # the client's (or the one a trusted proxy forwarded)
    outbox: deque[Frame] | None = None  # None: nothing is waiting
    outbox_bytes: int = 0
    sender: asyncio.Task[None] | None = None
    closing: bool = False  # the whole connection is being closed
    # Frames may be written straight into its transport (websockets' broadcast): a
    # ServerConnection. An ASGI connection's frames all go through the outbox, whose
    # single sender keeps them in order (ASGI's send is a coroutine).
    direct: bool = True
    emptied_at: float = 0.0  # when its outbox last emptied (time.monotonic())

    def __post_init__(self) -> None:
        self.direct = isinstance(self.ws, ServerConnection)

    def push(self, frame: Frame) -> None:
        """Send a frame, in order with every other frame pushed to this wire.

        A large frame goes out in fragments, each written once the previous one left
        (websockets waits for the socket to drain): one frame of tens of megabytes to
        several peers was copied into every transport's buffer in one event-loop turn
        (about a second for 60 MB to six peers) and each buffer was then shifted after
        every partial write. What comes meanwhile waits in ``outbox``, in order.
        """
        if (
            self.direct
            and self.outbox is None
            and isinstance(frame, bytes)
            and len(frame) < LARGE_FRAME_BYTES
        ):
            broadcast([self.ws], frame)  # type: ignore[list-item]
            return
        if self.outbox is None:
            self.outbox = deque()
            self.sender = asyncio.get_running_loop().create_task(self._send_outbox())
        self.outbox.append(frame)
        self.outbox_bytes += len(frame)

    async def _send_outbox(self) -> None:
        try:
            while self.outbox:
                frame = self.outbox.popleft()
                if isinstance(frame, bytes) and len(frame) < LARGE_FRAME_BYTES:
                    await self.ws.send(frame)
                else:
                    await self.ws.send(_fragments(frame))
                self.outbox_bytes -= len(frame)
            self.emptied_at = time.monotonic()
        except ConnectionClosed:
            pass
        finally:
            self.outbox = None
            self.outbox_bytes = 0
            self.sender = None

    async def send(self, frame: bytes) -> None:
        """Send a frame in order with the others, and wait until it left (backpressure:
        websockets waits for the socket to drain, an ASGI server for its transport)."""
        if self.direct:
            if self.outbox is None and len(frame) < LARGE_FRAME_BYTES:
                await self.ws.send(frame)
            else:
                self.push(frame)  # (a large frame under way: not waited for, as always)
            return
        self.push(frame)
        if self.sender is not None:
            await asyncio.wait({self.sender})  # (never cancels the sender)

    def backlog(self) -> int:
        """Bytes waiting to be sent: queued frames and the transport's buffer."""
        transport = self.ws.transport
        size = transport.get_write_buffer_size() if transport is not None else 0
        return size + self.outbox_bytes


@dataclass(eq=False, slots=True)
class _Presence:
    """Presence states by client id, as a room keeps them or a peer set them: None, one
    entry (the usual case: a replica's own state; no dict then) or a dict of them, in
    the order they came (as a dict keeps them)."""

    presence: AwarenessEntry | dict[int, AwarenessEntry] | None = field(default=None, kw_only=True)

    def presence_of(self, client: int) -> AwarenessEntry | None:
        states = self.presence
        if states is None:
            return None
        if isinstance(states, dict):
            return states.get(client)
        return states if states.client_id == client else None

    def presence_count(self) -> int:
        states = self.presence
        return 0 if states is None else len(states) if isinstance(states, dict) else 1

    def presence_entries(self) -> list[AwarenessEntry]:
        states = self.presence
        if states is None:
            return []
        if isinstance(states, dict):
            return list(states.values())
        return [states]

    def set_presence(self, entry: AwarenessEntry) -> None:
        states = self.presence
        if states is None or (not isinstance(states, dict) and states.client_id == entry.client_id):
            self.presence = entry
        elif isinstance(states, dict):
            states[entry.client_id] = entry
        else:
            self.presence = {states.client_id: states, entry.client_id: entry}

    def drop_presence(self, client: int) -> AwarenessEntry | None:
        """Forget ``client``'s state; return it (None: there was none)."""
        states = self.presence
        if states is None:
            return None
        if isinstance(states, dict):
            entry = states.pop(client, None)
            if len(states) <= 1:
                self.presence = next(iter(states.values()), None)
            return entry
        if states.client_id != client:
            return None
        self.presence = None
        return states


@dataclass(eq=False, slots=True)
class Peer(_Presence):
    """One document's connection in a room: a websocket of its own, or a channel of a
    multiplexed one (``channel`` set: every frame to it starts with ``header``)."""

    wire: Wire
    session: SyncSession
    document: str
    access: Access = field(default_factory=lambda: Access(Rights()))
    opened: float = 0.0  # time.monotonic() at its handshake
    messages_in: int = 0
    bytes_in: int = 0
    updates_stored: int = 0
    updates_refused: int = 0
    answered: bool = False  # its first sync request was answered (join latency)
    writer: Writer = field(default_factory=Writer)  # the client ids it proved (integrity)
    engaged: bool = False  # it sent a sync message (step 1, step 2 or an update)
    owed_updates: int = 0  # not yet charged to its budget
    closing: bool = False  # closed over limits: the close is under way
    owed_bytes: int = 0
    behind_since: float | None = None  # since when its backlog is over the limit
    # (presence, from _Presence: the states it set, each as it set it: its clock, size)
    # A channel's own sync-request and presence buckets (a connection of its own has
    # them in its budget), made on first use; None again once full, as a new one is
    # (Relay._forget_full_buckets): an idle channel holds none.
    own_sync_requests: TokenBucket | None = None
    own_presence: TokenBucket | None = None
    # Live updates held back until this peer's step 1 is answered (None: live). A live
    # update must not overtake the answer: Yrs (pycrdt 0.14) can lose a Map change when
    # one client's updates are applied out of order (y-crdt#413); Yjs cannot, but order
    # costs nothing here.
    held: list[Frame] | None = field(default_factory=list)
    # The stored document as read at join, kept for the answer to this peer's first
    # step 1: whatever is stored after that read reaches the peer through the fan-out it
    # joined first (held until the answer), so the store is read once per join, not twice.
    joined: Read | None = None
    channel: int | None = None  # its number on a multiplexed connection
    header: bytes = b""  # what precedes each frame to it (a channel's header)
    detached: bool = False  # its channel was closed: the connection goes on without it
    mux: Mux | None = None  # the multiplexed connection it is a channel of
    room: Room | None = None
    hold_timer: asyncio.TimerHandle | None = None  # sends it live if it never asks (step 1)
    sync_timer: asyncio.TimerHandle | None = None  # closes it if it never syncs
    parted: bool = False  # it left its room (Relay._part)
    # A channel of another region's link (issue 12): the region its updates come from.
    # It writes (stored with that origin, judged on content alone) and is sent nothing
    # but its acknowledgements and its document's step 1.
    origin: str | None = None
    close_code: int = CloseCode.NORMAL  # a channel's, once closed
    close_reason: str = ""

    @property
    def ws(self) -> Socket:
        return self.wire.ws

    @property
    def budget(self) -> Budget:
        """Its connection's (a multiplexed connection's channels share it)."""
        return self.wire.budget

    @property
    def address(self) -> str:
        return self.wire.address

    @property
    def id(self) -> str:
        """Short, for logs: its connection's, and its channel's number."""
        conn = self.wire.ws.id.hex[:12]
        return conn if self.channel is None else f"{conn}/{self.channel}"

    @property
    def outbox(self) -> deque[Frame] | None:
        return self.wire.outbox

    def sync_requests(self, s: RelaySettings) -> TokenBucket:
        """The bucket its sync requests take from: its connection's, or its channel's."""
        if self.channel is None:
            return self.budget.sync_requests
        if self.own_sync_requests is None:
            self.own_sync_requests = TokenBucket(s.sync_requests_per_s, s.sync_request_burst)
        return self.own_sync_requests

    def presence_bucket(self, s: RelaySettings) -> TokenBucket:
        """The bucket its presence messages take from: its connection's, or its channel's."""
        if self.channel is None:
            return self.budget.presence
        if self.own_presence is None:
            self.own_presence = TokenBucket(s.presence_per_s, s.presence_burst)
        return self.own_presence

    def forget_full_buckets(self, now: float) -> None:
        """Drop its channel's buckets that are full: a new one acts the same."""
        if self.own_sync_requests is not None and self.own_sync_requests.full(now):
            self.own_sync_requests = None
        if self.own_presence is not None and self.own_presence.full(now):
            self.own_presence = None

    @property
    def gone(self) -> bool:
        """Nothing more can be sent to it: its connection or its channel closed."""
        return self.detached or self.wire.ws.close_code is not None

    def framed(self, frame: Frame) -> Frame:
        """``frame`` as this peer's connection carries it."""
        if not self.header:
            return frame
        if isinstance(frame, LargeFrame):
            return LargeFrame(self.header + frame.header, frame.payload)
        return self.header + frame

    def context(self) -> dict[str, Any]:
        """This connection in a log line (crdtsync.logs): never its token."""
        return {
            "document": self.document,
            "connection": self.id,
            "peer": self.address,
            "subject": self.access.subject,
        }

    def push(self, frame: Frame) -> None:
        """Send a frame, in order with every other frame to its connection."""
        if not self.detached:
            self.wire.push(self.framed(frame))

    def backlog(self) -> int:
        """Bytes waiting to be sent on its connection (a channel's are its connection's)."""
        return self.wire.backlog()

    def send_update_frame(self, frame: Frame) -> None:
        """Send a live update now, or hold it until the peer's sync answer went out."""
        if self.origin is not None:
            return  # a link's channel: the other region has its own link back
        if self.held is None:
            self.push(frame)
        elif len(self.held) < MAX_HELD_FRAMES:
            self.held.append(frame)
        else:
            self.release()
            self.push(frame)

    def release(self) -> None:
        """Go live: send what was held, in order."""
        if self.hold_timer is not None:
            self.hold_timer.cancel()
            self.hold_timer = None
        self.joined = None
        held, self.held = self.held, None
        for frame in held or ():
            self.push(frame)


@dataclass(eq=False, slots=True)
class Folder:
    """A folder one multiplexed connection keeps: its documents are announced as they change.

    Until its listing reached the present (``live``), announcements wait in ``pending``.
    """

    number: int
    prefix: str
    live: bool = False
    pending: dict[str, None] = field(default_factory=dict)  # names, in order, once each
    cursor: int = 0  # the change position the next announcement reaches
    head: int = 0  # the change position its listing goes up to
    # While the connection describes what it holds (digests): hashes of the names it
    # named, so that the rest of the folder can be listed after its last batch.
    held: set[int] | None = None
    task: asyncio.Task[None] | None = None  # its listing


@dataclass(eq=False, slots=True)
class Mux:
    """A multiplexed connection (issue 11): documents as channels, folders kept."""

    wire: Wire
    request: Request
    access: Access  # its token, verified at the handshake; rights are per document
    address: str
    budget: Budget
    opens: TokenBucket  # channels opened
    channels: dict[int, Peer] = field(default_factory=dict)
    # Channel numbers are used once: every number below ``floor`` was, and those in ``used``
    # (a reordering path may bring the opens of 4 and 5 in the other order).
    floor: int = 1
    used: set[int] = field(default_factory=set)
    last_channel: int = 0  # the highest number used (the count of channels, in a log)
    # Messages of channels not opened yet (a reordering path), until their open comes.
    early: dict[int, list[ExtChannel]] = field(default_factory=dict)
    early_bytes: int = 0
    # Open on its channels (once each; a dict: half the memory of a set per name).
    documents: dict[str, None] = field(default_factory=dict)
    presence_states: int = 0  # its channels' presence states, together
    presence_bytes: int = 0
    listing: asyncio.Lock = field(default_factory=asyncio.Lock)  # one listing at a time
    folders: dict[int, Folder] = field(default_factory=dict)
    tasks: set[asyncio.Task[Any]] = field(default_factory=set)  # listings under way
    id: str = ""
    # Documents of its folders it wrote itself: the position it wrote (an SQLite store's
    # position is its change cursor) and the last position before that commit. Not
    # announced back to it while nobody wrote after, and when everything before was
    # announced already (Relay._announce_changes).
    wrote: dict[str, tuple[int, int]] = field(default_factory=dict)
    # Its run of commits that nobody else's came between (``_note_own_writes``): from
    # the last position before the run to the run's last position.
    own_from: int = 0
    own_until: int = -1
    region: str | None = None  # another region's link (issue 12): its region
    # A link's updates received and not yet stored (or failed): a checkpoint it asks for
    # is recorded only once they are (Relay._take_link).
    unsettled: int = 0
    settled: asyncio.Event = field(default_factory=asyncio.Event)
    link_failed: bool = False  # one of them failed to be stored: record no checkpoint

    def context(self) -> dict[str, Any]:
        context = {"connection": self.id, "peer": self.address, "subject": self.access.subject}
        if self.region is not None:
            context["region"] = self.region
        return context

    def unused(self, number: int) -> bool:
        """Whether channel ``number`` was never opened on this connection."""
        return number >= self.floor and number not in self.used

    def use(self, number: int) -> None:
        self.used.add(number)
        self.last_channel = max(self.last_channel, number)
        while self.floor in self.used:
            self.used.discard(self.floor)
            self.floor += 1


@dataclass(eq=False, slots=True)
class Room(_Presence):
    """The live connections on one document and their awareness states; nothing durable.

    (Most rooms of an idle relay hold one peer with one presence state, or none: one
    object each then, no set or dict; see :class:`_Presence`.)
    """

    name: str
    # Its peers: None, the one peer, or a set of them (use peers, add and discard).
    members: Peer | set[Peer] | None = None
    # (presence, from _Presence: its awareness states)
    awareness_bytes: int = 0  # the states' JSON sizes, summed
    appended: int = 0  # updates in the store's tail, as far as this process knows
    stored_bytes: int = 0  # the document's snapshot and tail, as far as this process knows
    # Reads of the stored document shared by the peers that need one (joins, resyncs): the
    # one in flight, and the one that starts when it is done, for those who came later.
    reading: asyncio.Future[Read] | None = None
    read_next: asyncio.Future[Read] | None = None
    # Answers from the latest read (by its id), by state vector (dropped with the room);
    # None until a read of a large document is answered (small ones are not cached).
    answers: tuple[str, dict[bytes, asyncio.Task[list[bytes]]]] | None = None
    measured: bool = False  # appended and stored_bytes were read from the store
    following: bool = False  # a shared store: this process's follower reads its entries
    # Presence states heard from other relay processes: client id -> when last renewed
    # (None until there is one: a shared store's presence only).
    remote_presence: dict[int, float] | None = None
    kept_in_worker: bool = False  # the work process keeps a read of it (crdtsync.work)

    @property
    def peers(self) -> Collection[Peer]:
        members = self.members
        if members is None:
            return ()
        if isinstance(members, Peer):
            return (members,)
        return members

    def add(self, peer: Peer) -> None:
        members = self.members
        if members is None or members is peer:
            self.members = peer
        elif isinstance(members, Peer):
            self.members = {members, peer}
        else:
            members.add(peer)

    def discard(self, peer: Peer) -> None:
        members = self.members
        if members is peer:
            self.members = None
        elif isinstance(members, set):
            members.discard(peer)
            if len(members) == 1:
                self.members = next(iter(members))


@dataclass(eq=False, slots=True)
class _Pending:
    peer: Peer
    update: bytes | None  # None: nothing to store (an empty update), only acknowledge
    key: int | None
    info: UpdateInfo | None = None
    writer: Writer | None = None  # what the connection had proven when the update came
    comparison: Comparison | None = None  # its repeats compared ahead, off the loop
    refusal: str | None = None  # why (part of) the update was refused: never acknowledged
    unproven: bool = False  # ... only for want of a proof of ownership (the sender may retry)
    # A shared store: the update as received (a judgement that lost a race is redone),
    # and client ids claimed (recorded in the ledger in the turn's order).
    original: bytes | None = None
    claim: tuple[int, ...] | None = None


class Relay:
    """A relay server. Use ``async with Relay(settings) as relay: await relay.serve_forever()``.

    Args:
        settings: limits, store path and durability; its ``token_*`` settings make the
            relay require a token (README: access tokens).
        authorize: decides a connection's rights at its handshake,
            ``(request, document) -> Rights`` (a coroutine function too); raise
            :class:`AccessDenied` to refuse (HTTP 403). With tokens, the connection
            gets what both the token and this allow.
        revoked: ``(claims, document) -> bool`` (a coroutine function too), asked at
            each handshake with a token (True: 401, ``revoked``) and every
            ``token_recheck_s`` for each open connection with one (True: closed with
            4401, "token revoked"). A hook that fails or times out counts as False.
    """

    def __init__(
        self,
        settings: RelaySettings | None = None,
        *,
        authorize: Authorizer | None = None,
        revoked: RevocationCheck | None = None,
    ) -> None:
        self.settings = settings or RelaySettings()
        self.authorize = authorize
        self.revoked = revoked
        self._verifier: TokenVerifier | None = None
        # What each connection may do, from its handshake until its handler takes it.
        self._access: weakref.WeakKeyDictionary[Socket, Access] = weakref.WeakKeyDictionary()
        self._rechecker: asyncio.Task[None] | None = None
        self.metrics = RelayMetrics()
        # Documents whose updates are being staged (Relay._stage_and_commit): what comes
        # for them meanwhile waits, unjudged and in order; so do claims of their ids.
        self._staging: dict[str, asyncio.Task[None]] = {}
        self._deferred: dict[str, list[_Pending]] = {}
        # ... and the ledgers those commits will write: the document's ledger until then,
        # even if its room closes and opens again meanwhile (the store's is behind).
        self._staging_ledgers: dict[str, Ledger] = {}
        self._claims_waiting: dict[str, list[tuple[Peer, tuple[int, ...]]]] = {}
        self.rooms: dict[str, Room] = {}
        s = self.settings
        self._check = functools.partial(
            check_update,
            max_bytes=s.max_update_bytes,
            max_clients=s.max_update_clients,
            max_structs=s.max_update_structs,
        )
        # (One int for every session: computed per peer, it was an object per peer.)
        self._max_presence_bytes = (
            s.max_presence_state_bytes * s.max_presence_states_per_connection + 1024
        )
        # Multiplexed connections, and the folders they keep (issue 11): announced from
        # the store's changes by one task, while any folder is kept.
        self._muxes: set[Mux] = set()
        self._folders: FolderIndex[tuple[Mux, Folder]] = FolderIndex()
        self._change_watcher: asyncio.Task[None] | None = None
        self._changed = asyncio.Event()  # this process appended: look at the changes
        self._identity: tuple[str, int] | None = None  # the store's, last read
        self.store: UpdateLog | None = None  # an SQLite store (the embedded default)
        # A shared store (Redis: settings.store is its URL), with the relay processes
        # that share it; None with an SQLite store (whose calls stay inline, as always).
        self.backend: RelayStore | None = None
        self._sqlite_view: RelayStore | None = None  # the SQLite file as a RelayStore (links)
        self._shared = self.settings.shared_store
        self._follower: Follower | None = None
        self._following: asyncio.Task[None] | None = None
        self._follow_failures = 0  # reads of the follower failed in a row (/readyz)
        self._store_failing = False  # the last append to the shared store failed (/readyz)
        self._store_refused = ""  # why the shared store is not used (yet), for /readyz
        self._queue: list[_Pending] = []  # turns waiting for the shared store's append
        self._queue_room = asyncio.Event()  # the queue is below QUEUE_HIGH_ITEMS
        self._queue_room.set()
        self._committer: asyncio.Task[None] | None = None
        self._in_flight: set[str] = set()  # documents of the append under way
        # Entries of those documents the follower read meanwhile: looked at after the
        # append, once this process knows which of them are its own.
        self._entries_waiting: dict[str, list[Entry]] = {}
        self._own: dict[str, deque[int]] = {}  # positions this process appended, per room
        self._positions: dict[str, int] = {}  # the position each cached ledger describes
        self._resyncing: set[str] = set()
        self._resync_again: set[str] = set()  # lost track again while resyncing
        self._resync_entries: dict[str, list[Entry]] = {}  # read while resyncing
        self._trims: dict[str, asyncio.TimerHandle] = {}  # closed documents to trim later
        # Presence between relay processes (a shared store): what to say, and the task
        # saying it; what the others say is read by another task.
        self._presence: RedisPresence | None = None
        self._presence_out: deque[tuple[str, bytes]] = deque(maxlen=MAX_PRESENCE_QUEUED)
        self._saying: asyncio.Task[None] | None = None
        self._hearing: asyncio.Task[None] | None = None
        self._presence_failures = 0
        self._server: Server | None = None
        self._batch: list[_Pending] = []
        self._flush_handle: asyncio.Handle | None = None
        self._pool: ProcessPoolExecutor | None = None
        # Merges of big reads and checks of big updates (started on first use).
        self._work_pool: ProcessPoolExecutor | None = None
        self._work_calls = 0  # calls to the work process in flight
        self._store_lock: IO[bytes] | None = None
        self._compactions: set[asyncio.Future[Any]] = set()
        self._background: set[asyncio.Task[Any]] = set()
        self._compacting: set[str] = set()  # documents with a compaction running
        # Integrity ledgers of the documents with a room here (a cache of the store's:
        # dropped with the room, and whenever a commit fails).
        self._ledgers: dict[str, Ledger] = {}
        self._per_address: dict[str, int] = {}
        self._trusted = [
            ipaddress.ip_network(p, strict=False) for p in self.settings.trusted_proxies
        ]
        self._stopping = False
        self._started = False
        self._store_id = ""  # the SQLite store's id (its positions are recorded with it)
        self._watcher: asyncio.Task[None] | None = None
        self._links: list[Link] = []  # to the other regions (issue 12)
        self._checkpointer = ThreadPoolExecutor(1, thread_name_prefix="crdtsync-checkpoint")
        self._checkpointing: asyncio.Future[tuple[int, int]] | None = None
        self._commits_checkpointed = 0
        self._inline_reads = 0
        self._handlers: set[asyncio.Task[Any]] = set()  # connection handlers running
        self._comparing = asyncio.Semaphore(1)
        self._sent_since_check = 0  # bytes handed to peers since the budget was checked
        self._collect_handle: asyncio.TimerHandle | None = None
        self.stats = {
            "updates_stored": 0,
            "commits": 0,
            "connections": 0,
            "refused": 0,
            "updates_refused": 0,
            "limits_hit": 0,
            "closed_over_limits": 0,
            "closed_slow": 0,
            "document_reads": 0,
            "document_reads_in_worker": 0,
            "comparisons_in_worker": 0,
            "checks_in_worker": 0,
            "compactions": 0,
            "compactions_failed": 0,
            "refused_unauthorized": 0,  # handshakes refused for their token (401)
            "refused_forbidden": 0,  # handshakes with no right to the document (403)
            "closed_unauthorized": 0,  # connections closed at expiry or revocation (4401)
            "writes_dropped": 0,  # updates of read-only connections (counted at close)
            "messages_in": 0,  # (counted at close, as bytes_in)
            "bytes_in": 0,
            "bytes_out": 0,
            "acknowledgements": 0,
            "frames_fanned_out": 0,
            "store_errors": 0,
            "connections_opened": 0,
            "multiplexed_connections": 0,  # opened
            "channels_opened": 0,
            "documents_announced": 0,
            "folder_cursors_used": 0,  # folders listed from a cursor valid here
            "folder_digest_exchanges": 0,  # ... compared by digests instead
            "lingering": 0,  # dropped, but their sockets not yet closed (ASGI servers)
            "restores_detected": 0,  # the SQLite file held less than it once did (start)
            "links_in": 0,  # links of other regions connected here
            "link_checkpoints_recorded": 0,  # ... checkpoints they had recorded here
        }

    # -- lifecycle --------------------------------------------------------------------

    async def start(self, *, listen: bool = True) -> None:
        """Open the store and start listening (port 0 picks a free port: see ``url``).

        ``listen=False`` opens the store and starts the background work without a
        server of its own: connections come from elsewhere (``crdtsync.server.asgi``).

        Raises:
            StoreError: the store cannot be opened, or another relay process serves it
                (one relay per SQLite file: each keeps a cache of the integrity ledgers).
        """
        s = self.settings
        self._verifier = s.token_verifier()  # reads the key files: a bad one fails here
        if self._shared:
            await self._open_shared_store()
        else:
            self._store_lock = lock_store(s.store)
            self.store = UpdateLog(s.store, synchronous=s.synchronous, autocheckpoint=False)
            # Chunks of large updates a killed relay was staging (never appended).
            self.store.drop_unused_chunks()
            self._guard_against_restores(self.store)
        # (The compaction pool starts with the first compaction: a process started here
        # competed with the first joins for the machine's cores, at every cold start.)
        if listen:
            await self._listen()
        self._watcher = asyncio.get_running_loop().create_task(self._watch_backlogs())
        if s.region is not None and s.peers:
            from .links import links_of  # (websockets' client: only for a relay with peers)

            self._links = links_of(s, self._link_store(), holder=uuid.uuid4().hex[:16])
            for link in self._links:
                link.present = self._local_presence
                link.start()
        if self.revoked is not None and self._verifier is not None:
            self._rechecker = asyncio.get_running_loop().create_task(self._recheck_tokens())
        self._started = True

    def _local_presence(self) -> list[tuple[str, list[AwarenessEntry]]]:
        """This process's clients' presence now, per document (a link starting over)."""
        out = []
        for name, room in self.rooms.items():
            entries = [e for p in room.peers if p.origin is None for e in p.presence_entries()]
            if entries:
                out.append((name, entries))
        return out

    def _guard_against_restores(self, store: UpdateLog) -> None:
        """Raise the store's epoch if its file holds less than it once did (put back from
        a backup: positions it gave out would be given again to other content, and the
        cursors replicas hold would skip it), then record what it holds now. A relay
        records that beside the file once a second while it commits, and at its stop."""
        recorded = read_positions(store.path)
        if restored_from_backup(store):
            assert recorded is not None
            _, epoch = store.new_epoch()
            self.stats["restores_detected"] += 1
            log.warning(
                "the store holds less than it once did (position %d, recorded %d): put back "
                "from a backup? Its epoch is raised to %d; replicas compare what they hold",
                store.last_position(),
                recorded[1],
                epoch,
            )
        store_id, _ = store.identity()
        self._store_id = store_id
        _record_positions(store.path, store_id, store.last_position())

    @property
    def serving(self) -> bool:
        """It was started and is not stopping: connections are taken."""
        return self._started and not self._stopping

    async def _listen(self) -> None:
        s = self.settings
        tls = tls_context(s)
        # (asyncio's default: 60 s for a client that stalls mid-TLS-handshake)
        tls_options: dict[str, Any] = {} if tls is None else {"ssl_handshake_timeout": 10.0}
        self._server = await serve(
            self._handle,
            s.host,
            s.port,
            ssl=tls,
            **tls_options,
            process_request=self._process_request,
            max_size=s.max_message_bytes,
            # Messages read ahead while a handler waits (pacing, a read, the work
            # process): at most this many, each up to max_message_bytes. 64 let one
            # connection park 4 GB in the relay.
            max_queue=MAX_QUEUED_MESSAGES,
            # websockets' pings keep NATs open; stock clients also need app-level traffic,
            # which relayed awareness gives them (DESIGN: facts from the anchors).
            ping_interval=20,
            ping_timeout=20,
            close_timeout=s.close_timeout_s,
            compression=None,
        )

    @property
    def url(self) -> str:
        """``ws://host:port`` as bound (``wss://`` with TLS)."""
        if self._server is None:
            raise RuntimeError("relay not started")
        sock = next(iter(self._server.sockets))
        host, port = sock.getsockname()[:2]
        if ":" in host:
            host = f"[{host}]"
        scheme = "wss" if self.settings.tls_cert is not None else "ws"
        return f"{scheme}://{host}:{port}"

    async def serve_forever(self) -> None:
        """Serve until :meth:`stop` (or SIGINT/SIGTERM via :meth:`run`)."""
        if self._server is None:
            raise RuntimeError("relay not started")
        with contextlib.suppress(asyncio.CancelledError):
            await self._server.serve_forever()

    async def stop(self) -> None:
        """Drain and stop: stop accepting, persist what is queued, close everyone (1001)."""
        if self._stopping:
            return
        self._stopping = True
        for link in self._links:
            await link.stop()
        if self._watcher is not None:
            self._watcher.cancel()
        if self._change_watcher is not None:
            self._change_watcher.cancel()
        if self._rechecker is not None:
            self._rechecker.cancel()
        if self._server is not None:
            self._server.close(close_connections=False)
        deadline = time.monotonic() + self.settings.drain_timeout_s
        while self._staging:
            # A staged commit is not cut short: wait for it (it flushes what came
            # meanwhile, on the loop now that the relay is stopping).
            await asyncio.wait({asyncio.shield(t) for t in self._staging.values()})
        self._flush()
        if self._committer is not None:
            # What was received is appended before the connections close (bounded).
            with contextlib.suppress(Exception):
                await asyncio.wait({asyncio.shield(self._committer)}, timeout=_left(deadline))
        peers = [p for room in self.rooms.values() for p in room.peers]
        wires = {p.wire for p in peers} | {m.wire for m in self._muxes}
        closing = asyncio.gather(
            *(w.ws.close(CloseCode.GOING_AWAY, "relay shutting down") for w in wires),
            return_exceptions=True,
        )
        try:
            # A peer that does not read never lets its close frame out (nor a ping, nor
            # what its handler is sending): the drain is bounded, then the rest is cut.
            await asyncio.wait_for(asyncio.shield(closing), _left(deadline))
        except TimeoutError:
            for w in wires:
                if w.ws.transport is not None:
                    w.ws.transport.abort()
            with contextlib.suppress(Exception):
                await closing
        for w in wires:
            if w.sender is not None:
                w.sender.cancel()
        # Handlers still running past the deadline (waiting on the work process, or
        # paced) are cancelled: nothing they could still do is acknowledged anyway.
        if self._handlers:
            await asyncio.wait(set(self._handlers), timeout=_left(deadline))
            for handler in self._handlers:
                handler.cancel()
        # (Taken now: a pool's shutdown forgets its manager thread; see below.)
        managers = [
            getattr(p, "_executor_manager_thread", None) for p in (self._work_pool, self._pool)
        ]
        if self._work_pool is not None:
            _shut_down(self._work_pool, wait=False)  # reads and checks nobody awaits now
            self._work_pool = None
        if self._server is not None:
            await self._server.wait_closed()
        if self._compactions:
            # Compaction is crash-safe: one still running at the deadline is abandoned.
            await asyncio.wait(self._compactions, timeout=_left(deadline))
            if self.backend is not None:
                for running in list(self._compactions):
                    running.cancel()  # (its lease expires by itself)
        if self._pool is not None:
            _shut_down(self._pool, wait=not self._compactions)
        for manager in managers:
            # CPython 3.11: a pool's manager thread closing its wakeup pipe while the
            # interpreter exits races with concurrent.futures' exit hook, which then
            # writes to the closed pipe (a traceback, "Bad file descriptor"): let it
            # finish here.
            if manager is not None:
                await asyncio.to_thread(manager.join, _left(deadline) + 5.0)
        if self._checkpointing is not None:
            with contextlib.suppress(Exception):
                await self._checkpointing
        self._checkpointer.shutdown(wait=True)
        if self.store is not None:
            _record_positions(self.store.path, self._store_id, self.store.last_position())
            self.store.close()  # the last connection to close checkpoints what is left
        for handle in self._trims.values():
            handle.cancel()
        for task in (self._following, self._hearing, self._saying):
            if task is not None:
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
        if self._presence is not None:
            with contextlib.suppress(Exception):
                await self._presence.close()
        if self._follower is not None:
            with contextlib.suppress(Exception):
                await self._follower.close()
        if self.backend is not None:
            with contextlib.suppress(Exception):
                await self.backend.close()
        if self._store_lock is not None:
            self._store_lock.close()  # releases the lock
            self._store_lock = None

    async def __aenter__(self) -> Relay:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def run(self, on_listening: Callable[[str], None] | None = None) -> None:
        """Start, serve until SIGINT or SIGTERM, then drain and stop."""
        await self.start()
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        try:
            if on_listening is not None:
                on_listening(self.url)
            await stop.wait()
        finally:
            await self.stop()

    def health(self) -> dict[str, Any]:
        """Counters for /healthz?verbose=1: rooms held in memory, connections, updates stored."""
        return {
            "status": "ok",
            "store": "redis" if self._shared else "sqlite",
            "follower_failures": self._follow_failures,
            "rooms": len(self.rooms),
            "compacting": len(self._compacting),
            **self.stats,
            **(
                {"region": self.settings.region, "links": [k.status() for k in self._links]}
                if self.settings.region is not None
                else {}
            ),
        }

    # -- HTTP -------------------------------------------------------------------------

    async def _process_request(self, conn: Socket, request: Request) -> Response | None:
        # Health checks are plain HTTP; a websocket to the same path is a document.
        if request.headers.get("Upgrade", "").lower() != "websocket":
            answer = self.answer_http(conn, request)
            if answer is not None:
                return answer
        return await self.admit(conn, request)

    def answer_http(self, conn: Responder, request: Request) -> Response | None:
        """The answer to a plain HTTP request for ``/healthz``, ``/readyz`` or ``/metrics``
        (README: operations); None for any other path. For servers other than the relay's
        own (``crdtsync.server.asgi``), as for its own."""
        path, _, query = request.path.partition("?")
        if path == "/healthz":
            if "verbose" in parse_qs(query):
                return conn.respond(HTTPStatus.OK, json.dumps(self.health()) + "\n")
            return conn.respond(HTTPStatus.OK, "ok\n")
        if path == "/metrics":
            return self._metrics_response(conn, request)
        if path == "/readyz":
            if self._stopping or (self.store is None and self.backend is None):
                return conn.respond(HTTPStatus.SERVICE_UNAVAILABLE, "stopping\n")
            trouble = self._shared_trouble()
            if trouble:
                return conn.respond(HTTPStatus.SERVICE_UNAVAILABLE, trouble + "\n")
            return conn.respond(HTTPStatus.OK, "ready\n")
        return None

    async def admit(self, conn: Socket, request: Request) -> Response | None:
        """Decide a websocket handshake: None accepts it (then :meth:`serve_connection`), a
        response refuses it (401, 403, 429, 503). ``request.path`` is the path under the
        relay (``/document?query``), wherever the relay is mounted."""
        response = await self._upgrade_or_refuse(conn, request, request.path.partition("?")[0])
        if response is not None:
            self.metrics.handshakes_refused[str(response.status_code)] += 1
        return response

    @contextlib.contextmanager
    def lingering(self, conn: Socket, request: Request) -> Iterator[None]:
        """Count a connection the relay dropped (too slow to take even its close frame)
        whose socket its server keeps open (an ASGI server cannot cut one): under the
        connection limits, per address too, until the server reports it gone."""
        address = self._address(conn, request)
        self.stats["connections"] += 1
        self.stats["lingering"] += 1
        self._per_address[address] = self._per_address.get(address, 0) + 1
        try:
            yield
        finally:
            self.stats["connections"] -= 1
            self.stats["lingering"] -= 1
            self._forget_address(address)

    async def serve_connection(self, ws: Socket) -> None:
        """Serve a websocket that :meth:`admit` accepted, until it closes: one document's
        connection, or a multiplexed one. For servers other than the relay's own."""
        await self._handle(ws)

    async def _upgrade_or_refuse(
        self, conn: Socket, request: Request, path: str
    ) -> Response | None:
        """None lets the websocket handshake go on; a response refuses it."""
        if self._stopping:
            return conn.respond(HTTPStatus.SERVICE_UNAVAILABLE, "relay shutting down\n")
        if self.stats["connections"] >= self.settings.max_connections:
            return conn.respond(HTTPStatus.SERVICE_UNAVAILABLE, "too many connections\n")
        trouble = self._shared_trouble()
        if trouble:
            # (A join needs a read of the store: the client retries with its backoff.)
            return conn.respond(HTTPStatus.SERVICE_UNAVAILABLE, f"{trouble}\n")
        address = self._address(conn, request)
        if self._per_address.get(address, 0) >= self.settings.max_connections_per_address:
            self.stats["refused"] += 1
            return conn.respond(
                HTTPStatus.TOO_MANY_REQUESTS, "too many connections from this address\n"
            )
        if path == "/" and parse_qs(request.path.partition("?")[2]).get(MUX_QUERY) == ["1"]:
            return await self._admit_mux(conn, request)
        try:
            document = validate_document_name(path[1:])
        except InvalidDocumentName:
            return None  # the handler closes it with 1008 and the reason
        try:
            access = await self._decide_access(request, document)
        except TokenRefused as exc:
            self.stats["refused_unauthorized"] += 1
            log.info(
                "refused a connection: token %s",
                exc.reason,
                extra={"document": document, "peer": self._address(conn, request), "status": 401},
            )
            return conn.respond(HTTPStatus.UNAUTHORIZED, f"token refused ({exc.reason}): {exc}\n")
        except AccessDenied as exc:
            self.stats["refused_forbidden"] += 1
            return conn.respond(HTTPStatus.FORBIDDEN, f"{exc}\n")
        except TimeoutError:
            return conn.respond(HTTPStatus.SERVICE_UNAVAILABLE, "authorization timed out\n")
        except Exception:
            log.exception("authorize hook failed", extra={"document": document})
            return conn.respond(HTTPStatus.INTERNAL_SERVER_ERROR, "authorization failed\n")
        if not access.rights.read:
            self.stats["refused_forbidden"] += 1
            return conn.respond(HTTPStatus.FORBIDDEN, f"no access to {document!r}\n")
        self._access[conn] = access
        return None

    async def _admit_mux(self, conn: Socket, request: Request) -> Response | None:
        """A multiplexed connection's handshake: its token is verified now (401 if it is
        refused); its rights are decided per document, as channels open."""
        claims = None
        if self._verifier is not None:
            try:
                claims = self._verifier.verify(token_from_request(request.path, request.headers))
            except TokenRefused as exc:
                self.stats["refused_unauthorized"] += 1
                return conn.respond(
                    HTTPStatus.UNAUTHORIZED, f"token refused ({exc.reason}): {exc}\n"
                )
        region = parse_qs(request.path.partition("?")[2]).get(REGION_QUERY)
        if region is not None:
            refusal = self._link_refusal(region, claims)
            if refusal is not None:
                self.stats["refused_forbidden"] += 1
                return conn.respond(HTTPStatus.FORBIDDEN, f"{refusal}\n")
        self._access[conn] = Access(Rights(), claims)
        return None

    def _link_refusal(self, region: list[str], claims: TokenClaims | None) -> str | None:
        """Why a link from ``region`` may not connect (None: it may)."""
        own = self.settings.region
        if own is None:
            return "this relay is in no region: it takes no links"
        if len(region) != 1:
            return "one region per link"
        try:
            validate_region(region[0])
        except ValueError as exc:
            return str(exc)
        if region[0] == own:
            return f"a link from region {own!r} to itself"
        if region[0] not in self.settings.peers:
            # (What it stores is kept as that region's, and only that region ships it:
            # from a region that is no peer, nothing would ever pass it on.)
            return f"region {region[0]!r} is not a peer of this relay's region {own!r}"
        if claims is None:
            return "a link needs a token with the peer right (the relay has no token keys)"
        if not claims.grants.allow_peer():
            return "a link needs a token with the peer right"
        return None

    def _metrics_response(self, conn: Responder, request: Request) -> Response:
        expected = self.settings.metrics_token
        if expected is not None:
            scheme, _, given = request.headers.get("Authorization", "").partition(" ")
            if scheme.lower() != "bearer":
                given = ""
            given = given.strip()
            if not hmac.compare_digest(given.encode(), expected.encode()):
                return conn.respond(HTTPStatus.UNAUTHORIZED, "metrics need the metrics token\n")
        body, content_type = exposition(self._snapshot)
        response = conn.respond(HTTPStatus.OK, "")
        response.body = body
        del response.headers["Content-Type"]
        response.headers["Content-Type"] = content_type
        del response.headers["Content-Length"]
        response.headers["Content-Length"] = str(len(body))
        return response

    def _snapshot(self) -> Snapshot:
        connections: Counter[tuple[str, str]] = Counter()
        presence = 0
        for room in self.rooms.values():
            presence += room.presence_count()
            for p in room.peers:
                ext = "yes" if p.session.extensions else "no"
                connections[ext, "rw" if p.access.rights.write else "r"] += 1
        return Snapshot(
            dict(self.stats), self.metrics, connections, len(self.rooms), presence,
            len(self._compacting), [link.status() for link in self._links],
        )  # fmt: skip

    async def _decide_access(
        self,
        request: Request,
        document: str,
        claims: TokenClaims | None = None,
        *,
        verified: bool = False,
        ask_revoked: bool = True,
    ) -> Access:
        """The token's rights to ``document``, and what ``authorize`` allows.

        ``verified``: ``claims`` is the connection's token, verified at its handshake (a
        multiplexed connection's), not read from ``request`` again. ``ask_revoked``:
        whether the ``revoked`` hook is asked (not for every announced name).

        Raises:
            TokenRefused: tokens are required and this one is missing or invalid (401).
            AccessDenied: ``authorize`` refused (403).
            TimeoutError: ``authorize`` took longer than AUTHORIZE_TIMEOUT_S.
        """
        rights = Rights()
        if self._verifier is not None:
            if not verified or claims is None:
                claims = self._verifier.verify(token_from_request(request.path, request.headers))
            rights = claims.grants.rights_for(document)
            # Asked at connect too: a token closed as revoked must not come straight back
            # with full access until the next periodic check.
            if (
                self.revoked is not None
                and ask_revoked
                and rights.read
                and await self._revoked_now(claims, document)
            ):
                raise TokenRefused("revoked", "access token revoked")
        if self.authorize is not None and rights.read:
            allowed = self.authorize(request, document)
            if inspect.isawaitable(allowed):
                async with asyncio.timeout(AUTHORIZE_TIMEOUT_S):
                    allowed = await allowed
            rights &= allowed
        return Access(rights, claims)

    def _address(self, conn: Socket, request: Request) -> str:
        """The client's address: the socket's, or the one a trusted proxy forwarded."""
        peer = conn.remote_address
        address = str(peer[0]) if peer else "unknown"
        forwarded = request.headers.get("X-Forwarded-For")
        if not forwarded or not self._is_trusted(address):
            return address
        # The rightmost hop a trusted proxy did not add is the client (RFC 7239 sec. 5.2).
        for hop in reversed([h.strip() for h in forwarded.split(",")]):
            if hop and not self._is_trusted(hop):
                return hop
        return address

    def _is_trusted(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in net for net in self._trusted)

    # -- connections ------------------------------------------------------------------

    async def _handle(self, ws: Socket) -> None:
        request = ws.request
        assert request is not None  # set by the handshake before the handler runs
        raw_path, _, query = request.path.partition("?")
        params = parse_qs(query)
        if raw_path == "/" and params.get(MUX_QUERY) == ["1"]:
            await self._handle_mux(ws, request, params)
            return
        try:
            # The room is the raw path up to "?", not URL-decoded (DESIGN: facts from the anchors).
            document = validate_document_name(raw_path[1:])
            access = self._access.pop(ws, None)
            if access is None:  # decided at the handshake: never missing for a valid name
                raise AccessDenied(f"no access to {document!r}")
        except (InvalidDocumentName, AccessDenied) as exc:
            self.stats["refused"] += 1
            self.metrics.closed(exc.close_code)
            await ws.close(exc.close_code, close_reason(str(exc)))
            return
        # Only crdtsync=1 asks for extensions: anything else (crdtsync=0) is a stock client.
        extensions = params.get(EXTENSION_QUERY) == ["1"]
        s = self.settings
        address = self._address(ws, request)
        wire = Wire(ws, Budget.of(s), address)
        peer = self._new_peer(wire, document, access, extensions)
        self.stats["connections"] += 1
        self.stats["connections_opened"] += 1
        self._per_address[address] = self._per_address.get(address, 0) + 1
        expiry_timer = self._expire_at_token(
            access, lambda: self._close_access(peer, "token expired")
        )
        received = 0
        handler = asyncio.current_task()
        if handler is not None:
            self._handlers.add(handler)
        try:
            room = await self._join(peer)
            async for data in ws:
                received += len(data)
                peer.bytes_in += len(data)
                peer.messages_in += 1
                if self._stopping or peer.closing:
                    continue  # what it sent after its close began is not handled
                delay = await self._take(peer, room, data)
                if peer.session.failure is not None:
                    break
                if delay > PACE_MIN_S:
                    # Pace this connection: stop reading it for a while (its sender
                    # slows down through TCP); other connections go on (DESIGN: bounded work).
                    # Debts below a few milliseconds wait for the next one: a sleep per
                    # message would cost more than the message.
                    await asyncio.sleep(delay)
        except StoreError as exc:
            log.error("store error: %s", exc, extra=peer.context())
            await ws.close(exc.close_code, close_reason(f"store unavailable: {exc}"))
        except (ConnectionClosed, ConnectionClosedByStop):
            pass
        except Exception:
            log.exception("bug while serving a connection", extra=peer.context())
            await ws.close(CloseCode.INTERNAL_ERROR, "internal error")
        finally:
            if handler is not None:
                self._handlers.discard(handler)
            if expiry_timer is not None:
                expiry_timer.cancel()
            if received >= BIG_CONNECTION_BYTES:
                # Large frames end up in reference cycles (websockets' assembler and
                # its exceptions); with the relay's rare collections (cli) they could
                # stay for good: gigabytes after a few such connections.
                self._collect_soon()
            self.stats["connections"] -= 1
            self._forget_address(address)
            self.stats["bytes_in"] += received
            self._part(peer)
            code = ws.close_code if ws.close_code is not None else CloseCode.ABNORMAL
            self.metrics.closed(code)

    def _new_peer(
        self,
        wire: Wire,
        document: str,
        access: Access,
        extensions: bool,
        channel: int | None = None,
        *,
        link: bool = False,
    ) -> Peer:
        """A peer for one document on ``wire`` (its own connection, or ``channel`` of it;
        ``link``: a channel of another region's link, which carries many clients'
        presence in one message, up to the room's presence bytes)."""
        s = self.settings
        check = self._check
        session = SyncSession(
            max_message_bytes=s.max_message_bytes,
            answer_piece_bytes=s.answer_piece_bytes,
            extensions=extensions,
            can_write=access.rights.write,
            validate=check,
            max_presence_bytes=(
                s.max_presence_bytes_per_room + 1024 if link else self._max_presence_bytes
            ),
            max_presence_state_bytes=s.max_presence_state_bytes,
        )
        peer = Peer(wire, session, document, access)
        # A crdtsync replica claims its ids right after the hello; until it has, its
        # first writes of ids would be stored with no owner (crdtsync.integrity.Writer).
        if access.subject is not None:
            peer.writer = Writer(frozenset(), access.subject, awaiting_claims=extensions)
        else:
            peer.writer = _AWAITING_CLAIMS if extensions else _ANONYMOUS
        peer.opened = time.monotonic()
        if channel is not None:
            peer.channel = channel
            peer.header = channel_header(channel)
        return peer

    async def _join(self, peer: Peer) -> Room:
        """Put ``peer`` in its document's room and start its sync (hello, step 1, presence).

        The timers it needs start here; :meth:`_part` ends them, whatever happened.
        """
        log.info(
            "connection opened",
            extra={
                **peer.context(),
                "event": "open",
                "access": "rw" if peer.access.rights.write else "r",
                "extensions": peer.session.extensions,
            },
        )
        room = self.rooms.get(peer.document)
        if room is None:
            # (Its size and tail length are learnt from its first read.)
            room = self.rooms[peer.document] = Room(peer.document)
            if self._presence is not None:
                self._presence.add(peer.document)  # (which asks the others who is here)
        # Join the fan-out before reading the store: no update slips between the two.
        room.add(peer)
        peer.room = room
        loop = asyncio.get_running_loop()
        peer.hold_timer = loop.call_later(HOLD_LIMIT_S, peer.release)
        if peer.origin is None:
            # (A link opens a channel to ship or for presence, and may not sync on it.)
            peer.sync_timer = loop.call_later(
                self.settings.sync_timeout_s, self._sync_timeout, peer
            )
        session = peer.session
        if session.extensions:
            # First, before anything the room may broadcast while the store is read:
            # the replica takes a first message that is not the hello as "no extensions".
            session.send_hello()
            await self._send(peer)
        peer.joined = await self._fresh_read(room)
        session.send_step1(peer.joined.state)
        states = room.presence_entries() if peer.origin is None else None
        if states:
            session.send_awareness(encode_awareness(states))
        await self._send(peer)
        return room

    async def _take(self, peer: Peer, room: Room, data: bytes | str) -> float:
        """Handle one message of ``peer``; return how long to pause reading its connection."""
        s = self.settings
        checked = None
        if len(data) >= s.offload_update_bytes and isinstance(data, bytes):
            # Walking a large update costs milliseconds per megabyte in Python,
            # under the GIL: do it in the work process (DESIGN: bounded work).
            self.stats["checks_in_worker"] += 1
            checked = await self._off_loop(check_message_update, data, peer.session._validate)
        peer.session.receive_data(data, checked)
        delay = await self._dispatch(peer, room)
        if peer.session.failure is not None:
            return 0.0
        if not self._queue_room.is_set():
            # The shared store is behind: stop reading writers (TCP slows them)
            # until it caught up; a store that does not is unavailable (1013).
            await self._wait_for_store(peer)
        if peer.engaged and peer.sync_timer is not None:
            peer.sync_timer.cancel()
            peer.sync_timer = None
        return delay

    def _part(self, peer: Peer) -> None:
        """``peer`` is gone (its connection or channel closed): leave its room, end its
        timers, count and log it. Once per peer."""
        if peer.parted:
            return
        peer.parted = True
        if peer.mux is not None:
            peer.mux.documents.pop(peer.document, None)
        if peer.hold_timer is not None:
            peer.hold_timer.cancel()
        if peer.sync_timer is not None:
            peer.sync_timer.cancel()
        if peer.room is not None:
            self._leave(peer.room, peer)
        session = peer.session
        self.stats["writes_dropped"] += session.writes_dropped
        self.metrics.refusals["read_only"] += session.writes_dropped
        self.stats["messages_in"] += peer.messages_in
        ws = peer.ws
        if peer.channel is not None:
            code, reason = peer.close_code, peer.close_reason
        else:
            code = ws.close_code if ws.close_code is not None else CloseCode.ABNORMAL
            reason = ws.close_reason or ""
        log.info(
            "connection closed",
            extra={
                **peer.context(),
                "event": "close",
                "code": int(code),
                "reason": reason,
                "duration_s": round(time.monotonic() - peer.opened, 3),
                "messages_in": peer.messages_in,
                "bytes_in": peer.bytes_in,
                "updates_stored": peer.updates_stored,
                "updates_refused": peer.updates_refused,
            },
        )

    def _expire_at_token(
        self, access: Access, expire: Callable[[], None]
    ) -> asyncio.TimerHandle | None:
        """Call ``expire`` when the connection's token expires, if it has an expiry."""
        if access.claims is None or access.claims.exp is None:
            return None
        # A token is good until its exp, plus the leeway allowed for clock skew
        # (the handshake accepted it on the same terms).
        left = access.claims.exp + self.settings.token_leeway_s - time.time()
        return asyncio.get_running_loop().call_later(max(0.0, left), expire)

    def _forget_address(self, address: str) -> None:
        left = self._per_address.get(address, 1) - 1
        if left:
            self._per_address[address] = left
        else:
            self._per_address.pop(address, None)

    # -- a multiplexed connection: many documents, folders (issue 11) ---------------------

    async def _handle_mux(self, ws: Socket, request: Request, params: dict[str, list[str]]) -> None:
        """Serve a multiplexed connection: each open channel is a peer in its document's
        room, as a connection of its own would be; a channel that fails or is refused is
        closed alone. The connection's budget is shared by its channels."""
        access = self._access.pop(ws, None)
        if access is None or params.get(EXTENSION_QUERY) != ["1"]:
            self.stats["refused"] += 1
            await ws.close(CloseCode.POLICY_VIOLATION, "a multiplexed connection needs crdtsync=1")
            return
        s = self.settings
        address = self._address(ws, request)
        budget = Budget.of(s)
        mux = Mux(
            Wire(ws, budget, address),
            request,
            access,
            address,
            budget,
            TokenBucket(s.channel_opens_per_s, s.channel_open_burst),
            id=ws.id.hex[:12],
        )
        if params.get(REGION_QUERY):
            mux.region = params[REGION_QUERY][0]  # (checked at the handshake)
            self.stats["links_in"] += 1
        self._muxes.add(mux)
        self.stats["connections"] += 1
        self.stats["connections_opened"] += 1
        self.stats["multiplexed_connections"] += 1
        self._per_address[address] = self._per_address.get(address, 0) + 1
        expiry_timer = self._expire_at_token(
            access, lambda: self._close_mux(mux, CloseCode.UNAUTHORIZED, "token expired")
        )
        received = 0
        handler = asyncio.current_task()
        if handler is not None:
            self._handlers.add(handler)
        log.info("multiplexed connection started", extra={**mux.context(), "event": "connect"})
        try:
            await mux.wire.send(ExtHello(MUX_VERSION).encode())
            async for data in ws:
                received += len(data)
                if self._stopping or mux.wire.closing:
                    continue
                if isinstance(data, str):
                    await ws.close(CloseCode.UNSUPPORTED_DATA, "text frames are not supported")
                    break
                try:
                    msg = decode_message(data, max_bytes=s.max_message_bytes)
                except CrdtsyncError as exc:
                    code = getattr(exc, "close_code", CloseCode.PROTOCOL_ERROR)
                    await ws.close(code, close_reason(str(exc)))
                    break
                delay = 0.0
                if isinstance(msg, ExtChannel):
                    if mux.unused(msg.channel):
                        self._early(mux, msg)  # overtook its open (a reordering path)
                        continue
                    delay = await self._channel_message(mux, msg)
                elif isinstance(msg, ExtOpen):
                    delay = await self._open_channel(mux, msg)
                    for early in mux.early.pop(msg.channel, ()):
                        mux.early_bytes -= len(early.frame)
                        delay = max(delay, await self._channel_message(mux, early))
                elif isinstance(msg, ExtClose):
                    peer = mux.channels.pop(msg.channel, None)
                    if peer is not None:
                        peer.detached = peer.closing = True
                        self._part(peer)
                elif isinstance(msg, ExtSubscribe):
                    folder = self._keep_folder(mux, msg)
                    if folder is not None:
                        folder.task = self._run_for(mux, self._subscribe(mux, folder, msg))
                elif isinstance(msg, ExtDigests):
                    await self._take_digests(mux, msg)
                elif isinstance(msg, ExtUnsubscribe):
                    self._unsubscribe(mux, msg.folder)
                elif isinstance(msg, ExtLink) and mux.region is not None:
                    await self._take_link(mux, msg)
                elif isinstance(msg, ExtLinkDigests) and mux.region is not None:
                    # (At most MAX_NAMES_PER_MESSAGE names: the decoder's bound.)
                    names = await self._readable(mux, list(msg.names))
                    digests = await self._digests(names)
                    answer = ExtLinkDigests(tuple(names), tuple(digests[n] for n in names))
                    await mux.wire.send(answer.encode())
                else:
                    await ws.close(
                        CloseCode.PROTOCOL_ERROR,
                        close_reason(f"{type(msg).__name__} outside a channel"),
                    )
                    break
                if delay > PACE_MIN_S:
                    await asyncio.sleep(delay)  # the whole connection is paced
        except StoreError as exc:
            log.error("store error: %s", exc, extra=mux.context())
            await ws.close(exc.close_code, close_reason(f"store unavailable: {exc}"))
        except (ConnectionClosed, ConnectionClosedByStop):
            pass
        except Exception:
            log.exception("bug while serving a multiplexed connection", extra=mux.context())
            await ws.close(CloseCode.INTERNAL_ERROR, "internal error")
        finally:
            if handler is not None:
                self._handlers.discard(handler)
            if expiry_timer is not None:
                expiry_timer.cancel()
            for task in mux.tasks:
                task.cancel()
            for number in list(mux.folders):
                self._unsubscribe(mux, number, say=False)
            for peer in list(mux.channels.values()):
                peer.detached = True
                # Its channel ended with the connection.
                peer.close_code = ws.close_code if ws.close_code is not None else CloseCode.ABNORMAL
                peer.close_reason = ws.close_reason or ""
                self._part(peer)
            mux.channels.clear()
            self._muxes.discard(mux)
            if received >= BIG_CONNECTION_BYTES:
                self._collect_soon()
            self.stats["connections"] -= 1
            self._forget_address(address)
            self.stats["bytes_in"] += received
            code = ws.close_code if ws.close_code is not None else CloseCode.ABNORMAL
            self.metrics.closed(code)
            log.info(
                "multiplexed connection ended",
                extra={
                    **mux.context(),
                    "event": "disconnect",
                    "code": int(code),
                    "reason": ws.close_reason or "",
                    "bytes_in": received,
                    "channels_opened": mux.last_channel,
                },
            )

    async def _channel_message(self, mux: Mux, msg: ExtChannel) -> float:
        """Handle one message of an open channel; a store failure closes that channel."""
        peer = mux.channels.get(msg.channel)
        if peer is None or peer.closing or peer.room is None:
            # Closed meanwhile (its close crossed this message). A link learns of it by
            # the close, and one it must ship again failed its checkpoint then.
            return 0.0
        peer.bytes_in += len(msg.frame)
        peer.messages_in += 1
        try:
            return await self._take(peer, peer.room, msg.frame)
        except StoreError as exc:
            log.error("store error: %s", exc, extra=peer.context())
            self._close_channel(peer, exc.close_code, f"store unavailable: {exc}")
            return 0.0

    async def _take_link(self, mux: Mux, msg: ExtLink) -> None:
        """Answer a link of region ``mux.region`` with this store's identity and the
        checkpoint recorded of it; first record the one it sends, once every update it
        sent before is stored here (none failed: else the link starts over)."""
        assert mux.region is not None
        store = self._link_store()
        if msg.cursor is not None:
            # Everything the link sent before this is stored first (the read loop waits:
            # nothing more of it comes in meanwhile).
            self._flush()
            try:
                async with asyncio.timeout(LINK_SETTLE_S):
                    while mux.unsettled:
                        await mux.settled.wait()
            except TimeoutError:
                mux.link_failed = True
            if mux.link_failed:
                why = "what the link sent was not all stored: start over from the last checkpoint"
                self._close_mux(mux, CloseCode.TRY_AGAIN_LATER, why)
                return
            await store.set_link_checkpoint(
                LinkCheckpoint("in", mux.region, msg.store, msg.epoch, msg.cursor)
            )
            self.stats["link_checkpoints_recorded"] += 1
        identity = await store.identity()
        recorded = await store.link_checkpoint("in", mux.region)
        answer = ExtLinked(identity.id, identity.epoch)
        if recorded is not None:
            answer = ExtLinked(
                identity.id, identity.epoch, recorded.store, recorded.epoch, recorded.cursor
            )
        await mux.wire.send(answer.encode())

    def _link_store(self) -> RelayStore:
        """The store as :class:`~crdtsync.backend.RelayStore` (links read and record
        through it): Redis, or a view of the relay's own SQLite file."""
        if self.backend is not None:
            return self.backend
        if self._sqlite_view is None:
            assert self.store is not None
            self._sqlite_view = SqliteStore.over(self.store, synchronous=self.settings.synchronous)
        return self._sqlite_view

    def _early(self, mux: Mux, msg: ExtChannel) -> None:
        """Keep a message that came before its channel's open, a few small ones per
        connection (its document's own sync recovers the rest: step 1 both ways)."""
        size = len(msg.frame)
        if mux.early_bytes + size > MAX_EARLY_BYTES or len(mux.early) >= 64:
            # (A link's message lost here must not be covered by its next checkpoint:
            # the link then starts over from the last one and ships it again.)
            mux.link_failed |= mux.region is not None
            return
        mux.early.setdefault(msg.channel, []).append(msg)
        mux.early_bytes += size

    def _run_for(self, mux: Mux, work: Awaitable[None]) -> asyncio.Task[None]:
        """Run ``work`` for ``mux`` beside its reading; cancelled when it closes."""

        async def run() -> None:
            try:
                await work
            except StoreError as exc:
                log.error("store error: %s", exc, extra=mux.context())
                self._close_mux(mux, exc.close_code, f"store unavailable: {exc}")
            except (ConnectionClosed, asyncio.CancelledError):
                pass
            except Exception:
                log.exception("bug while serving a folder", extra=mux.context())
                self._close_mux(mux, CloseCode.INTERNAL_ERROR, "internal error")

        task = asyncio.get_running_loop().create_task(run())
        mux.tasks.add(task)
        task.add_done_callback(mux.tasks.discard)
        return task

    def _close_mux(self, mux: Mux, code: int, reason: str) -> None:
        if mux.wire.closing:
            return
        mux.wire.closing = True
        if code == CloseCode.UNAUTHORIZED:
            self.stats["closed_unauthorized"] += 1
        log.info("closing a multiplexed connection: %s", reason, extra=mux.context())
        for peer in mux.channels.values():
            peer.closing = True
        self._close_later(mux.wire.ws, code, close_reason(reason))

    async def _open_channel(self, mux: Mux, msg: ExtOpen) -> float:
        """Open a channel on a document, or refuse it alone; return a pause for the
        connection (each open reads the store, as a sync request does)."""
        s = self.settings
        number = msg.channel
        if not mux.unused(number):
            # A repeat of an open (a duplicating path) or a stale one: never a second
            # channel with one number, and never a close of the live one (costs nothing).
            return 0.0
        if len(mux.used) >= 2 * s.max_channels_per_connection:
            # Numbers skipped without end (they are to be used in order).
            self._close_mux(mux, CloseCode.POLICY_VIOLATION, "channel numbers out of order")
            return 0.0
        mux.use(number)
        if len(mux.channels) >= s.max_channels_per_connection:
            self._refuse_channel(
                mux,
                number,
                CloseCode.TRY_AGAIN_LATER,
                f"over {s.max_channels_per_connection} documents on one connection",
            )
            return 0.0
        delay = mux.opens.take(time.monotonic())
        if msg.document in mux.documents:
            # (A fan-out to it would be copied once per channel.) Its close may be on
            # the way: the replica opens it again after a backoff.
            self._refuse_channel(
                mux, number, CloseCode.TRY_AGAIN_LATER, "document already open on this connection"
            )
            return 0.0
        try:
            document = validate_document_name(msg.document)
            access = await self._channel_access(mux, document)
        except InvalidDocumentName as exc:
            self.stats["refused"] += 1
            self._refuse_channel(mux, number, exc.close_code, str(exc))
            return delay
        except AccessDenied as exc:
            # As a connection of its own would get HTTP 403: the rights may come back.
            self.stats["refused"] += 1
            self._refuse_channel(mux, number, CloseCode.FORBIDDEN, str(exc))
            return delay
        except TokenRefused as exc:
            self.stats["refused_unauthorized"] += 1
            self._refuse_channel(mux, number, CloseCode.UNAUTHORIZED, f"token {exc.reason}")
            return delay
        except TimeoutError:
            self._refuse_channel(mux, number, CloseCode.TRY_AGAIN_LATER, "authorization timed out")
            return delay
        link = mux.region is not None
        peer = self._new_peer(mux.wire, document, access, True, channel=number, link=link)
        peer.mux = mux
        peer.origin = mux.region
        mux.channels[number] = peer
        mux.documents[document] = None
        self.stats["channels_opened"] += 1
        try:
            await self._join(peer)
        except StoreError as exc:
            log.error("store error: %s", exc, extra=peer.context())
            self._close_channel(peer, exc.close_code, f"store unavailable: {exc}")
        return delay

    async def _channel_access(self, mux: Mux, document: str) -> Access:
        """The connection's rights to ``document`` (its token's, and ``authorize``'s).

        Raises:
            AccessDenied: no right to read it.
            TokenRefused: its token was revoked.
            TimeoutError: a hook took too long.
        """
        try:
            access = await self._decide_access(
                mux.request, document, mux.access.claims, verified=True
            )
        except AccessDenied:
            self.stats["refused_forbidden"] += 1
            raise
        if not access.rights.read:
            self.stats["refused_forbidden"] += 1
            raise AccessDenied(f"no access to {document!r}")
        if mux.region is not None and not access.rights.peer:
            self.stats["refused_forbidden"] += 1
            raise AccessDenied(f"a link needs the peer right on {document!r}")
        if access.rights == mux.access.rights and access.claims is mux.access.claims:
            return mux.access  # (the usual case: one object for all its channels)
        return access

    def _refuse_channel(self, mux: Mux, number: int, code: int, reason: str) -> None:
        self._link_channel_lost(mux, code)
        mux.wire.push(ExtClose(number, int(code), close_reason(reason)).encode())

    @staticmethod
    def _link_channel_lost(mux: Mux, code: int) -> None:
        """A link's channel refused or closed here: what the link sends on it is dropped.

        A refusal (4403) is final: the link skips that document. Any other close is
        transient, and the link's next checkpoint must not cover what it dropped (the
        checkpoint's answer can reach the link before it acts on the close): the link
        starts over from its last one and ships it again."""
        if mux.region is not None and code != CloseCode.FORBIDDEN:
            mux.link_failed = True

    def _close_channel(self, peer: Peer, code: int, reason: str) -> None:
        """Close one channel of a multiplexed connection; the others go on."""
        if peer.detached or peer.mux is None or peer.channel is None:
            return
        self._link_channel_lost(peer.mux, code)
        peer.wire.push(ExtClose(peer.channel, int(code), close_reason(reason)).encode())
        peer.detached = peer.closing = True
        peer.close_code, peer.close_reason = int(code), reason
        peer.mux.channels.pop(peer.channel, None)
        # Not now: the caller may be walking the room's peers.
        asyncio.get_running_loop().call_soon(self._part, peer)

    def _close_peer(self, peer: Peer, code: int, reason: str) -> None:
        """Close a peer from synchronous code: its connection, or its channel alone."""
        if peer.channel is not None:
            self._close_channel(peer, code, reason)
        else:
            self._close_later(peer.ws, code, reason)

    # -- folders --------------------------------------------------------------------------

    def _keep_folder(self, mux: Mux, msg: ExtSubscribe) -> Folder | None:
        """Register a folder at once, in the connection's order (an unsubscribe right
        behind it finds it); None if it is refused or already kept."""
        s = self.settings
        kept = mux.folders.get(msg.folder)
        if kept is not None:
            if kept.prefix != msg.prefix:
                self._refuse_folder(
                    mux, msg.folder, CloseCode.PROTOCOL_ERROR, "folder number already used"
                )
            return None  # the same request again (a duplicating path): it is being served
        if len(mux.folders) >= s.max_folders_per_connection:
            self._refuse_folder(
                mux,
                msg.folder,
                CloseCode.TRY_AGAIN_LATER,
                f"over {s.max_folders_per_connection} folders on one connection",
            )
            return None
        try:
            prefix = validate_prefix(msg.prefix)
        except InvalidDocumentName as exc:
            self._refuse_folder(mux, msg.folder, CloseCode.POLICY_VIOLATION, str(exc))
            return None
        folder = Folder(msg.folder, prefix)
        mux.folders[msg.folder] = folder
        # Announcements are collected from now: what changes during the listing is
        # announced after it (twice at worst: harmless).
        self._folders.add(prefix, (mux, folder))
        return folder

    async def _subscribe(self, mux: Mux, folder: Folder, msg: ExtSubscribe) -> None:
        """List what changed in ``folder`` after the connection's cursor (or ask for
        digests when the cursor is of no use here), then announce changes as they come."""
        store, epoch = await self._store_identity()
        head = await self._last_change()
        folder.head = head
        # Started from this head (not from what the store says when the task first
        # runs): what changes after it reaches the folder, what changed before is listed.
        self._watch_changes(head)
        cursor = Cursor(msg.store, msg.epoch, msg.cursor)
        if cursor.valid_on(store, epoch) and cursor.position <= head:
            self.stats["folder_cursors_used"] += 1
            async with mux.listing:
                await self._list(mux, folder, cursor.position, head, None)
            self._caught_up(mux, folder)
        else:
            # Another store's cursor, a restored store's, or none: what the connection
            # holds is compared by digests (ExtDigests), then the rest is listed.
            self.stats["folder_digest_exchanges"] += 1
            folder.held = set()
            mux.wire.push(
                ExtChanged(folder.number, (), store, epoch, 0, digests_wanted=True).encode()
            )

    async def _list(
        self, mux: Mux, folder: Folder, after: int, head: int, skip: set[int] | None
    ) -> None:
        """Announce the folder's documents changed after ``after`` up to ``head``, a page
        at a time (never the whole folder in memory); ``skip``: hashes of names not to
        announce (the connection said it lacks the others). Listed from a cursor, each
        comes with its digest: the connection may hold it already (its own edits, sent
        after its cursor was recorded), and then exchanges nothing for it."""
        store, epoch = await self._store_identity()
        cursor = after
        while cursor < head and not mux.wire.closing and mux.folders.get(folder.number) is folder:
            # Paced before the page is read: its cost is charged from the last one.
            await self._pace_work(mux, 0.0)
            started = time.monotonic()
            changes = await self._changes(cursor, CHANGES_PAGE, listing=folder.prefix)
            if not changes:
                break
            names = [
                c.document
                for c in changes
                if c.cursor <= head
                and in_folder(c.document, folder.prefix)
                and (skip is None or hash(c.document) not in skip)
            ]
            cursor = min(head, changes[-1].cursor)
            names = await self._readable(mux, names)
            digests = None
            if skip is None and names:
                ours = await self._digests(names)
                digests = [ours[n] for n in names]
            spent = time.monotonic() - started
            await self._announce_now(mux, folder, names, store, epoch, cursor, digests)
            # Reading the log and the documents is the connection's work: paced by its
            # share, so that one old cursor cannot hold the work process for long.
            await self._pace_work(mux, spent)
            if changes[-1].cursor >= head or len(changes) < CHANGES_PAGE:
                break

    def _caught_up(self, mux: Mux, folder: Folder) -> None:
        """The folder's listing reached its head: say so, then go live."""
        if mux.folders.get(folder.number) is not folder:
            return
        folder.live = True
        folder.cursor = max(folder.cursor, folder.head)
        store, epoch = self._identity or ("", 0)
        pending = list(folder.pending)
        folder.pending.clear()
        for i in range(0, len(pending), MAX_NAMES_PER_MESSAGE):
            part = tuple(pending[i : i + MAX_NAMES_PER_MESSAGE])
            mux.wire.push(ExtChanged(folder.number, part, store, epoch, 0).encode())
        mux.wire.push(
            ExtChanged(folder.number, (), store, epoch, folder.cursor, caught_up=True).encode()
        )

    def _announce(
        self, mux: Mux, folder: Folder, names: list[str], store: str, epoch: int, cursor: int
    ) -> None:
        backlog = mux.wire.backlog()
        if backlog > self.settings.max_write_buffer_bytes:
            # A connection that does not read its announcements cannot make the relay
            # keep them (its channels' frames are under the backlog rule already).
            self.stats["closed_slow"] += 1
            self._close_mux(mux, CloseCode.TRY_AGAIN_LATER, "reader too slow; reconnect")
            return
        for i in range(0, max(1, len(names)), MAX_NAMES_PER_MESSAGE):
            part = tuple(names[i : i + MAX_NAMES_PER_MESSAGE])
            mux.wire.push(ExtChanged(folder.number, part, store, epoch, cursor).encode())
            self.stats["documents_announced"] += len(part)

    async def _announce_now(
        self,
        mux: Mux,
        folder: Folder,
        names: list[str],
        store: str,
        epoch: int,
        cursor: int,
        digests: list[bytes] | None = None,
    ) -> None:
        """:meth:`_announce`, waiting for the socket to take it (a listing of a large
        folder is paced by its reader, never piled up in memory)."""
        for i in range(0, max(1, len(names)), MAX_NAMES_PER_MESSAGE):
            part = tuple(names[i : i + MAX_NAMES_PER_MESSAGE])
            some = tuple(digests[i : i + MAX_NAMES_PER_MESSAGE]) if digests else ()
            frame = ExtChanged(folder.number, part, store, epoch, cursor, digests=some).encode()
            await mux.wire.send(frame)
            self.stats["documents_announced"] += len(part)

    async def _take_digests(self, mux: Mux, msg: ExtDigests) -> None:
        """Compare what the connection holds with the store: announce what differs; after
        the last batch, the rest of the folder (what it lacks), then go live."""
        folder = mux.folders.get(msg.folder)
        if folder is None or folder.held is None:
            return  # not (or no longer) waiting for digests: a late batch
        names = [n for n, _ in msg.entries if in_folder(n, folder.prefix)]
        if len(folder.held) + len(names) > self.settings.max_folder_documents:
            self._refuse_folder(
                mux,
                folder.number,
                CloseCode.TRY_AGAIN_LATER,
                f"over {self.settings.max_folder_documents} documents described in one folder",
            )
            return
        folder.held.update(hash(n) for n in names)
        started = time.monotonic()
        readable = set(await self._readable(mux, names))
        given = {n: d for n, d in msg.entries if n in readable}
        ours = await self._digests(list(given))
        await self._pace_work(mux, time.monotonic() - started)
        differ = [n for n, d in given.items() if ours.get(n) != d]
        store, epoch = await self._store_identity()
        if differ:
            await self._announce_now(mux, folder, differ, store, epoch, 0)
        if msg.last:
            held, folder.held = folder.held, None
            folder.task = self._run_for(mux, self._list_rest(mux, folder, held))

    async def _list_rest(self, mux: Mux, folder: Folder, held: set[int]) -> None:
        async with mux.listing:
            await self._list(mux, folder, 0, folder.head, held)
        self._caught_up(mux, folder)

    async def _pace_work(self, mux: Mux, spent: float) -> None:
        """Charge ``spent`` seconds of reading to the connection; wait out any debt."""
        wait = mux.budget.work.take(time.monotonic(), spent)
        if wait > PACE_MIN_S:
            await asyncio.sleep(wait)

    def _unsubscribe(self, mux: Mux, number: int, *, say: bool = False) -> None:
        folder = mux.folders.pop(number, None)
        if folder is not None:
            self._folders.discard(folder.prefix, (mux, folder))
            if folder.task is not None:
                folder.task.cancel()  # its listing ends with it

    def _refuse_folder(self, mux: Mux, number: int, code: int, reason: str) -> None:
        self._unsubscribe(mux, number)
        mux.wire.push(ExtUnsubscribe(number, int(code), close_reason(reason)).encode())

    async def _readable(self, mux: Mux, names: list[str]) -> list[str]:
        """Those of ``names`` the connection may read: a name it may not is never told."""
        out = []
        for name in names:
            try:
                access = await self._decide_access(
                    mux.request, name, mux.access.claims, verified=True, ask_revoked=False
                )
            except (AccessDenied, TokenRefused, TimeoutError):
                continue
            except Exception:
                log.exception("authorize hook failed", extra={"document": name})
                continue
            if access.rights.read:
                out.append(name)
        return out

    async def _digests(self, names: list[str]) -> dict[str, bytes]:
        """The store's digest of each of ``names`` (crdtsync.folders), off the loop."""
        if not names:
            return {}
        if self.backend is None:
            assert self.store is not None
            digests = await self._off_loop(digest_file, self.store.path, names)
            return dict(zip(names, digests, strict=True))
        out = {}
        for name in names:
            stored = await self.backend.load(name)
            out[name] = await self._off_loop(document_digest, stored.all_updates())
        return out

    async def _store_identity(self) -> tuple[str, int]:
        if self.backend is not None:
            identity = await self.backend.identity()
            self._identity = (identity.id, identity.epoch)
        else:
            assert self.store is not None
            self._identity = self.store.identity()
        return self._identity

    async def _last_change(self) -> int:
        if self.backend is not None:
            return await self.backend.last_change()
        assert self.store is not None
        return self.store.last_position()

    async def _changes(
        self, cursor: int, limit: int, *, listing: str | None = None
    ) -> list[Change]:
        """The store's changes after ``cursor``; a listing's (of the folder ``listing``,
        from a cursor that may be old: much of the log to read) off the loop."""
        if self.backend is not None:
            return await self.backend.changes(cursor, limit)
        assert self.store is not None
        if listing is not None:
            rows = await self._off_loop(changes_file, self.store.path, cursor, limit, listing)
        else:
            rows = self.store.changes(cursor, limit)
        return [Change(doc, p) for doc, p in rows]

    def _watch_changes(self, start: int) -> None:
        """Announce changes after ``start`` to the folders kept (if nothing does yet)."""
        if self._change_watcher is None or self._change_watcher.done():
            self._change_watcher = asyncio.get_running_loop().create_task(
                self._follow_changes(start)
            )

    async def _follow_changes(self, seen: int) -> None:
        """Announce every change of the store after ``seen`` to the folders it is in, while
        any are kept.

        On SQLite this process made every change: it looks when a commit woke it. A
        shared store is read every CHANGES_POLL_S, since other processes change it.
        """
        backoff = Backoff(*FOLLOW_BACKOFF_S)
        while self._folders and not self._stopping:
            try:
                changes = await self._changes(seen, CHANGES_PAGE)
            except StoreError as exc:
                log.warning("reading the store's changes failed: %s", exc)
                await asyncio.sleep(backoff.next_delay())
                continue
            backoff.reset()
            if changes:
                start, seen = seen, changes[-1].cursor
                await self._deliver_changes(changes, start)
                if len(changes) == CHANGES_PAGE:
                    continue
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(CHANGES_POLL_S if self._shared else 1.0):
                    await self._changed.wait()

    async def _deliver_changes(self, changes: list[Change], start: int) -> None:
        """Announce ``changes`` (those after ``start``) to the folders they are in."""
        try:
            await self._announce_changes(changes, start)
        finally:
            # Those changes are past: what each connection wrote before them is forgotten.
            for mux in self._muxes:
                if not mux.wrote:
                    continue
                for change in changes:
                    noted = mux.wrote.get(change.document)
                    if noted is not None and noted[0] <= change.cursor:
                        del mux.wrote[change.document]

    async def _announce_changes(self, changes: list[Change], start: int) -> None:
        store, epoch = self._identity or await self._store_identity()
        touched: dict[tuple[Mux, Folder], list[str]] = {}
        for change in changes:
            for _, (mux, folder) in self._folders.matching(change.document):
                touched.setdefault((mux, folder), []).append(change.document)
        cursor = changes[-1].cursor
        latest = {change.document: change.cursor for change in changes}
        for (mux, folder), names in touched.items():
            if mux.wire.closing or mux.folders.get(folder.number) is not folder:
                continue
            if mux.wrote:
                # Its own writes, if nobody wrote those documents after them, and what came
                # before them was in earlier pages (a write by another, committed first
                # while its own waited, is listed at its position: announced).
                names = [n for n in names if not _own_write(mux.wrote.get(n), latest[n], start)]
            # (Documents open on its channels too: it may be closing one of them.)
            names = await self._readable(mux, names)
            if not folder.live:
                folder.pending.update(dict.fromkeys(names))
                continue
            folder.cursor = max(folder.cursor, cursor)
            if names:
                # Never a cursor move alone: it would tell a connection when documents it
                # may not read changed. Its cursor lags behind them instead; listed again
                # from it after a reconnect, they are filtered out again.
                self._announce(mux, folder, names, store, epoch, folder.cursor)

    def _collect_soon(self) -> None:
        """A garbage collection, at most once a second (a full one costs milliseconds)."""
        if self._collect_handle is not None:
            return

        def collect() -> None:
            self._collect_handle = None
            gc.collect()

        self._collect_handle = asyncio.get_running_loop().call_later(1.0, collect)

    def _close_access(self, peer: Peer, reason: str) -> None:
        """Close a connection whose token expired or was revoked (4401: get a new one)."""
        if peer.closing:
            return
        peer.closing = True
        self.stats["closed_unauthorized"] += 1
        log.info("closing a connection: %s", reason, extra=peer.context())
        self._close_peer(peer, CloseCode.UNAUTHORIZED, reason)

    async def _ask_revoked(self, claims: TokenClaims, document: str) -> bool:
        """The ``revoked`` hook's answer, within AUTHORIZE_TIMEOUT_S.

        Raises:
            Exception: whatever the hook raised (TimeoutError when it took too long).
        """
        assert self.revoked is not None
        answer = self.revoked(claims, document)
        if inspect.isawaitable(answer):
            async with asyncio.timeout(AUTHORIZE_TIMEOUT_S):
                answer = await answer
        return bool(answer)

    async def _revoked_now(self, claims: TokenClaims, document: str) -> bool:
        """The hook's answer at a handshake. A hook that fails or times out lets the
        connection in, as at the periodic checks (the token itself is valid: revocation
        is a deny list, and its service being down must not take every document down)."""
        try:
            return await self._ask_revoked(claims, document)
        except BaseException as exc:
            task = asyncio.current_task()
            if (task is not None and task.cancelling()) or isinstance(
                exc, KeyboardInterrupt | SystemExit
            ):
                raise
            log.error("revoked hook failed: %r", exc, extra={"document": document})
            return False

    async def _recheck_tokens(self) -> None:
        """Ask the ``revoked`` hook about every connection with a token, periodically."""

        async def ask(peer: Peer) -> None:
            assert peer.access.claims is not None
            try:
                revoked = await self._ask_revoked(peer.access.claims, peer.document)
            except BaseException as exc:
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    raise  # the relay is stopping: not the hook's doing
                if isinstance(exc, KeyboardInterrupt | SystemExit):
                    raise
                # A failing hook (even one raising CancelledError) keeps the connection
                # (its token is still valid) and the checks: it is asked again next round.
                log.error("revoked hook failed: %r", exc, extra=peer.context())
                return
            if revoked:
                self._close_access(peer, "token revoked")

        while True:
            await asyncio.sleep(self.settings.token_recheck_s)
            peers = [
                p
                for room in list(self.rooms.values())
                for p in room.peers
                if p.access.claims is not None and not p.closing
            ]
            for i in range(0, len(peers), 256):  # bounded concurrency towards the hook
                await asyncio.gather(*(ask(p) for p in peers[i : i + 256]))
            # A multiplexed connection's folders are announced under its token too: asked
            # for each prefix it keeps (its channels were asked above, as documents).
            muxes = [m for m in self._muxes if m.access.claims is not None and m.folders]
            for mux in muxes:
                for folder in list(mux.folders.values()):
                    if await self._mux_revoked(mux, folder.prefix):
                        self._close_mux(mux, CloseCode.UNAUTHORIZED, "token revoked")
                        break

    async def _mux_revoked(self, mux: Mux, prefix: str) -> bool:
        assert mux.access.claims is not None
        try:
            return await self._ask_revoked(mux.access.claims, prefix)
        except Exception as exc:
            log.error("revoked hook failed: %r", exc, extra=mux.context())
            return False

    def _sync_timeout(self, peer: Peer) -> None:
        peer.sync_timer = None  # (served: the handle and the peer no longer hold each other)
        if not peer.engaged:
            self._close_over_limits(
                peer, f"no sync message within {self.settings.sync_timeout_s:g} s"
            )

    def _close_over_limits(self, peer: Peer, reason: str) -> None:
        if peer.closing:
            return  # once: strikes keep coming until the close completes
        peer.closing = True
        self.stats["closed_over_limits"] += 1
        log.info("closing a connection: %s", reason, extra=peer.context())
        self._close_peer(peer, CloseCode.POLICY_VIOLATION, close_reason(reason))

    def _strike(self, peer: Peer, reason: str) -> None:
        """Count a refusal; a connection that keeps going over a cap is closed (1008)."""
        self.stats["limits_hit"] += 1
        self.metrics.refusals["limit"] += 1
        if peer.budget.strikes.strike(time.monotonic()):
            self._close_over_limits(peer, f"over limits: {reason}")

    def stored_document(self, document: str) -> bytes:
        """The whole stored document as one update: snapshot and tail, merged (never a Doc)."""
        assert self.store is not None
        return self.store.load(document).merged()

    async def _answer(self, room: Room, read: Read, state_vector: bytes) -> list[bytes]:
        """The answer to a step 1, cut into pieces; shared by peers that ask the same of
        the same read (a crowd of new joiners all send an empty state vector)."""
        if read.merged is not None:
            # A small document: answering costs less than a task to share the answer.
            return split_update(
                get_update(read.merged, state_vector), self.settings.answer_piece_bytes
            )
        if room.answers is None or room.answers[0] != read.id:
            answers: dict[bytes, asyncio.Task[list[bytes]]] = {}
            room.answers = (read.id, answers)
        else:
            answers = room.answers[1]
        task = answers.get(state_vector)
        if task is None:
            task = asyncio.get_running_loop().create_task(
                self._compute_answer(room, read, state_vector)
            )
            if len(answers) < MAX_CACHED_ANSWERS:
                answers[state_vector] = task
        # Shielded: a peer that leaves while waiting must not cancel the others' answer.
        return await asyncio.shield(task)

    async def _compute_answer(self, room: Room, read: Read, state_vector: bytes) -> list[bytes]:
        piece_bytes = self.settings.answer_piece_bytes
        if read.merged is not None:
            return split_update(get_update(read.merged, state_vector), piece_bytes)
        assert self.store is not None
        for _ in range(2):
            got = await self._off_loop(
                answer_read, self.store.path, room.name, read.id, [state_vector], piece_bytes
            )
            if got is not None:
                return got[0]
            # The work process no longer keeps that read (it restarted, or kept newer
            # ones): a newer read serves as well, since the asker is in the fan-out.
            read = await self._fresh_read(room)
            if read.merged is not None:
                return split_update(get_update(read.merged, state_vector), piece_bytes)
        merged = self.stored_document(room.name)
        return split_update(get_update(merged, state_vector), piece_bytes)

    async def _fresh_read(self, room: Room) -> Read:
        """The stored document, read by a read that starts now or later, never earlier.

        A peer asks after it joined the room's fan-out, so such a read misses nothing
        that the fan-out does not bring it. Every peer that asks while a read is in
        flight shares the next one: at most two reads per document at a time, however
        many peers join or resync (DESIGN: bounded work).
        """
        if room.read_next is None:
            room.read_next = asyncio.get_running_loop().create_future()
            future = self._begin_read(room) if room.reading is None else room.read_next
        else:
            future = room.read_next
        # Shielded: a peer that leaves while waiting must not cancel the others' read.
        return await asyncio.shield(future)

    def _begin_read(self, room: Room) -> asyncio.Future[Read]:
        future, room.read_next = room.read_next, None
        assert future is not None
        room.reading = future
        task = asyncio.get_running_loop().create_task(self._read(room.name))

        def done(t: asyncio.Task[Read]) -> None:
            room.reading = None
            if not future.done():
                exc = None if t.cancelled() else t.exception()
                if t.cancelled():
                    future.cancel()
                elif exc is not None:
                    future.set_exception(exc)
                else:
                    future.set_result(t.result())
            if room.read_next is not None:
                self._begin_read(room)

        task.add_done_callback(done)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return future

    async def _read(self, name: str) -> Read:
        """Read a stored document: on the loop when this process knows it is small, else
        in the work process (which keeps a large one and answers from it)."""
        if self.backend is not None:
            return await self._read_shared(name)
        assert self.store is not None
        self.stats["document_reads"] += 1
        room = self.rooms.get(name)
        if room is not None and room.measured:
            small = room.appended <= READ_INLINE_UPDATES and room.stored_bytes <= READ_INLINE_BYTES
        else:
            size = self.store.size_within(name, READ_INLINE_UPDATES, READ_INLINE_BYTES)
            small = size is not None
            if size is not None and room is not None:
                room.measured = True
                room.appended = max(room.appended, size[0])
                room.stored_bytes = max(room.stored_bytes, size[1])
        if small or self._stopping:
            merged = self.stored_document(name)
            self._inline_reads += 1
            return Read(f"loop:{self._inline_reads}", get_state(merged), -1, -1, merged)
        self.stats["document_reads_in_worker"] += 1
        read = await self._off_loop(read_file, self.store.path, name, READ_INLINE_BYTES)
        room = self.rooms.get(name)
        if room is not None:
            room.kept_in_worker = room.kept_in_worker or read.merged is None
            # What the store held at the read; appends since are counted as they commit.
            room.measured = True
            room.appended = max(room.appended, read.updates)
            room.stored_bytes = max(room.stored_bytes, read.size)
        return read

    async def _off_loop(self, fn: Callable[..., _T], *args: Any) -> _T:
        """Run pure CPU work (pycrdt merges, update validation) in the work process.

        pycrdt and the validator hold the GIL: a thread would stall the loop all the same.
        If the worker dies (hostile content crashing pycrdt), the work is done here
        once and a fresh worker starts with the next call.
        """
        if self._stopping:
            raise ConnectionClosedByStop()
        if self._work_pool is None:
            self._work_pool = ProcessPoolExecutor(
                1,
                mp_context=get_context("spawn"),
                initializer=worker_init,
                initargs=(os.getpid(),),
            )
        pool = self._work_pool
        self._work_calls += 1
        try:
            return await asyncio.wrap_future(pool.submit(fn, *args))
        except BrokenProcessPool:
            if self._stopping:
                raise ConnectionClosedByStop() from None
            log.error("work process died in %s; doing it on the loop", fn.__name__)
            self._work_pool = None
            return fn(*args)
        finally:
            self._work_calls -= 1
            if not self._work_calls and pool is self._work_pool and not self._stopping:
                with contextlib.suppress(BrokenProcessPool, RuntimeError):
                    pool.submit(release)  # see release(): nobody waits for it

    async def _send(self, peer: Peer) -> None:
        for frame in peer.session.data_to_send():
            if peer.detached:
                continue
            await peer.wire.send(peer.header + frame)  # waits for it to leave: backpressure

    async def _dispatch(self, peer: Peer, room: Room) -> float:
        """Carry out the session's events; return how long to pause reading this peer."""
        session = peer.session
        budget = peer.budget
        delay = 0.0
        answered = False
        events = session.events_received()
        for i, event in enumerate(events):
            if isinstance(event, UpdateReceived):
                if event.owners is not None and peer.origin is None:
                    self._close_peer(
                        peer, CloseCode.PROTOCOL_ERROR, "a link's update from a client"
                    )
                    return 0.0
                peer.engaged = True
                # Charged in batches: two bucket updates per message cost more than the
                # pacing saves at the rates a real writer reaches.
                peer.owed_updates += 1
                peer.owed_bytes += len(event.update)
                if peer.owed_updates >= PACE_BATCH or peer.owed_bytes >= PACE_BATCH_BYTES:
                    now = time.monotonic()
                    delay = max(
                        delay,
                        budget.updates.take(now, peer.owed_updates),
                        budget.update_bytes.take(now, peer.owed_bytes),
                    )
                    peer.owed_updates = peer.owed_bytes = 0
                if event.info.is_empty:
                    if event.key is not None:
                        # Queued all the same, so acknowledgements keep their order.
                        self._submit(_Pending(peer, None, event.key))
                    continue
                comparison = None
                if self.settings.integrity:
                    if self._shared:
                        ledger = await self._shared_ledger(peer.document)
                    else:
                        ledger = self._ledger(peer.document)
                    lookup = ledger.lookup(event.info)
                    repeated = (
                        sum(hi - lo for rs in lookup.needed.values() for lo, hi in rs)
                        if lookup
                        else 0
                    )
                    if repeated > self.settings.max_repeat_units:
                        # Comparing costs the work process ~3 us per clock: a client
                        # resending a whole large document is told to send what the
                        # relay lacks (what its step 1 asks for), as y-websocket does.
                        reason = (
                            f"update repeats {repeated} stored clocks, over the limit of "
                            f"{self.settings.max_repeat_units}: send only what the relay lacks"
                        )
                        self._strike(peer, reason)
                        self.stats["updates_refused"] += 1
                        self._submit(_Pending(peer, None, event.key, refusal=reason))
                        continue
                    if lookup and not self._shared:
                        comparison, spent = await self._compare(peer, event.update, lookup)
                        delay = max(delay, budget.work.take(time.monotonic(), spent))
                        if peer.gone:
                            return 0.0
                # A link's content is judged on content alone: ownership of client ids
                # was judged where it was written; their owners there are recorded here.
                writer = peer.writer
                if peer.origin is not None:
                    writer = Shipped(owners=dict(event.owners or ()))
                self._submit(
                    _Pending(peer, event.update, event.key, event.info, writer, comparison)
                )
            elif isinstance(event, StateRequested):
                peer.engaged = True
                if any(isinstance(later, StateRequested) for later in events[i + 1 :]):
                    continue  # several in one batch: one answer, to the last of them
                wait = peer.sync_requests(self.settings).take(time.monotonic())
                if wait > 0:
                    # Each answer reads the stored document: a peer asking too often waits
                    # (and what it asks meanwhile is answered once, afterwards).
                    await asyncio.sleep(wait)
                    if peer.gone:
                        return 0.0
                started = time.monotonic()
                read = peer.joined
                if read is None:
                    read = await self._fresh_read(room)
                peer.joined = None
                session.answer_with_pieces(await self._answer(room, read, event.state_vector))
                now = time.monotonic()
                self.metrics.answer_seconds.observe(now - started)
                if not peer.answered:
                    peer.answered = True
                    self.metrics.join_seconds.observe(now - peer.opened)
                answered = True
            elif isinstance(event, AwarenessReceived):
                self._on_awareness(peer, room, event, time.monotonic())
            elif isinstance(event, AwarenessQueried):
                session.send_awareness(encode_awareness(room.presence_entries()))
            elif isinstance(event, ClientsClaimed):
                peer.writer = Writer(event.clients, peer.writer.subject)
                if self.settings.integrity and event.fresh:
                    if self._shared:
                        # Recorded by the append, in the turn's order (another process
                        # may write the same ledger: its write is conditional).
                        self._submit(
                            _Pending(peer, None, None, writer=peer.writer, claim=event.fresh)
                        )
                    elif peer.document in self._staging:
                        waiting = self._claims_waiting.setdefault(peer.document, [])
                        waiting.append((peer, event.fresh))
                    else:
                        self._record_claims(peer, event.fresh)
            elif isinstance(event, LimitHit):
                if peer.origin is None:
                    self._strike(peer, event.reason)
                else:  # (a link is never closed for presence: best effort)
                    log.warning("presence from a link dropped: %s", event.reason)
            elif isinstance(event, (PermissionRefused, Refused)):
                pass  # a client has no business refusing the relay's content; ignore it
            elif isinstance(event, Failed):
                log.info(
                    "closing a connection: %s",
                    event.reason,
                    extra={**peer.context(), "code": event.close_code},
                )
                await self._send(peer)
                if peer.channel is not None:
                    self._close_channel(peer, event.close_code, event.reason)
                else:
                    await peer.ws.close(event.close_code, event.reason)
                return 0.0
        await self._send(peer)
        if answered and peer.held is not None:
            peer.release()
        return delay

    def _leave(self, room: Room, peer: Peer) -> None:
        room.discard(peer)
        mine = peer.presence_entries()
        if peer.mux is not None and peer.origin is None:
            peer.mux.presence_states -= len(mine)
            peer.mux.presence_bytes -= sum(entry.size for entry in mine)
        gone = []
        for entry in mine:
            current = room.presence_of(entry.client_id)
            if current is not None and current.clock <= entry.clock:
                gone.append(AwarenessEntry(entry.client_id, entry.clock + 1, None))
        for entry in gone:
            self._forget_presence(room, entry.client_id)
        if gone and room.peers:
            self._deliver(_local(room.peers), _awareness_frame(encode_awareness(gone)))
        if gone and self._presence is not None:
            self._say_presence(room.name, encode_awareness(gone))
        if gone and peer.origin is None:
            for link in self._links:
                link.presence(room.name, gone)
        if not room.peers:
            # Nothing of a room outlives its last connection (DESIGN: stateless relay).
            self.rooms.pop(room.name, None)
            self._ledgers.pop(room.name, None)
            if self._shared:
                self._positions.pop(room.name, None)
                self._own.pop(room.name, None)
                self._entries_waiting.pop(room.name, None)
                self._resync_entries.pop(room.name, None)
                if self._follower is not None and room.following:
                    self._follower.remove(room.name)
                if self._presence is not None:
                    self._presence.remove(room.name)
            if room.kept_in_worker and self._work_pool is not None and self.store is not None:
                with contextlib.suppress(Exception):  # a broken pool has nothing to forget
                    self._work_pool.submit(forget_read, self.store.path, room.name)
            # Compact what this process knows is a sizeable tail; a few updates can wait
            # in a file. In Redis (memory) any tail is folded: a stream entry costs more
            # than the bytes it holds, and a snapshot alone is what a closed document
            # should cost there once the minimum age passed.
            least = 1 if self._shared else max(1, self.settings.compact_after_updates // 10)
            if room.appended >= least:
                self._schedule_compaction(room)

    # -- awareness --------------------------------------------------------------------

    def _on_awareness(self, peer: Peer, room: Room, event: AwarenessReceived, now: float) -> None:
        """Keep and relay presence within the caps; what is over them is dropped.

        Another region's link (``peer.origin``) brings its clients' presence, coalesced
        (server/links.py): held to the room's caps only, and what is over them dropped
        without a strike (best effort: a link is never closed for presence)."""
        s = self.settings
        link = peer.origin is not None
        if not link and not peer.presence_bucket(s).allow(now):
            self._strike(peer, f"presence faster than {s.presence_per_s:g} messages/s")
            return
        accepted: list[AwarenessEntry] = []
        if link:
            # Other regions' states take at most half of the room's caps: its own
            # clients always have the other half (else a remote region's crowd would
            # get them struck, then closed, for a room they did not fill).
            remote = [e for p in room.peers if p.origin is not None for e in p.presence_entries()]
            remote_states, remote_bytes = len(remote), sum(e.size for e in remote)
        for entry in event.entries:
            cid = entry.client_id
            current = room.presence_of(cid)
            if current is not None and current.clock > entry.clock:
                continue
            mine = peer.presence_of(cid)  # (the state it set for cid, as it set it)
            if entry.removed:
                if mine is None:
                    # Not its state (or nobody's): a removal takes nothing from another
                    # connection, and one of nothing is not passed on (it costs the
                    # room's peers and other regions' links for nothing).
                    continue
                self._forget_presence(room, cid)
                peer.drop_presence(cid)
                if peer.mux is not None and not link:
                    peer.mux.presence_states -= 1
                    peer.mux.presence_bytes -= mine.size
                accepted.append(entry)
                continue
            old_size = current.size if current is not None else 0
            if link:
                new = current is None or mine is None
                if (new and remote_states >= s.max_presence_states_per_room // 2) or (
                    remote_bytes - (0 if new else old_size) + entry.size
                    > s.max_presence_bytes_per_room // 2
                ):
                    continue
                if (
                    current is None and room.presence_count() >= s.max_presence_states_per_room
                ) or room.awareness_bytes - old_size + entry.size > s.max_presence_bytes_per_room:
                    continue
                remote_states += 1 if new else 0
                remote_bytes += entry.size - (0 if new else old_size)
                if current is not None and mine is None:
                    self._hand_over(room, cid, peer)
                room.set_presence(entry)
                room.awareness_bytes += entry.size - old_size
                peer.set_presence(entry)
                accepted.append(entry)
                continue
            if mine is None and peer.presence_count() >= s.max_presence_states_per_connection:
                self._strike(
                    peer, f"more than {s.max_presence_states_per_connection} presence states"
                )
                continue
            mux = peer.mux
            grow = 0
            if mux is not None:
                # A multiplexed connection's states together: about one per open
                # document (a replica's own), not the per-connection cap per channel.
                grow = entry.size - (mine.size if mine is not None else 0)
                cap = s.max_presence_states_per_connection + len(mux.channels)
                if (mine is None and mux.presence_states >= cap) or (
                    mux.presence_bytes + grow
                    > s.max_presence_state_bytes * s.max_presence_states_per_connection
                    + PRESENCE_BYTES_PER_CHANNEL * len(mux.channels)
                ):
                    self._strike(peer, "presence over its connection's share")
                    continue
            if current is None and room.presence_count() >= s.max_presence_states_per_room:
                self._strike(peer, f"room holds {s.max_presence_states_per_room} presence states")
                continue
            if room.awareness_bytes - old_size + entry.size > s.max_presence_bytes_per_room:
                self._strike(peer, f"room presence over {s.max_presence_bytes_per_room} bytes")
                continue
            if mux is not None:
                # (Counted once the state is kept: one the room refused counts for nothing.)
                mux.presence_states += 0 if mine is not None else 1
                mux.presence_bytes += grow
            if current is not None and mine is None:
                self._hand_over(room, cid, peer)
            room.set_presence(entry)
            room.awareness_bytes += entry.size - old_size
            peer.set_presence(entry)
            if room.remote_presence is not None:
                room.remote_presence.pop(cid, None)  # (a client that moved here from another)
            accepted.append(entry)
        if not accepted:
            return
        payload = (
            event.payload if len(accepted) == len(event.entries) else encode_awareness(accepted)
        )
        # Relay to the whole room, sender included: stock clients count it as traffic
        # and reconnect after 30 s of silence (DESIGN: facts from the anchors). Not to
        # links' channels: another region learns its presence by this region's links.
        self._deliver(_local(room.peers), _awareness_frame(payload))
        if self._presence is not None:
            self._say_presence(room.name, payload)
        if not link:
            for region in self._links:
                region.presence(room.name, accepted)  # (never on: a link's stay here)

    def _hand_over(self, room: Room, cid: int, taker: Peer) -> None:
        """Client ``cid``'s state is ``taker``'s now (it reconnected, or moved to another
        region and came back over a link): no other peer holds it any more (a removal or
        a close of theirs would take it away), and if a local one did, this region's
        links no longer carry it (they would bring it back on a new channel)."""
        for other in room.peers:
            if other is taker:
                continue
            old = other.presence_of(cid)
            if old is None:
                continue
            other.drop_presence(cid)
            if other.origin is None:
                if other.mux is not None:
                    other.mux.presence_states -= 1
                    other.mux.presence_bytes -= old.size
                if taker.origin is not None:
                    for link in self._links:
                        link.forget_presence(room.name, cid)

    @staticmethod
    def _forget_presence(room: Room, client_id: int) -> None:
        entry = room.drop_presence(client_id)
        if entry is not None:
            room.awareness_bytes -= entry.size

    def _deliver(self, peers: Collection[Peer], frame: bytes) -> None:
        """Send a frame to peers, under the backlog rule (:meth:`_check_backlog`).

        Every frame goes under this rule (presence included): a peer that does not read
        cannot make the relay hold more than its share for it.
        """
        # (Split first: a frame to an ASGI connection starts its outbox.)
        queued = [p for p in peers if p.outbox is not None and not p.closing]
        _broadcast([p for p in peers if not p.closing and p.outbox is None], frame)
        for p in queued:
            p.push(frame)
        self._check_backlog(peers)
        self._count_sent(len(frame) * len(peers))

    def _count_sent(self, size: int) -> None:
        """Check the relay-wide budget early once much was sent since the last check (a
        room fanning out fast fills many backlogs within the watcher's second)."""
        self._sent_since_check += size
        self.stats["bytes_out"] += size
        if self._sent_since_check > self._write_budget() // 4:
            self._check_budget()

    def _check_backlog(self, peers: Iterable[Peer], now: float | None = None) -> int:
        """Close the peers that fell too far behind (1013); return the others' backlog.

        A peer is behind while its unsent backlog is over ``max_write_buffer_bytes``; it
        is closed when it stays behind for ``slow_reader_grace_s``, or at once when the
        backlog passes that limit by more than two of the largest updates (so a large
        update or two to a fast reader on a real network is no reason to close it).
        """
        s = self.settings
        limit = s.max_write_buffer_bytes
        hard = limit + max(limit, 2 * (s.max_update_bytes + 64 * 1024))
        now = time.monotonic() if now is None else now
        total = 0
        for p in peers:
            if p.closing or p.wire.closing or p.ws.transport is None:
                continue
            size = p.backlog()
            if size <= limit:
                p.behind_since = None
            elif size > hard:
                self._close_slow(p, f"reader too slow: {size} bytes unsent; reconnect", cut=True)
                continue
            elif p.behind_since is None or p.wire.emptied_at > p.behind_since:
                # (An ASGI connection's frames all wait in its queue a moment: one whose
                # queue emptied since it fell behind is keeping up.)
                p.behind_since = now
            elif now - p.behind_since > s.slow_reader_grace_s:
                self._close_slow(p, "reader too slow; reconnect")
                continue
            total += size
        return total

    def _checkpoint(self) -> None:
        """Copy the write-ahead log into the database from a thread, once a second when
        something was committed (the relay's own commits never do it: see UpdateLog)."""
        if self.store is None or self._checkpointing is not None:
            return
        if self.stats["commits"] == self._commits_checkpointed:
            return
        self._commits_checkpointed = self.stats["commits"]
        self._checkpointing = asyncio.get_running_loop().run_in_executor(
            self._checkpointer,
            _checkpoint_and_record,
            self.store.path,
            self._store_id,
            self.store.last_position(),  # (committed: read on the loop, between commits)
        )

        def done(f: asyncio.Future[tuple[int, int]]) -> None:
            self._checkpointing = None
            if not f.cancelled() and f.exception() is not None:
                log.warning("checkpoint of the store failed: %s", f.exception())

        self._checkpointing.add_done_callback(done)

    def _close_slow(self, peer: Peer, reason: str, *, cut: bool = False) -> None:
        """Close a peer that fell behind (1013). A reader that does not read never takes
        the close frame either (websockets waits for the socket to drain first, with no
        timeout), and what is buffered for it stays until the connection is cut: after
        ``close_timeout_s``, or at once with ``cut`` (the memory is needed now)."""
        peer.closing = True
        if peer.wire.closing:
            return
        # (A channel's connection is slow for all its channels: it is closed whole.)
        peer.wire.closing = True
        self.stats["closed_slow"] += 1
        self._close_later(peer.ws, CloseCode.TRY_AGAIN_LATER, reason)
        loop = asyncio.get_running_loop()
        if cut:
            loop.call_soon(_abort_if_open, peer.ws)
        else:
            loop.call_later(self.settings.close_timeout_s, _abort_if_open, peer.ws)

    def _write_budget(self) -> int:
        s = self.settings
        if s.max_write_buffer_total_bytes is not None:
            return s.max_write_buffer_total_bytes
        return max(256 * 1024 * 1024, 8 * s.max_update_bytes)

    async def _watch_backlogs(self) -> None:
        """Apply the backlog rule to everyone, and the relay-wide budget, every second.

        Over ``max_write_buffer_total_bytes`` in all, the largest backlogs are closed
        first (1013) until the rest fits: many silent readers together cannot take the
        relay's memory either (DESIGN: bounded work).
        """
        while True:
            await asyncio.sleep(BACKLOG_CHECK_S)
            if self.store is not None and self.store.abandoned:
                # (a full disk: staged chunks that could not be deleted when their
                # staging failed; a few rows per transaction)
                await asyncio.to_thread(self.store.drop_abandoned)
            self._checkpoint()
            self._check_budget()
            self._forget_full_buckets()

    def _forget_full_buckets(self) -> None:
        """Drop the channels' own buckets that are full again (a new one acts the same):
        an idle channel holds none (each channel's limits are unchanged)."""
        now = time.monotonic()
        for mux in self._muxes:
            for peer in mux.channels.values():
                peer.forget_full_buckets(now)

    def _check_budget(self) -> None:
        """The backlog rule for everyone, then the relay-wide budget (see above)."""
        self._sent_since_check = 0
        peers = [p for room in self.rooms.values() for p in room.peers]
        self._check_backlog(peers)
        budget = self._write_budget()
        # Memory held for peers: transport buffers, and each large frame waiting in
        # outboxes once (several peers' outboxes share it).
        waiting = {id(f): len(f) for p in peers if p.outbox for f in p.outbox}
        wires = {p.wire for p in peers if not p.closing and p.ws.transport is not None}
        total = sum(waiting.values()) + sum(
            w.ws.transport.get_write_buffer_size() for w in wires if w.ws.transport is not None
        )
        if total <= budget:
            return
        sized = [
            (p.backlog(), id(p), p) for p in peers if not p.closing and p.ws.transport is not None
        ]
        for size, _, p in sorted(sized, reverse=True):
            if total <= budget or size == 0:
                break
            self._close_slow(
                p, "relay write budget exhausted: reader too slow; reconnect", cut=True
            )
            total -= size

    # -- persist, then fan out ----------------------------------------------------------

    def _submit(self, item: _Pending) -> None:
        mux = item.peer.mux
        if mux is not None and mux.region is not None:
            mux.unsettled += 1
            mux.settled.clear()
        self._batch.append(item)
        if len(self._batch) >= 4096:
            self._flush()  # bound the batch: a flood cannot grow it without limit
        elif self._flush_handle is None:
            # Everything received in this event-loop turn is committed together.
            self._flush_handle = asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        batch, self._batch = self._batch, []
        if batch and self.backend is not None:
            self._queue_shared(batch)
            return
        if not batch or self.store is None:
            return
        if self._staging:
            # A document whose earlier updates are still being staged waits for them:
            # its items are judged after that commit, against the ledger it leaves.
            later = [item for item in batch if item.peer.document in self._staging]
            if later:
                for item in later:
                    self._deferred.setdefault(item.peer.document, []).append(item)
                batch = [item for item in batch if item.peer.document not in self._staging]
        ledgers: dict[str, Ledger] = {}
        try:
            if self.settings.integrity:
                self._judge(batch, ledgers)  # the quota too: a refusal must not touch a ledger
            else:
                self._apply_quota(batch)
        except StoreError as exc:
            self._commit_failed(batch, ledgers, exc)
            return
        big = set()
        if not self._stopping:
            big = {
                item.peer.document
                for item in batch
                if item.update is not None and len(item.update) >= STAGE_UPDATE_BYTES
            }
        if big:
            staged = [item for item in batch if item.peer.document in big]
            batch = [item for item in batch if item.peer.document not in big]
            staged_ledgers = {d: ledgers.pop(d) for d in big if d in ledgers}
            self._staging_ledgers.update(staged_ledgers)
            task = asyncio.get_running_loop().create_task(
                self._stage_and_commit(staged, staged_ledgers)
            )
            for name in big:
                self._staging[name] = task
        self._commit(batch, ledgers)

    def _commit(self, batch: list[_Pending], ledgers: dict[str, Ledger]) -> None:
        """Append one turn's judged updates in one commit, then fan out and acknowledge."""
        assert self.store is not None
        if not batch:
            return
        stored = [item for item in batch if item.update is not None]
        written = [item for item in stored if item.update]
        rows: list[tuple[str, bytes | Staged]] = [
            (item.peer.document, item.update) for item in written if item.update
        ]
        try:
            started = time.perf_counter()
            positions = self.store.append_many(rows, ledgers, origins=_origins(written))
            self.metrics.commit_seconds.observe(time.perf_counter() - started)
        except StoreError as exc:
            self._commit_failed(batch, ledgers, exc)
            return
        self._committed(batch, stored, ledgers)
        self._note_own_writes([item for item in stored if item.update], positions)

    async def _stage_and_commit(self, batch: list[_Pending], ledgers: dict[str, Ledger]) -> None:
        """Commit a turn's updates of documents that received a large one: each large
        update is written in chunks from a thread first (sqlite3 releases the GIL while
        it writes, and each chunk is its own short transaction), then everything is
        appended in one small commit. Other documents' turns commit meanwhile; the
        same documents' later turns, and claims of their ids, wait (in order)."""
        assert self.store is not None
        store = self.store
        names = {item.peer.document for item in batch}
        staged: dict[int, Staged] = {}
        try:
            try:
                for i, item in enumerate(batch):
                    if item.update is not None and len(item.update) >= STAGE_UPDATE_BYTES:
                        staged[i] = await asyncio.to_thread(store.stage, item.update)
                rows = [
                    (item.peer.document, staged.get(i, item.update))
                    for i, item in enumerate(batch)
                    if item.update
                ]
                started = time.perf_counter()
                store.append_many(
                    rows, ledgers, origins=_origins([item for item in batch if item.update])
                )
                self.metrics.commit_seconds.observe(time.perf_counter() - started)
            except StoreError as exc:
                self._commit_failed(batch, ledgers, exc)
                store.abandoned.update(s.gen for s in staged.values())
                # (Deleting writes too: from a thread, as the staging did.)
                await asyncio.to_thread(store.drop_abandoned)
                return
            self._committed(batch, [item for item in batch if item.update is not None], ledgers)
        finally:
            for name in names:
                self._staging.pop(name, None)
                self._staging_ledgers.pop(name, None)
            for name in names:
                for peer, fresh in self._claims_waiting.pop(name, []):
                    if peer.closing or peer.gone:
                        continue
                    try:
                        self._record_claims(peer, fresh)
                    except StoreError as exc:
                        reason = close_reason(f"store unavailable: {exc}")
                        self._close_peer(peer, exc.close_code, reason)
            deferred = [item for name in names for item in self._deferred.pop(name, [])]
            if deferred:
                # Before anything of theirs submitted since (each document's own order
                # is what matters: a connection writes to one document).
                self._batch[:0] = deferred
                self._flush()

    def _commit_failed(
        self, batch: list[_Pending], ledgers: dict[str, Ledger], exc: StoreError
    ) -> None:
        """Nothing was stored, so nothing is broadcast or acknowledged; the senders are
        closed and resend on reconnect (their replicas still hold the edits)."""
        self.stats["store_errors"] += 1
        # The ledgers judged this turn ran ahead of the store: read them again.
        for name in ledgers:
            self._ledgers.pop(name, None)
            self._positions.pop(name, None)
        log.error("store append failed: %s", exc)
        self._settle_links(batch, failed=True)
        failed = {item.peer for item in batch}
        for peer in failed:
            # What it sent after this is not stored either (it would leave a hole in its
            # clocks): its replica sends it all again on reconnect.
            peer.closing = True
            self._close_peer(peer, exc.close_code, close_reason(f"store unavailable: {exc}"))
        if self._queue:
            self._settle_links([item for item in self._queue if item.peer in failed], failed=True)
            self._queue = [item for item in self._queue if item.peer not in failed]

    @staticmethod
    def _settle_links(items: Iterable[_Pending], *, failed: bool = False) -> None:
        """Links' updates stored (or failed): a checkpoint waiting for them may go on."""
        for item in items:
            mux = item.peer.mux
            if mux is None or mux.region is None:
                continue
            mux.unsettled -= 1
            mux.link_failed |= failed
            if mux.unsettled <= 0:
                mux.unsettled = 0
                mux.settled.set()

    def _committed(
        self, batch: list[_Pending], stored: list[_Pending], ledgers: dict[str, Ledger]
    ) -> None:
        """After a commit: fan out, acknowledge and refuse, in the order received."""
        self._changed.set()
        self._settle_links(batch)
        for link in self._links:
            link.wake()
        self.stats["updates_stored"] += len(stored)
        self.stats["commits"] += 1
        by_room: dict[str, list[_Pending]] = {}
        for item in stored:
            by_room.setdefault(item.peer.document, []).append(item)
        for name, items in by_room.items():
            for item in items:
                item.peer.updates_stored += 1
            room = self.rooms.get(name)
            if room is not None:
                room.appended += len(items)
                room.stored_bytes += sum(len(item.update or b"") for item in items)
                self._fan_out(room, items)
        for item in batch:
            session = item.peer.session
            if item.refusal is not None:
                session.refuse(item.key, item.refusal, unproven=item.unproven)
            elif item.key is not None:
                session.acknowledge(item.key)
                self.stats["acknowledgements"] += 1
            else:
                continue
            for frame in session.data_to_send():
                item.peer.push(frame)
        for name in by_room:
            room = self.rooms.get(name)
            if room is None:
                continue
            self._check_backlog(room.peers)
            if room.appended >= self.settings.compact_after_updates:
                self._schedule_compaction(room)

    def _note_own_writes(self, items: list[_Pending], positions: Sequence[int]) -> None:
        """Remember, per multiplexed connection, the documents of its kept folders it just
        wrote and where: the announcement of that change is not sent back to it (it holds
        what it wrote; announced, it would sync the document once more for nothing)."""
        if not positions or not self._folders:
            return  # (no folder kept anywhere: nothing to leave out; a commit's hot path)
        before = positions[0] - 1  # (a commit's positions are consecutive)
        muxes = {item.peer.mux for item in items}
        if len(muxes) == 1 and (only := muxes.pop()) is not None:
            # A commit of one connection's writes alone: it extends that connection's
            # run if nobody else's commit came since its last one.
            if only.own_until != before:
                only.own_from = before
            only.own_until = positions[-1]
            before = only.own_from
        writers: dict[str, set[int]] = {}
        last: dict[str, tuple[_Pending, int]] = {}
        for item, position in zip(items, positions, strict=True):
            writers.setdefault(item.peer.document, set()).add(id(item.peer))
            last[item.peer.document] = (item, position)
        for name, (item, position) in last.items():
            mux = item.peer.mux
            if mux is None or not mux.folders or len(writers[name]) > 1:
                continue  # (written by another connection in this commit too: announced)
            if any(in_folder(name, f.prefix) for f in mux.folders.values()):
                if len(mux.wrote) >= MAX_OWN_WRITES_NOTED:
                    mux.wrote.clear()  # (announced back then: costs a sync, loses nothing)
                mux.wrote[name] = (position, before)

    def _apply_quota(self, batch: list[_Pending]) -> None:
        """The quota without integrity ledgers: :meth:`_over_quota` for each update."""
        growth: dict[str, int] = {}
        for item in batch:
            if item.update is not None and item.info is not None:
                self._over_quota(item, growth, None)

    def _over_quota(self, item: _Pending, growth: dict[str, int], ledger: Ledger | None) -> bool:
        """Refuse ``item`` if it would take its document past ``max_document_bytes``.

        ``growth`` holds what this turn adds per document so far (updated for an item
        that fits). Deletions of content the document holds are always accepted (they
        are how it gets smaller again, once compaction folds them in); deletions naming
        clients it does not hold count like content (they are stored as they are).
        """
        assert item.update is not None
        assert item.info is not None
        room = self.rooms.get(item.peer.document)
        if room is None:
            return False
        info = item.info
        if not info.state and (
            all(c in ledger.ranges for c in info.deletes)
            if ledger is not None
            else len(item.update) <= 64 * 1024
        ):
            return False
        quota = self.settings.max_document_bytes
        size = room.stored_bytes + growth.get(room.name, 0) + len(item.update)
        if size <= quota:
            growth[room.name] = size - room.stored_bytes
            return False
        item.update = None
        item.refusal = (
            f"document over its quota of {quota} bytes stored: new content refused "
            "(deletions are accepted)"
        )
        self.stats["updates_refused"] += 1
        self.metrics.refusals["quota"] += 1
        self._strike(item.peer, "document over its size quota")
        return True

    def _judge(
        self,
        batch: list[_Pending],
        ledgers: dict[str, Ledger],
        loaded: dict[str, list[bytes]] | None = None,
        conditions: dict[str, dict[int, tuple[bytes | None, str | None]]] | None = None,
        positional: set[str] | None = None,
    ) -> None:
        """Apply the integrity rule to one turn's updates, in order (crdtsync.integrity).

        Each update is cut down to what may be stored; what was refused is kept in
        ``item.refusal``. ``ledgers`` collects the documents' ledgers, whose changes
        the append writes in the same commit. With ``conditions`` (a shared store), it
        collects per document the ledger entries its judgement read, for an append
        conditional on them; None for a document judged on more (claims, the slow
        path), whose append is conditional on its position.

        Raises:
            StoreError: a ledger or a document could not be read.
        """
        loaded = {} if loaded is None else dict(loaded)  # (documents read for the slow path)
        accepted: dict[str, tuple[int, list[bytes]]] = {}  # this turn's so far, per document
        last_name, ledger = "", None
        growth: dict[str, int] = {}  # bytes this turn adds per document (the quota)
        quota = self.settings.max_document_bytes
        for i, item in enumerate(batch):
            info = item.info
            if item.claim is not None:
                name = item.peer.document
                claimed = ledgers.get(name)
                if claimed is None:
                    claimed = ledgers[name] = self._ledger(name)
                if conditions is not None:
                    # A claim reads (and writes) only the claimed ids' entries.
                    read = conditions.setdefault(name, {})
                    read.update(claimed.as_read(c for c in item.claim if c not in read))
                claimed.claim(item.claim, item.writer or _ANONYMOUS)
                continue
            if item.update is None or info is None:
                continue
            name = item.peer.document
            if name != last_name or ledger is None:
                ledger = ledgers.get(name)
                if ledger is None:
                    ledger = ledgers[name] = self._ledger(name)
                last_name = name
            # (A region's link writes content judged where it was written: its content
            # is checked here, not its ownership of client ids: crdtsync.integrity.Shipped.)
            writer = item.writer or (_SHIPPED if item.peer.origin is not None else _ANONYMOUS)
            room = self.rooms.get(name)
            backup = None
            if room is not None and (
                room.stored_bytes + growth.get(name, 0) + len(item.update) > quota
            ):
                # Near the quota: what the judgement records must be undone if what it
                # accepts does not fit (a refused update never reaches the ledger).
                backup = copy.deepcopy(ledger)
            if conditions is not None:
                # The judgement reads these clients' entries, their claims (which change
                # with their ranges) and their stored clocks (which exist once their
                # ranges say so): an append conditional on the entries holds it all.
                read = conditions.setdefault(name, {})
                read.update(ledger.as_read(c for c in info.starts if c not in read))
                if info.parents and positional is not None:
                    # Parents are judged on their clients' entries too, and on the
                    # types, which only an append of content adds: the position as well
                    # (a claim of ids moves no position: their entries catch it).
                    parents = {p[2] for p in info.parents}
                    read.update(ledger.as_read(c for c in parents if c not in read))
                    positional.add(name)
            if not info.parents and not info.holes and ledger.append_only(info, writer):
                pass  # the fast path: appended after what is stored, as it is
            else:
                self._judge_one(item, ledger, writer, batch, i, loaded, accepted)
            if item.update is None:
                continue
            if backup is None:
                growth[name] = growth.get(name, 0) + len(item.update)  # it fits
            elif self._over_quota(item, growth, ledger):
                ledgers[name] = ledger = backup
                if name in self._ledgers:
                    self._ledgers[name] = backup

    def _judge_one(
        self,
        item: _Pending,
        ledger: Ledger,
        writer: Writer | None,
        batch: list[_Pending],
        i: int,
        loaded: dict[str, list[bytes]],
        accepted: dict[str, tuple[int, list[bytes]]],
    ) -> None:
        """The full judgement of one update of the turn (the slow path of :meth:`_judge`)."""
        assert item.update is not None
        assert item.info is not None
        name = item.peer.document

        def stored(name: str = name, upto: int = i) -> list[bytes]:
            # The slow path: the update repeats stored clocks (a reconnecting stock
            # client, a catch-up, a duplicate) or names a parent not known as a type.
            # The stored document, and what this turn accepted before this update.
            if name not in loaded:
                if self.store is None:
                    raise _NeedsContent(name)  # a shared store is read before judging
                loaded[name] = self.store.load(name).all_updates()
            # Extended from where the last slow path of this document stopped: a turn
            # full of repeats costs one pass over the batch, not one per update.
            start, earlier = accepted.get(name, (0, []))
            earlier.extend(
                it.update
                for it in batch[start:upto]
                if it.peer.document == name and it.update is not None and it.info
            )
            accepted[name] = (upto, earlier)
            return loaded[name] + earlier

        verdict = ledger.judge(item.update, item.info, writer, stored, item.comparison)
        item.update = verdict.update
        if verdict.refusals:
            item.refusal = "; ".join(r.reason for r in verdict.refusals)[:1000]
            item.unproven = any(r.unproven for r in verdict.refusals)
            self.stats["updates_refused"] += 1
            item.peer.updates_refused += 1
            self.metrics.refusals["integrity"] += 1
            log.warning("refused content: %s", item.refusal, extra=item.peer.context())

    async def _compare(
        self, peer: Peer, update: bytes, lookup: Lookup
    ) -> tuple[Comparison | None, float]:
        """Compare an update's repeats with the store in the work process; and how long
        it took (charged to the sender: its share of the work process is bounded).

        Reading and walking a document costs in proportion to its size, in Python: on
        the loop, a stock client resending a large document stalled every room.
        """
        assert self.store is not None
        # What this turn holds is committed first: the comparison then reads a store
        # that matches the ledger (otherwise it is redone at the flush, on the loop).
        self._flush()
        staging = self._staging.get(peer.document)
        if staging is not None:
            with contextlib.suppress(Exception):  # (it reports its own failures)
                await asyncio.shield(staging)
        # One comparison in the work process at a time, relay-wide: reads, answers and
        # checks for everyone else queue behind at most one (each connection's own
        # share is paced: work_share).
        async with self._comparing:
            started = time.monotonic()
            self.stats["comparisons_in_worker"] += 1
            try:
                comparison = await self._off_loop(
                    compare_file, self.store.path, peer.document, update, lookup
                )
            except StoreError as exc:
                log.error("store error comparing an update: %s", exc, extra=peer.context())
                comparison = None  # judged on the loop at the flush, which reports it
            return comparison, time.monotonic() - started

    def _record_claims(self, peer: Peer, clients: tuple[int, ...]) -> None:
        """Own fresh claimed ids from now on, before their first write (crdtsync.integrity).

        Only ids with no content anywhere: a claimed id with content may be refilled by
        other replicas (an emptied store) before its owner's own catch-up lands.

        Raises:
            StoreError: the ledger could not be read or written (the connection gets 1013).
        """
        assert self.store is not None
        name = peer.document
        # A ledger read only for this claim is not kept: written back at once, it is what
        # the store holds, and a document its replica only reads never needs it again
        # (the first update judged reads it again). An idle open document holds none.
        cached = name in self._ledgers
        # (What the connection sent before its claim keeps the writer it had then: the
        # updates of this turn are judged at the flush with what each was submitted with.)
        ledger = self._ledger(name)
        ledger.claim(clients, peer.writer)
        if ledger.dirty:
            try:
                self.store.append_many([], {name: ledger})
            except StoreError:
                self._ledgers.pop(name, None)
                raise
        if not cached and name not in self._staging_ledgers:
            self._ledgers.pop(name, None)

    def _ledger(self, name: str) -> Ledger:
        ledger = self._ledgers.get(name)
        if ledger is None and name in self._staging_ledgers:
            ledger = self._staging_ledgers[name]
            if name in self.rooms:
                self._ledgers[name] = ledger
        if ledger is None:
            assert self.store is not None
            ledger = self.store.load_ledger(name)
            ledger.max_clients = self.settings.max_document_clients
            if name in self.rooms:  # cached only while a room holds the document
                self._ledgers[name] = ledger
        return ledger

    def _fan_out(self, room: Room, items: list[_Pending]) -> None:
        """Send one turn's stored updates of a room: merged frames per peer, not one per update.

        Stock clients get every update, their own included, as the reference server does.
        Extension peers get acknowledgements instead of their own updates echoed back.
        """
        frames = self._frames([item.update for item in items if item.update is not None])
        ext_senders = {item.peer for item in items if item.peer.session.extensions}
        live = [
            p for p in room.peers if p not in ext_senders and not p.closing and p.origin is None
        ]
        for frame in frames:
            if isinstance(frame, bytes) and len(frame) < LARGE_FRAME_BYTES:
                # (Split first: a frame to an ASGI connection starts its outbox.)
                queued = [p for p in live if p.held is not None or p.outbox is not None]
                _broadcast([p for p in live if p.held is None and p.outbox is None], frame)
                for p in queued:
                    p.send_update_frame(frame)
            else:
                for p in live:
                    p.send_update_frame(frame)
        self._count_sent(sum(map(len, frames)) * len(live))
        self.stats["frames_fanned_out"] += len(frames) * len(live)
        for sender in ext_senders:
            if sender not in room.peers or sender.closing or sender.origin is not None:
                continue
            others = [
                item.update for item in items if item.peer is not sender and item.update is not None
            ]
            for frame in self._frames(others):
                sender.send_update_frame(frame)

    def _frames(self, updates: list[bytes]) -> list[Frame]:
        """Update frames for ``updates``, in order: runs of small ones merged into one.

        A merge costs the loop time in proportion to what it merges, so runs stop at
        ``answer_piece_bytes`` and a large update goes out as it came (never copied
        into a frame of its own: :class:`LargeFrame`).
        """
        return [
            LargeFrame.update(run) if len(run) >= LARGE_FRAME_BYTES else SyncUpdate(run).encode()
            for run in self._runs(updates)
        ]

    def _runs(self, updates: list[bytes]) -> list[bytes]:
        """``updates`` merged in runs of up to ``answer_piece_bytes``, in order; an update
        larger than that stays as it came (never copied)."""
        runs: list[bytes] = []
        run: list[bytes] = []
        size = 0
        limit = self.settings.answer_piece_bytes
        for update in updates:
            if run and size + len(update) > limit:
                runs.append(run[0] if len(run) == 1 else merge_in_batches(run))
                run, size = [], 0
            run.append(update)
            size += len(update)
        if run:
            runs.append(run[0] if len(run) == 1 else merge_in_batches(run))
        return runs

    def _close_later(self, ws: Socket, code: int, reason: str) -> None:
        """Close a connection from synchronous code; the task is kept until it finishes."""
        task = asyncio.get_running_loop().create_task(ws.close(code, reason))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # -- a shared store (Redis): many relay processes ----------------------------------

    async def _open_shared_store(self) -> None:
        """Open the Redis store, check its settings and start following it.

        Raises:
            StoreError: Redis cannot be reached, or its settings would lose the log.
        """
        from .redis_store import RedisStore

        s = self.settings
        assert isinstance(s.store, str)
        address = s.store
        if s.redis_wait_replicas:
            joiner = "&" if "?" in address else "?"
            address = f"{address}{joiner}wait_replicas={s.redis_wait_replicas}"
        backend = RedisStore(address, cpu=_CompactionPool(self))
        try:
            await self._check_shared_store(backend)
        except StoreUnreachable as exc:
            # Serve anyway (readers keep their connections, /readyz says 503, writers
            # get 1013) and look again with backoff: Redis may be restarting.
            log.error("store unreachable at start, retrying: %s", exc)
            self._store_refused = "store unreachable since the start"
            task = asyncio.get_running_loop().create_task(self._await_shared_store(backend))
            self._background.add(task)
            task.add_done_callback(self._background.discard)
        except BaseException:
            await backend.close()
            raise
        self.backend = backend
        self._follower = backend.follow()
        self._presence = backend.presence()
        loop = asyncio.get_running_loop()
        self._following = loop.create_task(self._follow())
        self._hearing = loop.create_task(self._hear_presence())

    async def _check_shared_store(self, backend: RedisStore) -> None:
        """Read Redis's settings (refusing an evicting Redis) and the store's identity.

        Raises:
            StoreError: a setting would lose the log; StoreUnreachable: no Redis yet.
        """
        meaning = await backend.check_settings()
        identity = await backend.identity()
        log.info(
            "store: %s (store id %s, epoch %d)",
            meaning,
            identity.id,
            identity.epoch,
            extra={"event": "store"},
        )

    async def _await_shared_store(self, backend: RedisStore) -> None:
        delays = Backoff(*FOLLOW_BACKOFF_S)
        while not self._stopping:
            await asyncio.sleep(delays.next_delay())
            try:
                await self._check_shared_store(backend)
            except StoreUnreachable:
                continue
            except StoreError as exc:
                log.critical("store refused: %s", exc)
                self._store_refused = f"store refused: {exc}"
                return
            self._store_refused = ""
            return

    def _shared_trouble(self) -> str:
        """Why this process cannot serve a shared store as it should now ("" if it can)."""
        if not self._shared:
            return ""
        if self._store_refused:
            return self._store_refused
        if self._following is None or self._following.done():
            return "store follower not running"
        if self._hearing is None or self._hearing.done():
            return "presence reader not running"
        if self._follow_failures:
            return f"store unreachable: {self._follow_failures} reads failed in a row"
        if self._store_failing:
            return "store failing: the last append failed"
        if self._presence_failures:
            return f"presence unreachable: {self._presence_failures} reads failed in a row"
        return ""

    async def _follow(self) -> None:
        """Deliver what other relay processes append to the documents of this process's
        rooms, for as long as the relay runs: a failed read is retried with backoff, a
        follower that breaks is replaced (yhub#62), and one document's bad entry never
        stops the others (yhub#61: the follower skips it)."""
        delays = Backoff(*FOLLOW_BACKOFF_S)
        while not self._stopping:
            follower = self._follower
            assert follower is not None
            try:
                found = await follower.read(FOLLOW_READ_S)
            except asyncio.CancelledError:
                raise
            except StoreError as exc:
                self._follow_failures += 1
                if self._follow_failures == 1:
                    log.error("store follower: %s", exc)
                await asyncio.sleep(delays.next_delay())
                continue
            except Exception:
                self._follow_failures += 1
                log.exception("store follower broke; starting a new one")
                await self._replace_follower()
                await asyncio.sleep(delays.next_delay())
                continue
            if self._follow_failures:
                log.info("store follower reads again after %d failures", self._follow_failures)
            self._follow_failures = 0
            self._store_failing = False
            delays.reset()
            try:
                self._on_followed(found)
            except Exception:
                log.exception("bug delivering followed entries; resyncing those rooms")
                for name in {item.document for item in found}:
                    self._resync_soon(name)

    async def _replace_follower(self) -> None:
        """A new follower for every room (each resyncs: the old one's positions are gone)."""
        assert self.backend is not None
        old, self._follower = self._follower, self.backend.follow()
        if old is not None:
            with contextlib.suppress(Exception):
                await old.close()
        for name, room in self.rooms.items():
            room.following = False
            self._resync_soon(name)

    def _say_presence(self, name: str, payload: bytes) -> None:
        """Tell the other relay processes (in order, batched: one task publishes)."""
        self._presence_out.append((name, payload))
        if self._saying is None:
            self._saying = asyncio.get_running_loop().create_task(self._publish_presence())

    async def _publish_presence(self) -> None:
        try:
            while self._presence_out and self._presence is not None:
                batch = list(self._presence_out)
                self._presence_out.clear()
                try:
                    await self._presence.publish(batch)
                except StoreError as exc:
                    # Lost, as presence is when a connection drops: it is renewed.
                    log.warning("presence not published: %s", exc)
                    await asyncio.sleep(FOLLOW_BACKOFF_S[0])
        finally:
            self._saying = None

    async def _hear_presence(self) -> None:
        """Relay what other processes' peers say to this process's peers, for as long as
        the relay runs (restarted with backoff when Redis fails)."""
        delays = Backoff(*FOLLOW_BACKOFF_S)
        while not self._stopping:
            presence = self._presence
            assert presence is not None
            try:
                heard = await presence.read(FOLLOW_READ_S)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._presence_failures += 1
                if self._presence_failures == 1:
                    log.error("presence reader: %s", exc)
                await asyncio.sleep(delays.next_delay())
                continue
            self._presence_failures = 0
            delays.reset()
            now = time.monotonic()
            for name, payload in heard:
                try:
                    self._on_remote_presence(name, payload, now)
                except Exception:
                    log.exception("bug relaying presence", extra={"document": name})
            self._expire_remote_presence(now)

    def _on_remote_presence(self, name: str, payload: bytes, now: float) -> None:
        """Presence from another process's peers: kept and relayed under the room's caps
        (each process's view of the room holds to them; per-connection caps were applied
        by the sender's process)."""
        room = self.rooms.get(name)
        if room is None:
            return
        if not payload:
            # Another process's room just opened: tell it this one's peers' states.
            remote = room.remote_presence or {}
            local = [e for e in room.presence_entries() if e.client_id not in remote]
            if local:
                self._say_presence(name, encode_awareness(local))
            return
        s = self.settings
        try:
            entries = decode_awareness(payload, max_state_bytes=s.max_presence_state_bytes)
        except MalformedMessage as exc:
            log.warning("malformed presence from another relay: %s", exc, extra={"document": name})
            return
        accepted: list[AwarenessEntry] = []
        for entry in entries:
            cid = entry.client_id
            current = room.presence_of(cid)
            if current is not None and current.clock > entry.clock:
                continue
            if entry.removed:
                self._forget_presence(room, cid)
                if room.remote_presence is not None:
                    room.remote_presence.pop(cid, None)
                accepted.append(entry)
                continue
            old_size = current.size if current is not None else 0
            if current is None and room.presence_count() >= s.max_presence_states_per_room:
                continue
            if room.awareness_bytes - old_size + entry.size > s.max_presence_bytes_per_room:
                continue
            room.set_presence(entry)
            room.awareness_bytes += entry.size - old_size
            if room.remote_presence is None:
                room.remote_presence = {}
            room.remote_presence[cid] = now
            accepted.append(entry)
        if accepted and room.peers:
            self._deliver(_local(room.peers), _awareness_frame(encode_awareness(accepted)))

    def _expire_remote_presence(self, now: float) -> None:
        for room in self.rooms.values():
            remote = room.remote_presence
            if not remote:
                continue
            old = [cid for cid, seen in remote.items() if now - seen > REMOTE_PRESENCE_TIMEOUT_S]
            gone = []
            for cid in old:
                del remote[cid]
                entry = room.presence_of(cid)
                if entry is not None:
                    self._forget_presence(room, cid)
                    gone.append(AwarenessEntry(cid, entry.clock + 1, None))
            if not remote:
                room.remote_presence = None
            if gone and room.peers:
                self._deliver(_local(room.peers), _awareness_frame(encode_awareness(gone)))

    def _on_followed(self, found: list[Entry | Gap]) -> None:
        """Entries and gaps the follower read: other processes' updates go to the room's
        peers (this process's own were fanned out at their append), in order."""
        fresh: dict[str, list[bytes]] = {}
        for item in found:
            name = item.document
            room = self.rooms.get(name)
            if room is None:
                continue
            if isinstance(item, Gap):
                fresh.pop(name, None)
                room.following = False  # (the follower dropped it)
                self._resync_soon(name)
            elif name in self._resyncing:
                # After the whole document the resync sends, in order.
                self._resync_entries.setdefault(name, []).append(item)
            elif name in self._in_flight:
                self._entries_waiting.setdefault(name, []).append(item)
            elif self._foreign(item):
                fresh.setdefault(name, []).append(item.update)
        for name, updates in fresh.items():
            self._deliver_foreign(name, updates)

    def _foreign(self, entry: Entry) -> bool:
        """Whether a followed entry was appended by another process (this one's own are
        skipped: their positions came back from their append, in order)."""
        name = entry.document
        own = self._own.get(name)
        while own and own[0] < entry.position:
            own.popleft()
        if own and own[0] == entry.position:
            own.popleft()
            return False
        if entry.position > self._positions.get(name, entry.position):
            # The cached ledger misses what that entry recorded: an append judged on
            # more than its own clients' entries reads it again first.
            self._positions[name] = STALE
        return True

    def _deliver_foreign(self, name: str, updates: list[bytes], *, count: bool = True) -> None:
        room = self.rooms.get(name)
        if room is None or not updates:
            return
        if count:
            room.appended += len(updates)
            room.stored_bytes += sum(map(len, updates))
        frames = self._frames(updates)
        live = [p for p in room.peers if not p.closing and p.origin is None]
        for frame in frames:
            for p in live:
                p.send_update_frame(frame)
        self._count_sent(sum(map(len, frames)) * len(live))
        self.stats["frames_fanned_out"] += len(frames) * len(live)
        self._check_backlog(room.peers)

    def _resync_soon(self, name: str) -> None:
        """The follower lost track of ``name`` (compacted past it, the store emptied or
        restored): read it again, follow it from there, and send every peer the whole
        document (what they hold already costs them nothing)."""
        if name not in self.rooms:
            return
        if name in self._resyncing:
            self._resync_again.add(name)  # the one under way reads again when it is done
            return
        self._resyncing.add(name)
        task = asyncio.get_running_loop().create_task(self._resync(name))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _resync(self, name: str) -> None:
        delays = Backoff(*FOLLOW_BACKOFF_S)
        try:
            while not self._stopping:
                room = self.rooms.get(name)
                if room is None:
                    return
                self._resync_again.discard(name)
                if room.following and self._follower is not None:
                    self._follower.remove(name)
                room.following = False
                self._own.pop(name, None)
                self._ledgers.pop(name, None)
                self._positions.pop(name, None)
                self._resync_entries.pop(name, None)  # (the read covers them)
                try:
                    read = await self._fresh_read(room)
                except StoreError as exc:
                    log.error("store error resyncing a room: %s", exc, extra={"document": name})
                    await asyncio.sleep(delays.next_delay())
                    continue
                if name in self._resync_again:
                    continue  # lost track again while reading: read again
                if read.merged is not None and self.rooms.get(name) is room:
                    self._resyncing.discard(name)  # what comes next is live again
                    # (Not counted as appended: the read measured the document.)
                    self._deliver_foreign(name, [read.merged], count=False)
                    for peer in room.peers:
                        if peer.closing or not peer.engaged:
                            continue
                        # The store may lack what the peers hold (it was emptied, or
                        # restored from a backup): their answers refill it.
                        peer.session.send_step1(read.state)
                        for frame in peer.session.data_to_send():
                            peer.push(frame)
                    # What the follower read meanwhile (from the position the read
                    # started at: some of it the read held already, which is harmless).
                    waiting = self._resync_entries.pop(name, [])
                    if waiting:
                        self._on_followed(list(waiting))
                return
        finally:
            self._resyncing.discard(name)
            self._resync_again.discard(name)
            self._resync_entries.pop(name, None)

    async def _read_shared(self, name: str) -> Read:
        """Read a document from the shared store, after its room follows the store from a
        position read first: whatever is appended after the read reaches the room."""
        backend = self.backend
        assert backend is not None
        self.stats["document_reads"] += 1
        room = self.rooms.get(name)
        if room is not None and not room.following and self._follower is not None:
            position = await backend.position(name)
            if self.rooms.get(name) is room and not room.following:
                self._follower.add(name, position)
                room.following = True
        stored = await backend.load(name)
        updates = stored.all_updates()
        size = sum(map(len, updates))
        if len(updates) <= READ_INLINE_UPDATES and size <= READ_INLINE_BYTES:
            merged = merge_in_batches(updates)
        else:
            self.stats["document_reads_in_worker"] += 1
            merged = await self._off_loop(merge_in_batches, updates)
        if room is not None:
            room.measured = True
            room.appended = len(stored.updates)
            room.stored_bytes = size
        self._inline_reads += 1
        return Read(
            f"shared:{self._inline_reads}", get_state(merged), len(stored.updates), size, merged
        )

    async def _shared_ledger(self, name: str) -> Ledger:
        """``name``'s ledger from the cache, or read from the shared store (and cached
        while its room is open, with the position it describes)."""
        ledger = self._ledgers.get(name)
        if ledger is not None:
            return ledger
        assert self.backend is not None
        ledger, position = await self.backend.load_ledger(name)
        ledger.max_clients = self.settings.max_document_clients
        cached = self._ledgers.get(name)
        if cached is not None:
            return cached  # read meanwhile, by someone else
        if name in self.rooms:
            self._ledgers[name] = ledger
            self._positions[name] = position
        return ledger

    def _queue_shared(self, batch: list[_Pending]) -> None:
        """Turns wait for the append before them: one append to the shared store at a time
        (what comes meanwhile goes in the next, together), so each document's order, and
        its acknowledgements', is the order received."""
        self._settle_links([item for item in batch if item.peer.closing], failed=True)
        batch = [item for item in batch if not item.peer.closing]
        if len(self._queue) + len(batch) > MAX_QUEUED_ITEMS:
            # The store does not keep up (or hangs): refuse rather than hold without end.
            self._commit_failed(batch, {}, StoreError("the store is not keeping up; try again"))
            return
        for item in batch:
            item.original = item.update
        self._queue.extend(batch)
        if len(self._queue) >= QUEUE_HIGH_ITEMS:
            self._queue_room.clear()
        if self._committer is None:
            self._committer = asyncio.get_running_loop().create_task(self._commit_queue())

    async def _commit_queue(self) -> None:
        try:
            while self._queue:
                batch = self._queue[:MAX_COMMIT_ITEMS]
                del self._queue[:MAX_COMMIT_ITEMS]
                if len(self._queue) <= QUEUE_LOW_ITEMS:
                    self._queue_room.set()
                try:
                    await self._commit_shared(batch)
                except Exception:
                    log.exception("bug committing to the shared store")
                    for name in {item.peer.document for item in batch}:
                        self._ledgers.pop(name, None)  # (judged, maybe not stored)
                        self._positions.pop(name, None)
                    for peer in {item.peer for item in batch}:
                        peer.closing = True
                        self._close_peer(peer, CloseCode.INTERNAL_ERROR, "internal error")
        finally:
            self._committer = None
            self._queue_room.set()

    async def _wait_for_store(self, peer: Peer) -> None:
        """Wait until the shared store's queue has room again.

        Raises:
            StoreError: it did not within ``STORE_WAIT_S`` (the connection gets 1013).
        """
        try:
            async with asyncio.timeout(STORE_WAIT_S):
                await self._queue_room.wait()
        except TimeoutError:
            raise StoreError(f"the store did not keep up for {STORE_WAIT_S:g} s") from None

    async def _commit_shared(self, batch: list[_Pending]) -> None:
        """Judge and append one batch to the shared store, then fan out and acknowledge.

        Each document's append is conditional on what its judgement read: the ledger
        entries of the client ids it judged (:class:`ClientsAsRead`) and, when an update
        names parents, also the position the ledger describes. If another process changed
        that first, the ledger is read again and this batch's updates of the document
        are judged again (the first committed write wins, as on one process)."""
        backend = self.backend
        assert backend is not None
        if self._store_refused:
            self._commit_failed(batch, {}, StoreError(self._store_refused))
            return
        self._settle_links([item for item in batch if item.peer.closing], failed=True)
        batch = [item for item in batch if not item.peer.closing]  # (failed earlier)
        docs = {item.peer.document for item in batch}
        self._in_flight = docs
        needs_content: set[str] = set()
        try:
            attempt = restarts = 0
            while attempt < COMMIT_ATTEMPTS and restarts <= len(docs):
                ledgers: dict[str, Ledger] = {}
                expected: dict[str, int | ClientsAsRead] | None = None
                conditions: dict[str, dict[int, tuple[bytes | None, str | None]]] = {}
                positional: set[str] = set()
                try:
                    if self.settings.integrity:
                        judged = sorted(
                            {
                                it.peer.document
                                for it in batch
                                if it.info is not None or it.claim is not None
                            }
                        )
                        # (Read together: a turn that opens many documents waits one
                        # round trip, not one per document.)
                        got = await asyncio.gather(*map(self._judged_ledger, judged))
                        positions_read = {n: p for n, (_, p) in zip(judged, got, strict=True)}
                        ledgers = {n: lg for n, (lg, _) in zip(judged, got, strict=True)}
                        # The documents whose judgement will need their stored content
                        # (a reconnecting client resends what is stored), read at once.
                        needs_content.update(
                            item.peer.document
                            for item in batch
                            if item.info is not None
                            and item.peer.document not in needs_content
                            and ledgers[item.peer.document].overlaps(item.info)
                        )
                        contents = await asyncio.gather(*map(backend.load, sorted(needs_content)))
                        loaded = {c.name: c.all_updates() for c in contents}
                        await self._compare_ahead(batch, ledgers, loaded)
                        try:
                            self._judge(batch, ledgers, loaded, conditions, positional)
                        except _NeedsContent as exc:
                            # Judged against a store read now, from the start (rare: a
                            # repeat of stored content, a parent not known as a type).
                            needs_content.add(exc.name)
                            self._forget_ledgers(ledgers)
                            _reset(batch)
                            restarts += 1  # (at most once per document: not an attempt)
                            continue
                        # Appended only if what the judgement read still holds: the
                        # clients' entries (and the position, for parents).
                        expected = {
                            name: ClientsAsRead(
                                conditions.get(name, {}),
                                position if name in positional else None,
                            )
                            for name, position in positions_read.items()
                        }
                    else:
                        self._apply_quota(batch)
                    stored = [item for item in batch if item.update is not None]
                    rows, origins = self._shared_rows(stored)
                    started = time.perf_counter()
                    positions = await backend.append(rows, ledgers, expected, origins)
                    self.metrics.commit_seconds.observe(time.perf_counter() - started)
                except PositionConflict as exc:
                    failed = exc.failed if isinstance(exc, DocumentsFailed) else {}
                    moved = set(exc.positions)
                    out = moved | set(failed)
                    done = [item for item in batch if item.peer.document not in out]
                    kept = [item for item in stored if item.peer.document not in out]
                    self._appended(rows, exc.appended, ledgers, out)
                    self._committed(
                        done, kept, {n: lg for n, lg in ledgers.items() if n not in out}
                    )
                    self._forget_ledgers({n: ledgers[n] for n in out if n in ledgers})
                    if failed:
                        # A document that failed on its own fails alone (its writers get
                        # 1013 and resend); the others went on.
                        broken = [item for item in batch if item.peer.document in failed]
                        self._commit_failed(broken, {}, StoreError(next(iter(failed.values()))))
                    batch = [item for item in batch if item.peer.document in moved]
                    if not batch:
                        return
                    _reset(batch)
                    # Another process keeps appending: judge again a little later, at a
                    # random moment (two processes retrying in step would keep colliding).
                    await asyncio.sleep(COMMIT_RETRY_S * (2**attempt) * random.random())
                    attempt += 1
                    continue
                except StoreError as exc:
                    self._store_failing = True
                    self._forget_ledgers(ledgers)
                    self._commit_failed(batch, ledgers, exc)
                    return
                self._store_failing = False
                self._appended(rows, positions, ledgers, set())
                self._committed(batch, stored, ledgers)
                return
            self._commit_failed(
                batch,
                {},
                StoreError(
                    f"other relay processes kept appending to {sorted(docs)[:3]} while this "
                    "one judged its updates; try again"
                ),
            )
        finally:
            self._in_flight = set()
            waiting, self._entries_waiting = self._entries_waiting, {}
            if waiting:
                self._on_followed([e for entries in waiting.values() for e in entries])

    async def _compare_ahead(
        self, batch: list[_Pending], ledgers: dict[str, Ledger], loaded: dict[str, list[bytes]]
    ) -> None:
        """Compare large repeats with the stored content in the work process, as the SQLite
        path does at dispatch (its work process reads the file; here the content read
        for the judgement is sent): walking a resent document costs ~3 us per clock in
        Python, which on the loop stalled every room. Charged to the sender's share."""
        for item in batch:
            info, name = item.info, item.peer.document
            if info is None or item.update is None or item.comparison is not None:
                continue
            if name not in loaded:
                continue
            lookup = ledgers[name].lookup(info)
            repeated = sum(hi - lo for rs in lookup.needed.values() for lo, hi in rs)
            if repeated < OFFLOAD_REPEAT_UNITS and not lookup.parents:
                continue
            async with self._comparing:
                started = time.monotonic()
                self.stats["comparisons_in_worker"] += 1
                try:
                    item.comparison = await self._off_loop(
                        compare_stored, item.update, lookup, loaded[name], ledgers[name].ends()
                    )
                except ConnectionClosedByStop:
                    return  # (judged on the loop: the relay is stopping)
                now = time.monotonic()
                item.peer.budget.work.take(now, now - started)

    async def _judged_ledger(self, name: str) -> tuple[Ledger, int]:
        """A ledger to judge ``name``'s updates with, and the position it describes."""
        ledger = self._ledgers.get(name)
        position = self._positions.get(name)
        if ledger is not None and position is not None:
            return ledger, position  # (STALE: fine for the fast path; else read again)
        assert self.backend is not None
        ledger, position = await self.backend.load_ledger(name)
        ledger.max_clients = self.settings.max_document_clients
        if name in self.rooms:
            self._ledgers[name] = ledger
            self._positions[name] = position
        return ledger, position

    def _forget_ledgers(self, ledgers: dict[str, Ledger]) -> None:
        for name, ledger in ledgers.items():
            if self._ledgers.get(name) is ledger:
                del self._ledgers[name]
                self._positions.pop(name, None)

    def _shared_rows(
        self, stored: list[_Pending]
    ) -> tuple[list[tuple[str, bytes]], list[str | None] | None]:
        """What a turn appends to the shared store, and each row's origin (None: all from
        this region): each document's updates of one origin merged in runs (one stream
        entry per run, not per update: a trace of 260,000 keystrokes cost every relay
        following it 260,000 entries to read and skip or send)."""
        per_doc: dict[tuple[str, str | None], list[bytes]] = {}
        for item in stored:
            if item.update:
                key = (item.peer.document, item.peer.origin)
                per_doc.setdefault(key, []).append(item.update)
        rows = []
        origins: list[str | None] = []
        for (name, origin), updates in per_doc.items():
            for run in self._runs(updates):
                rows.append((name, run))
                origins.append(origin)
        return rows, (origins if any(origins) else None)

    def _appended(
        self,
        rows: list[tuple[str, bytes]],
        positions: list[int],
        ledgers: dict[str, Ledger],
        moved: set[str],
    ) -> None:
        """Note what an append to the shared store returned: this process's own positions
        (the follower skips them) and where each cached ledger now stands."""
        first: dict[str, int] = {}
        last: dict[str, int] = {}
        for (name, _), position in zip(rows, positions, strict=True):
            if position <= 0 or name in moved:
                continue
            first.setdefault(name, position)
            last[name] = position
            room = self.rooms.get(name)
            if room is not None and room.following:
                self._own.setdefault(name, deque()).append(position)
        for name, position in last.items():
            known = self._positions.get(name)
            if known is None or self._ledgers.get(name) is not ledgers.get(name):
                continue
            # Another process appended in between (the append was conditional on some
            # clients' entries only): the ledger describes no position exactly now.
            self._positions[name] = position if first[name] == known + 1 else STALE

    # -- compaction ---------------------------------------------------------------------

    def _schedule_compaction(self, room: Room) -> None:
        name = room.name
        if not self.settings.compaction_workers or self._stopping or name in self._compacting:
            return
        if self._pool is None:
            self._pool = self._new_pool()
        self._compacting.add(name)
        room.appended = 0
        wrapped: asyncio.Future[Any]
        if self.backend is not None:
            # Any process may compact a shared document: the store's lease lets one.
            wrapped = asyncio.get_running_loop().create_task(self._compact_shared(name))
        else:
            future: Future[Any] = self._pool.submit(
                compact_file, str(self.settings.store), name, self.settings.synchronous
            )
            wrapped = asyncio.wrap_future(future)
        self._compactions.add(wrapped)

        def done(f: asyncio.Future[Any]) -> None:
            self._compactions.discard(f)
            self._compacting.discard(name)
            if f.cancelled():
                return
            room = self.rooms.get(name)
            if room is not None and self.store is not None and f.exception() is None:
                with contextlib.suppress(StoreError):
                    room.stored_bytes = self.store.size(name)[1]
            if room is not None and self.backend is not None and f.exception() is None:
                room.stored_bytes = f.result().snapshot_bytes
            exc = f.exception()
            self.stats["compactions" if exc is None else "compactions_failed"] += 1
            if isinstance(exc, BrokenProcessPool):
                # The worker died (e.g. pycrdt crashed on hostile content): the relay and
                # the store are fine; start a fresh worker for the next compaction.
                log.error(
                    "compaction worker died while compacting; restarting it",
                    extra={"document": name},
                )
                self._restart_pool()
            elif exc is not None:
                log.error("compaction failed: %s", exc, extra={"document": name})

        wrapped.add_done_callback(done)

    async def _compact_shared(self, name: str) -> CompactionResult:
        """Compact a document of the shared store; once its room is closed, look again
        after the store's minimum age, when the entries it folded may be trimmed."""
        backend = self.backend
        assert backend is not None
        result = await backend.compact(name)
        min_age = getattr(backend, "min_age_s", 0.0)
        if not self._stopping and name not in self.rooms:
            handle = asyncio.get_running_loop().call_later(min_age + 1.0, self._trim_closed, name)
            self._trims[name] = handle
        return result

    def _trim_closed(self, name: str) -> None:
        self._trims.pop(name, None)
        if self._stopping or name in self.rooms or self.backend is None:
            return  # an open room is compacted again when its tail grows or it closes
        task = asyncio.get_running_loop().create_task(self.backend.compact(name))
        self._background.add(task)

        def done(t: asyncio.Task[CompactionResult]) -> None:
            self._background.discard(t)
            if not t.cancelled() and t.exception() is not None:
                log.warning("trimming a closed document failed: %s", t.exception())

        task.add_done_callback(done)

    def _new_pool(self) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(
            self.settings.compaction_workers,
            mp_context=get_context("spawn"),
            initializer=worker_init,
            initargs=(os.getpid(),),
        )

    def _restart_pool(self) -> None:
        if self._pool is None or self._stopping:
            return
        old, self._pool = self._pool, self._new_pool()
        old.shutdown(wait=False, cancel_futures=True)


class _NeedsContent(Exception):
    """The judgement of a turn needs a document's stored content, not read yet."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name


def _reset(batch: list[_Pending]) -> None:
    """Undo a judgement of ``batch`` (it is judged again)."""
    for item in batch:
        if item.info is not None:  # (refusals made before the judgement stay)
            item.update = item.original
            item.refusal = None
            item.unproven = False


class _CompactionPool(Executor):
    """The relay's compaction processes, started when a shared store first compacts."""

    def __init__(self, relay: Relay) -> None:
        self._relay = relay

    def submit(self, fn: Callable[..., _T], /, *args: Any, **kwargs: Any) -> Future[_T]:
        relay = self._relay
        if relay._pool is None:
            relay._pool = relay._new_pool()
        return relay._pool.submit(fn, *args, **kwargs)


class ConnectionClosedByStop(Exception):
    """The relay is stopping: work for a connection is not started (or not finished)."""


def _abort_if_open(ws: Socket) -> None:
    if ws.transport is not None and not ws.transport.is_closing():
        ws.transport.abort()


def _origins(items: list[_Pending]) -> list[str | None] | None:
    """Each item's origin (the region of the link it came over), or None if all are local."""
    if not any(item.peer.origin for item in items):
        return None
    return [item.peer.origin for item in items]


def _own_write(noted: tuple[int, int] | None, latest: int, start: int) -> bool:
    """Whether a change listed at ``latest`` in a page after ``start`` is only the
    connection's own write (``noted``: its position, and the last before its commit)."""
    return noted is not None and noted[0] == latest and noted[1] <= start


def _record_positions(path: str, store_id: str, position: int) -> None:
    """Record the store's committed position beside it (restores: Relay._guard_against_
    restores); a failure is logged, never fatal: the guard is lost, not the data."""
    try:
        record_positions(path, store_id, position)
    except OSError as exc:
        log.warning("cannot record the store's position beside it: %s", exc)


def _checkpoint_and_record(path: str, store_id: str, position: int) -> tuple[int, int]:
    """A checkpoint of the write-ahead log, then the position recorded (from a thread)."""
    done = checkpoint_file(path)
    _record_positions(path, store_id, position)
    return done


def _left(deadline: float) -> float:
    return max(0.0, deadline - time.monotonic())


def _shut_down(pool: ProcessPoolExecutor, wait: bool) -> None:
    """Stop a worker pool; without ``wait``, its processes are terminated (the work is
    abandoned: compaction leaves the old snapshot and tail, a read is not needed)."""
    if not wait:
        for process in list((getattr(pool, "_processes", None) or {}).values()):
            with contextlib.suppress(Exception):
                process.terminate()
    pool.shutdown(wait=wait, cancel_futures=True)


def _local(peers: Collection[Peer]) -> Collection[Peer]:
    """``peers`` but other regions' links' channels (they are sent no presence)."""
    if all(p.origin is None for p in peers):
        return peers
    return [p for p in peers if p.origin is None]


def _awareness_frame(payload: bytes) -> bytes:
    return AwarenessMessage(payload).encode()


def _broadcast(peers: Iterable[Peer], frame: bytes) -> None:
    """Send a small frame now to peers with nothing queued on their connections: one
    broadcast to the connections of their own, each channel with its header."""
    direct = []
    for p in peers:
        if p.origin is not None:
            continue  # a link's channel (Peer.origin)
        if not p.wire.direct:
            p.push(frame)  # (an ASGI connection: through its queue)
        elif not p.header:
            direct.append(p.ws)
        elif not p.detached:
            broadcast([p.ws], p.header + frame)  # type: ignore[list-item]
    if direct:
        broadcast(direct, frame)  # type: ignore[arg-type]
