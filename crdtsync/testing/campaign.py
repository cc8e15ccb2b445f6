"""Convergence campaigns: replicas, relays and faults driven by a seeded schedule.

A schedule is a list of logical :class:`Step` s (edits, faults, heals, quiet points), drawn
from a seed. Running it never depends on wall-clock timing for *what* happens, only for
how long waiting may take, so ``--seed`` replays the same schedule on a loaded machine.
After the last step every fault is healed, every killed process restarted, and the
checker (:mod:`crdtsync.testing.checker`) judges the final states. A failing schedule is
shrunk by delta debugging to a shorter one that still fails.

Local mode starts its own relay processes (SQLite stores in the run folder, or, with the
Redis backend, one ``redis-server`` of its own that every relay shares: replicas spread
over the relays, and a ``kill-redis`` fault kills Redis and restarts it from its
append-only file); remote mode points at relays the user runs (network and replica
faults only). Each replica reaches
its relay through its own :class:`~crdtsync.testing.proxy.FaultProxy`, so a partition
or a duplicated message concerns one link.

With ``hostile=N``, N more participants join: stock y-websocket clients that attack the
room (:mod:`crdtsync.testing.hostile`) on their ``attack`` steps and suffer the same
network faults and kills. Their own state is not judged; the honest replicas and the
relays must still converge, lose no edit and stay usable (:mod:`.checker`), and what the
hostile participants wrote is kept to name it when it shows up where an edit should be.

A participant that stops working is a violation (``unusable``), not an aborted run: an
honest replica whose worker died or whose sync ended for good, a relay that died
without being killed, a relay store that no longer loads into a document.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
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
from ..store import DocumentLog, UpdateLog
from .checker import (
    EditRecord,
    FinalState,
    ForeignWrite,
    Violation,
    check_history,
    converged,
    final_state,
    in_document,
    stored_conflicts,
)
from .processes import CommandChild, HostileChild, ProcessFailed, RelayChild, WorkerChild
from .proxy import FaultProxy
from .redis import RedisServer
from .report_html import write_report_html

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
# Regions (``regions`` >= 2): faults of the links between them.
REGION_FAULTS = ("partition-regions", "link-faults", "kill-link", "empty-region")
LOCAL_ONLY = {"kill-relay", "kill-redis", *REGION_FAULTS}
BACKENDS = ("sqlite", "redis")
REDIS_FAULT = "kill-redis"  # the Redis backend's own fault kind (not in FAULT_KINDS)
DOCUMENT = "check/doc"
FOLDER = "check/"  # with ``documents`` > 1: every replica keeps it
HOT_DOCUMENTS = 8  # ... and half of the edits go to its first documents (more conflicts)


def document_names(n: int) -> list[str]:
    """The documents of a campaign over ``n`` (> 1) documents: ``check/0000``..."""
    width = max(4, len(str(n - 1)))
    return [f"{FOLDER}{i:0{width}d}" for i in range(n)]


@dataclass(frozen=True, slots=True)
class Step:
    """One logical step of a schedule.

    ``kind`` is ``edit`` (``count`` edits by replica ``target``, in ``document`` when the
    campaign has many), ``close`` (replica ``target`` closes the ``count`` documents it
    used least recently: they go on syncing in its file, not open), ``populate``
    (replica ``target`` makes one edit in each of its share of the ``count`` documents:
    every ``replicas``-th one), ``attack`` (``count``
    actions of hostile participant ``target``), a fault (``partition``,
    ``heal``, ``drop``, ``duplicate``/``reorder``/``delay`` with ``amount``, ``clear``,
    ``kill-relay``, ``restart-relay``, ``kill-replica``, ``lose-replica`` (killed and its
    file destroyed), ``restart-replica``), or ``quiet`` (let the system settle).
    Participants are numbered replicas first, then hostile participants.
    """

    kind: str
    target: int = 0
    count: int = 0
    amount: float = 0.0
    document: str = ""  # an edit's, in a campaign over many documents

    def __str__(self) -> str:
        if self.kind == "edit" and self.document:
            return f"edit(replica {self.target}, {self.count}, {self.document})"
        if self.kind in ("edit", "attack", "close"):
            return f"{self.kind}(replica {self.target}, {self.count})"
        if self.kind == "populate":
            return f"populate(replica {self.target}, its share of {self.count} documents)"
        if self.kind in ("duplicate", "reorder", "delay"):
            return f"{self.kind}(link {self.target}, {self.amount:g})"
        if self.kind in ("kill-relay", "restart-relay"):
            return f"{self.kind}({self.target})"
        if self.kind in ("kill-redis", "restart-redis"):
            return self.kind
        if self.kind in ("partition-regions", "heal-regions"):
            return f"{self.kind}({self.target}, {self.count})"
        if self.kind == "link-faults":
            return f"{self.kind}({self.target} -> {self.count}, {self.amount:g})"
        if self.kind in ("kill-link", "empty-region"):
            return f"{self.kind}(region {self.target})"
        if self.kind == "quiet":
            return "quiet"
        return f"{self.kind}(replica {self.target})"


@dataclass
class CampaignConfig:
    """What to run. Rates are per-step probabilities of drawing each fault kind.

    ``hostile`` participants join on top of the ``replicas`` honest ones: their steps
    are attacks (:mod:`crdtsync.testing.hostile`), their links and processes take the
    same faults, and their own state is not judged.

    ``documents`` > 1: every replica keeps the folder ``check/`` (``Replica.keep``) and
    edits spread over ``check/0000``... ``open_documents`` at most are open at a time in
    a replica (it closes the least recently used); the others sync into its file
    without being open. Every replica's file must end up holding every document as
    the relays' stores do. Not with ``hostile``.
    """

    replicas: int = 3
    hostile: int = 0  # hostile participants, on top of ``replicas`` honest ones
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
    # local mode: "sqlite" (a file per relay) or "redis" (one redis-server, shared)
    backend: str = "sqlite"
    settle_s: float = 20.0
    on_progress: Callable[[str, dict[str, Any]], None] | None = None
    documents: int = 1  # > 1: a folder of that many documents (see above)
    open_documents: int = 6  # (documents > 1) open at once in a replica
    # Regions (local mode): that many regions, each a relay on a store of its own, peered
    # through a fault proxy per link; replicas spread over them. What a link loses stays
    # lost (the check judges the links alone) unless ``anti_entropy``: the relays then
    # compare digests every 2 s and repair (counted in the report's faults, not judged).
    # ``link_defect``: links broken on purpose (the negative controls).
    regions: int = 0
    anti_entropy: bool = False
    link_defect: str = ""

    def __post_init__(self) -> None:
        if self.regions == 1 or self.regions < 0:
            raise ValueError("regions: 2 or more (0: none)")
        if self.regions:
            if self.relays:
                raise ValueError("regions run in local mode only (no --relay)")
            if self.hostile:
                raise ValueError("regions are checked with honest replicas only")
            if self.backend != "sqlite":
                raise ValueError("regions run on SQLite stores (one per region)")
            self.local_relays = self.regions
            if tuple(self.faults) == FAULT_KINDS:
                self.faults = (*FAULT_KINDS, *REGION_FAULTS)
        else:
            self.faults = [k for k in self.faults if k not in REGION_FAULTS]
        if self.documents < 1:
            raise ValueError(f"documents must be at least 1, not {self.documents}")
        if self.documents > 1 and self.hostile:
            raise ValueError("hostile participants attack one document: use documents=1")
        if self.open_documents < 1:
            raise ValueError(f"open_documents must be at least 1, not {self.open_documents}")

    @property
    def local(self) -> bool:
        return not self.relays

    @property
    def many(self) -> bool:
        """A campaign over many documents (a kept folder)."""
        return self.documents > 1


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
    # hostile participants: actions sent, by kind and by "kind variant"
    attacks: dict[str, int] = field(default_factory=dict)
    refused: int = 0  # permission-denied messages the relays sent hostile participants
    documents: int = 1  # the documents the campaign spread its edits over
    edited_documents: int = 0  # ... and how many of them were edited

    @property
    def ok(self) -> bool:
        return not self.violations and self.error is None

    def summary(self) -> str:
        verdict = "ok" if self.ok else "FAILED"
        over = (
            f" in {self.edited_documents} of {self.documents} documents"
            if self.documents > 1
            else ""
        )
        lines = [
            f"seed {self.seed}: {verdict}: {len(self.schedule)} steps, {self.edits} edits{over} "
            f"({self.acknowledged} acknowledged), faults {dict(sorted(self.faults.items()))}, "
            f"{self.seconds:.1f} s"
        ]
        if self.attacks:
            kinds = {k: n for k, n in sorted(self.attacks.items()) if " " not in k}
            lines.append(f"  attacks {kinds}, {self.refused} refused by the relay")
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
            "attacks": self.attacks,
            "refused": self.refused,
            "documents": self.documents,
            "edited_documents": self.edited_documents,
        }


class CampaignFailed(AssertionError):
    """Raised by :func:`run_campaign_sync` with ``raise_on_failure``: carries the report."""

    def __init__(self, report: CampaignReport) -> None:
        super().__init__(report.summary())
        self.report = report


def make_schedule(seed: int, config: CampaignConfig) -> list[Step]:
    """Draw a schedule from ``seed``: the same seed and config give the same steps."""
    rng = random.Random(seed)
    # With no hostile participant, draws are exactly those of earlier versions: a seed
    # keeps its schedule.
    participants = config.replicas + config.hostile
    kinds = [k for k in config.faults if config.local or k not in LOCAL_ONLY]
    kinds = [k for k in kinds if k != "kill-redis" or config.backend == "redis"]
    if config.regions:
        # A replica lost with its file takes with it what only an emptied region held.
        kinds = [k for k in kinds if k != "lose-replica" or "empty-region" not in kinds]
    cut: set[tuple[int, int]] = set()  # region pairs partitioned
    redis_dead = False
    n_relays = config.local_relays if config.local else len(config.relays)
    partitioned: set[int] = set()
    dead_replicas: set[int] = set()
    dead_relays: set[int] = set()
    steps: list[Step] = []
    names = document_names(config.documents) if config.many else []
    if config.many:
        # Every document exists from the start, each written by one replica: the others
        # sync it into their files without ever opening it (unless an edit does).
        steps += [Step("populate", r, count=config.documents) for r in range(config.replicas)]
    for _ in range(config.steps):
        roll = rng.random()
        replica = rng.randrange(participants)
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
            elif kind == "kill-redis":
                steps.append(Step("restart-redis" if redis_dead else "kill-redis"))
                redis_dead = not redis_dead
            elif kind == "partition-regions":
                a, b = sorted(rng.sample(range(config.regions), 2))
                steps.append(Step("heal-regions" if (a, b) in cut else kind, a, count=b))
                cut ^= {(a, b)}
            elif kind == "link-faults":
                a, b = rng.sample(range(config.regions), 2)
                steps.append(Step(kind, a, count=b, amount=rng.choice([0.0, 0.3, 0.7])))
            elif kind in ("kill-link", "empty-region"):
                region = rng.randrange(config.regions)
                if region not in dead_relays:
                    steps.append(Step(kind, region))
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
            kind = "edit" if replica < config.replicas else "attack"
            count = rng.randint(1, config.edits_per_step)
            if not config.many:
                steps.append(Step(kind, replica, count=count))
            elif rng.random() < 0.15:
                steps.append(Step("close", replica, count=rng.randint(1, 3)))
            else:
                hot = rng.random() < 0.5
                document = rng.choice(names[:HOT_DOCUMENTS] if hot else names)
                steps.append(Step(kind, replica, count=count, document=document))
    return steps


EMPTY_DOCUMENT = Doc().get_update()  # what a participant that lacks a document holds


@dataclass
class _Held:
    """What one participant holds at the end, document by document (None: it cannot be
    judged there; a violation says why). ``complete``: a document it lacks counts as
    empty (a file, a store); else it is not judged there (the documents a replica has
    open)."""

    name: str
    states: dict[str, bytes | None]
    complete: bool = True


def decode_states(
    answer: dict[str, Any],
) -> tuple[dict[str, bytes | None], dict[str, bytes | None], dict[str, str]]:
    """A worker's ``states`` answer: the documents in its file and those it has open
    (None: not to be judged there), and the documents it could not read, with why."""
    in_file: dict[str, bytes | None] = {
        d: base64.b64decode(u) for d, u in answer["documents"].items()
    }
    in_docs: dict[str, bytes | None] = {d: base64.b64decode(u) for d, u in answer["open"].items()}
    errors: dict[str, str] = dict(answer.get("errors", {}))
    for document in errors:
        in_file[document] = None
        in_docs.pop(document, None)
    return in_file, in_docs, errors


class _Run:
    """One execution of one schedule; everything it starts lives under ``folder``."""

    def __init__(self, seed: int, config: CampaignConfig, folder: Path) -> None:
        self.seed = seed
        self.config = config
        self.folder = folder
        self.history = open(folder / "history.jsonl", "w", encoding="utf-8")  # noqa: SIM115
        self.relays: list[RelayChild] = []
        self.relay_urls: list[str] = list(config.relays)
        self.redis: RedisServer | None = None  # the Redis backend's server
        self.killed_relays: set[int] = set()  # killed by the schedule, not by a bug
        self.proxies: list[FaultProxy] = []
        self.participants = config.replicas + config.hostile
        self.workers: list[CommandChild | None] = []
        self.generation = [0] * self.participants
        # (document, edit id) -> the edit: ids are unique within a document
        self.edits: dict[tuple[str, str], EditRecord] = {}
        self.acknowledged: set[tuple[str, str]] = set()
        self.documents = document_names(config.documents) if config.many else [DOCUMENT]
        self.lost: set[str] = set()
        self.faults: dict[str, int] = {}
        self.writes: list[ForeignWrite] = []
        self.attacks: dict[str, int] = {}
        self.refused = 0  # refusals counted by hostile processes that have ended
        self.refused_by: dict[int, int] = {}  # ... and by the running ones, so far
        self.problems: list[Violation] = []  # found on the way: unusable participants...
        self.unusable: set[str] = set()  # honest replicas among them: no final state
        # Regions: a fault proxy per link (source region, target region), and the token
        # replicas and links present (the relays then require one).
        self.links: dict[tuple[int, int], FaultProxy] = {}
        self.token: str | None = None

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

    def problem(self, name: str, message: str) -> None:
        """Record that participant ``name`` stopped working (once per cause)."""
        self.problems.append(Violation("unusable", message, where=(name,)))
        self.log("unusable", participant=name, message=message)

    # -- setup -----------------------------------------------------------------------

    async def start(self) -> None:
        cfg = self.config
        if cfg.local and cfg.backend == "redis":
            self.redis = RedisServer(self.folder / "redis")
            await asyncio.to_thread(self.redis.start)
        if cfg.regions:
            await self.start_links()
        if cfg.local:
            for i in range(cfg.local_relays):
                extra = [*cfg.relay_args, *self.region_args(i)]
                relay = RelayChild(
                    cfg.relay_command,
                    self.store_of(i),
                    cwd=self.folder,
                    log=self.folder / f"relay-{i}.log",
                    extra=extra,
                )
                self.relays.append(relay)
                self.relay_urls.append(await relay.start())
        for (_, target), proxy in self.links.items():
            proxy.upstream = self.relay_urls[target].rstrip("/")
        for i in range(self.participants):
            upstream = self.relay_urls[i % len(self.relay_urls)]
            proxy = FaultProxy(
                upstream,
                rng=random.Random(f"{self.seed}-proxy-{i}"),
                name=f"link-{i}",
                on_event=self.net_event,
            )
            await proxy.start()
            self.proxies.append(proxy)
        self.workers = [None] * self.participants
        if self.links:
            await self.await_links()
        await asyncio.gather(*(self.start_worker(i) for i in range(self.participants)))
        self.log(
            "started",
            relays=self.relay_urls,
            replicas=cfg.replicas,
            hostile=cfg.hostile,
            seed=self.seed,
        )

    async def start_links(self) -> None:
        """Regions: a fault proxy per link, and the token every participant presents."""
        from ..auth import mint_token

        regions = range(self.config.regions)
        for source in regions:
            for target in regions:
                if source != target:
                    proxy = FaultProxy(
                        "ws://127.0.0.1:9",  # (its target's port is known once it started)
                        rng=random.Random(f"{self.seed}-link-{source}-{target}"),
                        name=f"region-{source}->{target}",
                        on_event=self.net_event,
                    )
                    await proxy.start()
                    self.links[source, target] = proxy
        self.token = mint_token(_REGIONS_SECRET, subject="check", docs={"**": "rw"}, ttl_s=86400)

    def region_args(self, r: int) -> list[str]:
        """Relay ``r``'s flags as region ``r{r}`` (none without regions). The links'
        settings go in a file: the relay reads its peers from it."""
        cfg = self.config
        if not cfg.regions:
            return []
        lines = [
            f'region = "r{r}"',
            f'token_secrets = ["{_REGIONS_SECRET}"]',
            "link_retry_s = 0.2",
            "link_ack_timeout_s = 10.0",
            f"anti_entropy_s = {2.0 if cfg.anti_entropy else 0}",
            f'link_defect = "{cfg.link_defect}"',
            "[peers]",
        ]
        lines += [f'r{t} = "{self.links[r, t].url}"' for t in range(cfg.regions) if t != r]
        config = self.folder / f"region-{r}.toml"
        config.write_text("\n".join(lines) + "\n")
        return ["--config", str(config)]

    async def link_figures(self) -> dict[str, int]:
        """Regions: what the links did, summed over them (``/healthz``)."""
        totals: dict[str, int] = {}
        for r, url in enumerate(self.relay_urls):
            for link in (await _health(url)).get("links", []):
                self.log("link", source=f"r{r}", **{**link, "target": link.get("region")})
                for key in ("sweeps", "fallbacks", "repairs", "repairs_other", "dropped"):
                    totals[key] = totals.get(key, 0) + int(link.get(key, 0))
        return totals

    async def empty_region(self, r: int) -> None:
        """Kill region ``r``'s relay, lose its whole store, start it again empty."""
        relay = self.relays[r]
        await relay.kill()
        store = Path(self.store_of(r))
        for path in store.parent.glob(store.name + "*"):
            path.unlink(missing_ok=True)
        await relay.start()

    def store_of(self, relay: int) -> Path | str:
        """Relay ``relay``'s store: its own file, or the Redis every relay shares (folded
        entries are trimmed after a second: compactions race joiners and followers)."""
        if self.redis is not None:
            return f"{self.redis.url}?min_age_s=1"
        return self.folder / f"relay-{relay}.db"

    async def await_links(self, limit_s: float = 30.0) -> None:
        """Regions: until every link made first contact (or ``limit_s``)."""
        deadline = time.monotonic() + limit_s
        while time.monotonic() < deadline:
            healths = [await _health(url) for url in self.relay_urls]
            if all(link.get("checkpoints", 0) > 0 for h in healths for link in h.get("links", [])):
                return
            await asyncio.sleep(0.1)

    def is_hostile(self, i: int) -> bool:
        return i >= self.config.replicas

    def worker_name(self, i: int) -> str:
        return f"hostile-{i}" if self.is_hostile(i) else f"replica-{i}"

    async def start_worker(self, i: int) -> None:
        """Start participant ``i`` (again); raises ProcessFailed if it cannot start."""
        seed = hash((self.seed, i, self.generation[i])) & 0xFFFFFFFF
        worker: CommandChild
        if self.is_hostile(i):
            worker = HostileChild(
                relay=self.proxies[i].url,
                doc=DOCUMENT,
                workload=self.config.workload,
                seed=seed,
                cwd=Path.cwd(),
                log=self.folder / f"{self.worker_name(i)}.log",
            )
        else:
            many = self.config.many
            worker = WorkerChild(
                db=self.folder / f"{self.worker_name(i)}.db",
                relay=self.proxies[i].url,
                doc=None if many else DOCUMENT,
                keep=FOLDER if many else None,
                max_open=self.config.open_documents if many else None,
                token=self.token,
                workload=self.config.workload,
                seed=seed,
                cwd=Path.cwd(),
                log=self.folder / f"{self.worker_name(i)}.log",
            )
        self.generation[i] += 1
        await worker.start()
        self.workers[i] = worker

    async def call(self, i: int, cmd: dict[str, Any], timeout_s: float = 30.0) -> dict[str, Any]:
        """Ask participant ``i``; if its process died, record that and answer ``{}``."""
        worker = self.workers[i]
        if worker is None:
            return {}
        try:
            return await worker.call(cmd, timeout_s=timeout_s)
        except ProcessFailed:
            await worker.kill()
            self.workers[i] = None
            name = self.worker_name(i)
            if self.is_hostile(i):
                # Not the system's failure: a hostile participant may break itself.
                self.refused += self.refused_by.pop(i, 0)
                self.log("hostile-died", participant=name, death=worker.death())
            else:
                self.problem(name, f"{name}'s worker process {worker.death()}")
                self.unusable.add(name)
            return {}

    def check_relays(self) -> None:
        """A relay that died without being killed by the schedule is a violation."""
        for r, relay in enumerate(self.relays):
            if r not in self.killed_relays and relay.proc is not None and not relay.running:
                self.killed_relays.add(r)  # reported once; heal_all restarts it
                self.problem(f"relay {r}", f"relay {r} died: it {relay.death()}")

    # -- steps -------------------------------------------------------------------------

    async def step(self, n: int, step: Step) -> None:
        self.log("step", n=n, step=str(step))
        self.check_relays()
        i = step.target
        if step.kind == "edit":
            cmd: dict[str, Any] = {"cmd": "edit", "count": step.count}
            if self.config.many:
                cmd["doc"] = step.document
            self.record_edits(n, i, await self.call(i, cmd))
        elif step.kind == "populate" and self.config.many:
            # One edit in every document of this replica's share (one command each: the
            # replica opens them in turn, and closes them as it goes).
            replicas = self.config.replicas
            for document in self.documents[i % replicas :: replicas]:
                if self.workers[i] is None:
                    break  # it died: the run says so
                cmd = {"cmd": "edit", "count": 1, "doc": document}
                self.record_edits(n, i, await self.call(i, cmd))
        elif step.kind == "close" and self.config.many:
            answer = await self.call(i, {"cmd": "close", "count": step.count})
            if answer.get("closed"):
                self.log("closed", replica=self.worker_name(i), documents=answer["closed"])
        elif step.kind == "attack":
            await self.attack(n, i, step.count)
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
            self.killed_relays.add(i)
            await self.relays[i].kill()
            self.count("kill-relay")
        elif step.kind == "kill-redis" and self.redis is not None:
            await self.poll_acknowledgements()
            await asyncio.to_thread(self.redis.kill)
            self.count("kill-redis")
        elif step.kind == "restart-redis" and self.redis is not None:
            if self.redis.proc is None:
                await asyncio.to_thread(self.redis.start)
        elif step.kind == "restart-relay" and i < len(self.relays):
            if not self.relays[i].running:
                await self.relays[i].start()
            self.killed_relays.discard(i)
        elif step.kind in ("kill-replica", "lose-replica"):
            worker = self.workers[i]
            if worker is None:
                return
            await self.poll_acknowledgements()
            if self.is_hostile(i):
                status = await self.call(i, {"cmd": "status"})
                self.refused += int(status.get("refused", self.refused_by.get(i, 0)))
                self.refused_by.pop(i, None)
            await worker.kill()
            self.workers[i] = None
            self.count(step.kind)
            if step.kind == "lose-replica" and not self.is_hostile(i):
                for suffix in ("", "-wal", "-shm"):
                    path = self.folder / f"{self.worker_name(i)}.db{suffix}"
                    path.unlink(missing_ok=True)
                self.lost.add(self.worker_name(i))
        elif step.kind == "restart-replica":
            if self.workers[i] is None and self.worker_name(i) not in self.unusable:
                await self.restart(i)
        elif step.kind in ("partition-regions", "heal-regions") and self.links:
            a, b = step.target, step.count
            for proxy in (self.links[a, b], self.links[b, a]):
                if step.kind == "partition-regions":
                    proxy.partition()
                else:
                    proxy.heal()
            if step.kind == "partition-regions":
                self.count("partition-regions")
        elif step.kind == "link-faults" and self.links:
            proxy = self.links[step.target, step.count]
            proxy.set_delay(0.05 + 0.1 * step.amount)
            proxy.set_duplicate(step.amount / 2)
            proxy.set_reorder(step.amount / 2)
            self.count("link-faults")
        elif step.kind == "kill-link" and step.target < len(self.relays):
            if self.relays[step.target].running:
                await self.poll_acknowledgements()
                await self.relays[step.target].kill()
                await self.relays[step.target].start()
                self.count("kill-link")
        elif step.kind == "empty-region" and step.target < len(self.relays):
            if self.relays[step.target].running:
                await self.poll_acknowledgements()
                await self.empty_region(step.target)
                self.count("empty-region")
        elif step.kind == "quiet":
            await self.quiet(2.0)

    def record_edits(self, n: int, i: int, answer: dict[str, Any]) -> None:
        """Keep the edits a replica reported made (at step ``n``) for the checker."""
        for e in answer.get("edits", []):
            if not e["stored"]:
                continue  # the replica reported a store error: not promised durable
            update = base64.b64decode(e["update"])
            document = e.get("doc", DOCUMENT)
            name = self.worker_name(i)
            record = EditRecord.from_update(e["id"], name, n, update, document=document)
            self.edits[record.key] = record
            if self.config.many:
                self.log("edit", id=record.id, replica=name, document=document)
            else:
                self.log("edit", id=record.id, replica=name)

    async def restart(self, i: int) -> bool:
        """Start participant ``i`` again; an honest replica that cannot is unusable."""
        try:
            await self.start_worker(i)
        except ProcessFailed:
            worker = self.workers[i]
            name = self.worker_name(i)
            if self.is_hostile(i):
                self.log("hostile-died", participant=name)
            else:
                # e.g. its file holds updates pycrdt cannot apply together
                log = self.folder / f"{name}.log"
                tail = [line for line in log.read_text(errors="replace").splitlines() if line]
                why = tail[-1].strip() if tail else "no output"
                self.problem(name, f"{name} cannot start again on its own file: {why}")
                self.unusable.add(name)
            if worker is not None:
                await worker.kill()
            return False
        return True

    async def attack(self, n: int, i: int, count: int) -> None:
        """Let hostile participant ``i`` act ``count`` times; log and keep what it wrote."""
        name = self.worker_name(i)
        # Killed (by the schedule or by itself): a new attacker comes for its turn.
        # Waiting for a restart step would leave most schedules without attacks.
        if self.workers[i] is None and not await self.restart(i):
            return
        answer = await self.call(i, {"cmd": "edit", "count": count}, timeout_s=60)
        if answer:
            self.refused_by[i] = int(answer.get("refused", 0))
        for a in answer.get("attacks", []):
            updates = [base64.b64decode(u) for u in a["updates"]]
            self.log("attack", participant=name, step=n, **a)
            if not a["sent"]:
                continue
            kind = a["kind"]
            self.attacks[kind] = self.attacks.get(kind, 0) + 1
            if a["variant"]:
                key = f"{kind} {a['variant']}"
                self.attacks[key] = self.attacks.get(key, 0) + 1
            if kind != "replay" and a["client"] is not None:
                for update in updates:
                    self.writes.append(ForeignWrite.from_update(name, n, kind, a["client"], update))

    def honest(self) -> list[int]:
        """Indexes of the honest replicas whose worker is running."""
        return [
            i
            for i in range(self.config.replicas)
            if self.workers[i] is not None and self.worker_name(i) not in self.unusable
        ]

    def judge_status(self, status: dict[str, Any]) -> list[Violation]:
        """An honest replica that had to defend itself, or whose edits were refused.

        Either way the relay let it down: it sent content that conflicts with what the
        replica holds (the replica quarantined it rather than break its document), or it
        took the replica's own client id for someone else's.
        """
        name = status["name"]
        problems = []
        if status.get("quarantined"):
            reasons = "; ".join(dict.fromkeys(status.get("quarantine_reasons", [])))
            problems.append(
                Violation(
                    "quarantined",
                    f"{name} quarantined {status['quarantined']} updates the relay sent "
                    f"that would have broken its document: {reasons}",
                    where=(name,),
                )
            )
        if status.get("refused"):
            problems.append(
                Violation(
                    "refused",
                    f"the relay refused {status['refused']} of {name}'s own updates: "
                    f"{status.get('last_error')}",
                    where=(name,),
                )
            )
        return problems

    async def poll_acknowledgements(self, full: bool = False) -> list[dict[str, Any]]:
        """Ask every live replica for its status, recording newly acknowledged edits.

        A worker reports each acknowledgement once, so every status answer goes through
        here. ``full``: (many documents) quarantines counted in every document of the
        file, not only in those open.
        """
        statuses = []
        for i in self.honest():
            cmd: dict[str, Any] = {"cmd": "status", "full": True} if full else {"cmd": "status"}
            status = await self.call(i, cmd)
            if not status:
                continue
            status["name"] = self.worker_name(i)
            statuses.append(status)
            for entry in status.get("acknowledged", []):
                # one document: edit ids; many: [document, edit id]
                key = (entry[0], entry[1]) if isinstance(entry, list) else (DOCUMENT, entry)
                if key in self.edits and key not in self.acknowledged:
                    self.acknowledged.add(key)
                    if self.config.many:
                        self.log("acknowledged", id=key[1], replica=status["name"], document=key[0])
                    else:
                        self.log("acknowledged", id=key[1], replica=status["name"])
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
        self.check_relays()
        for proxy in [*self.proxies, *self.links.values()]:
            proxy.heal()
            proxy.clear_faults()
        if self.redis is not None and self.redis.proc is None:
            await asyncio.to_thread(self.redis.start)
        for r, relay in enumerate(self.relays):
            if not relay.running:
                await relay.start()
            self.killed_relays.discard(r)
        for i in range(self.config.replicas):
            if self.workers[i] is None and self.worker_name(i) not in self.unusable:
                await self.restart(i)
        self.log("healed")

    async def hostile_statuses(self) -> None:
        """Count refusals; a stock client sent what it cannot understand is a violation."""
        for i in range(self.config.replicas, self.participants):
            status = await self.call(i, {"cmd": "status"})
            if status:
                self.refused_by[i] = int(status.get("refused", 0))
            self.log("hostile-status", participant=self.worker_name(i), **status)
            for what in status.get("unexpected", [])[:3]:
                name = self.worker_name(i)
                self.problems.append(
                    Violation(
                        "protocol",
                        f"{name}, a stock y-websocket client, got what it cannot use: {what}",
                        where=(name,),
                    )
                )

    async def stopped_syncing(self, i: int, why: str) -> None:
        """Report an honest replica that stopped syncing; then see if its file still opens.

        A replica that stored an update pycrdt cannot apply never opens its file again
        (DESIGN: integrity); :meth:`restart` reports that as a violation of its own.
        """
        name = self.worker_name(i)
        worker = self.workers[i]
        assert worker is not None
        await worker.kill()
        self.workers[i] = None
        self.problem(name, f"{name} stopped syncing: {why}")
        self.unusable.add(name)
        if await self.restart(i):
            worker = self.workers[i]
            assert worker is not None
            await worker.quit()
            self.workers[i] = None

    async def final_states(self) -> dict[str, list[FinalState]]:
        """Every participant's final state, document by document (polled until they agree
        or ``settle_s`` passed): honest replicas (with many documents: their files, then
        the documents they have open), a fresh replica of each relay, each relay store."""
        deadline = time.monotonic() + self.config.settle_s
        for i in self.honest():
            left = max(1.0, deadline - time.monotonic())
            answer = await self.call(i, {"cmd": "sync", "timeout": left}, timeout_s=left + 10)
            if answer.get("stopped"):
                await self.stopped_syncing(i, answer["stopped"])
            elif answer and not answer.get("ok"):
                self.log("sync-timeout", error=answer.get("error"))
        # After the honest replicas synced: the relays' answers to the last attacks are in.
        await self.hostile_statuses()
        for status in await self.poll_acknowledgements(full=self.config.many):
            self.problems += self.judge_status(status)
        finals: dict[str, list[FinalState]] = {}
        # States may still be in flight between replicas: poll until equal, bounded.
        while True:
            held: list[_Held] = []
            for i in self.honest():
                held += await self.replica_states(i)
            relay_held, relay_problems = await self.relay_states()
            held += relay_held
            finals = self.by_document(held)
            same = all(
                all(converged(states[0], f) for f in states[1:]) for states in finals.values()
            )
            if same or time.monotonic() > deadline:
                self.log("settled", converged=same)  # (report.html marks the moment)
                self.problems += relay_problems
                for v in relay_problems:
                    self.log("unusable", participant=v.where[0], message=v.message)
                return finals
            await asyncio.sleep(0.1)

    async def replica_states(self, i: int) -> list[_Held]:
        """What honest replica ``i`` holds: its document; with many, its file and what it
        has open."""
        name = self.worker_name(i)
        if not self.config.many:
            answer = await self.call(i, {"cmd": "state"})
            if answer.get("ok"):
                return [_Held(name, {DOCUMENT: base64.b64decode(answer["update"])})]
            if answer:
                self.problem(name, f"{name} cannot encode its document: {answer['error']}")
                self.unusable.add(name)
            return []
        answer = await self.call(i, {"cmd": "states"}, timeout_s=60)
        if not answer.get("ok"):
            return []
        in_file, in_docs, errors = decode_states(answer)
        for document, error in errors.items():
            # Not judged there (the violation says why), rather than judged empty; the
            # replica is not asked again (it is unusable).
            self.problem(name, f"{name} cannot load document {document}: {error}")
            self.unusable.add(name)
        return [_Held(name, in_file), _Held(f"{name}'s open Doc", in_docs, complete=False)]

    def by_document(self, held: list[_Held]) -> dict[str, list[FinalState]]:
        """Final states per document, participants in order. With many documents, a
        document a participant's file lacks counts as empty there (it should hold it);
        documents nobody holds and nobody edited are left out."""
        documents = {e.document for e in self.edits.values()}
        documents |= {d for h in held for d, u in h.states.items() if u is not None}
        if not self.config.many:
            documents = {DOCUMENT}
        finals: dict[str, list[FinalState]] = {d: [] for d in sorted(documents)}
        for h in held:
            for document, states in finals.items():
                if document in h.states:
                    update = h.states[document]
                    if update is not None:
                        states.append(final_state(h.name, update))
                elif h.complete:
                    states.append(final_state(h.name, EMPTY_DOCUMENT))
        return finals

    async def fresh_state(self, r: int, url: str) -> tuple[_Held | None, list[Violation]]:
        """What a fresh replica of relay ``r`` holds once synced, and what went wrong."""
        many = self.config.many
        name = f"fresh replica of relay {r}"
        problems: list[Violation] = []
        fresh = WorkerChild(
            db=self.folder / f"fresh-{r}-{time.monotonic_ns()}.db",
            relay=url,
            doc=None if many else DOCUMENT,
            keep=FOLDER if many else None,
            token=self.token,
            workload=self.config.workload,
            seed=0,
            cwd=Path.cwd(),
            log=self.folder / f"fresh-{r}.log",
        )
        await fresh.start()
        try:
            wait = 30 if many else 10  # (many: every document of the folder)
            synced = await fresh.call({"cmd": "synced", "timeout": wait}, timeout_s=wait + 10)
            if synced.get("stopped"):
                why = synced["stopped"]
                return None, [Violation("unusable", f"{name} stopped syncing: {why}")]
            if many and not synced.get("ok"):
                self.log("sync-timeout", participant=name, error=synced.get("error"))
            cmd: dict[str, Any] = {"cmd": "status", "full": True} if many else {"cmd": "status"}
            status = await fresh.call(cmd)
            status["name"] = name
            problems += self.judge_status(status)
            if not many:
                answer = await fresh.call({"cmd": "state"})
                return _Held(name, {DOCUMENT: base64.b64decode(answer["update"])}), problems
            answer = await fresh.call({"cmd": "states"}, timeout_s=60)
            in_file, _, errors = decode_states(answer)
            problems += [
                Violation("unusable", f"{name} cannot load document {d}: {e}", document=d)
                for d, e in errors.items()
            ]
            return _Held(name, in_file), problems
        except ProcessFailed:
            return None, [*problems, Violation("unusable", f"{name}'s worker {fresh.death()}")]
        finally:
            await fresh.quit()

    async def relay_states(self) -> tuple[list[_Held], list[Violation]]:
        """A fresh replica per relay, syncing straight from it; in local mode, the store file.

        Returns the states, and violations: a fresh replica that stopped syncing, a
        store that holds two contents for one id or no longer loads into a document.
        """
        many = self.config.many
        out: list[_Held] = []
        problems: list[Violation] = []
        # One fresh replica per relay, all at once (with many documents each syncs them all).
        for fresh, found in await asyncio.gather(
            *(self.fresh_state(r, url) for r, url in enumerate(self.relay_urls))
        ):
            out += [fresh] if fresh is not None else []
            problems += found
        stores = [(f"relay {r}", relay.store) for r, relay in enumerate(self.relays)]
        if self.redis is not None:
            stores = [("the relays' Redis", self.store_of(0))]
        for where, address in stores:
            try:
                logs = await _load_store(address, self.documents, FOLDER if many else None)
            except StoreError as exc:
                raise StoreError(f"{where}'s store does not open cleanly: {exc}") from exc
            held: dict[str, bytes | None] = {}
            for document, stored in logs.items():
                try:
                    merged = stored.merged()
                except StoreError as exc:
                    raise StoreError(f"{where}'s store does not open cleanly: {exc}") from exc
                edits = [e for e in self.edits.values() if e.document == document]
                conflicts = stored_conflicts(
                    f"the store of {where}", stored.all_updates(), edits, self.writes
                )
                problems += in_document(conflicts, document if many else None)
                doc: Doc[Any] = Doc()
                try:
                    doc.apply_update(merged)
                except Exception as exc:  # pycrdt refuses what the store holds together
                    what = f"document {document} of " if many else ""
                    problems.append(
                        Violation(
                            "unusable",
                            f"the store of {where} no longer loads {what}into a document: "
                            f"{type(exc).__name__}: {exc}",
                            where=(f"store of {where}",),
                            document=document if many else None,
                        )
                    )
                    held[document] = None
                    continue
                if many and not stored.all_updates():
                    continue  # not in this store (judged empty)
                held[document] = doc.get_update()
            out.append(_Held(f"store of {where}", held))
        return out, problems

    async def close(self) -> None:
        for worker in self.workers:
            if worker is not None:
                with contextlib.suppress(Exception):
                    await worker.quit()
        for proxy in [*self.proxies, *self.links.values()]:
            with contextlib.suppress(Exception):
                await proxy.stop()
        for relay in self.relays:
            await relay.stop()
        if self.redis is not None:
            await asyncio.to_thread(self.redis.stop)
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
            if run.links:
                for key, value in (await run.link_figures()).items():
                    if value:
                        run.faults[f"links: {key}"] = value
        edits = [
            dataclasses.replace(e, acknowledged=e.key in run.acknowledged)
            for e in run.edits.values()
        ]
        # A replica that stopped working may not have passed on what nobody acknowledged
        # (its "unusable" violation says why); what was acknowledged must be everywhere.
        report.violations = list(run.problems)
        for document, states in finals.items():
            report.violations += check_history(
                [e for e in edits if e.document == document],
                states,
                lost_files=run.lost | run.unusable,
                writes=run.writes,
                document=document if config.many else None,
            )
    except TimeoutError:
        report.error = f"the run did not finish within --duration {config.duration_s} s"
    except (ProcessFailed, CrdtsyncError, OSError) as exc:
        report.error = f"{type(exc).__name__}: {exc}"
    finally:
        report.seconds = time.monotonic() - started
        report.edits = len(run.edits)
        report.acknowledged = len(run.acknowledged)
        report.documents = config.documents
        report.edited_documents = len({e.document for e in run.edits.values()})
        report.faults = dict(run.faults)
        report.attacks = dict(run.attacks)
        report.refused = run.refused + sum(run.refused_by.values())
        for key in ("duplicated", "reordered", "delayed", "aborted", "refused"):
            total = sum(proxy.stats.get(key, 0) for proxy in run.proxies)
            if total:
                report.faults[f"messages {key}"] = total
        if report.error is not None and not report.violations and run.problems:
            report.violations = list(run.problems)  # what broke before the run gave up
        for v in report.violations:
            where = {"document": v.document} if v.document is not None else {}
            run.log("violation", kind=v.kind, message=v.message, edit=v.edit, **where)
        run.log("verdict", ok=report.ok, error=report.error)
        await run.close()
        (folder / "report.json").write_text(json.dumps(report.to_json(), indent=2))
        if base is None or not report.ok:  # (else the folder goes right away)
            write_report_html(folder, report.to_json())
        if base is not None and report.ok:
            shutil.rmtree(base, ignore_errors=True)
            report.out = None
    return report


