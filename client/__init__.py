"""crdtsync.client: the Replica, documents in local SQLite synced through a relay."""

from .backoff import Backoff
from .replica import DocumentStatus, Replica, ThreadSafeDoc, TokenSource
from .sync_replica import SyncReplica

__all__ = [
    "Backoff",
    "DocumentStatus",
    "Replica",
    "SyncReplica",
    "ThreadSafeDoc",
    "TokenSource",
]
