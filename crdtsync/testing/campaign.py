"""Convergence campaigns: replicas, relays and faults driven by a seeded schedule.

A schedule is a list of logical :class:`Step` s (edits, faults, heals, quiet points), drawn
from a seed. Running it never depends on wall-clock timing for *what* happens, only for
how long waiting may take, so ``--seed`` replays the same schedule on a loaded machine.
After the last step every fault is healed, every killed process restarted, and the
checker (:mod:`crdtsync.testing.checker`) judges the final states. A failing schedule is
shrunk by delta debugging to a shorter one that still fails.

Local mode starts its own relay processes (SQLite stores in the run folder); remote mode
points at relays the user runs (network and replica faults only). Each replica reaches
its relay through its own :class:`~crdtsync.testing.proxy.FaultProxy`, so a partition
or a duplicated message concerns one link.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pycrdt import Doc

from ..errors import CrdtsyncError, StoreError
from ..store import UpdateLog
from .checker import EditRecord, FinalState, Violation, check_history, final_state
from .processes import ProcessFailed, RelayChild, WorkerChild
from .proxy import FaultProxy

__all__ = [
    "FAULT_KINDS",
    "CampaignConfig",
    "CampaignFailed",
    "CampaignReport",
    "Step",
    "make_schedule",
    "run_campaign",
    "run_campaign_sync",
    "shrink",
]

FAULT_KINDS = (
    "partition",
    "drop",
    "duplicate",
    "reorder",
    "delay",
    "kill-relay",
    "kill-replica",
    "lose-replica",
)
LOCAL_ONLY = {"kill-relay"}
DOCUMENT = "check/doc"


@dataclass(frozen=True, slots=True)
class Step:
    """One logical step of a schedule.

    ``kind`` is ``edit`` (``count`` edits by replica ``target``), a fault (``partition``,
    ``heal``, ``drop``, ``duplicate``/``reorder``/``delay`` with ``amount``, ``clear``,
    ``kill-relay``, ``restart-relay``, ``kill-replica``, ``lose-replica`` (killed and its
    file destroyed), ``restart-replica``), or ``quiet`` (let the system settle).
    """

    kind: str
    target: int = 0
    count: int = 0
    amount: float = 0.0

    def __str__(self) -> str:
        if self.kind == "edit":
            return f"edit(replica {self.target}, {self.count})"
        if self.kind in ("duplicate", "reorder", "delay"):
            return f"{self.kind}(link {self.target}, {self.amount:g})"
        if self.kind in ("kill-relay", "restart-relay"):
            return f"{self.kind}({self.target})"
        if self.kind == "quiet":
            return "quiet"
        return f"{self.kind}(replica {self.target})"


@dataclass
class CampaignConfig:
    """What to run. Rates are per-step probabilities of drawing each fault kind."""

    replicas: int = 3
    relays: Sequence[str] = ()  # remote mode: URLs of relays the user runs
    local_relays: int = 1
    steps: int = 40
    edits_per_step: int = 3
    faults: Sequence[str] = FAULT_KINDS
    fault_rate: float = 0.35
    workload: str = "crdtsync.testing.workload:default_workload"
    out: Path | None = None
    duration_s: float = 120.0  # a cap on one run, not a schedule
    relay_command: Sequence[str] = (sys.executable, "-m", "crdtsync", "relay")
    relay_args: Sequence[str] = ()
    settle_s: float = 20.0
    on_progress: Callable[[str, dict[str, Any]], None] | None = None

    @property
    def local(self) -> bool:
        return not self.relays


@dataclass
class CampaignReport:
    """The outcome of one run of one schedule."""

    seed: int
    schedule: list[Step]
    edits: int = 0
    acknowledged: int = 0
    faults: dict[str, int] = field(default_factory=dict)
    violations: list[Violation] = field(default_factory=list)
    error: str | None = None
    seconds: float = 0.0
    out: str | None = None
    shrunk: list[Step] | None = None

    @property
    def ok(self) -> bool:
        return not self.violations and self.error is None

    def summary(self) -> str:
        verdict = "ok" if self.ok else "FAILED"
        lines = [
            f"seed {self.seed}: {verdict}: {len(self.schedule)} steps, {self.edits} edits "
            f"({self.acknowledged} acknowledged), faults {dict(sorted(self.faults.items()))}, "
            f"{self.seconds:.1f} s"
        ]
        if self.error:
            lines.append(f"  error: {self.error}")
        lines += [f"  violation: {v}" for v in self.violations]
        if self.shrunk is not None:
            lines.append(f"  shortest failing schedule ({len(self.shrunk)} steps):")
            lines += [f"    {i}: {step}" for i, step in enumerate(self.shrunk)]
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "ok": self.ok,
            "schedule": [asdict(s) for s in self.schedule],
            "edits": self.edits,
            "acknowledged": self.acknowledged,
            "faults": self.faults,
            "violations": [asdict(v) for v in self.violations],
            "error": self.error,
            "seconds": round(self.seconds, 3),
            "shrunk": None if self.shrunk is None else [asdict(s) for s in self.shrunk],
        }


class CampaignFailed(AssertionError):
    """Raised by :func:`run_campaign_sync` with ``raise_on_failure``: carries the report."""

    def __init__(self, report: CampaignReport) -> None:
        super().__init__(report.summary())
        self.report = report


def make_schedule(seed: int, config: CampaignConfig) -> list[Step]:
    """Draw a schedule from ``seed``: the same seed and config give the same steps."""
    rng = random.Random(seed)
    kinds = [k for k in config.faults if config.local or k not in LOCAL_ONLY]
    n_relays = config.local_relays if config.local else len(config.relays)
    partitioned: set[int] = set()
    dead_replicas: set[int] = set()
    dead_relays: set[int] = set()
    steps: list[Step] = []
    for _ in range(config.steps):
        roll = rng.random()
        replica = rng.randrange(config.replicas)
        if roll < config.fault_rate and kinds:
            kind = rng.choice(kinds)
            if kind == "partition":
                if replica in partitioned:
                    partitioned.discard(replica)
                    steps.append(Step("heal", replica))
                else:
                    partitioned.add(replica)
                    steps.append(Step("partition", replica))
            elif kind in ("duplicate", "reorder"):
                steps.append(Step(kind, replica, amount=rng.choice([0.0, 0.3, 0.7])))
            elif kind == "delay":
                steps.append(Step("delay", replica, amount=rng.choice([0.0, 0.005, 0.02])))
            elif kind == "drop":
                steps.append(Step("drop", replica))
            elif kind == "kill-relay":
                relay = rng.randrange(n_relays)
                if relay in dead_relays:
                    dead_relays.discard(relay)
                    steps.append(Step("restart-relay", relay))
                else:
                    dead_relays.add(relay)
                    steps.append(Step("kill-relay", relay))
            elif kind in ("kill-replica", "lose-replica"):
                if replica in dead_replicas:
                    dead_replicas.discard(replica)
                    steps.append(Step("restart-replica", replica))
                else:
                    dead_replicas.add(replica)
                    steps.append(Step(kind, replica))
        elif roll < config.fault_rate + 0.12:
            steps.append(Step("quiet"))
        else:
            steps.append(Step("edit", replica, count=rng.randint(1, config.edits_per_step)))
    return steps


class _Run:
    """One execution of one schedule; everything it starts lives under ``folder``."""

    def __init__(self, seed: int, config: CampaignConfig, folder: Path) -> None:
        self.seed = seed
        self.config = config
        self.folder = folder
        self.history = open(folder / "history.jsonl", "w", encoding="utf-8")  # noqa: SIM115
        self.relays: list[RelayChild] = []
        self.relay_urls: list[str] = list(config.relays)
        self.proxies: list[FaultProxy] = []
        self.workers: list[WorkerChild | None] = []
        self.generation = [0] * config.replicas
        self.edits: dict[str, EditRecord] = {}
        self.acknowledged: set[str] = set()
        self.lost: set[str] = set()
        self.faults: dict[str, int] = {}

    def log(self, event: str, **fields: Any) -> None:
        entry = {"t": round(time.monotonic(), 4), "event": event, **fields}
        self.history.write(json.dumps(entry) + "\n")
        if self.config.on_progress is not None:
            self.config.on_progress(event, fields)

    def net_event(self, detail: dict[str, Any]) -> None:
        """A fault proxy's event (it names its link), kept in the history only."""
        entry = {"t": round(time.monotonic(), 4), "event": "net", **detail}
        self.history.write(json.dumps(entry) + "\n")

    def count(self, fault: str) -> None:
        self.faults[fault] = self.faults.get(fault, 0) + 1

    # -- setup -----------------------------------------------------------------------

    async def start(self) -> None:
        cfg = self.config
        if cfg.local:
            for i in range(cfg.local_relays):
                relay = RelayChild(
                    cfg.relay_command,
                    self.folder / f"relay-{i}.db",
                    cwd=self.folder,
                    log=self.folder / f"relay-{i}.log",
                    extra=cfg.relay_args,
                )
                self.relays.append(relay)
                self.relay_urls.append(await relay.start())
        for i in range(cfg.replicas):
            upstream = self.relay_urls[i % len(self.relay_urls)]
            proxy = FaultProxy(
                upstream,
                rng=random.Random(f"{self.seed}-proxy-{i}"),
                name=f"link-{i}",
                on_event=self.net_event,
            )
            await proxy.start()
            self.proxies.append(proxy)
        self.workers = [None] * cfg.replicas
        await asyncio.gather(*(self.start_worker(i) for i in range(cfg.replicas)))
        self.log("started", relays=self.relay_urls, replicas=cfg.replicas, seed=self.seed)

    def worker_name(self, i: int) -> str:
        return f"replica-{i}"

    async def start_worker(self, i: int) -> None:
        worker = WorkerChild(
            db=self.folder / f"{self.worker_name(i)}.db",
            relay=self.proxies[i].url,
            doc=DOCUMENT,
            workload=self.config.workload,
            seed=hash((self.seed, i, self.generation[i])) & 0xFFFFFFFF,
            cwd=Path.cwd(),
            log=self.folder / f"{self.worker_name(i)}.log",
        )
        self.generation[i] += 1
        await worker.start()
        self.workers[i] = worker

    # -- steps -------------------------------------------------------------------------

    async def step(self, n: int, step: Step) -> None:
        self.log("step", n=n, step=str(step))
        i = step.target
        if step.kind == "edit":
            worker = self.workers[i]
            if worker is None:
                return
            answer = await worker.call({"cmd": "edit", "count": step.count})
            for e in answer.get("edits", []):
                if not e["stored"]:
                    continue  # the replica reported a store error: not promised durable
                update = base64.b64decode(e["update"])
                record = EditRecord.from_update(e["id"], self.worker_name(i), n, update)
                self.edits[record.id] = record
                self.log("edit", id=record.id, replica=self.worker_name(i))
        elif step.kind == "partition":
            self.proxies[i].partition()
            self.count("partition")
        elif step.kind == "heal":
            self.proxies[i].heal()
        elif step.kind == "drop":
            await self.proxies[i].drop_connections()
            self.count("drop")
        elif step.kind == "duplicate":
            self.proxies[i].set_duplicate(step.amount)
            self.count("duplicate")
        elif step.kind == "reorder":
            self.proxies[i].set_reorder(step.amount)
            self.count("reorder")
        elif step.kind == "delay":
            self.proxies[i].set_delay(step.amount)
            self.count("delay")
        elif step.kind == "clear":
            self.proxies[i].clear_faults()
        elif step.kind == "kill-relay" and i < len(self.relays):
            await self.poll_acknowledgements()
            await self.relays[i].kill()
            self.count("kill-relay")
        elif step.kind == "restart-relay" and i < len(self.relays):
            if not self.relays[i].running:
                await self.relays[i].start()
        elif step.kind in ("kill-replica", "lose-replica"):
            worker = self.workers[i]
            if worker is None:
                return
            await self.poll_acknowledgements()
            await worker.kill()
            self.workers[i] = None
            self.count(step.kind)
            if step.kind == "lose-replica":
                for suffix in ("", "-wal", "-shm"):
                    path = self.folder / f"{self.worker_name(i)}.db{suffix}"
                    path.unlink(missing_ok=True)
                self.lost.add(self.worker_name(i))
        elif step.kind == "restart-replica":
            if self.workers[i] is None:
                await self.start_worker(i)
        elif step.kind == "quiet":
            await self.quiet(2.0)

    async def poll_acknowledgements(self) -> list[dict[str, Any]]:
        """Ask every live replica for its status, recording newly acknowledged edits.

        A worker reports each acknowledgement once, so every status answer goes through here.
        """
        statuses = []
        for i, worker in enumerate(self.workers):
            if worker is None:
                continue
            status = await worker.call({"cmd": "status"})
            statuses.append(status)
            for edit_id in status.get("acknowledged", []):
                if edit_id in self.edits and edit_id not in self.acknowledged:
                    self.acknowledged.add(edit_id)
                    self.log("acknowledged", id=edit_id, replica=self.worker_name(i))
        return statuses

    async def quiet(self, limit_s: float) -> None:
        deadline = time.monotonic() + limit_s
        while time.monotonic() < deadline:
            statuses = await self.poll_acknowledgements()
            if all(s["pending"] == 0 for s in statuses if s["connected"]):
                return
            await asyncio.sleep(0.05)

    # -- the end -----------------------------------------------------------------------

    async def heal_all(self) -> None:
        for proxy in self.proxies:
            proxy.heal()
            proxy.clear_faults()
        for relay in self.relays:
            if not relay.running:
                await relay.start()
        for i, worker in enumerate(self.workers):
            if worker is None:
                await self.start_worker(i)
        self.log("healed")

    async def final_states(self) -> list[FinalState]:
        deadline = time.monotonic() + self.config.settle_s
        for worker in self.workers:
            assert worker is not None
            left = max(1.0, deadline - time.monotonic())
            answer = await worker.call({"cmd": "sync", "timeout": left}, timeout_s=left + 10)
            if not answer.get("ok"):
                self.log("sync-timeout", error=answer.get("error"))
        await self.poll_acknowledgements()
        finals: list[FinalState] = []
        # States may still be in flight between replicas: poll until equal, bounded.
        while True:
            finals = []
            for i, worker in enumerate(self.workers):
                assert worker is not None
                answer = await worker.call({"cmd": "state"})
                finals.append(final_state(self.worker_name(i), base64.b64decode(answer["update"])))
            finals += await self.relay_states()
            same = all(
                (f.state_vector, f.deletes) == (finals[0].state_vector, finals[0].deletes)
                for f in finals
            )
            if same or time.monotonic() > deadline:
                return finals
            await asyncio.sleep(0.1)

    async def relay_states(self) -> list[FinalState]:
        """A fresh replica per relay, syncing straight from it; in local mode, the store file."""
        out: list[FinalState] = []
        for r, url in enumerate(self.relay_urls):
            fresh = WorkerChild(
                db=self.folder / f"fresh-{r}-{time.monotonic_ns()}.db",
                relay=url,
                doc=DOCUMENT,
                workload=self.config.workload,
                seed=0,
                cwd=Path.cwd(),
                log=self.folder / f"fresh-{r}.log",
            )
            await fresh.start()
            try:
                await fresh.call({"cmd": "synced", "timeout": 10}, timeout_s=20)
                answer = await fresh.call({"cmd": "state"})
                out.append(
                    final_state(f"fresh replica of relay {r}", base64.b64decode(answer["update"]))
                )
            finally:
                await fresh.quit()
        for r, relay in enumerate(self.relays):
            try:
                with UpdateLog(relay.store) as log:
                    merged = log.load(DOCUMENT).merged()
            except StoreError as exc:
                raise StoreError(f"relay {r}'s store does not open cleanly: {exc}") from exc
            doc: Doc[Any] = Doc()
            doc.apply_update(merged)
            out.append(final_state(f"store file of relay {r}", doc.get_update()))
        return out

    async def close(self) -> None:
        for worker in self.workers:
            if worker is not None:
                with contextlib.suppress(Exception):
                    await worker.quit()
        for proxy in self.proxies:
            with contextlib.suppress(Exception):
                await proxy.stop()
        for relay in self.relays:
            await relay.stop()
        self.history.close()


