"""The click command: happy path output and clear errors for bad input (no tracebacks)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from compiler.cli import compile_command

from .conftest import Workspace


def invoke(*args: str | Path) -> tuple[int, str]:
    result = CliRunner().invoke(compile_command, [str(a) for a in args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception  # a traceback would reach the user: fail loudly
    return result.exit_code, result.output


def test_compile_prints_table_and_writes_report(mlp_workspace: Workspace, tmp_path: Path) -> None:
    code, out = invoke(
        mlp_workspace.pt2, "--profile", "x86-gateway-vnni", "--calibration", mlp_workspace.calib,
        "--eval", mlp_workspace.eval, "--out", tmp_path, "--name", "Digits-MLP",
        "--version", "2.0.0", "--latency-rounds", "2",
    )
    assert code == 0, out
    assert "edgefleet compile: digits-mlp 2.0.0" in out
    assert "x86-gateway-vnni" in out and "int8" in out
    report = json.loads((tmp_path / "report.json").read_text())
    assert sum(c["selected"] for c in report["candidates"]) == 1


@pytest.fixture()
def bad_files(tmp_path: Path, mlp_workspace: Workspace) -> dict[str, Path]:
    files = {}
    files["no_x"] = tmp_path / "no_x.npz"
    np.savez(files["no_x"], data=np.zeros((4, 1, 8, 8), np.float32))
    files["wrong_shape"] = tmp_path / "wrong_shape.npz"
    np.savez(files["wrong_shape"], x=np.zeros((4, 1, 16, 16), np.float32))
    files["wrong_rank"] = tmp_path / "wrong_rank.npz"
    np.savez(files["wrong_rank"], x=np.zeros((4, 64), np.float32))
    files["not_npz"] = tmp_path / "not_npz.npz"
    files["not_npz"].write_text("hello")
    files["y_len"] = tmp_path / "y_len.npz"
    np.savez(files["y_len"], x=np.zeros((4, 1, 8, 8), np.float32), y=np.zeros(3, np.int64))
    files["y_range"] = tmp_path / "y_range.npz"
    np.savez(files["y_range"], x=np.zeros((4, 1, 8, 8), np.float32), y=np.array([0, 1, 2, 42]))
    files["nan"] = tmp_path / "nan.npz"
    np.savez(files["nan"], x=np.full((4, 1, 8, 8), np.nan, np.float32))
    files["garbage_model"] = tmp_path / "model.onnx"
    files["garbage_model"].write_bytes(b"\x00\x01 definitely not a model")
    files["garbage_pt2"] = tmp_path / "model.pt2"
    files["garbage_pt2"].write_bytes(b"PK\x03\x04 broken zip")
    return files


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("no_x", "no array named 'x' (found data)"),
        ("wrong_shape", "the model expects inputs shaped (N, 1, 8, 8)"),
        ("wrong_rank", "the model expects inputs shaped (N, 1, 8, 8)"),
        ("not_npz", "not a readable .npz file"),
        ("nan", "NaN or infinite"),
    ],
)
def test_bad_calibration_is_a_clear_error(
    case: str, message: str, bad_files: dict[str, Path], mlp_workspace: Workspace, tmp_path: Path
) -> None:
    code, out = invoke(
        mlp_workspace.pt2, "--profile", "x86-gateway-vnni", "--calibration", bad_files[case],
        "--out", tmp_path / "out",
    )
    assert code == 1
    assert "Error:" in out and message in out
    assert "Traceback" not in out


@pytest.mark.parametrize(
    ("case", "message"),
    [("y_len", "'y' has 3 rows, 'x' has 4"), ("y_range", "but the model has 10 output classes")],
)
def test_bad_eval_is_a_clear_error(
    case: str, message: str, bad_files: dict[str, Path], mlp_workspace: Workspace, tmp_path: Path
) -> None:
    code, out = invoke(
        mlp_workspace.pt2, "--profile", "x86-gateway-vnni", "--calibration", mlp_workspace.calib,
        "--eval", bad_files[case], "--out", tmp_path / "out", "--latency-rounds", "1",
    )
    assert code == 1 and message in out, out


@pytest.mark.parametrize(
    ("model_case", "message"),
    [
        ("garbage_model", "neither a .pt2 nor a readable ONNX file"),
        ("garbage_pt2", "not a readable torch.export program"),
        ("missing", "cannot read"),
    ],
)
def test_unreadable_model_is_a_clear_error(
    model_case: str, message: str, bad_files: dict[str, Path], mlp_workspace: Workspace,
    tmp_path: Path,
) -> None:
    model = bad_files.get(model_case, tmp_path / "missing.onnx")
    code, out = invoke(
        model, "--profile", "x86-gateway-vnni", "--calibration", mlp_workspace.calib,
        "--out", tmp_path / "out",
    )
    assert code == 1 and message in out, out


def test_unknown_profile_is_a_usage_error(mlp_workspace: Workspace, tmp_path: Path) -> None:
    code, out = invoke(
        mlp_workspace.pt2, "--profile", "toaster", "--calibration", mlp_workspace.calib,
        "--out", tmp_path,
    )
    assert code == 2
    assert "unknown profile 'toaster'" in out and "x86-gateway-vnni" in out


def test_bad_version_is_a_usage_error(mlp_workspace: Workspace, tmp_path: Path) -> None:
    code, out = invoke(
        mlp_workspace.pt2, "--profile", "x86-gateway-vnni", "--calibration", mlp_workspace.calib,
        "--out", tmp_path, "--version", "one",
    )
    assert code == 2 and "semantic version" in out


def test_bad_name_is_a_clear_error(mlp_workspace: Workspace, tmp_path: Path) -> None:
    code, out = invoke(
        mlp_workspace.pt2, "--profile", "x86-gateway-vnni", "--calibration", mlp_workspace.calib,
        "--out", tmp_path, "--name", "bad name!", "--latency-rounds", "1",
    )
    assert code == 2 and "not a valid model name" in out


def test_profiles_dir_compiles_for_a_custom_profile(mlp_workspace: Workspace, tmp_path: Path) -> None:
    """A board of one's own: a profile TOML in --profiles-dir, as `agent run` takes it."""
    from agent.profiles import profiles_dir

    mine = tmp_path / "profiles"
    mine.mkdir()
    text = (profiles_dir() / "x86-gateway-vnni.toml").read_text()
    (mine / "my-gateway.toml").write_text(text.replace('name = "x86-gateway-vnni"', 'name = "my-gateway"'))
    code, out = invoke(
        mlp_workspace.pt2, "--profile", "all", "--profiles-dir", mine, "--calibration", mlp_workspace.calib,
        "--out", tmp_path / "out", "--name", "mlp", "--latency-rounds", "2", "--no-tflite",
    )
    assert code == 0, out
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert {c["profile"] for c in report["candidates"]} == {"my-gateway"}
    (mine / "broken.toml").write_text("name = \n")
    code, out = invoke(
        mlp_workspace.pt2, "--profile", "all", "--profiles-dir", mine, "--calibration", mlp_workspace.calib,
        "--out", tmp_path / "out2",
    )
    assert code == 2 and "broken.toml" in out, out
