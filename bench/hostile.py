"""Hostile or heavy traffic on one document: what it costs another room, and relay memory.

    python bench/hostile.py [--scale 1]
                            [--only presence,heavy,join,gaps,sync,idle,answer,
                                    compaction,repeats,bigupdate,silent]
                            [--probe-rate 20] [--idle-s 3] [--silent-peers N]
                            [--server crdtsync|crdtsync-asgi]
                            [--profile [--profile-rate 200]] [--markdown-out FILE]
                            [--json-out FILE]

DESIGN: "one room's heavy traffic never stalls another's". Each scenario gets a fresh relay
process (``python -m crdtsync relay --host 127.0.0.1 --port 0 --store <tmp>``) and a
*probe*: a separate process with two stock connections (``websockets`` + crdtsync.protocol
framing, no extensions) to a probe room. One sends a tiny pycrdt update (one character) as
a sync-update message at a steady rate, the other receives it; latency is send -> receive
on the machine's monotonic clock. The probe runs for a few seconds on an idle relay (the
baseline), then while the scenario runs in another room. Alongside: the relay's RSS
(process group, sampled), its CPU, its ``/healthz?verbose=1`` counters, and what the
attacker saw (close codes, answers).

Scenarios (``--scale`` multiplies the sizes and counts; see ``Scenario.describe``):

1. ``presence``: one connection floods presence (8 new client ids with 10 KB states per
   message, reconnecting when closed), while another sends presence within the rates
   and never reads;
2. ``heavy``: a valid 15 MB text update (near the 16 MiB cap), then an update with 20,000
   one-item client ids and one with 3,000,000 ``Any`` integers (both over the caps);
3. ``join``: a document of 50,000 stored, uncompacted updates; 20 clients join it at once;
4. ``gaps``: tiny updates that each leave a clock gap, sent into a room where 10 crdtsync
   ``Replica``s are connected (each asks again on a gap, paced);
5. ``sync``: one connection sends sync step 1 nonstop on a 4 MB document;
6. ``idle``: 200 connections from one address that never send anything;
7. ``answer`` (added after the first runs): a document of 0.75 MB of text and 3,000
   one-item client ids, all within the caps; one more client syncs. The relay cuts an
   answer over 512 KiB into pieces per client id, on its event loop.

Added later, each from a question about the relay's event loop:

8. ``compaction``: a document whose stored, uncompacted tail is 200 updates x 100 KB of
   text (20 MB; the default ``compact_after_updates`` 1000, so the relay compacts it in
   its worker process, ``compact_file``, when the room empties with 100 new updates or
   more; not a few thousand updates: compacting n text appends of s bytes holds about
   n^2 x s / 2 bytes in pycrdt 0.14, and 4,000 x 5 KB would need ~40 GB). 3 rounds: a
   client that holds the document reconnects (step 1 with its state vector), sends 120
   queued one-line edits and leaves (the room empties: a compaction); then 2 clients
   join and append lines at 50/s each for 8 s, timing their own echoes, and leave
   (another compaction). Does compaction's write transaction, or a WAL checkpoint,
   stall the relay (it commits on its loop)?
9. ``repeats``: a 200 KB text document of 400 stored updates; one stock connection
   sends the whole document as a sync-update message 30 times in a row (a reconnecting
   stock client resends everything): the integrity rule compares repeated content with
   the stored one on the event loop (the slow path of ``_judge``);
10. ``bigupdate``: the relay with ``max_update_bytes`` and ``--max-message-bytes`` at
    64 MiB (a ``--config`` TOML file); 5 synced stock peers reading as fast as they can;
    one more sends one valid 60 MB text update. The readers should not be closed (1013);
11. ``silent``: 16 peers send presence within the rates and never read (as the
    presence scenario's silent peer, x16, without the flooder); one more peer sends
    updates and presence to the room so there is traffic. Relay memory should stay
    bounded (per-connection write buffer limit, and a relay-wide budget).

``--profile`` attaches py-spy (``py-spy record --idle --format chrometrace``) to the
relay process for each scenario and reports its event loop's turns of 50 ms or more
under load: how long each took and the deepest call that covers most of it.

Targets (from the issue): another room's p99 under 100 ms on 2 cores in every scenario;
relay RSS under 500 MB. Every loop is bounded in count and time, everything binds
127.0.0.1, and every process started here is stopped (try/finally).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import math
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import common
from common import Report, Server, fmt
from pycrdt import Doc, Text
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from crdtsync.client import Replica
from crdtsync.protocol import (
    AwarenessMessage,
    SyncStep1,
    SyncStep2,
    SyncUpdate,
    decode_message,
    write_var_uint,
)
from crdtsync.store import UpdateLog
from crdtsync.updates import check_update

TARGET_P99_MS = 100.0
TARGET_RSS_MB = 500.0
RSS_BACK_MB = 20.0  # "came back": RSS after the scenario within this of RSS before it
ROOM = "hostile/room"
PROBE_ROOM = "probe/room"
PROBE_CLIENT = 4242  # the probe writer's pycrdt client id
TAIL_S = 1.0  # probes sent this long after a scenario ends still count as "under load"
SETTLE_S = 3.0  # RSS "after" is read this long after the scenario ended
MAX_ADDRESS_SLOTS = 95  # the relay allows 100 connections per address; the probe holds 2
SYNC_STEP2_PREFIX = b"\x00\x01"  # message type SYNC, sub-type step 2
PERMISSION_DENIED_PREFIX = b"\x02\x00"  # message type AUTH, permission denied


# -- stock-client helpers ------------------------------------------------------------


async def open_stock(url: str, room: str, **kwargs: Any) -> ClientConnection:
    """A stock y-websocket connection (no extensions) to ``room``, bounded in time."""
    return await connect(
        f"{url}/{room}",
        compression=None,
        max_size=None,
        open_timeout=10,
        close_timeout=2,
        ping_interval=None,
        proxy=None,
        **kwargs,
    )


def as_bytes(data: str | bytes) -> bytes:
    if isinstance(data, str):
        raise TypeError("the relay sent a text frame")
    return data


async def sync_stock(
    ws: ClientConnection, timeout_s: float = 30.0, state_vector: bytes = b"\x00"
) -> int:
    """Send step 1 (by default with an empty state vector); read until the step 2 answer;
    its bytes."""
    await ws.send(SyncStep1(state_vector).encode())
    size = 0
    async with asyncio.timeout(timeout_s):
        while True:
            msg = decode_message(as_bytes(await ws.recv()))
            if isinstance(msg, SyncUpdate | SyncStep2):
                size += len(msg.update)
            if isinstance(msg, SyncStep2):
                return size


async def drain(ws: ClientConnection, tally: Counter[str] | None = None) -> None:
    """Read and drop what the relay sends until the connection closes; count it."""
    with contextlib.suppress(ConnectionClosed):
        async for data in ws:
            if tally is not None:
                tally["frames"] += 1
                tally["bytes"] += len(data)
                tally["answers"] += as_bytes(data)[:2] == SYNC_STEP2_PREFIX
                tally["denied"] += as_bytes(data)[:2] == PERMISSION_DENIED_PREFIX


async def close_quietly(ws: ClientConnection | None) -> None:
    """Close a connection, bounded in time (a peer that does not read is aborted)."""
    if ws is None:
        return
    try:
        async with asyncio.timeout(3):
            await ws.close()
    except TimeoutError:
        if ws.transport is not None:
            ws.transport.abort()
    except AttributeError:
        # websockets 17 aborts a transport asyncio already closed (the relay cut the
        # connection while a large frame was still being written): nothing left to close
        pass


def close_code(ws: ClientConnection) -> str:
    """How the relay closed ``ws`` as the client saw it: ``1008``, ``1006`` (aborted) ..."""
    code = ws.close_code
    return "open" if code is None else str(code)


def presence_frame(client_ids: Sequence[int], clock: int, state_json: bytes) -> bytes:
    """An awareness message setting the same JSON state for each client id."""
    parts = [write_var_uint(len(client_ids))]
    for cid in client_ids:
        parts += [write_var_uint(cid), write_var_uint(clock)]
        parts += [write_var_uint(len(state_json)), state_json]
    return AwarenessMessage(b"".join(parts)).encode()


def text_updates(chunks: Sequence[str], client_id: int | None = None) -> list[bytes]:
    """One pycrdt update per chunk, each appended to a Y.Text (one transaction each)."""
    doc: Doc[Any] = Doc() if client_id is None else Doc(client_id=client_id)
    text = doc.get("text", type=Text)
    updates: list[bytes] = []
    sub = doc.observe(lambda event: updates.append(event.update))
    for chunk in chunks:
        text.insert(len(text), chunk)
    doc.unobserve(sub)
    return updates


def many_clients_update(n: int) -> bytes:
    """One small GC struct for each of ``n`` client ids (valid; over max_update_clients)."""
    out = [write_var_uint(n)]
    for client in range(1, n + 1):
        out.append(b"\x01" + write_var_uint(client) + b"\x00\x00\x01")
    out.append(b"\x00")
    return b"".join(out)


def many_values_update(n: int) -> bytes:
    """One ``Any`` item holding ``n`` integers, 2 bytes each (over max_update_structs)."""
    body = b"\x08\x01" + write_var_uint(1) + b"a" + write_var_uint(n) + b"\x7d\x01" * n
    return b"\x01\x01" + write_var_uint(77) + b"\x00" + body + b"\x00"


# -- scenarios ------------------------------------------------------------------------


class Scenario:
    """One kind of hostile or heavy traffic in the hostile room.

    ``prepare`` runs before the relay starts (it may fill the store; it returns extra
    relay flags), ``arrange`` once the relay is up and before the probe's baseline,
    ``attack`` is the load (bounded by ``cap_s``), ``finish`` closes what is left.
    ``outcome`` collects what the attacker saw.
    """

    key = ""
    title = ""

    def __init__(self, scale: float) -> None:
        self.scale = scale
        self.cap_s = 30.0
        self.outcome: list[str] = []

    def count(self, base: int, at_least: int = 1) -> int:
        return max(at_least, round(base * self.scale))

    def describe(self) -> str:
        raise NotImplementedError

    def prepare(self, store: Path) -> list[str]:
        return []

    async def arrange(self, url: str, workdir: Path) -> None:
        return None

    async def attack(self, url: str) -> None:
        raise NotImplementedError

    async def finish(self) -> None:
        return None


class PresenceFlood(Scenario):
    key = "presence"
    title = "1. presence flood"

    def __init__(self, scale: float) -> None:
        super().__init__(scale)
        self.messages = self.count(3000)
        self.per_message = 8  # max_presence_states_per_connection
        self.state = json.dumps({"user": "x" * 10_000}).encode()
        self.cap_s = 20.0 * max(1.0, scale)
        self.silent_peers = self.count(1)
        # As much as the limits let through, never refused: 15 KB states (the cap is
        # 16 KiB), a burst of 55 messages, then 19/s (presence_burst 60, presence_per_s 20).
        # One such peer passes max_write_buffer_bytes (32 MiB) within the 20 s.
        self.silent_state = json.dumps({"user": "y" * 15_000}).encode()
        self.silent_burst = 55
        self.silent_rate = 19.0

    def describe(self) -> str:
        return (
            f"a flooder sends up to {self.messages:,} presence messages of {self.per_message} "
            f"new client ids x {len(self.state) / 1000:.0f} KB states as fast as it can "
            f"(reading what it gets; reconnecting when closed); meanwhile "
            f"{self.silent_peers} peer(s) send their own {self.per_message} states of "
            f"{len(self.silent_state) / 1000:.0f} KB (a burst of {self.silent_burst}, then "
            f"{self.silent_rate:g} messages/s: within the limits) and never read (8 KB socket "
            f"receive buffer); at most "
            f"{self.cap_s:.0f} s"
        )

    async def attack(self, url: str) -> None:
        deadline = time.monotonic() + self.cap_s
        silent = [
            asyncio.create_task(self._silent_peer(url, deadline, 900_000 + 100 * i))
            for i in range(self.silent_peers)
        ]
        try:
            await self._flood(url, deadline)
        finally:
            results = await asyncio.gather(*silent)
        sent = sum(n for n, _, _ in results)
        cut = sorted(t for _, t, _ in results if t is not None)
        seen = Counter(code for _, _, code in results)
        when = f"{len(cut)} cut off (after {cut[0]:.1f}-{cut[-1]:.1f} s)" if cut else "none cut off"
        self.outcome.append(
            f"silent peer(s): {sent:,} messages sent, {when}, they saw "
            + ", ".join(f"{code} x{n}" for code, n in seen.most_common())
        )

    async def _flood(self, url: str, deadline: float) -> None:
        sent = conns = 0
        closes: Counter[str] = Counter()
        next_id = 1_000_000
        while sent < self.messages and time.monotonic() < deadline and conns < 5000:
            conns += 1
            try:
                ws = await open_stock(url, ROOM)
            except InvalidStatus as exc:
                closes[f"HTTP {exc.response.status_code}"] += 1
                await asyncio.sleep(0.05)
                continue
            reader = asyncio.create_task(drain(ws))
            try:
                await ws.send(SyncStep1(b"\x00").encode())
                while sent < self.messages and time.monotonic() < deadline:
                    ids = range(next_id, next_id + self.per_message)
                    next_id += self.per_message
                    await ws.send(presence_frame(ids, 1, self.state))
                    sent += 1
            except ConnectionClosed:
                pass
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(2):
                    await asyncio.shield(reader)
            closes[close_code(ws)] += 1
            await close_quietly(ws)
            reader.cancel()
        codes = ", ".join(f"{code} x{n}" for code, n in closes.most_common())
        self.outcome.append(
            f"flooder: {sent:,} messages ({sent * self.per_message:,} states) on {conns} "
            f"connections, closed: {codes}"
        )

    async def _silent_peer(
        self, url: str, deadline: float, first_id: int
    ) -> tuple[int, float | None, str]:
        """Send presence within the limits, never read; (sent, cut off after s, close seen)."""
        parts = urlsplit(url)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8192)
        sock.setblocking(False)
        ws: ClientConnection | None = None
        sent = 0
        started = time.monotonic()
        broke = None
        try:
            loop = asyncio.get_running_loop()
            await loop.sock_connect(sock, (parts.hostname or "127.0.0.1", parts.port or 80))
            # max_queue=1: the client library stops reading after one frame, so the
            # relay's frames pile up in the relay (the peer never reads).
            ws = await open_stock(url, ROOM, sock=sock, max_queue=1)
            await ws.send(SyncStep1(b"\x00").encode())
            ids = range(first_id, first_id + self.per_message)
            while time.monotonic() < deadline:
                sent += 1
                await ws.send(presence_frame(ids, sent, self.silent_state))
                if sent >= self.silent_burst:
                    await asyncio.sleep(1 / self.silent_rate)
        except ConnectionClosed:
            broke = time.monotonic() - started
        finally:
            code = close_code(ws) if ws is not None else "never connected"
            if ws is not None and ws.transport is not None:
                ws.transport.abort()
            sock.close()
        return sent, broke, code


class HeavyUpdates(Scenario):
    key = "heavy"
    title = "2. heavy updates"

    def __init__(self, scale: float) -> None:
        super().__init__(scale)
        self.text_bytes = min(self.count(15_000_000), 16 * 2**20 - 64 * 1024)
        self.clients = self.count(20_000)
        self.values = self.count(3_000_000)
        self.cap_s = 120.0
        self.frames: list[tuple[str, bytes]] = []

    def describe(self) -> str:
        return (
            f"one connection each, one after another: a valid {self.text_bytes / 1e6:.1f} MB "
            f"text update (stored and echoed), an update with {self.clients:,} one-item "
            f"client ids, one with {self.values:,} Any integers (both over the caps)"
        )

    def prepare(self, store: Path) -> list[str]:
        big: Doc[Any] = Doc()
        big.get("text", type=Text).insert(0, "z" * self.text_bytes)
        self.frames = [
            (f"{self.text_bytes / 1e6:.0f} MB text", SyncUpdate(big.get_update()).encode()),
            (f"{self.clients:,} clients", SyncUpdate(many_clients_update(self.clients)).encode()),
            (f"{self.values:,} integers", SyncUpdate(many_values_update(self.values)).encode()),
        ]
        return []

    async def attack(self, url: str) -> None:
        for what, frame in self.frames:
            self.outcome.append(await self._send_one(url, what, frame))

    @staticmethod
    async def _send_one(url: str, what: str, frame: bytes) -> str:
        """Send one update; wait for its echo (stored) or the close (refused)."""
        ws = await open_stock(url, ROOM)
        t0 = time.monotonic()
        try:
            await sync_stock(ws)
            t0 = time.monotonic()
            await ws.send(frame)
            async with asyncio.timeout(60):
                while True:
                    data = await ws.recv()
                    if len(data) >= len(frame) // 2:
                        return f"{what} ({len(frame) / 1e6:.1f} MB): echoed after " + (
                            f"{time.monotonic() - t0:.2f} s"
                        )
        except ConnectionClosed:
            reason = (ws.close_reason or "")[:70]
            dt = time.monotonic() - t0
            size = len(frame) / 1e6
            return f"{what} ({size:.1f} MB): closed {close_code(ws)} ({reason}) after {dt:.2f} s"
        except TimeoutError:
            return f"{what}: neither echoed nor closed within 60 s"
        finally:
            await close_quietly(ws)


class JoinStorm(Scenario):
    key = "join"
    title = "3. join storm"

    def __init__(self, scale: float) -> None:
        super().__init__(scale)
        self.updates = self.count(50_000)
        self.joiners = min(self.count(20), MAX_ADDRESS_SLOTS)
        self.cap_s = 90.0

    def describe(self) -> str:
        return (
            f"a document of {self.updates:,} stored uncompacted one-character updates "
            f"(relay flag --compact-after-updates 1000000); {self.joiners} stock clients "
            f"join it at once and sync"
        )

    def prepare(self, store: Path) -> list[str]:
        updates = text_updates(["x"] * self.updates)
        with UpdateLog(store) as log:
            log.append_many((ROOM, u) for u in updates)
        return ["--compact-after-updates", "1000000"]

    async def attack(self, url: str) -> None:
        async def join() -> tuple[float, int]:
            t0 = time.monotonic()
            ws = await open_stock(url, ROOM)
            try:
                size = await sync_stock(ws, timeout_s=60)
            finally:
                await close_quietly(ws)
            return time.monotonic() - t0, size

        results = await asyncio.gather(
            *(join() for _ in range(self.joiners)), return_exceptions=True
        )
        done = [r for r in results if isinstance(r, tuple)]
        failed = [repr(r)[:80] for r in results if not isinstance(r, tuple)]
        if done:
            slowest = max(t for t, _ in done)
            size = max(s for _, s in done)
            self.outcome.append(
                f"{len(done)}/{self.joiners} joined and synced, slowest {slowest:.2f} s, "
                f"answer {size / 1e3:.0f} KB"
            )
        if failed:
            self.outcome.append(f"{len(failed)} failed: {failed[0]}")


class GapStorm(Scenario):
    key = "gaps"
    title = "4. gap storm"

    def __init__(self, scale: float) -> None:
        super().__init__(scale)
        self.gaps = self.count(2000)
        self.rate = 200.0
        self.replica_count = min(self.count(10), 50)
        self.cap_s = self.gaps / self.rate + 30
        self.replicas: list[Replica] = []
        self.updates: list[bytes] = []

    def describe(self) -> str:
        return (
            f"{self.replica_count} crdtsync Replicas hold the room; a stock client sends "
            f"{self.gaps:,} one-character updates at {self.rate:g}/s, each after a clock gap "
            f"(every other update of one client id), then 3 s for the replicas' resyncs"
        )

    def prepare(self, store: Path) -> list[str]:
        self.updates = text_updates(["g"] * (2 * self.gaps), client_id=777_777)[1::2]
        return []

    async def arrange(self, url: str, workdir: Path) -> None:
        for i in range(self.replica_count):
            replica = Replica(workdir / f"replica-{i}.db", relay=url)
            self.replicas.append(replica)
            await replica.start()
            await replica.open(ROOM)
        for _ in range(600):  # up to 30 s
            if all(r.status(ROOM).synced for r in self.replicas):
                break
            await asyncio.sleep(0.05)

    async def attack(self, url: str) -> None:
        ws = await open_stock(url, ROOM)
        tally: Counter[str] = Counter()
        sent = 0
        try:
            await sync_stock(ws)
            reader = asyncio.create_task(drain(ws, tally))
            t0 = time.monotonic()
            for update in self.updates:
                await asyncio.sleep(max(0.0, t0 + sent / self.rate - time.monotonic()))
                await ws.send(SyncUpdate(update).encode())
                sent += 1
            await asyncio.sleep(3.0)
            reader.cancel()
        except ConnectionClosed:
            pass
        finally:
            state = close_code(ws)
            await close_quietly(ws)
        refusals = tally["denied"]
        self.outcome.append(
            f"attacker: {sent:,} gap updates sent, {refusals:,} permission-denied replies, "
            f"connection at the end: {state}"
        )
        synced = sum(r.status(ROOM).synced for r in self.replicas)
        connected = sum(r.status(ROOM).connected for r in self.replicas)
        errors = {r.status(ROOM).last_error for r in self.replicas} - {None}
        self.outcome.append(
            f"replicas: {connected}/{len(self.replicas)} connected, {synced} synced"
            + (f", last error {sorted(map(str, errors))[0][:80]}" if errors else "")
        )

    async def finish(self) -> None:
        replicas, self.replicas = self.replicas, []
        for replica in replicas:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(10):
                    await replica.stop()


class SyncFlood(Scenario):
    key = "sync"
    title = "5. sync-request flood"

    def __init__(self, scale: float) -> None:
        super().__init__(scale)
        self.chunks = self.count(2000)
        self.requests = self.count(1_000_000)  # in practice the time cap ends it
        self.cap_s = 15.0 * max(1.0, scale)

    def describe(self) -> str:
        return (
            f"a document of {self.chunks:,} updates x 2 KB of text ({self.chunks * 2 / 1e3:.1f} "
            f"MB), compacted into a snapshot; one stock connection sends sync step 1 with an "
            f"empty state vector nonstop (up to {self.requests:,}, at most "
            f"{self.cap_s:.0f} s), reading the answers"
        )

    def prepare(self, store: Path) -> list[str]:
        updates = text_updates(["s" * 2000] * self.chunks)
        with UpdateLog(store) as log:
            log.append_many((ROOM, u) for u in updates)
            log.compact(ROOM)
        return []

    async def attack(self, url: str) -> None:
        deadline = time.monotonic() + self.cap_s
        ws = await open_stock(url, ROOM)
        tally: Counter[str] = Counter()
        reader = asyncio.create_task(drain(ws, tally))
        sent = 0
        frame = SyncStep1(b"\x00").encode()
        try:
            while sent < self.requests and time.monotonic() < deadline:
                async with asyncio.timeout(max(0.1, deadline - time.monotonic())):
                    await ws.send(frame)  # blocks once the relay stops reading us
                sent += 1
        except (ConnectionClosed, TimeoutError):
            pass
        finally:
            state = close_code(ws)
            await close_quietly(ws)
            reader.cancel()
        self.outcome.append(
            f"{sent:,} requests sent, {tally['answers']:,} answers ({tally['bytes'] / 1e6:.0f} "
            f"MB) received; connection at the end: {state}"
        )


class IdleSlots(Scenario):
    key = "idle"
    title = "6. idle slots"

    def __init__(self, scale: float) -> None:
        super().__init__(scale)
        self.connections = self.count(200)
        self.cap_s = 45.0
        self.held: list[ClientConnection] = []

    def describe(self) -> str:
        return (
            f"{self.connections:,} connections from 127.0.0.1 (the probe's address too) open "
            f"at once and never send anything; held until the relay closes them (at most "
            f"{self.cap_s:.0f} s); one more honest connection tries to join meanwhile"
        )

    async def attack(self, url: str) -> None:
        statuses: Counter[str] = Counter()

        async def one(i: int) -> ClientConnection | None:
            try:
                return await open_stock(url, f"{ROOM}/{i}")
            except InvalidStatus as exc:
                statuses[f"HTTP {exc.response.status_code}"] += 1
            except (OSError, TimeoutError) as exc:
                statuses[type(exc).__name__] += 1
            return None

        t0 = time.monotonic()
        opened = await asyncio.gather(*(one(i) for i in range(self.connections)))
        self.held = [ws for ws in opened if ws is not None]
        readers = [asyncio.create_task(drain(ws)) for ws in self.held]
        honest = await one(-1)
        honest_saw = "accepted" if honest is not None else "refused"
        await close_quietly(honest)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max(1.0, self.cap_s - (time.monotonic() - t0))):
                await asyncio.gather(*readers)
        closed_after = time.monotonic() - t0
        closes = Counter(close_code(ws) for ws in self.held)
        refused = ", ".join(f"{k} x{n}" for k, n in statuses.most_common()) or "none"
        codes = ", ".join(f"{k} x{n}" for k, n in closes.most_common())
        self.outcome.append(
            f"{len(self.held)} accepted ({codes} after {closed_after:.1f} s), refused: {refused}; "
            f"a new honest connection meanwhile: {honest_saw}"
        )

    async def finish(self) -> None:
        held, self.held = self.held, []
        await asyncio.gather(*(close_quietly(ws) for ws in held))


class ManyClientAnswer(Scenario):
    key = "answer"
    title = "7. many-client answer"

    def __init__(self, scale: float) -> None:
        super().__init__(scale)
        self.text_bytes = 750_000  # the answer must pass answer_piece_bytes (512 KiB)
        self.clients = min(self.count(3000), 10_000)  # max_update_clients: accepted
        self.cap_s = 150.0
        self.frames: list[tuple[str, bytes]] = []

    def describe(self) -> str:
        return (
            f"a stock client stores {self.text_bytes / 1e6:.2f} MB of text, another one "
            f"valid update with {self.clients:,} one-item client ids (within the caps); then "
            f"one more client joins and syncs: its answer is over answer_piece_bytes, so the "
            f"relay cuts it into pieces per client id"
        )

    def prepare(self, store: Path) -> list[str]:
        text: Doc[Any] = Doc()
        text.get("text", type=Text).insert(0, "t" * self.text_bytes)
        self.frames = [
            (f"{self.text_bytes / 1e6:.2f} MB text", SyncUpdate(text.get_update()).encode()),
            (f"{self.clients:,} clients", SyncUpdate(many_clients_update(self.clients)).encode()),
        ]
        return []

    async def attack(self, url: str) -> None:
        for what, frame in self.frames:
            self.outcome.append(await HeavyUpdates._send_one(url, what, frame))
        ws = await open_stock(url, ROOM)
        t0 = time.monotonic()
        try:
            size = await sync_stock(ws, timeout_s=self.cap_s)
            took = time.monotonic() - t0
            self.outcome.append(f"one more client synced {size / 1e6:.2f} MB in {took:.1f} s")
        finally:
            await close_quietly(ws)


def text_doc(chunks: Sequence[str], client_id: int) -> tuple[list[bytes], bytes, bytes]:
    """Like :func:`text_updates`, plus the document's state vector and whole encoding."""
    doc: Doc[Any] = Doc(client_id=client_id)
    text = doc.get("text", type=Text)
    updates: list[bytes] = []
    sub = doc.observe(lambda event: updates.append(event.update))
    for chunk in chunks:
        text.insert(len(text), chunk)
    doc.unobserve(sub)
    return updates, doc.get_state(), doc.get_update()


