"""FaultProxy: a websocket proxy between replicas and a relay that injects network faults.

Replicas connect to ``proxy.url + "/" + doc + "?query"``; the proxy opens the same path
and query on the upstream relay and pumps every websocket message both ways, one pipe
per direction (``up``: replica to relay, ``down``: relay to replica). Each websocket
message is one y-websocket message. The proxy labels messages with
:func:`crdtsync.protocol.decode_message` for its history, but always forwards the bytes
(or text) unchanged, including what it cannot decode and what is over any limit: the
relay, not the proxy, must refuse bad input. A close from either side is passed on
with its code and reason after the messages queued before it; a connection lost
without a close frame is passed on as a lost connection (``transport.abort()``). An
HTTP refusal of the upstream handshake (e.g. 503 "too many connections") is passed on
with its status and body; an unreachable upstream gives 502.

Faults (all take effect at once, in both directions of every link)::

    partition() / heal()       abort every link (TCP drop, no close frame) and refuse
                               new connections with HTTP 503 until heal()
    drop_connections()         abort every current link; new ones are accepted
    set_delay(s)               every message waits ``s`` seconds; per-link order kept
    set_duplicate(p)           a message is delivered twice with probability ``p``
    set_reorder(p, window)     a message is held with probability ``p`` and overtaken by
                               later ones; held messages are released in shuffled order
                               when ``window`` are held, after ``max_hold_s`` (50 ms) at
                               most, on clear_faults() / set_reorder(0), and before a close
    set_hold(kinds, direction) every message of these kinds (class names, e.g. ExtChannel)
                               in that direction is held, overtaken by all the others,
                               until clear_faults() or set_hold(()), or before a close;
                               lost with its link when the link is aborted (a scripted
                               reorder: what a reorder then a lost connection can do)
    clear_faults()             delay, duplicate, reorder and hold back to 0 (heal() is
                               separate)

Partition is done the "simpler and realistic" way: existing connections are aborted,
not held open while swallowing their messages. This is what a long partition looks
like to both ends once keepalive or a NAT timeout gives up on the connection, and it
keeps each live connection a faithful TCP stream.

Realism, in the spirit of websockets' own test fault injectors -- what each fault
stands for, and which uses would be unrealistic:

- Duplicating and reordering whole y-websocket messages is what an at-least-once
  transport that retries, a multi-path relay or a load balancer replaying after a
  failover does. Yjs updates are idempotent and commutative, and acknowledgements are
  keyed, so the system must converge anyway: this is the fault the suite is for.
- Reordering a connection's *opening* messages (the relay's extension hello, its step 1)
  has no counterpart on one websocket, which is an ordered TCP stream; a failure that
  needs it is a robustness finding, not a network that exists. ``set_reorder`` does not
  exempt them, so a test decides what it wants to show.
- Dropping single messages silently inside a live connection is NOT realistic: TCP
  retransmits or the connection dies. It is offered only as whole-link loss
  (:meth:`FaultProxy.partition`, :meth:`FaultProxy.drop_connections`, a queue overflow):
  then messages queued in the proxy are lost with the link (counted as ``dropped``), as
  they would be in kernel buffers, and both ends see the connection go.
- A delay is latency, not loss: it never reorders a link, and a larger delay than the
  peers' keepalive or open timeout will look like a dead link to them (the proxy does not
  ping; pings are per hop and not forwarded).
- Refusing connections with HTTP 503 is a relay that is reachable but unavailable (or a
  load balancer without backends); an unreachable host would time out or be refused by
  TCP instead. Both make the replica retry with backoff.

Determinism: every random decision is drawn from a per-direction generator created,
when a link opens, as ``type(rng)(rng.getrandbits(64))``: the same ``rng`` and the same
sequence of links and arrivals give the same duplicates, holds and shuffles (a scripted
``random.Random`` subclass keeps its behaviour in the children). Network timing, which
decides arrivals and the 50 ms hold bound, is not under the proxy's control.

Bounds: each direction queues at most ``max_queued`` messages (10,000); beyond that the
link is aborted and counted (``overflowed``). Every task the proxy starts is tracked and
cancelled by :meth:`FaultProxy.stop`, as is every timer.

History: ``on_event`` receives small dicts (event name, link, direction, sequence number,
message type name, byte count, close code and reason...), never payloads and never the
URL query (it may hold a token); write them as JSON lines to replay a failing run.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import random
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, Literal, TypeVar, cast

from websockets.asyncio.client import ClientConnection, connect
from websockets.asyncio.connection import Connection
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.frames import CloseCode
from websockets.http11 import Request, Response
from websockets.protocol import State
from websockets.typing import Origin

from crdtsync.errors import CrdtsyncError
from crdtsync.protocol import decode_message

__all__ = ["STAT_KEYS", "FaultProxy", "message_label"]

log = logging.getLogger("crdtsync.testing.proxy")

Direction = Literal["up", "down"]
EventSink = Callable[[dict[str, Any]], None]
T = TypeVar("T")

STAT_KEYS = (
    "connections",  # links opened (handshake accepted on both sides)
    "forwarded",  # messages delivered, duplicates included
    "dropped",  # messages lost because their link was aborted before delivery
    "duplicated",  # extra copies made
    "reordered",  # messages delivered after a later message of the same direction
    "delayed",  # messages that waited for a delay > 0
    "refused",  # connections refused with HTTP 503 (partition, stopping)
    "aborted",  # links aborted by the proxy (partition, drop_connections, overflow, stop)
    "overflowed",  # links aborted because a direction queued more than max_queued
    "closed",  # close frames passed on (code and reason kept)
    "lost",  # connection losses (no close frame) passed on
    "upstream_refused",  # upstream handshakes refused with an HTTP status, passed on
    "upstream_failed",  # upstream unreachable: 502
)

_HOP_HEADERS = ("Authorization", "Cookie")  # forwarded to the upstream handshake


def message_label(data: bytes | str) -> str:
    """The message class name of one websocket message, ``"text"`` or ``"malformed"``."""
    if isinstance(data, str):
        return "text"
    try:
        return type(decode_message(data)).__name__
    except CrdtsyncError:
        return "malformed"


@dataclass(frozen=True, slots=True)
class _Frame:
    seq: int  # arrival order in its direction
    data: bytes | str
    label: str


@dataclass(frozen=True, slots=True)
class _End:
    code: int | None  # None: the source was lost without a close frame
    reason: str


_Item = tuple[float, _Frame] | _End


class _Pipe:
    """One direction of one link: read ``src``, apply the faults, write ``dst`` in order."""

    def __init__(
        self,
        link: _Link,
        direction: Direction,
        src: Connection,
        dst: Connection,
        rng: random.Random,
    ) -> None:
        self.link = link
        self.proxy = link.proxy
        self.direction: Direction = direction
        self.src = src
        self.dst = dst
        self.rng = rng
        self.queue: asyncio.Queue[_Item] = asyncio.Queue()  # bounded by ``queued`` below
        self.queued = 0  # frames in ``queue``
        self.waiting = 0  # 1 while the writer waits out a delay for a frame it took
        self.held: list[_Frame] = []
        self.timer: asyncio.TimerHandle | None = None
        self.next_seq = 0
        self.max_emitted = -1
        self.dead = False

    def _fields(self, frame: _Frame) -> dict[str, Any]:
        size = len(frame.data.encode("utf-8") if isinstance(frame.data, str) else frame.data)
        return {
            "link": self.link.id,
            "direction": self.direction,
            "seq": frame.seq,
            "message": frame.label,
            "bytes": size,
        }

    # -- reading side -------------------------------------------------------------------

    async def read(self) -> None:
        try:
            async for data in self.src:
                self._arrive(data)
        except ConnectionClosed:
            pass
        if self.dead:
            return
        self.release()  # nothing held is lost on a close: it goes out before the close
        rcvd = self.src.protocol.close_rcvd
        self._put(_End(None, "") if rcvd is None else _End(int(rcvd.code), rcvd.reason))

    def _arrive(self, data: bytes | str) -> None:
        proxy = self.proxy
        frame = _Frame(self.next_seq, data, message_label(data))
        self.next_seq += 1
        copies = 1
        if proxy._duplicate > 0 and self.rng.random() < proxy._duplicate:
            copies = 2
            proxy._count("duplicated")
            proxy._event("duplicate", **self._fields(frame))
        for _ in range(copies):
            if frame.label in proxy._hold.get(self.direction, ()):
                self.held.append(frame)  # (no timer: until released)
                proxy._event("hold", **self._fields(frame))
            elif proxy._reorder > 0 and self.rng.random() < proxy._reorder:
                self._hold(frame)
            else:
                self._put(frame)

    def _hold(self, frame: _Frame) -> None:
        self.held.append(frame)
        self.proxy._event("hold", **self._fields(frame))
        if len(self.held) >= self.proxy._window:
            self.release()
        elif self.timer is None:
            loop = asyncio.get_running_loop()
            self.timer = loop.call_later(self.proxy.max_hold_s, self.release)

    def release(self) -> None:
        """Send every held message on, in shuffled order."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if not self.held:
            return
        held, self.held = self.held, []
        self.rng.shuffle(held)
        for frame in held:
            self._put(frame)

    def _put(self, item: _Frame | _End) -> None:
        proxy = self.proxy
        if self.dead:
            if isinstance(item, _Frame):
                proxy._count("dropped")
            return
        if isinstance(item, _End):
            self.queue.put_nowait(item)
            return
        if self.queued >= proxy.max_queued:
            proxy._count("overflowed")
            proxy._count("dropped")
            self.link.abort("overflow")
            return
        if item.seq < self.max_emitted:
            proxy._count("reordered")
            proxy._event("reorder", after=self.max_emitted, **self._fields(item))
        else:
            self.max_emitted = item.seq
        delay = proxy._delay
        if delay > 0:
            proxy._count("delayed")
        self.queued += 1
        self.queue.put_nowait((asyncio.get_running_loop().time() + delay, item))

    # -- writing side -------------------------------------------------------------------

    async def write(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            item = await self.queue.get()
            if isinstance(item, _End):
                await self._finish(item)
                return
            due, frame = item
            self.queued -= 1
            wait = due - loop.time()
            if wait > 0:
                self.waiting = 1  # lost with the link if it is aborted meanwhile
                await asyncio.sleep(wait)
                self.waiting = 0
            try:
                await self.dst.send(frame.data)
            except ConnectionClosed:
                # The other pipe sees the same closed connection and passes the close on.
                self.proxy._count("dropped", 1 + self.discard())
                return
            self.proxy._count("forwarded")
            self.proxy._event("forward", **self._fields(frame))

    async def _finish(self, end: _End) -> None:
        if self.dst.state is State.CLOSED:
            return
        fields = {"link": self.link.id, "direction": self.direction}
        if end.code is None:
            self.proxy._count("lost")
            self.proxy._event("lost", **fields)
            self.dst.transport.abort()
            return
        if self.dst.state is not State.OPEN:
            return  # already closing: its own handshake finishes it
        self.proxy._count("closed")
        self.proxy._event("close", code=end.code, reason=end.reason, **fields)
        if end.code == CloseCode.NO_STATUS_RCVD:
            # An empty close frame is passed on as an empty close frame: websockets sends
            # one for code None (1005 itself may not be sent).
            await self.dst.close(cast(int, None))
        else:
            await self.dst.close(end.code, end.reason)

    def discard(self) -> int:
        """Stop this pipe; return how many messages it still had (now lost)."""
        self.dead = True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        lost = self.queued + len(self.held) + self.waiting
        self.queued = self.waiting = 0
        self.held.clear()
        while not self.queue.empty():
            self.queue.get_nowait()
        return lost


class _Link:
    """One replica connection and its upstream connection, with a pipe each way."""

    def __init__(
        self, proxy: FaultProxy, link_id: int, client: ServerConnection, upstream: ClientConnection
    ) -> None:
        self.proxy = proxy
        self.id = link_id
        self.client = client
        self.upstream = upstream
        rng = proxy.rng
        self.pipes = (
            _Pipe(self, "up", client, upstream, type(rng)(rng.getrandbits(64))),
            _Pipe(self, "down", upstream, client, type(rng)(rng.getrandbits(64))),
        )
        self.tasks: list[asyncio.Task[None]] = []
        self.aborted = False
        self.finished = asyncio.Event()

    async def run(self) -> None:
        if self.aborted:
            return
        name = f"{self.proxy.name}:link{self.id}"
        for pipe in self.pipes:
            self.tasks.append(self.proxy._spawn(pipe.read(), f"{name}:{pipe.direction}:read"))
            self.tasks.append(self.proxy._spawn(pipe.write(), f"{name}:{pipe.direction}:write"))
        pending: set[asyncio.Task[None]] = set(self.tasks)
        try:
            while pending:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    if not task.cancelled() and task.exception() is not None:
                        log.error("bug in fault proxy link %d", self.id, exc_info=task.exception())
                        self.abort("error")
        finally:
            for task in self.tasks:
                task.cancel()

    def abort(self, cause: str) -> bool:
        """Drop both connections at once (no close frames); False if already aborted."""
        if self.aborted:
            return False
        self.aborted = True
        lost = sum(pipe.discard() for pipe in self.pipes)
        for ws in (self.client, self.upstream):
            ws.transport.abort()
        for task in self.tasks:
            task.cancel()
        self.proxy._count("aborted")
        self.proxy._count("dropped", lost)
        self.proxy._event("abort", link=self.id, cause=cause, dropped=lost)
        return True


class FaultProxy:
    """A y-websocket proxy on 127.0.0.1 that injects network faults (see the module doc).

    Args:
        upstream: ``ws://`` URL of the relay (no path); each connection goes to the same
            path and query there.
        rng: the source of every random decision (seeded by the caller for replay).
        name: shown in events and task names.
        on_event: receives one small dict per event, for a JSON-lines history.
        max_queued: messages one direction may queue before its link is aborted.
        max_hold_s: the longest a reordered message is held.
        open_timeout_s: limit for the upstream handshake.
        close_timeout_s: limit for a close handshake passed on, and for :meth:`stop`.
    """

    def __init__(
        self,
        upstream: str,
        *,
        rng: random.Random,
        name: str = "proxy",
        on_event: EventSink | None = None,
        max_queued: int = 10_000,
        max_hold_s: float = 0.05,
        open_timeout_s: float = 10.0,
        close_timeout_s: float = 5.0,
    ) -> None:
        if not upstream.startswith(("ws://", "wss://")):
            raise ValueError(f"upstream must be a ws:// or wss:// URL, not {upstream!r}")
        if max_queued < 1:
            raise ValueError("max_queued must be at least 1")
        if not 0 < max_hold_s <= 10:
            raise ValueError("max_hold_s must be in (0, 10]")
        self.upstream = upstream.rstrip("/")
        self.rng = rng
        self.name = name
        self.on_event = on_event
        self.max_queued = max_queued
        self.max_hold_s = max_hold_s
        self.open_timeout_s = open_timeout_s
        self.close_timeout_s = close_timeout_s
        self.stats: dict[str, int] = dict.fromkeys(STAT_KEYS, 0)
        self._server: Server | None = None
        self._port = 0  # kept after stop(): the URL then refuses connections
        self._links: dict[int, _Link] = {}
        self._link_ids = itertools.count(1)
        self._accepted: dict[ServerConnection, ClientConnection] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._partitioned = False
        self._stopping = False
        self._delay = 0.0
        self._duplicate = 0.0
        self._reorder = 0.0
        self._window = 4
        self._hold: dict[Direction, frozenset[str]] = {}

    # -- lifecycle ----------------------------------------------------------------------

    async def start(self) -> None:
        """Listen on 127.0.0.1, on a port the system picks (see :attr:`url`)."""
        if self._server is not None:
            raise RuntimeError("proxy already started")
        self._server = await serve(
            self._handle,
            "127.0.0.1",
            0,
            process_request=self._process_request,
            max_size=None,
            compression=None,
            ping_interval=None,  # pings are per hop; the ends ping each other through us
            open_timeout=self.open_timeout_s + 5,
            close_timeout=self.close_timeout_s,
        )
        self._port = int(next(iter(self._server.sockets)).getsockname()[1])
        self._event("start", url=self.url, upstream=self.upstream)

    @property
    def url(self) -> str:
        """``ws://127.0.0.1:PORT``: replicas use it as their relay URL."""
        if not self._port:
            raise RuntimeError("proxy not started")
        return f"ws://127.0.0.1:{self._port}"

    @property
    def links(self) -> int:
        """How many links (replica connection + upstream connection) are open."""
        return len(self._links)

    @property
    def partitioned(self) -> bool:
        return self._partitioned

    async def stop(self) -> None:
        """Stop listening, abort every link, cancel every task and timer; bounded."""
        if self._server is None or self._stopping:
            return
        self._stopping = True
        server = self._server
        server.close(close_connections=False)
        for link in list(self._links.values()):
            link.abort("stop")
        for upstream in self._accepted.values():
            upstream.transport.abort()
        for task in list(self._tasks):
            task.cancel()
        try:
            async with asyncio.timeout(self.close_timeout_s):
                await server.wait_closed()
                if self._tasks:
                    await asyncio.wait(list(self._tasks))
        except TimeoutError:
            log.error("fault proxy %s: stop() timed out; tasks left: %s", self.name, self._tasks)
        self._event("stop", **{k: v for k, v in self.stats.items() if v})

    async def __aenter__(self) -> FaultProxy:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- faults -------------------------------------------------------------------------

    def partition(self) -> None:
        """Abort every link and refuse new connections (HTTP 503) until :meth:`heal`."""
        self._partitioned = True
        self._event("fault", fault="partition")
        for link in list(self._links.values()):
            link.abort("partition")

    def heal(self) -> None:
        """Accept connections again (the faults set with ``set_*`` stay)."""
        self._partitioned = False
        self._event("fault", fault="heal")

    async def drop_connections(self) -> int:
        """Abort every current link on both sides (no close frames); return how many."""
        links = list(self._links.values())
        count = sum(link.abort("drop") for link in links)
        self._event("fault", fault="drop_connections", links=count)
        waits = [asyncio.ensure_future(link.finished.wait()) for link in links]
        if waits:
            _, pending = await asyncio.wait(waits, timeout=self.close_timeout_s)
            for waiter in pending:
                waiter.cancel()
        return count

    def set_delay(self, seconds: float) -> None:
        """Every message from now on waits ``seconds`` before delivery; order is kept."""
        if not (math.isfinite(seconds) and seconds >= 0):
            raise ValueError(f"delay must be a finite number >= 0, not {seconds!r}")
        self._delay = float(seconds)
        self._event("fault", fault="delay", seconds=self._delay)

    def set_duplicate(self, probability: float) -> None:
        """Each message is delivered twice with this probability."""
        self._duplicate = _probability(probability)
        self._event("fault", fault="duplicate", probability=self._duplicate)

    def set_reorder(self, probability: float, window: int = 4) -> None:
        """Hold each message with this probability; release held ones shuffled.

        Held messages go out when ``window`` of them are held in one direction, after
        ``max_hold_s`` at most, before a close, and when reordering is turned off.
        """
        if window < 2:
            raise ValueError(f"a reorder window needs at least 2 messages, not {window}")
        self._reorder = _probability(probability)
        self._window = window
        self._event("fault", fault="reorder", probability=self._reorder, window=window)
        if self._reorder == 0:
            self._release_all()

    def set_hold(self, kinds: Iterable[str], direction: Direction = "up") -> None:
        """Hold every message of these ``kinds`` (class names, as in the history)
        arriving in ``direction`` from now on, while the others go on: released by
        :meth:`clear_faults` or ``set_hold((), direction)``, and before a close; lost
        when their link is aborted (:meth:`drop_connections`, :meth:`partition`)."""
        self._hold[direction] = frozenset(kinds)
        self._event("fault", fault="hold", kinds=sorted(self._hold[direction]), to=direction)
        if not self._hold[direction]:
            self._release_all()

    def clear_faults(self) -> None:
        """No delay, duplication, reordering or holding; held messages are released now.

        Messages already waiting out a delay keep their time. :meth:`heal` is separate.
        """
        self._delay = self._duplicate = self._reorder = 0.0
        self._hold = {}
        self._event("fault", fault="clear")
        self._release_all()

    def _release_all(self) -> None:
        for link in list(self._links.values()):
            for pipe in link.pipes:
                if not pipe.dead:
                    pipe.release()

    # -- connections --------------------------------------------------------------------

    async def _process_request(self, conn: ServerConnection, request: Request) -> Response | None:
        # The upstream handshake happens before we answer ours: the relay's own HTTP
        # refusal (status and body) can then be passed on unchanged.
        path = request.path.partition("?")[0]
        if self._partitioned or self._stopping:
            return self._refuse(conn, path)
        task = self._spawn(self._connect_upstream(request), f"{self.name}:connect")
        try:
            await asyncio.wait([task])
        except asyncio.CancelledError:
            task.cancel()
            raise
        if task.cancelled():
            return self._refuse(conn, path)
        exc = task.exception()
        if isinstance(exc, InvalidStatus):
            got = exc.response
            self._count("upstream_refused")
            self._event("upstream_refused", path=path, status=got.status_code)
            body = bytes(got.body)
            headers = Headers(
                [
                    ("Connection", "close"),
                    ("Content-Length", str(len(body))),
                    ("Content-Type", got.headers.get("Content-Type", "text/plain")),
                ]
            )
            return Response(got.status_code, got.reason_phrase, headers, body)
        if exc is not None:
            self._count("upstream_failed")
            self._event("upstream_failed", path=path, error=type(exc).__name__)
            return conn.respond(HTTPStatus.BAD_GATEWAY, f"fault proxy: upstream: {exc}\n")
        upstream = task.result()
        if self._partitioned or self._stopping:
            upstream.transport.abort()
            return self._refuse(conn, path)
        self._accepted[conn] = upstream
        # If our own handshake fails from here on, the handler never runs: drop upstream.
        conn.connection_lost_waiter.add_done_callback(lambda _: self._orphan(conn))
        return None

    async def _connect_upstream(self, request: Request) -> ClientConnection:
        headers = [(k, v) for k in _HOP_HEADERS for v in request.headers.get_all(k)]
        origin = request.headers.get("Origin")
        return await connect(
            self.upstream + request.path,
            additional_headers=headers,
            origin=Origin(origin) if origin is not None else None,
            user_agent_header=request.headers.get("User-Agent"),
            max_size=None,
            compression=None,
            ping_interval=None,
            open_timeout=self.open_timeout_s,
            close_timeout=self.close_timeout_s,
        )

    def _refuse(self, conn: ServerConnection, path: str) -> Response:
        self._count("refused")
        reason = "stopping" if self._stopping else "partitioned"
        self._event("refuse", path=path, status=503, cause=reason)
        return conn.respond(HTTPStatus.SERVICE_UNAVAILABLE, f"fault proxy: {reason}\n")

    def _orphan(self, conn: ServerConnection) -> None:
        upstream = self._accepted.pop(conn, None)
        if upstream is not None:
            upstream.transport.abort()

    async def _handle(self, client: ServerConnection) -> None:
        upstream = self._accepted.pop(client, None)
        if upstream is None:  # not ours to serve (cannot happen after _process_request)
            client.transport.abort()
            return
        path = client.request.path.partition("?")[0] if client.request else ""
        if self._partitioned or self._stopping:
            # Partitioned between the two handshakes: the link never comes up.
            self._count("refused")
            self._event("refuse", path=path, status=None, cause="partitioned")
            upstream.transport.abort()
            client.transport.abort()
            return
        link = _Link(self, next(self._link_ids), client, upstream)
        self._links[link.id] = link
        self._count("connections")
        self._event("connect", link=link.id, path=path)
        try:
            await link.run()
        finally:
            self._links.pop(link.id, None)
            link.finished.set()
            self._event("disconnect", link=link.id)

    # -- bookkeeping --------------------------------------------------------------------

    def _spawn(self, coro: Coroutine[Any, Any, T], name: str) -> asyncio.Task[T]:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _count(self, key: str, n: int = 1) -> None:
        self.stats[key] += n

    def _event(self, event: str, **fields: Any) -> None:
        if self.on_event is None:
            return
        try:
            self.on_event({"event": event, "proxy": self.name, **fields})
        except Exception:
            # A broken history writer must not break the network under test.
            log.exception("on_event callback of fault proxy %s failed", self.name)


def _probability(p: float) -> float:
    if not 0 <= p <= 1:
        raise ValueError(f"a probability must be in [0, 1], not {p!r}")
    return float(p)
