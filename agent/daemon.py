"""The agent daemon: connection, lifecycle worker, local inference, telemetry.

Threads: the MQTT link, one lifecycle worker (deployments run one at a time), a
telemetry ticker, a spool sender (which also uploads captured samples when that is
switched on), the server's observers thread (drift sketches and sample capture, off
the request path), and the optional localhost HTTP server.
"""

from __future__ import annotations

import logging
import platform
import queue
import shutil
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import ValidationError

import agent
from agent import topics
from agent.bundle import BundleLimits, file_sha256, read_manifest
from agent.capture import CaptureStore
from agent.config import AgentSettings
from agent.connection import Link, parse_broker_url
from agent.errors import (
    BundleError,
    DiskSpaceError,
    EdgefleetError,
    ExpiredMetadataError,
    PayloadError,
    RuntimeLoadError,
    TransportError,
    TrustError,
    first_error,
)
from agent.health import ProbeFailed, run_probe
from agent.hooks import HookFailed, Hooks
from agent.lifecycle import (
    MAX_SAVES_PER_DEPLOYMENT,
    OUTCOME,
    RESUME,
    ROLLBACK_SAVES_PAST_CAP,
    TERMINAL,
    DeploymentRecord,
    Event,
    State,
    StateStore,
    next_state,
)
from agent.localapi import LocalApi
from agent.memory import Released, release_cold_pages, rss_bytes
from agent.profiles import Profile, load_profile
from agent.protocol import (
    MAX_COUNT,
    MAX_FEEDBACK_ITEMS,
    MAX_JSON_PAYLOAD,
    Deployment,
    Feedback,
    Hello,
    LabelRecord,
    LatencyStats,
    PayloadCounters,
    StatusReport,
    Telemetry,
    decode,
    encode,
)
from agent.runtimes.base import LoadedModel, available_runtimes, load_bundle
from agent.serving import ModelServer, Observed, quantile
from agent.sketch import SketchAccumulator
from agent.slots import SlotName, Slots, atomic_write
from agent.spool import Priority, Spool
from agent.transfer import HttpRepoClient, RepoClient, TransferSettings

__all__ = ["Agent", "run_selftest"]

log = logging.getLogger(__name__)

RELEASE_AFTER_GROWTH = 2 << 20
"""After a deployment, the agent releases memory again (agent.memory) when its RSS grew
by this much since the last release, which a deployment that loaded a model does: on the
benchmark VM the second deployment of the same small ONNX model brought 15 MiB of ONNX
Runtime's session-building code back. Growth from serving since the last release counts
too; a deployment refused at once, after a quiet spell, costs no release."""

RELEASE_DELAY_S = 10.0
"""A deployment's memory release (agent.memory) waits this long for another deployment:
one that comes meanwhile finds the code it needs still resident, and the release runs
once after the last of them. Ten deployments within 8 s under 500 requests/s lost a
quarter of the requests' throughput to a release after each (tests/agent/test_serving.py)."""

PROGRESS_REPORT_S = 30.0
"""Least seconds between two progress reports of a download (each is a status record)."""


def run_selftest(model: LoadedModel) -> None:
    """Run the bundle's self-test vectors through ``model``.

    Raises:
        agent.errors.SelfTestError: an output is missing or outside the tolerance.
    """
    from agent.errors import SelfTestError

    st = model.bundle.selftest()
    try:
        got = model.runtime.infer(st.inputs)
    except ValueError as e:
        raise SelfTestError(f"{model.ref}: self-test inputs rejected: {e}") from e
    for name, want in st.outputs.items():
        if name not in got:
            raise SelfTestError(f"{model.ref}: self-test output {name!r} missing")
        if got[name].shape != want.shape:
            raise SelfTestError(f"{model.ref}: self-test output {name!r} has shape {list(got[name].shape)}, "
                                f"expected {list(want.shape)}")
        diff = float(np.max(np.abs(got[name].astype(np.float64) - want.astype(np.float64)))) if want.size else 0.0
        if not np.isfinite(diff) or diff > st.tolerance:
            raise SelfTestError(
                f"{model.ref}: self-test output {name!r} differs by {diff:.3g} (tolerance {st.tolerance:.3g})"
            )


class _Reject(Exception):
    """Internal: a handler found bad data; carries the error kind."""

    def __init__(self, message: str, kind: str):
        super().__init__(message)
        self.kind = kind


class _Stopped(Exception):
    """Internal: the agent is shutting down; leave the record in its state to resume."""


class _Fail(Exception):
    def __init__(self, message: str, kind: str):
        super().__init__(message)
        self.kind = kind


