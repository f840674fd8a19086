"""Faults found in review: candidates that escaped the accuracy check, NaN metrics, ONNX
IR versions the target runtime refuses, and input files that gave tracebacks."""

from __future__ import annotations

import io
import re
import struct
import sys
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from agent.bundle import unpack
from agent.profiles import Limits, load_profile
from compiler import datasets
from compiler.compatibility import lowest_ir_version, onnx_blockers
from compiler.errors import CompilerInputError, DataFileError, ModelLoadError
from compiler.measure import LatencySettings
from compiler.metrics import parse_metric
from compiler.model_source import (
    OnnxModel,
    load_factory_model,
    onnx_tensor_infos,
    with_dynamic_batch,
)
from compiler.pipeline import CompileOptions, compile_model
from compiler.selection import Measured, select

FAST = LatencySettings(warmup=3, rounds=2, runs_per_round=5)


def _linear(ir: int = 10, log_output: bool = False, elem: int = TensorProto.FLOAT) -> bytes:
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.normal(size=(4, 3)).astype(np.float32), "w")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h" if log_output else "y"])]
    if log_output:  # log of a negative number: NaN for some rows
        nodes.append(helper.make_node("Log", ["h"], ["y"]))
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3])], [w])
    if elem != TensorProto.FLOAT:
        g.initializer.append(helper.make_tensor("extra", elem, [2], [1, 1]))
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)], ir_version=ir).SerializeToString()


def test_onnx_ir_versions_are_lowered_to_what_the_content_needs_and_checked():
    m = _linear(ir=10)
    assert onnx_blockers(m, "1.17") == ["model has ONNX IR version 10; onnxruntime 1.17 loads up to 9"]
    assert onnx_blockers(m, "1.18") == []
    low = lowest_ir_version(m)
    assert onnx.load_model_from_string(low).ir_version == 8 and onnx_blockers(low, "1.17") == []
    assert lowest_ir_version(low) == low  # already lowest: the same bytes
    int4 = _linear(ir=10, elem=TensorProto.INT4)  # a 4-bit initializer needs IR 10
    assert onnx.load_model_from_string(lowest_ir_version(int4)).ir_version == 10


def test_compiled_onnx_bundles_load_on_the_profiles_runtime(cnn_compiled, tmp_path: Path):
    """torch.onnx stamps IR 10; every profile here declares onnxruntime 1.17 (IR <= 9)."""
    out, report = cnn_compiled
    onnx_bundles = [c.bundle for c in report.candidates if c.bundle and c.format == "onnx"]
    assert onnx_bundles
    for i, name in enumerate(onnx_bundles):
        b = unpack(out / name, tmp_path / str(i))
        assert onnx.load_model(str(b.model_path)).ir_version <= 9, name


def test_a_candidate_without_a_metric_is_not_passed_when_fp32_has_one():
    limits = Limits(max_model_bytes=10_000, latency_budget_ms=5.0, max_accuracy_drop=0.01)
    fp32 = Measured("fp32", 4000, 1.0, 1.2, 0.95, is_baseline=True)
    unmeasured = Measured("int8", 1000, 0.5, 0.6, None)
    d = {x.key: x for x in select([fp32, unmeasured], limits)}
    assert d["fp32"].selected and not d["int8"].passed
    assert "metric was not measured" in " ".join(d["int8"].reasons)


def _write_npz(path: Path, **arrays: np.ndarray) -> Path:
    np.savez(path, **arrays)
    return path


def test_mse_without_labels_checks_fidelity_against_fp32(tmp_path: Path):
    """Without labels, mse is measured against the fp32 model's outputs, the baseline's
    own included (0), so every candidate has a drop to be judged by."""
    model = tmp_path / "lin.onnx"
    model.write_bytes(_linear())
    rng = np.random.default_rng(1)
    calib = _write_npz(tmp_path / "calib.npz", x=rng.normal(size=(64, 4)).astype(np.float32))
    report = compile_model(model, [load_profile("x86-gateway-vnni")], calib, None, tmp_path / "out",
                           CompileOptions(name="lin", version="1.0.0", seed=0, latency=FAST,
                                          metric=parse_metric("mse")))
    base = next(c for c in report.candidates if c.technique == "baseline")
    assert base.metrics["mse"] == 0.0
    others = [c for c in report.candidates if c.technique != "baseline" and c.model_bytes is not None]
    assert others and all(c.metrics.get("mse") is not None for c in others)
    assert any("measured on the calibration rows" in s for s in report.skipped)


