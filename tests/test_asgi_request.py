"""How the ASGI mount reads a request (crdtsync.server.asgi.AsgiRequest): the path under
the mount, raw as sent, whatever the framework did to ``path`` and ``root_path``."""

from __future__ import annotations

from typing import Any

import pytest

from crdtsync.server.asgi import AsgiRequest


def scope(path: str, raw: bytes | None, root: str = "", query: bytes = b"") -> dict[str, Any]:
    s: dict[str, Any] = {
        "type": "websocket",
        "path": path,
        "root_path": root,
        "query_string": query,
        "headers": [(b"host", b"example"), (b"x-forwarded-for", b"10.0.0.1")],
    }
    if raw is not None:
        s["raw_path"] = raw
    return s


@pytest.mark.parametrize(
    ("path", "raw", "root", "expected"),
    [
        # Starlette's Mount (ASGI's convention): the full path, the mount in root_path.
        ("/sync/team/a b", b"/sync/team/a%20b", "/sync", "/team/a%20b"),
        ("/sync/", b"/sync/", "/sync", "/"),
        ("/sync", b"/sync", "/sync", "/"),
        # The app at the root: nothing to strip.
        ("/team/doc", b"/team/doc", "", "/team/doc"),
        # A server that stripped root_path from path already (and from raw_path).
        ("/team/doc", b"/team/doc", "/sync", "/team/doc"),
        # A mount prefix that needed encoding: compared decoded, stripped by segments.
        ("/sy nc/doc", b"/sy%20nc/doc", "/sy nc", "/doc"),
        # No raw_path (optional in ASGI): the decoded path.
        ("/sync/doc", None, "/sync", "/doc"),
    ],
)
def test_the_path_is_the_raw_path_under_the_mount(
    path: str, raw: bytes | None, root: str, expected: str
) -> None:
    assert AsgiRequest.of(scope(path, raw, root)).path == expected


def test_the_query_and_headers_are_kept_and_the_scope_is_attached() -> None:
    s = scope("/sync/doc", b"/sync/doc", "/sync", b"crdtsync=1&token=abc")
    request = AsgiRequest.of(s)
    assert request.path == "/doc?crdtsync=1&token=abc"
    assert request.headers["Host"] == "example"
    assert request.headers["X-Forwarded-For"] == "10.0.0.1"
    assert request.scope is s
