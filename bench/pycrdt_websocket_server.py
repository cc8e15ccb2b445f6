"""pycrdt-websocket's server on loopback, for the benchmarks only (memory only, no YStore).

    python bench/pycrdt_websocket_server.py [--host 127.0.0.1] [--port 0]

Needs ``pip install pycrdt-websocket`` (not a crdtsync dependency). Serves
``pycrdt.websocket.WebsocketServer`` through the ``websockets`` library, as its README does,
with a small adapter giving websockets' connection the ``path``/``send``/``recv`` API the
server expects (the room is the URL path, as in the reference server). Compression is off,
as on the other servers. Prints one JSON line on stdout once bound:
``{"event": "listening", "url": ..., "pid": ...}``. SIGTERM/SIGINT stop it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal

from pycrdt.websocket import WebsocketServer
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed


class Channel:
    """websockets' ServerConnection seen as pycrdt's ``Channel``."""

    def __init__(self, ws: ServerConnection) -> None:
        self._ws = ws
        assert ws.request is not None
        self._path = ws.request.path.partition("?")[0]

    @property
    def path(self) -> str:
        return self._path

    def __aiter__(self) -> Channel:
        return self

    async def __anext__(self) -> bytes:
        try:
            return await self.recv()
        except ConnectionClosed:
            raise StopAsyncIteration from None

    async def send(self, message: bytes) -> None:
        with contextlib.suppress(ConnectionClosed):
            await self._ws.send(message)

    async def recv(self) -> bytes:
        data = await self._ws.recv()
        return data if isinstance(data, bytes) else data.encode()


async def main(host: str, port: int) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with WebsocketServer(auto_clean_rooms=True) as ysrv:

        async def handler(ws: ServerConnection) -> None:
            await ysrv.serve(Channel(ws))

        async with serve(handler, host, port, compression=None, max_size=None) as server:
            sock = next(iter(server.sockets))
            bound = sock.getsockname()[1]
            line = {"event": "listening", "url": f"ws://{host}:{bound}", "pid": os.getpid()}
            print(json.dumps(line), flush=True)
            await stop.wait()
            # Graceful close can wait forever on connections pycrdt-websocket never served
            # (see README); the benchmark needs a bounded exit, so force one after 3 s.
            loop.call_later(3.0, os._exit, 0)
            server.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    asyncio.run(main(args.host, args.port))
