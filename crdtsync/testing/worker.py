"""A replica in its own process, driven by a campaign over stdin/stdout JSON lines.

``python -m crdtsync.testing.worker --db F --relay URL --doc NAME --workload M:F --seed S``
prints ``{"event": "ready", ...}``, then answers each command line with one JSON line:

- ``{"cmd": "edit", "count": N}``: N workload edits, one transaction each; answers the
  edits' ids, updates (base64) and local sequence numbers, once they are committed.
- ``{"cmd": "status"}``: pending count, connection, which edits are now acknowledged,
  ``stopped``: why the replica stopped syncing for good (None while it syncs),
  ``quarantined``: updates it kept aside because they would have broken its document
  (with the last reasons), ``refused``: its own updates the relay refused to store.
- ``{"cmd": "sync", "timeout": T}``: wait until the relay acknowledged everything.
- ``{"cmd": "synced", "timeout": T}``: wait until the initial sync of this connection ended.
- ``{"cmd": "state"}``: the whole document as one update (base64).
- ``{"cmd": "quit"}``: close the replica and exit.

``sync`` and ``synced`` answer at once, with ``stopped`` set, when the replica stopped
syncing: waiting out the timeout would only make a broken replica slow to report.

Many documents: ``--keep PREFIX`` instead of ``--doc`` (``--max-open K``, 6). The
replica keeps the folder (``Replica.keep``) and opens documents only to edit them, at
most K at a time (the least recently used is closed first); the others sync into its
file without being open. The commands then are:

- ``{"cmd": "edit", "doc": NAME, "count": N}``: as above, in document NAME (opened if
  it is not); each edit also names its ``doc``.
- ``{"cmd": "close", "count": N}``: close the N least recently used open documents.
- ``{"cmd": "status", "full": bool}``: as above, for the folder (``pending`` is
  ``pending_in``, ``connected`` its subscription); ``acknowledged`` holds
  ``[document, edit id]`` pairs; ``quarantined`` counts the open documents, or with
  ``full`` every document in the file.
- ``{"cmd": "sync", "timeout": T}``: ``wait_synced_in(PREFIX)``, then ``wait_synced``
  of each open document; ``{"cmd": "synced", "timeout": T}``: the folder only.
- ``{"cmd": "states"}``: ``documents``: every document under PREFIX as the FILE holds
  it (its stored updates applied to a fresh Doc, base64); ``open``: each open document
  as its Doc holds it; ``errors``: documents that could not be read.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import random
import sys
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from pycrdt import Doc

from ..errors import CrdtsyncError
from ..store import merge_in_batches
from .workload import load_workload

__all__ = ["main"]


def _emit(payload: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(payload) + "\n")
    sys.stdout.flush()


class SyncWatch:
    """Tells whether a replica still syncs, and why not when it stopped.

    ``Replica`` does not expose its sync tasks, so this finds them by the names it gives
    them, looked up again on each call: ``crdtsync:<document>`` where a document has a
    connection of its own (a relay that does not multiplex), else ``crdtsync:mux``, the
    one connection every document and kept folder goes through. A task that ended,
    whether it raised (e.g. pycrdt refused an update the relay sent) or gave up
    reconnecting, means the replica no longer syncs; the replica keeps answering, which
    is why a campaign must ask. A ``crdtsync:mux`` task that ended because the replica
    fell back to a connection per document (the relay does not multiplex) did not stop:
    the document's own task takes over. With ``document`` None, only the multiplexed
    connection is watched (a replica that keeps a folder).

    ``asyncio.all_tasks()`` lists unfinished tasks only: the tasks found are remembered,
    so that one that ended between two calls is still seen to have ended.
    """

    def __init__(self, document: str | None, replica: Any = None) -> None:
        self.document = document
        self.replica = replica
        self._own: asyncio.Task[Any] | None = None  # crdtsync:<document>, last found
        self._mux: asyncio.Task[Any] | None = None  # crdtsync:mux, last found
        self._find()

    def _find(self) -> None:
        live = {t.get_name(): t for t in asyncio.all_tasks()}
        if self.document is not None:
            own = live.get(f"crdtsync:{self.document}")
            if own is None and self.replica is not None:
                # (created and ended since the last look: the replica still holds it)
                d = getattr(self.replica, "_docs", {}).get(self.document)
                own = getattr(d, "task", None)
            if own is not None:
                self._own = own
        mux = live.get("crdtsync:mux")
        if mux is not None:
            self._mux = mux

    @property
    def task(self) -> asyncio.Task[Any] | None:
        """The task that syncs the document now (or the one that ended last)."""
        self._find()
        if self._own is not None and (not self._own.done() or self._fell_back()):
            return self._own
        return self._mux if self._mux is not None else self._own

    def _fell_back(self) -> bool:
        """The replica gave the multiplexed connection up for connections per document."""
        return self.replica is not None and getattr(self.replica, "_mux_supported", None) is False

    def stopped(self, last_error: str | None) -> str | None:
        """Why syncing ended for good, or None while it goes on."""
        task = self.task
        if task is not None and task is self._mux and task.done() and self._fell_back():
            if self.document is None:
                return None  # (what keeps a folder reports that: FoldersUnsupported)
            task = self._own  # the document's own connection took over: not found yet
        if self.replica is not None and self.document is not None:
            d = getattr(self.replica, "_docs", {}).get(self.document)
            if d is not None and getattr(d, "stop_reconnecting", False):
                return f"it gave up on the document: {last_error}"
        if task is None or not task.done():
            return None
        if task.cancelled():
            return "its sync task was cancelled"
        exc = task.exception()
        if exc is not None:
            return f"{type(exc).__name__}: {exc}"
        return f"it gave up reconnecting: {last_error}"

    async def ended(self) -> None:
        """Return when syncing ends for good (never, if nothing syncs: cancel the wait)."""
        while True:
            task = self.task
            if task is None:
                await asyncio.sleep(0.2)  # (a connection may start later)
                continue
            if not task.done():
                await asyncio.wait([task], timeout=0.5)  # bounded: the task may be replaced
            if self.stopped(None) is not None:
                return
            if task.done():
                await asyncio.sleep(0.05)  # (a fallback: the document's task is starting)


async def _serve(args: argparse.Namespace) -> None:
    from crdtsync.client import Backoff, Replica

    workload = load_workload(args.workload)
    rng = random.Random(args.seed)
    backoff_rng = random.Random(args.seed + 1)
    replica = Replica(
        args.db,
        relay=args.relay,
        token=args.token,
        backoff=lambda: Backoff(0.02, 0.5, rng=backoff_rng),
        open_timeout_s=5.0,
    )
    async with replica:
        doc = await replica.open(args.doc)
        store = replica.store
        assert store is not None
        captured: list[bytes] = []
        doc.observe(lambda event: captured.append(event.update))
        seq_of: dict[str, int] = {}  # edit id -> local sequence number, until acknowledged
        watch = SyncWatch(args.doc, replica)

        def stopped() -> str | None:
            return watch.stopped(replica.status(args.doc).last_error)

        _emit({"event": "ready", "client_id": doc.client_id, "pending": replica.pending(args.doc)})
        reader = asyncio.StreamReader()
        loop = asyncio.get_running_loop()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        while line := await reader.readline():
            try:
                cmd = json.loads(line)
                name = cmd["cmd"]
            except (ValueError, KeyError, TypeError):
                _emit({"ok": False, "error": f"bad command {line[:80]!r}"})
                continue
            if name == "edit":
                edits = []
                for _ in range(int(cmd.get("count", 1))):
                    before = set(store.pending_seqs(args.doc))
                    captured.clear()
                    with doc.transaction():
                        edit_id = workload(doc, rng)
                    new = set(store.pending_seqs(args.doc)) - before
                    update = b"".join(captured[:1])
                    if not update:
                        continue  # the workload changed nothing: nothing to check
                    seq = max(new) if new else None
                    if seq is not None:
                        seq_of[edit_id] = seq
                    edits.append(
                        {
                            "id": edit_id,
                            "update": base64.b64encode(update).decode(),
                            "stored": seq is not None,
                        }
                    )
                    await asyncio.sleep(0)  # let the connection move frames between edits
                _emit({"ok": True, "edits": edits})
            elif name == "status":
                pending = set(store.pending_seqs(args.doc))
                acked = [e for e, s in seq_of.items() if s not in pending]
                for e in acked:
                    del seq_of[e]
                status = replica.status(args.doc)
                _emit(
                    {
                        "ok": True,
                        "pending": status.pending,
                        "connected": status.connected,
                        "acknowledged": acked,
                        "last_error": status.last_error,
                        "stopped": stopped(),
                        "quarantined": status.quarantined,
                        "quarantine_reasons": [q.reason for q in replica.quarantined(args.doc)[-3:]]
                        if status.quarantined
                        else [],
                        "refused": status.refused,
                    }
                )
            elif name == "sync":
                timeout = float(cmd.get("timeout", 10))
                waiting = asyncio.ensure_future(replica.wait_synced(args.doc, timeout=timeout))
                ending = asyncio.ensure_future(watch.ended())
                # Whichever comes first: everything acknowledged (or wait_synced's own
                # timeout), or syncing ended for good.
                await asyncio.wait([waiting, ending], return_when=asyncio.FIRST_COMPLETED)
                ending.cancel()
                await asyncio.gather(ending, return_exceptions=True)
                if not waiting.done():
                    waiting.cancel()
                    await asyncio.gather(waiting, return_exceptions=True)
                    _emit({"ok": False, "error": "stopped syncing", "stopped": stopped()})
                elif isinstance(waiting.exception(), CrdtsyncError):
                    _emit({"ok": False, "error": str(waiting.exception()), "stopped": stopped()})
                else:
                    waiting.result()  # anything but a CrdtsyncError is a bug: let it show
                    _emit({"ok": True})
            elif name == "synced":
                # the initial sync of the current connection finished (a fresh replica)
                deadline = loop.time() + float(cmd.get("timeout", 10))
                # status() is a plain property: poll it, bounded by the deadline
                while (  # noqa: ASYNC110
                    not replica.status(args.doc).synced
                    and stopped() is None
                    and loop.time() < deadline
                ):
                    await asyncio.sleep(0.02)
                _emit({"ok": replica.status(args.doc).synced, "stopped": stopped()})
            elif name == "state":
                try:
                    update = doc.get_update()
                except Exception as exc:  # a document pycrdt broke while applying an update
                    _emit({"ok": False, "error": f"{type(exc).__name__}: {exc}"})
                else:
                    _emit({"ok": True, "update": base64.b64encode(update).decode()})
            elif name == "quit":
                _emit({"ok": True})
                return
            else:
                _emit({"ok": False, "error": f"unknown command {name!r}"})


async def _wait_or_stop(
    waiting: Awaitable[None], watches: list[SyncWatch], stopped: Callable[[], str | None]
) -> dict[str, Any]:
    """Await ``waiting``, unless syncing ends for good first; the answer to send."""
    task = asyncio.ensure_future(waiting)
    ending = [asyncio.ensure_future(w.ended()) for w in watches]
    await asyncio.wait([task, *ending], return_when=asyncio.FIRST_COMPLETED)
    for e in ending:
        e.cancel()
    await asyncio.gather(*ending, return_exceptions=True)
    if not task.done():
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return {"ok": False, "error": "stopped syncing", "stopped": stopped()}
    exc = task.exception()
    if isinstance(exc, CrdtsyncError):
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}", "stopped": stopped()}
    task.result()  # anything but a CrdtsyncError is a bug: let it show
    return {"ok": True}


async def _all_synced(replica: Any, prefix: str, documents: list[str], timeout: float) -> None:
    """The folder in sync (``Replica.wait_synced_in``), then each open document in
    ``documents`` (``Replica.wait_synced``), all within ``timeout``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    await replica.wait_synced_in(prefix, timeout=timeout)
    for name in documents:
        await replica.wait_synced(name, timeout=max(0.1, deadline - loop.time()))


