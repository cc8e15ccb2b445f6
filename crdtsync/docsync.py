"""One document's sync with the relay, as a replica runs it: pure logic, no I/O (issue 11).

:class:`~crdtsync.sync.SyncSession` turns one document's messages into events and back;
this module decides what a replica does with them, the same for a connection of its
own and for a channel of the multiplexed one:

- :class:`DocumentSync`, one per document per link: whether the relay acknowledges
  (its first message says so, and a hello that a reordering path delivered late turns
  acknowledgements on after all), claims before content, keyed local updates, the
  catch-up that answers the relay's step 1 (one update confirming every pending
  transaction), the relay's refusals (an "unproven" one claims again, at most
  :data:`MAX_RECLAIMS` times), and the pacing of answers and resyncs a relay could
  otherwise demand without end.
- :class:`AckOrder`, per document, across links: local transactions are confirmed in
  order only (an update acknowledged after a gap cannot be integrated by anyone).
- :class:`HeldUpdates`, per document: remote updates that start after a gap, kept aside
  until it is filled, while the document asks the relay again.

What touches the world (the document, its file, the app) is the :class:`DocumentHost`
a replica passes in; time is an argument. Tests drive it with no socket and no loop.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable
from typing import Protocol

from pycrdt import get_update

from crdtsync.limits import TokenBucket
from crdtsync.protocol import decode_state_vector, encode_state_vector
from crdtsync.store import EMPTY_UPDATE
from crdtsync.sync import (
    Acknowledged,
    Event,
    ExtensionsConfirmed,
    PermissionRefused,
    Refused,
    StateRequested,
    SyncSession,
    UpdateReceived,
)
from crdtsync.updates import UpdateInfo, check_update

__all__ = [
    "MAX_HELD_UPDATES",
    "MAX_RECLAIMS",
    "AckOrder",
    "DocumentHost",
    "DocumentSync",
    "HeldUpdates",
    "deletes_of",
    "split_clients",
]

MAX_RECLAIMS = 8  # per link: claims resent after "not proven" refusals
MAX_HELD_UPDATES = 256  # remote updates kept aside while a gap before them is open
MAX_HELD_BYTES = 64 * 1024 * 1024  # ... and their bytes (a relay's updates may be large)
DEFER_S = 1.0  # a paced answer or resync waits this long (one timer per link)


class DocumentHost(Protocol):
    """What a :class:`DocumentSync` needs of the document it syncs."""

    def state(self) -> bytes:
        """The document's state vector."""
        ...

    def update_since(self, state: bytes) -> bytes:
        """What the document holds beyond ``state``, as one update."""
        ...

    def admit_and_apply(self, update: bytes, info: UpdateInfo) -> set[int]:
        """Check a remote update, apply what passes; the clients whose content did not."""
        ...

    def apply_known(self, update: bytes) -> None:
        """Apply an update whose content the document holds already (its deletes count)."""
        ...

    def claims(self) -> tuple[dict[int, bytes], frozenset[int]]:
        """The replica's client ids of this document with their keys, and the fresh ones."""
        ...

    def confirm(self, seqs: list[int]) -> None:
        """Local transactions ``seqs`` are durably stored by the relay, in order."""
        ...

    def decided(self) -> None:
        """Whether the relay acknowledges is known now (or changed)."""
        ...

    def synced(self) -> None:
        """The relay answered our step 1: the document holds what the relay held."""
        ...

    def refused(self, reason: str) -> None:
        """The relay refused (part of) our content for good; it stays pending."""
        ...

    def denied(self, reason: str) -> None:
        """The relay said "permission denied"."""
        ...


