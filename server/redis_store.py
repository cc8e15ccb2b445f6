"""The Redis store: :class:`crdtsync.backend.RelayStore` for many relay processes on one Redis.

Keys of a document ``name`` share the hash tag ``{name}`` (document names cannot hold
braces: crdtsync.settings), so one document's keys live in one slot:

- ``<prefix>:{name}:log``, a stream: one entry per update, fields ``n`` (the document's
  own sequence: its position), ``c`` (the change counter of its append: what a region's
  link reads after), ``o`` (the region it came from over a link; absent: this one) and
  ``u`` (the update). Entry ids are Redis's own (they carry the time the entry was
  added: what the minimum age is measured on).
- ``<prefix>:{name}:meta``, a hash: ``pos`` (the last position), ``snap_pos`` (the
  position the snapshot covers), ``snap_c`` (the latest change it folded in),
  ``snap_gen`` and ``snap_bytes`` (which snapshot, its size), ``tail_n`` and
  ``tail_bytes`` (the tail since the snapshot).
- ``<prefix>:{name}:snap:<gen>``, a hash of 1 MiB chunks ``0``, ``1``... (a Redis string
  holds at most 512 MB, and one write of megabytes holds Redis up for everyone).
- ``<prefix>:{name}:ledger``, a hash: the integrity ledger (``r<client>`` ranges,
  ``o<client>`` owner, ``t<client>:<clock>`` a type or claim, ``k`` once written).
- ``<prefix>:{name}:lease`` and ``<prefix>:{name}:fence``: the compaction lease and the
  counter its fencing tokens come from.

The one cross-document piece is the list of changed documents: ``<prefix>:{*}:changes``
(a sorted set, member a document, score a change counter) and ``<prefix>:{*}:clock``
(that counter). The append script updates them with the document's keys, atomically: on
one Redis primary (what this backend supports) that is allowed; on Redis Cluster the
script would have to update them separately, after the append.

Every write is one Lua script on one document's keys: the check of the expected position,
the entries, the ledger's changes and the counters commit together or not at all.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeout

from crdtsync.backend import (
    Change,
    Entry,
    FeedGap,
    Follower,
    Gap,
    LinkCheckpoint,
    RelayStore,
    Since,
    StoreIdentity,
)
from crdtsync.errors import (
    DocumentsFailed,
    MalformedMessage,
    PositionConflict,
    StoreError,
    StoreUnreachable,
)
from crdtsync.integrity import ClientsAsRead, Ledger, decode_ranges, encode_ranges
from crdtsync.store import (
    SNAPSHOT_CHUNK_BYTES,
    CompactionResult,
    DocumentLog,
    Staged,
    compact_updates,
)

__all__ = ["RedisFollower", "RedisOptions", "RedisPresence", "RedisStore", "parse_address"]

log = logging.getLogger("crdtsync.redis")

DEFAULT_PREFIX = "crdtsync"
MIN_AGE_S = 60.0  # folded entries younger than this stay (a joiner may be reading them)
LEASE_S = 60.0  # a compaction's lease; one that outlives it writes nothing
FOLLOW_BLOCK_S = 0.1  # a follower's longest wait in Redis (documents added wait this long)
FOLLOW_COUNT = 512  # entries a follower reads per stream at a time
LOAD_ATTEMPTS = 8  # a load that keeps meeting compactions gives up (StoreError)
IDENTITY_CHECK_S = 1.0  # how often a follower checks the store is still the one it read
PASSWORD_ENV = "CRDTSYNC_REDIS_PASSWORD"  # used when the URL holds no password
WAIT_TIMEOUT_S = 5.0  # with wait_replicas: an append not on enough replicas by then fails
SOCKET_TIMEOUT_S = 10.0  # a Redis call without an answer this long fails (StoreUnreachable)
MAX_CONNECTIONS = 64  # per client of the store (the follower and presence have their own)
POOL_WAIT_S = 10.0  # a call waits this long for a free connection, then fails (StoreError)
PRESENCE_POLL_S = 0.05  # a document added to presence is subscribed within this long
# The feed of appends kept for region links (about this many: trimmed in whole nodes); a
# link further behind compares state vectors instead.
FEED_MAXLEN = 1_000_000

_APPEND = """
local pos = tonumber(redis.call('HGET', KEYS[1], 'pos') or '0')
if pos == nil then return redis.error_reply('ERR crdtsync: damaged position in ' .. KEYS[1]) end
local kind = redis.call('TYPE', KEYS[2])['ok']
if kind ~= 'stream' and kind ~= 'none' then
  return redis.error_reply('ERR crdtsync: ' .. KEYS[2] .. ' is not a stream')
end
if ARGV[1] ~= '' and tonumber(ARGV[1]) ~= pos then return {0, pos} end
local ncond = tonumber(ARGV[3])
local i = 4
for _ = 1, ncond do
  local ranges = redis.call('HGET', KEYS[3], 'r' .. ARGV[i])
  local owner = redis.call('HGET', KEYS[3], 'o' .. ARGV[i])
  local got_r = ranges and ('=' .. ranges) or '-'
  local got_o = owner and ('=' .. owner) or '-'
  if got_r ~= ARGV[i + 1] or got_o ~= ARGV[i + 2] then return {0, pos} end
  i = i + 3
end
local nset = tonumber(ARGV[i])
local ndel = tonumber(ARGV[i + 1])
i = i + 2
for _ = 1, nset do
  redis.call('HSET', KEYS[3], ARGV[i], ARGV[i + 1])
  i = i + 2
end
for _ = 1, ndel do
  redis.call('HDEL', KEYS[3], ARGV[i])
  i = i + 1
end
local added, bytes = 0, 0
local change = nil
if i <= #ARGV then change = redis.call('INCR', KEYS[4]) end
while i + 1 <= #ARGV do
  pos = pos + 1
  if ARGV[i] == '' then
    redis.call('XADD', KEYS[2], '*', 'n', pos, 'c', change, 'u', ARGV[i + 1])
  else
    redis.call('XADD', KEYS[2], '*', 'n', pos, 'c', change, 'o', ARGV[i], 'u', ARGV[i + 1])
  end
  added = added + 1
  bytes = bytes + #ARGV[i + 1]
  i = i + 2
end
if added > 0 then
  redis.call('HSET', KEYS[1], 'pos', pos)
  redis.call('HINCRBY', KEYS[1], 'tail_n', added)
  redis.call('HINCRBY', KEYS[1], 'tail_bytes', bytes)
  redis.call('ZADD', KEYS[5], change, ARGV[2])
  redis.call('XADD', KEYS[6], 'MAXLEN', '~', FEED_MAXLEN, change .. '-1', 'd', ARGV[2])
