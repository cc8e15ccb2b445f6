"""A hostile participant for ``crdtsync check``: a stock y-websocket client that attacks the room.

``python -m crdtsync.testing.hostile --relay URL --doc NAME --workload M:F --seed S``

It connects the way a stock Yjs ``y-websocket`` provider does (``ws://relay/<doc>``, no
``?crdtsync=1``, sync step 1 on connect, step 2 in answer to the relay's step 1, then
updates), reconnecting with backoff, and reads the room: every update the relay sends
is kept in arrival order and applied to a ``Doc`` of what it saw, so it knows the
other writers' client ids and clocks. Each ``edit`` command makes it perform random
actions drawn from its seed (:data:`ATTACK_KINDS`):

- ``rewrite``: content *different* from what another writer already wrote, at exactly
  that writer's ``(client, clock)`` ids. Built in a ``Doc(client_id=C)`` fed with the
  updates received before the targeted one, so the new content lands on the clock
  the target's content starts at. Variants: ``nested`` (a map entry holding an array
  with a child: the child names the rewritten item as its parent, so a peer that holds
  the original, non-type content there cannot apply it: pycrdt raises "block parent ...
  must be deleted or shared ref type"), ``text`` (a text insert of 1-4 characters),
  ``value`` (a map value).
- ``impersonate``: new content under another writer's client id at the clocks it has
  not used yet; that writer will later write its own content there.
- ``replay``: updates received from the relay, sent back unchanged (harmless by design).
- ``gap``: content under a fresh client id of its own that leaves a clock gap (it
  withholds one of several consecutive updates); the ``fill`` variant later sends a
  withheld one.
- ``honest``: a workload edit of its own, under its own client id.

An action that has no target yet (no other writer seen) falls back to an honest edit.
Everything it sends goes out as ``SyncUpdate``, or now and then as a ``SyncStep2`` (the
relay stores both). It never applies its attacks to its own view of the room. Refusals
(y-protocols permission-denied, ``[2, 0, reason]``) are counted, and so is anything a
stock client could not understand (an extension message, an undecodable frame).

Before each action it resyncs (sync step 1, as stock clients do now and then) and waits
for the relay's answer, bounded, so that it aims at what the relay holds now.

Commands (JSON lines on stdin, one JSON answer line each, like :mod:`.worker`):

- ``{"cmd": "edit", "count": N}``: N actions; answers ``{"ok": true, "attacks": [...],
  "refused": R}`` with what each targeted and the updates sent (base64), once the frames
  are written to the socket (or queued, when offline); R counts the refusals so far.
  ``"kind"`` and ``"variant"`` force the action instead of drawing it.
- ``{"cmd": "status"}``: connection, refusals, apply errors, unexpected messages.
- ``{"cmd": "quit"}``: exit.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import random
import sys
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pycrdt import Array, Doc, Map, Text
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake

from ..errors import CrdtsyncError
from ..protocol import (
    AwarenessMessage,
    PermissionDenied,
    QueryAwareness,
    SyncStep1,
    SyncStep2,
    SyncUpdate,
    decode_message,
    decode_state_vector,
)
from ..updates import UpdateInfo, check_update
from .workload import Workload, load_workload

__all__ = ["ATTACK_KINDS", "REWRITE_VARIANTS", "Attack", "Attacker", "RoomView", "main"]

ATTACK_KINDS = ("rewrite", "impersonate", "replay", "gap", "honest")
_ATTACK_WEIGHTS = (35, 25, 15, 15, 10)
REWRITE_VARIANTS = ("nested", "text", "value")
# The nested variant is the one pycrdt cannot apply next to the original: draw it most.
_VARIANT_WEIGHTS = (50, 25, 25)
MAX_HISTORY = 20_000  # updates remembered for rewrites; the oldest are forgotten beyond
MAX_OUTBOX = 1_000  # frames queued while offline; the oldest are dropped beyond
MAX_REASONS = 20  # refusal reasons and unexpected messages kept for the status
FLUSH_WAIT_S = 2.0  # how long an edit command waits for its frames to reach the socket
REFRESH_WAIT_S = 0.5  # how long an action waits for the relay's answer to its step 1
# Roots of their own: a hostile write must not depend on the shapes of the user's workload.
TEXT_ROOT = "hostile-text"
MAP_ROOT = "hostile-map"


def _emit(payload: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(payload) + "\n")
    sys.stdout.flush()


def _state(doc: Doc[Any]) -> dict[int, int]:
    return decode_state_vector(doc.get_state())


def _try_apply(doc: Doc[Any], update: bytes) -> str | None:
    """Apply ``update``; return pycrdt's complaint instead of raising.

    What a relay without the integrity rule lets through can make pycrdt raise
    (RuntimeError) or panic (pyo3's PanicException, a BaseException): the hostile
    keeps going either way.
    """
    try:
        doc.apply_update(update)
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    except BaseException as exc:
        if type(exc).__name__ != "PanicException":
            raise
        return f"PanicException: {exc}"
    return None


def _capture(doc: Doc[Any], edit: Callable[[], object]) -> bytes:
    """Run ``edit`` in one transaction of ``doc``; return that transaction's update."""
    updates: list[bytes] = []
    subscription = doc.observe(lambda event: updates.append(event.update))
    try:
        with doc.transaction():
            edit()
    finally:
        doc.unobserve(subscription)
    return updates[0] if updates else b""


@dataclass
class Attack:
    """One action of the hostile participant, as logged in the campaign's history.

    ``client``/``start``/``end``: the client id written under and the clocks written
    (``end`` exclusive); ``updates``: what was sent (or queued while offline), in order;
    ``sent``: False when the action could not be carried out (there was nothing to send).
    """

    kind: str
    client: int | None = None
    start: int | None = None
    end: int | None = None
    variant: str | None = None
    framing: str = "update"
    updates: list[bytes] = field(default_factory=list)
    note: str = ""
    sent: bool = True

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "client": self.client,
            "start": self.start,
            "end": self.end,
            "variant": self.variant,
            "framing": self.framing,
            "updates": [base64.b64encode(u).decode() for u in self.updates],
            "note": self.note,
            "sent": self.sent,
        }


