"""Settings models: validated by pydantic, loaded from flags, environment and TOML on request.

Nothing is read at import. Building :class:`RelaySettings` reads the environment
(``CRDTSYNC_*``), as any pydantic-settings model does; :meth:`RelaySettings.load` adds
an optional TOML file. Precedence: explicit values (CLI flags) > environment > TOML
file > defaults.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from .errors import InvalidDocumentName

if TYPE_CHECKING:
    from .auth import TokenVerifier

__all__ = ["MAX_DOCUMENT_NAME_BYTES", "RelaySettings", "validate_document_name", "validate_region"]

_REGION = re.compile(r"[a-z0-9][a-z0-9-]{0,31}")


def validate_region(name: str) -> str:
    """A region's name: 1-32 of a-z, 0-9 and "-", not starting with "-".

    Raises:
        ValueError: it is not one.
    """
    if not isinstance(name, str) or _REGION.fullmatch(name) is None:
        raise ValueError(f"a region name is 1-32 of a-z, 0-9 and '-', not {str(name)[:40]!r}")
    return name


MAX_DOCUMENT_NAME_BYTES = 512
# Stock clients put the room name in the URL path unencoded (DESIGN: facts from the anchors);
# allow what a URL path segment may hold unencoded, plus "%" escapes kept verbatim.
_NAME_CHARS = re.compile(r"[A-Za-z0-9\-._~!$&'()*+,;=:@%/]+")


def validate_document_name(name: str) -> str:
    """Return ``name`` if it is a valid document name.

    A name is 1-512 bytes of URL path characters, "/"-separated segments, none of
    them empty, "." or "..": it can never climb out of a directory or alias another
    name.

    Raises:
        InvalidDocumentName: with the reason.
    """
    if not name:
        raise InvalidDocumentName("document name is empty")
    if len(name.encode("utf-8")) > MAX_DOCUMENT_NAME_BYTES:
        raise InvalidDocumentName(f"document name exceeds {MAX_DOCUMENT_NAME_BYTES} bytes")
    if not _NAME_CHARS.fullmatch(name):
        bad = next(ch for ch in name if not _NAME_CHARS.fullmatch(ch))
        raise InvalidDocumentName(f"document name contains {bad!r}")
    for segment in name.split("/"):
        if segment in ("", ".", ".."):
            raise InvalidDocumentName(f"document name has an empty, '.' or '..' segment: {name!r}")
    return name


class RelaySettings(BaseSettings):
    """Settings of one relay process. Every limit has a unit in its name."""

    # hide_input_in_errors: a refused token secret must not be echoed in a validation error
    model_config = SettingsConfigDict(
        env_prefix="CRDTSYNC_", extra="forbid", hide_input_in_errors=True
    )

    host: str = "127.0.0.1"
    port: int = Field(default=8765, ge=0, le=65535)
    # an SQLite file (one relay process), or a Redis URL shared by any number of relay
    # processes: redis://[[user]:password@]host:port/db, rediss://..., unix://...
    store: Path | str = Path("crdtsync-relay.db")
    synchronous: Literal["NORMAL", "FULL", "EXTRA"] = "NORMAL"
    # a Redis store: an append is acknowledged only once this many replicas received it
    # (Redis's WAIT: received, not yet on their disks; Redis 7.0 has no WAITAOF)
    redis_wait_replicas: int = Field(default=0, ge=0)
    # (the relay reads a few messages ahead per connection: each may be this large)
    max_message_bytes: int = Field(default=20 * 1024 * 1024, ge=1024)
    answer_piece_bytes: int = Field(default=512 * 1024, ge=1024)
    compact_after_updates: int = Field(default=1000, ge=1)
    max_connections: int = Field(default=10_000, ge=1)
    # a multiplexed connection (issue 11): documents open on it at once, folders it keeps,
    # and documents it may describe by digest in one folder (when its cursor is of no use)
    max_channels_per_connection: int = Field(default=10_000, ge=1)
    max_folders_per_connection: int = Field(default=64, ge=1)
    max_folder_documents: int = Field(default=100_000, ge=1)
    # channels opened per second on one multiplexed connection (each reads the store, as
    # a sync request does; its channel then has the sync-request budget of a connection)
    channel_opens_per_s: float = Field(default=500.0, gt=0)
    channel_open_burst: int = Field(default=1000, ge=1)
    # a reader whose unsent backlog stays above this for slow_reader_grace_s is closed
    # (1013) and resyncs on reconnect; above it by more than the largest update: at once
    max_write_buffer_bytes: int = Field(default=32 * 1024 * 1024, ge=1024)
    slow_reader_grace_s: float = Field(default=5.0, ge=0)
    # the backlogs of all connections together: over it, the largest are closed (1013)
    # (None: 256 MiB, or 8 times max_update_bytes if that is more)
    max_write_buffer_total_bytes: int | None = Field(default=None, ge=1024)
    close_timeout_s: float = Field(default=5.0, gt=0)
    # on SIGTERM: what is queued is stored at once; connections and compactions get this long
    drain_timeout_s: float = Field(default=10.0, gt=0)
    # -- caps on what one connection may make the relay do (README: limits) --
    # an update larger than this is refused (1009); the automerge-paper trace's whole
    # document, sent as one update, is 4.5 MB merged, 0.4 MB as a Doc encodes it
    max_update_bytes: int = Field(default=16 * 1024 * 1024, ge=1024)
    max_update_clients: int = Field(default=10_000, ge=1)  # client ids in one update (1008)
    max_update_structs: int = Field(default=2_000_000, ge=1)  # structs + Any values (1008)
    max_document_clients: int = Field(default=50_000, ge=1)  # client ids one document keeps
    # stored bytes of one document (snapshot and log): new content beyond it is refused
    max_document_bytes: int = Field(default=512 * 1024 * 1024, ge=1024)
    # messages at least this large are checked in a worker process, off the event loop
    offload_update_bytes: int = Field(default=256 * 1024, ge=1024)
    # seconds of worker time per second one connection's repeats may take (paced beyond)
    work_share: float = Field(default=0.25, gt=0)
    # stored clocks one update may repeat (compared one by one): beyond, it is refused
    max_repeat_units: int = Field(default=1_000_000, ge=1)
    # a connection's updates are paced (its reading pauses) beyond these rates
    updates_per_s: float = Field(default=200_000.0, gt=0)
    update_bytes_per_s: float = Field(default=32 * 1024 * 1024, gt=0)
    # sync requests (step 1) per connection: paced, and answered once per batch
    sync_requests_per_s: float = Field(default=2.0, gt=0)
    sync_request_burst: int = Field(default=10, ge=1)
    # presence: over these, states are dropped (never stored or relayed)
    presence_per_s: float = Field(default=20.0, gt=0)
    presence_burst: int = Field(default=60, ge=1)
    max_presence_states_per_connection: int = Field(default=8, ge=1)
    max_presence_state_bytes: int = Field(default=16 * 1024, ge=64)
    max_presence_states_per_room: int = Field(default=1_000, ge=1)
    max_presence_bytes_per_room: int = Field(default=4 * 1024 * 1024, ge=1024)
    # a connection refused this many times within strike_window_s is closed (1008)
    max_strikes: int = Field(default=50, ge=1)
    strike_window_s: float = Field(default=10.0, gt=0)
    max_connections_per_address: int = Field(default=100, ge=1)
    # X-Forwarded-For is believed only from these addresses (your load balancers)
    trusted_proxies: list[str] = Field(default_factory=list)
    # a connection that sends no sync message (step 1, step 2 or update) in time is closed
    sync_timeout_s: float = Field(default=30.0, gt=0)
    compaction_workers: int = Field(default=1, ge=0)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["json", "text"] = "json"
    # GET /metrics (Prometheus) needs "Authorization: Bearer <this>" when set
    metrics_token: str | None = Field(default=None, repr=False)
    # The integrity rule (README: what the relay guarantees). Off only to show what it
    # prevents (crdtsync check's negative control); never in a deployment.
    integrity: bool = True
    # -- access tokens (README: access tokens); required exactly when a key is configured --
    # HS256 secrets, "[kid=NAME,]SECRET", at least 32 bytes each; never in a repr
    token_secrets: list[str] = Field(default_factory=list, repr=False)
    # PEM public key or certificate files, "[kid=NAME,]PATH" (RS256/ES256/ES384/EdDSA)
    token_public_keys: list[str] = Field(default_factory=list)
    token_issuer: str | None = None  # if set, the iss claim must equal it
    token_audience: str | None = None  # if set, aud must name it; if not, aud must be absent
    token_leeway_s: float = Field(default=30.0, ge=0)  # clock skew allowed on exp and nbf
    token_allow_no_exp: bool = False  # accept tokens without exp (they never expire)
    # how often a connection's token is re-checked against the revocation hook
    token_recheck_s: float = Field(default=60.0, gt=0)
    # -- TLS: both set, the relay serves wss:// (PEM files: certificate chain, private key)
    tls_cert: Path | None = None
    tls_key: Path | None = None
    # -- regions (issue 12; README: regions): this relay's region, and every other region's
    # relay URL (a full mesh: each region lists all the others). Links need tokens: the
    # relay presents peer_token to its peers (a token with the "p" right on "*"), or, with
    # none, mints a short-lived one with its first HS256 token secret (regions that share
    # a secret need nothing more).
    region: str | None = None
    peers: dict[str, str] = Field(default_factory=dict)
    peer_token: str | None = Field(default=None, repr=False)
    link_batch_bytes: int = Field(default=256 * 1024, ge=1024)  # one batch of a link
    link_window: int = Field(default=8, ge=1)  # batches sent before the first is acknowledged
    link_retry_s: float = Field(default=1.0, gt=0)  # first pause after a link fails (doubles)
    link_poll_s: float = Field(default=0.05, gt=0)  # a live link looks for changes this often
    # an acknowledgement (or a checkpoint's answer) not there this long: the link restarts
    link_ack_timeout_s: float = Field(default=30.0, gt=0)
    # anti-entropy: how often a live link compares every document's digest with the
    # target's and repairs what differs (each repair is logged and counted: something was
    # lost); 0: never
    anti_entropy_s: float = Field(default=600.0, ge=0)
    # A link broken on purpose, to show what the checks find (crdtsync check's negative
    # controls); never in a deployment: "drop" loses 1 in 50 updates it should ship,
    # "early-checkpoint" records its checkpoint before the target stored the batch.
    link_defect: Literal["", "drop", "early-checkpoint"] = ""

    @model_validator(mode="after")
    def _check_tls(self) -> RelaySettings:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together: set both or neither")
        return self

    @model_validator(mode="after")
    def _check_regions(self) -> RelaySettings:
        if self.peers and self.region is None:
            raise ValueError("peers need this relay's own region (region)")
        if self.region is not None and self.region in self.peers:
            raise ValueError(f"region {self.region!r} is this relay's own: not a peer")
        for name, url in self.peers.items():
            if not url.startswith(("ws://", "wss://")):
                raise ValueError(f"peer {name!r}: a ws:// or wss:// URL, not {url!r}")
        return self

    @field_validator("region")
    @classmethod
    def _check_region(cls, value: str | None) -> str | None:
        return None if value is None else validate_region(value)

    @field_validator("peers")
    @classmethod
    def _check_peers(cls, value: dict[str, str]) -> dict[str, str]:
        for name in value:
            validate_region(name)
        return value

    @field_validator("store", mode="before")
    @classmethod
    def _check_store(cls, value: object) -> object:
        from .backend import is_redis_address

        if isinstance(value, Path):
            return value
        if is_redis_address(value):
            return value
        if isinstance(value, str):
            # Any other URL would become a file of that name (Path folds its "//").
            if "://" in value:
                raise ValueError(
                    f"a store is an SQLite file or a redis://, rediss:// or unix:// URL, "
                    f"not {value.split('://', 1)[0]}://"
                )
            return Path(value)
        return value

    @property
    def shared_store(self) -> bool:
        """Whether the store is Redis (shared by several relay processes)."""
        return isinstance(self.store, str)

    @field_validator("token_secrets")
    @classmethod
    def _check_token_secrets(cls, entries: list[str]) -> list[str]:
        from .auth import check_secret_entry  # here: auth imports this module

        for index, entry in enumerate(entries, 1):
            check_secret_entry(entry, f"token secret #{index}")
        return entries

    @field_validator("token_public_keys")
    @classmethod
    def _check_token_public_keys(cls, entries: list[str]) -> list[str]:
        from .auth import split_key_entry

        for entry in entries:
            split_key_entry(entry)  # the files are read by token_verifier()
        return entries

    @property
    def tokens_required(self) -> bool:
        """Whether connections need an access token: at least one key is configured."""
        return bool(self.token_secrets or self.token_public_keys)

    def token_verifier(self) -> TokenVerifier | None:
        """The verifier of these settings (reads the key files); None without keys.

        Raises:
            ValueError: a key file unreadable or not a supported public key.
        """
        from .auth import verifier_from_values

        return verifier_from_values(
            secrets=self.token_secrets,
            public_key_files=self.token_public_keys,
            issuer=self.token_issuer,
            audience=self.token_audience,
            leeway_s=self.token_leeway_s,
            allow_no_exp=self.token_allow_no_exp,
        )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        toml = settings_cls.model_config.get("toml_file")
        sources: tuple[PydanticBaseSettingsSource, ...] = (init_settings, env_settings)
        if toml:
            sources += (TomlConfigSettingsSource(settings_cls, toml_file=toml),)
        return sources

    @classmethod
    def load(cls, toml_file: str | Path | None = None, **values: Any) -> RelaySettings:
        """Build settings from ``values`` (flags), the environment and a TOML file.

        Raises:
            pydantic.ValidationError: a value out of range or of the wrong type.
        """
        if toml_file is None:
            return cls(**values)
        if not Path(toml_file).is_file():
            raise FileNotFoundError(f"settings file {toml_file} not found")

        class RelaySettingsFile(cls):  # type: ignore[valid-type,misc]
            model_config = SettingsConfigDict(
                env_prefix="CRDTSYNC_",
                extra="forbid",
                hide_input_in_errors=True,
                toml_file=str(toml_file),
            )

        return cls.model_validate(RelaySettingsFile(**values).model_dump())
