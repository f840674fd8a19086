"""Firmware profile files are external data: malformed, truncated and oversized input.

``agent.profiles`` documents one error for every bad file, :class:`ProfileError`, whose
message names the file and, for a schema error, the field (``docs/profiles.md``). Each
case below starts from a shipped profile, breaks one thing, and checks the error says
what was wrong and where. Needs only the agent's own dependencies (runs on the legacy
stack too, see ``.ci/legacy-agent.sh``).
"""

from __future__ import annotations

import json
import math
import os
import tomllib
from pathlib import Path
from typing import Any

import pytest

from agent.errors import DataError, ProfileError
from agent.profiles import (
    MAX_PROFILE_BYTES,
    Profile,
    list_profiles,
    load_profile,
    load_profile_file,
    profiles_dir,
)

SHIPPED = sorted(p.stem for p in profiles_dir().glob("*.toml"))
# jetson-orin-cuda has every kind of TOML the schema uses: scalars, lists, tables and
# an array of tables ([[accelerators]]).
BASE = "jetson-orin-cuda"


def _base() -> dict[str, Any]:
    return tomllib.loads((profiles_dir() / f"{BASE}.toml").read_text())


def _value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float) and not math.isfinite(v):
        return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf")
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)  # a JSON string is a TOML basic string
    if isinstance(v, list):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(v)


def dump(doc: dict[str, Any]) -> str:
    """Just enough of a TOML writer for profiles (scalars first, then tables)."""
    lines: list[str] = []
    tables: list[str] = []
    for key, v in doc.items():
        if isinstance(v, dict):
            tables += ["", f"[{key}]", *(f"{json.dumps(k)} = {_value(x)}" for k, x in v.items())]
        elif isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
            for item in v:
                tables += ["", f"[[{key}]]", *(f"{json.dumps(k)} = {_value(x)}" for k, x in item.items())]
        else:
            lines.append(f"{json.dumps(key)} = {_value(v)}")
    return "\n".join(lines + tables) + "\n"


def edited(path: str, value: Any = ..., *, delete: bool = False) -> dict[str, Any]:
    """The base profile with ``path`` (dotted; digits index lists) set or deleted."""
    doc = _base()
    *parents, last = path.split(".")
    node: Any = doc
    for p in parents:
        node = node[int(p)] if isinstance(node, list) else node.setdefault(p, {})
    if delete:
        del node[last]
    else:
        node[last] = value
    return doc


def write(tmp_path: Path, content: str | bytes, name: str = BASE) -> Path:
    path = tmp_path / f"{name}.toml"
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    return path


def refused(path: Path) -> str:
    """Load ``path``, expect ProfileError, and check the message starts with the file."""
    with pytest.raises(ProfileError) as info:
        load_profile_file(path)
    msg = str(info.value)
    assert msg.startswith(f"{path}: "), msg
    return msg


# --- every shipped profile ---------------------------------------------------------


def test_profiles_are_shipped() -> None:
    assert len(SHIPPED) >= 6
    assert BASE in SHIPPED


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_profile_loads(name: str) -> None:
    profile = load_profile(name)
    assert profile.name == name
    assert (profiles_dir() / f"{name}.toml").stat().st_size <= MAX_PROFILE_BYTES


def test_list_profiles_loads_every_shipped_file() -> None:
    assert [p.name for p in list_profiles()] == SHIPPED


def test_the_test_writer_round_trips(tmp_path: Path) -> None:
    """The cases below rely on dump(); it must reproduce the shipped profile exactly."""
    assert load_profile_file(write(tmp_path, dump(_base()))) == load_profile(BASE)


def test_a_profile_from_an_operator_directory_loads(tmp_path: Path) -> None:
    doc = edited("name", "site-a")
    write(tmp_path, dump(doc), name="site-a")
    assert load_profile("site-a", tmp_path).name == "site-a"
    assert [p.name for p in list_profiles(tmp_path)] == ["site-a"]


# --- truncated ---------------------------------------------------------------------


def _shipped_bytes(name: str = BASE) -> bytes:
    return (profiles_dir() / f"{name}.toml").read_bytes()


