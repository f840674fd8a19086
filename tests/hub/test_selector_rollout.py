"""Pure parts of campaigns: selectors, the campaign state machine, wave plans, gates."""

from __future__ import annotations

import pytest

from hub.errors import CommandRefused, InvalidCampaign, InvalidSelector
from hub.models import Device
from hub.rollout import (
    ACTIVE,
    TERMINAL,
    TRANSITIONS,
    CampaignState,
    Event,
    Gate,
    WaveMetrics,
    apply_command,
    evaluate_gates,
    parse_duration,
    parse_gate,
    parse_rate,
    parse_waves,
    plan_waves,
)
from hub.selector import parse_selector

S = CampaignState


def _dev(i: str, profile: str | None = "p1", tags: list[str] | None = None) -> Device:
    return Device(device_id=i, profile=profile, tags=tags or [])


@pytest.mark.parametrize(
    ("expr", "matches", "canonical"),
    [
        ("all", {"a", "b", "c", "d"}, "all"),
        ("profile=p1", {"a", "b"}, "profile=p1"),
        ("profile=p1,tag=eu", {"b"}, "profile=p1,tag=eu"),
        (" tag=eu , tag=lab ", {"c"}, "tag=eu,tag=lab"),
        ("id=d", {"d"}, "id=d"),
        ("id=d,profile=p1", set(), "profile=p1,id=d"),
    ],
)
def test_selector_matches(expr: str, matches: set[str], canonical: str) -> None:
    devs = [_dev("a"), _dev("b", tags=["eu"]), _dev("c", "p2", ["eu", "lab"]), _dev("d", None)]
    sel = parse_selector(expr)
    assert {d.device_id for d in devs if sel.matches(d)} == matches
    assert str(sel) == canonical
    assert parse_selector(str(sel)) == sel


@pytest.mark.parametrize(
    ("expr", "message"),
    [
        ("", "empty selector"),
        ("all,tag=x", "cannot be combined"),
        ("prof=x", "unknown selector key"),
        ("tag=", "empty value"),
        ("tag=a,,tag=b", "empty term"),
        ("foo", "not KEY=VALUE"),
        ("id=a/b", "invalid device id"),
        ("id=a,id=b", "two different ids"),
        ("profile=a,profile=b", "two different profiles"),
    ],
)
def test_selector_errors(expr: str, message: str) -> None:
    with pytest.raises(InvalidSelector, match=message):
        parse_selector(expr)


def test_transition_table_is_closed_and_terminal_states_only_roll_back() -> None:
    for (state, _event), nxt in TRANSITIONS.items():
        assert state in CampaignState and nxt in CampaignState
    for t in TERMINAL:
        assert {e for (s, e) in TRANSITIONS if s == t} <= {Event.ROLLBACK}
    # every active state can be aborted or rolled back except the rollback itself
    for s in ACTIVE - {S.ROLLING_BACK}:
        assert (s, Event.ABORT) in TRANSITIONS and (s, Event.ROLLBACK) in TRANSITIONS


@pytest.mark.parametrize(
    ("state", "command", "want"),
    [
        (S.RUNNING, "pause", S.PAUSED),
        (S.PAUSED, "pause", None),  # idempotent
        (S.PAUSED, "resume", S.RUNNING),
        (S.RUNNING, "resume", None),
        (S.AWAITING_APPROVAL, "approve", S.RUNNING),
        (S.RUNNING, "approve", None),
        (S.SOAKING, "abort", S.ABORTED),
        (S.ABORTED, "abort", None),
        (S.PAUSED, "rollback", S.ROLLING_BACK),
        (S.ROLLING_BACK, "rollback", None),
        (S.ROLLED_BACK, "rollback", None),
        (S.COMPLETED, "rollback", S.ROLLING_BACK),
    ],
)
def test_commands(state: CampaignState, command: str, want: CampaignState | None) -> None:
    assert apply_command(state, command) == want


@pytest.mark.parametrize(
    ("state", "command"),
    [(S.COMPLETED, "pause"), (S.ROLLED_BACK, "resume"), (S.ROLLING_BACK, "abort"), (S.RUNNING, "explode"),
     (S.ABORTED, "approve")],
)
def test_commands_refused(state: CampaignState, command: str) -> None:
    with pytest.raises(CommandRefused):
        apply_command(state, command)


@pytest.mark.parametrize(
    ("text", "total", "plan"),
    [
        ("10,50,100", 50, [5, 25, 50]),
        ("10%,50%,100%", 3, [1, 2, 3]),  # the canary always has a device
        ("5,25,100", 10, [1, 3, 10]),
        ("1n,10n,100", 50, [1, 10, 50]),
        ("2n,100", 1, [1, 1]),
        ("100", 0, [0]),
    ],
)
def test_wave_plans(text: str, total: int, plan: list[int]) -> None:
    assert plan_waves(parse_waves(text), total) == plan


@pytest.mark.parametrize("text", ["", "10,5,100", "10,50", "0,100", "abc", "3n,2n,100", "10,,100", "150"])
def test_bad_waves(text: str) -> None:
    with pytest.raises(InvalidCampaign):
        parse_waves(text)


def test_gates_parse_and_judge() -> None:
    assert parse_gate("install_failures<=1") == Gate("install_failures", 1.0)
    assert parse_gate("health_failures <= 20%") == Gate("health_failures", 0.2, rate=True)
    assert str(parse_gate("psi<=0.25")) == "psi<=0.25"
    for bad in ("psi>=0.2", "latency<=1", "psi<=5%", "install_failures<=1.5"):
        with pytest.raises(InvalidCampaign):
            parse_gate(bad)
    m = WaveMetrics(started=10, install_failures=1, health_failures=3, error_rate=0.01, inferences=1000,
                    p95_regression=1.5, psi=None, p95_inferences=1000)
    verdicts = evaluate_gates(
        [parse_gate(g) for g in ("install_failures<=1", "health_failures<=20%", "error_rate<=0.05",
                                 "p95_regression<=1.2", "psi<=0.25")], m)
    assert [v.passed for v in verdicts] == [True, False, True, False, True]
    assert verdicts[1].value == pytest.approx(0.3)
    assert verdicts[4].note.startswith("no data")


def test_durations_and_rates() -> None:
    assert parse_duration("30s") == 30 and parse_duration("5m") == 300 and parse_duration("2") == 2
    assert parse_rate("20/min") == 20 and parse_rate("7") == 7
    for bad in ("-1s", "x"):
        with pytest.raises(InvalidCampaign):
            parse_duration(bad)
    with pytest.raises(InvalidCampaign):
        parse_rate("0/min")
