"""A Python replica that edits the browser demo's document next to you.

With ``examples/web/serve.py`` running (it prints this command with its relay's URL)::

    python examples/web/bot.py --relay ws://127.0.0.1:8765 --doc demo

It opens the document ``demo`` in a :class:`crdtsync.client.Replica` (a local SQLite
file: a temporary one, or ``--db FILE``), shows up as "python bot" in the page's list
of who is here (presence), and

- appends a line ``bot> line N ...`` every ``--every`` seconds (``--lines`` of them; 0:
  no end), above the line you are typing if it is not finished;
- answers every finished line (Enter pressed) that starts with ``bot:`` with a line
  ``bot> heard ...`` right below it, once the text has been still for a moment.

Every edit is in the replica's file before it is sent, and is sent when the relay is
reachable: stop the relay (Enter where serve.py runs), let the bot write, start it again
(Enter), and the page gets every line. Ctrl-C stops it. It prints what it does, one line per edit.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
import tempfile
import time
from pathlib import Path

import pycrdt

from crdtsync.client import Replica

ROOT = "text"  # the page's Y.Text: ydoc.getText("text")
QUESTION = "bot:"
LINE = "bot> "  # the bot's own lines start with this ...
ANSWER = "bot> heard "  # ... and its answers with this
QUIET_S = 0.7  # answer once the text has not changed for this long (a line being edited)


def byte_offset(text: str, index: int) -> int:
    """pycrdt indexes a Text by UTF-8 bytes: the offset of ``text[:index]``."""
    return len(text[:index].encode("utf-8"))


def unanswered_questions(content: str) -> list[tuple[int, str]]:
    """(the index of its "\\n", the question) for each finished line starting with
    "bot:" whose next line is not an answer yet; last first."""
    found = []
    start = 0
    lines = content.split("\n")
    for i, line in enumerate(lines[:-1]):  # the last line has no "\n": not finished
        if line.startswith(QUESTION) and not lines[i + 1].startswith(ANSWER):
            found.append((start + len(line), line[len(QUESTION) :].strip()))
        start += len(line) + 1
    return found[::-1]


def answer_to(question: str) -> str:
    if not question:
        return f"{ANSWER}nothing: ask me something after 'bot:'"
    words = len(question.split())
    return (
        f'{ANSWER}"{question}" from the browser: {words} word{"s" * (words != 1)}, '
        f'backwards "{question[::-1]}"'
    )


def insert_line_after(text: pycrdt.Text, newline: int, line: str) -> None:
    """Insert ``line`` as the line after the one that ends at index ``newline`` (its
    "\\n"; -1: as the first line).

    The new line goes in *before* that "\\n" (as "\\n" + line): a cursor at the start of
    the next line, where someone who just pressed Enter is typing, stays below it. (Put
    after the "\\n", it would land at their cursor, and an editor keeps a cursor in front
    of text inserted there: their next keys would go in front of the bot's line.)
    """
    content = str(text)
    if newline < 0:
        text.insert(0, line + "\n")
    else:
        text.insert(byte_offset(content, newline), "\n" + line)


async def run(relay: str, doc_name: str, db: Path, every: float, lines: int, name: str) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    changed = asyncio.Event()

    async with Replica(db, relay=relay) as replica:
        doc = await replica.open(doc_name)
        text = doc.get(ROOT, type=pycrdt.Text)
        replica.awareness(doc_name).set_local_state(
            {"user": {"name": name, "color": "#b8860b", "colorLight": "#b8860b33"}}
        )
        # Observers run inside the transaction that changed the text: no edits there.
        text.observe(lambda _event: loop.call_soon_threadsafe(changed.set))
        print(f"bot: editing {doc_name!r} through {relay} (file {db}); Ctrl-C stops", flush=True)

        async def answer() -> None:
            while True:
                await changed.wait()
                # Debounce: wait until nobody typed for QUIET_S.
                while True:
                    changed.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(changed.wait(), QUIET_S)
                        continue
                    break
                for newline, question in unanswered_questions(str(text)):
                    insert_line_after(text, newline, answer_to(question))
                    print(f"bot: answered {question!r}", flush=True)

        async def tick() -> None:
            n = 0
            while lines == 0 or n < lines:
                n += 1
                line = f"{LINE}line {n} from a Python replica at {time.strftime('%H:%M:%S')}"
                # After the last finished line: above a line still being typed.
                insert_line_after(text, str(text).rfind("\n"), line)
                status = replica.status(doc_name)
                where = "sent" if status.connected else "kept in the file until the relay is back"
                print(f"bot: wrote line {n} ({where})", flush=True)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), every)
                    return

        changed.set()  # answer questions already in the document
        tasks = [asyncio.create_task(answer()), asyncio.create_task(tick())]
        await stop.wait()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        print("bot: stopping", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="A Python replica editing the browser demo.")
    parser.add_argument("--relay", default="ws://127.0.0.1:8765", help="relay URL")
    parser.add_argument("--doc", default="demo", help="document name (the page's ?doc=)")
    parser.add_argument("--db", type=Path, help="the replica's SQLite file (default: temporary)")
    parser.add_argument("--every", type=float, default=5.0, help="seconds between lines (5)")
    parser.add_argument("--lines", type=int, default=60, help="lines to write; 0: no end (60)")
    parser.add_argument("--name", default="python bot", help="the name the page shows")
    args = parser.parse_args(argv)
    if args.every <= 0:
        parser.error("--every must be positive")
    with contextlib.ExitStack() as stack:
        db = args.db
        if db is None:
            db = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="crdtsync-bot-")))
            db = db / "bot.db"
        return asyncio.run(run(args.relay, args.doc, db, args.every, args.lines, args.name))


if __name__ == "__main__":
    sys.exit(main())