def stored_summary(store: Path, room: str) -> str:
    """The room as stored (after the load): snapshot size and seq, tail rows."""
    from crdtsync.errors import StoreError
    from crdtsync.store import UpdateLog

    try:
        with UpdateLog(store) as log:
            stored = log.load(room)
    except StoreError as exc:
        return f"store not readable: {exc}"
    size = len(stored.snapshot or b"")
    return (
        f"stored after: snapshot {size / 1e6:.1f} MB (seq {stored.snapshot_seq:,}), "
        f"tail {len(stored.updates):,} updates"
    )


def ms_summary(values: Sequence[float]) -> str:
    """``p50 / p99 / max ms (n)`` of latencies in milliseconds."""
    if not values:
        return "none"
    v = sorted(values)

    def pct(p: float) -> float:
        return v[max(0, math.ceil(p / 100 * len(v)) - 1)]

    return f"{pct(50):.0f} / {pct(99):.0f} / {v[-1]:.0f} ms (n={len(v):,})"


async def timed_writer(
    url: str,
    updates: Sequence[bytes],
    client_id: int,
    *,
    state_vector: bytes,
    rate: float | None,
    deadline: float,
) -> tuple[list[float], int, str]:
    """A stock writer in the hostile room: sync (step 1 with ``state_vector``), then send
    ``updates`` (one client id) at ``rate`` per second (None: all at once) until
    ``deadline``; wait (at most 15 s) for the echo of the last one sent, then leave.

    Returns the echo latencies (ms, send -> own echo), how many were sent, and how the
    connection ended (``open`` when this side closed it).
    """
    ends = [check_update(u).state.get(client_id, 0) for u in updates]
    sent_at: list[float] = []
    latencies: list[float] = []
    caught_up = asyncio.Event()
    ws = await open_stock(url, ROOM)

    async def reader() -> None:
        got = 0
        async for data in ws:
            now = time.monotonic()
            msg = decode_message(as_bytes(data))
            if isinstance(msg, SyncUpdate | SyncStep2):
                end = check_update(msg.update).state.get(client_id, 0)
                while got < len(sent_at) and ends[got] <= end:
                    latencies.append((now - sent_at[got]) * 1000)
                    got += 1
                if got == len(sent_at):
                    caught_up.set()

    state = "open"
    task: asyncio.Task[None] | None = None
    try:
        await sync_stock(ws, timeout_s=60, state_vector=state_vector)
        task = asyncio.create_task(reader())
        t0 = time.monotonic()
        for i, update in enumerate(updates):
            if time.monotonic() >= deadline or task.done():
                break
            if rate is not None:
                await asyncio.sleep(max(0.0, t0 + i / rate - time.monotonic()))
            caught_up.clear()
            sent_at.append(time.monotonic())
            await ws.send(SyncUpdate(update).encode())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(caught_up.wait(), 15)
    except ConnectionClosed:
        pass
    finally:
        if ws.close_code is not None:
            state = close_code(ws)
        await close_quietly(ws)
        if task is not None:
            task.cancel()
    return latencies, len(sent_at), state


