"""A relay's SQLite store put back from a backup: the relay sees that its file holds less
than it once did (the positions recorded beside it), raises the store's epoch, and the
replicas that keep folders compare what they hold by digests and bring back what the
backup lacked (real relay processes on loopback)."""

from __future__ import annotations

import json
import sqlite3
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from helpers import RelayProcess, timeout_s
from pycrdt import Doc, Text
from stock import stored_text

from crdtsync.client import Replica
from crdtsync.store import UpdateLog, positions_path

pytestmark = pytest.mark.anyio


def health(relay: RelayProcess) -> dict[str, Any]:
    url = relay.url.replace("ws://", "http://")
    with urllib.request.urlopen(f"{url}/healthz?verbose=1", timeout=timeout_s(10)) as resp:
        data: dict[str, Any] = json.loads(resp.read())
    return data


def edit(doc: Doc[Any], text: str) -> None:
    t = doc.get("text", type=Text)
    t.insert(len(t), text)


def backup(store: Path, copy: Path) -> None:
    """An online backup (SQLite's backup API), as an operator takes one of a running relay."""
    source = sqlite3.connect(store)
    target = sqlite3.connect(copy)
    try:
        source.backup(target)
    finally:
        source.close()
        target.close()


def put_back(copy: Path, store: Path) -> None:
    """Restore: the backup replaces the store file (its write-ahead log goes with it)."""
    for suffix in ("-wal", "-shm"):
        Path(f"{store}{suffix}").unlink(missing_ok=True)
    store.write_bytes(copy.read_bytes())


def epoch_of(store: Path) -> int:
    with UpdateLog(store) as log:
        return log.identity()[1]


async def write_folder(replica: Replica, names: list[str], text: str) -> None:
    for name in names:
        edit(await replica.open(name), text)
    await replica.wait_synced_in("f/", timeout=timeout_s(30))


async def test_a_store_put_back_from_a_backup_is_recognised_and_refilled_by_the_replicas(
    relay_factory, tmp_path
):
    relay = relay_factory("relay.db")
    store = tmp_path / "relay.db"
    first = [f"f/{i:02d}" for i in range(10)]
    later = [f"f/{i:02d}" for i in range(10, 20)]
    async with Replica(tmp_path / "r.db", relay=relay.url) as replica:
        await replica.keep("f/")
        await write_folder(replica, first, "before the backup.")
        backup(store, tmp_path / "backup.db")
        await write_folder(replica, later, "after the backup.")
        await write_folder(replica, first[:1], " and an edit after it.")
    relay.terminate()
    assert epoch_of(store) == 1
    put_back(tmp_path / "backup.db", store)
    relay.restart()
    counters = health(relay)
    assert counters["restores_detected"] == 1
    assert epoch_of(store) == 2
    assert "put back from a backup" in relay.stderr()
    # The replica's cursor belongs to the old epoch: it compares by digests, and what
    # the backup lacks (ten documents, one edit) goes up again.
    async with Replica(tmp_path / "r.db", relay=relay.url) as replica:
        await replica.wait_synced_in("f/", timeout=timeout_s(30))
    assert health(relay)["folder_digest_exchanges"] == 1
    relay.terminate()
    assert stored_text(store, first[0]) == "before the backup. and an edit after it."
    for name in later:
        assert stored_text(store, name) == "after the backup."
    # Started again on the same file: nothing is raised twice.
    relay.restart()
    assert health(relay)["restores_detected"] == 0
    assert epoch_of(store) == 2


async def test_without_the_recorded_positions_a_restore_goes_unnoticed(relay_factory, tmp_path):
    # The negative control: the positions file is what the relay compares with. A backup
    # put back together with an old positions file is not noticed (then run
    # `crdtsync new-epoch`, README).
    relay = relay_factory("relay.db")
    store = tmp_path / "relay.db"
    async with Replica(tmp_path / "r.db", relay=relay.url) as replica:
        await replica.keep("f/")
        await write_folder(replica, ["f/a"], "one.")
        backup(store, tmp_path / "backup.db")
        old_positions = positions_path(store).read_bytes()
        await write_folder(replica, ["f/b"], "two.")
    relay.terminate()
    put_back(tmp_path / "backup.db", store)
    positions_path(store).write_bytes(old_positions)
    relay.restart()
    assert health(relay)["restores_detected"] == 0
    relay.terminate()
    assert epoch_of(store) == 1
