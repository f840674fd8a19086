"""TFLite bundles through the agent, the selected flag, fp16, and --train techniques."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from agent.bundle import unpack
from agent.daemon import run_selftest
from agent.profiles import RuntimeOptions, load_profile
from agent.runtimes.base import load_bundle
from compiler.errors import CompilerInputError, ModelLoadError
from compiler.pipeline import AGREEMENT_MIN, CompileOptions, TrainSettings, compile_model
from compiler.report import CompileReport
from compiler.tflite import LiteRtRunner

from .conftest import FAST_LATENCY, FactoryWorkspace


def test_every_bundle_records_the_selection(
    cnn_compiled: tuple[Path, CompileReport], tmp_path: Path
) -> None:
    out, report = cnn_compiled
    for name, summary in report.profiles.items():
        flags = {}
        for c in report.candidates:
            if c.profile == name and c.bundle:
                b = unpack(out / c.bundle, tmp_path / c.bundle)
                flags[c.bundle] = b.manifest.lineage.settings["selected"]
        assert [k for k, v in flags.items() if v] == ([summary.selected] if summary.selected else [])
        assert all(isinstance(v, bool) for v in flags.values())


def test_tflite_int8_agrees_with_onnx_int8(cnn_compiled: tuple[Path, CompileReport]) -> None:
    _, report = cnn_compiled
    int8 = [c for c in report.candidates if c.format == "tflite" and c.precision == "int8"]
    assert {c.profile for c in int8} == {"x86-gateway-vnni", "mobile-litert"}
    for c in int8:
        assert c.agreement_with_onnx_int8 is not None
        assert c.agreement_with_onnx_int8 >= AGREEMENT_MIN
        assert c.settings["quantizer"].startswith("pt2e")
        fp32 = next(
            x for x in report.candidates
            if x.profile == c.profile and x.format == "tflite" and x.precision == "fp32"
        )
        assert c.model_bytes is not None and fp32.model_bytes is not None
        assert c.model_bytes * 2.5 < fp32.model_bytes


def _tflite_bundles(out: Path, report: CompileReport, precision: str) -> list[str]:
    return [
        c.bundle for c in report.candidates
        if c.format == "tflite" and c.precision == precision and c.bundle
    ]


def test_tflite_fp32_bundle_passes_selftest_on_the_agent(
    cnn_compiled: tuple[Path, CompileReport], tmp_path: Path
) -> None:
    out, report = cnn_compiled
    names = _tflite_bundles(out, report, "fp32")
    assert names
    for name in names:
        b = unpack(out / name, tmp_path / name)
        assert b.manifest.runtime == "litert" and b.manifest.format == "tflite"
        loaded = load_bundle(b, RuntimeOptions(intra_op_threads=1), "a")
        run_selftest(loaded)
        loaded.retire()


def test_tflite_int8_bundle_passes_selftest_on_the_agent(
    cnn_compiled: tuple[Path, CompileReport], tmp_path: Path
) -> None:
    out, report = cnn_compiled
    for name in _tflite_bundles(out, report, "int8"):
        b = unpack(out / name, tmp_path / name)
        loaded = load_bundle(b, RuntimeOptions(intra_op_threads=1), "a")
        run_selftest(loaded)


def test_tflite_int8_bundle_selftest_with_boundary_quantization(
    cnn_compiled: tuple[Path, CompileReport], tmp_path: Path
) -> None:
    out, report = cnn_compiled
    for name in _tflite_bundles(out, report, "int8"):
        b = unpack(out / name, tmp_path / name)
        st = b.selftest()
        runner = LiteRtRunner(b.model_path.read_bytes(), threads=2)
        assert runner.io_dtypes == ("int8", ["int8"])
        got = runner.run(st.inputs[runner.input_name])[0]
        want = st.outputs[runner.output_names[0]]
        assert np.abs(got - want).max() <= st.tolerance


def test_fp16_candidate_for_fp16_profiles(cnn_workspace, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    report = compile_model(
        cnn_workspace.pt2, [load_profile("jetson-orin-cuda"), load_profile("x86-gateway-vnni")],
        cnn_workspace.calib, cnn_workspace.eval, tmp_path,
        CompileOptions(name="fp16", latency=FAST_LATENCY, tflite=False, dynamic_int8=False),
    )
    fp16 = [c for c in report.candidates if c.precision == "fp16"]
    assert [c.profile for c in fp16] == ["jetson-orin-cuda"]  # the VNNI gateway has no fp16
    c = fp16[0]
    fp32 = next(x for x in report.candidates if x.profile == c.profile and x.precision == "fp32")
    assert c.model_bytes is not None and fp32.model_bytes is not None
    assert c.model_bytes < 0.7 * fp32.model_bytes
    assert c.agreement_with_fp32 is not None and c.agreement_with_fp32 >= 0.99
    b = unpack(tmp_path / (c.bundle or ""), tmp_path / "u")
    assert b.manifest.inputs[0].dtype == "float32"  # fp32 interface (keep_io_types)
    run_selftest(load_bundle(b, RuntimeOptions(intra_op_threads=1), "a"))


def test_tflite_fp16_candidate_for_a_litert_profile_with_fp16(
    cnn_compiled: tuple[Path, CompileReport], tmp_path: Path
) -> None:
    out, report = cnn_compiled
    fp16 = [c for c in report.candidates if c.format == "tflite" and c.precision == "fp16"]
    assert [c.profile for c in fp16] == ["mobile-litert"]  # the only LiteRT profile with fp16
    c = fp16[0]
    fp32 = next(x for x in report.candidates
                if x.profile == c.profile and x.format == "tflite" and x.precision == "fp32")
    assert c.model_bytes is not None and fp32.model_bytes is not None
    assert c.model_bytes < 0.6 * fp32.model_bytes
    assert c.agreement_with_fp32 is not None and c.agreement_with_fp32 >= 0.99
    assert c.accuracy is not None and fp32.accuracy is not None and abs(c.accuracy - fp32.accuracy) <= 0.005
    b = unpack(out / (c.bundle or ""), tmp_path / "u")
    assert c.bundle == "digits-cnn-1.2.3-mobile-litert-tflite-fp16.efb"
    runner = LiteRtRunner(b.model_path.read_bytes(), threads=1)
    assert "DEQUANTIZE" in runner.ops() and runner.io_dtypes == ("float32", ["float32"])
    run_selftest(load_bundle(b, RuntimeOptions(intra_op_threads=1), "a"))


def test_a_litert_only_profile_without_labels_is_held_to_agreement(cnn_workspace, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A TFLite-only compile plans no ONNX candidate; without labels its candidates must
    still be compared with the fp32 model (the source, run in ONNX Runtime), not left
    unchecked."""
    report = compile_model(
        cnn_workspace.pt2, [load_profile("mobile-litert")], cnn_workspace.calib, None, tmp_path,
        CompileOptions(name="nolabels", latency=FAST_LATENCY),
    )
    tfl = [c for c in report.candidates if c.format == "tflite"]
    assert tfl and all(c.agreement_with_fp32 is not None for c in tfl)
    assert all(c.accuracy is None for c in tfl)
    assert any("top-1 agreement with the fp32 model instead" in s for s in report.skipped)
    for c in tfl:
        if c.agreement_with_fp32 is not None and c.agreement_with_fp32 < 0.99:
            assert not c.passed and any("metric drops" in r for r in c.reasons), c.reasons


