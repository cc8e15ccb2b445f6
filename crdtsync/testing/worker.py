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
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import random
import sys
from typing import Any

from ..errors import CrdtsyncError
from .workload import load_workload

__all__ = ["main"]


def _emit(payload: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(payload) + "\n")
    sys.stdout.flush()


class SyncWatch:
    """Tells whether a replica still syncs a document, and why not when it stopped.

    ``Replica`` does not expose its per-document sync task, so this finds it by the name
    ``Replica.open`` gives it (``crdtsync:<document>``). A task that ended, whether it
    raised (e.g. pycrdt refused an update the relay sent) or gave up reconnecting, means
    the document no longer syncs; the replica keeps answering, which is why a campaign
    must ask.
    """

    def __init__(self, document: str) -> None:
        name = f"crdtsync:{document}"
        self.task = next((t for t in asyncio.all_tasks() if t.get_name() == name), None)

    def stopped(self, last_error: str | None) -> str | None:
        """Why syncing ended for good, or None while the sync task runs."""
        task = self.task
        if task is None or not task.done():
            return None
        if task.cancelled():
            return "its sync task was cancelled"
        exc = task.exception()
        if exc is not None:
            return f"{type(exc).__name__}: {exc}"
        return f"it gave up reconnecting: {last_error}"

    async def ended(self) -> None:
        """Return when the sync task ends (never, if there is none: cancel the wait)."""
        if self.task is None:
            await asyncio.Event().wait()
        else:
            await asyncio.wait([self.task])


async def _serve(args: argparse.Namespace) -> None:
    from crdtsync.client import Backoff, Replica

    workload = load_workload(args.workload)
    rng = random.Random(args.seed)
    backoff_rng = random.Random(args.seed + 1)
    replica = Replica(
        args.db,
        relay=args.relay,
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
        watch = SyncWatch(args.doc)

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


def main() -> None:
    """Entry point: ``python -m crdtsync.testing.worker``."""
    p = argparse.ArgumentParser(prog="crdtsync-worker")
    p.add_argument("--db", required=True)
    p.add_argument("--relay", required=True)
    p.add_argument("--doc", required=True)
    p.add_argument("--workload", required=True)
    p.add_argument("--seed", type=int, required=True)
    args = p.parse_args()
    asyncio.run(_serve(args))


if __name__ == "__main__":
    main()
