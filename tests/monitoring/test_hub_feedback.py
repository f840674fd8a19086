"""POST /api/v1/feedback and GET /api/v1/performance: per-window metrics equal
scikit-learn's; malformed or hostile batches are refused whole, counted by kind, and
leave the stored statistics untouched; request ids make resubmission idempotent."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sklearn import metrics as skm

from agent.bundle import Reference
from hub.monitoring import MonitoringSettings
from tests.monitoring.hub_support import MonHub, make_ref_bundle, start_hub

W = 3600.0


@pytest.fixture
def mon(tmp_path: Path, db_url: str, session_mosquitto: Any, reference: Reference) -> Iterator[MonHub]:
    stack: list[Any] = []
    h = start_hub(tmp_path, db_url, session_mosquitto.url,
                  MonitoringSettings(interval_s=3600, max_feedback_bytes=64 * 1024, max_feedback_items=500),
                  stack)
    for name in ("bin", "multi"):
        with open(make_ref_bundle(tmp_path, reference, name=name), "rb") as fh:
            assert h.client.post("/api/v1/models", files={"bundle": ("b.efb", fh)}).status_code == 201
    yield h
    for c in reversed(stack):
        c.__exit__(None, None, None)


def _sk(y: np.ndarray, p: np.ndarray, score: np.ndarray | None, **auc_kw: Any) -> dict[str, float | None]:
    return {
        "accuracy": skm.accuracy_score(y, p),
        "precision": skm.precision_score(y, p, average="macro", zero_division=0),
        "recall": skm.recall_score(y, p, average="macro", zero_division=0),
        "f1": skm.f1_score(y, p, average="macro", zero_division=0),
        "auc": None if score is None else skm.roc_auc_score(y, score, **auc_kw),
    }


def _check(window: dict[str, Any], want: dict[str, float | None], n: int) -> None:
    assert window["n"] == n
    for k, v in want.items():
        assert window[k] == (None if v is None else pytest.approx(v, abs=1e-12)), k


def test_metrics_match_sklearn(mon: MonHub, rng: np.random.Generator) -> None:
    now = time.time()
    start = now - 3 * W
    # Binary, int labels, float scores; a model that gets worse window by window.
    windows: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    items = []
    for k, noise in enumerate((0.5, 1.0, 2.0)):
        n = 300 + 50 * k
        y = rng.integers(0, 2, n)
        score = 1 / (1 + np.exp(-(2 * y - 1 + rng.normal(0, noise, n))))
        p = (score > 0.5).astype(int)
        windows.append((y, p, score))
        ts = start + k * W + rng.uniform(0, W - 1, n)
        items += [{"model": "bin:1.0.0", "ts": float(t), "label": int(a), "prediction": int(b),
                   "score": float(s), "device_id": f"d{i % 3}", "request_id": f"r{k}-{i}"}
                  for i, (t, a, b, s) in enumerate(zip(ts, y, p, score, strict=True))]
    for i in range(0, len(items), 400):
        r = mon.client.post("/api/v1/feedback", json={"items": items[i : i + 400]})
        assert r.status_code == 200, r.text
    assert mon.client.post("/api/v1/feedback", json=items[:100]).json() == {"accepted": 0, "duplicates": 100}

    rep = mon.client.get("/api/v1/performance/bin", params={"window": "1h", "periods": 3}).json()
    (v,) = rep["versions"]
    assert [w["n"] for w in v["windows"]] == [300, 350, 400]
    for win, (y, p, s) in zip(v["windows"], windows, strict=True):
        _check(win, _sk(y, p, s), len(y))
    y_all = np.concatenate([w[0] for w in windows])
    p_all = np.concatenate([w[1] for w in windows])
    s_all = np.concatenate([w[2] for w in windows])
    _check(v["overall"], _sk(y_all, p_all, s_all), len(y_all))
    st = v["staleness"]
    assert st["metric"] == "accuracy" and st["decay"] > 0 and st["slope_per_day"] < 0
    assert st["decay"] == pytest.approx(v["windows"][0]["accuracy"] - v["windows"][2]["accuracy"])
    assert 0 <= st["age_s"] < 600

    # Multi-class string labels with per-label score maps (one-vs-rest macro AUC).
    classes = ["cat", "dog", "eel"]
    n = 400
    y_idx = rng.integers(0, 3, n)
    logits = rng.normal(0, 1, (n, 3))
    logits[np.arange(n), y_idx] += 1.5
    prob = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    p_idx = prob.argmax(axis=1)
    multi = [{"model": "multi:1.0.0", "ts": now - 10, "label": classes[a], "prediction": classes[b],
              "score": dict(zip(classes, map(float, pr), strict=True))}
             for a, b, pr in zip(y_idx, p_idx, prob, strict=True)]
    for i in range(0, n, 150):
        assert mon.client.post("/api/v1/feedback", json={"items": multi[i : i + 150]}).status_code == 200
    rep = mon.client.get("/api/v1/performance/multi", params={"window": "1h", "periods": 1}).json()
    y = np.array(classes)[y_idx]
    _check(rep["versions"][0]["overall"],
           _sk(y, np.array(classes)[p_idx], prob, multi_class="ovr", average="macro"), n)


HOSTILE: list[tuple[bytes, int, str]] = [
    (b'{"items": [{"model": "bin:1.0.0", "ts": 1, "label": 1, "prediction": 1, "score": NaN}]}', 422, "schema"),
    (b'{"items": [{"model": "bin:1.0.0", "ts": 1, "label": 1, "prediction": 1, "score": Infinity}]}', 422, "schema"),
    (b'{"items": [{"model": "bin:1.0.0", "ts": -5, "label": 1, "prediction": 1}]}', 422, "schema"),
    (b'{"items": [{"model": "nosuch:1.0.0", "ts": 1, "label": 1, "prediction": 1}]}', 422, "unknown_model"),
    (b'{"items": [{"model": "bin:9.9.9", "ts": 1, "label": 1, "prediction": 1}]}', 422, "unknown_model"),
    (b'{"items": [{"model": "bin", "ts": 1, "label": 1, "prediction": 1}]}', 422, "schema"),
    (b'{"items": [{"model": "bin:1.0.0", "ts": 1, "label": true, "prediction": 1}]}', 422, "schema"),
    (b'{"items": [{"model": "bin:1.0.0", "ts": 1, "label": 1, "prediction": "1"}]}', 422, "schema"),
    (b'{"items": [{"model": "bin:1.0.0", "label": 1, "prediction": 1}]}', 422, "schema"),
    (b'{"items": [{"model": "bin:1.0.0", "ts": "1", "label": 1, "prediction": 1}]}', 422, "schema"),
    (b'{"items": [{"model": "bin:1.0.0", "ts": 1, "label": 1, "prediction": 1, "extra": 1}]}', 422, "schema"),
    (b'{"items": []}', 422, "schema"),
    (b'{"items": [', 422, "not_json"),
    (b"\xff\xfe", 422, "not_json"),
    (b"[" * 100_000 + b"]" * 100_000, 413, "oversized"),
    (json.dumps({"items": [{"model": "bin:1.0.0", "ts": 1, "label": 0, "prediction": 0}] * 501}).encode(),
     422, "too_many"),
]


def _figures(h: MonHub) -> list[Any]:
    (v,) = h.client.get("/api/v1/performance/bin", params={"periods": 1}).json()["versions"]
    keys = ("n", "accuracy", "precision", "recall", "f1", "auc")
    return [[w[k] for k in keys] for w in [v["overall"], *v["windows"]]]


def test_hostile_feedback_rejected_counted_and_harmless(mon: MonHub) -> None:
    now = time.time()
    good = [{"model": "bin:1.0.0", "ts": now - 5, "label": i % 2, "prediction": (i // 3) % 2} for i in range(60)]
    assert mon.client.post("/api/v1/feedback", json=good).json() == {"accepted": 60, "duplicates": 0}
    before = _figures(mon)
    want: dict[str, int] = {}
    for body, status, kind in HOSTILE:
        r = mon.client.post("/api/v1/feedback", content=body, headers={"content-type": "application/json"})
        assert r.status_code == status, (body[:80], r.text)
        assert isinstance(r.json()["detail"], str)
        want[kind] = want.get(kind, 0) + 1
    # A batch with one bad item stores nothing of it.
    mixed = good[:5] + [{"model": "bin:1.0.0", "ts": now, "label": 1, "prediction": 1, "score": "high"}]
    assert mon.client.post("/api/v1/feedback", json=mixed).status_code == 422
    want["schema"] += 1
    assert _figures(mon) == before
    errors = mon.client.get("/api/v1/stats/payload-errors").json()
    assert errors["by_topic"]["feedback"] == want
    assert mon.client.post("/api/v1/feedback", json=good).status_code == 200  # still serving
