"""A relay told to stop, and a relay whose disk is full, with real processes and replicas.

SIGTERM must end the relay (exit status 0) whatever it is doing, after it stored what it
acknowledged and told its peers it is going away (1001). A full disk must refuse writes
with 1013, acknowledge nothing it did not store, keep serving reads, and take every
pending edit once space is back.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import eventually, timeout_s
from pycrdt import Doc, Map, Text
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake

from crdtsync.client import Backoff, Replica
from crdtsync.protocol import SyncStep1, SyncStep2, SyncUpdate, decode_message
from crdtsync.store import UpdateLog

pytestmark = pytest.mark.anyio

ROOM = "busy/room"
BIG = "big/doc"
OTHER = "other/room"
BIG_PIECES = 40
BIG_PIECE_CHARS = 256 * 1024  # 40 x 256 KiB: a 10 MiB document, read in the relay's worker
EXIT_BOUND_S = 30.0  # "did it exit at all": the drain takes seconds, never this long


# -- what the store holds, read through another door ------------------------------------


def stored_doc(path: Path, name: str) -> Doc[Any]:
    """Document ``name`` as stored in a relay's SQLite file, read by a fresh UpdateLog."""
    with UpdateLog(path) as log:
        updates = log.load(name).all_updates()
    doc: Doc[Any] = Doc()
    with doc.transaction():
        for update in updates:
            doc.apply_update(update)
    return doc


def stored_marks(path: Path, name: str) -> dict[str, Any]:
    return dict(stored_doc(path, name).get("marks", type=Map).to_py())


def store_big_document(path: Path) -> str:
    """Write a 10 MiB document into a fresh store before the relay starts; its text."""
    writer: Doc[Any] = Doc()
    updates: list[bytes] = []
    writer.observe(lambda event: updates.append(event.update))
    text = writer.get("text", type=Text)
    for i in range(BIG_PIECES):
        text += chr(ord("a") + i % 26) * BIG_PIECE_CHARS
    with UpdateLog(path) as log:
        log.append_many([(BIG, u) for u in updates])
    return str(text)


# -- replicas under watch -----------------------------------------------------------------


class ErrorWatch:
    """Every distinct ``status().last_error`` of some open documents, polled every 5 ms.

    A close code is visible only until the replica reconnects (or fails to), so it is
    sampled continuously rather than read once at the end.
    """

    def __init__(self, replicas: dict[str, tuple[Replica, str]]) -> None:
        self.replicas = replicas
        self.seen: dict[str, list[str]] = {who: [] for who in replicas}
        self._last: dict[str, str | None] = {who: None for who in replicas}
        self._task: asyncio.Task[None] | None = None

    def _sample(self) -> None:
        for who, (replica, name) in self.replicas.items():
            with contextlib.suppress(KeyError, RuntimeError):
                error = replica.status(name).last_error
                if error != self._last[who] and error is not None:
                    self.seen[who].append(error)  # each time it is set, repeats included
                self._last[who] = error

    async def _run(self) -> None:
        for _ in range(200_000):  # bounded: 1000 s of polling, far past any test
            self._sample()
            await asyncio.sleep(0.005)

    def closes(self, who: str, code: int) -> list[str]:
        self._sample()
        # (a document's own connection, or its channel on the replica's connection)
        prefixes = (f"relay closed the connection: {code}", f"relay closed the document: {code}")
        return [e for e in self.seen[who] if e.startswith(prefixes)]

    async def __aenter__(self) -> ErrorWatch:
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


class Writer:
    """A replica making one transaction per edit: ``marks[<prefix>-<i>] = <value>``."""

    def __init__(self, replica: Replica, name: str, prefix: str) -> None:
        self.replica = replica
        self.name = name
        self.prefix = prefix
        self.keys: list[str] = []  # in the order made (the order of the local log)
        self.marks: Map | None = None

    async def open(self) -> None:
        doc = await self.replica.open(self.name)
        self.marks = doc.get("marks", type=Map)

    def edit(self, value: Any) -> str:
        assert self.marks is not None
        key = f"{self.prefix}-{len(self.keys)}"
        self.marks[key] = value
        self.keys.append(key)
        return key

    def confirmed(self) -> list[str]:
        """The edits the relay acknowledged: replicas confirm in order, so a prefix."""
        return self.keys[: len(self.keys) - self.replica.pending(self.name)]

    async def stream(self, stop: asyncio.Event, count: int, value_chars: int) -> None:
        for i in range(count):
            if stop.is_set():
                return
            self.edit(f"{self.prefix}:{i}:" + "v" * value_chars)
            await asyncio.sleep(0.003)


