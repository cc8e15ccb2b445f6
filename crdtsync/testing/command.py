"""``crdtsync check``: run convergence campaigns from the command line.

Bad input (an unknown workload, an unreachable relay, a bad fault name) gets one clear
line on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from .campaign import (
    FAULT_KINDS,
    LOCAL_ONLY,
    REDIS_FAULT,
    REGION_FAULTS,
    CampaignConfig,
    CampaignReport,
    run_campaign,
    shrink,
)
from .redis import redis_server_binary
from .report_html import write_report_html
from .workload import load_workload

__all__ = ["run_check"]


class UsageError(Exception):
    """A bad option value: reported as one line, exit status 2."""


def _check_relay(url: str) -> None:
    parts = urlsplit(url)
    if parts.scheme not in ("ws", "wss") or not parts.hostname:
        raise UsageError(f"--relay must be a ws:// or wss:// URL, not {url!r}")
    port = parts.port or (443 if parts.scheme == "wss" else 80)
    try:
        with socket.create_connection((parts.hostname, port), timeout=5):
            pass
    except OSError as exc:
        raise UsageError(f"cannot reach relay {url}: {exc.strerror or exc}") from None


def _config(args: argparse.Namespace) -> CampaignConfig:
    every = args.faults is None  # the default: every kind
    faults = list(FAULT_KINDS) if every else [f.strip() for f in args.faults.split(",")]
    faults = [f for f in faults if f]
    known = (*FAULT_KINDS, REDIS_FAULT) if args.backend == "redis" else FAULT_KINDS
    if every and args.backend == "redis":
        faults.append(REDIS_FAULT)
    if args.regions:
        if args.regions < 2:
            raise UsageError("--regions needs 2 or more regions")
        if args.relay or args.hostile or args.backend != "sqlite" or args.relays > 1:
            raise UsageError(
                "--regions starts its own relays, one per region on SQLite: not with "
                "--relay, --relays, --backend redis or --hostile"
            )
        known = (*known, *REGION_FAULTS)
        if every:
            faults += REGION_FAULTS
    elif args.link_defect or args.anti_entropy:
        raise UsageError("--link-defect and --anti-entropy are for --regions")
    unknown = [f for f in faults if f not in known]
    if unknown:
        raise UsageError(f"unknown fault kind {unknown[0]!r}; choose from {', '.join(known)}")
    if args.relays > 1 and args.backend != "redis" and not args.relay and not args.regions:
        raise UsageError(
            "--relays N needs a store the relays share: --backend redis (SQLite relays each "
            "keep their own file)"
        )
    if args.backend == "redis" and not args.relay and redis_server_binary() is None:
        raise UsageError("--backend redis needs redis-server (apt-get install redis-server)")
    if args.relay:
        local_only = [f for f in faults if f in LOCAL_ONLY]
        if local_only and not every:
            raise UsageError(f"{local_only[0]} needs local relays (it cannot kill yours)")
        for url in args.relay:
            _check_relay(url)
    # Like `python -m`, let workloads live in the current folder (the worker processes
    # run there and import them the same way).
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        load_workload(args.workload)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if args.documents > 1 and args.hostile:
        raise UsageError("--hostile attacks one document: not with --documents")
    if args.shrink_runs < 0:
        raise UsageError("--shrink-runs must be 0 or more")
    out = Path(args.out) if args.out else None
    if out is not None:
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UsageError(f"cannot create --out {out}: {exc.strerror or exc}") from None
    return CampaignConfig(
        replicas=args.replicas,
        hostile=args.hostile,
        relays=tuple(args.relay),
        local_relays=args.relays,
        backend=args.backend,
        steps=args.steps,
        faults=tuple(faults),
        fault_rate=args.fault_rate,
        workload=args.workload,
        out=out,
        duration_s=args.duration,
        documents=args.documents,
        regions=args.regions,
        anti_entropy=args.anti_entropy,
        link_defect=args.link_defect,
    )


def _table(reports: list[CampaignReport], hostile: bool, many: bool = False) -> Table:
    table = Table(title="crdtsync check")
    columns = ["seed", "verdict", "steps", "edits", "acked", "faults", "violations", "s"]
    if hostile:
        columns[6:6] = ["attacks", "refused"]
    if many:
        columns[4:4] = ["documents"]  # edited, of --documents
    for column in columns:
        table.add_column(column, justify="right" if column not in ("verdict",) else "left")
    for r in reports:
        row = [
            str(r.seed),
            "ok" if r.ok else "[bold red]FAILED[/]",
            str(len(r.schedule)),
            str(r.edits),
            str(r.acknowledged),
            str(sum(n for k, n in r.faults.items() if not k.startswith("messages "))),
            str(len(r.violations) + (1 if r.error else 0)),
            f"{r.seconds:.1f}",
        ]
        if hostile:
            # attacks counts each action once by kind, and again by "kind variant"
            row[6:6] = [str(sum(n for k, n in r.attacks.items() if " " not in k)), str(r.refused)]
        if many:
            row[4:4] = [f"{r.edited_documents}/{r.documents}"]
        table.add_row(*row)
    return table


async def _run(args: argparse.Namespace, config: CampaignConfig, console: Console) -> int:
    reports: list[CampaignReport] = []
    with Progress(
        TextColumn("[bold]seed {task.fields[seed]}"),
        BarColumn(),
        TextColumn("step {task.completed}/{task.total} {task.fields[note]}"),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    ) as progress:
        for seed in range(args.seed, args.seed + args.seeds):
            # (many documents: one populate step per replica comes first)
            total = config.steps + (config.replicas if config.many else 0)
            task = progress.add_task("run", total=total, seed=seed, note="")

            def on_progress(event: str, fields: dict[str, Any], task: Any = task) -> None:
                if event == "step":
                    progress.update(task, completed=fields["n"] + 1, note=fields["step"])
                elif event in ("healed", "verdict"):
                    progress.update(task, note=event)

            config.on_progress = on_progress
            report = await run_campaign(seed, config)
            progress.remove_task(task)
            if not report.ok:
                console.print(f"[bold red]seed {seed} failed[/]: rerun with --seed {seed}")
                for v in report.violations:
                    console.print(f"  {v}")
                if report.error:
                    console.print(f"  error: {report.error}")
                if args.shrink_runs:
                    console.print(f"  shrinking ({args.shrink_runs} reruns at most)...")
                    config.on_progress = None
                    report.shrunk = await shrink(seed, config, report, args.shrink_runs)
                    console.print(f"  shortest failing schedule ({len(report.shrunk)} steps):")
                    for i, step in enumerate(report.shrunk):
                        console.print(f"    {i}: {step}")
                    if report.out:  # the failing run's page, now with its shortest schedule
                        (Path(report.out) / "report.json").write_text(
                            json.dumps(report.to_json(), indent=2)
                        )
                        write_report_html(Path(report.out), report.to_json())
                if report.out:
                    console.print(f"  history: {report.out}/history.jsonl")
                    console.print(f"  report: {report.out}/report.html")
            reports.append(report)
    console.print(_table(reports, config.hostile > 0, config.many))
    failed = [r.seed for r in reports if not r.ok]
    edits = sum(r.edits for r in reports)
    console.print(
        f"{len(reports)} seeds, {edits} edits, "
        f"{sum(len(r.violations) for r in reports)} violations"
        + (f"; failing seeds: {failed}" if failed else "")
    )
    return 1 if failed else 0


def run_check(args: argparse.Namespace) -> int:
    """Run ``crdtsync check`` with parsed arguments; return the exit status."""
    try:
        config = _config(args)
    except UsageError as exc:
        print(f"crdtsync check: {exc}", file=sys.stderr)
        return 2
    console = Console(stderr=False, highlight=False)
    try:
        return asyncio.run(_run(args, config, console))
    except KeyboardInterrupt:
        print("crdtsync check: interrupted", file=sys.stderr)
        return 130