class CompactionLoad(Scenario):
    key = "compaction"
    title = "8. compaction under load"

    def __init__(self, scale: float) -> None:
        super().__init__(scale)
        # Not a few thousand updates: compaction applies the tail to a scratch Doc in one
        # transaction, and pycrdt 0.14 then holds about n^2 x size / 2 bytes for n text
        # appends of `size` (measured: 400 x 5 KB 0.4 GB, 1,600 x 5 KB 6.2 GB; 4,000 x 5 KB
        # would need ~40 GB). 200 x 100 KB: 20 MB of text, a ~2 GB worker; --scale scales
        # the size of each update, so that memory grows linearly with it.
        self.updates = 200
        self.chunk = self.count(100_000)  # characters per stored update
        self.rounds = self.count(3, at_least=2)
        self.round_s = 8.0
        self.visit_updates = 120  # over compact_after_updates / 10: the leave compacts
        self.appenders = 2
        self.append_rate = 50.0  # updates/s per appender
        self.append_chunk = 100
        self.cap_s = self.rounds * (self.round_s + 60) + 30
        self.store: Path | None = None
        self.state_vector = b"\x00"

    def describe(self) -> str:
        return (
            f"a document with a stored, uncompacted tail of {self.updates:,} updates x "
            f"{self.chunk / 1000:g} KB of text ({self.updates * self.chunk / 1e6:.0f} MB; "
            f"default --compact-after-updates 1000, so the relay compacts it in its worker "
            f"when the room empties). "
            f"{self.rounds} rounds: a client that holds the document reconnects (step 1 with "
            f"the document's state vector), sends {self.visit_updates} queued one-line edits "
            f"at once, waits for their echo and leaves (the room empties: a compaction); "
            f"then {self.appenders} clients join and append {self.append_chunk}-character "
            f"lines at {self.append_rate:g}/s each for {self.round_s:g} s (timing their own "
            f"echoes) and leave (another compaction once the first is done)"
        )

    def prepare(self, store: Path) -> list[str]:
        self.store = store
        updates, self.state_vector, _ = text_doc(["c" * self.chunk] * self.updates, 313_131)
        with UpdateLog(store) as log:
            log.append_many((ROOM, u) for u in updates)
        return []

    async def attack(self, url: str) -> None:
        echoes: list[float] = []
        closes: Counter[str] = Counter()
        visits: list[str] = []
        next_id = 600_000
        line = "a" * (self.append_chunk - 1) + "\n"
        for _ in range(self.rounds):
            t0 = time.monotonic()
            next_id += 1
            burst = text_updates([line] * self.visit_updates, client_id=next_id)
            lat, sent, state = await timed_writer(
                url, burst, next_id, state_vector=self.state_vector, rate=None,
                deadline=t0 + 60,
            )  # fmt: skip
            closes[state] += 1
            took = f"{max(lat) / 1000:.2f} s" if len(lat) == sent else f"{len(lat)}/{sent} echoed"
            visits.append(f"{time.monotonic() - t0:.1f} s (burst echoed: {took})")
            deadline = time.monotonic() + self.round_s
            count = int(self.append_rate * self.round_s) + 10
            writers = []
            for _ in range(self.appenders):
                next_id += 1
                writers.append(
                    timed_writer(
                        url,
                        text_updates([line] * count, client_id=next_id),
                        next_id,
                        state_vector=self.state_vector,
                        rate=self.append_rate,
                        deadline=deadline,
                    )
                )
            for lat, _, state in await asyncio.gather(*writers):
                echoes.extend(lat)
                closes[state] += 1
            await asyncio.sleep(0.2)
        self.outcome.append("visits (join, burst, echo, leave): " + ", ".join(visits))
        self.outcome.append(
            f"appenders' own echo p50 / p99 / max: {ms_summary(echoes)}; connections ended: "
            + ", ".join(f"{k} x{n}" for k, n in closes.most_common())
        )

    async def finish(self) -> None:
        if self.store is not None and not any("stored after" in o for o in self.outcome):
            self.outcome.append(await asyncio.to_thread(stored_summary, self.store, ROOM))


