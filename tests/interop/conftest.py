"""Fixtures for the interop tests: the reference y-websocket server and stock Yjs clients.

Every test in this folder is marked ``interop`` and is skipped, with the command that
fixes it, when ``node`` or the pinned npm packages are missing. When such a test fails,
the stderr tails of the Node processes it started are attached to the report.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import pytest
from helpers import AsgiRelayProcess
from nodekit import (
    INTEROP_DIR,
    TRACES_DIR,
    MakeYjsClient,
    ReferenceServer,
    YjsClient,
    missing_requirements,
)

_HANDLES = pytest.StashKey[list[Any]]()
_MISSING = pytest.StashKey[str | None]()


class _HasStderr(Protocol):
    name: str

    def stderr_tail(self) -> str: ...


def _in_interop_dir(item: pytest.Item) -> bool:
    return Path(item.path).resolve().is_relative_to(INTEROP_DIR)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    ours = [item for item in items if _in_interop_dir(item)]
    if not ours:
        return
    if _MISSING not in config.stash:
        config.stash[_MISSING] = missing_requirements()
    reason = config.stash[_MISSING]
    for item in ours:
        if item.get_closest_marker("interop") is None:
            item.add_marker(pytest.mark.interop)
        if reason is not None:
            item.add_marker(pytest.mark.skip(reason=f"interop kit unavailable: {reason}"))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if report.failed:
        for handle in item.stash.get(_HANDLES, []):
            tail = handle.stderr_tail() or "(empty)"
            report.sections.append((f"stderr tail of {handle.name}", tail))
    return report


def _track(request: pytest.FixtureRequest, handle: _HasStderr) -> None:
    handles = request.node.stash.setdefault(_HANDLES, [])
    handles.append(handle)


@pytest.fixture
def reference_server(request: pytest.FixtureRequest) -> Iterator[ReferenceServer]:
    """A running reference y-websocket server on 127.0.0.1 (memory only), stopped after."""
    server = ReferenceServer()
    _track(request, server)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@dataclass(frozen=True)
class ServedRelay:
    """A relay under test: ``url`` (documents are ``url/<name>``), the query ``params``
    every client adds (the ASGI example's key), and its /healthz base as HTTP."""

    url: str
    params: dict[str, str]
    http: str
    how: str


@pytest.fixture(params=["standalone", "asgi"])
def relay(
    request: pytest.FixtureRequest, relay_factory: Callable[..., Any], tmp_path: Path
) -> Iterator[ServedRelay]:
    """The relay each interop case runs against twice: ``crdtsync relay``, and the same
    relay mounted in a FastAPI app under uvicorn (crdtsync.server.asgi, the example
    examples/fastapi_app.py with its API key in front)."""
    if request.param == "standalone":
        process = relay_factory()
        yield ServedRelay(process.url, {}, process.url.replace("ws://", "http://", 1), "relay")
        return
    pytest.importorskip("uvicorn", reason="the asgi extra: pip install -e '.[asgi]'")
    pytest.importorskip("fastapi", reason="the asgi extra: pip install -e '.[asgi]'")
    asgi = AsgiRelayProcess(tmp_path / "asgi-relay.db", tmp_path).start()
    _track(request, _UvicornLog(asgi))
    try:
        yield ServedRelay(asgi.url, asgi.params, asgi.http, "asgi")
    finally:
        asgi.terminate()


class _UvicornLog:
    def __init__(self, process: AsgiRelayProcess) -> None:
        self.name = "uvicorn (the ASGI relay)"
        self._process = process

    def stderr_tail(self) -> str:
        return self._process.output()[-4000:]


@pytest.fixture
def make_yjs_client(request: pytest.FixtureRequest) -> Iterator[MakeYjsClient]:
    """Start stock Yjs clients: ``make_yjs_client(url, room, offline=..., params=...)``.

    Keyword arguments are those of :class:`nodekit.YjsClient`. Every client is closed
    (quit, then SIGTERM, then SIGKILL) after the test.
    """
    clients: list[YjsClient] = []

    def make(url: str, room: str, **kwargs: Any) -> YjsClient:
        kwargs.setdefault("name", f"yjs-client-{len(clients) + 1}[{room}]")
        client = YjsClient(url, room, **kwargs)
        clients.append(client)
        _track(request, client)
        return client.start()

    try:
        yield make
    finally:
        for client in reversed(clients):
            client.close()


@pytest.fixture
def trace_path() -> Callable[[str], Path]:
    """Path of a real editing trace by name (``"sveltecomponent"``); skips if absent."""

    def find(name: str) -> Path:
        path = TRACES_DIR / f"{name}.json.gz"
        if not path.is_file():
            pytest.skip(f"editing trace {path} not found (set CRDTSYNC_TRACES_DIR)")
        return path

    return find
