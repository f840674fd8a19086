"""On-device drift sketches: one compact, mergeable message per telemetry interval.

The agent feeds every inference batch to a :class:`SketchAccumulator`; once per
telemetry interval it calls :meth:`SketchAccumulator.snapshot_and_reset` and sends the
resulting :class:`DriftSketch`. Raw inputs never leave the device. The hub merges
sketches across devices, cohorts, model versions and time windows (``hub.drift``).

What one :class:`DriftSketch` holds, per monitored feature (the columns of
:func:`agent.features.summary_features` under the bundle reference's ``summary``, in
the order of ``Reference.features``):

``counts``
    Numeric features: a histogram over the reference's bin edges, with the binning
    rule of :mod:`agent.features` (below the first edge -> bin 0, at or above the
    last edge -> last bin). Categorical features: one count per reference category,
    plus a last ``unknown`` count for codes that name no category.
``missing``
    NaN values. They are not binned. For every feature
    ``sum(counts) + missing == rows``, and the hub checks it.
``out_of_range``
    Values outside the reference schema ``[low, high]``, plus infinities (numeric),
    or unknown category codes (categorical). Out-of-range numeric values are still
    binned (into an end bin), so the histogram stays complete.
``kll`` / ``kll_since``
    A base64 Apache DataSketches ``kll_floats_sketch`` of the finite values of a
    numeric feature, covering every row since ``kll_since`` (see *Byte budget*).

Plus prediction counts (classes) or a prediction histogram (regressors) and a
latency histogram over :data:`LATENCY_EDGES_MS`.

Categorical inputs are integer codes into ``FeatureReference.categories`` (as floats
in the batch); anything else that is not NaN counts as ``unknown``.

Byte budget
-----------
A KLL sketch at the default ``k`` (:data:`DEFAULT_KLL_K` = 200, chosen for KS error
below 0.02 between two merged sketches) serializes to 1-3 KB, so 64 of them cannot fit
a 16 KB message at any useful ``k`` (even ``k = 8`` takes about 400 bytes once a
window holds a few thousand rows). Histograms and counters therefore go out for every
feature in every message, and quantile sketches go out *round-robin* under the
message byte budget (``max_message_bytes``, default 16 KiB): each feature's KLL keeps
accumulating on the device until its turn, then ships with ``kll_since`` marking the
start of the span it covers, and restarts. No rows are lost from the quantile
sketches; a feature's KLL simply covers one or more whole windows. Models with few
features send every KLL in every message.

Cost
----
:meth:`SketchAccumulator.update` only copies the batch into a list;
the vectorised work (summary features, binning, KLL updates) runs once per
``flush_rows`` rows, so the per-inference cost is a few microseconds
(``benchmarks/monitoring_sketch.py``).

Errors
------
:meth:`DriftSketch.decode` is how the hub reads a sketch. It enforces a byte limit
before parsing and turns every failure into :class:`~agent.errors.PayloadError` with
``kind`` one of ``oversized``, ``not_json``, ``version``, ``schema`` (wrong types,
negative or non-integer counts, NaN/inf, inconsistent totals) or ``sketch`` (bad
base64 or a KLL blob that fails structural checks). KLL bytes are checked field by
field *before* they reach the DataSketches C++ deserializer, which does not validate
level offsets and can corrupt memory on crafted input.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import re
import struct
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal

import datasketches
import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

from agent.bundle import Reference
from agent.errors import PayloadError, first_error
from agent.features import summary_features

log = logging.getLogger(__name__)

__all__ = [
    "SKETCH_VERSION",
    "DEFAULT_KLL_K",
    "MAX_KLL_K",
    "DEFAULT_MAX_MESSAGE_BYTES",
    "MAX_SKETCH_BYTES",
    "MAX_KLL_B64_CHARS",
    "MAX_ROWS",
    "LATENCY_EDGES_MS",
    "FeatureSketch",
    "PredictionSketch",
    "DriftSketch",
    "SketchAccumulator",
    "decode_kll",
    "encode_kll",
]

SKETCH_VERSION: Final = 1
DEFAULT_KLL_K: Final = 200
MIN_KLL_K: Final = 8
MAX_KLL_K: Final = 1024
DEFAULT_MAX_MESSAGE_BYTES: Final = 16 * 1024
MAX_SKETCH_BYTES: Final = 256 * 1024
"""Hard limit on one encoded sketch (the MQTT JSON payload limit)."""
MAX_KLL_B64_CHARS: Final = 48 * 1024
"""Longest base64 KLL blob accepted (k=1024 over 2**40 rows stays well below)."""
MAX_ROWS: Final = 1 << 40
"""Largest row or count in one sketch; keeps int64 sums over many merges exact."""
MAX_BINS: Final = 1025
LATENCY_EDGES_MS: Final[tuple[float, ...]] = (
    0.0, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0, 5000.0,
)
"""Fixed latency bin edges in milliseconds (same binning rule as features)."""

_MODEL_REF = r"^[a-z0-9][a-z0-9_.-]{0,63}:[0-9A-Za-z.+-]{1,128}$"
_DEFAULT_FLUSH_ROWS = 1024
_MAX_BUFFER_BYTES = 4 << 20

# --------------------------------------------------------------------------- KLL blobs

_KLL_FAMILY = 15
_KLL_M = 8
_FLAG_EMPTY = 1
_FLAG_L0_SORTED = 2
_FLAG_SINGLE = 4
_KLL_MAX_LEVELS = 61


def _cap_aux_aux(k: int, depth: int) -> int:
    return (((2 * k) << depth) // 3**depth + 1) >> 1


def _level_capacity(k: int, num_levels: int, height: int) -> int:
    depth = num_levels - height - 1
    if depth <= 30:
        cap = _cap_aux_aux(k, depth)
    else:
        half = depth // 2
        cap = _cap_aux_aux(_cap_aux_aux(k, half), depth - half)
    return max(_KLL_M, cap)


def _kll_error(message: str) -> PydanticCustomError:
    return PydanticCustomError("bad_sketch", "quantile sketch: {detail}", {"detail": message})


def _check_kll_bytes(raw: bytes) -> int:
    """Structural check of a serialized ``kll_floats_sketch``; returns its ``k``.

    Mirrors the DataSketches serial format (version 1 full, version 2 single item)
    and every invariant its deserializer assumes but does not check: level offsets
    non-decreasing and within capacity, exact length, finite items inside
    ``[min, max]``, sorted compacted levels, and ``n`` equal to the total weight.

    Raises:
        PydanticCustomError: (type ``bad_sketch``) on any violation.
    """
    if len(raw) < 8:
        raise _kll_error("truncated header")
    pre, ser, fam, flags, k, m = struct.unpack_from("<BBBBHB", raw, 0)
    if fam != _KLL_FAMILY or m != _KLL_M or flags & ~(_FLAG_EMPTY | _FLAG_L0_SORTED | _FLAG_SINGLE):
        raise _kll_error("not a KLL floats sketch")
    if not MIN_KLL_K <= k <= MAX_KLL_K:
        raise _kll_error(f"k={k} outside [{MIN_KLL_K}, {MAX_KLL_K}]")
    if flags & _FLAG_EMPTY:
        raise _kll_error("empty sketch (send none instead)")
    if flags & _FLAG_SINGLE:
        if (pre, ser) != (2, 2) or len(raw) != 12:
            raise _kll_error("bad single-item layout")
        if not np.isfinite(np.frombuffer(raw, "<f4", 1, 8)).all():
            raise _kll_error("non-finite item")
        return k
    if (pre, ser) != (5, 1) or len(raw) < 20:
        raise _kll_error("bad preamble")
    n, min_k, levels_n = struct.unpack_from("<QHB", raw, 8)
    if not 1 <= n <= MAX_ROWS or not MIN_KLL_K <= min_k <= k or not 1 <= levels_n <= _KLL_MAX_LEVELS:
        raise _kll_error("n, min_k or level count out of range")
    capacity = sum(_level_capacity(k, levels_n, h) for h in range(levels_n))
    head = 20 + 4 * levels_n
    if len(raw) < head + 8:
        raise _kll_error("truncated levels")
    levels = np.frombuffer(raw, "<u4", levels_n, 20).astype(np.int64)
    levels = np.append(levels, capacity)
    if np.any(np.diff(levels) < 0) or levels[0] > capacity:
        raise _kll_error("level offsets out of order")
    if len(raw) != head + 8 + 4 * int(capacity - levels[0]):
        raise _kll_error("length does not match level offsets")
    lo, hi = struct.unpack_from("<ff", raw, head)
    items = np.frombuffer(raw, "<f4", int(capacity - levels[0]), head + 8)
    if not (np.isfinite(lo) and np.isfinite(hi) and lo <= hi) or not np.isfinite(items).all():
        raise _kll_error("non-finite or inverted min/max/items")
    if items.size and (items.min() < lo or items.max() > hi):
        raise _kll_error("items outside [min, max]")
    pops = np.diff(levels)
    weight = 0
    start = 0
    for h, pop in enumerate(pops.tolist()):
        level = items[start : start + pop]
        start += pop
        if (h > 0 or flags & _FLAG_L0_SORTED) and np.any(np.diff(level) < 0):
            raise _kll_error(f"level {h} not sorted")
        weight += pop << h
    if weight != n:
        raise _kll_error("n does not match item weights")
    return k


def decode_kll(text: str) -> datasketches.kll_floats_sketch:
    """Decode a base64 KLL blob produced by :func:`encode_kll` into a sketch.

    Raises:
        PayloadError: (kind ``sketch``) bad base64, too long, or a malformed sketch.
    """
    try:
        return _decode_kll(text)
    except PydanticCustomError as e:
        raise PayloadError(e.message(), "sketch") from e


def _decode_kll(text: str) -> datasketches.kll_floats_sketch:
    if len(text) > MAX_KLL_B64_CHARS:
        raise _kll_error(f"longer than {MAX_KLL_B64_CHARS} base64 characters")
    try:
        raw = binascii.a2b_base64(text, strict_mode=True)
    except (binascii.Error, ValueError) as e:
        raise _kll_error(f"bad base64 ({e})") from e
    _check_kll_bytes(raw)
    try:
        return datasketches.kll_floats_sketch.deserialize(raw)
    except (RuntimeError, ValueError) as e:  # the C++ side's own checks
        raise _kll_error(str(e)) from e


def encode_kll(sketch: datasketches.kll_floats_sketch) -> str:
    """Base64 text of a KLL sketch's DataSketches serialization."""
    return base64.b64encode(sketch.serialize()).decode("ascii")


