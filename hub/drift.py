"""Fleet drift and performance statistics from device sketches. Pure: no IO, no DB.

Devices send :class:`agent.sketch.DriftSketch` messages (one per telemetry window).
This module merges them, in any grouping the caller chooses (device, cohort, model
version, time window; see :func:`merge_by`), and computes per-feature drift against
the bundle's reference or between two cohorts (canary against control), plus
classification metrics from labelled feedback.

Statistics
----------
All histogram statistics use the reference's fixed bin edges, which every device
shares, so merged histograms are exactly the histograms of the pooled raw data and
every histogram statistic computed from them is exact too.

``psi``
    Population stability index, ``sum((q - p) * ln(q / p))`` over bins, with additive
    smoothing of the *proportions*: ``p' = (p + eps) / (1 + K * eps)`` (``eps`` =
    1e-4 by default), so empty bins give a large but finite contribution and the
    smoothed proportions still sum to one.
``js``
    Jensen-Shannon *distance* (square root of the divergence), base 2, in [0, 1].
``chi2_p``
    p-value of the chi-square test of homogeneity on the 2 x K table
    (reference counts, current counts), bins empty in both dropped
    (``scipy.stats.chi2_contingency`` without continuity correction).
``ks`` against the reference
    The reference holds only a histogram, so KS is taken at the bin edges:
    ``max_i |F_ref(e_i) - F_cur(e_i)|`` ("binned"). It is exact for the histograms
    and a lower bound of the continuous KS statistic, below it by at most the
    largest bin probability (about 1/bins for quantile edges).
``ks`` between cohorts
    When both cohorts carry KLL sketches for the feature, :func:`ks_from_sketches`
    evaluates both sketch CDFs at every retained item of either sketch. Its error is
    at most the sum of the two sketches' rank errors: 99th-percentile bound
    ``2 * 2.296 / k**0.9723`` (0.027 at k = 200); measured within 0.01 of
    ``scipy.stats.ks_2samp`` on 100,000 samples split into 200 merged sketches per
    side (``tests/monitoring``). Otherwise the binned KS is used (``ks_method``).

Decision rule
-------------
A feature is ``alert`` when PSI >= ``psi_alert`` (default 0.25) *and* the chi-square
p-value is below ``p_value`` (default 0.01) *and* the current sample has at least
``min_rows`` rows (default 200); ``warn`` likewise with ``psi_warn`` (0.1); else ``ok``.

Why both: PSI is an effect size, but on a small window it is noisy and biased
upwards (its expectation under no change is about ``(K - 1) * (1/n_ref + 1/n_cur)``,
0.045 for 10 bins and 200 rows), so PSI alone raises false alerts on quiet devices.
The chi-square test controls that false-alert probability at ``p_value`` per feature
(and far lower jointly with PSI), but on large merged windows it flags shifts too
small to matter; PSI keeps those ``ok``. The pair holds the false-alert rate on
no-change windows under 1% (measured: 0 of 200 windows x 6 features in the tests).
Thresholds are overridable per model with :class:`DriftThresholds`.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal, TypeVar

import datasketches
import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator
from scipy import stats
from scipy.spatial.distance import jensenshannon

from agent.bundle import Reference
from agent.errors import PayloadError
from agent.sketch import LATENCY_EDGES_MS, DriftSketch, decode_kll

__all__ = [
    "DriftThresholds",
    "FeatureDrift",
    "FeatureAggregate",
    "PredictionAggregate",
    "MergedSketch",
    "SketchMerger",
    "merge",
    "group_by",
    "merge_by",
    "window_key",
    "psi",
    "js_distance",
    "chi2_pvalue",
    "ks_binned",
    "ks_from_sketches",
    "drift_report",
    "compare_cohorts",
    "histogram_quantile",
    "ClassificationMetrics",
    "classification_metrics",
    "metrics_from_confusion",
]

K = TypeVar("K", bound=Hashable)
T = TypeVar("T")
Status = Literal["ok", "warn", "alert"]


# --------------------------------------------------------------------------- merging


@dataclass
class FeatureAggregate:
    """One feature merged over many sketches."""

    counts: np.ndarray
    missing: int
    out_of_range: int
    kll: datasketches.kll_floats_sketch | None = None
    kll_since: float | None = None

    @property
    def rows(self) -> int:
        return int(self.counts.sum()) + self.missing


@dataclass
class PredictionAggregate:
    counts: np.ndarray
    missing: int


@dataclass
class MergedSketch:
    """Sums of many :class:`DriftSketch` messages with one layout.

    ``rejected`` counts sketches refused during the merge, by ``PayloadError.kind``.
    """

    models: dict[str, int]
    sketches: int
    window_start: float | None
    window_end: float | None
    rows: int
    features: list[FeatureAggregate]
    predictions: PredictionAggregate | None
    latency_ms: np.ndarray | None
    rejected: dict[str, int] = field(default_factory=dict)

    def latency_quantile(self, q: float) -> float | None:
        """Latency quantile (ms) interpolated in the merged latency histogram."""
        if self.latency_ms is None or self.latency_ms.sum() == 0:
            return None
        return histogram_quantile(LATENCY_EDGES_MS, self.latency_ms, q)


_Layout = tuple[tuple[int, ...], frozenset[int], int | None]


def _reference_layout(ref: Reference) -> _Layout:
    lengths = tuple(
        len(f.edges) - 1 if f.kind == "numeric" else len(f.categories) + 1 for f in ref.features
    )
    numeric = frozenset(i for i, f in enumerate(ref.features) if f.kind == "numeric")
    p = ref.predictions
    pred = None if p is None else (len(p.edges) - 1 if p.kind == "numeric" else len(p.classes) + 1)
    return lengths, numeric, pred


class SketchMerger:
    """Incremental, atomic merge of sketches of one layout.

    The layout (feature count, bins per feature, which features may carry KLL,
    prediction bins) comes from ``reference`` when given, else from the first sketch
    accepted. ``model``, when given, is the only ``name:version`` accepted.
    """

    def __init__(self, reference: Reference | None = None, *, model: str | None = None) -> None:
        self._layout: _Layout | None = _reference_layout(reference) if reference else None
        self._model = model
        self._models: Counter[str] = Counter()
        self._n = 0
        self._start: float | None = None
        self._end: float | None = None
        self._rows = 0
        self._counts: np.ndarray | None = None
        self._missing: np.ndarray | None = None
        self._oor: np.ndarray | None = None
        self._kll: dict[int, datasketches.kll_floats_sketch] = {}
        self._kll_since: dict[int, float] = {}
        self._pcounts: np.ndarray | None = None
        self._pmissing = 0
        self._lat: np.ndarray | None = None
        self.rejected: Counter[str] = Counter()

    def add(self, sketch: DriftSketch) -> None:
        """Merge one sketch, or leave the merge untouched and raise.

        Raises:
            PayloadError: ``unknown_model`` (not the expected model), ``shape``
                (layout differs from the reference or earlier sketches, or KLL on a
                categorical feature), ``sketch`` (a KLL blob that does not decode).
        """
        if self._model is not None and sketch.model != self._model:
            raise PayloadError(f"sketch for {sketch.model!r}, expected {self._model!r}", "unknown_model")
        lengths = tuple(len(f.counts) for f in sketch.features)
        pred = None if sketch.predictions is None else len(sketch.predictions.counts)
        kll_at = [i for i, f in enumerate(sketch.features) if f.kll is not None]
        layout = self._layout
        if layout is not None:
            want_lengths, numeric, want_pred = layout
            if lengths != want_lengths:
                raise PayloadError(
                    f"sketch has {len(lengths)} features / bins {list(lengths)[:8]}..., "
                    f"layout expects {len(want_lengths)}",
                    "shape",
                )
            if pred is not None and pred != want_pred:
                raise PayloadError(f"prediction bins {pred}, layout expects {want_pred}", "shape")
            if any(i not in numeric for i in kll_at):
                raise PayloadError("KLL sketch on a categorical feature", "shape")
        # Decode everything before touching state, so a failure leaves the merge intact.
        klls = {i: decode_kll(sketch.features[i].kll or "") for i in kll_at}
        flat = np.fromiter(
            (c for f in sketch.features for c in f.counts), dtype=np.int64, count=sum(lengths)
        )
        missing = np.fromiter((f.missing for f in sketch.features), np.int64, len(lengths))
        oor = np.fromiter((f.out_of_range for f in sketch.features), np.int64, len(lengths))
        pc = None if sketch.predictions is None else np.asarray(sketch.predictions.counts, np.int64)
        lat = None if sketch.latency_ms is None else np.asarray(sketch.latency_ms, np.int64)
        if layout is None:
            # First sketch defines the layout; KLL allowed wherever the first had none
            # of the categorical kind, i.e. any feature (no reference to say otherwise).
            self._layout = (lengths, frozenset(range(len(lengths))), pred)
        # ---- apply (no exceptions past this point)
        if self._counts is None:
            self._counts = flat
            self._missing = missing
            self._oor = oor
        else:
            self._counts += flat
            self._missing += missing  # type: ignore[operator]
            self._oor += oor  # type: ignore[operator]
        for i, sk in klls.items():
            since = sketch.features[i].kll_since
            if i in self._kll:
                self._kll[i].merge(sk)
            else:
                self._kll[i] = sk
            if since is not None:
                self._kll_since[i] = min(self._kll_since.get(i, since), since)
        if pc is not None:
            self._pcounts = pc if self._pcounts is None else self._pcounts + pc
            self._pmissing += sketch.predictions.missing  # type: ignore[union-attr]
        if lat is not None:
            self._lat = lat if self._lat is None else self._lat + lat
        self._rows += sketch.rows
        self._n += 1
        self._models[sketch.model] += 1
        self._start = sketch.window_start if self._start is None else min(self._start, sketch.window_start)
        self._end = sketch.window_end if self._end is None else max(self._end, sketch.window_end)

    def offer(self, sketch: DriftSketch) -> bool:
        """Like :meth:`add`, but count a rejection in ``rejected`` instead of raising."""
        try:
            self.add(sketch)
        except PayloadError as e:
            self.rejected[e.kind] += 1
            return False
        return True

    def result(self) -> MergedSketch:
        """The merge so far, as an independent :class:`MergedSketch` (copies state)."""
        feats: list[FeatureAggregate] = []
        if self._layout is not None and self._counts is not None:
            lengths = self._layout[0]
            off = 0
            for i, n in enumerate(lengths):
                kll = self._kll.get(i)
                feats.append(
                    FeatureAggregate(
                        counts=self._counts[off : off + n].copy(),
                        missing=int(self._missing[i]),  # type: ignore[index]
                        out_of_range=int(self._oor[i]),  # type: ignore[index]
                        kll=None if kll is None else datasketches.kll_floats_sketch.deserialize(kll.serialize()),
                        kll_since=self._kll_since.get(i),
                    )
                )
                off += n
        preds = None
        if self._pcounts is not None:
            preds = PredictionAggregate(self._pcounts.copy(), self._pmissing)
        return MergedSketch(
            models=dict(self._models),
            sketches=self._n,
            window_start=self._start,
            window_end=self._end,
            rows=self._rows,
            features=feats,
            predictions=preds,
            latency_ms=None if self._lat is None else self._lat.copy(),
            rejected=dict(self.rejected),
        )


def merge(
    sketches: Iterable[DriftSketch],
    *,
    reference: Reference | None = None,
    model: str | None = None,
    skip_invalid: bool = False,
) -> MergedSketch:
    """Merge sketches: histogram and counter sums, KLL merges, window span.

    With ``skip_invalid`` a bad sketch is left out and counted in
    ``MergedSketch.rejected``; the others still merge.

    Raises:
        PayloadError: (without ``skip_invalid``) the first sketch that does not fit;
            see :meth:`SketchMerger.add`.
    """
    m = SketchMerger(reference, model=model)
    for s in sketches:
        if skip_invalid:
            m.offer(s)
        else:
            m.add(s)
    return m.result()


def group_by(items: Iterable[T], key: Callable[[T], K]) -> dict[K, list[T]]:
    """Group ``items`` by ``key(item)``, keeping arrival order within each group."""
    out: dict[K, list[T]] = {}
    for it in items:
        out.setdefault(key(it), []).append(it)
    return out


def merge_by(
    items: Iterable[T],
    key: Callable[[T], K],
    sketch: Callable[[T], DriftSketch],
    *,
    reference: Reference | None = None,
    skip_invalid: bool = False,
) -> dict[K, MergedSketch]:
    """Merge per group: ``items`` are whatever the caller stores (for example
    ``(device_id, cohort, DriftSketch)`` rows); ``key`` picks the group (device,
    cohort, ``s.model``, :func:`window_key`, or a tuple of these) and ``sketch``
    extracts the sketch.

    Raises:
        PayloadError: as :func:`merge`.
    """
    mergers: dict[K, SketchMerger] = {}
    for it in items:
        k = key(it)
        m = mergers.get(k)
        if m is None:
            m = mergers[k] = SketchMerger(reference)
        if skip_invalid:
            m.offer(sketch(it))
        else:
            m.add(sketch(it))
    return {k: m.result() for k, m in mergers.items()}


def window_key(width_s: float, origin: float = 0.0) -> Callable[[DriftSketch], float]:
    """Key function: start of the ``width_s``-second bucket holding a sketch's window start.

    Raises:
        ValueError: ``width_s`` is not positive.
    """
    if not width_s > 0:
        raise ValueError("width_s must be positive")

    def key(s: DriftSketch) -> float:
        return origin + math.floor((s.window_start - origin) / width_s) * width_s

    return key


# --------------------------------------------------------------------------- statistics


def _as_counts(x: Sequence[float] | np.ndarray, name: str) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != 1 or a.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-D count vector")
    if not np.isfinite(a).all() or (a < 0).any():
        raise ValueError(f"{name} must be finite and non-negative")
    if a.sum() <= 0:
        raise ValueError(f"{name} must not be all zero")
    return a


def _pair(ref: Sequence[float] | np.ndarray, cur: Sequence[float] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    r, c = _as_counts(ref, "ref_counts"), _as_counts(cur, "cur_counts")
    if r.shape != c.shape:
        raise ValueError(f"count vectors differ in length ({r.size} != {c.size})")
    return r, c


def psi(
    ref_counts: Sequence[float] | np.ndarray,
    cur_counts: Sequence[float] | np.ndarray,
    eps: float = 1e-4,
) -> float:
    """Population stability index of ``cur_counts`` against ``ref_counts`` (same bins).

    Proportions are smoothed additively: ``p' = (p + eps) / (1 + K * eps)``.

    Raises:
        ValueError: lengths differ, a vector is empty, all zero, negative or non-finite,
            or ``eps`` is not positive.
    """
    if not eps > 0:
        raise ValueError("eps must be positive")
    r, c = _pair(ref_counts, cur_counts)
    k = r.size
    p = (r / r.sum() + eps) / (1.0 + k * eps)
    q = (c / c.sum() + eps) / (1.0 + k * eps)
    return float(np.sum((q - p) * np.log(q / p)))


def js_distance(ref_counts: Sequence[float] | np.ndarray, cur_counts: Sequence[float] | np.ndarray) -> float:
    """Jensen-Shannon distance (base 2, in [0, 1]) between two count vectors.

    Raises:
        ValueError: as :func:`psi`.
    """
    r, c = _pair(ref_counts, cur_counts)
    return float(jensenshannon(r / r.sum(), c / c.sum(), base=2))


def chi2_pvalue(ref_counts: Sequence[float] | np.ndarray, cur_counts: Sequence[float] | np.ndarray) -> float:
    """p-value of the chi-square homogeneity test of two count vectors (same bins).

    Bins empty in both are dropped; with fewer than two bins left the p-value is 1.

    Raises:
        ValueError: as :func:`psi`.
    """
    r, c = _pair(ref_counts, cur_counts)
    keep = (r + c) > 0
    if keep.sum() < 2:
        return 1.0
    res = stats.chi2_contingency(np.vstack([r[keep], c[keep]]), correction=False)
    return float(res.pvalue)


def ks_binned(ref_counts: Sequence[float] | np.ndarray, cur_counts: Sequence[float] | np.ndarray) -> float:
    """KS statistic restricted to the bin edges: ``max |F_ref(e) - F_cur(e)|``.

    Exact for the histograms; a lower bound of the continuous KS statistic.

    Raises:
        ValueError: as :func:`psi`.
    """
    r, c = _pair(ref_counts, cur_counts)
    return float(np.max(np.abs(np.cumsum(r) / r.sum() - np.cumsum(c) / c.sum())))


def ks_from_sketches(a: datasketches.kll_floats_sketch, b: datasketches.kll_floats_sketch) -> float:
    """Two-sample KS statistic estimated from two KLL sketches.

    Both sketch CDFs (``inclusive=True``, i.e. ``P(X <= x)``) are evaluated at every
    retained item of either sketch; both estimates are step functions that only jump
    there, so this is the exact supremum of the estimated CDF difference. Error: at
    most the sum of the two rank errors (see the module docstring).

    Raises:
        ValueError: either sketch is empty.
    """
    if a.is_empty() or b.is_empty():
        raise ValueError("KS needs two non-empty sketches")
    # Item values only: the binding's iterator weights are not reliable after merges.
    pts = np.union1d(
        np.fromiter((item for item, _ in a), np.float64), np.fromiter((item for item, _ in b), np.float64)
    )
    split = pts.tolist()
    fa = np.asarray(a.get_cdf(split, inclusive=True))[:-1]
    fb = np.asarray(b.get_cdf(split, inclusive=True))[:-1]
    return float(np.max(np.abs(fa - fb)))


def histogram_quantile(
    edges: Sequence[float], counts: Sequence[float] | np.ndarray, q: float
) -> float:
    """Quantile ``q`` of a histogram, interpolating linearly inside the bin.

    Raises:
        ValueError: ``q`` outside [0, 1], lengths inconsistent, or empty counts.
    """
    if not 0 <= q <= 1:
        raise ValueError("q must be in [0, 1]")
    c = _as_counts(counts, "counts")
    e = np.asarray(edges, dtype=np.float64)
    if e.size != c.size + 1:
        raise ValueError("need len(edges) == len(counts) + 1")
    cum = np.cumsum(c)
    target = q * cum[-1]
    i = int(np.searchsorted(cum, target, side="left"))
    i = min(i, c.size - 1)
    below = cum[i] - c[i]
    frac = 0.0 if c[i] == 0 else (target - below) / c[i]
    return float(e[i] + frac * (e[i + 1] - e[i]))


# --------------------------------------------------------------------------- reports


class DriftThresholds(BaseModel):
    """Per-model drift thresholds (see the module docstring for the decision rule)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    psi_warn: float = Field(0.1, gt=0, description="PSI at or above this may warn.")
    psi_alert: float = Field(0.25, gt=0, description="PSI at or above this may alert.")
    p_value: float = Field(
        0.01, gt=0, lt=1, description="Chi-square significance level required to warn or alert."
    )
    family_wise: bool = Field(
        True,
        description="Split p_value over the series of one report (Bonferroni), so it bounds "
        "the chance that a no-change window raises anything, whatever the feature count.",
    )
    min_rows: int = Field(200, ge=1, description="Fewer current rows than this: always ok.")
    psi_eps: float = Field(1e-4, gt=0, description="PSI proportion smoothing.")

    @model_validator(mode="after")
    def _ordered(self) -> DriftThresholds:
        if self.psi_warn > self.psi_alert:
            raise ValueError("psi_warn must not exceed psi_alert")
        return self


