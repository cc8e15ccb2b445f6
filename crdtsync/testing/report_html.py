"""``report.html``: one self-contained page per campaign run, drawn from its history.

:func:`render_report` turns the parsed ``history.jsonl`` entries and the run's
``report.json`` dict (plus, once known, the shrunk schedule) into one HTML string: a
timeline with a lane per replica, hostile participant and relay (edits, acknowledgements,
faults and heals, kills and restarts, the moment everything was healed, converged and
judged), the verdict, the violations, the lost edits (highlighted on the timeline by
their ids) and the shortest failing schedule. :func:`write_report_html` writes it next
to ``history.jsonl``.

The page loads nothing: inline CSS, one small inline script (allowed by its hash in the
page's Content-Security-Policy, which also forbids every network request), markers as
positioned elements and event densities as inline SVG. Everything that comes from the
history is escaped (a hostile workload chooses edit ids, and a relay's errors end up in
messages). The page stays bounded for any history: each lane draws at most a few hundred
markers (lost edits and faults first, the rest sampled evenly in time) over a density
strip of every event, and says how many it drew of how many.
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import math
import os
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["read_history", "render_report", "write_report_html"]

MAX_LANES = 40  # beyond this, participants share one "other participants" lane
MAX_RELAY_LANES = 16
MAX_MARKERS = 5000  # drawn markers, the whole page
MAX_MARKERS_PER_LANE = 400
MAX_SPANS_PER_LANE = 150
BINS = 160  # columns of each lane's density strip
MAX_LOG_ROWS = 1500
MAX_VIOLATIONS = 200
MAX_LOST_ROWS = 500
MAX_STEPS_SHOWN = 1000
MAX_TEXT = 300  # characters of any one string from the history
MAX_MESSAGE = 2000  # ... of a violation's message (report.json keeps it whole)

# Frames the fault proxies forward: tens of thousands in a long run, so only counted
# (density strips), never drawn or listed one by one.
TRAFFIC = {"forward", "duplicate", "hold", "reorder"}
# Other proxy events worth a marker: a link that went down or came up.
CONNECTION = {"connect", "disconnect", "abort", "refuse", "lost", "close"}
LOST_KINDS = ("lost-acknowledged", "lost-applied")

# Marker priority (lower first) when a lane has more than it may draw.
P_LOST, P_PROBLEM, P_FAULT, P_EDIT, P_ACK, P_OTHER = range(6)

# What a schedule step's kind draws on its target's lane (a css class).
STEP_MARKS = {
    "partition": "fault",
    "drop": "fault",
    "duplicate": "fault",
    "reorder": "fault",
    "delay": "fault",
    "heal": "heal",
    "clear": "heal",
    "kill-replica": "kill",
    "lose-replica": "kill",
    "restart-replica": "restart",
    "kill-relay": "kill",
    "restart-relay": "restart",
    "kill-redis": "kill",
    "restart-redis": "restart",
}

SCRIPT = """
(() => {
  const lanes = document.getElementById('lanes');
  const zoom = document.getElementById('zoom');
  if (zoom && lanes) {
    zoom.addEventListener('input', () => lanes.style.setProperty('--zoom', zoom.value));
  }
  // Compare dataset values rather than build selectors: edit ids are arbitrary text.
  document.addEventListener('click', event => {
    const hit = event.target.closest('[data-focus]');
    if (!hit) return;
    for (const n of document.querySelectorAll('.focus')) n.classList.remove('focus');
    let first = null;
    for (const n of document.querySelectorAll('[data-edit]')) {
      if (n.dataset.edit === hit.dataset.focus) { n.classList.add('focus'); first = first || n; }
    }
    if (first && first !== hit) first.scrollIntoView({block: 'center', inline: 'center'});
  });
  const filter = document.getElementById('filter');
  if (filter) filter.addEventListener('input', () => {
    const q = filter.value.toLowerCase();
    for (const row of document.querySelectorAll('#log tbody tr')) {
      row.hidden = q !== '' && !row.textContent.toLowerCase().includes(q);
    }
  });
})();
"""

STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.2em;color:#222;background:#fff}
h1{font-size:1.4em;margin:.2em 0}h2{font-size:1.15em;margin:1.2em 0 .4em}
.verdict{display:inline-block;padding:.15em .7em;border-radius:4px;font-weight:bold;color:#fff}
.verdict.ok{background:#2a7d2e}.verdict.failed{background:#b3261e}
table{border-collapse:collapse}td,th{border:1px solid #ddd;padding:2px 6px;text-align:left;
vertical-align:top}th{background:#f4f4f4}
code,.mono{font-family:ui-monospace,monospace;font-size:12px;word-break:break-all}
.note{color:#666;font-size:12px}
#timeline{overflow-x:auto;border:1px solid #ccc;margin-top:.4em}
#lanes{width:calc(100% * var(--zoom,1));min-width:100%}
.lane{display:flex;border-top:1px solid #eee}
.lane .name{position:sticky;left:0;z-index:3;flex:0 0 14em;width:14em;background:#fafafa;
padding:2px 6px;border-right:1px solid #ccc;overflow:hidden;font-size:12px}
.lane .name small{display:block;color:#666;font-size:10px;white-space:normal}
.lane[data-group=relay] .name{background:#eef3fb}.lane[data-group=run] .name{background:#f3f3f3}
.lane[data-group=hostile] .name{background:#fbeeee}
.track{position:relative;flex:1 1 auto;height:34px}
.track svg{position:absolute;left:0;top:0;width:100%;height:100%}
.track svg path{fill:#d9d9e6}
.m{position:absolute;top:6px;width:3px;height:22px;margin-left:-1px;background:#555;z-index:2}
.m.edit{background:#2f6fd6;height:12px;top:4px}.m.ack{background:#35a04a;height:10px;top:20px}
.m.fault{background:#e08a00;width:5px;margin-left:-2px}.m.heal{background:#11a3a3;width:5px;margin-left:-2px}
.m.kill{background:#b3261e;width:6px;margin-left:-3px}.m.restart{background:#2a7d2e;width:6px;margin-left:-3px}
.m.attack{background:#8e24aa}.m.conn{background:#999;height:8px;top:24px}
.m.problem,.m.violation{background:#b3261e;width:9px;height:9px;top:12px;margin-left:-4px;
transform:rotate(45deg)}
.m.step{background:#bbb;height:8px;top:24px;width:1px}.m.quiet{background:#777}
.m.lost{background:#ff1744;width:11px;height:11px;top:3px;margin-left:-5px;border-radius:50%;
outline:2px solid #000;z-index:4}
.m.named{outline:2px solid #ff1744}
.focus{box-shadow:0 0 0 4px #ffd600;z-index:5}
tr.focus{background:#fff59d}
.s{position:absolute;top:0;height:100%;z-index:1;opacity:.35}
.s.partition{background:repeating-linear-gradient(45deg,#e08a00 0 4px,transparent 4px 8px)}
.s.down{background:#b3261e}.s.degraded{background:#ffcc80;height:30%;top:70%}
.line{position:absolute;top:0;height:100%;width:0;border-left:2px dashed;z-index:2}
.line.healed{border-color:#11a3a3}.line.converged{border-color:#2a7d2e}
.line.unsettled{border-color:#b3261e}.line.verdict{border-color:#222}
.axis{display:flex}
.axis .name{flex:0 0 14em;width:14em;position:sticky;left:0;background:#fff;z-index:3}
.axis .ticks{position:relative;flex:1 1 auto;height:18px;font-size:10px;color:#666}
.axis .ticks span{position:absolute;border-left:1px solid #999;padding-left:2px}
.legend span{display:inline-block;margin-right:1em;font-size:12px}
.legend .key{position:static;display:inline-block;margin:0 4px;vertical-align:middle}
#lost td:first-child,#violations code{cursor:pointer}
.scroll{max-height:24em;overflow:auto}
"""