class Agent:
    def __init__(self, settings: AgentSettings):
        self.settings = settings
        self.data_dir = settings.data_dir
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.profile: Profile = load_profile(settings.profile, settings.profiles_dir)
        self.slots = Slots(self.data_dir / "slots", BundleLimits(max_model_bytes=self.profile.limits.max_model_bytes))
        self.store = StateStore(self.data_dir / "state.json")
        self.spool = Spool(self.data_dir / "spool.sqlite", settings.spool_max_bytes)
        self.server = ModelServer(observe_limit_per_s=settings.drift_max_rows_per_s)
        self.payload_errors = PayloadCounters()
        self.runtimes, self.unavailable_runtimes = available_runtimes()
        self.link = Link(settings.device_id, parse_broker_url(settings.broker_url), on_connect=self._on_connect,
                         max_delay=settings.reconnect_max_delay)
        self.repo = RepoClient(
            settings.device_id,
            self.link,
            TransferSettings(
                chunk_size=settings.chunk_size,
                window=settings.transfer_window,
                timeout_s=settings.transfer_timeout,
                bandwidth_bytes_per_s=settings.bandwidth_limit,
            ),
        )
        self.fetch_client: RepoClient | HttpRepoClient = self.repo
        if settings.repository_url:
            self.fetch_client = HttpRepoClient(settings.repository_url, self.repo.settings)
        self.link.on("deploy", self._on_deploy)
        self.link.on("repo/data", lambda _t, p: self.repo.on_frame(p))
        self.api: LocalApi | None = None
        self.hooks = Hooks(settings.hooks_dir or self.data_dir / "hooks", settings.hook_timeout)
        self._activated_at = 0.0  # wall clock, for readiness-file mtimes
        self._activated_mono = 0.0  # monotonic, for delays
        self._sketches: dict[str, SketchAccumulator] = {}
        # Sketching and capture run on the server's observers thread, off the request
        # path; when they fall behind, requests go unobserved and are counted
        # (ModelServer.observe_skipped, reported in telemetry).
        self._sketch_lock = threading.Lock()
        self.server.observers.append(self._observe)
        self.capture: CaptureStore | None = None
        if settings.capture_per_minute > 0:
            self.capture = CaptureStore(
                self.data_dir / "captures",
                per_minute=settings.capture_per_minute,
                max_bytes=settings.capture_max_bytes,
                max_sample_bytes=settings.capture_max_sample_bytes,
            )
        self._labels: list[LabelRecord] = []
        self._labels_lock = threading.Lock()
        self._report_lock = threading.Lock()
        self.feedback_dropped = 0
        self._pending: queue.Queue[Deployment | None] = queue.Queue()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._candidate: LoadedModel | None = None
        self.released: Released | None = None  # the last agent.memory release, when one ran
        self._told_not_owned = False
        self._rss_settled: int | None = None  # RSS right after the last release and warm-up
        self._release_unavailable = False
        self._release_due: float | None = None  # monotonic time of the release after a deployment
        self._conditions: set[str] = set()
        if self.spool.reset_reason is not None:
            self._conditions.add("spool_reset")  # reported once connected; the reason is in the log
        self.record = self.store.load(set_aside=True)

    # ------------------------------------------------------------------ public API

    def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run inference on the active model (the Python API for on-device apps).

        Raises:
            agent.serving.NoModelError: nothing is installed yet.
            ValueError: the inputs do not fit the model.
        """
        out, _ = self.server.infer(inputs)
        return out

    def feedback(
        self,
        label: int | str,
        prediction: int | str,
        *,
        model: str | None = None,
        request_id: str | None = None,
        ts: float | None = None,
        score: float | dict[str, float] | None = None,
    ) -> None:
        """Record the true label of one prediction made on this device.

        Labels are batched and sent to the hub with the next telemetry interval
        (topic ``feedback``), where they feed accuracy, precision, recall, F1 and AUC
        per window. ``request_id`` (for example the V2 request ``id``) makes a resend
        harmless. ``model`` defaults to the active model.

        Raises:
            ValueError: a field is invalid (the message names it), or no model is
                active and ``model`` was not given.
        """
        ref = model or self.model_ref
        if ref is None:
            raise ValueError("feedback: no model is active; pass model='name:version'")
        try:
            rec = LabelRecord(
                model=ref, request_id=request_id, ts=time.time() if ts is None else ts,
                label=label, prediction=prediction, score=score,
            )
        except ValidationError as e:
            raise ValueError(f"feedback: {first_error(e)}") from e
        with self._labels_lock:
            if len(self._labels) >= self.settings.feedback_max_pending:
                self.feedback_dropped += 1
                return
            self._labels.append(rec)
            full = len(self._labels) >= MAX_FEEDBACK_ITEMS
        if full:
            self._flush_feedback()

    def _flush_feedback(self) -> None:
        with self._labels_lock:
            labels, self._labels = self._labels, []
        for part in _feedback_parts(labels):
            msg = Feedback(seq=self._next_seq("seq.feedback"), items=part)
            self.spool.push(Priority.DRIFT, topics.device_topic(self.settings.device_id, "feedback"), encode(msg))

    @property
    def model_ref(self) -> str | None:
        m = self.server.active
        return m.ref if m is not None else None

    def start(self) -> None:
        self._load_active()
        if self.record.state in TERMINAL:
            self.server.close_health()  # no health check is waiting for requests
        self._release_memory()
        if self.settings.api_port or self.settings.api_socket:
            self.api = LocalApi(self.server, self.settings.api_port, socket_path=self.settings.api_socket,
                                feedback=self.feedback, metrics=self._metrics_endpoint)
            self.api.start()
        self.link.start()
        for name, target in (
            ("lifecycle", self._worker),
            ("telemetry", self._telemetry_loop),
            ("spool-sender", self._sender_loop),
        ):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self) -> None:
        self._stop.set()
        self._pending.put(None)
        self.spool.available.set()
        if self.api is not None:
            self.api.stop()
        self.link.stop()
        for t in self._threads:
            t.join(timeout=5)
        self._flush_feedback()
        self.spool.close()

    def wait_stopped(self) -> None:
        self._stop.wait()

    # ------------------------------------------------------------------ boot

    def _load_active(self) -> None:
        """Serve the model the slot pointer names, or the other slot's when that one
        does not load. No pointer (nothing was ever activated) or one that says "none"
        (a first deployment rolled back to nothing) means serve nothing: a slot may hold
        a first deployment that failed, and it must not come back at the next start. A
        torn pointer (outside interference) falls back to whichever slot loads, the one
        the deployment record committed last, or else the one it was not installing."""
        self.slots.clean_staging()
        pointer = self.slots.pointer()
        rec = self.record
        if rec.state not in TERMINAL and RESUME[rec.state] == State.ROLLING_BACK:
            # The deployment will roll back as soon as the worker starts: serve what it
            # rolls back to from the start, never the unproven model (which may be what
            # brought the agent down). The new model is the last resort.
            if rec.from_slot is None:
                log.info("deployment %s rolls back to serving nothing", rec.deployment_id)
                return
            pointer = rec.from_slot
        if pointer in ("none", "missing"):
            log.info("no model is active (slot pointer: %s)", pointer)
            return
        active: SlotName | None = pointer if pointer in ("a", "b") else None  # type: ignore[assignment]
        order: list[SlotName] = [active] if active else []
        # Torn pointer: the slot the record committed last comes first; a slot it was
        # installing and never committed comes last.
        last = self.record.to_slot
        committed = self.record.state == State.COMMITTED
        rest: list[SlotName] = [s for s in ("a", "b") if s not in order]  # type: ignore[misc]
        order += sorted(rest, key=lambda s: (s != last) if committed else (s == last))
        for slot in order:
            b = self.slots.bundle(slot)
            if b is None:
                continue
            try:
                lm = load_bundle(b, self.profile.runtime_options, slot)
            except RuntimeLoadError as e:
                log.error("slot %s does not load: %s", slot, e)
                continue
            if slot != active:
                log.warning("active slot %s unusable; serving slot %s instead", active, slot)
                self.slots.activate(slot)
            self.server.swap(lm)
            log.info("serving %s from slot %s", lm.ref, slot)
            self._reattach_candidate(slot)
            return
        log.info("no model installed yet")

    def _reattach_candidate(self, active_slot: str) -> None:
        rec = self.record
        if rec.state != State.CANDIDATE or rec.to_slot is None or rec.to_slot == active_slot:
            return
        b = self.slots.bundle(rec.to_slot)  # type: ignore[arg-type]
        if b is None:
            return
        try:
            cand = load_bundle(b, self.profile.runtime_options, rec.to_slot)
        except RuntimeLoadError as e:
            log.error("candidate %s no longer loads: %s", rec.model, e)
            return
        self.server.set_candidate(cand, rec.mode, rec.ratio)
        log.info("resumed %s candidate %s (ratio %.2f)", rec.mode, cand.ref, rec.ratio)

    # ------------------------------------------------------------------ MQTT inbound

    def _on_connect(self) -> None:
        hello = Hello(
            device_id=self.settings.device_id,
            profile=self.profile.name,
            agent_version=agent.__version__,
            runtimes=self.runtimes,
            unavailable_runtimes=self.unavailable_runtimes,
            tags=self.settings.tags,
            platform=f"{platform.system()}-{platform.machine()}",
            model=self.model_ref,
            previous_model=self._previous_ref(),
        )
        self.link.publish(topics.device_topic(self.settings.device_id, "hello"), encode(hello), qos=1, retain=True)
        self._report()

    def _on_deploy(self, _topic: str, payload: bytes) -> None:
        if not payload:
            return  # a cleared retained message
        try:
            dep = decode(Deployment, payload)
        except PayloadError as e:
            self.payload_errors.add(e)
            log.warning("ignored deploy message: %s", e)
            return
        self._pending.put(dep)

    # ------------------------------------------------------------------ reporting

    def _previous_ref(self) -> str | None:
        active = self.slots.active_name()
        if active is None:
            return None
        b = self.slots.bundle("b" if active == "a" else "a")
        return b.manifest.ref if b else None

    def _download_progress(self) -> Callable[[int, int], None]:
        """A transfer's progress callback: a status report with ``progress`` at most
        every PROGRESS_REPORT_S, so that the hub (and a campaign's report timeout) sees
        a long download alive."""
        last = [time.monotonic()]

        def progress(done: int, total: int) -> None:
            now = time.monotonic()
            if total > 0 and now - last[0] >= PROGRESS_REPORT_S:
                last[0] = now
                self._report(progress=min(1.0, done / total))

        return progress

    def _report(self, progress: float | None = None) -> None:
        # One report at a time (the lifecycle and MQTT threads both report): the record
        # is read, numbered and queued together, so the later state has the higher seq
        # (the hub drops the lower).
        with self._report_lock:
            rec = self.record
            outcome = OUTCOME.get(rec.state, "in_progress")
            if rec.state == State.FAILED and rec.rejected:
                outcome = "rejected"
            report = StatusReport(
                seq=self._next_seq("seq.status"),
                seq_epoch=self.spool.epoch,
                deployment_id=rec.deployment_id,
                state=rec.state.value,
                outcome=outcome,  # type: ignore[arg-type]
                model=self.model_ref,
                previous_model=self._previous_ref(),
                target_model=rec.model,
                error=rec.error,
                error_kind=rec.error_kind,
                progress=progress,
                conditions=sorted(self._conditions),
            )
            # A progress report is the most expendable record (first dropped from a full
            # spool, sent after lifecycle reports) and is not retained: delivered late, it
            # must not become the status a broker keeps for the device (the hub drops it
            # by its seq).
            progressing = progress is not None
            self.spool.push(
                Priority.METRICS if progressing else Priority.STATUS,
                topics.device_topic(self.settings.device_id, "status"), encode(report), retain=not progressing,
            )

    def _next_seq(self, name: str) -> int:
        return self.spool.next_seq(name)

    # ------------------------------------------------------------------ drift

    def _observe(self, batch: list[Observed]) -> None:
        """Sketch served requests, and capture those a free capture token admits. Runs on
        the server's observers thread, on copies of the tensors (inputs never leave the
        device; only sketches do)."""
        i = 0
        while i < len(batch):
            model = batch[i][2]
            j = i + 1
            while j < len(batch) and batch[j][2] is model:
                j += 1
            try:
                self._sketch(batch[i:j], model)
            except Exception:  # one model's sketch failing must not cost the others or capture
                log.exception("drift sketch of %s failed for %d requests", model.ref, j - i)
            i = j
        if self.capture is not None:
            added = False
            for inputs, outputs, model in batch:
                if self.capture.admit():
                    self._capture_one(inputs, outputs, model, time.time())
                    added = True
            if added and self.settings.capture_upload:
                self.spool.available.set()  # wake the sender: it uploads captures when idle

    def _capture_one(
        self, inputs: dict[str, np.ndarray], outputs: dict[str, np.ndarray], model: LoadedModel, ts: float
    ) -> None:
        assert self.capture is not None
        try:
            self.capture.add(model.ref, ts, inputs, outputs)
        except OSError as e:
            self.capture.counts["write_failed"] += 1
            log.warning("could not store a captured sample: %s", e)

    def _sketch(self, served: list[Observed], model: LoadedModel) -> None:
        """Hand one model's served requests to its sketch, without another copy."""
        acc = self._sketches.get(model.ref)
        if acc is None:
            acc = self._new_sketch(model)
            if acc is None:
                return
        man = model.bundle.manifest
        x_name, y_name = man.inputs[0].name, man.outputs[0].name
        try:  # a served request has every input and output of its model
            xs = [i[x_name] for i, _, _ in served]
            ys = [o[y_name] for _, o, _ in served]
        except KeyError:
            kept = [(i[x_name], o[y_name]) for i, o, _ in served if x_name in i and y_name in o]
            xs, ys = [x for x, _ in kept], [y for _, y in kept]
        if xs:
            acc.update_many(xs, ys)

    def _new_sketch(self, model: LoadedModel) -> SketchAccumulator | None:
        with self._sketch_lock:
            if model.ref in self._sketches:
                return self._sketches[model.ref]
            try:
                reference = model.bundle.reference()
            except BundleError as e:
                log.warning("no drift reference for %s: %s", model.ref, e)
                return None
            acc = self._sketches[model.ref] = SketchAccumulator(reference, model.ref)
        return acc

    def _push_drift(self, acc: SketchAccumulator) -> None:
        sketch = acc.snapshot_and_reset(time.time())
        if sketch.rows == 0:
            return
        self.spool.push(Priority.DRIFT, topics.device_topic(self.settings.device_id, "drift"), sketch.encode())

    def _telemetry_loop(self) -> None:
        import psutil

        proc = psutil.Process()
        proc.cpu_percent(None)
        while not self._stop.wait(self.settings.telemetry_interval):
            live = {m.ref for m in (self.server.active, getattr(self.server.candidate, "model", None)) if m}
            with self._sketch_lock:
                accs = list(self._sketches.values())
                for ref in [r for r in self._sketches if r not in live]:
                    del self._sketches[ref]
            for acc in accs:
                self._push_drift(acc)
            self._flush_feedback()
            cand = self.server.candidate
            snap = self.server.window.snapshot_and_reset()
            t = Telemetry(
                seq=self._next_seq("seq.telemetry"),
                window_start=snap.start,
                window_end=snap.end,
                model=self.model_ref,
                inference_count=snap.count,
                error_count=snap.errors,
                latency=LatencyStats(p50_ms=snap.p50_ms, p95_ms=snap.p95_ms, max_ms=snap.max_ms),
                cpu_percent=proc.cpu_percent(None),
                rss_bytes=proc.memory_info().rss,
                dropped_records=self.spool.dropped(),
                payload_errors=self.payload_errors.snapshot(),
                candidate=cand.snapshot_and_reset() if cand is not None else None,
                capture=self.capture.snapshot() if self.capture is not None else None,
                feedback_dropped=self.feedback_dropped,
                observe_skipped=self.server.observe_skipped,
                observe_unsampled=self.server.observe_unsampled,
            )
            self.spool.push(Priority.METRICS, topics.device_topic(self.settings.device_id, "telemetry"), encode(t))

    def _sender_loop(self) -> None:
        # Nothing may end this thread but stop(): a device whose sender died reports
        # nothing until restarted. An unexpected error is logged and retried, waiting
        # longer each time it repeats (up to a minute) so that a lasting one does not
        # flood the log.
        backoff = 0.0
        while not self._stop.is_set():
            try:
                if not self.link.connected.wait(timeout=0.5):
                    continue
                rec = self.spool.peek()
                if rec is None:
                    if self._upload_capture():
                        continue
                    # push(), stop() and a new capture to upload set the event; the timeout
                    # is a safety net, not a poll
                    self.spool.available.wait(timeout=5.0)
                    continue
                try:
                    self.link.publish_wait(rec.topic, rec.payload, qos=1, retain=rec.retain, key=("spool", rec.id))
                except TransportError:
                    self._stop.wait(0.5)
                    continue
                self.spool.ack(rec.id)
                backoff = 0.0
            except Exception:
                if self._stop.is_set():
                    break  # the spool closed under a stopping agent
                backoff = min(max(backoff * 2, 0.5), 60.0)
                log.exception("spool sender: unexpected error; retrying in %.1f s", backoff)
                self._stop.wait(backoff)

    def _upload_capture(self) -> bool:
        """Send the oldest captured sample (only when the spool is empty); True if sent."""
        if self.capture is None or not self.settings.capture_upload:
            return False
        item = self.capture.oldest()
        if item is None:
            return False
        name, frame = item
        try:
            self.link.publish_wait(topics.device_topic(self.settings.device_id, "capture"), frame, qos=1,
                                   key=("capture", name))
        except TransportError:
            self._stop.wait(0.5)
            return False
        self.capture.remove(name)
        return True

    # ------------------------------------------------------------------ lifecycle

    def _worker(self) -> None:
        rec = self.record
        if rec.state not in TERMINAL:
            resumed = RESUME[rec.state]
            log.warning("resuming deployment %s: saved state %s -> %s", rec.deployment_id, rec.state, resumed)
            rec.state = resumed
            self._guarded(self._run, rec)
        while not self._stop.is_set():
            due = self._release_due
            try:
                dep = self._pending.get(timeout=None if due is None else max(0.0, due - time.monotonic()))
            except queue.Empty:  # no deployment since the last one ended: give memory back now
                self._release_due = None
                try:
                    self._release_memory(min_growth=RELEASE_AFTER_GROWTH)
                except Exception:  # it catches its own; this thread must outlive any defect in it
                    log.exception("releasing memory failed; serving goes on")
                continue
            if dep is None:
                return
            # Only the newest desired state matters.
            while not self._pending.empty():
                nxt = self._pending.get_nowait()
                if nxt is None:
                    return
                dep = nxt
            self._guarded(self._accept, dep)

    def _guarded(self, fn: Callable[[Any], None], arg: Any) -> None:
        """Run one lifecycle step; an error that escapes it (a defect: the states turn
        every fault they foresee into an event) is logged and kept as the last error, and
        the thread goes on taking deployments."""
        try:
            fn(arg)
        except Exception as e:
            log.exception("lifecycle error")
            self._conditions.add("lifecycle_error")
            self.record.error, self.record.error_kind = f"{type(e).__name__}: {e}", "internal"

    def _accept(self, dep: Deployment) -> None:
        rec = self.record
        if rec.deployment_id == dep.deployment_id:
            self._report()  # a retained or duplicate message: say where we stand
            return
        # A new deployment ends any shadow or split run, a re-deployment of the active
        # model included: that is how a hub calls one off.
        self._end_candidate()
        active = self.server.active
        if active is not None and f"{active.bundle.sha256}.efb" == dep.target_path:
            new = DeploymentRecord(
                deployment_id=dep.deployment_id, model=dep.model, target_path=dep.target_path,
                state=State.COMMITTED, outcome="installed", history=["committed"],
            )
            self.record = new
            self.store.save(new)
            self._outcome_hook(new)
            self._report()
            return
        new = DeploymentRecord(
            deployment_id=dep.deployment_id,
            model=dep.model,
            target_path=dep.target_path,
            health_window_s=dep.health_window_s,
            mode=dep.mode,
            ratio=dep.ratio,
            state=next_state(State.IDLE, Event.START),
        )
        self._run(new)

    def _run(self, rec: DeploymentRecord) -> None:
        handlers = {
            State.DOWNLOADING: self._do_download,
            State.VERIFYING: self._do_verify,
            State.INSTALLING: self._do_install,
            State.SELF_TEST: self._do_selftest,
            State.ACTIVATING: self._do_activate,
            State.HEALTH_CHECK: self._do_health,
            State.ROLLING_BACK: self._do_rollback,
        }
        self.record = rec
        while rec.state not in TERMINAL and not self._stop.is_set():
            rec.saves += 1
            if rec.saves > MAX_SAVES_PER_DEPLOYMENT:
                rec.error, rec.error_kind = "deployment looped; giving up", "loop"
                # Past the pointer flip the new model may be live: the previous one must
                # serve again, so rolling back goes on past the cap, within its own few
                # saves (a rollback that keeps crashing the agent ends in failed).
                live = rec.state in (State.ACTIVATING, State.HEALTH_CHECK, State.ROLLING_BACK)
                if live and rec.saves <= MAX_SAVES_PER_DEPLOYMENT + ROLLBACK_SAVES_PAST_CAP:
                    rec.state = State.ROLLING_BACK
                else:
                    rec.state = State.FAILED
                    break
            rec.history.append(rec.state.value)
            if not self._save_or_wait(rec):  # before the state's side effects
                return
            self._report()
            try:
                self._hook(rec, "enter")
                event = handlers[rec.state](rec)
                if event in (Event.OK, Event.HOLD):  # the work succeeded (HOLD: a shadow/split stops here)
                    self._hook(rec, "leave")
            except _Stopped:
                log.info("stopping in state %s; will resume from there", rec.state)
                return
            except _Reject as e:
                rec.error, rec.error_kind, rec.rejected = str(e), e.kind, True
                event = Event.REJECT
            except _Fail as e:
                rec.error, rec.error_kind = str(e), e.kind
                event = Event.FAIL
            except Exception as e:  # a defect or an unforeseen fault must not end the lifecycle thread
                log.exception("deployment %s: unexpected error in state %s", rec.deployment_id, rec.state)
                rec.error, rec.error_kind = f"unexpected error in {rec.state.value}: {type(e).__name__}: {e}", "internal"
                event = Event.FAIL
            if event in (Event.REJECT, Event.FAIL):  # the reason belongs in the device's own log too
                log.warning("deployment %s: %s --%s--> %s: %s: %s", rec.deployment_id, rec.state, event,
                            next_state(rec.state, event), rec.error_kind, rec.error)
            else:
                log.info("deployment %s: %s --%s--> %s", rec.deployment_id, rec.state, event,
                         next_state(rec.state, event))
            rec.state = next_state(rec.state, event)
        if self._stop.is_set() and rec.state not in TERMINAL:
            return
        if rec.state == State.CANDIDATE and self._candidate is not None:
            # attach before the outcome is visible: whoever sees "candidate" can use it
            self.server.set_candidate(self._candidate, rec.mode, rec.ratio)
        rec.outcome = OUTCOME.get(rec.state, "in_progress")
        rec.history.append(rec.state.value)
        try:
            if not self._save_or_wait(rec):
                return
        finally:
            # The deployment has ended: no health check waits for requests, and the model
            # kept loaded behind the new one goes now, not after the hooks and the report.
            self.server.close_health()
            self.server.drop_previous()
        self._finish(rec)
        self._outcome_hook(rec)
        self._report()
        # Deployments come in runs (a campaign's retries, shadow then activate): memory
        # is given back once none has followed for a while, not between them.
        self._release_due = time.monotonic() + RELEASE_DELAY_S

    def _release_memory(self, min_growth: int = 0) -> None:
        """Give back the pages start-up and model loading touched once (agent.memory),
        then warm the serving models up again so that the pages inference needs are
        resident before the next request. Never raises: this only saves memory.

        ``min_growth``: only when the RSS grew by at least this many bytes since the last
        release. The price of a release after a deployment is paid by the next deployment
        that comes after it, which reads the code it needs from disk again: deploy ->
        committed of the 8x8 CNN took 355 ms instead of 215 ms on the benchmark VM when
        every deployment was followed by a release (docs/benchmarks.md, ninth pass). A
        device deploys a few times a day and serves all day, so the memory wins."""
        if not self.settings.release_memory or self._release_unavailable:
            return
        if min_growth and self._rss_settled is not None:
            try:
                if rss_bytes() - self._rss_settled < min_growth:
                    return
            except OSError:
                return
        try:
            released = release_cold_pages()
            if released is None:
                self._release_unavailable = True  # not Linux 5.4+, or no /proc: not worth asking again
                return
            if released.ranges:
                for m in (self.server.active, getattr(self.server.candidate, "model", None)):
                    if m is not None:
                        m.warm()
            self._rss_settled = rss_bytes()
            self.released = released
        except Exception:
            log.exception("releasing memory failed; serving goes on")
            return
        log.info("released %.1f MiB of start-up pages (%d ranges); RSS now %.1f MiB",
                 released.freed / 2**20, released.ranges, self._rss_settled / 2**20)
        if released.not_owned and not self._told_not_owned:
            self._told_not_owned = True
            log.warning("%d library mappings are files another user owns: the kernel gives back only the "
                        "pages of files the agent owns (docs/operations.md, Memory)", released.not_owned)

    def _save_or_wait(self, rec: DeploymentRecord) -> bool:
        """Save the record, retrying every few seconds while the disk refuses (full,
        read-only): no state's side effects may run before their state is saved. False
        when the agent is stopping meanwhile."""
        delay = 1.0
        while True:
            try:
                self.store.save(rec)
            except OSError as e:
                self._conditions.add("state_unwritable")
                log.error("cannot save the deployment state (%s); retrying in %.0f s", e, delay)
                if self._stop.wait(delay):
                    return False
                delay = min(delay * 2, 60.0)
                continue
            self._conditions.discard("state_unwritable")
            return True

    def _hook_env(self, rec: DeploymentRecord) -> dict[str, str]:
        return {"EDGEFLEET_DEPLOYMENT_ID": rec.deployment_id or "", "EDGEFLEET_MODEL": rec.model or "",
                "EDGEFLEET_DEVICE_ID": self.settings.device_id}

    def _outcome_hook(self, rec: DeploymentRecord) -> None:
        """``<state>_enter`` of the state the deployment ended in (committed, rolled_back,
        failed, candidate): after the outcome is saved, before the hub is told. The outcome
        stands whatever the hook does, so a failure is only logged; a stop cuts the hook
        off, and it does not run again at the next start (the hub is told then)."""
        try:
            self.hooks.run(rec.state.value, "enter", self._hook_env(rec), stop=self._stop)
        except HookFailed as e:
            log.error("hook after the outcome %s failed (the outcome stands): %s", rec.state.value, e)

    def _hook(self, rec: DeploymentRecord, when: str) -> None:
        env = self._hook_env(rec)
        # A stop cuts off an enter hook: its state's work has not begun and resumes at the
        # next start. A leave hook runs to its timeout: cutting it off would leave the
        # state saved as not done, and a health check that passed would roll back.
        stop = self._stop if when == "enter" else None
        try:
            self.hooks.run(rec.state.value, when, env, stop=stop)
        except HookFailed as e:
            if stop is not None and stop.is_set():
                raise _Stopped() from e
            if rec.state == State.ROLLING_BACK:
                log.error("ignoring failed hook while rolling back: %s", e)
                return
            raise _Fail(str(e), "hook") from e

    def _end_candidate(self) -> None:
        """Stop serving the shadow or split candidate, and unload it unless it is the
        active model."""
        self.server.set_candidate(None)
        self._drop_candidate()

    def _drop_candidate(self, *, keep_loaded: bool = False) -> None:
        """Forget the candidate; unload it unless ``keep_loaded`` or it is the active model."""
        if not keep_loaded and self._candidate is not None and self._candidate is not self.server.active:
            self._candidate.retire()
        self._candidate = None

    def _finish(self, rec: DeploymentRecord) -> None:
        self._drop_candidate(keep_loaded=rec.state == State.CANDIDATE)
        if rec.target_path:
            for p in (self.data_dir / "downloads").glob(f"{rec.target_path}*"):
                p.unlink(missing_ok=True)

    # Each handler does its state's work and returns an Event (or raises _Reject/_Fail).

    def _trust_dir(self) -> Path:
        """The device's trusted TUF metadata folder, with a root to start from."""
        trust_dir = self.data_dir / "trust"
        trust_dir.mkdir(exist_ok=True)
        root = trust_dir / "root.json"
        if not root.exists():
            if self.settings.trust_root is not None:
                try:
                    shutil.copyfile(self.settings.trust_root, root)
                except OSError as e:
                    raise _Fail(f"cannot read the provisioned trust root {self.settings.trust_root}: {e}",
                                "trust_root") from e
            else:
                log.warning("no provisioned trust root: pinning the repository's first root (TOFU)")
                try:
                    data = self.fetch_client.fetch_bytes("metadata/1.root.json", 1 << 20)
                except TransportError as e:
                    raise _Fail(f"cannot fetch trust root: {e}", "transport") from e
                atomic_write(root, data)
        return trust_dir

    def _do_download(self, rec: DeploymentRecord) -> Event:
        from agent.trust import check_upgrade, lookup_target, serve_path_for, target_custom

        assert rec.target_path is not None
        delay = 1.0
        refetched = False
        last = "no attempt made"
        for attempt in range(1, self.settings.max_download_attempts + 1):
            rec.attempts = attempt
            try:
                target = lookup_target(self._trust_dir(), rec.target_path, self.fetch_client, stop=self._stop)
                self._conditions.discard("metadata_expired")
                if target.length <= 0:
                    raise _Reject(f"signed target {rec.target_path} is empty (length {target.length})", "bundle")
                custom = target_custom(target)
                if custom.profile != self.profile.name:
                    raise _Reject(f"{custom.ref} is built for profile {custom.profile!r}, "
                                  f"this device is {self.profile.name!r}", "profile")
                active = self.server.active
                cur = active.bundle.manifest if active else None
                check_upgrade(custom, cur.name if cur else None, cur.version if cur else None)
                rec.target_length = target.length
                rec.target_sha256 = target.hashes["sha256"]
                rec.target_custom = custom.model_dump()
                rec.model = custom.ref
                self.store.save(rec)
                dest = self.data_dir / "downloads" / rec.target_path
                resumed = dest.with_name(dest.name + ".part").exists()
                self.fetch_client.download(serve_path_for(rec.target_path), dest, target.length,
                                           progress=self._download_progress(), cancel=self._stop)
                if resumed and not refetched and rec.target_sha256 and file_sha256(dest) != rec.target_sha256:
                    # Chunks kept from before a power loss may not have reached the disk
                    # whole. Fetch it once more from scratch; a second mismatch is the
                    # artifact's, and verification rejects it. (A download that kept
                    # nothing is hashed once, by verification.)
                    log.warning("%s does not match its signed hash; downloading it again", rec.target_path)
                    dest.unlink(missing_ok=True)
                    refetched = True
                    self.fetch_client.download(serve_path_for(rec.target_path), dest, target.length,
                                               progress=self._download_progress(), cancel=self._stop)
                return Event.OK
            except ExpiredMetadataError as e:
                self._conditions.add("metadata_expired")
                raise _Reject(str(e), "metadata_expired") from e
            except TrustError as e:
                raise _Reject(str(e), type(e).__name__) from e
            except DiskSpaceError as e:
                raise _Fail(str(e), "disk_space") from e
            except TransportError as e:
                if self._stop.is_set():
                    raise _Stopped() from e
                log.warning("download attempt %d failed: %s", attempt, e)
                last = str(e)
                if self._stop.wait(delay):
                    raise _Stopped() from e
                delay = min(delay * 2, 30.0)
        raise _Fail(f"repository unreachable after {self.settings.max_download_attempts} attempts: {last}",
                    "transport")

    def _download_path(self, rec: DeploymentRecord) -> Path:
        return self.data_dir / "downloads" / str(rec.target_path)

    def _do_verify(self, rec: DeploymentRecord) -> Event:
        from agent.trust import TargetCustom, check_manifest_matches, verify_target_file

        path = self._download_path(rec)
        if rec.target_length is None or rec.target_sha256 is None or rec.target_custom is None:
            raise _Fail("no signed target information recorded", "state")
        try:
            verify_target_file(path, rec.target_length, rec.target_sha256)
            manifest = read_manifest(path, self.slots.limits)
            check_manifest_matches(TargetCustom.model_validate(rec.target_custom), manifest, self.profile.name)
        except FileNotFoundError as e:
            raise _Fail("downloaded bundle vanished", "state") from e
        except (TrustError, BundleError) as e:
            path.unlink(missing_ok=True)
            raise _Reject(str(e), type(e).__name__) from e
        if manifest.runtime not in self.runtimes:
            raise _Reject(f"runtime {manifest.runtime!r} is not available on this device", "runtime")
        return Event.OK

    def _do_install(self, rec: DeploymentRecord) -> Event:
        active = self.slots.active_name()
        rec.from_slot = active
        rec.to_slot = self.slots.inactive_name()
        self.store.save(rec)
        try:
            self.slots.install(self._download_path(rec), rec.to_slot, sha256=str(rec.target_sha256))  # type: ignore[arg-type]
        except BundleError as e:
            raise _Reject(str(e), "bundle") from e
        except DiskSpaceError as e:
            raise _Fail(str(e), "disk_space") from e
        except OSError as e:
            raise _Fail(f"install failed: {e}", "io") from e
        return Event.OK

    def _do_selftest(self, rec: DeploymentRecord) -> Event:
        from agent.errors import SelfTestError

        bundle = self.slots.bundle(rec.to_slot)  # type: ignore[arg-type]
        if bundle is None:
            raise _Fail(f"slot {rec.to_slot} holds no complete bundle", "install")
        try:
            cand = load_bundle(bundle, self.profile.runtime_options, str(rec.to_slot))
        except RuntimeLoadError as e:
            raise _Fail(str(e), "load") from e
        try:
            run_selftest(cand)
            lat = []
            first = {k: v[:1] for k, v in bundle.selftest().inputs.items()}
            for _ in range(self.settings.selftest_latency_runs):
                t0 = time.perf_counter()
                cand.runtime.infer(first)
                lat.append((time.perf_counter() - t0) * 1000)
            p95 = quantile(np.sort(lat), 0.95)
            budget = self.profile.limits.latency_budget_ms
            if p95 > budget:
                raise SelfTestError(f"p95 latency {p95:.2f} ms is over the profile budget {budget} ms")
        except SelfTestError as e:
            cand.retire()
            raise _Fail(str(e), "selftest") from e
        self._candidate = cand
        return Event.OK if rec.mode == "activate" else Event.HOLD

    def _do_activate(self, rec: DeploymentRecord) -> Event:
        if self._candidate is None:
            raise _Fail("no loaded candidate to activate", "state")
        try:
            self.slots.activate(rec.to_slot)  # type: ignore[arg-type]
        except OSError as e:
            raise _Fail(f"activation failed: {e}", "io") from e
        # The previous model stays loaded through the health check: it answers what the
        # new one fails, and a rollback needs no reload.
        self.server.swap(self._candidate, keep_previous=True)
        self._activated_at = time.time()
        self._activated_mono = time.monotonic()
        return Event.OK

    def _do_health(self, rec: DeploymentRecord) -> Event:
        from agent.errors import SelfTestError

        deadline = time.monotonic() + rec.health_window_s
        budget = self.profile.limits.latency_budget_ms
        # after a restart in health_check, the probes' initial delay counts from now
        activated_at = self._activated_at or time.time()
        activated_mono = self._activated_mono or time.monotonic()
        for probe in self.settings.health_probes:
            try:
                run_probe(probe, activated_at, self._stop, activated_mono)
            except ProbeFailed as e:
                if self._stop.is_set():
                    raise _Stopped() from e
                raise _Fail(str(e), "probe") from e
        while time.monotonic() < deadline:
            if self._stop.wait(min(0.25, max(0.0, deadline - time.monotonic()))):
                raise _Stopped()
            count, errors = self.server.health.peek()
            if count >= 20 and errors / count > self.settings.health_error_rate:
                raise _Fail(f"error rate {errors}/{count} over {self.settings.health_error_rate:.0%}", "health")
        snap = self.server.health.snapshot_and_reset()
        if snap.count and snap.errors / snap.count > self.settings.health_error_rate:
            raise _Fail(f"error rate {snap.errors}/{snap.count} over the health limit", "health")
        if snap.p95_ms is not None and snap.count >= 20 and snap.p95_ms > budget:
            raise _Fail(f"live p95 latency {snap.p95_ms:.2f} ms over budget {budget} ms", "latency")
        active = self.server.active
        if active is None:
            raise _Fail("no active model after activation", "state")
        try:
            run_selftest(active)
        except SelfTestError as e:
            raise _Fail(str(e), "selftest") from e
        return Event.OK

    def _do_rollback(self, rec: DeploymentRecord) -> Event:
        target = rec.from_slot
        if target is None:
            # There was nothing before this deployment: serve nothing rather than an
            # unproven model.
            self.slots.activate_none()
            self.server.swap(None)
            return Event.OK
        bundle = self.slots.bundle(target)  # type: ignore[arg-type]
        if bundle is None:
            raise _Fail(f"previous slot {target} is empty; cannot roll back", "rollback")
        active = self.server.active
        if active is not None and active.slot == target:
            self.slots.activate(target)  # type: ignore[arg-type]
            return Event.OK
        kept = self.server.previous
        if kept is not None and kept.slot == target:
            self.slots.activate(target)  # type: ignore[arg-type]
            self.server.swap(kept)
            return Event.OK
        try:
            lm = load_bundle(bundle, self.profile.runtime_options, target)
        except RuntimeLoadError as e:
            raise _Fail(f"previous model does not load: {e}", "rollback") from e
        self.slots.activate(target)  # type: ignore[arg-type]
        self.server.swap(lm)
        return Event.OK

    # ------------------------------------------------------------------ status

    def _metrics_endpoint(self) -> Any:
        """``GET /metrics`` of the local API (built at the first scrape)."""
        from agent.metrics import AgentGauges, MetricsEndpoint

        states = tuple(s.value for s in State)

        def gauges() -> AgentGauges:
            spool = self.spool
            return AgentGauges(
                device_id=self.settings.device_id, state=self.record.state.value, states=states,
                connected=self.link.connected.is_set(), spool_records=len(spool),
                spool_bytes=spool.size_bytes(), spool_limit_bytes=spool.max_bytes,
                spool_dropped=spool.dropped(), conditions=tuple(sorted(self._conditions.copy())),
            )

        return MetricsEndpoint(self.server, gauges)

    def status(self) -> dict[str, Any]:
        return status_from_disk(self.data_dir) | {"model": self.model_ref, "conditions": sorted(self._conditions)}


