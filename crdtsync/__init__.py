"""crdtsync: offline-first CRDT sync for Python.

The core (this package) is pure: wire protocol, sync session, SQLite update store, access
tokens, settings. ``crdtsync.client`` holds the Replica; ``crdtsync.server`` the relay.
"""

from .errors import (
    AccessDenied,
    AcknowledgementsUnsupported,
    CrdtsyncError,
    InvalidDocumentName,
    MalformedMessage,
    MessageTooLarge,
    ProtocolError,
    StoreError,
    SyncTimeout,
    TokenRefused,
)
from .store import UpdateLog
from .sync import SyncSession

__version__ = "0.1.0"

__all__ = [
    "AccessDenied",
    "AcknowledgementsUnsupported",
    "CrdtsyncError",
    "InvalidDocumentName",
    "MalformedMessage",
    "MessageTooLarge",
    "ProtocolError",
    "StoreError",
    "SyncSession",
    "SyncTimeout",
    "TokenRefused",
    "UpdateLog",
    "__version__",
]
