"""The checker: did every replica and relay converge, and is every edit that must be there there?

Presence is judged by Yjs ids, not by visible content: a concurrent overwrite or a later
delete legitimately hides an edit's value, but never its ids. An edit is present in a
final state when that state's state vector covers every struct the edit created, holds
the edit's own content at those ids (:mod:`crdtsync.testing.content`), and its delete
set covers every deletion the edit made. Two participants converged when their state
vectors and delete sets are equal and they hold compatible content at every id.

The content check matters once someone writes two different contents under one
``(client, clock)`` (a hostile participant, or a relay that lets one through): state
vectors and delete sets then agree while the documents differ, and an acknowledged
edit can be *replaced* without a single id going missing. Writes a hostile participant
made are passed in as :class:`ForeignWrite` s so that a violation can say whose content
took an edit's place.

Pure: no processes, no sockets. The campaign feeds it records and final states.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace

from pycrdt import get_state

from ..protocol import decode_state_vector
from ..updates import check_update
from .content import Unit, Units, compatible, describe_unit, read_units

__all__ = [
    "EditRecord",
    "FinalState",
    "ForeignWrite",
    "Violation",
    "check_history",
    "content_conflicts",
    "converged",
    "final_state",
    "in_document",
    "stored_conflicts",
]

Ranges = dict[int, list[tuple[int, int]]]


def _normalise(deletes: Ranges) -> Ranges:
    out: Ranges = {}
    for client, ranges in deletes.items():
        merged: list[tuple[int, int]] = []
        for clock, length in sorted(ranges):
            if length <= 0:
                continue
            if merged and clock <= merged[-1][0] + merged[-1][1]:
                start, prev = merged[-1]
                merged[-1] = (start, max(prev, clock + length - start))
            else:
                merged.append((clock, length))
        if merged:
            out[client] = merged
    return out


def _covers(ranges: list[tuple[int, int]], clock: int, length: int) -> bool:
    end = clock + length
    for start, size in ranges:
        if start <= clock < start + size:
            if end <= start + size:
                return True
            clock = start + size
    return False


@dataclass(frozen=True, slots=True)
class EditRecord:
    """One edit as made: its name, who made it, and the Yjs ids it created and deleted."""

    id: str
    replica: str
    step: int
    starts: dict[int, int]
    ends: dict[int, int]
    deletes: Ranges
    acknowledged: bool = False
    # The content the edit wrote, id by id; empty: judged by ids only (older callers).
    units: Units = field(default_factory=dict, compare=False, repr=False)
    document: str = ""  # the document it edited (a campaign over many documents)

    @classmethod
    def from_update(
        cls,
        edit_id: str,
        replica: str,
        step: int,
        update: bytes,
        acknowledged: bool = False,
        *,
        document: str = "",
    ) -> EditRecord:
        """Record an edit from its transaction's update."""
        info = check_update(update)
        return cls(
            edit_id,
            replica,
            step,
            info.starts,
            info.state,
            info.deletes,
            acknowledged,
            read_units(update),
            document,
        )

    @property
    def key(self) -> tuple[str, str]:
        """``(document, edit id)``: edit ids are unique within a document."""
        return (self.document, self.id)


@dataclass(frozen=True, slots=True)
class ForeignWrite:
    """Content a hostile participant wrote, kept to name it when it turns up in a final state.

    ``kind`` is the attack (``rewrite``, ``impersonate``...), ``author`` the
    participant's name, ``client`` the client id it wrote under.
    """

    author: str
    step: int
    kind: str
    client: int
    units: Units = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_update(
        cls, author: str, step: int, kind: str, client: int, update: bytes
    ) -> ForeignWrite:
        """Record a write from the update the hostile participant sent."""
        check_update(update)
        return cls(author, step, kind, client, read_units(update))

    def __str__(self) -> str:
        return f"{self.author} wrote under client {self.client} ({self.kind} at step {self.step})"