# --------------------------------------------------------------------------- messages


class _Wire(BaseModel):
    # strict: no "5" -> 5 or 5.0 -> 5 or True -> 1; NaN/inf rejected everywhere.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


class FeatureSketch(_Wire):
    """One monitored feature's share of a window (positional: reference order)."""

    counts: list[int] = Field(max_length=MAX_BINS, description="Histogram or category counts.")
    missing: int = Field(0, ge=0, le=MAX_ROWS, description="NaN values (not binned).")
    out_of_range: int = Field(0, ge=0, le=MAX_ROWS, description="Outside schema, inf, unknown.")
    kll: str | None = Field(
        None, max_length=MAX_KLL_B64_CHARS, description="Base64 KLL sketch of finite values."
    )
    kll_since: float | None = Field(None, description="Start of the span the KLL covers.")

    @field_validator("counts")
    @classmethod
    def _counts(cls, v: list[int]) -> list[int]:
        if not v:
            raise ValueError("counts must not be empty")
        if any(c < 0 or c > MAX_ROWS for c in v):
            raise ValueError(f"counts must be integers in [0, {MAX_ROWS}]")
        return v

    @field_validator("kll")
    @classmethod
    def _kll(cls, v: str | None) -> str | None:
        if v is not None:
            _decode_kll(v)
        return v

    @model_validator(mode="after")
    def _kll_pair(self) -> FeatureSketch:
        if (self.kll is None) != (self.kll_since is None):
            raise ValueError("kll and kll_since go together")
        return self


