"""Measuring candidates on this host with ONNX Runtime: outputs, accuracy, latency.

Latency is measured, never assumed: int8 can be several times *slower* than fp32 on
x86 (see docs/compiler.md). A candidate is timed alternately with the model it is compared
with, several times, so that a slow period of the host (another process, frequency
changes) hits both alike rather than whichever happened to run then.
"""

from __future__ import annotations

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
    "measure_calls",
    "measure_against",
]


@dataclass(frozen=True)
class LatencySettings:
    """How hard to time each candidate (batch 1).

    :func:`measure_against` (what ``compile`` uses) opens each model ``alternations``
    times, alternating with the model it is compared with, and each time runs ``warmup``
    untimed calls, then ``total_runs // alternations`` timed ones. :func:`measure_calls`
    times models side by side in ``rounds`` rounds of ``runs_per_round`` calls.
    """

    warmup: int = 50
    rounds: int = 15
    runs_per_round: int = 40
    alternations: int = 3
    # measure_calls only. Before each timed block: a pause, so that the worker threads of
    # the model timed just before stop spinning and park, then a few untimed calls. ONNX
    # Runtime's idle workers spin before they park; with several multi-threaded sessions
    # alive, the previous session's spinning workers compete for the cores the next one
    # needs (on a 2-vCPU host the 2-thread fp32 CNN measured 72 µs instead of 48 µs in
    # some runs without the pause).
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
    """Batch-1 latency of each candidate against ``anchor``, each model timed alone.

    ``anchor`` and each of ``candidates`` are factories: they open the model (a session,
    an interpreter) and return its zero-argument call. A device runs one model, and how
    many other models are open changes what is measured, not alike for all models: on the
    2-vCPU host, the 2-thread int8 CNN of width 2 measured 1.47x faster than fp32 with 17
    sessions open and interleaved, 2.22x with the two alone; the int8 MLP of width 4
    1.46x beside fp32 in interleaved blocks and 2.25x alone (docs/compiler.md,
    "Pipeline", step 5). So for each candidate, the anchor and the candidate are opened
    one at a time, ``settings.alternations`` times each in alternating order; each opening
    runs ``warmup`` untimed calls, then its share of ``total_runs`` timed ones in a steady
    loop, and is released before the next.

    Each pair's samples, the anchor's and the candidate's, are scaled by (anchor p50 over
    all pairs / anchor p50 in that pair): each candidate's ratio to the anchor is the one
    measured beside it, so a host that got busier while one candidate was timed does not
    make it look slower than another. Returns the anchor's latency over every pair's
    scaled samples (its p50 is the pooled one) and each candidate's.
    """
    runs = max(1, settings.total_runs // max(1, settings.alternations))
    pairs: list[tuple[np.ndarray, np.ndarray]] = []
    for make in candidates:
        timed: tuple[list[np.ndarray], list[np.ndarray]] = ([], [])
        for r in range(max(1, settings.alternations)):
            for which in (0, 1) if r % 2 == 0 else (1, 0):
                timed[which].append(_alone(anchor if which == 0 else make, settings.warmup, runs))
        pairs.append((np.concatenate(timed[0]), np.concatenate(timed[1])))
    if not pairs:
        return _latency(_alone(anchor, settings.warmup, settings.total_runs)), []
    p50 = float(np.median(np.concatenate([base for base, _ in pairs])))
    factors = [p50 / float(np.median(base)) for base, _ in pairs]
    # The anchor's own samples are scaled the same way, so that its p95 (which a latency
    # budget checks) does not include the drift between pairs that the candidates' lose.
    anchor_lat = _latency(np.concatenate([base * k for (base, _), k in zip(pairs, factors, strict=True)]))
    return anchor_lat, [_latency(cand * k) for (_, cand), k in zip(pairs, factors, strict=True)]


def _alone(make: Callable[[], Callable[[], object]], warmup: int, runs: int) -> np.ndarray:
    """Open a model, run ``warmup`` untimed calls and ``runs`` timed ones (ms); release it."""
    call = make()
    for _ in range(warmup):
        call()
    clock = time.perf_counter_ns
    out = np.empty(runs)
    for i in range(runs):
        t0 = clock()
        call()
        out[i] = (clock() - t0) / 1e6
    return out


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
