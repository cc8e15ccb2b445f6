"""crdtsync with stock peers: Yjs clients and pycrdt's Provider through our relay, and a
Replica through the reference y-websocket server."""

from __future__ import annotations

import asyncio
import hashlib
import json
import urllib.request
from typing import Any
from urllib.parse import urlencode

import pytest
from helpers import eventually, timeout_s
from nodekit import MakeYjsClient, ReferenceServer
from pycrdt import Doc, Map, Provider, Text
from websockets.asyncio.client import ClientConnection, connect

from crdtsync.client import Replica
from crdtsync.errors import AcknowledgementsUnsupported
from crdtsync.testing.traces import TextMirror, find_trace, load_trace

pytestmark = [pytest.mark.interop, pytest.mark.anyio]


async def in_thread(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """Run a blocking kit call without stalling the replica's event loop."""
    return await asyncio.to_thread(fn, *args, **kwargs)


async def test_stock_yjs_client_and_replica_converge_through_relay_with_offline_edits(
    relay, tmp_path, make_yjs_client: MakeYjsClient
):
    yjs = make_yjs_client(relay.url, "shared/doc", offline=True, params=relay.params)
    # Edits the stock client makes before it ever connects.
    yjs.edit(["text_insert", "text", 0, "yjs-offline "], ["map_set", "map", "yjs", 1])
    async with Replica(tmp_path / "r.db", relay=relay.url, params=relay.params) as replica:
        doc = await replica.open("shared/doc")
        doc.get("text", type=Text).insert(0, "replica ")
        doc.get("map", type=Map)["replica"] = 2
        await replica.wait_synced("shared/doc", timeout=10)
        await in_thread(yjs.connect)
        await in_thread(yjs.wait_synced)
        await in_thread(yjs.edit, ["map_set", "map", "yjs-online", 3])

        def replica_state() -> tuple[str, dict[str, Any]]:
            return str(doc.get("text", type=Text)), doc.get("map", type=Map).to_py()

        await eventually(
            lambda: set(replica_state()[1]) == {"yjs", "replica", "yjs-online"}, what="all keys"
        )
        text, mapping = replica_state()
        assert sorted(text.split()) == ["replica", "yjs-offline"]
        # wait_state fails (showing the last state) unless the stock client holds exactly this
        await in_thread(yjs.wait_state, text={"text": text}, map={"map": mapping})

        # It goes offline, both sides edit, it comes back: its resync repeats nothing the
        # integrity rule may refuse.
        await in_thread(yjs.disconnect)
        await in_thread(yjs.edit, ["map_set", "map", "yjs-again", 4])
        doc.get("map", type=Map)["replica-again"] = 5
        await replica.wait_synced("shared/doc", timeout=10)
        await in_thread(yjs.connect)
        await in_thread(yjs.wait_synced)
        await eventually(lambda: "yjs-again" in replica_state()[1], what="the offline edit")
        text, mapping = replica_state()
        await in_thread(yjs.wait_state, text={"text": text}, map={"map": mapping})
    # The stock client never saw a message type it does not know, nor a refusal.
    assert await in_thread(yjs.errors) == []
    assert relay_counters(relay.http)["updates_refused"] == 0


def relay_counters(http: str) -> dict[str, Any]:
    """The relay's /healthz?verbose=1 counters (``http``: where the relay is, over HTTP)."""
    http = http.replace("ws://", "http://", 1)
    with urllib.request.urlopen(f"{http}/healthz?verbose=1", timeout=10) as resp:
        counters: dict[str, Any] = json.loads(resp.read())
    return counters


class WebsocketChannel:
    """pycrdt's ``Channel`` protocol over a websockets client connection."""

    def __init__(self, ws: ClientConnection, path: str) -> None:
        self._ws = ws
        self._path = path

    @property
    def path(self) -> str:
        return self._path

    def __aiter__(self) -> WebsocketChannel:
        return self

    async def __anext__(self) -> bytes:
        try:
            return await self.recv()
        except Exception:
            raise StopAsyncIteration from None

    async def send(self, message: bytes) -> None:
        await self._ws.send(message)

    async def recv(self) -> bytes:
        data = await self._ws.recv()
        assert isinstance(data, bytes)
        return data


@pytest.mark.slow
async def test_pycrdt_provider_and_replica_converge_through_relay_on_trace_sized_document(
    relay, tmp_path
):
    path = find_trace("rustcode")
    if path is None:
        pytest.skip("rustcode trace not found")
    trace = load_trace(path)
    async with Replica(tmp_path / "r.db", relay=relay.url, params=relay.params) as replica:
        doc = await replica.open("big")
        mirror = TextMirror(doc.get("text", type=Text))
        for patches in trace.txns:
            with doc.transaction():
                mirror.apply(patches)
        await replica.wait_synced("big", timeout=120)

        # websockets' default 1 MiB frame limit on the client: the relay's answer must fit.
        async with connect(f"{relay.url}/big?{urlencode(relay.params)}") as ws:
            pdoc = Doc()
            async with Provider(pdoc, WebsocketChannel(ws, "big")):
                ptext = pdoc.get("text", type=Text)
                await eventually(lambda: str(ptext) == trace.end_content, timeout=60)
                ptext.insert(0, "// provider\n")
                await eventually(
                    lambda: str(doc.get("text", type=Text)).startswith("// provider\n"),
                    what="provider edit at the replica",
                )
    digest = hashlib.sha256(str(ptext).encode()).hexdigest()
    assert digest == hashlib.sha256(("// provider\n" + trace.end_content).encode()).hexdigest()


async def test_replica_syncs_through_reference_server_without_acknowledgements(
    reference_server: ReferenceServer, tmp_path, make_yjs_client: MakeYjsClient
):
    yjs = make_yjs_client(reference_server.url, "plain")
    await in_thread(yjs.wait_synced)
    await in_thread(yjs.edit, ["text_insert", "text", 0, "from yjs"])
    async with Replica(tmp_path / "r.db", relay=reference_server.url) as replica:
        doc = await replica.open("plain")
        text = doc.get("text", type=Text)
        await eventually(lambda: str(text) == "from yjs", what="yjs edit at the replica")
        text.insert(len("from yjs"), " and replica")
        await in_thread(yjs.wait_text, "text", "from yjs and replica")
        status = replica.status("plain")
        assert status.acknowledgements is False
        assert status.pending == 1  # nobody confirms storage, so it keeps counting
        with pytest.raises(AcknowledgementsUnsupported, match="does not acknowledge"):
            await asyncio.wait_for(replica.wait_synced("plain", timeout=5), timeout_s(10))
    assert await in_thread(yjs.errors) == []


async def test_presence_is_shared_between_stock_yjs_client_and_replica(
    relay, tmp_path, make_yjs_client: MakeYjsClient
):
    yjs = make_yjs_client(relay.url, "presence", params=relay.params)
    await in_thread(yjs.wait_synced)
    await in_thread(yjs.awareness_set, {"user": "yjs"})
    async with Replica(tmp_path / "r.db", relay=relay.url, params=relay.params) as replica:
        doc = await replica.open("presence")
        states = replica.awareness("presence").states
        await eventually(lambda: {"user": "yjs"} in states.values(), what="yjs presence")
        replica.awareness("presence").set_local_state({"user": "replica"})

        def yjs_sees_replica() -> bool:
            return yjs.awareness_states().get(doc.client_id) == {"user": "replica"}

        await eventually(lambda: in_thread(yjs_sees_replica), what="replica presence at yjs")
    assert await in_thread(yjs.errors) == []


async def test_stock_yjs_client_with_a_token_in_params_syncs_and_a_bad_one_is_refused(
    relay_factory, tmp_path, make_yjs_client: MakeYjsClient
):
    from crdtsync.auth import mint_token

    secret = "interop-secret-of-at-least-32-bytes-000"
    relay = relay_factory("relay.db", "--token-secret", secret)
    good = mint_token(secret, subject="yjs", docs={"team/*": "rw"}, ttl_s=600)
    bad = mint_token(secret + "x", subject="yjs", docs={"team/*": "rw"}, ttl_s=600)
    yjs = make_yjs_client(relay.url, "team/doc", params={"token": good})
    intruder = make_yjs_client(relay.url, "team/doc", params={"token": bad}, max_backoff_ms=200)
    await in_thread(yjs.wait_synced)
    await in_thread(yjs.edit, ["text_insert", "text", 0, "from yjs"])
    token = mint_token(secret, subject="py", docs={"team/*": "rw"}, ttl_s=600)
    async with Replica(tmp_path / "r.db", relay=relay.url, token=token) as replica:
        text = (await replica.open("team/doc")).get("text", type=Text)
        await eventually(lambda: str(text) == "from yjs", what="the stock client's edit")
        await in_thread(intruder.edit, ["text_insert", "text", 0, "intruder "])

        def refused_attempts() -> int:
            status = intruder.status()
            assert not status["synced"]
            assert not status["connected"]
            return int(status["unsuccessful_reconnects"])

        await eventually(lambda: refused_attempts() >= 2, what="refused reconnects")
        assert str(text) == "from yjs"
    assert relay_counters(relay.url)["refused_unauthorized"] >= 2
