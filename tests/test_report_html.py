"""report.html (crdtsync.testing.report_html): the page drawn from a run's history, on
fake histories: a passing run, a failing one with lost edits and a shrunk schedule,
hostile text, and a history far too large to draw event by event. Plus the hooks that
write it (run_campaign_sync and ``crdtsync check`` re-write it once shrinking ends)."""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import re
from dataclasses import asdict
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from crdtsync.testing import CampaignConfig, CampaignReport, Step, Violation, campaign, command
from crdtsync.testing.report_html import (
    MAX_LANES,
    MAX_LOG_ROWS,
    MAX_MARKERS,
    read_history,
    render_report,
    write_report_html,
)


class Page(HTMLParser):
    """The page's elements: tags with their attributes, and its text."""

    def __init__(self, page: str) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str]]] = []
        self.text: list[str] = []
        self.feed(page)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, {k: v or "" for k, v in attrs}))

    def handle_data(self, data: str) -> None:
        self.text.append(data)

    def all(self, tag: str | None = None, cls: str | None = None, **attrs: str) -> list[dict]:
        """Elements by tag, class and attributes (``data_edit``: ``data-edit``); not the
        legend's samples of the markers."""
        return [
            a
            for t, a in self.tags
            if (tag is None or t == tag)
            and (cls is None or cls in a.get("class", "").split())
            and "key" not in a.get("class", "").split()
            and all(a.get(k.replace("_", "-")) == v for k, v in attrs.items())
        ]


def lanes(page: str) -> dict[str, str]:
    """Each lane's HTML, by lane name (a lane is one contiguous div)."""
    out = {}
    for part in page.split('<div class="lane" ')[1:]:
        name = re.match(r'data-lane="([^"]*)"', part)
        assert name is not None
        out[name.group(1)] = part.split('<div class="lane" ')[0]
    return out


def schedule(*steps: Step) -> list[dict[str, Any]]:
    return [asdict(s) for s in steps]


STEPS = [
    Step("edit", 0, count=2),
    Step("partition", 1),
    Step("edit", 1, count=1),
    Step("kill-relay", 0),
    Step("restart-relay", 0),
    Step("heal", 1),
    Step("quiet"),
]


def history(lost: str | None = None) -> list[dict[str, Any]]:
    """A small run: three replicas, one relay, the steps of STEPS."""
    h: list[dict[str, Any]] = [
        {"t": 100.0, "event": "start", "proxy": "link-0", "url": "ws://x"},
        {"t": 100.5, "event": "started", "relays": ["ws://r"], "replicas": 3, "hostile": 0},
        {"t": 101.0, "event": "step", "n": 0, "step": "edit(replica 0, 2)"},
        {"t": 101.1, "event": "edit", "id": "e-1", "replica": "replica-0"},
        {"t": 101.2, "event": "edit", "id": "e-2", "replica": "replica-0"},
        {"t": 101.3, "event": "forward", "proxy": "link-0", "link": 1, "direction": "up"},
        {"t": 101.4, "event": "acknowledged", "id": "e-1", "replica": "replica-0"},
        {"t": 102.0, "event": "step", "n": 1, "step": "partition(replica 1)"},
        {"t": 102.0, "event": "fault", "proxy": "link-1", "fault": "partition"},
        {"t": 102.1, "event": "abort", "proxy": "link-1", "link": 1, "cause": "partition"},
        {"t": 103.0, "event": "step", "n": 2, "step": "edit(replica 1, 1)"},
        {"t": 103.1, "event": "edit", "id": "e-3", "replica": "replica-1"},
        {"t": 104.0, "event": "step", "n": 3, "step": "kill-relay(0)"},
        {"t": 105.0, "event": "step", "n": 4, "step": "restart-relay(0)"},
        {"t": 106.0, "event": "step", "n": 5, "step": "heal(replica 1)"},
        {"t": 107.0, "event": "step", "n": 6, "step": "quiet"},
        {"t": 107.5, "event": "acknowledged", "id": "e-3", "replica": "replica-1"},
        {"t": 108.0, "event": "healed"},
        {"t": 109.0, "event": "settled", "converged": lost is None},
    ]
    if lost is not None:
        h.append({"t": 109.5, "event": "violation", "kind": "lost-acknowledged", "edit": lost})
    h.append({"t": 110.0, "event": "verdict", "ok": lost is None, "error": None})
    return h