end
return {1, pos}
""".replace("FEED_MAXLEN", str(FEED_MAXLEN))

# Trim what the snapshot covers and is older than the minimum age, exactly; delete an
# empty stream. Bounded by the retained entries (a compaction keeps the tail short).
_TRIM = """
local snap_pos = tonumber(redis.call('HGET', KEYS[2], 'snap_pos') or '0')
local t = redis.call('TIME')
local cutoff = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) - tonumber(ARGV[1])
local last = nil
local keep = nil
local start = '-'
local done = false
while not done do
  local page = redis.call('XRANGE', KEYS[1], start, '+', 'COUNT', 256)
  if #page == 0 then break end
  for _, entry in ipairs(page) do
    local id = entry[1]
    local ms, seq = string.match(id, '^(%d+)-(%d+)$')
    local n = nil
    local fields = entry[2]
    for j = 1, #fields, 2 do
      if fields[j] == 'n' then n = tonumber(fields[j + 1]) end
    end
    if tonumber(ms) > cutoff or (n ~= nil and n > snap_pos) then
      keep = id
      done = true
      break
    end
    last = id
  end
  start = '(' .. page[#page][1]
end
local trimmed = 0
if last ~= nil then
  if keep ~= nil then
    trimmed = redis.call('XTRIM', KEYS[1], 'MINID', '=', keep)
  else
    trimmed = redis.call('XLEN', KEYS[1])
    redis.call('DEL', KEYS[1])
  end
end
if redis.call('EXISTS', KEYS[1]) == 1 and redis.call('XLEN', KEYS[1]) == 0 then
  redis.call('DEL', KEYS[1])
end
return trimmed
"""

# Make a compaction's snapshot current, if its lease still holds and nobody switched
# since it read; then trim as above.
_SWITCH = """
if redis.call('GET', KEYS[2]) ~= ARGV[1] then return -1 end
local gen = redis.call('HGET', KEYS[1], 'snap_gen') or ''
if gen ~= ARGV[2] then return -2 end
if redis.call('EXISTS', KEYS[4]) == 0 then return -3 end
-- snap_c: the latest change cursor folded into a snapshot (a link whose cursor is below
-- it cannot read what came after its cursor from the stream). An entry without one
-- (written before entries carried it) counts as the latest change.
local old_pos = tonumber(redis.call('HGET', KEYS[1], 'snap_pos') or '0')
local snap_c = tonumber(redis.call('HGET', KEYS[1], 'snap_c') or '0')
local new_pos = tonumber(ARGV[3])
local start = '-'
local done = false
while not done do
  local page = redis.call('XRANGE', KEYS[5], start, '+', 'COUNT', 256)
  if #page == 0 then break end
  for _, entry in ipairs(page) do
    local n, c = nil, nil
    local fields = entry[2]
    for j = 1, #fields, 2 do
      if fields[j] == 'n' then n = tonumber(fields[j + 1]) end
      if fields[j] == 'c' then c = tonumber(fields[j + 1]) end
    end
    if n ~= nil and n > new_pos then done = true break end
    if n ~= nil and n > old_pos then
      if c == nil then c = tonumber(redis.call('GET', KEYS[6]) or '0') end
      if c > snap_c then snap_c = c end
    end
  end
  start = '(' .. page[#page][1]
end
redis.call('HSET', KEYS[1], 'snap_pos', ARGV[3], 'snap_gen', ARGV[1], 'snap_bytes', ARGV[4],
  'snap_c', snap_c)
redis.call('PERSIST', KEYS[4])
redis.call('HINCRBY', KEYS[1], 'tail_n', -tonumber(ARGV[5]))
redis.call('HINCRBY', KEYS[1], 'tail_bytes', -tonumber(ARGV[6]))
if KEYS[3] ~= KEYS[4] then redis.call('DEL', KEYS[3]) end
redis.call('DEL', KEYS[2])
return 1
"""

# Take a lease, or renew it if it is ours.
_RENEW = """
local holder = redis.call('GET', KEYS[1])
if holder == false or holder == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
"""

# Release a lease only if it is still ours.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


@dataclass(frozen=True, slots=True)
class RedisOptions:
    """What a Redis store address says beyond redis-py's URL (its own query parameters:
    redis-py would pass unknown ones to its connections)."""

    url: str  # for redis-py
    prefix: str = DEFAULT_PREFIX  # ?prefix=: keys start with it (several deployments, one Redis)
    min_age_s: float = MIN_AGE_S  # ?min_age_s=
    lease_s: float = LEASE_S  # ?lease_s=
    wait_replicas: int = 0  # ?wait_replicas=: an append returns once this many replicas have it
    wait_timeout_s: float = WAIT_TIMEOUT_S  # ?wait_timeout_s=: ... or fails after this long


def parse_address(address: str) -> RedisOptions:
    """Split a store address into redis-py's URL and our options.

    Raises:
        StoreError: an option is invalid.
    """
    parts = urlsplit(address)
    rest = []
    options: dict[str, Any] = {}
    for key, value in parse_qsl(parts.query, keep_blank_values=True):
        if key == "prefix":
            if not value or "{" in value or "}" in value:
                raise StoreError(f"a Redis key prefix must be non-empty, without braces: {value!r}")
            options[key] = value
        elif key in ("min_age_s", "lease_s", "wait_timeout_s"):
            try:
                number = float(value)
            except ValueError:
                number = -1.0
            if not number >= 0 or (key != "min_age_s" and number < 0.001):
                raise StoreError(f"{key} must be a number of seconds, not {value!r}")
            options[key] = number
        elif key == "wait_replicas":
            if not value.isdigit():
                raise StoreError(f"wait_replicas must be a number of replicas, not {value!r}")
            options[key] = int(value)
        else:
            rest.append((key, value))
    return RedisOptions(urlunsplit(parts._replace(query=urlencode(rest))), **options)


def _redacted(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[-1]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc}"))


@dataclass(frozen=True, slots=True)
class _Keys:
    meta: str
    log: str
    ledger: str
    lease: str
    fence: str
    snap_prefix: str

    def snap(self, gen: str) -> str:
        return f"{self.snap_prefix}{gen}"


class RedisStore:
    """:class:`~crdtsync.backend.RelayStore` on Redis (one primary, optional replicas).

    Args:
        address: ``redis://[[user]:password@]host:port/db`` (``rediss://`` for TLS,
            ``unix://`` for a socket); our own query parameters: ``prefix`` (the keys'
            first part, default ``crdtsync``), ``min_age_s`` (folded entries younger
            than this are not trimmed, default 60), ``lease_s`` (how long a compaction
            may take before its lease lapses, default 60), ``wait_replicas`` (an append
            returns only once that many replicas received it: Redis's ``WAIT``, which
            says received, not written to their disks; default 0) and
            ``wait_timeout_s`` (how long it waits for them, default 5).
        cpu: where a compaction folds updates (pycrdt holds the GIL: a process pool
            keeps the caller's loop free); None: a thread.

    Raises:
        StoreError: the address is not a valid Redis URL.
    """

    shared = True

    def __init__(self, address: str, *, cpu: Executor | None = None) -> None:
        self.address = address
        options = parse_address(address)
        url = options.url
        self.prefix = options.prefix
        self.min_age_s = options.min_age_s
        self.lease_s = options.lease_s
        self.wait_replicas = options.wait_replicas
        self.wait_timeout_s = options.wait_timeout_s
        self._cpu = cpu
        self._where = _redacted(url)
        # A password kept out of the URL (and so out of process lists and logs).
        self._password = None if urlsplit(url).password else os.environ.get(PASSWORD_ENV)
        try:
            self.redis: aioredis.Redis = self.connect(url)
        except ValueError as exc:
            raise StoreError(f"not a Redis URL: {self._where}: {exc}") from exc
        self._url = url
        self._identity_key = f"{self.prefix}:{{*}}:identity"
        self._changes_key = f"{self.prefix}:{{*}}:changes"
        self._clock_key = f"{self.prefix}:{{*}}:clock"
        self._feed_key = f"{self.prefix}:{{*}}:feed"
        self._append = self.redis.register_script(_APPEND)
        self._trim = self.redis.register_script(_TRIM)
        self._switch = self.redis.register_script(_SWITCH)
        self._release = self.redis.register_script(_RELEASE)
        self._renew = self.redis.register_script(_RENEW)

    def connect(self, url: str | None = None) -> aioredis.Redis:
        """A new client of this store's Redis (a follower's blocking reads need their own).

        Without redis-py's retries (redis-py >= 6 resends a command whose connection
        failed, even after Redis ran it): an append script run twice would append twice,
        or refuse its own committed write as a PositionConflict. A lost reply is a
        StoreError; the callers resend (a repeat is harmless) or read again.
        """
        extra: dict[str, Any] = {
            "retry": Retry(NoBackoff(), 0),
            "retry_on_error": [],
            # A Redis that stops answering without closing (a partition that drops
            # packets, a frozen host) fails calls after this long instead of hanging
            # the relay's appends and its follower for the kernel's ~15 minutes.
            "socket_timeout": SOCKET_TIMEOUT_S,
            "socket_connect_timeout": SOCKET_TIMEOUT_S,
            "socket_keepalive": True,
        }
        if self._password is not None:
            extra["password"] = self._password
        # A bounded pool that waits for a free connection: redis-py's default pool
        # raised "Too many connections" at its 101st (150 joins at once: 50 got 1013).
        pool = aioredis.BlockingConnectionPool.from_url(
            url or self._url, max_connections=MAX_CONNECTIONS, timeout=POOL_WAIT_S, **extra
        )
        return aioredis.Redis.from_pool(pool)

    def keys(self, document: str) -> _Keys:
        base = f"{self.prefix}:{{{document}}}:"
        return _Keys(
            base + "meta",
            base + "log",
            base + "ledger",
            base + "lease",
            base + "fence",
            base + "snap:",
        )

    def _error(self, what: str, exc: Exception) -> StoreError:
        kind = (
            StoreUnreachable if isinstance(exc, RedisConnectionError | RedisTimeout) else StoreError
        )
        return kind(f"store {self._where}: {what}: {type(exc).__name__}: {exc}")

    async def check_settings(self) -> str:
        """Read Redis's settings that decide what an acknowledgement means; return that,
        in words, for the log.

        Raises:
            StoreError: an ``allkeys-*`` eviction policy (Redis would evict the log), or
                Redis cannot be reached.
        """
        try:
            config = await self.redis.config_get("maxmemory-policy")
            config |= await self.redis.config_get("appendonly")
            config |= await self.redis.config_get("appendfsync")
        except ResponseError as exc:
            # Managed Redis often refuses CONFIG: go on, saying what is not known.
            return (
                f"Redis at {self._where} does not show its settings ({exc}): an acknowledgement "
                "means the primary took the update; its persistence is not known here"
            )
        except RedisError as exc:
            raise self._error("reading its settings", exc) from exc
        settings = {_text(k): _text(v) for k, v in cast(dict[Any, Any], config).items()}
        policy = settings.get("maxmemory-policy", "")
        if policy.startswith("allkeys-"):
            raise StoreError(
                f"store {self._where}: Redis evicts any key under memory pressure "
                f"(maxmemory-policy {policy}): it would evict documents' logs; use noeviction"
            )
        aof, fsync = settings.get("appendonly", ""), settings.get("appendfsync", "")
        if aof != "yes":
            durable = "kept in memory only (appendonly no): lost if Redis restarts"
        elif fsync == "always":
            durable = "written to the AOF and fsynced (appendfsync always)"
        else:
            durable = f"written to the AOF, fsynced {fsync} (the last second may be lost)"
        replicas = (
            f"; and received by {self.wait_replicas} replica(s) (WAIT: not on their disks)"
            if self.wait_replicas
            else ""
        )
        return f"an acknowledgement means the update was {durable}{replicas}"

    # -- identity ------------------------------------------------------------------------

    async def identity(self) -> StoreIdentity:
        """This store's identity: made by the first call on an empty Redis."""
        try:
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.hsetnx(self._identity_key, "id", secrets.token_hex(16))
                pipe.hsetnx(self._identity_key, "epoch", 1)
                pipe.hmget(self._identity_key, ["id", "epoch"])
                *_, (made, epoch) = await pipe.execute()
        except RedisError as exc:
            raise self._error("reading its identity", exc) from exc
        return StoreIdentity(made.decode(), int(epoch))

    async def new_epoch(self) -> StoreIdentity:
        """Raise the epoch: run after restoring Redis from a backup."""
        await self.identity()
        try:
            await self.redis.hincrby(self._identity_key, "epoch", 1)
        except RedisError as exc:
            raise self._error("raising its epoch", exc) from exc
        return await self.identity()

    # -- appending -----------------------------------------------------------------------

    async def append(
        self,
        rows: Sequence[tuple[str, bytes | Staged]],
        ledgers: Mapping[str, Ledger] | None = None,
        expected: Mapping[str, int | ClientsAsRead] | None = None,
        origins: Sequence[str | None] | None = None,
    ) -> list[int]:
        """Append in one pipeline: one script per document, each atomic (see the module)."""
        per_doc: dict[str, list[bytes | str]] = {}
        if origins is not None and len(origins) != len(rows):
            raise ValueError(f"{len(origins)} origins for {len(rows)} rows")
        for i, (doc, data) in enumerate(rows):
            if isinstance(data, Staged):
                raise StoreError("the Redis store takes updates as bytes, not staged chunks")
            origin = origins[i] if origins is not None else None
            per_doc.setdefault(doc, []).extend((origin or "", data))
        docs = list(per_doc)
        docs += [d for d in (ledgers or {}) if d not in per_doc]
        docs += [d for d in (expected or {}) if d not in per_doc and d not in (ledgers or {})]
        if not docs:
            return []
        try:
            calls = []
            for doc in docs:
                k = self.keys(doc)
                want = (expected or {}).get(doc)
                keys = [
                    k.meta,
                    k.log,
                    k.ledger,
                    self._clock_key,
                    self._changes_key,
                    self._feed_key,
                ]
                args: list[Any] = [
                    _position_arg(want),
                    doc,
                    *_condition_args(want),
                    *_ledger_args((ledgers or {}).get(doc)),
                    *per_doc.get(doc, []),
                ]
                calls.append((keys, args))
            results = await self._run_appends(calls)
        except RedisError as exc:
            raise self._error("appending", exc) from exc
        if self.wait_replicas:
            *results, reached = results
            if isinstance(reached, Exception) or int(reached) < self.wait_replicas:
                # Appended on the primary, not known on enough replicas: not acknowledged
                # (the writers resend; a repeat is harmless).
                raise StoreError(
                    f"store {self._where}: an append reached {reached} of the "
                    f"{self.wait_replicas} replica(s) it waits for within {self.wait_timeout_s:g} s"
                )
        failed = {
            doc: f"{type(r).__name__}: {r}"
            for doc, r in zip(docs, results, strict=True)
            if isinstance(r, Exception)
        }
        done = {doc: int(r[1]) for doc, r in zip(docs, results, strict=True) if _ok(r)}
        for doc in done:
            ledger = (ledgers or {}).get(doc)
            if ledger is not None:
                ledger.clean()
                ledger.known = True
        # Each row's position: counted back from where its document's script ended.
        next_of = {doc: last - len(per_doc.get(doc, [])) // 2 for doc, last in done.items()}
        positions: list[int] = []
        for doc, _ in rows:
            if doc in next_of:
                next_of[doc] += 1
                positions.append(next_of[doc])
            else:
                positions.append(0)
        refused = {
            doc: int(r[1])
            for doc, r in zip(docs, results, strict=True)
            if doc not in done and doc not in failed
        }
        if failed:
            # Each document's script is atomic: a document whose script failed (a damaged
            # or wrong-type key) wrote nothing, and fails alone (yhub#61).
            doc, why = next(iter(failed.items()))
            raise DocumentsFailed(
                f"store {self._where}: {len(failed)} document(s) failed to append ({doc!r}: {why})",
                failed,
                refused,
                positions,
            )
        if refused:
            raise PositionConflict(
                f"store {self._where}: {len(refused)} document(s) moved on: "
                + ", ".join(sorted(refused)[:3]),
                refused,
                positions,
            )
        return positions

    async def _run_appends(self, calls: list[tuple[list[str], list[Any]]]) -> list[Any]:
        """Run the append script once per document in one pipeline (plus ``WAIT``); the
        replies, errors included. By its hash: redis-py's own script calls ask Redis
        whether the script is loaded before every pipeline (a round trip per append).
        Scripts Redis lost (a restart) are loaded, and only those calls run again: a
        call refused with NOSCRIPT did nothing."""
        sha = self._append.sha
        results: list[Any] = [None] * len(calls)
        todo = list(range(len(calls)))
        reached: Any = None
        for attempt in range(2):
            async with self.redis.pipeline(transaction=False) as pipe:
                for i in todo:
                    keys, args = calls[i]
                    pipe.evalsha(sha, len(keys), *keys, *args)
                if self.wait_replicas:
                    pipe.wait(self.wait_replicas, int(self.wait_timeout_s * 1000))
                replies = await pipe.execute(raise_on_error=False)
            if self.wait_replicas:
                *replies, got = replies
                # (the least of both rounds: each WAIT counts its own pipeline's writes)
                if reached is None or isinstance(got, Exception):
                    reached = got
                elif not isinstance(reached, Exception):
                    reached = min(int(reached), int(got))
            missing = []
            for i, reply in zip(todo, replies, strict=True):
                results[i] = reply
                if isinstance(reply, NoScriptError):
                    missing.append(i)
            if not missing or attempt:
                break
            await self.redis.script_load(_APPEND)
            todo = missing
        if self.wait_replicas:
            results.append(reached)
        return results

    # -- reading ---------------------------------------------------------------------------

    async def load(self, document: str) -> DocumentLog:
        """Snapshot and tail of ``document``; ``last_seq`` is its position."""
        k = self.keys(document)
        try:
            for _ in range(LOAD_ATTEMPTS):
                gen = await self.redis.hget(k.meta, "snap_gen")
                gen = _text(gen)
                async with self.redis.pipeline(transaction=True) as pipe:
                    if gen:
                        pipe.hgetall(k.snap(gen))
                    pipe.xrange(k.log)
                    pipe.hmget(k.meta, ["pos", "snap_pos", "snap_gen"])
                    got = await pipe.execute()
                chunks = got[0] if gen else {}
                entries, (pos, snap_pos, now_gen) = got[-2], got[-1]
                if _text(now_gen) != gen:
                    continue  # a compaction switched snapshots between the two reads
                if gen and not got[0]:
                    raise StoreError(f"store {self._where}: {document!r} lost its snapshot {gen}")
                return self._log_of(document, chunks, entries, pos, snap_pos)
        except RedisError as exc:
            raise self._error(f"reading {document!r}", exc) from exc
        raise StoreError(f"store {self._where}: {document!r} kept changing snapshots while read")

    def _log_of(
        self,
        document: str,
        chunks: Mapping[bytes, bytes],
        entries: list[tuple[bytes, Mapping[bytes, bytes]]],
        pos: bytes | None,
        snap_pos: bytes | None,
    ) -> DocumentLog:
        position = self._number(document, "pos", pos)
        covered = self._number(document, "snap_pos", snap_pos)
        snapshot = None
        if chunks:
            try:
                snapshot = b"".join(chunks[str(i).encode()] for i in range(len(chunks)))
            except KeyError as exc:
                raise StoreError(
                    f"store {self._where}: {document!r} has a damaged snapshot"
                ) from exc
        seqs: list[int] = []
        updates: list[bytes] = []
        for entry_id, fields in entries:
            n, update = _entry(fields)
            if n is None or update is None:
                log.warning("skipping a malformed entry %s of %r", entry_id, document)
                continue
            if covered < n <= position and (not seqs or n > seqs[-1]):
                seqs.append(n)
                updates.append(update)
        return DocumentLog(document, snapshot, updates, position, covered, seqs)

    async def load_ledger(self, document: str) -> tuple[Ledger, int]:
        """``document``'s ledger and the position it describes (one atomic read)."""
        k = self.keys(document)
        try:
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.hgetall(k.ledger)
                pipe.hget(k.meta, "pos")
                fields, pos = await pipe.execute()
        except RedisError as exc:
            raise self._error(f"reading the ledger of {document!r}", exc) from exc
        position = self._number(document, "pos", pos)
        if fields.get(b"k"):
            return _ledger_of(fields), position
        # Content stored without a ledger (written with integrity off): built once.
        stored = await self.load(document)
        try:
            ledger = Ledger.of_updates(stored.all_updates())
        except MalformedMessage as exc:
            raise StoreError(
                f"store {self._where}: document {document!r} has a damaged update: {exc}"
            ) from exc
        if stored.all_updates():
            with contextlib.suppress(PositionConflict):
                await self.append([], {document: ledger}, {document: stored.last_seq})
        return ledger, stored.last_seq

    async def position(self, document: str) -> int:
        """The position ``document`` reached (0: nothing stored)."""
        try:
            raw = await self.redis.hget(self.keys(document).meta, "pos")
        except RedisError as exc:
            raise self._error(f"reading {document!r}", exc) from exc
        return self._number(document, "pos", raw)

    def _number(self, document: str, field: str, raw: Any) -> int:
        """A counter of ``document``'s meta hash (0 when absent).

        Raises:
            StoreError: it is not a number (the key was damaged).
        """
        try:
            return int(raw or 0)
        except ValueError:
            raise StoreError(
                f"store {self._where}: {document!r} has a damaged {field}: {_text(raw)[:40]!r}"
            ) from None

    async def size(self, document: str) -> tuple[int, int]:
        """``(tail updates, bytes stored)`` of ``document``, from its counters."""
        try:
            n, tail, snap = await self.redis.hmget(
                self.keys(document).meta, ["tail_n", "tail_bytes", "snap_bytes"]
            )
        except RedisError as exc:
            raise self._error(f"reading {document!r}", exc) from exc
        tail_bytes = self._number(document, "tail_bytes", tail)
        return self._number(document, "tail_n", n), tail_bytes + self._number(
            document, "snap_bytes", snap
        )

    def follow(self) -> RedisFollower:
        """A follower of no document yet, on a connection of its own."""
        return RedisFollower(self)

    def presence(self) -> RedisPresence:
        """Presence between the relay processes of this store (pub/sub: never stored)."""
        return RedisPresence(self)

    # -- compaction ------------------------------------------------------------------------

    async def compact(self, document: str) -> CompactionResult:
        """Fold ``document``'s tail into a new snapshot under a lease (see the module).

        Only the holder of the document's lease writes; its fencing token names the new
        snapshot, which becomes current only if the lease still holds and nobody switched
        since this compaction read. Entries folded and older than ``min_age_s`` are then
        trimmed exactly. A compaction that cannot take the lease does nothing.
        """
        k = self.keys(document)
        try:
            token = str(await self.redis.incr(k.fence))
            if not await self.redis.set(k.lease, token, nx=True, px=int(self.lease_s * 1000)):
                return CompactionResult(document, 0, 0)
        except RedisError as exc:
            raise self._error(f"compacting {document!r}", exc) from exc
        written = None
        try:
            gen = _text(await self.redis.hget(k.meta, "snap_gen"))
            stored = await self.load(document)
            if not stored.updates:
                # Nothing to fold; entries folded earlier may have passed the minimum age.
                await self.trim(document)
                return CompactionResult(document, 0, len(stored.snapshot or b""))
            loop = asyncio.get_running_loop()
            try:
                snapshot = await loop.run_in_executor(
                    self._cpu, compact_updates, stored.all_updates()
                )
            except MalformedMessage as exc:
                raise StoreError(
                    f"store {self._where}: {document!r} has a damaged update in its log, "
                    f"left uncompacted: {exc}"
                ) from exc
            written = k.snap(token)
            for idx, start in enumerate(range(0, max(len(snapshot), 1), SNAPSHOT_CHUNK_BYTES)):
                # A chunk per command: one write of megabytes holds Redis up for everyone.
                await self.redis.hset(
                    written, str(idx), snapshot[start : start + SNAPSHOT_CHUNK_BYTES]
                )
                # Gone by itself if this process dies before the switch (which persists
                # it): it outlives the lease, so it is whole whenever a switch can happen.
                await self.redis.pexpire(written, int(self.lease_s * 1000) + 1000)
            folded_bytes = sum(len(u) for u in stored.updates)
            try:
                switched = await self._switch(
                    keys=[
                        k.meta,
                        k.lease,
                        k.snap(gen) if gen else written,
                        written,
                        k.log,
                        self._clock_key,
                    ],
                    args=[
                        token,
                        gen,
                        stored.last_seq,
                        len(snapshot),
                        len(stored.updates),
                        folded_bytes,
                    ],
                )
            except BaseException:
                # Sent, reply lost (or cancelled meanwhile): it may be the current snapshot
                # now. Never delete it here; unswitched, it expires by itself.
                written = None
                raise
            if switched != 1:
                return CompactionResult(document, 0, len(stored.snapshot or b""))
            written = None
            await self.trim(document)
            return CompactionResult(document, len(stored.updates), len(snapshot))
        except RedisError as exc:
            raise self._error(f"compacting {document!r}", exc) from exc
        finally:
            with contextlib.suppress(RedisError):
                if written is not None:
                    await self.redis.delete(written)
                await self._release(keys=[k.lease], args=[token])

    async def trim(self, document: str) -> int:
        """Trim entries the snapshot covers that are older than ``min_age_s``; delete the
        stream if nothing is left. Returns how many entries went."""
        k = self.keys(document)
        try:
            return int(await self._trim(keys=[k.log, k.meta], args=[int(self.min_age_s * 1000)]))
        except RedisError as exc:
            raise self._error(f"trimming {document!r}", exc) from exc

    # -- changes ---------------------------------------------------------------------------

    async def changes(self, cursor: int, limit: int) -> list[Change]:
        """Documents changed after ``cursor`` (a change counter), oldest change first."""
        try:
            rows = await self.redis.zrangebyscore(
                self._changes_key, f"({cursor}", "+inf", start=0, num=limit, withscores=True
            )
        except RedisError as exc:
            raise self._error("listing changes", exc) from exc
        return [Change(_text(doc), int(score)) for doc, score in cast(list[Any], rows)]

    async def feed(self, cursor: int, limit: int) -> tuple[list[Change], int]:
        """Every append after change ``cursor``, in order, from the feed stream (entry
        ``<change>-1``, field ``d``: the document); changes are consecutive, so a
        missing one means the feed was trimmed past ``cursor`` (:class:`FeedGap`)."""
        try:
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.xrange(self._feed_key, f"({cursor}-1", "+", count=limit)
                pipe.get(self._clock_key)
                entries, clock = await pipe.execute()
        except RedisError as exc:
            raise self._error("reading the feed", exc) from exc
        latest = int(clock or 0)
        listed: list[Change] = []
        expected = cursor + 1
        for entry_id, fields in entries:
            change = int(_text(entry_id).split("-", 1)[0])
            if change != expected:
                raise FeedGap(f"store {self._where}: the feed lacks change {expected}")
            listed.append(Change(_text(fields.get(b"d")), change))
            expected += 1
        if len(listed) < limit and expected <= latest:
            raise FeedGap(f"store {self._where}: the feed lacks change {expected}")
        end = listed[-1].cursor if len(listed) == limit else max(cursor, latest)
        return listed, end

    async def since(self, document: str, cursor: int, until: int | None = None) -> Since:
        """``document``'s entries appended after change ``cursor``, with their origins;
        incomplete if a compaction folded an entry of a later change (``snap_c``)."""
        k = self.keys(document)
        try:
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.hmget(k.meta, ["pos", "snap_pos", "snap_c"])
                pipe.xrange(k.log)
                (pos, snap_pos, snap_c), entries = await pipe.execute()
        except RedisError as exc:
            raise self._error(f"reading {document!r}", exc) from exc
        position = self._number(document, "pos", pos)
        covered = self._number(document, "snap_pos", snap_pos)
        folded = self._number(document, "snap_c", snap_c)
        complete = folded <= cursor
        updates: list[tuple[int, bytes, str | None]] = []
        last_n = covered
        for _, fields in entries:
            n, update = _entry(fields)
            if n is None or update is None or not last_n < n <= position:
                continue
            last_n = n
            raw_c = fields.get(b"c")
            try:
                change = int(raw_c) if raw_c is not None else None
            except ValueError:
                change = None
            if change is None:
                complete = False  # (an entry from before entries carried their change)
                continue
            if change > cursor and (until is None or change <= until):
                origin = fields.get(b"o")
                updates.append((change, update, origin.decode() if origin else None))
        return Since(document, updates, complete)

    def _link_key(self, direction: str, region: str) -> str:
        return f"{self.prefix}:{{*}}:link:{direction}:{region}"

    async def link_checkpoint(self, direction: str, region: str) -> LinkCheckpoint | None:
        """A link's checkpoint as this Redis recorded it."""
        try:
            store, epoch, cursor = await self.redis.hmget(
                self._link_key(direction, region), ["store", "epoch", "cursor"]
            )
        except RedisError as exc:
            raise self._error("reading a link checkpoint", exc) from exc
        if store is None or epoch is None or cursor is None:
            return None
        try:
            return LinkCheckpoint(
                direction,  # type: ignore[arg-type]
                region,
                _text(store),
                int(epoch),
                int(cursor),
            )
        except ValueError:
            log.warning("ignoring a damaged checkpoint of the link %s %s", direction, region)
            return None

    async def set_link_checkpoint(self, checkpoint: LinkCheckpoint) -> None:
        """Record a link's checkpoint (one command)."""
        try:
            await self.redis.hset(
                self._link_key(checkpoint.direction, checkpoint.region),
                mapping={
                    "store": checkpoint.store,
                    "epoch": checkpoint.epoch,
                    "cursor": checkpoint.cursor,
                },
            )
        except RedisError as exc:
            raise self._error("recording a link checkpoint", exc) from exc

    async def lease(self, name: str, holder: str, ttl_s: float) -> bool:
        """Take or renew a lease (``SET NX``, renewed by its holder alone)."""
        key = f"{self.prefix}:{{*}}:lease:{name}"
        try:
            got = await self._renew(keys=[key], args=[holder, max(1, int(ttl_s * 1000))])
        except RedisError as exc:
            raise self._error(f"taking the lease {name!r}", exc) from exc
        return bool(got)

    async def last_change(self) -> int:
        """The cursor of the latest change (0: none yet)."""
        try:
            rows = await self.redis.zrevrange(self._changes_key, 0, 0, withscores=True)
        except RedisError as exc:
            raise self._error("reading the latest change", exc) from exc
        return int(rows[0][1]) if rows else 0

    async def close(self) -> None:
        """Close the connections."""
        await self.redis.aclose()


class RedisFollower:
    """:class:`~crdtsync.backend.Follower` on Redis: ``XREAD`` over the followed streams,
    on a connection of its own (a blocking read holds it).

    Each entry's ``n`` must be the next position of its document: a smaller one was seen
    already (skipped), a larger one means entries were trimmed or lost before they were
    read (a :class:`Gap`). A malformed entry is skipped, logged and counted; it never
    stops other documents (yhub#61). An emptied Redis (its identity changed) is a gap in
    every document followed.
    """

    def __init__(self, store: RedisStore) -> None:
        self._store = store
        self._redis: aioredis.Redis = store.connect()
        self._positions: dict[str, int] = {}
        self._ids: dict[str, bytes] = {}  # the last stream id read, per document
        self._added = asyncio.Event()
        self._identity: StoreIdentity | None = None
        self._checked = 0.0  # when _check_store last looked
        self.malformed = 0  # entries skipped
        # Per document, an entry past the next position (entry id, its n): see _take.
        self._ahead: dict[str, tuple[Any, int]] = {}
        self._caught_up: set[str] = set()  # documents whose retained entries were read
        self._broken: dict[str, int] = {}  # set aside (damaged keys) -> position then

    def add(self, document: str, position: int) -> None:
        """Follow ``document`` from after ``position`` (its retained entries are read once
        and those up to ``position`` skipped)."""
        self._positions[document] = position
        self._ids[document] = b"0-0"
        self._ahead.pop(document, None)
        self._caught_up.discard(document)
        self._broken.pop(document, None)
        self._added.set()

    def remove(self, document: str) -> None:
        """Stop following ``document``."""
        self._positions.pop(document, None)
        self._ids.pop(document, None)
        self._ahead.pop(document, None)
        self._caught_up.discard(document)
        self._broken.pop(document, None)

    async def read(self, timeout_s: float) -> list[Entry | Gap]:
        """The next entries (see :meth:`crdtsync.backend.Follower.read`)."""
        deadline = time.monotonic() + timeout_s
        while True:
            found = await self._check_store()
            if found:
                return found
            left = deadline - time.monotonic()
            if not self._positions:
                if left <= 0:
                    return []
                self._added.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._added.wait(), left)
                continue
            block = max(1, int(min(max(left, 0), FOLLOW_BLOCK_S) * 1000))
            streams: dict[Any, Any] = {
                self._store.keys(d).log: self._ids[d] for d in self._positions
            }
            try:
                got = await self._redis.xread(streams, count=FOLLOW_COUNT, block=block)
            except ResponseError as exc:
                # One document's log of the wrong type fails the whole XREAD: set that
                # document aside and go on with the others (yhub#61).
                if not await self._set_aside_broken():
                    raise self._store._error("following", exc) from exc
                continue
            except RedisError as exc:
                raise self._store._error("following", exc) from exc
            found = self._take(cast(list[Any], got or []))
            if self._ahead:
                found += await self._judge_ahead()
            if found or left <= 0:
                return found

    async def _check_store(self) -> list[Entry | Gap]:
        """Once a second: has the store been emptied or replaced (its identity changed:
        every document has a gap), and does any followed document stand past entries
        no longer there (trimmed before they were read: a gap)? XREAD alone sees a gap
        only when a later entry comes."""
        now = time.monotonic()
        if now - self._checked < IDENTITY_CHECK_S:
            return []
        self._checked = now
        identity = await self._store.identity()
        if self._identity is not None and identity != self._identity:
            log.warning(
                "the Redis store was emptied, replaced or restored: reloading every document"
            )
            self._identity = identity
            gaps: list[Entry | Gap] = [Gap(d, p) for d, p in self._positions.items()]
            self._positions.clear()
            self._ids.clear()
            return gaps
        self._identity = identity
        found: list[Entry | Gap] = await self._check_broken()
        docs = list(self._positions)
        if not docs:
            return found
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                for doc in docs:
                    k = self._store.keys(doc)
                    # Position first, then what follows the last entry read: whatever
                    # the position counts was appended before, so it is there unless
                    # it was trimmed.
                    pipe.hget(k.meta, "pos")
                    pipe.xrange(k.log, min=b"(" + self._ids[doc], max="+", count=1)
                replies = await pipe.execute(raise_on_error=False)
        except RedisError as exc:
            raise self._store._error("following", exc) from exc
        for i, doc in enumerate(docs):
            raw, after = replies[2 * i], replies[2 * i + 1]
            try:
                if isinstance(raw, Exception) or isinstance(after, Exception):
                    raise ValueError(raw if isinstance(raw, Exception) else after)
                pos = int(raw or 0)
            except ValueError as exc:
                self._set_aside(doc, f"{exc}")
                continue
            position = self._positions.get(doc)
            if position is None or pos == position:
                continue
            if pos < position:  # the store went back (restored, or lost writes)
                found.append(Gap(doc, position))
                self.remove(doc)
                continue
            n = _entry(after[0][1])[0] if after else None
            if n is None and after:
                continue  # a malformed entry next: the next read skips it and looks on
            if n is not None and n > pos:
                continue  # not the store's (past its position): the next read skips it
            if n is None or n > position + 1:
                found.append(Gap(doc, position))
                self.remove(doc)
        return found

    def _take(self, got: list[Any]) -> list[Entry | Gap]:
        found: list[Entry | Gap] = []
        prefix = f"{self._store.prefix}:{{"
        for key, entries in got:
            name = key.decode()
            document = name[len(prefix) : -len("}:log")]
            for entry_id, fields in entries:
                position = self._positions.get(document)
                if position is None:
                    break  # a gap earlier in this batch
                n, update = _entry(fields)
                if n is None or update is None:
                    self._ids[document] = entry_id
                    self._skip(document, entry_id)
                    continue
                if n <= position:
                    if document in self._caught_up:
                        # A new entry at a position already seen: the store lost writes
                        # (a failover) and others appended again since.
                        found.append(Gap(document, position))
                        self.remove(document)
                        break
                    self._ids[document] = entry_id  # (read again after add: seen)
                    continue
                if n > position + 1:
                    # Entries are missing, or this one is not the store's (past the
                    # document's position: written by hand). Which, is read next; the
                    # document's entries after it wait until then.
                    self._ahead[document] = (entry_id, n)
                    break
                self._ids[document] = entry_id
                self._positions[document] = n
                found.append(Entry(document, n, update))
            if document in self._positions and len(entries) < FOLLOW_COUNT:
                self._caught_up.add(document)  # read to the stream's end once
        return found

    def _set_aside(self, document: str, why: str) -> None:
        """Stop following a document whose keys are damaged (looked at again each second:
        once they are whole again, it comes back as a gap)."""
        position = self._positions.get(document)
        if position is None:
            return
        log.warning("not following %r: its keys are damaged (%s)", document, why)
        self.remove(document)
        self._broken[document] = position

    async def _set_aside_broken(self) -> bool:
        """Find the followed documents whose log is not a stream; set them aside.
        Returns whether any was."""
        docs = list(self._positions)
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                for doc in docs:
                    pipe.type(self._store.keys(doc).log)
                kinds = await pipe.execute()
        except RedisError as exc:
            raise self._store._error("following", exc) from exc
        broken = [d for d, k in zip(docs, kinds, strict=True) if _text(k) not in _STREAMISH]
        for doc in broken:
            self._set_aside(doc, "its log is not a stream")
        return bool(broken)

    async def _check_broken(self) -> list[Entry | Gap]:
        """Documents set aside whose keys are whole again: a gap each (read them again)."""
        if not self._broken:
            return []
        docs = list(self._broken)
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                for doc in docs:
                    pipe.type(self._store.keys(doc).log)
                    pipe.hget(self._store.keys(doc).meta, "pos")
                replies = await pipe.execute(raise_on_error=False)
        except RedisError as exc:
            raise self._store._error("following", exc) from exc
        found: list[Entry | Gap] = []
        for i, doc in enumerate(docs):
            kind, raw = replies[2 * i], replies[2 * i + 1]
            if isinstance(kind, Exception) or _text(kind) not in _STREAMISH:
                continue
            if isinstance(raw, Exception) or not _text(raw or b"0").isdigit():
                continue
            found.append(Gap(doc, self._broken.pop(doc)))
        return found

    def _skip(self, document: str, entry_id: Any) -> None:
        self.malformed += 1
        log.warning("skipping a malformed entry %s of %r", entry_id, document)

    async def _judge_ahead(self) -> list[Entry | Gap]:
        """Entries past the position their follower expected: a gap where the document's
        position covers them (entries were trimmed or lost), else a malformed entry,
        skipped (an entry past the position no append wrote: yhub#61)."""
        ahead, self._ahead = self._ahead, {}
        docs = [d for d in ahead if d in self._positions]
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                for doc in docs:
                    pipe.hget(self._store.keys(doc).meta, "pos")
                replies = await pipe.execute()
        except RedisError as exc:
            raise self._store._error("following", exc) from exc
        found: list[Entry | Gap] = []
        for doc, raw in zip(docs, replies, strict=True):
            entry_id, n = ahead[doc]
            position = self._positions.get(doc)
            if position is None:
                continue  # removed meanwhile
            try:
                stored = int(raw or 0)
            except ValueError:
                stored = position  # (a damaged position: load says so)
            if n > stored:
                self._ids[doc] = entry_id
                self._skip(doc, entry_id)
            else:
                found.append(Gap(doc, position))
                self.remove(doc)
        return found

    async def close(self) -> None:
        """Stop following; close the connection."""
        self._positions.clear()
        self._ids.clear()
        self._added.set()
        await self._redis.aclose()


