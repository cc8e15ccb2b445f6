"""The crdtsync exception hierarchy.

::

    CrdtsyncError
    ├── ProtocolError          the peer sent something we refuse (close 1002 / 1003 / 1007)
    │   ├── MalformedMessage   truncated or garbage frame, bad varint, undecodable update
    │   ├── MessageTooLarge    over the message or update size limit (close 1009)
    │   └── LimitExceeded      over another cap: clients or structs per update, ... (1008)
    ├── AccessDenied           the connection may not read or write this document (close 1008)
    │   └── TokenRefused       its access token is missing or does not verify (``reason``)
    ├── InvalidDocumentName    also a ValueError (close 1008)
    ├── StoreError             disk full, corrupt file, schema newer than this code
    │   └── PositionConflict   a conditional append found documents moved on
    ├── AcknowledgementsUnsupported  the relay does not confirm durable storage
    └── SyncTimeout            wait_synced() deadline passed; also a TimeoutError

Errors a peer can cause carry ``close_code``: the relay closes the offending
connection with that code and the error's message (truncated to the 123 bytes
a close frame allows, in :func:`close_reason`). Any other exception is a bug.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import Enum, IntEnum
from types import MappingProxyType
from typing import Literal, get_args

__all__ = [
    "CLOSE_RETRY",
    "AccessDenied",
    "AcknowledgementsUnsupported",
    "CloseCode",
    "CrdtsyncError",
    "DocumentsFailed",
    "FoldersUnsupported",
    "InvalidDocumentName",
    "LimitExceeded",
    "MalformedMessage",
    "MessageTooLarge",
    "PositionConflict",
    "ProtocolError",
    "Retry",
    "StoreError",
    "StoreUnreachable",
    "SyncTimeout",
    "TokenRefusalReason",
    "TokenRefused",
    "close_reason",
    "retry_after_close",
]


class CloseCode(IntEnum):
    """Websocket close codes used by crdtsync (RFC 6455 section 7.4.1)."""

    NORMAL = 1000
    GOING_AWAY = 1001
    PROTOCOL_ERROR = 1002
    UNSUPPORTED_DATA = 1003
    INVALID_DATA = 1007
    ABNORMAL = 1006  # never sent: the connection ended without a close frame
    POLICY_VIOLATION = 1008
    MESSAGE_TOO_BIG = 1009
    INTERNAL_ERROR = 1011
    TRY_AGAIN_LATER = 1013
    # Application codes (4000-4999), as Hocuspocus uses them: the token expired or was
    # revoked (fetch a fresh one and reconnect); the rights to the document are gone.
    UNAUTHORIZED = 4401
    FORBIDDEN = 4403


class Retry(Enum):
    """What a client does after the relay closed its connection with a given code."""

    BACKOFF = "backoff"  # reconnect after the usual backoff (resend what is pending)
    LATER = "later"  # refused (rights, limits): much later, with a fresh token
    NEVER = "never"  # the same data would be refused again: stop, and say why


# The one map from close codes to what a client does (the relay closes with these codes;
# the replica reacts by this map). Codes not here: Retry.BACKOFF (1001 going away, 1011,
# 1013 try again later, 4401 token expired or revoked: a fresh token after the backoff).
CLOSE_RETRY: Mapping[int, Retry] = MappingProxyType(
    {
        # Resending the same refused data forever helps nobody (y-websocket#189).
        CloseCode.MESSAGE_TOO_BIG: Retry.NEVER,
        CloseCode.INVALID_DATA: Retry.NEVER,
        CloseCode.UNSUPPORTED_DATA: Retry.NEVER,
        # Rights can come back (and limits reset): never a tight loop.
        CloseCode.POLICY_VIOLATION: Retry.LATER,
        CloseCode.FORBIDDEN: Retry.LATER,
    }
)


def retry_after_close(code: int | None) -> Retry:
    """What a client does after a close with ``code`` (None: no close frame came)."""
    return CLOSE_RETRY.get(code, Retry.BACKOFF) if code is not None else Retry.BACKOFF


MAX_CLOSE_REASON_BYTES = 123  # RFC 6455 section 5.5: control frame payload <= 125, minus the code


def close_reason(message: str) -> str:
    """Return ``message`` cut to fit a websocket close frame (123 UTF-8 bytes)."""
    data = message.encode("utf-8")
    if len(data) <= MAX_CLOSE_REASON_BYTES:
        return message
    cut = data[: MAX_CLOSE_REASON_BYTES - 3].decode("utf-8", errors="ignore")
    return cut + "..."


class CrdtsyncError(Exception):
    """Base class of every error crdtsync raises on purpose."""


class ProtocolError(CrdtsyncError):
    """The peer sent something crdtsync refuses."""

    close_code: int = CloseCode.PROTOCOL_ERROR


class MalformedMessage(ProtocolError):
    """A frame, message or update that does not decode."""

    close_code = CloseCode.INVALID_DATA


class MessageTooLarge(ProtocolError):
    """A message over the configured size limit."""

    close_code = CloseCode.MESSAGE_TOO_BIG


class LimitExceeded(ProtocolError):
    """A message over one of the caps on what a peer may make us do (DESIGN: bounded work)."""

    close_code = CloseCode.POLICY_VIOLATION


class AccessDenied(CrdtsyncError):
    """The connection may not read, or may not write, this document."""

    close_code: int = CloseCode.POLICY_VIOLATION


TokenRefusalReason = Literal[
    "missing",  # no token where one is required
    "malformed",  # not a compact JWS, undecodable header or payload, over the size cap
    "expired",  # exp passed (beyond the leeway)
    "not_yet_valid",  # nbf still ahead (beyond the leeway)
    "bad_signature",  # no configured key verifies it (wrong key, alg not accepted, unsigned)
    "wrong_audience",  # aud does not name this relay's audience
    "wrong_issuer",  # iss is not the configured issuer
    "unknown_key",  # its kid header names no configured key
    "no_expiry",  # no exp claim, and tokens without one are not allowed
    "bad_claims",  # a claim of the wrong type, or a missing or invalid docs claim
    "revoked",  # the relay's revoked hook says so (checked at connect, then periodically)
]


class TokenRefused(AccessDenied):
    """An access token that is missing or does not verify.

    The message is for people and never holds the token; ``reason`` is one of
    :data:`TokenRefusalReason`, for metrics and for clients that react to it (e.g. fetch
    a new token on "expired").

    Attributes:
        reason: the short machine reason.
    """

    REASONS: frozenset[str] = frozenset(get_args(TokenRefusalReason))

    def __init__(self, reason: TokenRefusalReason, message: str) -> None:
        if reason not in self.REASONS:
            raise ValueError(f"unknown token refusal reason {reason!r}")
        super().__init__(message)
        self.reason: TokenRefusalReason = reason


class InvalidDocumentName(CrdtsyncError, ValueError):
    """A document name that crdtsync refuses (empty, too long, path traversal...)."""

    close_code: int = CloseCode.POLICY_VIOLATION


class StoreError(CrdtsyncError):
    """The update store failed: disk full, corrupt or newer-schema file.

    Attributes:
        path: the store file concerned.
    """

    # The writer's edits were not stored: it resends them when it reconnects.
    close_code: int = CloseCode.TRY_AGAIN_LATER

    def __init__(self, message: str, path: str | None = None) -> None:
        super().__init__(message)
        self.path = path


class StoreUnreachable(StoreError):
    """The store (a Redis server) could not be reached: it may be back later."""


class PositionConflict(StoreError):
    """A conditional append found documents past the positions it expected: their
    updates were not appended; the other documents' were (crdtsync.backend: several
    relay processes writing one document).

    Attributes:
        positions: document -> its position, for the documents refused.
        appended: the positions of the append's rows, in order; 0 for a refused row.
    """

    def __init__(
        self,
        message: str,
        positions: dict[str, int],
        appended: list[int],
        path: str | None = None,
    ) -> None:
        super().__init__(message, path)
        self.positions = positions
        self.appended = appended


class DocumentsFailed(PositionConflict):
    """Some documents of an append failed on their own (a damaged key, a key of the wrong
    type); the others were appended, or refused as moved on (``positions``).

    Attributes:
        failed: document -> why its append failed (nothing of it was written).
    """

    def __init__(
        self,
        message: str,
        failed: dict[str, str],
        positions: dict[str, int],
        appended: list[int],
    ) -> None:
        super().__init__(message, positions, appended)
        self.failed = failed


class AcknowledgementsUnsupported(CrdtsyncError):
    """The relay does not confirm durable storage (e.g. the reference y-websocket server)."""


class FoldersUnsupported(CrdtsyncError):
    """The relay cannot keep folders (no multiplexed connection: e.g. the reference
    y-websocket server, or a crdtsync relay older than issue 11)."""


class SyncTimeout(CrdtsyncError, TimeoutError):
    """``wait_synced()`` did not see every local change acknowledged in time."""
