"""Small reference models trained on scikit-learn's bundled digits (no downloads).

Used by the hub's demo, the compiler tests and the compiler benchmarks. Everything is
seeded, so the same arguments give the same weights on the same machine.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch import nn

__all__ = [
    "DigitsCNN",
    "DigitsMLP",
    "SequenceEncoder",
    "synthetic_sequences",
    "train_sequence_encoder",
    "load_digits_split",
    "train_classifier",
    "train_digits_cnn",
    "train_digits_mlp",
    "export_pt2",
    "write_npz",
    "write_calib_eval",
]

NUM_CLASSES = 10


class DigitsCNN(nn.Module):
    """Conv blocks (conv-BN-free, ReLU, 2x2 max-pool) down to 4x4, then a small head.

    ``size`` is the input side (8 for raw digits, 32 for the upscaled benchmark set);
    ``width`` scales every channel count (distillation students use ``width < 1``).
    """

    def __init__(self, size: int = 8, width: float = 1.0, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        if size < 4 or size & (size - 1):
            raise ValueError(f"size must be a power of two >= 4, got {size}")
        blocks = max(1, int(math.log2(size // 4)))
        layers: list[nn.Module] = []
        in_ch = 1
        for i in range(blocks):
            out_ch = max(2, int(round(16 * (2**i) * width)))
            layers += [nn.Conv2d(in_ch, out_ch, 3, padding=1), nn.ReLU()]
            if size == 8 or i > 0 or blocks == 1:
                layers += [nn.Conv2d(out_ch, out_ch, 3, padding=1), nn.ReLU()]
            layers.append(nn.MaxPool2d(2))
            in_ch = out_ch
        self.features = nn.Sequential(*layers)
        hidden = max(4, int(round(64 * width)))
        self.head = nn.Sequential(
            nn.Flatten(), nn.Linear(in_ch * 16, hidden), nn.ReLU(), nn.Linear(hidden, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class DigitsMLP(nn.Module):
    """Flatten, then two hidden layers; ``width`` scales the hidden sizes."""

    def __init__(self, size: int = 8, width: float = 1.0, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        h1 = max(4, int(round(256 * width)))
        h2 = max(4, int(round(128 * width)))
        self.net = nn.Sequential(
            nn.Flatten(),
            nn.Linear(size * size, h1),
            nn.ReLU(),
            nn.Linear(h1, h2),
            nn.ReLU(),
            nn.Linear(h2, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class SequenceEncoder(nn.Module):
    """A small transformer encoder classifier over (batch, length, features) sequences."""

    def __init__(
        self, features: int = 8, d_model: int = 64, heads: int = 4, layers: int = 2,
        num_classes: int = 4,
    ) -> None:
        super().__init__()
        self.embed = nn.Linear(features, d_model)
        layer = nn.TransformerEncoderLayer(
            d_model, heads, dim_feedforward=2 * d_model, dropout=0.0, batch_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d_model, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(x)).mean(dim=1))


def synthetic_sequences(
    n: int, seed: int = 0, length: int = 16, features: int = 8, num_classes: int = 4
) -> tuple[np.ndarray, np.ndarray]:
    """A seeded sequence task: the class is the feature (of the first ``num_classes``)
    whose values, summed over the time steps where feature ``features-1`` is positive,
    are largest. Needs attention to the gating feature, not just a mean."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, length, features)).astype(np.float32)
    gate = (x[:, :, features - 1] > 0).astype(np.float32)[:, :, None]
    y = (x[:, :, :num_classes] * gate).sum(axis=1).argmax(axis=1).astype(np.int64)
    return x, y


def train_sequence_encoder(
    seed: int = 0, epochs: int = 12, n_train: int = 2000, n_test: int = 600
) -> tuple[nn.Module, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Train :class:`SequenceEncoder` on :func:`synthetic_sequences`."""
    torch.manual_seed(seed)
    x_tr, y_tr = synthetic_sequences(n_train, seed=seed)
    x_te, y_te = synthetic_sequences(n_test, seed=seed + 1)
    module = SequenceEncoder()
    train_classifier(module, x_tr, y_tr, epochs=epochs, seed=seed, lr=1e-3)
    return module, x_tr, y_tr, x_te, y_te


def load_digits_split(
    size: int = 8, seed: int = 0, test_fraction: float = 0.25
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Digits as float32 NCHW in [0, 1], optionally upscaled (bilinear) to ``size``.

    Returns ``(x_train, y_train, x_test, y_test)``; labels are int64. The split is a
    seeded shuffle, so it is the same on every machine.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.images.astype(np.float32) / 16.0)[:, None, :, :]
    y = digits.target.astype(np.int64)
    if size != 8:
        with torch.no_grad():
            x = (
                nn.functional.interpolate(
                    torch.from_numpy(x), size=(size, size), mode="bilinear", align_corners=False
                )
                .clamp(0.0, 1.0)
                .numpy()
            )
    order = np.random.default_rng(seed).permutation(len(y))
    n_test = int(round(len(y) * test_fraction))
    test, train = order[:n_test], order[n_test:]
    return x[train], y[train], x[test], y[test]


@contextlib.contextmanager
def single_threaded() -> Iterator[None]:
    """torch on one intra-op thread for the duration: its multi-threaded kernels sum in a
    thread-dependent order, so the same seed trained on 1 and 2 threads gave different
    weights, and a compile's trained bundles differed between hosts with other core
    counts. Restores the previous count."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def train_classifier(
    module: nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    *,
    epochs: int,
    seed: int = 0,
    lr: float = 3e-3,
    batch_size: int = 64,
    teacher: nn.Module | None = None,
    temperature: float = 4.0,
    alpha: float = 0.7,
) -> nn.Module:
    """Train ``module`` with Adam on (x, y); returns it in eval mode.

    With ``teacher``, the loss is knowledge distillation (Hinton et al.):
    ``alpha * T^2 * KL(softmax(t/T) || softmax(s/T)) + (1 - alpha) * CE(s, y)``.

    Runs on one torch thread (:func:`single_threaded`), so the weights do not depend on
    the host's core count.
    """
    with single_threaded():
        return _train(module, x, y, epochs=epochs, seed=seed, lr=lr, batch_size=batch_size,
                      teacher=teacher, temperature=temperature, alpha=alpha)