class RedisPresence:
    """Presence (awareness) between relay processes: one pub/sub channel per document,
    ``<prefix>:{name}:presence`` (the document's hash tag: a sharded channel on a
    cluster). Never stored: a process that was not subscribed misses what was said, as
    a client that was not connected does, and clients renew their state every 15 s.

    Each message is this process's origin (8 bytes) and an awareness payload; a process
    skips its own. An empty payload asks the others for their states of the document
    (a process that starts hearing a document says so: it need not wait for renewals).
    """

    def __init__(self, store: RedisStore) -> None:
        self._store = store
        self._redis: aioredis.Redis = store.connect()
        self._pubsub: Any = None
        self.origin = secrets.token_bytes(8)
        self._channels: dict[str, bytes] = {}  # document -> channel
        self._subscribed: set[bytes] = set()
        self._prefix = f"{store.prefix}:{{".encode()
        self._changed = asyncio.Event()

    def channel(self, document: str) -> bytes:
        return f"{self._store.prefix}:{{{document}}}:presence".encode()

    def add(self, document: str) -> None:
        """Hear ``document``'s presence from the other processes."""
        self._channels[document] = self.channel(document)
        self._changed.set()

    def remove(self, document: str) -> None:
        self._channels.pop(document, None)
        self._changed.set()

    async def publish(self, messages: Sequence[tuple[str, bytes]]) -> None:
        """Say each ``(document, awareness payload)`` to the other processes.

        Raises:
            StoreError: Redis failed (what was said is lost: presence is renewed).
        """
        if not messages:
            return
        try:
            async with self._store.redis.pipeline(transaction=False) as pipe:
                for document, payload in messages:
                    pipe.publish(self.channel(document), self.origin + payload)
                await pipe.execute()
        except RedisError as exc:
            raise self._store._error("publishing presence", exc) from exc

    async def read(self, timeout_s: float) -> list[tuple[str, bytes]]:
        """What other processes said of the documents added, ``(document, payload)``;
        empty after ``timeout_s`` with nothing. A document added is heard from within
        ``PRESENCE_POLL_S``.

        Raises:
            StoreError: Redis failed (the subscriptions are made again at the next read).
        """
        deadline = time.monotonic() + timeout_s
        found: list[tuple[str, bytes]] = []
        try:
            while len(found) < 1024:
                self._changed.clear()
                await self._sync_subscriptions()
                left = deadline - time.monotonic()
                if not self._subscribed:
                    if found or left <= 0:
                        return found
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._changed.wait(), left)
                    continue
                wait = 0.0 if found else max(0.0, min(left, PRESENCE_POLL_S))
                message = await self._pubsub.get_message(
                    ignore_subscribe_messages=True, timeout=wait
                )
                if message is None:
                    if found or time.monotonic() >= deadline:
                        return found
                    continue
                heard = self._heard(message)
                if heard is not None:
                    found.append(heard)
            return found
        except (RedisError, OSError) as exc:
            await self._reset()
            raise self._store._error("reading presence", exc) from exc

    def _heard(self, message: Mapping[str, Any]) -> tuple[str, bytes] | None:
        data = message.get("data")
        channel = message.get("channel")
        if not isinstance(data, bytes) or not isinstance(channel, bytes):
            return None
        if len(data) < 8 or data[:8] == self.origin:
            return None
        if not (channel.startswith(self._prefix) and channel.endswith(b"}:presence")):
            return None
        return channel[len(self._prefix) : -len(b"}:presence")].decode(), data[8:]

    async def _sync_subscriptions(self) -> None:
        wanted = set(self._channels.values())
        if self._pubsub is None:
            if not wanted:
                return
            self._pubsub = self._redis.pubsub()
            self._subscribed = set()
        add = wanted - self._subscribed
        drop = self._subscribed - wanted
        if add:
            await self._pubsub.subscribe(*add)
            self._subscribed |= add
            # Now that this process hears them: ask the others who is there (an empty
            # payload), instead of waiting for the clients' renewals (15 s).
            async with self._store.redis.pipeline(transaction=False) as pipe:
                for channel in add:
                    pipe.publish(channel, self.origin)
                await pipe.execute()
        if drop:
            await self._pubsub.unsubscribe(*drop)
            self._subscribed -= drop

    async def _reset(self) -> None:
        pubsub, self._pubsub = self._pubsub, None
        self._subscribed = set()
        if pubsub is not None:
            with contextlib.suppress(Exception):
                await pubsub.aclose()

    async def close(self) -> None:
        await self._reset()
        with contextlib.suppress(Exception):
            await self._redis.aclose()


