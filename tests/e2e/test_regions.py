"""Regions replicate to each other, active-active (issue 12): three regions (two on SQLite,
one on Redis), real relay processes, every link through a fault proxy of its own.

What each test shows is in its name; the counts come from each source relay's
``/healthz?verbose=1`` (its links' figures) and from the stores themselves.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from helpers import eventually, timeout_s
from pycrdt import Text

from crdtsync.client import Replica
from crdtsync.store import UpdateLog
from crdtsync.testing.regions import Regions, same_content

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

NAMES = ("eu", "us", "ap")
DOCS = ("shared/a", "shared/b")


@pytest.fixture
async def regions(tmp_path: Path) -> AsyncIterator[Regions]:
    # compact_after_updates: high, so a store's origins stay countable (the compaction
    # fallback has a test of its own).
    async with Regions(
        tmp_path,
        NAMES,
        redis=("ap",),
        rng=random.Random(12),
        settings={"compact_after_updates": 100_000, "link_ack_timeout_s": 5.0},
    ) as regions:
        yield regions


def text(replica: Replica, doc: str) -> Text:
    return replica._docs[doc].doc.get("text", type=Text)


async def converged(regions: Regions, docs: tuple[str, ...], expected: set[str]) -> None:
    """Every region's store holds every token of ``expected`` in each document, and the
    regions' copies hold the same content."""

    async def check() -> bool:
        for doc in docs:
            copies = await regions.documents(doc)
            if not same_content(copies.values()):
                return False
            if not all(_tokens_of(copy) >= _of(expected, doc) for copy in copies.values()):
                return False
        return True

    try:
        await eventually(check, timeout=60, what="every region's store to hold every edit")
    except AssertionError:
        report = []
        for doc in docs:
            for region, copy in (await regions.documents(doc)).items():
                lacks = sorted(_of(expected, doc) - _tokens_of(copy))
                report.append(f"{doc} in {region}: lacks {lacks}")
        for name in regions.names:
            report.append(f"{name}'s links: {regions[name].health().get('links')}")
        raise AssertionError("\n".join(report)) from None


def _of(tokens: set[str], doc: str) -> set[str]:
    """The tokens written to ``doc`` (each ends with the document's last letter)."""
    return {t for t in tokens if t.endswith("-" + doc[-1])}


def _tokens_of(update: bytes) -> set[str]:
    from pycrdt import Doc

    doc: Doc = Doc()
    if update:
        doc.apply_update(update)
    return set(filter(None, str(doc.get("text", type=Text)).split(";")))


def _clients_by_origin(regions: Regions, name: str) -> dict[str | None, set[int]]:
    """The client ids of the updates region ``name``'s SQLite store holds, by origin."""
    from crdtsync.updates import check_update

    found: dict[str | None, set[int]] = {}
    with UpdateLog(regions[name].directory / "store.db") as log:
        for origin, data in log.conn.execute("SELECT origin, data FROM updates"):
            found.setdefault(origin, set()).update(check_update(data).state)
    return found


def _local_updates(regions: Regions, name: str) -> int:
    """Updates of region ``name``'s SQLite store written by its own clients."""
    with UpdateLog(regions[name].directory / "store.db") as log:
        (count,) = log.conn.execute("SELECT count(*) FROM updates WHERE origin IS NULL").fetchone()
    return int(count)