def _train(
    module: nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    *,
    epochs: int,
    seed: int,
    lr: float,
    batch_size: int,
    teacher: nn.Module | None,
    temperature: float,
    alpha: float,
) -> nn.Module:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    xt, yt = torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(np.ascontiguousarray(y))
    opt = torch.optim.Adam(module.parameters(), lr=lr)
    if teacher is not None:
        teacher.eval()
    module.train()
    for _ in range(epochs):
        perm = torch.randperm(len(yt), generator=gen)
        for i in range(0, len(perm), batch_size):
            idx = perm[i : i + batch_size]
            logits = module(xt[idx])
            loss = nn.functional.cross_entropy(logits, yt[idx])
            if teacher is not None:
                with torch.no_grad():
                    t_logits = teacher(xt[idx])
                kd = nn.functional.kl_div(
                    nn.functional.log_softmax(logits / temperature, dim=1),
                    nn.functional.softmax(t_logits / temperature, dim=1),
                    reduction="batchmean",
                )
                loss = alpha * temperature**2 * kd + (1.0 - alpha) * loss
            opt.zero_grad()
            loss.backward()
            opt.step()
    return module.eval()


def _train_digits(
    module: nn.Module, seed: int, epochs: int, size: int, lr: float = 3e-3
) -> tuple[nn.Module, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    x_tr, y_tr, x_te, y_te = load_digits_split(size=size, seed=seed)
    train_classifier(module, x_tr, y_tr, epochs=epochs, seed=seed, lr=lr)
    return module, x_tr, y_tr, x_te, y_te


def train_digits_cnn(
    seed: int = 0, epochs: int = 15, size: int = 8, width: float = 1.0, lr: float = 3e-3
) -> tuple[nn.Module, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Train :class:`DigitsCNN`; returns ``(module, x_train, y_train, x_test, y_test)``.

    At ``size=8`` and the default epochs this takes a few seconds on 2 cores and
    reaches about 97% test accuracy.
    """
    torch.manual_seed(seed)
    return _train_digits(DigitsCNN(size=size, width=width), seed, epochs, size, lr)


def train_digits_mlp(
    seed: int = 0, epochs: int = 15, size: int = 8, width: float = 1.0, lr: float = 3e-3
) -> tuple[nn.Module, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Train :class:`DigitsMLP`; same return value as :func:`train_digits_cnn`."""
    torch.manual_seed(seed)
    return _train_digits(DigitsMLP(size=size, width=width), seed, epochs, size, lr)


def export_pt2(module: nn.Module, example_x: np.ndarray | torch.Tensor, path: Path) -> Path:
    """``torch.export`` ``module`` with a dynamic batch dimension and save it to ``path``.

    Raises:
        torch's export errors when the module cannot be traced.
    """
    x = torch.as_tensor(np.asarray(example_x[:2]) if not isinstance(example_x, torch.Tensor) else example_x[:2])
    if x.shape[0] < 2:
        # A batch of 1 would specialise the batch dimension; repeat the row instead.
        x = x.repeat(2, *([1] * (x.dim() - 1)))
    batch = torch.export.Dim("batch", min=1, max=65536)
    ep = torch.export.export(module.eval(), (x,), dynamic_shapes=({0: batch},))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.export.save(ep, str(path))
    return path


def write_npz(path: Path, x: np.ndarray, y: np.ndarray | None = None) -> Path:
    """Write a compiler data file: array ``x`` and, when given, labels ``y``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays: dict[str, np.ndarray] = {"x": np.ascontiguousarray(x, dtype=np.float32)}
    if y is not None:
        arrays["y"] = np.ascontiguousarray(y, dtype=np.int64)
    with open(path, "wb") as fh:
        np.savez(fh, **arrays)  # type: ignore[arg-type]
    return path


def write_calib_eval(
    out_dir: Path,
    x_train: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    *,
    calib_rows: int = 256,
    seed: int = 0,
) -> tuple[Path, Path]:
    """Write ``calib.npz`` (a seeded sample of training rows) and ``eval.npz`` (x, y).

    Returns ``(calib_path, eval_path)``.
    """
    rng = np.random.default_rng(seed)
    idx = np.sort(rng.choice(len(x_train), size=min(calib_rows, len(x_train)), replace=False))
    calib = write_npz(Path(out_dir) / "calib.npz", x_train[idx])
    ev = write_npz(Path(out_dir) / "eval.npz", x_test, y_test)
    return calib, ev