_STREAMISH = ("stream", "none")  # what a document's log key may be


def _text(value: Any) -> str:
    """A Redis reply as text ("" for none): replies are bytes (no decode_responses)."""
    if value is None:
        return ""
    return value.decode() if isinstance(value, bytes) else str(value)


def _ok(result: Any) -> bool:
    """Whether an append script's result says it appended (not an error, not refused)."""
    return not isinstance(result, Exception) and bool(result[0])


def _entry(fields: Mapping[bytes, bytes]) -> tuple[int | None, bytes | None]:
    """``(n, update)`` of a stream entry; None where a field is missing or not a number."""
    raw_n, update = fields.get(b"n"), fields.get(b"u")
    try:
        n = int(raw_n) if raw_n is not None else None
    except ValueError:
        n = None
    return (n if n is not None and n > 0 else None), update


def _position_arg(expected: int | ClientsAsRead | None) -> int | str:
    """The position an append script checks ("" for none)."""
    if isinstance(expected, ClientsAsRead):
        return "" if expected.position is None else expected.position
    return "" if expected is None else expected


def _condition_args(expected: int | ClientsAsRead | None) -> list[Any]:
    """A :class:`ClientsAsRead` condition as the append script's arguments:
    ``n, client, ranges, owner, ...`` (each ``-`` for absent, ``=<value>`` for present)."""
    if not isinstance(expected, ClientsAsRead):
        return [0]
    args: list[Any] = [len(expected.clients)]
    for client, (ranges, owner) in expected.clients.items():
        args += [
            client,
            b"-" if ranges is None else b"=" + ranges,
            "-" if owner is None else "=" + owner,
        ]
    return args


