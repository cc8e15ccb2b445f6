"""RelayChoice: which of several relays a replica uses (failover), and how a Replica takes
its list of relays; with no sockets."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from crdtsync.client import Replica
from crdtsync.client.relays import RelayChoice

A, B, C = "ws://a", "ws://b", "ws://c"


def test_the_first_relay_is_used_and_a_failure_moves_to_the_next_at_once() -> None:
    choice = RelayChoice([A, B, C], probe_s=10)
    assert choice.current == A
    assert not choice.away
    assert choice.failed(A, now=0.0)  # at once
    assert choice.current == B
    assert choice.away
    assert choice.failed(B, now=0.1)
    assert choice.current == C


def test_when_every_relay_failed_in_a_row_the_caller_backs_off_then_starts_at_the_first() -> None:
    choice = RelayChoice([A, B], probe_s=10)
    assert choice.failed(A, 0.0)
    assert not choice.failed(B, 0.1)  # both failed: back off
    assert choice.current == A
    assert choice.failed(A, 5.0)  # a new round: the next one at once again
    assert choice.current == B


def test_a_connection_that_proved_healthy_starts_a_new_round() -> None:
    choice = RelayChoice([A, B], probe_s=10)
    choice.failed(A, 0.0)
    choice.connected(B)
    # B fails after a healthy while: A is tried at once (a new round), not a backoff.
    assert choice.failed(B, 60.0)
    assert choice.current == A


def test_a_failure_of_a_relay_no_longer_in_use_changes_nothing() -> None:
    choice = RelayChoice([A, B, C], probe_s=10)
    choice.failed(A, 0.0)  # one connection moved on to B
    assert choice.failed(A, 0.0)  # another connection's failure on A: retry, on B
    assert choice.current == B


def test_the_home_is_probed_every_probe_s_while_away_and_taken_back_once_it_answers() -> None:
    choice = RelayChoice([A, B], probe_s=10)
    assert not choice.probe_due(100.0)  # at home: never probed
    choice.failed(A, 0.0)
    choice.connected(B)
    assert not choice.probe_due(9.9)
    assert choice.probe_due(10.0)
    assert not choice.probed(False, 10.0)  # not back yet: asked again later
    assert choice.current == B
    assert not choice.probe_due(19.9)
    assert choice.probe_due(20.0)
    assert choice.probed(True, 20.0)
    assert choice.current == A
    assert not choice.away
    assert not choice.probed(True, 30.0)  # (at home: nothing to move)


def test_one_relay_backs_off_after_each_failure() -> None:
    choice = RelayChoice([A])
    for t in range(5):
        assert not choice.failed(A, float(t))
        assert choice.current == A
        assert not choice.probe_due(1e9)


@pytest.mark.parametrize("bad", [[], ()])
def test_no_relay_or_a_bad_probe_interval_is_refused(bad: list[str]) -> None:
    with pytest.raises(ValueError, match="at least one"):
        RelayChoice(bad)
    with pytest.raises(ValueError, match="probe_s"):
        RelayChoice([A], probe_s=0)


def test_others_left_says_whether_a_failure_now_would_move_at_once() -> None:
    choice = RelayChoice([A, B, C], probe_s=10)
    assert choice.others_left()
    choice.failed(A, 0.0)
    assert choice.others_left()  # on B; C is left
    choice.failed(B, 0.0)
    assert not choice.others_left()  # on C: every other one failed in a row
    assert not RelayChoice([A]).others_left()


def test_a_nan_probe_interval_is_refused() -> None:
    with pytest.raises(ValueError, match="probe_s"):
        RelayChoice([A], probe_s=float("nan"))


@pytest.mark.parametrize(
    ("relay", "message"),
    [
        ([], "empty list"),
        (["ws://a", "http://b"], "ws:// or wss://"),
        (["ws://a", 5], "ws:// or wss://"),
    ],
)
def test_a_replica_refuses_a_list_of_relays_it_cannot_use(
    tmp_path: Path, relay: Any, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        Replica(tmp_path / "r.db", relay=relay)


def test_a_replica_names_each_relay_once_in_order(tmp_path: Path) -> None:
    replica = Replica(tmp_path / "r.db", relay=["ws://a/", "ws://b", "ws://a"])
    assert replica.relays == ("ws://a", "ws://b")
    assert replica.relay == "ws://a"
