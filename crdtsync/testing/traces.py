"""Real editing traces (josephg/editing-traces format) replayed into pycrdt documents.

Trace positions count Unicode code points; pycrdt 0.14 indexes ``Text`` in UTF-8
bytes. :class:`TextMirror` converts each position against the current content, so a
replay of non-ASCII text ends right instead of silently wrong (DESIGN: anchors).
"""

from __future__ import annotations

import gzip
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from pycrdt import Text

__all__ = ["TextMirror", "Trace", "find_trace", "load_trace"]

Patch = tuple[int, int, str]


@dataclass(frozen=True, slots=True)
class Trace:
    """A recorded editing history: transactions of patches, and the exact final text."""

    name: str
    txns: list[list[Patch]]
    end_content: str

    def __len__(self) -> int:
        return len(self.txns)


def load_trace(path: str | Path) -> Trace:
    """Load a gzipped JSON trace (``{"txns": [{"patches": [...]}], "endContent": ...}``)."""
    path = Path(path)
    with gzip.open(path, "rt", encoding="utf-8") as f:
        data = json.load(f)
    txns = [[(int(p[0]), int(p[1]), str(p[2])) for p in t["patches"]] for t in data["txns"]]
    return Trace(path.name.split(".")[0], txns, data["endContent"])


def find_trace(name: str) -> Path | None:
    """Where trace ``name`` lives: ``$CRDTSYNC_TRACES`` or ``../shared/data/traces``."""
    candidates = []
    if env := os.environ.get("CRDTSYNC_TRACES"):
        candidates.append(Path(env))
    repo = Path(__file__).resolve().parents[2]
    candidates += [repo.parent / "shared" / "data" / "traces", Path.cwd() / "traces"]
    for folder in candidates:
        path = folder / f"{name}.json.gz"
        if path.is_file():
            return path
    return None


class TextMirror:
    """Applies trace patches to a pycrdt ``Text``, converting code points to UTF-8 bytes.

    Keeps a Python copy of the text to convert positions; while it is pure ASCII
    (the common case) a position needs no conversion at all.
    """

    def __init__(self, text: Text, content: str = "") -> None:
        self.text = text
        self.content = content
        self._non_ascii = sum(1 for ch in content if ord(ch) > 127)

    def _byte(self, pos: int) -> int:
        if not self._non_ascii:
            return pos
        return len(self.content[:pos].encode("utf-8"))

    def apply(self, patches: list[Patch]) -> None:
        """Apply one transaction's patches (call inside ``doc.transaction()`` to group them)."""
        for pos, delete, insert in patches:
            if delete:
                start = self._byte(pos)
                removed = self.content[pos : pos + delete]
                end = start + len(removed.encode("utf-8"))
                del self.text[start:end]
                self._non_ascii -= sum(1 for ch in removed if ord(ch) > 127)
                self.content = self.content[:pos] + self.content[pos + delete :]
            if insert:
                self.text.insert(self._byte(pos), insert)
                self._non_ascii += sum(1 for ch in insert if ord(ch) > 127)
                self.content = self.content[:pos] + insert + self.content[pos:]


def iter_txns(trace: Trace, limit: int | None = None) -> Iterator[list[Patch]]:
    """The trace's transactions, optionally only the first ``limit``."""
    yield from trace.txns[:limit] if limit is not None else trace.txns
