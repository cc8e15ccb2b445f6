"""crdtsync.client: the Replica, documents in local SQLite synced through a relay."""

from .backoff import Backoff
from .replica import DocumentStatus, Replica

__all__ = ["Backoff", "DocumentStatus", "Replica"]
