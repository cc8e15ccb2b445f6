"""Several regions on one machine, for tests and ``crdtsync check --regions`` (issue 12).

Each region is one store (an SQLite file, or a ``redis-server`` of its own) and a relay
process serving it, started with ``--region`` and one ``--peer`` per other region. Every
link (an ordered pair of regions) goes through a :class:`~crdtsync.testing.proxy.FaultProxy`
of its own, so delays, partitions, drops, duplicates and reorders can be put on the
links between regions without touching the connections of the regions' own replicas.

The regions share one HS256 token secret: each relay mints its own peer tokens with it,
and :meth:`Regions.token` mints tokens for replicas.
"""

from __future__ import annotations

import asyncio
import json
import random
import urllib.request
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from crdtsync.auth import mint_token
from crdtsync.store import UpdateLog, merge_in_batches

from .processes import RelayProcess
from .proxy import FaultProxy
from .redis import RedisServer

__all__ = ["Region", "Regions", "same_content"]

SECRET = "crdtsync-regions-test-secret-0123456789"  # (a test's; never a deployment's)
UNREACHABLE = "ws://127.0.0.1:9"  # a proxy's upstream until its target relay has started


@dataclass(eq=False)
class Region:
    """One region: its store and its relay process."""

    name: str
    directory: Path
    redis: RedisServer | None
    config: Path
    relay: RelayProcess | None = None

    @property
    def store(self) -> str | Path:
        """The store's address: a file, or the Redis URL."""
        if self.redis is not None:
            return self.redis.url
        return self.directory / "store.db"

    @property
    def url(self) -> str:
        assert self.relay is not None
        return self.relay.url

    def health(self) -> dict[str, Any]:
        """The relay's ``/healthz?verbose=1``."""
        assert self.relay is not None
        url = self.relay.url.replace("ws://", "http://").rstrip("/") + "/healthz?verbose=1"
        with urllib.request.urlopen(url, timeout=10) as answer:
            return dict(json.loads(answer.read()))

    def link(self, target: str) -> dict[str, Any]:
        """The status of this region's link to ``target`` (from its health)."""
        for link in self.health().get("links", []):
            if link["region"] == target:
                return dict(link)
        raise KeyError(target)

    async def last_change(self) -> int:
        """The cursor of the latest change of this region's store."""
        if self.redis is None:
            with UpdateLog(self.directory / "store.db") as log:
                return log.last_position()
        from crdtsync.server.redis_store import RedisStore

        store = RedisStore(self.redis.url)
        try:
            return await store.last_change()
        finally:
            await store.close()

    async def caught_up(self, target: str) -> dict[str, Any] | None:
        """This region's link to ``target`` if it is live and has checkpointed everything
        this region's store held when asked (None: not yet)."""
        latest = await self.last_change()
        link = self.link(target)
        if link["state"] == "live" and link["cursor"] >= latest:
            return link
        return None

    async def document(self, name: str) -> bytes:
        """``name`` as this region's store holds it: one update (empty document: b"")."""
        if self.redis is None:
            with UpdateLog(self.directory / "store.db") as log:
                updates = log.load(name).all_updates()
        else:
            from crdtsync.server.redis_store import RedisStore

            store = RedisStore(self.redis.url)
            try:
                updates = (await store.load(name)).all_updates()
            finally:
                await store.close()
        return merge_in_batches(updates) if updates else b""


