"""Owners of client ids cross regions with the content (issue 12, item 5: "two regions can
never grant one id to two writers"). Real relay processes on loopback, through the
Regions harness; every wait is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import pytest
from helpers import eventually, timeout_s
from pycrdt import Doc, Text
from test_regions import _linked, _tokens_of
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from crdtsync.client import Replica
from crdtsync.protocol import (
    ExtHello,
    ExtLinkUpdate,
    PermissionDenied,
    SyncStep1,
    SyncUpdate,
    decode_message,
)
from crdtsync.testing.regions import Regions
from crdtsync.updates import check_update

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

DOC = "owners/doc"


async def _denials(url: str, update: bytes) -> list[str]:
    """Send ``update`` as a stock y-websocket client; the refusals it gets (within 5 s:
    an update that is stored gets none)."""
    denied: list[str] = []
    async with connect(url) as ws:
        await ws.send(SyncStep1(b"\x00").encode())
        await ws.send(SyncUpdate(update).encode())
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s(5)):
                while not denied:
                    msg = decode_message(await ws.recv())  # type: ignore[arg-type]
                    if isinstance(msg, PermissionDenied):
                        denied.append(msg.reason)
    return denied


async def _read_until_closed(ws: ClientConnection) -> None:
    for _ in range(1000):  # (a few answers at most come before the close)
        await ws.recv()


@pytest.mark.parametrize("redis", [(), ("us",)], ids=["sqlite", "redis"])
async def test_an_id_written_in_one_region_cannot_be_taken_in_another(
    tmp_path: Path, redis: tuple[str, ...]
) -> None:
    """A replica writes in eu; its content reaches us. While it is offline, a writer of
    us (another token subject) sends content at the replica's next clocks: refused in us
    as in eu, since its owner travelled with its content. Before, us recorded no owner
    for ids its link brought: it stored the forgery, and the replica's own edit at those
    clocks was refused for good in us (and the regions differed for ever)."""
    settings = {"anti_entropy_s": 0, "link_ack_timeout_s": 5.0}
    async with Regions(tmp_path, ("eu", "us"), redis=redis, settings=settings) as regions:
        await _linked(regions, "eu", "us")
        await _linked(regions, "us", "eu")
        token = regions.token(subject="alice")
        async with Replica(tmp_path / "o.db", relay=regions["eu"].url, token=token) as owner:
            doc = await owner.open(DOC)
            doc.get("text", type=Text).insert(0, "owner;")
            await owner.wait_synced(DOC, timeout=timeout_s(20))
            client = doc.client_id

        async def holds(region: str, token: str) -> bool:
            return token in _tokens_of(await regions[region].document(DOC))

        await eventually(lambda: holds("us", "owner"), timeout=30, what="the edit in us")
        # Someone who saw the replica's id and clock writes there first, in us.
        impostor = Doc(client_id=client)
        impostor.apply_update(await regions["us"].document(DOC))
        before = impostor.get_state()
        impostor.get("text", type=Text).insert(0, "EVIL;")
        forged = impostor.get_update(before)
        assert check_update(forged).starts == {client: len("owner;")}
        mallory = regions.token(subject="mallory")
        denied = await _denials(f"{regions['us'].url}/{DOC}?token={mallory}", forged)
        assert denied, "us stored content at the clocks of an id eu's writer owns"
        assert f"client {client} belongs to another writer" in denied[0]

        # The replica, offline meanwhile, writes at those clocks and then syncs with us.
        async with Replica(tmp_path / "o.db", relay=regions["us"].url, token=token) as owner:
            doc = await owner.open(DOC)
            doc.get("text", type=Text).insert(len("owner;"), "offline;")
            await owner.wait_synced(DOC, timeout=timeout_s(20))
            assert owner.status(DOC).refused == 0
        for region in ("us", "eu"):
            await eventually(
                lambda r=region: holds(r, "offline"), timeout=30, what=f"the edit in {region}"
            )
            assert not await holds(region, "EVIL")


async def test_a_link_update_from_a_client_closes_its_connection(tmp_path: Path) -> None:
    """Only a region's link may name owners: a client sending a link's update is closed
    (1002), and nothing of it is stored."""
    async with Regions(tmp_path, ("eu", "us"), settings={"anti_entropy_s": 0}) as regions:
        writer = Doc(client_id=77)
        writer.get("text", type=Text).insert(0, "sneaky;")
        url = f"{regions['eu'].url}/{DOC}?crdtsync=1&token={regions.token(subject='m')}"
        async with asyncio.timeout(timeout_s(15)), connect(url) as ws:
            assert isinstance(decode_message(await ws.recv()), ExtHello)  # type: ignore[arg-type]
            await ws.send(ExtLinkUpdate(1, writer.get_update(), ((77, "sub:m"),)).encode())
            with pytest.raises(ConnectionClosed) as closed:
                await _read_until_closed(ws)
        assert closed.value.rcvd is not None
        assert closed.value.rcvd.code == 1002
        assert "sneaky" not in _tokens_of(await regions["eu"].document(DOC))


async def test_a_replica_refills_an_emptied_region_with_ids_whose_owners_came_back_first(
    tmp_path: Path,
) -> None:
    """``check --regions 3`` seed 360: an edit eu acknowledged that only eu and its
    replica held; eu lost its store and was refilled by us, with the owner ("key") of
    the replica's id (it travels with the content now). The replica, reopened meanwhile
    with nothing pending, had forgotten the keys of its earlier ids: it could not prove
    that id, and eu refused its edit for good. Mended: a replica keeps the keys of its
    earlier ids (up to 16) even with nothing pending."""
    settings = {"anti_entropy_s": 0, "link_ack_timeout_s": 5.0}
    async with Regions(tmp_path, ("eu", "us"), settings=settings) as regions:
        await _linked(regions, "eu", "us")
        await _linked(regions, "us", "eu")
        token = regions.token(subject="alice")

        async def holds(region: str, token: str) -> bool:
            return token in _tokens_of(await regions[region].document(DOC))

        async with Replica(tmp_path / "r.db", relay=regions["eu"].url, token=token) as r:
            text = (await r.open(DOC)).get("text", type=Text)
            text.insert(0, "first;")
            await r.wait_synced(DOC, timeout=timeout_s(20))
            await eventually(lambda: holds("us", "first"), timeout=30, what="first in us")
            regions.links["eu", "us"].partition()
            text.insert(len("first;"), "second;")  # (the same id's next clocks)
            await r.wait_synced(DOC, timeout=timeout_s(20))  # acknowledged by eu only
        # Reopened with nothing pending (a new id), then eu loses its store.
        async with Replica(tmp_path / "r.db", relay=regions["us"].url, token=token) as r:
            await r.open(DOC)
        await regions.empty("eu")
        regions.heal()
        await _linked(regions, "us", "eu")  # eu refilled by us: "first", and its owner
        async with Replica(tmp_path / "r.db", relay=regions["eu"].url, token=token) as r:
            await r.open(DOC)
            await eventually(lambda: holds("eu", "second"), timeout=30, what="second in eu")
            assert r.status(DOC).refused == 0
        await eventually(lambda: holds("us", "second"), timeout=30, what="second in us")