def report(ok: bool = True, **fields: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "seed": 5,
        "ok": ok,
        "schedule": schedule(*STEPS),
        "edits": 3,
        "acknowledged": 2,
        "faults": {"partition": 1, "kill-relay": 1},
        "violations": [],
        "error": None,
        "seconds": 10.0,
        "shrunk": None,
        "attacks": {},
        "refused": 0,
        "documents": 1,
        "edited_documents": 1,
    }
    return {**base, **fields}


LOST = Violation(
    "lost-acknowledged",
    "edit e-1 (acknowledged by the relay on replica-0 at step 0) is missing from replica-2",
    edit="e-1",
    where=("replica-2", "store of relay 0"),
)
DIVERGED = Violation("diverged", "final states differ: ... (edits e-3)", where=("replica-0",))


def test_a_passing_run_shows_its_verdict_and_a_lane_per_replica_and_relay():
    page = render_report(history(), report())
    doc = Page(page)
    (verdict,) = doc.all(id="verdict")
    assert verdict["data-ok"] == "true"
    assert "ok" in verdict["class"].split()
    by_lane = lanes(page)
    assert list(by_lane) == ["replica-0", "replica-1", "replica-2", "relay 0", "run"]
    # Edits and acknowledgements on their replica; the acknowledgement on the relay too.
    assert by_lane["replica-0"].count('class="m edit"') == 2
    assert by_lane["replica-0"].count('class="m ack"') == 1
    assert by_lane["relay 0"].count('class="m ack"') == 2
    # Faults on the lane of what they hit: the partition on replica-1 (hatched until its
    # heal), the kill and restart on the relay (down in between).
    assert 'class="m fault"' in by_lane["replica-1"]
    assert 'class="s partition"' in by_lane["replica-1"]
    assert 'class="m heal"' in by_lane["replica-1"]
    assert 'class="m kill"' in by_lane["relay 0"]
    assert 'class="m restart"' in by_lane["relay 0"]
    assert 'class="s down"' in by_lane["relay 0"]
    assert 'class="m conn"' in by_lane["replica-1"]  # the aborted link
    # The moments every fault was healed, the states converged, and the verdict.
    for line in ("healed", "converged", "verdict"):
        assert f'class="line {line}"' in by_lane["replica-2"]
    assert "converged at 9.000 s" in page
    # Nothing about failures.
    assert not doc.all(id="lost")
    assert not doc.all(id="violations")
    assert not doc.all(id="shrunk")
    assert len(doc.all("li")) == len(STEPS)  # the schedule, as `crdtsync check` prints it
    assert "kill-relay(0)" in page


def test_a_failing_run_highlights_its_lost_edits_and_shows_the_shrunk_schedule():
    shrunk = schedule(Step("edit", 0, count=2), Step("kill-relay", 0))
    data = report(False, violations=[asdict(DIVERGED), asdict(LOST)], shrunk=shrunk)
    page = render_report(history(lost="e-1"), data)
    doc = Page(page)
    (verdict,) = doc.all(id="verdict")
    assert verdict["data-ok"] == "false"
    assert "FAILED" in "".join(doc.text)
    # The lost edit: a red marker on its replica's lane, named by its id...
    (marker,) = doc.all("i", cls="lost")
    assert marker["data-edit"] == "e-1"
    assert "LOST edit e-1 by replica-0" in marker["title"]
    assert 'data-edit="e-1"' in lanes(page)["replica-0"]
    # ... and a row of the lost-edits table: who made it, at which step, when it was
    # acknowledged, where it is missing.
    lost_table = page.split('id="lost"')[1].split("</table>")[0]
    assert lost_table.count('<tr data-edit="e-1">') == 1
    assert "replica-0" in lost_table
    assert "<td>0</td>" in lost_table  # step 0
    assert "1.400 s" in lost_table  # acknowledged 1.4 s in
    assert "replica-2, store of relay 0" in lost_table
    # An edit a violation's message names (not lost itself) is outlined.
    (named,) = doc.all("i", cls="named")
    assert named["data-edit"] == "e-3"
    (section,) = doc.all("section", id="shrunk")
    assert section["data-steps"] == "2"
    shrunk_list = page.split('id="shrunk"')[1].split("</ol>")[0]
    assert "edit(replica 0, 2)" in shrunk_list
    assert "kill-relay(0)" in shrunk_list
    assert "still not converged" in page
    # No shrunk schedule yet (shrinking comes after the run): the page says so.
    page = render_report(history(lost="e-1"), report(False, violations=[asdict(LOST)]))
    assert "Not shrunk (yet)" in page


HOSTILE = '<script>alert("x")</script><img src=x onerror=alert(1)>'
LONG = "x" * 1_000_000


