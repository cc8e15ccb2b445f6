"""crdtsync.server: the stateless y-websocket relay."""

from .relay import EXTENSION_QUERY, Relay, Rights, allow_all

__all__ = ["EXTENSION_QUERY", "Relay", "Rights", "allow_all"]