def test_nan_outputs_reject_the_candidate_and_the_compile_finishes(tmp_path: Path):
    model = tmp_path / "log.onnx"
    model.write_bytes(_linear(log_output=True))
    rng = np.random.default_rng(2)
    x = rng.normal(size=(64, 4)).astype(np.float32)
    calib = _write_npz(tmp_path / "calib.npz", x=x)
    ev = _write_npz(tmp_path / "eval.npz", x=x, y=rng.normal(size=(64, 3)).astype(np.float32))
    out = tmp_path / "out"
    report = compile_model(model, [load_profile("x86-gateway-vnni")], calib, ev, out,
                           CompileOptions(name="lognan", version="1.0.0", seed=0, latency=FAST,
                                          metric=parse_metric("mse")))
    assert (out / "report.json").exists()
    assert not any(c.selected for c in report.candidates)
    base = next(c for c in report.candidates if c.technique == "baseline")
    assert base.metrics["mse"] is None
    assert any("not a finite number" in r for r in base.reasons)


def test_damaged_data_files_are_clear_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    good = io.BytesIO()
    np.savez_compressed(good, x=np.zeros((64, 4), np.float32))
    raw = bytearray(good.getvalue())
    # Corrupt the deflate stream of the member (past its local header), not the zip directory.
    name_len, extra_len = struct.unpack("<HH", raw[26:30])  # the first member's local header
    start = 30 + name_len + extra_len
    raw[start:start + 8] = b"\xff" * 8
    bad_deflate = tmp_path / "deflate.npz"
    bad_deflate.write_bytes(bytes(raw))
    with pytest.raises(DataFileError, match="not a readable .npz file"):
        datasets.load_npz(bad_deflate, "calibration")

    # A header claiming a shape far beyond its data.
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False,
                                                  "shape": (1 << 40, 1 << 10)})
    huge = tmp_path / "huge.npz"
    with zipfile.ZipFile(huge, "w") as zf:
        zf.writestr("x.npy", header.getvalue() + b"\0" * 64)
    with pytest.raises(DataFileError, match="huge.npz"):
        datasets.load_npz(huge, "calibration")

    # Members that unpack to more than the bound (a small file can hold a deflate bomb).
    monkeypatch.setattr(datasets, "MAX_UNPACKED_BYTES", 1000)
    with pytest.raises(DataFileError, match="unpack to .* bytes, over 1000"):
        datasets.load_npz(_write_npz(tmp_path / "big.npz", x=np.zeros((64, 4), np.float32)), "eval")


def test_a_factory_module_that_does_not_compile_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    (tmp_path / "broken_factory_mod.py").write_text("def make(:\n    pass\n")
    (tmp_path / "w.pt").write_bytes(b"")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModelLoadError, match="broken_factory_mod"):
        load_factory_model("broken_factory_mod:make", tmp_path / "w.pt", np.zeros((1, 4), np.float32))
    sys.modules.pop("broken_factory_mod", None)


def test_training_labels_beyond_the_model_s_classes_are_refused_up_front(mlp_workspace, tmp_path: Path):
    from compiler.pipeline import TrainSettings

    x = np.load(mlp_workspace.calib)["x"]
    train = _write_npz(tmp_path / "train.npz", x=x, y=np.full(len(x), 14, np.int64))
    with pytest.raises(DataFileError, match="labels run from 14 to 14, but the model has 10 output classes"):
        compile_model(mlp_workspace.pt2, [load_profile("x86-gateway-vnni")], mlp_workspace.calib, None,
                      tmp_path / "out", CompileOptions(name="m", version="1.0.0", latency=FAST,
                                                       train=TrainSettings(path=train)))


