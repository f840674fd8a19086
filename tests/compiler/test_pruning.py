"""Structured pruning shrinks layers for real; KD students are smaller; sparsity is honest."""

from __future__ import annotations

import torch
from torch import nn

from compiler.demo_models import DigitsCNN, load_digits_split, train_classifier
from compiler.pruning import (
    magnitude_prune,
    parameter_count,
    prune_channels,
    student_width_for_ratio,
    width_scaled_student,
)


def test_structured_pruning_removes_channels_and_keeps_outputs() -> None:
    x_tr, y_tr, x_te, y_te = load_digits_split(size=8, seed=0)
    teacher = train_classifier(DigitsCNN(size=8), x_tr, y_tr, epochs=3, seed=0)
    ex = torch.from_numpy(x_tr[:2])
    pruned = prune_channels(teacher, ex, 0.5, x_tr, y_tr, epochs=2, seed=0)
    convs = [m for m in pruned.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [8, 8]  # 16 -> 8 each, physically
    assert parameter_count(pruned) < 0.35 * parameter_count(teacher)
    assert pruned(torch.from_numpy(x_te)).shape == (len(x_te), 10)
    acc = (pruned(torch.from_numpy(x_te)).argmax(1).numpy() == y_te).mean()
    assert acc > 0.8
    student = width_scaled_student(teacher, ex, 0.5, x_tr, y_tr, epochs=2, seed=0)
    assert parameter_count(student) == parameter_count(pruned)


def test_magnitude_pruning_zeroes_but_does_not_shrink() -> None:
    model = DigitsCNN(size=8)
    sparse = magnitude_prune(model, 0.5)
    assert parameter_count(sparse) == parameter_count(model)
    for m in sparse.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            zero = float((m.weight == 0).float().mean())
            assert 0.49 <= zero <= 0.51


def test_student_width_is_the_largest_meeting_the_size_ratio() -> None:
    from compiler.demo_models import DigitsMLP
    from compiler.pruning import _pruned_copy

    for teacher in (DigitsCNN(size=8), DigitsMLP(size=8)):
        ex = torch.zeros(2, 1, 8, 8)
        width, n = student_width_for_ratio(teacher, ex, 4.0)
        assert n * 4 <= parameter_count(teacher)
        wider = parameter_count(_pruned_copy(teacher, ex, 1.0 - (width + 0.01)))
        assert wider * 4 > parameter_count(teacher)


def test_training_gives_the_same_weights_whatever_the_torch_thread_count() -> None:
    """Trained candidates must be byte-identical on hosts with other core counts: torch's
    multi-threaded kernels sum in a thread-dependent order, so training runs on one."""
    x_tr, y_tr, _, _ = load_digits_split(size=8, seed=0)
    before = torch.get_num_threads()
    weights = []
    try:
        for threads in (2, 1):
            torch.set_num_threads(threads)
            torch.manual_seed(0)  # the same initial weights
            m = train_classifier(DigitsCNN(size=8), x_tr, y_tr, epochs=1, seed=0)
            weights.append(b"".join(v.numpy().tobytes() for v in m.state_dict().values()))
            assert torch.get_num_threads() == threads  # restored after training
    finally:
        torch.set_num_threads(before)
    assert weights[0] == weights[1]
