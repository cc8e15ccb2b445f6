"""What a closed, compacted document costs Redis, beside the size of its snapshot.

    python bench/redis_memory.py [--docs 1000] [--updates 20] [--clients 2]

The issue-10 target: once a document was served, compacted and closed, and the minimum
age passed, Redis holds no more for it than its snapshot plus 1 KB. This measures the
Redis store itself (crdtsync.server.redis_store.RedisStore, the code a relay appends and
compacts with), on a ``redis-server`` of its own (crdtsync.testing.redis: AOF with
fsync always, on a free loopback port, in a temporary directory):

1. ``used_memory`` of the empty server (after one document, so that Lua scripts and the
   store's identity are loaded);
2. ``--docs`` documents, each written as ``--updates`` one-line text appends by
   ``--clients`` client ids (each append with its integrity ledger, as the relay writes
   them), then compacted, with ``min_age_s=0`` (as if the minimum age had passed) so the
   compaction trims the folded entries at once;
3. ``used_memory`` again, and per document: ``MEMORY USAGE`` of each of its keys.

Per-document cost = (used_memory after - before) / docs, beside the mean snapshot size.

``--through-relay``: the documents are served by a relay process instead (``crdtsync
relay --store redis://...?min_age_s=0``): the Node driver's ``docs`` scenario opens each
document as a stock client, writes one update, waits for its echo and leaves; the relay
compacts each document when its room closes. Measured once no document has a stream left.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import common
from common import Report
from pycrdt import Doc, Text

from crdtsync.integrity import Writer
from crdtsync.server.redis_store import RedisStore
from crdtsync.testing.redis import RedisServer

TARGET_OVER_SNAPSHOT_BYTES = 1024


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--docs", type=int, default=1000)
    p.add_argument("--updates", type=int, default=20, help="appends per document")
    p.add_argument("--clients", type=int, default=2, help="client ids writing each document")
    p.add_argument("--through-relay", action="store_true", help="serve them through a relay")
    p.add_argument("--markdown-out", help="also write the report (Markdown) to this file")
    return p.parse_args(argv)


async def write_document(store: RedisStore, name: str, updates: int, clients: int) -> int:
    """Write one document as the relay would (appends with ledgers), compact it; return
    its snapshot's size."""
    docs = [Doc(client_id=1000 + c) for c in range(clients)]
    captured: list[bytes] = []
    subs = [d.observe(lambda e: captured.append(e.update)) for d in docs]
    texts = [d.get("notes", type=Text) for d in docs]
    for i in range(updates):
        c = i % clients
        texts[c].insert(len(str(texts[c])), f"line {i} of {name}\n")
        update = captured[-1]
        for other in docs:
            if other is not docs[c]:
                other.apply_update(update)
        ledger, _ = await store.load_ledger(name)
        verdict = ledger.judge(update, _info(update), Writer(), lambda: [], None)
        await store.append([(name, verdict.update)], {name: ledger})
    del subs
    result = await store.compact(name)
    assert result.folded == updates, result
    return result.snapshot_bytes


def _info(update: bytes) -> Any:
    from crdtsync.updates import check_update

    return check_update(update)


async def serve_through_relay(store: RedisStore, url: str, docs: int, tmp: Path) -> list[int]:
    """Serve ``docs`` documents through a relay process; their snapshots' sizes."""
    workdir = tmp / "relay"
    workdir.mkdir()
    cmd = [
        sys.executable, "-m", "crdtsync", "relay", "--host", "127.0.0.1", "--port", "0",
        "--store", url, "--log-level", "WARNING",
    ]  # fmt: skip
    relay = common.Server("crdtsync", cmd, workdir).start()
    try:
        result = common.run_driver(
            ["docs", "--url", relay.url, "--docs", str(docs), "--prefix", "doc"], 600
        )
        if not result.get("finished"):
            raise RuntimeError(f"the driver did not finish: {result}")
        for _ in range(600):  # compactions at close, 0.1 s apart at most: bounded
            streams = [k async for k in store.redis.scan_iter(match="crdtsync:{doc/*}:log")]
            if not streams:
                break
            await asyncio.sleep(0.1)
    finally:
        relay.stop()
    sizes = []
    for i in range(docs):
        sizes.append(
            int(await store.redis.hget(f"crdtsync:{{doc/doc-{i}}}:meta", "snap_bytes") or 0)
        )
    return sizes