def _feedback_parts(labels: list[LabelRecord]) -> list[list[LabelRecord]]:
    """``labels`` in order, split into messages the hub takes: at most
    MAX_FEEDBACK_ITEMS items and MAX_JSON_PAYLOAD bytes each (1,000 labels with score
    maps of 25 classes come to about 320 KB). One label always fits: the contract bounds
    its fields."""
    parts: list[list[LabelRecord]] = []
    todo = [labels[k : k + MAX_FEEDBACK_ITEMS] for k in range(0, len(labels), MAX_FEEDBACK_ITEMS)][::-1]
    while todo:
        part = todo.pop()
        if len(part) > 1 and len(encode(Feedback(seq=MAX_COUNT, items=part))) > MAX_JSON_PAYLOAD:
            half = len(part) // 2
            todo += [part[half:], part[:half]]
        else:
            parts.append(part)
    return parts


def status_from_disk(data_dir: Path) -> dict[str, Any]:
    """What ``edgefleet agent status`` shows; works whether or not the agent runs, and
    creates or moves none of the agent's files (SQLite may open the spool's write-ahead
    log beside it while it reads).

    Raises:
        FileNotFoundError: ``data_dir`` holds none of an agent's files (a typo, or a
            folder no agent has used), rather than report it as an idle device.
    """
    if not any((data_dir / name).exists() for name in ("state.json", "slots", "spool.sqlite")):
        raise FileNotFoundError(f"{data_dir} is not an agent's data folder: it has no state.json, slots/ "
                                "or spool.sqlite (an agent creates them when it first starts)")
    rec = StateStore(data_dir / "state.json").load()
    slots = Slots(data_dir / "slots", create=False)
    active = slots.active_name()
    slot_info = {}
    for s in ("a", "b"):
        b = slots.bundle(s)  # type: ignore[arg-type]
        slot_info[s] = b.manifest.ref if b else None
    spool_bytes = 0
    spool_records = 0
    dropped = 0
    spool_error = None
    if (data_dir / "spool.sqlite").exists():
        try:
            sp = Spool(data_dir / "spool.sqlite", set_aside=False)
            spool_bytes, spool_records, dropped = sp.size_bytes(), len(sp), sp.dropped()
            sp.close()
        except sqlite3.DatabaseError as e:
            spool_error = f"spool.sqlite unreadable: {e}"
    captures = sorted((data_dir / "captures").glob("*.efs")) if (data_dir / "captures").is_dir() else []
    return {
        "state": rec.state.value,
        "deployment_id": rec.deployment_id,
        "target_model": rec.model,
        "active_slot": active,
        "slots": slot_info,
        "model": slot_info.get(active) if active else None,
        "spool_bytes": spool_bytes,
        "spool_records": spool_records,
        "spool_dropped": dropped,
        "captured_samples": len(captures),
        "captured_bytes": sum(p.stat().st_size for p in captures),
        "spool_error": spool_error,
        "last_error": rec.error,
        "last_error_kind": rec.error_kind,
        "history": rec.history[-12:],
    }


__all__ += ["status_from_disk", "EdgefleetError"]
