"""The relay's side of the protocol, observed with a raw websocket client."""

from __future__ import annotations

import asyncio

import pytest
from helpers import timeout_s
from pycrdt import Doc, Text
from stock import messages_within
from websockets.asyncio.client import connect

from crdtsync.client import Replica
from crdtsync.protocol import (
    AwarenessMessage,
    ExtHello,
    SyncStep1,
    SyncStep2,
    SyncUpdate,
    decode_message,
)

pytestmark = pytest.mark.anyio


async def test_live_updates_wait_until_the_sync_answer_went_out(relay, tmp_path):
    async with Replica(tmp_path / "b.db", relay=relay.url) as b:
        doc_b = await b.open("order")
        doc_b.get("text", type=Text).insert(0, "before. ")
        await b.wait_synced("order", timeout=10)
        async with asyncio.timeout(timeout_s(20)), connect(f"{relay.url}/order") as ws:
            first = decode_message(await ws.recv())
            assert isinstance(first, SyncStep1)  # the relay's own step 1, first
            doc_b.get("text", type=Text).insert(0, "live. ")  # while we have not synced
            await b.wait_synced("order", timeout=10)
            early = await messages_within(ws, 0.5)
            # only presence may arrive before our step 1 is answered
            assert all(isinstance(m, AwarenessMessage) for m in early), early
            await ws.send(SyncStep1(b"\x00").encode())
            received = []
            doc = Doc()
            while "live. " not in str(doc.get("text", type=Text)):
                msg = decode_message(await ws.recv())
                if isinstance(msg, (SyncStep2, SyncUpdate)):
                    received.append(type(msg))
                    doc.apply_update(msg.update)
            assert received[0] is SyncStep2
            assert str(doc.get("text", type=Text)) == "live. before. "


async def test_relay_confirms_extensions_first_only_to_peers_that_ask(relay):
    async with asyncio.timeout(timeout_s(10)), connect(f"{relay.url}/ext?crdtsync=1") as ws:
        assert decode_message(await ws.recv()) == ExtHello(1)
        assert isinstance(decode_message(await ws.recv()), SyncStep1)
    async with asyncio.timeout(timeout_s(10)), connect(f"{relay.url}/ext?other=1") as ws:
        assert isinstance(decode_message(await ws.recv()), SyncStep1)