class RepeatedDocument(Scenario):
    key = "repeats"
    title = "9. repeated whole document"

    def __init__(self, scale: float) -> None:
        super().__init__(scale)
        self.updates = self.count(400)
        self.chunk = 500  # 200 KB of text at scale 1
        self.repeats = self.count(30)
        self.cap_s = 120.0
        self.whole = b""

    def describe(self) -> str:
        return (
            f"a document of {self.updates:,} stored updates x {self.chunk} characters "
            f"({self.updates * self.chunk / 1e3:.0f} KB of text, one client id); one stock "
            f"connection syncs, then sends the whole document (its own encoding) as a "
            f"sync-update message {self.repeats} times in "
            f"a row, as fast as the socket takes them, then one new one-character update "
            f"whose echo marks the end"
        )

    def prepare(self, store: Path) -> list[str]:
        updates, _, self.whole = text_doc(["r" * self.chunk] * self.updates, 424_242)
        with UpdateLog(store) as log:
            log.append_many((ROOM, u) for u in updates)
        return []

    async def attack(self, url: str) -> None:
        sentinel_id = 525_252
        sentinel = text_updates(["!"], client_id=sentinel_id)[0]
        ws = await open_stock(url, ROOM)
        tally: Counter[str] = Counter()
        echoed = asyncio.Event()

        async def reader() -> None:
            async for data in ws:
                tally["frames"] += 1
                tally["bytes"] += len(data)
                tally["denied"] += as_bytes(data)[:2] == PERMISSION_DENIED_PREFIX
                msg = decode_message(as_bytes(data))
                if isinstance(msg, SyncUpdate) and check_update(msg.update).state.get(sentinel_id):
                    echoed.set()

        task: asyncio.Task[None] | None = None
        frame = SyncUpdate(self.whole).encode()
        sent = 0
        t_send = t0 = time.monotonic()
        try:
            answer = await sync_stock(ws)
            task = asyncio.create_task(reader())
            t0 = time.monotonic()
            for _ in range(self.repeats):
                await ws.send(frame)
                sent += 1
            t_send = time.monotonic()
            await ws.send(SyncUpdate(sentinel).encode())
            async with asyncio.timeout(max(1.0, self.cap_s - 10)):
                await echoed.wait()
            done = time.monotonic() - t0
            self.outcome.append(
                f"synced {answer / 1e3:.0f} KB; {sent} x {len(frame) / 1e3:.0f} KB sent in "
                f"{t_send - t0:.2f} s; the end marker echoed {done:.2f} s after the first "
                f"repeat ({1000 * done / max(sent, 1):.0f} ms per repeat)"
            )
        except ConnectionClosed:
            self.outcome.append(f"closed after {sent} repeats")
        except TimeoutError:
            self.outcome.append(f"end marker not echoed within {self.cap_s - 10:.0f} s")
        finally:
            state = close_code(ws)
            await close_quietly(ws)
            if task is not None:
                task.cancel()
        self.outcome.append(
            f"frames back after the sync: {tally['frames']} ({tally['bytes'] / 1e3:.0f} KB), "
            f"{tally['denied']} permission-denied; connection at the end: {state}"
        )


