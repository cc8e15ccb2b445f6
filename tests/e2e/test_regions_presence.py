"""Presence crosses regions best effort (issue 12, item 5): over the links, never stored,
dropped while a link is down, held to the target room's caps, never passed on. Real
relay processes on loopback, stock y-websocket clients; every wait is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Any

import pytest
from helpers import eventually
from test_regions import _all_linked, _linked
from websockets.asyncio.client import ClientConnection, connect

from crdtsync.protocol import (
    AwarenessEntry,
    AwarenessMessage,
    QueryAwareness,
    SyncStep1,
    decode_awareness,
    decode_message,
    encode_awareness,
)
from crdtsync.testing.regions import Regions

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

DOC = "presence/doc"


def _awareness(client: int, clock: int, state: dict[str, Any] | None) -> bytes:
    return AwarenessMessage(encode_awareness([AwarenessEntry(client, clock, state)])).encode()


async def _seen(regions: Regions, region: str, seconds: float = 0.5) -> dict[int, Any]:
    """Join ``region``'s room as a stock client, ask who is here, collect the states."""
    states: dict[int, Any] = {}
    async with connect(f"{regions[region].url}/{DOC}?token={regions.token()}") as ws:
        await ws.send(SyncStep1(b"\x00").encode())
        await ws.send(QueryAwareness().encode())
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                while True:
                    msg = decode_message(await ws.recv())  # type: ignore[arg-type]
                    if isinstance(msg, AwarenessMessage):
                        for entry in decode_awareness(msg.payload):
                            if entry.state is None:
                                states.pop(entry.client_id, None)
                            else:
                                states[entry.client_id] = entry.state
    return states


async def _present(
    stack: contextlib.AsyncExitStack, regions: Regions, region: str, client: int
) -> ClientConnection:
    """A stock client of ``region`` in the room, with a presence state of its own."""
    url = f"{regions[region].url}/{DOC}?token={regions.token()}"
    ws = await stack.enter_async_context(connect(url))
    await ws.send(SyncStep1(b"\x00").encode())
    await ws.send(_awareness(client, 1, {"user": f"{region}-{client}"}))
    return ws


async def test_presence_crosses_live_is_dropped_with_its_link_and_never_passed_on(
    tmp_path: Path,
) -> None:
    async with (
        Regions(tmp_path, ("eu", "us", "ap"), settings={"anti_entropy_s": 0}) as regions,
        contextlib.AsyncExitStack() as stack,
    ):
        await _all_linked(regions)
        await _present(stack, regions, "eu", 501)
        await _present(stack, regions, "us", 502)

        async def everywhere(client: int) -> bool:
            for region in regions.names:
                if client not in await _seen(regions, region):
                    return False
            return True

        await eventually(lambda: everywhere(501), timeout=20, what="eu's state everywhere")
        await eventually(lambda: everywhere(502), timeout=20, what="us's state everywhere")
        assert (await _seen(regions, "ap"))[501] == {"user": "eu-501"}

        # eu's links to us cut: us drops eu's state, though ap (which has it) is linked
        # to us: what a region learned from a link is never passed on.
        regions.partition("eu", "us")

        async def gone_from_us() -> bool:
            return 501 not in await _seen(regions, "us")

        await eventually(gone_from_us, timeout=20, what="eu's state gone from us")
        await asyncio.sleep(1.0)  # (several of ap's flushes: nothing of eu's comes)
        seen = await _seen(regions, "us")
        assert 501 not in seen
        assert 502 in seen
        assert 501 in await _seen(regions, "ap")

        # Healed: the link starts over and sends what eu's clients have now.
        regions.heal()
        await eventually(lambda: everywhere(501), timeout=30, what="eu's state back in us")
        assert regions["eu"].link("us")["presence_sent"] >= 1
    # (Presence is never stored: nothing of it is in any store.)
    for name in regions.names:
        assert await regions[name].last_change() == 0, await regions[name].documents(name)


async def test_presence_from_a_link_is_held_to_the_target_rooms_caps(tmp_path: Path) -> None:
    settings = {"anti_entropy_s": 0, "max_presence_states_per_room": 3}
    async with (
        Regions(tmp_path, ("eu", "us"), settings=settings) as regions,
        contextlib.AsyncExitStack() as stack,
    ):
        await _linked(regions, "eu", "us")
        await _linked(regions, "us", "eu")
        connects = regions["eu"].link("us")["connects"]
        for client in (601, 602):
            await _present(stack, regions, "us", client)
        for client in (701, 702, 703):
            await _present(stack, regions, "eu", client)

        async def full() -> bool:
            return len(await _seen(regions, "us")) == 3

        await eventually(full, timeout=20, what="us's room full")
        await asyncio.sleep(0.5)  # (eu's link flushes again: still three)
        seen = await _seen(regions, "us")
        assert len(seen) == 3
        assert {601, 602} <= set(seen)
        link = regions["eu"].link("us")
        assert link["state"] == "live"
        assert link["connects"] == connects  # (over the caps: dropped, never closed)
