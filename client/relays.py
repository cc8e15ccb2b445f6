"""Which relay a replica uses when it has several (failover across regions, issue 12).

Pure: the replica's connection loops report what happened, with the time; this decides
which relay comes next and when the first one is asked again. No sockets, no clock.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["RelayChoice"]


class RelayChoice:
    """The relay in use among ``urls``, in order of preference.

    The first relay that answers is used. When the one in use fails (it cannot be
    reached, refuses for load, or drops the connection), the next one is tried at once,
    until every relay failed since the last success: then the caller backs off, and
    starts again from the first. While on another relay than the first (the home), the
    home is probed every ``probe_s`` and taken back as soon as it answers.
    """

    def __init__(self, urls: Sequence[str], probe_s: float = 15.0) -> None:
        if not urls:
            raise ValueError("at least one relay")
        if not probe_s > 0:  # (NaN too)
            raise ValueError("probe_s must be positive")
        self.urls = tuple(urls)
        self.probe_s = probe_s
        self.index = 0
        self._failures = 0  # relays that failed in a row since the last success
        self._next_probe = 0.0

    @property
    def current(self) -> str:
        """The relay to connect to now."""
        return self.urls[self.index]

    @property
    def home(self) -> str:
        return self.urls[0]

    @property
    def away(self) -> bool:
        """On another relay than the first."""
        return self.index != 0

    def failed(self, url: str, now: float) -> bool:
        """``url`` failed. True: connect again at once (to the next relay); False: every
        relay failed since the last success, back off first (then the first is next).

        A failure of a relay no longer in use (another connection moved on already)
        changes nothing and is retried at once.
        """
        if url != self.current:
            return True
        self._failures += 1
        self.index = (self.index + 1) % len(self.urls)
        if self.away:
            self._next_probe = now + self.probe_s
        if self._failures >= len(self.urls):
            self._failures = 0
            self.index = 0
            return False
        return True

    def others_left(self) -> bool:
        """Whether a failure of the relay in use now would move to another one at once
        (some relay has not failed since the last healthy connection)."""
        return self._failures + 1 < len(self.urls)

    def connected(self, url: str) -> None:
        """A connection to ``url`` is up (its handshake and first answer went through)."""
        if url == self.current:
            self._failures = 0

    def probe_due(self, now: float) -> bool:
        """Whether the home relay should be asked again now."""
        return self.away and now >= self._next_probe

    def probed(self, answered: bool, now: float) -> bool:
        """The home relay was asked: True when the replica should move back to it now."""
        if not self.away:
            return False
        if answered:
            self.index = 0
            self._failures = 0
            return True
        self._next_probe = now + self.probe_s
        return False