class RoomView:
    """What the hostile learned from the relay: every update received, and a Doc of them.

    ``own`` holds the client ids the hostile writes under legitimately (its own and its
    gap ids), which are not targets.
    """

    def __init__(self, own_client: int) -> None:
        self.doc: Doc[Any] = Doc(client_id=own_client)
        self.history: deque[tuple[bytes, UpdateInfo]] = deque(maxlen=MAX_HISTORY)
        self.own: set[int] = {own_client}
        self.received = 0
        self.apply_errors: deque[str] = deque(maxlen=MAX_REASONS)
        self.apply_error_count = 0

    def receive(self, update: bytes) -> str | None:
        """Take an update from the relay; return why it is unusable, if it is."""
        try:
            info = check_update(update)
        except CrdtsyncError as exc:
            return f"the relay sent an invalid update: {exc}"
        self.received += 1
        if not info.is_empty:
            self.history.append((update, info))
        problem = _try_apply(self.doc, update)
        if problem is not None:
            self.apply_error_count += 1
            self.apply_errors.append(problem)
        return None

    def others(self) -> dict[int, int]:
        """Other writers' client ids and the clock just past their integrated content."""
        try:
            state = _state(self.doc)
        except Exception:  # a Doc that pycrdt broke: fall back to what the updates said
            state = {}
            for _, info in self.history:
                for client, end in info.state.items():
                    state[client] = max(state.get(client, 0), end)
        return {client: end for client, end in state.items() if client not in self.own}


