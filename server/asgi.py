"""The relay as an ASGI application, to mount in a Starlette or FastAPI app.

``RelayApp`` serves the same :class:`~crdtsync.server.relay.Relay` as ``crdtsync relay``
does (its handshake rules, sessions, store and fan-out); only the socket differs: an ASGI
server's websocket (uvicorn, hypercorn...) instead of the relay's own. What the relay serves
at ``/doc`` it serves at ``<mount>/doc``; ``/healthz``, ``/readyz`` and ``/metrics`` too.

Starlette runs the lifespan of the application it serves, never of a mounted one: the
parent app runs the relay's (``FastAPI(lifespan=relay_app.lifespan)``, or ``async with
relay_app.lifespan():`` inside its own). Until then, connections get 503.

What an ASGI server does not let the relay see or do, and how the rules are kept:

- *Write buffer.* ASGI has no write-buffer size. Every frame to an ASGI connection goes
  through the relay's queue for it, sent by one task that awaits the server's ``send``
  (uvicorn waits while its transport is over its high-water mark): the queue is the
  connection's backlog, under the same slow-reader rule (``max_write_buffer_bytes``,
  ``slow_reader_grace_s``) and relay-wide budget. What the server itself buffers (its
  high-water mark and one frame at most) is not counted.
- *Abort.* ASGI cannot cut a connection. A reader too slow to take even its close frame is
  dropped by the relay (its queue freed, its room left); uvicorn closes the socket
  gracefully, so it stays, with what uvicorn buffered for it, until the client reads or
  goes: until then the relay counts it (``Relay.lingering``) under its connection limits.
- *Message size, read-ahead and shutdown* are the server's settings: run it with the
  relay's limits (:meth:`RelayApp.uvicorn_options`; ``--ws-max-size``, ``--ws-max-queue``,
  ``--timeout-graceful-shutdown``). A message over ``max_message_bytes`` that the server
  let through is refused here (1009).
- *Fragments.* ASGI sends whole messages: a large frame is joined before it is sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import http
import uuid
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterable
from typing import Any

from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosedError, ConnectionClosedOK
from websockets.frames import Close
from websockets.http11 import Request, Response
from websockets.typing import Data, DataLike, StatusLike

from crdtsync.errors import CloseCode
from crdtsync.settings import RelaySettings

from .relay import Authorizer, Relay, RevocationCheck

__all__ = ["AsgiRequest", "AsgiWebSocket", "RelayApp", "create_app", "deny"]

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

NO_STATUS = 1005  # a disconnect that names no close code (RFC 6455 7.1.5)
_ABORTED = "crdtsync: connection dropped by the relay"  # the cancel message of an abort
_DENIAL = "websocket.http.response"  # the ASGI extension for an HTTP answer to a handshake


class AsgiRequest(Request):
    """websockets' ``Request`` (what ``authorize`` hooks get) with the ASGI ``scope``:
    an app's authentication in front of the mount can leave its user there
    (``request.scope["user"]``, ``request.scope["state"]``)."""

    scope: Scope

    @classmethod
    def of(cls, scope: Scope) -> AsgiRequest:
        """The request as the relay sees it: its path under the mount, raw (not
        URL-decoded: a document's name is its path as sent, as y-websocket's server
        has it), with the query."""
        route = _route_path(scope)
        query = scope.get("query_string", b"").decode("latin-1")
        headers = Headers(
            (name.decode("latin-1"), value.decode("latin-1"))
            for name, value in scope.get("headers", ())
        )
        request = cls(route + ("?" + query if query else ""), headers)
        request.scope = scope
        return request


def _route_path(scope: Scope) -> str:
    """The raw request path below the mount point (``root_path``), never empty."""
    root = scope.get("root_path", "") or ""
    raw = scope.get("raw_path")
    path: str = raw.decode("latin-1") if raw is not None else scope["path"]
    # Starlette's mounts keep the full path and set root_path (ASGI's convention); some
    # servers strip it from path already. A raw path starts with the mount's prefix as
    # sent; a prefix that needed encoding is compared decoded.
    if root and path.startswith(root):
        path = path[len(root) :]
    elif root and raw is not None and scope["path"].startswith(root):
        path = _strip_decoded_prefix(path, len(root.split("/")) - 1)
    return path if path.startswith("/") else "/" + path


def _strip_decoded_prefix(raw: str, segments: int) -> str:
    """``raw`` without its first ``segments`` path segments."""
    parts = raw.split("/")
    return "/" + "/".join(parts[segments + 1 :])


def _respond(status: StatusLike, text: str) -> Response:
    """A plain-text HTTP response, as websockets' server makes them."""
    status = http.HTTPStatus(status)
    body = text.encode()
    headers = Headers(
        [
            ("Date", email.utils.formatdate(usegmt=True)),
            ("Connection", "close"),
            ("Content-Length", str(len(body))),
            ("Content-Type", "text/plain; charset=utf-8"),
        ]
    )
    return Response(status.value, status.phrase, headers, body)


