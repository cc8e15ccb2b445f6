"""The synchronous facade, used from plain threads with no event loop of their own."""

from __future__ import annotations

import threading
import time

import pytest
from pycrdt import Map, Text

from crdtsync.client import SyncReplica
from crdtsync.errors import SyncTimeout


def test_sync_replica_edits_from_two_threads_reach_relay_without_joining_transactions(
    relay, tmp_path
):
    with (
        SyncReplica(tmp_path / "a.db", relay=relay.url) as a,
        SyncReplica(tmp_path / "b.db", relay=relay.url) as b,
    ):
        doc_a = a.open("threads")
        doc_b = b.open("threads")
        errors: list[BaseException] = []

        def writer(prefix: str) -> None:
            try:
                for i in range(200):
                    with doc_a.transaction():
                        doc_a.get("marks", type=Map)[f"{prefix}{i}"] = i
                        doc_a.get("text", type=Text).insert(0, prefix)
            except BaseException as exc:  # surfaced below
                errors.append(exc)

        # Meanwhile B streams edits that A's loop thread applies as remote updates.
        threads = [threading.Thread(target=writer, args=(p,)) for p in ("x", "y")]
        for t in threads:
            t.start()
        for i in range(200):
            doc_b.get("marks", type=Map)[f"b{i}"] = i
        for t in threads:
            t.join(60)
        assert errors == []
        assert not any(t.is_alive() for t in threads)
        # 400 local transactions, each stored and counted once: none joined a remote one.
        a.wait_synced("threads", timeout=20)
        b.wait_synced("threads", timeout=20)
        assert a.pending("threads") == 0

    with SyncReplica(tmp_path / "check.db", relay=relay.url) as c:
        doc = c.open("threads")
        marks = doc.get("marks", type=Map)
        deadline_ok = False
        for _ in range(200):  # bounded: at most ~10 s
            if len(marks) == 600:
                deadline_ok = True
                break
            threading.Event().wait(0.05)
        assert deadline_ok, f"{len(marks)} of 600 marks arrived"
        assert sorted(str(doc.get("text", type=Text))) == sorted("x" * 200 + "y" * 200)


def test_sync_replica_wait_synced_times_out_offline(tmp_path):
    with SyncReplica(tmp_path / "a.db", relay="ws://127.0.0.1:9") as a:
        doc = a.open("offline")
        doc.get("text", type=Text).insert(0, "x")
        assert a.pending("offline") == 1
        with pytest.raises(SyncTimeout, match="1 changes to 'offline' still pending"):
            a.wait_synced("offline", timeout=0.3)


def test_sync_replica_keeps_a_folder_it_never_opened(relay, tmp_path):
    with (
        SyncReplica(tmp_path / "a.db", relay=relay.url) as a,
        SyncReplica(tmp_path / "b.db", relay=relay.url) as b,
    ):
        b.keep("notes/")
        assert b.kept() == ["notes/"]
        for i in range(3):
            a.open(f"notes/{i}").get("text", type=Text).insert(0, f"note {i}")
            a.wait_synced(f"notes/{i}", timeout=10)
        # (The relay announces each after its commit: wait for the last one to land.)
        deadline = time.monotonic() + 10
        while b.documents("notes/") != ["notes/0", "notes/1", "notes/2"]:
            assert time.monotonic() < deadline, b.documents("notes/")
            time.sleep(0.05)
        b.wait_synced_in("notes/", timeout=10)
        status = b.folder_status("notes/")
        assert (status.caught_up, status.to_sync, status.pending) == (True, 0, 0)
        assert b.pending_in("notes/") == 0
        b.unkeep("notes/")
        assert b.kept() == []
