"""A replica with several relays (``Replica(path, relay=[first, second])``): it moves to the
next one when the one in use fails, keeps syncing there, and comes back to the first once
it answers again (issue 12, replica failover). Real relay processes on loopback: on
stores of their own (two regions, not yet peered: the replica carries its edits to both),
and on one Redis (two processes of one region)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import RelayProcess, eventually, timeout_s
from pycrdt import Text
from stock import stored_text

from crdtsync.auth import mint_token
from crdtsync.client import Replica
from crdtsync.testing.redis import RedisServer

pytestmark = pytest.mark.anyio

DOC = "failover/doc"
PROBE_S = 0.5


def text_of(replica: Replica) -> Text:
    return replica._docs[DOC].doc.get("text", type=Text)


async def synced_on(replica: Replica, relay: str) -> None:
    """The replica is connected to ``relay`` and has nothing unacknowledged."""
    await eventually(lambda: replica.status(DOC).relay == relay, what=f"on {relay}")
    await replica.wait_synced(DOC, timeout=timeout_s(20))
    assert replica.status(DOC).relay == relay


async def test_replica_fails_over_to_the_second_relay_and_comes_back_to_the_first(
    relay_factory, tmp_path
):
    first = relay_factory("first.db")
    second = relay_factory("second.db")
    async with Replica(
        tmp_path / "r.db", relay=[first.url, second.url], relay_probe_s=PROBE_S
    ) as replica:
        text = (await replica.open(DOC)).get("text", type=Text)
        text.insert(0, "on the first;")
        await synced_on(replica, first.url)

        first.kill()
        text.insert(len(text), " while the first is down;")
        await synced_on(replica, second.url)  # acknowledged by the second
        # A replica that only knows the second relay gets everything, from before too.
        async with Replica(tmp_path / "other.db", relay=second.url) as other:
            theirs = (await other.open(DOC)).get("text", type=Text)
            await eventually(lambda: str(theirs) == str(text), what="the second's copy")
            theirs.insert(len(theirs), " from the other;")
            await other.wait_synced(DOC, timeout=timeout_s(10))
        await eventually(lambda: str(text).endswith("from the other;"), what="the other's edit")

        await asyncio.to_thread(first.restart)
        # Back to the first once it answers; what it missed reaches it through the replica.
        await synced_on(replica, first.url)
        text.insert(len(text), " back home")
        await replica.wait_synced(DOC, timeout=timeout_s(10))
        final = str(text)
    assert final == "on the first; while the first is down; from the other; back home"
    first.terminate()
    second.terminate()
    assert stored_text(first.store, DOC) == final
    assert stored_text(second.store, DOC) == final.removesuffix(" back home")


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    with RedisServer(tmp_path / "redis") as server:
        yield server


async def test_two_relay_processes_on_one_redis_the_replica_fails_over_between_them(
    tmp_path, redis_server
):
    relays = []
    for i in range(2):
        cwd = tmp_path / f"relay{i}"
        cwd.mkdir()
        relays.append(RelayProcess(redis_server.url, cwd, "--log-level", "WARNING").start())
    first, second = relays
    try:
        async with (
            Replica(
                tmp_path / "r.db", relay=[first.url, second.url], relay_probe_s=PROBE_S
            ) as replica,
            Replica(tmp_path / "watcher.db", relay=second.url) as watcher,
        ):
            text = (await replica.open(DOC)).get("text", type=Text)
            seen = (await watcher.open(DOC)).get("text", type=Text)
            text.insert(0, "a")
            await synced_on(replica, first.url)
            first.kill()
            for ch in "bcd":  # edits during and after the failover: none lost
                text.insert(len(text), ch)
                await asyncio.sleep(0.05)
            await synced_on(replica, second.url)
            await eventually(lambda: str(seen) == "abcd", what="the watcher's copy")
            await asyncio.to_thread(first.restart)
            await synced_on(replica, first.url)
            text.insert(len(text), "e")
            await replica.wait_synced(DOC, timeout=timeout_s(10))
            await eventually(lambda: str(seen) == "abcde", what="fan-out across processes")
    finally:
        for relay in relays:
            if relay.proc is not None and relay.proc.poll() is None:
                relay.terminate()


async def test_with_every_relay_down_the_replica_backs_off_instead_of_spinning(
    relay_factory, tmp_path
):
    first = relay_factory("first.db")
    second = relay_factory("second.db")
    urls = [first.url, second.url]
    first.kill()
    second.kill()
    async with Replica(tmp_path / "r.db", relay=urls, relay_probe_s=PROBE_S) as replica:
        text = (await replica.open(DOC)).get("text", type=Text)
        text.insert(0, "offline")
        began = time.monotonic()
        await asyncio.sleep(2.0)
        assert replica.status(DOC).last_error is not None
        assert "cannot connect" in replica.status(DOC).last_error
        attempts = replica.stats["connect_attempts"]
        # Each round tries both relays once, then waits (the backoff: 0.1 s, doubling, with
        # jitter: about 6 rounds in 2 s); a loop that did not wait would make thousands.
        assert attempts <= 2 * 8, attempts
        await asyncio.to_thread(second.restart)
        await synced_on(replica, second.url)
        assert time.monotonic() - began < timeout_s(30)
    assert stored_text(second.store, DOC) == "offline"


async def test_a_refusal_of_the_replica_is_not_a_failover(relay_factory, tmp_path):
    # The first relay refuses this replica's token (401): another relay would not make
    # the token valid; the replica stays, reports it, and never writes to the second.
    first = relay_factory("first.db", "--token-secret", "s" * 40)
    second = relay_factory("second.db")
    token = mint_token("t" * 40, subject="r", docs={"*": "rw"}, ttl_s=600)
    async with Replica(
        tmp_path / "r.db", relay=[first.url, second.url], token=token, relay_probe_s=PROBE_S
    ) as replica:
        (await replica.open(DOC)).get("text", type=Text).insert(0, "refused")
        await eventually(
            lambda: "401" in (replica.status(DOC).last_error or ""), what="the refusal"
        )
        await asyncio.sleep(1.0)
        assert replica.status(DOC).relay == first.url
        assert replica.status(DOC).pending == 1
    assert stored_text(second.store, DOC) == ""