class Attacker:
    """Draws and builds the hostile participant's actions (pure: no I/O)."""

    def __init__(self, view: RoomView, workload: Workload, rng: random.Random) -> None:
        self.view = view
        self.workload = workload
        self.rng = rng
        self.serial = 0
        self.withheld: list[tuple[int, bytes]] = []  # (gap client, update held back)
        self.forced_variant: str | None = None
        self.why_not = ""  # why the last builder that returned None could not attack

    def next(self, kind: str | None = None, variant: str | None = None) -> Attack:
        """One action: the drawn attack, or an honest edit when it has no target yet.

        ``kind`` and ``variant`` force a choice instead of drawing it (for tests).
        """
        if kind is None:
            kind = self.rng.choices(ATTACK_KINDS, weights=_ATTACK_WEIGHTS)[0]
        self.forced_variant = variant
        build: dict[str, Callable[[], Attack | None]] = {
            "rewrite": self.rewrite,
            "impersonate": self.impersonate,
            "replay": self.replay,
            "gap": self.gap,
            "honest": self.honest,
        }
        self.why_not = f"no {kind} target yet"
        attack = build[kind]()
        if attack is None:
            attack = self.honest()
            attack.note = f"{self.why_not}; " + attack.note
        if attack.updates and self.rng.random() < 0.2:
            attack.framing = "step2"
        return attack

    def _variant(self) -> str:
        if self.forced_variant in REWRITE_VARIANTS:
            return self.forced_variant
        return self.rng.choices(REWRITE_VARIANTS, weights=_VARIANT_WEIGHTS)[0]

    def _marker(self) -> str:
        self.serial += 1
        return f"!hostile-{self.serial}-{self.rng.getrandbits(24):06x}!"

    def _hostile_content(self, doc: Doc[Any], variant: str) -> Callable[[], object]:
        marker = self._marker()
        if variant == "nested":
            return lambda: doc.get(MAP_ROOT, type=Map).__setitem__(marker, Array([marker]))
        if variant == "text":
            size = self.rng.randint(1, 4)
            return lambda: doc.get(TEXT_ROOT, type=Text).insert(0, marker[:size])
        return lambda: doc.get(MAP_ROOT, type=Map).__setitem__(marker, marker)

    def rewrite(self) -> Attack | None:
        """Different content at clocks another writer already wrote.

        The ``nested`` variant covers the target's clocks up to its last one, where it
        puts a map entry holding an array, and the array's child one clock further: a
        peer that holds the original there integrates only the child, whose parent is
        then the original's last item, which is not a shared type. The other variants
        start where one of the target's updates started.
        """
        others = self.view.others()
        history = list(self.view.history)
        candidates = [
            (i, client)
            for i, (_, info) in enumerate(history)
            for client in info.state
            if client in others
        ]
        if not candidates:
            return None
        variant = self._variant()
        if variant == "nested" or self.rng.random() < 0.5:
            # the target's latest write: nearest its end
            client = self.rng.choice(sorted({c for _, c in candidates}))
            index = max(i for i, c in candidates if c == client)
        else:
            index, client = self.rng.choice(candidates)
        prefix: Doc[Any] = Doc(client_id=client)
        for update, _ in history[:index]:
            _try_apply(prefix, update)
        start = _state(prefix).get(client, 0)
        end = others[client]
        if start >= end:
            # reordered deliveries left no clean prefix: draw again next time
            self.why_not = f"no clean prefix of {client}'s content to rewrite"
            return None
        content = self._hostile_content(prefix, variant)
        if variant == "nested" and end - 1 > start:
            # ASCII text: one clock per character, so the map entry lands on end - 1
            filler = "!" * (end - 1 - start)

            def padded() -> None:
                prefix.get(TEXT_ROOT, type=Text).insert(0, filler)
                content()

            update = _capture(prefix, padded)
        else:
            update = _capture(prefix, content)
        info = check_update(update)
        if info.starts.get(client) != start:
            self.why_not = f"the rewrite of {client} did not land on clock {start}"
            return None
        return Attack(
            "rewrite",
            client,
            start,
            info.state[client],
            variant,
            updates=[update],
            note=f"{client}:{start}..{end - 1} already written",
        )

    def impersonate(self) -> Attack | None:
        """New content under another writer's client id, at clocks it has not used yet."""
        others = self.view.others()
        if not others:
            return None
        client = self.rng.choice(sorted(others))
        prefix: Doc[Any] = Doc(client_id=client)
        try:
            seen = self.view.doc.get_update()
        except Exception as exc:
            self.why_not = f"its view of the room is broken: {exc}"
            return None
        _try_apply(prefix, seen)
        start = _state(prefix).get(client, 0)
        if start != others[client]:
            self.why_not = f"its copy of {client}'s content does not end at {others[client]}"
            return None
        variant = self._variant()
        update = _capture(prefix, self._hostile_content(prefix, variant))
        info = check_update(update)
        return Attack("impersonate", client, start, info.state[client], variant, updates=[update])

    def replay(self) -> Attack | None:
        """Updates received from the relay, sent back byte for byte."""
        history = list(self.view.history)
        if not history:
            return None
        picked = self.rng.sample(history, min(len(history), self.rng.randint(1, 3)))
        return Attack("replay", updates=[u for u, _ in picked], note=f"{len(picked)} updates")

    def gap(self) -> Attack | None:
        """Content under a fresh client id of its own that leaves a clock gap (or fills one)."""
        if self.withheld and self.rng.random() < 0.3:
            client, update = self.withheld.pop(self.rng.randrange(len(self.withheld)))
            info = check_update(update)
            return Attack(
                "gap",
                client,
                info.starts[client],
                info.state[client],
                "fill",
                updates=[update],
                note="sends a withheld update: the gap closes",
            )
        taken = self.view.own | set(self.view.others())
        client = self.rng.getrandbits(52) + 1
        if client in taken:  # one in 2^52 per id in the room: not worth a retry loop
            self.why_not = "drew a client id already in the room"
            return None
        self.view.own.add(client)
        doc: Doc[Any] = Doc(client_id=client)
        text = doc.get(TEXT_ROOT, type=Text)
        updates = [
            _capture(doc, lambda: text.insert(0, self._marker()))
            for _ in range(self.rng.randint(2, 3))
        ]
        hold = self.rng.randrange(len(updates) - 1)  # never the last: that is no gap
        held = updates.pop(hold)
        self.withheld.append((client, held))
        info = check_update(held)
        sent = [check_update(u) for u in updates]
        return Attack(
            "gap",
            client,
            min(i.starts[client] for i in sent),
            max(i.state[client] for i in sent),
            "start" if hold == 0 else "skip",
            updates=updates,
            note=f"withholds {client}:{info.starts[client]}..{info.state[client] - 1}",
        )

    def honest(self) -> Attack:
        """A workload edit of its own, in its view of the room."""
        doc = self.view.doc
        try:
            update = _capture(doc, lambda: self.workload(doc, self.rng))
        except Exception as exc:  # its view may be broken by what the relay let through
            return Attack("honest", note=f"could not edit: {type(exc).__name__}: {exc}", sent=False)
        if not update:
            return Attack("honest", note="the workload changed nothing", sent=False)
        info = check_update(update)
        client = doc.client_id
        return Attack(
            "honest",
            client,
            info.starts.get(client),
            info.state.get(client),
            updates=[update],
        )


