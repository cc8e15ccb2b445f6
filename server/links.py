"""Region links (issue 12): this region's relay ships its region's updates to another's.

One link per ordered pair of regions, run by one relay process of the source region (a
lease where several share a Redis store). A link is a multiplexed connection to the
target region's relay (``/?crdtsync=1&mux=1&region=<source>``, a token with the peer
right): each document it ships is a channel, each batch an update per document that the
target acknowledges once it is durably stored (the same acknowledgements a replica gets).

What travels, CouchDB-style:

- The source reads its store's changes from a cursor and ships, per changed document,
  the updates appended after it whose *origin* is this region (split horizon: what came
  from another region's link is stored with that origin and never shipped on, so no
  topology echoes).
- Batches are pipelined: up to ``link_window`` batches are under way at once. After a
  batch's updates, the link asks the target to record the batch's end (its checkpoint
  of this source, with this store's identity and epoch); the target records it once
  every update the link sent before is stored, and answers; the link records the answer
  as its own (with the target's identity), and only then does the batch leave the
  window. So after a crash of either side, the link resumes from the checkpoint both
  ends hold and ships again at most one window of batches.
- When the checkpoints cannot be used (first contact, a store replaced, emptied or
  restored from a backup), and for a document whose tail the source compacted past the
  cursor, the link falls back to state vectors: the target's step 1 on the channel says
  what it holds, and the source ships only what it lacks (``pycrdt.get_update``).

The pure decisions (which checkpoint holds, what a batch holds) are plain functions
below; the rest is the asyncio layer around one websocket.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode, urlsplit, urlunsplit

from pycrdt import get_update, merge_updates
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus, InvalidURI

from crdtsync.auth import check_secret_entry, mint_token
from crdtsync.backend import Change, FeedGap, LinkCheckpoint, RelayStore, Since, StoreIdentity
from crdtsync.errors import CloseCode, CrdtsyncError, StoreError
from crdtsync.folders import document_digest
from crdtsync.protocol import (
    MAX_NAMES_PER_MESSAGE,
    MUX_VERSION,
    AwarenessEntry,
    AwarenessMessage,
    ExtAck,
    ExtChannel,
    ExtClose,
    ExtHello,
    ExtLink,
    ExtLinkDigests,
    ExtLinked,
    ExtLinkUpdate,
    ExtOpen,
    ExtRefused,
    SyncStep1,
    decode_message,
    encode_awareness,
)
from crdtsync.settings import RelaySettings
from crdtsync.store import EMPTY_UPDATE
from crdtsync.sync import split_update
from crdtsync.updates import check_update

__all__ = ["Link", "Resume", "link_url", "resume_from"]

log = logging.getLogger("crdtsync.links")

SWEEP_PENDING = "pending"  # a link's "sweep" record: a sweep asked for and not yet done
# ... or: documents refused in part wait to be shipped again (which ones is kept in
# memory only: a relay restarted meanwhile sweeps every document instead).
RETRY_PENDING = "retry"
CHANGES_PAGE = 256  # changed documents read at a time (a sweep)
FEED_PAGE = 256  # appends shipped as one batch (a checkpoint once acknowledged)
FALLBACK_GROUP = 64  # documents whose state vectors a sweep asks for at once
MAX_OPEN_CHANNELS = 512  # channels a link keeps open (least recently used close first)
LEASE_S = 10.0  # a link's lease on a shared store (renewed every third of it)
TOKEN_TTL_S = 3600.0  # a minted peer token's lifetime (a link reconnects before it ends)
MAX_REFUSED_RETRY_S = 30.0  # a document refused again and again: shipped again this often
MAX_RETRY_S = 5.0  # (a handful of links: a healed partition is noticed within seconds)
PRESENCE_FLUSH_S = 0.1  # a document's presence crosses at most this often (coalesced)
MAX_PRESENCE_DOCUMENTS = 256  # documents whose presence a link carries at once
PRESENCE_MESSAGE_BYTES = 64 * 1024  # one presence message of a link, at most (about)
OWNERS_INLINE_BYTES = 16 * 1024  # an update's clients are read on the loop up to this size
MAX_OWNERS_SENT_DOCUMENTS = 4096  # documents whose owners a session remembers having named


def link_url(peer: str, region: str, token: str | None) -> str:
    """The target relay's multiplexed endpoint for a link from ``region``."""
    parts = urlsplit(peer)
    query = {"crdtsync": "1", "mux": "1", "region": region}
    if token:
        query["token"] = token
    return urlunsplit((parts.scheme, parts.netloc, "/", urlencode(query), ""))


@dataclass(frozen=True, slots=True)
class Resume:
    """Where a link starts: from ``cursor``, or (``sweep``) by state vectors for every
    document first, because no checkpoint both ends agree on exists. ``target_reset``:
    the target is not the store this link last shipped to (emptied, replaced, restored)."""

    cursor: int
    sweep: bool
    why: str
    target_reset: bool = False


def resume_from(me: StoreIdentity, linked: ExtLinked, out: LinkCheckpoint | None) -> Resume:
    """Decide where a link resumes (pure).

    ``linked``: the target's identity and its record of this source; ``out``: this
    store's record of the target. The target's record counts only if it names this
    store at this epoch (a source emptied or restored has another); this store's record
    only if it names the target's store at its epoch (a target replaced or restored lost
    what it had, including what it had received from elsewhere: the sweep gives it back
    everything this region holds that it lacks).
    """
    reset = out is not None and (out.store != linked.store or out.epoch != linked.epoch)
    if reset:
        return Resume(0, True, "the target store is another one, or was restored, since", True)
    if not linked.source:
        return Resume(0, True, "first contact: the target holds no checkpoint of this store")
    if linked.source != me.id or linked.source_epoch != me.epoch:
        return Resume(
            0, True, "the target's checkpoint is of another store or epoch (emptied, restored)"
        )
    if out is None:
        # The target recorded a checkpoint this store never confirmed (it stopped first,
        # or what it covers was not all acknowledged): nothing both ends agree on.
        return Resume(0, True, "the target's checkpoint was never confirmed here")
    return Resume(min(linked.cursor, out.cursor), False, "checkpoint")


