"""``crdtsync check --regions 3`` (issue 12): three regions, each a relay on a store of its
own, peered through a fault proxy per link; the faults of the links between regions
(partitions, delays with duplicates and reorders, a link's process killed mid-way, a
region's store emptied) on top of the usual ones. It passes on crdtsync's links, and
fails, naming the lost edits, on links broken on purpose."""

from __future__ import annotations

from pathlib import Path

import pytest

from crdtsync.testing import CampaignConfig, CampaignFailed, Step, make_schedule, run_campaign_sync
from crdtsync.testing.campaign import REGION_FAULTS

pytestmark = pytest.mark.slow


def regions(tmp_path: Path, **kwargs: object) -> CampaignConfig:
    return CampaignConfig(regions=3, steps=30, out=tmp_path / "runs", **kwargs)  # type: ignore[arg-type]


def test_the_region_faults_are_drawn_only_with_regions() -> None:
    with_regions = {
        s.kind
        for seed in range(10)
        for s in make_schedule(seed, CampaignConfig(regions=3, steps=60))
    }
    assert {"partition-regions", "link-faults", "kill-link", "empty-region"} <= with_regions
    assert "lose-replica" not in with_regions  # (with empty-region: see make_schedule)
    without = {s.kind for seed in range(10) for s in make_schedule(seed, CampaignConfig(steps=60))}
    assert not without & set(REGION_FAULTS)
    # A seed without regions keeps the schedule it always had.
    assert make_schedule(7, CampaignConfig(steps=60)) == make_schedule(
        7, CampaignConfig(steps=60, faults=CampaignConfig().faults)
    )


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_three_regions_converge_under_every_fault_kind(tmp_path: Path, seed: int) -> None:
    report = run_campaign_sync(seed, regions(tmp_path), shrink_runs=0)
    assert report.ok, report.summary()
    assert report.edits > 10


@pytest.mark.long  # (.ci/run's longer set)
@pytest.mark.timeout(900)
def test_twenty_seeds_of_three_regions_converge(tmp_path: Path) -> None:
    totals: dict[str, int] = {}
    edits = 0
    for seed in range(3, 23):
        report = run_campaign_sync(seed, regions(tmp_path), shrink_runs=0)
        assert report.ok, report.summary()
        edits += report.edits
        for kind, n in report.faults.items():
            totals[kind] = totals.get(kind, 0) + n
    for kind in (*REGION_FAULTS, "partition", "kill-relay", "messages duplicated"):
        assert totals.get(kind, 0) > 0, f"no {kind} in 20 seeds: {totals}"
    assert edits > 300


@pytest.mark.soak
@pytest.mark.timeout(12 * 3600)
def test_five_hundred_seeds_of_three_regions_converge(tmp_path: Path) -> None:
    for seed in range(500):
        report = run_campaign_sync(seed, regions(tmp_path), shrink_runs=0)
        assert report.ok, report.summary()


INSERTS = "crdtsync.testing.workload:insert_only_workload"


def _lost_edits_named(report_error: CampaignFailed) -> None:
    report = report_error.report
    kinds = {v.kind for v in report.violations}
    assert "lost-acknowledged" in kinds, report.summary()
    named = [v for v in report.violations if v.kind == "lost-acknowledged"]
    assert all(v.edit and v.edit in v.message for v in named)
    assert any("relay" in " ".join(v.where) for v in named)


@pytest.mark.long  # (.ci/run's longer set)
def test_check_fails_naming_the_lost_edits_on_links_that_drop_one_update_in_fifty(
    tmp_path: Path,
) -> None:
    # Inserts only (a later overwrite can legitimately supersede a lost delete), and
    # enough of them that every link ships more than fifty updates.
    config = regions(tmp_path, link_defect="drop", workload=INSERTS)
    schedule = [Step("edit", i % 3, count=2) for i in range(180)]
    with pytest.raises(CampaignFailed) as failed:
        run_campaign_sync(1, config, schedule=schedule, shrink_runs=0)
    _lost_edits_named(failed.value)
    assert failed.value.report.faults.get("links: dropped", 0) > 0


@pytest.mark.long  # (.ci/run's longer set)
def test_check_fails_naming_the_lost_edits_on_links_that_checkpoint_before_the_target_stored(
    tmp_path: Path,
) -> None:
    # Slow links (a message takes 120 ms), their source relays killed again and again
    # while edits flow: a relay killed after both ends recorded a checkpoint and before
    # the batch it covers reached the target never ships that batch again.
    config = regions(tmp_path, link_defect="early-checkpoint", workload=INSERTS)
    schedule = [
        Step("link-faults", a, count=b, amount=0.7) for a in range(3) for b in range(3) if a != b
    ]
    for i in range(16):
        schedule += [Step("edit", r, count=3) for r in range(3)]
        schedule.append(Step("kill-link", i % 3))
    # (A loss needs a kill between a recorded checkpoint and its batch's arrival: a
    # matter of timing, so up to three runs; one that loses an edit is enough.)
    failure = None
    for seed in (2, 3, 4):
        try:
            run_campaign_sync(seed, config, schedule=schedule, shrink_runs=0)
        except CampaignFailed as exc:
            failure = exc
            break
    assert failure is not None, "links that checkpoint early lost nothing in three runs"
    _lost_edits_named(failure)
