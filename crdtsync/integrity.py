"""Which parts of an update a writer may add to a document: pure, no I/O.

The integrity rule (DESIGN: relay, integrity): a store never holds two different
contents for one Yjs ``(client, clock)``. pycrdt cannot apply such a pair: it raises
("block parent ... must be deleted or shared ref type") or crashes, and a replica that
stored the pair could never open its file again. The rule is decided per document from a
small record, the :class:`Ledger`, which the store keeps beside the content it describes:

- for every client id, the clock ranges stored and the owner (if any);
- the ids of items that are shared types, the only items another item may name as its
  parent.

An update is judged against the ledger (:meth:`Ledger.judge`):

- **New content** (clocks the store does not hold) is accepted unless its client id is
  owned by another writer (impersonation). A writer owns the client ids it proved (a
  crdtsync replica proves the key its id is derived from, :func:`client_id_of_key`); the
  first proven write of an id records the owner, with no coordination between relays.
- **Repeated content** (clocks the store holds) must equal what is stored, unit by unit;
  equal content is trimmed (not stored twice), different content is refused. Equality
  is judged per clock unit on what Yjs keeps invariant when it splits and merges items:
  the unit's left origin, right origin, parent (when named), and content value (numbers
  by value, objects regardless of key order). A deleted or garbage-collected unit on
  either side matches anything: its content is gone, and its id still refers to the
  same place.
- **Parents by id** must name a shared type: stored, created by the same update, or a
  not-yet-stored clock of the writer's own client (recorded as a claim that the content
  arriving there later must honour). Anything else would make every replica's
  ``apply_update`` fail.

A refusal covers one client's content in one update; the rest of the update (other
clients, the delete set) is accepted. Deletes never conflict: deleting is idempotent.

What the ledger cannot know: content written to an unowned client id (an anonymous stock
client's) by someone else *before* its writer wrote it there wins, as the first write
always does; and an owner that writes two different contents for one clock itself gets
the second refused.
"""

from __future__ import annotations

import hashlib
import json
import struct
from bisect import bisect_right
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pycrdt import get_update

from .protocol import encode_state_vector
from .updates import UpdateInfo, check_update

__all__ = [
    "KEY_OWNER",
    "MAX_RANGES_PER_CLIENT",
    "ClientsAsRead",
    "Comparison",
    "Ledger",
    "Lookup",
    "Refusal",
    "Shipped",
    "Verdict",
    "Writer",
    "client_id_of_key",
    "compare_stored",
    "read_units",
]

_TYPE_REF = 7  # ContentRef.TYPE
# Each gap a client leaves in its clocks is a range the ledger keeps (and rewrites with
# every append of that client): honest clients leave a few, briefly (reordered
# deliveries); a writer that keeps skipping ahead is refused beyond this.
MAX_RANGES_PER_CLIENT = 1024
KEY_OWNER = "key"  # owned by whoever proves the key the client id is derived from
_ID_DOMAIN = b"crdtsync client id\x00"
_CLIENT_ID_MASK = 2**53 - 1  # lib0 and Yrs agree on ids up to 2^53-1


def client_id_of_key(key: bytes) -> int:
    """The client id derived from a writer's 32-byte key (0 means: draw another key).

    Any relay can check a claim to an id without a shared table: the claimant shows the
    key. Ids have 53 bits, so finding a key for a given id takes about 2^53 hashes.
    """
    if len(key) != 32:
        raise ValueError(f"a client key has 32 bytes, not {len(key)}")
    digest = hashlib.sha256(_ID_DOMAIN + key).digest()
    return int.from_bytes(digest[:8], "big") & _CLIENT_ID_MASK


@dataclass(frozen=True, slots=True)
class Writer:
    """Who sends an update: the client ids it proved, and its token subject if any.

    ``Writer()`` is an anonymous stock client: it may write unowned client ids only.
    ``awaiting_claims``: a crdtsync replica whose claims have not arrived yet. It may not
    write unowned ids meanwhile: content it sends first would be stored with no owner
    (its claim skips ids with content), so anyone could extend its ids later. Its
    refusal is "unproven": the replica claims and sends it again.
    """

    proven: frozenset[int] = frozenset()
    subject: str | None = None
    awaiting_claims: bool = False

    def owner_for(self, client: int) -> str | None:
        """The owner a first write of ``client`` by this writer records (None: none).

        An id it proved is owned by its key; any other id it writes first is owned by
        its token's subject (every connection with that subject may write there).
        """
        if client in self.proven:
            return KEY_OWNER
        if self.subject is not None:
            return f"sub:{self.subject}"
        return None

    def may_write(self, client: int, owner: str | None) -> bool:
        """Whether this writer may add new content under ``client`` owned by ``owner``."""
        if owner is None:
            return not self.awaiting_claims
        if owner == KEY_OWNER:
            return client in self.proven
        return self.subject is not None and owner == f"sub:{self.subject}"