async def test_three_regions_converge_through_delays_duplicates_reorders_and_partitions(
    regions: Regions, tmp_path: Path
) -> None:
    rng = random.Random(5)
    for proxy in regions.links.values():
        proxy.set_delay(rng.uniform(0.05, 0.15))
        proxy.set_duplicate(0.05)
        proxy.set_reorder(0.05)
    token = regions.token()
    for source in NAMES:  # first contact made (each link's sweep of what there was)
        for target in NAMES:
            if source != target:
                await _linked(regions, source, target)
    replicas = {
        name: Replica(tmp_path / f"replica-{name}.db", relay=regions[name].url, token=token)
        for name in NAMES
    }
    acknowledged: set[str] = set()
    try:
        for replica in replicas.values():
            await replica.__aenter__()
            for doc in DOCS:
                await replica.open(doc)

        async def edit(round_: int) -> None:
            """Every replica edits both documents at once; their edits are acknowledged."""
            for name, replica in replicas.items():
                for doc in DOCS:
                    token_ = f"{name}-{round_}-{doc[-1]}"
                    text(replica, doc).insert(0, token_ + ";")
            for name, replica in replicas.items():
                for doc in DOCS:
                    await replica.wait_synced(doc, timeout=timeout_s(30))
                    acknowledged.add(f"{name}-{round_}-{doc[-1]}")

        for round_ in range(3):
            await edit(round_)
            await asyncio.sleep(0.1)
        regions.partition("eu", "us")  # eu and us still reach ap
        for round_ in range(3, 6):
            await edit(round_)
        for proxy in regions.links.values():
            await proxy.drop_connections()
        regions.isolate("ap")  # ap alone, eu and us apart too
        for round_ in range(6, 9):
            await edit(round_)
        regions.heal()
        await converged(regions, DOCS, acknowledged)
        # ...and every replica, through its own region only.
        for replica in replicas.values():
            for doc in DOCS:
                await eventually(
                    lambda r=replica, d=doc: (
                        _tokens_of(r._docs[d].doc.get_update()) >= _of(acknowledged, d)
                        and _tokens_of(r._docs[d].doc.get_update())
                        == _tokens_of(replicas["eu"]._docs[d].doc.get_update())
                    ),
                    timeout=30,
                    what="every replica to hold every edit",
                )
    finally:
        for replica in replicas.values():
            await replica.__aexit__(None, None, None)

    for source in NAMES:  # (no link had to compare state vectors again: the counts
        for target in NAMES:  # below are of shipping by the feed alone)
            if source != target:
                assert regions[source].link(target)["sweeps"] == 1
    # Split horizon: what a region stored as coming from a peer holds only that peer's
    # own clients' content (a link that shipped on what it learned would carry others').
    for target in ("eu", "us"):
        found = _clients_by_origin(regions, target)
        for source in NAMES:
            if source == target or source not in found:
                continue
            theirs = (
                _clients_by_origin(regions, source).get(None, set()) if source != "ap" else None
            )
            if theirs is not None:
                assert found[source] <= theirs, (target, source)
            for other in NAMES:
                if other not in (source, target) and other != "ap":
                    assert not found[source] & _clients_by_origin(regions, other).get(None, set())

    # No echo: what crossed each link is at most what its source region's own clients
    # wrote there, plus one window of retries per link restart (a link never ships on
    # what it learned from another region: those updates are many more).
    for source in ("eu", "us"):
        local = _local_updates(regions, source)
        for target in NAMES:
            if target == source:
                continue
            link = regions[source].link(target)
            window = regions.settings.get("link_window", 8)
            allowance = local + link["connects"] * window * 2  # (two documents per batch)
            assert link["updates_shipped"] <= allowance, (source, target, link, local)
            assert link["refused"] == 0, link


async def _write(
    replica: Replica, docs: list[str], edits: int, tag: str, *, every: int = 50
) -> None:
    """``edits`` edits spread over ``docs``, all acknowledged; the replica sends what
    accumulated every ``every`` edits (1: each edit is an update of its own, stored
    before the next is made)."""
    for doc in docs:
        await replica.open(doc)
    for i in range(edits):
        doc = docs[i % len(docs)]
        text(replica, doc).insert(0, f"{tag}-{i}-{doc[-1]};")
        if every == 1:
            await replica.wait_synced(doc, timeout=timeout_s(30))
        elif i % every == every - 1:
            await asyncio.sleep(0)  # (let the replica send as it goes)
    for doc in docs:
        await replica.wait_synced(doc, timeout=timeout_s(60))


async def _linked(regions: Regions, source: str, target: str, what: str = "live") -> dict:
    """Wait until ``source``'s link to ``target`` is live and caught up."""

    return await eventually(
        lambda: regions[source].caught_up(target),
        timeout=60,
        what=f"the link {source}->{target} {what}",
    )


async def _all_linked(regions: Regions) -> None:
    """Wait until every link between ``regions`` is live and caught up."""
    for source in regions.names:
        for target in regions.names:
            if source != target:
                await _linked(regions, source, target)


