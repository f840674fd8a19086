"""Structured channel pruning (physically smaller layers) and unstructured magnitude pruning.

Structured pruning uses torch-pruning's dependency graph, so removing an output
channel of one layer also removes the matching input channel of every consumer:
the result is a dense model with fewer channels, and the speed-up is real on any
runtime. Unstructured pruning only zeroes weights: the dense model is exactly as
large and as slow, it merely compresses better (reported as such).
"""

from __future__ import annotations

import copy
import zlib

import numpy as np
import torch
from torch import nn

from compiler.demo_models import train_classifier
from compiler.errors import TechniqueError

__all__ = [
    "prune_channels",
    "width_scaled_student",
    "student_width_for_ratio",
    "magnitude_prune",
    "compressed_size",
    "parameter_count",
]


def parameter_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _output_layers(module: nn.Module, example: torch.Tensor) -> list[nn.Module]:
    """Layers whose output channels are the model's outputs (never pruned)."""
    last: list[nn.Module] = []
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d, nn.Conv1d)):
            last = [m]
    return last


def _pruned_copy(module: nn.Module, example: torch.Tensor, ratio: float) -> nn.Module:
    import torch_pruning as tp

    if not 0.0 < ratio < 1.0:
        raise TechniqueError(f"pruning ratio must be in (0, 1), got {ratio}")
    model = copy.deepcopy(module).eval()
    try:
        pruner = tp.pruner.MetaPruner(
            model,
            example,
            importance=tp.importance.MagnitudeImportance(p=2),
            pruning_ratio=ratio,
            ignored_layers=_output_layers(model, example),
        )
        pruner.step()
    except Exception as e:  # noqa: BLE001 - dependency tracing raises many types
        raise TechniqueError(f"structured pruning failed: {type(e).__name__}: {e}") from e
    return model


def prune_channels(
    module: nn.Module,
    example: torch.Tensor,
    ratio: float,
    x_train: np.ndarray,
    y_train: np.ndarray,
    *,
    epochs: int,
    seed: int = 0,
    lr: float = 1e-3,
) -> nn.Module:
    """Remove ``ratio`` of the channels of every prunable layer (L2 magnitude), then
    fine-tune on (x_train, y_train). The output layer keeps its channels.

    Raises:
        TechniqueError: torch-pruning cannot trace the module, or the ratio is invalid.
    """
    model = _pruned_copy(module, example, ratio)
    return train_classifier(model, x_train, y_train, epochs=epochs, seed=seed, lr=lr)


def student_width_for_ratio(teacher: nn.Module, example: torch.Tensor, ratio: float) -> tuple[float, int]:
    """The largest width multiplier (in steps of 0.01) whose student has at most
    ``1/ratio`` of the teacher's parameters; returns ``(width, student parameters)``.

    Parameter count grows with width (layers shrink on both sides, so roughly with
    its square), so a bisection over widths 5..99% finds it with ~7 structural prunings
    (at tiny widths torch-pruning refuses to empty a layer and returns it unpruned, so
    the search starts at the narrowest width it prunes).

    Raises:
        TechniqueError: the teacher cannot be traced, or even the narrowest width is too large.
    """
    if ratio <= 1.0:
        raise TechniqueError(f"student size ratio must be > 1, got {ratio}")
    budget = parameter_count(teacher) / ratio
    counts: dict[int, int] = {}

    def params(pct: int) -> int:
        if pct not in counts:
            counts[pct] = parameter_count(_pruned_copy(teacher, example, 1.0 - pct / 100))
        return counts[pct]

    full = parameter_count(teacher)
    # torch-pruning leaves a model unpruned when a ratio would empty a layer; start at
    # the narrowest width (5% steps) that it actually prunes.
    lo = next((p for p in range(5, 100, 5) if params(p) < full), 99)
    hi = 99  # invariant: the answer, if any, is in [lo, hi]
    if params(lo) > budget:
        raise TechniqueError(
            f"no width reaches {ratio}x fewer parameters than the teacher "
            f"(width {lo / 100:.2f} keeps {params(lo)} of {full})"
        )
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if params(mid) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return lo / 100, params(lo)


def width_scaled_student(
    teacher: nn.Module,
    example: torch.Tensor,
    width: float,
    x_train: np.ndarray,
    y_train: np.ndarray,
    *,
    epochs: int,
    seed: int = 0,
    temperature: float = 4.0,
    alpha: float = 0.7,
    lr: float = 3e-3,
) -> nn.Module:
    """Derive a student with ``width`` of the teacher's channels in every hidden layer,
    re-initialise it, and train it with knowledge distillation from ``teacher``.

    The architecture comes from structurally pruning a copy of the teacher (so any
    Conv/Linear model works without knowing its class); the weights are then reset,
    so the student learns from the teacher's soft targets, not from its weights.

    Raises:
        TechniqueError: the teacher cannot be traced for width scaling.
    """
    student = _pruned_copy(teacher, example, 1.0 - width)
    torch.manual_seed(seed)
    for m in student.modules():
        reset = getattr(m, "reset_parameters", None)
        if m is not student and callable(reset):
            reset()
    return train_classifier(
        student,
        x_train,
        y_train,
        epochs=epochs,
        seed=seed,
        lr=lr,
        teacher=teacher,
        temperature=temperature,
        alpha=alpha,
    )


def magnitude_prune(module: nn.Module, sparsity: float) -> nn.Module:
    """Zero the smallest-magnitude ``sparsity`` share of each Conv/Linear weight.

    Returns a copy; shapes are unchanged, so dense runtimes gain nothing in speed.
    """
    import torch.nn.utils.prune as tprune

    model = copy.deepcopy(module).eval()
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d)):
            tprune.l1_unstructured(m, name="weight", amount=sparsity)
            tprune.remove(m, "weight")
    return model


def compressed_size(data: bytes) -> int:
    """zlib level-9 size: what sparsity buys on the wire and on disk."""
    return len(zlib.compress(data, 9))


