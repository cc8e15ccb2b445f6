"""Test helpers for talking to a relay as a stock y-websocket client would (raw frames)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from helpers import timeout_s
from pycrdt import Doc, Text
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from crdtsync.protocol import SyncStep1, SyncStep2, SyncUpdate, decode_message
from crdtsync.store import UpdateLog, merge_in_batches


def text_update(doc: Doc[Any], text: str) -> bytes:
    """Append ``text`` to ``doc``'s "text" and return that transaction's update."""
    before = doc.get_state()
    t = doc.get("text", type=Text)
    t.insert(len(t), text)
    return doc.get_update(before)


def stored_text(store: Path, name: str) -> str:
    """The "text" of ``name`` as a relay's store file holds it."""
    with UpdateLog(store) as log:
        updates = log.load(name).all_updates()
    doc: Doc[Any] = Doc()
    if updates:
        doc.apply_update(merge_in_batches(updates))
    return str(doc.get("text", type=Text))


async def read_document(ws: ClientConnection, seconds: float = 10) -> tuple[str, list[object]]:
    """Sync as a stock client: the document's text, and every message received."""
    await ws.send(SyncStep1(b"\x00").encode())
    doc: Doc[Any] = Doc()
    seen: list[object] = []
    async with asyncio.timeout(timeout_s(seconds)):
        while True:
            msg = decode_message(await ws.recv())  # type: ignore[arg-type]
            seen.append(msg)
            if isinstance(msg, SyncStep2 | SyncUpdate):
                doc.apply_update(msg.update)
            if isinstance(msg, SyncStep2):
                return str(doc.get("text", type=Text)), seen


async def messages_within(ws: ClientConnection, seconds: float) -> list[object]:
    """Every message that arrives within ``seconds`` (a bounded window, for "nothing else")."""
    out: list[object] = []
    try:
        async with asyncio.timeout(seconds):
            while True:
                out.append(decode_message(await ws.recv()))  # type: ignore[arg-type]
    except TimeoutError:
        return out


async def close_of(ws: ClientConnection, seconds: float) -> tuple[int, str]:
    """Read until the relay closes ``ws``: its close code and reason."""
    try:
        async with asyncio.timeout(timeout_s(seconds)):
            while True:
                await ws.recv()
    except ConnectionClosed as exc:
        assert exc.rcvd is not None, "closed without a close frame"
        return exc.rcvd.code, exc.rcvd.reason
    raise AssertionError("unreachable")