def _ledger_args(ledger: Ledger | None) -> list[Any]:
    """What changed in ``ledger`` as the append script's arguments:
    ``nset, ndel, field, value, ..., field, ...``."""
    if ledger is None:
        return [0, 0]
    sets: list[Any] = []
    dels: list[str] = []
    if not ledger.known:
        sets += ["k", 1]
    for client in ledger.dirty:
        sets += [f"r{client}", encode_ranges(ledger.ranges.get(client, []))]
        owner = ledger.owners.get(client)
        if owner is None:
            dels.append(f"o{client}")
        else:
            sets += [f"o{client}", owner]
    for client, clock, claimed in ledger.new_types:
        sets += [f"t{client}:{clock}", int(claimed)]
    return [len(sets) // 2, len(dels), *sets, *dels]


def _ledger_of(fields: Mapping[bytes, bytes]) -> Ledger:
    ledger = Ledger(known=True)
    for raw, value in fields.items():
        name = raw.decode()
        if name.startswith("r"):
            ledger.ranges[int(name[1:])] = decode_ranges(value)
        elif name.startswith("o"):
            ledger.owners[int(name[1:])] = value.decode()
    for raw, value in fields.items():
        name = raw.decode()
        if name.startswith("t"):
            client, clock = (int(x) for x in name[1:].split(":"))
            if value == b"1":
                ledger.claims.setdefault(client, set()).add(clock)
            else:
                ledger.types.add((client, clock))
    return ledger


if TYPE_CHECKING:

    def _conforms(store: RedisStore, follower: RedisFollower) -> tuple[RelayStore, Follower]:
        return store, follower  # mypy holds the backend to the interface here
