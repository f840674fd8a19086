"""Latency measurement logic (compiler.measure), with a fake clock: no timing asserts."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from compiler import measure
from compiler.measure import LatencySettings, measure_against

SETTINGS = LatencySettings(warmup=2, rounds=4, runs_per_round=5, pause_s=0.0, block_warmup=1)


class FakeClock:
    def __init__(self) -> None:
        self.ns = 0

    def __call__(self) -> int:
        return self.ns


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    c = FakeClock()
    monkeypatch.setattr(measure.time, "perf_counter_ns", c)
    monkeypatch.setattr(measure.time, "sleep", lambda s: None)
    return c


class Opened:
    """A model 'session' whose call advances the fake clock; counts how many are open."""

    alive = 0
    most_alive = 0

    def __init__(self, clock: FakeClock, cost_us: float) -> None:
        self.clock, self.cost_ns = clock, int(cost_us * 1000)
        Opened.alive += 1
        Opened.most_alive = max(Opened.most_alive, Opened.alive)

    def __call__(self) -> None:
        self.clock.ns += self.cost_ns

    def __del__(self) -> None:
        Opened.alive -= 1


def test_each_candidate_is_scaled_by_the_anchor_of_its_own_pair(clock: FakeClock) -> None:
    # The host is twice as slow while the second pair runs: the anchor takes 10 µs in the
    # first pair and 20 µs in the second; both candidates are 2x faster than the anchor
    # beside them, so both must come out equally fast.
    anchor_costs = iter([10.0, 20.0])
    cand_costs = [5.0, 10.0]

    def anchor() -> Callable[[], None]:
        return Opened(clock, next(anchor_costs))

    def candidate(cost: float) -> Callable[[], Callable[[], None]]:
        return lambda: Opened(clock, cost)

    base, lats = measure_against(anchor, [candidate(c) for c in cand_costs], SETTINGS)

    assert base.p50_ms == pytest.approx(0.015)  # median over both pairs' samples
    assert base.runs == 2 * SETTINGS.total_runs
    assert [lat.p50_ms for lat in lats] == pytest.approx([0.0075, 0.0075])
    assert all(lat.runs == SETTINGS.total_runs for lat in lats)


def test_only_the_pair_being_timed_is_open(clock: FakeClock) -> None:
    Opened.alive = Opened.most_alive = 0
    _, lats = measure_against(
        lambda: Opened(clock, 10.0), [lambda: Opened(clock, 5.0) for _ in range(4)], SETTINGS
    )
    assert len(lats) == 4
    assert Opened.most_alive == 2
    assert Opened.alive == 0


def test_no_candidates_times_the_anchor_alone(clock: FakeClock) -> None:
    base, lats = measure_against(lambda: Opened(clock, 7.0), [], SETTINGS)
    assert lats == []
    assert base.p50_ms == pytest.approx(0.007)
