"""``crdtsync store``: tools for operators, on a relay's store (a SQLite file or a Redis).

``ls`` (documents, positions, tail lengths, sizes), ``show`` (a document's content as
JSON), ``compact`` (one document, or all), ``export`` / ``import`` (a document as one Yjs
update, readable by any Yjs implementation), ``check`` (read every document, report any
that fails). Reading and compacting are safe beside running relays (the store's reads
are consistent and its compaction is safe against concurrent appends). An import writes
a document's integrity ledger too: a SQLite relay keeps ledgers in memory, so an import
into a SQLite file waits for its relay to stop (:func:`crdtsync.store.serving_lock`);
Redis relays read ledgers conditionally, so an import there is safe beside them.

Root types: a Yjs update does not record whether a root is a text, a map, an array or
an XML fragment (a Yjs program says so when it reads it). ``show`` tells them apart by
their content: keyed entries make a map, string items make a text (its array view is
its characters), XML elements make a fragment, other items an array; an empty root is
``null``. ``--type NAME=KIND`` overrides that for one root.
"""

from __future__ import annotations

import json
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, TextIO

from pycrdt import Array, Doc, Map, Text, XmlFragment

from crdtsync.backend import RelayStore, is_redis_address
from crdtsync.errors import MalformedMessage, StoreError
from crdtsync.folders import document_digest
from crdtsync.store import EMPTY_UPDATE, lock_store
from crdtsync.updates import check_update

from .stores import open_store

__all__ = ["ROOT_KINDS", "StoreToolError", "root_kinds", "run_store_command", "show_document"]

ROOT_KINDS = ("text", "map", "array", "xml")
LIST_PAGE = 1000


class StoreToolError(Exception):
    """A tool could not do what was asked (the message says why; nothing was changed)."""


def _as(doc_update: bytes, name: str, kind: str) -> Any:
    """Root ``name`` of the document read as ``kind``, as plain Python (a fresh Doc each
    time: pycrdt fixes a root's type on first access)."""
    doc: Doc[Any] = Doc()
    doc.apply_update(doc_update)
    if kind == "text":
        return str(doc.get(name, type=Text))
    if kind == "map":
        return doc.get(name, type=Map).to_py()
    if kind == "array":
        return doc.get(name, type=Array).to_py()
    return str(doc.get(name, type=XmlFragment))


def _probe(update: bytes, name: str) -> tuple[str | None, Any]:
    """Root ``name``'s kind and value, told by its content (module docstring)."""
    text = _as(update, name, "text")
    if text:
        return "text", text  # string items: a Y.Array never holds them (its strings are values)
    entries = _as(update, name, "map")
    if entries:
        return "map", entries
    try:
        items = _as(update, name, "array")
    except ValueError:  # pycrdt: an XML element has no Python equivalent
        return "xml", _as(update, name, "xml")
    return ("array", items) if items else (None, None)


def root_kinds(update: bytes) -> dict[str, str | None]:
    """Each root's kind, told by its content (module docstring); None: empty."""
    return {name: _probe(update, name)[0] for name in _roots(update)}


def _roots(update: bytes) -> list[str]:
    doc: Doc[Any] = Doc()
    doc.apply_update(update)
    return sorted(doc.keys())


def show_document(update: bytes, hints: dict[str, str] | None = None) -> dict[str, Any]:
    """The document's roots as plain Python: ``{name: value}`` (None for empty roots)."""
    hints = hints or {}
    shown = {}
    for name in _roots(update):
        kind = hints.get(name)
        shown[name] = _as(update, name, kind) if kind else _probe(update, name)[1]
    return shown


async def _documents(store: RelayStore, prefix: str) -> AsyncIterator[tuple[str, int]]:
    """``(document, position)`` of every document, a page at a time, by position."""
    cursor = 0
    while True:
        page = await store.changes(cursor, LIST_PAGE)
        for change in page:
            if change.document.startswith(prefix):
                yield change.document, change.cursor
        if len(page) < LIST_PAGE:
            return
        cursor = page[-1].cursor


async def _merged(store: RelayStore, document: str) -> bytes:
    log = await store.load(document)
    if not log.all_updates():
        raise StoreToolError(f"no document {document!r} in the store")
    return log.merged()


def _parse_hints(items: list[str]) -> dict[str, str]:
    hints = {}
    for item in items:
        name, equals, kind = item.rpartition("=")
        if not equals or not name or kind not in ROOT_KINDS:
            raise StoreToolError(
                f"--type {item!r} is not NAME=KIND with KIND one of {', '.join(ROOT_KINDS)}"
            )
        hints[name] = kind
    return hints


async def _ls(store: RelayStore, args: Any, out: TextIO) -> int:
    if not args.json:
        print(f"{'position':>10} {'tail':>7} {'bytes':>12}  document", file=out)
    async for name, position in _documents(store, args.prefix):
        tail, size = await store.size(name)
        if args.json:
            line = {"document": name, "position": position, "tail_updates": tail, "bytes": size}
            print(json.dumps(line), file=out)
        else:
            print(f"{position:>10} {tail:>7} {size:>12}  {name}", file=out)
    return 0


