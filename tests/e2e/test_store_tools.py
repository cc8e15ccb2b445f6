"""``crdtsync store``: operators' tools on a relay's store, run as the command a user types."""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import timeout_s
from pycrdt import Array, Doc, Map, Text, XmlElement, XmlFragment, XmlText

from crdtsync.store import UpdateLog
from crdtsync.testing.redis import RedisServer, redis_server_binary
from crdtsync.testing.traces import TextMirror, find_trace, load_trace

PAPER_SHA256 = "a489e9022976c14e46627aea174d07797edcb3fd17df42605956d4cf01bf9039"


def store_cmd(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [sys.executable, "-m", "crdtsync", "store", *args],
        capture_output=True,
        text=True,
        timeout=timeout_s(120),
        env={**os.environ, "COLUMNS": "160"},
    )
    if check:
        assert result.returncode == 0, result.stdout + result.stderr
    return result


def json_lines(out: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def write_updates(path: Path, doc_name: str, updates: list[bytes]) -> None:
    with UpdateLog(path) as log:
        log.append_many([(doc_name, u) for u in updates])


@pytest.fixture(scope="module")
def paper_store(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A store holding the automerge-paper trace as 520 stored updates."""
    path = find_trace("automerge-paper")
    if path is None:
        pytest.skip("trace automerge-paper not found (keep ../shared beside the repo)")
    trace = load_trace(path)
    doc: Doc[Any] = Doc()
    mirror = TextMirror(doc.get("text", type=Text))
    updates = []
    for start in range(0, len(trace.txns), 500):
        before = doc.get_state()
        with doc.transaction():
            for patches in trace.txns[start : start + 500]:
                mirror.apply(patches)
        updates.append(doc.get_update(before))
    assert mirror.content == trace.end_content
    store = tmp_path_factory.mktemp("paper") / "relay.db"
    write_updates(store, "paper", updates)
    return store, trace.end_content


@pytest.mark.long  # building the trace store takes ~30 s: .ci/run's longer set
def test_show_prints_the_exact_final_text_of_a_trace(paper_store):
    store, end = paper_store
    out = store_cmd("show", str(store), "paper", "--root", "text").stdout
    assert hashlib.sha256(out.encode()).hexdigest() == PAPER_SHA256
    assert out == end
    shown = json.loads(store_cmd("show", str(store), "paper").stdout)
    assert shown == {"text": end}


@pytest.mark.long  # building the trace store takes ~30 s: .ci/run's longer set
def test_export_then_import_into_a_fresh_store_round_trips_byte_for_byte(paper_store, tmp_path):
    store, end = paper_store
    exported = tmp_path / "paper.yjs"
    store_cmd("export", str(store), "paper", str(exported))
    fresh = tmp_path / "fresh.db"
    answer = json_lines(store_cmd("import", str(fresh), str(exported), "copy").stdout)
    assert answer == [{"document": "copy", "imported_bytes": exported.stat().st_size}]
    again = tmp_path / "again.yjs"
    store_cmd("export", str(fresh), "copy", str(again))
    assert again.read_bytes() == exported.read_bytes()
    # any Yjs implementation reads it: pycrdt here
    doc: Doc[Any] = Doc()
    doc.apply_update(again.read_bytes())
    assert str(doc.get("text", type=Text)) == end
    # importing the same again adds nothing (all of it repeats what is stored)
    answer = json_lines(store_cmd("import", str(fresh), str(exported), "copy").stdout)
    assert answer == [{"document": "copy", "imported_bytes": 0}]
    with UpdateLog(fresh) as log:
        assert len(log.load("copy").updates) == 1


@pytest.mark.long  # building the trace store takes ~30 s: .ci/run's longer set
def test_ls_check_and_compact(paper_store, tmp_path):
    store, end = paper_store
    copy = tmp_path / "copy.db"
    copy.write_bytes(store.read_bytes())
    other = Doc()
    other.get("t", type=Text).insert(0, "small")
    write_updates(copy, "notes/a", [other.get_update()])
    listed = json_lines(store_cmd("ls", str(copy), "--json").stdout)
    assert [e["document"] for e in listed] == ["paper", "notes/a"]
    assert listed[0]["tail_updates"] == 520
    assert listed[0]["bytes"] > 0
    assert [
        e["document"]
        for e in json_lines(store_cmd("ls", str(copy), "--json", "--prefix", "notes/").stdout)
    ] == ["notes/a"]
    table = store_cmd("ls", str(copy)).stdout.splitlines()
    assert table[0].split() == ["position", "tail", "bytes", "document"]
    assert table[1].split()[-1] == "paper"
    assert json_lines(store_cmd("check", str(copy)).stdout) == [{"checked": 2, "failed": 0}]
    (compacted,) = json_lines(store_cmd("compact", str(copy), "paper").stdout)
    assert (compacted["tail_before"], compacted["tail_after"]) == (520, 0)
    assert store_cmd("show", str(copy), "paper", "--root", "text").stdout == end
    everything = json_lines(store_cmd("compact", str(copy)).stdout)
    assert {e["document"] for e in everything} == {"paper", "notes/a"}


def test_check_names_a_damaged_document_and_fails(tmp_path):
    store = tmp_path / "relay.db"
    good = Doc()
    good.get("t", type=Text).insert(0, "fine")
    write_updates(store, "good", [good.get_update()])
    write_updates(store, "bad", [good.get_update()])
    with UpdateLog(store) as log:
        log.conn.execute("UPDATE updates SET data = ? WHERE doc = 'bad'", (b"\x01\x05garbage",))
        log.conn.commit()
    result = store_cmd("check", str(store), check=False)
    assert result.returncode == 1
    lines = json_lines(result.stdout)
    assert lines[-1] == {"checked": 2, "failed": 1}
    assert lines[0]["document"] == "bad"
    assert lines[0]["error"]


def test_show_tells_root_kinds_apart_and_takes_hints(tmp_path):
    doc = Doc()
    doc.get("body", type=Text).insert(0, "hello")
    doc.get("meta", type=Map)["title"] = "T"
    doc.get("tags", type=Array).extend(["a", "bc"])
    doc.get("chars", type=Array).extend(["h", "i"])
    fragment = doc.get("xml", type=XmlFragment)
    fragment.children.append(XmlElement("p", {}, [XmlText("x")]))
    doc.get("gone", type=Text).insert(0, "z")
    del doc.get("gone", type=Text)[0:1]
    store = tmp_path / "relay.db"
    write_updates(store, "kinds", [doc.get_update()])
    shown = json.loads(store_cmd("show", str(store), "kinds").stdout)
    assert shown == {
        "body": "hello",
        "chars": ["h", "i"],
        "gone": None,
        "meta": {"title": "T"},
        "tags": ["a", "bc"],
        "xml": "<p>x</p>",
    }
    hinted = json.loads(store_cmd("show", str(store), "kinds", "--type", "gone=text").stdout)
    assert hinted["gone"] == ""
    bad = store_cmd("show", str(store), "kinds", "--type", "gone=set", check=False)
    assert bad.returncode == 1
    assert "NAME=KIND" in bad.stderr


def test_import_refuses_a_rewrite_of_stored_content_and_changes_nothing(tmp_path):
    a = Doc(client_id=42)
    a.get("t", type=Text).insert(0, "original")
    store = tmp_path / "relay.db"
    write_updates(store, "d", [a.get_update()])
    forged = Doc(client_id=42)
    forged.get("t", type=Text).insert(0, "FORGERY!")  # same ids, other content
    file = tmp_path / "forged.yjs"
    file.write_bytes(forged.get_update())
    result = store_cmd("import", str(store), str(file), "d", check=False)
    assert result.returncode == 1
    assert "refuses" in result.stderr
    assert store_cmd("show", str(store), "d", "--root", "t").stdout == "original"


def test_bad_inputs_get_clear_errors(tmp_path):
    store = tmp_path / "relay.db"
    doc = Doc()
    doc.get("t", type=Text).insert(0, "x")
    write_updates(store, "d", [doc.get_update()])
    garbage = tmp_path / "garbage"
    garbage.write_bytes(b"\xff\xff\xff")
    for args, message in [
        (("ls", str(tmp_path / "nothing.db")), "no store at"),
        (("show", str(store), "missing"), "no document 'missing'"),
        (("import", str(store), str(garbage), "d"), "is not a Yjs update"),
        (("import", str(store), str(tmp_path / "absent.yjs"), "d"), "cannot read"),
    ]:
        result = store_cmd(*args, check=False)
        assert result.returncode == 1, args
        assert message in result.stderr, (args, result.stderr)
        assert "Traceback" not in result.stderr
    assert not (tmp_path / "nothing.db").exists()  # a typo makes no new store


def test_import_waits_for_the_relay_serving_the_file_and_reads_work_beside_it(
    relay_factory, tmp_path
):
    relay = relay_factory("served.db")
    doc = Doc()
    doc.get("t", type=Text).insert(0, "imported")
    file = tmp_path / "u.yjs"
    file.write_bytes(doc.get_update())
    result = store_cmd("import", str(relay.store), str(file), "d", check=False)
    assert result.returncode == 1
    assert "a relay is serving" in result.stderr
    assert json_lines(store_cmd("ls", str(relay.store), "--json").stdout) == []
    relay.kill()
    store_cmd("import", str(relay.store), str(file), "d")
    relay.restart()
    assert store_cmd("show", str(relay.store), "d", "--root", "t").stdout == "imported"


@pytest.fixture(scope="module")
def redis_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    if redis_server_binary() is None:
        if os.environ.get("CI"):
            pytest.fail("redis-server is not installed (apt-get install redis-server)")
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    with RedisServer(tmp_path_factory.mktemp("redis")) as server:
        yield f"{server.url}?prefix=tools{secrets.token_hex(4)}"


def test_the_tools_work_on_a_redis_store(redis_store, tmp_path):
    doc = Doc()
    doc.get("t", type=Text).insert(0, "in redis")
    file = tmp_path / "u.yjs"
    file.write_bytes(doc.get_update())
    store_cmd("import", redis_store, str(file), "team/d")
    assert [e["document"] for e in json_lines(store_cmd("ls", redis_store, "--json").stdout)] == [
        "team/d"
    ]
    assert store_cmd("show", redis_store, "team/d", "--root", "t").stdout == "in redis"
    out = tmp_path / "out.yjs"
    store_cmd("export", redis_store, "team/d", str(out))
    assert out.read_bytes() == file.read_bytes()
    assert json_lines(store_cmd("check", redis_store).stdout) == [{"checked": 1, "failed": 0}]
    store_cmd("compact", redis_store, "team/d")
    assert store_cmd("show", redis_store, "team/d", "--root", "t").stdout == "in redis"