class AckOrder:
    """A document's local transactions not yet confirmed, in order.

    ``load`` gives the pending sequence numbers from the file, asked on first use only
    (opening a document with a long offline history stays fast).
    """

    __slots__ = ("_acked", "_confirmed", "_load", "_pending")

    def __init__(self, load: Callable[[], Iterable[int]]) -> None:
        self._load = load
        self._pending: deque[int] | None = None
        self._acked: set[int] = set()
        self._confirmed = 0  # the highest sequence number confirmed so far

    def added(self, seq: int) -> None:
        """A new local transaction (sequence numbers only grow)."""
        pending = self._pending
        # (Loaded from the file meanwhile, by another thread's edit: it may be in already.)
        if pending is not None and seq > self._confirmed and (not pending or pending[-1] < seq):
            pending.append(seq)

    def pending(self) -> list[int]:
        """Every transaction not yet confirmed, oldest first."""
        return list(self._seqs())

    def _seqs(self) -> deque[int]:
        if self._pending is None:
            self._pending = deque(self._load())
        return self._pending

    def acknowledge(self, seqs: Iterable[int]) -> list[int]:
        """Record acknowledgements; return the transactions confirmed now.

        A transaction is confirmed once it and every earlier one are acknowledged: an
        update acknowledged after a gap (an earlier one reordered away, then lost with
        its sender) cannot be integrated by anyone, so it stays pending and is sent again.
        """
        pending = self._seqs()
        # (One transaction may be acknowledged twice, by two updates that carried it.)
        self._acked.update(seq for seq in seqs if seq > self._confirmed)
        confirmed = []
        while pending and pending[0] in self._acked:
            seq = pending.popleft()
            self._acked.discard(seq)
            confirmed.append(seq)
        if confirmed:
            self._confirmed = confirmed[-1]
        return confirmed


class HeldUpdates:
    """Remote updates (one client's part each) waiting for content before them."""

    __slots__ = ("_bytes", "_held", "limit", "max_bytes")

    def __init__(self, limit: int = MAX_HELD_UPDATES, max_bytes: int = MAX_HELD_BYTES) -> None:
        self.limit = limit
        self.max_bytes = max_bytes
        self._held: list[tuple[bytes, UpdateInfo]] = []
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._held)

    def hold(self, update: bytes, info: UpdateInfo) -> bool:
        """Keep ``update``; False when full (the answer to a step 1 brings it instead)."""
        if len(self._held) >= self.limit or self._bytes + len(update) > self.max_bytes:
            return False
        self._held.append((update, info))
        self._bytes += len(update)
        return True

    def take_ready(self, state: dict[int, int]) -> list[tuple[bytes, UpdateInfo]]:
        """Remove and return the updates that no longer start after a gap of ``state``."""
        ready = [
            held
            for held in self._held
            if all(start <= state.get(c, 0) for c, start in held[1].starts.items())
        ]
        if ready:
            taken = {id(held) for held in ready}
            self._held = [held for held in self._held if id(held) not in taken]
            self._bytes -= sum(len(update) for update, _ in ready)
        return ready

    def clear(self) -> None:
        """Forget everything held."""
        self._held.clear()
        self._bytes = 0