@dataclass(frozen=True, slots=True)
class Shipped(Writer):
    """Another region's link: its content was judged where it was written, so it may
    write any client id; it names the owners those ids have there (``owners``), which a
    first write here records (where an id has none), so that the same writers, and only
    they, may go on writing those ids here. Owners are checkable anywhere: a key is the
    same key, a token subject the same subject, in every region."""

    owners: Mapping[int, str] = field(default_factory=dict, kw_only=True)

    def owner_for(self, client: int) -> str | None:
        """The owner ``client`` has in the region it comes from (None: none there)."""
        return self.owners.get(client)

    def may_write(self, client: int, owner: str | None) -> bool:
        """Always: content is judged here, ownership where it was written."""
        return True


@dataclass(frozen=True, slots=True)
class Refusal:
    """Content of one client in one update that was refused, and why.

    ``unproven``: refused only because the writer has not proven that it owns the client
    id; a writer that can prove it (and whose proof was lost or overtaken) may retry.
    """

    client: int
    start: int
    end: int
    reason: str
    unproven: bool = False


@dataclass(slots=True)  # one per stored update: a frozen __init__ costs too much here
class Verdict:
    """What to store of an update: ``update`` (None: nothing) and what was refused."""

    update: bytes | None
    refusals: list[Refusal]
    trimmed: bool = False  # repeated content was cut away

    @property
    def accepted_whole(self) -> bool:
        """Nothing refused: the update may be acknowledged."""
        return not self.refusals


# -- clock ranges -----------------------------------------------------------------------


def _add_range(ranges: list[tuple[int, int]], start: int, end: int) -> None:
    """Add ``[start, end)`` to sorted, disjoint, non-adjacent ``ranges`` in place."""
    if ranges and ranges[-1][1] == start:  # the common case: appending at the end
        ranges[-1] = (ranges[-1][0], end)
        return
    if not ranges or ranges[-1][1] < start:
        ranges.append((start, end))
        return
    i = bisect_right(ranges, (start, end))
    lo = i
    while lo > 0 and ranges[lo - 1][1] >= start:
        lo -= 1
    hi = i
    while hi < len(ranges) and ranges[hi][0] <= end:
        hi += 1
    merged_start = min([start] + [r[0] for r in ranges[lo:hi]])
    merged_end = max([end] + [r[1] for r in ranges[lo:hi]])
    ranges[lo:hi] = [(merged_start, merged_end)]


def _intersect(ranges: list[tuple[int, int]], start: int, end: int) -> Iterator[tuple[int, int]]:
    """The parts of ``[start, end)`` inside ``ranges``."""
    for lo, hi in ranges:
        if hi <= start:
            continue
        if lo >= end:
            break
        yield max(lo, start), min(hi, end)


def _contains(ranges: list[tuple[int, int]], clock: int) -> bool:
    i = bisect_right(ranges, (clock, 2**64))
    return i > 0 and ranges[i - 1][1] > clock


def encode_ranges(ranges: list[tuple[int, int]]) -> bytes:
    """Pack ranges for the store (pairs of unsigned 64-bit integers)."""
    return struct.pack(f"<{2 * len(ranges)}Q", *(n for r in ranges for n in r))


def decode_ranges(data: bytes) -> list[tuple[int, int]]:
    """Unpack what :func:`encode_ranges` packed."""
    nums = struct.unpack(f"<{len(data) // 8}Q", data)
    return list(zip(nums[::2], nums[1::2], strict=True))


# -- the ledger -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ClientsAsRead:
    """A condition on an append (crdtsync.backend): these clients' ledger entries are
    still what the judgement read, whatever else the document received meanwhile.

    ``clients``: client id -> (its ranges as :func:`encode_ranges` writes them, None
    where it had no entry; its owner, None where unowned). Updates that name no parents
    are judged on nothing else, so concurrent writers of other client ids (on other
    relay processes) never make them judge again. ``position``: also the document's
    position (updates naming parents are judged on the types too, which only an append
    of content changes); None: any.
    """

    clients: dict[int, tuple[bytes | None, str | None]]
    position: int | None = None