def _big_hidden() -> bytes:
    """x (n, 4) -> MatMul by 1e5-scale weights -> Relu -> MatMul down to 3 outputs: the
    hidden layer goes past fp16's 65504 while the output stays small."""
    rng = np.random.default_rng(3)
    w1 = numpy_helper.from_array((rng.normal(size=(4, 8)) * 1e5).astype(np.float32), "w1")
    w2 = numpy_helper.from_array((rng.normal(size=(8, 3)) * 1e-5).astype(np.float32), "w2")
    g = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
         helper.make_node("MatMul", ["r", "w2"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3])], [w1, w2])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)], ir_version=8).SerializeToString()


def test_fp16_is_blocked_when_activations_overflow_it(tmp_path: Path):
    from compiler.quantize import fp16_overflows

    x = np.random.default_rng(4).normal(size=(32, 4)).astype(np.float32)
    over = fp16_overflows(_big_hidden(), "x", x)
    assert [o.split(" ")[0] for o in over] == ["h", "r"]
    assert fp16_overflows(_linear(ir=8), "x", x) == []

    model = tmp_path / "big.onnx"
    model.write_bytes(_big_hidden())
    calib = _write_npz(tmp_path / "calib.npz", x=x)
    report = compile_model(model, [load_profile("jetson-orin-cuda")], calib, None, tmp_path / "out",
                           CompileOptions(name="big", version="1.0.0", seed=0, latency=FAST,
                                          metric=parse_metric("mse")))
    fp16 = next(c for c in report.candidates if c.precision == "fp16")
    assert not fp16.passed and any("overflow fp16" in r for r in fp16.reasons)


def _fixed(batch: int, reshape_to: list[int] | None = None, sum_over_batch: bool = False) -> bytes:
    """_linear with its batch fixed in the I/O shapes, optionally with a Reshape to
    ``reshape_to`` (a constant shape that builds the batch into the graph) or a sum over
    the batch (rows that depend on each other)."""
    proto = onnx.load_model_from_string(_linear(ir=8))
    g = proto.graph
    if reshape_to is not None:
        g.node[0].output[0] = "h"
        g.initializer.append(numpy_helper.from_array(np.array(reshape_to, np.int64), "shape"))
        g.node.append(helper.make_node("Reshape", ["h", "shape"], ["y"]))
    if sum_over_batch:  # y = h + sum(h over the batch): same shape, rows depend on the batch
        g.node[0].output[0] = "h"
        g.initializer.append(numpy_helper.from_array(np.array([0], np.int64), "axes"))
        g.node.append(helper.make_node("ReduceSum", ["h", "axes"], ["s"], keepdims=1))
        g.node.append(helper.make_node("Add", ["h", "s"], ["y"]))
    for v in (g.input[0], g.output[0]):
        v.type.tensor_type.shape.dim[0].dim_value = batch  # [batch, ...] instead of [n, ...]
    return proto.SerializeToString()


def _compile_labelled(tmp_path: Path, model_bytes: bytes, rows: int, seed: int):
    """Compile ``model_bytes`` (4 inputs, 3 classes) for x86-gateway-vnni on random rows."""
    model = tmp_path / "model.onnx"
    model.write_bytes(model_bytes)
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, 4)).astype(np.float32)
    calib = _write_npz(tmp_path / "calib.npz", x=x)
    ev = _write_npz(tmp_path / "eval.npz", x=x, y=rng.integers(0, 3, size=rows))
    return compile_model(model, [load_profile("x86-gateway-vnni")], calib, ev, tmp_path / "out",
                         CompileOptions(name="m", version="1.0.0", seed=0, latency=FAST))


def test_a_fixed_batch_model_is_made_dynamic_when_the_graph_allows(tmp_path: Path):
    report = _compile_labelled(tmp_path, _fixed(1), 32, seed=3)
    assert report.model["input"]["shape"] == [-1, 4]
    assert "fixed batch size of 1; its batch dimension was made dynamic" in report.model["notes"][0]
    selected = next(c for c in report.candidates if c.selected)
    b = unpack(tmp_path / "out" / (selected.bundle or ""), tmp_path / "u")
    assert b.manifest.inputs[0].shape == [-1, 4] and b.manifest.outputs[0].shape == [-1, 3]


