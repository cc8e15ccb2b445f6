"""Hostile clients and injected faults against multiplexed connections and folders
(issue 11), end to end: real relay processes on loopback, raw frames, real files.

For each attack: what it does to the relay (memory from /proc, counters, its stderr), to
another room (a second connection timing the durable round trip of its edits while the
attack runs) and to a replica's file. Every loop is bounded in count and in time.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from helpers import RelayProcess, eventually, timeout_s
from pycrdt import Doc, Text
from stock import text_update
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from crdtsync.auth import mint_token
from crdtsync.client import Replica
from crdtsync.protocol import (
    AwarenessMessage,
    ExtAck,
    ExtChanged,
    ExtChannel,
    ExtClaim,
    ExtClose,
    ExtDigests,
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
    write_var_uint,
)
from crdtsync.store import UpdateLog, merge_in_batches

# About two minutes of attacks: in .ci/run's longer set (pytest -m long).
pytestmark = [pytest.mark.anyio, pytest.mark.long]

SECRET = "mux-attacks-secret-of-at-least-32-bytes-0123456789"
AUDIENCE = "crdtsync-mux-attacks"
MIB = 1024 * 1024


# -- helpers -------------------------------------------------------------------------------


def token(grants: dict[str, str], subject: str = "app", ttl_s: int = 600) -> str:
    return mint_token(SECRET, subject=subject, docs=grants, ttl_s=ttl_s, audience=AUDIENCE)


def with_tokens(relay_factory: Any, tmp_path: Path, store: str = "relay.db", **settings: Any):
    return relay_factory(
        store, "--token-secret", SECRET, "--token-audience", AUDIENCE, *config(tmp_path, **settings)
    )


def config(tmp_path: Path, **settings: Any) -> list[str]:
    """``--config`` with these relay settings (those the CLI has no flag for)."""
    if not settings:
        return []
    path = tmp_path / f"relay-{len(list(tmp_path.glob('relay-*.toml')))}.toml"
    path.write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in settings.items()))
    return ["--config", str(path)]


def health(relay: RelayProcess) -> dict[str, Any]:
    url = relay.url.replace("ws://", "http://")
    with urllib.request.urlopen(f"{url}/healthz?verbose=1", timeout=timeout_s(10)) as resp:
        return json.loads(resp.read())


def proc_status(relay: RelayProcess, field: str) -> int:
    """A field of /proc/<relay>/status in bytes (VmRSS: now; VmHWM: the peak)."""
    assert relay.proc is not None
    for line in Path(f"/proc/{relay.proc.pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no {field}")


def rss(relay: RelayProcess) -> int:
    return proc_status(relay, "VmRSS")


def reset_peak(relay: RelayProcess) -> None:
    """Reset the relay's peak RSS (VmHWM) to its current RSS (Linux clear_refs)."""
    assert relay.proc is not None
    Path(f"/proc/{relay.proc.pid}/clear_refs").write_text("5")


def alive(relay: RelayProcess) -> bool:
    return relay.proc is not None and relay.proc.poll() is None


def bugs_logged(relay: RelayProcess) -> list[str]:
    text = relay.stderr(limit=2_000_000)
    return [line for line in text.splitlines() if "bug while" in line or "Traceback" in line]


def text_in_file(path: Path | str, name: str) -> str:
    with UpdateLog(path) as log:
        updates = log.load(name).all_updates()
    doc: Doc[Any] = Doc()
    if updates:
        doc.apply_update(merge_in_batches(updates))
    return str(doc.get("text", type=Text))


