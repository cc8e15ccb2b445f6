"""Document names and relay settings: what is accepted, what is refused, and why."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from crdtsync.errors import InvalidDocumentName
from crdtsync.settings import MAX_DOCUMENT_NAME_BYTES, RelaySettings, validate_document_name

# -- document names -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "team/todo",
        "a.b",
        "x@y:z",
        "notes",
        "a/b/c",
        ".hidden",
        "...",  # only "." and ".." are special segments
        "v1.2-rc_3~x",
        "%2F-kept-verbatim",
        "it's(1)+2,3;4=5!$&*",
        "a" * MAX_DOCUMENT_NAME_BYTES,
        "/".join(["ab"] * 171),  # 512 bytes of segments
    ],
)
def test_valid_document_name_is_returned_unchanged(name: str) -> None:
    assert validate_document_name(name) == name


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("", "^document name is empty$"),
        (".", r"^document name has an empty, '\.' or '\.\.' segment: '\.'$"),
        ("..", r"^document name has an empty, '\.' or '\.\.' segment: '\.\.'$"),
        ("a/../b", r"segment: 'a/\.\./b'$"),
        ("a/./b", r"segment: 'a/\./b'$"),
        ("../etc/passwd", r"segment: '\.\./etc/passwd'$"),
        ("a//b", "segment: 'a//b'$"),
        ("/a", "segment: '/a'$"),
        ("a/", "segment: 'a/'$"),
        ("/", "segment: '/'$"),
        ("a b", "^document name contains ' '$"),
        ("a?b", r"^document name contains '\?'$"),
        ("a#b", "^document name contains '#'$"),
        ("a\\b", r"^document name contains '\\\\'$"),
        ("a\x00b", r"^document name contains '\\x00'$"),
        ("tab\there", r"^document name contains '\\t'$"),
        ("café", "^document name contains 'é'$"),
        ("a" * (MAX_DOCUMENT_NAME_BYTES + 1), "^document name exceeds 512 bytes$"),
        ("é" * 257, "^document name exceeds 512 bytes$"),  # 257 characters, 514 bytes
    ],
    ids=lambda v: repr(v)[:40],
)
def test_invalid_document_name_is_refused_with_the_reason(name: str, message: str) -> None:
    with pytest.raises(InvalidDocumentName, match=message):
        validate_document_name(name)


def test_invalid_document_name_is_a_value_error_closing_with_1008() -> None:
    with pytest.raises(ValueError, match="is empty") as excinfo:
        validate_document_name("")
    assert isinstance(excinfo.value, InvalidDocumentName)
    assert excinfo.value.close_code == 1008


# -- relay settings --------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def no_crdtsync_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test sees only the CRDTSYNC_* variables it sets itself."""
    for key in list(os.environ):
        if key.startswith("CRDTSYNC_"):
            monkeypatch.delenv(key)


@pytest.fixture
def toml_file(tmp_path: Path) -> Path:
    path = tmp_path / "relay.toml"
    path.write_text(
        'host = "0.0.0.0"\nport = 9000\nsynchronous = "FULL"\nmax_message_bytes = 2048\n'
    )
    return path


def test_defaults_without_any_source() -> None:
    settings = RelaySettings.load()
    assert (settings.host, settings.port, settings.synchronous) == ("127.0.0.1", 8765, "NORMAL")
    assert settings.store == Path("crdtsync-relay.db")
    assert settings.max_message_bytes == 20 * 1024 * 1024


def test_toml_file_values_are_loaded(toml_file: Path) -> None:
    settings = RelaySettings.load(toml_file)
    assert type(settings) is RelaySettings
    assert settings.host == "0.0.0.0"
    assert settings.port == 9000
    assert settings.synchronous == "FULL"
    assert settings.max_message_bytes == 2048
    assert settings.log_level == "INFO"  # not in the file: the default


