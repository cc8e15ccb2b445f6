"""Quickstart: the README's Replica example as a script.

Start a relay (``crdtsync relay``), then::

    python examples/quickstart.py --relay ws://127.0.0.1:8765 --db notes.db

It appends "buy milk" to the document ``team/todo`` (on disk in ``notes.db`` before
``append`` returns), prints how many changes are pending, waits until the relay has
durably stored them, prints the status and ``pending: 0``, and exits 0. If the relay
does not confirm within ``--timeout`` seconds it says so on stderr and exits 1; the
edit stays in ``notes.db`` and is sent on the next run.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

import pycrdt

from crdtsync.client import Replica
from crdtsync.errors import AcknowledgementsUnsupported, SyncTimeout


async def main(relay: str, db: str, timeout: float) -> int:
    async with Replica(db, relay=relay) as replica:
        doc = await replica.open("team/todo")  # a pycrdt.Doc, loaded from the db file
        todo = doc.get("items", type=pycrdt.Array)
        todo.append("buy milk")  # on disk before append() returns; sent when online
        print("pending:", replica.pending("team/todo"))
        try:
            await replica.wait_synced("team/todo", timeout=timeout)  # the relay stored it
        except (SyncTimeout, AcknowledgementsUnsupported) as exc:
            print(f"not synced: {exc}", file=sys.stderr)
            return 1
        print(replica.status("team/todo"))
        print("pending:", replica.pending("team/todo"))
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="The README's Replica example.")
    parser.add_argument("--relay", default="ws://127.0.0.1:8765", help="relay URL")
    parser.add_argument("--db", default="notes.db", help="the replica's SQLite file")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for sync")
    args = parser.parse_args()
    sys.exit(asyncio.run(main(args.relay, args.db, args.timeout)))
