"""The relay store interface (crdtsync.backend.RelayStore): one suite for every backend.

Each case runs on each backend the ``backend`` fixture names, through the interface only;
content is checked by replaying what the store returns into a fresh pycrdt Doc and
comparing with text the test wrote. The killed-process cases use a real child process
(tests/store_child.py) that prints each append only after the store returned it.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import secrets
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import pytest
from helpers import read_json_line, timeout_s
from pycrdt import Doc, Text

from crdtsync.backend import Entry, FeedGap, Follower, Gap, LinkCheckpoint, RelayStore
from crdtsync.errors import PositionConflict, StoreError
from crdtsync.integrity import ClientsAsRead
from crdtsync.integrity import Writer as Proof
from crdtsync.server.redis_store import RedisStore
from crdtsync.server.stores import open_store
from crdtsync.store import merge_in_batches
from crdtsync.testing.redis import RedisServer, redis_server_binary

pytestmark = pytest.mark.anyio

CHILD = str(Path(__file__).with_name("store_child.py"))


class Writer:
    """A pycrdt Doc whose transactions' updates are kept, one text appended line at a time."""

    def __init__(self, client_id: int) -> None:
        self.doc: Doc = Doc(client_id=client_id)
        self.text = self.doc.get("notes", type=Text)
        self.updates: list[bytes] = []
        self._sub = self.doc.observe(lambda event: self.updates.append(event.update))

    def line(self, words: str) -> bytes:
        self.text.insert(len(str(self.text)), words + "\n")
        return self.updates[-1]


async def read_at_least(follower: Follower, count: int) -> list[Entry | Gap]:
    """What ``follower`` reads until it has ``count`` items (at most 20 reads of 2 s)."""
    got: list[Entry | Gap] = []
    for _ in range(20):
        got += await follower.read(timeout_s(2))
        if len(got) >= count:
            break
    return got


def text_of(updates: list[bytes]) -> str:
    doc: Doc = Doc()
    if updates:
        doc.apply_update(merge_in_batches(updates))
    return str(doc.get("notes", type=Text))


