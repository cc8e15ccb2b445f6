"""The ``crdtsync`` command line: ``crdtsync relay`` runs a relay, ``crdtsync token`` mints.

The CLI is a composition root: it may import ``crdtsync.server`` and
``crdtsync.client``; nothing imports it.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import ValidationError

from .errors import StoreError

if TYPE_CHECKING:
    from .settings import RelaySettings

__all__ = ["main"]


def _relay_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "relay",
        help="run a relay (websocket endpoint on an embedded SQLite store, or on Redis)",
        description=(
            "Run a stateless y-websocket relay that persists every update to a SQLite "
            "file before fanning it out. Prints one JSON line "
            '{"event": "listening", "url": ...} on stdout once it is bound. '
            "Settings come from these flags, CRDTSYNC_* environment variables and --config."
        ),
    )
    p.add_argument("--host", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="port to bind; 0 picks a free one (default 8765)")
    p.add_argument(
        "--store",
        help="SQLite file (default ./crdtsync-relay.db), or a Redis URL shared by any number "
        "of relay processes: redis://[[user]:password@]host:port/db (rediss:// with TLS; "
        "the password may come from CRDTSYNC_REDIS_PASSWORD instead)",
    )
    p.add_argument(
        "--redis-wait-replicas",
        type=int,
        metavar="N",
        help="a Redis store: acknowledge an update only once N replicas received it (WAIT)",
    )
    p.add_argument(
        "--synchronous",
        choices=["NORMAL", "FULL", "EXTRA"],
        help="SQLite durability: NORMAL survives a killed process, FULL also power loss",
    )
    p.add_argument("--max-message-bytes", type=int, help="largest accepted message (20 MiB)")
    p.add_argument("--compact-after-updates", type=int, help="compact a document after N updates")
    p.add_argument("--max-connections", type=int, help="refuse connections beyond this many")
    p.add_argument(
        "--no-integrity",
        dest="integrity",
        action="store_const",
        const=False,
        help="switch off the integrity rule (for showing what it prevents; never in production)",
    )
    p.add_argument(
        "--token-secret",
        action="append",
        metavar="[kid=NAME,]SECRET",
        help="HS256 secret of at least 32 bytes that access tokens may be signed with "
        "(repeatable: rotation); any key makes tokens required. Visible to other local "
        "users in the process list: prefer CRDTSYNC_TOKEN_SECRETS or --config",
    )
    p.add_argument(
        "--token-public-key",
        action="append",
        metavar="[kid=NAME,]FILE",
        help="PEM public key or certificate (RSA, EC P-256/P-384, Ed25519) that access "
        "tokens may be signed with (repeatable)",
    )
    p.add_argument("--token-issuer", help="require this iss claim in access tokens")
    p.add_argument("--token-audience", help="require this aud claim in access tokens")
    p.add_argument("--tls-cert", help="PEM certificate chain: serve wss:// (with --tls-key)")
    p.add_argument("--tls-key", help="PEM private key of --tls-cert")
    p.add_argument("--region", help="this relay's region (regions replicate to each other)")
    p.add_argument(
        "--peer",
        action="append",
        metavar="REGION=URL",
        help="another region's relay, e.g. us=wss://us.example/ (repeatable; a full mesh: "
        "list every other region). Links need tokens: see --peer-token",
    )
    p.add_argument(
        "--peer-token",
        help="the token this relay presents to its peers (rights 'rwp' on '*'); without "
        "one it mints its own with its first --token-secret. Prefer CRDTSYNC_PEER_TOKEN",
    )
    p.add_argument("--config", help="TOML file with the same settings")
    p.add_argument(
        "--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="log level (INFO)"
    )
    p.add_argument(
        "--log-format",
        choices=["json", "text"],
        help="json: one object per line with each event's context (default); text: for a terminal",
    )


def _token_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "token",
        help="mint an access token (for development and tests)",
        description=(
            "Sign an access token granting rights on document patterns and print it on "
            "stdout. Pass it to a relay that has the matching key as ?token=... or as "
            "'Authorization: Bearer ...'. Rights are r (read), w (write), p (peer), or - "
            "(none); in a pattern, * matches within one path segment, ** across segments."
        ),
    )
    key = p.add_mutually_exclusive_group(required=True)
    key.add_argument(
        "--secret",
        metavar="[kid=NAME,]SECRET",
        help="HS256 secret (at least 32 bytes), written as for crdtsync relay --token-secret",
    )
    key.add_argument(
        "--private-key",
        metavar="[kid=NAME,]FILE",
        help="PEM private key (RSA, EC P-256/P-384, Ed25519): RS256, ES256, ES384 or EdDSA",
    )
    p.add_argument("--kid", help="key id for the token header (or kid=NAME, in the key)")
    p.add_argument("--sub", help="subject: who the token is for")
    p.add_argument(
        "--doc",
        action="append",
        required=True,
        metavar="PATTERN=RIGHTS",
        help="grant RIGHTS on documents matching PATTERN, e.g. 'team/*=rw' (repeatable)",
    )
    life = p.add_mutually_exclusive_group()
    life.add_argument(
        "--ttl",
        type=_positive_float,
        default=3600.0,
        metavar="SECONDS",
        help="seconds until the token expires (3600)",
    )
    life.add_argument(
        "--no-exp",
        action="store_true",
        help="no expiry (refused by relays unless token_allow_no_exp is set)",
    )
    p.add_argument("--iss", help="issuer claim")
    p.add_argument("--aud", help="audience claim")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def _rate(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {text}")
    return value


# crdtsync.testing.campaign.FAULT_KINDS, written out: importing the campaign to build the
# parser cost every `crdtsync relay` start 15 ms (tests/e2e/test_check_cli.py compares them).
FAULT_KINDS_HELP = "partition,drop,duplicate,reorder,delay,kill-relay,kill-replica,lose-replica"


def _check_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "check",
        help="run the merge-convergence test suite (faults, then a convergence check)",
        description=(
            "Drive several replicas through relays with random concurrent edits while "
            "injecting faults (partitions, dropped connections, duplicated, reordered and "
            "delayed messages, killed relays and replicas, lost replica files), then heal "
            "and check that every replica and every relay's store hold the same state and "
            "that no acknowledged or committed edit was lost. Without --relay it starts "
            "its own relays on loopback. With --hostile, stock y-websocket clients join "
            "and attack the room (rewrite and impersonate other writers' content, replay, "
            "leave clock gaps); the honest replicas must stay usable and lose nothing. "
            "Exit status 0 only when nothing was violated."
        ),
    )
    p.add_argument("--replicas", type=_positive_int, default=3, help="replica processes (3)")
    p.add_argument(
        "--hostile",
        type=_count,
        default=0,
        metavar="N",
        help="hostile participants on top of --replicas: stock clients that attack (0)",
    )
    p.add_argument(
        "--relay",
        action="append",
        default=[],
        metavar="URL",
        help="a relay you run (repeatable); without it, relays are started locally",
    )
    p.add_argument(
        "--backend",
        choices=["sqlite", "redis"],
        default="sqlite",
        help="local relays' store: a file each (sqlite), or one redis-server of the "
        "suite's own that every relay shares (redis: adds the kill-redis fault)",
    )
    p.add_argument(
        "--relays",
        type=_positive_int,
        default=1,
        metavar="N",
        help="local relay processes; replicas are spread over them (1)",
    )
    p.add_argument(
        "--documents",
        type=_positive_int,
        default=1,
        metavar="N",
        help="spread the edits over N documents (check/0000...): every replica keeps the "
        "folder check/ and has only a few open at a time; every replica's file must end "
        "up holding every document as the relays do (1: one document, open throughout)",
    )
    p.add_argument(
        "--regions",
        type=_count,
        default=0,
        metavar="N",
        help="N regions (2 or more), each a relay on a store of its own, peered through a "
        "fault proxy per link; replicas spread over them; adds the faults "
        "partition-regions, link-faults, kill-link, empty-region. What a link loses stays "
        "lost (no anti-entropy): the links alone must deliver every edit everywhere",
    )
    p.add_argument(
        "--anti-entropy",
        action="store_true",
        help="(--regions) let the relays' anti-entropy run (every 2 s): it repairs what "
        "links lost; its repairs are counted, not judged",
    )
    p.add_argument(
        "--link-defect",
        choices=["drop", "early-checkpoint"],
        default="",
        help="(--regions) links broken on purpose, to see the check fail: drop 1 in 50 "
        "updates, or record checkpoints before the target stored what they cover",
    )
    p.add_argument("--seed", type=int, default=0, help="first seed (0)")
    p.add_argument("--seeds", type=_positive_int, default=1, help="how many seeds to run (1)")
    p.add_argument("--steps", type=_positive_int, default=40, help="steps per schedule (40)")
    p.add_argument(
        "--duration",
        type=_positive_float,
        default=120.0,
        metavar="SECONDS",
        help="cap on one seed's run; the schedule, not the clock, decides what happens (120)",
    )
    p.add_argument(
        "--workload",
        default="crdtsync.testing.workload:default_workload",
        metavar="MODULE:FUNCTION",
        help="(doc, rng) -> edit id; makes one random edit (default: mixed Text/Map/Array)",
    )
    p.add_argument(
        "--faults",
        default=None,
        help=f"comma-separated fault kinds (default all: {FAULT_KINDS_HELP})",
    )
    p.add_argument(
        "--fault-rate", type=_rate, default=0.35, help="share of steps that are faults (0.35)"
    )
    p.add_argument("--out", metavar="DIR", help="keep every run's history.jsonl and report here")
    p.add_argument(
        "--shrink-runs",
        type=int,
        default=30,
        help="reruns allowed to shrink a failing schedule (30; 0 to skip)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="crdtsync", description="Offline-first CRDT sync: relay and tools."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    _relay_parser(sub)
    _check_parser(sub)
    _token_parser(sub)
    p = sub.add_parser(
        "new-epoch",
        help="mark a store as restored from a backup (run before a relay serves it)",
        description=(
            "Raise the store's epoch. Run it after restoring a relay's store (its SQLite "
            "file, or its Redis) from a backup: replicas' folder cursors of the store as it "
            "was then no longer match, so each compares what it holds by digests and sends "
            "again what the backup lacks (README: many documents)."
        ),
    )
    p.add_argument("store", help="the SQLite file, or the redis:// URL")
    _store_parser(sub)
    return parser


def _store_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "store",
        help="inspect, compact, export and import a relay's documents",
        description=(
            "Tools on a relay's store (a SQLite file or a redis:// URL). Reading and "
            "compacting are safe beside running relays; importing into a SQLite file "
            "waits for its relay to stop (README: store tools)."
        ),
    )
    actions = p.add_subparsers(dest="action", required=True)
    a = actions.add_parser("ls", help="documents: position, tail updates, bytes stored")
    a.add_argument("store")
    a.add_argument("--prefix", default="", help="only names starting with this")
    a.add_argument("--json", action="store_true", help="one JSON object per line")
    a = actions.add_parser("show", help="a document's content as JSON")
    a.add_argument("store")
    a.add_argument("document")
    a.add_argument("--root", help="print this root alone (a text as it is, to the byte)")
    a.add_argument(
        "--type",
        action="append",
        default=[],
        metavar="NAME=KIND",
        help="a root's kind: text, map, array or xml (otherwise told by its content)",
    )
    a = actions.add_parser("compact", help="fold documents' tails into their snapshots")
    a.add_argument("store")
    a.add_argument("document", nargs="?", help="one document (default: all)")
    a.add_argument("--prefix", default="", help="with no document: only these")
    a = actions.add_parser("export", help="a document as one Yjs update, to a file")
    a.add_argument("store")
    a.add_argument("document")
    a.add_argument("file")
    a = actions.add_parser("import", help="a Yjs update from a file into a document")
    a.add_argument("store")
    a.add_argument("file")
    a.add_argument("document")
    a = actions.add_parser("check", help="read every document; report any that fails")
    a.add_argument("store")
    a.add_argument("--prefix", default="", help="only names starting with this")


def _run_store(args: argparse.Namespace) -> int:
    from .server.tools import StoreToolError, run_store_command

    try:
        return asyncio.run(run_store_command(args))
    except (StoreToolError, StoreError) as exc:
        print(f"crdtsync store {args.action}: {exc}", file=sys.stderr)
        return 1


def _run_new_epoch(args: argparse.Namespace) -> int:
    from .backend import is_redis_address
    from .errors import StoreError

    try:
        if is_redis_address(args.store):
            from .server.redis_store import RedisStore

            async def raise_epoch() -> tuple[str, int]:
                store = RedisStore(args.store)
                try:
                    identity = await store.new_epoch()
                finally:
                    await store.close()
                return identity.id, identity.epoch

            store_id, epoch = asyncio.run(raise_epoch())
        else:
            from pathlib import Path

            from .store import UpdateLog

            if not Path(args.store).exists():
                print(f"crdtsync new-epoch: no store at {args.store}", file=sys.stderr)
                return 2
            with UpdateLog(args.store) as log:
                store_id, epoch = log.new_epoch()
    except StoreError as exc:
        print(f"crdtsync new-epoch: {exc}", file=sys.stderr)
        return 1
    print(json.dumps({"store": store_id, "epoch": epoch}))
    return 0


def _relay_settings(args: argparse.Namespace) -> RelaySettings | None:
    """The relay's settings from flags, environment and file; None after an error line."""
    from .settings import RelaySettings

    peers: dict[str, str] | None = None
    if args.peer:
        peers = {}
        for entry in args.peer:
            name, sep, url = entry.partition("=")
            if not sep or not name or not url:
                print(f"crdtsync relay: --peer {entry!r}: write REGION=URL", file=sys.stderr)
                return None
            peers[name] = url
    values = {
        k: v
        for k, v in {
            "host": args.host,
            "port": args.port,
            "store": args.store,
            "synchronous": args.synchronous,
            "redis_wait_replicas": args.redis_wait_replicas,
            "max_message_bytes": args.max_message_bytes,
            "compact_after_updates": args.compact_after_updates,
            "max_connections": args.max_connections,
            "log_level": args.log_level,
            "log_format": args.log_format,
            "integrity": args.integrity,
            "token_secrets": args.token_secret,
            "token_public_keys": args.token_public_key,
            "token_issuer": args.token_issuer,
            "token_audience": args.token_audience,
            "tls_cert": args.tls_cert,
            "tls_key": args.tls_key,
            "region": args.region,
            "peers": peers,
            "peer_token": args.peer_token,
        }.items()
        if v is not None
    }
    try:
        settings = RelaySettings.load(args.config, **values)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        message = first["msg"].removeprefix("Value error, ")
        what = f"invalid setting {where}" if where else "invalid settings"
        print(f"crdtsync relay: {what}: {message}", file=sys.stderr)
        return None
    except (OSError, ValueError) as exc:
        print(f"crdtsync relay: cannot read settings: {exc}", file=sys.stderr)
        return None
    try:
        settings.token_verifier()  # reads the key files: a bad one stops the start here
    except ValueError as exc:
        print(f"crdtsync relay: invalid token key: {exc}", file=sys.stderr)
        return None
    from crdtsync.server.relay import tls_context

    try:
        tls_context(settings)
    except ValueError as exc:
        print(f"crdtsync relay: {exc}", file=sys.stderr)
        return None
    return settings


