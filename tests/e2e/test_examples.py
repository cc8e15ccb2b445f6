"""Every file in examples/ runs here: scripts against a real relay, workloads on 3 docs.

Scripts run by path with ``sys.executable`` in a temporary directory. The repository
root is never put on ``sys.path``: its ``crdtsync/`` folder would shadow the installed
package mapping (``crdtsync.client`` lives in ``client/``). Workload modules are loaded
from their files instead, with ``importlib.util.spec_from_file_location``, in a child
process that can be killed if pycrdt never returns (see :func:`run_workload_in_child`).
"""

from __future__ import annotations

import functools
import importlib.util
import itertools
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
from helpers import AsgiRelayProcess, RelayProcess, timeout_s
from pycrdt import Array, Doc, Map, Text

from crdtsync.store import UpdateLog
from crdtsync.updates import check_update

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"

Edit = Callable[[Doc[Any], random.Random], str]


# -- running scripts --------------------------------------------------------------------


def child_env() -> dict[str, str]:
    """This environment without PYTHONPATH (see the module docstring) or CRDTSYNC_ settings."""
    env = {
        k: v
        for k, v in os.environ.items()
        # a CRDTSYNC_* setting of the developer's would change the embedded relay
        if k != "PYTHONPATH" and (not k.startswith("CRDTSYNC_") or k.endswith("TIMEOUT_FACTOR"))
    }
    env["PYTHONIOENCODING"] = "utf-8"
    return env