class Joiners:
    """Stock clients joining the big document again and again, each in its own task.

    ``joining`` holds the ones waiting for the relay to read the document now (the relay
    sends nothing before that read); ``closes`` the close codes of the joins the relay
    ended.
    """

    def __init__(self, url: str, stop: asyncio.Event, n: int) -> None:
        self.joining: set[int] = set()
        self.joins = [0] * n
        self.closes: list[int] = []
        self.tasks = [asyncio.create_task(self._join(url, stop, i)) for i in range(n)]

    async def _join(self, url: str, stop: asyncio.Event, i: int) -> None:
        for _ in range(50):
            if stop.is_set():
                return
            try:
                async with (
                    asyncio.timeout(timeout_s(30)),
                    connect(f"{url}/{BIG}", max_size=2**27) as ws,
                ):
                    await ws.send(SyncStep1(b"\x00").encode())
                    self.joining.add(i)  # until the relay read the document: its first message
                    msg = decode_message(await ws.recv())  # type: ignore[arg-type]
                    self.joining.discard(i)
                    while not isinstance(msg, SyncStep2):
                        msg = decode_message(await ws.recv())  # type: ignore[arg-type]
                self.joins[i] += 1
            except ConnectionClosed as exc:
                self.closes.append(exc.rcvd.code if exc.rcvd is not None else 1006)
                return  # the relay went away: that is the point
            except (OSError, InvalidHandshake):
                return  # ... and refuses (503) or no longer listens
            finally:
                self.joining.discard(i)


async def stock_listener(url: str, name: str) -> tuple[int, str]:
    """A stock client that syncs ``name`` and reads until the relay closes; code, reason."""
    async with asyncio.timeout(timeout_s(120)), connect(f"{url}/{name}", max_size=2**27) as ws:
        await ws.send(SyncStep1(b"\x00").encode())
        try:
            for _ in range(10_000_000):
                await ws.recv()
        except ConnectionClosed as exc:
            if exc.rcvd is None:
                return 1006, "(no close frame)"
            return exc.rcvd.code, exc.rcvd.reason
    raise AssertionError("the relay never closed the stock listener")


# -- a peer that never reads --------------------------------------------------------------


def masked_frame(payload: bytes) -> bytes:
    """One binary websocket frame as a client must send it (masked)."""
    mask = os.urandom(4)
    n = len(payload)
    if n < 126:
        head = bytes([0x82, 0x80 | n])
    elif n < 1 << 16:
        head = bytes([0x82, 0x80 | 126]) + n.to_bytes(2, "big")
    else:
        head = bytes([0x82, 0x80 | 127]) + n.to_bytes(8, "big")
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


async def never_reading_peer(url: str, path: str, first: bytes) -> socket.socket:
    """A websocket client that completes the handshake, sends ``first``, and never reads."""
    host, port = url.removeprefix("ws://").rsplit(":", 1)
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a small window: fills fast
    sock.setblocking(False)
    try:
        async with asyncio.timeout(timeout_s(10)):
            await loop.sock_connect(sock, (host, int(port)))
            key = base64.b64encode(os.urandom(16)).decode()
            request = (
                f"GET /{path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                "Sec-WebSocket-Version: 13\r\n\r\n"
            )
            await loop.sock_sendall(sock, request.encode())
            head = b""
            while not head.endswith(b"\r\n\r\n") and len(head) < 4096:
                byte = await loop.sock_recv(sock, 1)  # the response head only, nothing more
                if not byte:
                    break
                head += byte
            assert head.startswith(b"HTTP/1.1 101"), head
            await loop.sock_sendall(sock, masked_frame(first))
    except BaseException:
        sock.close()
        raise
    return sock


def relay_send_queue(relay_port: int, peer_port: int) -> int | None:
    """Bytes the kernel holds unsent on the relay's end of one loopback connection."""
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote, queues = fields[1], fields[2], fields[4]
        if int(local.split(":")[1], 16) == relay_port and int(remote.split(":")[1], 16) == (
            peer_port
        ):
            return int(queues.split(":")[0], 16)
    return None