def test_train_adds_pruning_and_distillation(
    factory_workspace: FactoryWorkspace, tmp_path: Path
) -> None:
    fw = factory_workspace
    report = compile_model(
        fw.spec, [load_profile("x86-gateway-vnni"), load_profile("mobile-litert")], fw.calib, fw.eval,
        tmp_path,
        CompileOptions(
            name="trained", latency=FAST_LATENCY, dynamic_int8=False,
            state_dict=fw.state_dict,
            train=TrainSettings(fw.train, prune_epochs=2, distill_epochs=4),
        ),
    )
    assert report.model["kind"] == "module:factory" and report.skipped == []
    cands = {(c.profile, c.format, c.technique): c for c in report.candidates}
    by = {tech: c for (p, f, tech), c in cands.items() if (p, f) == ("x86-gateway-vnni", "onnx")}
    base = by["baseline"]
    assert base.model_bytes is not None and base.accuracy is not None
    for tech in ("structured-pruning", "distillation"):
        c = by[tech]
        assert c.model_bytes is not None and c.model_bytes < 0.4 * base.model_bytes, tech
        assert c.accuracy is not None and c.accuracy > 0.6, tech
        assert any("parameters" in n for n in c.notes)
    assert by["structured-pruning"].bundle == "trained-0.1.0-x86-gateway-vnni-onnx-fp32-pruned50.efb"
    kd = by["distillation"]
    width = kd.settings["width"]
    assert 0 < width < 0.5 and kd.settings["parameter_ratio"] >= 4.0
    assert kd.bundle == f"trained-0.1.0-x86-gateway-vnni-onnx-fp32-student{round(width * 100)}.efb"
    assert kd.model_bytes is not None and kd.model_bytes * 3.5 < base.model_bytes
    for tech in ("structured-pruning", "distillation"):  # and each quantized to int8 (static QDQ)
        q = by[f"{tech}+int8"]
        fp = by[tech]
        assert q.precision == "int8" and q.model_bytes is not None and fp.model_bytes is not None
        assert q.model_bytes < 0.5 * fp.model_bytes, tech
        assert q.accuracy is not None and fp.accuracy is not None and abs(q.accuracy - fp.accuracy) <= 0.02
        assert "accuracy_tuning" in q.settings, tech
    assert by["structured-pruning+int8"].bundle == "trained-0.1.0-x86-gateway-vnni-onnx-int8-pruned50.efb"
    assert by["distillation+int8"].bundle == f"trained-0.1.0-x86-gateway-vnni-onnx-int8-student{round(width * 100)}.efb"
    sparse = by["unstructured-pruning"]
    assert sparse.model_bytes == pytest.approx(base.model_bytes, rel=0.01)  # dense: same size
    assert not sparse.selected and not sparse.passed
    assert any("compressed size only" in r for r in sparse.reasons)
    assert any("zlib-compressed" in n for n in sparse.notes)
    b = unpack(tmp_path / (by["distillation"].bundle or ""), tmp_path / "u")
    assert b.manifest.lineage.inputs.keys() >= {"model", "calibration", "eval", "train"}
    assert b.manifest.lineage.settings["temperature"] == 4.0

    # A LiteRT-only profile gets the same pruned model and student as TFLite bundles
    # (trained once: the same width and accuracy as their ONNX twins), and the agent runs them.
    lite = {tech: c for (p, f, tech), c in cands.items() if (p, f) == ("mobile-litert", "tflite")}
    assert {"baseline", "pt2e-static", "structured-pruning", "distillation"} <= lite.keys()
    assert lite["distillation"].settings["width"] == width
    assert lite["distillation"].bundle == f"trained-0.1.0-mobile-litert-tflite-fp32-student{round(width * 100)}.efb"
    assert lite["structured-pruning"].bundle == "trained-0.1.0-mobile-litert-tflite-fp32-pruned50.efb"
    for tech in ("structured-pruning", "distillation"):
        c, twin = lite[tech], by[tech]
        assert c.accuracy is not None and twin.accuracy is not None
        assert abs(c.accuracy - twin.accuracy) <= 0.01, tech
        lite_base = lite["baseline"].model_bytes
        assert c.model_bytes is not None and lite_base is not None and c.model_bytes < 0.4 * lite_base, tech
        # ... and quantized to int8 (pt2e) on top, since the profile takes int8
        q = lite[f"{tech}+int8"]
        assert q.model_bytes is not None and q.model_bytes < 0.6 * c.model_bytes, tech  # a tiny model: headers weigh
        assert q.accuracy is not None and abs(q.accuracy - c.accuracy) <= 0.02, tech
        # checked against the ONNX int8 model of the same weights, like the source's TFLite int8
        assert q.agreement_with_onnx_int8 is not None and q.agreement_with_onnx_int8 >= AGREEMENT_MIN, tech
        for cand in (c, q):
            lb = unpack(tmp_path / (cand.bundle or ""), tmp_path / f"u-{cand.bundle}")
            assert lb.manifest.lineage.inputs.keys() >= {"train"}
            run_selftest(load_bundle(lb, RuntimeOptions(intra_op_threads=1), "a"))
    assert lite["distillation+int8"].bundle == (
        f"trained-0.1.0-mobile-litert-tflite-int8-student{round(width * 100)}.efb")