def _cut_at(marker: str, extra: int = 0) -> bytes:
    raw = _shipped_bytes()
    i = raw.index(marker.encode())
    return raw[: i + extra]


@pytest.mark.parametrize(
    ("cut", "expected"),
    [
        pytest.param(b"", "name: Field required", id="empty"),
        pytest.param(_cut_at('description = "', len('description = "Jets')),
                     "not valid TOML", id="mid-string"),
        pytest.param(_cut_at("formats = [", len('formats = ["on')), "not valid TOML", id="mid-array"),
        pytest.param(_cut_at("[hardware]", len("[hard")), "not valid TOML", id="mid-table-header"),
        pytest.param(_cut_at("ram_mb", len("ram_")), "not valid TOML", id="mid-key"),
        pytest.param(_cut_at("ram_mb", len("ram_mb =")), "not valid TOML", id="after-equals"),
        pytest.param(_cut_at("[hardware]"), "hardware: Field required", id="before-hardware"),
        pytest.param(_cut_at("[limits]"), "limits: Field required", id="before-limits"),
        pytest.param(_cut_at("latency_budget_ms"), "limits.latency_budget_ms: Field required",
                     id="before-latency-budget"),
    ],
)
def test_truncated_profile(tmp_path: Path, cut: bytes, expected: str) -> None:
    msg = refused(write(tmp_path, cut))
    assert expected in msg, msg


def test_truncated_toml_error_says_where(tmp_path: Path) -> None:
    raw = _cut_at('description = "', len('description = "Jets'))
    msg = refused(write(tmp_path, raw))
    assert msg.endswith("not valid TOML: Unterminated string (at end of document)"), msg


@pytest.mark.parametrize("name", SHIPPED)
def test_truncated_at_every_byte(tmp_path: Path, name: str) -> None:
    """Every prefix of a real profile raises ProfileError naming the file (never another
    exception), except prefixes that already hold every required key: the shipped files
    end with [limits] and [runtime_options], so those load."""
    raw = _shipped_bytes(name)
    full = load_profile(name).model_dump()
    path = tmp_path / f"{name}.toml"
    last_required = raw.index(b"latency_budget_ms = ") + len(b"latency_budget_ms = ")
    loaded = []
    for n in range(len(raw)):
        path.write_bytes(raw[:n])
        try:
            profile = load_profile_file(path)
        except ProfileError as e:
            assert str(e).startswith(f"{path}: "), str(e)
            continue
        loaded.append(n)
        got = profile.model_dump()
        assert {k: v for k, v in got.items() if k not in ("limits", "runtime_options")} == {
            k: v for k, v in full.items() if k not in ("limits", "runtime_options")}
    assert loaded and min(loaded) > last_required


def test_truncation_inside_a_number_is_refused(tmp_path: Path) -> None:
    raw = _cut_at("latency_budget_ms = 10.0", len("latency_budget_ms = 1"))
    refused(write(tmp_path, raw))


# --- malformed TOML ----------------------------------------------------------------


def _shipped_text() -> str:
    return _shipped_bytes().decode()


@pytest.mark.parametrize(
    ("content", "line"),
    [
        pytest.param(_shipped_text().replace("cores = 6", "cores = 6\ncores = 8"), 10, id="duplicate-key"),
        pytest.param(_shipped_text().replace("[limits]", "[hardware]"), None, id="duplicate-table"),
        pytest.param(_shipped_text().replace("cores = 6", "cores = "), 9, id="missing-value"),
        pytest.param(_shipped_text().replace("cores = 6", "cores 6"), 9, id="missing-equals"),
        pytest.param(_shipped_text().replace("[limits]", "[limits"), 23, id="unclosed-header"),
        pytest.param(_shipped_text().replace('"fp32", "fp16"', '"fp32" "fp16"'), 5, id="missing-comma"),
        pytest.param(_shipped_text().replace("cores = 6", "cores = 6 6"), 9, id="trailing-garbage"),
        pytest.param(_shipped_text().replace("fp16 = true", "fp16 = True"), 14, id="python-bool"),
        pytest.param("\x00" + _shipped_text(), 1, id="nul-byte"),
        pytest.param('{"name": "jetson-orin-cuda"}', 1, id="json"),
        pytest.param("\ufeff" + _shipped_text(), 1, id="utf8-bom"),
    ],
)
def test_malformed_toml(tmp_path: Path, content: str, line: int | None) -> None:
    msg = refused(write(tmp_path, content))
    assert "not valid TOML" in msg, msg
    if line is not None:
        assert f"at line {line}," in msg, msg


