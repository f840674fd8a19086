"""compact_qdq: fewer bytes for the same int8 model (outputs, fusions, names that matter);
float_output: the graph output is written by the last quantized op, in float."""

from __future__ import annotations

import collections
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from compiler.model_source import load_model
from compiler.quantize import (
    StaticQuantSettings,
    compact_qdq,
    preprocess_for_quantization,
    quantize_preprocessed,
)

from .conftest import Workspace


def _fused_ops(model: bytes, path: Path) -> collections.Counter[str]:
    """Op types after ONNX Runtime's QDQ fusions (EXTENDED: QLinearConv/QGemm)."""
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    so.optimized_model_filepath = str(path)
    ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
    return collections.Counter(n.op_type for n in onnx.load(str(path)).graph.node)


def _run(model: bytes, x: np.ndarray) -> np.ndarray:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    return ort.InferenceSession(model, so, providers=["CPUExecutionProvider"]).run(
        None, {"input": x})[0]


@pytest.mark.parametrize("settings", [
    StaticQuantSettings("int8"),
    StaticQuantSettings("uint8", reduce_range=True),
    StaticQuantSettings("int8", per_channel=False),
], ids=["s8s8", "u8s8-rr", "s8s8-pertensor"])
def test_compact_qdq_keeps_outputs_and_fusions(
    cnn_workspace: Workspace, settings: StaticQuantSettings, tmp_path: Path
) -> None:
    x = np.load(cnn_workspace.calib)["x"]
    fp32 = load_model(cnn_workspace.pt2, example=x[:4]).data
    pre, _ = preprocess_for_quantization(fp32, tmp_path)
    raw = quantize_preprocessed(pre, "input", x, settings, tmp_path, compact=False)
    small = compact_qdq(raw)

    assert len(small) < len(raw)
    assert compact_qdq(small) == small, "compacting is idempotent (and deterministic)"
    assert np.array_equal(_run(small, cnn_workspace.x_test), _run(raw, cnn_workspace.x_test))
    fused = _fused_ops(small, tmp_path / "small.onnx")
    assert fused == _fused_ops(raw, tmp_path / "raw.onnx")
    assert fused["QLinearConv"] == 2 and fused["QGemm"] == 2
    # float_output: the last QGemm writes the float logits itself (no Q/DQ pair after it).
    assert fused["QuantizeLinear"] == 1 and fused["DequantizeLinear"] == 0

    g = onnx.load_model_from_string(small)
    onnx.checker.check_model(g, full_check=True)
    assert [o.domain for o in g.opset_import] == [""]
    assert [i.name for i in g.graph.input] == ["input"]
    assert [o.name for o in g.graph.output] == ["logits"]
    names = [i.name for i in g.graph.initializer] + [t for n in g.graph.node for t in n.output]
    assert not [n for n in names if "Linear_" in n or n.endswith(("_scale", "_zero_point"))]
    # Compute nodes keep their names (accuracy tuning's nodes_to_exclude refers to them).
    compute = {n.name for n in g.graph.node if n.op_type in ("Conv", "Gemm")}
    raw_compute = {n.name for n in onnx.load_model_from_string(raw).graph.node
                   if n.op_type in ("Conv", "Gemm")}
    assert compute == raw_compute
    # Uniform zero points are shared: fewer zero-point initializers than Q/DQ users.
    zp_inputs = [n.input[2] for n in g.graph.node
                 if n.op_type in ("QuantizeLinear", "DequantizeLinear") and len(n.input) == 3]
    assert len(set(zp_inputs)) < len(zp_inputs)
    # ORT's exact int8 path, which agents on x86 without VNNI use, builds it as it does
    # the raw model (it once failed with "Attempt to replace the existing tensor").
    _open_exact(raw)
    _open_exact(small)


def _open_exact(model: bytes) -> None:
    so = ort.SessionOptions()
    so.add_session_config_entry("session.x64quantprecision", "1")
    ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])


def test_compact_qdq_leaves_a_zero_point_that_another_node_reads() -> None:
    from onnx import TensorProto, helper, numpy_helper

    zp = [numpy_helper.from_array(np.array(0, np.int8), f"zp{k}") for k in range(2)]
    scale = numpy_helper.from_array(np.array(0.1, np.float32), "s")
    nodes = [
        helper.make_node("QuantizeLinear", ["input", "s", "zp0"], ["q0"], name="q0"),
        helper.make_node("DequantizeLinear", ["q0", "s", "zp0"], ["d0"], name="d0"),
        helper.make_node("QuantizeLinear", ["d0", "s", "zp1"], ["q1"], name="q1"),
        helper.make_node("DequantizeLinear", ["q1", "s", "zp1"], ["out"], name="d1"),
        helper.make_node("Cast", ["zp1"], ["zp_as_float"], to=TensorProto.FLOAT, name="cast"),
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [2]),
         helper.make_tensor_value_info("zp_as_float", TensorProto.FLOAT, [])],
        initializer=[scale, *zp],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])
    small = onnx.load_model_from_string(compact_qdq(model.SerializeToString()))
    cast = next(n for n in small.graph.node if n.op_type == "Cast")
    # zp1 is also read by the Cast: it is not merged with zp0 into a shared initializer
    assert cast.input[0] in {i.name for i in small.graph.initializer}
    onnx.checker.check_model(small, full_check=True)
    x = np.array([0.25, -1.0], np.float32)
    sess = ort.InferenceSession(small.SerializeToString(), providers=["CPUExecutionProvider"])
    assert np.allclose(sess.run(["out"], {"input": x})[0], [0.2, -1.0], atol=0.11)