class PredictionSketch(_Wire):
    """Predicted classes (one count per reference class, plus ``unknown``) or a histogram."""

    counts: list[int] = Field(max_length=100_001)
    missing: int = Field(0, ge=0, le=MAX_ROWS, description="Rows whose prediction had NaN.")

    @field_validator("counts")
    @classmethod
    def _counts(cls, v: list[int]) -> list[int]:
        if not v:
            raise ValueError("counts must not be empty")
        if any(c < 0 or c > MAX_ROWS for c in v):
            raise ValueError(f"counts must be integers in [0, {MAX_ROWS}]")
        return v


class DriftSketch(_Wire):
    """One device's drift summary of one telemetry window; mergeable at the hub.

    ``features`` are positional, in ``Reference.features`` order. Invariants checked on
    construction (so also by :meth:`decode`): window bounds ordered; every feature's
    ``sum(counts) + missing == rows``; predictions cover at most ``rows`` rows;
    ``kll_since <= window_start``; KLL blobs structurally valid.
    """

    v: Literal[1] = Field(description="Sketch format version.")
    model: str = Field(pattern=_MODEL_REF, max_length=200, description="name:version.")
    window_start: float = Field(description="Window start, sender's clock, seconds.")
    window_end: float
    rows: int = Field(ge=0, le=MAX_ROWS, description="Input rows seen in the window.")
    batches: int = Field(0, ge=0, le=MAX_ROWS, description="update() calls in the window.")
    kll_k: int = Field(DEFAULT_KLL_K, ge=MIN_KLL_K, le=MAX_KLL_K)
    features: list[FeatureSketch] = Field(default_factory=list, max_length=4096)
    predictions: PredictionSketch | None = None
    latency_ms: list[int] | None = Field(
        None, description="Latency counts over LATENCY_EDGES_MS bins."
    )

    @model_validator(mode="after")
    def _consistent(self) -> DriftSketch:
        if self.window_end < self.window_start:
            raise ValueError("window_end before window_start")
        for i, f in enumerate(self.features):
            if sum(f.counts) + f.missing != self.rows:
                raise PydanticCustomError(
                    "sketch_shape", "feature {i}: counts + missing != rows", {"i": i}
                )
            if f.out_of_range > self.rows - f.missing:
                raise ValueError(f"feature {i}: out_of_range exceeds non-missing rows")
            if f.kll_since is not None and f.kll_since > self.window_start:
                raise ValueError(f"feature {i}: kll_since after window_start")
        if self.predictions is not None:
            p = self.predictions
            if sum(p.counts) + p.missing > self.rows:
                raise PydanticCustomError("sketch_shape", "predictions exceed rows", {})
        if self.latency_ms is not None:
            if len(self.latency_ms) != len(LATENCY_EDGES_MS) - 1:
                raise PydanticCustomError("sketch_shape", "latency_ms has the wrong length", {})
            if any(c < 0 or c > MAX_ROWS for c in self.latency_ms):
                raise ValueError("latency counts must be integers in [0, 2**40]")
        return self

    def encode(self) -> bytes:
        """Compact JSON bytes (fields at their default value are left out)."""
        return self.model_dump_json(exclude_defaults=True).encode()

    @classmethod
    def decode(cls, data: bytes, *, limit: int = MAX_SKETCH_BYTES) -> DriftSketch:
        """Parse and validate one sketch received from a device.

        Raises:
            PayloadError: ``kind`` is ``oversized`` (more than ``limit`` bytes),
                ``not_json``, ``version`` (missing or unknown ``v``), ``shape``
                (totals or lengths inconsistent), ``sketch`` (bad KLL blob) or
                ``schema`` (anything else: types, negative counts, NaN, inf, ...).
        """
        if len(data) > limit:
            raise PayloadError(f"DriftSketch: {len(data)} bytes exceeds {limit}", "oversized")
        try:
            obj = json.loads(data, parse_constant=_reject_constant)
        except _NonFinite as e:
            raise PayloadError(f"DriftSketch: {e}", "schema") from e
        except (ValueError, RecursionError) as e:  # JSONDecodeError, bad UTF-8, huge ints
            raise PayloadError(f"DriftSketch: not valid JSON ({e})", "not_json") from e
        if not isinstance(obj, dict):
            raise PayloadError("DriftSketch: payload must be a JSON object", "schema")
        if obj.get("v") != SKETCH_VERSION or isinstance(obj.get("v"), bool):
            raise PayloadError(f"DriftSketch: unknown version {obj.get('v')!r}", "version")
        try:
            return cls.model_validate(obj)
        except ValidationError as e:
            raise _payload_error(e) from e