async def run(args: argparse.Namespace) -> dict[str, Any]:
    with (
        tempfile.TemporaryDirectory(prefix="crdtsync-bench-redis-") as tmp,
        RedisServer(Path(tmp) / "redis") as server,
    ):
        url = f"{server.url}?min_age_s=0"
        store = RedisStore(url)
        await write_document(store, "warm-up", 2, 1)
        await store.redis.memory_purge()
        before = int((await store.redis.info("memory"))["used_memory"])
        snapshots = []
        if args.through_relay:
            snapshots = await serve_through_relay(store, url, args.docs, Path(tmp))
            names = [f"doc/doc-{i}" for i in range(args.docs)]
        else:
            for i in range(args.docs):
                snapshots.append(
                    await write_document(store, f"doc-{i}", args.updates, args.clients)
                )
            names = [f"doc-{i}" for i in range(args.docs)]
        await store.redis.memory_purge()
        after = int((await store.redis.info("memory"))["used_memory"])
        per_key: dict[str, list[int]] = {}
        for name in names[:50]:
            async for key in store.redis.scan_iter(match=f"crdtsync:{{{name}}}:*"):
                kind = key.decode().rsplit("}:", 1)[1].split(":")[0]
                usage = await store.redis.memory_usage(key) or 0
                per_key.setdefault(kind, []).append(int(usage))
        streams = 0
        for name in names:
            streams += int(await store.redis.exists(f"crdtsync:{{{name}}}:log"))
        changes = await store.redis.memory_usage("crdtsync:{*}:changes") or 0
        await store.close()
    per_doc = (after - before) / args.docs
    snapshot = statistics.mean(snapshots)
    return {
        "docs": args.docs,
        "per_doc_bytes": per_doc,
        "snapshot_bytes": snapshot,
        "over_snapshot": per_doc - snapshot,
        "per_key": {k: statistics.mean(v) for k, v in sorted(per_key.items())},
        "streams_left": streams,
        "changes_bytes": changes,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    info = common.machine_info()
    busy = common.wait_for_quiet(30)
    got = asyncio.run(run(args))
    report = Report("Redis memory per closed, compacted document")
    report.machine(info, busy)
    if args.through_relay:
        how = (
            f"How: {args.docs:,} documents served by one relay process on a redis-server of "
            "the benchmark's own (AOF, appendfsync always; store URL with min_age_s=0, as if "
            "the minimum age had passed): the Node driver opens each as a stock client, "
            "writes one update, waits for its echo and leaves; the relay compacts it when "
            "its room closes."
        )
    else:
        how = (
            f"How: {args.docs:,} documents, each {args.updates} one-line appends by "
            f"{args.clients} client ids with their ledgers, then compacted (min_age_s=0, as "
            "if the minimum age had passed), on a redis-server of the benchmark's own (AOF, "
            "appendfsync always)."
        )
    report.add(
        how + " Cost = used_memory after - before (MEMORY PURGE first), divided by the "
        "documents; per key: MEMORY USAGE over the first 50 documents."
    )
    over = got["over_snapshot"]
    report.table(
        ["documents", "Redis bytes per document", "mean snapshot bytes", "over the snapshot",
         "target (<= snapshot + 1 KB)", "streams left"],
        [[f"{got['docs']:,}", f"{got['per_doc_bytes']:,.0f}", f"{got['snapshot_bytes']:,.0f}",
          f"{over:,.0f}", "met" if over <= TARGET_OVER_SNAPSHOT_BYTES else "**NOT met**",
          got["streams_left"]]],
    )  # fmt: skip
    report.table(
        ["key", "mean MEMORY USAGE bytes"],
        [[k, f"{v:,.0f}"] for k, v in got["per_key"].items()]
        + [["changes (all documents)", f"{got['changes_bytes']:,}"]],
    )
    report.write(args.markdown_out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