def test_everything_from_the_history_is_escaped():
    h = history(lost=HOSTILE)
    h += [
        {"t": 101.15, "event": "edit", "id": HOSTILE, "replica": "replica-0", "document": HOSTILE},
        {"t": 101.5, "event": "unusable", "participant": HOSTILE, "message": HOSTILE},
        {"t": 101.6, "event": HOSTILE, "replica": "replica-2", HOSTILE: HOSTILE},
        {"t": 101.7, "event": "attack", "participant": "hostile-3", "kind": HOSTILE},
        {"t": 101.8, "event": "abort", "proxy": "link-0", "cause": HOSTILE},
        {"t": 101.9, "event": "step", "n": 0, "step": HOSTILE},
        {"t": 102.5, "event": "edit", "id": "lone \ud800 surrogate", "replica": "replica-1"},
        {"t": 102.6, "event": "edit", "id": LONG, "replica": "replica-1"},
    ]
    lost = Violation("lost-applied", HOSTILE, edit=HOSTILE, where=(HOSTILE,), document=HOSTILE)
    long = Violation("lost-applied", "...", edit=LONG)
    data = report(
        False,
        seed=HOSTILE,
        error=HOSTILE,
        violations=[asdict(lost), asdict(long)],
        faults={HOSTILE: 1},
        shrunk=[HOSTILE, {"kind": HOSTILE}],
        schedule=[{"kind": "edit", "target": HOSTILE}],
    )
    page = render_report(h, data)
    assert HOSTILE not in page
    assert "<img" not in page
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in page
    doc = Page(page)
    assert [t for t, _ in doc.tags].count("script") == 1  # only the page's own
    assert not [t for t, _ in doc.tags if t == "img"]
    # The lost edits are still found by their (hostile, or very long) ids.
    drawn = {a["data-edit"] for a in doc.all("i", cls="lost")}
    assert HOSTILE in drawn
    assert LONG[:199] + "…" in drawn  # cut short, as its row in the table is
    assert f'data-focus="{LONG[:199]}…"' in page.split('id="lost"')[1]
    assert len(page) < 200_000  # none of the megabyte-long id


def test_the_page_loads_nothing():
    page = render_report(history(lost="e-1"), report(False, violations=[asdict(LOST)]))
    assert not re.search(r"\b(src|href)\s*=", page)
    assert "<link" not in page
    assert "url(" not in page
    assert "@import" not in page
    (csp,) = Page(page).all("meta", http_equiv="Content-Security-Policy")
    assert "default-src 'none'" in csp["content"]
    assert "'unsafe-inline'" not in csp["content"].split("script-src")[1]  # only its hash


