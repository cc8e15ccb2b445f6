"""Workloads: the random edits a convergence campaign makes.

A workload is a callable ``(doc: pycrdt.Doc, rng: random.Random) -> str`` that makes
ONE random edit to ``doc`` and returns an id for it, unique across every replica of the
run (the harness wraps the call in one transaction, and judges the edit's presence by
its Yjs ids, not by the id string: the string is only its name in reports). It must
take all its randomness from ``rng`` so that ``--seed`` replays it. It may read the
document to choose what to do (positions, keys) and should delete and overwrite, not
only append: a checker is only as good as the edits it has to check.

Name one on the command line as ``module:function`` (``--workload examples.workloads.todo:edit``).
"""

from __future__ import annotations

import importlib
import random
from collections.abc import Callable
from typing import Any

from pycrdt import Array, Doc, Map, Text

__all__ = ["Workload", "default_workload", "insert_only_workload", "load_workload"]

Workload = Callable[[Doc[Any], random.Random], str]

_ALPHABET = "abcdefghij é€😀\n"


def _code_point_to_byte(text: str, index: int) -> int:
    # pycrdt indexes Text in UTF-8 bytes (DESIGN: facts from the anchors)
    return len(text[:index].encode("utf-8"))


def default_workload(doc: Doc[Any], rng: random.Random) -> str:
    """Mixed edits over Text, Map, Array and nested types, with deletes and overwrites."""
    edit_id = f"{doc.client_id:x}-{rng.getrandbits(48):012x}"
    text = doc.get("text", type=Text)
    mapping = doc.get("map", type=Map)
    array = doc.get("array", type=Array)
    choice = rng.randrange(8)
    content = str(text)
    if choice == 0 or (choice == 1 and not content):
        word = "".join(rng.choice(_ALPHABET) for _ in range(rng.randint(1, 5)))
        text.insert(_code_point_to_byte(content, rng.randint(0, len(content))), word)
    elif choice == 1:
        start = rng.randrange(len(content))
        end = min(len(content), start + rng.randint(1, 4))
        del text[_code_point_to_byte(content, start) : _code_point_to_byte(content, end)]
    elif choice == 2:
        mapping[f"k{rng.randrange(6)}"] = rng.choice([edit_id, rng.randint(0, 99), None, True])
    elif choice == 3:
        key = f"k{rng.randrange(6)}"
        if key in mapping:
            del mapping[key]
        else:
            mapping[key] = edit_id
    elif choice == 4 or (choice == 5 and not len(array)):
        array.insert(rng.randint(0, len(array)), edit_id)
    elif choice == 5:
        del array[rng.randrange(len(array))]
    elif choice == 6:
        mapping[f"n{rng.randrange(3)}"] = Map({"id": edit_id, "items": Array([rng.random()])})
    else:
        nested = mapping.get(f"n{rng.randrange(3)}")
        if isinstance(nested, Map) and isinstance(nested.get("items"), Array):
            nested["items"].append(edit_id)
        else:
            array.append(Text(edit_id))
    return edit_id


def insert_only_workload(doc: Doc[Any], rng: random.Random) -> str:
    """Text inserts only: no later edit can supersede a lost one, so any loss shows.

    Useful to test a relay for lost updates; use :func:`default_workload` (deletes and
    overwrites) to test convergence.
    """
    edit_id = f"{doc.client_id:x}-{rng.getrandbits(48):012x}"
    text = doc.get("text", type=Text)
    content = str(text)
    text.insert(_code_point_to_byte(content, rng.randint(0, len(content))), f"[{edit_id}]")
    return edit_id


def load_workload(spec: str) -> Workload:
    """Import ``module:function`` and return the callable.

    Raises:
        ValueError: the spec is not ``module:function``, or names nothing callable.
    """
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"workload must be module:function, not {spec!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"cannot import workload module {module_name!r}: {exc}") from exc
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ValueError(f"workload {spec!r}: {module_name} has no callable {attr!r}")
    return fn  # type: ignore[no-any-return]