def test_toml_error_is_chained(tmp_path: Path) -> None:
    with pytest.raises(ProfileError) as info:
        load_profile_file(write(tmp_path, "cores = "))
    assert isinstance(info.value.__cause__, tomllib.TOMLDecodeError)
    assert isinstance(info.value, DataError)


@pytest.mark.parametrize("content", [
    pytest.param("a = " + "[" * 20_000 + "]" * 20_000, id="arrays"),
    pytest.param("a = " + "{b = " * 5_000 + "1" + "}" * 5_000, id="inline-tables"),
])
def test_deeply_nested_toml(tmp_path: Path, content: str) -> None:
    assert len(content) < MAX_PROFILE_BYTES
    refused(write(tmp_path, content))


# --- schema: wrong types, missing fields, out of range, unknown fields ----------------

SCHEMA_CASES = [
    # (dotted path, new value, expected "field: message" fragment)
    ("limits.latency_budget_ms", 0, "limits.latency_budget_ms: Input should be greater than 0"),
    ("limits.latency_budget_ms", -5.0, "limits.latency_budget_ms: Input should be greater than 0"),
    ("limits.latency_budget_ms", math.nan, "limits.latency_budget_ms: Input should be a finite number"),
    ("limits.latency_budget_ms", "fast", "limits.latency_budget_ms: Input should be a valid number"),
    ("limits.max_model_bytes", 100, "limits.max_model_bytes: Input should be greater than or equal to 1024"),
    ("limits.max_model_bytes", "512MB", "limits.max_model_bytes: Input should be a valid integer"),
    ("limits.accuracy_floor", 1.5, "limits.accuracy_floor: Input should be less than or equal to 1"),
    ("limits.max_accuracy_drop", -0.1, "limits.max_accuracy_drop: Input should be greater than or equal to 0"),
    ("hardware.cores", 0, "hardware.cores: Input should be greater than or equal to 1"),
    ("hardware.cores", 257, "hardware.cores: Input should be less than or equal to 256"),
    ("hardware.cores", 2.5, "hardware.cores: Input should be a valid integer"),
    ("hardware.ram_mb", 8, "hardware.ram_mb: Input should be greater than or equal to 16"),
    ("hardware.arch", "riscv64", "hardware.arch: Input should be 'aarch64', 'x86_64' or 'armv7l'"),
    ("hardware.fp16", "sometimes", "hardware.fp16: Input should be a valid boolean"),
    ("hardware", 5, "hardware: Input should be a valid dictionary"),
    ("schema_version", 2, "schema_version: Input should be 1"),
    ("name", "Jetson Orin", "name: Value error, must match"),
    ("description", "x" * 501, "description: String should have at most 500 characters"),
    ("formats", [], "formats: List should have at least 1 item"),
    ("formats", ["onnx", "pt"], "formats.1: Input should be 'onnx' or 'tflite'"),
    ("formats", "onnx", "formats: Input should be a valid list"),
    ("dtypes", ["int4"], "dtypes.0: Input should be 'fp32', 'fp16', 'int8' or 'uint8'"),
    ("runtimes", {}, "runtimes: Value error, at least one runtime is required"),
    ("runtimes", {"tensorrt": "8.6"}, "runtimes.tensorrt.[key]: Input should be 'onnxruntime' or 'litert'"),
    ("runtimes.onnxruntime", 1.17, "runtimes.onnxruntime: Input should be a valid string"),
    ("accelerators", [{"name": "cuda"}], "accelerators.0.execution_provider: Field required"),
    ("runtime_options.intra_op_threads", 0,
     "runtime_options.intra_op_threads: Input should be greater than or equal to 1"),
    ("runtime_options.execution_providers", "CPUExecutionProvider",
     "runtime_options.execution_providers: Input should be a valid list"),
]