async def wait_exit(proc: subprocess.Popen[bytes], bound_s: float) -> int | None:
    """The exit status, or None if the process is still running after ``bound_s``."""
    try:
        return await asyncio.to_thread(proc.wait, bound_s)
    except subprocess.TimeoutExpired:
        return None


# -- 1. SIGTERM -------------------------------------------------------------------------


async def _sigterm_under_load(
    relay: Any, tmp_path: Path, non_reader_for_s: float | None = None
) -> None:
    """Writers streaming, stock clients joining a 10 MiB document, then SIGTERM.

    With ``non_reader_for_s``, a peer that asked for the 10 MiB document and never reads
    has been connected that long when the writers start.
    """
    backoff = lambda: Backoff(0.2, 1.0)  # noqa: E731
    stop = asyncio.Event()
    replicas = [Replica(tmp_path / f"w{i}.db", relay=relay.url, backoff=backoff) for i in range(3)]
    non_reader: socket.socket | None = None
    async with contextlib.AsyncExitStack() as stack:
        for replica in replicas:
            await stack.enter_async_context(replica)
        writers = [Writer(r, ROOM, f"w{i}") for i, r in enumerate(replicas)]
        for w in writers:
            await w.open()
        watch = await stack.enter_async_context(
            ErrorWatch({w.prefix: (w.replica, ROOM) for w in writers})
        )
        streams: list[asyncio.Task[None]] = []
        joiners: Joiners | None = None
        listener: asyncio.Task[tuple[int, str]] | None = None
        try:
            if non_reader_for_s is not None:
                connected_at = time.monotonic()
                non_reader = await never_reading_peer(relay.url, BIG, SyncStep1(b"\x00").encode())
                peer_port = non_reader.getsockname()[1]
                # The premise: the relay holds more for it than the kernel takes (the
                # 10 MiB answer is well over the 4 MiB loopback buffers), so its own
                # buffer is full and its sends to this peer wait.
                await eventually(
                    lambda: (relay_send_queue(relay.port, peer_port) or 0) > 1_000_000,
                    timeout=20,
                    what="the relay's kernel send buffer to the non-reader to fill",
                )
                # A stuck client stays a while: past the relay's 20 s keepalive ping, which
                # is queued behind the unsent answer. (A wait on the relay's own clock:
                # nothing to poll.)
                await asyncio.sleep(max(0.0, connected_at + non_reader_for_s - time.monotonic()))
                assert (relay_send_queue(relay.port, peer_port) or 0) > 1_000_000
            listener = asyncio.create_task(stock_listener(relay.url, ROOM))
            streams = [asyncio.create_task(w.stream(stop, 3000, 2000)) for w in writers]
            joiners = Joiners(relay.url, stop, 3)
            # Every writer has had edits acknowledged, every joiner joined once, and one
            # is waiting for the relay to read the 10 MiB document again (in its worker).
            await eventually(
                lambda: (
                    all(len(w.confirmed()) >= 20 for w in writers)
                    and all(joiners.joins)
                    and joiners.joining
                ),
                timeout=60,
                what="20 acknowledged edits per writer and a join under way",
            )
            assert relay.proc is not None
            os.kill(relay.proc.pid, signal.SIGTERM)  # the relay process, as a container stop
            status = await wait_exit(relay.proc, timeout_s(EXIT_BOUND_S))
            assert status is not None, (
                f"relay still running {timeout_s(EXIT_BOUND_S)} s after SIGTERM; "
                f"stderr: {relay.stderr()}"
            )
            assert relay.terminate() == status == 0, relay.stderr()  # (closes its pipes)
        finally:
            stop.set()
            await asyncio.gather(*streams, *(joiners.tasks if joiners else ()))
            if listener is not None and not listener.done():
                listener.cancel()
            if non_reader is not None:
                non_reader.close()
        made = {w.prefix: len(w.keys) for w in writers}
        confirmed = {w.prefix: w.confirmed() for w in writers}
        assert all(len(c) >= 20 for c in confirmed.values())

        # Every acknowledged edit is in the store (read from the file, the relay gone).
        marks = stored_marks(relay.store, ROOM)
        for w in writers:
            missing = [k for k in confirmed[w.prefix] if k not in marks]
            assert missing == [], f"{w.prefix}: acknowledged edits missing from the store"

        # Stock clients were told the relay is going away: the one listening in the
        # writers' room, and the joiners it interrupted.
        assert listener is not None
        assert await listener == (1001, "relay shutting down")
        assert joiners is not None
        # (A join whose read finished just before the signal completes, or is refused
        # with 503 when it comes back: both fine. Any close but 1001 is not.)
        assert set(joiners.closes) <= {1001}, joiners.closes
        # A replica ends a connection closed with 1000/1001 cleanly (websockets treats
        # both as a normal close) and keeps no error for it: no other close, no lost
        # connection, was seen by any of them.
        for w in writers:
            assert [e for e in watch.seen[w.prefix] if not e.startswith("cannot connect")] == []
            assert not w.replica.status(ROOM).connected
        assert "Traceback" not in relay.stderr(), relay.stderr()

        # And nothing is lost once a relay runs again on that store: the replicas
        # reconnect and deliver the rest; a fresh replica reads every edit.
        relay.start()
        for w in writers:
            await w.replica.wait_synced(ROOM, timeout=timeout_s(30))
    async with Replica(tmp_path / "fresh.db", relay=relay.url) as fresh:
        doc = await fresh.open(ROOM)
        total = sum(made.values())
        await eventually(
            lambda: len(doc.get("marks", type=Map)) == total, timeout=30, what=f"{total} marks"
        )
        assert sorted(doc.get("marks", type=Map).keys()) == sorted(
            k for w in writers for k in w.keys
        )


