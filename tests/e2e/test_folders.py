"""Many documents over one connection, and folders kept offline (issue 11), end to end:
a real relay process (or several on a Redis of the test's own), replicas' real files."""

from __future__ import annotations

import asyncio
import json
import os
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import RelayProcess, eventually, timeout_s
from pycrdt import Doc, Text
from stock import text_update
from websockets.asyncio.client import ClientConnection, connect

from crdtsync.auth import mint_token
from crdtsync.client import Replica
from crdtsync.protocol import (
    ExtChanged,
    ExtChannel,
    ExtClaim,
    ExtClose,
    ExtHello,
    ExtOpen,
    ExtSubscribe,
    ExtUnsubscribe,
    ExtUpdate,
    Message,
    SyncStep1,
    SyncStep2,
    SyncUpdate,
    decode_message,
)
from crdtsync.store import UpdateLog, merge_in_batches
from crdtsync.testing.redis import RedisServer

pytestmark = pytest.mark.anyio

SECRET = "folders-secret-of-at-least-32-bytes-0123456789"
AUDIENCE = "crdtsync-folders"


def health(relay: RelayProcess) -> dict[str, Any]:
    url = relay.url.replace("ws://", "http://")
    with urllib.request.urlopen(f"{url}/healthz?verbose=1", timeout=timeout_s(10)) as resp:
        return json.loads(resp.read())


def text_in_file(path: Path, name: str) -> str:
    with UpdateLog(path) as log:
        updates = log.load(name).all_updates()
    doc: Doc[Any] = Doc()
    if updates:
        doc.apply_update(merge_in_batches(updates))
    return str(doc.get("text", type=Text))


def token(grants: dict[str, str], subject: str = "app") -> str:
    return mint_token(SECRET, subject=subject, docs=grants, ttl_s=600, audience=AUDIENCE)


