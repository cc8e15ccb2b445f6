"""The relay mounted in a FastAPI app under uvicorn, for the benchmarks (``--servers
crdtsync-asgi``): what ``crdtsync.server.asgi`` costs against ``crdtsync relay``.

    python bench/asgi_server.py --store relay.db [--compact-after-updates 1000 ...]

Listens on a free port of 127.0.0.1 and prints ``{"event": "listening", "url": ...}``
(the mount's URL, as the benchmarks' servers do); uvicorn runs with the relay's own
limits (``RelayApp.uvicorn_options()``) and its default websocket implementation. Other
``--name value`` pairs are relay settings, as ``crdtsync relay`` takes them (a scenario's
flags); ``--log-level`` is taken and ignored (uvicorn logs warnings).
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


async def main(store: str, values: dict[str, str]) -> None:
    relay = RelayApp(settings=RelaySettings(store=store, **values))
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


def settings_of(flags: list[str]) -> dict[str, str]:
    """``--name value`` pairs as relay settings (``--compact-after-updates 5``)."""
    if len(flags) % 2 or not all(f.startswith("--") for f in flags[::2]):
        raise SystemExit(f"settings must come as --name value pairs: {flags}")
    values = {f[2:].replace("-", "_"): v for f, v in zip(flags[::2], flags[1::2], strict=True)}
    values.pop("log_level", None)
    return values


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--store", default="relay.db")
    known, rest = p.parse_known_args()
    asyncio.run(main(known.store, settings_of(rest)))