@pytest.mark.slow
async def test_sigterm_under_load_exits_0_keeps_acknowledged_edits_and_says_1001(
    relay_factory, tmp_path
):
    expected = store_big_document(tmp_path / "relay.db")
    relay = relay_factory("relay.db", "--compact-after-updates", "1000000")
    async with asyncio.timeout(timeout_s(10)), connect(f"{relay.url}/{BIG}", max_size=2**27) as ws:
        await ws.send(SyncStep1(b"\x00").encode())
        doc: Doc[Any] = Doc()
        while True:  # the premise: the big document is there, as written
            msg = decode_message(await ws.recv())  # type: ignore[arg-type]
            if isinstance(msg, (SyncUpdate, SyncStep2)):
                doc.apply_update(msg.update)
            if isinstance(msg, SyncStep2):
                break
        assert str(doc.get("text", type=Text)) == expected
    await _sigterm_under_load(relay, tmp_path)


@pytest.mark.long  # in .ci/run's longer set: the default suite stays under 10 minutes
@pytest.mark.slow
async def test_sigterm_exits_with_a_peer_that_stopped_reading_before_the_keepalive_ping(
    relay_factory, tmp_path
):
    store_big_document(tmp_path / "relay.db")
    relay = relay_factory("relay.db", "--compact-after-updates", "1000000")
    await _sigterm_under_load(relay, tmp_path, non_reader_for_s=25.0)


# -- 2. a full disk -----------------------------------------------------------------------