def test_environment_overrides_the_toml_file(
    toml_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CRDTSYNC_PORT", "9100")
    settings = RelaySettings.load(toml_file)
    assert settings.port == 9100
    assert settings.host == "0.0.0.0"  # still from the file


def test_environment_overrides_defaults_without_a_file(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CRDTSYNC_PORT", "9100")
    monkeypatch.setenv("CRDTSYNC_LOG_LEVEL", "DEBUG")
    settings = RelaySettings.load()
    assert (settings.port, settings.log_level) == (9100, "DEBUG")


def test_explicit_values_beat_environment_and_toml_file(
    toml_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CRDTSYNC_PORT", "9100")
    monkeypatch.setenv("CRDTSYNC_HOST", "10.0.0.1")
    settings = RelaySettings.load(toml_file, port=9200)
    assert settings.port == 9200  # explicit
    assert settings.host == "10.0.0.1"  # environment
    assert settings.max_message_bytes == 2048  # file


def test_negative_port_is_a_validation_error() -> None:
    with pytest.raises(
        ValidationError, match=r"port\n  Input should be greater than or equal to 0"
    ):
        RelaySettings.load(port=-1)


def test_negative_port_from_the_environment_is_a_validation_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("CRDTSYNC_PORT", "-1")
    with pytest.raises(
        ValidationError, match=r"port\n  Input should be greater than or equal to 0"
    ):
        RelaySettings.load()


def test_negative_port_from_the_toml_file_is_a_validation_error(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("port = -5\n")
    with pytest.raises(
        ValidationError, match=r"port\n  Input should be greater than or equal to 0"
    ):
        RelaySettings.load(path)


def test_port_above_65535_is_a_validation_error() -> None:
    with pytest.raises(
        ValidationError, match=r"port\n  Input should be less than or equal to 65535"
    ):
        RelaySettings.load(port=65536)


def test_unknown_key_in_the_toml_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "typo.toml"
    path.write_text("prot = 9000\n")
    with pytest.raises(ValidationError, match=r"prot\n  Extra inputs are not permitted"):
        RelaySettings.load(path)


def test_synchronous_off_is_not_a_relay_setting() -> None:
    # UpdateLog accepts OFF; the relay's settings allow only NORMAL, FULL and EXTRA
    with pytest.raises(ValidationError, match="synchronous"):
        RelaySettings.load(synchronous="OFF")


def test_loading_does_not_read_a_file_it_was_not_given(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a relay.toml in the working directory is not picked up implicitly
    (tmp_path / "relay.toml").write_text("port = 1\n")
    monkeypatch.chdir(tmp_path)
    assert RelaySettings.load().port == 8765


def test_missing_toml_file_is_an_error(tmp_path: Path) -> None:
    missing = tmp_path / "missing.toml"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        RelaySettings.load(missing)


# -- access token settings -------------------------------------------------------------------

TOKEN_SECRET = "a shared secret of at least 32 bytes"


def test_tokens_are_not_required_without_keys() -> None:
    settings = RelaySettings.load()
    assert (settings.token_secrets, settings.token_public_keys) == ([], [])
    assert (settings.token_issuer, settings.token_audience) == (None, None)
    assert (settings.token_leeway_s, settings.token_allow_no_exp) == (30.0, False)
    assert settings.token_recheck_s == 60.0
    assert not settings.tokens_required
    assert settings.token_verifier() is None


def test_token_secrets_make_tokens_required_and_stay_out_of_the_repr() -> None:
    settings = RelaySettings.load(
        token_secrets=[TOKEN_SECRET], token_issuer="me", token_audience="relay"
    )
    assert settings.tokens_required
    assert TOKEN_SECRET not in repr(settings)
    verifier = settings.token_verifier()
    assert verifier is not None
    assert (verifier.issuer, verifier.audience, verifier.leeway_s) == ("me", "relay", 30.0)


def test_token_secrets_from_the_environment_and_the_toml_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "relay.toml"
    path.write_text(
        f'token_secrets = ["kid=k1,{TOKEN_SECRET}"]\ntoken_leeway_s = 5\n'
        'token_public_keys = ["kid=k2,/etc/crdtsync/key.pem"]\n'
    )
    settings = RelaySettings.load(path)
    assert settings.token_secrets == [f"kid=k1,{TOKEN_SECRET}"]
    assert settings.token_public_keys == ["kid=k2,/etc/crdtsync/key.pem"]
    assert settings.token_leeway_s == 5
    monkeypatch.setenv("CRDTSYNC_TOKEN_SECRETS", f'["{TOKEN_SECRET}x"]')
    monkeypatch.setenv("CRDTSYNC_TOKEN_ALLOW_NO_EXP", "true")
    settings = RelaySettings.load(path)
    assert settings.token_secrets == [f"{TOKEN_SECRET}x"]
    assert settings.token_allow_no_exp


def test_short_token_secret_is_a_validation_error_that_does_not_repeat_it() -> None:
    with pytest.raises(ValidationError, match="token secret #2 is 9 bytes") as excinfo:
        RelaySettings.load(token_secrets=[TOKEN_SECRET, "tooshort!"])
    assert "tooshort" not in str(excinfo.value)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"token_public_keys": ["kid=k1"]}, "needs a comma"),
        ({"token_public_keys": [""]}, "empty key entry"),
        ({"token_leeway_s": -1}, "token_leeway_s"),
        ({"token_recheck_s": 0}, "token_recheck_s"),
    ],
)
def test_bad_token_settings_are_validation_errors(values: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        RelaySettings.load(**values)


def test_token_verifier_reads_the_key_files(tmp_path: Path) -> None:
    settings = RelaySettings.load(token_public_keys=[str(tmp_path / "missing.pem")])
    assert settings.tokens_required
    with pytest.raises(ValueError, match="cannot read token public key"):
        settings.token_verifier()


@pytest.mark.parametrize(
    "url", ["redis://127.0.0.1:6379/0", "rediss://host/1", "unix:///run/r.sock"]
)
def test_a_redis_store_url_stays_a_url(url):
    settings = RelaySettings(store=url)
    assert settings.store == url
    assert settings.shared_store


@pytest.mark.parametrize("url", ["http://127.0.0.1:6379/0", "postgres://host/db"])
def test_another_url_is_refused_clearly_instead_of_becoming_a_file_name(url):
    with pytest.raises(ValidationError, match="an SQLite file or a redis://"):
        RelaySettings(store=url)


def test_a_file_store_is_a_path():
    settings = RelaySettings(store="some/dir/relay.db")
    assert settings.store == Path("some/dir/relay.db")
    assert not settings.shared_store
