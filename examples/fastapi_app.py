"""The crdtsync relay mounted in a FastAPI app, behind the app's own authentication.

::

    pip install -e '.[asgi]'    # fastapi and uvicorn
    EXAMPLE_API_KEYS=alice:key-of-alice,bob:key-of-bob CRDTSYNC_STORE=app-relay.db \\
        uvicorn fastapi_app:app --app-dir examples --host 127.0.0.1 --port 8000 \\
        --ws-max-size 20971520 --ws-max-queue 4 --timeout-graceful-shutdown 10

Documents are then at ``ws://127.0.0.1:8000/sync/<name>?key=<api key>``: a stock Yjs
client is ``new WebsocketProvider("ws://127.0.0.1:8000/sync", name, doc, {params: {key}})``,
a replica ``Replica(path, relay="ws://127.0.0.1:8000/sync", params={"key": key})``.
Health checks are ``/sync/healthz`` and ``/sync/readyz``.

What it shows:

- **Authentication in front.** ``RequireApiKey`` is plain ASGI middleware around the
  mounted relay: a handshake without a known key is refused with 401 before the relay
  sees it, and the user it names is left in the scope. The relay's ``authorize`` hook
  reads it there (``request.scope``) and decides per document: ``private/<user>/...``
  only for that user, everything else for everyone. (The relay's own signed tokens,
  README "Access tokens", work here too; this is for apps with an identity of their own.)
- **Lifespan.** Starlette runs the lifespan of the app it serves, never of a mounted
  one: the relay's (open the store; at shutdown drain and close it) runs in FastAPI's,
  ``FastAPI(lifespan=relay.lifespan)``. An app with a lifespan of its own enters it
  there: ``async with relay.lifespan(): yield``.
- **The relay's limits in the server.** ``--ws-max-size`` (the largest message, the
  relay's ``max_message_bytes``), ``--ws-max-queue`` (messages read ahead) and
  ``--timeout-graceful-shutdown`` (a client that does not read would hold a shutdown
  forever) are uvicorn's; ``RelayApp.uvicorn_options()`` gives them for ``uvicorn.run``.
  The relay keeps its slow-reader rule itself (see ``crdtsync.server.asgi``).

Keys come from ``EXAMPLE_API_KEYS`` (``user:key,...``); without it, one key for the user
``demo`` is made up and printed. Relay settings come from ``CRDTSYNC_*`` as for
``crdtsync relay`` (``CRDTSYNC_CONFIG`` names a settings file).
"""

from __future__ import annotations

import hmac
import os
import secrets
import sys
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qs

from fastapi import FastAPI, Header, HTTPException

from crdtsync.auth import Rights
from crdtsync.errors import AccessDenied
from crdtsync.server.asgi import AsgiRequest, RelayApp, create_app, deny


def api_keys() -> dict[str, str]:
    """key -> user, from ``EXAMPLE_API_KEYS`` (``user:key,user:key``)."""
    configured = os.environ.get("EXAMPLE_API_KEYS", "").strip()
    if not configured:
        key = secrets.token_urlsafe(16)
        print(f"EXAMPLE_API_KEYS not set: the user 'demo' has the key {key}", file=sys.stderr)
        return {key: "demo"}
    keys = {}
    for pair in configured.split(","):
        user, _, key = pair.strip().partition(":")
        if not user or not key:
            raise SystemExit(f"EXAMPLE_API_KEYS: {pair!r} is not user:key")
        keys[key] = user
    return keys


class RequireApiKey:
    """ASGI middleware: websocket handshakes need ``?key=`` or ``Authorization: Bearer``
    (browsers cannot set headers on a WebSocket, hence the query); the user goes into
    ``scope["user"]``. Plain HTTP (the health checks) passes."""

    def __init__(self, app: Any, keys: dict[str, str]) -> None:
        self.app = app
        self.keys = keys

    def user(self, scope: dict[str, Any]) -> str | None:
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        given = query.get("key", [""])[-1]
        if not given:
            headers = dict(scope.get("headers", ()))
            scheme, _, token = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
            given = token.strip() if scheme.lower() == "bearer" else ""
        for key, user in self.keys.items():  # (compared in constant time, each)
            if hmac.compare_digest(given.encode(), key.encode()):
                return user
        return None

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "websocket":
            user = self.user(scope)
            if user is None:
                await receive()  # websocket.connect
                await deny(scope, send, HTTPStatus.UNAUTHORIZED, "a valid ?key= is needed\n")
                return
            scope = {**scope, "user": user}
        await self.app(scope, receive, send)


def authorize(request: AsgiRequest, document: str) -> Rights:
    """Everyone may edit every document but the private ones of other users."""
    user = request.scope["user"]
    parts = document.split("/")
    if parts[0] == "private" and (len(parts) < 3 or parts[1] != user):
        raise AccessDenied(f"{document!r} is private to another user")
    return Rights(read=True, write=True)


keys = api_keys()
relay: RelayApp = create_app(config=os.environ.get("CRDTSYNC_CONFIG"), authorize=authorize)
app = FastAPI(title="crdtsync in FastAPI", lifespan=relay.lifespan)
app.mount("/sync", RequireApiKey(relay, keys))


@app.get("/")
def index() -> dict[str, str]:
    """Where the relay is."""
    return {"relay": "/sync", "health": "/sync/healthz"}


@app.get("/me")
def me(authorization: str = Header(default="")) -> dict[str, str]:
    """The user an API key names (the same keys the relay's handshakes need)."""
    scheme, _, given = authorization.partition(" ")
    user = keys.get(given.strip()) if scheme.lower() == "bearer" else None
    if user is None:
        raise HTTPException(HTTPStatus.UNAUTHORIZED, "a valid Authorization: Bearer key")
    return {"user": user}
