"""Malformed and hostile telemetry is refused with PayloadError and never corrupts a merge."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import datasketches
import numpy as np
import pytest

from agent.bundle import Reference
from agent.errors import PayloadError
from agent.sketch import DriftSketch, SketchAccumulator, decode_kll, encode_kll
from hub.drift import SketchMerger, merge

from .conftest import mixed_rows

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def good(reference: Reference, rng: np.random.Generator) -> DriftSketch:
    acc = SketchAccumulator(reference, "m:1.0.0", start=0.0)
    x = mixed_rows(rng, 800)
    acc.update(x, (x[:, 0] > 0).astype(int))
    acc.observe_latency(2.0)
    return acc.snapshot_and_reset(60.0)


def _mutate(s: DriftSketch, fn) -> bytes:  # type: ignore[no-untyped-def]
    obj = json.loads(s.encode())
    fn(obj)
    return json.dumps(obj).encode()


def _kll_blob(obj: dict) -> str:
    return next(f["kll"] for f in obj["features"] if "kll" in f)


CASES = {
    "negative count": (lambda o: o["features"][0]["counts"].__setitem__(0, -1), "schema"),
    "float count": (lambda o: o["features"][0]["counts"].__setitem__(0, 1.5), "schema"),
    "bool count": (lambda o: o["features"][0].__setitem__("missing", True), "schema"),
    "string count": (lambda o: o.__setitem__("rows", "800"), "schema"),
    "huge count": (lambda o: o.__setitem__("rows", 10**30), "schema"),
    "counts do not add up": (lambda o: o["features"][1]["counts"].__setitem__(0, o["features"][1]["counts"][0] + 1), "shape"),
    "empty counts": (lambda o: o["features"][1].__setitem__("counts", []), "schema"),
    "extra field": (lambda o: o.__setitem__("evil", 1), "schema"),
    "unknown version": (lambda o: o.__setitem__("v", 2), "version"),
    "no version": (lambda o: o.pop("v"), "version"),
    "bad model ref": (lambda o: o.__setitem__("model", "../etc/passwd"), "schema"),
    "window reversed": (lambda o: o.__setitem__("window_end", -1.0), "schema"),
    "latency wrong length": (lambda o: o.__setitem__("latency_ms", [1, 2]), "shape"),
    "predictions exceed rows": (lambda o: o["predictions"]["counts"].__setitem__(0, 10**6), "shape"),
    "kll without since": (lambda o: next(f for f in o["features"] if "kll" in f).pop("kll_since"), "schema"),
    "kll since after window": (lambda o: next(f for f in o["features"] if "kll" in f).__setitem__("kll_since", 1e9), "schema"),
    "kll bad base64": (lambda o: next(f for f in o["features"] if "kll" in f).__setitem__("kll", "!!notbase64!!"), "sketch"),
    "kll truncated": (lambda o: next(f for f in o["features"] if "kll" in f).__setitem__(
        "kll", base64.b64encode(base64.b64decode(_kll_blob(o))[:-4]).decode()), "sketch"),
    "kll random bytes": (lambda o: next(f for f in o["features"] if "kll" in f).__setitem__(
        "kll", base64.b64encode(bytes(range(200))).decode()), "sketch"),
    "kll too long": (lambda o: next(f for f in o["features"] if "kll" in f).__setitem__("kll", "A" * 60000), "schema"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_malformed_sketch_rejected(good: DriftSketch, case: str) -> None:
    fn, kind = CASES[case]
    with pytest.raises(PayloadError) as e:
        DriftSketch.decode(_mutate(good, fn))
    assert e.value.kind == kind, str(e.value)


@pytest.mark.parametrize(
    "data,kind",
    [
        (b"x" * 300_000, "oversized"),
        (b"{not json", "not_json"),
        (b"\xff\xfe", "not_json"),
        (b"[" * 100_000, "not_json"),
        (b"[1, 2]", "schema"),
        (b'{"v": 1, "model": "m:1.0.0", "window_start": NaN, "window_end": 1, "rows": 0}', "schema"),
        (b'{"v": 1, "model": "m:1.0.0", "window_start": 0, "window_end": Infinity, "rows": 0}', "schema"),
    ],
)
def test_bad_bytes_rejected(data: bytes, kind: str) -> None:
    with pytest.raises(PayloadError) as e:
        DriftSketch.decode(data)
    assert e.value.kind == kind


def test_merge_rejects_and_is_not_corrupted(reference: Reference, good: DriftSketch) -> None:
    clean = merge([good, good], reference=reference)
    # A sketch of another layout, one of another model, one with a KLL on a categorical.
    obj = json.loads(good.encode())
    obj["features"] = obj["features"][:3]
    obj["rows"] = obj["rows"]
    wrong_layout = DriftSketch.model_validate(obj)
    other_model = good.model_copy(update={"model": "other:1.0.0"})
    blob = next(f.kll for f in good.features if f.kll)
    feats = list(good.features)
    feats[5] = feats[5].model_copy(update={"kll": blob, "kll_since": 0.0})
    kll_on_cat = good.model_copy(update={"features": feats})
    m = SketchMerger(reference, model="m:1.0.0")
    m.add(good)
    for bad, kind in ((wrong_layout, "shape"), (other_model, "unknown_model"), (kll_on_cat, "shape")):
        with pytest.raises(PayloadError) as e:
            m.add(bad)
        assert e.value.kind == kind
        assert not m.offer(bad)
    m.add(good)
    got = m.result()
    assert got.rows == clean.rows and got.sketches == 2
    assert got.rejected == {"shape": 2, "unknown_model": 1}
    for a, b in zip(got.features, clean.features, strict=True):
        assert np.array_equal(a.counts, b.counts) and a.missing == b.missing
        assert (a.kll is None) == (b.kll is None)
        if a.kll is not None and b.kll is not None:
            assert a.kll.n == b.kll.n
    skipped = merge([good, other_model, good], reference=reference, model="m:1.0.0", skip_invalid=True)
    assert skipped.rows == clean.rows and skipped.rejected == {"unknown_model": 1}


def test_valid_kll_roundtrips() -> None:
    rng = np.random.default_rng(3)
    merged = datasketches.kll_floats_sketch(200)
    for n in (1, 2, 7, 300, 5000, 100_000):
        s = datasketches.kll_floats_sketch(200)
        s.update(rng.normal(size=n).astype(np.float32))
        assert decode_kll(encode_kll(s)).n == n
        small = datasketches.kll_floats_sketch(64)
        small.update(rng.normal(size=n).astype(np.float32))
        merged.merge(small)
        assert decode_kll(encode_kll(merged)).n == merged.n


FUZZ = textwrap.dedent(
    """
    import base64, sys
    import datasketches, numpy as np
    from agent.sketch import decode_kll
    from agent.errors import PayloadError
    rng = np.random.default_rng(11)
    base = []
    for n in (1, 5, 300, 5000, 100000):
        s = datasketches.kll_floats_sketch(200)
        s.update(rng.normal(size=n).astype(np.float32))
        base.append(s.serialize())
    accepted = rejected = 0
    for _ in range(6000):
        b = bytearray(base[rng.integers(len(base))])
        r = rng.integers(4)
        if r == 0:
            b = b[: rng.integers(len(b))]
        elif r == 1:
            for _ in range(rng.integers(1, 4)):
                b[rng.integers(len(b))] = rng.integers(256)
        elif r == 2:
            b = bytearray(rng.integers(0, 256, size=rng.integers(0, 100), dtype=np.uint8).tobytes())
        elif len(b) > 12:
            j = int(rng.integers(8, min(len(b), 48) - 4))
            b[j : j + 4] = int(rng.integers(0, 2**32)).to_bytes(4, "little")
        try:
            s = decode_kll(base64.b64encode(bytes(b)).decode())
        except PayloadError:
            rejected += 1
            continue
        accepted += 1
        s.get_cdf([0.0]); s.get_quantiles([0.1, 0.5]); list(s)
        m = datasketches.kll_floats_sketch(200); m.merge(s); m.merge(s)
        m.update(np.ones(500, np.float32)); m.serialize()
    print(accepted, rejected)
    """
)


def test_fuzzed_kll_bytes_never_crash_the_process() -> None:
    # In a child process: the C++ deserializer corrupts memory on crafted input, so a
    # validator gap would kill the interpreter, not raise.
    res = subprocess.run([sys.executable, "-c", FUZZ], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    accepted, rejected = map(int, res.stdout.split())
    assert rejected > 4000