class Link:
    """The websocket to the relay, kept up like a stock client keeps it; frames queue offline."""

    def __init__(self, url: str, view: RoomView, rng: random.Random) -> None:
        self.url = url
        self.view = view
        self.rng = rng
        self.outbox: deque[bytes] = deque()
        self.wake = asyncio.Event()
        self.drained = asyncio.Event()
        self.drained.set()
        self.answered = asyncio.Event()  # a sync step 2 arrived
        self.up = asyncio.Event()  # set while connected
        self.connected = False
        self.connections = 0
        self.dropped = 0
        self.refused = 0
        self.refusals: deque[str] = deque(maxlen=MAX_REASONS)
        self.unexpected: deque[str] = deque(maxlen=MAX_REASONS)
        self.last_error: str | None = None

    def send(self, frame: bytes) -> None:
        """Queue a frame; it goes out now if connected, else after the next connect."""
        if len(self.outbox) >= MAX_OUTBOX:
            self.outbox.popleft()
            self.dropped += 1
        self.outbox.append(frame)
        self.drained.clear()
        self.wake.set()

    async def flushed(self, timeout_s: float) -> None:
        """Wait until the queue is written to the socket, or offline, or ``timeout_s``."""
        if not self.connected:
            return
        try:
            async with asyncio.timeout(timeout_s):
                await self.drained.wait()
        except TimeoutError:
            pass

    async def refresh(self, timeout_s: float) -> None:
        """Ask the relay for what the view lacks (sync step 1) and wait for the answer.

        Stock clients resync the same way (y-websocket's ``resyncInterval``). Without
        it the view lags the room by the fan-out's delay, and a rewrite aimed at a
        writer's last clock would miss the clocks written meanwhile.
        """
        try:
            async with asyncio.timeout(timeout_s):
                await self.up.wait()  # just (re)started, or reconnecting: worth a moment
                self.answered.clear()
                self.send(SyncStep1(self.view.doc.get_state()).encode())
                await self.answered.wait()
        except TimeoutError:
            pass

    async def run(self) -> None:
        """Connect, serve, reconnect after a backoff delay; until cancelled."""
        from crdtsync.client import Backoff

        backoff = Backoff(0.02, 0.5, rng=self.rng)
        while True:
            try:
                async with connect(self.url, max_size=None, open_timeout=5, compression=None) as ws:
                    backoff.reset()
                    self.connected = True
                    self.up.set()
                    self.connections += 1
                    await self._serve(ws)
            except ConnectionClosed as exc:
                frame = exc.rcvd
                self.last_error = (
                    "connection lost" if frame is None else f"closed: {frame.code} {frame.reason}"
                )
            except (OSError, InvalidHandshake, TimeoutError) as exc:
                self.last_error = f"cannot connect: {exc}"
            except Exception as exc:
                # Its own view broke (pycrdt on what a rule-less relay let through): a
                # hostile participant keeps coming back rather than fall silent.
                self.last_error = f"{type(exc).__name__}: {exc}"
                self.unexpected.append(f"its connection failed: {self.last_error}")
            finally:
                self.connected = False
                self.up.clear()
                self.drained.set()  # nobody waits for frames to leave while offline
            await asyncio.sleep(backoff.next_delay())

    async def _serve(self, ws: ClientConnection) -> None:
        await ws.send(SyncStep1(self.view.doc.get_state()).encode())
        writer = asyncio.create_task(self._write(ws))
        try:
            async for data in ws:
                await self._receive(ws, data)
                if writer.done():
                    writer.result()  # surface the send error
        finally:
            writer.cancel()
            await asyncio.gather(writer, return_exceptions=True)

    async def _write(self, ws: ClientConnection) -> None:
        while True:
            while self.outbox:
                await ws.send(self.outbox[0])
                self.outbox.popleft()  # only once sent: a lost link resends it
            self.drained.set()
            await self.wake.wait()
            self.wake.clear()

    async def _receive(self, ws: ClientConnection, data: bytes | str) -> None:
        if isinstance(data, str):
            self.unexpected.append("a text frame")
            return
        try:
            msg = decode_message(data)
        except CrdtsyncError as exc:
            self.unexpected.append(f"undecodable message: {exc}")
            return
        if isinstance(msg, SyncStep1):
            try:
                answer = self.view.doc.get_update(msg.state_vector)
            except Exception as exc:  # a view pycrdt broke: answer with nothing
                self.unexpected.append(f"own view unusable: {exc}")
                answer = b"\x00\x00"
            await ws.send(SyncStep2(answer).encode())
        elif isinstance(msg, SyncStep2 | SyncUpdate):
            problem = self.view.receive(msg.update)
            if problem is not None:
                self.unexpected.append(problem)
            if isinstance(msg, SyncStep2):
                self.answered.set()
        elif isinstance(msg, PermissionDenied):
            self.refused += 1
            self.refusals.append(msg.reason)
        elif not isinstance(msg, AwarenessMessage | QueryAwareness):
            # A stock client knows message types 0-3 only (DESIGN: measured facts).
            self.unexpected.append(f"{type(msg).__name__} sent to a stock client")

    def status(self) -> dict[str, Any]:
        return {
            "ok": True,
            "connected": self.connected,
            "connections": self.connections,
            "received": self.view.received,
            "refused": self.refused,
            "refusals": list(self.refusals),
            "unexpected": list(self.unexpected),
            "apply_errors": self.view.apply_error_count,
            "last_apply_error": self.view.apply_errors[-1] if self.view.apply_errors else None,
            "queued": len(self.outbox),
            "dropped": self.dropped,
            "last_error": self.last_error,
        }


