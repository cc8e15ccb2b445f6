"""Every file in examples/ runs here: scripts against a real relay, workloads on 3 docs.

Scripts run by path with ``sys.executable`` in a temporary directory. The repository
root is never put on ``sys.path``: its ``crdtsync/`` folder would shadow the installed
package mapping (``crdtsync.client`` lives in ``client/``). Workload modules are loaded
in-process from their files instead, with ``importlib.util.spec_from_file_location``.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import random
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from helpers import timeout_s
from pycrdt import Array, Doc, Text

from crdtsync.store import UpdateLog
from crdtsync.updates import check_update

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"

Edit = Callable[[Doc[Any], random.Random], str]


# -- running scripts --------------------------------------------------------------------


def run_example(
    script: str, *args: str, cwd: Path, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """Run ``examples/<script>`` by path; stdout and stderr are captured as UTF-8."""
    env = {
        k: v
        for k, v in os.environ.items()
        # a CRDTSYNC_* setting of the developer's would change the embedded relay
        if k != "PYTHONPATH" and (not k.startswith("CRDTSYNC_") or k.endswith("TIMEOUT_FACTOR"))
    }
    env["PYTHONIOENCODING"] = "utf-8"
    return subprocess.run(
        [sys.executable, str(EXAMPLES / script), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        encoding="utf-8",
        timeout=timeout_s(timeout),
        check=False,
    )


def ok(result: subprocess.CompletedProcess[str]) -> list[str]:
    """The lines a script printed, after checking it exited 0."""
    assert result.returncode == 0, (
        f"{result.args} exited {result.returncode}\n"
        f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    )
    return result.stdout.splitlines()


def stored_doc(store: Path, name: str) -> Doc[Any]:
    """Document ``name`` as a relay's (or replica's) SQLite store holds it."""
    doc: Doc[Any] = Doc()
    with UpdateLog(store) as log, doc.transaction():
        for update in log.load(name).all_updates():
            doc.apply_update(update)
    return doc


def test_quickstart_syncs_to_the_relay_and_exits_once_stored(relay, tmp_path):
    lines = ok(run_example("quickstart.py", "--relay", relay.url, "--db", "notes.db", cwd=tmp_path))
    assert lines == [
        "pending: 1",
        "DocumentStatus(connected=True, synced=True, pending=0, acknowledgements=True,"
        " last_error=None)",
        "pending: 0",
    ]
    assert (tmp_path / "notes.db").exists()
    assert stored_doc(relay.store, "team/todo").get("items", type=Array).to_py() == ["buy milk"]


def test_quickstart_without_a_relay_keeps_the_edit_and_exits_1(tmp_path):
    result = run_example(
        "quickstart.py", "--relay", "ws://127.0.0.1:9", "--timeout", "0.3", cwd=tmp_path
    )
    assert result.returncode == 1
    assert result.stdout.splitlines() == ["pending: 1"]
    assert "not synced: 1 changes to 'team/todo' still pending" in result.stderr
    # the default --db, with the edit kept and still pending
    with UpdateLog(tmp_path / "notes.db") as log:
        assert log.pending_count("team/todo") == 1
    assert stored_doc(tmp_path / "notes.db", "team/todo").get("items", type=Array).to_py() == [
        "buy milk"
    ]


def test_offline_notes_added_offline_then_synced_reach_a_second_replica(relay, tmp_path):
    assert ok(run_example("offline_notes.py", "add", "first note", cwd=tmp_path)) == [
        "added: first note (1 pending)"
    ]
    assert ok(run_example("offline_notes.py", "add", "café ☕ second", cwd=tmp_path)) == [
        "added: café ☕ second (2 pending)"
    ]
    assert ok(run_example("offline_notes.py", "list", cwd=tmp_path)) == [
        "1. first note",
        "2. café ☕ second",
    ]
    assert ok(run_example("offline_notes.py", "sync", "--relay", relay.url, cwd=tmp_path)) == [
        "synced: 2 notes, 0 pending"
    ]
    # A second replica, from an empty file, gets both notes from the relay.
    other = ("--db", "laptop.db", "--relay", relay.url)
    assert ok(run_example("offline_notes.py", "list", *other, cwd=tmp_path)) == [
        "1. first note",
        "2. café ☕ second",
    ]
    # ...and an online add there is stored by the relay before the command returns.
    assert ok(run_example("offline_notes.py", "add", "from the laptop", *other, cwd=tmp_path)) == [
        "added: from the laptop (0 pending)"
    ]
    assert stored_doc(relay.store, "notes").get("notes", type=Array).to_py() == [
        "first note",
        "café ☕ second",
        "from the laptop",
    ]


def test_offline_notes_sync_needs_a_relay_and_fails_when_unreachable(tmp_path):
    result = run_example("offline_notes.py", "sync", cwd=tmp_path)
    assert result.returncode == 2
    assert "sync needs --relay" in result.stderr

    unreachable = ("--relay", "ws://127.0.0.1:9", "--timeout", "0.3")
    assert ok(run_example("offline_notes.py", "add", "kept", *unreachable, cwd=tmp_path)) == [
        "added: kept (1 pending)"
    ]
    result = run_example("offline_notes.py", "sync", *unreachable, cwd=tmp_path)
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.startswith("not synced: relay not reachable: cannot connect")
    # list still works offline, with a warning on stderr
    result = run_example("offline_notes.py", "list", *unreachable, cwd=tmp_path)
    assert ok(result) == ["1. kept"]
    assert result.stderr.startswith("offline: relay not reachable")


def test_embedded_relay_serves_two_replicas_in_process_then_exits(tmp_path):
    lines = ok(run_example("embedded_relay.py", "--store", "relay.db", cwd=tmp_path))
    assert len(lines) == 4, lines
    assert re.fullmatch(r"relay listening on ws://127\.0\.0\.1:\d+", lines[0]), lines[0]
    assert lines[1:] == [
        "replica a: 0 pending",
        "replica b sees: hello from an embedded relay ✓",
        "relay stopped",
    ]
    text = stored_doc(tmp_path / "relay.db", "demo/notes").get("text", type=Text)
    assert str(text) == "hello from an embedded relay ✓"


# -- workloads ------------------------------------------------------------------------

WORKLOADS = ["todo", "richtext"]


@functools.cache
def load_workload(name: str) -> ModuleType:
    """``examples/workloads/<name>.py`` loaded from its file (see the module docstring)."""
    path = EXAMPLES / "workloads" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"_crdtsync_example_workload_{name}", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Peer:
    """A pycrdt Doc that records the update of each of its local transactions."""

    def __init__(self, client_id: int) -> None:
        self.doc: Doc[Any] = Doc(client_id=client_id)
        self.inbox: list[bytes] = []
        self.emitted: list[bytes] = []
        self.subscription = self.doc.observe(lambda event: self.emitted.append(event.update))

    def receive(self, updates: list[bytes]) -> None:
        for update in updates:
            self.doc.apply_update(update)
        self.emitted.clear()  # remote updates are not this peer's edits


def run_workload(
    workload: ModuleType, seed: int, edits_per_doc: int = 300, n_docs: int = 3
) -> tuple[list[Peer], list[str], list[bytes], list[str]]:
    """Each doc makes ``edits_per_doc`` edits while receiving the others' updates late,
    shuffled, some twice; then every doc receives everything that is left, shuffled.

    Returns the peers, the edit ids, every edit's update and snapshots of doc 0's view
    (as JSON).
    """
    edit: Edit = workload.edit
    schedule = random.Random(seed)
    peers = [Peer(client_id=1000 + i) for i in range(n_docs)]
    rngs = [random.Random(f"{seed}/{i}") for i in range(n_docs)]
    remaining = [edits_per_doc] * n_docs
    ids: list[str] = []
    updates: list[bytes] = []
    snapshots: list[str] = []
    while any(remaining):
        i = schedule.choice([k for k in range(n_docs) if remaining[k]])
        peer = peers[i]
        # Deliver a random part of what is waiting, in random order; keep some to deliver again.
        picked = set(schedule.sample(range(len(peer.inbox)), schedule.randint(0, len(peer.inbox))))
        batch = [u for k, u in enumerate(peer.inbox) if k in picked]
        schedule.shuffle(batch)
        peer.receive(batch)
        peer.inbox = [u for k, u in enumerate(peer.inbox) if k not in picked]
        peer.inbox += [u for u in batch if schedule.random() < 0.05]
        with peer.doc.transaction():
            ids.append(edit(peer.doc, rngs[i]))
        assert len(peer.emitted) == 1, f"edit {ids[-1]} made {len(peer.emitted)} updates"
        update = peer.emitted.pop()
        check_update(update)  # the relay would accept it
        updates.append(update)
        for other in peers:
            if other is not peer:
                other.inbox.append(update)
        remaining[i] -= 1
        if i == 0 and remaining[0] % 20 == 0:
            snapshots.append(json.dumps(workload.view(peer.doc), ensure_ascii=False))
    for peer in peers:
        schedule.shuffle(peer.inbox)
        peer.receive(peer.inbox)
        peer.inbox = []
    return peers, ids, updates, snapshots


@pytest.mark.parametrize("name", WORKLOADS)
def test_workload_converges_on_three_docs_with_unique_ids_and_deletions(name):
    workload = load_workload(name)
    peers, ids, updates, snapshots = run_workload(workload, seed=20240501)

    views = [workload.view(p.doc) for p in peers]
    assert views[1] == views[0]
    assert views[2] == views[0]
    infos = [check_update(p.doc.get_update()) for p in peers]
    assert infos[1].state == infos[0].state == infos[2].state
    assert set(infos[0].state) == {1000, 1001, 1002}
    assert len(ids) == len(set(ids)) == 900
    assert all(isinstance(i, str) and i for i in ids)
    assert len(updates) == 900  # one non-empty update per edit (checked as they came)
    # Not append-only: the final state carries deletions from every replica.
    assert set(infos[0].deletes) == {1000, 1001, 1002}
    assert all(p.doc.get_update() != b"\x00\x00" for p in peers)
    # Non-ASCII text went through pycrdt's byte-indexed Text intact.
    assert any(re.search(r"[^\x00-\x7f]", s) for s in snapshots)
    assert not any("\ufffd" in s for s in snapshots)


@pytest.mark.parametrize("name", WORKLOADS)
def test_workload_uses_only_its_rng(name):
    """Same seed, same schedule, same client ids: the same documents. Another seed: not."""
    workload = load_workload(name)
    first, ids_a, _, _ = run_workload(workload, seed=5, edits_per_doc=60)
    again, ids_b, _, _ = run_workload(workload, seed=5, edits_per_doc=60)
    other, _, _, _ = run_workload(workload, seed=6, edits_per_doc=60)
    assert workload.view(again[0].doc) == workload.view(first[0].doc)
    assert workload.view(other[0].doc) != workload.view(first[0].doc)
    assert not set(ids_a) & set(ids_b)  # ids stay unique across runs in one process


def test_todo_workload_exercises_toggles_tags_and_non_ascii_titles():
    _, _, _, snapshots = run_workload(load_workload("todo"), seed=11)
    items = [item for s in snapshots for item in json.loads(s)]
    assert any(item["done"] for item in items)
    assert any(item["tags"] for item in items)
    assert any(re.search(r"[^\x00-\x7f]", item["title"]) for item in items)


def test_richtext_workload_exercises_formatting_and_title():
    _, _, _, snapshots = run_workload(load_workload("richtext"), seed=11)
    views = [json.loads(s) for s in snapshots]
    chunks = [chunk for v in views for p in v["paragraphs"] for chunk in p]
    formats = {key for _, attrs in chunks if attrs for key in attrs}
    assert formats == {"bold", "italic", "link", "color"}
    assert any(v["title"] for v in views)
    assert any(len(v["paragraphs"]) > 1 for v in views)


def test_workloads_import_by_module_name_from_the_repository_root(tmp_path):
    """``examples.workloads.todo:edit`` resolves from the repo root, as ``check`` will name it."""
    code = (
        "import importlib, inspect\n"
        "for name in ('todo', 'richtext'):\n"
        "    fn = getattr(importlib.import_module(f'examples.workloads.{name}'), 'edit')\n"
        "    print(name, list(inspect.signature(fn).parameters))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout_s(30),
        check=False,
    )
    assert ok(result) == ["todo ['doc', 'rng']", "richtext ['doc', 'rng']"]


def test_workloads_readme_documents_every_workload():
    readme = (EXAMPLES / "workloads" / "README.md").read_text()
    for name in WORKLOADS:
        assert f"`examples.workloads.{name}:edit`" in readme
    assert "def edit(doc: pycrdt.Doc, rng: random.Random) -> str:" in readme


# -- every example is covered -------------------------------------------------------------

COVERED = {
    "quickstart.py": test_quickstart_syncs_to_the_relay_and_exits_once_stored,
    "offline_notes.py": test_offline_notes_added_offline_then_synced_reach_a_second_replica,
    "embedded_relay.py": test_embedded_relay_serves_two_replicas_in_process_then_exits,
    "workloads/__init__.py": test_workloads_import_by_module_name_from_the_repository_root,
    "workloads/todo.py": test_workload_converges_on_three_docs_with_unique_ids_and_deletions,
    "workloads/richtext.py": test_workload_converges_on_three_docs_with_unique_ids_and_deletions,
    "workloads/README.md": test_workloads_readme_documents_every_workload,
}


def test_every_file_in_examples_has_a_test():
    files = {
        p.relative_to(EXAMPLES).as_posix()
        for p in EXAMPLES.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    }
    assert files - COVERED.keys() == set(), "examples without a test: add one to COVERED"
    assert COVERED.keys() - files == set(), "COVERED names examples that no longer exist"
    assert set(WORKLOADS) == {
        Path(f).stem for f in files if f.startswith("workloads/") and f.endswith(".py")
    } - {"__init__"}
