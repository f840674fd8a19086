"""Local inference: the active model, hot swaps, and per-window statistics.

:meth:`ModelServer.infer` takes a reference to the active :class:`LoadedModel` and
holds it for the duration of the call; :meth:`ModelServer.swap` replaces the reference
and retires the old model, which unloads only when its last in-flight request is done.
So requests in flight finish on the old model and new ones go to the new model, and
no request fails because of a swap.

A request takes no lock: it appends its latency to a buffer that belongs to the model
it ran on (an ``array`` append is atomic under the GIL), and the windows count those
buffers in a batch when one holds ``LATENCY_FOLD`` latencies or when a window is read.
A lock and a window update per request cost 1-2 µs beside an ONNX Runtime call
(benchmarks/agent_path_parts.py), more than the Python they run.

Observers (the drift sketch, sample capture) never run on the request path: a served
request leaves copies of its inputs and outputs in a bounded queue that the
``observers`` thread drains in batches, so a request costs two small copies and an
append, never a thread wake-up. Observers take a whole batch of requests at a time, so
that their work is vectorised rather than paid per request in Python. When observers
fall behind by ``OBSERVE_BACKLOG``
requests, further requests are not observed and are counted in
:attr:`ModelServer.observe_skipped`.

With ``observe_limit_per_s`` set, observers see a uniform random sample of the served
requests once the request rate goes above that limit: every quarter second, the share
observed becomes ``limit / rate`` of the last quarter second's rate (all of them at or
below the limit). A window also ends early once it has observed a quarter second's
worth of the limit (twice that while sampling): the rate has risen, and the share is set
from the rate so far. So after a pause, at the first request, or when the rate jumps,
about ``limit / 4`` requests are observed before the share follows; before, a burst was
observed whole for a quarter second: two tensor copies per request (4 µs on the 8x8
CNN), and a backlog that overflowed.
A request left out costs a counter and a random draw instead of two copies and the
observers' work, and is counted in :attr:`ModelServer.observe_unsampled`.
"""

from __future__ import annotations

import logging
import math
import queue
import random
import threading
import time
from array import array
from bisect import bisect_left
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from agent.errors import EdgefleetError
from agent.runtimes.base import LoadedModel

__all__ = ["NoModelError", "WindowStats", "WindowSnapshot", "ModelServer", "Candidate", "Observer",
           "Observed", "OBSERVE_BACKLOG", "OBSERVE_CHUNK", "LATENCY_FOLD", "quantile", "Totals",
           "TotalsSnapshot", "LATENCY_BUCKETS_S"]

log = logging.getLogger(__name__)

Observed = tuple[dict[str, np.ndarray], dict[str, np.ndarray], LoadedModel]
"""One served request: ``(inputs, outputs, model)``, copies the observer may keep."""

Observer = Callable[[list[Observed]], None]
"""``observer(batch)``: called on the observers thread with served requests in the order
they were served, at most ``OBSERVE_CHUNK`` at a time."""

OBSERVE_BACKLOG = 1024
"""Served requests that may wait for the observers; beyond this they are skipped."""

OBSERVE_CHUNK = 64
"""Requests per observer call: large enough to vectorise, small enough that the observers
thread hands the GIL back to request threads often."""

