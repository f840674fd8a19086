"""End-to-end compiles with real torch export, ONNX Runtime quantization and bundles."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.bundle import unpack
from agent.profiles import load_profile
from compiler.measure import ort_session
from compiler.pipeline import CompileOptions, compile_model
from compiler.report import CompileReport

from .conftest import FAST_LATENCY, PROFILES, Workspace

# (profile, format, bundle label): the label is the precision, except for static int8
# with per-tensor weights ("int8-pertensor", precision "int8").
EXPECTED = {
    ("x86-gateway-vnni", "onnx", "fp32"), ("x86-gateway-vnni", "onnx", "int8"),
    ("x86-gateway-vnni", "onnx", "int8-pertensor"),
    ("x86-gateway-vnni", "onnx", "int8-dynamic"), ("x86-gateway-vnni", "tflite", "fp32"),
    ("x86-gateway-vnni", "tflite", "int8"),
    ("x86-box-avx2", "onnx", "fp32"), ("x86-box-avx2", "onnx", "int8"),
    ("x86-box-avx2", "onnx", "int8-pertensor"), ("x86-box-avx2", "onnx", "int8-dynamic"),
    ("mobile-litert", "tflite", "fp32"), ("mobile-litert", "tflite", "int8"),
    ("mobile-litert", "tflite", "fp16"),  # hardware.fp16: fp16 weights
}


def _label(c: dict[str, Any]) -> str:
    """The bundle-name suffix of a report.json candidate."""
    prefix = f"digits-cnn-1.2.3-{c['profile']}-{c['format']}-"
    assert c["bundle"].startswith(prefix) and c["bundle"].endswith(".efb")
    return str(c["bundle"])[len(prefix) : -len(".efb")]


def test_report_lists_every_candidate(cnn_compiled: tuple[Path, CompileReport]) -> None:
    out, report = cnn_compiled
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk == report.model_dump(mode="json")
    onnx_profiles = ["x86-gateway-vnni", "x86-box-avx2"]
    cands = on_disk["candidates"]
    assert sorted((c["profile"], c["format"], _label(c)) for c in cands) == sorted(EXPECTED)
    for c in cands:
        for key in ("profile", "format", "precision", "bundle", "size_bytes", "latency_ms_p50",
                    "accuracy", "selected", "reasons"):
            assert key in c
        per_tensor = c["format"] == "onnx" and c["settings"].get("per_channel") is False
        assert _label(c) == c["precision"] + ("-pertensor" if per_tensor else "")
        assert c["size_bytes"] == (out / c["bundle"]).stat().st_size
        assert c["latency_ms_p50"] > 0
        assert 0.8 < c["accuracy"] <= 1.0
        assert c["reasons"], "every candidate explains its verdict"
    for p in [*onnx_profiles, "mobile-litert"]:
        chosen = [c for c in cands if c["profile"] == p and c["selected"]]
        assert len(chosen) <= 1
        assert on_disk["profiles"][p]["selected"] == (chosen[0]["bundle"] if chosen else None)
    # int8 is smaller; whether it is faster is measured, not assumed.
    for p in onnx_profiles:
        by = {_label(c): c for c in cands if c["profile"] == p and c["format"] == "onnx"}
        for label in ("int8", "int8-pertensor"):
            assert by[label]["model_bytes"] * 2.5 < by["fp32"]["model_bytes"]
            if by[label]["latency_ms_p50"] >= by["fp32"]["latency_ms_p50"]:
                assert not by[label]["selected"]
                assert any("slower than fp32" in r for r in by[label]["reasons"])
    # Dynamic int8 of a CNN is slower than fp32 on x86 (ConvInteger); it must be
    # measured and rejected, never selected.
    for p in onnx_profiles:
        by = {c["precision"]: c for c in cands if c["profile"] == p and c["format"] == "onnx"}
        dyn = by["int8-dynamic"]
        assert dyn["latency_ms_p50"] > by["fp32"]["latency_ms_p50"]
        assert not dyn["selected"] and not dyn["passed"]
        assert any("slower than fp32" in r for r in dyn["reasons"])
    # The TFLite-only profile gets TFLite candidates only, and says why no ONNX.
    assert {c["format"] for c in cands if c["profile"] == "mobile-litert"} == {"tflite"}
    assert "ONNX candidates are not built" in on_disk["profiles"]["mobile-litert"]["notes"][0]
    # Without --train the training techniques are skipped with a reason.
    assert any("--train" in s for s in on_disk["skipped"])


def test_quantization_settings_follow_vnni(cnn_compiled: tuple[Path, CompileReport]) -> None:
    _, report = cnn_compiled
    static = [c for c in report.candidates if c.precision == "int8" and c.format == "onnx"]
    for per_channel in (True, False):
        s = {c.profile: c.settings for c in static if c.settings["per_channel"] is per_channel}
        assert len(s) == 2
        assert s["x86-gateway-vnni"]["activation_type"] == "int8"
        assert s["x86-gateway-vnni"]["reduce_range"] is False
        assert s["x86-box-avx2"]["activation_type"] == "uint8"
        assert s["x86-box-avx2"]["reduce_range"] is True
        assert all(v["format"] == "QDQ" for v in s.values())
    assert len(static) == 4


def test_bundles_unpack_and_pass_their_selftest(
    cnn_compiled: tuple[Path, CompileReport], tmp_path: Path
) -> None:
    out, report = cnn_compiled
    for c in report.candidates:
        assert c.bundle is not None
        b = unpack(out / c.bundle, tmp_path / c.bundle)
        m = b.manifest
        assert (m.name, m.version, m.profile) == ("digits-cnn", "1.2.3", c.profile)
        assert m.lineage.settings["selected"] is c.selected
        if c.format == "tflite":
            # Full-integer and fp32 TFLite models are converted with batch 1; their
            # self-test is checked through the agent in test_formats.py.
            assert m.runtime == "litert" and m.min_runtime_version == "1.0"
            assert m.inputs[0].shape == [1, 1, 8, 8] and m.inputs[0].dtype == "float32"
            assert m.outputs[0].shape == [1, 10]
            continue
        assert m.runtime == "onnxruntime" and m.min_runtime_version == "1.17"
        assert m.inputs[0].name == "input" and m.inputs[0].shape == [-1, 1, 8, 8]
        assert m.outputs[0].name == "logits" and m.outputs[0].shape == [-1, 10]
        assert m.labels == [str(i) for i in range(10)]
        assert m.lineage.inputs.keys() == {"model", "calibration", "eval"}
        assert {"torch", "onnx", "onnxruntime"} <= m.lineage.libraries.keys()
        assert m.lineage.metrics["accuracy"] == pytest.approx(c.accuracy)
        st = b.selftest()
        assert st.inputs["input"].shape == (8, 1, 8, 8)
        sess = ort_session(b.model_path.read_bytes(), 1)  # what the compiler and the agent run
        got = sess.run(None, st.inputs)[0]
        assert np.abs(got - st.outputs["logits"]).max() <= st.tolerance
        ref = b.reference()
        assert ref.rows == 128 and ref.predictions is not None
        assert ref.predictions.classes == m.labels


def test_int8_predictions_agree_with_fp32(
    cnn_compiled: tuple[Path, CompileReport], cnn_workspace: Workspace, tmp_path: Path
) -> None:
    out, report = cnn_compiled
    preds = {}
    onnx_cands = [c for c in report.candidates if c.profile == "x86-gateway-vnni" and c.format == "onnx"]
    for c in onnx_cands:
        b = unpack(out / (c.bundle or ""), tmp_path / (c.bundle or ""))
        sess = ort_session(b.model_path.read_bytes(), 1)
        preds[c.bundle] = sess.run(None, {"input": cnn_workspace.x_test})[0].argmax(1)
    fp32 = next(c for c in onnx_cands if c.precision == "fp32")
    static = [c for c in onnx_cands if c.precision == "int8"]
    assert len(static) == 2
    for int8 in static:
        agreement = float((preds[int8.bundle] == preds[fp32.bundle]).mean())
        assert agreement >= 0.97
        assert int8.agreement_with_fp32 == pytest.approx(agreement)


def test_over_budget_profile_selects_nothing(cnn_workspace: Workspace, tmp_path: Path) -> None:
    base = load_profile("x86-gateway-vnni")
    tight = base.model_copy(update={"limits": base.limits.model_copy(update={"latency_budget_ms": 1e-6})})
    report = compile_model(
        cnn_workspace.pt2, [tight], cnn_workspace.calib, cnn_workspace.eval, tmp_path,
        CompileOptions(name="tight", latency=FAST_LATENCY, tflite=False),
    )
    assert not any(c.selected for c in report.candidates)
    for c in report.candidates:
        b = unpack(tmp_path / (c.bundle or ""), tmp_path / "u" / (c.bundle or ""))
        assert b.manifest.lineage.settings["selected"] is False
    assert all(any("over the profile's budget" in r for r in c.reasons) for c in report.candidates)
    assert report.profiles["x86-gateway-vnni"].selected is None


def test_onnx_input_names_come_from_the_graph(
    mlp_workspace: Workspace, tmp_path: Path
) -> None:
    import onnx
    import torch

    from compiler.demo_models import DigitsMLP

    torch.manual_seed(1)
    src = tmp_path / "renamed.onnx"
    torch.onnx.export(
        DigitsMLP().eval(), (torch.zeros(2, 1, 8, 8),), str(src), dynamo=False,
        input_names=["pixels"], output_names=["scores"], opset_version=17,
        dynamic_axes={"pixels": {0: "n"}, "scores": {0: "n"}},
    )
    assert onnx.load(str(src)).graph.input[0].name == "pixels"
    report = compile_model(
        src, [load_profile("x86-gateway-vnni")], mlp_workspace.calib, None, tmp_path / "out",
        CompileOptions(name="renamed", latency=FAST_LATENCY),
    )
    assert report.model["kind"] == "onnx"
    assert all(c.accuracy is None for c in report.candidates)  # no eval -> no accuracy
    b = unpack(tmp_path / "out" / (report.candidates[0].bundle or ""), tmp_path / "b")
    assert [t.name for t in b.manifest.inputs] == ["pixels"]
    assert [t.name for t in b.manifest.outputs] == ["scores"]
    assert b.manifest.inputs[0].shape == [-1, 1, 8, 8]
    assert b.manifest.labels == []


def _bundles(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.efb"))}


def test_same_inputs_and_seed_give_identical_bundles(
    cnn_compiled: tuple[Path, CompileReport], cnn_workspace: Workspace, tmp_path: Path
) -> None:
    first, _ = cnn_compiled
    # A second run in a fresh interpreter: catches state that leaks between exports
    # in one process (counters in generated names, hash seeds, ...).
    code = (
        "import sys; from pathlib import Path; "
        "from agent.profiles import load_profile; "
        "from compiler.measure import LatencySettings; "
        "from compiler.pipeline import CompileOptions, compile_model; "
        f"compile_model(Path({str(cnn_workspace.pt2)!r}), [load_profile(n) for n in {PROFILES!r}], "
        f"Path({str(cnn_workspace.calib)!r}), Path({str(cnn_workspace.eval)!r}), "
        f"Path({str(tmp_path / 'again')!r}), CompileOptions(name='digits-cnn', version='1.2.3', "
        "seed=0, latency=LatencySettings(warmup=1, rounds=1, runs_per_round=2)))"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[2],
                   env={"PYTHONHASHSEED": "123", "PATH": "/usr/bin:/bin"})
    a, b = _bundles(first), _bundles(tmp_path / "again")
    assert a.keys() == b.keys() and len(a) == len(EXPECTED)
    for name in a:
        ma, mb = _manifest(a[name]), _manifest(b[name])
        if ma["lineage"]["settings"]["selected"] == mb["lineage"]["settings"]["selected"]:
            assert a[name] == b[name], f"{name} differs between identical runs"
        else:
            # The selection is measured on this host and may flip between runs for
            # candidates within noise; everything else must still be identical.
            for m in (ma, mb):
                m["lineage"]["settings"].pop("selected")
            assert ma == mb, f"{name} differs beyond the selected flag"


def _manifest(bundle: bytes) -> dict[str, object]:
    import io
    import tarfile

    with tarfile.open(fileobj=io.BytesIO(bundle)) as tf:
        member = tf.extractfile("manifest.json")
        assert member is not None
        return json.loads(member.read())