def test_old_ir_weights_listed_as_inputs_keep_their_shapes():
    proto = onnx.load_model_from_string(_fixed(1))
    proto.graph.input.append(helper.make_tensor_value_info("w", TensorProto.FLOAT, [4, 3]))  # IR 3 style
    b = numpy_helper.from_array(np.ones((1, 3), np.float32), "b")
    proto.graph.initializer.append(b)
    proto.graph.input.append(helper.make_tensor_value_info("b", TensorProto.FLOAT, [1, 3]))
    proto.graph.node[0].output[0] = "h"
    proto.graph.node.append(helper.make_node("Add", ["h", "b"], ["y"]))
    model = _onnx_model(proto)
    x = np.random.default_rng(2).normal(size=(8, 4)).astype(np.float32)
    dyn, _ = with_dynamic_batch(model, x)
    shapes = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
              for v in onnx.load_model_from_string(dyn.data).graph.input}
    assert shapes == {"x": ["batch", 4], "w": [4, 3], "b": [1, 3]}


def _onnx_model(proto: onnx.ModelProto) -> OnnxModel:
    ins, outs = onnx_tensor_infos(proto)
    ins = [i for i in ins if i.name == "x"]
    return OnnxModel(proto.SerializeToString(), ins, outs, Path("m.onnx"), "onnx", "0" * 64)


def test_rows_mixed_within_a_batch_of_two_are_caught_at_one_row():
    # Reshape to [-1, 2, 3], add the pair's sum, reshape back: right for every even
    # number of rows, wrong (or failing) for one row.
    proto = onnx.load_model_from_string(_fixed(2))
    g = proto.graph
    g.node[0].output[0] = "h"
    g.initializer.extend([numpy_helper.from_array(np.array([-1, 2, 3], np.int64), "pairs"),
                          numpy_helper.from_array(np.array([-1, 3], np.int64), "rows"),
                          numpy_helper.from_array(np.array([1], np.int64), "axis")])
    g.node.extend([helper.make_node("Reshape", ["h", "pairs"], ["p"]),
                   helper.make_node("ReduceSum", ["p", "axis"], ["s"], keepdims=1),
                   helper.make_node("Add", ["p", "s"], ["q"]),
                   helper.make_node("Reshape", ["q", "rows"], ["y"])])
    x = np.random.default_rng(2).normal(size=(8, 4)).astype(np.float32)
    with pytest.raises(ModelLoadError, match=r"built into the graph \(running 1 row at once failed"):
        with_dynamic_batch(_onnx_model(proto), x)


def test_an_output_without_the_batch_axis_is_named():
    proto = onnx.load_model_from_string(_fixed(1))
    g = proto.graph
    g.initializer.append(numpy_helper.from_array(np.array([0, 1], np.int64), "all"))
    g.node.append(helper.make_node("ReduceMean", ["x", "all"], ["m"], keepdims=0))  # shape []
    g.output.append(helper.make_tensor_value_info("m", TensorProto.FLOAT, []))
    x = np.random.default_rng(2).normal(size=(8, 4)).astype(np.float32)
    with pytest.raises(ModelLoadError, match="output 'm' is not batched along its first dimension"):
        with_dynamic_batch(_onnx_model(proto), x)


@pytest.mark.parametrize(("batch", "reshape_to", "sums", "rows", "message"), [
    (1, [1, 3], False, 32, "built into the graph (running 2 rows at once failed"),  # Reshape to [1, 3]
    (2, [2, 3], False, 32, "built into the graph (running 1 row at once failed"),
    (1, None, True, 32, "built into the graph: output 'y' for 2 rows at once differs from 1 row at a time"),
    (2, None, True, 32, "built into the graph: output 'y' for 1 row at once differs from 2 rows at a time"),
    (4, None, False, 6, "8 calibration rows are needed to check it with other batch sizes, got 6"),
])
def test_a_fixed_batch_built_into_the_graph_is_refused_before_anything_is_built(
    tmp_path: Path, batch: int, reshape_to: list[int] | None, sums: bool, rows: int, message: str
):
    model = tmp_path / "fixed.onnx"
    model.write_bytes(_fixed(batch, reshape_to, sums))
    x = np.random.default_rng(1).normal(size=(rows, 4)).astype(np.float32)
    calib = _write_npz(tmp_path / "calib.npz", x=x)
    with pytest.raises(CompilerInputError, match=re.escape(message)) as ei:
        compile_model(model, [load_profile("x86-gateway-vnni")], calib, None, tmp_path / "out",
                      CompileOptions(name="fixed", version="1.0.0", latency=FAST))
    assert f"fixed batch size of {batch}" in str(ei.value) and "export it with a dynamic batch" in str(ei.value)
    assert not (tmp_path / "out").exists()


