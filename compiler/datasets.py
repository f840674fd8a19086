"""Compiler data files: ``.npz`` archives holding ``x`` and, for labelled data, ``y``.

Loading is strict: a file that is not an npz, lacks ``x``, holds object arrays, or
whose ``y`` does not match ``x`` row for row is refused with a
:class:`~compiler.errors.DataFileError` naming the file and the problem.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from agent.npz import load_npz_bounded
from compiler.errors import DataFileError

__all__ = ["Dataset", "load_npz", "check_input_shape"]

# Data files are read whole into memory; refuse anything absurd before trying.
MAX_DATA_BYTES = 2 << 30
# Arrays an .npz may unpack to (its members are deflated: a small file can hold a bomb).
MAX_UNPACKED_BYTES = 8 << 30


@dataclass(frozen=True)
class Dataset:
    """One data file: inputs ``x`` (float32, first axis = rows), optional labels ``y``."""

    path: Path
    x: np.ndarray
    y: np.ndarray | None
    sha256: str

    @property
    def rows(self) -> int:
        return int(self.x.shape[0])


def load_npz(path: Path, role: str, *, need_labels: bool = False) -> Dataset:
    """Load a data file; ``role`` ("calibration", "eval", "train") names it in errors.

    ``x`` is converted to float32. ``y`` (when present) must have one entry per row of
    ``x``; 1-D integer labels are class indices, anything else is kept as a target
    array (for MSE / cosine metrics).

    Raises:
        DataFileError: unreadable, not an npz, no ``x``, empty, non-numeric, NaN/inf in
            ``x``, ``y`` of the wrong length, or ``y`` missing when ``need_labels``.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > MAX_DATA_BYTES:
            raise DataFileError(f"{role} data {path}: {size} bytes is over {MAX_DATA_BYTES}")
        raw = path.read_bytes()
    except OSError as e:
        raise DataFileError(f"{role} data {path}: cannot read ({e.strerror})") from e
    digest = hashlib.sha256(raw).hexdigest()
    if raw[:6] == b"\x93NUMPY":
        raise DataFileError(f"{role} data {path}: a single .npy array, not an .npz archive "
                            "(save one with numpy.savez(path, x=..., y=...))")
    try:
        arrays = load_npz_bounded(raw, MAX_UNPACKED_BYTES)
    except ValueError as e:  # not a zip, a bomb, a header claiming more than its data, pickles
        raise DataFileError(f"{role} data {path}: not a readable .npz file ({e})") from e
    if "x" not in arrays:
        found = ", ".join(sorted(arrays)) or "nothing"
        raise DataFileError(f"{role} data {path}: no array named 'x' (found {found})")
    x = arrays["x"]
    if x.dtype.kind not in "biuf":
        raise DataFileError(f"{role} data {path}: 'x' has dtype {x.dtype}; numbers are needed")
    if x.ndim < 2 or x.shape[0] == 0:
        raise DataFileError(
            f"{role} data {path}: 'x' must have a row axis and at least one row, "
            f"got shape {tuple(x.shape)}"
        )
    with np.errstate(over="ignore"):
        x = np.ascontiguousarray(arrays["x"], dtype=np.float32)
    if not np.isfinite(x).all():
        original = arrays["x"]
        if original.dtype.kind == "f" and np.isfinite(original).all():
            raise DataFileError(f"{role} data {path}: 'x' has values beyond float32's range "
                                f"(largest magnitude {float(np.abs(original).max()):.3g})")
        raise DataFileError(f"{role} data {path}: 'x' contains NaN or infinite values")
    y = arrays.get("y")
    if y is not None:
        if y.dtype.kind not in "biuf":
            raise DataFileError(f"{role} data {path}: 'y' has dtype {y.dtype}; numbers are needed")
        if y.shape[:1] != x.shape[:1]:
            raise DataFileError(
                f"{role} data {path}: 'y' has {y.shape[0] if y.ndim else 0} rows, 'x' has {x.shape[0]}"
            )
        if y.dtype.kind in "biu":
            y = y.astype(np.int64)
    elif need_labels:
        raise DataFileError(f"{role} data {path}: labels 'y' are required here")
    return Dataset(path=path, x=x, y=y, sha256=digest)


def check_input_shape(data: Dataset, role: str, model_shape: Sequence[int | str | None]) -> None:
    """Check that rows of ``data.x`` fit the model input shape (batch axis excluded).

    ``model_shape`` includes the batch axis; symbolic (str/None/-1) dimensions match
    anything.

    Raises:
        DataFileError: rank or a fixed dimension differs.
    """
    want = list(model_shape)[1:]
    got = list(data.x.shape[1:])
    shown = "(N, " + ", ".join("?" if not isinstance(d, int) or d < 0 else str(d) for d in want) + ")"
    if len(want) != len(got):
        raise DataFileError(
            f"{role} data {data.path}: 'x' rows have shape {tuple(got)}, "
            f"the model expects inputs shaped {shown}"
        )
    for w, g in zip(want, got, strict=True):
        if isinstance(w, int) and w > 0 and w != g:
            raise DataFileError(
                f"{role} data {data.path}: 'x' has shape {tuple(data.x.shape)}, "
                f"the model expects inputs shaped {shown}"
            )