_REGIONS_SECRET = "crdtsync-check-regions-secret-000000000"  # a check run's own, local


async def _health(url: str) -> dict[str, Any]:
    """A relay's ``/healthz?verbose=1`` ({} when it does not answer)."""
    import urllib.request

    address = url.replace("ws://", "http://").rstrip("/") + "/healthz?verbose=1"

    def fetch() -> dict[str, Any]:
        try:
            with urllib.request.urlopen(address, timeout=5) as answer:
                return dict(json.loads(answer.read()))
        except (OSError, ValueError):
            return {}

    return await asyncio.to_thread(fetch)


async def _load_store(
    address: Path | str, documents: Sequence[str], folder: str | None = None
) -> dict[str, DocumentLog]:
    """The checked documents as a relay store holds them (an SQLite file, or Redis); with
    ``folder``, also any other document the store holds under it."""
    if isinstance(address, str):
        from ..server.redis_store import RedisStore

        store = RedisStore(address)
        try:
            return {d: await store.load(d) for d in documents}
        finally:
            await store.close()
    with UpdateLog(address) as log:
        names = dict.fromkeys(documents)
        if folder is not None:
            after = ""
            while page := log.documents_in(folder, after, 1000):
                names.update(dict.fromkeys(page))
                after = page[-1]
        return {d: log.load(d) for d in names}


def _same_failure(report: CampaignReport, original: CampaignReport) -> bool:
    """A violation of the same kind (in the same document, with many), or both erred."""
    kinds = {(v.kind, v.document) for v in original.violations}
    return bool(kinds & {(v.kind, v.document) for v in report.violations}) or (
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
            if report.out:  # the failing run's page, now with its shortest schedule
                (Path(report.out) / "report.json").write_text(
                    json.dumps(report.to_json(), indent=2)
                )
                write_report_html(Path(report.out), report.to_json())
        return report

    report = asyncio.run(main())
    if raise_on_failure and not report.ok:
        raise CampaignFailed(report)
    return report
