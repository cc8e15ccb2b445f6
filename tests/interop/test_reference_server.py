"""Stock Yjs clients through the reference y-websocket server: the interop kit's baseline.

These tests prove the kit (``reference_server.mjs``, ``yjs_client.mjs``, ``nodekit.py``)
before anything of crdtsync is put between the clients.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Callable
from pathlib import Path

import pytest
from nodekit import MakeYjsClient, ReferenceServer

pytestmark = pytest.mark.interop

ROOTS = {"text": ["text"], "map": ["map"], "array": ["arr"]}


def test_offline_edits_of_stock_client_merge_with_peer_through_reference_server(
    reference_server: ReferenceServer, make_yjs_client: MakeYjsClient
) -> None:
    alice = make_yjs_client(reference_server.url, "notes")
    bob = make_yjs_client(reference_server.url, "notes", offline=True)
    alice.wait_synced()

    alice.edit(
        ["text_insert", "text", 0, "alice wrote this. "],
        ["map_set", "map", "by_alice", {"n": 1, "tags": ["x"]}],
        ["map_set", "map", "shared", "alice"],
        ["array_push", "arr", ["a1", "a2"]],
    )
    bob.edit(
        ["text_insert", "text", 0, "bob wrote this. "],
        ["map_set", "map", "by_bob", [1, 2]],
        ["map_set", "map", "shared", "bob"],
        ["array_push", "arr", ["b1"]],
    )

    # The premise: bob really is offline and holds only his own edits.
    bob_status = bob.status()
    assert (bob_status["connected"], bob_status["should_connect"]) == (False, False)
    assert bob.state(**ROOTS) == {
        "text": {"text": "bob wrote this. "},
        "map": {"map": {"by_bob": [1, 2], "shared": "bob"}},
        "array": {"arr": ["b1"]},
    }

    bob.connect()
    bob.wait_synced()
    # No deletes here, so holding the other's state vector means holding all its content.
    alice.wait_covers(bob.state_vector())
    bob.wait_covers(alice.state_vector())

    merged = alice.state(**ROOTS)
    assert bob.state(**ROOTS) == merged
    # Concurrent inserts at the same place and writes to the same key are ordered by Yjs
    # (by client id): either order is right, as long as both replicas agree (checked above).
    assert merged["text"]["text"] in {
        "alice wrote this. bob wrote this. ",
        "bob wrote this. alice wrote this. ",
    }
    assert merged["array"]["arr"] in (["a1", "a2", "b1"], ["b1", "a1", "a2"])
    shared = merged["map"]["map"]["shared"]
    assert shared in {"alice", "bob"}
    assert merged["map"]["map"] == {
        "by_alice": {"n": 1, "tags": ["x"]},
        "by_bob": [1, 2],
        "shared": shared,
    }
    assert alice.errors() == []
    assert bob.errors() == []


def test_stock_client_edits_made_while_disconnected_reach_peer_after_reconnect(
    reference_server: ReferenceServer, make_yjs_client: MakeYjsClient
) -> None:
    alice = make_yjs_client(reference_server.url, "doc/with/slashes")
    bob = make_yjs_client(reference_server.url, "doc/with/slashes")
    alice.wait_synced()
    bob.wait_synced()
    alice.edit(["text_insert", "text", 0, "hello world"])
    bob.wait_text("text", "hello world")

    bob.disconnect()
    assert bob.status()["connected"] is False
    # bob replaces "world", alice appends "!". Insert before deleting: "yjs" then sits
    # between " " and "w", while "!" follows "d", so no two inserts compete for one place
    # and the merge is exactly determined. (Deleting first would anchor "yjs" after the
    # deleted "d" too, and Yjs would order the two by client id.)
    bob.edit(["text_insert", "text", 6, "yjs"], ["text_delete", "text", 9, 5])
    bob.edit(["array_push", "arr", ["from bob, offline"]])
    alice.edit(["text_insert", "text", 11, "!"])
    assert alice.state(text=["text"])["text"] == {"text": "hello world!"}
    assert bob.state(text=["text"])["text"] == {"text": "hello yjs"}

    bob.connect()
    bob.wait_synced()
    for client in (alice, bob):
        client.wait_state(text={"text": "hello yjs!"}, array={"arr": ["from bob, offline"]})
    assert alice.errors() == []
    assert bob.errors() == []


def test_late_joining_stock_client_receives_document_from_reference_server(
    reference_server: ReferenceServer, make_yjs_client: MakeYjsClient
) -> None:
    writer = make_yjs_client(reference_server.url, "late")
    writer.wait_synced()
    writer.edit(
        ["text_insert", "text", 0, "naïve café ☕"],
        ["map_set", "map", "k", None],
        ["array_push", "arr", [True, 1.5, "s"]],
    )
    writer.close()  # only the server holds the document now

    reader = make_yjs_client(reference_server.url, "late")
    reader.wait_synced()
    assert reader.state() == {
        "text": {"text": "naïve café ☕"},
        "map": {"map": {"k": None}},
        "array": {"arr": [True, 1.5, "s"]},
        "untyped": [],
    }


@pytest.mark.slow
def test_editing_trace_typed_by_stock_client_reaches_reader_through_reference_server(
    reference_server: ReferenceServer,
    make_yjs_client: MakeYjsClient,
    trace_path: Callable[[str], Path],
) -> None:
    path = trace_path("sveltecomponent")
    with gzip.open(path, "rt", encoding="utf-8") as f:
        end_content = json.load(f)["endContent"]
    writer = make_yjs_client(reference_server.url, "trace")
    reader = make_yjs_client(reference_server.url, "trace")
    writer.wait_synced()
    reader.wait_synced()

    typed = writer.apply_trace(path)
    assert (typed["applied"], typed["total"], typed["matches_end"]) == (18335, 18335, True)

    reader.wait_text("text", end_content, timeout=60)
    assert reader.errors() == []


def test_stock_clients_restore_document_to_reference_server_restarted_on_same_port(
    reference_server: ReferenceServer, make_yjs_client: MakeYjsClient
) -> None:
    alice = make_yjs_client(reference_server.url, "crash")
    alice.wait_synced()
    alice.edit(["text_insert", "text", 0, "before the crash"])
    url = reference_server.url

    assert reference_server.kill() == -9  # SIGKILL: memory-only, so the document is gone
    # The client notices the dropped socket; provider.synced goes false.
    alice.wait_status(connected=False, synced=False)
    assert reference_server.restart() == url

    # The restarted server's step 1 (empty state vector) makes the client upload everything.
    alice.wait_synced(timeout=20)
    bob = make_yjs_client(url, "crash")
    bob.wait_text("text", "before the crash")
    assert alice.status()["closes"][0]["local"] is False