_OBSERVE_YIELD_EVERY = 8 * OBSERVE_CHUNK  # requests observed between GIL hand-overs
# The observers thread gathers requests this long before it runs, or until half the
# backlog is queued, whichever comes first. At the default sampling (about 200 rows a
# second) a longer batch means fewer wake-ups: 0.05 s instead of 0.01 s cut the observers
# thread's CPU per served request from 1.2-1.4 to 0.3-0.4 us on the 32x32 digits CNN
# (benchmarks/agent_bench.py, 2026-11-27, Intel Xeon). The half-full wake keeps a burst
# of sketch-every-request traffic from overflowing the backlog meanwhile.
_OBSERVE_BATCH_S = 0.05
_OBSERVE_EARLY = OBSERVE_BACKLOG // 2
_RATE_WINDOW_S = 0.25  # the observed share is recomputed from the rate over this long
_perf_counter = time.perf_counter
_random = random.random
_FAILED = math.nan  # a failed request in a latency buffer
LATENCY_FOLD = 1024
"""Latencies a model's buffer holds before the request that fills it counts them in the
windows (otherwise they are counted when a window is read)."""


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
    """Counts and a bounded latency reservoir for one telemetry window.

    The reservoir is a uniform sample of the window's successful latencies, kept with
    Li's Algorithm L (ACM TOMS 20(4), 1994): once it is full, the next item to replace
    one is drawn in advance, so a request costs a comparison instead of a random draw
    (``random.randrange`` was a third of the serving path's Python time).

    ``lock`` may be shared between windows that are updated together (the serving
    window and the health window), so that one acquisition covers both.
    """

    def __init__(self, reservoir: int = 4096, *, lock: threading.Lock | None = None):
        if reservoir < 1:
            raise ValueError(f"reservoir must be >= 1, got {reservoir}")
        self._lock = lock if lock is not None else threading.Lock()
        self._cap = reservoir
        self._reset(time.time())

    def _reset(self, now: float) -> None:
        self.start = now
        self.count = 0
        self.errors = 0
        self._lat: list[float] = []
        self._max = 0.0
        self._ok = 0  # successful latencies offered to the reservoir
        self._w = 1.0  # Algorithm L's running weight
        self._next = 0  # the ordinal (in _ok) of the next latency kept once the reservoir is full

    def _skip(self) -> None:
        """Draw which later latency replaces a kept one (Algorithm L)."""
        cap = self._cap
        self._w *= math.exp(math.log(1.0 - random.random()) / cap)
        w = self._w
        gap = math.floor(math.log(1.0 - random.random()) / math.log1p(-w)) if w < 1.0 else 0
        self._next = self._ok + gap + 1

    def record(self, latency_ms: float, ok: bool) -> None:
        with self._lock:
            self._add(latency_ms, ok)

    def _add(self, latency_ms: float, ok: bool) -> None:
        """``record`` for a caller that holds the lock."""
        self.count += 1
        if not ok:
            self.errors += 1
            return
        if latency_ms > self._max:
            self._max = latency_ms
        self._ok += 1
        lat = self._lat
        if len(lat) < self._cap:
            lat.append(latency_ms)
            if len(lat) == self._cap:
                self._skip()
        elif self._ok >= self._next:
            lat[random.randrange(self._cap)] = latency_ms
            self._skip()

    def _add_many(self, latency_ms: np.ndarray) -> None:
        """``_add`` for each of ``latency_ms`` in order, NaN for a failed request; the
        caller holds the lock. The reservoir keeps the same uniform sample that one
        ``_add`` at a time would keep."""
        n = len(latency_ms)
        if not n:
            return
        ok = latency_ms[~np.isnan(latency_ms)]
        self.count += n
        self.errors += n - len(ok)
        k = len(ok)
        if not k:
            return
        top = float(ok.max())
        if top > self._max:
            self._max = top
        base = self._ok  # ``ok[i]`` is the latency of ordinal base + i + 1
        lat = self._lat
        room = self._cap - len(lat)
        if room > 0:
            lat.extend(ok[:room].tolist())
            if len(lat) == self._cap:
                self._ok = base + room
                self._skip()
        end = base + k
        while len(lat) == self._cap and self._next <= end:
            lat[random.randrange(self._cap)] = float(ok[self._next - base - 1])
            self._ok = self._next
            self._skip()
        self._ok = end

    def snapshot_and_reset(self) -> WindowSnapshot:
        now = time.time()
        with self._lock:
            lat = np.sort(np.asarray(self._lat)) if self._lat else None
            snap = WindowSnapshot(
                self.start, now, self.count, self.errors,
                quantile(lat, 0.5) if lat is not None else None,
                quantile(lat, 0.95) if lat is not None else None,
                self._max if lat is not None else None,
            )
            self._reset(now)
        return snap

    def peek(self) -> tuple[int, int]:
        with self._lock:
            return self.count, self.errors


LATENCY_BUCKETS_S = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
                     0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
"""Upper bounds (seconds) of the buckets of :class:`Totals`' latency histogram, from 50 µs
(a small model on a gateway) to 10 s; the last bucket is unbounded."""


@dataclass(frozen=True)
class TotalsSnapshot:
    requests: int
    errors: int
    buckets: tuple[int, ...]  # successful requests per bucket of LATENCY_BUCKETS_S, and one over the last
    sum_s: float  # latency of the successful requests, summed