class _NonFinite(ValueError):
    pass


def _reject_constant(name: str) -> Any:
    raise _NonFinite(f"{name} is not allowed")


def _payload_error(e: ValidationError) -> PayloadError:
    kinds = {"bad_sketch": "sketch", "sketch_shape": "shape"}
    return PayloadError(f"DriftSketch: {first_error(e)}", kinds.get(e.errors()[0]["type"], "schema"))


# --------------------------------------------------------------------------- accumulator


@dataclass
class _Layout:
    """Reference-derived arrays used to bin a whole buffer at once."""

    n_features: int
    numeric: np.ndarray  # indices of numeric features
    categorical: np.ndarray  # indices of categorical features
    n_bins: np.ndarray  # bins per feature (categorical: categories + unknown)
    offsets: np.ndarray  # start of each feature's bins in the flat count vector
    inner: np.ndarray  # (numeric, max_inner) interior edges, padded with +inf
    low: np.ndarray  # (features,) schema bounds, NaN where none
    high: np.ndarray


def _layout(ref: Reference) -> _Layout:
    n = len(ref.features)
    n_bins = np.zeros(n, dtype=np.int64)
    numeric = [i for i, f in enumerate(ref.features) if f.kind == "numeric"]
    categorical = [i for i, f in enumerate(ref.features) if f.kind == "categorical"]
    max_inner = 0
    for i, f in enumerate(ref.features):
        if f.kind == "numeric":
            if len(f.edges) < 2 or np.any(np.diff(f.edges) <= 0):
                raise ValueError(f"reference feature {f.name!r}: edges must increase (>= 2)")
            n_bins[i] = len(f.edges) - 1
            max_inner = max(max_inner, len(f.edges) - 2)
        else:
            n_bins[i] = len(f.categories) + 1
    inner = np.full((len(numeric), max(max_inner, 1)), np.inf)
    for r, i in enumerate(numeric):
        e = ref.features[i].edges[1:-1]
        inner[r, : len(e)] = e
    offsets = np.concatenate([[0], np.cumsum(n_bins)[:-1]]).astype(np.int64)
    low = np.array([np.nan if f.low is None else f.low for f in ref.features], dtype=np.float64)
    high = np.array([np.nan if f.high is None else f.high for f in ref.features], dtype=np.float64)
    return _Layout(
        n, np.array(numeric, dtype=np.int64), np.array(categorical, dtype=np.int64),
        n_bins, offsets, inner, low, high,
    )