_CSP = (
    "default-src 'none'; style-src 'unsafe-inline'; "
    f"script-src 'sha256-{base64.b64encode(hashlib.sha256(SCRIPT.encode()).digest()).decode()}'"
)


def read_history(path: Path) -> list[dict[str, Any]]:
    """The entries of a ``history.jsonl``; lines that do not parse (a run cut off
    mid-write) are skipped, and a missing file is an empty history."""
    entries: list[dict[str, Any]] = []
    try:
        handle = open(path, encoding="utf-8", errors="replace")  # noqa: SIM115
    except FileNotFoundError:
        return entries
    with handle:
        for line in handle:
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if isinstance(entry, dict):
                entries.append(entry)
    return entries


def write_report_html(
    folder: Path,
    report: Mapping[str, Any],
    shrunk: Sequence[Mapping[str, Any] | str] | None = None,
) -> Path:
    """Write ``folder/report.html`` from ``folder/history.jsonl`` and ``report`` (a
    ``CampaignReport.to_json()``); return its path. Replaces an earlier one atomically:
    it is written again once the failure is shrunk."""
    page = render_report(read_history(folder / "history.jsonl"), report, shrunk)
    target = folder / "report.html"
    partial = folder / "report.html.partial"
    # "replace": a history may hold lone surrogates (JSON escapes allow them).
    partial.write_bytes(page.encode("utf-8", "replace"))
    os.replace(partial, target)
    return target


# -- model ----------------------------------------------------------------------------


@dataclass(slots=True)
class _Mark:
    t: float
    kind: str  # css class
    label: str
    prio: int
    edit: str | None = None
    named: bool = False  # an edit named in a violation's message (not lost itself)


