"""The relay mounted in an ASGI app (crdtsync.server.asgi) under a real uvicorn server on
loopback: the same rules as the standalone relay, where ASGI lets the relay see less
(no write buffer, no abort, the server's own message limits)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from helpers import eventually, timeout_s
from pycrdt import Doc, Text
from stock import stored_text, text_update
from test_backlogs import close_code
from test_shutdown_and_disk import never_reading_peer
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from crdtsync.auth import mint_token
from crdtsync.client import Replica
from crdtsync.protocol import SyncStep1, SyncUpdate, decode_message
from crdtsync.server.asgi import RelayApp, create_app
from crdtsync.settings import RelaySettings
from crdtsync.store import UpdateLog

uvicorn = pytest.importorskip("uvicorn", reason="the asgi extra: pip install -e '.[asgi]'")
FastAPI = pytest.importorskip("fastapi", reason="the asgi extra: pip install -e '.[asgi]'").FastAPI

pytestmark = pytest.mark.anyio

SECRET = "asgi-test-secret-of-at-least-32-bytes-00"
KiB = 1024


class Served:
    """A FastAPI app with the relay mounted at /sync, under uvicorn on a free port."""

    def __init__(self, app: Any, relay_app: RelayApp, **options: Any) -> None:
        self.relay_app = relay_app
        self.relay = relay_app.relay
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        port = self.sock.getsockname()[1]
        self.base = f"127.0.0.1:{port}"
        self.url = f"ws://{self.base}/sync"
        self.http = f"http://{self.base}/sync"
        config = uvicorn.Config(
            app, log_level="warning", lifespan="on", **{**relay_app.uvicorn_options(), **options}
        )
        self.server = uvicorn.Server(config)
        self.task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Served:
        self.task = asyncio.create_task(self.server.serve(sockets=[self.sock]))
        await eventually(lambda: self.server.started, what="uvicorn started")
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.server.should_exit = True
        assert self.task is not None
        async with asyncio.timeout(timeout_s(30)):
            await self.task
        self.sock.close()


def mounted(settings: RelaySettings, *, lifespan: bool = True) -> tuple[FastAPI, RelayApp]:
    relay_app = RelayApp(settings=settings)
    app = FastAPI(lifespan=relay_app.lifespan) if lifespan else FastAPI()
    app.mount("/sync", relay_app)
    return app, relay_app


def settings_for(tmp_path: Path, **values: Any) -> RelaySettings:
    return RelaySettings(store=tmp_path / "relay.db", **values)


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


async def handshake_status(url: str) -> int:
    """The HTTP status a handshake is refused with (101 when it is accepted)."""
    try:
        async with connect(url):
            return 101
    except InvalidStatus as exc:
        return exc.response.status_code


@contextlib.asynccontextmanager
async def serving(app: Any, relay_app: RelayApp, **options: Any) -> AsyncIterator[Served]:
    async with Served(app, relay_app, **options) as served:
        yield served


async def test_mounted_relay_serves_health_documents_and_refuses_as_the_relay_does(tmp_path):
    app, relay_app = mounted(settings_for(tmp_path, token_secrets=[SECRET]))
    async with serving(app, relay_app) as served:
        assert await asyncio.to_thread(get, f"{served.http}/healthz") == (200, "ok\n")
        status, body = await asyncio.to_thread(get, f"{served.http}/healthz?verbose=1")
        assert status == 200
        assert json.loads(body)["store"] == "sqlite"
        assert (await asyncio.to_thread(get, f"{served.http}/readyz"))[0] == 200
        assert (await asyncio.to_thread(get, f"{served.http}/team/doc"))[0] == 426
        # The handshake's answers reach the client as the standalone relay gives them.
        assert await handshake_status(f"{served.url}/team/doc") == 401
        other = mint_token(SECRET, subject="eve", docs={"other/*": "rw"}, ttl_s=600)
        assert await handshake_status(f"{served.url}/team/doc?token={other}") == 403
        token = mint_token(SECRET, subject="ann", docs={"team/*": "rw"}, ttl_s=600)
        async with (
            Replica(tmp_path / "a.db", relay=served.url, token=token) as a,
            Replica(tmp_path / "b.db", relay=served.url, token=token) as b,
        ):
            text = (await a.open("team/doc")).get("text", type=Text)
            text.insert(0, "through the mount")
            await a.wait_synced("team/doc", timeout=timeout_s(10))
            other_text = (await b.open("team/doc")).get("text", type=Text)
            await eventually(lambda: str(other_text) == "through the mount", what="b's copy")
            # Multiplexed: a document the token may not read is refused alone.
            refused = await a.open("other/secret")
            refused.get("text", type=Text).insert(0, "x")
            await eventually(lambda: a.status("other/secret").last_error is not None)
            text.insert(0, "still syncing, ")
            await a.wait_synced("team/doc", timeout=timeout_s(10))
            await eventually(lambda: str(other_text).startswith("still syncing"))
        assert served.relay.stats["refused_unauthorized"] >= 1
        assert served.relay.stats["refused_forbidden"] >= 1


async def test_document_names_are_the_raw_path_under_the_mount(tmp_path):
    app, relay_app = mounted(settings_for(tmp_path))
    async with serving(app, relay_app) as served:
        doc = Doc()
        async with connect(f"{served.url}/notes/a%20b?x=1") as ws:
            await ws.send(SyncUpdate(text_update(doc, "raw")).encode())
            await eventually(lambda: served.relay.stats["updates_stored"] >= 1)
    # The same name the standalone relay and y-websocket's server give it: as sent.
    store = UpdateLog(tmp_path / "relay.db")
    try:
        assert "notes/a%20b" in store.documents()
    finally:
        store.close()


async def test_before_its_lifespan_runs_the_relay_refuses_with_503_and_says_why(tmp_path):
    app, relay_app = mounted(settings_for(tmp_path), lifespan=False)
    async with serving(app, relay_app) as served:
        assert await handshake_status(f"{served.url}/doc") == 503
        status, body = await asyncio.to_thread(get, f"{served.http}/readyz")
        assert status == 503
        assert "lifespan" in body


async def test_oversized_message_is_refused_with_1009(tmp_path):
    app, relay_app = mounted(settings_for(tmp_path, max_message_bytes=64 * KiB))
    # The server lets larger messages through (a misconfigured ws_max_size): the relay
    # still refuses them, as the standalone relay does.
    async with (
        serving(app, relay_app, ws_max_size=1024 * KiB) as served,
        connect(f"{served.url}/big", max_size=None) as ws,
    ):
        await ws.send(b"\x00" * (100 * KiB))
        assert await close_code(ws, 10) == 1009


async def test_a_reader_that_does_not_read_is_closed_and_the_others_keep_up(tmp_path):
    settings = settings_for(
        tmp_path, max_write_buffer_bytes=256 * KiB, slow_reader_grace_s=0.5, close_timeout_s=1.0
    )
    app, relay_app = mounted(settings)
    async with serving(app, relay_app) as served:
        room = f"{served.url}/slow/room"
        # A stock client that never reads: its socket stops taking data, uvicorn's send
        # waits, and what the relay queues for it is its backlog.
        # (A client library would read whole messages into its own queue.)
        silent = await never_reading_peer(
            f"ws://{served.base}", "sync/slow/room", SyncStep1(b"\x00").encode()
        )
        reader = await connect(room, max_size=None)
        await reader.send(SyncStep1(b"\x00").encode())
        writer = await connect(room, max_size=None)
        doc, got = Doc(), Doc()
        sent = 0
        try:
            async with asyncio.timeout(timeout_s(60)):
                for i in range(200):  # 200 updates of 64 KiB: 12.5 MiB to every reader
                    await writer.send(
                        SyncUpdate(text_update(doc, chr(65 + i % 26) * 64 * KiB)).encode()
                    )
                    sent += 64 * KiB
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(0.01):
                            while True:
                                message = decode_message(await reader.recv())  # type: ignore[arg-type]
                                if isinstance(message, SyncUpdate):
                                    got.apply_update(message.update)
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(0.001):
                            while True:
                                await writer.recv()
                while len(got.get("text", type=Text)) < sent:
                    message = decode_message(await reader.recv())  # type: ignore[arg-type]
                    if isinstance(message, SyncUpdate):
                        got.apply_update(message.update)
            assert str(got.get("text", type=Text)) == str(doc.get("text", type=Text))
            await eventually(lambda: served.relay.stats["closed_slow"] >= 1, what="1013")
            # Its handler ended (the relay dropped it, without waiting for the client to
            # take its close frame); its place stays taken while uvicorn keeps its socket.
            await eventually(
                lambda: served.relay.stats["lingering"] == 1, what="the silent one dropped"
            )
            assert len(served.relay.rooms["slow/room"].peers) == 2
            assert served.relay.stats["connections"] == 3
            silent.close()
            await eventually(lambda: served.relay.stats["lingering"] == 0, what="its socket gone")
            assert served.relay.stats["connections"] == 2
        finally:
            silent.close()
            for ws in (reader, writer):
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(ws.close(), timeout_s(2))
                ws.transport.abort()


async def test_shutdown_drains_and_what_was_acknowledged_is_stored(tmp_path):
    app, relay_app = mounted(settings_for(tmp_path))
    async with Replica(tmp_path / "a.db", relay=None) as offline:
        (await offline.open("kept")).get("text", type=Text).insert(0, "before")
    async with (
        serving(app, relay_app) as served,
        Replica(tmp_path / "a.db", relay=served.url) as replica,
    ):
        text = (await replica.open("kept")).get("text", type=Text)
        text.insert(len(text), " and after")
        await replica.wait_synced("kept", timeout=timeout_s(10))
    assert not served.relay.serving
    assert stored_text(tmp_path / "relay.db", "kept") == "before and after"


async def test_served_alone_the_relay_app_runs_its_own_lifespan(tmp_path, monkeypatch):
    # `uvicorn --factory crdtsync.server.asgi:create_app`: settings from CRDTSYNC_*, and
    # the ASGI lifespan protocol run by RelayApp itself (no parent app).
    monkeypatch.setenv("CRDTSYNC_STORE", str(tmp_path / "alone.db"))
    relay_app = create_app()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    base = f"127.0.0.1:{sock.getsockname()[1]}"
    server = uvicorn.Server(uvicorn.Config(relay_app, log_level="warning", lifespan="on"))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        await eventually(lambda: server.started, what="uvicorn started")
        assert relay_app.relay.serving
        assert await asyncio.to_thread(get, f"http://{base}/readyz") == (200, "ready\n")
        async with connect(f"ws://{base}/alone/doc") as ws:
            await ws.send(SyncUpdate(text_update(Doc(), "alone")).encode())
            await eventually(lambda: relay_app.relay.stats["updates_stored"] == 1)
    finally:
        server.should_exit = True
        async with asyncio.timeout(timeout_s(30)):
            await task
        sock.close()
    assert not relay_app.relay.serving  # its lifespan's end stopped it
    assert stored_text(tmp_path / "alone.db", "alone/doc") == "alone"