class BigUpdate(Scenario):
    key = "bigupdate"
    title = "10. 60 MB update, caps raised"

    def __init__(self, scale: float) -> None:
        super().__init__(scale)
        self.limit = 64 * 2**20
        self.text_bytes = min(self.count(60_000_000), self.limit - 256 * 1024)
        self.readers = 5
        self.cap_s = 150.0
        self.frame = b""
        self.held: list[tuple[ClientConnection, asyncio.Task[None], dict[str, Any]]] = []

    def describe(self) -> str:
        return (
            f"the relay runs with max_update_bytes and --max-message-bytes at "
            f"{self.limit // 2**20} MiB (a --config TOML file: the CLI has no "
            f"--max-update-bytes); {self.readers} stock peers sit in the room, synced and "
            f"reading as fast as they can; one more sends one valid "
            f"{self.text_bytes / 1e6:.0f} MB text update and waits for its echo"
        )

    def prepare(self, store: Path) -> list[str]:
        config = store.parent / "bigupdate.toml"
        config.write_text(f"max_update_bytes = {self.limit}\nmax_message_bytes = {self.limit}\n")
        big: Doc[Any] = Doc()
        big.get("text", type=Text).insert(0, "b" * self.text_bytes)
        self.frame = SyncUpdate(big.get_update()).encode()
        return ["--config", str(config), "--max-message-bytes", str(self.limit)]

    async def arrange(self, url: str, workdir: Path) -> None:
        for _ in range(self.readers):
            ws = await open_stock(url, ROOM)
            await sync_stock(ws)
            seen: dict[str, Any] = {"big_at": None, "done": asyncio.Event()}
            self.held.append((ws, asyncio.create_task(self._read(ws, seen)), seen))

    async def _read(self, ws: ClientConnection, seen: dict[str, Any]) -> None:
        with contextlib.suppress(ConnectionClosed):
            async for data in ws:
                if len(data) >= len(self.frame) // 2:
                    seen["big_at"] = time.monotonic()
                    seen["done"].set()
        seen["done"].set()  # closed

    async def attack(self, url: str) -> None:
        t0 = time.monotonic()
        what = f"{self.text_bytes / 1e6:.0f} MB text"
        self.outcome.append("sender: " + await HeavyUpdates._send_one(url, what, self.frame))
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max(1.0, 60 - (time.monotonic() - t0))):
                await asyncio.gather(*(seen["done"].wait() for _, _, seen in self.held))
        got = [seen["big_at"] - t0 for _, _, seen in self.held if seen["big_at"] is not None]
        closes = Counter(
            f"{close_code(ws)} ({(ws.close_reason or '')[:40]})" if ws.close_code else "open"
            for ws, _, _ in self.held
        )
        when = f" (after {min(got):.1f}-{max(got):.1f} s)" if got else ""
        self.outcome.append(
            f"readers: {len(got)}/{len(self.held)} received it{when}; connections: "
            + ", ".join(f"{k} x{n}" for k, n in closes.most_common())
        )

    async def finish(self) -> None:
        held, self.held = self.held, []
        await asyncio.gather(*(close_quietly(ws) for ws, _, _ in held))
        for _, task, _ in held:
            task.cancel()


class SilentReaders(PresenceFlood):
    key = "silent"
    title = "11. silent readers"

    def __init__(self, scale: float) -> None:
        super().__init__(scale)
        self.silent_peers = min(self.count(16), MAX_ADDRESS_SLOTS - 1)
        self.update_rate = 20.0
        self.presence_every = 4  # one presence message per 4 updates: 5/s
        self.talker_state = json.dumps({"user": "t" * 2000}).encode()

    def describe(self) -> str:
        return (
            f"{self.silent_peers} peers each send their own {self.per_message} presence states "
            f"of {len(self.silent_state) / 1000:.0f} KB (a burst of {self.silent_burst}, then "
            f"{self.silent_rate:g} messages/s: within the limits) and never read (8 KB socket "
            f"receive buffer); one more stock peer sends a one-line update "
            f"{self.update_rate:g} times a second and its presence "
            f"({len(self.talker_state) / 1000:.0f} KB) every {self.presence_every}th time, "
            f"reading everything; at most "
            f"{self.cap_s:.0f} s"
        )

    async def attack(self, url: str) -> None:
        deadline = time.monotonic() + self.cap_s
        silent = [
            asyncio.create_task(self._silent_peer(url, deadline, 900_000 + 100 * i))
            for i in range(self.silent_peers)
        ]
        try:
            await self._talk(url, deadline)
        finally:
            results = await asyncio.gather(*silent)
        sent = sum(n for n, _, _ in results)
        cut = sorted(t for _, t, _ in results if t is not None)
        seen = Counter(code for _, _, code in results)
        when = f"{len(cut)} cut off (after {cut[0]:.1f}-{cut[-1]:.1f} s)" if cut else "none cut off"
        self.outcome.append(
            f"silent peers: {sent:,} messages sent, {when}, they saw "
            + ", ".join(f"{code} x{n}" for code, n in seen.most_common())
        )

    async def _talk(self, url: str, deadline: float) -> None:
        client = 880_088
        updates = text_updates(["t\n"] * int(self.update_rate * self.cap_s + 10), client)
        ws = await open_stock(url, ROOM)
        tally: Counter[str] = Counter()
        sent = presence = 0
        try:
            await sync_stock(ws)
            reader = asyncio.create_task(drain(ws, tally))
            t0 = time.monotonic()
            for i, update in enumerate(updates):
                if time.monotonic() >= deadline or reader.done():
                    break
                await asyncio.sleep(max(0.0, t0 + i / self.update_rate - time.monotonic()))
                await ws.send(SyncUpdate(update).encode())
                sent += 1
                if i % self.presence_every == 0:
                    presence += 1
                    await ws.send(presence_frame([client], presence, self.talker_state))
            reader.cancel()
        except ConnectionClosed:
            pass
        finally:
            state = close_code(ws)
            await close_quietly(ws)
        self.outcome.append(
            f"talker: {sent} updates and {presence} presence messages sent, "
            f"{tally['frames']:,} frames ({tally['bytes'] / 1e6:.0f} MB) read; "
            f"connection at the end: {state}"
        )


