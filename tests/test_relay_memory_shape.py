"""What an open, idle document channel holds in the relay: its shape, not its size (the
figures are bench/folders.py's). An idle channel holds no per-channel lists, buckets or
ledger, a room of one peer and one presence state no set or dict; every limit still
holds per channel, and presence is counted as before."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any

import pytest
from helpers import eventually, timeout_s
from hypothesis import given
from hypothesis import strategies as st
from websockets.asyncio.client import ClientConnection, connect

from crdtsync.integrity import KEY_OWNER, client_id_of_key
from crdtsync.limits import TokenBucket
from crdtsync.protocol import (
    AwarenessEntry,
    AwarenessMessage,
    ExtChannel,
    ExtClaim,
    ExtHello,
    ExtOpen,
    SyncStep1,
    SyncStep2,
    decode_message,
    encode_awareness,
)
from crdtsync.server.relay import Peer, Relay, Room
from crdtsync.settings import RelaySettings
from crdtsync.sync import SyncSession

pytestmark = pytest.mark.anyio

EMPTY_UPDATE = b"\x00\x00"


class Mux:
    """A multiplexed connection driven by hand; it keeps reading what the relay sends."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.seen: list[Any] = []
        self.reader = asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        async for data in self.ws:
            self.seen.append(decode_message(data))  # type: ignore[arg-type]

    async def send(self, channel: int, msg: Any) -> None:
        await self.ws.send(ExtChannel(channel, msg.encode()).encode())

    def step2s(self, channel: int) -> int:
        return sum(
            1
            for m in self.seen
            if isinstance(m, ExtChannel)
            and m.channel == channel
            and isinstance(decode_message(m.frame), SyncStep2)
        )

    async def close(self) -> None:
        await self.ws.close()
        self.reader.cancel()
        await asyncio.gather(self.reader, return_exceptions=True)


async def open_mux(relay: Relay) -> Mux:
    ws = await connect(f"{relay.url}/?crdtsync=1&mux=1", max_size=None)
    hello = decode_message(await ws.recv())  # type: ignore[arg-type]
    assert isinstance(hello, ExtHello), hello
    return Mux(ws)


async def open_idle_channel(
    mux: Mux, channel: int, document: str, client: int, clock: int = 1
) -> None:
    """What a replica does on opening a document: step 1, its answer to the relay's step 1,
    its presence state; then nothing."""
    await mux.ws.send(ExtOpen(channel, document).encode())
    await mux.send(channel, SyncStep1(b"\x00"))
    await mux.send(channel, SyncStep2(EMPTY_UPDATE))
    state = encode_awareness([AwarenessEntry(client, clock, {"user": "idle"})])
    await mux.send(channel, AwarenessMessage(state))
    await eventually(lambda: mux.step2s(channel) >= 1, 10, f"channel {channel}'s answer")


@pytest.fixture
async def relay(tmp_path: Path) -> Any:
    relay = Relay(RelaySettings(port=0, store=tmp_path / "relay.db", compaction_workers=0))
    await relay.start()
    try:
        yield relay
    finally:
        await relay.stop()


def the_mux(relay: Relay) -> Any:
    (mux,) = relay._muxes
    return mux


async def test_an_idle_channel_holds_no_lists_buckets_sets_or_ledger(relay):
    key = os.urandom(32)
    me = client_id_of_key(key)
    name = "shape/idle"
    client = await open_mux(relay)
    try:
        await open_idle_channel(client, 1, name, client=me)
        await client.send(1, ExtClaim(((me, key),), fresh=(me,)))
        mux = the_mux(relay)
        peer = mux.channels[1]
        await eventually(lambda: me in peer.writer.proven, 10, "the claim")
        room = relay.rooms[name]

        # The room of one peer and one presence state: no set, no dict.
        assert room.members is peer
        assert list(room.peers) == [peer]
        assert isinstance(room.presence, AwarenessEntry)
        assert peer.presence is room.presence  # the state it set, shared with the room
        assert room.answers is None
        assert room.remote_presence is None
        # The session keeps no lists between messages; its terms are shared.
        assert peer.session._out is None
        assert peer.session._events is None
        other = SyncSession(extensions=True)
        assert other._terms is SyncSession(extensions=True)._terms
        # One access and one budget for all the connection's channels.
        assert peer.access is mux.access
        assert peer.budget is mux.budget
        # Its ledger was written, then not kept: an idle document holds none.
        assert name not in relay._ledgers
        assert relay.store is not None
        assert relay.store.load_ledger(name).owners[me] == KEY_OWNER
        # Its own buckets, used once each, are dropped once full again.
        assert peer.own_sync_requests is not None
        assert peer.own_presence is not None
        peer.forget_full_buckets(time.monotonic() + 60)
        assert peer.own_sync_requests is None
        assert peer.own_presence is None
        # Timers that served are gone.
        assert peer.hold_timer is None
        assert peer.sync_timer is None
        assert peer.held is None
        assert peer.joined is None
    finally:
        await client.close()
    await eventually(lambda: name not in relay.rooms, 10, "the room to close")


