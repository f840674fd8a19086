"""Clock steps and skew on the device: delays run on the monotonic clock, and windows
sent to the hub stay valid whichever way the wall clock jumps."""

from __future__ import annotations

import sys
import threading
import time

import numpy as np

from agent.bundle import FeatureReference, Reference
from agent.health import ProbeConfig, run_probe
from agent.sketch import DriftSketch, SketchAccumulator


def test_probe_initial_delay_ignores_a_wall_clock_step():
    # Activation at "wall time" one hour ahead of now: the wall clock was stepped back
    # by an hour after activation (an NTP correction). The delay must stay 0.3 s.
    probe = ProbeConfig(kind="exec", command=[sys.executable, "-c", "pass"], initial_delay_s=0.3, attempts=1)
    t0 = time.monotonic()
    run_probe(probe, time.time() + 3600, threading.Event(), time.monotonic())
    waited = time.monotonic() - t0
    assert 0.25 <= waited < 5.0


def test_probe_delay_already_over_is_not_waited_again():
    # Activated 10 s ago with an 8 s initial delay: the probe runs at once (waiting the
    # delay in full would take 8 s).
    probe = ProbeConfig(kind="exec", command=[sys.executable, "-c", "pass"], initial_delay_s=8.0, attempts=1)
    t0 = time.monotonic()
    run_probe(probe, time.time() - 7200, threading.Event(), time.monotonic() - 10)
    assert time.monotonic() - t0 < 4.0


def _reference() -> Reference:
    return Reference(
        features=[FeatureReference(name="f0", edges=[-1.0, 0.0, 1.0], counts=[1, 1],
                                   low=-10.0, high=10.0)],
        predictions=None,
    )


def test_sketch_windows_stay_valid_when_the_clock_steps_back():
    acc = SketchAccumulator(_reference(), "m:1.0.0", start=10_000.0)
    rng = np.random.default_rng(0)
    acc.update(rng.normal(size=(50, 1)).astype(np.float32), None)
    first = acc.snapshot_and_reset(10_060.0)
    acc.update(rng.normal(size=(50, 1)).astype(np.float32), None)
    stepped = acc.snapshot_and_reset(6_460.0)  # the clock went back an hour
    acc.update(rng.normal(size=(50, 1)).astype(np.float32), None)
    later = acc.snapshot_and_reset(13_000.0)
    for sk in (first, stepped, later):
        # what the hub does with every sketch it receives
        DriftSketch.decode(sk.encode())
        assert sk.window_end >= sk.window_start
    assert first.rows == stepped.rows == later.rows == 50
    assert stepped.window_start >= first.window_end
