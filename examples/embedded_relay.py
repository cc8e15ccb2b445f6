"""Run a relay inside your own Python process, sync two replicas through it, and exit.

::

    python examples/embedded_relay.py [--store embedded-relay.db]

The relay listens on a free port on 127.0.0.1 (``port=0``) and stores documents in
``--store``. Replica A writes a note and waits until the relay has durably stored it;
replica B, starting from an empty file, receives it from the relay. Then both replicas
and the relay stop (the relay drains: stops accepting, persists what is queued, closes
its connections).

``RelaySettings`` reads ``CRDTSYNC_*`` environment variables for any setting not given
here, like the ``crdtsync relay`` command does.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
from pathlib import Path

import pycrdt

from crdtsync.client import Replica
from crdtsync.server import Relay
from crdtsync.settings import RelaySettings

DOCUMENT = "demo/notes"


async def main(store: Path, timeout: float) -> int:
    async with Relay(RelaySettings(host="127.0.0.1", port=0, store=store)) as relay:
        print(f"relay listening on {relay.url}")
        with tempfile.TemporaryDirectory() as tmp:
            async with Replica(Path(tmp) / "a.db", relay=relay.url) as a:
                doc = await a.open(DOCUMENT)
                doc.get("text", type=pycrdt.Text).insert(0, "hello from an embedded relay ✓")
                await a.wait_synced(DOCUMENT, timeout=timeout)
                print(f"replica a: {a.pending(DOCUMENT)} pending")

            async with Replica(Path(tmp) / "b.db", relay=relay.url) as b:
                doc = await b.open(DOCUMENT)
                text = doc.get("text", type=pycrdt.Text)
                arrived = asyncio.Event()
                text.observe(lambda _event: arrived.set())  # runs when the relay's copy lands
                if not str(text):
                    try:
                        await asyncio.wait_for(arrived.wait(), timeout)
                    except TimeoutError:
                        print(f"replica b got nothing within {timeout} s", file=sys.stderr)
                        return 1
                print(f"replica b sees: {text}")
    print("relay stopped")
    return 0


if __name__ == "__main__":  # the relay compacts in spawned worker processes: keep this guard
    parser = argparse.ArgumentParser(description="Run a relay in-process and sync through it.")
    parser.add_argument("--store", type=Path, default=Path("embedded-relay.db"))
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for sync")
    args = parser.parse_args()
    sys.exit(asyncio.run(main(args.store, args.timeout)))