@pytest.mark.parametrize(("field", "value", "expected"), SCHEMA_CASES,
                         ids=[f"{f}={v!r}"[:60] for f, v, _ in SCHEMA_CASES])
def test_schema_error_names_file_and_field(tmp_path: Path, field: str, value: Any, expected: str) -> None:
    msg = refused(write(tmp_path, dump(edited(field, value))))
    assert expected in msg, msg


REQUIRED = ["name", "hardware", "runtimes", "formats", "dtypes", "limits", "hardware.arch",
            "hardware.cores", "hardware.ram_mb", "hardware.storage_mb", "limits.max_model_bytes",
            "limits.latency_budget_ms", "accelerators.0.name"]


@pytest.mark.parametrize("field", REQUIRED)
def test_missing_required_field(tmp_path: Path, field: str) -> None:
    msg = refused(write(tmp_path, dump(edited(field, delete=True))))
    assert f"{field}: Field required" in msg, msg


def test_optional_fields_have_defaults(tmp_path: Path) -> None:
    doc = _base()
    for key in ("schema_version", "description", "accelerators", "runtime_options"):
        del doc[key]
    for key in ("vnni", "dot_product", "fp16"):
        del doc["hardware"][key]
    del doc["limits"]["max_accuracy_drop"]
    profile = load_profile_file(write(tmp_path, dump(doc)))
    assert profile.runtime_options.execution_providers == ["CPUExecutionProvider"]
    assert profile.limits.max_accuracy_drop == 0.01


@pytest.mark.parametrize("field", [
    "latency_budget_ms",              # a [limits] key at the top level
    "hardware.gpu",
    "limits.latency_budget",          # a typo
    "runtime_options.threads",
    "accelerators.0.device",
])
def test_unknown_field_is_refused(tmp_path: Path, field: str) -> None:
    msg = refused(write(tmp_path, dump(edited(field, 5))))
    assert f"{field}: Extra inputs are not permitted" in msg, msg


def test_schema_error_is_chained(tmp_path: Path) -> None:
    from pydantic import ValidationError

    with pytest.raises(ProfileError) as info:
        load_profile_file(write(tmp_path, dump(edited("limits.latency_budget_ms", 0))))
    assert isinstance(info.value.__cause__, ValidationError)


def test_infinite_latency_budget_is_refused(tmp_path: Path) -> None:
    msg = refused(write(tmp_path, dump(edited("limits.latency_budget_ms", math.inf))))
    assert "limits.latency_budget_ms" in msg


def test_name_must_match_file_name(tmp_path: Path) -> None:
    path = write(tmp_path, dump(_base()), name="other-board")
    msg = refused(path)
    assert f"name {BASE!r} does not match the file name" in msg, msg


# --- oversized ---------------------------------------------------------------------


def _padded(size: int) -> bytes:
    """The base profile padded with a comment to exactly ``size`` bytes."""
    raw = _shipped_bytes()
    return raw + b"#" + b"x" * (size - len(raw) - 2) + b"\n"


def test_profile_at_the_size_limit_loads(tmp_path: Path) -> None:
    raw = _padded(MAX_PROFILE_BYTES)
    assert len(raw) == MAX_PROFILE_BYTES
    assert load_profile_file(write(tmp_path, raw)).name == BASE


@pytest.mark.parametrize("size", [MAX_PROFILE_BYTES + 1, 4 * 1024 * 1024])
def test_oversized_profile(tmp_path: Path, size: int) -> None:
    msg = refused(write(tmp_path, _padded(size)))
    assert f"{size} bytes, over the {MAX_PROFILE_BYTES}-byte limit" in msg, msg