def _run_relay(args: argparse.Namespace) -> int:
    settings = _relay_settings(args)
    if settings is None:
        return 2
    from crdtsync.server import Relay

    from .logs import configure

    configure(settings.log_level, settings.log_format)

    def listening(url: str) -> None:
        line = {"event": "listening", "url": url, "store": str(settings.store), "time": time.time()}
        print(json.dumps(line), flush=True)

    # The relay allocates a few containers per update that live until their turn is
    # committed, nearly all without cycles: with the default thresholds the cyclic GC
    # took ~10% of its CPU on the automerge-paper trace (bench/trace_relay.py). Collect
    # less often, and leave what was imported at start out of full collections.
    gc.freeze()
    gc.set_threshold(20_000, 50, 100)
    _return_large_blocks_to_the_os()
    try:
        asyncio.run(Relay(settings).run(on_listening=listening))
    except StoreError as exc:
        print(f"crdtsync relay: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(
            f"crdtsync relay: cannot listen on {settings.host}:{settings.port}: {exc}",
            file=sys.stderr,
        )
        return 1
    return 0


def _run_token(args: argparse.Namespace) -> int:
    from .auth import mint_token, split_key_entry

    def fail(message: str) -> int:
        print(f"crdtsync token: {message}", file=sys.stderr)
        return 2

    docs: dict[str, str] = {}
    for item in args.doc:
        # rights never hold "=", a pattern may: split at the last one
        pattern, equals, rights = item.rpartition("=")
        if not equals or not pattern:
            return fail(f"--doc {item!r} is not PATTERN=RIGHTS")
        if pattern in docs:
            return fail(f"--doc pattern {pattern!r} given twice")
        docs[pattern] = rights
    try:
        kid, value = split_key_entry(args.secret if args.secret is not None else args.private_key)
        if args.kid is not None and kid is not None and args.kid != kid:
            return fail(f"--kid {args.kid!r} differs from the key's kid={kid}")
        kid = args.kid if args.kid is not None else kid
        if args.secret is not None:
            key: str | bytes = value
        else:
            try:
                key = Path(value).read_bytes()
            except OSError as exc:
                return fail(f"cannot read private key {value}: {exc.strerror or exc}")
        token = mint_token(
            key,
            subject=args.sub,
            docs=docs,
            ttl_s=None if args.no_exp else args.ttl,
            issuer=args.iss,
            audience=args.aud,
            kid=kid,
        )
    except ValueError as exc:
        return fail(str(exc))
    print(token)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``crdtsync`` console script."""
    args = build_parser().parse_args(argv)
    if args.command == "relay":
        return _run_relay(args)
    if args.command == "check":
        from .testing.command import run_check

        return run_check(args)
    if args.command == "token":
        return _run_token(args)
    if args.command == "new-epoch":
        return _run_new_epoch(args)
    if args.command == "store":
        return _run_store(args)
    raise AssertionError(f"unhandled command {args.command}")  # argparse rejects others


if __name__ == "__main__":
    sys.exit(main())


def _return_large_blocks_to_the_os() -> None:
    """Let glibc give the memory of large buffers back when they are freed.

    A relay handles payloads of megabytes (large updates, answers, backlogs of slow
    readers) that live briefly. glibc raises its mmap threshold as such blocks are freed
    (up to 32 MiB), after which they come from the heap and its freed top is kept: after
    one burst of large payloads the process stayed hundreds of megabytes above its
    baseline for good. A fixed threshold of 128 KiB keeps each large block its own
    mapping, unmapped when freed. Without glibc (musl, macOS) nothing is changed.
    """
    if not sys.platform.startswith("linux"):
        return
    import ctypes  # here: only the relay command needs it

    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD: fixed, so never raised
        libc.mallopt(-1, 4 * 1024 * 1024)  # M_TRIM_THRESHOLD: trim the heap's free top
    except (OSError, AttributeError):
        pass
