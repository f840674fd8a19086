"""Fixtures for the monitoring tests: seeded references and simulated devices."""

from __future__ import annotations

import numpy as np
import pytest

from agent.bundle import FeatureReference, PredictionReference, Reference
from agent.features import build_reference

CATEGORIES = ["a", "b", "c", "d"]
CAT_P = np.array([0.4, 0.3, 0.2, 0.1])


def mixed_rows(rng: np.random.Generator, n: int, *, shift: float = 0.0, scale: float = 1.0,
               cat_p: np.ndarray = CAT_P) -> np.ndarray:
    """Rows of 6 features: x0 (mean may shift), x1 (scale may change), x2..x4 stable
    numeric, c5 categorical code."""
    x = rng.normal(size=(n, 6))
    x[:, 0] += shift
    x[:, 1] *= scale
    x[:, 4] = rng.exponential(size=n)
    x[:, 5] = rng.choice(len(cat_p), size=n, p=cat_p)
    return x


def mixed_reference(rng: np.random.Generator, rows: int = 20_000) -> Reference:
    x = mixed_rows(rng, rows)
    num = build_reference(x[:, :5], bins=10, summary="elementwise")
    cat_counts = np.bincount(x[:, 5].astype(int), minlength=len(CATEGORIES))
    feats = list(num.features) + [
        FeatureReference(name="c5", kind="categorical", categories=CATEGORIES,
                         counts=[float(c) for c in cat_counts])
    ]
    classes = ["neg", "pos"]
    preds = (x[:, 0] > 0).astype(int)
    pref = PredictionReference(kind="class", classes=classes,
                               counts=[float(c) for c in np.bincount(preds, minlength=2)])
    return Reference(summary="elementwise", features=feats, predictions=pref, rows=rows)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(20240611)


@pytest.fixture
def reference(rng: np.random.Generator) -> Reference:
    return mixed_reference(rng)


# Hub-side monitoring tests (test_hub_*) use the hub's database and broker fixtures;
# imported once here so the session gets one PostgreSQL database, not one per module.
from tests.hub.conftest import db_url, device_factory, pg_database, session_mosquitto  # noqa: E402, F401
