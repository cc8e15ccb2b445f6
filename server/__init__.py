"""crdtsync.server: the stateless y-websocket relay."""

from crdtsync.auth import Rights

from .relay import EXTENSION_QUERY, Access, Relay, allow_all

__all__ = ["EXTENSION_QUERY", "Access", "Relay", "Rights", "allow_all"]