class FeatureDrift(BaseModel):
    """Drift of one feature (or of the predictions) in one comparison."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    feature: str
    role: Literal["input", "prediction"] = "input"
    kind: Literal["numeric", "categorical", "class"]
    rows: int = Field(description="Non-missing rows in the current (or canary) sample.")
    baseline_rows: float = Field(description="Rows in the reference (or control) sample.")
    psi: float | None = None
    ks: float | None = None
    ks_method: Literal["binned", "kll"] | None = None
    js: float | None = None
    chi2_p: float | None = None
    missing_rate: float = 0.0
    out_of_range_rate: float = 0.0
    status: Status = "ok"
    reason: str = ""


def _decide(psi_v: float, p: float, rows: int, alpha: float, th: DriftThresholds) -> tuple[Status, str]:
    if rows < th.min_rows:
        return "ok", f"fewer than {th.min_rows} rows"
    if p >= alpha:
        return "ok", ""
    if psi_v >= th.psi_alert:
        return "alert", f"psi {psi_v:.3f} >= {th.psi_alert} and chi2 p {p:.2g} < {alpha:.2g}"
    if psi_v >= th.psi_warn:
        return "warn", f"psi {psi_v:.3f} >= {th.psi_warn} and chi2 p {p:.2g} < {alpha:.2g}"
    return "ok", ""


def _alpha(th: DriftThresholds, series: int) -> float:
    return th.p_value / max(1, series) if th.family_wise else th.p_value


def _compare(
    name: str,
    role: Literal["input", "prediction"],
    kind: Literal["numeric", "categorical", "class"],
    base: np.ndarray,
    cur: np.ndarray,
    missing: int,
    oor: int,
    th: DriftThresholds,
    alpha: float,
    kll_pair: tuple[datasketches.kll_floats_sketch | None, datasketches.kll_floats_sketch | None] = (None, None),
) -> FeatureDrift:
    rows = int(cur.sum())
    total = rows + missing
    rates = {
        "missing_rate": missing / total if total else 0.0,
        "out_of_range_rate": oor / rows if rows else 0.0,
    }
    common = {"feature": name, "role": role, "kind": kind, "rows": rows, "baseline_rows": float(base.sum())}
    if rows == 0 or base.sum() <= 0:
        return FeatureDrift(**common, **rates, reason="no data")
    psi_v = psi(base, cur, th.psi_eps)
    p = chi2_pvalue(base, cur)
    ks_v: float | None = None
    method: Literal["binned", "kll"] | None = None
    ka, kb = kll_pair
    if kind == "numeric":
        if ka is not None and kb is not None and not ka.is_empty() and not kb.is_empty():
            ks_v, method = ks_from_sketches(ka, kb), "kll"
        else:
            ks_v, method = ks_binned(base, cur), "binned"
    status, reason = _decide(psi_v, p, rows, alpha, th)
    return FeatureDrift(
        **common, **rates, psi=psi_v, ks=ks_v, ks_method=method,
        js=js_distance(base, cur), chi2_p=p, status=status, reason=reason,
    )


def _check_layout(reference: Reference, merged: MergedSketch) -> None:
    lengths, _, pred = _reference_layout(reference)
    got = tuple(f.counts.size for f in merged.features)
    if merged.features and got != lengths:
        raise ValueError("merged sketch layout does not match the reference")
    if merged.predictions is not None and merged.predictions.counts.size != pred:
        raise ValueError("merged prediction bins do not match the reference")


def drift_report(
    reference: Reference, merged: MergedSketch, thresholds: DriftThresholds | None = None
) -> list[FeatureDrift]:
    """Per-feature drift of ``merged`` against the bundle ``reference``, then prediction drift.

    Categorical features and class predictions get an extra ``unknown`` bin with a
    reference count of zero, so a surge of unknown codes is drift.

    Raises:
        ValueError: ``merged`` was built with another layout than ``reference``.
    """
    th = thresholds or DriftThresholds()
    _check_layout(reference, merged)
    with_pred = reference.predictions is not None and merged.predictions is not None
    alpha = _alpha(th, len(reference.features) + with_pred)
    out: list[FeatureDrift] = []
    for fr, agg in zip(reference.features, merged.features, strict=False):
        base = np.asarray(fr.counts, dtype=np.float64)
        if fr.kind == "categorical":
            base = np.append(base, 0.0)
        out.append(
            _compare(fr.name, "input", fr.kind, base, agg.counts.astype(np.float64),
                     agg.missing, agg.out_of_range, th, alpha)
        )
    pr, mp = reference.predictions, merged.predictions
    if pr is not None and mp is not None:
        base = np.asarray(pr.counts, dtype=np.float64)
        if pr.kind == "class":
            base = np.append(base, 0.0)
        unknown = int(mp.counts[-1]) if pr.kind == "class" else 0
        out.append(
            _compare("prediction", "prediction", "class" if pr.kind == "class" else "numeric",
                     base, mp.counts.astype(np.float64), mp.missing, unknown, th, alpha)
        )
    return out


def compare_cohorts(
    control: MergedSketch,
    canary: MergedSketch,
    thresholds: DriftThresholds | None = None,
    *,
    reference: Reference | None = None,
) -> list[FeatureDrift]:
    """Drift of ``canary`` against ``control`` (same model layout), feature by feature,
    then predictions. Uses KLL KS where both cohorts carry sketches for a feature.
    ``reference`` only supplies names and kinds (else ``f0``, ``f1``, ... numeric).

    Raises:
        ValueError: the two merges have different layouts.
    """
    th = thresholds or DriftThresholds()
    a_len = [f.counts.size for f in control.features]
    if a_len != [f.counts.size for f in canary.features]:
        raise ValueError("cohorts have different feature layouts")
    pa, pb = control.predictions, canary.predictions
    alpha = _alpha(th, len(a_len) + (pa is not None and pb is not None))
    out: list[FeatureDrift] = []
    for i, (fa, fb) in enumerate(zip(control.features, canary.features, strict=True)):
        name, kind = f"f{i}", "numeric"
        if reference is not None and i < len(reference.features):
            name, kind = reference.features[i].name, reference.features[i].kind
        out.append(
            _compare(name, "input", kind, fa.counts.astype(np.float64), fb.counts.astype(np.float64),  # type: ignore[arg-type]
                     fb.missing, fb.out_of_range, th, alpha, (fa.kll, fb.kll))
        )
    if pa is not None and pb is not None:
        if pa.counts.size != pb.counts.size:
            raise ValueError("cohorts have different prediction layouts")
        kind_p: Literal["class", "numeric"] = "class"
        if reference is not None and reference.predictions is not None:
            kind_p = "class" if reference.predictions.kind == "class" else "numeric"
        out.append(
            _compare("prediction", "prediction", kind_p, pa.counts.astype(np.float64),
                     pb.counts.astype(np.float64), pb.missing, 0, th, alpha)
        )
    return out


# --------------------------------------------------------------------------- performance


class ClassificationMetrics(BaseModel):
    """Macro-averaged classification metrics for one window of labelled feedback."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    n: int
    labels: list[str | int]
    accuracy: float
    precision: float
    recall: float
    f1: float
    auc: float | None = Field(None, description="Macro one-vs-rest ROC AUC when scores are given.")


