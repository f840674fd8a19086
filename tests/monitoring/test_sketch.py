"""SketchAccumulator: exact counts, flush boundaries, KLL rotation, size, threads."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from agent.bundle import Reference
from agent.features import bin_counts, build_reference
from agent.sketch import (
    DEFAULT_MAX_MESSAGE_BYTES,
    LATENCY_EDGES_MS,
    DriftSketch,
    SketchAccumulator,
    decode_kll,
)

from .conftest import mixed_rows


def _feed(acc: SketchAccumulator, x: np.ndarray, p: np.ndarray | None, sizes: list[int]) -> None:
    i = 0
    k = 0
    while i < len(x):
        n = sizes[k % len(sizes)]
        acc.update(x[i : i + n], None if p is None else p[i : i + n])
        i += n
        k += 1


def test_counts_match_bin_counts(reference: Reference, rng: np.random.Generator) -> None:
    x = mixed_rows(rng, 3000)
    x[rng.integers(0, 3000, 50), 2] = np.nan
    x[:7, 3] = np.inf
    x[7:10, 5] = 9  # unknown category
    x[10:12, 5] = 1.5  # not an integer code
    preds = rng.normal(size=(3000, 2))  # scores: argmax gives the class
    acc = SketchAccumulator(reference, "m:1.0.0", start=0.0, flush_rows=64)
    _feed(acc, x, preds, [1, 3, 200, 1, 700, 5])  # crosses buffer boundaries both ways
    acc.observe_latency(np.array([0.2, 3.0, 3.0, 7000.0, np.nan]))
    s = acc.snapshot_and_reset(60.0)
    assert s.rows == 3000 and s.window_start == 0.0 and s.window_end == 60.0
    for j, fr in enumerate(reference.features[:5]):
        want = bin_counts(x[:, j], np.asarray(fr.edges))
        assert s.features[j].counts == want.tolist()
        assert s.features[j].missing == int(np.isnan(x[:, j]).sum())
        col = x[:, j]
        oor = np.isinf(col) | (col < fr.low) | (col > fr.high)
        assert s.features[j].out_of_range == int(oor.sum())
    cat = s.features[5]
    known = np.bincount(x[12:, 5].astype(int), minlength=10)[:4] + np.bincount(
        x[:7, 5].astype(int), minlength=10)[:4]
    assert cat.counts[:4] == known.tolist()
    assert cat.counts[4] == cat.out_of_range == 5
    assert s.predictions is not None
    assert s.predictions.counts == np.bincount(preds.argmax(1), minlength=3).tolist()
    assert s.latency_ms is not None and sum(s.latency_ms) == 4
    assert s.latency_ms[-1] == 1 and len(s.latency_ms) == len(LATENCY_EDGES_MS) - 1
    # the next window starts empty where this one ended
    s2 = acc.snapshot_and_reset(120.0)
    assert s2.rows == 0 and s2.window_start == 60.0 and s2.latency_ms is None


def test_update_many_equals_update_per_batch(reference: Reference, rng: np.random.Generator) -> None:
    x = mixed_rows(rng, 900)
    preds = rng.normal(size=(900, 2))
    one = SketchAccumulator(reference, "m:1.0.0", start=0.0, flush_rows=64)
    many = SketchAccumulator(reference, "m:1.0.0", start=0.0, flush_rows=64)
    _feed(one, x, preds, [1, 7, 90])
    one.update(x[:4])
    pairs = [(x[i : i + 3].copy(), preds[i : i + 3].copy()) for i in range(0, 900, 3)]
    pairs.insert(5, (x[:4].copy(), preds[:3].copy()))  # rows disagree: inputs kept, predictions counted out
    many.update_many([x for x, _ in pairs[:100]], [p for _, p in pairs[:100]])
    many.update_many([x for x, _ in pairs[100:]], [p for _, p in pairs[100:]])
    a, b = one.snapshot_and_reset(60.0), many.snapshot_and_reset(60.0)
    assert many.rejected_batches == 1 and a.rows == b.rows == 904
    assert [f.counts for f in a.features] == [f.counts for f in b.features]
    assert a.predictions is not None and b.predictions is not None
    assert a.predictions.counts == b.predictions.counts


def test_update_many_keeps_the_byte_bound(reference: Reference, rng: np.random.Generator) -> None:
    import agent.sketch as sketch

    acc = SketchAccumulator(reference, "m:1.0.0", start=0.0, flush_rows=10**6)
    x = mixed_rows(rng, 64)
    big = [x.copy() for _ in range(64)]  # one chunk of the observers thread, over the bound below
    bound = sketch._MAX_BUFFER_BYTES
    try:
        sketch._MAX_BUFFER_BYTES = 8 * x.nbytes
        acc.update_many(big, [None] * 64)
        assert acc._bytes < sketch._MAX_BUFFER_BYTES  # flushed as it went, not after the chunk
    finally:
        sketch._MAX_BUFFER_BYTES = bound
    assert acc.snapshot_and_reset(60.0).rows == 64 * 64


def test_image_summary_features(rng: np.random.Generator) -> None:
    imgs = rng.normal(size=(500, 3, 8, 8))
    ref = build_reference(imgs, rng.integers(0, 10, 500), classes=[str(i) for i in range(10)])
    assert ref.summary == "per_channel_mean_std" and len(ref.features) == 6
    acc = SketchAccumulator(ref, "cnn:1.0.0", start=0.0)
    for i in range(500):
        acc.update(imgs[i : i + 1], np.array([i % 10]))
    s = acc.snapshot_and_reset(1.0)
    assert s.rows == 500
    assert [sum(f.counts) for f in s.features] == [500] * 6
    assert s.predictions is not None and s.predictions.counts[:10] == [50] * 10


def test_roundtrip_and_compact(reference: Reference, rng: np.random.Generator) -> None:
    acc = SketchAccumulator(reference, "m:1.0.0", start=0.0)
    x = mixed_rows(rng, 1000)
    acc.update(x, (x[:, 0] > 0).astype(int))
    s = acc.snapshot_and_reset(10.0)
    data = s.encode()
    assert b"NaN" not in data and b" " not in data
    assert DriftSketch.decode(data) == s


def _wide_reference(rng: np.random.Generator, features: int = 64) -> Reference:
    x = rng.normal(size=(5000, features))
    return build_reference(x, rng.integers(0, 10, 5000), classes=[str(i) for i in range(10)])


@pytest.mark.parametrize("rows_per_window", [600, 20_000])
def test_64_feature_message_fits_16kb_and_rotation_loses_no_rows(
    rng: np.random.Generator, rows_per_window: int
) -> None:
    ref = _wide_reference(rng)
    acc = SketchAccumulator(ref, "wide:1.0.0", start=0.0)
    seen = 0
    totals = np.zeros(64, dtype=np.int64)
    emitted_windows: dict[int, int] = {}
    windows = 24
    for w in range(windows):
        x = rng.normal(size=(rows_per_window, 64)).astype(np.float32)
        acc.update(x, rng.integers(0, 10, rows_per_window))
        seen += rows_per_window
        acc.observe_latency(1.5)
        s = acc.snapshot_and_reset(60.0 * (w + 1))
        size = len(s.encode())
        assert size <= DEFAULT_MAX_MESSAGE_BYTES, size
        for j, f in enumerate(s.features):
            if f.kll is not None:
                sk = decode_kll(f.kll)
                totals[j] += sk.n
                emitted_windows[j] = emitted_windows.get(j, 0) + 1
                assert f.kll_since is not None and f.kll_since <= s.window_start
    # every feature's quantile sketch went out at least once in 24 windows
    assert sorted(emitted_windows) == list(range(64))
    # ... and nothing was dropped: what is not yet sent is still pending on the device
    pending = np.array([acc._kll[j].n for j in range(64)])  # noqa: SLF001
    assert (totals + pending == seen).all()


def test_small_model_sends_every_kll_every_window(reference: Reference, rng: np.random.Generator) -> None:
    acc = SketchAccumulator(reference, "m:1.0.0", start=0.0)
    acc.update(mixed_rows(rng, 5000))
    s = acc.snapshot_and_reset(1.0)
    assert [f.kll is not None for f in s.features] == [True] * 5 + [False]  # not categorical


def test_threads(reference: Reference, rng: np.random.Generator) -> None:
    acc = SketchAccumulator(reference, "m:1.0.0", start=0.0, flush_rows=32)
    x = mixed_rows(rng, 2000)
    snaps: list[DriftSketch] = []

    def worker() -> None:
        for i in range(2000):
            acc.update(x[i : i + 1], np.array([i % 2]))

    def snapper() -> None:
        for t in range(20):
            snaps.append(acc.snapshot_and_reset(float(t + 1)))

    threads = [threading.Thread(target=worker) for _ in range(4)] + [threading.Thread(target=snapper)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    snaps.append(acc.snapshot_and_reset(100.0))
    assert sum(s.rows for s in snaps) == 8000
    assert all(sum(f.counts) + f.missing == s.rows for s in snaps for f in s.features)


def test_bad_arguments(reference: Reference) -> None:
    with pytest.raises(ValueError):
        SketchAccumulator(reference, "m:1.0.0", kll_k=4)
    with pytest.raises(ValueError):
        SketchAccumulator(reference, "no version")
    acc = SketchAccumulator(reference, "m:1.0.0")
    with pytest.raises(ValueError):
        acc.update(np.zeros((3, 6)), np.zeros(2))
