"""The relay mounted in a FastAPI app under uvicorn, for the benchmarks (``--servers
crdtsync-asgi``): what ``crdtsync.server.asgi`` costs against ``crdtsync relay``.

    python bench/asgi_server.py --store relay.db

Listens on a free port of 127.0.0.1 and prints ``{"event": "listening", "url": ...}``
(the mount's URL, as the benchmarks' servers do); uvicorn runs with the relay's own
limits (``RelayApp.uvicorn_options()``) and its default websocket implementation.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import socket
from collections.abc import AsyncIterator

import uvicorn
from fastapi import FastAPI

from crdtsync.server.asgi import RelayApp
from crdtsync.settings import RelaySettings

MOUNT = "/sync"


async def main(store: str) -> None:
    relay = RelayApp(settings=RelaySettings(store=store))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(2048)  # (connections wait in the backlog until uvicorn accepts them)
    url = f"ws://127.0.0.1:{sock.getsockname()[1]}{MOUNT}"

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with relay.lifespan():
            print(json.dumps({"event": "listening", "url": url}), flush=True)
            yield

    app = FastAPI(lifespan=lifespan)
    app.mount(MOUNT, relay)
    config = uvicorn.Config(app, log_level="warning", **relay.uvicorn_options())
    await uvicorn.Server(config).serve(sockets=[sock])


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--store", default="relay.db")
    asyncio.run(main(p.parse_args().store))
