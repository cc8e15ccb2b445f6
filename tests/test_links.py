"""Region links' pure parts (issue 12): where a link resumes, its URL, its messages, and
the regions' settings. The links themselves run in tests/e2e/test_regions.py."""

from __future__ import annotations

import pytest
from pycrdt import Doc, Text
from pydantic import ValidationError

from crdtsync.backend import LinkCheckpoint, StoreIdentity
from crdtsync.errors import MalformedMessage
from crdtsync.integrity import Ledger, Shipped, Writer
from crdtsync.protocol import ExtLink, ExtLinked, ExtLinkUpdate, decode_message, write_var_uint
from crdtsync.server.links import link_url, resume_from
from crdtsync.settings import RelaySettings, validate_region
from crdtsync.updates import check_update

ME = StoreIdentity("source-store", 3)


def test_first_contact_sweeps() -> None:
    resume = resume_from(ME, ExtLinked("target-store", 1), None)
    assert resume.sweep
    assert resume.cursor == 0


def test_both_ends_agreeing_resume_from_the_lower_checkpoint() -> None:
    linked = ExtLinked("target-store", 1, "source-store", 3, 120)
    out = LinkCheckpoint("out", "us", "target-store", 1, 100)
    resume = resume_from(ME, linked, out)
    assert (resume.cursor, resume.sweep) == (100, False)


def test_a_target_checkpoint_never_confirmed_here_sweeps() -> None:
    # The target recorded 120, but this end never did (it stopped first, or the request
    # overtook updates the target never stored): resuming at 120 could skip them.
    resume = resume_from(ME, ExtLinked("target-store", 1, "source-store", 3, 120), None)
    assert (resume.cursor, resume.sweep) == (0, True)


@pytest.mark.parametrize(
    ("linked", "why"),
    [
        (ExtLinked("target-store", 1, "another-store", 3, 120), "emptied source"),
        (ExtLinked("target-store", 1, "source-store", 2, 120), "restored source"),
    ],
)
def test_a_checkpoint_of_another_source_store_or_epoch_sweeps(linked: ExtLinked, why: str) -> None:
    assert resume_from(ME, linked, None).sweep, why


@pytest.mark.parametrize(
    "out",
    [
        LinkCheckpoint("out", "us", "old-target-store", 1, 100),  # the target was replaced
        LinkCheckpoint("out", "us", "target-store", 0, 100),  # ... or restored (epoch raised)
    ],
)
def test_a_target_replaced_or_restored_since_sweeps(out: LinkCheckpoint) -> None:
    linked = ExtLinked("target-store", 1, "source-store", 3, 120)
    assert resume_from(ME, linked, out).sweep


def test_the_link_url_is_the_multiplexed_endpoint_with_the_region_and_token() -> None:
    url = link_url("wss://us.example:8443/some/path?x=1", "eu", "t.o.k")
    assert url == "wss://us.example:8443/?crdtsync=1&mux=1&region=eu&token=t.o.k"
    assert (
        link_url("ws://127.0.0.1:9", "eu", None) == "ws://127.0.0.1:9/?crdtsync=1&mux=1&region=eu"
    )


@pytest.mark.parametrize(
    "msg",
    [
        ExtLink("s", 1),
        ExtLink("s" * 64, 2**40, 0),
        ExtLink("s", 1, 2**53 - 1),
        ExtLinked("t", 1),
        ExtLinked("t", 9, "s", 3, 77),
        ExtLinkUpdate(1, b"\x00\x00"),
        ExtLinkUpdate(2**40, b"u" * 300, ((7, "key"), (2**53 - 1, "sub:" + "a" * 1020))),
    ],
)
def test_link_messages_round_trip(msg: object) -> None:
    assert decode_message(msg.encode()) == msg  # type: ignore[attr-defined]


@pytest.mark.parametrize("cut", [3, 4, 5])
def test_a_truncated_link_message_is_malformed(cut: int) -> None:
    data = ExtLinked("t", 9, "s", 3, 77).encode()
    with pytest.raises(MalformedMessage):
        decode_message(data[:cut])


