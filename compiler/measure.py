"""Measuring candidates on this host with ONNX Runtime: outputs, accuracy, latency.

Latency is measured, never assumed: int8 can be several times *slower* than fp32 on
x86 (see docs/compiler.md). Candidates that will be compared are timed in
interleaved rounds so that a slow period of the host (another process, frequency
changes) hits all of them alike rather than whichever happened to run then.
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort

from agent.runtimes.ort import open_session
from compiler.errors import TechniqueError

__all__ = [
    "LatencySettings",
    "Latency",
    "host_threads",
    "ort_session",
    "run_batched",
    "measure_latencies",
    "measure_calls",
    "measure_against",
]


@dataclass(frozen=True)
class LatencySettings:
    """How hard to time each candidate (batch 1)."""

    warmup: int = 50
    rounds: int = 15
    runs_per_round: int = 40
    # Before each timed block: a pause, so that the worker threads of the model timed
    # just before stop spinning and park, then a few untimed calls. ONNX Runtime's idle
    # workers spin before they park; with several multi-threaded sessions alive, the
    # previous session's spinning workers compete for the cores the next one needs (on
    # a 2-vCPU host the 2-thread fp32 CNN measured 72 µs instead of 48 µs in some runs
    # without the pause). The second core must still be free: on a busy shared host a
    # 2-thread model is timed as if it had one thread either way.
    pause_s: float = 0.01
    block_warmup: int = 5

    @property
    def total_runs(self) -> int:
        return self.rounds * self.runs_per_round


@dataclass(frozen=True)
class Latency:
    p50_ms: float
    p95_ms: float
    runs: int


def host_threads(profile_threads: int) -> int:
    """Threads to time with: the profile's count, capped by this host's cores."""
    return max(1, min(profile_threads, os.cpu_count() or 1))


def ort_session(model: bytes, threads: int) -> ort.InferenceSession:
    """A CPU ONNX Runtime session with ``threads`` intra-op threads.

    On an x86 host without VNNI the session uses ONNX Runtime's exact int8 path, as the
    agent does (:func:`agent.runtimes.ort.open_session`), so that an s8s8 model built
    for a VNNI target is measured as it computes there, and its self-test vectors match
    what the agent computes.

    Raises:
        TechniqueError: ONNX Runtime cannot load the model.
    """
    def configure(so: ort.SessionOptions) -> None:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 3

    try:
        return open_session(model, configure, ["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 - ORT raises its own untyped Fail/InvalidGraph
        raise TechniqueError(f"ONNX Runtime cannot load the model: {e}") from e


def run_batched(
    session: ort.InferenceSession, input_name: str, x: np.ndarray, batch: int = 256
) -> list[np.ndarray]:
    """Run ``x`` through ``session`` in batches; returns every output, concatenated.

    Raises:
        TechniqueError: inference failed.
    """
    parts: list[list[np.ndarray]] = []
    try:
        for i in range(0, len(x), batch):
            parts.append(session.run(None, {input_name: x[i : i + batch]}))
    except Exception as e:  # noqa: BLE001 - ORT raises untyped runtime errors
        raise TechniqueError(f"inference failed: {e}") from e
    return [np.concatenate([p[k] for p in parts], axis=0) for k in range(len(parts[0]))]


def measure_latencies(
    sessions: Sequence[ort.InferenceSession],
    input_name: str,
    x1: np.ndarray,
    settings: LatencySettings,
) -> list[Latency]:
    """Batch-1 latency of each ONNX Runtime session (see :func:`measure_calls`)."""
    feed = {input_name: np.ascontiguousarray(x1[:1])}
    return measure_calls([functools.partial(s.run, None, feed) for s in sessions], settings)


def measure_calls(calls: Sequence[Callable[[], object]], settings: LatencySettings) -> list[Latency]:
    """Latency of each zero-argument call (one batch-1 inference), timed in interleaved rounds.

    Each round runs every call ``runs_per_round`` times (per-call timings kept), each
    block after a pause and ``block_warmup`` untimed calls (:class:`LatencySettings`);
    the order rotates between rounds. Returns p50/p95 per call. Calls may belong to
    different runtimes (ONNX Runtime sessions, LiteRT interpreters).
    """
    return [_latency(ts) for ts in _sample_calls(calls, settings)]


def measure_against(
    anchor: Callable[[], Callable[[], object]],
    candidates: Sequence[Callable[[], Callable[[], object]]],
    settings: LatencySettings,
) -> tuple[Latency, list[Latency]]:
    """Batch-1 latency of each candidate, timed beside ``anchor`` with only the two alive.

    ``anchor`` and each of ``candidates`` are factories: they open the model (a session,
    an interpreter) and return its zero-argument call. A device runs one model; with many
    multi-threaded sessions alive, the idle workers of the others change what is measured,
    and not alike for all models (the 2-thread int8 CNN of width 2 measured 1.47x faster
    than fp32 with 17 sessions alive, 2.22x with the two alone; docs/compiler.md). So each
    candidate is opened with a fresh anchor, the pair is timed in interleaved rounds
    (:func:`measure_calls`), and both are released before the next pair.

    Returns the anchor's latency over every pair's samples, and for each candidate its
    latency scaled by (anchor over all pairs / anchor in its pair): the ratio of each
    candidate to the anchor is the one measured side by side, so a host that got busier
    during one pair does not make that candidate look slower than another.
    """
    pooled: list[np.ndarray] = []
    pairs: list[tuple[np.ndarray, np.ndarray]] = []
    for make in candidates:
        base, cand = _sample_calls([anchor(), make()], settings)
        pooled.append(base)
        pairs.append((base, cand))
    if not pairs:
        return _latency(_sample_calls([anchor()], settings)[0]), []
    anchor_lat = _latency(np.concatenate(pooled))
    scaled = []
    for base, cand in pairs:
        k = anchor_lat.p50_ms / float(np.median(base))
        scaled.append(_latency(cand * k))
    return anchor_lat, scaled


def _latency(ts: np.ndarray) -> Latency:
    return Latency(p50_ms=float(np.median(ts)), p95_ms=float(np.percentile(ts, 95)), runs=len(ts))


def _sample_calls(calls: Sequence[Callable[[], object]], settings: LatencySettings) -> list[np.ndarray]:
    """Per-call timings in ms (see :func:`measure_calls`)."""
    for call in calls:
        for _ in range(settings.warmup):
            call()
    samples: list[list[float]] = [[] for _ in calls]
    n = len(calls)
    clock = time.perf_counter_ns
    for r in range(settings.rounds):
        for k in range(n):
            i = (k + r) % n
            call = calls[i]
            out = samples[i]
            time.sleep(settings.pause_s)
            for _ in range(settings.block_warmup):
                call()
            for _ in range(settings.runs_per_round):
                t0 = clock()
                call()
                out.append((clock() - t0) / 1e6)
    return [np.asarray(ts) for ts in samples]