@contextlib.contextmanager
def small_tmpfs(path: Path, size: str) -> Iterator[None]:
    """A tmpfs of ``size`` mounted at ``path`` (root only), unmounted afterwards."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small tmpfs needs root and mount(8)")
    path.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield
    finally:
        if subprocess.run(["umount", str(path)], capture_output=True, check=False).returncode:
            subprocess.run(["umount", "-l", str(path)], capture_output=True, check=False)


def resize_tmpfs(path: Path, size: str) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size}", str(path)], check=True)


async def test_full_disk_refuses_writes_with_1013_and_loses_nothing(relay_factory, tmp_path):
    disk = tmp_path / "disk"
    with small_tmpfs(disk, "2m"):
        relay = relay_factory("disk/relay.db")
        try:
            await _full_disk(relay, disk, tmp_path)
        finally:
            relay.terminate()  # before the unmount: it holds the store open


async def _full_disk(relay: Any, disk: Path, tmp_path: Path) -> None:
    backoff = lambda: Backoff(0.05, 0.5)  # noqa: E731
    big_value = "x" * (128 * 1024)  # 16 of these are the whole disk
    async with (
        Replica(tmp_path / "seed.db", relay=relay.url, backoff=backoff) as seed,
        Replica(tmp_path / "a.db", relay=relay.url, backoff=backoff) as a,
        Replica(tmp_path / "b.db", relay=relay.url, backoff=backoff) as b,
    ):
        # Another room, stored while there was space; its replica stays connected.
        seed_doc = await seed.open(OTHER)
        seed_doc.get("text", type=Text).insert(0, "stored before the disk filled")
        await seed.wait_synced(OTHER, timeout=timeout_s(10))

        writer = Writer(a, ROOM, "a")
        await writer.open()
        doc_b = await b.open(ROOM)
        marks_b = doc_b.get("marks", type=Map)
        await eventually(lambda: b.status(ROOM).synced, what="B synced")

        async with ErrorWatch({"a": (a, ROOM), "seed": (seed, OTHER)}) as watch:
            # Fill the disk: 128 KiB edits, each waited for, until the relay says 1013.
            for _ in range(64):  # 8 MiB at most: four times the disk
                writer.edit(big_value)
                await eventually(
                    lambda: a.pending(ROOM) == 0 or watch.closes("a", 1013),
                    timeout=15,
                    what="the edit acknowledged or refused with 1013",
                )
                if watch.closes("a", 1013):
                    break
            full_closes = watch.closes("a", 1013)
            assert full_closes, f"the disk never filled; A saw {watch.seen['a']}"
            assert all(
                c.split(": 1013 ", 1)[1].startswith("store unavailable: store ")
                for c in full_closes
            ), full_closes
            assert "database or disk is full" in relay.stderr(), relay.stderr()
            stored_before = writer.confirmed()
            assert len(stored_before) >= 3  # the premise: some edits fit before it filled
            # Edits made while the disk is full: small ones too.
            for i in range(3):
                writer.edit(i)

            # While full (3 s, sampled): nothing unstored is acknowledged or fanned out,
            # and the edits stay pending at A.
            for _ in range(30):
                seen_by_b = set(marks_b.keys())
                confirmed = writer.confirmed()
                marks = stored_marks(relay.store, ROOM)
                assert seen_by_b <= set(marks), "B got content the relay did not store"
                assert [k for k in confirmed if k not in marks] == [], "acknowledged, not stored"
                await asyncio.sleep(0.1)
            pending = a.status(ROOM).pending
            assert pending >= 4, a.status(ROOM)  # the edit that filled the disk, and 3 more
            assert [k for k in writer.keys[-pending:] if k in marks_b] == []
            # (Its retry comes after its backoff: waited for, not sampled, so that a
            # loaded machine's slower reconnect does not count as none.)
            await eventually(
                lambda: (
                    len(watch.closes("a", 1013)) > len(full_closes) or not a.status(ROOM).connected
                ),
                timeout=15,
                what="A retried (and was refused again), or stayed offline",
            )

            # Reads in another room still work: a stock client, and a fresh replica.
            async with (
                asyncio.timeout(timeout_s(10)),
                connect(f"{relay.url}/{OTHER}") as ws,
            ):
                await ws.send(SyncStep1(b"\x00").encode())
                reader: Doc[Any] = Doc()
                while True:
                    msg = decode_message(await ws.recv())  # type: ignore[arg-type]
                    if isinstance(msg, (SyncUpdate, SyncStep2)):
                        reader.apply_update(msg.update)
                    if isinstance(msg, SyncStep2):
                        break
            assert str(reader.get("text", type=Text)) == "stored before the disk filled"
            async with Replica(tmp_path / "c.db", relay=relay.url, backoff=backoff) as c:
                doc_c = await c.open(OTHER)
                await eventually(
                    lambda: str(doc_c.get("text", type=Text)) == "stored before the disk filled",
                    what="a fresh replica reads the other room",
                )
            # The replica that only reads the other room was never disconnected.
            assert seed.status(OTHER).connected
            assert watch.seen["seed"] == [], watch.seen["seed"]
            assert a.status(ROOM).pending == pending  # still nothing acknowledged

            # Space is back: every pending edit is stored and reaches B.
            resize_tmpfs(disk, "64m")
            await a.wait_synced(ROOM, timeout=timeout_s(30))
            assert a.status(ROOM).pending == 0
            expected = writer.marks.to_py() if writer.marks is not None else {}
            assert sorted(expected) == sorted(writer.keys)
            await eventually(
                lambda: marks_b.to_py() == expected, timeout=20, what="B holds every edit of A"
            )
            assert stored_marks(relay.store, ROOM) == expected
        # and a write in the other room works again too
        seed_doc.get("text", type=Text).insert(0, "after: ")
        await seed.wait_synced(OTHER, timeout=timeout_s(10))
    # Through another door once more: the file, read after the relay stopped.
    assert relay.terminate() == 0
    assert stored_marks(relay.store, ROOM) == expected
    assert str(stored_doc(relay.store, OTHER).get("text", type=Text)) == (
        "after: stored before the disk filled"
    )
