"""Accuracy-aware static int8: an outlier-ranged layer makes plain int8 useless; the
fallback finds it, keeps its nodes in fp32, recovers the accuracy and says so."""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console

from agent.bundle import unpack
from agent.profiles import load_profile
from compiler.accuracy_tuning import TuningTarget, tune_static_qdq
from compiler.metrics import Metric
from compiler.model_source import load_model
from compiler.pipeline import CompileOptions, compile_model
from compiler.quantize import StaticQuantSettings

from .conftest import FAST_LATENCY


@dataclass(frozen=True)
class Outlier:
    pt2: Path
    onnx: bytes
    calib: Path
    eval: Path
    x_calib: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


@pytest.fixture(scope="module")
def outlier(tmp_path_factory: pytest.TempPathFactory) -> Outlier:
    """A digits MLP whose busiest hidden unit is scaled up 2000x (and its outgoing weights
    down 2000x): the function is unchanged (ReLU is positively homogeneous), but the
    first hidden activation's range is now set by that one unit, so a per-tensor int8
    scale rounds every other unit to zero."""
    import torch

    from compiler.demo_models import (
        DigitsMLP,
        export_pt2,
        load_digits_split,
        train_classifier,
        write_calib_eval,
    )

    root = tmp_path_factory.mktemp("outlier")
    x_tr, y_tr, x_te, y_te = load_digits_split(size=8, seed=0)
    torch.manual_seed(0)
    m = train_classifier(DigitsMLP(size=8), x_tr, y_tr, epochs=4, seed=0)
    with torch.no_grad():
        l1, l2 = m.net[1], m.net[3]
        k = int(torch.relu(l1(torch.from_numpy(x_tr).flatten(1))).mean(0).argmax())
        l1.weight[k] *= 2000.0
        l1.bias[k] *= 2000.0
        l2.weight[:, k] /= 2000.0
    pt2 = export_pt2(m, x_tr, root / "outlier.pt2")
    calib, ev = write_calib_eval(root, x_tr, x_te, y_te, calib_rows=128)
    onnx_model = load_model(pt2, example=x_tr[:4]).data
    x_calib = np.load(calib)["x"]
    return Outlier(pt2, onnx_model, calib, ev, x_calib, x_te, y_te)


def _tune(o: Outlier, target: TuningTarget):  # type: ignore[no-untyped-def]
    result, _ = tune_static_qdq(
        o.onnx, "input", o.x_calib, StaticQuantSettings("int8"), o.x_test, o.y_test,
        Metric("accuracy"), target,
    )
    return result


def test_fallback_excludes_the_outlier_nodes_and_recovers(outlier: Outlier) -> None:
    target = TuningTarget(max_drop=0.01)
    r = _tune(outlier, target)
    assert r.baseline is not None and r.plain is not None and r.final is not None
    assert r.baseline - r.plain > 0.3, "the constructed model must break plain int8"
    assert r.met and r.baseline - r.final <= 0.01
    # The two Gemms around the outlier activation stay fp32, nothing else.
    assert sorted(e.node for e in r.excluded) == ["node_linear", "node_linear_1"]
    assert {e.op_type for e in r.excluded} == {"Gemm"}
    assert all(e.tensor == "relu" and e.relative_error > 0.5 for e in r.excluded)
    assert all("relu" in e.reason for e in r.excluded)
    assert len(r.trials) == 1
    assert any("kept 2 node(s) in fp32" in n for n in r.notes(target))


def test_fallback_within_trial_budget_keeps_best_and_reports(outlier: Outlier) -> None:
    r = _tune(outlier, TuningTarget(max_drop=0.01, max_trials=0))
    assert not r.met and r.excluded == [] and r.final == r.plain
    loose = _tune(outlier, TuningTarget(max_drop=1.0))
    assert loose.met and loose.excluded == [] and loose.trials == []


def test_compile_reports_excluded_nodes(outlier: Outlier, tmp_path: Path) -> None:
    report = compile_model(
        outlier.pt2, [load_profile("x86-gateway-vnni")], outlier.calib, outlier.eval, tmp_path,
        CompileOptions(name="outlier", latency=FAST_LATENCY, tflite=False, dynamic_int8=False,
                       max_accuracy_drop=0.02),
    )
    int8 = next(c for c in report.candidates if c.precision == "int8")
    assert [e["node"] for e in int8.excluded_nodes] == ["node_linear", "node_linear_1"]
    assert all(e["reason"] and e["relative_error"] > 0.5 for e in int8.excluded_nodes)
    assert int8.metric_drop is not None and int8.metric_drop <= 0.02
    assert not any("metric drops" in r for r in int8.reasons)
    assert int8.settings["exclude_nodes"] == ["node_linear", "node_linear_1"]
    assert int8.settings["accuracy_tuning"]["max_drop"] == 0.02
    assert any("accuracy-aware fallback" in n for n in int8.notes)
    on_disk = json.loads((tmp_path / "report.json").read_text())
    assert on_disk["settings"]["max_accuracy_drop"] == 0.02
    disk_int8 = next(c for c in on_disk["candidates"] if c["precision"] == "int8")
    assert disk_int8["excluded_nodes"] == int8.excluded_nodes
    b = unpack(tmp_path / (int8.bundle or ""), tmp_path / "u")
    assert b.manifest.lineage.settings["exclude_nodes"] == ["node_linear", "node_linear_1"]
    out = io.StringIO()
    Console(file=out, width=250).print(report.table())
    assert "node_linear (" in out.getvalue()