class MuxClient:
    """A multiplexed connection driven by hand: what a hostile or curious client sends."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.seen: list[Message] = []

    async def send(self, msg: Any) -> None:
        await self.ws.send(msg.encode())

    async def until(self, predicate: Any, seconds: float = 10) -> Message:
        """Read messages until one satisfies ``predicate``; return it (all are kept)."""
        async with asyncio.timeout(timeout_s(seconds)):
            while True:
                msg = decode_message(await self.ws.recv())  # type: ignore[arg-type]
                self.seen.append(msg)
                if predicate(msg):
                    return msg

    def channel_messages(self, channel: int) -> list[Message]:
        return [
            decode_message(m.frame)
            for m in self.seen
            if isinstance(m, ExtChannel) and m.channel == channel
        ]


async def mux_client(url: str, query: str = "") -> MuxClient:
    ws = await connect(f"{url}/?crdtsync=1&mux=1{query}", max_size=None)
    client = MuxClient(ws)
    hello = await client.until(lambda m: True)
    assert isinstance(hello, ExtHello), hello
    return client


def edit(doc: Doc[Any], text: str) -> None:
    doc.get("text", type=Text).insert(0, text)


async def test_five_hundred_documents_share_one_connection_and_a_reconnect_exchanges_only_changes(
    relay, tmp_path
):
    # 500 by default; CRDTSYNC_FOLDER_DOCS=5000 on demand (the larger size).
    n = int(os.environ.get("CRDTSYNC_FOLDER_DOCS", "500"))
    names = [f"notes/{i:05d}" for i in range(n)]
    async with Replica(tmp_path / "a.db", relay=relay.url) as a:
        await a.keep("notes/")
        for name in names:
            edit(await a.open(name), f"note {name}.")
        await a.wait_synced_in("notes/", timeout=timeout_s(60 + n // 20))
        assert a.stats["connections"] == 1
        assert health(relay)["connections"] == 1  # 500 documents, one connection
        for name in names:
            await a.close(name)

    # A second replica keeps the folder without opening anything: it gets all of it.
    async with Replica(tmp_path / "b.db", relay=relay.url) as b:
        await b.keep("notes/")
        await b.wait_synced_in("notes/", timeout=timeout_s(60 + n // 20))
        assert b.documents("notes/") == names
        assert all(text_in_file(tmp_path / "b.db", name) == f"note {name}." for name in names)
        assert b.stats["connections"] == 1
        # While the first replica is away, 10% of the folder changes, some by deletes only
        # (a delete leaves the state vector as it was: only the digest of deletes shows it).
        changed = names[::10]
        for i, name in enumerate(changed):
            doc = await b.open(name)
            if i % 2:
                del doc.get("text", type=Text)[0:5]
            else:
                edit(doc, "changed: ")
        await b.wait_synced_in("notes/", timeout=timeout_s(30))
        expected = {name: str((await b.open(name)).get("text", type=Text)) for name in names}

    before = health(relay)
    async with Replica(tmp_path / "a.db", relay=relay.url) as a:  # the folder is remembered
        assert a.kept() == ["notes/"]
        await a.wait_synced_in("notes/", timeout=timeout_s(60 + n // 20))
        after = health(relay)
        # Only the changed documents travelled: one channel each, nothing for the others.
        # (What the replica itself wrote after its cursor was recorded is listed too, with
        # a digest that matches what it holds: no channel for those either.)
        assert a.stats["channels_opened"] == len(changed)
        assert a.stats["documents_announced"] - a.stats["documents_already_held"] == len(changed)
        assert after["channels_opened"] - before["channels_opened"] == len(changed)
        assert after["folder_cursors_used"] - before["folder_cursors_used"] == 1
        # A handful of messages per changed document, none per unchanged one.
        assert a.stats["messages_in"] + a.stats["messages_out"] < 10 * len(changed) + 10
    for name in names:
        assert text_in_file(tmp_path / "a.db", name) == expected[name], name


async def test_a_new_replica_and_a_restored_store_compare_digests_not_documents(
    relay_factory, tmp_path
):
    """A cursor of another store is no use: the replica describes what it holds by
    digests of state vector and delete set, and only what differs is exchanged."""
    first = relay_factory("first.db")
    names = [f"f/{i:03d}" for i in range(40)]
    async with Replica(tmp_path / "r.db", relay=first.url) as r:
        await r.keep("f/")
        for name in names:
            edit(await r.open(name), f"{name}.")
        await r.wait_synced_in("f/", timeout=timeout_s(30))
    # Another store (another region, a restored backup) that lacks some documents and
    # holds a deletion the replica has not seen.
    second = relay_factory("second.db")
    async with Replica(tmp_path / "seed.db", relay=second.url) as seed:
        with UpdateLog(tmp_path / "r.db") as log:
            contents = {name: log.load(name).all_updates() for name in names}
        for name in names[:30]:
            doc = await seed.open(name)
            for update in contents[name]:
                doc.apply_update(update)
            if name == names[5]:
                del doc.get("text", type=Text)[0:2]
            await seed.wait_synced(name, timeout=timeout_s(10))
    async with Replica(tmp_path / "r.db", relay=second.url) as r:
        await r.wait_synced_in("f/", timeout=timeout_s(30))
        assert health(second)["folder_digest_exchanges"] == 1
        # The delete-only difference came down; the 10 the store lacked went up; the
        # other 29 were compared by digest and not opened. (Each document it sent up is
        # announced back once, as every change in a kept folder is: at most 10 more.)
        assert 11 <= r.stats["channels_opened"] <= 21
    assert text_in_file(tmp_path / "r.db", names[5]) == names[5][2:] + "."
    for name in names[30:]:
        assert f"{name}." in text_in_file(second.store, name)


async def test_refused_documents_are_closed_alone_on_a_multiplexed_connection(relay_factory):
    relay = relay_factory("relay.db", "--token-secret", SECRET, "--token-audience", AUDIENCE)
    tok = token({"ok/**": "rw", "ro/**": "r"})
    client = await mux_client(relay.url, f"&token={tok}")
    async with connect(f"{relay.url}/ok/a?token={token({'**': 'rw'}, 'other')}") as stock:
        await client.send(ExtOpen(1, "ok/a"))
        await client.send(ExtOpen(2, "secret/b"))  # no rights at all
        await client.send(ExtOpen(3, "ok/../b"))  # not a valid name
        await client.send(ExtOpen(4, "ro/c"))  # readable: opens
        await client.send(ExtOpen(4, "ok/again"))  # a channel number reused
        closes = {}
        while len(closes) < 2:
            msg = await client.until(lambda m: isinstance(m, ExtClose))
            assert isinstance(msg, ExtClose)
            closes.setdefault(msg.channel, msg)
        assert closes[2].code == 4403
        assert "no access" in closes[2].reason
        assert closes[3].code == 1008
        assert "segment" in closes[3].reason
        # The repeated number opened nothing and closed nothing: 1 and 4 stay open.
        assert set(closes) == {2, 3}
        # Channel 1 syncs as a connection of its own would, in both directions.
        await client.send(ExtChannel(1, SyncStep1(b"\x00").encode()))
        await client.until(
            lambda m: (
                isinstance(m, ExtChannel)
                and m.channel == 1
                and isinstance(decode_message(m.frame), SyncStep2)
            )
        )
        writer = Doc()
        await client.send(ExtChannel(1, ExtClaim(()).encode()))  # nothing to prove, said
        await client.send(ExtChannel(1, ExtUpdate(7, text_update(writer, "from mux")).encode()))
        await client.until(
            lambda m: (
                isinstance(m, ExtChannel)
                and m.channel == 1
                and (decode_message(m.frame) == decode_message(b"\x64\x02\x07"))
            )
        )
        async with asyncio.timeout(timeout_s(10)):
            while True:
                msg = decode_message(await stock.recv())  # type: ignore[arg-type]
                if isinstance(msg, SyncUpdate):
                    doc = Doc()
                    doc.apply_update(msg.update)
                    if "from mux" in str(doc.get("text", type=Text)):
                        break
        # A read-only channel's write is refused alone, with a reason.
        await client.send(ExtChannel(4, ExtUpdate(1, text_update(Doc(), "x")).encode()))
        await client.until(
            lambda m: (
                isinstance(m, ExtChannel)
                and m.channel == 4
                and "read-only" in getattr(decode_message(m.frame), "reason", "")
            )
        )
        # A malformed message inside one channel closes that channel only.
        await client.send(ExtChannel(1, b"\x00\x07garbage"))
        bad = await client.until(lambda m: isinstance(m, ExtClose) and m.channel == 1)
        assert isinstance(bad, ExtClose)
        assert bad.code in (1002, 1007, 1008)
        await client.send(ExtChannel(4, SyncStep1(b"\x00").encode()))
        await client.until(
            lambda m: (
                isinstance(m, ExtChannel)
                and m.channel == 4
                and isinstance(decode_message(m.frame), SyncStep2)
            )
        )
    await client.ws.close()


async def test_a_replica_keeps_syncing_its_other_documents_when_one_is_refused(
    relay_factory, tmp_path
):
    relay = relay_factory("relay.db", "--token-secret", SECRET, "--token-audience", AUDIENCE)
    tok = token({"ok/**": "rw"})
    async with (
        Replica(tmp_path / "a.db", relay=relay.url, token=tok) as a,
        Replica(tmp_path / "b.db", relay=relay.url, token=token({"**": "rw"}, "b")) as b,
    ):
        denied = await a.open("denied/x")
        edit(denied, "never sent")
        doc_a = await a.open("ok/x")
        doc_b = await b.open("ok/x")
        edit(doc_a, "hello")
        await a.wait_synced("ok/x", timeout=timeout_s(10))
        await eventually(lambda: str(doc_b.get("text", type=Text)) == "hello")
        status = a.status("denied/x")
        assert status.pending == 1
        assert not status.connected
        assert "no access" in (status.last_error or "")
        assert a.stats["connections"] == 1


def two_relays_on_redis(tmp_path: Path, url: str, *args: str) -> list[RelayProcess]:
    relays = []
    for i in range(2):
        cwd = tmp_path / f"relay{i}"
        cwd.mkdir(exist_ok=True)
        relays.append(RelayProcess(url, cwd, "--log-level", "WARNING", *args).start())
    return relays


@pytest.fixture
def redis_relays(tmp_path: Path) -> Iterator[list[RelayProcess]]:
    with RedisServer(tmp_path / "redis") as server:
        relays = two_relays_on_redis(
            tmp_path, server.url, "--token-secret", SECRET, "--token-audience", AUDIENCE
        )
        yield relays
        for relay in relays:
            if relay.proc is not None and relay.proc.poll() is None:
                relay.terminate()


async def test_documents_created_on_another_relay_are_announced_within_the_rights(
    redis_relays, tmp_path
):
    one, two = redis_relays
    reader = token({"team/**": "rw", "team/secret/**": "-"}, "reader")
    admin = token({"**": "rw"}, "admin")
    watcher = await mux_client(one.url, f"&token={reader}")
    await watcher.send(ExtSubscribe(1, "team/"))
    await watcher.until(lambda m: isinstance(m, ExtChanged) and m.digests_wanted)
    from crdtsync.protocol import ExtDigests

    await watcher.send(ExtDigests(1, (), last=True))
    await watcher.until(lambda m: isinstance(m, ExtChanged) and m.caught_up)
    async with Replica(tmp_path / "r.db", relay=one.url, token=reader) as r:
        await r.keep("team/")
        await r.wait_synced_in("team/", timeout=timeout_s(20))
        # A stock client (one connection per document) on the other relay process.
        for name, text in (("team/secret/plan", "hidden"), ("team/new", "visible")):
            async with connect(f"{two.url}/{name}?token={admin}") as stock:
                await stock.recv()  # its step 1: the room is joined
                await stock.send(SyncUpdate(text_update(Doc(), text)).encode())
                await stock.send(SyncStep1(b"\x00").encode())
                async with asyncio.timeout(timeout_s(10)):
                    while not isinstance(decode_message(await stock.recv()), SyncStep2):  # type: ignore[arg-type]
                        pass
        await eventually(lambda: "team/new" in r.documents("team/"), timeout=20)
        await r.wait_synced_in("team/", timeout=timeout_s(20))
        assert text_in_file(tmp_path / "r.db", "team/new") == "visible"
        assert r.documents("team/") == ["team/new"]  # never opened by name
    await watcher.until(
        lambda m: isinstance(m, ExtChanged) and "team/new" in m.documents, seconds=20
    )
    announced = {n for m in watcher.seen if isinstance(m, ExtChanged) for n in m.documents}
    assert "team/secret/plan" not in announced
    await watcher.ws.close()


async def test_folder_requests_that_cannot_be_served_are_refused_alone(relay):
    client = await mux_client(relay.url)
    await client.send(ExtSubscribe(1, "bad/../x/"))
    refused = await client.until(lambda m: isinstance(m, ExtUnsubscribe))
    assert isinstance(refused, ExtUnsubscribe)
    assert refused.code == 1008
    await client.send(ExtSubscribe(2, "good/"))
    await client.until(lambda m: isinstance(m, ExtChanged) and m.folder == 2)
    await client.send(ExtSubscribe(2, "again/"))
    again = await client.until(lambda m: isinstance(m, ExtUnsubscribe) and m.folder == 2)
    assert isinstance(again, ExtUnsubscribe)
    assert again.code == 1002
    await client.ws.close()


async def test_a_stock_client_never_sees_multiplexing_and_a_replica_falls_back(relay, tmp_path):
    """The reference server takes "/" as a document: the replica then opens a connection
    per document, as before (tests/interop covers the real reference server)."""
    async with Replica(tmp_path / "a.db", relay=relay.url, multiplex=False) as a:
        doc = await a.open("plain/doc")
        edit(doc, "x")
        await a.wait_synced("plain/doc", timeout=timeout_s(10))
        assert a.stats["connections"] == 1
    async with connect(f"{relay.url}/plain/doc") as stock:
        first = decode_message(await stock.recv())  # type: ignore[arg-type]
        assert isinstance(first, SyncStep1)


async def test_a_replica_is_not_announced_its_own_writes_but_is_announced_the_others(
    relay, tmp_path
):
    names = [f"f/{i:02d}" for i in range(20)]
    async with (
        Replica(tmp_path / "a.db", relay=relay.url) as a,
        Replica(tmp_path / "b.db", relay=relay.url) as b,
    ):
        await a.keep("f/")
        await b.keep("f/")
        await a.wait_synced_in("f/", timeout=timeout_s(10))
        await b.wait_synced_in("f/", timeout=timeout_s(10))
        for name in names:
            edit(await a.open(name), "a.")
        await a.wait_synced_in("f/", timeout=timeout_s(20))
        await eventually(lambda: len(b.documents("f/")) == len(names), what="b's copies")
        await asyncio.sleep(0.5)  # (the relay's change watcher had its turns)
        # What a wrote came back to b, not to a (a would sync each once more for nothing).
        assert b.stats["documents_announced"] >= len(names)
        assert a.stats["documents_announced"] == 0
        # A change by someone else after a's own is announced to a.
        edit(await b.open(names[0]), "b.")
        await b.wait_synced(names[0], timeout=timeout_s(10))
        await eventually(lambda: a.stats["documents_announced"] >= 1, what="b's change at a")
