"""Local inference: the active model, hot swaps, and per-window statistics.

:meth:`ModelServer.infer` takes a reference to the active :class:`LoadedModel` and
holds it for the duration of the call; :meth:`ModelServer.swap` replaces the reference
and retires the old model, which unloads only when its last in-flight request is done.
So requests in flight finish on the old model and new ones go to the new model, and
no request fails because of a swap.
"""

from __future__ import annotations

import random
import threading
import time
from dataclasses import dataclass

import numpy as np

from agent.errors import EdgefleetError
from agent.runtimes.base import LoadedModel

__all__ = ["NoModelError", "WindowStats", "WindowSnapshot", "ModelServer"]


class NoModelError(EdgefleetError):
    """No model is active on this device yet."""


@dataclass(frozen=True)
class WindowSnapshot:
    start: float
    end: float
    count: int
    errors: int
    p50_ms: float | None
    p95_ms: float | None
    max_ms: float | None


class WindowStats:
    """Counts and a bounded latency reservoir for one telemetry window."""

    def __init__(self, reservoir: int = 4096):
        self._lock = threading.Lock()
        self._cap = reservoir
        self._reset(time.time())

    def _reset(self, now: float) -> None:
        self.start = now
        self.count = 0
        self.errors = 0
        self._lat: list[float] = []
        self._max = 0.0

    def record(self, latency_ms: float, ok: bool) -> None:
        with self._lock:
            self.count += 1
            if not ok:
                self.errors += 1
                return
            self._max = max(self._max, latency_ms)
            if len(self._lat) < self._cap:
                self._lat.append(latency_ms)
            else:
                j = random.randrange(self.count)
                if j < self._cap:
                    self._lat[j] = latency_ms

    def snapshot_and_reset(self) -> WindowSnapshot:
        now = time.time()
        with self._lock:
            lat = np.asarray(self._lat) if self._lat else None
            snap = WindowSnapshot(
                self.start, now, self.count, self.errors,
                float(np.percentile(lat, 50)) if lat is not None else None,
                float(np.percentile(lat, 95)) if lat is not None else None,
                self._max if lat is not None else None,
            )
            self._reset(now)
        return snap

    def peek(self) -> tuple[int, int]:
        with self._lock:
            return self.count, self.errors


class ModelServer:
    def __init__(self) -> None:
        self._active: LoadedModel | None = None
        self._swap_lock = threading.Lock()
        self.window = WindowStats()
        self.health = WindowStats()  # reset by the health check at activation
        self.observers: list = []  # callables(inputs, outputs) e.g. drift sketches

    @property
    def active(self) -> LoadedModel | None:
        return self._active

    def swap(self, new: LoadedModel | None) -> LoadedModel | None:
        """Make ``new`` the active model; retire and return the old one."""
        with self._swap_lock:
            old, self._active = self._active, new
            self.health = WindowStats()
        if old is not None and old is not new:
            old.retire()
        return old

    def _acquire(self) -> LoadedModel:
        # A model retired between reading the reference and acquiring it refuses; the
        # reference has moved on by then, so read it again.
        for _ in range(100):
            m = self._active
            if m is None:
                raise NoModelError("no model is active on this device")
            if m.acquire():
                return m
        raise NoModelError("active model kept changing")  # pragma: no cover

    def infer(self, inputs: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], LoadedModel]:
        """Run inputs through the active model.

        Raises:
            NoModelError: nothing is active.
            ValueError: inputs do not fit the model.
        """
        m = self._acquire()
        t0 = time.perf_counter()
        ok = False
        health = self.health
        try:
            out = m.runtime.infer(inputs)
            ok = True
        finally:
            ms = (time.perf_counter() - t0) * 1000.0
            m.release()
            self.window.record(ms, ok)
            health.record(ms, ok)
        for obs in self.observers:
            obs(inputs, out, m)
        return out, m