@dataclass
class Ledger:
    """The per-document record the integrity rule needs; the store persists it.

    Attributes:
        ranges: client id -> stored clock ranges, sorted, disjoint.
        owners: client id -> owner (``"key"``, ``"sub:<subject>"``); absent: unowned.
        types: ids of stored shared-type items.
        claims: client id -> clocks a writer named as parents of its own items before
            storing them: the content written there later must be a shared type.
        dirty: clients whose ranges or owner changed since :meth:`clean`.
        new_types: ``(client, clock, claimed)`` added since :meth:`clean`; a claim
            that is fulfilled comes again with ``claimed`` false.
        known: the store holds this ledger (otherwise its first write records it).
        max_clients: content of further client ids is refused beyond this many (each
            costs every sync request a state-vector entry); None: no limit.
        shared: what is accepted goes to other peers (a relay's ledger), who may still
            hold live what this store holds deleted; False for a replica judging what
            reaches its own document.
    """

    ranges: dict[int, list[tuple[int, int]]] = field(default_factory=dict)
    owners: dict[int, str] = field(default_factory=dict)
    types: set[tuple[int, int]] = field(default_factory=set)
    claims: dict[int, set[int]] = field(default_factory=dict)
    dirty: set[int] = field(default_factory=set)
    new_types: list[tuple[int, int, bool]] = field(default_factory=list)
    known: bool = False
    max_clients: int | None = None
    shared: bool = True

    @classmethod
    def of_updates(cls, updates: Iterable[bytes]) -> Ledger:
        """Build the ledger of stored content (e.g. a store written before ledgers)."""
        ledger = cls()
        for update in updates:
            ledger.record(check_update(update))
        ledger.dirty = set(ledger.ranges)
        return ledger

    @classmethod
    def of_state(cls, state: dict[int, int]) -> Ledger:
        """A ledger holding ``[0, clock)`` of every client of a state vector (a replica's Doc)."""
        return cls(ranges={c: [(0, clock)] for c, clock in state.items() if clock})

    def clean(self) -> None:
        """Forget what changed: the store has written it."""
        self.dirty.clear()
        self.new_types.clear()

    def record(self, info: UpdateInfo) -> None:
        """Record content as stored without judging it (it is already in the store)."""
        for client in info.state:
            ranges = self.ranges.setdefault(client, [])
            for start, end in info.ranges(client):
                _add_range(ranges, start, end)
            self.dirty.add(client)
        self._add_types(info.types)

    def claim(self, clients: Iterable[int], writer: Writer, limit: int = 16) -> None:
        """Record ``writer`` as the owner of fresh client ids it proved, before it writes.

        A replica's id is visible (in its presence) before its first edit: owning it from
        the proof on means nobody can write there first. Only for ids with no content
        (the caller's word: the claimant says so); ids with content here are skipped. At
        most ``limit`` ids per call (rows without content must stay few); the others
        become owned by their first proven write.
        """
        recorded = 0
        for client in clients:
            if recorded >= limit:
                break
            if client in self.owners or client not in writer.proven or self.ranges.get(client):
                continue
            if self.max_clients is not None and len(self.ranges) >= self.max_clients:
                break
            self.owners[client] = KEY_OWNER
            self.ranges.setdefault(client, [])
            self.dirty.add(client)
            recorded += 1

    def _add_types(self, type_ids: Iterable[tuple[int, int]]) -> None:
        for client, clock in type_ids:
            if (client, clock) not in self.types:
                self.types.add((client, clock))
                self.new_types.append((client, clock, False))
                claims = self.claims.get(client)
                if claims is not None:
                    claims.discard(clock)
                    if not claims:
                        del self.claims[client]

    def _add_claim(self, client: int, clock: int) -> None:
        if (client, clock) not in self.types and clock not in self.claims.get(client, ()):
            self.claims.setdefault(client, set()).add(clock)
            self.new_types.append((client, clock, True))

    def overlaps(self, info: UpdateInfo) -> bool:
        """Whether the update repeats stored clocks or names a stored non-type as parent.

        If so, :meth:`judge` needs the stored content of the document (the slow path);
        otherwise it decides from the ledger alone.
        """
        ranges_of = self.ranges
        for client, start in info.starts.items():
            ranges = ranges_of.get(client)
            if (
                ranges
                and start < ranges[-1][1]
                and any(True for r in info.ranges(client) for _ in _intersect(ranges, *r))
            ):
                return True
        for _, _, parent_client, parent_clock in info.parents:
            parent = (parent_client, parent_clock)
            if parent not in self.types and _contains(
                ranges_of.get(parent_client, []), parent_clock
            ):
                return True
        return False

    def judge(
        self,
        update: bytes,
        info: UpdateInfo,
        writer: Writer | None,
        stored: Sequence[bytes] | Callable[[], Sequence[bytes]] = (),
        comparison: Comparison | None = None,
    ) -> Verdict:
        """Decide what of ``update`` may be stored, and record it in this ledger.

        Args:
            update: a valid update (:func:`~crdtsync.updates.check_update` passed).
            info: its :class:`~crdtsync.updates.UpdateInfo`.
            writer: who sends it; None checks content only, not ownership (a replica
                judging what its relay sends).
            stored: the stored content of the document (snapshot and tail, or a Doc's
                encoding), or a function returning it: it is needed (and called, once)
                only when :meth:`overlaps` would say so.
            comparison: what :func:`compare_stored` found for this update, computed
                ahead (e.g. in a worker process); used if the ledger's :meth:`lookup`
                for the update is still the same, else computed again here.

        Returns:
            The part to store (the update itself when nothing is cut) and the refusals.
        """
        if not info.parents and not info.holes and self.append_only(info, writer):
            return Verdict(update, [])
        if callable(stored):
            stored = _Lazy(stored)
        unproven: set[int] = set()  # refused for want of a proof of ownership only
        trim: dict[int, int] = {}  # client -> first clock to keep (repeated prefix cut)
        lookup = self.lookup(info)
        if comparison is None or comparison.lookup != lookup:
            # (Computed ahead for another state of the ledger: the store grew meanwhile.)
            comparison = compare_stored(update, lookup, stored, self.ends)
        refused = dict(comparison.refused)
        inexact = set(comparison.inexact)  # repeats that matched only thanks to deleted units
        stored_units = {c: dict(u) for c, u in comparison.units.items()}
        for client, start in info.starts.items():
            if client in refused:
                continue
            ranges = self.ranges.get(client)
            new = (
                [r for rng in info.ranges(client) for r in _subtract(rng, ranges)]
                if ranges
                else info.ranges(client)
            )
            if not new:
                trim[client] = info.state[client]  # all of it repeats what is stored
                continue
            if not ranges and self.max_clients is not None and len(self.ranges) >= self.max_clients:
                refused[client] = (
                    f"the document already has {len(self.ranges)} client ids, the limit: "
                    f"content of client {client} refused"
                )
                continue
            owner = self.owners.get(client)
            if writer is not None and not writer.may_write(client, owner):
                unproven.add(client)
                whose = (
                    "is not proven yet (claims come first)"
                    if owner is None
                    else "belongs to another writer"
                )
                refused[client] = (
                    f"client {client} {whose}: new content at clocks "
                    f"{new[0][0]}-{new[-1][1] - 1} refused"
                )
                continue
            if (
                ranges
                and len(ranges) + len(new) > MAX_RANGES_PER_CLIENT
                and (_ranges_after(ranges, new) > MAX_RANGES_PER_CLIENT)
            ):
                refused[client] = (
                    f"client {client} would leave more than {MAX_RANGES_PER_CLIENT} gaps "
                    "in its clocks: fill them first"
                )
                continue
            if new[0][0] > start:
                trim[client] = new[0][0]
            claimed = self._claims_broken(client, new, info)
            if claimed is not None:
                refused[client] = claimed
        # Refusing a client also refuses the types it would have created, which other
        # clients' items of this update may name as parents: repeat until nothing changes.
        own_ranges = {c: info.ranges(c) for c in {p[2] for p in info.parents} if c in info.state}
        while True:
            before = len(refused)
            created = {t for t in info.types if t[0] not in refused}
            for client, clock, parent_client, parent_clock in info.parents:
                if client not in refused and not _contains(self.ranges.get(client, []), clock):
                    # (a child the store holds already is a repeat: trimmed, not judged)
                    reason = self._parent_problem(
                        client,
                        clock,
                        (parent_client, parent_clock),
                        created,
                        own_ranges,
                        info.gone,
                        stored,
                        stored_units,
                    )
                    if reason is not None:
                        refused[client] = reason
            if len(refused) == before:
                break
        result: bytes | None = update
        if refused or trim:
            cut = {client: info.state[client] for client in refused}
            cut.update(trim)
            result, untrimmed = _cut(update, info, cut, inexact)
            for client in untrimmed:
                # Its repeat could only be stored whole, and it differs from what is
                # stored where the store's copy is deleted: storing it would be a rewrite.
                refused[client] = (
                    f"client {client}: a repeat that matches only deleted content cannot be "
                    "cut exactly (a string split between surrogate halves)"
                )
        # Record what is accepted.
        for client in info.state:
            if client in refused:
                continue
            if trim.get(client) == info.state[client]:
                # All of it stored already. A link names the owner it has where it was
                # written: recorded all the same, where it has none here.
                if isinstance(writer, Shipped) and client not in self.owners:
                    owner = writer.owner_for(client)
                    if owner is not None:
                        self.owners[client] = owner
                        self.dirty.add(client)
                continue
            ranges = self.ranges.setdefault(client, [])
            for start, end in info.ranges(client):
                if start < trim.get(client, start):
                    start = trim[client]
                if end > start:
                    _add_range(ranges, start, end)
            self.dirty.add(client)
            if client not in self.owners and writer is not None:
                owner = writer.owner_for(client)
                if owner is not None:
                    self.owners[client] = owner
        self._add_types(t for t in info.types if t[0] not in refused)
        for client, _, parent_client, parent_clock in info.parents:
            if (
                client not in refused
                and parent_client == client
                and (parent_client, parent_clock) not in self.types
                and not any(lo <= parent_clock < hi for lo, hi in info.ranges(client))
                and not _contains(self.ranges.get(client, []), parent_clock)
            ):
                self._add_claim(parent_client, parent_clock)
        refusals = [
            Refusal(client, info.starts[client], info.state[client], reason, client in unproven)
            for client, reason in refused.items()
        ]
        return Verdict(result, refusals, trimmed=bool(trim))

    def as_read(self, clients: Iterable[int]) -> dict[int, tuple[bytes | None, str | None]]:
        """What this ledger holds of ``clients``, for a :class:`ClientsAsRead` condition."""
        ranges, owners = self.ranges, self.owners
        return {
            c: (encode_ranges(ranges[c]) if c in ranges else None, owners.get(c)) for c in clients
        }

    def append_only(self, info: UpdateInfo, writer: Writer | None) -> bool:
        """The fast path: record an update that only appends after what is stored.

        True: accepted as it is and recorded (what :meth:`judge` would do). Callers
        check first that ``info`` has no ``parents`` and no ``holes``.

        This is nearly every update (one writer typing): nothing repeats, nothing is
        owned by another writer, no claim is involved. Returns False, changing
        nothing, when the update needs the full judgement.
        """
        ranges_of, owners, claims = self.ranges, self.owners, self.claims
        for client, start in info.starts.items():
            ranges = ranges_of.get(client)
            if ranges and (start < ranges[-1][1] or len(ranges) >= MAX_RANGES_PER_CLIENT):
                return False
            if (
                not ranges
                and self.max_clients is not None
                and len(ranges_of) + len(info.starts) > self.max_clients
            ):
                return False
            if client in claims:
                return False
            owner = owners.get(client)
            if (
                writer is not None
                and (owner is not None or writer.awaiting_claims)
                and not writer.may_write(client, owner)
            ):
                return False
        state = info.state
        for client, start in info.starts.items():
            ranges = ranges_of.get(client)
            if not ranges:
                ranges_of[client] = [(start, state[client])]
            elif ranges[-1][1] == start:
                ranges[-1] = (ranges[-1][0], state[client])
            else:
                ranges.append((start, state[client]))
            self.dirty.add(client)
            if writer is not None and client not in owners:
                owner = writer.owner_for(client)
                if owner is not None:
                    owners[client] = owner
        if info.types:
            self._add_types(info.types)
        return True

    def lookup(self, info: UpdateInfo) -> Lookup:
        """What judging ``info`` would read of the stored content (nothing for most updates).

        The clocks it repeats, and the stored items it names as parents that the ledger
        does not know as types; with every stored client's end clock, which lets the
        reader cut each stored update down to those clients first.
        """
        needed = self._repeated(info)
        if not info.parents:
            return Lookup(needed, []) if needed else _NO_LOOKUP  # nearly every update
        parents = sorted(
            {
                (pc, pk)
                for c, k, pc, pk in info.parents
                if (pc, pk) not in self.types
                and not _contains(self.ranges.get(c, []), k)
                and _contains(self.ranges.get(pc, []), pk)
            }
        )
        if not needed and not parents:
            return _NO_LOOKUP
        return Lookup(needed, parents)

    def ends(self) -> dict[int, int]:
        """Every stored client's end clock."""
        return {client: ranges[-1][1] for client, ranges in self.ranges.items() if ranges}

    def _repeated(self, info: UpdateInfo) -> dict[int, list[tuple[int, int]]]:
        """Client -> clock ranges of the update that the store already holds."""
        needed: dict[int, list[tuple[int, int]]] = {}
        for client, start in info.starts.items():
            ranges = self.ranges.get(client)
            if not ranges or start >= ranges[-1][1]:
                continue
            parts = [p for r in info.ranges(client) for p in _intersect(ranges, *r)]
            if parts:
                needed[client] = parts
        return needed

    def _parent_problem(
        self,
        client: int,
        clock: int,
        parent: ID,
        created: set[ID],
        own_ranges: dict[int, list[tuple[int, int]]],
        gone: list[tuple[int, int, int]],
        stored: Sequence[bytes],
        stored_units: dict[int, dict[int, Unit]],
    ) -> str | None:
        """Why an item at ``(client, clock)`` may not name ``parent`` (None: it may)."""
        parent_client, parent_clock = parent
        if parent in self.types:
            return None
        if not _contains(self.ranges.get(parent_client, []), parent_clock):
            if parent in created:
                return None  # a shared type this very update creates
            if any(lo <= parent_clock < hi for lo, hi in own_ranges.get(parent_client, ())):
                if any(c == parent_client and lo <= parent_clock < hi for c, lo, hi in gone):
                    return None  # written deleted: Yjs and Yrs both drop the child
                return (
                    f"item at client {client} clock {clock} names ({parent_client}, "
                    f"{parent_clock}) as parent, which the same update writes as no shared type"
                )
            if parent_clock in self.claims.get(parent_client, ()) or parent_client == client:
                return None  # the writer's own earlier clock, not stored yet: a claim
            return (
                f"item at client {client} clock {clock} names ({parent_client}, "
                f"{parent_clock}) as parent, which this document does not hold"
            )
        # Stored: what is stored there decides, whatever this update says of it.
        unit = _stored_unit(stored, stored_units, parent, self.ends())
        if isinstance(unit, _Wildcard):
            if not self.shared:
                return None  # deleted here: Yjs and Yrs both drop the child
            # Deleted in the store, but a peer may still hold it live: unless it was a
            # shared type, the child would break that peer's document.
            return (
                f"item at client {client} clock {clock} names ({parent_client}, "
                f"{parent_clock}) as parent, a deleted item not known as a shared type"
            )
        if unit is not None and unit[4] == _TYPE_REF:
            self._add_types([parent])  # a type the ledger did not know (a replica's)
            return None
        return (
            f"item at client {client} clock {clock} names ({parent_client}, "
            f"{parent_clock}) as parent, which is not a shared type"
        )

    def _claims_broken(
        self, client: int, new: list[tuple[int, int]], info: UpdateInfo
    ) -> str | None:
        """A reason if new content lands a non-type on a clock claimed for a type."""
        claims = self.claims.get(client)
        if not claims:
            return None
        created = set(info.types)
        for clock in claims:
            if (
                any(lo <= clock < hi for lo, hi in new)
                and (client, clock) not in created
                and not any(c == client and lo <= clock < hi for c, lo, hi in info.gone)
            ):
                return (
                    f"client {client} clock {clock} was named as a parent before it was "
                    "written, and the content now written there is not a shared type"
                )
        return None