@dataclass(eq=False, slots=True)
class _Batch:
    end: int  # the source cursor everything up to which this batch completes
    keys: set[int] = field(default_factory=set)  # not yet acknowledged (or refused)
    updates: int = 0
    bytes: int = 0


@dataclass(slots=True)
class LinkStats:
    """What a link did (``/healthz?verbose=1``)."""

    connects: int = 0
    batches: int = 0
    updates_shipped: int = 0
    bytes_shipped: int = 0
    documents_shipped: int = 0
    fallbacks: int = 0  # documents brought up to date by state vectors
    sweeps: int = 0  # times every document was (no usable checkpoint)
    refused: int = 0  # updates the target refused (part of): retried by state vectors
    retries: int = 0  # documents shipped again by state vectors after a refusal
    skipped: int = 0  # documents the target would not take over this link (rights)
    checkpoints: int = 0
    failures: int = 0
    anti_entropy_runs: int = 0
    repairs: int = 0  # documents lacking what this region wrote: this link lost something
    repairs_other: int = 0  # ... lacking others' content or deletes: repaired all the same
    dropped: int = 0  # (link_defect "drop" only: updates left out on purpose)
    presence_sent: int = 0  # presence messages sent (one per document per flush)
    presence_dropped: int = 0  # states not sent: the link down, or over its bounds


