"""Agent configuration: one settings model, a TOML file, ``EDGEFLEET_`` overrides.

Precedence, highest first: command-line options, environment variables
(``EDGEFLEET_DEVICE_ID`` ...), the TOML file given with ``--config``, defaults.
:func:`load_settings` applies all four; constructing :class:`AgentSettings` directly
takes only what it is given, so tests and embedding applications are not steered by
the process environment.

Environment variables are matched to fields by name, case-insensitively
(``EDGEFLEET_API_PORT`` sets ``api_port``). Variables naming no agent field are left
alone: the hub reads its own ``EDGEFLEET_`` variables. A list or table field (``tags``,
``health_probes``) takes JSON, as in ``EDGEFLEET_TAGS='["lab", "floor-2"]'``.

This module does not use pydantic-settings: the old pydantic-settings version of this
module cost the agent 3.0-3.3 MiB of RSS and 30-50 ms of start-up on top of the agent's
other imports (five fresh interpreters each, side by side, 2026-11-27), for the few
lines below. The hub, which does not count megabytes, keeps using it.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from agent.errors import DataError
from agent.health import ProbeConfig
from agent.protocol import MAX_CAPTURE_BYTES
from agent.tomlfile import read_toml
from agent.topics import valid_device_id

__all__ = ["AgentSettings", "ConfigError", "load_settings", "ENV_PREFIX"]

MAX_CONFIG_BYTES = 64 * 1024
MAX_ENV_VALUE_BYTES = 64 * 1024
ENV_PREFIX = "EDGEFLEET_"


class ConfigError(DataError):
    """The agent configuration file or values are invalid."""


# Longest duration any setting may have: longer waits are typos (and past
# threading.TIMEOUT_MAX, about 292 years, they crash the thread that waits).
DAY_S = 86400.0


class AgentSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    broker_url: str = Field("mqtt://127.0.0.1:1883", description="MQTT broker, mqtt://host:port.")
    device_id: str = Field(description="Unique device id: 1-64 of [A-Za-z0-9_.-].")
    profile: str = Field(description="Firmware profile name (see firmware_profiles/).")
    data_dir: Path = Field(description="Where slots, state, spool and trust metadata live.")
    api_port: int = Field(0, ge=0, le=65535, description="Localhost V2 HTTP port; 0 disables it.")
    api_socket: Path | None = Field(None, description="Also serve the V2 API on this Unix socket.")
    telemetry_interval: float = Field(10.0, gt=0, le=DAY_S, description="Seconds between telemetry messages.")
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
    transfer_timeout: float = Field(5.0, gt=0, le=3600, description="Seconds before a chunk is re-requested.")
    bandwidth_limit: float | None = Field(None, gt=0, description="Download cap, bytes/s.")
    max_download_attempts: int = Field(5, ge=1, le=1000, description="Transport retries before failing.")
    health_error_rate: float = Field(0.05, ge=0, le=1, description="Max error rate in the health window.")
    selftest_latency_runs: int = Field(20, ge=1, le=10_000, description="Runs used to check the latency budget.")
    health_probes: list[ProbeConfig] = Field(
        default_factory=list, description="Application probes that must pass in the health window."
    )
    hooks_dir: Path | None = Field(
        None, description="Folder of state hooks (<state>_enter / <state>_leave); default data_dir/hooks."
    )
    reconnect_max_delay: float = Field(30.0, gt=0, le=3600, description="Cap of the reconnect backoff, seconds.")
    hook_timeout: float = Field(60.0, gt=0, le=DAY_S, description="Seconds before a state hook is killed.")
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
    release_memory: bool = Field(
        True, description="Once serving has started, and 10 s after the last of a run of deployments that "
        "loaded a model, ask the kernel to reclaim the library code pages touched only once, then warm "
        "the models up again (agent.memory; Linux 5.4 and later)."
    )
    feedback_max_pending: int = Field(
        10_000, ge=1, description="Labels held between telemetry intervals before new ones are dropped."
    )

    @model_validator(mode="after")
    def _capture_cap(self) -> AgentSettings:
        if self.capture_per_minute > 0 and self.capture_max_bytes < self.capture_max_sample_bytes:
            raise ValueError("capture_max_bytes must be at least capture_max_sample_bytes")
        return self

    @field_validator("data_dir", "api_socket", "trust_root", "profiles_dir", "hooks_dir", mode="before")
    @classmethod
    def _path_given(cls, v: Any) -> Any:
        if isinstance(v, str) and not v.strip():
            raise ValueError("must not be empty (an empty path would mean the current folder)")
        return v

    @field_validator("broker_url")
    @classmethod
    def _broker_url(cls, v: str) -> str:
        from agent.connection import parse_broker_url

        parse_broker_url(v)  # ValueError says what a broker URL looks like
        return v

    @field_validator("repository_url")
    @classmethod
    def _repository_url(cls, v: str | None) -> str | None:
        if v is None:
            return v
        from urllib.parse import urlsplit

        from agent.connection import shown_url

        u = urlsplit(v)
        if u.scheme.lower() not in ("http", "https") or not u.hostname:
            raise ValueError(f"must be an http:// or https:// URL of the hub, got {shown_url(v)!r}")
        try:
            _ = u.port  # urlsplit checks the port only when asked
        except ValueError:
            raise ValueError(f"{shown_url(v)!r}: the port must be a number from 0 to 65535") from None
        return v

    @field_validator("device_id")
    @classmethod
    def _device_id(cls, v: str) -> str:
        if not valid_device_id(v):
            raise ValueError("must be 1-64 characters of [A-Za-z0-9_.-]")
        return v


def _read_toml(path: Path) -> dict[str, Any]:
    data = read_toml(path, MAX_CONFIG_BYTES, ConfigError)
    section = data.get("agent", data)
    if not isinstance(section, dict):
        raise ConfigError(f"{path}: [agent] must be a table")
    return section


def _takes_json(annotation: Any) -> bool:
    """True for a field whose value is a list, table or model (given as JSON in the
    environment); False for scalars, paths and strings, which are given as they are."""
    for t in (annotation, *get_args(annotation)):
        if get_origin(t) in (list, dict) or t in (list, dict):
            return True
        if isinstance(t, type) and issubclass(t, BaseModel):
            return True
    return False


def environment_values(environ: Mapping[str, str]) -> dict[str, tuple[str, Any]]:
    """The agent fields set by ``EDGEFLEET_*`` variables in ``environ``:
    ``{field: (variable, value)}``, JSON decoded for list and table fields.

    Raises:
        ConfigError: a value is over ``MAX_ENV_VALUE_BYTES`` or not the JSON its field
            needs; the message names the variable.
    """
    fields = AgentSettings.model_fields
    found: dict[str, tuple[str, Any]] = {}
    for var in sorted(environ):
        if not var.upper().startswith(ENV_PREFIX):
            continue
        name = var[len(ENV_PREFIX):].lower()
        info = fields.get(name)
        if info is None:
            continue
        if name in found:
            raise ConfigError(f"{found[name][0]} and {var} both set {name}; keep one")
        raw = environ[var]
        if len(raw.encode("utf-8", "surrogateescape")) > MAX_ENV_VALUE_BYTES:
            raise ConfigError(f"{var}: {len(raw)} characters, over the {MAX_ENV_VALUE_BYTES}-byte limit")
        value: Any = raw
        if raw == "" and not info.is_required() and info.default is None:
            value = None  # an empty variable unsets an optional setting
        elif _takes_json(info.annotation):
            try:
                value = json.loads(raw)
            except (ValueError, RecursionError) as e:  # JSONDecodeError, or an integer past the digit limit
                raise ConfigError(f"{var}: {name} takes JSON here (for example '[\"a\", \"b\"]'): {e}") from e
        found[name] = (var, value)
    return found


def load_settings(
    config: Path | None = None,
    overrides: Mapping[str, Any] | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    option_names: Mapping[str, str] | None = None,
) -> AgentSettings:
    """Build settings from a TOML file (optional), the environment, and ``overrides``
    (command-line options; ``None`` values are ignored, so unset options fall through).

    ``environ`` defaults to ``os.environ``. ``option_names`` maps a field to the
    command-line option that sets it, for error messages (default ``--field-name``).

    Raises:
        ConfigError: the file is unreadable, over ``MAX_CONFIG_BYTES``, not TOML, or a
            value is invalid; the message names the file or variable, and the field.
    """
    names = dict(option_names or {})

    def option(field: str) -> str:
        return names.get(field, f"--{field.replace('_', '-')}")

    # Where each value came from, to name it in an error: (a file's path, the field),
    # a variable, or an option; the last two name the field themselves.
    label: dict[str, str] = {}
    origin: dict[str, str] = {}
    merged: dict[str, Any] = {}
    if config is not None:
        for k, v in _read_toml(config).items():
            merged[k], label[k], origin[k] = v, f"{config}: {k}", str(config)
    for k, (var, v) in environment_values(os.environ if environ is None else environ).items():
        merged[k], label[k], origin[k] = v, var, var
    for k, v in (overrides or {}).items():
        if v is not None:
            merged[k], label[k], origin[k] = v, option(k), option(k)
    try:
        return AgentSettings(**merged)
    except ValidationError as e:
        err = e.errors()[0]
        if not err["loc"]:  # a check across fields: name where each field it mentions came from
            named = [f"{k} from {origin[k]}" for k in sorted(origin) if re.search(rf"\b{k}\b", err["msg"])]
            raise ConfigError(f"{err['msg']}" + (f" ({'; '.join(named)})" if named else "")) from e
        field, rest = str(err["loc"][0]), "".join(f"[{p}]" for p in err["loc"][1:])
        if err["type"] == "missing":
            where = f"{config}, " if config is not None else ""
            raise ConfigError(f"{field}: required; set it in {where}{ENV_PREFIX}{field.upper()} "
                              f"or {option(field)}") from e
        raise ConfigError(f"{label.get(field, field)}{rest}: {err['msg']}") from e