async def test_a_link_killed_mid_catch_up_re_ships_at_most_one_window(tmp_path: Path) -> None:
    window, page = 2, 256
    settings = {"compact_after_updates": 100_000, "link_window": window, "link_ack_timeout_s": 10.0}
    docs = [f"resume/{k:02d}" for k in range(40)]
    async with Regions(tmp_path, ("eu", "us", "ap"), settings=settings) as regions:
        token = regions.token()
        for target in ("us", "ap"):
            await _linked(regions, "eu", target)  # (first contact made: checkpoints exist)
        regions.isolate("eu")
        async with Replica(tmp_path / "writer.db", relay=regions["eu"].url, token=token) as writer:
            await _write(writer, docs, 12000, "w")
        # eu -> us catches up slowly (each message 150 ms late) and is killed midway.
        regions.links["eu", "us"].heal()
        regions.links["eu", "us"].set_delay(0.15)
        await eventually(
            lambda: regions[("eu")].link("us")["checkpoints"] >= 8,
            timeout=60,
            what="the link eu->us to checkpoint a few batches",
        )
        before = regions[("eu")].link("us")
        assert before["state"] == "catching up", before
        await regions.kill("eu")
        shipped_before_kill = regions.shipped["eu", "us"]
        await regions.restart("eu")
        regions.links["eu", "us"].clear_faults()
        await _linked(regions, "eu", "us")
        # eu -> ap: the same catch-up, uninterrupted (the yardstick).
        regions.links["eu", "ap"].heal()
        await _linked(regions, "eu", "ap")
        clean = regions.shipped["eu", "ap"]
        interrupted = regions.shipped["eu", "us"]
        # At most one window of batches (a batch: a page of appends, each update once)
        # more than the uninterrupted link, whatever was in flight at the kill.
        per_batch = clean / (_local_updates(regions, "eu") / page)
        allowance = window * per_batch * 1.25
        assert interrupted <= clean + allowance, (
            interrupted,
            clean,
            allowance,
            shipped_before_kill,
        )
        assert interrupted > shipped_before_kill  # (it did resume, and shipped the rest)
        copies = [await regions["eu"].document(d) for d in docs[:3]]
        for doc, copy in zip(docs[:3], copies, strict=True):
            assert same_content([copy, await regions["us"].document(doc)])
            assert same_content([copy, await regions["ap"].document(doc)])


async def test_a_source_compacted_past_the_cursor_ships_only_what_the_target_lacks(
    tmp_path: Path,
) -> None:
    settings = {"compact_after_updates": 50, "link_ack_timeout_s": 10.0}
    doc = "compacted/doc"
    async with Regions(tmp_path, ("eu", "us"), settings=settings) as regions:
        token = regions.token()
        async with Replica(tmp_path / "writer.db", relay=regions["eu"].url, token=token) as writer:
            # A large document both regions hold, then a partition and more edits at eu,
            # which compacts the document's tail past the link's cursor.
            await writer.open(doc)
            text(writer, doc).insert(0, "x" * 100_000 + ";")
            await writer.wait_synced(doc, timeout=timeout_s(30))
            await _linked(regions, "eu", "us")
            regions.partition("eu", "us")
            shipped_before = regions.shipped["eu", "us"]
            fallbacks_before = regions["eu"].link("us")["fallbacks"]
            await _write(writer, [doc], 400, "late", every=1)  # (400 appends: compacted)

        def compacted_past() -> bool:
            with UpdateLog(regions["eu"].directory / "store.db") as log:
                row = log.conn.execute(
                    "SELECT snapshot_seq FROM documents WHERE name = ?", (doc,)
                ).fetchone()
            return bool(row) and row[0] > link_cursor

        link_cursor = regions["eu"].link("us")["cursor"]
        await eventually(compacted_past, timeout=30, what="eu compacting past the link's cursor")
        regions.heal()
        await _linked(regions, "eu", "us")
        copies = await regions.documents(doc)
        assert same_content([copies["eu"], copies["us"]])
        link = regions["eu"].link("us")
        assert link["fallbacks"] > fallbacks_before, str((link, fallbacks_before))  # by SV
        shipped = regions.shipped["eu", "us"] - shipped_before
        missing = len(copies["eu"]) - 100_000  # the late edits, roughly (the rest was there)
        assert shipped < 2 * missing + 4096, (shipped, missing)
        assert shipped < 50_000  # never the whole document again