def need_redis_server() -> None:
    """Skip without a redis-server binary; fail under CI (.ci/run installs it)."""
    if redis_server_binary() is None:
        message = "redis-server is not installed (apt-get install redis-server)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A redis-server of this module's own (AOF, fsync always), never the shared one."""
    need_redis_server()
    with RedisServer(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture(params=["sqlite", "redis"])
def address(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Where a fresh, empty store of each backend lives. On Redis: a key prefix of the
    test's own; folded entries trimmed at once (min_age_s=0: as SQLite deletes them) and
    a short compaction lease (a killed compaction's lease lapses within the test)."""
    if request.param == "sqlite":
        return str(tmp_path / "relay.db")
    server: RedisServer = request.getfixturevalue("redis_server")
    return f"{server.url}?prefix=t{secrets.token_hex(6)}&min_age_s=0&lease_s=2"


def other_address(address: str, tmp_path: Path) -> str:
    """Another empty store of the same backend."""
    if address.startswith("redis://"):
        return address.replace("?prefix=t", "?prefix=other")
    return str(tmp_path / "other.db")


@pytest.fixture
async def store(address: str) -> AsyncIterator[RelayStore]:
    opened = open_store(address)
    yield opened
    await opened.close()


def child(mode: str, address: str, doc: str) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [sys.executable, CHILD, mode, address, doc],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    read_json_line(proc, "ready", 30)
    return proc


def kill(proc: subprocess.Popen[bytes]) -> list[dict[str, object]]:
    """SIGKILL ``proc``; every JSON line it printed before dying."""
    proc.send_signal(signal.SIGKILL)
    out, _ = proc.communicate(timeout=timeout_s(30))
    lines = []
    for raw in out.decode(errors="replace").splitlines():
        try:
            lines.append(json.loads(raw))
        except ValueError:
            break  # a line cut by the kill
    return lines


# -- identity ---------------------------------------------------------------------------


async def test_a_store_keeps_its_identity_and_a_restore_raises_its_epoch(
    address: str, tmp_path: Path
) -> None:
    first = open_store(address)
    made = await first.identity()
    assert made.id
    assert made.epoch >= 1
    await first.close()
    again = open_store(address)
    assert await again.identity() == made
    raised = await again.new_epoch()
    assert (raised.id, raised.epoch) == (made.id, made.epoch + 1)
    assert await again.identity() == raised
    await again.close()
    other = open_store(other_address(address, tmp_path))
    assert (await other.identity()).id != made.id
    await other.close()


# -- appending and reading ---------------------------------------------------------------


async def test_appends_get_increasing_positions_and_load_returns_them_in_order(
    store: RelayStore,
) -> None:
    a, b = Writer(1), Writer(2)
    assert await store.position("a") == 0
    assert (await store.load("a")).all_updates() == []
    first = await store.append([("a", a.line("one")), ("b", b.line("uno")), ("a", a.line("two"))])
    second = await store.append([("a", a.line("three"))])
    a_positions = [first[0], first[2], second[0]]
    assert a_positions == sorted(set(a_positions))
    log = await store.load("a")
    assert text_of(log.all_updates()) == "one\ntwo\nthree\n"
    assert log.last_seq == second[0] == await store.position("a")
    assert text_of((await store.load("b")).all_updates()) == "uno\n"
    assert await store.position("b") == first[1]
    assert (await store.size("a"))[0] == 3


async def test_a_ledger_is_written_with_its_appends_and_read_with_its_position(
    store: RelayStore,
) -> None:
    w = Writer(7)
    update = w.line("owned")
    ledger, position = await store.load_ledger("d")
    assert position == 0
    assert not ledger.ranges
    ledger.ranges[7] = [(0, 6)]
    ledger.owners[7] = "sub:alice"
    ledger.dirty.add(7)
    (appended,) = await store.append([("d", update)], {"d": ledger})
    assert not ledger.dirty  # written, marked clean
    read, at = await store.load_ledger("d")
    assert at == appended
    assert read.ranges == {7: [(0, 6)]}
    assert read.owners == {7: "sub:alice"}
    # A ledger alone (a claim before any content) is written too.
    claim, _ = await store.load_ledger("e")
    claim.claim((99,), Proof(proven=frozenset({99})))
    await store.append([], {"e": claim})
    assert (await store.load_ledger("e"))[0].owners == {99: "key"}


async def test_a_conditional_append_writes_nothing_to_a_document_that_moved_on(
    store: RelayStore,
) -> None:
    w, other, x = Writer(1), Writer(2), Writer(3)
    (p1,) = await store.append([("d", w.line("first"))])
    (p2,) = await store.append([("d", other.line("racing"))], expected={"d": p1})
    ledger, _ = await store.load_ledger("d")
    ledger.owners[1] = "sub:late"
    ledger.dirty.add(1)
    x_ledger, _ = await store.load_ledger("x")
    with pytest.raises(PositionConflict) as refused:
        await store.append(
            [("d", w.line("late")), ("x", x.line("elsewhere")), ("d", w.line("later"))],
            {"d": ledger, "x": x_ledger},
            expected={"d": p1, "x": 0},
        )
    assert refused.value.positions == {"d": p2}
    # Only the document that moved on was refused, its ledger change included.
    d_row, x_row, d_row2 = refused.value.appended
    assert (d_row, d_row2) == (0, 0)
    assert x_row == await store.position("x") > 0
    assert await store.position("d") == p2
    assert text_of((await store.load("d")).all_updates()) == "first\nracing\n"
    assert text_of((await store.load("x")).all_updates()) == "elsewhere\n"
    assert "sub:late" not in (await store.load_ledger("d"))[0].owners.values()
    assert ledger.dirty  # not written, so not marked clean
    assert not x_ledger.dirty


async def test_an_append_conditional_on_some_clients_ignores_the_others(
    store: RelayStore,
) -> None:
    w, other = Writer(1), Writer(2)
    ledger, _ = await store.load_ledger("d")
    before = ledger.as_read([1])
    assert before == {1: (None, None)}  # no entry yet
    ledger.ranges[1] = [(0, 6)]
    ledger.dirty.add(1)
    (p1,) = await store.append(
        [("d", w.line("first"))], {"d": ledger}, {"d": ClientsAsRead(before)}
    )
    # Another writer's client moves the document on: a condition on client 1 still holds.
    theirs, _ = await store.load_ledger("d")
    theirs.ranges[2] = [(0, 6)]
    theirs.dirty.add(2)
    await store.append([("d", other.line("racing"))], {"d": theirs})
    mine = ledger.as_read([1])
    ledger.ranges[1] = [(0, 12)]
    ledger.dirty.add(1)
    (p3,) = await store.append([("d", w.line("second"))], {"d": ledger}, {"d": ClientsAsRead(mine)})
    assert p3 == p1 + 2
    # Client 1's entry changed elsewhere (an owner set): a condition on it is refused.
    changed, _ = await store.load_ledger("d")
    changed.owners[1] = "sub:someone"
    changed.dirty.add(1)
    await store.append([], {"d": changed})
    stale = ledger.as_read([1])
    ledger.ranges[1] = [(0, 18)]
    ledger.dirty.add(1)
    with pytest.raises(PositionConflict) as refused:
        await store.append([("d", w.line("third"))], {"d": ledger}, {"d": ClientsAsRead(stale)})
    assert refused.value.appended == [0]
    stored = text_of((await store.load("d")).all_updates())
    assert sorted(stored.split()) == ["first", "racing", "second"]
    assert (await store.load_ledger("d"))[0].ranges[1] == [(0, 12)]


# -- following --------------------------------------------------------------------------


async def test_a_follower_gets_each_new_entry_of_its_documents_once_in_order(
    store: RelayStore,
) -> None:
    w, x = Writer(1), Writer(2)
    (before,) = await store.append([("d", w.line("before"))])
    follower = store.follow()
    follower.add("d", before)
    assert await follower.read(0.05) == []
    appended = await store.append([("d", w.line("one")), ("x", x.line("not followed"))])
    appended += await store.append([("d", w.line("two"))])
    got = await read_at_least(follower, 2)
    assert [(e.document, e.position) for e in got if isinstance(e, Entry)] == [
        ("d", appended[0]),
        ("d", appended[2]),
    ]
    assert (
        text_of(
            [(await store.load("d")).all_updates()[0]]
            + [e.update for e in got if isinstance(e, Entry)]
        )
        == "before\none\ntwo\n"
    )
    assert await follower.read(0.05) == []
    follower.remove("d")
    await store.append([("d", w.line("three"))])
    assert await follower.read(0.2) == []
    await follower.close()


async def test_a_follower_sees_appends_made_through_another_store_object(
    store: RelayStore, address: str
) -> None:
    follower = store.follow()
    follower.add("d", 0)
    other = open_store(address)
    try:
        (p,) = await other.append([("d", Writer(5).line("from elsewhere"))])
        got = await read_at_least(follower, 1)
        assert [(e.document, e.position) for e in got] == [("d", p)]
    finally:
        await other.close()
        await follower.close()


async def test_a_follower_that_fell_behind_a_compaction_gets_a_gap(store: RelayStore) -> None:
    w = Writer(1)
    follower = store.follow()
    follower.add("d", 0)
    for words in ("one", "two", "three"):
        await store.append([("d", w.line(words))])
    await store.compact("d")  # folds entries the follower never read
    got = await follower.read(timeout_s(2))
    assert got == [Gap("d", 0)]
    # Reloading and following from what the load says misses nothing.
    log = await store.load("d")
    assert text_of(log.all_updates()) == "one\ntwo\nthree\n"
    follower.add("d", log.last_seq)
    (p,) = await store.append([("d", w.line("four"))])
    got = await read_at_least(follower, 1)
    assert [(e.document, e.position) for e in got] == [("d", p)]
    await follower.close()


# -- compaction and changes ---------------------------------------------------------------


async def test_compaction_keeps_content_and_position(store: RelayStore) -> None:
    w = Writer(1)
    for i in range(50):
        await store.append([("d", w.line(f"line {i}"))])
    position = await store.position("d")
    result = await store.compact("d")
    assert result.folded == 50
    log = await store.load("d")
    assert log.updates == []
    assert log.snapshot is not None
    assert text_of(log.all_updates()) == "".join(f"line {i}\n" for i in range(50))
    assert await store.position("d") == log.last_seq == position
    (after,) = await store.append([("d", w.line("after"))])
    assert after > position
    assert text_of((await store.load("d")).all_updates()).endswith("line 49\nafter\n")


async def test_changes_list_each_document_once_at_its_latest_change_in_order(
    store: RelayStore,
) -> None:
    w = {name: Writer(i + 1) for i, name in enumerate("abc")}
    assert await store.changes(0, 10) == []
    await store.append([("a", w["a"].line("1")), ("b", w["b"].line("1"))])
    await store.append([("c", w["c"].line("1"))])
    await store.append([("a", w["a"].line("2"))])
    changes = await store.changes(0, 10)
    assert [c.document for c in changes] == ["b", "c", "a"]
    assert [c.cursor for c in changes] == sorted(c.cursor for c in changes)
    # Paging: a limit, then the rest from the last cursor.
    page = await store.changes(0, 2)
    assert [c.document for c in page] == ["b", "c"]
    assert [c.document for c in await store.changes(page[-1].cursor, 10)] == ["a"]
    assert await store.changes(changes[-1].cursor, 10) == []
    # A document compacted after its change is still listed (its content changed).
    await store.compact("a")
    assert [c.document for c in await store.changes(changes[0].cursor, 10)] == ["c", "a"]


# -- regions: origins, the feed, checkpoints, leases (issue 12) ---------------------------


async def test_the_feed_lists_every_append_in_order_and_since_gives_updates_with_origins(
    store: RelayStore,
) -> None:
    w = {name: Writer(i + 1) for i, name in enumerate("ab")}
    first = [("a", w["a"].line("a1")), ("b", w["b"].line("b1"))]
    await store.append(first, origins=[None, "us"])
    await store.append([("a", w["a"].line("a2"))], origins=["ap"])
    await store.append([("a", w["a"].line("a3"))])
    listed, end = await store.feed(0, 100)
    assert [c.document for c in listed] in (["a", "b", "a", "a"], ["b", "a", "a", "a"])
    assert [c.cursor for c in listed] == sorted(c.cursor for c in listed)
    assert end == listed[-1].cursor == await store.last_change()
    # Paging: a limit, then the rest from its end; past the end, nothing.
    page, page_end = await store.feed(0, 2)
    assert len(page) == 2
    assert page_end == page[-1].cursor
    rest, rest_end = await store.feed(page_end, 100)
    assert [*page, *rest] == listed
    assert rest_end == end
    assert await store.feed(end, 100) == ([], end)
    # since: the updates after a cursor, each with the change that appended it and its origin.
    since = await store.since("a", 0)
    assert since.complete
    assert [origin for _, _, origin in since.updates] == [None, "ap", None]
    assert text_of([u for _, u, _ in since.updates]) == "a1\na2\na3\n"
    later = await store.since("a", since.updates[0][0])
    assert [origin for _, _, origin in later.updates] == ["ap", None]
    assert (await store.since("b", 0)).updates[0][2] == "us"
    assert (await store.since("b", end)).updates == []


async def test_since_says_incomplete_once_a_compaction_folded_what_came_after_the_cursor(
    store: RelayStore,
) -> None:
    w = Writer(1)
    await store.append([("d", w.line("before"))])
    cursor = await store.last_change()
    for i in range(5):
        await store.append([("d", w.line(f"after {i}"))])
    assert (await store.since("d", cursor)).complete
    await store.compact("d")
    since = await store.since("d", cursor)
    assert not since.complete
    await store.append([("d", w.line("later"))])
    latest = await store.last_change()
    # From the compaction on, a cursor past what it folded reads complete again.
    assert (await store.since("d", latest - 1)).complete


async def test_link_checkpoints_are_kept_per_direction_and_region(store: RelayStore) -> None:
    assert await store.link_checkpoint("in", "eu") is None
    await store.set_link_checkpoint(LinkCheckpoint("in", "eu", "store-eu", 2, 40))
    await store.set_link_checkpoint(LinkCheckpoint("out", "eu", "store-eu2", 1, 7))
    await store.set_link_checkpoint(LinkCheckpoint("in", "eu", "store-eu", 2, 41))
    assert await store.link_checkpoint("in", "eu") == LinkCheckpoint("in", "eu", "store-eu", 2, 41)
    assert await store.link_checkpoint("out", "eu") == LinkCheckpoint(
        "out", "eu", "store-eu2", 1, 7
    )
    assert await store.link_checkpoint("in", "us") is None


async def test_a_lease_is_held_by_one_holder_until_it_lapses(store: RelayStore) -> None:
    assert await store.lease("link:us", "one", 0.3)
    assert await store.lease("link:us", "one", 0.3)  # renewed
    if store.shared:
        assert not await store.lease("link:us", "two", 0.3)
        await asyncio.sleep(0.5)
    assert await store.lease("link:us", "two", 0.3)


async def test_redis_a_feed_trimmed_past_the_cursor_is_a_gap(
    address: str, store: RelayStore
) -> None:
    if not address.startswith("redis://"):
        pytest.skip("the SQLite feed is its rows: it has no trimming of its own")
    w = Writer(1)
    for i in range(3):
        await store.append([("d", w.line(f"{i}"))])
    assert isinstance(store, RedisStore)
    await store.redis.xtrim(store._feed_key, minid="3-1", approximate=False)  # (as MAXLEN would)
    with pytest.raises(FeedGap):
        await store.feed(0, 10)
    listed, end = await store.feed(2, 10)
    assert [c.cursor for c in listed] == [3]
    assert end == 3


# -- killed processes ----------------------------------------------------------------------


async def test_a_process_killed_mid_append_loses_no_append_it_was_told_of(
    address: str,
) -> None:
    for round_ in range(3):
        proc = child("append", address, f"d{round_}")
        try:
            await asyncio.sleep(random.uniform(0.05, 0.4))
        finally:
            told = kill(proc)
        assert told, "the child appended nothing before it was killed"
        store = open_store(address)
        try:
            log = await store.load(f"d{round_}")
            text = text_of(log.all_updates())
            expected = "".join(str(line["text"]) for line in told)
            # What it was told of is there; at most one more append it was not told of.
            assert text.startswith(expected)
            assert text.count("\n") - expected.count("\n") in (0, 1)
            positions = [int(str(line["position"])) for line in told]
            assert positions == sorted(set(positions))
            if positions:
                assert log.last_seq >= positions[-1]
            # The store takes appends again.
            await store.append([(f"d{round_}", Writer(9).line("after the kill"))])
        finally:
            await store.close()


async def test_a_process_killed_mid_compaction_leaves_the_document_whole(address: str) -> None:
    # Each round's tail of 500 lines of 1 KB takes a compaction a few hundred ms (its
    # snapshot, over 1 MiB in the second round, is written in chunks): a kill at a
    # random moment lands inside one most of the time, at any step of it.
    store = open_store(address)
    w = Writer(1)
    lines: list[str] = []
    try:
        for round_ in range(2):
            for i in range(500):
                lines.append(f"r{round_} line {i} " + "x" * 1000)
                await store.append([("d", w.line(lines[-1]))])
            proc = child("compact", address, "d")
            for i in range(20):  # appends go on while the other process compacts
                lines.append(f"r{round_} during {i}")
                await store.append([("d", w.line(lines[-1]))])
            await asyncio.sleep(random.uniform(0.05, 0.6))
            kill(proc)
            again = open_store(address)
            try:
                assert text_of((await again.load("d")).all_updates()) == "".join(
                    line + "\n" for line in lines
                )
            finally:
                await again.close()
        # (A compaction killed on Redis holds its lease until it lapses: lease_s.)
        for _ in range(100):
            if (await store.compact("d")).folded:
                break
            await asyncio.sleep(0.1)
        log = await store.load("d")
        assert log.updates == []
        assert text_of(log.all_updates()) == "".join(line + "\n" for line in lines)
    finally:
        await store.close()


# -- Redis only: what a Redis of its own can do that a file cannot ------------------------


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server this test may kill, restart and empty."""
    need_redis_server()
    server = RedisServer(tmp_path / "redis").start()
    try:
        yield server
    finally:
        server.stop()


async def test_redis_a_garbage_entry_in_one_stream_stops_no_other_document(
    redis_server: RedisServer,
) -> None:
    store = open_store(f"{redis_server.url}?prefix=g{secrets.token_hex(4)}")
    assert isinstance(store, RedisStore)
    follower = store.follow()
    follower.add("bad", 0)
    follower.add("good", 0)
    w, v = Writer(1), Writer(2)
    try:
        (p1,) = await store.append([("bad", w.line("one"))])
        # Written straight into the stream, past the store: no n, a non-number n, no u.
        bad_log = store.keys("bad").log
        await store.redis.xadd(bad_log, {"junk": b"\xff" * 10})
        await store.redis.xadd(bad_log, {"n": b"x", "u": b"\x00"})
        await store.redis.xadd(bad_log, {"n": b"2"})
        positions = await store.append([("good", v.line("fine")), ("bad", w.line("two"))])
        got = await read_at_least(follower, 3)
        assert all(isinstance(e, Entry) for e in got)
        by_doc = {d: [e.position for e in got if e.document == d] for d in ("bad", "good")}
        assert by_doc == {"bad": [p1, positions[1]], "good": [positions[0]]}
        assert follower.malformed == 3
        # Loading skips them too; compaction folds around them.
        assert text_of((await store.load("bad")).all_updates()) == "one\ntwo\n"
        assert (await store.compact("bad")).folded == 2
        assert text_of((await store.load("bad")).all_updates()) == "one\ntwo\n"
    finally:
        await follower.close()
        await store.close()


async def test_redis_killed_and_restarted_from_its_aof_keeps_every_acknowledged_append(
    own_redis: RedisServer,
) -> None:
    address = f"{own_redis.url}?prefix=k"
    proc = child("append", address, "d")
    await asyncio.sleep(random.uniform(0.2, 0.5))
    own_redis.kill()  # mid-stream: the writer's next append fails
    await asyncio.sleep(0.2)
    told = kill(proc)
    assert told, "nothing was appended before Redis was killed"
    own_redis.start()
    store = open_store(address)
    try:
        text = text_of((await store.load("d")).all_updates())
        expected = "".join(str(line["text"]) for line in told)
        assert text.startswith(expected)
        assert text.count("\n") - expected.count("\n") in (0, 1)
        assert await store.position("d") >= int(str(told[-1]["position"]))
    finally:
        await store.close()


async def test_redis_down_refuses_appends_and_they_resume_when_it_is_back(
    own_redis: RedisServer,
) -> None:
    store = open_store(f"{own_redis.url}?prefix=r")
    w = Writer(1)
    try:
        await store.append([("d", w.line("before"))])
        own_redis.kill()
        with pytest.raises(StoreError):
            await store.append([("d", w.line("while down"))])
        with pytest.raises(StoreError):
            await store.load("d")
        own_redis.start()
        await store.append([("d", w.line("after"))])
        # "while down" was never stored: "after" follows a gap until it is resent.
        await store.append([("d", w.updates[-2])])
        assert text_of((await store.load("d")).all_updates()) == "before\nwhile down\nafter\n"
    finally:
        await store.close()


async def test_redis_emptied_is_a_new_store_and_a_gap_in_every_followed_document(
    own_redis: RedisServer,
) -> None:
    store = open_store(f"{own_redis.url}?prefix=e")
    follower = store.follow()
    try:
        before = await store.identity()
        (a,) = await store.append([("a", Writer(1).line("a"))])
        (b,) = await store.append([("b", Writer(2).line("b"))])
        follower.add("a", a)
        follower.add("b", b)
        assert await follower.read(0.2) == []
        own_redis.wipe()
        own_redis.start()
        got: list[Entry | Gap] = []
        for _ in range(20):
            try:
                got += await follower.read(timeout_s(2))
            except StoreError:
                await asyncio.sleep(0.1)  # (its connection was cut by the restart)
            if got:
                break
        assert sorted(got, key=lambda g: g.document) == [Gap("a", a), Gap("b", b)]
        assert (await store.identity()).id != before.id
    finally:
        await follower.close()
        await store.close()


async def test_redis_password_from_the_environment_and_never_in_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    need_redis_server()
    secret = "s3cret-" + secrets.token_hex(8)
    with RedisServer(tmp_path / "redis", extra=["--requirepass", secret]) as server:
        monkeypatch.delenv("CRDTSYNC_REDIS_PASSWORD", raising=False)
        refused = open_store(server.url)
        with pytest.raises(StoreError) as denied:
            await refused.append([("d", Writer(1).line("no password"))])
        assert secret not in str(denied.value)
        await refused.close()
        in_url = open_store(server.url.replace("redis://", f"redis://:{secret}@"))
        assert secret not in str(in_url._where)  # type: ignore[attr-defined]
        await in_url.append([("d", Writer(2).line("password in the URL"))])
        await in_url.close()
        monkeypatch.setenv("CRDTSYNC_REDIS_PASSWORD", secret)
        from_env = open_store(server.url)
        try:
            await from_env.append([("d", Writer(3).line("password from the environment"))])
            assert await from_env.position("d") == 2
        finally:
            await from_env.close()


async def test_redis_settings_an_evicting_redis_is_refused_and_persistence_is_said(
    tmp_path: Path,
) -> None:
    need_redis_server()
    with RedisServer(tmp_path / "lru", extra=["--maxmemory-policy", "allkeys-lru"]) as lru:
        store = open_store(lru.url)
        assert isinstance(store, RedisStore)
        with pytest.raises(StoreError, match="allkeys-lru"):
            await store.check_settings()
        await store.close()
    with RedisServer(tmp_path / "aof") as aof:
        store = open_store(aof.url)
        assert isinstance(store, RedisStore)
        assert "fsynced (appendfsync always)" in await store.check_settings()
        await store.close()


async def test_redis_wait_replicas_acknowledges_only_what_a_replica_received(
    tmp_path: Path,
) -> None:
    need_redis_server()
    # (Redis 7 waits 5 s before a diskless sync to a new replica by default.)
    primary_server = RedisServer(tmp_path / "primary", extra=["--repl-diskless-sync-delay", "0"])
    with primary_server as primary:
        waiting = open_store(f"{primary.url}?prefix=w&wait_replicas=1&wait_timeout_s=0.5")
        try:
            with pytest.raises(StoreError, match="reached 0 of the 1 replica"):
                await waiting.append([("d", Writer(1).line("no replica yet"))])
            extra = ["--replicaof", "127.0.0.1", str(primary.port)]
            with RedisServer(tmp_path / "replica", extra=extra):
                redis = waiting.redis  # type: ignore[attr-defined]
                for _ in range(60):  # until the replica acknowledges a write (bounded)
                    await redis.set("w:probe", 1)
                    if await redis.wait(1, 250) >= 1:
                        break
                (p,) = await waiting.append([("d", Writer(2).line("received by a replica"))])
                assert p == 2  # (the refused append was still written on the primary)
        finally:
            await waiting.close()


async def test_redis_a_load_racing_a_compaction_and_trim_reads_a_whole_document(
    redis_server: RedisServer,
) -> None:
    """A reader held between reading which snapshot is current and reading it (and the
    tail) while another store compacts and trims everything: it reads again, whole."""
    address = f"{redis_server.url}?prefix=race{secrets.token_hex(4)}&min_age_s=0"
    reader, compactor = open_store(address), open_store(address)
    assert isinstance(reader, RedisStore)
    w = Writer(1)
    try:
        for i in range(30):
            await reader.append([("d", w.line(f"line {i}"))])
        await compactor.compact("d")  # a first snapshot: the reader will hold its gen
        for i in range(30, 40):
            await reader.append([("d", w.line(f"line {i}"))])
        real_hget = reader.redis.hget
        raced: list[int] = []

        async def hget_then_compact(*args: Any) -> Any:
            value = await real_hget(*args)
            if args[1:] == ("snap_gen",) and not raced:
                raced.append((await compactor.compact("d")).folded)
            return value

        reader.redis.hget = hget_then_compact  # type: ignore[method-assign]
        log = await reader.load("d")
        assert raced == [10]  # the compaction ran between the two reads, and trimmed
        assert text_of(log.all_updates()) == "".join(f"line {i}\n" for i in range(40))
        assert log.updates == []
        assert log.last_seq == 40
    finally:
        await reader.close()
        await compactor.close()


async def test_compaction_runs_in_a_process_pool(address: str) -> None:
    """As the relay runs it: the CPU part in a worker process, off the caller's loop."""
    with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
        store = open_store(address, cpu=pool)
        w = Writer(1)
        try:
            for i in range(20):
                await store.append([("d", w.line(f"line {i}"))])
            assert (await store.compact("d")).folded == 20
            log = await store.load("d")
            assert log.updates == []
            assert text_of(log.all_updates()) == "".join(f"line {i}\n" for i in range(20))
        finally:
            await store.close()


async def test_redis_a_switch_whose_reply_is_lost_keeps_the_snapshot_it_made_current(
    redis_server: RedisServer,
) -> None:
    """The switch ran in Redis, its reply never came (a reset link, a cancelled
    compaction): the compaction must not delete what is now the current snapshot."""
    from redis.exceptions import ConnectionError as RedisConnectionError

    store = open_store(f"{redis_server.url}?prefix=lost{secrets.token_hex(4)}&min_age_s=0")
    assert isinstance(store, RedisStore)
    w = Writer(1)
    try:
        for i in range(10):
            await store.append([("d", w.line(f"line {i}"))])
        real = store._switch

        async def switch_then_lose_the_reply(*args: Any, **kwargs: Any) -> Any:
            await real(*args, **kwargs)
            raise RedisConnectionError("connection reset (reply lost)")

        store._switch = switch_then_lose_the_reply  # type: ignore[method-assign]
        with pytest.raises(StoreError):
            await store.compact("d")
        store._switch = real  # type: ignore[method-assign]
        log = await store.load("d")
        assert text_of(log.all_updates()) == "".join(f"line {i}\n" for i in range(10))
        assert (await store.compact("d")).folded == 0
        assert text_of((await store.load("d")).all_updates()).count("\n") == 10
    finally:
        await store.close()


async def test_redis_a_closed_document_is_trimmed_once_its_entries_pass_the_minimum_age(
    redis_server: RedisServer,
) -> None:
    store = open_store(f"{redis_server.url}?prefix=age{secrets.token_hex(4)}&min_age_s=0.3")
    assert isinstance(store, RedisStore)
    w = Writer(1)
    try:
        for i in range(10):
            await store.append([("d", w.line(f"line {i}"))])
        assert (await store.compact("d")).folded == 10
        assert await store.redis.xlen(store.keys("d").log) == 10  # young: kept
        await asyncio.sleep(0.5)
        assert (await store.compact("d")).folded == 0  # nothing new: trims what aged
        assert not await store.redis.exists(store.keys("d").log)
        assert text_of((await store.load("d")).all_updates()).count("\n") == 10
    finally:
        await store.close()


async def test_redis_a_follower_sees_a_raised_epoch_as_a_gap(redis_server: RedisServer) -> None:
    """After a restore (new_epoch), positions may be reused: nothing followed is trusted."""
    store = open_store(f"{redis_server.url}?prefix=ep{secrets.token_hex(4)}")
    follower = store.follow()
    try:
        (p,) = await store.append([("d", Writer(1).line("one"))])
        follower.add("d", p)
        assert await follower.read(1.2) == []
        await store.new_epoch()
        got = await read_at_least(follower, 1)
        assert got == [Gap("d", p)]
    finally:
        await follower.close()
        await store.close()


async def test_redis_the_snapshot_of_a_killed_compaction_expires(
    redis_server: RedisServer,
) -> None:
    store = open_store(f"{redis_server.url}?prefix=orph{secrets.token_hex(4)}&lease_s=0.3")
    assert isinstance(store, RedisStore)
    w = Writer(1)
    try:
        for i in range(5):
            await store.append([("d", w.line(f"line {i}"))])

        class Killed(BaseException):
            pass

        async def killed(*args: Any, **kwargs: Any) -> Any:
            raise Killed  # the process dies after writing its snapshot, before switching

        async def no_cleanup(*args: Any, **kwargs: Any) -> Any:
            return 0  # (a killed process runs no `finally`)

        real_switch, real_delete = store._switch, store.redis.delete
        store._switch, store.redis.delete = killed, no_cleanup  # type: ignore[method-assign]
        with pytest.raises(Killed):
            await store.compact("d")
        store._switch, store.redis.delete = real_switch, real_delete  # type: ignore[method-assign]
        assert [k async for k in store.redis.scan_iter(f"{store.prefix}:{{d}}:snap:*")]
        pattern = f"{store.prefix}:{{d}}:snap:*"
        for _ in range(30):
            if not [k async for k in store.redis.scan_iter(pattern)]:
                break
            await asyncio.sleep(0.1)
        assert [k async for k in store.redis.scan_iter(pattern)] == []
        assert (await store.compact("d")).folded == 5
    finally:
        await store.close()
