"""Budgets that bound what one connection may cost: pure, time passed in (no clock).

The relay and the replica both use them (DESIGN: bounded work). A :class:`TokenBucket`
paces a stream (updates, bytes, presence messages, sync requests): the adapter asks how
long to wait before the next item fits and pauses reading for that long, so a flood slows
its sender down instead of the relay. :class:`Strikes` counts refusals of one connection,
so one that keeps going over a cap is closed rather than refused forever.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Strikes", "TokenBucket"]


@dataclass(slots=True)
class TokenBucket:
    """``rate`` tokens per second, at most ``burst`` saved up; starts full.

    Args:
        rate: tokens added per second (> 0).
        burst: the most tokens that can be saved (>= 1).
    """

    rate: float
    burst: float
    tokens: float = -1.0
    stamp: float | None = None

    def __post_init__(self) -> None:
        if self.rate <= 0 or self.burst < 1:
            raise ValueError(f"need rate > 0 and burst >= 1, got {self.rate}, {self.burst}")
        if self.tokens < 0:
            self.tokens = self.burst

    def _refill(self, now: float) -> None:
        if self.stamp is not None and now > self.stamp:
            self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now if self.stamp is None else max(self.stamp, now)

    def take(self, now: float, amount: float = 1.0) -> float:
        """Spend ``amount`` tokens; return how many seconds to wait before going on.

        The spend always happens (the bucket may go negative, up to one burst of debt):
        the caller waits the returned time, and later items wait for the debt too. An
        amount larger than the burst counts as one burst.
        """
        self._refill(now)
        self.tokens -= min(amount, self.burst)
        return 0.0 if self.tokens >= 0 else -self.tokens / self.rate

    def full(self, now: float) -> bool:
        """Whether the bucket is full at ``now``: it then acts as a new one would (a
        holder may drop it and start a new one when it next needs one)."""
        if self.stamp is None or now <= self.stamp:
            return self.tokens >= self.burst
        return self.tokens + (now - self.stamp) * self.rate >= self.burst

    def allow(self, now: float, amount: float = 1.0) -> bool:
        """Spend ``amount`` tokens if they are there (True), else spend nothing (False)."""
        self._refill(now)
        if self.tokens >= amount:
            self.tokens -= amount
            return True
        return False


@dataclass(slots=True)
class Strikes:
    """Refusals of one connection within a sliding window; too many means close it.

    Args:
        limit: refusals tolerated within ``window_s``.
        window_s: the window, in seconds.
    """

    limit: int
    window_s: float
    _times: list[float] | None = None

    def strike(self, now: float) -> bool:
        """Record a refusal at ``now``; True if the connection is over the limit."""
        times = self._times if self._times is not None else []
        self._times = times
        times.append(now)
        cutoff = now - self.window_s
        while times and times[0] < cutoff:
            times.pop(0)
        return len(times) > self.limit
