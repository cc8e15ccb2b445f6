"""A tiny offline-first note-taker on the synchronous facade, ``SyncReplica``.

Notes live in a local SQLite file and work with no network at all; give ``--relay``
to sync them::

    python examples/offline_notes.py add "buy milk"              # offline
    python examples/offline_notes.py list
    python examples/offline_notes.py sync --relay ws://127.0.0.1:8765
    python examples/offline_notes.py list --db laptop.db --relay ws://127.0.0.1:8765

``add`` and ``list`` work offline; with ``--relay`` they sync too (``add`` waits
briefly for the relay to store the note, and keeps it pending if it cannot). ``sync``
needs ``--relay``: it fetches what the relay has, uploads what is pending, and exits
1 if that does not finish within ``--timeout`` seconds.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

import pycrdt

from crdtsync.client import SyncReplica
from crdtsync.errors import AcknowledgementsUnsupported, SyncTimeout

DOCUMENT = "notes"


def notes_of(doc: pycrdt.Doc[Any]) -> list[str]:
    # A transaction of our own: the replica's thread may be applying a remote update.
    with doc.transaction():
        return [str(note) for note in doc.get("notes", type=pycrdt.Array)]


def wait_connected_and_synced(replica: SyncReplica, timeout: float) -> bool:
    """Wait for the relay's answer to our sync request: its notes are then in the doc."""
    deadline = time.monotonic() + timeout
    while not replica.status(DOCUMENT).synced:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def sync(replica: SyncReplica, timeout: float) -> str | None:
    """Download and upload; return None when done, else why not."""
    if not wait_connected_and_synced(replica, timeout):
        return f"relay not reachable: {replica.status(DOCUMENT).last_error or 'no answer'}"
    try:
        replica.wait_synced(DOCUMENT, timeout=timeout)
    except (SyncTimeout, AcknowledgementsUnsupported) as exc:
        return str(exc)
    return None


def main(argv: list[str] | None = None) -> int:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--db", default="notes.db", help="local SQLite file (default notes.db)")
    common.add_argument("--relay", help="relay URL, e.g. ws://127.0.0.1:8765 (default: offline)")
    common.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the relay")
    parser = argparse.ArgumentParser(description="An offline-first note-taker.")
    sub = parser.add_subparsers(dest="command", required=True)
    add = sub.add_parser("add", parents=[common], help="add a note")
    add.add_argument("text")
    sub.add_parser("list", parents=[common], help="print the notes")
    sync_cmd = sub.add_parser("sync", parents=[common], help="sync with --relay")
    args = parser.parse_args(argv)
    if args.command == "sync" and not args.relay:
        sync_cmd.error("sync needs --relay")

    with SyncReplica(args.db, relay=args.relay) as replica:
        doc = replica.open(DOCUMENT)
        if args.command == "add":
            doc.get("notes", type=pycrdt.Array).append(args.text)  # on disk now
            if args.relay:
                sync(replica, args.timeout)  # best effort: the note is saved either way
            print(f"added: {args.text} ({replica.pending(DOCUMENT)} pending)")
        elif args.command == "list":
            if args.relay and (problem := sync(replica, args.timeout)):
                print(f"offline: {problem}", file=sys.stderr)
            for i, note in enumerate(notes_of(doc), 1):
                print(f"{i}. {note}")
        else:
            problem = sync(replica, args.timeout)
            if problem:
                print(f"not synced: {problem}", file=sys.stderr)
                return 1
            print(f"synced: {len(notes_of(doc))} notes, {replica.pending(DOCUMENT)} pending")
    return 0


if __name__ == "__main__":
    sys.exit(main())