class Totals:
    """Requests served since the agent started: counts and a histogram of latencies, for
    the Prometheus endpoint. Unlike :class:`WindowStats` it never resets, so a scraper
    takes rates of its own. The caller holds the server's stats lock."""

    def __init__(self) -> None:
        self._bounds_ms = [b * 1000.0 for b in LATENCY_BUCKETS_S]
        self._bounds_np = np.asarray(self._bounds_ms)
        self.requests = 0
        self.errors = 0
        self._buckets = [0] * (len(LATENCY_BUCKETS_S) + 1)
        self._sum_ms = 0.0

    def _add_many(self, latency_ms: np.ndarray) -> None:
        """Count latencies (ms; NaN for a failed request)."""
        ok = latency_ms[~np.isnan(latency_ms)]
        self.requests += len(latency_ms)
        self.errors += len(latency_ms) - len(ok)
        if len(ok):
            # Bucket i holds bound[i-1] < v <= bound[i], as Prometheus' "le" reads.
            idx = np.searchsorted(self._bounds_np, ok, side="left")
            counts = np.bincount(idx, minlength=len(self._buckets)).tolist()
            self._buckets = [a + b for a, b in zip(self._buckets, counts, strict=True)]
            self._sum_ms += float(ok.sum())

    def _add(self, latency_ms: float, ok: bool) -> None:
        """One latency (a split candidate's request: counted as it is served)."""
        self.requests += 1
        if not ok:
            self.errors += 1
            return
        self._buckets[bisect_left(self._bounds_ms, latency_ms)] += 1
        self._sum_ms += latency_ms

    def snapshot(self) -> TotalsSnapshot:
        return TotalsSnapshot(self.requests, self.errors, tuple(self._buckets), self._sum_ms / 1000.0)


@dataclass
class Candidate:
    """A model running beside the active one: ``shadow`` mirrors a share of requests to it
    (responses never change); ``split`` serves a share of requests with it (A/B)."""

    model: LoadedModel
    mode: str
    ratio: float
    window: WindowStats = field(default_factory=WindowStats)
    compared: int = 0
    agreed: int = 0
    max_abs_diff: float | None = None
    skipped: int = 0

    def snapshot_and_reset(self):  # -> agent.protocol.CandidateStats
        from agent.protocol import CandidateStats, LatencyStats

        w = self.window.snapshot_and_reset()
        stats = CandidateStats(
            model=self.model.ref, mode=self.mode, ratio=self.ratio,  # type: ignore[arg-type]
            requests=w.count, errors=w.errors, compared=self.compared, agreed=self.agreed,
            max_abs_diff=self.max_abs_diff, skipped=self.skipped,
            latency=LatencyStats(p50_ms=w.p50_ms, p95_ms=w.p95_ms, max_ms=w.max_ms),
        )
        self.compared = self.agreed = self.skipped = 0
        self.max_abs_diff = None
        return stats


def quantile(ordered: np.ndarray, q: float) -> float:
    """The ``q`` quantile of a sorted, non-empty array, interpolated as ``np.quantile``
    does by default. ``np.quantile`` itself imports ``numpy.ma`` on its first call (1.2 MiB
    of the agent's memory, measured), for a window of a few thousand latencies."""
    pos = (len(ordered) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return float(ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo))


def _copies(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: v.copy() if type(v) is np.ndarray else np.array(v) for k, v in arrays.items()}


def _take_ms(buf: array) -> np.ndarray | None:
    """Remove the latencies (seconds) in ``buf`` and return them in milliseconds. Request
    threads may append meanwhile: what they add after the copy stays for the next take."""
    n = len(buf)
    if not n:
        return None
    taken = buf[:n]
    del buf[:n]
    return np.frombuffer(taken, dtype=np.float64) * 1000.0


