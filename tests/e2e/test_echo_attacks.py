"""An outside attack on echo suppression (Mux.wrote): what another connection wrote must reach a
replica even when its own write to the same document lands after it (real relay process)."""

from __future__ import annotations

import asyncio
import sqlite3

import pytest
from pycrdt import Doc
from stock import stored_text, text_update
from test_mux_attacks import MuxClient
from websockets.asyncio.client import connect

from crdtsync.protocol import (
    ExtChanged,
    ExtChannel,
    ExtClaim,
    ExtClose,
    ExtDigests,
    ExtHello,
    ExtOpen,
    ExtSubscribe,
    ExtUpdate,
    SyncStep1,
    SyncStep2,
    SyncUpdate,
    decode_message,
)

pytestmark = pytest.mark.anyio


async def mux_client(url: str) -> MuxClient:
    ws = await connect(f"{url}/?crdtsync=1&mux=1", max_size=None)
    client = MuxClient(ws)
    hello = await client.until(lambda m: True)
    assert isinstance(hello, ExtHello), hello
    return client


def _saw_others_change(m: MuxClient, channel: int, name: str) -> bool:
    """m heard of the document's change: announced in a folder, or sent on its channel."""
    for msg in m.seen:
        if isinstance(msg, ExtChanged) and name in msg.documents:
            return True
        if isinstance(msg, ExtChannel) and msg.channel == channel:
            inner = decode_message(msg.frame)
            if isinstance(inner, SyncUpdate):
                return True
    return False


@pytest.mark.long
async def test_another_large_update_committed_before_an_own_deferred_write_is_announced(
    relay_factory,
):
    """b (a stock client) sends a large update to f/dN (staged off the loop); meanwhile a
    (multiplexed, keeping f/) writes a small update to f/dN and closes its channel. a's
    update waits for the staging (deferred), is committed right after b's, and is noted
    as a's own write at the document's latest position: the watcher leaves f/dN out of
    a's announcement although b's change (which a never received) is in it."""
    relay = relay_factory("relay.db")
    m = await mux_client(relay.url)
    await m.send(ExtSubscribe(1, "f/"))
    await m.until(lambda x: isinstance(x, ExtChanged) and x.folder == 1)
    await m.send(ExtDigests(1, (), last=True))
    await m.until(lambda x: isinstance(x, ExtChanged) and x.folder == 1 and x.caught_up)
    missed: list[str] = []
    big = text_update(Doc(), "O" * (12 * 1024 * 1024))
    # Control: b's large update alone is announced to a.
    async with connect(f"{relay.url}/f/control", max_size=None) as stock:
        await stock.recv()
        await stock.send(SyncUpdate(big).encode())
        await m.until(lambda x: isinstance(x, ExtChanged) and "f/control" in x.documents, 20)
    for attempt in range(16):
        name = f"f/d{attempt}"
        ch = attempt + 1
        await m.send(ExtOpen(ch, name))
        await m.send(ExtChannel(ch, SyncStep1(b"\x00").encode()))
        await m.until(
            lambda x, ch=ch: (
                isinstance(x, ExtChannel)
                and x.channel == ch
                and isinstance(decode_message(x.frame), SyncStep2)
            )
        )
        await m.send(ExtChannel(ch, ExtClaim(()).encode()))
        m.seen.clear()
        async with connect(f"{relay.url}/{name}", max_size=None) as stock:
            await stock.recv()
            await stock.send(SyncUpdate(big).encode())
            await asyncio.sleep(0.04 + 0.01 * attempt)  # (R arrives while O is staged)
            mine = Doc()
            await m.send(ExtChannel(ch, ExtUpdate(1, text_update(mine, "r")).encode()))
            await m.send(ExtClose(ch))
            await m.drain(3)
        with sqlite3.connect(relay.store) as db:
            order = db.execute(
                "SELECT seq, length(data) FROM updates WHERE doc = ?", (name,)
            ).fetchall()
        assert len(order) == 2, order
        if not _saw_others_change(m, ch, name):
            missed.append(name)
    for name in missed:  # both writes are stored: a's and b's
        text = stored_text(relay.store, name)
        assert "r" in text, name
        assert text.count("O") == 12 * 1024 * 1024, name
    await m.ws.close()
    assert not missed, f"a never heard of b's change to {missed}"