async def run_campaign(
    seed: int, config: CampaignConfig, schedule: list[Step] | None = None
) -> CampaignReport:
    """Run one schedule (drawn from ``seed`` unless given) and check the outcome."""
    schedule = make_schedule(seed, config) if schedule is None else schedule
    report = CampaignReport(seed, schedule)
    base = Path(tempfile.mkdtemp(prefix=f"crdtsync-check-{seed}-")) if config.out is None else None
    folder = config.out / f"seed-{seed}-{time.monotonic_ns()}" if config.out else base
    assert folder is not None
    folder.mkdir(parents=True, exist_ok=True)
    report.out = str(folder)
    run = _Run(seed, config, folder)
    started = time.monotonic()
    try:
        async with asyncio.timeout(config.duration_s):
            await run.start()
            for n, step in enumerate(schedule):
                await run.step(n, step)
            await run.heal_all()
            finals = await run.final_states()
        edits = list(run.edits.values())
        edits = [
            EditRecord(
                e.id, e.replica, e.step, e.starts, e.ends, e.deletes, e.id in run.acknowledged
            )
            for e in edits
        ]
        report.violations = check_history(edits, finals, lost_files=run.lost)
    except TimeoutError:
        report.error = f"the run did not finish within --duration {config.duration_s} s"
    except (ProcessFailed, CrdtsyncError, OSError) as exc:
        report.error = f"{type(exc).__name__}: {exc}"
    finally:
        report.seconds = time.monotonic() - started
        report.edits = len(run.edits)
        report.acknowledged = len(run.acknowledged)
        report.faults = dict(run.faults)
        for key in ("duplicated", "reordered", "delayed", "aborted", "refused"):
            total = sum(proxy.stats.get(key, 0) for proxy in run.proxies)
            if total:
                report.faults[f"messages {key}"] = total
        for v in report.violations:
            run.log("violation", kind=v.kind, message=v.message, edit=v.edit)
        run.log("verdict", ok=report.ok, error=report.error)
        await run.close()
        (folder / "report.json").write_text(json.dumps(report.to_json(), indent=2))
        if base is not None and report.ok:
            shutil.rmtree(base, ignore_errors=True)
            report.out = None
    return report