def test_pt2_with_train_skips_training_with_a_reason(cnn_workspace, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from compiler.demo_models import load_digits_split, write_npz

    x, y, _, _ = load_digits_split()
    train = write_npz(tmp_path / "train.npz", x[:64], y[:64])
    report = compile_model(
        cnn_workspace.pt2, [load_profile("x86-box-avx2")], cnn_workspace.calib, None,
        tmp_path / "out",
        CompileOptions(name="t", latency=FAST_LATENCY, dynamic_int8=False,
                       train=TrainSettings(train)),
    )
    assert any("module:factory" in s for s in report.skipped)
    assert {c.technique for c in report.candidates} == {"baseline", "static-qdq", "static-qdq-per-tensor"}


def test_factory_errors(factory_workspace: FactoryWorkspace, tmp_path: Path) -> None:
    import torch

    fw = factory_workspace
    prof = [load_profile("x86-box-avx2")]
    opts = CompileOptions(latency=FAST_LATENCY)
    with pytest.raises(CompilerInputError, match="needs --state-dict"):
        compile_model(fw.spec, prof, fw.calib, None, tmp_path, opts)
    with pytest.raises(ModelLoadError, match="cannot import"):
        compile_model("compiler.demo_models:Nope", prof, fw.calib, None, tmp_path,
                      CompileOptions(state_dict=fw.state_dict))
    bad = tmp_path / "bad.pt"
    torch.save({"weight": torch.zeros(1)}, bad)
    with pytest.raises(ModelLoadError, match="does not load into") as ei:
        compile_model(fw.spec, prof, fw.calib, None, tmp_path, CompileOptions(state_dict=bad))
    assert "\n" not in str(ei.value) and "\t" not in str(ei.value)  # torch's message is several lines
