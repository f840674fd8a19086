"""Evaluation metrics: how good a candidate's outputs are against eval labels.

Every metric is reported in its natural units; :func:`score` maps it to a
"higher is better" number for selection, so the profile's ``max_accuracy_drop``
is an absolute drop of accuracy / top-k / cosine, and an absolute *increase* of MSE.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from compiler.errors import CompilerInputError

__all__ = ["Metric", "parse_metric", "evaluate_metric", "score"]

_TOPK = re.compile(r"^top(\d{1,3})$")


@dataclass(frozen=True)
class Metric:
    name: str  # "accuracy", "topK", "mse", "cosine"
    k: int = 1

    @property
    def higher_is_better(self) -> bool:
        return self.name != "mse"

    @property
    def needs_class_labels(self) -> bool:
        return self.name == "accuracy" or self.name.startswith("top")


def parse_metric(text: str) -> Metric:
    """``accuracy``, ``topK`` (e.g. ``top5``), ``mse`` or ``cosine``.

    Raises:
        CompilerInputError: anything else.
    """
    t = text.strip().lower()
    if t in ("accuracy", "mse", "cosine"):
        return Metric(t)
    m = _TOPK.match(t)
    if m and int(m.group(1)) >= 1:
        return Metric(t, k=int(m.group(1)))
    raise CompilerInputError(f"unknown metric {text!r}; use accuracy, topK (e.g. top5), mse or cosine")


def evaluate_metric(metric: Metric, outputs: np.ndarray, y: np.ndarray | None,
                    fp32_outputs: np.ndarray | None = None) -> float | None:
    """The metric of ``outputs`` (first model output, one row per eval row).

    Without labels, ``cosine`` and ``mse`` compare against the fp32 model's outputs
    (fidelity to the original); accuracy-like metrics are then None.

    Raises:
        CompilerInputError: labels do not fit the metric (e.g. float ``y`` for accuracy,
            or ``y`` shaped unlike the outputs for mse/cosine).
    """
    target = y
    if metric.needs_class_labels:
        if y is None:
            return None
        if y.ndim != 1 or y.dtype.kind not in "iu":
            raise CompilerInputError(f"metric {metric.name} needs 1-D integer class labels 'y'")
        if outputs.ndim != 2:
            raise CompilerInputError(f"metric {metric.name} needs 2-D (rows, classes) outputs")
        if metric.name == "accuracy":
            return float((outputs.argmax(axis=1) == y).mean())
        k = min(metric.k, outputs.shape[1])
        topk = np.argpartition(-outputs, k - 1, axis=1)[:, :k]
        return float((topk == y[:, None]).any(axis=1).mean())
    if target is None:
        target = fp32_outputs
    if target is None:
        return None
    a = outputs.reshape(len(outputs), -1).astype(np.float64)
    b = np.asarray(target).reshape(len(target), -1).astype(np.float64)
    if a.shape != b.shape:
        raise CompilerInputError(
            f"metric {metric.name}: labels 'y' have shape {tuple(np.shape(target))}, "
            f"model outputs {tuple(outputs.shape)}"
        )
    if metric.name == "mse":
        return float(((a - b) ** 2).mean())
    na = np.linalg.norm(a, axis=1)
    nb = np.linalg.norm(b, axis=1)
    cos = (a * b).sum(axis=1) / np.maximum(na * nb, 1e-12)
    return float(cos.mean())


def score(metric: Metric, value: float | None) -> float | None:
    """``value`` as higher-is-better (MSE is negated)."""
    if value is None:
        return None
    return value if metric.higher_is_better else -value