async def _show(store: RelayStore, args: Any, out: TextIO) -> int:
    hints = _parse_hints(args.type)
    update = await _merged(store, args.document)
    if args.root is not None:
        kind = hints.get(args.root)
        value = _as(update, args.root, kind) if kind else _probe(update, args.root)[1]
        if value is None:
            raise StoreToolError(
                f"{args.document!r} has no content under root {args.root!r} "
                "(or give its kind: --type NAME=KIND)"
            )
        # A text (or XML) as it is, to the byte; anything else as JSON.
        out.write(value if isinstance(value, str) else json.dumps(value, ensure_ascii=False))
        return 0
    print(json.dumps(show_document(update, hints), ensure_ascii=False, indent=2), file=out)
    return 0


async def _compact(store: RelayStore, args: Any, out: TextIO) -> int:
    names = (
        [args.document]
        if args.document
        else [name async for name, _ in _documents(store, args.prefix)]
    )
    for name in names:
        before = await store.size(name)
        await store.compact(name)
        after = await store.size(name)
        line = {"document": name, "tail_before": before[0], "bytes_before": before[1]}
        line |= {"tail_after": after[0], "bytes_after": after[1]}
        print(json.dumps(line), file=out)
    return 0


async def _export(store: RelayStore, args: Any, out: TextIO) -> int:
    update = await _merged(store, args.document)
    Path(args.file).write_bytes(update)  # noqa: ASYNC240 - a command: nothing else runs on its loop
    print(
        json.dumps({"document": args.document, "bytes": len(update), "file": args.file}), file=out
    )
    return 0


async def _import(store: RelayStore, args: Any, out: TextIO) -> int:
    try:
        update = Path(args.file).read_bytes()  # noqa: ASYNC240
    except OSError as exc:
        raise StoreToolError(f"cannot read {args.file}: {exc.strerror or exc}") from exc
    try:
        info = check_update(update)
    except MalformedMessage as exc:
        raise StoreToolError(f"{args.file} is not a Yjs update: {exc}") from exc
    if update == EMPTY_UPDATE or info.is_empty:
        raise StoreToolError(f"{args.file} holds an empty update: nothing to import")
    ledger, position = await store.load_ledger(args.document)

    overlaps = ledger.overlaps(info)
    content = (await store.load(args.document)).all_updates() if overlaps else []
    # The relay's rules with no writer: content is checked (no rewrite of stored clocks,
    # no child of a non-type), ownership is not (an operator writes on nobody's behalf).
    verdict = ledger.judge(update, info, None, content)
    if verdict.refusals:
        reasons = "; ".join(r.reason for r in verdict.refusals[:5])
        raise StoreToolError(f"the store refuses {args.file} for {args.document!r}: {reasons}")
    if verdict.update is None or (
        content and document_digest([*content, verdict.update]) == document_digest(content)
    ):
        # All of it is stored already (deletes included: a cut update keeps its deletes).
        print(json.dumps({"document": args.document, "imported_bytes": 0}), file=out)
        return 0
    await store.append(
        [(args.document, verdict.update)], {args.document: ledger}, {args.document: position}
    )
    line = {"document": args.document, "imported_bytes": len(verdict.update)}
    print(json.dumps(line), file=out)
    return 0


async def _check(store: RelayStore, args: Any, out: TextIO) -> int:
    failed = checked = 0
    async for name, _ in _documents(store, args.prefix):
        checked += 1
        try:
            log = await store.load(name)
            for update in log.all_updates():
                check_update(update)
            doc: Doc[Any] = Doc()
            doc.apply_update(log.merged())
        except (StoreError, MalformedMessage, ValueError, RuntimeError) as exc:
            failed += 1
            print(json.dumps({"document": name, "error": str(exc)}), file=out)
    print(json.dumps({"checked": checked, "failed": failed}), file=out)
    return 1 if failed else 0


COMMANDS: dict[str, Callable[[RelayStore, Any, TextIO], Any]] = {
    "ls": _ls,
    "show": _show,
    "compact": _compact,
    "export": _export,
    "import": _import,
    "check": _check,
}


async def run_store_command(args: Any, out: TextIO = sys.stdout) -> int:
    """Run ``crdtsync store ACTION`` (parsed ``args``); return the exit status.

    Raises:
        StoreToolError: what was asked cannot be done (nothing was changed).
        StoreError: the store failed.
    """
    address = args.store
    missing = not is_redis_address(address) and not Path(address).exists()  # noqa: ASYNC240
    if missing and args.action != "import":
        raise StoreToolError(f"no store at {address}")
    lock = None
    if args.action == "import" and not is_redis_address(address):
        try:
            lock = lock_store(address)
        except StoreError as exc:
            raise StoreToolError(
                f"a relay is serving {address}: stop it first (it keeps the documents' "
                "integrity ledgers in memory), or write through it with a replica"
            ) from exc
    store = open_store(address)
    try:
        return int(await COMMANDS[args.action](store, args, out))
    finally:
        await store.close()
        if lock is not None:
            lock.close()