def _asgi_headers(headers: Headers) -> list[tuple[bytes, bytes]]:
    return [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.raw_items()]


class _Sending:
    """The ASGI connection as the relay's transport: the part that a backlog, a closing
    state and an abort are asked of (``crdtsync.server.relay.Transport``)."""

    __slots__ = ("_ws",)

    def __init__(self, ws: AsgiWebSocket) -> None:
        self._ws = ws

    def get_write_buffer_size(self) -> int:
        # What waits is in the relay's queue (Wire.outbox); the server's own buffer is
        # not visible through ASGI.
        return 0

    def is_closing(self) -> bool:
        return self._ws.dropped

    def abort(self) -> None:
        self._ws.abort()


class AsgiWebSocket:
    """An accepted ASGI websocket as the relay serves it (``crdtsync.server.relay.Socket``).

    ``send`` and ``close`` wait for the server's ``send``; iterating yields each message
    until the client disconnects or the connection is closed here. :meth:`abort` ends
    both at once (what a transport's abort does for the standalone relay).
    """

    def __init__(
        self, scope: Scope, receive: Receive, send: Send, request: Request, max_size: int
    ) -> None:
        self.id = uuid.uuid4()
        self.request: Request | None = request
        self._scope = scope
        self._receive = receive
        self._send = send
        self._max_size = max_size
        self._close_code: int | None = None
        self._close_reason: str | None = None
        self._close_sent = False
        self.dropped = False  # aborted, or the client is gone: nothing more goes out
        self.aborted = False  # dropped by the relay, not (yet) reported gone by the server
        self._waiting: set[asyncio.Task[Any]] = set()  # tasks inside the server's calls
        self.transport = _Sending(self)

    @property
    def remote_address(self) -> Any:
        client = self._scope.get("client")
        return tuple(client) if client else None

    @property
    def close_code(self) -> int | None:
        """The close code sent or received; None while open."""
        return self._close_code

    @property
    def close_reason(self) -> str | None:
        return self._close_reason

    def respond(self, status: StatusLike, text: str) -> Response:
        """A plain-text HTTP response (to refuse a handshake)."""
        return _respond(status, text)

    def _closed_error(self) -> ConnectionClosedError | ConnectionClosedOK:
        code = self._close_code if self._close_code is not None else CloseCode.ABNORMAL
        frame = Close(code, self._close_reason or "")
        if code in (CloseCode.NORMAL, CloseCode.GOING_AWAY):
            return ConnectionClosedOK(frame, None)
        return ConnectionClosedError(frame, None)

    async def _call(self, work: Awaitable[Message | None]) -> Message | None:
        """Await the server, unless :meth:`abort` ends the wait (ConnectionClosedError)."""
        task = asyncio.current_task()
        assert task is not None
        self._waiting.add(task)
        try:
            return await work
        except asyncio.CancelledError as exc:
            if self.dropped and exc.args == (_ABORTED,):
                task.uncancel()  # (ours: the task goes on, seeing the connection closed)
                raise self._closed_error() from None
            raise
        finally:
            self._waiting.discard(task)

    async def send(
        self,
        message: DataLike | Iterable[DataLike] | AsyncIterable[DataLike],
        *,
        text: bool | None = None,
    ) -> None:
        """Send one message (fragments are joined: ASGI sends whole messages)."""
        if self._close_code is not None or self.dropped:
            raise self._closed_error()
        if isinstance(message, str):
            event: Message = {"type": "websocket.send", "text": message}
        elif isinstance(message, (bytes, bytearray, memoryview)):
            event = {"type": "websocket.send", "bytes": bytes(message)}
        else:
            if isinstance(message, AsyncIterable):
                parts = [bytes(p) if not isinstance(p, str) else p.encode() async for p in message]
            else:
                parts = [bytes(p) if not isinstance(p, str) else p.encode() for p in message]
            event = {"type": "websocket.send", "bytes": b"".join(parts)}
        try:
            await self._call(self._send(event))
        except (OSError, RuntimeError):
            # The client is gone (uvicorn: ClientDisconnected), or the server closed it
            # itself (a keepalive timeout: RuntimeError for a send after its close).
            self._gone(CloseCode.ABNORMAL, "")
            raise self._closed_error() from None

    async def close(self, code: int = 1000, reason: str = "") -> None:
        """Send a close frame (once); the connection counts as closed with ``code``."""
        if self._close_sent or self._close_code is not None or self.dropped:
            return
        self._close_sent = True
        self._close_code, self._close_reason = code, reason
        with contextlib.suppress(OSError, RuntimeError, ConnectionClosedError):
            await self._call(
                self._send({"type": "websocket.close", "code": code, "reason": reason})
            )

    def abort(self) -> None:
        """Drop the connection now: pending sends and the handler's read end (closed,
        1006 unless a code was sent), without waiting for the client."""
        if self.dropped:
            return
        self._gone(CloseCode.ABNORMAL, "")
        self.aborted = True
        for task in list(self._waiting):
            task.cancel(_ABORTED)

    async def wait_gone(self) -> None:
        """After :meth:`abort`: wait until the server reports the client gone (what it
        sends meanwhile is dropped)."""
        while self.aborted:
            event = await self._receive()
            if event["type"] == "websocket.disconnect":
                self.aborted = False

    def _gone(self, code: int, reason: str) -> None:
        self.dropped = True
        if self._close_code is None:
            self._close_code, self._close_reason = code, reason

    async def __aiter__(self) -> AsyncIterator[Data]:
        while not self.dropped:
            try:
                event = await self._call(self._receive())
            except ConnectionClosedError:
                return
            assert event is not None
            kind = event["type"]
            if kind == "websocket.disconnect":
                code = int(event.get("code") or NO_STATUS)
                self._gone(code, event.get("reason") or "")
                return
            if kind != "websocket.receive":
                continue
            data: Data | None = event.get("bytes")
            if data is None:
                data = event.get("text")
                if data is None:
                    continue
            if len(data) > self._max_size:
                # (websockets closes with 1009 before the message is read)
                await self.close(CloseCode.MESSAGE_TOO_BIG, "message too big")
                return
            if self._close_code is not None:
                return  # closed here meanwhile: what follows is not handled
            yield data


