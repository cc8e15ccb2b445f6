"""``crdtsync check`` with a hostile participant, run for real against local relays.

The positive runs: one stock client attacking three honest replicas under every fault
kind, on relays with the integrity rule; nothing may be lost, everyone must converge and
stay usable. The negative control: the same campaign on relays started with
``--no-integrity`` must fail, and say what the hostile participant broke. Without the
control, a green positive run could just mean the attacks never landed.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import timeout_s

from crdtsync.testing import CampaignConfig, CampaignReport, run_campaign_sync
from crdtsync.testing.hostile import ATTACK_KINDS

SEEDS = (0, 1, 2)
# What a relay without the rule lets happen, as the checker names it.
DAMAGE = {
    "lost-acknowledged",
    "lost-applied",
    "diverged",
    "unusable",
    "quarantined",
    "store-conflict",
}


def hostile_config(tmp_path: Path, *relay_args: str, steps: int = 60) -> CampaignConfig:
    return CampaignConfig(
        replicas=3,
        hostile=1,
        steps=steps,
        out=tmp_path / "runs",
        settle_s=8,
        relay_args=relay_args,
    )


def run(seed: int, config: CampaignConfig) -> CampaignReport:
    return run_campaign_sync(seed, config, shrink_runs=0, raise_on_failure=False)


def totals(reports: list[CampaignReport]) -> dict[str, int]:
    out: dict[str, int] = {}
    for report in reports:
        for key, n in report.attacks.items():
            out[key] = out.get(key, 0) + n
    return out


def assert_attacked(reports: list[CampaignReport], *, refused: bool) -> None:
    """The premise: every kind of attack was sent, so a pass means something."""
    attacks = totals(reports)
    for kind in ATTACK_KINDS:
        assert attacks.get(kind, 0) > 0, f"no {kind} attack in {len(reports)} seeds: {attacks}"
    if refused:
        # the relay saw the attacks, and said no to some: they did not just miss it
        assert sum(r.refused for r in reports) > 0, attacks


@pytest.mark.long  # in .ci/run's longer set: the default suite stays under 10 minutes
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_honest_replicas_come_through_a_hostile_participant_unharmed(tmp_path):
    reports = [run(seed, hostile_config(tmp_path)) for seed in SEEDS]
    failed = [r.summary() for r in reports if not r.ok]
    assert not failed, "\n".join(failed)
    assert_attacked(reports, refused=True)
    assert sum(r.edits for r in reports) > 40
    for report in reports:
        assert report.faults, report.summary()  # faults ran alongside the attacks


@pytest.mark.slow
@pytest.mark.long  # ~20 s: in .ci/run's longer set (the default suite stays under 10 min)
@pytest.mark.timeout(300)
def test_negative_control_relay_without_integrity_fails_and_names_the_damage(tmp_path):
    config = hostile_config(tmp_path, "--no-integrity")
    reports = []
    for seed in SEEDS:  # stop at the first failure: one is the proof
        reports.append(run(seed, config))
        if not reports[-1].ok:
            break
    failing = reports[-1]
    assert not failing.ok, "a relay without the integrity rule passed:\n" + "\n".join(
        r.summary() for r in reports
    )
    assert failing.error is None, failing.summary()
    kinds = {v.kind for v in failing.violations}
    assert kinds & DAMAGE, failing.summary()
    # The report says who did it: the hostile's content, or a replica or store it broke.
    named = [
        v.message
        for v in failing.violations
        if "hostile-" in v.message
        or "stopped syncing" in v.message
        or "quarantined" in v.message
        or "no longer loads" in v.message
    ]
    assert named, failing.summary()
    history = Path(failing.out or "") / "history.jsonl"
    events = [json.loads(line) for line in history.read_text().splitlines()]
    attacks = [e for e in events if e["event"] == "attack"]
    assert any(a["kind"] in ("rewrite", "impersonate") and a["sent"] for a in attacks)
    print(failing.summary())  # the violation text, for the record (pytest -s)


@pytest.mark.hostile_long
@pytest.mark.timeout(1800)
def test_twenty_seeds_with_a_hostile_participant(tmp_path):
    reports = [run(seed, hostile_config(tmp_path)) for seed in range(20)]
    failed = [r.summary() for r in reports if not r.ok]
    assert not failed, "\n".join(failed)
    assert_attacked(reports, refused=True)
    attacks = totals(reports)
    for variant in ("rewrite nested", "rewrite text", "rewrite value", "gap fill"):
        assert attacks.get(variant, 0) > 0, f"no {variant} in 20 seeds: {attacks}"


@pytest.mark.slow
def test_check_hostile_from_the_command_line(tmp_path):
    argv = [
        sys.executable, "-m", "crdtsync", "check", "--hostile", "1", "--seed", "2",
        "--steps", "25", "--shrink-runs", "0", "--out", str(tmp_path / "out"),
    ]  # fmt: skip
    result = subprocess.run(
        argv,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=timeout_s(300),
        env={"COLUMNS": "160", "PATH": "/usr/bin:/bin", "TERM": "dumb"},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "attacks" in result.stdout
    assert "refused" in result.stdout
    (report,) = (tmp_path / "out").glob("seed-2-*/report.json")
    data = json.loads(report.read_text())
    assert data["ok"] is True
    assert sum(data["attacks"].values()) > 0
    events = [
        json.loads(line) for line in (report.parent / "history.jsonl").read_text().splitlines()
    ]
    (started,) = [e for e in events if e["event"] == "started"]
    assert started["hostile"] == 1
    assert any(e["event"] == "attack" for e in events)
