"""Exponential backoff with jitter for reconnects (lives in the core: the relay uses it too)."""

from crdtsync.backoff import Backoff

__all__ = ["Backoff"]