class RelayApp:
    """The relay as an ASGI application. Mount it (``app.mount("/sync", relay_app)``) and
    run its lifespan in the parent's (``FastAPI(lifespan=relay_app.lifespan)``).

    Args:
        relay: the relay to serve; by default one made from ``settings``, ``authorize``
            and ``revoked`` (see :class:`~crdtsync.server.relay.Relay`). ``authorize``
            gets an :class:`AsgiRequest` (its ``scope`` holds what the app's middleware
            put there). ``settings.host``, ``port`` and the TLS settings are not used:
            the ASGI server listens.
    """

    def __init__(
        self,
        relay: Relay | None = None,
        *,
        settings: RelaySettings | None = None,
        authorize: Authorizer | None = None,
        revoked: RevocationCheck | None = None,
    ) -> None:
        if relay is not None and (settings or authorize or revoked):
            raise TypeError("give a relay, or what to make one of, not both")
        self.relay = relay or Relay(settings, authorize=authorize, revoked=revoked)

    @contextlib.asynccontextmanager
    async def lifespan(self, app: object = None) -> AsyncIterator[None]:
        """Start the relay (open its store), and drain and stop it at the end: for a
        parent app's lifespan (``app`` is ignored: FastAPI and Starlette pass theirs)."""
        await self.relay.start(listen=False)
        try:
            yield
        finally:
            await self.relay.stop()

    def uvicorn_options(self) -> dict[str, Any]:
        """uvicorn settings that keep the relay's limits: the largest message, messages
        read ahead per connection, pings (``uvicorn.run(app, **relay_app.uvicorn_options())``)."""
        s = self.relay.settings
        return {
            "ws_max_size": s.max_message_bytes,
            "ws_max_queue": 4,  # (the standalone relay's MAX_QUEUED_MESSAGES)
            "ws_ping_interval": 20.0,
            "ws_ping_timeout": 20.0,
            # A client that never reads keeps its socket open (uvicorn closes gracefully):
            # without a limit, uvicorn waits for it forever and never runs the lifespan's
            # end (the relay's drain).
            "timeout_graceful_shutdown": s.drain_timeout_s,
        }

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "websocket":
            await self._websocket(scope, receive, send)
        elif kind == "http":
            await self._http(scope, receive, send)
        elif kind == "lifespan":
            await self._lifespan(receive, send)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        # (Only when this app is the one the server runs: mounts never get this.)
        while True:
            event = await receive()
            if event["type"] == "lifespan.startup":
                try:
                    await self.relay.start(listen=False)
                except Exception as exc:
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif event["type"] == "lifespan.shutdown":
                await self.relay.stop()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = AsgiRequest.of(scope)
        probe = _Probe(scope)
        response = self.relay.answer_http(probe, request) if self.relay.serving else None
        if response is None:
            if request.path.partition("?")[0] in ("/healthz", "/readyz", "/metrics"):
                response = _respond(http.HTTPStatus.SERVICE_UNAVAILABLE, _not_serving(self))
            else:
                response = _respond(
                    http.HTTPStatus.UPGRADE_REQUIRED, "a websocket endpoint (y-websocket)\n"
                )
                response.headers["Upgrade"] = "websocket"
        await send(
            {
                "type": "http.response.start",
                "status": response.status_code,
                "headers": _asgi_headers(response.headers),
            }
        )
        await send({"type": "http.response.body", "body": response.body})

    async def _websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        event = await receive()
        if event["type"] != "websocket.connect":
            return  # (disconnected before the handshake)
        request = AsgiRequest.of(scope)
        ws = AsgiWebSocket(scope, receive, send, request, self.relay.settings.max_message_bytes)
        if not self.relay.serving:
            response: Response | None = _respond(
                http.HTTPStatus.SERVICE_UNAVAILABLE, _not_serving(self)
            )
        else:
            response = await self.relay.admit(ws, request)
        if response is not None:
            await _deny(scope, send, response)
            return
        await send({"type": "websocket.accept"})
        try:
            await self.relay.serve_connection(ws)
        finally:
            # (websockets closes a connection whose handler returned with 1000)
            if ws.close_code is None:
                await ws.close(CloseCode.NORMAL, "")
        if ws.aborted:
            # The relay let go of a client that does not read; the server cannot cut it
            # (it closes gracefully: its buffer for the client stays until the client
            # reads or goes). Its place under the connection limits stays taken until then.
            with self.relay.lingering(ws, request):
                await ws.wait_gone()