async def test_a_region_restarted_empty_is_refilled_by_state_vectors_not_blind_copies(
    tmp_path: Path,
) -> None:
    settings = {"compact_after_updates": 100_000, "link_ack_timeout_s": 10.0}
    docs = [f"refill/{k}" for k in range(10)]
    async with Regions(tmp_path, NAMES, redis=("ap",), settings=settings) as regions:
        token = regions.token()
        for name in ("eu", "us"):
            async with Replica(
                tmp_path / f"w-{name}.db", relay=regions[name].url, token=token
            ) as w:
                await _write(w, docs, 300, name)
        for source in NAMES:
            for target in NAMES:
                if source != target:
                    await _linked(regions, source, target)
        held = await regions.documents(docs[0])
        assert same_content(held.values())
        whole = sum([len(await regions["eu"].document(doc)) for doc in docs])
        before = dict(regions.shipped)
        await regions.empty("us")

        async def refilled() -> bool:
            for doc in docs:
                copies = await regions.documents(doc)
                if not same_content(copies.values()) or not copies["us"]:
                    return False
            return True

        await eventually(refilled, timeout=60, what="us refilled")
        for source in NAMES:
            for target in NAMES:
                if source != target:
                    await _linked(regions, source, target, "after us was emptied")
        into = {s: regions.shipped[s, "us"] - before[s, "us"] for s in ("eu", "ap")}
        out_of = {t: regions.shipped["us", t] - before["us", t] for t in ("eu", "ap")}
        # Each source sends the emptied region what it lacks: everything, once per source
        # at most (the two sweeps run at once); the emptied region sends back about
        # nothing (its peers lack nothing), never the documents again.
        for source, shipped in into.items():
            assert shipped <= 1.2 * whole + 16_384, (source, shipped, whole)
        assert sum(into.values()) >= whole * 0.9
        for target, shipped in out_of.items():
            assert shipped < 0.1 * whole, (target, shipped, whole)
        assert regions["eu"].link("us")["sweeps"] >= 2


async def test_a_replica_fails_over_to_another_region_and_its_home_catches_up_by_peering(
    regions: Regions, tmp_path: Path
) -> None:
    doc = "failover/doc"
    token = regions.token()
    for target in ("eu", "ap"):
        await _linked(regions, "us", target)
    async with (
        Replica(
            tmp_path / "traveller.db",
            relay=[regions["eu"].url, regions["us"].url],
            token=token,
            relay_probe_s=0.5,
        ) as traveller,
        Replica(tmp_path / "local.db", relay=regions["us"].url, token=token) as local,
    ):
        mine = (await traveller.open(doc)).get("text", type=Text)
        theirs = (await local.open(doc)).get("text", type=Text)
        mine.insert(0, "home;")
        await traveller.wait_synced(doc, timeout=timeout_s(20))
        assert traveller.status(doc).relay == regions["eu"].url
        await regions.kill("eu")
        mine.insert(0, "away;")
        await eventually(lambda: traveller.status(doc).relay == regions["us"].url, timeout=30)
        await traveller.wait_synced(doc, timeout=timeout_s(30))  # acknowledged by us
        theirs.insert(0, "local;")
        await local.wait_synced(doc, timeout=timeout_s(20))
        await eventually(lambda: "local;" in str(mine), what="the local edit, through us")
        shipped = regions["us"].link("eu")["updates_shipped"]
        await regions.restart("eu")
        await eventually(
            lambda: traveller.status(doc).relay == regions["eu"].url,
            timeout=30,
            what="the traveller back home",
        )
        mine.insert(0, "back;")
        await traveller.wait_synced(doc, timeout=timeout_s(20))
        await eventually(lambda: "back;" in str(theirs), what="home's edit in us")
    # Home caught up through its link from us: the local edit came over it.
    await _linked(regions, "us", "eu")
    assert regions["us"].link("eu")["updates_shipped"] > shipped
    copies = await regions.documents(doc)
    assert same_content(copies.values())
    assert _tokens_of(copies["eu"]) == {"back", "local", "away", "home"}


async def test_links_need_the_peer_right_and_a_region_on_both_ends(regions: Regions) -> None:
    from websockets.asyncio.client import connect
    from websockets.exceptions import InvalidStatus

    from crdtsync.protocol import ExtClose, ExtOpen, decode_message

    base = regions["eu"].url.rstrip("/")
    refused = {
        "no peer right": f"{base}/?crdtsync=1&mux=1&region=us&token={regions.token()}",
        "its own region": f"{base}/?crdtsync=1&mux=1&region=eu&token="
        + regions.token({"**": "rwp"}),
        "a bad region name": f"{base}/?crdtsync=1&mux=1&region=US&token="
        + regions.token({"**": "rwp"}),
        "no token": f"{base}/?crdtsync=1&mux=1&region=us",
    }
    for why, url in refused.items():
        with pytest.raises(InvalidStatus) as caught:
            async with connect(url):
                pass
        assert caught.value.response.status_code in (401, 403), why
    # The peer right on some documents only: a channel on another document is refused.
    url = f"{base}/?crdtsync=1&mux=1&region=us&token=" + regions.token(
        {"mine/*": "rwp", "**": "rw"}
    )
    async with connect(url) as ws:
        await ws.recv()  # the hello
        await ws.send(ExtOpen(1, "other/doc").encode())
        while True:
            msg = decode_message(await asyncio.wait_for(ws.recv(), timeout_s(10)))
            if isinstance(msg, ExtClose):
                break
        assert msg.channel == 1
        assert msg.code == 4403
        assert "peer right" in msg.reason