def _same_failure(report: CampaignReport, original: CampaignReport) -> bool:
    kinds = {v.kind for v in original.violations}
    return bool(kinds & {v.kind for v in report.violations}) or (
        original.error is not None and report.error is not None
    )


async def shrink(
    seed: int, config: CampaignConfig, failing: CampaignReport, max_runs: int = 10
) -> list[Step]:
    """Delta-debug ``failing.schedule`` to a shorter schedule with the same kind of failure."""
    current = list(failing.schedule)
    chunks = 2
    runs = 0
    while len(current) >= 2 and runs < max_runs:
        size = max(1, len(current) // chunks)
        reduced = False
        for start in range(0, len(current), size):
            if runs >= max_runs:
                break
            candidate = current[:start] + current[start + size :]
            runs += 1
            report = await run_campaign(seed, config, candidate)
            if _same_failure(report, failing):
                current = candidate
                chunks = max(chunks - 1, 2)
                reduced = True
                break
        if not reduced:
            if size == 1:
                break
            chunks = min(chunks * 2, len(current))
    return current


def run_campaign_sync(
    seed: int,
    config: CampaignConfig | None = None,
    *,
    schedule: list[Step] | None = None,
    shrink_runs: int = 10,
    raise_on_failure: bool = True,
) -> CampaignReport:
    """Run a campaign from plain (pytest) code; shrink and raise :class:`CampaignFailed` on failure.

    Example::

        from crdtsync.testing import CampaignConfig, run_campaign_sync

        def test_my_documents_converge():
            run_campaign_sync(7, CampaignConfig(workload="myapp.edits:random_edit"))
    """
    config = config or CampaignConfig()

    async def main() -> CampaignReport:
        report = await run_campaign(seed, config, schedule)
        if not report.ok and shrink_runs > 0:
            report.shrunk = await shrink(seed, config, report, shrink_runs)
        return report

    report = asyncio.run(main())
    if raise_on_failure and not report.ok:
        raise CampaignFailed(report)
    return report
