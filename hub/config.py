"""Hub configuration, declared once.

Every field can be set from the environment with the ``EDGEFLEET_`` prefix
(``EDGEFLEET_DATA_DIR``, ``EDGEFLEET_DB_URL``, ...) or passed explicitly; the CLI
passes its flags through here. The key passphrase comes from
``EDGEFLEET_KEY_PASSPHRASE``, else from ``key_passphrase_file``, else a random one is
generated into ``data_dir/keys.passphrase`` (mode 0600) with a warning, so a first run
works and an operator knows to move it somewhere safer.
"""

from __future__ import annotations

import logging
import os
import secrets
from pathlib import Path

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from agent.connection import parse_broker_url

__all__ = ["HubSettings"]

log = logging.getLogger(__name__)

_PASSPHRASE_FILE = "keys.passphrase"


class HubSettings(BaseSettings):
    """Everything the hub can be told. Unknown keys are an error."""

    model_config = SettingsConfigDict(env_prefix="EDGEFLEET_", extra="forbid")

    data_dir: Path = Field(
        Path("./edgefleet-hub"),
        description="Folder for the SQLite database, the TUF repository and uploads.",
    )
    db_url: str | None = Field(
        None,
        description="SQLAlchemy database URL, e.g. postgresql+psycopg://user@host/db. "
        "Default: SQLite file hub.db in data_dir.",
    )
    broker_url: str | None = Field(
        None,
        description="MQTT broker, mqtt://host:port. Default: start an embedded broker on "
        "127.0.0.1.",
    )
    embedded_broker_host: str = Field(
        "127.0.0.1",
        description="Address the embedded broker listens on; 0.0.0.0 lets devices on the network in "
        "(it has no authentication: see docs/security.md).",
    )
    embedded_broker_port: int = Field(
        0, ge=0, le=65535, description="Port of the embedded broker; 0 picks a free one."
    )
    host: str = Field("127.0.0.1", description="Address the REST API listens on.")
    port: int = Field(8080, ge=0, le=65535, description="Port the REST API listens on.")
    key_passphrase: SecretStr | None = Field(
        None,
        description="Passphrase encrypting the repository's private keys at rest "
        "(env EDGEFLEET_KEY_PASSPHRASE).",
    )
    key_passphrase_file: Path | None = Field(
        None, description="File holding the key passphrase, used when key_passphrase is unset."
    )
    timestamp_expiry_s: float = Field(
        86400.0, gt=60, description="Lifetime of signed TUF timestamp metadata, seconds."
    )
    timestamp_refresh_s: float = Field(
        300.0, gt=0, description="How often the hub checks whether metadata needs re-signing."
    )
    telemetry_retention_s: float = Field(
        7 * 86400.0, gt=0, description="Telemetry rows older than this are deleted, seconds."
    )
    max_bundle_bytes: int = Field(
        512 * 1024 * 1024, ge=1024, description="Largest bundle upload accepted, bytes."
    )
    ingest_batch_size: int = Field(
        500, ge=1, description="Most MQTT messages written to the database in one transaction."
    )
    ingest_queue_size: int = Field(
        100_000, ge=100, description="Most MQTT messages waiting for the database writer."
    )
    capture_max_bytes: int = Field(
        1 << 30, ge=1 << 20, description="Byte bound of the archive of samples devices upload (opt-in)."
    )
    campaign_tick_s: float = Field(
        1.0, gt=0, le=60, description="How often the campaign engine advances campaigns, seconds."
    )
    deployment_health_window_s: float = Field(
        5.0, ge=0, le=86400, description="Health window sent with each deployment, seconds."
    )
    campaign_report_timeout_s: float | None = Field(
        None, ge=60, le=30 * 86400,  # at least two of an agent's 30 s progress reports
        description="A campaign device whose deployment reached the broker this long ago without a result "
        "counts as timed_out, an install failure for the gates. Longer than the health window. "
        "Default: 1800 s, or the health window + 600 s when that is longer.",
    )

    @model_validator(mode="after")
    def _timeout_after_health_window(self) -> HubSettings:
        t = self.campaign_report_timeout_s
        if t is not None and t <= self.deployment_health_window_s:
            raise ValueError(f"campaign_report_timeout_s ({t:g}) must be longer "
                             f"than deployment_health_window_s ({self.deployment_health_window_s:g})")
        return self

    @property
    def report_timeout_s(self) -> float:
        """``campaign_report_timeout_s``, or its default for this health window."""
        if self.campaign_report_timeout_s is not None:
            return self.campaign_report_timeout_s
        return max(1800.0, self.deployment_health_window_s + 600.0)

    @property
    def database_url(self) -> str:
        return self.db_url or f"sqlite:///{(self.data_dir / 'hub.db').resolve()}"

    @field_validator("broker_url")
    @classmethod
    def _broker_url(cls, v: str | None) -> str | None:
        if v is not None:
            parse_broker_url(v)  # ValueError says what a broker URL looks like
        return v

    def resolve_passphrase(self) -> bytes:
        """The key passphrase, generating and storing one on first use.

        Raises:
            OSError: the passphrase file cannot be read or written.
            ValueError: the passphrase (file) is empty.
        """
        if self.key_passphrase is not None:
            value = self.key_passphrase.get_secret_value()
        elif self.key_passphrase_file is not None:
            value = self.key_passphrase_file.read_text().strip()
        else:
            path = self.data_dir / _PASSPHRASE_FILE
            if not path.exists():
                self.data_dir.mkdir(parents=True, exist_ok=True)
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "w") as fh:
                    fh.write(secrets.token_urlsafe(32) + "\n")
                log.warning(
                    "no key passphrase given: generated one in %s; set EDGEFLEET_KEY_PASSPHRASE "
                    "or key_passphrase_file and keep it out of the data folder in production",
                    path,
                )
            value = path.read_text().strip()
        if not value:
            raise ValueError("the key passphrase is empty")
        return value.encode()