@pytest.mark.parametrize("anti_entropy", [True, False])
async def test_anti_entropy_finds_and_repairs_what_a_lossy_link_dropped(
    tmp_path: Path, anti_entropy: bool
) -> None:
    """A link broken on purpose drops 1 in 50 updates: with anti-entropy the target is
    repaired and each repair is a finding; without it, the loss stays (the control)."""
    settings = {
        "compact_after_updates": 100_000,
        "link_defect": "drop",
        "anti_entropy_s": 0.5 if anti_entropy else 0,
    }
    docs = [f"lossy/{k}" for k in range(4)]
    async with Regions(tmp_path, ("eu", "us"), settings=settings) as regions:
        token = regions.token()
        await _linked(regions, "eu", "us")
        async with Replica(tmp_path / "w.db", relay=regions["eu"].url, token=token) as writer:
            await _write(writer, docs, 300, "w", every=1)
        await _linked(regions, "eu", "us")
        link = regions["eu"].link("us")
        assert link["dropped"] >= 3, link

        async def same() -> bool:
            for doc in docs:
                copies = await regions.documents(doc)
                if _tokens_of(copies["us"]) != _tokens_of(copies["eu"]):
                    return False
            return True

        if anti_entropy:
            await eventually(same, timeout=30, what="anti-entropy to repair us")

            async def counted() -> dict | None:
                # (A run counts its repairs once the target's digests match after them:
                # a round trip after the repaired content arrived.)
                link = regions["eu"].link("us")
                return link if link["repairs"] >= 1 else None

            link = await eventually(counted, timeout=10, what="the repairs counted")
            # Each repair of what this region wrote is a finding naming its document.
            assert link["findings"]
            assert set(link["findings"]) <= set(docs)
        else:
            await asyncio.sleep(2.0)
            assert not await same()
            assert regions["eu"].link("us")["repairs"] == 0


async def test_links_show_in_metrics(regions: Regions) -> None:
    import urllib.request

    await _linked(regions, "eu", "us")
    url = regions["eu"].url.replace("ws://", "http://").rstrip("/") + "/metrics"
    text = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=10).read().decode())
    assert 'crdtsync_link_live{region="us"} 1.0' in text
    assert 'crdtsync_link_lag_changes{region="ap"}' in text
    assert 'crdtsync_link_bytes_shipped_total{region="us"}' in text


async def test_two_processes_of_a_redis_region_run_each_link_once_and_hand_over(
    regions: Regions, tmp_path: Path
) -> None:
    """ap's store is a Redis: a second relay process of ap (same settings) stands by for
    each link while the first runs it; SIGKILL the first, and the second takes the lease
    over and ships what ap's clients write meanwhile."""
    from crdtsync.testing.processes import RelayProcess

    ap = regions["ap"]
    await _linked(regions, "ap", "eu")
    second = RelayProcess(ap.store, ap.directory, "--config", str(ap.config), *regions.relay_args)
    await asyncio.to_thread(second.start)
    try:
        url = second.url.replace("ws://", "http://").rstrip("/") + "/healthz?verbose=1"

        def links_of_second() -> dict[str, str]:
            import json
            import urllib.request

            with urllib.request.urlopen(url, timeout=10) as answer:
                return {k["region"]: k["state"] for k in json.loads(answer.read())["links"]}

        await eventually(
            lambda: set(links_of_second().values()) == {"standby"},
            timeout=20,
            what="the second process standing by for both links",
        )
        assert {ap.link(t)["state"] for t in ("eu", "us")} <= {"live", "catching up"}
        await regions.kill("ap")  # the first process, holding both leases
        token = regions.token()
        async with Replica(tmp_path / "w.db", relay=second.url, token=token) as writer:
            await _write(writer, ["handover/doc"], 20, "h")
        await eventually(
            lambda: set(links_of_second().values()) == {"live"},
            timeout=30,
            what="the second process running both links",
        )

        async def arrived() -> bool:
            copies = await regions.documents("handover/doc")
            return all(len(_tokens_of(copies[r])) == 20 for r in ("eu", "us"))

        await eventually(arrived, timeout=30, what="ap's edits in eu and us, via the second")
    finally:
        await asyncio.to_thread(second.terminate)
        await regions.restart("ap")  # (the fixture stops what it started)
