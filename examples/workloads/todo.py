"""Workload: a shared todo list, for ``crdtsync check --workload examples.workloads.todo:edit``.

The document holds one root ``Array`` named ``"todos"``; each item is a ``Map``::

    {"title": Text, "done": bool, "tags": Array[str]}

:func:`edit` makes one random edit: add an item, edit a title (insert or delete
characters), toggle ``done`` (replicas toggling the same item concurrently overwrite
one map key), add or remove a tag, move an item (pycrdt has no move: delete it and
insert a copy elsewhere, as apps do) or delete an item. Every edit changes the
document, and deletions are frequent: the list is never append-only.

pycrdt 0.14 indexes ``Text`` in UTF-8 bytes, so positions are chosen in code points of
``str(title)`` and converted with :func:`byte_offset`; titles hold non-ASCII text
(accents, CJK, emoji) so that forgetting the conversion would show.
"""

from __future__ import annotations

import itertools
import random
from typing import Any

from pycrdt import Array, Doc, Map, Text

__all__ = ["ROOT", "edit", "view"]

ROOT = "todos"

TITLES = (
    "buy milk",
    "café with Zoë",
    "Grüße an Jürgen",
    "日本茶を買う",
    "🍎 apples",
    "crème brûlée",
    "call Bob",
    "naïve plan ✓",
)
SNIPPETS = ("!", " asap", "é", "ß", " 😀", "日本", " ½", "x")
TAGS = ("home", "work", "urgent", "später", "🛒", "été")

# Ids must be unique across replicas: the doc's client id names the replica, the
# counter numbers the edits made in this process.
_edits = itertools.count(1)


def byte_offset(s: str, index: int) -> int:
    """The UTF-8 byte offset of code point ``index`` in ``s`` (what pycrdt's Text expects)."""
    return len(s[:index].encode())


def edit(doc: Doc[Any], rng: random.Random) -> str:
    """Make one random edit to the todo list in ``doc``; return a unique id for it.

    The caller wraps the call in one transaction. All randomness comes from ``rng``.
    """
    todos = doc.get(ROOT, type=Array)
    n = len(todos)
    ops = ["add"]
    if n:
        ops += ["title"] * 4 + ["toggle"] * 3 + ["tag"] * 2 + ["delete"] * 2
    if n >= 2:
        ops += ["move"] * 2
    if n > 8:
        ops += ["delete"] * 3  # keep the list short, so edits meet on the same items
    op = rng.choice(ops)
    if op == "add":
        _add(todos, rng.randint(0, n), rng.choice(TITLES), rng.random() < 0.2, [])
    elif op == "title":
        _edit_title(todos[rng.randrange(n)]["title"], rng)
    elif op == "toggle":
        item = todos[rng.randrange(n)]
        # .get: after out-of-order delivery the old value may be deleted and the new
        # one not applied yet (see README.md)
        item["done"] = not item.get("done", False)
    elif op == "tag":
        tags = todos[rng.randrange(n)]["tags"]
        if len(tags) and rng.random() < 0.5:
            del tags[rng.randrange(len(tags))]
        else:
            tags.append(rng.choice(TAGS))
    elif op == "move":
        src = rng.randrange(n)
        dst = rng.choice([i for i in range(n) if i != src])
        item = todos[src]
        title = str(item["title"])
        done = bool(item.get("done", False))  # see toggle
        tags_copy = item["tags"].to_py()
        del todos[src]
        _add(todos, dst, title, done, tags_copy)
    else:
        del todos[rng.randrange(n)]
    return f"{doc.client_id}-{next(_edits)}"


def _add(todos: Array[Any], index: int, title: str, done: bool, tags: list[str]) -> None:
    todos.insert(index, Map({"title": Text(title), "done": done, "tags": Array(tags)}))


def _edit_title(title: Text, rng: random.Random) -> None:
    s = str(title)
    if s and rng.random() < 0.4:
        start = rng.randrange(len(s))
        stop = min(len(s), start + rng.randint(1, 4))
        del title[byte_offset(s, start) : byte_offset(s, stop)]
    else:
        title.insert(byte_offset(s, rng.randint(0, len(s))), rng.choice(SNIPPETS))


def view(doc: Doc[Any]) -> list[dict[str, Any]]:
    """The todo list as plain Python values: equal on replicas that converged."""
    return doc.get(ROOT, type=Array).to_py() or []