def _confusion(y_true: np.ndarray, y_pred: np.ndarray, labels: np.ndarray) -> np.ndarray:
    t = np.searchsorted(labels, y_true)
    p = np.searchsorted(labels, y_pred)
    k = labels.size
    return np.bincount(t * k + p, minlength=k * k).reshape(k, k)


def metrics_from_confusion(cm: np.ndarray) -> tuple[float, float, float, float]:
    """``(accuracy, precision, recall, f1)``, macro-averaged, from a confusion matrix
    (rows = true, columns = predicted). Mergeable: sum the matrices of several windows
    first. A class with no predicted (or no true) rows scores 0, as scikit-learn's
    ``zero_division=0``.

    Raises:
        ValueError: not a square, non-empty, non-negative matrix.
    """
    cm = np.asarray(cm, dtype=np.float64)
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1] or cm.size == 0 or (cm < 0).any():
        raise ValueError("confusion matrix must be square, non-empty and non-negative")
    tp = np.diag(cm)
    pred = cm.sum(axis=0)
    true = cm.sum(axis=1)
    total = cm.sum()
    with np.errstate(divide="ignore", invalid="ignore"):
        prec = np.where(pred > 0, tp / pred, 0.0)
        rec = np.where(true > 0, tp / true, 0.0)
        f1 = np.where(pred + true > 0, 2 * tp / (pred + true), 0.0)
    acc = float(tp.sum() / total) if total else 0.0
    return acc, float(prec.mean()), float(rec.mean()), float(f1.mean())


