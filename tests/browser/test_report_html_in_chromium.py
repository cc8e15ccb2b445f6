"""report.html of real campaigns, opened in Chromium: a passing ``crdtsync check --out``
run, and a failing run against a relay broken on purpose (it acknowledges before it
persists: killed, it loses acknowledged edits), shrunk. Asserted on the DOM: the
verdict, a lane per replica and relay, each lost edit highlighted by its id, the
shortest failing schedule; the page loads nothing but itself and its script runs (its
Content-Security-Policy allows it by hash only)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from browserkit import REPO, Browser
from helpers import timeout_s

from crdtsync.testing import CampaignConfig, Step, run_campaign_sync

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

BROKEN = REPO / "tests" / "e2e" / "broken_relay.py"


async def open_report(browser: Browser, folder: Path) -> tuple[Any, list[str]]:
    """The run's report.html in a page of its own; also every URL the page requested."""
    requests: list[str] = []
    context = await browser.chromium.new_context(viewport={"width": 1300, "height": 900})
    context.set_default_timeout(timeout_s(15) * 1000)
    page = await context.new_page()
    lines: list[str] = []
    browser.logs.append((folder.name, lines))
    page.on("console", lambda m: lines.append(f"{m.type}: {m.text}"))
    page.on("pageerror", lambda e: lines.append(f"pageerror: {e}"))
    page.on("request", lambda r: requests.append(r.url))
    url = (folder / "report.html").as_uri()
    await page.goto(url)
    assert requests == [url]
    return page, lines


async def lane_names(page: Any) -> list[str]:
    return list(await page.eval_on_selector_all(".lane", "ls => ls.map(l => l.dataset.lane)"))


async def test_a_passing_check_run_reads_ok_with_a_lane_per_replica_and_relay(
    browser: Browser, tmp_path: Path
) -> None:
    argv = [sys.executable, "-m", "crdtsync", "check", "--seed", "3", "--steps", "15"]
    argv += ["--out", str(tmp_path / "out"), "--shrink-runs", "0"]
    done = await asyncio.to_thread(
        subprocess.run, argv, cwd=tmp_path, capture_output=True, text=True, timeout=timeout_s(60)
    )
    assert done.returncode == 0, done.stdout + done.stderr
    (folder,) = (tmp_path / "out").glob("seed-3-*")
    report = json.loads((folder / "report.json").read_text())
    page, console = await open_report(browser, folder)

    assert (await page.text_content("#verdict")).strip() == "ok"
    assert await page.get_attribute("#verdict", "data-ok") == "true"
    assert await lane_names(page) == ["replica-0", "replica-1", "replica-2", "relay 0", "run"]
    # Every edit the run made is on its replica's lane (here, few enough to draw them all).
    edits = await page.eval_on_selector_all(
        ".lane[data-group=replica] .track .m.edit", "ms => ms.map(m => m.dataset.edit)"
    )
    assert len(edits) == report["edits"]
    acks = await page.locator(".lane[data-lane='relay 0'] .track .m.ack").count()
    assert acks == report["acknowledged"]
    # The schedule's faults and kills are drawn on the lane of the replica they hit.
    for step in report["schedule"]:
        mark = {"partition": "fault", "duplicate": "fault", "delay": "fault"}.get(step["kind"])
        mark = "kill" if step["kind"] == "kill-replica" else mark
        if mark is not None:
            lane = page.locator(f".lane[data-lane='replica-{step['target']}'] .track")
            assert await lane.locator(f".m.{mark}").count() >= 1, step
    kinds = {s["kind"] for s in report["schedule"]}
    assert {"partition", "kill-replica"} <= kinds  # (seed 3 has both: the premise)
    assert await page.locator(".track .s.partition").count() == 1
    for line in ("healed", "converged", "verdict"):
        assert await page.locator(f".lane[data-lane='replica-0'] .line.{line}").count() == 1
    assert await page.locator("#lost").count() == 0
    assert await page.locator("#shrunk").count() == 0
    assert not [line for line in console if line.startswith(("error", "pageerror"))], console


async def test_a_failing_run_shows_its_lost_edits_and_shrunk_schedule(
    browser: Browser, tmp_path: Path
) -> None:
    schedule = [
        Step("edit", 0, count=3),
        Step("quiet"),
        Step("edit", 1, count=2),
        Step("lose-replica", 0),  # the replica's own copy is gone: only the relay had it
        Step("kill-relay", 0),  # before its every-60-seconds commit
        Step("edit", 2, count=1),
        Step("restart-relay", 0),
        Step("restart-replica", 0),
    ]
    config = CampaignConfig(
        relay_command=(sys.executable, str(BROKEN), "ack-before-persist"),
        out=tmp_path / "runs",
        settle_s=2,  # it will not converge: do not wait long for it
    )
    report = await asyncio.to_thread(
        run_campaign_sync, 7, config, schedule=schedule, shrink_runs=2, raise_on_failure=False
    )
    assert not report.ok, report.summary()
    assert report.out is not None
    assert report.shrunk is not None
    lost = {v.edit for v in report.violations if v.kind.startswith("lost-") and v.edit}
    assert lost, report.summary()
    page, console = await open_report(browser, Path(report.out))

    assert (await page.text_content("#verdict")).strip() == "FAILED"
    names = await lane_names(page)
    assert names == ["replica-0", "replica-1", "replica-2", "relay 0", "run"]
    # Each lost edit: a red marker on the timeline carrying its id, and a table row.
    drawn = await page.eval_on_selector_all(
        ".track .m.lost",
        "ms => ms.map(m => [m.dataset.edit, m.closest('.lane').dataset.lane, m.title])",
    )
    assert {edit for edit, _, _ in drawn} == lost
    table = await page.text_content("#lost")
    for edit, lane, title in drawn:
        assert lane in names[:3]
        assert title.startswith(f"LOST edit {edit} by {lane}")
        assert edit in table
    # The relay was killed and restarted: drawn on its lane, down in between.
    relay = page.locator(".lane[data-lane='relay 0'] .track")
    assert await relay.locator(".m.kill").count() >= 1
    assert await relay.locator(".m.restart").count() >= 1
    assert await relay.locator(".s.down").count() >= 1
    # The shortest failing schedule, written into this run's page once shrinking ended.
    assert await page.get_attribute("#shrunk", "data-steps") == str(len(report.shrunk))
    steps = [s.strip() for s in await page.locator("#shrunk li").all_text_contents()]
    assert steps == [str(s) for s in report.shrunk]
    # The page's script runs: a lost edit's id, clicked, highlights its markers.
    first = sorted(lost)[0]
    await page.locator("#lost td[data-focus]", has_text=first).click()
    focused = await page.eval_on_selector_all(
        ".track .m.focus", "ms => ms.map(m => m.dataset.edit)"
    )
    assert focused
    assert set(focused) == {first}
    assert not [line for line in console if line.startswith(("error", "pageerror"))], console
