"""Exponential backoff with jitter: replicas reconnecting to a relay, relays to Redis."""

from __future__ import annotations

import random

__all__ = ["Backoff"]


class Backoff:
    """Reconnect delays: exponential growth, capped, with "equal jitter".

    Each delay is drawn uniformly in ``[cap/2, cap]``: it spreads a crowd of replicas
    that lost the same relay, so they do not all come back in the same instant, while
    never retrying at once.

    Args:
        initial_s: the cap of the first delay.
        max_s: the largest delay.
        factor: growth per failed attempt.
        rng: the random source (inject a seeded one to replay a schedule).
    """

    def __init__(
        self,
        initial_s: float = 0.05,
        max_s: float = 10.0,
        factor: float = 2.0,
        rng: random.Random | None = None,
    ) -> None:
        if initial_s <= 0 or max_s < initial_s or factor < 1:
            raise ValueError("need 0 < initial_s <= max_s and factor >= 1")
        self.initial_s = initial_s
        self.max_s = max_s
        self.factor = factor
        self.rng = rng or random.Random()
        self.attempts = 0

    def next_delay(self) -> float:
        """The delay before the next attempt, in seconds; counts an attempt."""
        cap = min(self.max_s, self.initial_s * self.factor**self.attempts)
        self.attempts += 1
        return self.rng.uniform(cap / 2, cap)

    def reset(self) -> None:
        """Forget failures after a connection that worked."""
        self.attempts = 0
