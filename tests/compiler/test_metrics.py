"""Metrics and op-compatibility checks on hand-made arrays and graphs."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from compiler.compatibility import onnx_blockers
from compiler.errors import CompilerInputError
from compiler.metrics import Metric, evaluate_metric, parse_metric, score

LOGITS = np.array([[0.1, 0.7, 0.2], [0.5, 0.3, 0.2], [0.2, 0.3, 0.5], [0.6, 0.1, 0.3]])
Y = np.array([1, 1, 0, 0])


def test_accuracy_and_topk() -> None:
    assert evaluate_metric(parse_metric("accuracy"), LOGITS, Y) == 0.5
    assert evaluate_metric(parse_metric("top2"), LOGITS, Y) == 0.75
    assert evaluate_metric(parse_metric("top3"), LOGITS, Y) == 1.0
    assert evaluate_metric(parse_metric("accuracy"), LOGITS, None) is None


def test_mse_and_cosine_against_labels_or_fp32() -> None:
    target = LOGITS * 2
    assert evaluate_metric(Metric("mse"), LOGITS, target) == pytest.approx((LOGITS**2).mean())
    assert evaluate_metric(Metric("cosine"), LOGITS, target) == pytest.approx(1.0)
    # Without labels, fidelity to the fp32 outputs.
    assert evaluate_metric(Metric("cosine"), LOGITS, None, fp32_outputs=-LOGITS) == pytest.approx(-1.0)
    assert score(Metric("mse"), 0.25) == -0.25 and score(Metric("cosine"), 0.5) == 0.5


@pytest.mark.parametrize("text", ["f1", "top0", "topx", ""])
def test_unknown_metric(text: str) -> None:
    with pytest.raises(CompilerInputError, match="unknown metric"):
        parse_metric(text)


def test_label_shape_errors() -> None:
    with pytest.raises(CompilerInputError, match="integer class labels"):
        evaluate_metric(Metric("accuracy"), LOGITS, Y.astype(np.float32))
    with pytest.raises(CompilerInputError, match="have shape"):
        evaluate_metric(Metric("mse"), LOGITS, Y.astype(np.float32))


def _model(opset: int, domain: str = "") -> bytes:
    node = helper.make_node("Relu", ["x"], ["y"], domain=domain)
    graph = helper.make_graph(
        [node], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    imports = [helper.make_opsetid("", opset)]
    if domain:
        imports.append(helper.make_opsetid(domain, 1))
    # IR 8 suits opset 18 to 21 for ORT 1.17/1.18 (helper's default, the newest IR, is
    # itself a blocker: see tests/compiler/test_robustness.py).
    return helper.make_model(graph, opset_imports=imports, ir_version=8).SerializeToString()


def test_opset_newer_than_runtime_is_blocked() -> None:
    assert onnx_blockers(_model(18), "1.17") == []
    reasons = onnx_blockers(_model(21), "1.17")
    assert reasons and "opset 21" in reasons[0] and "up to 20" in reasons[0]
    assert onnx_blockers(_model(21), "1.18") == []
    assert onnx.load_model_from_string(_model(18)).opset_import[0].version == 18


def test_custom_domain_is_blocked() -> None:
    reasons = onnx_blockers(_model(18, domain="my.custom"), "1.17")
    assert any("my.custom" in r for r in reasons)