def test_one_candidate_that_crashes_is_rejected_and_the_compile_goes_on(tmp_path: Path, monkeypatch):
    import compiler.pipeline as pipeline

    def broken(model: bytes):
        raise RuntimeError("quantizer bug")

    monkeypatch.setattr(pipeline, "quantize_dynamic_int8", broken)
    report = _compile_labelled(tmp_path, _linear(), 64, seed=5)
    dyn = next(c for c in report.candidates if c.technique == "dynamic-int8")
    assert not dyn.passed and any("build failed: RuntimeError: quantizer bug" in r for r in dyn.reasons)
    assert sum(c.selected for c in report.candidates) == 1


def test_models_with_subgraphs_keep_their_ir_version_and_imports():
    """Domains used only inside an If branch would be dropped by a top-level walk."""
    then = helper.make_graph([helper.make_node("Gelu", ["x"], ["t"], domain="com.microsoft")], "then", [],
                             [helper.make_tensor_value_info("t", TensorProto.FLOAT, [1])])
    other = helper.make_graph([helper.make_node("Identity", ["x"], ["e"])], "else", [],
                              [helper.make_tensor_value_info("e", TensorProto.FLOAT, [1])])
    g = helper.make_graph([helper.make_node("If", ["c"], ["y"], then_branch=then, else_branch=other)], "g",
                          [helper.make_tensor_value_info("c", TensorProto.BOOL, []),
                           helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)],
                          ir_version=10).SerializeToString()
    assert lowest_ir_version(m) == m


def test_a_candidate_that_cannot_be_opened_for_timing_is_rejected_and_the_compile_goes_on(
    tmp_path: Path, monkeypatch
):
    import compiler.pipeline as pipeline

    real = pipeline._timing_call

    def timing_call(art, threads, x1):
        if art.technique == "dynamic-int8":
            raise RuntimeError("cannot create the thread pool")
        return real(art, threads, x1)

    monkeypatch.setattr(pipeline, "_timing_call", timing_call)
    report = _compile_labelled(tmp_path, _linear(), 64, seed=5)
    dyn = next(c for c in report.candidates if c.technique == "dynamic-int8")
    assert not dyn.passed and dyn.latency_ms_p50 is None
    assert any(re.search(r"timing failed at \d+ threads?: RuntimeError: cannot create the thread pool", r)
               for r in dyn.reasons)
    timed = [c for c in report.candidates if c.technique != "dynamic-int8"]
    assert all(c.latency_ms_p50 is not None for c in timed)
    assert sum(c.selected for c in report.candidates) == 1


def _near_2048() -> bytes:
    """Two logits, ``x + 2048 - 2048``: exact in fp32; with fp16 storage the middle tensor
    is a multiple of 2, so both logits of a row in [0, 1) become 0."""
    c = numpy_helper.from_array(np.array([2048.0], np.float32), "c")
    g = helper.make_graph(
        [helper.make_node("Add", ["x", "c"], ["h"]), helper.make_node("Sub", ["h", "c"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 2])], [c])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)], ir_version=8).SerializeToString()


