"""Firmware profiles: what a class of device can run, as validated data.

Profiles are TOML files in ``firmware_profiles/`` (shipped as package data). The
schema is :class:`Profile`; unknown keys are refused so that a typo is an error
rather than a silently ignored setting. ``docs/profiles.md`` documents every field.
"""

from __future__ import annotations

import re
from importlib import resources
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from agent.errors import ProfileError, first_error
from agent.tomlfile import read_toml

__all__ = [
    "Profile",
    "Hardware",
    "Accelerator",
    "Limits",
    "RuntimeOptions",
    "load_profile",
    "load_profile_file",
    "list_profiles",
    "profiles_dir",
]

MAX_PROFILE_BYTES = 64 * 1024
_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")  # used with fullmatch: "$" let a final newline in


class _Strict(BaseModel):
    # strict: a profile says what it means (no "true" for a core count, no 1 for a flag);
    # allow_inf_nan off: an infinite budget or limit would switch its check off.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


class Hardware(_Strict):
    arch: Literal["aarch64", "x86_64", "armv7l"] = Field(description="CPU architecture.")
    cores: int = Field(ge=1, le=256, description="CPU cores available to inference.")
    ram_mb: int = Field(ge=16, description="Device RAM in MiB.")
    storage_mb: int = Field(ge=16, description="Storage budget for models (both slots), MiB.")
    vnni: bool = Field(False, description="x86 AVX-512 VNNI / AVX-VNNI int8 dot product.")
    dot_product: bool = Field(False, description="ARM SDOT/UDOT int8 dot product.")
    fp16: bool = Field(False, description="Native fp16 arithmetic.")


class Accelerator(_Strict):
    name: str = Field(description="Human name, e.g. 'cuda', 'gpu-delegate'.")
    execution_provider: str = Field(
        description="ONNX Runtime execution provider or LiteRT delegate name."
    )


class Limits(_Strict):
    max_model_bytes: int = Field(ge=1024, description="Largest model file accepted.")
    latency_budget_ms: float = Field(gt=0, description="p95 latency budget per inference, ms.")
    accuracy_floor: float | None = Field(
        None, ge=0, le=1, description="Lowest acceptable eval metric, absolute."
    )
    max_accuracy_drop: float = Field(
        0.01, ge=0, le=1, description="Largest acceptable drop against fp32, absolute."
    )


class RuntimeOptions(_Strict):
    intra_op_threads: int = Field(1, ge=1, le=256, description="Inference threads.")
    execution_providers: list[str] = Field(
        default_factory=lambda: ["CPUExecutionProvider"],
        description="ONNX Runtime execution providers, in preference order.",
    )


class Profile(_Strict):
    schema_version: Literal[1] = Field(1, description="Profile schema version.")
    name: str = Field(description="Profile name; matches the file name.")
    description: str = Field("", max_length=500)
    hardware: Hardware
    runtimes: dict[Literal["onnxruntime", "litert"], str] = Field(
        description="Runtime name -> minimum version available on the device."
    )
    formats: list[Literal["onnx", "tflite"]] = Field(min_length=1)
    dtypes: list[Literal["fp32", "fp16", "int8", "uint8"]] = Field(min_length=1)
    accelerators: list[Accelerator] = Field(default_factory=list)
    limits: Limits
    runtime_options: RuntimeOptions = Field(default_factory=RuntimeOptions)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _NAME.fullmatch(v):
            raise ValueError("must match [a-z0-9][a-z0-9_-]{0,63}")
        return v

    @field_validator("runtimes")
    @classmethod
    def _runtimes(cls, v: dict[str, str]) -> dict[str, str]:
        if not v:
            raise ValueError("at least one runtime is required")
        return v


def profiles_dir() -> Path:
    """The folder holding the shipped profiles."""
    return Path(str(resources.files("firmware_profiles")))


def load_profile_file(path: Path) -> Profile:
    """Load and validate one profile file.

    Raises:
        ProfileError: unreadable, too large, not TOML, or not matching the schema;
            the message names the file and the offending field.
    """
    data = read_toml(path, MAX_PROFILE_BYTES, ProfileError)
    try:
        profile = Profile.model_validate(data)
    except ValidationError as e:
        raise ProfileError(f"{path}: {first_error(e)}") from e
    if path.stem != profile.name:
        raise ProfileError(f"{path}: name {profile.name!r} does not match the file name")
    return profile


def list_profiles(directory: Path | None = None) -> list[Profile]:
    d = directory or profiles_dir()
    return [load_profile_file(p) for p in sorted(d.glob("*.toml"))]


def load_profile(name: str, directory: Path | None = None) -> Profile:
    """Load a shipped profile by name.

    Raises:
        ProfileError: no such profile, or it does not validate.
    """
    if not _NAME.fullmatch(name):
        raise ProfileError(f"profile name {name!r} is not valid")
    d = directory or profiles_dir()
    path = d / f"{name}.toml"
    if not path.exists():
        known = ", ".join(sorted(p.stem for p in d.glob("*.toml")))
        raise ProfileError(f"unknown profile {name!r}; known profiles: {known}")
    return load_profile_file(path)
