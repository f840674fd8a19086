"""TFLite/LiteRT candidates: conversion with litert-torch, int8 through pt2e, and running them.

* fp32: ``litert_torch.convert(module, example)``.
* int8: ``torch.export`` -> ``prepare_pt2e`` with litert-torch's ``PT2EQuantizer``
  (symmetric, per-channel weights, histogram-observed int8 activations) -> calibration
  -> ``convert_pt2e`` -> ``litert_torch.convert``. The resulting model is full-integer:
  its input and output tensors are int8 with a scale and zero point, so the caller
  quantizes inputs and dequantizes outputs at the boundary (:class:`LiteRtRunner`).

Models are converted with batch 1 (litert-torch cannot lower a symbolic batch through
``Flatten``); bundles declare the fixed batch. Conversion is deterministic for the same
module, example and calibration rows.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np

from compiler.errors import TechniqueError

__all__ = [
    "LiteRtRunner",
    "litert_version",
    "convert_fp32",
    "convert_int8_pt2e",
    "tflite_blockers",
]

# litert-torch prints a progress tree to stdout unless told not to.
os.environ.setdefault("LITERT_TORCH_PROGRESS", "0")


def litert_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("ai-edge-litert")
    except PackageNotFoundError:
        return None


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    names = ["litert_torch", "torch._dynamo", "torch.export", "absl", "torchao"]
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, lvl in zip(loggers, levels, strict=True):
            lg.setLevel(lvl)


def _eval_flags(module: Any) -> None:
    """Clear the ``training`` flag of ``module`` and every submodule.

    ``eval()`` does not clear it on the graph module of an unlifted ``torch.export``
    program (a ``.pt2`` input) and raises on a pt2e-converted one, whose
    ``move_exported_model_to_eval`` rewrites train-only ops but leaves the flags set;
    litert-torch then warns that the model "is converted in training mode".
    """
    for sub in module.modules():
        sub.training = False


def _example(x: np.ndarray) -> tuple[Any, ...]:
    import torch

    return (torch.from_numpy(np.ascontiguousarray(x[:1], dtype=np.float32)),)


def convert_fp32(module: Any, example_x: np.ndarray) -> tuple[bytes, list[str]]:
    """Convert a torch module (or ExportedProgram's module) to an fp32 .tflite.

    Raises:
        TechniqueError: litert-torch cannot lower the module.
    """
    import litert_torch

    try:
        with _quiet():
            module.eval()  # (an unlifted export's eval() returns None, so not chained)
            _eval_flags(module)
            model = litert_torch.convert(module, _example(example_x))
            data = bytes(model.model_content())
    except Exception as e:  # noqa: BLE001 - the converter raises many unrelated types
        raise TechniqueError(f"litert-torch conversion failed: {type(e).__name__}: {e}") from e
    return data, ["batch fixed to 1 (litert-torch lowers Flatten only with static shapes)"]


def convert_fp16_weights(fp32_model: bytes) -> tuple[bytes, list[str]]:
    """fp16 weights of an fp32 .tflite's FULLY_CONNECTED and convolution ops (LiteRT
    Quantizer's float casting; each weight is followed by a DEQUANTIZE op). A device with
    fp16 arithmetic (a GPU delegate) may run them in fp16; a CPU interpreter widens them to
    fp32 once at load, so the model is about half the size and runs like fp32.

    Raises:
        TechniqueError: the quantizer cannot process the model.
    """
    try:
        from ai_edge_quantizer import qtyping, quantizer

        with _quiet():
            q = quantizer.Quantizer(bytearray(fp32_model))
            config = qtyping.OpQuantizationConfig(
                weight_tensor_config=qtyping.TensorQuantizationConfig(
                    num_bits=16, dtype=qtyping.TensorDataType.FLOAT),
                compute_precision=qtyping.ComputePrecision.FLOAT,
                explicit_dequantize=True,
            )
            for op in (qtyping.TFLOperationName.FULLY_CONNECTED, qtyping.TFLOperationName.CONV_2D,
                       qtyping.TFLOperationName.DEPTHWISE_CONV_2D):
                q.update_quantization_recipe(regex=".*", operation_name=op, op_config=config,
                                             algorithm_key=quantizer.AlgorithmName.FLOAT_CASTING)
            data = bytes(q.quantize().quantized_model)
    except Exception as e:  # noqa: BLE001 - the quantizer raises many unrelated types
        raise TechniqueError(f"LiteRT Quantizer fp16 casting failed: {type(e).__name__}: {e}") from e
    return data, ["fp16 weights (LiteRT Quantizer float casting); activations and arithmetic fp32 "
                  "unless the device's delegate runs fp16"]


def convert_int8_pt2e(
    module: Any, calib_x: np.ndarray, *, per_channel: bool = True
) -> tuple[bytes, list[str]]:
    """Full-integer int8 .tflite via pt2e static quantization calibrated on ``calib_x``.

    Raises:
        TechniqueError: export, quantization or conversion failed.
    """
    import litert_torch
    import torch
    from litert_torch.quantize.pt2e_quantizer import (
        PT2EQuantizer,
        get_symmetric_quantization_config,
    )
    from litert_torch.quantize.quant_config import QuantConfig
    from torchao.quantization.pt2e import move_exported_model_to_eval
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    from compiler.demo_models import single_threaded

    ex = _example(calib_x)
    try:
        with _quiet():
            quantizer = PT2EQuantizer().set_global(
                get_symmetric_quantization_config(is_per_channel=per_channel)
            )
            module.eval()
            graph = torch.export.export(module, ex).module()
            prepared = prepare_pt2e(graph, quantizer)  # type: ignore[arg-type]
            # One thread: observed ranges (and so the scales) must not depend on the
            # host's core count.
            with torch.no_grad(), single_threaded():
                for row in np.ascontiguousarray(calib_x, dtype=np.float32):
                    prepared(torch.from_numpy(row[None]))
            converted = convert_pt2e(prepared, fold_quantize=False)
            move_exported_model_to_eval(converted)
            _eval_flags(converted)  # (its eval() raises: move_..._to_eval is the API)
            model = litert_torch.convert(
                converted, ex, quant_config=QuantConfig(pt2e_quantizer=quantizer)
            )
            data = bytes(model.model_content())
    except Exception as e:  # noqa: BLE001 - export/pt2e/converter raise many types
        raise TechniqueError(f"pt2e int8 conversion failed: {type(e).__name__}: {e}") from e
    return data, [
        "batch fixed to 1",
        "full-integer: int8 input/output tensors; the runtime quantizes/dequantizes at the boundary",
    ]


class LiteRtRunner:
    """A LiteRT interpreter with a float interface.

    int8/uint8 input tensors are fed ``round(x / scale) + zero_point`` and quantized
    outputs are returned as ``(q - zero_point) * scale`` float32, which is what the
    agent's LiteRT runtime must do for full-integer bundles. Rows are run one at a
    time when the model has a fixed batch of 1.

    Raises (constructor):
        TechniqueError: LiteRT cannot load the model.
    """

    def __init__(self, model: bytes, threads: int) -> None:
        from ai_edge_litert import interpreter as tfl

        try:
            with _quiet():
                self._it = tfl.Interpreter(model_content=model, num_threads=threads)
                self._it.allocate_tensors()
        except (ValueError, RuntimeError) as e:
            raise TechniqueError(f"LiteRT cannot load the model: {e}") from e
        self._in = self._it.get_input_details()
        self._out = self._it.get_output_details()
        if len(self._in) != 1:
            raise TechniqueError(f"LiteRT model has {len(self._in)} inputs; one is supported")

    @property
    def input_name(self) -> str:
        return str(self._in[0]["name"])

    @property
    def output_names(self) -> list[str]:
        return [str(d["name"]) for d in self._out]

    @property
    def io_dtypes(self) -> tuple[str, list[str]]:
        return np.dtype(self._in[0]["dtype"]).name, [np.dtype(d["dtype"]).name for d in self._out]

    @property
    def fixed_batch(self) -> int | None:
        sig = self._in[0].get("shape_signature", self._in[0]["shape"])
        return int(sig[0]) if len(sig) and int(sig[0]) > 0 else None

    def ops(self) -> list[str]:
        return [str(d["op_name"]) for d in self._it._get_ops_details()]

    def _quantize(self, x: np.ndarray) -> np.ndarray:
        d = self._in[0]
        dt = np.dtype(d["dtype"])
        if dt.kind in "iu" and x.dtype.kind == "f":
            scale, zp = d["quantization"]
            info = np.iinfo(dt)
            return np.clip(np.round(x / scale) + zp, info.min, info.max).astype(dt)
        return np.ascontiguousarray(x, dtype=dt)

    def _dequantize(self, k: int, q: np.ndarray) -> np.ndarray:
        d = self._out[k]
        if np.dtype(d["dtype"]).kind in "iu":
            scale, zp = d["quantization"]
            return ((q.astype(np.float32) - zp) * scale).astype(np.float32)
        return q

    def run1(self, x1: np.ndarray) -> list[np.ndarray]:
        """One invoke on an input whose shape equals the model's input shape."""
        self._it.set_tensor(self._in[0]["index"], self._quantize(x1))
        self._it.invoke()
        return [self._dequantize(k, self._it.get_tensor(d["index"])) for k, d in enumerate(self._out)]

    def run(self, x: np.ndarray) -> list[np.ndarray]:
        """All rows of ``x``; returns every output concatenated over rows.

        Raises:
            TechniqueError: inference failed.
        """
        try:
            if self.fixed_batch == 1:
                parts = [self.run1(x[i : i + 1]) for i in range(len(x))]
                return [np.concatenate([p[k] for p in parts]) for k in range(len(self._out))]
            self._it.resize_tensor_input(self._in[0]["index"], list(x.shape))
            self._it.allocate_tensors()
            return self.run1(x)
        except (ValueError, RuntimeError) as e:
            raise TechniqueError(f"LiteRT inference failed: {e}") from e


# Ops that need something beyond the LiteRT builtin op set on the device.
_NEEDS_EXTRA = ("Flex", "CUSTOM")


def tflite_blockers(model: bytes, min_runtime_version: str) -> list[str]:
    """Reasons a device's LiteRT (at least ``min_runtime_version``) cannot run the model.

    The model is loaded in the host LiteRT interpreter (which resolves every operator
    and its version against the builtin op resolver); select-TF (Flex) and custom
    operators need libraries a LiteRT-only device does not have.
    """
    try:
        runner = LiteRtRunner(model, threads=1)
    except TechniqueError as e:
        return [str(e)]
    reasons = []
    bad = sorted({op for op in runner.ops() if op.startswith(_NEEDS_EXTRA)})
    if bad:
        reasons.append(f"operators {bad} need the Flex delegate or custom-op libraries")
    return reasons
