"""Gates and the save cap of the campaign state machine (pure): limits a gate can
never fail on are refused, quality gates need a minimum sample, count gates are
cumulative less what an override accepted, and the save cap never breaks a move."""

from __future__ import annotations

import pytest

from hub.errors import InvalidCampaign
from hub.rollout import (
    ACTIVE,
    MAX_SAVES,
    MIN_QUALITY_SAMPLES,
    TERMINAL,
    TRANSITIONS,
    CampaignState,
    Event,
    Gate,
    WaveMetrics,
    capped_event,
    evaluate_gates,
    next_state,
    parse_gate,
)

S, E = CampaignState, Event


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("install_failures<=" + "9" * 400, "longer than 200 characters"),
        ("install_failures<=" + "9" * 100, "limit 99999999999999999... is out of range; install_failures "
                                            "takes 0 to 10,000,000"),
        ("psi<=" + "9" * 150, "out of range; psi takes 0 to 100"),
        ("health_failures<=10000001", "out of range; health_failures takes 0 to 10,000,000"),
        ("install_failures<=100.5%", "limit 100.5% is out of range; install_failures takes 0 to 100%"),
        ("error_rate<=1.5", "out of range; error_rate takes 0 to 1"),
        ("p95_regression<=1001", "out of range; p95_regression takes 0 to 1,000"),
        ("psi<=100.01", "out of range; psi takes 0 to 100"),
        ("psi<=0.2 min=100", "only error_rate and p95_regression take min=N"),
        ("install_failures<=1 min=5", "only error_rate and p95_regression take min=N"),
        ("error_rate<=0.05 min=0", "min= takes 1 to 1000000000 inferences"),
        ("error_rate<=0.05 min=" + "9" * 30, "min= takes 1 to 1000000000 inferences"),
        ("error_rate<=0.05 min=", "is not METRIC<=LIMIT [min=N]"),
    ],
)
def test_gate_limits_out_of_range_are_refused_naming_the_gate(text: str, message: str) -> None:
    with pytest.raises(InvalidCampaign, match="^gate '") as e:
        parse_gate(text)
    assert message in str(e.value)
    assert text[:20] in str(e.value)  # the message names the gate


@pytest.mark.parametrize(
    ("text", "gate", "shown"),
    [
        ("install_failures<=10000000", Gate("install_failures", 10_000_000), "install_failures<=10000000"),
        ("error_rate<=0.00001", Gate("error_rate", 0.00001), "error_rate<=0.00001"),
        ("install_failures<=100%", Gate("install_failures", 1.0, rate=True), "install_failures<=100%"),
        ("error_rate<=1", Gate("error_rate", 1.0), "error_rate<=1"),
        ("psi<=100", Gate("psi", 100.0), "psi<=100"),
        ("error_rate<=0.05 min=500", Gate("error_rate", 0.05, min_samples=500), "error_rate<=0.05 min=500"),
        ("p95_regression <= 1.2  min = 1", Gate("p95_regression", 1.2, min_samples=1),
         "p95_regression<=1.2 min=1"),
    ],
)
def test_gates_at_their_bounds_parse_and_round_trip(text: str, gate: Gate, shown: str) -> None:
    assert parse_gate(text) == gate
    assert str(gate) == shown and parse_gate(shown) == gate
    assert Gate.from_dict(gate.as_dict()) == gate


def _verdict(gate: str, **metrics: object) -> tuple[bool, float | None, str]:
    v = evaluate_gates([parse_gate(gate)], WaveMetrics(**{"started": 10, "install_failures": 0,  # type: ignore[arg-type]
                                                          "health_failures": 0, **metrics}))[0]
    return v.passed, v.value, v.note


@pytest.mark.parametrize(
    ("gate", "metrics", "want"),
    [
        # Quality gates judge on at least MIN_QUALITY_SAMPLES inferences (min=N overrides).
        ("error_rate<=0.01", {"error_rate": 1.0, "inferences": 1},
         (True, None, "not enough data: 1 inferences, fewer than 200 (measured 1)")),
        ("error_rate<=0.01", {"error_rate": 0.5, "inferences": MIN_QUALITY_SAMPLES - 1},
         (True, None, "not enough data: 199 inferences, fewer than 200 (measured 0.5)")),
        ("error_rate<=0.01", {"error_rate": 0.5, "inferences": MIN_QUALITY_SAMPLES},
         (False, 0.5, "200 inferences")),
        ("error_rate<=0.01 min=1", {"error_rate": 1.0, "inferences": 1}, (False, 1.0, "1 inferences")),
        ("error_rate<=0.01 min=1000", {"error_rate": 0.5, "inferences": 999},
         (True, None, "not enough data: 999 inferences, fewer than 1000 (measured 0.5)")),
        ("p95_regression<=1.2", {"p95_regression": 3.0, "p95_inferences": 10},
         (True, None, "not enough data: 10 inferences, fewer than 200 (measured 3)")),
        ("p95_regression<=1.2", {"p95_regression": 3.0, "p95_inferences": 200},
         (False, 3.0, "new/old p95, median over devices, 200 inferences")),
        ("error_rate<=0.01", {}, (True, None, "no data (0 inferences)")),
        # Count gates: failures so far (timed out included) less those an override accepted.
        ("install_failures<=0", {"install_failures": 2, "timed_out": 1},
         (False, 2.0, "2 of 10 devices so far, 1 timed out")),
        ("install_failures<=0", {"install_failures": 2, "accepted": (2, 0)},
         (True, 0.0, "2 of 10 devices so far, 2 accepted by an override")),
        ("install_failures<=0", {"install_failures": 3, "accepted": (2, 0)},
         (False, 1.0, "3 of 10 devices so far, 2 accepted by an override")),
        ("health_failures<=10%", {"health_failures": 2, "accepted": (5, 1)},
         (True, 0.1, "2 of 10 devices so far, 1 accepted by an override")),
    ],
)
def test_gate_verdicts(gate: str, metrics: dict[str, object], want: tuple[bool, float | None, str]) -> None:
    assert _verdict(gate, **metrics) == want


def test_completing_watches_count_gates() -> None:
    assert next_state(S.COMPLETING, E.GATE_FAILED_PAUSE) == S.PAUSED
    assert next_state(S.COMPLETING, E.GATE_FAILED_ROLLBACK) == S.ROLLING_BACK


@pytest.mark.parametrize(("state", "event"), sorted(TRANSITIONS))
def test_save_cap_never_asks_for_a_missing_transition(state: CampaignState, event: Event) -> None:
    capped = capped_event(state, event, MAX_SAVES + 1)
    nxt = next_state(state, capped)  # a KeyError here stopped the engine (rolling_back, looped)
    if state in ACTIVE and next_state(state, event) not in TERMINAL:
        assert (capped, nxt) == (E.LOOPED, S.ABORTED)
    else:
        assert capped == event
    assert capped_event(state, event, MAX_SAVES) == event


def test_save_cap_leaves_a_finishing_rollback_alone() -> None:
    assert capped_event(S.ROLLING_BACK, E.REVERTED, MAX_SAVES + 1) == E.REVERTED
    assert capped_event(S.RUNNING, E.SETTLED, MAX_SAVES + 1) == E.LOOPED
    assert capped_event(S.SOAKING, E.DRAINED, MAX_SAVES + 1) == E.DRAINED