class Link:
    """The link from this relay's region to ``region`` (its relay at ``url``).

    Args:
        settings: the relay's (its region, token, batch size, window).
        store: the source store.
        region: the target region; ``url``: its relay.
        holder: who this process is (the lease on a shared store).
    """

    def __init__(
        self,
        settings: RelaySettings,
        store: RelayStore,
        region: str,
        url: str,
        *,
        holder: str | None = None,
    ) -> None:
        assert settings.region is not None
        self.settings = settings
        self.store = store
        self.source = settings.region
        self.region = region
        self.url = url
        self.holder = holder or secrets.token_hex(8)
        self.state = "connecting"
        self.stats = LinkStats()
        self.cursor = 0  # the source cursor acknowledged and recorded at both ends
        self.sent_to = 0  # ... and the one shipped up to (acknowledged or not)
        self.latest = 0  # the source's latest change seen
        self.behind_since: float | None = None
        self.last_error = ""
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        # One session's state:
        self._ws: ClientConnection | None = None
        self._channels: OrderedDict[str, int] = OrderedDict()  # open channels by document
        self._documents: dict[int, str] = {}
        self._next_channel = 1
        self._next_key = 1
        self._window: list[_Batch] = []
        self._asked = 0  # the last checkpoint the target was asked to record
        self._key_batch: dict[int, _Batch] = {}
        self._key_channel: dict[int, int] = {}
        self._inflight: dict[int, int] = {}  # channel -> updates not yet acknowledged
        self._target: ExtLinked | None = None  # the furthest checkpoint the target recorded
        self._to_record = asyncio.Event()  # it moved, or an acknowledgement came
        self._closing: asyncio.Task[None] | None = None
        self._recorded_at: float | None = None  # when a checkpoint was last recorded
        self._digests: asyncio.Future[ExtLinkDigests] | None = None
        self._last_sweep = time.monotonic()  # anti-entropy's last run (or the start)
        self.findings: list[str] = []  # documents anti-entropy repaired (the latest 100)
        self._retry: set[str] = set()  # documents to ship again by state vectors
        self._retry_marked = False  # ... and the store's "sweep" record says so
        self._retry_at = 0.0
        self._retry_pause = 0.5
        self.sweep_requested = False  # a sweep asked for from outside (a peer was reset)
        self.on_target_reset: Callable[[str], Awaitable[None]] | None = None
        self._greeted = False  # the current session got the target's hello
        self._acked = asyncio.Event()
        self._step1: dict[int, asyncio.Future[bytes]] = {}
        self._linked: asyncio.Future[ExtLinked] | None = None
        self._identity: StoreIdentity | None = None
        # Presence (best effort, never stored): what the target holds from this link
        # (``_mirror``: per document, per client) and what waits to cross (the latest
        # per client); what the relay holds now is asked for when a connection starts
        # (the target forgot everything of the last one).
        self._mirror: dict[str, dict[int, AwarenessEntry]] = {}
        self._forbidden: set[str] = set()  # documents refused (4403) this session
        # Client ids whose owners this session named, per document: once the target
        # has them, an update of only those ids is not walked to name them again.
        self._owners_sent: dict[str, set[int]] = {}
        self._presence: dict[str, dict[int, AwarenessEntry]] = {}
        self._presence_wake = asyncio.Event()
        self.present: Callable[[], Iterable[tuple[str, list[AwarenessEntry]]]] | None = None

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> None:
        """Run the link in the background until :meth:`stop`."""
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        """Stop the link (what is unacknowledged is shipped again by the next run)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def wake(self) -> None:
        """Something was committed here: look for changes now."""
        self._wake.set()

    def presence(self, document: str, entries: Iterable[AwarenessEntry]) -> None:
        """Presence of this region's clients in ``document`` (states, or removals) to
        cross: coalesced per client and sent within :data:`PRESENCE_FLUSH_S` while the
        link is connected; dropped while it is not. A link carries the states of at most
        :data:`MAX_PRESENCE_DOCUMENTS` documents, and per document the room's cap; a
        removal goes only for a state it carried (and always does)."""
        if self._ws is None or document in self._forbidden:
            return
        held = self._mirror.get(document)
        if held is None:
            if len(self._mirror) >= MAX_PRESENCE_DOCUMENTS:
                self.stats.presence_dropped += 1
                return
            held = {}
        cap = self.settings.max_presence_states_per_room
        waiting = self._presence.setdefault(document, {})
        for entry in entries:
            cid = entry.client_id
            current = held.get(cid)
            if current is not None and current.clock > entry.clock:
                continue
            if entry.removed:
                if current is None:
                    continue  # (the target holds nothing of it from this link)
                del held[cid]
            elif current is None and len(held) >= cap:
                self.stats.presence_dropped += 1
                continue
            else:
                held[cid] = entry
            waiting[cid] = entry
        if held:
            self._mirror[document] = held
        else:
            self._mirror.pop(document, None)
        if not waiting:
            del self._presence[document]
        self._presence_wake.set()

    def forget_presence(self, document: str, client: int) -> None:
        """``client``'s state in ``document`` is no longer this region's (it moved to
        another region): not carried any more, nor sent again."""
        held = self._mirror.get(document)
        if held is not None and held.pop(client, None) is not None and not held:
            del self._mirror[document]
        waiting = self._presence.get(document)
        if waiting is not None:
            waiting.pop(client, None)

    def _presence_lost(self, document: str) -> None:
        """The target forgot what this link's channel of ``document`` carried (the
        channel closed): send it again (on a channel opened for it)."""
        held = self._mirror.get(document)
        if held and self._ws is not None:
            self._presence.setdefault(document, {}).update(held)
            self._presence_wake.set()

    def status(self) -> dict[str, Any]:
        """The link as ``/healthz?verbose=1`` shows it."""
        behind = self.latest - self.cursor if self.latest > self.cursor else 0
        return {
            "region": self.region,
            "state": self.state,
            "cursor": self.cursor,
            "lag_changes": behind,
            "lag_s": round(time.monotonic() - self.behind_since, 3)
            if self.behind_since is not None
            else 0.0,
            "last_error": self.last_error,
            "findings": self.findings[-10:],
            **{name: getattr(self.stats, name) for name in LinkStats.__slots__},
        }

    async def _run(self) -> None:
        retry = self.settings.link_retry_s
        while True:
            try:
                if not await self.store.lease(f"link:{self.region}", self.holder, LEASE_S):
                    self.state = "standby"  # another process of this region runs it
                    await asyncio.sleep(LEASE_S / 3)
                    continue
                self.state = "connecting"
                self._greeted = False
                await self._session()
            except asyncio.CancelledError:
                raise
            except (OSError, ConnectionClosed, InvalidStatus, InvalidURI, TimeoutError) as exc:
                self._failed(f"{type(exc).__name__}: {exc}")
            except (StoreError, CrdtsyncError) as exc:
                self._failed(f"{type(exc).__name__}: {exc}")
            except Exception as exc:  # a bug: logged with its trace, and the link goes on
                log.exception("bug in the link to %s", self.region)
                self._failed(f"{type(exc).__name__}: {exc}")
            if self._greeted:
                retry = self.settings.link_retry_s  # (it got through: start the backoff over)
            await asyncio.sleep(retry * (0.5 + secrets.randbelow(1000) / 1000))
            retry = min(retry * 2, MAX_RETRY_S)

    def _failed(self, why: str) -> None:
        self.stats.failures += 1
        self.state = "down"
        if why != self.last_error:
            log.warning("link to region %s failed: %s", self.region, why)
        self.last_error = why

    def _token(self) -> str | None:
        s = self.settings
        if s.peer_token:
            return s.peer_token
        for entry in s.token_secrets:
            kid, secret = check_secret_entry(entry)
            return mint_token(
                secret,
                subject=f"region:{self.source}",
                docs={"**": "rwp"},
                ttl_s=TOKEN_TTL_S,
                kid=kid,
            )
        return None

    # -- one connection ---------------------------------------------------------------

    async def _session(self) -> None:
        s = self.settings
        url = link_url(self.url, self.source, self._token())
        async with connect(
            url,
            max_size=s.max_message_bytes,
            open_timeout=10,
            ping_interval=20,
            ping_timeout=20,
            close_timeout=2,
            compression=None,
        ) as ws:
            self._reset(ws)
            self.stats.connects += 1
            first = await asyncio.wait_for(ws.recv(decode=False), 10)
            hello = decode_message(first if isinstance(first, bytes) else first.encode())
            if not isinstance(hello, ExtHello) or hello.version < MUX_VERSION:
                raise CrdtsyncError(f"the peer is no crdtsync relay with links ({hello!r})")
            self._greeted = True
            loop = asyncio.get_running_loop()
            tasks = [
                loop.create_task(self._read(ws)),
                loop.create_task(self._renew(ws)),
                loop.create_task(self._record()),
                loop.create_task(self._send_presence(ws)),
            ]
            try:
                await self._ship(ws)
            finally:
                for task in tasks:
                    task.cancel()
                for task in tasks:
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await task
                self._ws = None

    def _reset(self, ws: ClientConnection) -> None:
        self._ws = ws
        self._channels.clear()
        self._documents.clear()
        self._next_channel = 1
        self._window.clear()
        self._key_batch.clear()
        self._key_channel.clear()
        self._inflight.clear()
        self._step1.clear()
        self._linked = None
        self._target = None
        self._presence.clear()
        self._mirror.clear()
        self._forbidden.clear()
        self._owners_sent.clear()
        if self.present is not None:
            for document, entries in self.present():
                self.presence(document, entries)

    async def _send_presence(self, ws: ClientConnection) -> None:
        """Send the presence waiting to cross, each document's as one message, on its
        channel (opened for it if need be: the target then has its local clients see
        it); at most every :data:`PRESENCE_FLUSH_S`."""
        while True:
            await self._presence_wake.wait()
            self._presence_wake.clear()
            waiting, self._presence = self._presence, {}
            for document, states in waiting.items():
                number = self._channels.get(document)
                if number is None:
                    if len(self._channels) >= MAX_OPEN_CHANNELS:
                        self.stats.presence_dropped += len(states)
                        continue  # (shipping needs them: presence is best effort)
                    number = await self._channel(ws, document)
                for part in _presence_parts(list(states.values()), PRESENCE_MESSAGE_BYTES):
                    payload = AwarenessMessage(encode_awareness(part)).encode()
                    await ws.send(ExtChannel(number, payload).encode())
                    self.stats.presence_sent += 1
            await asyncio.sleep(PRESENCE_FLUSH_S)

    async def _renew(self, ws: ClientConnection) -> None:
        """Keep the lease; a link that lost it stops (another process runs it now)."""
        while True:
            await asyncio.sleep(LEASE_S / 3)
            try:
                held = await self.store.lease(f"link:{self.region}", self.holder, LEASE_S)
            except StoreError as exc:
                held = False  # (it cannot be renewed: another process may take it over)
                log.warning("link to %s: lease not renewed: %s", self.region, exc)
            if not held:
                log.warning("link to %s: lease lost, handing over", self.region)
                await ws.close(1001, "lease lost")
                return

    async def _read(self, ws: ClientConnection) -> None:
        """Acknowledgements, refusals, step 1s and checkpoint answers, as they come."""
        try:
            async for data in ws:
                if isinstance(data, str):
                    raise CrdtsyncError("text frame from the target")
                msg = decode_message(data)
                if isinstance(msg, ExtChannel):
                    self._channel_message(msg.channel, decode_message(msg.frame))
                elif isinstance(msg, ExtClose):
                    self._channel_closed(msg)
                elif isinstance(msg, ExtLinked):
                    if self._linked is not None and not self._linked.done():
                        self._linked.set_result(msg)  # the answer to the first message
                    else:
                        self._recorded(msg)
                elif (
                    isinstance(msg, ExtLinkDigests)
                    and self._digests is not None
                    and not self._digests.done()
                ):
                    self._digests.set_result(msg)
        except (ConnectionClosed, CrdtsyncError) as exc:
            log.info("link to %s: reading ended: %s", self.region, exc)
        finally:
            # Whatever waits for this connection gives up: the session restarts.
            for waiter in [*self._step1.values(), self._linked, self._digests]:
                if waiter is not None and not waiter.done():
                    waiter.set_exception(ConnectionError("link connection ended"))
            self._ws = None
            self._acked.set()

    def _channel_message(self, channel: int, msg: object) -> None:
        if isinstance(msg, SyncStep1):
            waiter = self._step1.get(channel)
            if waiter is not None and not waiter.done():
                waiter.set_result(msg.state_vector)
        elif isinstance(msg, ExtAck):
            self._done(msg.key)
        elif isinstance(msg, ExtRefused):
            # The target refused part of it (the rest was stored): content whose parent
            # it does not hold yet (another region's link brings it), more repeats than
            # it takes at once, content it holds otherwise... Retried later by state
            # vectors, which ship only what it lacks, so a permanent conflict is not sent
            # again and a transient refusal goes through once its cause is gone.
            self.stats.refused += 1
            document = self._documents.get(channel)
            log.warning(
                "link to %s: %s refused part of an update (retried by state vectors): %s",
                self.region,
                document or "?",
                msg.reason,
            )
            if document is not None:
                self._retry.add(document)
                self._owners_sent.pop(document, None)  # (the retry names them again)
            self._done(msg.key)

    def _channel_closed(self, msg: ExtClose) -> None:
        document = self._documents.pop(msg.channel, None)
        if document is not None and self._channels.get(document) == msg.channel:
            del self._channels[document]
        waiter = self._step1.pop(msg.channel, None)
        if msg.code == CloseCode.FORBIDDEN:
            # The target will not take this document over this link (no peer right on
            # it, a name it refuses): skipped and reported, so as not to block the rest.
            self.stats.skipped += 1
            self.last_error = f"{document}: {msg.code} {msg.reason}"
            if document is not None:  # (nor its presence: the target will not take it)
                self._forbidden.add(document)
                self._mirror.pop(document, None)
                self._presence.pop(document, None)
            log.warning(
                "link to %s: %s refused by the target, skipped (%d %s)",
                self.region,
                document,
                msg.code,
                msg.reason,
            )
            for key in [k for k, c in self._key_channel.items() if c == msg.channel]:
                self._done(key)
            if waiter is not None and not waiter.done():
                waiter.set_result(b"")  # (a fallback waiting for it ships nothing)
            return
        if waiter is not None and not waiter.done():
            waiter.set_exception(ConnectionError(f"channel closed: {msg.reason}"))
        if self._ws is not None:
            # Failed there (a store failure, over its limits): what it carried is not
            # acknowledged; the session starts again from the checkpoint.
            log.warning(
                "link to %s: %s closed by the target (%d %s)",
                self.region,
                document,
                msg.code,
                msg.reason,
            )
            self.last_error = f"{document}: {msg.code} {msg.reason}"
            self._closing = asyncio.get_running_loop().create_task(
                self._ws.close(1011, "channel closed by the target")
            )

    def _done(self, key: int) -> None:
        channel = self._key_channel.pop(key, None)
        if channel is not None:
            self._inflight[channel] -= 1
            if not self._inflight[channel]:
                del self._inflight[channel]
        batch = self._key_batch.pop(key, None)
        if batch is not None:
            batch.keys.discard(key)
        self._acked.set()
        self._to_record.set()

    def _recorded(self, linked: ExtLinked) -> None:
        """The target recorded a checkpoint: record it here too, in order."""
        me = self._identity
        if me is None or linked.source != me.id or linked.source_epoch != me.epoch:
            self.last_error = "the target recorded a checkpoint of another store"
            if self._ws is not None:
                self._closing = asyncio.get_running_loop().create_task(
                    self._ws.close(1011, "checkpoint of another store")
                )
            return
        if self._target is None or linked.cursor >= self._target.cursor:
            self._target = linked
        self._to_record.set()

    async def _record(self) -> None:
        """Record here the checkpoints the target recorded, as far as every batch they
        cover was acknowledged: messages on a link may be reordered (the fault proxy
        does), so a checkpoint request can overtake updates it covers, and the target
        then records it before they are stored; such a checkpoint is kept here only
        once they are, and a link resumes from the lower of the two."""
        while True:
            await self._to_record.wait()
            self._to_record.clear()
            linked = self._target
            if linked is None:
                continue
            upto = self._recordable(linked.cursor)
            if upto < self.cursor or (upto == self.cursor and self._recorded_at):
                continue
            if self._retry and not self._retry_marked:
                # A checkpoint past what was refused is kept only once the retry is: a
                # relay restarted before the retry sweeps instead.
                await self._mark_retry()
            await self.store.set_link_checkpoint(
                LinkCheckpoint("out", self.region, linked.store, linked.epoch, upto)
            )
            self.cursor = upto
            self._recorded_at = time.monotonic()
            self.stats.checkpoints += 1
            # A batch leaves the window once its end is recorded at both ends: a link
            # killed now ships again at most the batches still in it.
            window = self._window
            while window and window[0].end <= upto:
                window.pop(0)
            self._acked.set()

    def _recordable(self, upto: int) -> int:
        """The furthest checkpoint up to ``upto`` that no unacknowledged batch precedes."""
        if self.settings.link_defect == "early-checkpoint":
            return upto  # (broken on purpose: whatever the target recorded)
        safe = self.cursor
        for batch in self._window:
            if batch.end > upto:
                break
            if batch.keys:
                return safe
            safe = batch.end
        return upto

    # -- shipping ------------------------------------------------------------------------

    async def _ship(self, ws: ClientConnection) -> None:
        me = await self.store.identity()
        self._identity = me
        self._linked = asyncio.get_running_loop().create_future()
        await ws.send(ExtLink(me.id, me.epoch).encode())
        linked = await asyncio.wait_for(self._linked, self.settings.link_ack_timeout_s)
        out = await self.store.link_checkpoint("out", self.region)
        resume = resume_from(me, linked, out)
        if resume.target_reset and self.on_target_reset is not None:
            # What this region learned from the reset one (and stored as its) may have
            # reached only some regions before the reset: the other links compare. The
            # request is stored first: this link's next checkpoint hides the reset.
            await self.on_target_reset(self.region)
        pending = await self.store.link_checkpoint("sweep", self.region)
        if pending is not None and pending.store in (SWEEP_PENDING, RETRY_PENDING):
            self.sweep_requested = True
        self._retry_marked = pending is not None and pending.store == RETRY_PENDING
        log.info(
            "link to %s connected: %s (cursor %d)",
            self.region,
            resume.why,
            resume.cursor,
            extra={"region": self.region},
        )
        self.cursor = self.sent_to = self._asked = resume.cursor
        if resume.sweep or self.sweep_requested:
            self.sweep_requested = False
            await self._sweep(ws)
        while True:
            if ws.close_code is not None or self._ws is None:
                raise ConnectionError("link connection ended")
            try:
                listed, end = await self.store.feed(self.sent_to, FEED_PAGE)
            except FeedGap as exc:
                log.warning("link to %s: %s; comparing state vectors", self.region, exc)
                await self._sweep(ws)
                continue
            self.latest = max(end, await self.store.last_change())
            if not listed:
                # Nothing new: checkpoint what was acknowledged, but never wait for it
                # here (a write that comes meanwhile goes out at once, not after a round
                # trip or two of acknowledgements and checkpoints).
                self._acked.clear()
                await self._advance(ws)
                settled = not self._window
                if settled and self.sweep_requested:
                    self.sweep_requested = False
                    await self._sweep(ws)
                    continue
                if settled and self._retry and time.monotonic() >= self._retry_at:
                    await self._retry_refused(ws)
                    continue
                if settled and self.cursor >= self.latest:
                    self.state = "live"
                    self.behind_since = None
                    every = self.settings.anti_entropy_s
                    if every and time.monotonic() - self._last_sweep >= every:
                        await self.anti_entropy(ws)
                        continue
                self._wake.clear()
                wake = asyncio.ensure_future(self._wake.wait())
                acked = asyncio.ensure_future(self._acked.wait())
                try:
                    await asyncio.wait(
                        {wake, acked},
                        timeout=self.settings.link_poll_s,
                        return_when=asyncio.FIRST_COMPLETED,
                    )
                finally:
                    wake.cancel()
                    acked.cancel()
                continue
            if self.behind_since is None:
                self.behind_since = time.monotonic()
            if len(listed) >= FEED_PAGE:
                self.state = "catching up"
            await self._ship_page(ws, listed, end)

    async def _ship_page(self, ws: ClientConnection, listed: list[Change], end: int) -> None:
        """Ship what originated here of the appends ``listed`` (after ``sent_to``, up to
        ``end``): one batch, whose end is a checkpoint once it is acknowledged (every
        update before it, of every document, is in it or in an earlier batch)."""
        start = self.sent_to
        batch = _Batch(start)
        if self.settings.link_defect == "early-checkpoint" and self._identity is not None:
            # Broken on purpose: both ends record the checkpoint before the target has
            # even received what it covers (a link lost now never ships it).
            self._asked = max(self._asked, end)
            await ws.send(ExtLink(self._identity.id, self._identity.epoch, end).encode())
            await self._until(ws, lambda: self.cursor >= end)
        for document in dict.fromkeys(change.document for change in listed):
            since = await self.store.since(document, start, end)
            if not since.complete:
                # Compacted past the cursor: what it lacks, by its state vector.
                await self._fallback(ws, document, batch)
                continue
            if self.settings.link_defect == "drop":
                since = self._drop_some(since)
            local = [u for c, u, origin in since.updates if origin is None and c <= end]
            if local:
                await self._send_updates(ws, document, local, batch)
        batch.end = end
        await self._close_batch(ws, batch)

    async def _send_updates(
        self, ws: ClientConnection, document: str, updates: list[bytes], batch: _Batch
    ) -> None:
        limit = self.settings.link_batch_bytes
        # Shipped with the content: who owns its client ids here (an anonymous client
        # of the target's region may not take their next clocks there).
        owners = (await self.store.load_ledger(document))[0].owners
        run: list[bytes] = []
        size = 0
        for update in updates:
            if run and size + len(update) > limit:
                await self._send_one(ws, document, run, batch, owners)
                run, size = [], 0
            run.append(update)
            size += len(update)
        if run:
            await self._send_one(ws, document, run, batch, owners)
        self.stats.documents_shipped += 1

    async def _send_one(
        self,
        ws: ClientConnection,
        document: str,
        run: list[bytes],
        batch: _Batch,
        owners: dict[int, str],
    ) -> None:
        update = run[0] if len(run) == 1 else merge_updates(*run)
        named: tuple[tuple[int, str], ...] = ()
        sent = self._owners_sent.get(document)
        if owners and (sent is None or not owners.keys() <= sent):
            # Its clients (not pycrdt's get_state: it names none whose structs start past
            # 0), read in a thread when large: a pure-Python walk holds the loop.
            if len(update) < OWNERS_INLINE_BYTES:
                info = check_update(update)
            else:
                info = await asyncio.to_thread(check_update, update)
            named = tuple((c, owners[c]) for c in info.starts if c in owners)
            if len(self._owners_sent) >= MAX_OWNERS_SENT_DOCUMENTS:
                self._owners_sent.clear()  # (named again: a walk more, no harm)
            self._owners_sent.setdefault(document, set()).update(c for c, _ in named)
        channel = await self._channel(ws, document)
        key = self._next_key
        self._next_key += 1
        batch.keys.add(key)
        self._key_batch[key] = batch
        self._key_channel[key] = channel
        self._inflight[channel] = self._inflight.get(channel, 0) + 1
        batch.updates += len(run)
        batch.bytes += len(update)
        self.stats.updates_shipped += len(run)
        self.stats.bytes_shipped += len(update)
        await ws.send(ExtChannel(channel, ExtLinkUpdate(key, update, named).encode()).encode())

    async def _channel(
        self,
        ws: ClientConnection,
        document: str,
        step1: asyncio.Future[bytes] | None = None,
    ) -> int:
        """The open channel of ``document``, opened if need be (its step 1 comes then).

        ``step1``: a channel opened anew, whose step 1 (the target's state vector now)
        sets this future. A channel is closed only with nothing on it waiting for
        acknowledgement: the relay acknowledges nothing on a channel closed meanwhile.
        (Shipping and presence both open channels: what is decided before an await is
        looked at again after it.)"""
        while True:
            number = self._channels.get(document)
            if number is not None:
                if step1 is None:
                    self._channels.move_to_end(document)
                    return number
                await self._close_channel(ws, document)
            elif len(self._channels) >= MAX_OPEN_CHANNELS:
                idle = next((d for d, n in self._channels.items() if n not in self._inflight), None)
                if idle is None:
                    await self._until(ws, lambda: len(self._inflight) < len(self._channels))
                else:
                    await self._close_channel(ws, idle)
            else:
                break
        number = self._next_channel
        self._next_channel += 1
        self._channels[document] = number
        self._documents[number] = document
        if step1 is not None:
            self._step1[number] = step1
        await ws.send(ExtOpen(number, document).encode())
        return number

    async def _close_channel(self, ws: ClientConnection, document: str) -> None:
        number = self._channels[document]
        await self._until(ws, lambda: number not in self._inflight)
        self._channels.pop(document, None)
        self._documents.pop(number, None)
        self._step1.pop(number, None)
        await ws.send(ExtClose(number).encode())
        self._presence_lost(document)

    async def _until(self, ws: ClientConnection, done: Callable[[], bool]) -> None:
        """Checkpoint what is acknowledged, and wait for acknowledgements (and checkpoint
        answers) until ``done()``; one not coming in time, or the connection gone, raises."""
        while True:
            self._acked.clear()
            await self._advance(ws)
            if done():
                return
            if ws.close_code is not None or self._ws is None:
                raise ConnectionError("link connection ended")
            await asyncio.wait_for(self._acked.wait(), self.settings.link_ack_timeout_s)

    async def _fallback(self, ws: ClientConnection, document: str, batch: _Batch) -> None:
        """Ship what the target lacks of ``document``, by the state vector of its step 1."""
        await self._fallbacks(ws, [document], batch)

    async def _fallbacks(
        self, ws: ClientConnection, documents: list[str], batch: _Batch
    ) -> dict[str, set[int]]:
        """:meth:`_fallback` for several documents at once: every channel is opened
        first, so a slow link costs one round trip for the group, not one per document.
        Returns, per document of which the target lacked content (not only deletes), the
        client ids of that content."""
        lacked: dict[str, set[int]] = {}
        loop = asyncio.get_running_loop()
        waiters: list[tuple[str, int, asyncio.Future[bytes]]] = []
        for document in documents:
            self.stats.fallbacks += 1
            waiter: asyncio.Future[bytes] = loop.create_future()
            number = await self._channel(ws, document, step1=waiter)
            waiters.append((document, number, waiter))
        for document, number, waiter in waiters:
            state_vector = await asyncio.wait_for(waiter, self.settings.link_ack_timeout_s)
            self._step1.pop(number, None)
            stored = await self.store.load(document)
            limit = self.settings.link_batch_bytes
            pieces = await asyncio.to_thread(_missing, stored.all_updates(), state_vector, limit)
            if pieces:
                clients = {c for piece in pieces for c in check_update(piece).state}
                if clients:
                    lacked[document] = clients
                await self._send_updates(ws, document, pieces, batch)
            elif self._channels.get(document) == number and document not in self._mirror:
                await self._close_channel(ws, document)  # (idle: kept if it has presence)
        return lacked

    async def _close_batch(self, ws: ClientConnection, batch: _Batch) -> None:
        """Put ``batch`` in the window; wait while the window is full."""
        self.sent_to = max(self.sent_to, batch.end)
        self._window.append(batch)
        if batch.keys:
            self.stats.batches += 1
        if batch.end > self._asked and self._identity is not None:
            # Asked at once: the target records it once it stored everything this link
            # sent before (one round trip per batch, acknowledgements and all).
            self._asked = batch.end
            await ws.send(ExtLink(self._identity.id, self._identity.epoch, batch.end).encode())
        await self._until(ws, lambda: len(self._window) < self.settings.link_window)

    async def _drain(self, ws: ClientConnection) -> None:
        """Wait for every batch sent to be acknowledged (or refused) and its checkpoint
        recorded (a batch of a retry ends at the cursor: its keys are waited for)."""
        await self._until(
            ws, lambda: not self._window and self.cursor >= self._asked and not self._key_batch
        )

    async def _advance(self, ws: ClientConnection) -> None:
        """Let go of the batches a recorded checkpoint covers (each batch asked for its
        checkpoint as it was closed: :meth:`_close_batch`; answers: :meth:`_record`)."""
        while self._window and self._window[0].end <= self.cursor:
            self._window.pop(0)

    async def _sweep(self, ws: ClientConnection) -> None:
        """Every document by state vectors (no checkpoint both ends agree on, or the
        feed no longer reaches back to it). Nothing is checkpointed until every
        document was compared: then everything up to where the store was when the
        sweep began is at the target, and the feed continues from there."""
        self.state = "catching up"
        self.stats.sweeps += 1
        await self._drain(ws)
        start = await self.store.last_change()
        swept: set[str] = set()
        async for changes in self._pages():
            fresh = [c.document for c in changes if c.document not in swept]
            swept.update(fresh)
            for group in _groups(fresh, FALLBACK_GROUP):
                batch = _Batch(self.sent_to)
                await self._fallbacks(ws, group, batch)
                await self._close_batch(ws, batch)
        await self._drain(ws)
        # Recorded even where nothing was shipped: both ends now hold a checkpoint of
        # each other (the next connection resumes from it instead of sweeping again).
        assert self._identity is not None
        self.sent_to = max(self.sent_to, start)
        self._asked = max(self._asked, start)
        self._recorded_at = None
        await ws.send(ExtLink(self._identity.id, self._identity.epoch, start).encode())
        await self._until(ws, lambda: self._recorded_at is not None)
        pending = await self.store.link_checkpoint("sweep", self.region)
        if (
            pending is not None
            and pending.store in (SWEEP_PENDING, RETRY_PENDING)
            and not self.sweep_requested
        ):
            # (Refused again during the sweep: those are retried, and marked as such.)
            mark = RETRY_PENDING if self._retry else ""
            await self.store.set_link_checkpoint(LinkCheckpoint("sweep", self.region, mark, 0, 0))
            self._retry_marked = bool(mark)

    async def anti_entropy(self, ws: ClientConnection) -> int:
        """Compare every document's digest (state vector and delete set) with the
        target's and repair what differs by state vectors; return how many documents
        the target was found lacking (each a finding: logged, counted in ``repairs``).

        Only documents whose latest change the link has checkpointed are compared (the
        others are on their way); a target holding more than this region is the other
        direction's business (its own link's anti-entropy)."""
        self.stats.anti_entropy_runs += 1
        checked_to = self.cursor
        found = 0
        async for changes in self._pages():
            names = [c.document for c in changes if c.cursor <= checked_to]
            if not names:
                continue
            theirs = await self._ask_digests(ws, names)
            ours: dict[str, bytes] = {}
            for name in names:
                stored = await self.store.load(name)
                ours[name] = await asyncio.to_thread(document_digest, stored.all_updates())
            differing = [n for n in names if theirs.get(n, ours[n]) != ours[n]]
            if not differing:
                continue
            batch = _Batch(self.sent_to)
            lacked = await self._fallbacks(ws, differing, batch)
            await self._close_batch(ws, batch)
            await self._drain(ws)
            after = await self._ask_digests(ws, differing)
            for name in differing:
                if name not in lacked and after.get(name) != ours[name]:
                    continue  # the target holds more than this region: not ours to repair
                if lacked.get(name, set()) & await self._local_clients(name):
                    # What this region's own clients wrote, checkpointed as shipped, and
                    # not there: this link lost it.
                    found += 1
                    self.stats.repairs += 1
                    self.findings = [*self.findings[-99:], name]
                    log.warning(
                        "anti-entropy: region %s lacked part of %r (repaired): this link lost it",
                        self.region,
                        name,
                        extra={"region": self.region, "document": name, "event": "repair"},
                    )
                else:
                    # Content from elsewhere (a third region whose own link is behind or
                    # down), or deletes: repaired, not this link's loss.
                    self.stats.repairs_other += 1
        self._last_sweep = time.monotonic()
        return found

    async def _pages(self) -> AsyncIterator[list[Change]]:
        """Every document of the source store, as its latest changes, a page at a time."""
        cursor = 0
        while True:
            changes = await self.store.changes(cursor, CHANGES_PAGE)
            if not changes:
                return
            cursor = changes[-1].cursor
            yield changes

    async def _local_clients(self, document: str) -> set[int]:
        """Client ids of what this region's own clients wrote to ``document`` that its
        store still tells apart (what a compaction folded is no longer attributed)."""
        since = await self.store.since(document, 0)
        out: set[int] = set()
        for _, update, origin in since.updates:
            if origin is None:
                out.update(check_update(update).state)
        return out

    async def _ask_digests(self, ws: ClientConnection, names: list[str]) -> dict[str, bytes]:
        """The target's digests of ``names`` (those it may tell)."""
        out: dict[str, bytes] = {}
        for group in _groups(names, MAX_NAMES_PER_MESSAGE):
            self._digests = asyncio.get_running_loop().create_future()
            await ws.send(ExtLinkDigests(tuple(group)).encode())
            answer = await asyncio.wait_for(self._digests, self.settings.link_ack_timeout_s)
            out.update(zip(answer.names, answer.digests, strict=True))
        return out

    async def _retry_refused(self, ws: ClientConnection) -> None:
        """Ship again, by state vectors, the documents the target refused part of;
        refused again, they wait longer (0.5 s doubling up to 30 s)."""
        documents = sorted(self._retry)
        self._retry.clear()
        self.stats.retries += len(documents)
        for group in _groups(documents, FALLBACK_GROUP):
            batch = _Batch(self.sent_to)
            await self._fallbacks(ws, group, batch)
            await self._close_batch(ws, batch)
        await self._drain(ws)
        if self._retry:
            self._retry_pause = min(self._retry_pause * 2, MAX_REFUSED_RETRY_S)
        else:
            self._retry_pause = 0.5
            await self._unmark_retry()
        self._retry_at = time.monotonic() + self._retry_pause

    async def _mark_retry(self) -> None:
        """Store that refused documents wait (before a checkpoint past them is kept)."""
        pending = await self.store.link_checkpoint("sweep", self.region)
        if pending is None or pending.store != SWEEP_PENDING:
            await self.store.set_link_checkpoint(
                LinkCheckpoint("sweep", self.region, RETRY_PENDING, 0, 0)
            )
        self._retry_marked = True

    async def _unmark_retry(self) -> None:
        """No refused document waits any more: forget the mark (not a sweep asked for)."""
        if not self._retry_marked:
            return
        pending = await self.store.link_checkpoint("sweep", self.region)
        if pending is not None and pending.store == RETRY_PENDING:
            await self.store.set_link_checkpoint(LinkCheckpoint("sweep", self.region, "", 0, 0))
        self._retry_marked = False

    def _drop_some(self, since: Since) -> Since:
        """(link_defect "drop") Leave out 1 in 50 updates: those whose change cursor is a
        multiple of 50 (the same ones again when a restarted link ships them again)."""
        kept = [row for row in since.updates if row[0] % 50 or row[2] is not None]
        self.stats.dropped += len(since.updates) - len(kept)
        return Since(since.document, kept, since.complete)