@dataclass(frozen=True, slots=True)
class FinalState:
    """What one participant (a replica, or a fresh replica of a relay's store) holds at the end."""

    name: str
    state_vector: dict[int, int]
    deletes: Ranges
    # Integrated content, id by id; empty: compared by ids only (older callers).
    units: Units = field(default_factory=dict, compare=False, repr=False)

    def missing(
        self,
        edit: EditRecord,
        writes: Sequence[ForeignWrite] = (),
        edits: Sequence[EditRecord] = (),
    ) -> str | None:
        """Why ``edit`` is not present here, or None if it is.

        ``writes`` and ``edits`` only serve to name what took the edit's place.
        """
        for client, end in edit.ends.items():
            have = self.state_vector.get(client, 0)
            if have < end:
                start = edit.starts.get(client, 0)
                return f"structs {client}:{start}..{end - 1} not integrated (state {have})" + (
                    _foreign_hint(writes, client, start, end)
                )
        if self.units and edit.units:
            replaced = [
                (id_, self.units.get(id_, _ABSENT))
                for id_, unit in sorted(edit.units.items())
                if not compatible(unit, self.units.get(id_, _ABSENT))
            ]
            if replaced:
                (client, first), theirs = replaced[0]
                last = replaced[-1][0][1] if replaced[-1][0][0] == client else first
                return (
                    f"structs {client}:{first}..{last} hold other content: "
                    f"{_whose(theirs, (client, first), writes, edits, exclude=edit)} "
                    f"instead of the edit's {describe_unit(edit.units[(client, first)])}"
                )
        for client, ranges in edit.deletes.items():
            held = self.deletes.get(client, [])
            for clock, length in ranges:
                if not _covers(held, clock, length):
                    return f"deletion of {client}:{clock}..{clock + length - 1} not applied" + (
                        _foreign_hint(writes, client, clock, clock + length)
                    )
        return None


def _edits_touching(edits: Sequence[EditRecord], client: int, clock: int, end: int) -> str:
    names = [
        e.id
        for e in edits
        if (e.starts.get(client, end) < end and e.ends.get(client, 0) > clock)
        or any(c < end and c + n > clock for c, n in e.deletes.get(client, []))
    ]
    if not names:
        return ""
    more = f" and {len(names) - 3} more" if len(names) > 3 else ""
    return f" (edits {', '.join(names[:3])}{more})"


# A unit the encoding lacks although the state vector covers it: never compatible.
_ABSENT = Unit(None, None, "(absent from the encoding)", None, ("absent",))


def _whose(
    unit: Unit | None,
    id_: tuple[int, int],
    writes: Sequence[ForeignWrite],
    edits: Sequence[EditRecord],
    exclude: EditRecord | None = None,
) -> str:
    """Name who wrote ``unit`` at ``id_``: a hostile write, an edit, or just describe it."""
    if unit is None:
        return "collected content"
    if unit is _ABSENT:
        return "nothing in its encoding"
    # Equal first, then merely compatible (a deleted value matches any value).
    for exact in (True, False):
        for w in writes:
            if id_ in w.units and _matches(w.units[id_], unit, exact):
                return f"content that {w}"
        for e in edits:
            if e is not exclude and id_ in e.units and _matches(e.units[id_], unit, exact):
                return f"edit {e.id} of {e.replica}"
    return f"other content ({describe_unit(unit)})"


def _foreign_hint(writes: Sequence[ForeignWrite], client: int, start: int, end: int) -> str:
    """Name hostile writes under ``client`` at clocks in ``[start, end)``, if any."""
    hits = [w for w in writes if any(c == client and start <= k < end for c, k in w.units)]
    if not hits:
        return ""
    more = f" and {len(hits) - 2} more" if len(hits) > 2 else ""
    return f"; {'; '.join(str(w) for w in hits[:2])}{more} at these clocks"


def _matches(a: Unit | None, b: Unit, exact: bool) -> bool:
    return a == b if exact else compatible(a, b)


