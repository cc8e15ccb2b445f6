"""Real editing traces typed into a replica arrive exactly at other replicas."""

from __future__ import annotations

import asyncio
import hashlib

import pytest
from helpers import eventually
from pycrdt import Text

from crdtsync.client import Replica
from crdtsync.testing.traces import TextMirror, find_trace, load_trace

pytestmark = pytest.mark.anyio

# SHA-256 of endContent (../shared/data/traces/README.md): an expectation independent of us.
END_SHA256 = {
    "automerge-paper": "a489e9022976c14e46627aea174d07797edcb3fd17df42605956d4cf01bf9039",
    "rustcode": "2cde7bd1dedbcd198e3f5a66a4135f120571a4349d48d057009f311622a0894c",
    "sveltecomponent": "d8bb93b7cf87b4c3a0394fddc028284a093d90d5794a213d1ccb0794eb4ede8f",
}


def sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@pytest.mark.slow
@pytest.mark.timeout(400)
# The automerge-paper trace takes ~75 s on 2 cores: in the longer set .ci/run also runs.
@pytest.mark.parametrize(
    "name", [pytest.param("automerge-paper", marks=pytest.mark.long), "rustcode"]
)
async def test_trace_typed_into_replica_arrives_exactly_at_live_and_late_replicas(
    relay, tmp_path, name
):
    path = find_trace(name)
    if path is None:
        pytest.skip(
            f"trace {name} not found (set CRDTSYNC_TRACES or keep ../shared beside the repo)"
        )
    trace = load_trace(path)
    assert sha(trace.end_content) == END_SHA256[name]
    async with (
        Replica(tmp_path / "writer.db", relay=relay.url) as writer,
        Replica(tmp_path / "reader.db", relay=relay.url) as reader,
    ):
        doc_w = await writer.open(name)
        doc_r = await reader.open(name)
        await eventually(lambda: reader.status(name).synced, what="reader synced")
        mirror = TextMirror(doc_w.get("text", type=Text))
        for n, patches in enumerate(trace.txns):
            with doc_w.transaction():
                mirror.apply(patches)
            if n % 2000 == 0:
                await asyncio.sleep(0)  # let the connection move frames, as an app's loop would
        assert mirror.content == trace.end_content
        await writer.wait_synced(name, timeout=300)
        text_r = doc_r.get("text", type=Text)
        await eventually(lambda: len(str(text_r)) == len(trace.end_content), timeout=120)
        assert sha(str(text_r)) == END_SHA256[name]

    # A third replica connects afterwards and gets everything from the relay's store.
    async with Replica(tmp_path / "late.db", relay=relay.url) as late:
        doc_l = await late.open(name)
        text_l = doc_l.get("text", type=Text)
        await eventually(lambda: late.status(name).synced, timeout=60, what="late replica synced")
        assert sha(str(text_l)) == END_SHA256[name]