class _Probe:
    """A plain HTTP request's connection, as :meth:`Relay.answer_http` asks it."""

    def __init__(self, scope: Scope) -> None:
        self._scope = scope

    @property
    def remote_address(self) -> Any:
        client = self._scope.get("client")
        return tuple(client) if client else None

    def respond(self, status: StatusLike, text: str) -> Response:
        return _respond(status, text)


def _not_serving(app: RelayApp) -> str:
    return (
        "relay not serving: shutting down, or never started (the app's lifespan must run "
        "RelayApp.lifespan: see crdtsync.server.asgi)\n"
    )


async def deny(scope: Scope, send: Send, status: StatusLike, text: str) -> None:
    """Refuse a websocket handshake with an HTTP ``status`` and a plain-text reason: for an
    app's authentication in front of the relay (the handshake not yet accepted). Where
    the server cannot send an HTTP answer to a handshake, the client sees its 403."""
    await _deny(scope, send, _respond(status, text))


async def _deny(scope: Scope, send: Send, response: Response) -> None:
    """Refuse a handshake with ``response`` where the server can send one (the ASGI
    websocket denial extension); otherwise with the server's 403."""
    if _DENIAL in scope.get("extensions", {}):
        await send(
            {
                "type": "websocket.http.response.start",
                "status": response.status_code,
                "headers": _asgi_headers(response.headers),
            }
        )
        await send({"type": "websocket.http.response.body", "body": response.body})
    else:
        await send({"type": "websocket.close", "code": CloseCode.POLICY_VIOLATION})


def create_app(
    settings: RelaySettings | None = None, *, config: str | None = None, **kwargs: Any
) -> RelayApp:
    """A :class:`RelayApp` on ``settings``; by default read as ``crdtsync relay`` reads
    them: ``CRDTSYNC_*`` from the environment and the settings file ``config`` (TOML).
    ``kwargs``: ``authorize``, ``revoked``."""
    return RelayApp(settings=settings or RelaySettings.load(config), **kwargs)
