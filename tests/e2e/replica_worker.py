"""A replica in its own process, driven by the e2e tests.

Makes ``--count`` edits to one document, one transaction each: edit i sets
``marks[<prefix>-<i>] = i`` and appends the same id to Text ``log``. After each edit
it prints ``{"event": "applied", "i": i}``; whenever the relay has acknowledged
everything so far it prints ``{"event": "acked", "upto": i}``; at the end, once all is
acknowledged, ``{"event": "done"}``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys

from pycrdt import Map, Text

from crdtsync.client import Replica
from crdtsync.errors import SyncTimeout


def emit(**fields: object) -> None:
    sys.stdout.write(json.dumps(fields) + "\n")
    sys.stdout.flush()


async def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--db", required=True)
    p.add_argument("--relay")
    p.add_argument("--doc", required=True)
    p.add_argument("--prefix", required=True)
    p.add_argument("--count", type=int, default=100)
    p.add_argument("--delay", type=float, default=0.0)
    p.add_argument("--final-timeout", type=float, default=60.0)
    args = p.parse_args()
    async with Replica(args.db, relay=args.relay) as replica:
        doc = await replica.open(args.doc)
        marks = doc.get("marks", type=Map)
        log = doc.get("log", type=Text)
        emit(event="opened", pending=replica.pending(args.doc))
        for i in range(args.count):
            if i and replica.pending(args.doc) == 0:
                emit(event="acked", upto=i - 1)
            with doc.transaction():
                marks[f"{args.prefix}-{i}"] = i
                log += f"{args.prefix}-{i};"
            emit(event="applied", i=i)
            await asyncio.sleep(args.delay)
        try:
            await replica.wait_synced(args.doc, timeout=args.final_timeout)
        except SyncTimeout as exc:
            emit(event="timeout", error=str(exc))
            return
        emit(event="acked", upto=args.count - 1)
        emit(event="done")


if __name__ == "__main__":
    asyncio.run(main())
