"""Real bundles for hub tests: a tiny ONNX model (MatMul + Add) built with onnx.helper."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from agent.bundle import Reference, write_bundle

__all__ = ["tiny_onnx", "make_bundle"]


def tiny_onnx(seed: int = 0) -> tuple[bytes, np.ndarray, np.ndarray]:
    """An ONNX model y = x @ W + b with 4 inputs and 3 outputs; returns (bytes, W, b)."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((4, 3)).astype(np.float32)
    b = rng.standard_normal(3).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "W"], ["xw"]),
            helper.make_node("Add", ["xw", "B"], ["y"]),
        ],
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
        initializer=[numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "B")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString(), w, b


def make_bundle(
    out_dir: Path,
    *,
    name: str = "tiny",
    version: str = "1.0.0",
    profile: str = "x86-gateway-vnni",
    precision: str = "fp32",
    selected: bool = False,
    seed: int = 0,
    padding: int = 0,
) -> Path:
    """Write a real bundle and return its path. ``padding`` grows the model file."""
    model, w, b = tiny_onnx(seed)
    if padding:
        # Extra bytes in the ONNX doc string: still a valid model, just bigger.
        m = onnx.load_from_string(model)
        m.doc_string = "x" * padding
        model = m.SerializeToString()
    x = np.arange(8, dtype=np.float32).reshape(2, 4) / 8
    manifest: dict[str, Any] = {
        "name": name,
        "version": version,
        "format": "onnx",
        "precision": precision,
        "runtime": "onnxruntime",
        "min_runtime_version": "1.17",
        "profile": profile,
        "inputs": [{"name": "x", "dtype": "float32", "shape": [-1, 4]}],
        "outputs": [{"name": "y", "dtype": "float32", "shape": [-1, 3]}],
        "task": "regression",
        "lineage": {"settings": {"selected": selected}, "compiler_version": "test"},
    }
    path = out_dir / f"{name}-{version}-{profile}-{precision}-{seed}.efb"
    write_bundle(
        path,
        manifest=manifest,
        model=model,
        selftest_inputs={"x": x},
        selftest_outputs={"y": x @ w + b},
        reference=Reference(),
    )
    return path
