"""The scriptable Yjs client itself: what it records, and what it puts on the wire.

A fake y-websocket peer (websockets' sync server on 127.0.0.1:0) sends chosen bytes, so
these tests can show that the client's error capture works: later tests that assert
``client.errors() == []`` against crdtsync's relay would otherwise pass by accident.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from nodekit import MakeYjsClient, scaled
from websockets.exceptions import ConnectionClosed
from websockets.sync.server import ServerConnection, serve

pytestmark = pytest.mark.interop

MSG_SYNC_STEP1_EMPTY = bytes([0, 0, 1, 0])  # sync, step 1, state vector with 0 entries
MSG_UNKNOWN_TYPE_100 = bytes([100])  # a crdtsync extension type a stock client must not get


class FakePeer:
    """Records each connection's request path and the frames the client sent."""

    def __init__(self, greeting: list[bytes]) -> None:
        self.greeting = greeting
        self.paths: queue.Queue[str] = queue.Queue()
        self.received: queue.Queue[bytes] = queue.Queue()

    def next_received(self, first_bytes: bytes) -> bytes:
        """The next frame from the client that starts with ``first_bytes`` (bounded wait)."""
        for _ in range(100):
            message = self.received.get(timeout=scaled(10))
            if message.startswith(first_bytes):
                return message
        raise AssertionError(f"100 frames from the client, none starting with {first_bytes!r}")

    def handle(self, ws: ServerConnection) -> None:
        assert ws.request is not None
        self.paths.put(ws.request.path)
        for message in self.greeting:
            ws.send(message)
        try:
            for frame in ws:
                # a y-websocket client sends binary frames only
                self.received.put(frame if isinstance(frame, bytes) else frame.encode())
        except ConnectionClosed:
            pass


@contextmanager
def fake_peer(greeting: list[bytes]) -> Iterator[tuple[FakePeer, str]]:
    peer = FakePeer(greeting)
    with serve(peer.handle, "127.0.0.1", 0) as server:
        thread = threading.Thread(target=server.serve_forever, name="fake-peer", daemon=True)
        thread.start()
        try:
            host, port = server.socket.getsockname()[:2]
            yield peer, f"ws://{host}:{port}"
        finally:
            server.shutdown()
            thread.join(timeout=scaled(5))


def test_stock_client_reports_unknown_message_type_as_console_error(
    make_yjs_client: MakeYjsClient,
) -> None:
    with fake_peer([MSG_UNKNOWN_TYPE_100, MSG_SYNC_STEP1_EMPTY]) as (peer, url):
        client = make_yjs_client(url, "room")
        # Frames arrive in order: once the client answers the step 1 that came after the
        # unknown message (sync, step 2), it has handled both.
        peer.next_received(bytes([0, 1]))
        errors = client.errors()
        assert [(e["level"], e["message"]) for e in errors] == [
            ("error", "Unable to compute message")
        ]
        assert client.status()["connected"] is True  # logged, not disconnected
        client.close()


def test_stock_client_puts_room_raw_and_params_encoded_into_url(
    make_yjs_client: MakeYjsClient,
) -> None:
    with fake_peer([]) as (peer, url):
        client = make_yjs_client(url, "team/todo list", params={"token": "a b", "ext": "ack"})
        path = peer.paths.get(timeout=scaled(10))
        # y-websocket appends the room unencoded ("team/todo list"); the `ws` library then
        # percent-encodes the space when it parses the URL. Params go through
        # encodeURIComponent.
        assert path == "/team/todo%20list?token=a%20b&ext=ack"
        assert client.status()["url"] == url + "/team/todo list?token=a%20b&ext=ack"
        client.close()
