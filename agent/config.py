"""Agent configuration: one settings class, a TOML file, ``EDGEFLEET_`` overrides.

Precedence, highest first: command-line options, environment variables
(``EDGEFLEET_DEVICE_ID`` ...), the TOML file given with ``--config``, defaults.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from agent.errors import DataError
from agent.health import ProbeConfig
from agent.protocol import MAX_CAPTURE_BYTES
from agent.topics import valid_device_id

__all__ = ["AgentSettings", "ConfigError", "load_settings"]

MAX_CONFIG_BYTES = 64 * 1024


class ConfigError(DataError):
    """The agent configuration file or values are invalid."""


class AgentSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="EDGEFLEET_", extra="forbid")

    broker_url: str = Field("mqtt://127.0.0.1:1883", description="MQTT broker, mqtt://host:port.")
    device_id: str = Field(description="Unique device id: 1-64 of [A-Za-z0-9_.-].")
    profile: str = Field(description="Firmware profile name (see firmware_profiles/).")
    data_dir: Path = Field(description="Where slots, state, spool and trust metadata live.")
    api_port: int = Field(0, ge=0, le=65535, description="Localhost V2 HTTP port; 0 disables it.")
    api_socket: Path | None = Field(None, description="Also serve the V2 API on this Unix socket.")
    telemetry_interval: float = Field(10.0, gt=0, description="Seconds between telemetry messages.")
    tags: list[str] = Field(default_factory=list, description="Free-form tags for fleet selectors.")
    trust_root: Path | None = Field(
        None, description="Provisioned TUF root.json; without it the first root is pinned on first use."
    )
    profiles_dir: Path | None = Field(None, description="Folder of profile TOML files to use instead of the shipped ones.")
    spool_max_bytes: int = Field(8 << 20, ge=4096, description="Bound of the outbound spool.")
    repository_url: str | None = Field(
        None, description="Fetch metadata and bundles over HTTP(S) from this hub URL "
        "(e.g. http://hub:8080/api/v1/repository/) instead of over MQTT."
    )
    chunk_size: int = Field(256 * 1024, ge=1024, le=1024 * 1024, description="Transfer chunk size.")
    transfer_window: int = Field(4, ge=1, le=64, description="Chunk requests in flight.")
    transfer_timeout: float = Field(5.0, gt=0, description="Seconds before a chunk is re-requested.")
    bandwidth_limit: float | None = Field(None, gt=0, description="Download cap, bytes/s.")
    max_download_attempts: int = Field(5, ge=1, description="Transport retries before failing.")
    health_error_rate: float = Field(0.05, ge=0, le=1, description="Max error rate in the health window.")
    selftest_latency_runs: int = Field(20, ge=1, description="Runs used to check the latency budget.")
    health_probes: list[ProbeConfig] = Field(
        default_factory=list, description="Application probes that must pass in the health window."
    )
    hooks_dir: Path | None = Field(
        None, description="Folder of state hooks (<state>_enter / <state>_leave); default data_dir/hooks."
    )
    reconnect_max_delay: float = Field(30.0, gt=0, description="Cap of the reconnect backoff, seconds.")
    hook_timeout: float = Field(60.0, gt=0, description="Seconds before a state hook is killed.")
    drift_max_rows_per_s: float = Field(
        200.0, ge=0, description="Above this many requests per second, drift sketches and capture see a "
        "uniform random sample of about this many per second; 0 sketches every request."
    )
    capture_per_minute: float = Field(
        0.0, ge=0, le=6000, description="Raw samples captured per minute (agent.capture); 0 keeps capture off."
    )
    capture_max_bytes: int = Field(16 << 20, ge=4096, description="Byte cap of the capture folder.")
    capture_max_sample_bytes: int = Field(
        256 * 1024, ge=1024, le=MAX_CAPTURE_BYTES, description="Larger samples are not captured."
    )
    capture_upload: bool = Field(False, description="Also send captured samples to the hub.")
    feedback_max_pending: int = Field(
        10_000, ge=1, description="Labels held between telemetry intervals before new ones are dropped."
    )

    @model_validator(mode="after")
    def _capture_cap(self) -> AgentSettings:
        if self.capture_per_minute > 0 and self.capture_max_bytes < self.capture_max_sample_bytes:
            raise ValueError("capture_max_bytes must be at least capture_max_sample_bytes")
        return self

    @field_validator("device_id")
    @classmethod
    def _device_id(cls, v: str) -> str:
        if not valid_device_id(v):
            raise ValueError("must be 1-64 characters of [A-Za-z0-9_.-]")
        return v

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return init_settings, env_settings, file_secret_settings


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read ({e.strerror})") from e
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}: {len(raw)} bytes, over the {MAX_CONFIG_BYTES}-byte limit")
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from e
    section = data.get("agent", data)
    if not isinstance(section, dict):
        raise ConfigError(f"{path}: [agent] must be a table")
    return section


def load_settings(config: Path | None = None, **overrides: Any) -> AgentSettings:
    """Build settings from a TOML file (optional), the environment, and overrides.

    Raises:
        ConfigError: the file is unreadable, not TOML, or a value is invalid; the
            message names the file and the field.
    """
    import os

    file_values = _read_toml(config) if config is not None else {}
    given = {k: v for k, v in overrides.items() if v is not None}
    # The environment outranks the file: drop file values the environment sets.
    env_keys = {k[len("EDGEFLEET_"):].lower() for k in os.environ if k.startswith("EDGEFLEET_")}
    merged = {k: v for k, v in file_values.items() if k not in env_keys}
    merged.update(given)
    try:
        return AgentSettings(**merged)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(p) for p in err["loc"]) or "(root)"
        where = f"{config}: " if config is not None else ""
        raise ConfigError(f"{where}{loc}: {err['msg']}") from e
