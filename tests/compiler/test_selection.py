"""Selection rules, table-driven, on hand-made measurements (no models involved)."""

from __future__ import annotations

import pytest

from agent.profiles import Limits
from compiler.selection import TIE_RELATIVE, Measured, select

LIMITS = Limits(max_model_bytes=10_000, latency_budget_ms=5.0, max_accuracy_drop=0.01)


def fp32(p50: float = 1.0, acc: float | None = 0.95, size: int = 4000) -> Measured:
    return Measured("fp32", size, p50, p50 * 1.2, acc, is_baseline=True)


def cand(key: str, p50: float, acc: float | None = 0.95, size: int = 1000, **kw) -> Measured:
    return Measured(key, size, p50, p50 * 1.2, acc, **kw)


def verdicts(cands: list[Measured], limits: Limits = LIMITS) -> dict[str, tuple[bool, str]]:
    return {d.key: (d.selected, " | ".join(d.reasons)) for d in select(cands, limits)}


@pytest.mark.parametrize(
    ("cands", "selected", "reason_of", "reason"),
    [
        # int8 slower than fp32 is rejected even though it is smaller and accurate.
        ([fp32(1.0), cand("int8", 1.5)], "fp32", "int8", "slower than fp32"),
        # Equal latency is not faster: rejected.
        ([fp32(1.0), cand("int8", 1.0)], "fp32", "int8", "slower than fp32"),
        # Faster and within limits: selected.
        ([fp32(1.0), cand("int8", 0.5)], "int8", "fp32", "not selected"),
        # Over the latency budget (p95 = 1.2 * p50 > 5 ms): rejected.
        ([fp32(6.0), cand("int8", 3.0)], "int8", "fp32", "over the profile's budget"),
        # Over the size limit.
        ([fp32(1.0, size=20_000), cand("int8", 0.9)], "int8", "fp32", "max_model_bytes"),
        # Accuracy drop over max_accuracy_drop.
        ([fp32(1.0, acc=0.95), cand("int8", 0.5, acc=0.93)], "fp32", "int8", "max_accuracy_drop"),
        # A drop exactly at the limit passes.
        ([fp32(1.0, acc=0.95), cand("int8", 0.5, acc=0.94)], "int8", "fp32", "not selected"),
        # A failed build is rejected with its error.
        ([fp32(1.0), Measured("int8", None, None, None, None, errors=("boom",))], "fp32", "int8", "boom"),
        # A blocker (e.g. an op the runtime lacks) rejects.
        ([fp32(1.0), cand("int8", 0.5, blockers=("op X unsupported",))], "fp32", "int8", "op X"),
    ],
)
def test_rules(cands: list[Measured], selected: str, reason_of: str, reason: str) -> None:
    v = verdicts(cands)
    assert [k for k, (sel, _) in v.items() if sel] == [selected]
    assert reason in v[reason_of][1]


def test_tie_goes_to_the_smaller_model() -> None:
    a = cand("a", 0.500, size=3000)
    b = cand("b", 0.500 * (1 + TIE_RELATIVE / 2), size=1000)
    v = verdicts([fp32(1.0), a, b])
    assert v["b"][0] and not v["a"][0]
    assert "smallest" in v["b"][1]


def test_clear_winner_beats_smaller_model() -> None:
    v = verdicts([fp32(1.0), cand("fast", 0.4, size=3000), cand("small", 0.8, size=500)])
    assert v["fast"][0] and not v["small"][0]


def test_nothing_passes_nothing_selected() -> None:
    tight = Limits(max_model_bytes=10_000, latency_budget_ms=0.001, max_accuracy_drop=0.01)
    decisions = select([fp32(1.0), cand("int8", 0.5)], tight)
    assert not any(d.selected for d in decisions)
    assert all(not d.passed and d.reasons for d in decisions)


def test_no_labels_skips_accuracy_rules() -> None:
    v = verdicts([fp32(1.0, acc=None), cand("int8", 0.5, acc=None)])
    assert v["int8"][0]


def test_accuracy_floor() -> None:
    limits = Limits(
        max_model_bytes=10_000, latency_budget_ms=5.0, max_accuracy_drop=0.5, accuracy_floor=0.9
    )
    v = verdicts([fp32(1.0, acc=0.95), cand("int8", 0.5, acc=0.85)], limits)
    assert v["fp32"][0]
    assert "accuracy_floor" in v["int8"][1]
