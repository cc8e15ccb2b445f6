"""Serve the collaborative editor of ``examples/web`` and a relay for it, on loopback.

Build the page once (``npm ci --prefix examples/web && npm run build --prefix
examples/web``), then::

    python examples/web/serve.py

It starts a relay (``ws://127.0.0.1:8765``, on an SQLite store in a temporary folder,
deleted on exit; ``--store FILE`` keeps it) and serves ``examples/web/dist`` over HTTP
(``http://127.0.0.1:8000``), and prints the page's URL. The page asks ``config.json``
for the relay's URL; ``?doc=NAME`` picks the document, ``?relay=ws://...`` another relay,
``?name=...`` your name in the others' cursors. ``--relay ws://...`` serves the page for a
relay you already run instead of starting one. Port 0 picks a free port.

In a terminal, Enter stops the relay and Enter starts it again (same port and store)
while the page stays served: the page goes offline, keeps its edits across reloads, and
syncs them when the relay is back. Ctrl-C stops both (the relay drains first).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
import tempfile
import threading
from collections.abc import Callable
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

HERE = Path(__file__).resolve().parent
DIST = HERE / "dist"
BUILD_COMMAND = "npm ci --prefix examples/web && npm run build --prefix examples/web"


class PageHandler(SimpleHTTPRequestHandler):
    """The built page from its folder, plus ``/config.json``: where the relay is."""

    extensions_map = {  # noqa: RUF012 (the stdlib's own class attribute, replaced)
        **SimpleHTTPRequestHandler.extensions_map,
        ".js": "text/javascript",
        ".map": "application/json",
        ".css": "text/css",
        ".html": "text/html; charset=utf-8",
    }

    def __init__(self, *args: Any, config: Callable[[], dict[str, Any]], **kwargs: Any) -> None:
        self._config = config
        super().__init__(*args, **kwargs)

    def do_GET(self) -> None:
        if urlsplit(self.path).path == "/config.json":
            body = json.dumps(self._config()).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(body)
            return
        super().do_GET()

    def end_headers(self) -> None:
        # A rebuilt page is picked up by a reload; nothing here is worth caching.
        if not self._headers_buffer or b"Cache-Control" not in b"".join(self._headers_buffer):
            self.send_header("Cache-Control", "no-store")
        super().end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass  # quiet: a page load is a dozen requests


def make_http_server(
    dist: Path, config: Callable[[], dict[str, Any]], port: int = 0
) -> ThreadingHTTPServer:
    """An HTTP server on 127.0.0.1:``port`` for ``dist`` and ``/config.json``, not started."""
    handler = partial(PageHandler, directory=str(dist), config=config)
    server = ThreadingHTTPServer(("127.0.0.1", port), handler)
    server.daemon_threads = True
    return server


def start_http_server(server: ThreadingHTTPServer) -> threading.Thread:
    thread = threading.Thread(target=server.serve_forever, name="http", daemon=True)
    thread.start()
    return thread


def page_url(server: ThreadingHTTPServer, doc: str) -> str:
    return f"http://127.0.0.1:{server.server_address[1]}/?doc={doc}"


def announce(page: str, relay: str, store: str | None, doc: str, toggle: bool) -> None:
    where = f"  (store: {store})" if store else "  (a relay you run)"
    print(
        "crdtsync web demo\n"
        f"  relay: {relay}{where}\n"
        f"  page:  {page}\n"
        "Open the page in two tabs or browsers; in another terminal, a Python replica:\n"
        f"  python examples/web/bot.py --relay {relay} --doc {doc}\n"
        + (
            "Press Enter here to stop the relay (the page stays served: try it offline), "
            "Enter again to start it.\n"
            if toggle
            else ""
        )
        + "Ctrl-C stops.",
        flush=True,
    )


def foreground_terminal() -> bool:
    """stdin is a terminal we may read (not a job in the background of a shell)."""
    if sys.stdin is None or not sys.stdin.isatty():
        return False
    try:
        return os.tcgetpgrp(sys.stdin.fileno()) == os.getpgrp()
    except OSError:
        return True  # a terminal, but not our controlling one: nothing stops our reads


async def serve_with_relay(
    http: ThreadingHTTPServer, config: dict[str, Any], relay_port: int, store: Path, doc: str
) -> int:
    """Run a relay until SIGINT/SIGTERM; ``config`` (what /config.json says) learns its URL.

    When stdin is a terminal, each Enter stops the relay or starts it again, on the same
    port and store, while the page stays served: the way to see the page offline.
    """
    from crdtsync.server import Relay
    from crdtsync.settings import RelaySettings

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    toggle = foreground_terminal()
    enter = asyncio.Event()
    if toggle:

        def key() -> None:
            if sys.stdin.readline():
                enter.set()
            else:  # end of input: no more toggling
                loop.remove_reader(sys.stdin.fileno())

        loop.add_reader(sys.stdin.fileno(), key)

    async def stop_or_enter() -> None:
        enter.clear()
        waits = [asyncio.ensure_future(e.wait()) for e in (stop, enter)]
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        for w in waits:
            w.cancel()

    port = relay_port
    first = True
    while not stop.is_set():
        relay = Relay(RelaySettings(host="127.0.0.1", port=port, store=store))
        try:
            await relay.start()
        except OSError as exc:
            with contextlib.suppress(Exception):  # release what start() took
                await relay.stop()
            print(
                f"serve.py: the relay cannot listen on 127.0.0.1:{port}: {exc.strerror}.\n"
                f"Is a relay running there already? Use it: --relay ws://127.0.0.1:{port}; "
                "or pick another port: --relay-port 0",
                file=sys.stderr,
            )
            return 1
        port = int(relay.url.rsplit(":", 1)[1])  # a restart keeps the port (and the URL)
        config["relay"] = relay.url
        if first:
            announce(page_url(http, doc), relay.url, str(store), doc, toggle)
            first = False
        else:
            print(f"relay started again at {relay.url}: pages and bots reconnect", flush=True)
        try:
            await stop_or_enter()
        finally:
            await relay.stop()
        if stop.is_set():
            break
        print("relay stopped: the page and the bot are offline. Enter starts it.", flush=True)
        await stop_or_enter()
    return 0


async def serve_without_relay(http: ThreadingHTTPServer, relay: str, doc: str) -> int:
    announce(page_url(http, doc), relay, None, doc, toggle=False)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Serve the browser editor of examples/web and a relay for it, on loopback."
    )
    parser.add_argument("--port", type=int, default=8000, help="HTTP port of the page (8000)")
    parser.add_argument(
        "--relay-port", type=int, default=8765, help="port of the relay started here (8765)"
    )
    parser.add_argument(
        "--store", type=Path, help="the relay's SQLite file (default: a temporary one)"
    )
    parser.add_argument("--relay", help="use this running relay (ws://...) instead of starting one")
    parser.add_argument("--doc", default="demo", help="the document the printed URL opens")
    parser.add_argument("--dist", type=Path, default=DIST, help="the built page (dist/)")
    args = parser.parse_args(argv)

    dist = args.dist.resolve()
    if not (dist / "index.html").is_file() or not (dist / "app.js").is_file():
        print(f"serve.py: {dist} is not built; run: {BUILD_COMMAND}", file=sys.stderr)
        return 1
    config: dict[str, Any] = {"relay": args.relay} if args.relay else {}
    try:
        http = make_http_server(dist, lambda: dict(config), args.port)
    except OSError as exc:
        print(f"serve.py: cannot listen on 127.0.0.1:{args.port}: {exc.strerror}", file=sys.stderr)
        return 1
    start_http_server(http)
    try:
        if args.relay:
            return asyncio.run(serve_without_relay(http, args.relay, args.doc))
        with contextlib.ExitStack() as stack:
            store = args.store
            if store is None:
                tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="crdtsync-web-"))
                store = Path(tmp) / "relay.db"
            return asyncio.run(serve_with_relay(http, config, args.relay_port, store, args.doc))
    finally:
        http.shutdown()
        http.server_close()


if __name__ == "__main__":  # the relay compacts in spawned worker processes: keep this guard
    sys.exit(main())