SCENARIOS: dict[str, Callable[[float], Scenario]] = {
    cls.key: cls
    for cls in (
        PresenceFlood,
        HeavyUpdates,
        JoinStorm,
        GapStorm,
        SyncFlood,
        IdleSlots,
        ManyClientAnswer,
        CompactionLoad,
        RepeatedDocument,
        BigUpdate,
        SilentReaders,
    )
}


# -- the probe (a separate process) -----------------------------------------------------


async def probe_child(url: str, rate: float, max_s: float) -> dict[str, Any]:
    """Run the probe until SIGTERM (or ``max_s``); return its ``[send, receive]`` times."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    doc: Doc[Any] = Doc(client_id=PROBE_CLIENT)
    text = doc.get("probe", type=Text)
    updates: list[bytes] = []
    doc.observe(lambda event: updates.append(event.update))
    sent: list[float] = []
    received: list[float | None] = []
    caught_up = asyncio.Event()  # every probe sent so far was received
    error: str | None = None

    async def receive(rx: ClientConnection) -> None:
        got = 0
        async for data in rx:
            now = time.monotonic()
            msg = decode_message(as_bytes(data))
            if isinstance(msg, SyncUpdate | SyncStep2):
                end = check_update(msg.update).state.get(PROBE_CLIENT, 0)
                while got < min(end, len(sent)):
                    received[got] = now
                    got += 1
                if got == len(sent):
                    caught_up.set()

    try:
        async with await open_stock(url, PROBE_ROOM) as rx, await open_stock(url, PROBE_ROOM) as tx:
            await sync_stock(rx)
            await sync_stock(tx)
            receiver = asyncio.create_task(receive(rx))
            echoes = asyncio.create_task(drain(tx))  # a stock client gets its own echo
            print(json.dumps({"event": "ready"}), flush=True)
            t0 = time.monotonic()
            for i in range(int(max_s * rate)):
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), t0 + i / rate - time.monotonic())
                if stop.is_set() or receiver.done():
                    break
                text.insert(i, "p")
                caught_up.clear()
                sent.append(time.monotonic())
                received.append(None)
                await tx.send(SyncUpdate(updates[-1]).encode())
            with contextlib.suppress(TimeoutError):  # let the last probes arrive
                await asyncio.wait_for(caught_up.wait(), 3.0)
            if receiver.done():
                error = f"probe receiver stopped (connection {close_code(rx)})"
            receiver.cancel()
            echoes.cancel()
    except (ConnectionClosed, OSError, TimeoutError) as exc:
        error = f"probe connection failed: {exc!r}"
    return {"samples": list(zip(sent, received, strict=True)), "error": error}


class Probe:
    """The probe process, started and stopped from here (its own session)."""

    def __init__(self, url: str, rate: float, workdir: Path) -> None:
        self.url = url
        self.rate = rate
        self.out = workdir / "probe.json"
        self.err = workdir / "probe.stderr"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 30.0) -> None:
        cmd = [
            sys.executable, str(Path(__file__).resolve()), "--probe-child", self.url,
            "--probe-rate", str(self.rate), "--probe-out", str(self.out),
        ]  # fmt: skip
        with open(self.err, "wb") as err:
            self.proc = subprocess.Popen(
                cmd,
                stdout=subprocess.PIPE,
                stderr=err,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        try:
            common.read_json_line(self.proc, "ready", timeout_s)
        except RuntimeError as exc:
            raise RuntimeError(
                f"probe did not start: {exc}; {self.err.read_text()[-500:]}"
            ) from None

    def stop(self) -> tuple[list[tuple[float, float | None]], str | None]:
        """Stop the probe (SIGTERM: it writes its samples), return them and any error."""
        if self.proc is None:
            return [], "probe never started"
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(15)
        common.stop_process(self.proc)
        try:
            data = json.loads(self.out.read_text())
        except (OSError, ValueError):
            return [], f"probe wrote no result; {self.err.read_text(errors='replace')[-300:]}"
        return [(s, r) for s, r in data["samples"]], data["error"]


def latency(samples: Sequence[tuple[float, float | None]], t0: float, t1: float) -> dict[str, Any]:
    """Probe latency (ms) of the probes sent in ``[t0, t1)``: count, lost, p50, p99, max."""
    window = [(s, r) for s, r in samples if t0 <= s < t1]
    values = sorted((r - s) * 1000 for s, r in window if r is not None)

    def pct(p: float) -> float | None:
        return values[max(0, math.ceil(p / 100 * len(values)) - 1)] if values else None

    return {
        "n": len(window),
        "lost": sum(r is None for _, r in window),
        "p50": pct(50),
        "p99": pct(99),
        "max": values[-1] if values else None,
    }


# -- profiling the relay (--profile) ---------------------------------------------------

Frame = tuple[str, str, int]  # function, file, line
STALL_MS = 50.0  # an event-loop turn at least this long is a stall


def _short(path: str) -> str:
    return "/".join(Path(path).parts[-2:])


def _project(path: str) -> bool:
    return "site-packages" not in path and (
        "crdtsync" in path or path.startswith(str(common.REPO_DIR))
    )


def _frame_label(frame: Frame) -> str:
    return f"{frame[0]} ({_short(frame[1])}:{frame[2]})"


class RelayProfiler:
    """py-spy attached to the relay process (its main thread runs the event loop).

    ``py-spy record --idle --format chrometrace`` gives the main thread's stack at every
    change with a timestamp: the stretches where it is not waiting in ``select`` are the
    event loop's turns, so a long turn (a stall) has a length and a culprit.
    """

    def __init__(self, pid: int, workdir: Path, rate: int) -> None:
        self.pid = pid
        self.rate = rate
        self.out = workdir / "relay-profile.json"
        self.err = workdir / "py-spy.stderr"
        self.proc: subprocess.Popen[bytes] | None = None
        self.t_start = 0.0
        self.error: str | None = None

    def start(self) -> None:
        import shutil

        pyspy = shutil.which("py-spy")
        if pyspy is None:
            self.error = "py-spy is not installed (`pip install py-spy`)"
            return
        with open(self.err, "wb") as err:
            self.proc = subprocess.Popen(
                [pyspy, "record", "--pid", str(self.pid), "--rate", str(self.rate),
                 "--format", "chrometrace", "--idle", "--nonblocking", "--full-filenames",
                 "--output", str(self.out)],
                stdout=subprocess.DEVNULL, stderr=err, stdin=subprocess.DEVNULL,
                start_new_session=True,
            )  # fmt: skip
        self.t_start = time.monotonic()

    def stop(self) -> list[dict[str, Any]]:
        """Stop py-spy (SIGINT: it writes its file); the trace events, or [] (see error)."""
        if self.proc is None:
            return []
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGINT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(60)
        common.stop_process(self.proc)
        try:
            events = json.loads(self.out.read_text())
        except (OSError, ValueError):
            self.error = "py-spy wrote nothing: " + self.err.read_text(errors="replace")[-300:]
            return []
        return events if isinstance(events, list) else []


def loop_timeline(events: list[dict[str, Any]]) -> list[tuple[float, tuple[Frame, ...]]]:
    """The event-loop thread's stack from each change on: ``(seconds, stack root first)``."""
    stacks: dict[int, list[Frame]] = {}
    lines: dict[int, list[tuple[float, tuple[Frame, ...]]]] = {}
    for e in events:
        tid = e.get("tid")
        if not isinstance(tid, int) or e.get("ph") not in ("B", "E"):
            continue
        args = e.get("args") or {}
        frame = (str(e.get("name")), str(args.get("filename", "")), int(args.get("line") or 0))
        stack = stacks.setdefault(tid, [])
        if e["ph"] == "B":
            stack.append(frame)
        elif stack and stack[-1] == frame:
            stack.pop()
        elif frame in stack:
            del stack[len(stack) - 1 - stack[::-1].index(frame)]
        ts = float(e.get("ts", 0)) / 1e6
        line = lines.setdefault(tid, [])
        if line and line[-1][0] == ts:
            line[-1] = (ts, tuple(stack))
        else:
            line.append((ts, tuple(stack)))

    def loop_frames(tid: int) -> int:
        return sum(any(f[0].endswith("_run_once") for f in st) for _, st in lines[tid])

    if not lines:
        return []
    return lines[max(lines, key=loop_frames)]


def _idle(stack: tuple[Frame, ...]) -> bool:
    """Waiting for I/O: in the selector's ``select`` (py-spy names it ``EpollSelector.select``)."""
    return not stack or any(
        f[1].endswith("selectors.py") and f[0].rsplit(".", 1)[-1] == "select" for f in stack
    )


