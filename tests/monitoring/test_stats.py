"""Statistics: exactness of merged histograms, KLL KS accuracy, metrics vs scikit-learn."""

from __future__ import annotations

import datasketches
import numpy as np
import pytest
from scipy.stats import ks_2samp
from sklearn import metrics as skm

from agent.bundle import Reference
from agent.features import bin_counts
from agent.sketch import DriftSketch, SketchAccumulator, decode_kll, encode_kll
from hub.drift import (
    chi2_pvalue,
    classification_metrics,
    histogram_quantile,
    js_distance,
    ks_binned,
    ks_from_sketches,
    merge,
    merge_by,
    psi,
    window_key,
)

from .conftest import mixed_rows


def test_psi_from_merged_devices_equals_pooled(reference: Reference, rng: np.random.Generator) -> None:
    sketches: list[DriftSketch] = []
    pooled = []
    for device in range(20):
        acc = SketchAccumulator(reference, "m:1.0.0", start=0.0)
        for w in range(3):
            x = mixed_rows(rng, int(rng.integers(50, 400)), shift=0.3 * (device % 3))
            pooled.append(x)
            for i in range(0, len(x), 7):
                acc.update(x[i : i + 7])
            sketches.append(acc.snapshot_and_reset(60.0 * (w + 1)))
    raw = np.concatenate(pooled)
    merged = merge(sketches, reference=reference)
    assert merged.rows == len(raw) and merged.sketches == 60
    for j, fr in enumerate(reference.features[:5]):
        edges = np.asarray(fr.edges)
        pooled_counts = bin_counts(raw[:, j], edges)
        assert np.array_equal(merged.features[j].counts, pooled_counts)
        assert abs(psi(fr.counts, merged.features[j].counts) - psi(fr.counts, pooled_counts)) <= 1e-9
    # grouping: per-window merges add up to the whole
    by_window = merge_by(sketches, window_key(60.0), lambda s: s, reference=reference)
    assert sorted(by_window) == [0.0, 60.0, 120.0]
    assert sum(m.rows for m in by_window.values()) == merged.rows


def _sketch_in_parts(x: np.ndarray, parts: int, k: int = 200) -> datasketches.kll_floats_sketch:
    out = datasketches.kll_floats_sketch(k)
    for p in np.array_split(x, parts):
        s = datasketches.kll_floats_sketch(k)
        s.update(p.astype(np.float32))
        out.merge(decode_kll(encode_kll(s)))  # through the wire format, as at the hub
    return out


@pytest.mark.parametrize("shift,scale", [(0.0, 1.0), (0.05, 1.0), (0.3, 1.0), (0.0, 1.5)])
def test_ks_from_kll_within_002_of_exact(shift: float, scale: float) -> None:
    rng = np.random.default_rng(7)
    a = rng.normal(size=100_000)
    b = rng.normal(shift, scale, size=100_000)
    exact = ks_2samp(a.astype(np.float32), b.astype(np.float32)).statistic
    est = ks_from_sketches(_sketch_in_parts(a, 20), _sketch_in_parts(b, 20))
    assert abs(est - exact) <= 0.02, (est, exact)


def test_statistics_basics() -> None:
    r = np.array([10.0, 20, 30, 40])
    assert psi(r, r * 3) == pytest.approx(0.0, abs=1e-12)
    assert js_distance(r, r) == pytest.approx(0.0, abs=1e-7)
    assert chi2_pvalue(r * 100, r * 100) == pytest.approx(1.0)
    assert psi(r, [40, 30, 20, 10]) > 0.25
    assert 0 < js_distance([1, 0], [0, 1]) <= 1.0
    assert ks_binned([1, 1, 1, 1], [4, 0, 0, 0]) == pytest.approx(0.75)
    assert np.isfinite(psi([0, 10], [10, 0]))
    for bad in ([1, 2], [-1, 2, 3], [np.nan, 1, 1], [0, 0, 0]):
        with pytest.raises(ValueError):
            psi([1, 2, 3], bad)
    assert histogram_quantile([0, 1, 2], [5, 5], 0.5) == pytest.approx(1.0)
    assert histogram_quantile([0, 1, 2], [0, 10], 0.25) == pytest.approx(1.25)


@pytest.mark.parametrize("classes", [2, 3, 7])
def test_metrics_match_sklearn(classes: int) -> None:
    rng = np.random.default_rng(classes)
    n = 3000
    y = rng.integers(0, classes, n)
    logits = rng.normal(size=(n, classes)) + 1.5 * np.eye(classes)[y]
    score = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    score = np.round(score, 2)  # ties, as real scores have
    score /= score.sum(1, keepdims=True)
    pred = score.argmax(1)
    pred[:5] = classes  # a label never true: part of the label set, as in sklearn
    m = classification_metrics(y, pred, score if classes > 2 else score[:, 1])
    assert m.accuracy == pytest.approx(skm.accuracy_score(y, pred), abs=1e-12)
    for ours, avg in ((m.precision, skm.precision_score), (m.recall, skm.recall_score), (m.f1, skm.f1_score)):
        assert ours == pytest.approx(avg(y, pred, average="macro", zero_division=0), abs=1e-12)
    want_auc = (skm.roc_auc_score(y, score[:, 1]) if classes == 2
                else skm.roc_auc_score(y, score, multi_class="ovr", average="macro"))
    assert m.auc == pytest.approx(want_auc, abs=1e-12)


def test_metrics_string_labels_and_single_class() -> None:
    y = np.array(["cat", "dog", "dog", "cat", "eel"])
    p = np.array(["cat", "dog", "cat", "cat", "dog"])
    m = classification_metrics(y, p)
    assert m.labels == ["cat", "dog", "eel"]
    assert m.f1 == pytest.approx(skm.f1_score(y, p, average="macro", zero_division=0))
    assert classification_metrics([1, 1], [1, 0], np.array([0.2, 0.9])).auc is None
