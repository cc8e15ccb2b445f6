"""The checker: did every replica and relay converge, and is every edit that must be there there?

Presence is judged by Yjs ids, not by visible content: a concurrent overwrite or a later
delete legitimately hides an edit's value, but never its ids. An edit is present in a
final state when that state's state vector covers every struct the edit created and its
delete set covers every deletion the edit made. Two participants converged when their
state vectors and delete sets are equal: those two sets identify a Yjs document's content.

Pure: no processes, no sockets. The campaign feeds it records and final states.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from pycrdt import get_state

from ..protocol import decode_state_vector
from ..updates import check_update

__all__ = ["EditRecord", "FinalState", "Violation", "check_history", "final_state"]

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

    @classmethod
    def from_update(
        cls, edit_id: str, replica: str, step: int, update: bytes, acknowledged: bool = False
    ) -> EditRecord:
        """Record an edit from its transaction's update."""
        info = check_update(update)
        return cls(edit_id, replica, step, info.starts, info.state, info.deletes, acknowledged)


@dataclass(frozen=True, slots=True)
class FinalState:
    """What one participant (a replica, or a fresh replica of a relay's store) holds at the end."""

    name: str
    state_vector: dict[int, int]
    deletes: Ranges

    def missing(self, edit: EditRecord) -> str | None:
        """Why ``edit`` is not present here, or None if it is."""
        for client, end in edit.ends.items():
            have = self.state_vector.get(client, 0)
            if have < end:
                start = edit.starts.get(client, 0)
                return f"structs {client}:{start}..{end - 1} not integrated (state {have})"
        for client, ranges in edit.deletes.items():
            held = self.deletes.get(client, [])
            for clock, length in ranges:
                if not _covers(held, clock, length):
                    return f"deletion of {client}:{clock}..{clock + length - 1} not applied"
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


def _difference(a: FinalState, b: FinalState, edits: Sequence[EditRecord] = ()) -> str:
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
    return "; ".join(parts) or f"{a.name} and {b.name} differ"


def final_state(name: str, update: bytes) -> FinalState:
    """Summarise a participant's whole document (``Doc.get_update()``) for the checker."""
    # The state vector comes from get_state, which stops at the first clock gap: a Doc's
    # encoding also carries structs waiting behind a gap (after a skip), and those are
    # not integrated, so they must not count as present.
    state = decode_state_vector(get_state(update))
    return FinalState(name, state, _normalise(check_update(update).deletes))


@dataclass(frozen=True, slots=True)
class Violation:
    """Something the run promised and did not deliver."""

    kind: str  # "diverged" | "lost-acknowledged" | "lost-applied"
    message: str
    edit: str | None = None
    where: tuple[str, ...] = field(default_factory=tuple)

    def __str__(self) -> str:
        return self.message


def check_history(
    edits: Sequence[EditRecord], finals: Iterable[FinalState], *, lost_files: Iterable[str] = ()
) -> list[Violation]:
    """Check convergence and presence; return every violation found (empty: all is well).

    Args:
        edits: every edit a replica reported applied (after its local commit).
        finals: the final state of every replica and of a fresh replica per relay store.
        lost_files: replicas whose file was destroyed: their edits that were never
            acknowledged may legitimately be gone; acknowledged ones may not.
    """
    finals = list(finals)
    lost = set(lost_files)
    violations: list[Violation] = []
    if not finals:
        return [Violation("diverged", "no participant reported a final state")]
    reference = finals[0]
    differing = [
        f.name
        for f in finals[1:]
        if (f.state_vector, f.deletes) != (reference.state_vector, reference.deletes)
    ]
    if differing:
        details = [_difference(reference, f, edits) for f in finals[1:] if f.name in differing]
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
        absent = {f.name: why for f in finals if (why := f.missing(edit)) is not None}
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