def _binary_auc(pos: np.ndarray, score: np.ndarray) -> float:
    ranks = stats.rankdata(score)
    n_pos = int(pos.sum())
    n_neg = pos.size - n_pos
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def classification_metrics(
    y_true: Sequence[int | str] | np.ndarray,
    y_pred: Sequence[int | str] | np.ndarray,
    y_score: np.ndarray | None = None,
) -> ClassificationMetrics:
    """Accuracy and macro precision, recall, F1 (and AUC) as scikit-learn computes them.

    Labels are the sorted union of ``y_true`` and ``y_pred``. ``y_score``: for two
    classes in ``y_true``, the score of the greater label, shape ``(n,)`` or ``(n, 2)``
    (column 1 is used); for more, ``(n, C)`` with one column per class of ``y_true``
    in sorted order (one-vs-rest, macro). AUC is ``None`` when ``y_true`` holds a
    single class.

    Raises:
        ValueError: empty input, lengths differ, or ``y_score`` has the wrong shape.
    """
    t = np.asarray(y_true)
    p = np.asarray(y_pred)
    if t.ndim != 1 or t.shape != p.shape or t.size == 0:
        raise ValueError("y_true and y_pred must be non-empty 1-D arrays of the same length")
    labels = np.union1d(t, p)
    acc, prec, rec, f1 = metrics_from_confusion(_confusion(t, p, labels))
    auc: float | None = None
    if y_score is not None:
        s = np.asarray(y_score, dtype=np.float64)
        if s.shape[0] != t.size or not np.isfinite(s).all():
            raise ValueError("y_score must have one finite row per sample")
        classes = np.unique(t)
        if classes.size == 2:
            col = s if s.ndim == 1 else s[:, -1]
            if s.ndim == 2 and s.shape[1] != 2:
                raise ValueError("binary y_score must be (n,) or (n, 2)")
            auc = _binary_auc(t == classes[1], col)
        elif classes.size > 2:
            if s.ndim != 2 or s.shape[1] != classes.size:
                raise ValueError(f"y_score must be (n, {classes.size}) for {classes.size} classes")
            auc = float(np.mean([_binary_auc(t == c, s[:, j]) for j, c in enumerate(classes)]))
    return ClassificationMetrics(
        n=int(t.size),
        labels=[x.item() if hasattr(x, "item") else x for x in labels],
        accuracy=acc, precision=prec, recall=rec, f1=f1, auc=auc,
    )
