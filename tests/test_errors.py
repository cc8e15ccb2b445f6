"""The one map from close codes to what a client does, and the errors that choose the codes."""

from __future__ import annotations

import pytest

from crdtsync.errors import (
    AccessDenied,
    CloseCode,
    InvalidDocumentName,
    LimitExceeded,
    MalformedMessage,
    MessageTooLarge,
    Retry,
    StoreError,
    TokenRefused,
    close_reason,
    retry_after_close,
)


@pytest.mark.parametrize(
    ("error", "retry"),
    [
        (MalformedMessage("garbage"), Retry.NEVER),  # the same bytes would be refused again
        (MessageTooLarge("64 MiB"), Retry.NEVER),
        (LimitExceeded("too many clients"), Retry.LATER),
        (AccessDenied("read-only"), Retry.LATER),
        (TokenRefused("bad_signature", "no key verifies it"), Retry.LATER),
        (InvalidDocumentName("../x"), Retry.LATER),
        (StoreError("disk full"), Retry.BACKOFF),  # nothing stored: resend soon
    ],
)
def test_each_error_closes_with_a_code_the_client_reacts_to_as_it_should(
    error: Exception, retry: Retry
) -> None:
    assert retry_after_close(error.close_code) is retry  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    "code",
    [
        None,  # no close frame: the connection dropped
        CloseCode.GOING_AWAY,  # the relay is restarting
        CloseCode.INTERNAL_ERROR,
        CloseCode.TRY_AGAIN_LATER,  # a slow reader, a store failure
        CloseCode.UNAUTHORIZED,  # the token expired: a fresh one after the backoff
        4999,  # an application code this version does not know
    ],
)
def test_other_closes_reconnect_after_the_backoff(code: int | None) -> None:
    assert retry_after_close(code) is Retry.BACKOFF


def test_close_reason_fits_a_close_frame_and_cuts_on_a_character() -> None:
    assert close_reason("short") == "short"
    cut = close_reason("é" * 100)
    assert len(cut.encode()) <= 123
    assert cut.endswith("...")
    assert set(cut[:-3]) == {"é"}