@pytest.mark.parametrize(
    "owners",
    [
        ((7, "nobody"),),  # neither "key" nor "sub:..."
        ((7, ""),),
        ((7, "sub:" + "a" * 1021),),  # over MAX_OWNER_BYTES
    ],
)
def test_a_link_update_naming_no_owner_is_malformed(owners: tuple[tuple[int, str], ...]) -> None:
    with pytest.raises(MalformedMessage, match="no owner"):
        decode_message(ExtLinkUpdate(1, b"\x00\x00", owners).encode())


def test_a_link_update_declaring_more_owners_than_it_holds_is_malformed() -> None:
    data = ExtLinkUpdate(1, b"\x00\x00").encode()[:-1] + write_var_uint(2**30)
    with pytest.raises(MalformedMessage, match="owners"):
        decode_message(data)


def test_a_link_records_the_owners_its_update_names_and_then_refuses_others() -> None:
    alice = Doc(client_id=11)
    alice.get("text", type=Text).insert(0, "a")
    first = alice.get_update()
    ledger = Ledger()
    verdict = ledger.judge(first, check_update(first), Shipped(owners={11: "sub:alice"}))
    assert verdict.accepted_whole
    assert ledger.owners == {11: "sub:alice"}
    before = alice.get_state()
    alice.get("text", type=Text).insert(1, "b")
    after = alice.get_update(before)
    verdict = ledger.judge(after, check_update(after), Writer(subject="mallory"))
    assert verdict.refusals
    assert "belongs to another writer" in verdict.refusals[0].reason
    assert ledger.judge(after, check_update(after), Writer(subject="alice")).accepted_whole
    # Content the target holds already (from elsewhere, with no owner): a link naming
    # its owner records it all the same.
    carol = Doc(client_id=13)
    carol.get("text", type=Text).insert(0, "c")
    held = carol.get_update()
    assert ledger.judge(held, check_update(held), Writer()).accepted_whole
    assert 13 not in ledger.owners
    again = ledger.judge(held, check_update(held), Shipped(owners={13: "key"}), [held])
    assert not again.refusals
    assert ledger.owners[13] == "key"
    # The fast path (appends only) records them as well.
    bob = Doc(client_id=12)
    bob.get("text", type=Text).insert(0, "b")
    fast = Ledger()
    assert fast.append_only(check_update(bob.get_update()), Shipped(owners={12: "key"}))
    assert fast.owners == {12: "key"}


@pytest.mark.parametrize("name", ["eu", "us-east-1", "a", "0", "x" * 32])
def test_region_names_that_are_valid(name: str) -> None:
    assert validate_region(name) == name


@pytest.mark.parametrize("name", ["", "-eu", "EU", "eu_west", "x" * 33, "eu/1", "é"])
def test_region_names_that_are_refused(name: str) -> None:
    with pytest.raises(ValueError, match="region name"):
        validate_region(name)


def test_peers_need_a_region_of_their_own_and_ws_urls() -> None:
    with pytest.raises(ValidationError, match="peers need"):
        RelaySettings(peers={"us": "ws://x/"})
    with pytest.raises(ValidationError, match="this relay's own"):
        RelaySettings(region="eu", peers={"eu": "ws://x/"})
    with pytest.raises(ValidationError, match="ws:// or wss://"):
        RelaySettings(region="eu", peers={"us": "http://x/"})
    with pytest.raises(ValidationError, match="region name"):
        RelaySettings(region="eu", peers={"US": "ws://x/"})
    settings = RelaySettings(region="eu", peers={"us": "wss://us.example/"})
    assert settings.peers == {"us": "wss://us.example/"}
    assert "peer_token" not in repr(RelaySettings(region="eu", peer_token="secret-token"))


def test_peers_come_from_the_environment_as_json(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CRDTSYNC_REGION", "eu")
    monkeypatch.setenv("CRDTSYNC_PEERS", '{"us": "ws://127.0.0.1:1/", "ap": "ws://127.0.0.1:2/"}')
    settings = RelaySettings()
    assert settings.region == "eu"
    assert set(settings.peers) == {"us", "ap"}
