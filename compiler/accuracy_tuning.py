"""Accuracy-aware static int8: keep the most sensitive nodes in fp32 until the loss fits.

This is the fallback Intel Neural Compressor's tuner performs (quantize, evaluate
against a tolerable loss, fall back sensitive ops), done with ONNX Runtime's own
quantizer because neural-compressor 3.x cannot tune an ONNX model (docs/compiler.md,
"Why not neural-compressor").

1. Quantize the whole graph (the plain static QDQ candidate) and evaluate it. If its
   metric drop against fp32 is within ``max_drop`` (and the metric reaches ``floor``),
   it is kept unchanged.
2. Otherwise rank the quantized activation tensors by their *local* quantization error
   on calibration rows: for every QuantizeLinear, the per-channel relative RMS error of
   ``DQ(Q(x))`` against ``x`` (same run, so upstream error does not accumulate into the
   ranking). An outlier-dominated range shows up here as a large error on that one
   tensor.
3. Greedily, most sensitive tensor first, exclude (``nodes_to_exclude``) the quantized
   nodes that produce and consume it, looking through range-preserving ops (Relu,
   MaxPool, Reshape, ...) so the tensor really stays float. Re-quantize (calibration
   ranges are cached, so a trial costs one quantizer pass and one evaluation) and
   evaluate, until the drop fits or ``max_trials`` is spent. If no trial fits, the best
   one is returned, and selection rejects it with its measured drop.

Pure of file IO except a temporary working folder; deterministic for the same inputs.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from compiler.errors import TechniqueError
from compiler.measure import ort_session, run_batched
from compiler.metrics import Metric, evaluate_metric, score
from compiler.quantize import (
    StaticQuantSettings,
    compact_qdq,
    preprocess_for_quantization,
    quantize_preprocessed,
)

__all__ = [
    "TuningTarget",
    "ExcludedNode",
    "TuningResult",
    "tune_static_qdq",
    "tensor_errors",
    "MAX_TRIALS",
]

MAX_TRIALS = 8
# Ops that pass an int8 tensor through unchanged in range (ORT quantizes their input and
# output with the same scale); an excluded tensor's float-ness must extend across them.
_PASS_THROUGH = frozenset({
    "Relu", "Clip", "MaxPool", "Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze",
    "Identity", "Slice", "Gather", "Split", "Concat",
})
# Rows used to measure tensor errors (more adds time, not information).
_ERROR_ROWS = 256


@dataclass(frozen=True)
class TuningTarget:
    """The tolerable loss: metric drop (higher-is-better units) and optional floor."""

    max_drop: float
    floor: float | None = None
    max_trials: int = MAX_TRIALS

    def met(self, baseline: float, value: float) -> bool:
        if baseline - value > self.max_drop + 1e-12:
            return False
        return self.floor is None or value >= self.floor


@dataclass(frozen=True)
class ExcludedNode:
    node: str
    op_type: str
    tensor: str
    relative_error: float

    @property
    def reason(self) -> str:
        return (
            f"int8 loses {self.relative_error:.1%} (mean per-channel relative RMS error on "
            "calibration rows) "
            f"of tensor {self.tensor!r} it reads or writes"
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "node": self.node,
            "op_type": self.op_type,
            "tensor": self.tensor,
            "relative_error": round(self.relative_error, 6),
            "reason": self.reason,
        }


@dataclass
class TuningResult:
    model: bytes
    baseline: float | None
    plain: float | None
    final: float | None
    met: bool
    excluded: list[ExcludedNode] = field(default_factory=list)
    trials: list[dict[str, Any]] = field(default_factory=list)
    skipped: str | None = None

    def as_dict(self, target: TuningTarget) -> dict[str, Any]:
        r = lambda v: None if v is None else round(v, 6)  # noqa: E731
        return {
            "max_drop": target.max_drop,
            "floor": target.floor,
            "max_trials": target.max_trials,
            "fp32_score": r(self.baseline),
            "plain_int8_score": r(self.plain),
            "final_score": r(self.final),
            "met": self.met,
            "trials": self.trials,
            "skipped": self.skipped,
        }

    def notes(self, target: TuningTarget) -> list[str]:
        if self.skipped:
            return [f"accuracy-aware tuning skipped: {self.skipped}"]
        if not self.excluded:
            if self.trials:
                return [
                    f"accuracy-aware fallback: {len(self.trials)} trial(s) excluding sensitive "
                    "nodes did not improve on plain int8; kept it"
                ]
            return []
        assert self.baseline is not None and self.plain is not None and self.final is not None
        names = ", ".join(e.node for e in self.excluded)
        verdict = "within" if self.met else "still over"
        return [
            f"accuracy-aware fallback: plain int8 dropped {self.baseline - self.plain:.4f} "
            f"(tolerable {target.max_drop}); kept {len(self.excluded)} node(s) in fp32 "
            f"({names}) after {len(self.trials)} trial(s): drop {self.baseline - self.final:.4f}, "
            f"{verdict} tolerance"
        ]


def _name_nodes(pre: bytes) -> bytes:
    """Give unnamed nodes a stable name (``nodes_to_exclude`` matches by name)."""
    import onnx

    proto = onnx.load_model_from_string(pre)
    changed = False
    for i, n in enumerate(proto.graph.node):
        if not n.name:
            n.name = f"{n.op_type}_{i}"
            changed = True
    return proto.SerializeToString(deterministic=True) if changed else pre


def tensor_errors(qdq: bytes, input_name: str, x: np.ndarray) -> dict[str, float]:
    """Local int8 error of every quantized activation tensor of a QDQ model.

    Returns ``{tensor: error}`` (:func:`_channel_error`) with ``tensor`` the original (fp32 graph)
    tensor name, which ORT's quantizer keeps as the prefix of the ``_scale`` initializer.
    """
    import onnx
    import onnxruntime as ort

    proto = onnx.load_model_from_string(qdq)
    g = proto.graph
    inits = {i.name for i in g.initializer}
    dq_of: dict[str, str] = {}
    for n in g.node:
        if n.op_type == "DequantizeLinear" and n.input[0] not in inits:
            dq_of.setdefault(n.input[0], n.output[0])
    pairs: dict[str, tuple[str, str]] = {}
    for n in g.node:
        if n.op_type != "QuantizeLinear" or n.output[0] not in dq_of:
            continue
        tensor = n.input[1].removesuffix("_scale")
        pairs.setdefault(tensor, (n.input[0], dq_of[n.output[0]]))
    if not pairs:
        return {}
    existing = {o.name for o in g.output}
    for a, b in pairs.values():
        for name in (a, b):
            if name not in existing:
                g.output.append(onnx.ValueInfoProto(name=name))
                existing.add(name)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # keep Q/DQ apart
    so.intra_op_num_threads = 1
    try:
        sess = ort.InferenceSession(
            proto.SerializeToString(), so, providers=["CPUExecutionProvider"]
        )
        names = [o.name for o in sess.get_outputs()]
        values = dict(zip(names, sess.run(None, {input_name: x[:_ERROR_ROWS]}), strict=True))
    except Exception as e:  # noqa: BLE001 - ORT raises its own untyped errors
        raise TechniqueError(f"measuring int8 tensor errors failed: {type(e).__name__}: {e}") from e
    return {t: _channel_error(values[a], values[b]) for t, (a, b) in pairs.items()}


def _channel_error(x: np.ndarray, dq: np.ndarray) -> float:
    """Mean over channels of ``rms(x_c - dq_c) / rms(x_c)``.

    Per channel, because one outlier channel sets a per-tensor scale that flattens all
    the others: their error is what costs accuracy, and a tensor-wide RMS (dominated by
    the outlier, which int8 represents well) would hide it. Channels are axis 1 for
    (N, C) and (N, C, H, W) tensors, the last axis otherwise; all-zero channels are
    skipped.
    """
    a, b = x.astype(np.float64), dq.astype(np.float64)
    if a.ndim < 2:
        a, b = a.reshape(-1, 1), b.reshape(-1, 1)
    axis = 1 if a.ndim in (2, 4) else a.ndim - 1
    a, b = np.moveaxis(a, axis, -1), np.moveaxis(b, axis, -1)
    a, b = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])
    ref = np.sqrt((a**2).mean(axis=0))
    live = ref > 0
    if not live.any():
        return 0.0
    err = np.sqrt(((a - b) ** 2).mean(axis=0))
    return float((err[live] / ref[live]).mean())


def _groups(pre: bytes, quantized: set[str], errors: dict[str, float]) -> list[tuple[str, float, list[tuple[str, str]]]]:
    """Per tensor (most sensitive first): the quantized nodes to exclude to keep it float."""
    import onnx

    g = onnx.load_model_from_string(pre).graph
    producer: dict[str, Any] = {}
    consumers: dict[str, list[Any]] = {}
    for n in g.node:
        for o in n.output:
            producer[o] = n
        for i in n.input:
            consumers.setdefault(i, []).append(n)

    def reach(tensor: str) -> list[Any]:
        seen_t, seen_n, stack, found = {tensor}, set(), [tensor], []
        while stack:
            t = stack.pop()
            near = ([producer[t]] if t in producer else []) + consumers.get(t, [])
            for n in near:
                if n.name in seen_n:
                    continue
                seen_n.add(n.name)
                found.append(n)
                if n.op_type in _PASS_THROUGH:
                    for t2 in [*n.input[:1], *n.output]:
                        if t2 not in seen_t:
                            seen_t.add(t2)
                            stack.append(t2)
        return found

    out = []
    for tensor, err in sorted(errors.items(), key=lambda kv: (-kv[1], kv[0])):
        nodes = [(n.name, n.op_type) for n in reach(tensor) if n.name in quantized]
        if nodes:
            out.append((tensor, err, sorted(nodes)))
    return out


def _quantized_nodes(qdq: bytes) -> set[str]:
    """Nodes of the QDQ model that read a dequantized tensor (i.e. run in int8)."""
    import onnx

    g = onnx.load_model_from_string(qdq).graph
    dq_out = {o for n in g.node if n.op_type == "DequantizeLinear" for o in n.output}
    return {
        n.name for n in g.node
        if n.op_type not in ("QuantizeLinear", "DequantizeLinear") and dq_out & set(n.input)
    }


def tune_static_qdq(
    model: bytes,
    input_name: str,
    calib_x: np.ndarray,
    settings: StaticQuantSettings,
    eval_x: np.ndarray,
    eval_y: np.ndarray | None,
    metric: Metric,
    target: TuningTarget,
    fp32_out: np.ndarray | None = None,
) -> tuple[TuningResult, list[str]]:
    """Static QDQ int8 of ``model`` whose metric on (eval_x, eval_y) stays within
    ``target`` of fp32, excluding sensitive nodes if needed (module docstring).
    ``fp32_out``: ``model``'s first output on ``eval_x`` when the caller has it already
    (1-thread ONNX Runtime, as here); otherwise it is computed.

    Returns the result (its ``model`` is the one to ship, compacted with
    :func:`compiler.quantize.compact_qdq`; tuning itself works on the quantizer's
    names) and the pre-processing notes.

    Raises:
        TechniqueError: quantization or evaluation failed.
    """

    def evaluate(data: bytes) -> float | None:
        out = run_batched(ort_session(data, threads=1), input_name, eval_x)[0]
        return score(metric, evaluate_metric(metric, out, eval_y, fp32_out))

    if fp32_out is None:
        fp32_out = run_batched(ort_session(model, threads=1), input_name, eval_x)[0]
    base = score(metric, evaluate_metric(metric, fp32_out, eval_y, fp32_out))
    with tempfile.TemporaryDirectory(prefix="edgefleet-tune-") as tmp:
        work = Path(tmp)
        pre, skipped = preprocess_for_quantization(model, work)
        notes = [skipped] if skipped else []
        pre = _name_nodes(pre)
        cache = work / "calibration.json"
        plain = quantize_preprocessed(pre, input_name, calib_x, settings, work, cache, compact=False)
        plain_score = evaluate(plain)
        result = TuningResult(plain, base, plain_score, plain_score, met=True)
        if base is None or plain_score is None:
            result.skipped = f"metric {metric.name} needs eval labels"
            return _shipped(result), notes
        if target.met(base, plain_score):
            return _shipped(result), notes
        result.met = False
        errors = tensor_errors(plain, input_name, calib_x)
        groups = _groups(pre, _quantized_nodes(plain), errors)
        excluded: list[ExcludedNode] = []
        best = (plain_score, 0, plain, list(excluded))
        for tensor, err, nodes in groups:
            if len(result.trials) >= target.max_trials:
                break
            names = {e.node for e in excluded}
            new = [ExcludedNode(n, op, tensor, err) for n, op in nodes if n not in names]
            if not new:
                continue
            excluded += new
            qs = replace(settings, exclude_nodes=tuple(e.node for e in excluded))
            data = quantize_preprocessed(pre, input_name, calib_x, qs, work, cache, compact=False)
            s = evaluate(data)
            assert s is not None
            result.trials.append({
                "excluded": len(excluded), "tensor": tensor,
                "relative_error": round(err, 6), "score": round(s, 6),
            })
            if s > best[0] or (s == best[0] and len(excluded) < best[1]):
                best = (s, len(excluded), data, list(excluded))
            if target.met(base, s):
                break
        result.final, _, result.model, result.excluded = best
        result.met = target.met(base, result.final)
        return _shipped(result), notes


def _shipped(result: TuningResult) -> TuningResult:
    """``result`` with its model compacted for shipping (:func:`compiler.quantize.compact_qdq`)."""
    result.model = compact_qdq(result.model)
    return result