def _presence_parts(entries: list[AwarenessEntry], limit: int) -> list[list[AwarenessEntry]]:
    """``entries`` in runs of about ``limit`` bytes of states (each run one message)."""
    parts: list[list[AwarenessEntry]] = [[]]
    size = 0
    for entry in entries:
        cost = 32 + (entry.size or len(json.dumps(entry.state)) if entry.state else 0)
        if parts[-1] and size + cost > limit:
            parts.append([])
            size = 0
        parts[-1].append(entry)
        size += cost
    return parts


def _groups(items: list[str], size: int) -> list[list[str]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def _missing(updates: list[bytes], state_vector: bytes, piece_bytes: int) -> list[bytes]:
    """What a holder of ``state_vector`` lacks of the document made of ``updates``, with
    its whole delete set (deletes do not show in a state vector), in pieces: the
    stored updates' differences one by one when the whole would be larger than
    ``piece_bytes`` (each was accepted once, so each fits the target's limits; the
    snapshot cut by client where it is large), else merged into one.
    """
    if sum(map(len, updates)) <= piece_bytes:
        merged = updates[0] if len(updates) == 1 else merge_updates(*updates)
        missing = get_update(merged, state_vector)
        return [] if missing == EMPTY_UPDATE else [missing]
    pieces = []
    for update in updates:
        missing = get_update(update, state_vector)
        if missing != EMPTY_UPDATE:
            pieces += split_update(missing, piece_bytes)
    return pieces


def links_of(settings: RelaySettings, store: RelayStore, holder: str | None = None) -> list[Link]:
    """One link per peer region of ``settings``. A link that finds its target reset
    (emptied, replaced, restored) has the others compare every document with their
    targets: what the reset region had shipped to some regions only is missing at the
    others, and its own store no longer has it to ship (others hold it as learned)."""
    links = [
        Link(settings, store, region, url, holder=holder)
        for region, url in sorted(settings.peers.items())
    ]

    async def reset(region: str) -> None:
        for link in links:
            if link.region != region:
                await store.set_link_checkpoint(
                    LinkCheckpoint("sweep", link.region, SWEEP_PENDING, 0, 0)
                )
                link.sweep_requested = True

    for link in links:
        link.on_target_reset = reset
    return links
