"""Presence: one open document's awareness (y-protocols), the replica's part for it.

Our state goes out on whatever link the document has (a connection of its own or a
channel), is sent again when a link comes up or the relay asks, and is renewed before
peers would expire it; peers' states that stop being renewed expire here. The app may
set the local state from any thread: sending always happens on the replica's loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable
from typing import Any

from pycrdt import Awareness, Doc

from crdtsync.sync import SyncSession

__all__ = ["AWARENESS_TIMEOUT_S", "Presence"]

AWARENESS_TIMEOUT_S = 30.0  # y-protocols: a state not renewed for 30 s is gone


class Presence:
    """The awareness of one open document.

    ``send`` queues an encoded awareness update on the document's current link (and
    does nothing while it has none); ``loop`` and ``loop_thread`` say where that runs.
    """

    def __init__(
        self,
        doc: Doc[Any],
        send: Callable[[bytes], None],
        loop: asyncio.AbstractEventLoop | None,
        loop_thread: int | None,
    ) -> None:
        self.awareness = Awareness(doc, outdated_timeout=int(AWARENESS_TIMEOUT_S * 1000))
        self._send = send
        self._loop = loop
        self._loop_thread = loop_thread
        self._observer = self.awareness.observe(self._on_change)

    def _on_change(self, topic: str, change: tuple[Any, Any]) -> None:
        changes, origin = change
        if topic != "update" or origin != "local":
            return
        clients = changes["added"] + changes["updated"] + changes["removed"]
        if not clients:
            return
        if self._loop is None or threading.get_ident() == self._loop_thread:
            self._send_clients(clients)
        else:
            # (An app thread setting its state after the replica stopped: nothing to send.)
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._send_clients, clients)

    def _send_clients(self, clients: list[int]) -> None:
        self._send(self.awareness.encode_awareness_update(clients))

    @property
    def present(self) -> bool:
        """Whether we have a local state (the app said we are here)."""
        return self.awareness.get_local_state() is not None

    def announce(self, session: SyncSession) -> None:
        """Put our state on ``session`` (a new link, or the relay asked who is here)."""
        if self.present:
            session.send_awareness(
                self.awareness.encode_awareness_update([self.awareness.client_id])
            )

    def received(self, payload: bytes) -> None:
        """Apply peers' states the relay sent."""
        self.awareness.apply_awareness_update(payload, "remote")

    def leave(self) -> bool:
        """Clear our state (sent as a removal, as stock clients do on leaving); whether
        there was one."""
        if not self.present:
            return False
        self.awareness.set_local_state(None)
        return True

    def close(self) -> None:
        """Stop sending: the document is closed (its awareness may still be set, to no
        effect)."""
        self.awareness.unobserve(self._observer)

    async def keep(self) -> None:
        """Renew our state and expire silent peers' (y-protocols awareness timing); runs
        while a link is up."""
        awareness = self.awareness
        while True:
            await asyncio.sleep(AWARENESS_TIMEOUT_S / 2)
            state = awareness.get_local_state()
            if state is not None:
                awareness.set_local_state(state)
            now_ms = time.time() * 1000
            outdated = [
                client
                for client, meta in awareness.meta.items()
                if client != awareness.client_id
                and client in awareness.states
                and now_ms - meta["lastUpdated"] >= AWARENESS_TIMEOUT_S * 1000
            ]
            if outdated:
                awareness.remove_awareness_states(outdated, "timeout")
