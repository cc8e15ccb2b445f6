from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import RelayProcess


@pytest.fixture
def relay_factory(tmp_path: Path) -> Iterator[object]:
    """Start ``crdtsync relay`` processes on loopback; all stopped at teardown."""
    started: list[RelayProcess] = []

    def start(store: str = "relay.db", *args: str) -> RelayProcess:
        relay = RelayProcess(tmp_path / store, tmp_path, *args).start()
        started.append(relay)
        return relay

    yield start
    for relay in started:
        if relay.proc is not None:
            relay.terminate()


@pytest.fixture
def relay(relay_factory) -> RelayProcess:
    """One relay process on its own SQLite store."""
    return relay_factory()


@pytest.fixture
def anyio_backend() -> str:
    """Async tests run on asyncio (anyio's pytest plugin; anyio comes with pycrdt)."""
    return "asyncio"