@dataclass(frozen=True)
class Lookup:
    """What judging one update reads of the stored content (:meth:`Ledger.lookup`)."""

    needed: dict[int, list[tuple[int, int]]]  # repeated clock ranges per client
    parents: list[ID]  # stored items named as parents, not known as types

    def __bool__(self) -> bool:
        return bool(self.needed or self.parents)


_NO_LOOKUP = Lookup({}, [])


@dataclass(frozen=True)
class Comparison:
    """What the stored content says of an update's repeats (:func:`compare_stored`)."""

    lookup: Lookup
    refused: dict[int, str]  # client -> why its repeat differs from what is stored
    inexact: frozenset[int]  # clients whose repeat matched only thanks to deleted units
    units: dict[int, dict[int, Unit]]  # the stored units read (parents' included)


def compare_stored(
    update: bytes,
    lookup: Lookup,
    stored: Sequence[bytes] | Callable[[], Sequence[bytes]],
    ends: dict[int, int] | Callable[[], dict[int, int]],
) -> Comparison:
    """Compare an update's repeats with the stored content, and read the named parents.

    The part of a judgement that costs in proportion to the repeat and the document:
    pure, so a relay can run it in a worker process (``stored`` and ``ends`` are read
    only if ``lookup`` asks for something). ``ends``: every stored client's end clock
    (:meth:`Ledger.ends`), or a function returning them; it only lets the reader skip
    other clients' content, so ends read later than the lookup serve as well.
    """
    if not lookup:
        return Comparison(lookup, {}, frozenset(), {})
    if callable(stored):
        stored = _Lazy(stored)
    if callable(ends):
        ends = ends()
    refused: dict[int, str] = {}
    inexact: set[int] = set()
    stored_units: dict[int, dict[int, Unit]] = {}
    needed = lookup.needed
    if needed:
        # Deleted and collected units of the update match anything: only the others
        # are compared, so a short GC struct claiming a long range costs nothing.
        incoming = read_units(update, needed, skip_wildcards=True)
        for client, clocks in needed.items():
            units = incoming.get(client, {})
            if len(units) < sum(hi - lo for lo, hi in clocks):
                inexact.add(client)  # deleted (or skipped) units in its repeat
        needed = {c: _runs(sorted(u)) for c, u in incoming.items() if u}
        if needed:
            stored_units = _collect_units(stored, needed, ends)
        for client in needed:
            reason, exact = _compare(client, incoming[client], stored_units)
            if reason is not None:
                refused[client] = reason
            elif not exact:
                inexact.add(client)
    for parent in lookup.parents:
        _stored_unit(stored, stored_units, parent, ends)
    if needed:
        # Only what the judgement reads again is kept: the parents' units (a worker
        # sends this back; the repeats' units can be megabytes).
        wanted = set(lookup.parents)
        stored_units = {
            c: {k: u for k, u in units.items() if (c, k) in wanted}
            for c, units in stored_units.items()
        }
    return Comparison(lookup, refused, frozenset(inexact), stored_units)


