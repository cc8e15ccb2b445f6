"""`crdtsync check` from the command line: remote mode, reproducible output, bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from helpers import timeout_s


def check(*args: str, cwd) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "crdtsync", "check", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout_s(300),
        env={"COLUMNS": "120", "PATH": "/usr/bin:/bin", "TERM": "dumb"},
    )


@pytest.mark.slow
def test_check_against_a_relay_started_by_hand(relay, tmp_path):
    result = check(
        "--relay", relay.url, "--seeds", "2", "--steps", "20", "--out", str(tmp_path / "out"),
        cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 seeds" in result.stdout
    assert "0 violations" in result.stdout
    reports = sorted((tmp_path / "out").glob("seed-*/report.json"))
    assert len(reports) == 2
    first = json.loads(reports[0].read_text())
    assert first["ok"] is True
    assert first["edits"] > 0
    # remote mode never kills the user's relay
    assert all(step["kind"] not in ("kill-relay", "restart-relay") for step in first["schedule"])
    history = (reports[0].parent / "history.jsonl").read_text().splitlines()
    events = {json.loads(line)["event"] for line in history}
    assert {"started", "step", "edit", "healed", "verdict"} <= events


@pytest.mark.slow
def test_check_same_seed_reproduces_schedule(tmp_path):
    runs = []
    for name in ("a", "b"):
        result = check("--seed", "11", "--steps", "15", "--out", str(tmp_path / name), cwd=tmp_path)
        assert result.returncode == 0, result.stdout + result.stderr
        (report,) = (tmp_path / name).glob("seed-11-*/report.json")
        runs.append(json.loads(report.read_text()))
    assert runs[0]["schedule"] == runs[1]["schedule"]
    assert runs[0]["ok"] == runs[1]["ok"] is True


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--workload", "no.such.module:edit"], "cannot import workload module 'no.such.module'"),
        (["--workload", "json"], "workload must be module:function"),
        (["--workload", "json:nothing"], "json has no callable 'nothing'"),
        (["--relay", "ws://127.0.0.1:9"], "cannot reach relay ws://127.0.0.1:9"),
        (["--relay", "http://x"], "--relay must be a ws:// or wss:// URL"),
        (["--replicas", "0"], "argument --replicas: must be at least 1, got 0"),
        (["--hostile", "-1"], "argument --hostile: must be 0 or more, got -1"),
        (["--duration", "-3"], "argument --duration: must be positive, got -3"),
        (["--faults", "partition,meteor"], "unknown fault kind 'meteor'"),
        (["--fault-rate", "1.5"], "argument --fault-rate: must be between 0 and 1, got 1.5"),
        (["--seeds", "many"], "argument --seeds: 'many' is not a whole number"),
        (["--relays", "3"], "--relays N needs a store the relays share: --backend redis"),
        (["--faults", "kill-redis"], "unknown fault kind 'kill-redis'"),
        (["--backend", "postgres"], "argument --backend: invalid choice: 'postgres'"),
    ],
)
def test_check_refuses_bad_input_with_one_clear_line(tmp_path, args, message):
    result = check(*args, cwd=tmp_path)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert result.stderr.strip().splitlines()[-1].startswith("crdtsync check:")


def test_the_fault_kinds_in_the_help_are_the_campaigns() -> None:
    from crdtsync.cli import FAULT_KINDS_HELP
    from crdtsync.testing.campaign import FAULT_KINDS

    assert ",".join(FAULT_KINDS) == FAULT_KINDS_HELP


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--documents", "0"], "argument --documents: must be at least 1, got 0"),
        (["--documents", "5", "--hostile", "1"], "--hostile attacks one document"),
    ],
)
def test_check_refuses_bad_documents_options_with_one_clear_line(tmp_path, args, message):
    result = check(*args, cwd=tmp_path)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr + result.stdout


@pytest.mark.slow
def test_check_over_many_documents_reports_them(tmp_path):
    result = check(
        "--documents", "30", "--steps", "12", "--seed", "4", "--out", str(tmp_path / "out"),
        "--shrink-runs", "0", cwd=tmp_path,
    )  # fmt: skip
    (report,) = (tmp_path / "out").glob("seed-4-*/report.json")
    data = json.loads(report.read_text())
    assert data["documents"] == data["edited_documents"] == 30, result.stdout
    assert result.returncode == 0, result.stdout + result.stderr
    assert "30/30" in result.stdout  # the documents column: edited of --documents
    history = (report.parent / "history.jsonl").read_text().splitlines()
    edits = [json.loads(line) for line in history if '"event": "edit"' in line]
    assert {e["document"] for e in edits} == {f"check/{i:04d}" for i in range(30)}