@dataclass
class _Lane:
    name: str
    group: str  # replica | hostile | relay | redis | run | other
    marks: list[_Mark] = field(default_factory=list)
    spans: list[tuple[float, float, str, str]] = field(default_factory=list)
    open: dict[str, tuple[float, str]] = field(default_factory=dict)  # span kind -> start
    times: list[float] = field(default_factory=list)  # every event, for the density strip
    counts: Counter[str] = field(default_factory=Counter)


@dataclass
class _LostEdit:
    id: str
    document: str | None
    kind: str
    where: list[str]
    replica: str = "?"
    step: int | None = None
    made: float | None = None
    acked: float | None = None


def _num(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def _text(value: Any, limit: int = MAX_TEXT) -> str:
    """``value`` as bounded plain text (escaped on output, never here)."""
    s = value if isinstance(value, str) else json.dumps(value, default=str)
    return s if len(s) <= limit else s[: limit - 1] + "…"


def _e(value: Any, limit: int = MAX_TEXT) -> str:
    return html.escape(_text(value, limit), quote=True)


def _edit_id(value: Any) -> str:
    """An edit's id as violations name it: whole (it is cut short only on output, the
    same way everywhere, so the page's links between them still match)."""
    return value if isinstance(value, str) else _text(value, 200)


def _step_text(step: Any) -> str:
    """How ``crdtsync check`` prints a step (``Step.__str__``); anything else as JSON."""
    if isinstance(step, str):
        return step
    if isinstance(step, Mapping):
        # Imported here: campaign imports this module.
        from .campaign import Step

        try:
            return str(Step(**step))
        except (TypeError, ValueError):
            pass
    return json.dumps(step, default=str)


class _Timeline:
    """Events sorted into lanes, in one pass over the history."""

    def __init__(self, history: list[Mapping[str, Any]], report: Mapping[str, Any]) -> None:
        self.lanes: dict[str, _Lane] = {}
        self.replicas = 0
        self.relays = 0
        self.times = [t for e in history if (t := _num(e.get("t"))) is not None]
        self.t0 = min(self.times, default=0.0)
        self.t1 = max(self.times, default=0.0)
        self.lines: list[tuple[float, str, str]] = []  # (t, css class, label)
        self.log: list[tuple[int, float, str, Mapping[str, Any]]] = []  # (prio, t, lane, entry)
        self.counts: Counter[str] = Counter()
        schedule = report.get("schedule")
        self.schedule: list[Any] = list(schedule) if isinstance(schedule, list) else []
        self.lost: dict[tuple[str | None, str], _LostEdit] = {}
        self.named: set[str] = set()
        self.step_n: int | None = None  # the step running: edits are logged after it
        self._violations(report)
        self._layout(history)
        for entry in history:
            self._entry(entry)
        self._close_spans()

    # -- lanes ------------------------------------------------------------------------

    def _layout(self, history: list[Mapping[str, Any]]) -> None:
        """Lanes in a stable order: participants, relays, then the run itself."""
        started = next((e for e in history if e.get("event") == "started"), None)
        if started is not None:
            replicas, hostile = started.get("replicas"), started.get("hostile")
            relays = started.get("relays")
            self.replicas = replicas if isinstance(replicas, int) else 0
            hostile = hostile if isinstance(hostile, int) else 0
            self.relays = len(relays) if isinstance(relays, list) else 0
            # Room is kept for the relays and the run: participants fold first.
            room = MAX_LANES - min(self.relays, MAX_RELAY_LANES) - 2
            for i in range(min(self.replicas + hostile, room)):
                self.lane(self.participant(i))
            for r in range(min(self.relays, MAX_RELAY_LANES)):
                self.lane(f"relay {r}")
        self.lane("run")

    def lane(self, name: str) -> _Lane:
        if name in self.lanes:
            return self.lanes[name]
        relay = re.fullmatch(r"relay (\d+)", name)
        reserved = name in ("run", "redis") or (
            relay is not None and int(relay.group(1)) < min(self.relays, MAX_RELAY_LANES)
        )
        if len(self.lanes) >= MAX_LANES - 1 and not reserved:
            name = "other participants"
            if name in self.lanes:
                return self.lanes[name]
        group = "other"
        for prefix, g in (("replica-", "replica"), ("hostile-", "hostile"), ("relay ", "relay")):
            if name.startswith(prefix):
                group = g
        group = {"run": "run", "redis": "redis"}.get(name, group)
        lane = self.lanes[name] = _Lane(name, group)
        return lane

    def participant(self, i: int) -> str:
        return f"hostile-{i}" if self.replicas and i >= self.replicas else f"replica-{i}"

    def named_lane(self, name: Any) -> _Lane:
        """The lane of a participant as messages name it ("fresh replica of relay 0",
        "store of relay 1", "replica-2's open Doc", "the relays' Redis")."""
        name = _text(name, 80)
        if m := re.match(r"(replica|hostile)-\d+", name):
            return self.lane(m.group(0))
        if m := re.search(r"relay (\d+)", name):
            return self.lane(f"relay {m.group(1)}")
        if "Redis" in name:
            return self.lane("redis")
        return self.lane("run")

    def link_lane(self, proxy: Any) -> tuple[_Lane, int | None]:
        if isinstance(proxy, str) and (m := re.fullmatch(r"link-(\d+)", proxy)):
            i = int(m.group(1))
            return self.lane(self.participant(i)), i
        return self.lane("run"), None

    def relay_of(self, i: int | None) -> _Lane | None:
        """The relay participant ``i`` reaches (the campaign spreads them round-robin)."""
        if i is None or not self.relays:
            return None
        return self.lane(f"relay {i % self.relays}")

    # -- events -----------------------------------------------------------------------

    def _violations(self, report: Mapping[str, Any]) -> None:
        violations = report.get("violations")
        words: set[str] = set()
        for v in violations if isinstance(violations, list) else []:
            if not isinstance(v, Mapping):
                continue
            where = v.get("where")
            places = [_text(w, 80) for w in where] if isinstance(where, list | tuple) else []
            edit, document = v.get("edit"), v.get("document")
            document = document if isinstance(document, str) else None
            if isinstance(edit, str) and v.get("kind") in LOST_KINDS:
                self.lost[(document, edit)] = _LostEdit(edit, document, str(v["kind"]), places)
            elif isinstance(edit, str):
                words.add(edit)
            message = v.get("message")
            if isinstance(message, str):
                # A diverged violation names edits "(edits a, b and 3 more)".
                words.update(re.split(r"[\s,;()]+", message[:20000]))
        self.named = words

    def add(self, lane: _Lane, t: float, kind: str, label: str, prio: int, **kw: Any) -> None:
        lane.marks.append(_Mark(t, kind, label, prio, **kw))

    def _entry(self, entry: Mapping[str, Any]) -> None:
        t = _num(entry.get("t"))
        if t is None:
            return
        event = _text(entry.get("event"), 40)
        self.counts[event] += 1
        s = f"{t - self.t0:.3f} s"
        if "proxy" in entry:  # a fault proxy's event: it names its link
            lane, i = self.link_lane(entry.get("proxy"))
            lane.times.append(t)
            lane.counts["frames" if event in TRAFFIC else f"link {event}"] += 1
            relay = self.relay_of(i)
            if event in TRAFFIC:
                if relay is not None:
                    relay.times.append(t)
                return
            if event in CONNECTION:
                what = entry.get("cause") or entry.get("reason") or ""
                label = f"{event} on {lane.name}'s link {_text(what, 80)} at {s}".replace("  ", " ")
                self.add(lane, t, "conn", label, P_OTHER)
            self.log.append((P_OTHER, t, lane.name, entry))
            return
        if event == "step":
            self._step(entry, t, s)
        elif event == "edit":
            self._edit(entry, t, s)
        elif event == "acknowledged":
            self._ack(entry, t, s)
        elif event in ("healed", "settled", "verdict"):
            self._line(entry, event, t, s)
        elif event == "violation":
            self.log.append((P_PROBLEM, t, "run", entry))
        else:
            who = entry.get("participant", entry.get("replica"))
            lane = self.named_lane(who) if who is not None else self.lane("run")
            lane.times.append(t)
            lane.counts[event] += 1
            if event == "unusable":
                label = f"unusable at {s}: {_text(entry.get('message'))}"
                self.add(lane, t, "problem", label, P_PROBLEM)
                self.log.append((P_PROBLEM, t, lane.name, entry))
            elif event == "attack":
                sent = "sent" if entry.get("sent") else "not sent"
                what = f"{_text(entry.get('kind'), 40)} {_text(entry.get('variant') or '', 40)}"
                self.add(lane, t, "attack", f"attack {what.strip()} ({sent}) at {s}", P_EDIT)
                self.log.append((P_EDIT, t, lane.name, entry))
            elif event != "started":
                self.add(lane, t, "other", f"{event} at {s}", P_OTHER)
                self.log.append((P_OTHER, t, lane.name, entry))
            else:
                self.log.append((P_FAULT, t, lane.name, entry))

    def _step(self, entry: Mapping[str, Any], t: float, s: str) -> None:
        n = entry.get("n")
        self.step_n = n if isinstance(n, int) else None
        text = _text(entry.get("step", ""), 120)
        step = self.schedule[n] if isinstance(n, int) and 0 <= n < len(self.schedule) else None
        kind = step.get("kind") if isinstance(step, Mapping) else None
        target = step.get("target") if isinstance(step, Mapping) else None
        run = self.lane("run")
        run.times.append(t)
        run.counts["steps"] += 1
        prio = P_OTHER if kind != "quiet" else P_ACK
        self.add(run, t, "quiet" if kind == "quiet" else "step", f"step {n}: {text} at {s}", prio)
        if kind not in STEP_MARKS or not isinstance(target, int):
            self.log.append((P_OTHER, t, "run", entry))
            return
        if kind in ("kill-relay", "restart-relay"):
            lane = self.lane(f"relay {target}")
        elif kind in ("kill-redis", "restart-redis"):
            lane = self.lane("redis")
        else:
            lane = self.lane(self.participant(target))
        lane.times.append(t)
        lane.counts[STEP_MARKS[kind]] += 1
        self.add(lane, t, STEP_MARKS[kind], f"step {n}: {text} at {s}", P_FAULT)
        self.log.append((P_FAULT, t, lane.name, entry))
        amount = _num(step.get("amount")) if isinstance(step, Mapping) else None
        # Intervals: a link cut until healed, a process down until restarted, a link
        # degraded until its setting changes; whatever is open at the end, until "healed".
        if kind == "partition":
            lane.open.setdefault("partition", (t, text))
        elif kind in ("heal",):
            self._end(lane, "partition", t)
        elif kind in ("kill-replica", "lose-replica", "kill-relay", "kill-redis"):
            lane.open.setdefault("down", (t, text))
        elif kind.startswith("restart-"):
            self._end(lane, "down", t)
        elif kind in ("duplicate", "reorder", "delay"):
            self._end(lane, f"degraded {kind}", t)
            if amount:
                lane.open[f"degraded {kind}"] = (t, text)
        elif kind == "clear":
            for key in [k for k in lane.open if k.startswith("degraded")]:
                self._end(lane, key, t)

    def _end(self, lane: _Lane, key: str, t: float) -> None:
        if key in lane.open:
            start, text = lane.open.pop(key)
            if len(lane.spans) < MAX_SPANS_PER_LANE:
                lane.spans.append((start, t, key.split()[0], f"{text}: {t - start:.2f} s"))

    def _close_spans(self) -> None:
        healed = next((t for t, kind, _ in self.lines if kind == "healed"), self.t1)
        for lane in self.lanes.values():
            for key in list(lane.open):
                self._end(lane, key, max(healed, lane.open[key][0]))

    def _edit(self, entry: Mapping[str, Any], t: float, s: str) -> None:
        lane = self.named_lane(entry.get("replica"))
        lane.times.append(t)
        lane.counts["edits"] += 1
        edit = _edit_id(entry.get("id"))
        document = entry.get("document")
        doc = document if isinstance(document, str) else None
        where = f" in {_text(doc, 80)}" if doc else ""
        lost = self.lost.get((doc, edit)) or self.lost.get((None, edit))
        if lost is not None:
            lost.replica, lost.made = lane.name, t
            lost.step = self.step_n
            label = f"LOST edit {edit}{where} by {lane.name} at {s} ({lost.kind})"
            self.add(lane, t, "lost", label, P_LOST, edit=edit)
            self.log.append((P_LOST, t, lane.name, entry))
            return
        named = edit in self.named
        label = f"edit {edit}{where} by {lane.name} at {s}"
        self.add(lane, t, "edit", label, P_PROBLEM if named else P_EDIT, edit=edit, named=named)
        self.log.append((P_EDIT, t, lane.name, entry))

    def _ack(self, entry: Mapping[str, Any], t: float, s: str) -> None:
        lane = self.named_lane(entry.get("replica"))
        lane.times.append(t)
        lane.counts["acks"] += 1
        edit = _edit_id(entry.get("id"))
        document = entry.get("document")
        doc = document if isinstance(document, str) else None
        lost = self.lost.get((doc, edit)) or self.lost.get((None, edit))
        if lost is not None:
            lost.acked = t
        label = f"acknowledged {edit} of {lane.name} at {s}"
        self.add(lane, t, "ack", label, P_LOST if lost else P_ACK, edit=edit)
        i = int(lane.name.split("-")[1]) if lane.group == "replica" else None
        relay = self.relay_of(i)
        if relay is not None:
            relay.times.append(t)
            relay.counts["acks"] += 1
            self.add(relay, t, "ack", f"acknowledged {edit} of {lane.name} at {s}", P_ACK)
        self.log.append((P_ACK, t, lane.name, entry))

    def _line(self, entry: Mapping[str, Any], event: str, t: float, s: str) -> None:
        if event == "healed":
            self.lines.append((t, "healed", f"every fault healed at {s}"))
        elif event == "settled":
            same = entry.get("converged") is True
            label = f"converged at {s}" if same else f"still not converged at {s}"
            self.lines.append((t, "converged" if same else "unsettled", label))
        else:
            ok = entry.get("ok") is True
            self.lines.append((t, "verdict", f"verdict {'ok' if ok else 'FAILED'} at {s}"))
        self.log.append((P_PROBLEM, t, "run", entry))

    def x(self, t: float) -> str:
        """Position along the timeline, in percent."""
        span = self.t1 - self.t0
        return f"{(t - self.t0) / span * 100 if span > 0 else 0:.2f}"


def _sample(items: list[Any], budget: int, key: Any) -> list[Any]:
    """At most ``budget`` of ``items``: lowest priority first, the last priority level
    taken evenly across time so a dense stretch is still shown as dense."""
    by_prio: dict[int, list[Any]] = {}
    for item in items:
        by_prio.setdefault(key(item), []).append(item)
    chosen: list[Any] = []
    for prio in sorted(by_prio):
        group = by_prio[prio]
        room = budget - len(chosen)
        if room <= 0:
            break
        if len(group) <= room:
            chosen += group
        else:
            step = len(group) / room
            chosen += [group[int(k * step)] for k in range(room)]
    return chosen


# -- rendering --------------------------------------------------------------------------


def _density(times: list[float], tl: _Timeline) -> str:
    if not times:
        return ""
    span = tl.t1 - tl.t0
    bins = [0] * BINS
    for t in times:
        k = int((t - tl.t0) / span * BINS) if span > 0 else 0
        bins[min(max(k, 0), BINS - 1)] += 1
    top = max(bins)
    # Square roots: a burst of frames should not flatten everything else to nothing.
    path = "".join(
        f"M{k} 20v-{max(1, round(math.sqrt(n / top) * 20))}h1V20z" for k, n in enumerate(bins) if n
    )
    return (
        f'<svg viewBox="0 0 {BINS} 20" preserveAspectRatio="none" aria-hidden="true">'
        f'<path d="{path}"/></svg>'
    )


def _lane_html(lane: _Lane, tl: _Timeline, budget: int) -> str:
    marks = sorted(lane.marks, key=lambda m: m.t)
    drawn = _sample(marks, budget, key=lambda m: m.prio)
    parts = [f'<div class="lane" data-lane="{_e(lane.name)}" data-group="{lane.group}">']
    # What happened to the participant first, then its link's traffic.
    ordered = sorted(
        lane.counts.items(), key=lambda c: (c[0] == "frames" or "link " in c[0], -c[1])
    )
    counts = ", ".join(f"{n} {_e(k, 40)}" for k, n in ordered[:6])
    shown = f"{len(drawn)} of {len(marks)} markers drawn" if len(drawn) < len(marks) else ""
    parts.append(
        f'<div class="name" title="{_e(lane.name)}: {counts}"><b>{_e(lane.name)}</b>'
        f"<small>{counts}{'; ' if counts and shown else ''}{shown}</small></div>"
    )
    parts.append('<div class="track">')
    parts.append(_density(lane.times, tl))
    for start, end, kind, label in lane.spans:
        left, right = float(tl.x(start)), float(tl.x(end))
        parts.append(
            f'<i class="s {kind}" style="left:{left:.2f}%;width:{max(right - left, 0.1):.2f}%" '
            f'title="{_e(label)}"></i>'
        )
    for t, kind, label in tl.lines:
        parts.append(f'<b class="line {kind}" style="left:{tl.x(t)}%" title="{_e(label)}"></b>')
    for m in sorted(drawn, key=lambda m: m.t):
        cls = f"m {m.kind}{' named' if m.named else ''}"
        data = f' data-edit="{_e(m.edit, 200)}" data-focus="{_e(m.edit, 200)}"' if m.edit else ""
        parts.append(f'<i class="{cls}"{data} style="left:{tl.x(m.t)}%" title="{_e(m.label)}"></i>')
    parts.append("</div></div>")
    return "".join(parts)


def _timeline_html(tl: _Timeline) -> str:
    lanes = list(tl.lanes.values())  # empty ones too: a replica that did nothing shows it
    budget = max(20, min(MAX_MARKERS_PER_LANE, MAX_MARKERS // max(1, len(lanes))))
    span = tl.t1 - tl.t0
    ticks = "".join(f'<span style="left:{k * 10}%">{span * k / 10:.1f} s</span>' for k in range(10))
    legend = "".join(
        f'<span><i class="key m {c}"></i>{label}</span>'
        for c, label in (
            ("edit", "edit"),
            ("ack", "acknowledged (when polled)"),
            ("fault", "fault"),
            ("heal", "heal/clear"),
            ("kill", "kill"),
            ("restart", "restart"),
            ("lost", "lost edit"),
            ("problem", "unusable / violation"),
            ("attack", "attack"),
            ("conn", "link up/down"),
        )
    )
    lines = "; ".join(_e(label) for _, _, label in tl.lines)
    return (
        '<section id="timeline-section"><h2>Timeline</h2>'
        f'<p class="legend">{legend}</p>'
        '<p class="note">Shaded: a link partitioned (hatched), a process down (red), a link '
        "duplicating, reordering or delaying (low band). Grey strips: every event of the lane, "
        "network frames included, by density. Acknowledgements are drawn when the run polled "
        "them (at quiet steps, kills and the end), not when the relay sent them. Dashed lines: "
        "faults healed, converged, verdict"
        f"{': ' + lines if lines else ''}. Hover a marker for details; click an edit to find "
        'it everywhere. Zoom: <input id="zoom" type="range" min="1" max="40" step="1" value="1">'
        "</p>"
        '<div id="timeline"><div id="lanes">'
        f'<div class="axis"><div class="name"></div><div class="ticks">{ticks}</div></div>'
        + "".join(_lane_html(lane, tl, budget) for lane in lanes)
        + "</div></div></section>"
    )


def _summary_html(report: Mapping[str, Any], tl: _Timeline) -> str:
    ok = report.get("ok") is True
    rows = [
        ("seed", report.get("seed")),
        ("steps", len(tl.schedule)),
        ("edits", report.get("edits")),
        ("acknowledged", report.get("acknowledged")),
        ("faults", report.get("faults")),
        ("seconds", report.get("seconds")),
        ("history events", sum(tl.counts.values())),
        ("events by kind", dict(tl.counts.most_common(25))),
    ]
    # Only where they say something: many documents, hostile participants.
    for key in ("documents", "edited_documents", "attacks", "refused"):
        if report.get(key) not in (None, 0, {}, 1):
            rows.append((key.replace("_", " "), report.get(key)))
    if report.get("error"):
        rows.append(("error", report.get("error")))
    body = "".join(
        f"<tr><th>{_e(k)}</th><td class='mono'>{_e(v, 1000)}</td></tr>"
        for k, v in rows
        if v is not None
    )
    verdict = "ok" if ok else "FAILED"
    return (
        f'<section id="summary"><p id="verdict" class="verdict {"ok" if ok else "failed"}" '
        f'data-ok="{str(ok).lower()}">{verdict}</p>'
        f"<table>{body}</table></section>"
    )


def _violations_html(report: Mapping[str, Any]) -> str:
    violations = report.get("violations")
    if not isinstance(violations, list) or not violations:
        return ""
    rows = []
    for v in violations[:MAX_VIOLATIONS]:
        if not isinstance(v, Mapping):
            continue
        edit = v.get("edit")
        cell = (
            f'<code data-focus="{_e(edit, 200)}">{_e(edit, 200)}</code>'
            if isinstance(edit, str)
            else ""
        )
        where = v.get("where")
        places = ", ".join(_text(w, 80) for w in where) if isinstance(where, list | tuple) else ""
        rows.append(
            f"<tr><td>{_e(v.get('kind'), 40)}</td><td>{cell}</td><td>{_e(places, 400)}</td>"
            f"<td>{_e(v.get('message'), MAX_MESSAGE)}</td></tr>"
        )
    more = len(violations) - MAX_VIOLATIONS
    note = f'<p class="note">{more} more in report.json</p>' if more > 0 else ""
    return (
        f'<section id="violations"><h2>Violations ({len(violations)})</h2>'
        '<div class="scroll"><table><thead><tr><th>kind</th><th>edit</th><th>where</th>'
        f"<th>message</th></tr></thead><tbody>{''.join(rows)}</tbody></table></div>{note}"
        "</section>"
    )


def _lost_html(tl: _Timeline) -> str:
    if not tl.lost:
        return ""
    lost = sorted(tl.lost.values(), key=lambda e: (e.made is None, e.made or 0.0, e.id))
    rows = []
    for e in lost[:MAX_LOST_ROWS]:
        made = f"{e.made - tl.t0:.3f} s" if e.made is not None else "?"
        acked = f"{e.acked - tl.t0:.3f} s" if e.acked is not None else "no"
        doc = f"<td>{_e(e.document or '', 120)}</td>" if any(x.document for x in lost) else ""
        rows.append(
            f'<tr data-edit="{_e(e.id, 200)}"><td data-focus="{_e(e.id, 200)}"><code>'
            f"{_e(e.id, 200)}</code></td>{doc}<td>{_e(e.replica, 80)}</td>"
            f"<td>{'' if e.step is None else e.step}</td><td>{made}</td><td>{acked}</td>"
            f"<td>{_e(e.kind, 40)}</td><td>{_e(', '.join(e.where), 400)}</td></tr>"
        )
    doc_head = "<th>document</th>" if any(x.document for x in lost) else ""
    more = len(lost) - MAX_LOST_ROWS
    note = f'<p class="note">{more} more in report.json</p>' if more > 0 else ""
    return (
        f'<section id="lost"><h2>Lost edits ({len(lost)})</h2>'
        '<p class="note">Red circles on the timeline; click an id to highlight it.</p>'
        f'<div class="scroll"><table><thead><tr><th>edit</th>{doc_head}<th>by</th><th>step</th>'
        "<th>made</th>"
        "<th>acknowledged</th><th>kind</th><th>missing from</th></tr></thead>"
        f"<tbody>{''.join(rows)}</tbody></table></div>{note}</section>"
    )


def _steps_html(steps: Sequence[Any], limit: int = MAX_STEPS_SHOWN) -> str:
    items = "".join(f"<li><code>{_e(_step_text(s), 200)}</code></li>" for s in steps[:limit])
    more = f'<p class="note">{len(steps) - limit} more steps</p>' if len(steps) > limit else ""
    return f'<ol start="0">{items}</ol>{more}'


def _shrunk_html(report: Mapping[str, Any], shrunk: Sequence[Any] | None) -> str:
    if report.get("ok") is True:
        return ""
    if shrunk is None:
        return (
            '<section id="shrunk"><h2>Shortest failing schedule</h2>'
            '<p class="note">Not shrunk (yet): <code>crdtsync check</code> writes this page '
            "again once shrinking ends; with <code>--shrink-runs 0</code> it never does.</p>"
            "</section>"
        )
    return (
        f'<section id="shrunk" data-steps="{len(shrunk)}">'
        f"<h2>Shortest failing schedule ({len(shrunk)} of {_e(len(_schedule(report)))} steps)"
        f"</h2>{_steps_html(shrunk)}</section>"
    )


def _schedule(report: Mapping[str, Any]) -> list[Any]:
    schedule = report.get("schedule")
    return list(schedule) if isinstance(schedule, list) else []


def _log_html(tl: _Timeline) -> str:
    rows = _sample(tl.log, MAX_LOG_ROWS, key=lambda r: r[0])
    rows.sort(key=lambda r: r[1])
    body = []
    for _, t, lane, entry in rows:
        event = _text(entry.get("event"), 40)
        detail = ", ".join(
            f"{k}={_text(v, 120)}" for k, v in entry.items() if k not in ("t", "event", "updates")
        )
        edit = entry.get("id") if event in ("edit", "acknowledged") else entry.get("edit")
        data = f' data-edit="{_e(edit, 200)}"' if isinstance(edit, str) else ""
        body.append(
            f"<tr{data}><td>{t - tl.t0:.3f}</td><td>{_e(lane, 80)}</td><td>{_e(event, 40)}</td>"
            f'<td class="mono">{_e(detail, 400)}</td></tr>'
        )
    total = len(tl.log)
    note = (
        f"{len(rows)} of {total} events listed (lost edits, violations and faults first); "
        if len(rows) < total
        else ""
    )
    return (
        f'<section><details id="log"><summary>Events ({len(rows)})</summary>'
        f'<p class="note">{note}network frames only counted (history.jsonl has them all). '
        'Filter: <input id="filter" type="search"></p>'
        "<table><thead><tr><th>s</th><th>lane</th><th>event</th><th>detail</th></tr></thead>"
        f"<tbody>{''.join(body)}</tbody></table></details></section>"
    )


def render_report(
    history: Iterable[Mapping[str, Any]],
    report: Mapping[str, Any],
    shrunk: Sequence[Mapping[str, Any] | str] | None = None,
) -> str:
    """The whole page for one run: ``history`` is its parsed ``history.jsonl``, ``report``
    its ``report.json`` (``CampaignReport.to_json()``), ``shrunk`` the shortest failing
    schedule (default: the report's own ``shrunk``)."""
    entries = [e for e in history if isinstance(e, Mapping)]
    if shrunk is None and isinstance(report.get("shrunk"), list):
        shrunk = report["shrunk"]
    tl = _Timeline(entries, report)
    ok = report.get("ok") is True
    title = f"crdtsync check: seed {_e(report.get('seed'), 40)}: {'ok' if ok else 'FAILED'}"
    schedule = _schedule(report)
    return "".join(
        [
            "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>",
            f'<meta http-equiv="Content-Security-Policy" content="{_CSP}">',
            '<meta name="viewport" content="width=device-width, initial-scale=1">',
            f"<title>{title}</title><style>{STYLE}</style></head><body>",
            f"<h1>{title}</h1>",
            _summary_html(report, tl),
            _violations_html(report),
            _lost_html(tl),
            _shrunk_html(report, shrunk),
            _timeline_html(tl),
            f'<section><details id="schedule"><summary>Schedule ({len(schedule)} steps)</summary>'
            f"{_steps_html(schedule)}</details></section>",
            _log_html(tl),
            f"<script>{SCRIPT}</script></body></html>\n",
        ]
    )