def content_conflicts(a: FinalState, b: FinalState) -> list[tuple[int, int]]:
    """The ids at which both participants hold content, and incompatible content, ascending."""
    if len(a.units) > len(b.units):
        a, b = b, a
    return sorted(
        id_
        for id_, unit in a.units.items()
        if id_ in b.units and not compatible(unit, b.units[id_])
    )


def converged(a: FinalState, b: FinalState) -> bool:
    """Same ids, same deletions, compatible content."""
    return (a.state_vector, a.deletes) == (b.state_vector, b.deletes) and not content_conflicts(
        a, b
    )


def _runs(ids: list[tuple[int, int]]) -> list[tuple[int, int, int]]:
    """Group ascending ids into ``(client, first clock, last clock)`` runs."""
    runs: list[tuple[int, int, int]] = []
    for client, clock in ids:
        if runs and runs[-1][0] == client and runs[-1][2] == clock - 1:
            runs[-1] = (client, runs[-1][1], clock)
        else:
            runs.append((client, clock, clock))
    return runs


def _difference(
    a: FinalState,
    b: FinalState,
    edits: Sequence[EditRecord] = (),
    writes: Sequence[ForeignWrite] = (),
) -> str:
    """Name the Yjs ids one participant holds and the other lacks, and the edits they are."""
    parts = []
    for client in sorted(set(a.state_vector) | set(b.state_vector)):
        x, y = a.state_vector.get(client, 0), b.state_vector.get(client, 0)
        if x != y:
            more, less = (a, b) if x > y else (b, a)
            lo, hi = min(x, y), max(x, y)
            parts.append(
                f"{more.name} has structs {client}:{lo}..{hi - 1} that {less.name} lacks"
                + _edits_touching(edits, client, lo, hi)
            )
    for client in sorted(set(a.deletes) | set(b.deletes)):
        da, db = a.deletes.get(client, []), b.deletes.get(client, [])
        only_a = [r for r in da if not _covers(db, *r)]
        only_b = [r for r in db if not _covers(da, *r)]
        for who, other, ranges in ((a, b, only_a), (b, a, only_b)):
            for clock, length in ranges:
                parts.append(
                    f"{who.name} deleted {client}:{clock}..{clock + length - 1} "
                    f"but {other.name} did not"
                    + _edits_touching(edits, client, clock, clock + length)
                )
    for client, first, last in _runs(content_conflicts(a, b))[:3]:
        id_ = (client, first)
        parts.append(
            f"{a.name} and {b.name} hold different content at {client}:{first}..{last}: "
            f"{a.name} has {_whose(a.units[id_], id_, writes, edits)}, "
            f"{b.name} has {_whose(b.units[id_], id_, writes, edits)}"
        )
    return "; ".join(parts) or f"{a.name} and {b.name} differ"


def stored_conflicts(
    name: str,
    updates: Iterable[bytes],
    edits: Sequence[EditRecord] = (),
    writes: Sequence[ForeignWrite] = (),
) -> list[Violation]:
    """Ids for which a store holds two different contents, across its stored updates.

    The integrity rule (DESIGN: relay) in one check: a store that holds both may answer
    a joiner with either, and a replica or a compaction that applies both fails. It is
    damage before anyone has noticed, so it is reported even when every participant
    still agrees. One violation per client, naming both contents.
    """
    seen: Units = {}
    # client -> the ids in conflict, and the first pair of contents found
    found: dict[int, tuple[list[tuple[int, int]], Unit | None, Unit | None]] = {}
    for update in updates:
        for id_, unit in read_units(update).items():
            if id_ not in seen:
                seen[id_] = unit
            elif not compatible(seen[id_], unit):
                ids, first, second = found.setdefault(id_[0], ([], seen[id_], unit))
                ids.append(id_)
    violations = []
    for _, (ids, first, second) in sorted(found.items(), key=lambda item: item[0]):
        runs = _runs(sorted(set(ids)))
        where = ", ".join(f"{c}:{lo}..{hi}" for c, lo, hi in runs[:3])
        id_ = ids[0]
        violations.append(
            Violation(
                "store-conflict",
                f"{name} holds two different contents for {where}: "
                f"{_whose(first, id_, writes, edits)} and {_whose(second, id_, writes, edits)}; "
                "a joiner gets one or the other, and pycrdt may refuse the pair",
                where=(name,),
            )
        )
    return violations


