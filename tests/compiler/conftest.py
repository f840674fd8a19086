"""Shared fixtures: tiny digits models, their data files, and one compile run."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from agent.profiles import load_profile
from compiler.demo_models import export_pt2, train_digits_cnn, train_digits_mlp, write_calib_eval
from compiler.measure import LatencySettings
from compiler.pipeline import CompileOptions, compile_model
from compiler.report import CompileReport

FAST_LATENCY = LatencySettings(warmup=5, rounds=3, runs_per_round=10)
PROFILES = ["x86-gateway-vnni", "x86-box-avx2", "mobile-litert"]


@dataclass(frozen=True)
class Workspace:
    root: Path
    pt2: Path
    calib: Path
    eval: Path
    x_test: np.ndarray
    y_test: np.ndarray


@pytest.fixture(scope="session")
def cnn_workspace(tmp_path_factory: pytest.TempPathFactory) -> Workspace:
    root = tmp_path_factory.mktemp("cnn")
    module, x_tr, _, x_te, y_te = train_digits_cnn(seed=0, epochs=6)
    pt2 = export_pt2(module, x_tr, root / "cnn.pt2")
    calib, ev = write_calib_eval(root, x_tr, x_te, y_te, calib_rows=128)
    return Workspace(root, pt2, calib, ev, x_te, y_te)


@pytest.fixture(scope="session")
def mlp_workspace(tmp_path_factory: pytest.TempPathFactory) -> Workspace:
    root = tmp_path_factory.mktemp("mlp")
    module, x_tr, _, x_te, y_te = train_digits_mlp(seed=0, epochs=6)
    pt2 = export_pt2(module, x_tr, root / "mlp.pt2")
    calib, ev = write_calib_eval(root, x_tr, x_te, y_te, calib_rows=128)
    return Workspace(root, pt2, calib, ev, x_te, y_te)


@pytest.fixture(scope="session")
def cnn_compiled(cnn_workspace: Workspace) -> tuple[Path, CompileReport]:
    out = cnn_workspace.root / "out"
    report = compile_model(
        cnn_workspace.pt2,
        [load_profile(n) for n in PROFILES],
        cnn_workspace.calib,
        cnn_workspace.eval,
        out,
        CompileOptions(name="digits-cnn", version="1.2.3", seed=0, latency=FAST_LATENCY),
    )
    return out, report


@dataclass(frozen=True)
class FactoryWorkspace:
    spec: str
    state_dict: Path
    calib: Path
    eval: Path
    train: Path


@pytest.fixture(scope="session")
def factory_workspace(tmp_path_factory: pytest.TempPathFactory) -> FactoryWorkspace:
    """A DigitsCNN given as ``module:factory`` + state_dict, with a labelled train file."""
    import torch

    from compiler.demo_models import write_npz

    root = tmp_path_factory.mktemp("factory")
    module, x_tr, y_tr, x_te, y_te = train_digits_cnn(seed=0, epochs=6)
    sd = root / "cnn.pt"
    torch.save(module.state_dict(), sd)
    calib, ev = write_calib_eval(root, x_tr, x_te, y_te, calib_rows=128)
    train = write_npz(root / "train.npz", x_tr, y_tr)
    return FactoryWorkspace("compiler.demo_models:DigitsCNN", sd, calib, ev, train)