def test_size_is_checked_before_parsing(tmp_path: Path) -> None:
    msg = refused(write(tmp_path, b"\xff" * (MAX_PROFILE_BYTES + 1)))
    assert "over the" in msg and "TOML" not in msg, msg


# --- encoding ----------------------------------------------------------------------


@pytest.mark.parametrize(("raw", "position"), [
    pytest.param(_shipped_bytes().replace(b"Jetson", b"Jets\xff"), None, id="invalid-byte"),
    pytest.param(b"# caf\xe9\n" + _shipped_bytes(), 5, id="latin-1-comment"),
    pytest.param(_shipped_text().encode("utf-16"), 0, id="utf-16"),
])
def test_non_utf8_profile(tmp_path: Path, raw: bytes, position: int | None) -> None:
    msg = refused(write(tmp_path, raw))
    assert "'utf-8' codec can't decode" in msg, msg
    if position is not None:
        assert f"in position {position}:" in msg, msg


# --- names, paths, directories, missing files ----------------------------------------


@pytest.mark.parametrize("name", [
    "../jetson-orin-cuda", "..", "/etc/passwd", "a/b", "a\\b", "", "A", "Jetson", ".hidden",
    "-x", "_x", "x" * 65, f"{BASE}.toml", "x y", "x\x00y",
])
def test_bad_profile_name(tmp_path: Path, name: str) -> None:
    with pytest.raises(ProfileError, match="is not valid") as info:
        load_profile(name, tmp_path)
    assert repr(name) in str(info.value)


def test_path_traversal_does_not_reach_outside_the_directory(tmp_path: Path) -> None:
    """A valid profile one level up is not reachable through ``..`` in the name."""
    inner = tmp_path / "profiles"
    inner.mkdir()
    write(tmp_path, dump(edited("name", "outside")), name="outside")
    with pytest.raises(ProfileError, match="is not valid"):
        load_profile("../outside", inner)


def test_name_with_trailing_newline_is_not_valid(tmp_path: Path) -> None:
    with pytest.raises(ProfileError, match="is not valid"):
        load_profile(f"{BASE}\n", tmp_path)


def test_unknown_profile_lists_the_known_ones(tmp_path: Path) -> None:
    write(tmp_path, dump(edited("name", "site-a")), name="site-a")
    with pytest.raises(ProfileError) as info:
        load_profile("site-b", tmp_path)
    assert str(info.value) == "unknown profile 'site-b'; known profiles: site-a"


def test_missing_file(tmp_path: Path) -> None:
    msg = refused(tmp_path / "nowhere.toml")
    assert "cannot read (No such file or directory)" in msg, msg


def test_directory_instead_of_file(tmp_path: Path) -> None:
    msg = refused(tmp_path)
    assert "cannot read (Is a directory)" in msg, msg


def test_directory_named_like_a_profile(tmp_path: Path) -> None:
    (tmp_path / "site-a.toml").mkdir()
    with pytest.raises(ProfileError, match=r"site-a\.toml: cannot read \(Is a directory\)"):
        load_profile("site-a", tmp_path)
    with pytest.raises(ProfileError, match=r"site-a\.toml: cannot read"):
        list_profiles(tmp_path)


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root reads any file")
def test_unreadable_file(tmp_path: Path) -> None:
    path = write(tmp_path, _shipped_bytes())
    path.chmod(0)
    try:
        msg = refused(path)
    finally:
        path.chmod(0o600)
    assert "cannot read (Permission denied)" in msg, msg


def test_list_profiles_names_the_bad_file(tmp_path: Path) -> None:
    write(tmp_path, dump(edited("name", "good")), name="good")
    bad = write(tmp_path, dump(edited("limits.latency_budget_ms", 0)), name="bad")
    with pytest.raises(ProfileError) as info:
        list_profiles(tmp_path)
    assert str(info.value).startswith(f"{bad}: limits.latency_budget_ms:")


def test_profile_model_is_frozen() -> None:
    from pydantic import ValidationError

    profile = load_profile(BASE)
    assert isinstance(profile, Profile)
    with pytest.raises(ValidationError, match="frozen"):
        profile.name = "other"  # type: ignore[misc]