def loop_stalls(
    timeline: list[tuple[float, tuple[Frame, ...]]], t0: float, t1: float, min_ms: float
) -> tuple[float, list[dict[str, Any]]]:
    """The event loop's busy fraction in ``[t0, t1)`` (py-spy seconds) and its stalls
    (turns of at least ``min_ms``), each with its length and culprit: the deepest frame
    of its most frequent stack that covers at least half of it."""
    busy = 0.0
    stalls: list[dict[str, Any]] = []
    current: list[tuple[float, tuple[Frame, ...]]] = []
    start = 0.0

    def close(end: float) -> None:
        length = end - start
        if length * 1000 < min_ms or not current:
            return
        cover: Counter[tuple[str, str]] = Counter()
        by_stack: Counter[tuple[Frame, ...]] = Counter()
        leaves: Counter[Frame] = Counter()
        for dur, stack in current:
            by_stack[stack] += dur  # type: ignore[assignment]
            leaves[stack[-1]] += dur  # type: ignore[assignment]
            for key in {(f[0], f[1]) for f in stack}:
                cover[key] += dur  # type: ignore[assignment]
        dominant = by_stack.most_common(1)[0][0]
        culprit = next(
            (f for f in reversed(dominant) if cover[(f[0], f[1])] >= 0.5 * length), dominant[-1]
        )
        turn = max((i for i, f in enumerate(dominant) if f[0].endswith("_run_once")), default=-1)
        frames = [f for f in dominant[turn + 1 :] if _project(f[1])]
        if dominant and not _project(dominant[-1][1]):
            frames.append(dominant[-1])
        chain = [
            f"{f[0] if _project(f[1]) else _frame_label(f)} {cover[(f[0], f[1])] / length:.0%}"
            for f in frames
        ]
        top = ", ".join(f"`{_frame_label(f)}` {1000 * t:.0f}" for f, t in leaves.most_common(3))
        stalls.append(
            {"at": start, "ms": length * 1000, "culprit": _frame_label(culprit),
             "chain": " > ".join(chain), "leaves": top}
        )  # fmt: skip

    for (ts, stack), (next_ts, _) in itertools.pairwise(timeline):
        if next_ts <= t0 or ts >= t1:
            continue
        if _idle(stack):
            close(ts)
            current = []
            continue
        if not current:
            start = ts
        dur = min(next_ts, t1) - max(ts, t0)
        busy += dur
        current.append((dur, stack))
    if current:
        close(min(timeline[-1][0], t1))
    return busy / max(t1 - t0, 1e-9), stalls


def profile_report(report: Report, sc: Scenario, prof: dict[str, Any]) -> None:
    """The stalls of the relay's event loop under load, as the profiler saw them."""
    report.add(f"### Relay event loop under py-spy: {sc.title}", "")
    if prof.get("error"):
        report.add(f"Profile failed: {prof['error']}", "")
        return
    stalls = prof["stalls"]
    report.add(
        f"py-spy at {prof['rate']} Hz over the load phase ({prof['window_s']:.1f} s): the "
        f"event loop was busy {prof['busy']:.0%} of it; {len(stalls)} turns of at least "
        f"{STALL_MS:.0f} ms (culprit: the deepest frame of a turn's most frequent stack "
        "that covers at least half of the turn).",
        "",
    )
    if not stalls:
        return
    groups: dict[str, list[float]] = {}
    for st in stalls:
        groups.setdefault(st["culprit"], []).append(st["ms"])
    report.table(
        ["culprit", "turns", "total ms", "mean ms", "max ms"],
        [
            (f"`{k}`", len(v), f"{sum(v):,.0f}", f"{sum(v) / len(v):,.0f}", f"{max(v):,.0f}")
            for k, v in sorted(groups.items(), key=lambda kv: -sum(kv[1]))[:12]
        ],
    )
    report.table(
        [
            "at s",
            "turn ms",
            "culprit",
            "call chain (project frames, then the leaf; % of the turn)",
            "top leaf frames, ms",
        ],
        [
            (
                f"{st['at']:.1f}",
                f"{st['ms']:,.0f}",
                f"`{st['culprit']}`",
                st["chain"] or "—",
                st["leaves"],
            )
            for st in sorted(stalls, key=lambda st: -st["ms"])[:12]
        ],
    )


# -- measuring ----------------------------------------------------------------------


class RssSampler:
    """The relay's process-group RSS, sampled on a thread every ``interval_s``."""

    def __init__(self, server: Server, interval_s: float = 0.1) -> None:
        self.server = server
        self.interval_s = interval_s
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.monotonic(), self.server.group_rss_kb()))
            self._stop.wait(self.interval_s)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def peak_kb(self, t0: float, t1: float) -> int:
        return max((kb for t, kb in self.samples if t0 <= t <= t1), default=0)


COUNTERS = (
    "limits_hit",
    "closed_over_limits",
    "updates_refused",
    "document_reads",
    "document_reads_in_worker",
    "refused",
    "updates_stored",
    "closed_slow",  # readers closed for their backlog (1013)
    "lingering",  # ... dropped, their sockets still open (ASGI servers cannot cut them)
)


def counter_deltas(before: dict[str, Any] | None, after: dict[str, Any] | None) -> dict[str, int]:
    if before is None or after is None:
        return {}
    return {k: int(after.get(k, 0)) - int(before.get(k, 0)) for k in COUNTERS}


async def measure(sc: Scenario, server: Server, workdir: Path, args: Any) -> dict[str, Any]:
    """Baseline, load, settle: the probe's latency, RSS, CPU and counters of one scenario."""
    sampler = RssSampler(server)
    sampler.start()
    probe = Probe(server.url, args.probe_rate, workdir)
    profiler = RelayProfiler(server.pid, workdir, args.profile_rate) if args.profile else None
    out: dict[str, Any] = {}
    try:
        await asyncio.to_thread(probe.start)
        async with asyncio.timeout(60):
            await sc.arrange(server.url, workdir)
        if profiler is not None:
            profiler.start()  # attached during the baseline: none of the load is missed
        await asyncio.sleep(0.5)
        t_idle = time.monotonic()
        await asyncio.sleep(args.idle_s)
        t_load = time.monotonic()
        out["rss_before_kb"] = server.group_rss_kb()
        out["rss_before_main_kb"] = server.rss_kb()
        health0 = await asyncio.to_thread(common.crdtsync_health, server)
        cpu0 = server.cpu_s()
        main_cpu0 = server.main_cpu_s()
        try:
            async with asyncio.timeout(sc.cap_s + 30):
                await sc.attack(server.url)
        except TimeoutError:
            sc.outcome.append(f"attack cut off after {sc.cap_s + 30:.0f} s")
        except Exception as exc:
            sc.outcome.append(f"attack failed: {exc!r}"[:200])
        t_end = time.monotonic()
        out["relay_cpu_pct"] = 100 * (server.cpu_s() - cpu0) / max(t_end - t_load, 1e-9)
        out["main_cpu_pct"] = 100 * (server.main_cpu_s() - main_cpu0) / max(t_end - t_load, 1e-9)
        out["load_s"] = t_end - t_load
        if profiler is not None:
            await asyncio.sleep(TAIL_S)
            out["profile"] = profile_of(profiler, await asyncio.to_thread(profiler.stop), t_load)
        await sc.finish()
        await asyncio.sleep(SETTLE_S)
        out["rss_after_kb"] = server.group_rss_kb()
        out["rss_after_main_kb"] = server.rss_kb()
        out["workers_after"] = len(common._group_pids(server.pid)) - 1
        out["rss_peak_kb"] = max(sampler.peak_kb(t_load, time.monotonic()), server.hwm_kb() or 0)
        out["counters"] = counter_deltas(
            health0, await asyncio.to_thread(common.crdtsync_health, server)
        )
        out["alive"] = server.alive()
    finally:
        if profiler is not None and "profile" not in out:
            await asyncio.to_thread(profiler.stop)
        with contextlib.suppress(Exception):
            await sc.finish()
        samples, probe_error = await asyncio.to_thread(probe.stop)
        sampler.stop()
    out["idle"] = latency(samples, t_idle, t_load)
    out["load"] = latency(samples, t_load, t_end + TAIL_S)
    out["probe_error"] = probe_error
    return out


def profile_of(
    profiler: RelayProfiler, events: list[dict[str, Any]], t_load: float
) -> dict[str, Any]:
    """The event loop's stalls from the load's start until now (monotonic times mapped
    onto py-spy's clock, which starts when it is spawned: within a few ms)."""
    if profiler.error or not events:
        return {"error": profiler.error or "no samples"}
    t0 = t_load - profiler.t_start
    t1 = time.monotonic() - profiler.t_start
    busy, stalls = loop_stalls(loop_timeline(events), t0, t1, STALL_MS)
    for st in stalls:
        st["at"] -= t0  # seconds from the load's start
    return {"rate": profiler.rate, "window_s": t1 - t0, "busy": busy, "stalls": stalls}


def run_scenario(sc: Scenario, args: Any) -> dict[str, Any]:
    """A fresh relay (and store) for one scenario; always stopped."""
    with tempfile.TemporaryDirectory(prefix="crdtsync-bench-hostile-") as tmp:
        workdir = Path(tmp)
        relay_args = sc.prepare(workdir / "relay.db")
        server = common.make_server(args.server, workdir, relay_args)
        try:
            server.start()
            result = asyncio.run(measure(sc, server, workdir, args))
            stderr = server.stderr(200_000)
            result["tracebacks"] = stderr.count("Traceback")
            return result
        finally:
            server.stop()