class _Lazy(Sequence[bytes]):
    """The stored content, read on first use (most judgements never need it)."""

    def __init__(self, load: Callable[[], Sequence[bytes]]) -> None:
        self._load = load
        self._items: Sequence[bytes] | None = None

    def _get(self) -> Sequence[bytes]:
        if self._items is None:
            self._items = self._load()
        return self._items

    def __len__(self) -> int:
        return len(self._get())

    def __getitem__(self, index: Any) -> Any:
        return self._get()[index]

    def __iter__(self) -> Iterator[bytes]:
        return iter(self._get())


def _ranges_after(ranges: list[tuple[int, int]], new: list[tuple[int, int]]) -> int:
    """How many ranges ``ranges`` would hold with ``new`` added (filling gaps merges)."""
    after = list(ranges)
    for start, end in new:
        _add_range(after, start, end)
    return len(after)


def _subtract(rng: tuple[int, int], ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The parts of ``rng`` outside ``ranges``."""
    start, end = rng
    out = []
    for lo, hi in _intersect(ranges, start, end):
        if lo > start:
            out.append((start, lo))
        start = hi
    if end > start:
        out.append((start, end))
    return out


def _cut(
    update: bytes, info: UpdateInfo, cut: dict[int, int], inexact: set[int]
) -> tuple[bytes | None, set[int]]:
    """Drop each client's structs below ``cut[client]``; None if nothing is left.

    pycrdt 0.14 cuts strings by UTF-16 offset but keeps them as UTF-8: a cut between the
    halves of a surrogate pair loses a unit and shifts every later clock of that block
    (found by tests/test_integrity.py). A cut that did not land where asked is undone for
    that client: its repeated prefix, found equal, is then stored again, which is
    harmless, where shifted clocks would be a rewrite. A client in ``inexact`` (its
    repeat matched only thanks to deleted units) is dropped instead, and returned: its
    repeat is not the same content as the store's, so it cannot be stored again.
    """
    if all(cut.get(c) == end for c, end in info.state.items()) and not info.deletes:
        return None, set()
    sv = {client: cut.get(client, 0) for client in info.state}
    result = get_update(update, encode_state_vector(sv))
    sliced = [c for c, clock in cut.items() if clock < info.state[c]]
    if not sliced:
        return result, set()
    got = check_update(result)
    misplaced = [
        c for c in sliced if got.starts.get(c) != cut[c] or got.state.get(c) != info.state[c]
    ]
    if not misplaced:
        return result, set()
    dropped = {c for c in misplaced if c in inexact}
    for client in misplaced:
        sv[client] = info.state[client] if client in dropped else 0
    if all(sv[c] == end for c, end in info.state.items()) and not info.deletes:
        return None, dropped
    return get_update(update, encode_state_vector(sv)), dropped


def _runs(clocks: list[int]) -> list[tuple[int, int]]:
    """Sorted clocks as ``[start, end)`` runs."""
    runs: list[tuple[int, int]] = []
    for clock in clocks:
        if runs and runs[-1][1] == clock:
            runs[-1] = (runs[-1][0], clock + 1)
        else:
            runs.append((clock, clock + 1))
    return runs


# -- units: what one clock of content is ------------------------------------------------


class _Wildcard:
    """A deleted or garbage-collected clock: its content is gone, it matches anything."""

    def __repr__(self) -> str:
        return "WILDCARD"


WILDCARD = _Wildcard()
ID = tuple[int, int]
# (left origin, right origin, parent, parent key, content ref, value)
Unit = tuple[ID | None, ID | None, Any, str | None, int, Any] | _Wildcard


def _collect_units(
    stored: Iterable[bytes],
    needed: dict[int, list[tuple[int, int]]],
    ends: dict[int, int] | None = None,
) -> dict[int, dict[int, Unit]]:
    """The stored units at the ``needed`` clocks.

    With ``ends`` (every stored client's end clock), each stored update is first cut
    down by pycrdt to the needed clients from their first needed clock, so the cost in
    Python follows the overlap, not the document's size.
    """
    sv = None
    if ends is not None:
        # Other clients are dropped whole; the needed ones are kept whole (a cut inside
        # one of their strings could land between surrogate halves: see _cut).
        cut = dict(ends)
        for client in needed:
            cut[client] = 0
        sv = encode_state_vector(cut)
    units: dict[int, dict[int, Unit]] = {}
    for update in stored:
        if sv is not None:
            update = get_update(update, sv)
        for client, clocks in read_units(update, needed).items():
            mine = units.setdefault(client, {})
            for clock, unit in clocks.items():
                if mine.get(clock, WILDCARD) is WILDCARD:
                    mine[clock] = unit  # prefer real content to a deleted copy
    return units


def _stored_unit(
    stored: Sequence[bytes],
    cache: dict[int, dict[int, Unit]],
    unit_id: ID,
    ends: dict[int, int] | None = None,
) -> Unit | None:
    client, clock = unit_id
    if clock not in cache.get(client, {}):
        found = _collect_units(stored, {client: [(clock, clock + 1)]}, ends)
        for client_units in found.values():
            cache.setdefault(client, {}).update(client_units)
    return cache.get(client, {}).get(clock)


def _same(a: Unit, b: Unit) -> bool:
    if isinstance(a, _Wildcard) or isinstance(b, _Wildcard) or a == b:
        return True
    # A string split inside a surrogate pair: Yjs and Yrs replace both halves by U+FFFD.
    if a[:5] == b[:5] and a[4] == 4:
        pair = {a[5], b[5]}
        return 0xFFFD in pair and any(0xD800 <= u <= 0xDFFF for u in pair)
    return False


def _compare(
    client: int, incoming: dict[int, Unit], stored: dict[int, dict[int, Unit]]
) -> tuple[str | None, bool]:
    """Why the incoming units differ from the stored ones (None: they do not), and
    whether they matched without the help of a deleted stored unit."""
    mine = stored.get(client, {})
    exact = True
    for clock, new in incoming.items():
        old = mine.get(clock)
        if old is None:
            continue  # a hole in the store's copy (a skip): nothing to compare
        if isinstance(old, _Wildcard):
            exact = False
        elif not _same(new, old):
            return (
                f"client {client} clock {clock} rewritten: it differs from the stored "
                f"content ({_describe(new)} instead of {_describe(old)})"
            ), False
    return None, exact


def _describe(unit: Unit) -> str:
    if isinstance(unit, _Wildcard):
        return "deleted"
    value = unit[5]
    text = chr(value) if unit[4] == 4 and 0x20 <= value < 0xD800 else repr(value)
    return text if len(text) <= 24 else text[:21] + "..."


def read_units(
    update: bytes, wanted: dict[int, list[tuple[int, int]]], *, skip_wildcards: bool = False
) -> dict[int, dict[int, Unit]]:
    """Read the content units of ``update`` at the wanted clocks of the wanted clients.

    ``update`` must be valid (:func:`~crdtsync.updates.check_update` passed): this
    reader trusts its framing. It walks the whole update; only wanted units are kept.
    With ``skip_wildcards``, deleted and collected units are left out (they match
    anything), so a huge deleted range costs no more than its few bytes.
    """
    r = _Reader(update, skip_wildcards)
    out: dict[int, dict[int, Unit]] = {}
    for _ in range(r.uint()):
        num_structs = r.uint()
        client = r.uint()
        clock = r.uint()
        ranges = wanted.get(client)
        units = out.setdefault(client, {}) if ranges else None
        for _ in range(num_structs):
            clock = r.struct(client, clock, ranges, units)
    return out


class _Reader:
    """A cursor over a validated v1 update (lib0 encoding)."""

    def __init__(self, data: bytes, skip_wildcards: bool = False) -> None:
        self.data = data
        self.pos = 0
        self.skip_wildcards = skip_wildcards

    def uint(self) -> int:
        data, pos = self.data, self.pos
        num = shift = 0
        while True:
            byte = data[pos]
            pos += 1
            num |= (byte & 0x7F) << shift
            if byte < 0x80:
                self.pos = pos
                return num
            shift += 7

    def signed(self) -> int:
        byte = self.data[self.pos]
        self.pos += 1
        num = byte & 0x3F
        negative = byte & 0x40
        shift = 6
        while byte & 0x80:
            byte = self.data[self.pos]
            self.pos += 1
            num |= (byte & 0x7F) << shift
            shift += 7
        return -num if negative else num

    def var_bytes(self) -> bytes:
        size = self.uint()
        start = self.pos
        self.pos += size
        return self.data[start : self.pos]

    def string(self) -> str:
        return self.var_bytes().decode()

    def id(self) -> ID:
        client = self.uint()
        return client, self.uint()

    def any(self) -> Any:
        """A lib0 Any value, normalised so that equal values compare equal."""
        kind = self.data[self.pos]
        self.pos += 1
        if kind == 119:
            return ("s", self.string())
        if kind == 125:
            return ("n", self.signed())
        if kind in (124, 123):
            size = 4 if kind == 124 else 8
            (value,) = struct.unpack(
                ">f" if size == 4 else ">d", self.data[self.pos : self.pos + size]
            )
            self.pos += size
            if value != value:
                return ("nan",)  # NaN equals nothing, not even itself: name it instead
            return ("n", int(value) if value.is_integer() else value)
        if kind == 122:
            (value,) = struct.unpack(">q", self.data[self.pos : self.pos + 8])
            self.pos += 8
            return ("n", value)
        if kind in (121, 120):
            return ("b", kind == 120)
        if kind == 126:
            return ("null",)
        if kind == 127:
            return ("undefined",)
        if kind == 117:
            return ("a", tuple(self.any() for _ in range(self.uint())))
        if kind == 118:
            entries = {}
            for _ in range(self.uint()):
                key = self.string()
                entries[key] = self.any()
            return ("o", tuple(sorted(entries.items())))
        if kind == 116:
            return ("y", self.var_bytes())
        raise AssertionError(f"unknown Any type {kind} in a validated update")

    def json(self) -> Any:
        return _normalise_json(json.loads(self.string()))

    def struct(
        self,
        client: int,
        clock: int,
        ranges: list[tuple[int, int]] | None,
        units: dict[int, Unit] | None,
    ) -> int:
        """Read one struct at ``clock``; keep its wanted units; return the next clock."""
        info = self.data[self.pos]
        self.pos += 1
        ref = info & 0x1F
        if ref in (0, 10):  # GC, skip
            length = self.uint()
            if ref == 0 and units is not None and ranges is not None and not self.skip_wildcards:
                for k in _wanted(ranges, clock, clock + length):
                    units[k] = WILDCARD
            return clock + length
        origin = self.id() if info & 0x80 else None
        right = self.id() if info & 0x40 else None
        parent: Any = None
        sub = None
        if not info & 0xC0:
            parent = ("root", self.string()) if self.uint() == 1 else self.id()
            if info & 0x20:
                sub = self.string()
        values: list[Any] | None
        if ref == 4:  # string: one unit per UTF-16 code unit
            raw = self.string().encode("utf-16-le")
            values = list(struct.unpack(f"<{len(raw) // 2}H", raw))
        elif ref == 8:
            values = [self.any() for _ in range(self.uint())]
        elif ref == 1:  # deleted
            length = self.uint()
            if units is not None and ranges is not None and not self.skip_wildcards:
                for k in _wanted(ranges, clock, clock + length):
                    units[k] = WILDCARD
            return clock + length
        elif ref == 3:
            values = [self.var_bytes()]
        elif ref == 5:
            values = [self.json()]
        elif ref == 6:
            key = self.string()
            values = [(key, self.json())]
        elif ref == 7:
            type_ref = self.uint()
            values = [(type_ref, self.string() if type_ref == 3 else None)]
        elif ref == 9:
            # A subdocument is its guid: its options differ between the Doc that made it
            # (shouldLoad true) and every re-encoding (false), for the same content.
            guid = self.string()
            self.any()
            values = [guid]
        else:  # JSON content (2) is refused by check_update
            raise AssertionError(f"content ref {ref} in a validated update")
        length = len(values)
        if units is not None and ranges is not None:
            for k in _wanted(ranges, clock, clock + length):
                i = k - clock
                if i == 0:
                    units[k] = (origin, right, parent, sub, ref, values[0])
                else:
                    units[k] = ((client, k - 1), right, None, None, ref, values[i])
        return clock + length


def _wanted(ranges: list[tuple[int, int]], start: int, end: int) -> Iterator[int]:
    for lo, hi in _intersect(ranges, start, end):
        yield from range(lo, hi)


def _normalise_json(value: Any) -> Any:
    if isinstance(value, bool):
        return ("b", value)
    if isinstance(value, (int, float)):
        return ("n", int(value) if float(value).is_integer() else value)
    if isinstance(value, str):
        return ("s", value)
    if value is None:
        return ("null",)
    if isinstance(value, list):
        return ("a", tuple(_normalise_json(v) for v in value))
    return ("o", tuple(sorted((k, _normalise_json(v)) for k, v in value.items())))