def final_state(name: str, update: bytes) -> FinalState:
    """Summarise a participant's whole document (``Doc.get_update()``) for the checker."""
    # The state vector comes from get_state, which stops at the first clock gap: a Doc's
    # encoding also carries structs waiting behind a gap (after a skip), and those are
    # not integrated, so they must not count as present.
    state = decode_state_vector(get_state(update))
    deletes = _normalise(check_update(update).deletes)
    return FinalState(name, state, deletes, read_units(update, state))


@dataclass(frozen=True, slots=True)
class Violation:
    """Something the run promised and did not deliver."""

    # "diverged" | "lost-acknowledged" | "lost-applied" | "unusable" | "store-conflict" |
    # "quarantined" | "refused" | "protocol"
    kind: str
    message: str
    edit: str | None = None
    where: tuple[str, ...] = field(default_factory=tuple)
    document: str | None = None  # set when a campaign checks many documents

    def __str__(self) -> str:
        return self.message


def in_document(violations: Iterable[Violation], document: str | None) -> list[Violation]:
    """``violations`` found in ``document``, saying so (unchanged when it is None)."""
    if document is None:
        return list(violations)
    return [
        replace(v, message=f"document {document}: {v.message}", document=document)
        for v in violations
    ]


def check_history(
    edits: Sequence[EditRecord],
    finals: Iterable[FinalState],
    *,
    lost_files: Iterable[str] = (),
    writes: Sequence[ForeignWrite] = (),
    document: str | None = None,
) -> list[Violation]:
    """Check convergence and presence; return every violation found (empty: all is well).

    Args:
        edits: every edit a replica reported applied (after its local commit).
        finals: the final state of every replica and of a fresh replica per relay store.
        lost_files: replicas whose file was destroyed: their edits that were never
            acknowledged may legitimately be gone; acknowledged ones may not.
        writes: what hostile participants wrote; only used to name what replaced an
            edit or made two participants differ.
        document: the document the states and edits are of, when a campaign checks
            many: every violation names it.
    """
    return in_document(_check_history(edits, finals, lost_files, writes), document)


def _check_history(
    edits: Sequence[EditRecord],
    finals: Iterable[FinalState],
    lost_files: Iterable[str],
    writes: Sequence[ForeignWrite],
) -> list[Violation]:
    finals = list(finals)
    lost = set(lost_files)
    violations: list[Violation] = []
    if not finals:
        return [Violation("diverged", "no participant reported a final state")]
    reference = finals[0]
    differing = [f.name for f in finals[1:] if not converged(reference, f)]
    if differing:
        details = [
            _difference(reference, f, edits, writes) for f in finals[1:] if f.name in differing
        ]
        violations.append(
            Violation(
                "diverged",
                f"final states differ: {'; '.join(details)}",
                where=tuple([reference.name, *differing]),
            )
        )
    for edit in edits:
        if edit.replica in lost and not edit.acknowledged:
            continue
        absent = {
            f.name: why for f in finals if (why := f.missing(edit, writes, edits)) is not None
        }
        if not absent:
            continue
        kind = "lost-acknowledged" if edit.acknowledged else "lost-applied"
        where = tuple(sorted(absent))
        first = absent[where[0]]
        state = "acknowledged by the relay" if edit.acknowledged else "applied and committed"
        present = sorted(f.name for f in finals if f.name not in absent)
        seen = f"; still present at {', '.join(present)}" if present else "; present nowhere"
        violations.append(
            Violation(
                kind,
                f"edit {edit.id} ({state} on {edit.replica} at step {edit.step}) is missing "
                f"from {', '.join(where)}: {first}{seen}",
                edit=edit.id,
                where=where,
            )
        )
    return violations
