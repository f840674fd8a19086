"""Latency measurement (compiler.measure) with a fake clock, and which model compile times
each candidate beside. No timing asserts."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from agent.profiles import load_profile
from compiler import measure, pipeline
from compiler.measure import Latency, LatencySettings, measure_against
from compiler.pipeline import CompileOptions, _Artifact, compile_model

from .conftest import FAST_LATENCY, PROFILES, Workspace

SETTINGS = LatencySettings(warmup=2, rounds=4, runs_per_round=5, alternations=2)  # 10 runs an opening


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
    # The host is twice as slow while the second candidate is timed: the anchor takes
    # 10 µs beside the first and 20 µs beside the second; both candidates are 2x faster
    # than the anchor they were timed with, so both must come out equally fast.
    anchor_costs = iter([10.0, 10.0, 20.0, 20.0])  # opened once per alternation
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
    # The anchor's samples are scaled per pair too: its p95 carries no drift between pairs.
    assert base.p95_ms == pytest.approx(0.015)
    assert [lat.p95_ms for lat in lats] == pytest.approx([0.0075, 0.0075])


def test_one_model_is_open_at_a_time_and_warmup_is_untimed(clock: FakeClock) -> None:
    Opened.alive = Opened.most_alive = 0
    openings = [0]

    def slow_first_call() -> Callable[[], None]:
        m = Opened(clock, 10.0)
        openings[0] += 1
        first = [True]

        def call() -> None:
            clock.ns += 1_000_000 if first[0] else m.cost_ns  # a 1 ms first call
            first[0] = False

        return call

    base, lats = measure_against(slow_first_call, [lambda: Opened(clock, 5.0) for _ in range(4)], SETTINGS)
    assert len(lats) == 4
    assert openings[0] == 4 * SETTINGS.alternations  # a fresh anchor for every opening
    assert Opened.most_alive == 1
    assert Opened.alive == 0
    assert base.p95_ms == pytest.approx(0.010)  # the 1 ms first calls were warm-up


def test_no_candidates_times_the_anchor_alone(clock: FakeClock) -> None:
    base, lats = measure_against(lambda: Opened(clock, 7.0), [], SETTINGS)
    assert lats == []
    assert base.p50_ms == pytest.approx(0.007)


def test_compile_times_each_profile_beside_its_own_baseline(
    cnn_workspace: Workspace, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ONNX profiles are timed beside fp32 ONNX, the LiteRT-only profile beside fp32 TFLite,
    and every candidate's reported latency is the one timed in its profile's group."""
    calls: list[tuple[_Artifact, list[_Artifact], Latency, list[Latency]]] = []

    def spy(anchor: Any, candidates: Any, settings: LatencySettings) -> tuple[Latency, list[Latency]]:
        base, lats = measure_against(anchor, candidates, settings)
        calls.append((anchor.args[0], [c.args[0] for c in candidates], base, lats))
        return base, lats

    monkeypatch.setattr(pipeline, "measure_against", spy)
    report = compile_model(
        cnn_workspace.pt2, [load_profile(n) for n in PROFILES], cnn_workspace.calib,
        cnn_workspace.eval, tmp_path, CompileOptions(name="t", latency=FAST_LATENCY),
    )
    anchors = sorted(a.key for a, *_ in calls)
    assert anchors == ["onnx-fp32", "tflite-fp32"]  # both ONNX profiles share one group
    timed: dict[tuple[str, str, str, str], list[float]] = {}
    for anchor, cands, base, lats in calls:
        if anchor.key == "tflite-fp32":
            assert {c.runtime for c in cands} == {"litert"}
        for art, lat in zip([anchor, *cands], [base, *lats], strict=True):
            # (two ONNX profiles may each have their own int8 model of the same kind)
            timed.setdefault((anchor.key, art.format, art.precision, art.technique), []).append(lat.p50_ms)
    for c in report.candidates:
        if c.latency_ms_p50 is None:
            continue
        base_key = "tflite-fp32" if c.profile == "mobile-litert" else "onnx-fp32"
        assert any(c.latency_ms_p50 == pytest.approx(t, abs=1e-5)
                   for t in timed[(base_key, c.format, c.precision, c.technique)])
    assert sum(c.latency_ms_p50 is not None for c in report.candidates) >= 8