class MuxClient:
    """A multiplexed connection driven by hand: what a hostile client sends."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.seen: list[Message] = []

    async def send(self, msg: Any) -> None:
        await self.ws.send(msg if isinstance(msg, bytes) else msg.encode())

    async def until(self, predicate: Any, seconds: float = 10) -> Message:
        async with asyncio.timeout(timeout_s(seconds)):
            while True:
                msg = decode_message(await self.ws.recv())  # type: ignore[arg-type]
                self.seen.append(msg)
                if predicate(msg):
                    return msg

    async def has(self, predicate: Any, seconds: float = 10) -> Message:
        """A message satisfying ``predicate``, already received or still to come."""
        for msg in self.seen:
            if predicate(msg):
                return msg
        return await self.until(predicate, seconds)

    async def drain(self, seconds: float) -> list[Message]:
        """Every message within ``seconds`` (kept in ``seen`` too)."""
        out: list[Message] = []
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                while True:
                    msg = decode_message(await self.ws.recv())  # type: ignore[arg-type]
                    self.seen.append(msg)
                    out.append(msg)
        return out

    async def close(self) -> None:
        await close_quickly(self.ws)


async def close_quickly(ws: ClientConnection) -> None:
    """Close; a connection whose close cannot go out (full buffers) is cut."""
    try:
        async with asyncio.timeout(1):
            await ws.close()
    except Exception:
        pass
    if ws.transport is not None and not ws.transport.is_closing():
        ws.transport.abort()
    with contextlib.suppress(Exception):
        async with asyncio.timeout(1):
            await ws.wait_closed()


_clients: list[ClientConnection] = []


@pytest.fixture(autouse=True)
async def _close_clients(relay_factory):
    # (After relay_factory: closed before the relays are stopped, so they need not drain.)
    yield
    while _clients:
        await close_quickly(_clients.pop())


async def mux_client(url: str, query: str = "", **kwargs: Any) -> MuxClient:
    ws = await connect(f"{url}/?crdtsync=1&mux=1{query}", max_size=None, **kwargs)
    _clients.append(ws)
    client = MuxClient(ws)
    hello = await client.until(lambda m: True)
    assert isinstance(hello, ExtHello), hello
    return client


def on(channel: int, kind: type) -> Any:
    """A predicate: a message of ``kind`` on ``channel``."""
    return lambda m: (
        isinstance(m, ExtChannel)
        and m.channel == channel
        and isinstance(decode_message(m.frame), kind)
    )


class Prober:
    """Another room's writer: edits its own document every ``every`` s over a connection
    of its own (``?crdtsync=1``) and times each durable round trip (update -> ack)."""

    def __init__(
        self,
        url: str,
        name: str = "victim/doc",
        query: str = "",
        every: float = 0.05,
        size: int = 1,
    ):
        self.url, self.name, self.query, self.every, self.size = url, name, query, every, size
        self.rtts: list[float] = []
        self.failures: list[str] = []
        self._task: asyncio.Task[None] | None = None
        self._since: float | None = None  # the round trip under way began then

    async def __aenter__(self) -> Prober:
        ws = await connect(f"{self.url}/{self.name}?crdtsync=1{self.query}", max_size=None)
        self._task = asyncio.get_running_loop().create_task(self._run(ws))
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        if self._since is not None:  # still waiting: counts as long as it has waited
            self.rtts.append(time.monotonic() - self._since)
            self.failures.append("a round trip still under way")
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self._task

    async def _run(self, ws: ClientConnection) -> None:
        doc: Doc[Any] = Doc()
        key = 0
        await ws.send(ExtClaim(()).encode())  # nothing to prove, said (as replicas do)
        try:
            while True:
                key += 1
                started = self._since = time.monotonic()
                await ws.send(ExtUpdate(key, text_update(doc, "." * self.size)).encode())
                try:
                    async with asyncio.timeout(timeout_s(30)):
                        while True:
                            msg = decode_message(await ws.recv())  # type: ignore[arg-type]
                            if isinstance(msg, ExtAck) and msg.key == key:
                                break
                except TimeoutError:
                    self.failures.append(f"no ack of {key} within 30 s")
                    self.rtts.append(30.0)
                    self._since = None
                    return
                self.rtts.append(time.monotonic() - started)
                self._since = None
                await asyncio.sleep(self.every)
        except ConnectionClosed as exc:
            self.failures.append(f"victim connection closed: {exc}")
        finally:
            await close_quickly(ws)

    @property
    def worst(self) -> float:
        return max(self.rtts, default=0.0)

    def summary(self) -> str:
        if not self.rtts:
            return f"no round trips; failures {self.failures}"
        s = sorted(self.rtts)
        return (
            f"{len(s)} round trips: median {s[len(s) // 2] * 1000:.0f} ms, "
            f"p95 {s[int(len(s) * 0.95)] * 1000:.0f} ms, max {s[-1] * 1000:.0f} ms; "
            f"failures {self.failures}"
        )


def populate(store: Path, names: list[str], text: str = "x") -> None:
    """Write one small update per document straight into a relay's store file (before
    the relay starts): a store with many documents, without hours of uploads."""
    doc: Doc[Any] = Doc()
    doc.get("text", type=Text).insert(0, text)
    update = doc.get_update()
    with UpdateLog(store) as log:
        for i in range(0, len(names), 10_000):
            log.append_many([(n, update) for n in names[i : i + 10_000]])


async def store_identity(client: MuxClient, folder: int) -> tuple[str, int]:
    """The relay's store id and epoch, as its answer to a subscription without a cursor
    tells them (what any client learns)."""
    await client.send(ExtSubscribe(folder, "identity-probe/"))
    msg = await client.until(lambda m: isinstance(m, ExtChanged) and m.folder == folder)
    assert isinstance(msg, ExtChanged)
    await client.send(ExtUnsubscribe(folder))
    return msg.store, msg.epoch


# -- channels ------------------------------------------------------------------------------


async def test_thousands_of_opens_and_closes_leave_nothing_behind(relay):
    """3,000 OPEN/CLOSE pairs on one connection (a few documents, over and over): every
    channel is parted, no room is left, memory stays flat, another room is not held up."""
    client = await mux_client(relay.url)
    await client.send(ExtOpen(10**6, "churn/held"))  # stays open: one room of ours
    # Warm up (work process, first rooms) before the baseline.
    for n in range(1, 51):
        await client.send(ExtOpen(n, f"churn/{n % 5}"))
        await client.send(ExtClose(n))
    await client.drain(1.0)
    base = rss(relay)
    async with Prober(relay.url) as probe:
        started = time.monotonic()
        n = 50
        reader = asyncio.get_running_loop().create_task(client.drain(timeout_s(60)))
        for _ in range(3000):
            n += 1
            await client.send(ExtOpen(n, f"churn/{n % 5}"))
            await client.send(ExtChannel(n, SyncStep1(b"\x00").encode()))
            await client.send(ExtClose(n))
            if time.monotonic() - started > timeout_s(40):
                break
        # (opens are paced: 500/s after a burst of 1,000)
        await eventually(
            lambda: health(relay)["channels_opened"] >= n, timeout=30, what="every open handled"
        )
        elapsed = time.monotonic() - started
        await asyncio.sleep(0.5)
        h = health(relay)
    reader.cancel()
    print(
        f"churn: {n - 50} opens in {elapsed:.1f} s; rss {base / MIB:.0f} -> "
        f"{rss(relay) / MIB:.0f} MiB; victim {probe.summary()}; rooms {h['rooms']}"
    )
    assert h["rooms"] == 2, h  # the victim's and the one channel left open
    await client.close()
    assert rss(relay) - base < 30 * MIB
    assert probe.worst < 0.5, probe.summary()
    assert not bugs_logged(relay)


async def test_channel_numbers_sparse_huge_reused_and_never_opened(relay):
    client = await mux_client(relay.url)
    top = 2**53 - 1
    await client.send(ExtOpen(top, "num/top"))
    await client.until(on(top, SyncStep1))
    # A number below the top one still opens (the relay tolerates reordering) ...
    await client.send(ExtOpen(7, "num/seven"))
    await client.until(on(7, SyncStep1))
    # ... a reused one opens nothing and closes nothing.
    await client.send(ExtOpen(7, "num/other"))
    await client.send(ExtOpen(top, "num/other"))
    # A CLOSE of a channel never opened, and a CHANNEL frame for one: nothing breaks.
    await client.send(ExtClose(123456))
    await client.send(ExtChannel(99999, SyncStep1(b"\x00").encode()))
    await client.send(ExtChannel(top, SyncStep1(b"\x00").encode()))
    await client.until(on(top, SyncStep2))
    await client.send(ExtChannel(7, SyncStep1(b"\x00").encode()))
    await client.until(on(7, SyncStep2))
    extra = await client.drain(0.5)
    assert not [m for m in extra if isinstance(m, ExtClose)], extra
    assert health(relay)["channels_opened"] == 2
    # 2^53 does not fit a var-uint the relay reads: the connection is malformed.
    await client.send(bytes((100, 5)) + write_var_uint(2**53 - 1)[:-1] + b"\x80\x01" + b"\x01x")
    with pytest.raises(ConnectionClosed) as closed:
        await client.until(lambda m: False, seconds=5)
    assert closed.value.rcvd is not None
    assert closed.value.rcvd.code in (1002, 1007)
    assert alive(relay)
    assert not bugs_logged(relay)


async def test_frames_for_channels_never_opened_cannot_pin_the_relays_memory(relay):
    """Messages that overtake their channel's OPEN are kept until it comes (at most 64 per
    connection). A client that never sends that OPEN, with messages of up to the 20 MiB
    message limit, must not make the relay hold 64 of them (1.25 GiB per connection)."""
    client = await mux_client(relay.url)
    await client.send(ExtOpen(1, "early/warm"))
    await client.until(on(1, SyncStep1))
    await asyncio.sleep(0.5)
    base = rss(relay)
    payload = os.urandom(8 * MIB)
    sent = 0
    started = time.monotonic()
    for i in range(24):  # 24 x 8 MiB = 192 MiB, for a channel (10^9) never opened
        await client.send(ExtChannel(10**9 + (i % 3), SyncUpdate(payload).encode()))
        sent += 8 * MIB
        if time.monotonic() - started > timeout_s(20):
            break
    # The connection still answers: everything sent was read.
    await client.send(ExtChannel(1, SyncStep1(b"\x00").encode()))
    await client.until(on(1, SyncStep2), seconds=20)
    await asyncio.sleep(1.5)  # (a collection runs after a large connection's traffic)
    held = rss(relay) - base
    print(
        f"early frames: sent {sent / MIB:.0f} MiB for unopened channels; relay holds "
        f"{held / MIB:.0f} MiB more"
    )
    assert alive(relay)
    assert held < 64 * MIB, f"relay holds {held / MIB:.0f} MiB of frames for unopened channels"
    await client.close()


async def test_one_document_on_many_channels_does_not_multiply_a_fan_out_in_memory(relay_factory):
    """A connection opens one document on 300 channels, then stops reading; someone
    writes a 3.5 MiB update there. A frame would be copied into the connection's buffer
    once per channel before the backlog rule looks: one document is open once per
    connection (the others are refused, 1013), so the relay holds one copy, and other
    rooms do not wait."""
    relay = relay_factory("relay.db")
    client = await mux_client(relay.url)
    channels = 300
    for n in range(1, channels + 1):
        await client.send(ExtOpen(n, "fan/big"))
    await client.until(on(1, SyncStep1))
    for n in range(2, channels + 1):
        refused = await client.until(lambda m, n=n: isinstance(m, ExtClose) and m.channel == n)
        assert isinstance(refused, ExtClose)
        assert refused.code == 1013
    await client.send(ExtChannel(1, SyncStep1(b"\x00").encode()))
    await client.until(on(1, SyncStep2))
    # From now on the attacker reads nothing.
    await asyncio.sleep(0.5)
    reset_peak(relay)
    base = rss(relay)
    async with (
        Prober(relay.url) as probe,
        connect(f"{relay.url}/fan/big?crdtsync=1", max_size=None) as writer,
    ):
        await asyncio.sleep(0.3)
        big = text_update(Doc(), "y" * int(3.5 * MIB))
        await writer.send(ExtClaim(()).encode())
        await writer.send(ExtUpdate(1, big).encode())
        async with asyncio.timeout(timeout_s(30)):
            while True:
                msg = decode_message(await writer.recv())  # type: ignore[arg-type]
                if isinstance(msg, ExtAck):
                    break
        await asyncio.sleep(2)
    peak = proc_status(relay, "VmHWM") - base
    print(
        f"fan-out x{channels}: relay peak +{peak / MIB:.0f} MiB over {base / MIB:.0f} MiB; "
        f"victim {probe.summary()}; alive {alive(relay)}"
    )
    assert alive(relay)
    assert peak < 256 * MIB, f"relay peaked {peak / MIB:.0f} MiB above its resting RSS"
    assert probe.worst < 0.5, probe.summary()
    await client.close()


def metric(relay: RelayProcess, name: str) -> float:
    url = relay.url.replace("ws://", "http://")
    with urllib.request.urlopen(f"{url}/metrics", timeout=timeout_s(10)) as resp:
        for line in resp.read().decode().splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no metric {name}")


def awareness(states: dict[int, Any]) -> bytes:
    from crdtsync.protocol import AwarenessEntry, encode_awareness

    return AwarenessMessage(
        encode_awareness([AwarenessEntry(cid, 1, state) for cid, state in states.items()])
    ).encode()


async def test_presence_spread_over_many_channels_stays_within_one_connections_budget(relay):
    """max_presence_states_per_connection (8) and max_presence_state_bytes (16 KiB) bound
    what one connection's presence costs the relay: 128 KiB. Spread over 1,000 channels
    (each a document of its own, each under its room's caps) one connection makes the
    relay hold 1,000 times that."""
    client = await mux_client(relay.url)
    channels = 1000
    for n in range(1, channels + 1):
        await client.send(ExtOpen(n, f"presence/{n}"))
    for n in range(1, channels + 1):
        await client.until(on(n, SyncStep1), seconds=30)
    echoes = 0

    async def read() -> None:  # (the relay relays presence to its sender too)
        nonlocal echoes
        while True:
            msg = decode_message(await client.ws.recv())  # type: ignore[arg-type]
            if isinstance(msg, ExtChannel) and isinstance(
                decode_message(msg.frame), AwarenessMessage
            ):
                echoes += 1

    reader = asyncio.get_running_loop().create_task(read())
    await asyncio.sleep(0.5)
    base = rss(relay)
    async with Prober(relay.url) as probe:
        for n in range(1, channels + 1):
            states = {n * 100 + i: {"cursor": "c" * 15_000} for i in range(8)}
            await client.send(ExtChannel(n, awareness(states)))
            if n % 50 == 0:  # a reader that keeps up: never over the backlog rule
                await asyncio.sleep(0.05)
        await asyncio.sleep(2)
        held = metric(relay, "crdtsync_presence_states")
        grown = rss(relay) - base
    reader.cancel()
    print(
        f"presence over {channels} channels: {held:.0f} states held, relay +{grown / MIB:.0f} "
        f"MiB; victim {probe.summary()}"
    )
    assert alive(relay)
    assert grown < 32 * MIB, f"one connection's presence: {held:.0f} states, {grown / MIB:.0f} MiB"
    # A multiplexed connection may hold about one state per open document (a replica's
    # own, per document) beyond the 8 of a connection, within 4 KiB per channel in all.
    assert held <= 8 + channels, f"one connection holds {held:.0f} presence states"
    assert echoes > 0
    await client.close()


# -- folders -------------------------------------------------------------------------------


@pytest.fixture
def big_store(tmp_path: Path) -> Path:
    """A relay store holding 100,000 small documents, none under "quiet/"."""
    store = tmp_path / "big.db"
    populate(store, [f"bulk/{i:06d}" for i in range(100_000)])
    return store


async def test_folder_listings_of_a_large_store_do_not_stall_other_rooms(relay_factory, big_store):
    """One connection keeps 64 folders of a 100,000-document store, each from cursor 0 (a
    listing of the whole store's changes, a page of 1,024 at a time) or by digests. Other
    rooms must go on meanwhile: a small edit (handled on the loop) and a 300 KiB one
    (checked in the relay's one work process, where the listings' pages are read too)."""
    relay = relay_factory(big_store.name)
    client = await mux_client(relay.url)
    store_id, epoch = await store_identity(client, 1000)
    reader = asyncio.get_running_loop().create_task(client.drain(timeout_s(60)))
    async with (
        Prober(relay.url) as small,
        Prober(relay.url, "victim/big", every=0.3, size=300 * 1024) as big,
    ):
        await asyncio.sleep(1.5)
        calm = (small.worst, big.worst)  # (the first large one starts the work process)
        small.rtts.clear()
        big.rtts.clear()
        for f in range(1, 65):
            await client.send(ExtSubscribe(f, "" if f % 2 else "quiet/", store_id, epoch, 0))
        await asyncio.sleep(6)
    reader.cancel()
    pages = sum(1 for m in client.seen if isinstance(m, ExtChanged) and m.documents)
    print(
        f"64 listings of a 100,000-document store: {pages} pages in 6 s; before: small "
        f"{calm[0] * 1000:.0f} ms, 300 KiB {calm[1] * 1000:.0f} ms; during: small "
        f"{small.summary()}; 300 KiB {big.summary()}"
    )
    relay.kill()  # (it would list for minutes)
    assert small.worst < 0.25, small.summary()
    assert big.worst < 1.0, big.summary()


async def test_a_listing_ends_with_its_folder(relay_factory, tmp_path):
    """max_folders_per_connection (64) bounds the folders kept at once; a listing must end
    with its folder. SUBSCRIBE (from cursor 0: the whole store), wait for the first page,
    UNSUBSCRIBE, eight times: no listing may go on for a folder given up."""
    store = tmp_path / "mid.db"
    populate(store, [f"bulk/{i:06d}" for i in range(20_000)])
    relay = relay_factory(store.name)
    client = await mux_client(relay.url)
    store_id, epoch = await store_identity(client, 1)
    given_up: dict[int, int] = {}  # folder -> messages received when it was given up
    for n in range(2, 10):
        await client.send(ExtSubscribe(n, "", store_id, epoch, 0))
        await client.until(
            lambda m, n=n: isinstance(m, ExtChanged) and m.folder == n and m.documents,
            seconds=30,
        )
        await client.send(ExtUnsubscribe(n))
        given_up[n] = len(client.seen)
    await client.drain(4)
    after = {
        f: sum(
            1
            for m in client.seen[given_up[f] :]
            if isinstance(m, ExtChanged) and m.folder == f and m.documents
        )
        for f in given_up
    }
    print(f"pages announced after each folder's UNSUBSCRIBE: {after}")
    relay.kill()  # (it could list for minutes)
    assert max(after.values()) <= 1, f"listings went on for folders given up: {after}"


async def test_an_unsubscribe_right_after_its_subscribe_is_not_lost(relay):
    """SUBSCRIBE then UNSUBSCRIBE at once, 70 times: the client keeps no folder, so its
    next SUBSCRIBE must be served, not refused as one over max_folders_per_connection."""
    client = await mux_client(relay.url)
    for n in range(1, 71):
        await client.send(ExtSubscribe(n, f"gone{n}/"))
        await client.send(ExtUnsubscribe(n))
    await client.drain(1.0)
    await client.send(ExtSubscribe(100, "kept/"))
    msg = await client.until(
        lambda m: isinstance(m, (ExtChanged, ExtUnsubscribe)) and m.folder == 100
    )
    refused = [m for m in client.seen if isinstance(m, ExtUnsubscribe)]
    print(f"70 subscribe+unsubscribe pairs: {len(refused)} refusals; then {msg}")
    assert isinstance(msg, ExtChanged), f"refused after 70 folders given up: {msg}"
    await client.close()


async def write_docs(url: str, texts: dict[str, str], query: str = "") -> None:
    """Write each document once over one multiplexed connection, each update acknowledged."""
    client = await mux_client(url, query)
    for n, (name, text) in enumerate(texts.items(), start=1):
        await client.send(ExtOpen(n, name))
        await client.send(ExtChannel(n, ExtClaim(()).encode()))
        await client.send(ExtChannel(n, ExtUpdate(n, text_update(Doc(), text)).encode()))
    for n in range(1, len(texts) + 1):
        await client.until(
            lambda m, n=n: (
                isinstance(m, ExtChannel)
                and m.channel == n
                and decode_message(m.frame) == ExtAck(n)
            ),
            seconds=20,
        )
    await client.close()


async def test_a_token_that_reads_part_of_a_folder_never_hears_the_rest(relay_factory, tmp_path):
    """Listings, live announcements and digest answers name only what the token may read."""
    relay = with_tokens(relay_factory, tmp_path)
    admin = f"&token={token({'**': 'rw'}, 'admin')}"
    forbidden = {"team/secret/plan", "team/secret/x", "other/y", "teamsecret/z"}
    await write_docs(
        relay.url,
        {
            "team/a": "a",
            "team/secret/plan": "p",
            "team/secret/x": "x",
            "other/y": "y",
            "teamsecret/z": "z",
        },
        admin,
    )
    reader = token({"team/*": "rw", "team/a/**": "r", "team/secret/**": "-"}, "reader")
    watcher = await mux_client(relay.url, f"&token={reader}")
    store_id, epoch = await store_identity(watcher, 99)
    # 1: from cursor 0 of this store: a listing with digests.
    await watcher.send(ExtSubscribe(1, "", store_id, epoch, 0))
    await watcher.until(lambda m: isinstance(m, ExtChanged) and m.folder == 1 and m.caught_up)
    # 2: by digests: the watcher claims to hold every name, each with a wrong digest.
    await watcher.send(ExtSubscribe(2, "team"))
    await watcher.until(lambda m: isinstance(m, ExtChanged) and m.folder == 2 and m.digests_wanted)
    wrong = bytes(16)
    await watcher.send(
        ExtDigests(2, tuple((n, wrong) for n in sorted(forbidden | {"team/a"})), last=True)
    )
    await watcher.until(lambda m: isinstance(m, ExtChanged) and m.folder == 2 and m.caught_up)
    # Live: every document changes again, and new forbidden ones appear.
    before = len(watcher.seen)
    await write_docs(
        relay.url,
        {
            "team/a": "A",
            "team/secret/plan": "P",
            "team/secret/new": "N",
            "other/y": "Y",
            "teamsecret/z": "Z",
            "team/b": "b",
        },
        admin,
    )
    await watcher.until(
        lambda m: isinstance(m, ExtChanged) and m.folder == 1 and "team/b" in m.documents
    )
    await watcher.drain(1.5)
    announced = {n for m in watcher.seen if isinstance(m, ExtChanged) for n in m.documents}
    live_empty = [
        m
        for m in watcher.seen[before:]
        if isinstance(m, ExtChanged) and not m.documents and not m.caught_up
    ]
    print(
        f"announced to a partial token: {sorted(announced)}; {len(live_empty)} empty live "
        f"announcements (cursor moves) during writes the token may not read"
    )
    assert announced <= {"team/a", "team/b"}, announced - {"team/a", "team/b"}
    assert "team/a" in announced
    # Not even when: no announcement moves the cursor alone over writes it may not read.
    assert live_empty == []
    await watcher.close()


async def test_a_token_expiring_under_open_channels_and_folders(relay_factory, tmp_path):
    """At the token's expiry the whole connection ends (4401), channels and folders with
    it, and nothing is announced after; a replica with a token source reconnects with a
    fresh token, its folder and documents going on."""
    relay = with_tokens(relay_factory, tmp_path, token_leeway_s=0)
    short = token({"exp/**": "rw"}, "short", ttl_s=3)
    raw = await mux_client(relay.url, f"&token={short}")
    await raw.send(ExtOpen(1, "exp/doc"))
    await raw.until(on(1, SyncStep1))
    await raw.send(ExtSubscribe(1, "exp/"))
    await raw.until(lambda m: isinstance(m, ExtChanged) and m.digests_wanted)
    await raw.send(ExtDigests(1, (), last=True))
    await raw.until(lambda m: isinstance(m, ExtChanged) and m.caught_up)

    minted: list[float] = []

    def fresh() -> str:
        minted.append(time.monotonic())
        return token({"exp/**": "rw"}, "replica", ttl_s=3)

    async with Replica(tmp_path / "r.db", relay=relay.url, token=fresh) as r:
        await r.keep("exp/")
        doc = await r.open("exp/mine")
        doc.get("text", type=Text).insert(0, "before expiry. ")
        await r.wait_synced("exp/mine", timeout=timeout_s(10))
        started = time.monotonic()
        with pytest.raises(ConnectionClosed) as closed:
            await raw.until(lambda m: False, seconds=10)
        waited = time.monotonic() - started
        assert closed.value.rcvd is not None
        assert closed.value.rcvd.code == 4401
        assert waited < 4, waited
        # Written after the raw connection's expiry: the replica hears of it (its own
        # connection is replaced on its 4401 with a fresh token).
        await asyncio.sleep(1.5)
        await write_docs(relay.url, {"exp/after": "after"}, f"&token={token({'**': 'rw'})}")
        doc.get("text", type=Text).insert(0, "after expiry. ")
        await r.wait_synced("exp/mine", timeout=timeout_s(15))
        await eventually(lambda: "exp/after" in r.documents("exp/"), timeout=15)
        await r.wait_synced_in("exp/", timeout=timeout_s(15))
    print(
        f"expiry: raw connection closed 4401 after {waited:.1f} s; replica minted "
        f"{len(minted)} tokens"
    )
    assert len(minted) >= 2
    assert text_in_file(tmp_path / "r.db", "exp/after") == "after"
    assert "after expiry." in text_in_file(relay.store, "exp/mine")


# -- faults: relays killed, stores lost or restored, under replicas keeping folders ---------


def populate_texts(store: Path, texts: dict[str, str]) -> None:
    with UpdateLog(store) as log:
        log.append_many([(name, text_update(Doc(), text)) for name, text in texts.items()])


async def test_a_replica_keeps_a_folder_through_a_relay_killed_mid_listing(relay_factory, tmp_path):
    n = 2000
    texts = {f"kept/{i:05d}": f"text {i}" for i in range(n)}
    populate_texts(tmp_path / "relay.db", texts)
    relay = relay_factory("relay.db")
    kills = 0
    started = time.monotonic()
    async with Replica(tmp_path / "r.db", relay=relay.url) as r:
        await r.keep("kept/")
        for threshold in (300, 1200):
            await eventually(lambda t=threshold: len(r.documents("kept/")) >= t, timeout=60)
            relay.kill()  # SIGKILL in the middle of the folder's sync
            kills += 1
            await asyncio.sleep(0.3)
            relay.restart()  # same port, same store
        await r.wait_synced_in("kept/", timeout=timeout_s(90))
        held = r.documents("kept/")
        status = r.folder_status("kept/")
    elapsed = time.monotonic() - started
    print(
        f"relay killed {kills} times while a replica synced {n} kept documents: "
        f"{len(held)} held after {elapsed:.1f} s; {status}"
    )
    assert held == sorted(texts)
    wrong = [name for name in texts if text_in_file(tmp_path / "r.db", name) != texts[name]]
    assert not wrong, wrong[:5]
    assert not bugs_logged(relay)


async def test_a_relay_that_lost_its_store_is_refilled_by_a_replica_that_stayed_up(
    relay_factory, tmp_path
):
    """The store is gone (a new, empty file on the same port) while a replica keeping the
    folder stays up: its cursor is of another store now, its digests say what it holds,
    and it sends all of it; the documents it lacked come down."""
    relay = relay_factory("relay.db")
    names = [f"mine/{i:03d}" for i in range(150)]
    async with Replica(tmp_path / "r.db", relay=relay.url) as r:
        await r.keep("mine/")
        for name in names:
            (await r.open(name)).get("text", type=Text).insert(0, name)
        await r.wait_synced_in("mine/", timeout=timeout_s(30))
        for name in names[:100]:
            await r.close(name)  # no longer open: only the folder keeps them
        relay.kill()
        for suffix in ("", "-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                os.remove(f"{relay.store}{suffix}")
        relay.restart()
        await write_docs(relay.url, {"mine/new": "new"})
        await eventually(lambda: "mine/new" in r.documents("mine/"), timeout=30)
        await r.wait_synced_in("mine/", timeout=timeout_s(30))
    missing = [n for n in names if text_in_file(relay.store, n) != n]
    print(
        f"store lost: {len(names) - len(missing)} of {len(names)} documents back in the new store"
    )
    assert not missing, missing[:5]
    assert text_in_file(tmp_path / "r.db", "mine/new") == "new"


async def test_a_store_restored_from_a_backup_is_not_taken_for_the_one_the_cursor_knew(
    relay_factory, tmp_path
):
    """README: "On another store (another region, a store restored from a backup) the
    cursor is of no use". Restore the relay's file from a backup (and run `crdtsync
    new-epoch` on it, as the README says an operator does after a restore), let other
    writers move its positions past the replica's cursor, then bring the replica back:
    what it wrote after the backup must reach the store again, and what others wrote
    after the restore must reach the replica."""
    import sqlite3

    relay = relay_factory("relay.db")
    first = {f"r/{i:02d}": f"first {i}" for i in range(10)}
    second = {f"r/{i:02d}": f"second {i}" for i in range(10, 20)}
    backup = tmp_path / "backup.db"
    async with Replica(tmp_path / "a.db", relay=relay.url) as a:
        await a.keep("r/")
        for name, text in first.items():
            (await a.open(name)).get("text", type=Text).insert(0, text)
        await a.wait_synced_in("r/", timeout=timeout_s(20))
        src = sqlite3.connect(relay.store)
        dst = sqlite3.connect(backup)
        src.backup(dst)
        src.close()
        dst.close()
        for name, text in second.items():
            (await a.open(name)).get("text", type=Text).insert(0, text)
        await a.wait_synced_in("r/", timeout=timeout_s(20))
    relay.kill()
    for suffix in ("-wal", "-shm"):
        with contextlib.suppress(FileNotFoundError):
            os.remove(f"{relay.store}{suffix}")
    os.replace(backup, relay.store)
    from crdtsync.cli import main as crdtsync_main

    assert crdtsync_main(["new-epoch", str(relay.store)]) == 0
    relay.restart()
    others = {f"r/{i:02d}": f"other {i}" for i in range(20, 60)}
    await write_docs(relay.url, others)
    async with Replica(tmp_path / "a.db", relay=relay.url) as a:
        await a.wait_synced_in("r/", timeout=timeout_s(30))
        held = set(a.documents("r/"))
    lost_at_relay = [n for n in second if text_in_file(relay.store, n) != second[n]]
    never_heard = sorted(set(others) - held)
    print(
        f"restored store: {len(lost_at_relay)} of the replica's documents never resent; "
        f"{len(never_heard)} of {len(others)} written after the restore never announced"
    )
    assert not never_heard, never_heard[:5]
    assert not lost_at_relay, lost_at_relay[:5]


async def test_many_folders_on_everything_that_never_read_cost_other_rooms_little(relay):
    """Four connections keep 64 folders each, every one on "" (the whole store), and never
    read; a 65th is refused. A writer then creates documents for several seconds: each
    change is announced 256 times. Other rooms must go on, the relay's memory must stay
    bounded, and the silent readers must be closed, not buffered without end."""
    client0 = await mux_client(relay.url)
    store_id, epoch = await store_identity(client0, 1000)
    attackers = [client0] + [await mux_client(relay.url) for _ in range(3)]
    head = 0
    for c in attackers:
        for f in range(1, 65):
            await c.send(ExtSubscribe(f, "", store_id, epoch, head))
        await c.send(ExtSubscribe(65, "", store_id, epoch, head))
        refusal = await c.until(lambda m: isinstance(m, ExtUnsubscribe) and m.folder == 65)
        assert isinstance(refusal, ExtUnsubscribe), refusal
        assert refusal.code == 1013, refusal
        await c.has(lambda m: isinstance(m, ExtChanged) and m.folder == 64 and m.caught_up)
    # From now on the attackers read nothing.
    await asyncio.sleep(0.5)
    base = rss(relay)
    reset_peak(relay)
    writer = await mux_client(relay.url)
    written = 0
    started = time.monotonic()
    async with Prober(relay.url) as probe:
        while time.monotonic() - started < 8 and written < 4000:
            batch = range(written + 1, written + 51)
            for n in batch:
                await writer.send(ExtOpen(n, f"many/{n}"))
                await writer.send(ExtChannel(n, ExtClaim(()).encode()))
                await writer.send(ExtChannel(n, ExtUpdate(1, text_update(Doc(), "w")).encode()))
                await writer.send(ExtClose(n))
            written += len(batch)
            await writer.drain(0.05)
        await asyncio.sleep(1)
    h = health(relay)
    peak = proc_status(relay, "VmHWM") - base
    print(
        f"256 folders on everything, never read: {written} documents written in "
        f"{time.monotonic() - started:.1f} s; {h['documents_announced']} announced; relay "
        f"peak +{peak / MIB:.0f} MiB; closed slow {h['closed_slow']}; victim {probe.summary()}"
    )
    assert alive(relay)
    assert probe.worst < 0.5, probe.summary()
    assert peak < 200 * MIB
    for c in [*attackers, writer]:
        await c.close()


async def test_no_document_created_while_a_folder_is_subscribed_goes_unannounced(relay):
    """Four writers create documents without pause (each written once); one subscriber
    after another keeps the folder for a moment, from the cursor the previous one reached
    (the relay starts following its store's changes at each, having stopped when the
    previous one left). Every document stored after a subscriber's cursor and before its
    last read (minus a margin for delivery) must have been named to it: by the listing up
    to its head, or live after it."""
    acked: dict[str, float] = {}
    loop = asyncio.get_running_loop()

    async def write(w: int) -> None:
        writer = await mux_client(relay.url)
        names: dict[int, str] = {}

        async def read_acks() -> None:
            while True:
                msg = decode_message(await writer.ws.recv())  # type: ignore[arg-type]
                if isinstance(msg, ExtChannel) and isinstance(decode_message(msg.frame), ExtAck):
                    acked.setdefault(names[msg.channel], time.monotonic())

        reader = loop.create_task(read_acks())
        try:
            for n in range(1, 9000):  # (channels stay open: a closed one gets no ack)
                names[n] = f"race/{w}-{n:05d}"
                await writer.send(ExtOpen(n, names[n]))
                await writer.send(ExtChannel(n, ExtClaim(()).encode()))
                await writer.send(ExtChannel(n, ExtUpdate(1, text_update(Doc(), "r")).encode()))
                await asyncio.sleep(0.002)  # (500 opens/s: a connection's pace)
        finally:
            reader.cancel()

    tasks = [loop.create_task(write(w)) for w in range(4)]
    heard: dict[int, set[str]] = {}
    window: dict[int, tuple[int, int, float]] = {}  # cursor given, head, last read
    try:
        await asyncio.sleep(0.5)
        probe = await mux_client(relay.url)
        store_id, epoch = await store_identity(probe, 1)
        await probe.close()
        cursor = 0
        for k in range(16):
            sub = await mux_client(relay.url)
            await sub.send(ExtSubscribe(1, "race/", store_id, epoch, cursor))
            caught = await sub.until(
                lambda m: isinstance(m, ExtChanged) and m.caught_up, seconds=20
            )
            assert isinstance(caught, ExtChanged)
            await sub.drain(0.3)
            window[k] = (cursor, caught.cursor, time.monotonic())
            await sub.close()
            heard[k] = {n for m in sub.seen if isinstance(m, ExtChanged) for n in m.documents}
            cursor = caught.cursor
            await asyncio.sleep(0.15)  # the relay stops following: no folder is kept
    finally:
        for task in tasks:
            task.cancel()
    with UpdateLog(relay.store) as log:
        position = {name: log.position(name) for name in acked}
    missed = {}
    for k, (given, head, last_read) in window.items():
        due = {n for n, t in acked.items() if position[n] > given and t < last_read - 0.15}
        if due - heard[k]:
            missed[k] = ([(n, position[n]) for n in sorted(due - heard[k])][:3], head)
    print(
        f"{len(acked)} documents written; subscribers that missed some ((name, position), "
        f"the subscriber's head): {missed}"
    )
    assert not missed, missed


# -- malformed and misplaced frames ---------------------------------------------------------


async def test_connection_level_messages_inside_a_channel_close_that_channel_alone(relay):
    """OPEN, CLOSE, CHANNEL, SUBSCRIBE, DIGESTS, UNSUBSCRIBE, CHANGED and HELLO carried
    inside a channel, a truncated sync message, an unknown type: each ends (or is
    ignored by) its own channel; the connection and a healthy channel go on, and the
    relay logs no bug."""
    client = await mux_client(relay.url)
    nasty = [
        ExtOpen(500, "inner/open").encode(),
        ExtClose(1).encode(),
        ExtChannel(1, SyncStep1(b"\x00").encode()).encode(),
        ExtChannel(10**9, SyncStep1(b"\x00").encode()).encode(),
        ExtSubscribe(1, "").encode(),
        ExtDigests(1, (("inner/a", bytes(16)),), last=True).encode(),
        ExtUnsubscribe(1).encode(),
        ExtChanged(1, ("inner/a",), "s", 0, 5).encode(),
        ExtHello(2).encode(),
        b"\x00\x01\x05ab",  # a step 2 whose length runs past the end
        b"\x64\x63",  # extension sub-type 99
        b"\x09",  # message type 9
        bytes((100, 7)) + b"\xff" * 9,  # a channel number too long to read
    ]
    await client.send(ExtOpen(1, "inner/healthy"))
    await client.until(on(1, SyncStep1))
    for i, frame in enumerate(nasty, start=2):
        await client.send(ExtOpen(i, f"inner/{i}"))
        await client.send(ExtChannel(i, frame))
    await client.drain(1.5)
    closed = {m.channel: (m.code, m.reason) for m in client.seen if isinstance(m, ExtClose)}
    # The healthy channel still syncs, both ways.
    await client.send(ExtChannel(1, ExtClaim(()).encode()))
    await client.send(ExtChannel(1, ExtUpdate(1, text_update(Doc(), "still here")).encode()))
    await client.until(
        lambda m: (
            isinstance(m, ExtChannel) and m.channel == 1 and decode_message(m.frame) == ExtAck(1)
        )
    )
    print(f"inner frames: channels closed {closed}")
    assert 1 not in closed
    assert not bugs_logged(relay), bugs_logged(relay)[:3]
    assert text_in_file(relay.store, "inner/healthy") == "still here"
    await client.close()


async def test_a_step_1_flood_over_many_channels_of_a_large_document(relay):
    """A 2 MiB document open on 200 channels, each asking for it (step 1) 20 times while
    reading everything: each channel has a connection's sync-request budget (10 at once,
    then 2/s), so one connection fetches the document a few thousand times. Other rooms
    must go on."""
    await write_docs(relay.url, {"flood/big": "z" * (2 * MIB)})
    client = await mux_client(relay.url)
    channels = 200
    for n in range(1, channels + 1):
        await client.send(ExtOpen(n, "flood/big"))
    received = 0

    async def read() -> None:
        nonlocal received
        while True:
            received += len(await client.ws.recv())

    reader = asyncio.get_running_loop().create_task(read())
    async with Prober(relay.url) as probe:
        started = time.monotonic()
        for _ in range(20):
            for n in range(1, channels + 1):
                await client.send(ExtChannel(n, SyncStep1(b"\x00").encode()))
            if time.monotonic() - started > 5:
                break
        await asyncio.sleep(4)
    reader.cancel()
    print(
        f"step 1 flood x{channels} channels: the client read {received / MIB:.0f} MiB; "
        f"victim {probe.summary()}"
    )
    assert alive(relay)
    assert probe.worst < 0.5, probe.summary()
    await client.close()


async def test_digest_batches_past_the_limit_after_last_and_for_other_folders(
    relay_factory, tmp_path
):
    """max_folder_documents (2,000 here) bounds what one folder may describe; batches
    after its last one, for a folder not kept, or naming documents outside its prefix
    change nothing; the connection's other folders go on."""
    relay = relay_factory("relay.db", *config(tmp_path, max_folder_documents=2000))
    await write_docs(relay.url, {"d/one": "1", "e/two": "2"})
    client = await mux_client(relay.url)
    await client.send(ExtSubscribe(1, "d/"))
    await client.until(lambda m: isinstance(m, ExtChanged) and m.folder == 1 and m.digests_wanted)
    await client.send(ExtSubscribe(2, "e/"))
    await client.until(lambda m: isinstance(m, ExtChanged) and m.folder == 2 and m.digests_wanted)
    batch = tuple((f"d/{i:05d}", os.urandom(16)) for i in range(1024))
    started = time.monotonic()
    await client.send(ExtDigests(1, batch))
    await client.send(ExtDigests(1, tuple((f"d/x{n}", d) for n, d in batch)))
    refused = await client.until(lambda m: isinstance(m, ExtUnsubscribe) and m.folder == 1)
    assert isinstance(refused, ExtUnsubscribe), refused
    assert refused.code == 1013, refused
    # Folder 1 is gone: its batches are late; folder 3 was never kept.
    await client.send(ExtDigests(1, (("d/one", bytes(16)),), last=True))
    await client.send(ExtDigests(3, (("d/one", bytes(16)),), last=True))
    # Folder 2 names a document of another folder, and one of its own, wrongly.
    await client.send(ExtDigests(2, (("d/one", bytes(16)), ("e/two", bytes(16))), last=True))
    await client.until(lambda m: isinstance(m, ExtChanged) and m.folder == 2 and m.caught_up)
    await client.send(ExtDigests(2, (("e/two", bytes(16)),), last=True))  # after its last
    await client.drain(1.0)
    elapsed = time.monotonic() - started
    named = {(m.folder, n) for m in client.seen if isinstance(m, ExtChanged) for n in m.documents}
    print(
        f"digests: refused {refused}; names announced {sorted(named)[:6]} "
        f"({len(named)}); {elapsed:.1f} s"
    )
    assert (2, "e/two") in named
    assert not [x for x in named if x[0] == 2 and not x[1].startswith("e/")]
    assert not [x for x in named if x[0] == 3]
    assert alive(relay)
    assert not bugs_logged(relay)
    await client.close()