class SketchAccumulator:
    """Accumulates drift sketches for one model on one device. Thread-safe.

    ``update`` is called per inference batch on the hot path and only copies the batch;
    ``snapshot_and_reset`` is called once per telemetry interval.

    Raises (constructor):
        ValueError: ``kll_k`` outside [8, 1024], a bad ``model_ref``, or reference
            numeric edges that do not increase.
    """

    def __init__(
        self,
        reference: Reference,
        model_ref: str,
        kll_k: int = DEFAULT_KLL_K,
        *,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        flush_rows: int = _DEFAULT_FLUSH_ROWS,
        start: float | None = None,
    ) -> None:
        if not MIN_KLL_K <= kll_k <= MAX_KLL_K:
            raise ValueError(f"kll_k must be in [{MIN_KLL_K}, {MAX_KLL_K}], got {kll_k}")
        if not re.fullmatch(_MODEL_REF, model_ref):
            raise ValueError(f"model_ref {model_ref!r} is not name:version")
        self._ref = reference
        self._model = model_ref
        self._k = kll_k
        self._budget = max_message_bytes
        self._flush_rows = max(1, flush_rows)
        self._lay = _layout(reference)
        pred = reference.predictions
        self._pred_kind: str | None = pred.kind if pred is not None else None
        if pred is not None and pred.kind == "numeric":
            if len(pred.edges) < 2:
                raise ValueError("numeric prediction reference needs >= 2 edges")
            self._pred_edges = np.asarray(pred.edges, dtype=np.float64)
            self._pred_bins = len(pred.edges) - 1
        else:
            self._pred_edges = np.zeros(0)
            self._pred_bins = len(pred.classes) + 1 if pred is not None else 0
        self._lat_edges = np.asarray(LATENCY_EDGES_MS, dtype=np.float64)
        self._lock = threading.Lock()
        # KLL state outlives windows (round-robin emission): per numeric feature.
        self._kll = {int(i): datasketches.kll_floats_sketch(kll_k) for i in self._lay.numeric}
        self._kll_since: dict[int, float] = {}
        self._cursor = 0
        # buffered batches (copies), processed together by _flush
        self._xs: list[np.ndarray] = []
        self._ps: list[np.ndarray | None] = []
        self._fill = 0
        self._bytes = 0
        self._lat: list[float] = []
        self.rejected_batches = 0  # update_many batches whose predictions had other row counts
        self._reset_window(time.time() if start is None else start)

    # ---- window state

    def _reset_window(self, start: float) -> None:
        self._start = start
        self._rows = 0
        self._batches = 0
        self._counts = np.zeros(int(self._lay.n_bins.sum()), dtype=np.int64)
        self._missing = np.zeros(self._lay.n_features, dtype=np.int64)
        self._oor = np.zeros(self._lay.n_features, dtype=np.int64)
        self._pcounts = np.zeros(self._pred_bins, dtype=np.int64)
        self._pmissing = 0
        self._lat_counts = np.zeros(len(LATENCY_EDGES_MS) - 1, dtype=np.int64)
        self._lat_seen = False

    # ---- hot path

    @property
    def model(self) -> str:
        """The ``name:version`` these sketches describe."""
        return self._model

    def update(self, x_batch: np.ndarray, predictions: np.ndarray | None = None) -> None:
        """Record one inference batch (first axis = rows) and, optionally, its outputs.

        ``predictions`` for a class reference: class indices ``(rows,)`` or scores
        ``(rows, classes)`` (argmax is taken); for a numeric reference: ``(rows,)`` or
        ``(rows, 1)``. Both are copied; the work is deferred to a vectorised flush every
        ``flush_rows`` rows (or 4 MiB of buffered input).

        Raises:
            ValueError: ``predictions`` has a different number of rows than ``x_batch``.
        """
        if predictions is not None and len(predictions) != len(x_batch):
            raise ValueError("predictions and x_batch have different row counts")
        with self._lock:
            self._buffer(x_batch.copy(), None if predictions is None else predictions.copy(), len(x_batch))

    def _buffer(self, x: np.ndarray, p: np.ndarray | None, rows: int) -> None:
        """Buffer one batch, flushing at ``flush_rows`` rows or the byte bound (lock held)."""
        self._xs.append(x)
        self._ps.append(p)
        self._fill += rows
        self._bytes += x.nbytes
        if self._fill >= self._flush_rows or self._bytes >= _MAX_BUFFER_BYTES:
            self._flush()

    def update_many(self, xs: Sequence[np.ndarray], ps: Sequence[np.ndarray | None]) -> None:
        """:meth:`update` for many batches at once (``xs[k]`` with predictions ``ps[k]``),
        taking the arrays over instead of copying them: the caller must not change them
        afterwards (the agent's observers thread hands over its private copies).

        Predictions with another row count than their batch are dropped (the batch
        itself is still sketched) and counted in :attr:`rejected_batches`. Beyond a
        length check per batch, no per-batch Python work unless the buffer would pass
        its byte bound, in which case it is flushed as often as :meth:`update` would.
        """
        rows = list(map(len, xs))
        rejected = 0
        if any(p is not None and len(p) != r for p, r in zip(ps, rows, strict=True)):
            kept = [p if p is None or len(p) == r else None for p, r in zip(ps, rows, strict=True)]
            rejected = sum(1 for p, k in zip(ps, kept, strict=True) if p is not None and k is None)
            ps = kept
            if not self.rejected_batches:
                log.warning("%s: predictions with another row count than their inputs are not "
                            "sketched (counted in rejected_batches)", self._model)
        nbytes = sum(x.nbytes for x in xs)
        with self._lock:
            self.rejected_batches += rejected
            if self._bytes + nbytes < _MAX_BUFFER_BYTES:
                self._xs.extend(xs)
                self._ps.extend(ps)
                self._fill += sum(rows)
                self._bytes += nbytes
                if self._fill >= self._flush_rows:
                    self._flush()
                return
            for x, p, r in zip(xs, ps, rows, strict=True):  # large inputs: keep the bound
                self._buffer(x, p, r)

    def observe_latency(self, ms: float | np.ndarray) -> None:
        """Record one or more inference latencies in milliseconds (NaN/negative ignored)."""
        with self._lock:
            if isinstance(ms, np.ndarray):
                self._lat.extend(ms.ravel().tolist())
            else:
                self._lat.append(float(ms))
            self._lat_seen = True
            if len(self._lat) >= 4096:
                self._flush_latency()

    # ---- buffered work

    def _flush(self) -> None:
        xs, ps = self._xs, self._ps
        if not xs:
            return
        self._xs, self._ps = [], []
        self._fill = self._bytes = 0
        self._batches += len(xs)
        # Consecutive batches of one row shape are processed together.
        i = 0
        while i < len(xs):
            j = i + 1
            while j < len(xs) and xs[j].shape[1:] == xs[i].shape[1:]:
                j += 1
            x = xs[i] if j == i + 1 else np.concatenate(xs[i:j])
            self._process(x, self._gather(xs[i:j], ps[i:j]))
            i = j

    @staticmethod
    def _gather(xs: list[np.ndarray], ps: list[np.ndarray | None]) -> np.ndarray | None:
        """Predictions of the rows that have them, or None; shapes must agree."""
        have = [p for p in ps if p is not None]
        if not have:
            return None
        if len(have) == 1:
            return have[0]
        try:  # the usual case: every batch has the same trailing shape
            joined = np.concatenate(have)
            return joined.reshape(len(joined), -1)
        except ValueError:
            return np.concatenate([np.asarray(p, dtype=np.float64).reshape(len(p), -1) for p in have])

    def _process(self, x: np.ndarray, p: np.ndarray | None) -> None:
        lay = self._lay
        feats = summary_features(x, self._ref.summary)
        if feats.shape[1] != lay.n_features:
            raise ValueError(
                f"inputs give {feats.shape[1]} features, the reference has {lay.n_features}"
            )
        rows = feats.shape[0]
        nan = np.isnan(feats)
        idx = np.zeros(feats.shape, dtype=np.int64)
        if lay.numeric.size:
            num = feats[:, lay.numeric]
            # bin index = number of interior edges <= value (the agent.features rule)
            if num.size * lay.inner.shape[1] <= 1 << 20:
                b = (num[:, :, None] >= lay.inner[None, :, :]).sum(axis=2)
            else:  # big batch: per-feature search, without the (rows, features, edges) cube
                b = np.empty(num.shape, dtype=np.int64)
                for r in range(num.shape[1]):
                    b[:, r] = np.searchsorted(lay.inner[r], num[:, r], side="right")
            np.minimum(b, lay.n_bins[lay.numeric] - 1, out=b)
            idx[:, lay.numeric] = b
            with np.errstate(invalid="ignore"):
                oor = np.isinf(num) | (num < lay.low[lay.numeric]) | (num > lay.high[lay.numeric])
            self._oor[lay.numeric] += oor.sum(axis=0)
            finite = np.isfinite(num)
            cols = np.ascontiguousarray(num.T, dtype=np.float32)
            all_finite = bool(finite.all())
            for r, i in enumerate(lay.numeric.tolist()):
                col = cols[r] if all_finite else cols[r][finite[:, r]]
                if col.size:
                    self._kll[i].update(col)
                    self._kll_since.setdefault(i, self._start)
        if lay.categorical.size:
            cat = feats[:, lay.categorical]
            n_cat = lay.n_bins[lay.categorical] - 1
            with np.errstate(invalid="ignore"):
                known = (cat >= 0) & (cat < n_cat) & (np.floor(cat) == cat)
            code = np.where(known, cat, n_cat).astype(np.int64)
            idx[:, lay.categorical] = code
            self._oor[lay.categorical] += (~known & ~np.isnan(cat)).sum(axis=0)
        flat = (idx + lay.offsets)[~nan]
        self._counts += np.bincount(flat, minlength=self._counts.size)
        self._missing += nan.sum(axis=0)
        self._rows += rows
        if p is not None and self._pred_kind is not None and p.shape[0]:
            self._predictions(p)

    def _predictions(self, p: np.ndarray) -> None:
        p = np.asarray(p, dtype=np.float64)
        if p.ndim == 1:
            p2 = p[:, None]
        else:
            p2 = p.reshape(p.shape[0], -1)
        bad = np.isnan(p2).any(axis=1)
        self._pmissing += int(bad.sum())
        good = p2[~bad]
        if self._pred_kind == "class":
            k = self._pred_bins - 1
            if good.shape[1] == 1:
                v = good[:, 0]
                known = (v >= 0) & (v < k) & (np.floor(v) == v)
                cls = np.where(known, v, k).astype(np.int64)
            else:
                cls = good.argmax(axis=1)
                cls = np.where(cls < k, cls, k)
            self._pcounts += np.bincount(cls, minlength=self._pred_bins)
        else:
            if good.shape[1] != 1:
                raise ValueError("numeric predictions must be one value per row")
            v = good[:, 0]
            b = np.searchsorted(self._pred_edges, v, side="right") - 1
            b = np.clip(b, 0, self._pred_bins - 1)
            self._pcounts += np.bincount(b, minlength=self._pred_bins)

    def _flush_latency(self) -> None:
        if not self._lat:
            return
        v = np.asarray(self._lat, dtype=np.float64)
        self._lat.clear()
        v = v[np.isfinite(v) & (v >= 0)]
        b = np.searchsorted(self._lat_edges, v, side="right") - 1
        b = np.clip(b, 0, len(self._lat_counts) - 1)
        self._lat_counts += np.bincount(b, minlength=len(self._lat_counts))

    # ---- interval

    def snapshot_and_reset(self, now: float) -> DriftSketch:
        """Close the window at ``now``: return its :class:`DriftSketch` and start a new one.

        Histograms and counters for every feature are always included. KLL sketches are
        added round-robin while the encoded message stays within ``max_message_bytes``
        (see the module docstring); the ones left out keep accumulating.
        """
        with self._lock:
            self._flush()
            self._flush_latency()
            lay = self._lay
            end = max(now, self._start)
            feats: list[dict[str, Any]] = []
            for i in range(lay.n_features):
                o = int(lay.offsets[i])
                feat: dict[str, Any] = {"counts": self._counts[o : o + int(lay.n_bins[i])].tolist()}
                # Zero counters are left out, as DriftSketch.encode() leaves out defaults,
                # so that _compact(msg) measures what will be sent.
                if self._missing[i]:
                    feat["missing"] = int(self._missing[i])
                if self._oor[i]:
                    feat["out_of_range"] = int(self._oor[i])
                feats.append(feat)
            msg: dict[str, Any] = {
                "v": SKETCH_VERSION,
                "model": self._model,
                "window_start": float(self._start),
                "window_end": float(end),
                "rows": int(self._rows),
                "batches": int(self._batches),
                "kll_k": self._k,
                "features": feats,
            }
            if self._k == DEFAULT_KLL_K:
                del msg["kll_k"]
            if self._pred_kind is not None:
                msg["predictions"] = {
                    "counts": self._pcounts.tolist(),
                    "missing": int(self._pmissing),
                }
            if self._lat_seen:
                msg["latency_ms"] = self._lat_counts.tolist()
            emitted = self._add_klls(feats, len(_compact(msg)))
            sketch = DriftSketch.model_validate(msg)
            while emitted and len(sketch.encode()) > self._budget:
                # The estimate disagreed with pydantic's float formatting: give back
                # the last blob; it goes first next time.
                last = emitted.pop()
                feats[last].pop("kll")
                feats[last].pop("kll_since")
                self._cursor = list(self._lay.numeric).index(last)
                sketch = DriftSketch.model_validate(msg)
            for i in emitted:
                self._kll[i] = datasketches.kll_floats_sketch(self._k)
                self._kll_since.pop(i, None)
            self._reset_window(end)
            return sketch

    def _add_klls(self, feats: list[dict[str, Any]], size: int) -> list[int]:
        """Attach pending KLL blobs round-robin while the message fits the budget."""
        order = [int(i) for i in self._lay.numeric]
        if not order:
            return []
        start = self._cursor % len(order)
        emitted: list[int] = []
        for step in range(len(order)):
            i = order[(start + step) % len(order)]
            sk = self._kll[i]
            if sk.is_empty():
                continue
            blob = encode_kll(sk)
            since = self._kll_since.get(i, self._start)
            # adding the two keys to an existing object: +1 comma, -2 braces
            extra = len(_compact({"kll": blob, "kll_since": float(since)})) - 1
            if size + extra > self._budget:
                self._cursor = (start + step) % len(order)
                return emitted
            feats[i]["kll"] = blob
            feats[i]["kll_since"] = float(since)
            size += extra
            emitted.append(i)
        self._cursor = 0
        return emitted


def _compact(obj: Any) -> bytes:
    # Same byte count as pydantic's compact JSON for these plain values.
    return json.dumps(obj, separators=(",", ":"), allow_nan=False).encode()
