"""Log lines for operators: JSON (one object per line) or text, with each event's context.

The relay passes context with ``extra=``: ``document``, ``connection`` (a short id per
websocket connection), ``peer`` (the client's address), ``subject`` (its token's
subject), ``code`` (a close code) and, on the line written when a connection closes, its
totals. Every line, whoever logged it (websockets logs request lines at DEBUG), has
access tokens redacted: a ``token=`` query value and an ``Authorization`` header value
become ``***``.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from typing import Any, Literal

__all__ = ["CONTEXT_FIELDS", "JsonFormatter", "TextFormatter", "configure", "redact_secrets"]

# The context fields a line may carry, in the order a text line shows them.
CONTEXT_FIELDS = (
    "event",
    "document",
    "connection",
    "peer",
    "subject",
    "access",
    "extensions",
    "code",
    "reason",
    "duration_s",
    "messages_in",
    "bytes_in",
    "bytes_out",
    "updates_stored",
    "updates_refused",
    "status",
)

_TOKEN_QUERY = re.compile(r"([?&;]token=)[^&#\s\"']*", re.IGNORECASE)
# (to the end of the line: "Basic <credentials>", "Bearer a b", any scheme)
_AUTH_HEADER = re.compile(r"(authorization\s*:)[^\r\n\"]*", re.IGNORECASE)
# Anything shaped like a JWT, wherever it is: a percent-encoded parameter name, a header
# line websockets logs as malformed, a subprotocol, a cookie.
_JWT = re.compile(r"eyJ[A-Za-z0-9_-]{2,}\.[A-Za-z0-9_-]{2,}\.[A-Za-z0-9_-]*")


def redact_secrets(text: str) -> str:
    """``text`` with access tokens replaced by ``***`` (anything shaped like a JWT, query
    ``token=`` values, Authorization header values)."""
    lowered = text.lower()
    if "eyj" in lowered:
        text = _JWT.sub("***", text)
    if "token" in lowered:
        text = _TOKEN_QUERY.sub(r"\1***", text)
    if "authorization" in lowered:
        text = _AUTH_HEADER.sub(r"\1 ***", text)
    return text


def _iso(created: float) -> str:
    seconds = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created))
    return f"{seconds}.{int(created % 1 * 1000):03d}Z"


def _context(record: logging.LogRecord) -> dict[str, Any]:
    return {k: getattr(record, k) for k in CONTEXT_FIELDS if hasattr(record, k)}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``time`` (ISO 8601, UTC), ``level``, ``logger``,
    ``message``, then the event's context fields; tokens redacted."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": _iso(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": redact_secrets(record.getMessage()),
        }
        for key, value in _context(record).items():
            entry[key] = redact_secrets(value) if isinstance(value, str) else value
        if record.exc_info:
            entry["exception"] = redact_secrets(self.formatException(record.exc_info))
        return json.dumps(entry, default=str)


class TextFormatter(logging.Formatter):
    """``time level logger: message key=value ...`` for a terminal; tokens redacted."""

    def format(self, record: logging.LogRecord) -> str:
        fields = " ".join(f"{k}={_plain(v)}" for k, v in _context(record).items())
        line = (
            f"{_iso(record.created)} {record.levelname:<7} {record.name}: "
            f"{record.getMessage()}" + (f"  {fields}" if fields else "")
        )
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return redact_secrets(line)


def _plain(value: Any) -> str:
    """A context value for a text line: quoted when it could forge one (spaces, newlines)."""
    text = str(value)
    if text and text.isprintable() and " " not in text and '"' not in text:
        return text
    return json.dumps(text)


def configure(level: str, log_format: Literal["json", "text"] = "json") -> None:
    """Send every log line to stderr in ``log_format`` at ``level`` and above."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    logging.basicConfig(level=level, handlers=[handler], force=True)