async def test_a_room_of_two_and_back_to_one(relay):
    name = "shape/shared"
    a, b = await open_mux(relay), await open_mux(relay)
    try:
        await open_idle_channel(a, 1, name, client=101)
        await open_idle_channel(b, 1, name, client=202)
        room = relay.rooms[name]
        assert isinstance(room.members, set)
        assert len(room.members) == 2
        assert isinstance(room.presence, dict)
        assert set(room.presence) == {101, 202}
        await b.close()
        await eventually(lambda: not isinstance(room.members, set), 10, "b to leave")
        (peer,) = room.peers
        assert room.members is peer
        assert peer.mux is not None
        assert peer.mux.wire.ws is not None
        # b's state went with it: a's alone, no dict.
        assert isinstance(room.presence, AwarenessEntry)
        assert room.presence.client_id == 101
    finally:
        await a.close()
        await b.close()


async def test_each_channel_still_has_a_sync_request_budget_of_its_own(relay):
    s = relay.settings
    client = await open_mux(relay)
    try:
        await open_idle_channel(client, 1, "shape/one", client=1)
        await open_idle_channel(client, 2, "shape/two", client=2)
        mux = the_mux(relay)
        one, two = mux.channels[1], mux.channels[2]
        now = time.monotonic()
        bucket = one.sync_requests(s)
        assert bucket is one.sync_requests(s)  # kept while not full
        assert bucket is not two.sync_requests(s)
        for _ in range(s.sync_request_burst):
            bucket.take(now)
        assert one.sync_requests(s).take(now) > 0  # channel one waits...
        assert two.sync_requests(s).take(now) == 0  # ... channel two does not
        one.forget_full_buckets(now)
        assert one.own_sync_requests is bucket  # in debt: kept
    finally:
        await client.close()


async def test_presence_the_room_refuses_counts_nothing_for_its_connection(tmp_path):
    relay = Relay(
        RelaySettings(
            port=0,
            store=tmp_path / "relay.db",
            compaction_workers=0,
            max_presence_states_per_room=1,
        )
    )
    await relay.start()
    a = b = None
    try:
        name = "shape/full"
        a = await open_mux(relay)
        await open_idle_channel(a, 1, name, client=11)
        mux_a = the_mux(relay)
        b = await open_mux(relay)
        await b.ws.send(ExtOpen(1, name).encode())
        await b.send(1, SyncStep1(b"\x00"))
        state = encode_awareness([AwarenessEntry(22, 1, {"user": "refused"})])
        await b.send(1, AwarenessMessage(state))
        await eventually(lambda: b.step2s(1) >= 1, 10, "b's answer")
        (mux_b,) = relay._muxes - {mux_a}
        peer_b = mux_b.channels[1]
        await eventually(lambda: peer_b.session.messages_received >= 2, 10, "b's presence")
        await asyncio.sleep(0.1 * timeout_s(1))
        room = relay.rooms[name]
        assert room.presence_count() == 1
        assert room.presence_of(22) is None
        assert peer_b.presence is None
        assert (mux_b.presence_states, mux_b.presence_bytes) == (0, 0)
        assert mux_a.presence_states == 1
        assert mux_a.presence_bytes == mux_a.channels[1].presence.size
    finally:
        for c in (a, b):
            if c is not None:
                await c.close()
        await relay.stop()


# -- the containers alone -------------------------------------------------------------

_ops = st.lists(st.tuples(st.booleans(), st.integers(0, 5), st.integers(0, 3)), max_size=40)


@given(_ops)
def test_presence_states_behave_as_a_dict(ops: list[tuple[bool, int, int]]) -> None:
    room = Room("x")
    model: dict[int, AwarenessEntry] = {}
    for put, client, clock in ops:
        if put:
            entry = AwarenessEntry(client, clock, {}, clock)
            room.set_presence(entry)
            model[client] = entry
        else:
            assert room.drop_presence(client) is model.pop(client, None)
        assert room.presence_entries() == list(model.values())
        assert room.presence_count() == len(model)
        for c in range(6):
            assert room.presence_of(c) is model.get(c)
        assert isinstance(room.presence, dict) == (len(model) > 1)


@given(st.lists(st.tuples(st.booleans(), st.integers(0, 3)), max_size=30))
def test_room_members_behave_as_a_set(ops: list[tuple[bool, int]]) -> None:
    peers = [Peer(None, None, "x") for _ in range(4)]  # type: ignore[arg-type]
    room = Room("x")
    model: set[Peer] = set()
    for add, i in ops:
        if add:
            room.add(peers[i])
            model.add(peers[i])
        else:
            room.discard(peers[i])
            model.discard(peers[i])
        assert set(room.peers) == model
        assert len(room.peers) == len(model)
        assert isinstance(room.members, set) == (len(model) > 1)


@given(
    st.lists(st.tuples(st.floats(0, 5), st.floats(0, 20), st.booleans()), min_size=1, max_size=30)
)
def test_a_full_bucket_acts_as_a_new_one(steps: list[tuple[float, float, bool]]) -> None:
    """What lets a channel drop its buckets once full: from any moment a bucket is
    full, it answers as a new one would."""
    bucket = TokenBucket(2.0, 10)
    now = 100.0
    for dt, amount, take in steps:
        now += dt
        if bucket.full(now):
            fresh = TokenBucket(2.0, 10)
            for later_dt, later_amount, later_take in steps:
                t = now + later_dt
                if later_take:
                    assert fresh.take(t, later_amount) == bucket.take(t, later_amount)
                else:
                    assert fresh.allow(t, later_amount) == bucket.allow(t, later_amount)
            return
        if take:
            bucket.take(now, amount)
        else:
            bucket.allow(now, amount)
