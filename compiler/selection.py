"""Choosing one candidate per profile: pure logic, no IO, no measuring.

Rules, in order (every failed rule adds a reason; any reason rejects):

1. a candidate that failed to build or measure is rejected with its error;
2. the model file must fit ``limits.max_model_bytes``;
3. the host p95 latency must fit ``limits.latency_budget_ms`` (the profile states a
   p95 budget; host numbers are a proxy for the device, reported as such);
4. the metric drop against the fp32 baseline must not exceed
   ``limits.max_accuracy_drop``, and the metric must reach ``limits.accuracy_floor``;
5. an optimised candidate must be faster (p50) than the fp32 baseline on this host.

Among the survivors the fastest p50 wins; latencies within :data:`TIE_RELATIVE` of
the fastest count as a tie, broken by the smaller model, then by p50.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from agent.profiles import Limits

__all__ = ["TIE_RELATIVE", "Measured", "Decision", "select"]

TIE_RELATIVE = 0.03


@dataclass(frozen=True)
class Measured:
    """What selection needs to know about one candidate of one profile."""

    key: str
    model_bytes: int | None
    latency_p50_ms: float | None
    latency_p95_ms: float | None
    metric: float | None  # higher is better (accuracy-like); None without labels
    is_baseline: bool = False
    errors: tuple[str, ...] = ()
    # Extra rejection reasons found elsewhere (op compatibility, technique checks).
    blockers: tuple[str, ...] = ()


@dataclass
class Decision:
    key: str
    selected: bool = False
    passed: bool = False
    reasons: list[str] = field(default_factory=list)
    metric_drop: float | None = None


def _fmt_ms(v: float) -> str:
    return f"{v:.4g} ms"


def select(candidates: Sequence[Measured], limits: Limits) -> list[Decision]:
    """Decide, for one profile, which candidate is selected and why each is not.

    Returns one :class:`Decision` per candidate, in the given order. Exactly one is
    selected when at least one passes every rule; none otherwise.
    """
    baseline = next((c for c in candidates if c.is_baseline and not c.errors), None)
    decisions: list[Decision] = []
    passing: list[tuple[Measured, Decision]] = []
    for c in candidates:
        d = Decision(key=c.key)
        decisions.append(d)
        if c.errors:
            d.reasons.extend(c.errors)
            continue
        d.reasons.extend(c.blockers)
        if c.model_bytes is not None and c.model_bytes > limits.max_model_bytes:
            d.reasons.append(
                f"model is {c.model_bytes} bytes, over the profile's max_model_bytes "
                f"{limits.max_model_bytes}"
            )
        if c.latency_p95_ms is None or c.latency_p50_ms is None:
            d.reasons.append("latency was not measured")
        elif c.latency_p95_ms > limits.latency_budget_ms:
            d.reasons.append(
                f"p95 latency {_fmt_ms(c.latency_p95_ms)} on this host is over the "
                f"profile's budget {_fmt_ms(limits.latency_budget_ms)}"
            )
        if c.metric is None and not c.is_baseline and baseline is not None and baseline.metric is not None:
            d.reasons.append("its metric was not measured, so its accuracy cannot be checked against fp32")
        if c.metric is not None and baseline is not None and baseline.metric is not None:
            d.metric_drop = baseline.metric - c.metric
            if d.metric_drop > limits.max_accuracy_drop + 1e-12:
                d.reasons.append(
                    f"metric drops {d.metric_drop:.4f} below fp32 ({c.metric:.4f} vs "
                    f"{baseline.metric:.4f}), over max_accuracy_drop {limits.max_accuracy_drop}"
                )
        if c.metric is not None and limits.accuracy_floor is not None:
            if c.metric < limits.accuracy_floor:
                d.reasons.append(
                    f"metric {c.metric:.4f} is below the profile's accuracy_floor "
                    f"{limits.accuracy_floor}"
                )
        if not c.is_baseline:
            if baseline is None or baseline.latency_p50_ms is None:
                d.reasons.append("no fp32 baseline to compare speed against")
            elif c.latency_p50_ms is not None and c.latency_p50_ms >= baseline.latency_p50_ms:
                d.reasons.append(
                    f"slower than fp32 on this host (p50 {_fmt_ms(c.latency_p50_ms)} vs "
                    f"{_fmt_ms(baseline.latency_p50_ms)})"
                )
        if not d.reasons:
            d.passed = True
            passing.append((c, d))
    if not passing:
        return decisions
    fastest = min(c.latency_p50_ms or 0.0 for c, _ in passing)
    tied = [(c, d) for c, d in passing if (c.latency_p50_ms or 0.0) <= fastest * (1 + TIE_RELATIVE)]
    tied.sort(key=lambda cd: (cd[0].model_bytes or 0, cd[0].latency_p50_ms or 0.0))
    winner, win_d = tied[0]
    win_d.selected = True
    others = len(passing) - 1
    if len(tied) > 1:
        win_d.reasons.append(
            f"selected: smallest of {len(tied)} candidates within {TIE_RELATIVE:.0%} of the "
            f"fastest p50 ({_fmt_ms(fastest)})"
        )
    else:
        win_d.reasons.append(
            f"selected: fastest p50 ({_fmt_ms(winner.latency_p50_ms or 0.0)}) of "
            f"{others + 1} passing candidate(s)"
        )
    for c, d in passing:
        if d is not win_d:
            d.reasons.append(
                f"passed every check but not selected (p50 {_fmt_ms(c.latency_p50_ms or 0.0)}, "
                f"{c.model_bytes} bytes)"
            )
    return decisions