@dataclass(eq=False)
class Regions:
    """Regions ``names`` in ``directory``, those in ``redis`` on Redis, fully meshed.

    Use as ``async with Regions(...) as regions``. ``settings``: more relay settings
    for every region (TOML values: the link's window, anti-entropy...). ``relay_args``:
    more ``crdtsync relay`` flags.
    """

    directory: Path
    names: Sequence[str] = ("eu", "us", "ap")
    redis: Iterable[str] = ()
    rng: random.Random = field(default_factory=lambda: random.Random(0))
    settings: dict[str, Any] = field(default_factory=dict)
    relay_args: Sequence[str] = ("--log-level", "WARNING")
    regions: dict[str, Region] = field(default_factory=dict)
    links: dict[tuple[str, str], FaultProxy] = field(default_factory=dict)

    # Bytes of the messages each link's proxy delivered from source to target.
    shipped: dict[tuple[str, str], int] = field(default_factory=dict)

    def _counter(self, source: str, target: str) -> Callable[[dict[str, Any]], None]:
        self.shipped[source, target] = 0

        def count(event: dict[str, Any]) -> None:
            if event.get("event") == "forward" and event.get("direction") == "up":
                self.shipped[source, target] += int(event.get("bytes", 0))

        return count

    async def __aenter__(self) -> Regions:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self) -> None:
        """Start every proxy, store and relay (links connect once their proxy knows
        where its target is: each relay's port is known only once it started)."""
        on_redis = set(self.redis)
        for source in self.names:
            for target in self.names:
                if source != target:
                    proxy = FaultProxy(
                        UNREACHABLE,
                        rng=random.Random(self.rng.getrandbits(64)),
                        name=f"{source}->{target}",
                        on_event=self._counter(source, target),
                    )
                    await proxy.start()
                    self.links[source, target] = proxy
        for name in self.names:
            directory = self.directory / name
            directory.mkdir(parents=True, exist_ok=True)
            redis = None
            if name in on_redis:
                redis = await asyncio.to_thread(RedisServer(directory / "redis").start)
            region = Region(name, directory, redis, directory / "relay.toml")
            self.regions[name] = region
            self._write_config(region)
        for region in self.regions.values():
            await self._start_relay(region)

    def _write_config(self, region: Region) -> None:
        values: dict[str, Any] = {
            "region": region.name,
            "token_secrets": [SECRET],
            "link_retry_s": 0.2,
            **self.settings,
        }
        lines = [f"{key} = {json.dumps(value)}" for key, value in values.items()]
        lines.append("[peers]")
        lines += [
            f"{other} = {json.dumps(self.links[region.name, other].url)}"
            for other in self.names
            if other != region.name
        ]
        region.config.write_text("\n".join(lines) + "\n")

    async def _start_relay(self, region: Region) -> None:
        if region.relay is None:
            region.relay = RelayProcess(
                region.store, region.directory, "--config", str(region.config), *self.relay_args
            )
            await asyncio.to_thread(region.relay.start)
        else:
            await asyncio.to_thread(region.relay.restart)
        for (_, target), proxy in self.links.items():
            if target == region.name:
                proxy.upstream = region.url.rstrip("/")

    async def stop(self) -> None:
        """Stop every relay, store and proxy."""
        for region in self.regions.values():
            if region.relay is not None and region.relay.proc is not None:
                await asyncio.to_thread(region.relay.terminate)
            if region.redis is not None:
                await asyncio.to_thread(region.redis.stop)
        for proxy in self.links.values():
            await proxy.stop()

    def __getitem__(self, name: str) -> Region:
        return self.regions[name]

    def token(self, docs: dict[str, str] | None = None, subject: str = "tester") -> str:
        """A token for replicas, valid in every region (default: read and write all)."""
        return mint_token(SECRET, subject=subject, docs=docs or {"**": "rw"}, ttl_s=3600)

    # -- faults ---------------------------------------------------------------------------

    def between(self, a: str, b: str) -> list[FaultProxy]:
        """Both links between regions ``a`` and ``b``."""
        return [self.links[a, b], self.links[b, a]]

    def partition(self, a: str, b: str) -> None:
        """Cut both links between ``a`` and ``b`` (their replicas' connections stay)."""
        for proxy in self.between(a, b):
            proxy.partition()

    def isolate(self, name: str) -> None:
        """Cut every link to and from ``name``."""
        for (source, target), proxy in self.links.items():
            if name in (source, target):
                proxy.partition()

    def heal(self) -> None:
        """Every link back, without delay, duplicates or reorders."""
        for proxy in self.links.values():
            proxy.heal()
            proxy.clear_faults()

    async def kill(self, name: str) -> None:
        """SIGKILL the region's relay process (its links die with it)."""
        relay = self.regions[name].relay
        assert relay is not None
        await asyncio.to_thread(relay.kill)

    async def restart(self, name: str) -> None:
        """Start the region's relay again, on the same port and store."""
        await self._start_relay(self.regions[name])

    async def empty(self, name: str) -> None:
        """Stop the region's relay, lose its whole store, and start it again (empty)."""
        region = self.regions[name]
        assert region.relay is not None
        await asyncio.to_thread(region.relay.kill)
        if region.redis is not None:
            await asyncio.to_thread(region.redis.wipe)
            await asyncio.to_thread(region.redis.start)
        else:
            for path in region.directory.iterdir():
                if path.name.startswith("store.db"):
                    path.unlink()
        await self._start_relay(region)

    async def documents(self, name: str) -> dict[str, bytes]:
        """Each region's copy of document ``name`` (a whole-document update each)."""
        return {region: await self.regions[region].document(name) for region in self.names}


def same_content(updates: Iterable[bytes]) -> bool:
    """Whether the documents ``updates`` make hold the same content: the same state vector
    and delete set (:func:`crdtsync.folders.document_digest`)."""
    from crdtsync.folders import document_digest

    return len({document_digest([update]) for update in updates}) <= 1
