"""crdtsync.client: the Replica, documents in local SQLite synced through a relay."""

from .backoff import Backoff
from .documents import DocumentStatus, FolderStatus, ThreadSafeDoc
from .replica import Replica, TokenSource
from .sync_replica import SyncReplica

__all__ = [
    "Backoff",
    "DocumentStatus",
    "FolderStatus",
    "Replica",
    "SyncReplica",
    "ThreadSafeDoc",
    "TokenSource",
]
