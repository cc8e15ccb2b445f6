"""A process that writes to a relay store until it is killed (tests/test_backends.py).

    python tests/store_child.py append ADDRESS DOC      # one text update per commit
    python tests/store_child.py compact ADDRESS DOC     # compact DOC over and over

``append`` prints ``{"position": p, "text": t}`` after each append returned (so each
printed append is durable, and the document's text then ends with ``t``); ``compact``
prints ``{"compacted": folded}`` after each compaction. Both print ``{"event": "ready"}``
first and run until killed.
"""

from __future__ import annotations

import asyncio
import json
import sys

from pycrdt import Doc, Text

from crdtsync.server.stores import open_store


def say(data: dict[str, object]) -> None:
    sys.stdout.write(json.dumps(data) + "\n")
    sys.stdout.flush()


async def append(address: str, doc_name: str) -> None:
    store = open_store(address)
    doc: Doc = Doc()
    text = doc.get("notes", type=Text)
    updates: list[bytes] = []
    doc.observe(lambda event: updates.append(event.update))
    say({"event": "ready"})
    n = 0
    while True:
        n += 1
        line = f"line {n}\n"
        text.insert(len(str(text)), line)
        (position,) = await store.append([(doc_name, updates[-1])])
        say({"position": position, "text": line})


async def compact(address: str, doc_name: str) -> None:
    store = open_store(address)
    say({"event": "ready"})
    while True:
        result = await store.compact(doc_name)
        say({"compacted": result.folded})
        await asyncio.sleep(0)


def main() -> None:
    mode, address, doc_name = sys.argv[1:4]
    asyncio.run({"append": append, "compact": compact}[mode](address, doc_name))


if __name__ == "__main__":
    main()