def run_example(
    script: str, *args: str, cwd: Path, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """Run ``examples/<script>`` by path; stdout and stderr are captured as UTF-8."""
    return subprocess.run(
        [sys.executable, str(EXAMPLES / script), *args],
        cwd=cwd,
        env=child_env(),
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


def test_quickstart_syncs_to_the_relay_and_exits_once_stored(
    relay: RelayProcess, tmp_path: Path
) -> None:
    lines = ok(run_example("quickstart.py", "--relay", relay.url, "--db", "notes.db", cwd=tmp_path))
    assert lines == [
        "pending: 1",
        "DocumentStatus(connected=True, synced=True, pending=0, acknowledgements=True,"
        f" last_error=None, quarantined=0, refused=0, stopped=False, relay='{relay.url}')",
        "pending: 0",
    ]
    assert (tmp_path / "notes.db").exists()
    assert stored_doc(relay.store, "team/todo").get("items", type=Array).to_py() == ["buy milk"]


def test_quickstart_without_a_relay_keeps_the_edit_and_exits_1(tmp_path: Path) -> None:
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


def test_offline_notes_added_offline_then_synced_reach_a_second_replica(
    relay: RelayProcess, tmp_path: Path
) -> None:
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


def test_offline_notes_sync_needs_a_relay_and_fails_when_unreachable(tmp_path: Path) -> None:
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


def test_embedded_relay_serves_two_replicas_in_process_then_exits(tmp_path: Path) -> None:
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


def test_fastapi_app_serves_replicas_behind_its_api_keys_and_drains_at_shutdown(
    tmp_path: Path,
) -> None:
    import asyncio
    import urllib.error
    import urllib.request

    from websockets.asyncio.client import connect
    from websockets.exceptions import InvalidStatus

    from crdtsync.client import Replica

    pytest.importorskip("uvicorn", reason="the asgi extra: pip install -e '.[asgi]'")
    pytest.importorskip("fastapi", reason="the asgi extra: pip install -e '.[asgi]'")
    served = AsgiRelayProcess(tmp_path / "app.db", tmp_path, user="ann").start()
    key = served.key

    async def handshake(target: str) -> int:
        try:
            async with connect(f"{served.url}/{target}"):
                return 101
        except InvalidStatus as exc:
            return exc.response.status_code

    async def scenario() -> str:
        # The app's middleware refuses before the relay sees the handshake; the relay's
        # authorize hook decides per document from the user the middleware named.
        assert await handshake("notes/1") == 401
        assert await handshake("notes/1?key=wrong") == 401
        assert await handshake(f"private/bob/diary?key={key}") == 403
        assert await handshake(f"private/ann/diary?key={key}") == 101
        async with Replica(tmp_path / "ann.db", relay=served.url, params={"key": key}) as ann:
            text = (await ann.open("notes/1")).get("text", type=Text)
            text.insert(0, "through FastAPI")
            await ann.wait_synced("notes/1", timeout=timeout_s(10))
            return str(text)

    try:
        assert asyncio.run(scenario()) == "through FastAPI"
        request = urllib.request.Request(
            served.http.removesuffix("/sync") + "/me", headers={"Authorization": f"Bearer {key}"}
        )
        with urllib.request.urlopen(request, timeout=timeout_s(10)) as resp:
            assert json.loads(resp.read()) == {"user": "ann"}
        with urllib.request.urlopen(f"{served.http}/readyz", timeout=timeout_s(10)) as resp:
            assert resp.read() == b"ready\n"
    finally:
        code = served.terminate()
    # uvicorn shuts down gracefully on SIGTERM, then raises it again (its exit status).
    assert code in (0, -15), served.output()[-3000:]
    # It ran the relay's lifespan: the relay drained and closed the store at shutdown.
    assert "Application shutdown complete" in served.output(), served.output()[-3000:]
    assert str(stored_doc(tmp_path / "app.db", "notes/1").get("text", type=Text)) == (
        "through FastAPI"
    )


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

    def sync_with(self, other: Peer) -> None:
        """Sync step 1/2 both ways, as a replica and a relay do on every (re)connect."""
        self.receive([other.doc.get_update(self.doc.get_state())])
        other.receive([self.doc.get_update(other.doc.get_state())])


def run_workload(
    workload: ModuleType, seed: int, edits_per_doc: int = 300, n_docs: int = 3
) -> tuple[list[Peer], list[str], list[bytes], list[str]]:
    """Each doc makes ``edits_per_doc`` edits while receiving the others' updates late,
    in random order and some twice; then every doc receives all that is left, shuffled,
    and the docs run one state-vector sync, as replicas do when they reconnect (pycrdt
    needs it after out-of-order delivery: see
    :func:`test_pycrdt_out_of_order_updates_can_drop_an_item_until_a_state_vector_sync`).

    Returns the peers, the edit ids, every edit's update (in the order the edits were
    made) and snapshots of doc 0's view (as JSON) along the way.
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
    for a, b in itertools.combinations(peers, 2):
        a.sync_with(b)
    return peers, ids, updates, snapshots


def workload_summary(name: str, seed: int, edits_per_doc: int) -> dict[str, Any]:
    """Run workload ``name`` (see :func:`run_workload`); what the tests check, as JSON values."""
    workload = load_workload(name)
    peers, ids, updates, snapshots = run_workload(workload, seed, edits_per_doc)
    reference: Doc[Any] = Doc()  # the updates applied in the order the edits were made
    for update in updates:
        reference.apply_update(update)
    # The delete set from the reference: after out-of-order delivery, pycrdt 0.14.13 can
    # encode a peer's whole state with a skip of ~2^32 (a u32 underflow), which
    # check_update refuses; the causally applied reference never does.
    deletes = check_update(reference.get_update()).deletes
    summary = {
        "ids": ids,
        "updates": len(updates),
        "views": [workload.view(p.doc) for p in peers],
        "reference": workload.view(reference),
        "states": [sorted(state_vector(p.doc.get_state()).items()) for p in peers],
        "deleting_clients": sorted(deletes),
        "snapshots": snapshots,
    }
    # tuples become lists, as they will for the parent
    result: dict[str, Any] = json.loads(json.dumps(summary, ensure_ascii=False))
    return result


def state_vector(data: bytes) -> dict[int, int]:
    """Decode an encoded state vector: var-uint count, then (client, clock) var-uint pairs."""
    pos = 0

    def uint() -> int:
        nonlocal pos
        value = shift = 0
        while True:
            byte = data[pos]
            pos += 1
            value |= (byte & 0x7F) << shift
            shift += 7
            if byte < 0x80:
                return value

    pairs = [(uint(), uint()) for _ in range(uint())]
    assert pos == len(data)
    return dict(pairs)


# Workloads run in a child process: one that mixes up code points and UTF-8 bytes can
# send pycrdt into an endless loop in Rust that holds the GIL, which no in-process
# timeout (pytest-timeout's signal or thread method) can stop; a child can be killed.
_CHILD = (
    "import json, sys; sys.path[:0] = sys.argv[1:3]; import test_examples as t; "
    "print(json.dumps(t.workload_summary(sys.argv[3], int(sys.argv[4]), int(sys.argv[5])),"
    " ensure_ascii=False))"
)


def run_workload_in_child(
    name: str, seed: int, cwd: Path, edits_per_doc: int = 300
) -> dict[str, Any]:
    here = Path(__file__).resolve().parent
    args = [str(here.parent), str(here), name, str(seed), str(edits_per_doc)]
    limit = timeout_s(60)
    try:
        result = subprocess.run(
            [sys.executable, "-c", _CHILD, *args],
            cwd=cwd,  # not the repo root: see the module docstring
            env=child_env(),
            capture_output=True,
            text=True,
            encoding="utf-8",
            timeout=limit,
            check=False,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(
            f"workload {name!r} (seed {seed}) still running after {limit} s: pycrdt loops "
            "forever on some Text offsets inside a character; are positions UTF-8 bytes?"
        )
    summary: dict[str, Any] = json.loads(ok(result)[-1])
    return summary


@pytest.mark.parametrize("name", WORKLOADS)
def test_workload_converges_on_three_docs_with_unique_ids_and_deletions(
    name: str, tmp_path: Path
) -> None:
    s = run_workload_in_child(name, seed=20240501, cwd=tmp_path)
    # Converged, and to what the updates give when applied in the order they were made.
    assert s["views"][0] == s["reference"]
    assert s["views"][1] == s["views"][0]
    assert s["views"][2] == s["views"][0]
    assert s["states"][1] == s["states"][0] == s["states"][2]
    assert [client for client, _ in s["states"][0]] == [1000, 1001, 1002]
    assert len(s["ids"]) == len(set(s["ids"])) == 900
    assert all(isinstance(i, str) and i for i in s["ids"])
    assert s["updates"] == 900  # one non-empty update per edit (checked as they came)
    # Not append-only: the final state carries deletions made by every replica's edits.
    assert s["deleting_clients"] == [1000, 1001, 1002]
    # Non-ASCII text went through pycrdt's byte-indexed Text intact.
    assert any(re.search(r"[^\x00-\x7f]", snap) for snap in s["snapshots"])
    assert not any("\ufffd" in snap for snap in s["snapshots"])


def test_pycrdt_out_of_order_updates_can_drop_an_item_until_a_state_vector_sync() -> None:
    """Known pycrdt 0.14.13 (Yrs 0.28) behaviour the workload harness works around.

    Three updates of one client, the first applied last: the item of the third is
    dropped (Yjs 13.6 gives ``{"done": true, "other": "x"}`` for every order). The
    state vector stays honest (it lacks the dropped clock), so a state-vector sync
    repairs it, as replicas do on every reconnect. If this test fails, pycrdt fixed
    it: delete this test and the sync round in :func:`run_workload`.
    """
    source: Doc[Any] = Doc(client_id=1)
    updates: list[bytes] = []
    source.observe(lambda event: updates.append(event.update))
    m = source.get("m", type=Map)
    m["done"] = False
    m["other"] = "x"
    m["done"] = True  # replaces (deletes) the first "done"

    late = Peer(client_id=2)
    late.receive([updates[1], updates[2], updates[0]])
    assert late.doc.get("m", type=Map).to_py() == {"other": "x"}  # "done" is lost
    late.sync_with(_peer_holding(source))
    assert late.doc.get("m", type=Map).to_py() == {"done": True, "other": "x"}


def _peer_holding(doc: Doc[Any]) -> Peer:
    peer = Peer(client_id=3)
    peer.receive([doc.get_update()])
    return peer


@pytest.mark.parametrize("name", WORKLOADS)
def test_workload_uses_only_its_rng(name: str, tmp_path: Path) -> None:
    """Same seed, same schedule, same client ids: the same documents. Another seed: not."""
    first = run_workload_in_child(name, seed=5, cwd=tmp_path, edits_per_doc=60)
    again = run_workload_in_child(name, seed=5, cwd=tmp_path, edits_per_doc=60)
    other = run_workload_in_child(name, seed=6, cwd=tmp_path, edits_per_doc=60)
    assert again["views"] == first["views"]
    # (parsed: pycrdt orders the keys of formatting attributes differently in each process)
    assert [json.loads(v) for v in again["snapshots"]] == [
        json.loads(v) for v in first["snapshots"]
    ]
    assert other["views"] != first["views"]


def test_todo_workload_exercises_toggles_tags_and_non_ascii_titles(tmp_path: Path) -> None:
    snapshots = run_workload_in_child("todo", seed=11, cwd=tmp_path)["snapshots"]
    items = [item for snap in snapshots for item in json.loads(snap)]
    assert any(item.get("done") for item in items)
    assert any(item["tags"] for item in items)
    assert any(re.search(r"[^\x00-\x7f]", item["title"]) for item in items)


def test_richtext_workload_exercises_formatting_and_title(tmp_path: Path) -> None:
    snapshots = run_workload_in_child("richtext", seed=11, cwd=tmp_path)["snapshots"]
    views = [json.loads(snap) for snap in snapshots]
    chunks = [chunk for v in views for p in v["paragraphs"] for chunk in p]
    formats = {key for _, attrs in chunks if attrs for key in attrs}
    assert formats == {"bold", "italic", "link", "color"}
    assert any(v["title"] for v in views)
    assert any(len(v["paragraphs"]) > 1 for v in views)


def test_workloads_import_by_module_name_from_the_repository_root(tmp_path: Path) -> None:
    """``examples.workloads.todo:edit`` resolves from the repo root, as ``check`` will name it."""
    code = (
        "import importlib, inspect\n"
        "for name in ('todo', 'richtext'):\n"
        "    fn = getattr(importlib.import_module(f'examples.workloads.{name}'), 'edit')\n"
        "    print(name, list(inspect.signature(fn).parameters))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=timeout_s(30),
        check=False,
    )
    assert ok(result) == ["todo ['doc', 'rng']", "richtext ['doc', 'rng']"]


def test_workloads_readme_documents_every_workload() -> None:
    readme = (EXAMPLES / "workloads" / "README.md").read_text()
    for name in WORKLOADS:
        assert f"`examples.workloads.{name}:edit`" in readme
    assert "def edit(doc: pycrdt.Doc, rng: random.Random) -> str:" in readme


# -- every example is covered -------------------------------------------------------------

COVERED = {
    "quickstart.py": test_quickstart_syncs_to_the_relay_and_exits_once_stored,
    "offline_notes.py": test_offline_notes_added_offline_then_synced_reach_a_second_replica,
    "embedded_relay.py": test_embedded_relay_serves_two_replicas_in_process_then_exits,
    "fastapi_app.py": test_fastapi_app_serves_replicas_behind_its_api_keys_and_drains_at_shutdown,
    "workloads/__init__.py": test_workloads_import_by_module_name_from_the_repository_root,
    "workloads/todo.py": test_workload_converges_on_three_docs_with_unique_ids_and_deletions,
    "workloads/richtext.py": test_workload_converges_on_three_docs_with_unique_ids_and_deletions,
    "workloads/README.md": test_workloads_readme_documents_every_workload,
}
# The browser editor is tested in Chromium by tests/browser/test_web_editor.py (its
# npm packages and bundle, node_modules/ and dist/, are built, never committed).
WEB = {
    "web/.npmrc",
    "web/bot.py",
    "web/build.mjs",
    "web/package-lock.json",
    "web/package.json",
    "web/screenshot.png",
    "web/serve.py",
    "web/src/index.html",
    "web/src/main.js",
    "web/src/style.css",
}


def test_every_file_in_examples_has_a_test() -> None:
    built = {"__pycache__", "node_modules", "dist"}
    files = {
        p.relative_to(EXAMPLES).as_posix()
        for p in EXAMPLES.rglob("*")
        if p.is_file() and not built.intersection(p.parts)
    }
    covered = COVERED.keys() | WEB
    assert files - covered == set(), "examples without a test: add one to COVERED"
    assert covered - files == set(), "COVERED names examples that no longer exist"
    assert set(WORKLOADS) == {
        Path(f).stem for f in files if f.startswith("workloads/") and f.endswith(".py")
    } - {"__init__"}