class _Open:
    """A document the folder worker has open: its Doc and what its transactions sent."""

    def __init__(self, name: str, doc: Doc[Any], watch: SyncWatch) -> None:
        self.name = name
        self.doc = doc
        self.captured: list[bytes] = []
        self.watch = watch
        self.subscription = doc.observe(lambda event: self.captured.append(event.update))


def _file_state(updates: list[bytes]) -> bytes:
    """A document as a file holds it, encoded by a fresh Doc (as the checker reads states)."""
    doc: Doc[Any] = Doc()
    if updates:
        doc.apply_update(merge_in_batches(updates))
    return doc.get_update()


async def _serve_folder(args: argparse.Namespace) -> None:
    """Many documents: the replica keeps ``args.keep`` and opens only some at a time."""
    from crdtsync.client import Backoff, Replica

    workload = load_workload(args.workload)
    rng = random.Random(args.seed)
    backoff_rng = random.Random(args.seed + 1)
    prefix: str = args.keep
    replica = Replica(
        args.db,
        relay=args.relay,
        token=args.token,
        backoff=lambda: Backoff(0.02, 0.5, rng=backoff_rng),
        open_timeout_s=5.0,
    )
    async with replica:
        await replica.keep(prefix)
        store = replica.store
        assert store is not None
        opened: OrderedDict[str, _Open] = OrderedDict()  # least recently used first
        # (document, edit id) -> local sequence number, until acknowledged
        seq_of: dict[tuple[str, str], int] = {}
        watch = SyncWatch(None, replica)  # the multiplexed connection

        def stopped() -> str | None:
            why = watch.stopped(replica.last_error)
            if why is not None:
                return why
            for o in opened.values():
                why = o.watch.stopped(replica.status(o.name).last_error)
                if why is not None:
                    return f"{o.name}: {why}"
            return None

        async def close(name: str) -> None:
            o = opened.pop(name)
            o.doc.unobserve(o.subscription)
            await replica.close(name)

        async def open_(name: str) -> _Open:
            o = opened.get(name)
            if o is not None:
                opened.move_to_end(name)
                return o
            while len(opened) >= args.max_open:
                await close(next(iter(opened)))
            doc = await replica.open(name)
            o = opened[name] = _Open(name, doc, SyncWatch(name, replica))
            return o

        _emit({"event": "ready", "client_id": 0, "pending": replica.pending_in(prefix)})
        async for line, cmd in _commands():
            if cmd is None:
                _emit({"ok": False, "error": f"bad command {line[:80]!r}"})
                continue
            name = cmd["cmd"]
            if name == "edit":
                document = str(cmd["doc"])
                if not document.startswith(prefix):
                    _emit({"ok": False, "error": f"{document!r} is not under {prefix!r}"})
                    continue
                o = await open_(document)
                edits = []
                for _ in range(int(cmd.get("count", 1))):
                    before = set(store.pending_seqs(document))
                    o.captured.clear()
                    with o.doc.transaction():
                        edit_id = workload(o.doc, rng)
                    new = set(store.pending_seqs(document)) - before
                    update = b"".join(o.captured[:1])
                    if not update:
                        continue  # the workload changed nothing: nothing to check
                    seq = max(new) if new else None
                    if seq is not None:
                        seq_of[(document, edit_id)] = seq
                    edits.append(
                        {
                            "doc": document,
                            "id": edit_id,
                            "update": base64.b64encode(update).decode(),
                            "stored": seq is not None,
                        }
                    )
                    await asyncio.sleep(0)  # let the connection move frames between edits
                _emit({"ok": True, "edits": edits})
            elif name == "close":
                names = list(opened)[: int(cmd.get("count", 1))]
                for n in names:
                    await close(n)
                _emit({"ok": True, "closed": names})
            elif name == "status":
                pending_of: dict[str, set[int]] = {}
                acked = []
                for key, seq in list(seq_of.items()):
                    document = key[0]
                    if document not in pending_of:
                        pending_of[document] = set(store.pending_seqs(document))
                    if seq not in pending_of[document]:
                        acked.append(list(key))
                        del seq_of[key]
                folder = replica.folder_status(prefix)
                statuses = [(o.name, replica.status(o.name)) for o in opened.values()]
                if cmd.get("full"):
                    # every document in the file, open or not (kept ones too)
                    quarantined = {n: store.quarantine_count(n) for n in replica.documents(prefix)}
                    quarantined = {n: q for n, q in quarantined.items() if q}
                else:
                    quarantined = {n: st.quarantined for n, st in statuses if st.quarantined}
                reasons = [
                    f"{n}: {q.reason}"
                    for n in list(quarantined)[:3]
                    for q in store.quarantined(n)[-1:]
                ]
                refused = {n: st.refused for n, st in statuses if st.refused}
                errors = [f"{n}: {st.last_error}" for n, st in statuses if st.last_error]
                last_error = folder.error or replica.last_error or next(iter(errors), None)
                _emit(
                    {
                        "ok": True,
                        "pending": folder.pending,
                        "connected": folder.subscribed,
                        "acknowledged": acked,
                        "last_error": last_error,
                        "stopped": stopped(),
                        "quarantined": sum(quarantined.values()),
                        "quarantine_reasons": reasons,
                        "refused": sum(refused.values()),
                        "refused_in": sorted(refused),
                        "open": list(opened),
                        "to_sync": folder.to_sync,
                        "caught_up": folder.caught_up,
                    }
                )
            elif name in ("sync", "synced"):
                # sync: everything acknowledged, every announced document in the file, and
                # each open document's own wait; synced (a fresh replica): the folder only.
                docs = list(opened) if name == "sync" else []
                waiting = _all_synced(replica, prefix, docs, float(cmd.get("timeout", 10)))
                watches = [watch, *(opened[n].watch for n in docs)]
                _emit(await _wait_or_stop(waiting, watches, stopped))
            elif name == "states":
                # What the FILE holds, document by document (open or not), and each open
                # document as its Doc holds it.
                documents: dict[str, str] = {}
                errors_of: dict[str, str] = {}
                for n in replica.documents(prefix):
                    try:
                        documents[n] = base64.b64encode(
                            _file_state(store.load(n).all_updates())
                        ).decode()
                    except Exception as exc:  # pycrdt refuses what the file holds together
                        errors_of[n] = f"{type(exc).__name__}: {exc}"
                live: dict[str, str] = {}
                for o in opened.values():
                    try:
                        live[o.name] = base64.b64encode(o.doc.get_update()).decode()
                    except Exception as exc:  # a document pycrdt broke applying an update
                        errors_of[o.name] = f"{type(exc).__name__}: {exc} (open)"
                _emit({"ok": True, "documents": documents, "open": live, "errors": errors_of})
            elif name == "quit":
                _emit({"ok": True})
                return
            else:
                _emit({"ok": False, "error": f"unknown command {name!r}"})


async def _commands() -> AsyncIterator[tuple[bytes, dict[str, Any] | None]]:
    """Command lines from stdin, parsed (None: not a command)."""
    reader = asyncio.StreamReader()
    loop = asyncio.get_running_loop()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while line := await reader.readline():
        try:
            cmd = json.loads(line)
            cmd["cmd"]
        except (ValueError, KeyError, TypeError):
            yield line, None
            continue
        yield line, cmd


def main() -> None:
    """Entry point: ``python -m crdtsync.testing.worker``."""
    p = argparse.ArgumentParser(prog="crdtsync-worker")
    p.add_argument("--db", required=True)
    p.add_argument("--relay", required=True)
    p.add_argument("--doc")
    p.add_argument("--keep", metavar="PREFIX", help="many documents: keep this folder")
    p.add_argument("--max-open", type=int, default=6, help="(--keep) documents open at once")
    p.add_argument("--workload", required=True)
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--token", help="an access token (relays that require one)")
    args = p.parse_args()
    if (args.doc is None) == (args.keep is None):
        p.error("give --doc NAME (one document) or --keep PREFIX (many)")
    asyncio.run(_serve_folder(args) if args.keep else _serve(args))


if __name__ == "__main__":
    main()
