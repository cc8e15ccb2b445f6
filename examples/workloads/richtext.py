"""Workload: rich text, for ``crdtsync check --workload examples.workloads.richtext:edit``.

The document holds a root ``Map`` named ``"meta"`` whose ``"title"`` key replicas
overwrite concurrently, and a root ``Array`` named ``"paragraphs"`` of ``Text`` with
formatting attributes (``bold``, ``italic``, ``link``, ``color``), as a rich-text editor
stores them.

:func:`edit` makes one random edit: type text (sometimes formatted) into a paragraph,
delete a range, toggle or set formatting on a range, split a paragraph in two, join
two paragraphs, add or delete a paragraph, or set the title. Every edit changes the
document (a formatting edit toggles the attribute of the range's first character, so
it is never a no-op), and many edits delete.

pycrdt 0.14 indexes ``Text`` in UTF-8 bytes: positions are chosen in code points of
``str(paragraph)`` and converted with :func:`byte_offset`, and the text is full of
non-ASCII characters so that forgetting the conversion would show (pycrdt appends an
insert at a position inside a character to the end of the text, and panics on such
a delete). Embeds are left out: ``str(text)`` omits them while they take an index, so
code-point positions taken from ``str`` would no longer line up.
"""

from __future__ import annotations

import itertools
import random
from typing import Any

from pycrdt import Array, Doc, Map, Text

__all__ = ["META", "PARAGRAPHS", "edit", "view"]

META = "meta"
PARAGRAPHS = "paragraphs"

TITLES = ("Draft", "Entwurf für Köln", "草稿", "Ébauche ✍️", "Notes 📝")
WORDS = ("the ", "naïve ", "façade ", "Straße ", "日本語 ", "emoji 🎉 ", "ø ", "x", "\n")
TOGGLES = ("bold", "italic")

Chunk = tuple[str, dict[str, Any] | None]

# Ids must be unique across replicas: the doc's client id names the replica, the
# counter numbers the edits made in this process.
_edits = itertools.count(1)


def byte_offset(s: str, index: int) -> int:
    """The UTF-8 byte offset of code point ``index`` in ``s`` (what pycrdt's Text expects)."""
    return len(s[:index].encode())


def edit(doc: Doc[Any], rng: random.Random) -> str:
    """Make one random edit to the rich text in ``doc``; return a unique id for it.

    The caller wraps the call in one transaction. All randomness comes from ``rng``.
    """
    meta = doc.get(META, type=Map)
    paragraphs = doc.get(PARAGRAPHS, type=Array)
    n = len(paragraphs)
    ops = ["title", "add_paragraph"]
    if n:
        ops += ["insert"] * 6 + ["delete"] * 4 + ["format"] * 3 + ["split"]
    if n >= 2:
        ops += ["join", "delete_paragraph"]
    op = rng.choice(ops)
    if op == "title":
        meta["title"] = rng.choice(TITLES)
    elif op == "add_paragraph":
        paragraphs.insert(rng.randint(0, n), Text(rng.choice(WORDS)))
    elif op == "delete_paragraph":
        del paragraphs[rng.randrange(n)]
    else:
        i = rng.randrange(n)
        text: Text = paragraphs[i]
        s = str(text)
        if op == "insert" or not s:
            _insert(text, s, rng)
        elif op == "delete":
            start = rng.randrange(len(s))
            stop = min(len(s), start + rng.randint(1, 6))
            del text[byte_offset(s, start) : byte_offset(s, stop)]
        elif op == "format":
            _format(text, s, rng)
        elif op == "split":
            at = rng.randint(0, len(s))
            tail = _chunks_from(text.diff(), at)
            del text[byte_offset(s, at) :]
            paragraphs.insert(i + 1, Text())
            _append_chunks(paragraphs[i + 1], tail)
        else:  # join paragraph i with the one after it (or before it, for the last)
            first, second = (i, i + 1) if i + 1 < n else (i - 1, i)
            _append_chunks(paragraphs[first], paragraphs[second].diff())
            del paragraphs[second]
    return f"{doc.client_id}-{next(_edits)}"


def _insert(text: Text, s: str, rng: random.Random) -> None:
    at = byte_offset(s, rng.randint(0, len(s)))
    word = rng.choice(WORDS)
    if rng.random() < 0.3:
        text.insert(at, word, {rng.choice(TOGGLES): True})
    else:
        text.insert(at, word)  # takes the formatting of the text before it, as in editors


def _format(text: Text, s: str, rng: random.Random) -> None:
    start = rng.randrange(len(s))
    stop = min(len(s), start + rng.randint(1, 8))
    attr = rng.choice((*TOGGLES, "link", "color"))
    if attr in TOGGLES:
        current = _attributes_at(text.diff(), start).get(attr)
        value: Any = None if current else True  # None removes the attribute
    elif attr == "link":
        value = f"https://example.org/{rng.getrandbits(32):08x}"
    else:
        value = f"#{rng.getrandbits(24):06x}"
    text.format(byte_offset(s, start), byte_offset(s, stop), {attr: value})


def _attributes_at(diff: list[Chunk], index: int) -> dict[str, Any]:
    """The formatting attributes of the character at code point ``index``."""
    for chunk, attrs in diff:
        if index < len(chunk):
            return attrs or {}
        index -= len(chunk)
    return {}


def _chunks_from(diff: list[Chunk], index: int) -> list[Chunk]:
    """The formatted chunks from code point ``index`` to the end."""
    out: list[Chunk] = []
    for chunk, attrs in diff:
        if index < len(chunk):
            out.append((chunk[index:], attrs))
            index = 0
        else:
            index -= len(chunk)
    return out


def _append_chunks(text: Text, chunks: list[Chunk]) -> None:
    for chunk, attrs in chunks:
        # {} rather than None: an unformatted chunk must not inherit the formatting
        # of the chunk before it.
        text.insert(len(str(text).encode()), chunk, attrs or {})


def view(doc: Doc[Any]) -> dict[str, Any]:
    """The title and every paragraph's formatted chunks: equal on replicas that converged."""
    paragraphs = doc.get(PARAGRAPHS, type=Array)
    return {
        "title": doc.get(META, type=Map).get("title"),
        "paragraphs": [paragraphs[i].diff() for i in range(len(paragraphs))],
    }