class ModelServer:
    def __init__(self, observe_limit_per_s: float = 0.0) -> None:
        """``observe_limit_per_s``: above this request rate, observers get a uniform random
        sample of about that many requests per second; 0 (the default) observes every one."""
        if not observe_limit_per_s >= 0:  # NaN too
            raise ValueError(f"observe_limit_per_s must be >= 0, got {observe_limit_per_s}")
        # The active model and the latency buffer of its requests, read as one: a request
        # appends to the buffer it started with, so a swap never mixes the two models.
        self._serving: tuple[LoadedModel | None, array] = (None, array("d"))
        # Swapped-out models and their buffers, until their last request has added to it.
        self._retiring: list[tuple[LoadedModel, array]] = []
        self._candidate: Candidate | None = None
        # The model a swap replaced, kept loaded while its successor proves itself: a
        # request the new model fails is answered by it (see swap(keep_previous=True)).
        self._previous: LoadedModel | None = None
        # The model swapped in with keep_previous, until its deployment ends: its failed
        # requests are answered by the kept model, or after a rollback by the active one.
        self._unproven: LoadedModel | None = None
        self.previous_served = 0  # requests the new model failed and the previous one answered
        self._shadow_q: queue.Queue = queue.Queue(maxsize=256)
        self._shadow_thread: threading.Thread | None = None
        self._swap_lock = threading.Lock()
        self._stats_lock = threading.Lock()  # one lock for both windows and the buffers they take in
        self._window = WindowStats(lock=self._stats_lock)
        self._health = WindowStats(lock=self._stats_lock)  # reset by the health check at activation
        self._health_open = True  # requests count in ``health`` (until close_health; a swap reopens it)
        self._totals = Totals()  # since start, for /metrics
        self.observers: list[Observer] = []  # e.g. the drift sketch; run off the request path
        self.observe_skipped = 0
        self.observe_unsampled = 0  # served while the rate was over observe_limit_per_s, not observed
        self._observe_limit = float(observe_limit_per_s)
        self._observe_share = 1.0  # share of requests observed in this rate window
        self._observe_seen = 0  # requests served since the window began
        self._observe_taken = 0  # requests observed since the window began
        self._observe_start = 0.0  # when the window began (perf_counter; 0.0 before the first)
        self._observe_tick = 0.0  # when the window ends and the share is updated (perf_counter)
        # A window also ends once it has observed what the limit allows a whole window
        # (twice that while sampling, so that chance alone rarely ends one): the rate has
        # risen, and is measured then rather than a quarter second later. At least 8, so
        # that a rate is never taken from one gap between two requests.
        self._observe_budget = max(8.0, self._observe_limit * _RATE_WINDOW_S)
        self._observe_cap = self._observe_budget  # observed requests that end this window
        self._share_lock = threading.Lock()  # one request thread updates the share
        self._observed: deque[tuple[dict[str, np.ndarray], dict[str, np.ndarray], LoadedModel]] = deque()
        self._observer_idle = True
        self._observer_wake = threading.Event()
        self._observer_full = threading.Event()  # half the backlog is queued: run now
        self._observer_thread: threading.Thread | None = None
        self._observer_lock = threading.Lock()

    @property
    def active(self) -> LoadedModel | None:
        return self._serving[0]

    @property
    def window(self) -> WindowStats:
        """The telemetry window: every request served since its last reset, on any model."""
        self._fold()
        return self._window

    @property
    def health(self) -> WindowStats:
        """The health window: requests served by the active model since it was swapped in
        (until :meth:`close_health`). A request still running on the model before it, and
        finishing meanwhile, counts only in :attr:`window`."""
        self._fold()
        return self._health

    def totals(self) -> TotalsSnapshot:
        """Requests served since start, on any model (split candidates included)."""
        with self._stats_lock:
            self._fold_locked()
            return self._totals.snapshot()

    def swap(self, new: LoadedModel | None, *, keep_previous: bool = False) -> LoadedModel | None:
        """Make ``new`` the active model and return the old one, which is retired (it
        unloads once its last request is done).

        With ``keep_previous``, the old model stays loaded instead, until
        :meth:`drop_previous` or the next swap: a request that ``new`` fails (its runtime
        raises) is answered by the old model, and still counts as a failure of ``new`` in
        the windows, so that the health check sees it. Swapping back to the kept model
        (a rollback) needs no reload.
        """
        with self._swap_lock, self._stats_lock:
            self._fold_locked()  # what the old model served so far counts in its health window
            old, buf = self._serving
            if old is not None and old is not new:
                self._retiring.append((old, buf))
            if old is new:
                new_buf = buf
            else:
                # A model coming back (a rollback to the kept one) takes its own buffer
                # back from the retiring list, emptied by the fold above.
                back = [b for m, b in self._retiring if m is new]
                self._retiring = [(m, b) for m, b in self._retiring if m is not new]
                new_buf = back[0] if back else array("d")
            self._serving = (new, new_buf)
            self._health = WindowStats(lock=self._stats_lock)
            self._health_open = True
            dropped = self._previous
            kept = old if keep_previous and old is not new else None
            self._previous = kept
            if keep_previous:
                self._unproven = new
            elif new is None or new is not dropped:
                self._unproven = None
            # else: a rollback; requests still running on the unproven model are answered
            # by the model swapped back in
        for m in (old, dropped):  # retire() is idempotent
            if m is not None and m is not new and m is not kept:
                m.retire()
        return old

    def drop_previous(self) -> None:
        """Retire the model kept by ``swap(keep_previous=True)`` (its successor has proven
        itself, or the deployment has ended)."""
        with self._swap_lock:
            prev, self._previous = self._previous, None
            self._unproven = None
        if prev is not None and prev is not self._serving[0]:
            prev.retire()

    @property
    def previous(self) -> LoadedModel | None:
        """The model kept loaded behind the active one, if any."""
        return self._previous

    def close_health(self) -> None:
        """Stop counting requests in ``health`` until the next swap: no health check is
        waiting for them (the deployment has ended)."""
        with self._stats_lock:
            self._fold_locked()
            self._health_open = False

    # ------------------------------------------------------------------ candidates

    @property
    def candidate(self) -> Candidate | None:
        return self._candidate

    def set_candidate(self, model: LoadedModel | None, mode: str = "shadow", ratio: float = 0.1) -> None:
        """Attach (or with None, detach) a shadow/split candidate; the old one is retired."""
        with self._swap_lock:
            old = self._candidate
            self._candidate = Candidate(model, mode, ratio) if model is not None else None
        if old is not None and old.model is not model:
            old.model.retire()
        if model is not None and mode == "shadow" and self._shadow_thread is None:
            self._shadow_thread = threading.Thread(target=self._shadow_loop, name="shadow", daemon=True)
            self._shadow_thread.start()

    def _shadow_loop(self) -> None:
        while True:
            cand, inputs, active_out = self._shadow_q.get()
            try:
                self._shadow_one(cand, inputs, active_out)
            except Exception:  # the shadow must outlive any candidate and any output shape
                log.exception("shadow comparison with %s failed", cand.model.ref)

    def _shadow_one(self, cand: Candidate, inputs: dict[str, np.ndarray], active_out: dict[str, np.ndarray]) -> None:
        if not cand.model.acquire():
            return  # retired meanwhile
        t0 = time.perf_counter()
        try:
            out = cand.model.runtime.infer(inputs)
            ok = True
        except Exception as e:  # a runtime may raise more than ValueError (ORT's RuntimeException)
            log.warning("shadow candidate %s failed: %s", cand.model.ref, e)
            ok, out = False, None
        finally:
            cand.model.release()
        cand.window.record((time.perf_counter() - t0) * 1000.0, ok)
        if out is None or not active_out or not out:
            return
        a = np.atleast_1d(next(iter(active_out.values())))
        c = np.atleast_1d(out.get(next(iter(active_out)), next(iter(out.values()))))
        if a.shape != c.shape:
            cand.compared += len(a)
            return
        diff = float(np.max(np.abs(a.astype(np.float64) - c.astype(np.float64)))) if a.size else 0.0
        cand.max_abs_diff = diff if cand.max_abs_diff is None else max(cand.max_abs_diff, diff)
        rows = a.reshape(len(a), -1) if a.ndim > 1 else a.reshape(-1, 1)
        crow = c.reshape(len(c), -1) if c.ndim > 1 else c.reshape(-1, 1)
        cand.compared += len(rows)
        if rows.shape[1] == 0:
            cand.agreed += len(rows)  # nothing to disagree on
            return
        cand.agreed += int(np.sum(rows.argmax(axis=1) == crow.argmax(axis=1)))

    def _serve_split(self, cand: Candidate, inputs: dict[str, np.ndarray]):
        if not cand.model.acquire():
            return None
        t0 = time.perf_counter()
        try:
            out = cand.model.runtime.infer(inputs)
        except Exception as e:
            # The candidate must never cost a request: fall back to the active model.
            log.warning("split candidate %s failed, serving from the active model: %s", cand.model.ref, e)
            cand.window.record((time.perf_counter() - t0) * 1000.0, False)
            return None
        finally:
            cand.model.release()
        ms = (time.perf_counter() - t0) * 1000.0
        cand.window.record(ms, True)
        with self._stats_lock:
            self._window._add(ms, True)
            self._totals._add(ms, True)
        return out

    # ------------------------------------------------------------------ serving

    def _acquire(self) -> tuple[LoadedModel, array]:
        # A model retired between reading the reference and acquiring it refuses; the
        # reference has moved on by then, so read it again.
        for _ in range(100):
            m, buf = self._serving
            if m is None:
                raise NoModelError("no model is active on this device")
            if m.acquire():
                return m, buf
        raise NoModelError("active model kept changing")  # pragma: no cover

    def infer(self, inputs: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], LoadedModel]:
        """Run inputs through the active model.

        Raises:
            NoModelError: nothing is active.
            ValueError: inputs do not fit the model.
        """
        cand = self._candidate
        if cand is not None and cand.mode == "split" and _random() < cand.ratio:
            out = self._serve_split(cand, inputs)
            if out is not None:
                if self.observers:
                    self._sampled_observe(inputs, out, cand.model, _perf_counter())
                return out, cand.model
        m, lat = self._serving
        if m is None or not m.acquire():
            m, lat = self._acquire()
        # The request's latency goes into the buffer, without a lock; the windows take
        # the buffer in at LATENCY_FOLD latencies or when they are read. It is appended
        # before the model is released, so a model with no request in flight has added
        # all of its latencies.
        t0 = _perf_counter()
        try:
            out = m.runtime.infer(inputs)
            t1 = _perf_counter()
            lat.append(t1 - t0)
        except BaseException as e:
            lat.append(_FAILED)
            if m is self._unproven and isinstance(e, Exception):
                other = self._previous or self._serving[0]
                if other is not None and other is not m:
                    return self._serve_instead(other, m, inputs, e)
            raise
        finally:
            m.release()
            if len(lat) >= LATENCY_FOLD:
                self._fold()
        if self.observers:
            self._sampled_observe(inputs, out, m, t1)
        if cand is not None and cand.mode == "shadow" and _random() < cand.ratio:
            try:
                self._shadow_q.put_nowait((cand, inputs, out))
            except queue.Full:
                cand.skipped += 1
        return out, m

    def _serve_instead(self, other: LoadedModel, failed: LoadedModel, inputs: dict[str, np.ndarray],
                       error: Exception) -> tuple[dict[str, np.ndarray], LoadedModel]:
        """Answer with ``other`` (the kept or the restored model) a request that ``failed``,
        the model on trial, failed; raise its error when ``other`` fails too (the inputs
        are at fault) or is gone."""
        if not other.acquire():
            raise error
        try:
            out = other.runtime.infer(inputs)
        except Exception as e:
            log.debug("%s failed a request that %s failed too: %s", other.ref, failed.ref, e)
            raise error from None
        finally:
            other.release()
        self.previous_served += 1
        return out, other

    def _fold(self) -> None:
        with self._stats_lock:
            self._fold_locked()

    def _fold_locked(self) -> None:
        """Count the buffered latencies in the windows; the caller holds the stats lock.
        Those of the active model count in the health window too, while it is open; a
        request that ran on a model swapped out meanwhile says nothing about the health
        of its successor."""
        vals = _take_ms(self._serving[1])
        if vals is not None:
            self._window._add_many(vals)
            self._totals._add_many(vals)
            if self._health_open:
                self._health._add_many(vals)
        if self._retiring:
            keep = []
            for m, buf in self._retiring:
                # Done when retired with nothing in flight, read in that order before the
                # take: a request that acquires after the retire backs out without
                # appending, and one in flight appends before it releases. (swap()
                # retires the model only after it has left the lock.)
                done = m.retired and m.inflight == 0
                vals = _take_ms(buf)
                if vals is not None:
                    self._window._add_many(vals)
                    self._totals._add_many(vals)
                if not done:
                    keep.append((m, buf))
            self._retiring = keep

    # ------------------------------------------------------------------ observers

    def _sampled_observe(
        self, inputs: dict[str, np.ndarray], outputs: dict[str, np.ndarray], model: LoadedModel, now: float
    ) -> None:
        """Observe one served request, or only count it when the rate is over the limit."""
        if self._observe_limit <= 0.0:
            self._observe(inputs, outputs, model)
            return
        # Request threads may race on the counters: a lost increment only nudges the
        # share, which is an estimate anyway. The update itself is one thread's.
        self._observe_seen += 1
        if now >= self._observe_tick:
            self._new_rate_window()
        share = self._observe_share
        if share >= 1.0 or _random() < share:
            self._observe_taken += 1
            if self._observe_taken >= self._observe_cap:
                self._new_rate_window()
            self._observe(inputs, outputs, model)
        else:
            self.observe_unsampled += 1

    def _new_rate_window(self) -> None:
        if not self._share_lock.acquire(blocking=False):
            return  # another request thread is updating the share
        try:
            # The clock is read here: a request's own time may be older than the window
            # another thread has just begun.
            now = _perf_counter()
            if now >= self._observe_tick or self._observe_taken >= self._observe_cap:
                self._update_share(now)
        finally:
            self._share_lock.release()

    def _update_share(self, now: float) -> None:
        seen, self._observe_seen = self._observe_seen, 0
        self._observe_taken = 0
        elapsed = now - self._observe_start
        if self._observe_start == 0.0 or elapsed > 2 * _RATE_WINDOW_S:
            # First request, or after a pause: start from all, until the window ends or
            # its budget is observed, whichever comes first.
            self._observe_share = 1.0
        else:
            rate = seen / max(elapsed, 1e-4)
            self._observe_share = 1.0 if rate <= self._observe_limit else self._observe_limit / rate
        self._observe_cap = self._observe_budget if self._observe_share >= 1.0 else 2 * self._observe_budget
        self._observe_start = now
        self._observe_tick = now + _RATE_WINDOW_S

    def _observe(self, inputs: dict[str, np.ndarray], outputs: dict[str, np.ndarray], model: LoadedModel) -> None:
        """Queue copies of one served request for the observers (the caller may reuse its buffers)."""
        q = self._observed
        if len(q) >= OBSERVE_BACKLOG:
            self.observe_skipped += 1
            return
        q.append((_copies(inputs), _copies(outputs), model))
        if self._observer_idle:
            self._observer_idle = False
            self._start_observers()
            self._observer_wake.set()
        elif len(q) >= _OBSERVE_EARLY:
            self._observer_full.set()

    def _start_observers(self) -> None:
        if self._observer_thread is None:
            with self._observer_lock:
                if self._observer_thread is None:
                    t = threading.Thread(target=self._observer_loop, name="observers", daemon=True)
                    t.start()
                    self._observer_thread = t

    def _observer_loop(self) -> None:
        q = self._observed
        while True:
            self._observer_wake.wait()
            self._observer_wake.clear()
            # Gather a batch: one wake-up per batch, not per request.
            self._observer_full.wait(_OBSERVE_BATCH_S)
            self._observer_full.clear()
            while True:
                done = 0
                while q:
                    popleft = q.popleft
                    batch = [popleft() for _ in range(min(len(q), OBSERVE_CHUNK))]
                    for obs in list(self.observers):
                        try:
                            obs(batch)
                        except Exception:  # an observer must never stop the others or serving
                            log.exception("observer %r failed", obs)
                    done += len(batch)
                    if done >= _OBSERVE_YIELD_EVERY:
                        # Hand the GIL over: a request thread back from the runtime must
                        # not wait for the whole backlog (up to the 5 ms switch interval).
                        # Not after every chunk: while this thread waits for the GIL,
                        # every runtime call hands it over, and those hand-offs cost more
                        # CPU than the sketch (measured: benchmarks/agent_bench.py).
                        done = 0
                        time.sleep(0)
                self._observer_idle = True
                if not q:
                    break
                self._observer_idle = False  # a request arrived between the drain and the flag

    def flush_observers(self, timeout: float = 5.0) -> bool:
        """Wait until every queued request has been observed (for tests and benchmarks).
        Returns False on timeout."""
        deadline = time.monotonic() + timeout
        while self._observed or not self._observer_idle:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.002)
        return True
