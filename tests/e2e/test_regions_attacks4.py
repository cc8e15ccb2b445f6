"""Fourth outside review of regions (of 187c13e: presence across regions). Each test
failed at 187c13e on the defect its docstring describes, and shows it mended. Real relay
processes on loopback through the Regions harness; every loop is bounded in count and time.

Mended: a client's state set by one peer while another held it is handed over (the
others hold it no more: their removal or close takes nothing, and this region's links no
longer carry it when the previous holder was local); a link's drain waits for every key
of its batches (a retry's refusals come before it decides to back off).
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import pytest
from helpers import eventually, timeout_s
from pycrdt import Doc, Text
from test_regions import _linked, _tokens_of
from test_regions_attacks3 import DOC, _awareness, _drain, _present, _seen
from websockets.asyncio.client import connect

from crdtsync.client import Replica
from crdtsync.protocol import SyncStep1, SyncUpdate
from crdtsync.testing.regions import Regions

pytestmark = [pytest.mark.anyio, pytest.mark.slow, pytest.mark.long]


async def _both_linked(regions: Regions) -> None:
    await _linked(regions, "eu", "us")
    await _linked(regions, "us", "eu")


async def test_a_client_that_moved_here_is_removed_by_the_region_it_left(
    tmp_path: Path,
) -> None:
    """A stock client present in eu (seen in us by eu's link) reconnects to us, as
    y-websocket does: its state again, same clock. us's room now holds it from a local
    connection, but the eu link's channel still "holds" its copy (Peer.presence, same
    clock). The client's old eu connection then closes: eu's relay sends a removal
    (clock + 1), its link passes it on (it carried that state), and us takes it, from a
    connection that is no longer the state's holder: the client, still connected to us,
    vanishes from us's room (a crdtsync Replica does not re-assert its state on a remote
    removal: Presence._on_change sends only local changes; it is back at its renewal,
    up to 15 s later)."""
    async with (
        Regions(tmp_path, ("eu", "us"), settings={"anti_entropy_s": 0}) as regions,
        contextlib.AsyncExitStack() as stack,
    ):
        await _both_linked(regions)
        inner = contextlib.AsyncExitStack()
        old = await _present(inner, regions, "eu", 961, {"user": "mover"})
        asyncio.get_running_loop().create_task(_drain(old))

        async def in_us() -> bool:
            return 961 in await _seen(regions, "us")

        await eventually(in_us, timeout=20, what="the client's eu state in us")
        new = await _present(stack, regions, "us", 961, {"user": "mover"})
        asyncio.get_running_loop().create_task(_drain(new))
        await asyncio.sleep(0.5)  # (its us state relayed and crossed to eu)
        await inner.aclose()  # the old eu connection closes (a reconnect, seen late)
        await asyncio.sleep(1.5)  # (eu's removal crosses the link)
        seen = await _seen(regions, "us", seconds=1.0)
        assert 961 in seen, f"a client connected to us vanished from us: {seen}"


async def test_clients_that_moved_between_regions_leave_stale_states_that_crowd_out_new_ones(
    tmp_path: Path,
) -> None:
    """Four eu clients move to us (each sends its state there with a higher clock, then
    its eu connection closes, then it leaves us). Nothing of them is present anywhere,
    yet us's channel of eu's link keeps their states (Peer.presence): eu never sent a
    removal (its room's state was us's, newer: Relay._leave sends none), or us skipped
    it as older (Relay._on_awareness drops an older removal before drop_presence). They
    count as other regions' states against the half-cap (max 8 // 2 = 4 here): a new eu
    client is never shown in us (and eu's link mirror keeps them too, re-sending them as
    ghosts when a channel closes)."""
    settings = {"anti_entropy_s": 0, "max_presence_states_per_room": 8}
    async with (
        Regions(tmp_path, ("eu", "us"), settings=settings) as regions,
        contextlib.AsyncExitStack() as stack,
    ):
        await _both_linked(regions)
        for client in (971, 972, 973, 974):
            in_eu = contextlib.AsyncExitStack()
            in_us = contextlib.AsyncExitStack()
            ws = await _present(in_eu, regions, "eu", client)
            asyncio.get_running_loop().create_task(_drain(ws))

            async def crossed(client: int = client) -> bool:
                return client in await _seen(regions, "us", seconds=0.3)

            await eventually(crossed, timeout=20, what=f"{client} in us")
            url = f"{regions['us'].url}/{DOC}?token={regions.token()}"
            moved = await in_us.enter_async_context(connect(url))
            await moved.send(SyncStep1(b"\x00").encode())
            await moved.send(_awareness(client, 5, {"user": f"moved-{client}"}))
            asyncio.get_running_loop().create_task(_drain(moved))
            await asyncio.sleep(0.5)
            await in_eu.aclose()
            await asyncio.sleep(0.5)
            await in_us.aclose()
            await asyncio.sleep(0.5)
        for region in ("eu", "us"):
            left = await _seen(regions, region, seconds=0.5)
            assert not left, f"{region} still shows clients that left: {left}"
        ws = await _present(stack, regions, "eu", 980)
        asyncio.get_running_loop().create_task(_drain(ws))
        await asyncio.sleep(2.0)
        seen = await _seen(regions, "us", seconds=1.0)
        assert 980 in seen, (
            f"a new eu client is not shown in us (stale remote states fill the half-cap): {seen}"
        )


async def test_a_state_that_left_comes_back_as_a_ghost_when_the_link_reopens_its_channel(
    tmp_path: Path,
) -> None:
    """An eu client (which also wrote to the document) moves to us with a higher clock,
    then its eu connection closes: eu's room holds us's newer copy, so eu sends no
    removal (Relay._leave), and eu's link to us keeps the client's old state in its
    mirror (Link._mirror drops an entry only on a removal). The client then leaves us:
    gone everywhere. ap is emptied: eu's link to us sweeps and reopens the document's
    channel, and re-sends what its mirror holds (Link._presence_lost): us shows the
    client that left, a ghost nothing ever removes (eu has no state of it to remove)."""
    settings = {"anti_entropy_s": 0, "link_ack_timeout_s": 5.0}
    async with Regions(tmp_path, ("eu", "us", "ap"), settings=settings) as regions:
        for source in ("eu", "us", "ap"):
            for target in ("eu", "us", "ap"):
                if source != target:
                    await _linked(regions, source, target)
        in_eu = contextlib.AsyncExitStack()
        in_us = contextlib.AsyncExitStack()
        ws = await _present(in_eu, regions, "eu", 991)
        writer = Doc(client_id=991)
        writer.get("text", type=Text).insert(0, "ghost;")
        await ws.send(SyncUpdate(writer.get_update()).encode())
        asyncio.get_running_loop().create_task(_drain(ws))

        async def in_us_now() -> bool:
            return "ghost" in _tokens_of(await regions["us"].document(DOC)) and (
                991 in await _seen(regions, "us", seconds=0.3)
            )

        await eventually(in_us_now, timeout=20, what="the edit and the state in us")
        url = f"{regions['us'].url}/{DOC}?token={regions.token()}"
        moved = await in_us.enter_async_context(connect(url))
        await moved.send(SyncStep1(b"\x00").encode())
        await moved.send(_awareness(991, 5, {"user": "moved"}))
        asyncio.get_running_loop().create_task(_drain(moved))
        await asyncio.sleep(0.5)
        await in_eu.aclose()
        await asyncio.sleep(0.5)
        await in_us.aclose()
        await asyncio.sleep(1.0)
        for region in ("eu", "us", "ap"):
            left = await _seen(regions, region, seconds=0.5)
            assert 991 not in left, f"{region} still shows the client that left: {left}"
        sweeps = regions["eu"].link("us")["sweeps"]
        await regions.empty("ap")
        await eventually(
            lambda: regions["eu"].link("us")["sweeps"] > sweeps,
            timeout=30,
            what="eu's link to us swept (ap was reset)",
        )
        await _linked(regions, "eu", "us", "after its sweep")
        await asyncio.sleep(1.0)
        seen = await _seen(regions, "us", seconds=1.0)
        assert 991 not in seen, f"a client that left every region is back in us: {seen}"


async def test_a_document_refused_again_and_again_backs_off(tmp_path: Path) -> None:
    """A document the target refuses every time (over its quota there) is retried with
    a pause doubling up to 30 s (Link._retry_refused); the late ExtRefused (after
    Link._drain) resets the pause to 0.5 s each time: the link re-ships the document
    twice a second, forever. Cause: a retry's batch ends at the cursor, so
    Link._advance drops it from the window at once and Link._drain does not wait for its
    acknowledgements; the same early return clears the store's retry mark
    (Link._unmark_retry) while the document still waits in memory."""
    settings = {"anti_entropy_s": 0, "max_document_bytes": 20000, "link_ack_timeout_s": 5.0}
    doc = "quota/doc"
    async with Regions(tmp_path, ("eu", "us"), settings=settings) as regions:
        await _both_linked(regions)
        regions.isolate("eu")
        token = regions.token()
        for region in ("eu", "us"):
            async with Replica(
                tmp_path / f"{region}.db", relay=regions[region].url, token=token
            ) as a:
                t = (await a.open(doc)).get("t", type=Text)
                t.insert(0, region * 6000)
                await a.wait_synced(doc, timeout=timeout_s(20))
        regions.links["eu", "us"].heal()
        regions.links["us", "eu"].heal()
        await eventually(
            lambda: regions["eu"].link("us")["retries"] >= 1, timeout=30, what="a retry"
        )
        before = regions["eu"].link("us")["retries"]
        await asyncio.sleep(8.0)
        retried = regions["eu"].link("us")["retries"] - before
        assert retried <= 5, f"{retried} retries in 8 s of a document refused every time"