def test_fp16_storage_is_emulated_where_the_host_keeps_intermediates_in_fp32():
    import onnxruntime as ort

    from compiler.quantize import convert_fp16, fp16_storage_model, run_fp16_storage

    x = np.array([[0.3, 0.9], [1.2, 0.1], [3.3, -5.1]], np.float32)
    so = ort.SessionOptions()
    host = ort.InferenceSession(convert_fp16(_near_2048())[0], so, providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(host.run(None, {"x": x})[0], x, atol=1e-3)  # why the emulation exists
    emulated = run_fp16_storage(_near_2048(), "x", x)[0]
    want = (x.astype(np.float16) + np.float16(2048)).astype(np.float32) - 2048  # numpy's fp16 rounding
    np.testing.assert_array_equal(emulated, want)
    assert emulated.tolist() == [[0.0, 0.0], [2.0, 0.0], [4.0, -5.0]]
    onnx.checker.check_model(onnx.load_model_from_string(fp16_storage_model(_near_2048())))


def test_an_fp16_candidate_is_scored_with_fp16_storage(tmp_path: Path):
    """The host's run of the fp16 model says 100%; fp16 hardware would tie every row.
    The candidate must be scored, and rejected, on the emulated figure."""
    rng = np.random.default_rng(5)
    x = rng.uniform(0, 1, size=(200, 2)).astype(np.float32)
    y = x.argmax(1).astype(np.int64)
    model = tmp_path / "near.onnx"
    model.write_bytes(_near_2048())
    calib = _write_npz(tmp_path / "calib.npz", x=x)
    evalf = _write_npz(tmp_path / "eval.npz", x=x, y=y)
    report = compile_model(model, [load_profile("jetson-orin-cuda")], calib, evalf, tmp_path / "out",
                           CompileOptions(name="near", version="1.0.0", seed=0, latency=FAST))
    fp32 = next(c for c in report.candidates if c.precision == "fp32" and c.format == "onnx")
    fp16 = next(c for c in report.candidates if c.precision == "fp16" and c.format == "onnx")
    assert fp32.accuracy == 1.0
    assert fp16.accuracy is not None and fp16.accuracy < 0.7
    assert any("fp16 storage emulated" in n for n in fp16.notes)
    assert not fp16.passed and any("accuracy" in r or "drop" in r for r in fp16.reasons), fp16.reasons


def test_without_class_labels_candidates_are_held_to_agreement_with_fp32(tmp_path: Path):
    """Accuracy cannot be measured without labels; candidates must not go unchecked.
    Here fp16 storage ties every row (see _near_2048), so agreement is about 50%."""
    x = np.random.default_rng(6).uniform(0, 1, size=(200, 2)).astype(np.float32)
    model = tmp_path / "near.onnx"
    model.write_bytes(_near_2048())
    calib = _write_npz(tmp_path / "calib.npz", x=x)
    report = compile_model(model, [load_profile("jetson-orin-cuda")], calib, None, tmp_path / "out",
                           CompileOptions(name="near", version="1.0.0", seed=0, latency=FAST))
    fp16 = next(c for c in report.candidates if c.precision == "fp16" and c.format == "onnx")
    assert fp16.agreement_with_fp32 is not None and fp16.agreement_with_fp32 < 0.7
    assert not fp16.passed and any("metric drops" in r for r in fp16.reasons), fp16.reasons
    assert any("top-1 agreement with the fp32 model instead" in s for s in report.skipped)


def test_labels_that_do_not_fit_the_metric_are_refused_up_front(tmp_path: Path):
    model = tmp_path / "lin.onnx"
    model.write_bytes(_linear())
    rng = np.random.default_rng(7)
    x = rng.normal(size=(64, 4)).astype(np.float32)
    calib = _write_npz(tmp_path / "calib.npz", x=x)
    onehot = _write_npz(tmp_path / "onehot.npz", x=x, y=np.eye(3, dtype=np.int64)[rng.integers(0, 3, 64)])
    with pytest.raises(DataFileError, match=r"metric accuracy needs 'y' as 1-D integer class labels, got shape \(64, 3\)"):
        compile_model(model, [load_profile("x86-gateway-vnni")], calib, onehot, tmp_path / "o1",
                      CompileOptions(name="lin", version="1.0.0", latency=FAST))
    classes = _write_npz(tmp_path / "classes.npz", x=x, y=rng.integers(0, 3, 64))
    with pytest.raises(CompilerInputError, match=r"metric mse: labels 'y' have shape \(64,\), model outputs \(64, 3\)"):
        compile_model(model, [load_profile("x86-gateway-vnni")], calib, classes, tmp_path / "o2",
                      CompileOptions(name="lin", version="1.0.0", latency=FAST, metric=parse_metric("mse")))
    np.save(tmp_path / "plain.npy", x)
    with pytest.raises(DataFileError, match="a single .npy array, not an .npz archive"):
        datasets.load_npz(tmp_path / "plain.npy", "calibration")
    big = _write_npz(tmp_path / "big.npz", x=np.full((4, 4), 1e300))
    with pytest.raises(DataFileError, match="beyond float32's range"):
        datasets.load_npz(big, "calibration")


def test_lineage_records_the_opset_the_model_has(tmp_path: Path):
    proto = onnx.load_model_from_string(_linear(ir=8))
    proto.opset_import[0].version = 13
    model = tmp_path / "op13.onnx"
    model.write_bytes(proto.SerializeToString())
    calib = _write_npz(tmp_path / "calib.npz", x=np.random.default_rng(8).normal(size=(64, 4)).astype(np.float32))
    report = compile_model(model, [load_profile("x86-gateway-vnni")], calib, None, tmp_path / "out",
                           CompileOptions(name="op", version="1.0.0", seed=0, latency=FAST,
                                          metric=parse_metric("mse")))
    for c in report.candidates:
        if c.format == "onnx" and c.bundle:
            b = unpack(tmp_path / "out" / c.bundle, tmp_path / "u" / c.bundle)
            got = onnx.load(str(b.model_path)).opset_import
            assert b.manifest.lineage.settings["opset"] == next(o.version for o in got if o.domain in ("", "ai.onnx"))
            assert b.manifest.lineage.settings["opset"] == 13


def test_fp16_emulation_clamps_weights_as_the_converter_ships_them():
    """A weight past fp16's range (x / 65535, a 16-bit image scaled down) is clamped to
    65504 by the fp16 converter; the emulation must do the same, not make it inf."""
    import onnxruntime as ort

    from compiler.quantize import convert_fp16, run_fp16_storage

    rng = np.random.default_rng(9)
    w = numpy_helper.from_array(rng.normal(size=(4, 3)).astype(np.float32), "w")
    scale = numpy_helper.from_array(np.array(65535.0, np.float32), "scale")  # a 0-d initializer
    g = helper.make_graph(
        [helper.make_node("Div", ["x", "scale"], ["h"]), helper.make_node("MatMul", ["h", "w"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3])], [w, scale])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)], ir_version=8).SerializeToString()
    x = rng.uniform(0, 65535, size=(16, 4)).astype(np.float32)
    shipped = ort.InferenceSession(convert_fp16(m)[0], providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    emulated = run_fp16_storage(m, "x", x)[0]
    assert np.isfinite(emulated).all() and np.abs(emulated).max() > 0.1
    np.testing.assert_allclose(emulated, shipped, rtol=2e-2, atol=2e-2)
    assert (emulated.argmax(1) == shipped.argmax(1)).mean() >= 0.9


@pytest.mark.parametrize("out_shape", [["n"], ["n", 1]])
def test_without_labels_a_non_classifier_needs_a_fidelity_metric(tmp_path: Path, out_shape: list):
    """Top-1 agreement means nothing for a (rows,) or (rows, 1) output: refuse, and say
    which metric to use, rather than check nothing or pass everything."""
    rng = np.random.default_rng(10)
    w = numpy_helper.from_array(rng.normal(size=(4, 1)).astype(np.float32), "w")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h" if out_shape == ["n"] else "y"])]
    inits = [w]
    if out_shape == ["n"]:
        inits.append(numpy_helper.from_array(np.array([-1], np.int64), "flat"))
        nodes.append(helper.make_node("Reshape", ["h", "flat"], ["y"]))
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)], inits)
    model = tmp_path / "reg.onnx"
    model.write_bytes(helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)], ir_version=8)
                      .SerializeToString())
    calib = _write_npz(tmp_path / "calib.npz", x=rng.normal(size=(64, 4)).astype(np.float32))
    shown = "(N,)" if out_shape == ["n"] else "(N, 1)"
    with pytest.raises(CompilerInputError, match=rf"needs class labels .* output has shape \{shown[:-1]}\).*--metric mse or cosine"):
        compile_model(model, [load_profile("x86-gateway-vnni")], calib, None, tmp_path / "out",
                      CompileOptions(name="reg", version="1.0.0", latency=FAST))
    report = compile_model(model, [load_profile("x86-gateway-vnni")], calib, None, tmp_path / "out2",
                           CompileOptions(name="reg", version="1.0.0", latency=FAST, metric=parse_metric("mse")))
    assert any(c.selected for c in report.candidates)
