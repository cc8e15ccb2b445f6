"""Operating a relay: /metrics scraped and parsed, log lines parsed with their context."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from datetime import datetime
from typing import Any

import pytest
from helpers import eventually, timeout_s
from prometheus_client.parser import text_string_to_metric_families
from pycrdt import Text
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from crdtsync.client import Replica

pytestmark = pytest.mark.anyio

METRICS_TOKEN = "scrape-me-0123456789"


def scrape(relay: Any, token: str | None = METRICS_TOKEN) -> dict[tuple[str, tuple], float]:
    """Every sample of /metrics as {(name, sorted labels): value}."""
    url = relay.url.replace("ws://", "http://", 1) + "/metrics"
    request = urllib.request.Request(url)
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    with urllib.request.urlopen(request, timeout=10) as resp:
        assert resp.headers["Content-Type"].startswith("text/plain; version=")
        text = resp.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def health(relay: Any) -> dict[str, Any]:
    url = relay.url.replace("ws://", "http://", 1)
    with urllib.request.urlopen(f"{url}/healthz?verbose=1", timeout=10) as resp:
        data: dict[str, Any] = json.loads(resp.read())
    return data


async def test_metrics_count_what_the_test_did(relay_factory, tmp_path, monkeypatch):
    monkeypatch.setenv("CRDTSYNC_METRICS_TOKEN", METRICS_TOKEN)
    relay = relay_factory()
    for token in (None, "wrong"):
        with pytest.raises(urllib.error.HTTPError) as refused:
            scrape(relay, token=token)
        refused.value.close()  # (it holds the response's socket)
        assert refused.value.code == 401
    before = scrape(relay)
    assert before[("crdtsync_updates_stored_total", ())] == 0
    async with Replica(tmp_path / "r.db", relay=relay.url) as replica:
        text = (await replica.open("ops/doc")).get("text", type=Text)
        for n in range(5):
            text.insert(len(text), f"{n} ")
            await replica.wait_synced("ops/doc", timeout=timeout_s(10))
        during = scrape(relay)
        assert during[("crdtsync_connections", (("access", "rw"), ("extensions", "yes")))] == 1
        assert during[("crdtsync_rooms", ())] == 1
        assert during[("crdtsync_updates_stored_total", ())] == 5
        assert during[("crdtsync_acknowledgements_total", ())] == 5
        assert during[("crdtsync_store_commit_seconds_count", ())] == 5
        assert during[("crdtsync_join_seconds_count", ())] == 1
        assert during[("crdtsync_presence_states", ())] >= 0
    # A document name the relay refuses: closed with 1008, counted under that code.
    async with connect(f"{relay.url}/bad/../name") as ws:
        with pytest.raises(ConnectionClosed):
            await ws.recv()
    await eventually(lambda: health(relay)["connections"] == 0, what="connections closed")
    after = scrape(relay)
    assert after[("crdtsync_connections_closed_total", (("code", "1008"),))] == 1
    closed = sum(v for (n, _), v in after.items() if n == "crdtsync_connections_closed_total")
    assert closed == 1 + 1  # the replica's connection too (1000 on close)
    assert after[("crdtsync_connections", (("access", "rw"), ("extensions", "yes")))] == 0
    assert after[("crdtsync_bytes_received_total", ())] > 0
    assert after[("crdtsync_refusals_total", (("reason", "integrity"),))] == 0
    # Nothing names a document or a subject.
    assert not any("ops/doc" in str(labels) for _, labels in after)


async def test_log_lines_are_json_with_their_context(relay_factory, tmp_path):
    relay = relay_factory()
    async with Replica(tmp_path / "r.db", relay=relay.url) as replica:
        text = (await replica.open("ops/logged")).get("text", type=Text)
        for n in range(3):
            text.insert(len(text), f"{n} ")
        await replica.wait_synced("ops/logged", timeout=timeout_s(10))

    def lines() -> list[dict[str, Any]]:
        return [json.loads(line) for line in relay.stderr(1_000_000).splitlines() if line]

    await eventually(lambda: any(e.get("event") == "close" for e in lines()), what="the close line")
    entries = lines()
    for entry in entries:
        datetime.fromisoformat(entry["time"].replace("Z", "+00:00"))  # ISO 8601
        assert {"level", "logger", "message"} <= entry.keys()
    (opened,) = [e for e in entries if e.get("event") == "open"]
    (closed,) = [e for e in entries if e.get("event") == "close"]
    assert opened["document"] == closed["document"] == "ops/logged"
    assert opened["connection"] == closed["connection"]
    assert opened["peer"] == "127.0.0.1"
    assert (opened["access"], opened["extensions"]) == ("rw", True)
    assert closed["code"] == 1000
    assert closed["updates_stored"] == health(relay)["updates_stored"] >= 1
    assert closed["messages_in"] >= 3
    assert closed["duration_s"] >= 0


async def test_text_log_format_for_a_terminal(relay_factory, tmp_path):
    relay = relay_factory("relay.db", "--log-format", "text")
    async with Replica(tmp_path / "r.db", relay=relay.url) as replica:
        await replica.open("ops/text")
        await eventually(lambda: replica.status("ops/text").connected, what="a connection")
    await eventually(lambda: "connection closed" in relay.stderr(), what="the close line")
    line = next(li for li in relay.stderr().splitlines() if "connection opened" in li)
    # (the document's channel; its multiplexed connection has lines of its own)
    assert "document=ops/text" in line
    assert "INFO" in line