def huge_history(edits: int, frames: int, replicas: int = 5) -> list[dict[str, Any]]:
    h: list[dict[str, Any]] = [
        {"t": 0.0, "event": "started", "relays": ["a", "b"], "replicas": replicas, "hostile": 0}
    ]
    t = 0.0
    for k in range(frames):
        t += 0.0001
        h.append({"t": t, "event": "forward", "proxy": f"link-{k % replicas}", "seq": k})
    for k in range(edits):
        t += 0.001
        h.append({"t": t, "event": "edit", "id": f"edit-{k}", "replica": f"replica-{k % replicas}"})
        h.append({"t": t, "event": "acknowledged", "id": f"edit-{k}", "replica": "replica-0"})
        if k % 10 == 0:
            h.append({"t": t, "event": "step", "n": k // 10, "step": "edit"})
        if k % 500 == 0:
            h.append({"t": t, "event": "connect", "proxy": f"link-{k % replicas}", "link": k})
    h.append({"t": t + 1, "event": "verdict", "ok": False})
    return h


def test_a_huge_history_stays_bounded_and_still_shows_every_lost_edit():
    edits = 40_000
    h = huge_history(edits, frames=150_000)
    lost = [f"edit-{k}" for k in range(7, edits, 997)]  # spread over the run
    violations = [asdict(Violation("lost-acknowledged", f"edit {e} lost", edit=e)) for e in lost]
    steps = schedule(*[Step("edit", k % 5, count=1) for k in range(edits // 10)])
    page = render_report(h, report(False, schedule=steps, violations=violations))
    assert len(page.encode()) < 3_000_000, len(page)
    doc = Page(page)
    markers = doc.all("i", cls="m")
    assert len(markers) <= MAX_MARKERS
    assert {a["data-edit"] for a in doc.all("i", cls="lost")} == set(lost)
    assert len(doc.all("tr")) <= MAX_LOG_ROWS + 500 + 20
    # The counts are all there, and each lane says it drew fewer than it had.
    assert f"{edits // 5} edits" in lanes(page)["replica-1"]
    assert "markers drawn" in lanes(page)["replica-1"]
    assert "listed (lost edits, violations and faults first)" in page


def test_many_participants_share_a_bounded_number_of_lanes():
    page = render_report(huge_history(2000, frames=0, replicas=200), report())
    names = list(lanes(page))
    assert len(names) <= MAX_LANES
    assert "other participants" in names
    assert {"replica-0", "relay 0", "relay 1", "run"} <= set(names)  # never folded
    # A name no participant has does not open a lane of its own.
    h = huge_history(10, frames=0, replicas=200)
    h += [{"t": 1.0, "event": "unusable", "participant": f"relay {k}"} for k in range(2, 500)]
    names = list(lanes(render_report(h, report())))
    assert len(names) <= MAX_LANES
    assert "relay 2" not in names


def test_empty_and_broken_histories_still_render(tmp_path: Path):
    assert "FAILED" in render_report([], report(False, error="no relay"))
    (tmp_path / "history.jsonl").write_text(
        '{"t": 1, "event": "started", "replicas": 2, "relays": ["x"]}\n'
        "not json\n"
        '["a list"]\n'
        '{"t": "soon", "event": "edit"}\n'
        '{"t": 2, "event": "edit", "id": "a", "replica": "replica-1"}\n'
        '{"t": 3, "event": "verdict", "ok": tr'  # cut off mid-write
    )
    assert len(read_history(tmp_path / "history.jsonl")) == 3
    path = write_report_html(tmp_path, report())
    assert path == tmp_path / "report.html"
    page = path.read_text()
    assert 'data-edit="a"' in lanes(page)["replica-1"]
    assert not (tmp_path / "report.html.partial").exists()
    assert read_history(tmp_path / "missing.jsonl") == []


# -- the hooks: written with the run, written again once shrinking ends -------------------


def fake_run(tmp_path: Path, schedules: list[list[Step]]):
    """A run_campaign that writes a failing run's files and report.html as the real one
    does, recording the schedules it ran."""

    async def run_campaign(seed: int, config: Any, sched: list[Step] | None = None):
        sched = list(STEPS) if sched is None else sched
        schedules.append(sched)
        folder = tmp_path / f"seed-{seed}-{len(schedules)}"
        folder.mkdir()
        lines = [json.dumps(e) for e in history(lost="e-1")]
        (folder / "history.jsonl").write_text("\n".join(lines) + "\n")
        report = CampaignReport(seed, sched, violations=[LOST], out=str(folder))
        write_report_html(folder, report.to_json())
        return report

    async def shrink(seed: int, config: Any, failing: CampaignReport, max_runs: int = 10):
        await run_campaign(seed, config, STEPS[:2])
        return STEPS[:2]

    return run_campaign, shrink


def shrunk_steps(folder: Path) -> list[str]:
    page = (folder / "report.html").read_text()
    assert 'id="shrunk" data-steps="2"' in page
    return re.findall(r"<li><code>([^<]*)</code></li>", page.split('id="shrunk"')[1])[:2]


def test_run_campaign_sync_writes_the_shrunk_schedule_into_the_failing_runs_page(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    schedules: list[list[Step]] = []
    run_campaign, shrink = fake_run(tmp_path, schedules)
    monkeypatch.setattr(campaign, "run_campaign", run_campaign)
    monkeypatch.setattr(campaign, "shrink", shrink)
    result = campaign.run_campaign_sync(5, CampaignConfig(), shrink_runs=3, raise_on_failure=False)
    assert result.out == str(tmp_path / "seed-5-1")
    assert shrunk_steps(tmp_path / "seed-5-1") == ["edit(replica 0, 2)", "partition(replica 1)"]


def test_crdtsync_check_writes_the_shrunk_schedule_into_the_failing_runs_page(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    schedules: list[list[Step]] = []
    run_campaign, shrink = fake_run(tmp_path, schedules)
    monkeypatch.setattr(command, "run_campaign", run_campaign)
    monkeypatch.setattr(command, "shrink", shrink)
    args = argparse.Namespace(seed=5, seeds=1, shrink_runs=3)
    out = io.StringIO()
    console = Console(file=out, width=200)
    assert asyncio.run(command._run(args, CampaignConfig(out=tmp_path), console)) == 1
    assert shrunk_steps(tmp_path / "seed-5-1") == ["edit(replica 0, 2)", "partition(replica 1)"]
    assert f"report: {tmp_path / 'seed-5-1'}/report.html" in out.getvalue()