async def _serve(args: argparse.Namespace) -> None:
    rng = random.Random(args.seed)
    own = rng.getrandbits(52) + 1
    view = RoomView(own)
    attacker = Attacker(view, load_workload(args.workload), rng)
    link = Link(f"{args.relay.rstrip('/')}/{args.doc}", view, random.Random(args.seed + 1))
    runner = asyncio.create_task(link.run(), name="hostile-link")
    _emit({"event": "ready", "client_id": own})
    reader = asyncio.StreamReader()
    loop = asyncio.get_running_loop()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    try:
        while line := await reader.readline():
            try:
                cmd = json.loads(line)
                name = cmd["cmd"]
            except (ValueError, KeyError, TypeError):
                _emit({"ok": False, "error": f"bad command {line[:80]!r}"})
                continue
            if name == "edit":
                attacks = []
                for _ in range(int(cmd.get("count", 1))):
                    await link.refresh(REFRESH_WAIT_S)
                    attack = attacker.next(cmd.get("kind"), cmd.get("variant"))
                    frame = SyncStep2 if attack.framing == "step2" else SyncUpdate
                    for update in attack.updates:
                        link.send(frame(update).encode())
                    attacks.append(attack.to_json())
                    await link.flushed(FLUSH_WAIT_S)
                _emit({"ok": True, "attacks": attacks, "refused": link.refused})
            elif name == "status":
                _emit(link.status())
            elif name == "quit":
                _emit({"ok": True})
                return
            else:
                _emit({"ok": False, "error": f"unknown command {name!r}"})
    finally:
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)


def main() -> None:
    """Entry point: ``python -m crdtsync.testing.hostile``."""
    p = argparse.ArgumentParser(prog="crdtsync-hostile")
    p.add_argument("--relay", required=True, help="ws:// URL of the relay (or its fault proxy)")
    p.add_argument("--doc", required=True)
    p.add_argument("--workload", required=True, help="module:function for its honest edits")
    p.add_argument("--seed", type=int, required=True)
    args = p.parse_args()
    asyncio.run(_serve(args))


if __name__ == "__main__":
    main()