class DocumentSync:
    """One document's sync over one link (a connection or a channel), without I/O.

    The caller feeds it the session's events (:meth:`handle`), the document's local
    transactions (:meth:`local`) and the deferred timer (:meth:`run_deferred`, when
    :attr:`timer_wanted` asks for one, :data:`DEFER_S` later); it writes to ``session``,
    whose frames the caller sends.
    """

    __slots__ = (
        "acks",
        "catch_up_key",
        "claim_key",
        "deferred_request",
        "deferred_resync",
        "held",
        "host",
        "in_flight",
        "next_key",
        "order",
        "reclaims",
        "relay_state",
        "requests",
        "resyncing",
        "resyncs",
        "session",
        "timer_wanted",
    )

    def __init__(
        self, session: SyncSession, host: DocumentHost, order: AckOrder, held: HeldUpdates
    ) -> None:
        self.session = session
        self.host = host
        self.order = order
        self.held = held
        self.acks: bool | None = None  # decided by the relay's first message
        self.next_key = 1
        self.in_flight: dict[int, list[int]] = {}  # key -> local seqs it carries
        self.resyncing = False  # a step 1 of ours is waiting for its answer
        self.relay_state: bytes | None = None  # the state vector of the relay's step 1
        # A relay may ask (step 1) or make us ask (gap updates) without end: both are
        # paced, and what waits is done once, for the latest request (DESIGN: bounded work).
        self.requests = TokenBucket(2.0, 5)
        self.resyncs = TokenBucket(1.0, 3)
        self.deferred_request: bytes | None = None
        self.deferred_resync = False
        self.timer_wanted = False  # the caller should call run_deferred() DEFER_S later
        self.reclaims = 0
        self.claim_key = 0  # the first key sent after our latest claim
        self.catch_up_key = 0  # the latest catch-up in flight (it covers the earlier ones)

    # -- from the replica -------------------------------------------------------------

    def start(self) -> None:
        """The link is up: ask the relay for what we lack (waiting for its answer)."""
        self.resync()

    def local(self, seq: int, update: bytes) -> None:
        """A local transaction stored as ``seq``: send it (keyed, when acknowledged)."""
        if self.acks is None:
            return  # the answer to the relay's step 1 will carry it
        if self.acks:
            key = self.next_key
            self.next_key += 1
            self.in_flight[key] = [seq]
            self.session.send_update(update, key)
        else:
            self.session.send_update(update)

    def run_deferred(self) -> None:
        """Do the paced answer or resync that waited (the timer asked for fired)."""
        self.timer_wanted = False
        if self.deferred_request is not None:
            request, self.deferred_request = self.deferred_request, None
            self._answer(request)
        if self.deferred_resync and not self.resyncing:
            self.deferred_resync = False
            self.resyncing = True
            self.session.send_step1(self.host.state())

    def resync(self) -> None:
        """Ask the relay for what we lack now (e.g. it announced a change)."""
        self.resyncing = True
        self.session.send_step1(self.host.state())

    @property
    def waiting_for_acks(self) -> bool:
        """Keyed updates are on their way and not yet acknowledged or refused."""
        return bool(self.acks and self.in_flight)

    # -- from the relay ---------------------------------------------------------------

    def handle(self, event: Event, now: float) -> None:
        """React to one event of the session (awareness events are the caller's)."""
        if self.acks is None:
            # The relay confirms extensions before anything else; a server whose first
            # message is something else (the reference server) will never acknowledge.
            self.acks = isinstance(event, ExtensionsConfirmed)
            if self.acks:
                self._claim()
            self.host.decided()
        elif isinstance(event, ExtensionsConfirmed) and not self.acks:
            # A confirmation that a reordering path delivered late: acknowledgements are
            # on after all. What was sent unkeyed is covered by one keyed catch-up update.
            self.acks = True
            self._claim()
            if self.relay_state is not None:
                self._catch_up(self.relay_state)
            self.host.decided()
        if isinstance(event, UpdateReceived):
            if not event.info.is_empty:
                self._receive(event.update, event.info, now)
            if event.answer:
                self.resyncing = False
                self.host.synced()
        elif isinstance(event, StateRequested):
            self.relay_state = event.state_vector
            if self.requests.allow(now):
                self._answer(event.state_vector)
            else:
                self.deferred_request = event.state_vector  # answered once, later
                self.timer_wanted = True
        elif isinstance(event, Acknowledged):
            seqs = self.in_flight.pop(event.key, None)
            if seqs:
                confirmed = self.order.acknowledge(seqs)
                if confirmed:
                    self.host.confirm(confirmed)
        elif isinstance(event, Refused):
            # Never acknowledged: what it carried stays pending.
            self.in_flight.pop(event.key, None)
            if event.unproven and (event.key < self.claim_key or not self.acks):
                # Sent before our latest claim (a reordering path let it overtake the
                # claim or the hello): the catch-up that follows the claim carries it.
                # (Unkeyed ones, sent before a late hello, are refused as key 0.)
                return
            if event.unproven and self.reclaims < MAX_RECLAIMS:
                # Our claim was overtaken (a reordering path) or lost: our ids are ours,
                # so prove them again and resend what is pending (or let the answer to
                # the relay's step 1, still on its way, carry it).
                self.reclaims += 1
                self._claim()
                if self.relay_state is not None:
                    self._catch_up(self.relay_state)
                return
            self.host.refused(event.reason)
        elif isinstance(event, PermissionRefused):
            self.host.denied(event.reason)

    def _claim(self) -> None:
        """Prove our client ids before any content of theirs (crdtsync.integrity)."""
        claims, fresh = self.host.claims()
        self.session.send_claim(claims, fresh)
        self.claim_key = self.next_key

    def _answer(self, state_vector: bytes) -> None:
        if self.acks:
            self._catch_up(state_vector)
        else:
            self.session.answer_state_request(self.host.update_since(state_vector))

    def _catch_up(self, relay_state: bytes) -> None:
        """Send what the relay lacks as one update acknowledged for every pending
        transaction: that is how offline edits are confirmed after a reconnect."""
        # Pending first, then the update: a transaction another thread commits between
        # the two is carried and not yet counted (its own update confirms it), never
        # counted and not carried.
        pending = self.order.pending()
        update = self.host.update_since(relay_state)
        if update == EMPTY_UPDATE and not pending:
            return  # nothing the relay lacks, nothing to confirm
        # The latest catch-up carries everything pending: an earlier one still in flight
        # is superseded (a relay asking again and again cannot grow what is tracked).
        self.in_flight.pop(self.catch_up_key, None)
        key = self.catch_up_key = self.next_key
        self.next_key += 1
        self.in_flight[key] = pending
        self.session.send_update(update, key)

    def _receive(self, update: bytes, info: UpdateInfo, now: float) -> None:
        """Apply a remote update, or keep it aside while something before it is missing."""
        state = decode_state_vector(self.host.state())
        gaps = {c for c, start in info.starts.items() if start > state.get(c, 0)}
        if gaps:
            # Something before this update never arrived (a reordered or lost delivery).
            # Yrs would keep it pending and retry it with each later update (a relay
            # sending thousands cost quadratic time) and may apply it out of order
            # (y-crdt#413): keep those clients' part here, apply it once the gap is
            # filled, and ask again. The other clients' part applies now (a stored
            # document may keep a gap for good: its other content must not wait on it).
            part, rest = split_clients(update, info, gaps)
            self.held.hold(part, info if rest is None else check_update(part))
            # (Beyond the limit it is dropped: the answer to our step 1 brings it.)
            self._ask_again(now)
            if rest is None:
                if not info.deletes:
                    return
                # Only gapped clients' content: its delete set applies now all the same
                # (deleting is idempotent and needs no order). Held with the content, it
                # waited for a gap that may never fill (a stock client's gapped update,
                # kept by the relay, is in every answer to our step 1): a delete the
                # replica missed while away arrives only in such an answer, and was lost.
                rest = deletes_of(update, info)
            update, info = rest, check_update(rest)
        self._apply(update, info, now)
        while len(self.held):
            ready = self.held.take_ready(decode_state_vector(self.host.state()))
            if not ready:
                break
            for u, i in ready:
                state = decode_state_vector(self.host.state())
                if all(end <= state.get(c, 0) for c, end in i.state.items()):
                    # Its content arrived meanwhile (with the answer to our step 1): not
                    # compared with the document again; Yrs skips known structs, so only
                    # its delete set (which never conflicts) is applied.
                    if i.deletes:
                        self.host.apply_known(u)
                    continue
                self._apply(u, i, now)

    def _apply(self, update: bytes, info: UpdateInfo, now: float) -> None:
        refused = self.host.admit_and_apply(update, info)
        state = decode_state_vector(self.host.state())
        if any(state.get(c, 0) < end for c, end in info.state.items() if c not in refused):
            # Applied but not integrated (it depends on content we lack): ask again;
            # the relay's answer fills the gap.
            self._ask_again(now)

    def _ask_again(self, now: float) -> None:
        """Send our state vector (sync step 1) so the relay sends what we lack; paced."""
        if self.resyncing:
            return
        if self.resyncs.allow(now):
            self.resyncing = True
            self.session.send_step1(self.host.state())
        else:
            self.deferred_resync = True
            self.timer_wanted = True


def deletes_of(update: bytes, info: UpdateInfo) -> bytes:
    """``update``'s delete set alone, as an update (no content)."""
    return get_update(update, encode_state_vector(info.state))


def split_clients(update: bytes, info: UpdateInfo, clients: set[int]) -> tuple[bytes, bytes | None]:
    """``update`` cut in two: the part of ``clients``, and the rest (None when the update
    holds no other client). Each part carries the delete set (deleting is idempotent)."""
    if len(clients) == len(info.starts):
        return update, None
    others = {c: end for c, end in info.state.items() if c not in clients}
    theirs = {c: end for c, end in info.state.items() if c in clients}
    return (
        get_update(update, encode_state_vector(others)),
        get_update(update, encode_state_vector(theirs)),
    )