# -- the report -----------------------------------------------------------------------


def mb(kb: int | None) -> str | None:
    return None if kb is None else f"{kb / 1024:,.0f}"


def lat_cell(lat: dict[str, Any]) -> str:
    return " / ".join(fmt(lat.get(k), 1) or "—" for k in ("p50", "p99", "max"))


def p99_met(r: dict[str, Any]) -> bool:
    load = r["load"]
    return load["p99"] is not None and load["p99"] < TARGET_P99_MS and load["lost"] == 0


def write_report(report: Report, scenarios: list[Scenario], results: dict[str, Any]) -> None:
    rows, attacks = [], []
    for sc in scenarios:
        r = results[sc.key]
        if "error" in r:
            rows.append((sc.title, *[None] * 10, r["error"]))
            continue
        idle, load = r["idle"], r["load"]
        back = r["rss_after_main_kb"] - r["rss_before_main_kb"] <= RSS_BACK_MB * 1024
        notes = []
        if load["lost"]:
            notes.append(f"{load['lost']} probes lost")
        if r["probe_error"]:
            notes.append(r["probe_error"][:120])
        if r["workers_after"]:
            others = mb(r["rss_after_kb"] - r["rss_after_main_kb"])
            notes.append(f"{r['workers_after']} other process(es) in its group after: {others} MB")
        if r["tracebacks"]:
            notes.append(f"{r['tracebacks']} tracebacks in the relay's stderr")
        if not r["alive"]:
            notes.append("relay died")
        if r["busy"] >= 0.25:
            notes.append(f"machine {r['busy']:.0%} busy before")
        rows.append(
            (
                sc.title,
                f"{idle['n']} / {load['n']}",
                lat_cell(idle),
                lat_cell(load),
                "met" if p99_met(r) else "**NOT met**",
                f"{r['relay_cpu_pct']:.0f} % (main {r['main_cpu_pct']:.0f} %) of "
                f"{r['load_s']:.1f} s",
                f"{mb(r['rss_before_kb'])} / {mb(r['rss_peak_kb'])} / {mb(r['rss_after_kb'])}",
                "met" if r["rss_peak_kb"] < TARGET_RSS_MB * 1024 else "**NOT met**",
                f"{mb(r['rss_before_main_kb'])} -> {mb(r['rss_after_main_kb'])}",
                "yes" if back else "**no**",
                "; ".join(notes) or None,
            )
        )
        c = r["counters"]
        attacks.append((sc.title, "; ".join(sc.outcome) or None, *(c.get(k) for k in COUNTERS)))
    report.table(
        ["scenario", "probes idle / load", "idle p50 / p99 / max ms", "load p50 / p99 / max ms",
         f"p99 < {TARGET_P99_MS:.0f} ms", "relay CPU", "group RSS before / peak / after MB",
         f"peak < {TARGET_RSS_MB:.0f} MB", "relay process RSS before -> after MB",
         f"back (±{RSS_BACK_MB:.0f} MB)", "notes"],
        rows,
    )  # fmt: skip
    report.add("What the attacker saw, and the relay's counters during the scenario:", "")
    report.table(["scenario", "attacker", *COUNTERS], attacks)
    for sc in scenarios:
        if "profile" in results[sc.key]:
            profile_report(report, sc, results[sc.key]["profile"])
    measured = [sc for sc in scenarios if "error" not in results[sc.key]]
    slow = [sc.title for sc in measured if not p99_met(results[sc.key])]
    heavy = [sc.title for sc in measured if results[sc.key]["rss_peak_kb"] >= TARGET_RSS_MB * 1024]
    report.add(
        f"Target (another room's p99 under {TARGET_P99_MS:.0f} ms, no probe lost, in every "
        f"scenario): {'met' if not slow and measured else 'NOT met'}"
        + (f" ({', '.join(slow)})" if slow else "")
        + ".",
        f"Target (relay RSS under {TARGET_RSS_MB:.0f} MB): "
        f"{'met' if not heavy and measured else 'NOT met'}"
        + (f" ({', '.join(heavy)})" if heavy else "")
        + ".",
        "",
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--markdown-out", help="also write the report (Markdown) to this file")
    p.add_argument(
        "--json-out", help="also write each scenario's figures and outcome (JSON) to this file"
    )
    p.add_argument("--scale", type=float, default=1.0, help="multiply sizes and counts")
    p.add_argument(
        "--server",
        default="crdtsync",
        choices=["crdtsync", "crdtsync-asgi"],
        help="the relay as its own server, or mounted in FastAPI under uvicorn",
    )
    p.add_argument("--only", default=",".join(SCENARIOS), help="comma-separated scenarios")
    p.add_argument("--probe-rate", type=float, default=20.0, help="probes per second")
    p.add_argument("--idle-s", type=float, default=3.0, help="the idle baseline, seconds")
    p.add_argument(
        "--silent-peers",
        type=int,
        default=0,
        help="presence and silent scenarios: peers that never read (default: 1 x scale, "
        "16 x scale)",
    )
    p.add_argument(
        "--profile",
        action="store_true",
        help="attach py-spy to the relay and report its event loop's long turns (stalls)",
    )
    p.add_argument("--profile-rate", type=int, default=200, help="py-spy samples per second")
    p.add_argument(
        "--quiet-wait-s",
        type=float,
        default=10.0,
        help="wait up to this long for the machine to be idle before each scenario (0: don't)",
    )
    # the probe process itself (started by this script)
    p.add_argument("--probe-child", metavar="URL", help=argparse.SUPPRESS)
    p.add_argument("--probe-out", help=argparse.SUPPRESS)
    p.add_argument("--probe-max-s", type=float, default=600.0, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.probe_child:
        result = asyncio.run(probe_child(args.probe_child, args.probe_rate, args.probe_max_s))
        Path(args.probe_out).write_text(json.dumps(result))
        return 0
    keys = [k.strip() for k in args.only.split(",") if k.strip()]
    unknown = [k for k in keys if k not in SCENARIOS]
    if unknown:
        raise SystemExit(f"unknown scenario(s) {unknown}; choose from {', '.join(SCENARIOS)}")
    scenarios = [SCENARIOS[k](args.scale) for k in keys]
    for sc in scenarios:
        if isinstance(sc, PresenceFlood) and args.silent_peers > 0:
            sc.silent_peers = args.silent_peers
    report = Report(
        f"Hostile traffic in one room: another room's latency, relay memory (scale {args.scale:g})"
    )
    report.machine(busy=common.cpu_busy_fraction())
    report.add(
        "How: each scenario gets a fresh relay (`python -m crdtsync relay --host 127.0.0.1 "
        "--port 0 --store <tmp>`, default limits unless the scenario says otherwise). A "
        "probe process holds two stock "
        f"connections to another room: one sends a one-character pycrdt update "
        f"{args.probe_rate:g} times a second, the other receives it; latency is send -> "
        "receive on one monotonic clock. Idle: the probe alone for "
        f"{args.idle_s:g} s; load: probes sent from the scenario's start until {TAIL_S:g} s "
        "after its end. A probe lost is one never received. Relay CPU: user+system seconds "
        "of its process group over the load phase (main: the relay process alone; the rest "
        "is its compaction and read workers). Group RSS: the relay's process group "
        "(its worker processes and multiprocessing's resource tracker included) just before "
        "the load, its peak (sampled every 0.1 s, and the relay process's VmHWM), and "
        f'{SETTLE_S:g} s after the scenario ended; "back" compares the relay process '
        "alone (worker pools stay up by design). Counters: "
        "differences of `/healthz?verbose=1` over the scenario. The relay, the attacker "
        "(this process) and the probe share this machine's cores.",
        "",
    )
    for sc in scenarios:
        report.add(f"- {sc.title}: {sc.describe()}.")
    report.add("")
    if os.cpu_count() != 2:
        report.add(f"Note: the targets are stated for 2 cores; this machine has {os.cpu_count()}.")
    results: dict[str, Any] = {}
    for sc in scenarios:
        busy = common.wait_for_quiet(args.quiet_wait_s) if args.quiet_wait_s > 0 else 0.0
        print(f"... {sc.title}", file=sys.stderr, flush=True)
        t0 = time.monotonic()
        try:
            results[sc.key] = run_scenario(sc, args)
            results[sc.key]["busy"] = busy
        except Exception as exc:  # one scenario's failure is reported; the others still run
            results[sc.key] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
        print(f"    {time.monotonic() - t0:.0f} s", file=sys.stderr, flush=True)
    write_report(report, scenarios, results)
    report.write(args.markdown_out)
    if args.json_out:
        for sc in scenarios:
            results[sc.key]["outcome"] = sc.outcome
        Path(args.json_out).write_text(json.dumps(results, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
