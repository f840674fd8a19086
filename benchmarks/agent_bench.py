"""Benchmark for issue #3: the agent's local inference overhead, memory, cold start and
activation time, on the reference model, measured here.

    python benchmarks/agent_bench.py [--out docs/agent-benchmarks-results.md] [--epochs 2]
                                     [--cache-dir DIR] [--no-write]

The reference model is the digits CNN (``compiler.demo_models.train_digits_cnn``)
compiled by the project's compiler (``compiler.pipeline.compile_model``) for the
``x86-gateway-vnni`` profile; the bundle the compiler selects is the one measured, at
8x8 and at 32x32 (issue #5's reference input). Training runs in a subprocess so that
torch is never loaded in a measured process; inference cost does not depend on how
long the weights were trained (``--epochs``), only the compiler's selection might.

Figures, each a median over many repetitions, compared side by side in one run:

* Python API overhead: ``session.run`` of the agent's own ONNX Runtime session (same
  model, same threads: the profile's 2 intra-op threads), ``OnnxRuntime.infer``,
  ``ModelServer.infer`` and ``Agent.infer`` on a started agent, batch 1, interleaved
  in blocks (the order flips every round) so that drift hits every path alike.
  ``Agent.infer`` runs with the default settings (in this tight loop the drift sketch
  sees a sample of about ``drift_max_rows_per_s`` = 200 requests a second) and, as a
  separate path, on an agent that sketches every request. Measured twice: in short
  blocks, with the observers' work drained between blocks, outside the timing; and in
  steady state (blocks of about 0.2 s, the observers thread sketching beside the
  requests inside the timing, as in a serving loop).
* HTTP added latency: a keep-alive ``http.client`` POST /v2/models/{m}/infer to a
  real ``edgefleet agent run`` process, interleaved with in-process ``Agent.infer``
  calls; the client encodes the V2 JSON request and decodes the response as
  ``InferenceClient`` does (also given: a pre-encoded body, response not parsed).
* RSS of real ``edgefleet agent run`` processes (psutil on the child): idle, with the
  reference model installed and serving, and after an over-the-air deployment; plus
  the RSS added by each import in a fresh interpreter, to show what dominates.
* Cold start: process spawn of ``edgefleet agent run`` (model installed in its data
  dir) to ``GET /v2/health/ready`` = 200 (warm page cache).
* Activation: a real Mosquitto, a real TUF ``Repository`` served by ``RepoResponder``,
  an in-process agent; time from the deployment's ``activating`` state being saved to
  the new model serving (``ModelServer.swap`` done), and from publishing the
  deployment to ``committed`` (health window set to 0 s), per bundle size.
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import http.client
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PROFILE = "x86-gateway-vnni"
SIZES = (8, 32)
MB = 1 << 20
GOALS = {"overhead": 0.05, "http_ms": 0.5, "rss_mb": 80.0, "cold_s": 1.5}


# --------------------------------------------------------------------------- models


def prepare(work: Path, epochs: int, width: float) -> None:
    """(Subprocess.) Train, export and compile the reference CNN at each size."""
    import torch

    from agent.profiles import load_profile
    from compiler.demo_models import export_pt2, train_digits_cnn, write_calib_eval
    from compiler.pipeline import CompileOptions, compile_model

    torch.set_num_threads(2)
    out: dict[str, Any] = {"width": width}
    for size in SIZES:
        d = work / f"cnn{size}"
        d.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        module, x_tr, _y, x_te, y_te = train_digits_cnn(seed=0, epochs=epochs, size=size, width=width)
        pt2 = export_pt2(module, x_tr, d / "cnn.pt2")
        calib, ev = write_calib_eval(d, x_tr, x_te, y_te)
        compile_model(pt2, [load_profile(PROFILE)], calib, ev, d / "out",
                               CompileOptions(name=f"digits-cnn{size}{width_suffix(width)}", version="1.0.0"))
        np.save(d / "x_test.npy", np.asarray(x_te[:256], dtype=np.float32))
        out[str(size)] = {"report": str(d / "out" / "report.json"), "seconds": round(time.perf_counter() - t0, 1)}
    (work / "models.json").write_text(json.dumps(out, indent=2))


def width_suffix(width: float) -> str:
    return "" if width == 1.0 else f"-w{width:g}"


@dataclass
class RefModel:
    size: int
    bundle: Path
    precision: str
    technique: str
    x: np.ndarray  # test rows, [n, 1, size, size]
    kib: float = 0.0  # bundle size
    note: str = ""  # why this bundle (when it is not the compiler's selection)
    selected: Path | None = None  # the compiler's selection, when it is not this bundle
    width: float = 1.0  # channel multiplier of the CNN

    @property
    def label(self) -> str:
        w = "" if self.width == 1.0 else f" width {self.width:g}"
        return f"digits CNN {self.size}x{self.size}{w} ({self.precision})"


def measured_bundle(report_path: Path) -> tuple[Path, str, str, str]:
    """(bundle, precision, technique, note): the compiler's selection when it runs on ONNX
    Runtime, else its fastest ONNX candidate that passed every check.

    The overhead goal compares against ``session.run``, so the measured bundle is an ONNX
    one; which format wins the selection depends on the host (on some CPUs the LiteRT
    fp32 bundle is faster at 8x8).
    """
    report = json.loads(report_path.read_text())
    selected = report["profiles"][PROFILE]["selected"]
    onnx = [c for c in report["candidates"] if c["runtime"] == "onnxruntime" and c["passed"]]
    if not onnx:
        raise SystemExit(f"no ONNX bundle passed the compiler's checks in {report_path}")
    best = next((c for c in onnx if c["bundle"] == selected), None)
    note = ""
    if best is None:
        best = min(onnx, key=lambda c: c["latency_ms_p50"])
        sel = next((c for c in report["candidates"] if c["bundle"] == selected), None)
        note = (f"the compiler selected `{selected}` (p50 {sel['latency_ms_p50'] * 1e3:.0f} µs) on this host; "
                f"the fastest passing ONNX bundle (p50 {best['latency_ms_p50'] * 1e3:.0f} µs) is measured"
                if sel else "the compiler selected nothing; the fastest passing ONNX bundle is measured")
    return report_path.parent / best["bundle"], best["precision"], best["technique"], note


def reference_models(cache: Path, epochs: int, width: float) -> tuple[dict[int, RefModel], float]:
    t0 = time.perf_counter()
    if not (cache / "models.json").exists():
        print(f"training and compiling the reference CNN ({epochs} epochs) in a subprocess ...", flush=True)
        subprocess.run([sys.executable, __file__, "--prepare", str(cache), "--epochs", str(epochs),
                        "--cnn-width", str(width)],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
                       if os.environ.get("BENCH_QUIET_PREPARE", "1") == "1" else None)
    info = json.loads((cache / "models.json").read_text())
    cached_width = info.pop("width", 1.0)
    if cached_width != width:
        raise SystemExit(f"{cache} holds width-{cached_width:g} models; use another --cache-dir for --cnn-width {width:g}")
    models = {}
    for k, v in info.items():
        report = Path(v["report"]) if "report" in v else Path(v["bundle"]).parent / "report.json"  # older caches
        bundle, precision, technique, note = measured_bundle(report)
        chosen = json.loads(report.read_text())["profiles"][PROFILE]["selected"]
        selected = report.parent / chosen if chosen and chosen != bundle.name else None
        models[int(k)] = RefModel(int(k), bundle, precision, technique, np.load(cache / f"cnn{k}" / "x_test.npy"),
                                  bundle.stat().st_size / 1024, note, selected, width)
    return models, time.perf_counter() - t0


# --------------------------------------------------------------------------- timing


Path_ = Callable[[], object] | tuple[Callable[[], object], Callable[[], object], bool]


def interleaved(paths: dict[str, Path_], rounds: int, calls: int, rewarm: int = 0) -> dict[str, list[float]]:
    """Seconds per call of each path, one value per round; the order flips every round.

    A path may be ``(fn, settle, timed)``: ``settle`` runs after each block of calls
    (e.g. waits for work the calls deferred to other threads), inside the timing when
    ``timed``, outside it otherwise, so that deferred work never lands on the next path.

    ``rewarm`` untimed calls start every block. Without them the block after a settle
    (which sleeps while it waits) paid for the pause: ONNX Runtime's pool threads had
    gone to sleep and the caches were cold, and 5 warm-up calls were not enough. Measured
    on the 32x32 CNN, the path timed next to ``Agent.infer``'s settle came out 7-12%
    slower than ``session.run`` without rewarm and 2% with 20 calls (about 1.4 ms), so
    earlier figures charged the settle's pause to ``ModelServer.infer`` and
    ``Agent.infer``.
    """
    names = list(paths)
    per: dict[str, list[float]] = {n: [] for n in names}
    split = {n: p if isinstance(p, tuple) else (p, None, False) for n, p in paths.items()}
    for n in names:  # warm-up
        fn, settle, _ = split[n]
        for _ in range(calls):
            fn()
        if settle is not None:
            settle()
    for r in range(rounds):
        for n in names if r % 2 == 0 else names[::-1]:
            fn, settle, timed = split[n]
            for _ in range(rewarm):
                fn()
            t = time.perf_counter()
            for _ in range(calls):
                fn()
            if settle is not None and timed:
                settle()
            per[n].append((time.perf_counter() - t) / calls)
            if settle is not None and not timed:
                settle()
    return per


def steady(paths: dict[str, Path_], rounds: int, block_s: float) -> dict[str, list[float]]:
    """Seconds per call of each path in long blocks of about ``block_s`` (calls counted
    from the first path's speed), the order flipping every round. Unlike
    :func:`interleaved`, work a path defers to other threads (the drift sketch) runs
    while that path is timed, as in a serving loop; a path's ``settle`` runs after its
    block, untimed, only so that the rest of that work never lands on the next path.
    Each block begins after the other paths' blocks, a pause to the drift sample's rate
    window, which then takes a few milliseconds to find the rate (serving.py)."""
    names = list(paths)
    split = {n: p if isinstance(p, tuple) else (p, None, False) for n, p in paths.items()}
    first = split[names[0]][0]
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < 0.2:
        first()
        n += 1
    calls = max(100, int(n * block_s / 0.2))
    per: dict[str, list[float]] = {k: [] for k in names}
    for r in range(rounds):
        for k in names if r % 2 == 0 else names[::-1]:
            fn, settle, _ = split[k]
            t = time.perf_counter()
            for _ in range(calls):
                fn()
            per[k].append((time.perf_counter() - t) / calls)
            if settle is not None:
                settle()
    return per


def drain(agent_: Any, server: Any = None) -> None:
    """Wait until the agent has sketched every request served so far (observers thread)."""
    (server or agent_.server).flush_observers()


def med(xs: list[float]) -> float:
    return statistics.median(xs)


def paired_overhead(api: list[float], raw: list[float]) -> float:
    return med([a / r - 1.0 for a, r in zip(api, raw, strict=True)])


# --------------------------------------------------------------------------- fixtures


def install(bundle_file: Path, data_dir: Path) -> None:
    """Put a bundle in slot a of a fresh agent data dir, as a finished deployment would."""
    from agent.bundle import file_sha256
    from agent.slots import Slots

    slots = Slots(data_dir / "slots")
    slots.install(bundle_file, "a", sha256=file_sha256(bundle_file))
    slots.activate("a")


def renamed(bundle_file: Path, out: Path, name: str) -> Path:
    """The same model and vectors under another name (a replacement, not a downgrade)."""
    from agent.bundle import unpack, write_bundle

    b = unpack(bundle_file, out.with_suffix(".d"))
    fields = b.manifest.model_dump(mode="json", exclude={"members"})
    fields["name"] = name
    st = b.selftest()
    write_bundle(out, manifest=fields, model=b.model_path.read_bytes(), selftest_inputs=st.inputs,
                 selftest_outputs=st.outputs, reference=b.reference())
    shutil.rmtree(out.with_suffix(".d"))
    return out


def edgefleet_bin() -> str:
    cand = Path(sys.executable).with_name("edgefleet")
    return str(cand) if cand.exists() else shutil.which("edgefleet") or "edgefleet"


class AgentProcess:
    """A real ``edgefleet agent run`` child process."""

    def __init__(self, data_dir: Path, broker_url: str, device_id: str, *, trust_root: Path | None = None,
                 env: dict[str, str] | None = None):
        from tests.support import free_port

        self.port = free_port()
        self.data_dir = data_dir
        cmd = [edgefleet_bin(), "agent", "run", "--broker", broker_url, "--device-id", device_id,
               "--profile", PROFILE, "--data-dir", str(data_dir), "--api-port", str(self.port)]
        if trust_root is not None:
            cmd += ["--trust-root", str(trust_root)]
        self.t_spawn = time.perf_counter()
        # PYTHONPATH: the agent of the tree this file lives in, whatever the venv installed.
        env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, env=env,
                                     stderr=open(data_dir.parent / f"{device_id}.log", "ab"))

    def get(self, path: str) -> int:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=2) as r:
                return r.status
        except urllib.error.HTTPError as e:
            return e.code
        except (urllib.error.URLError, ConnectionError, OSError):
            return 0

    def wait(self, path: str, timeout: float = 30.0, poll: float = 0.005) -> float:
        """Seconds from spawn until ``path`` answers 200."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.get(path) == 200:
                return time.perf_counter() - self.t_spawn
            if self.proc.poll() is not None:
                raise RuntimeError(f"agent exited with {self.proc.returncode}; see {self.data_dir.parent}")
            time.sleep(poll)
        raise TimeoutError(f"{path} not ready after {timeout} s")

    def memory(self) -> tuple[float, float]:
        """(RSS, USS) in MiB."""
        import psutil

        m = psutil.Process(self.proc.pid).memory_full_info()
        return m.rss / MB, m.uss / MB

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class V2Http:
    """Keep-alive V2 JSON client on http.client with the standard library's json, as a
    client without the agent's package (or orjson) would encode and decode."""

    def __init__(self, port: int, model: str, input_name: str):
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        self.path = f"/v2/models/{model}/infer"
        self.input_name = input_name
        self.headers = {"Content-Type": "application/json"}

    def infer(self, x: np.ndarray) -> np.ndarray:
        body = json.dumps({"inputs": [{"name": self.input_name, "shape": list(x.shape), "datatype": "FP32",
                                       "data": x.ravel().tolist()}]}).encode()
        out = json.loads(self.post(body))["outputs"][0]
        return np.asarray(out["data"], dtype=np.float32).reshape(out["shape"])

    def post(self, body: bytes) -> bytes:
        self.conn.request("POST", self.path, body, self.headers)
        resp = self.conn.getresponse()
        data = resp.read()
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}: {data[:200]!r}")
        return data


# --------------------------------------------------------------------------- results


@dataclass
class Row:
    figure: str
    goal: str
    measured: str
    met: bool | None  # None: measured only


@dataclass
class Results:
    rows: list[Row] = field(default_factory=list)
    details: dict[str, list[list[str]]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def add(self, figure: str, goal: str, measured: str, met: bool | None) -> None:
        self.rows.append(Row(figure, goal, measured, met))
        mark = "-" if met is None else ("met" if met else "NOT MET")
        print(f"  {figure}: {measured}  [{goal}: {mark}]", flush=True)


# --------------------------------------------------------------------------- sections


def bench_python_api(res: Results, models: dict[int, RefModel], broker_url: str, tmp: Path) -> dict[int, Any]:
    """Raw session.run vs the runtime wrapper vs ModelServer.infer vs Agent.infer."""
    from agent.config import AgentSettings
    from agent.daemon import Agent
    from agent.serving import ModelServer

    agents: dict[int, Any] = {}
    rows = []
    for size, m in models.items():
        d = tmp / f"inproc{size}"
        install(m.bundle, d)
        a = Agent(AgentSettings(broker_url=broker_url, device_id=f"bench-inproc{size}", profile=PROFILE,
                                data_dir=d))
        a.start()
        agents[size] = a
        lm = a.server.active
        assert lm is not None, "the in-process agent did not load the reference model"
        name = lm.bundle.manifest.inputs[0].name
        x = np.ascontiguousarray(m.x[:1])
        feed = {name: x}
        sess = lm.runtime._session  # the agent's own session: same model, same 2 threads
        out_names = [o.name for o in sess.get_outputs()]
        bare = ModelServer()
        bare.swap(lm)
        calls = 200 if size == 8 else 50
        settle = functools.partial(drain, a)
        rewarm = calls // 2  # about 1.5 ms of calls (see interleaved)
        per = interleaved({
            "session.run": lambda s=sess, o=out_names, f=feed: s.run(o, f),
            "OnnxRuntime.infer": lambda r=lm.runtime, f=feed: r.infer(f),
            "ModelServer.infer": lambda s=bare, f=feed: s.infer(f),
            "Agent.infer": (lambda a=a, f=feed: a.infer(f), settle, False),
        }, rounds=60, calls=calls, rewarm=rewarm)
        per_steady = steady({
            "session.run": lambda s=sess, o=out_names, f=feed: s.run(o, f),
            "OnnxRuntime.infer": lambda r=lm.runtime, f=feed: r.infer(f),
            "ModelServer.infer": lambda s=bare, f=feed: s.infer(f),
            "Agent.infer": (lambda a=a, f=feed: a.infer(f), settle, False),
        }, rounds=30, block_s=0.2)
        obs_default = observer_cpu_per_request(a, feed)
        # The same model on an agent that sketches every request (drift_max_rows_per_s =
        # 0): a second agent, timed in its own interleaving against its own session, so
        # that its session and threads never run beside the first agent's.
        install(m.bundle, tmp / f"inproc{size}-all")
        every = Agent(AgentSettings(broker_url=broker_url, device_id=f"bench-inproc{size}-all", profile=PROFILE,
                                    data_dir=tmp / f"inproc{size}-all", drift_max_rows_per_s=0))
        every.start()
        try:
            esess = every.server.active.runtime._session
            per_every = interleaved({
                "session.run": lambda s=esess, o=out_names, f=feed: s.run(o, f),
                EVERY: (lambda a=every, f=feed: a.infer(f), functools.partial(drain, every), False),
            }, rounds=60, calls=calls, rewarm=rewarm)
            obs_every = observer_cpu_per_request(every, feed)
        finally:
            every.stop()
        for run in (per, per_every):
            raw = med(run["session.run"])
            for path, vals in run.items():
                rows.append([m.label, path if run is per or path != "session.run" else "session.run (its session)",
                             f"{med(vals) * 1e6:.1f}",
                             "-" if path == "session.run" else f"{med(vals) / raw - 1:+.1%}",
                             "-" if path == "session.run" else f"{paired_overhead(vals, run['session.run']):+.1%}"])
            for path in [p_ for p_ in ("Agent.infer", "ModelServer.infer", EVERY) if p_ in run]:
                ov = med(run[path]) / raw - 1
                goal = "≤ 5% (no drift sketch)" if path == "ModelServer.infer" else "≤ 5%"
                res.add(f"Python API overhead, {path} vs session.run, {m.label}", goal,
                        f"{ov:+.1%} ({med(run[path]) * 1e6:.1f} vs {raw * 1e6:.1f} µs)", ov <= GOALS["overhead"])
        raw = med(per_steady["session.run"])
        for path, vals in per_steady.items():
            rows.append([m.label, f"{path}, steady state", f"{med(vals) * 1e6:.1f}",
                         "-" if path == "session.run" else f"{med(vals) / raw - 1:+.1%}",
                         "-" if path == "session.run" else f"{paired_overhead(vals, per_steady['session.run']):+.1%}"])
            if path in ("Agent.infer", "ModelServer.infer"):
                ov = med(vals) / raw - 1
                goal = "≤ 5% (no drift sketch)" if path == "ModelServer.infer" else "≤ 5%"
                res.add(f"Python API overhead in steady state, {path} vs session.run, {m.label}", goal,
                        f"{ov:+.1%} ({med(vals) * 1e6:.1f} vs {raw * 1e6:.1f} µs)", ov <= GOALS["overhead"])
        raw = med(per["session.run"])
        for who, obs_us in (("default settings", obs_default), ("every request sketched", obs_every)):
            if obs_us is not None:
                res.add(f"Drift-sketch CPU per request on the observers thread ({who}), {m.label}", "report",
                        f"{obs_us:.2f} µs ({obs_us / (raw * 1e6):.1%} of a session.run)", None)
        rows += python_cost(a, lm, feed, m.label)
    res.details["Python API, batch 1, µs per call (medians of 60 interleaved blocks)"] = (
        [["model", "path", "µs/call", "overhead (ratio of medians)", "overhead (median of paired ratios)"]] + rows)
    return agents


EVERY = "Agent.infer, every request sketched (drift_max_rows_per_s = 0)"


def _thread_cpu_ns(native_id: int) -> int:
    """Nanoseconds thread ``native_id`` of this process has run (Linux schedstat)."""
    with open(f"/proc/self/task/{native_id}/schedstat") as fh:
        return int(fh.read().split()[0])


def observer_cpu_per_request(a: Any, feed: dict[str, np.ndarray], n: int = 20_000) -> float | None:
    """µs of CPU the observers thread (drift sketch) spends per served request: its
    schedstat run time over ``n`` ``Agent.infer`` calls, the work drained. None where the
    thread or /proc is missing."""
    a.infer(feed)  # the observers thread starts with the first observed request
    drain(a)
    t = getattr(a.server, "_observer_thread", None)
    if t is None or t.native_id is None:
        return None
    try:
        before = _thread_cpu_ns(t.native_id)
        for _ in range(n):
            a.infer(feed)
        drain(a)
        return (_thread_cpu_ns(t.native_id) - before) / n / 1000
    except OSError:
        return None


class _ConstRuntime:
    """A runtime that returns fixed outputs: isolates the agent's own Python cost."""

    def __init__(self, outputs: dict[str, np.ndarray]):
        self._out = outputs

    def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self._out

    def unload(self) -> None:
        pass


def python_cost(a: Any, lm: Any, feed: dict[str, np.ndarray], label: str) -> list[list[str]]:
    """µs the agent adds per call around a runtime that costs nothing (no ORT threads)."""
    from agent.runtimes.base import LoadedModel
    from agent.serving import ModelServer

    stub = LoadedModel(lm.bundle, _ConstRuntime(lm.runtime.infer(feed)), "a")  # type: ignore[arg-type]
    bare, observed = ModelServer(), ModelServer()
    bare.swap(stub)
    observed.swap(stub)
    observed.observers.append(a._observe)  # the agent's drift-sketch observer
    per = interleaved({"no-op runtime": lambda: stub.runtime.infer(feed),
                       "ModelServer.infer": lambda: bare.infer(feed),
                       "ModelServer.infer + drift observer on every request":
                           (lambda: observed.infer(feed), lambda: drain(a, observed), False)},
                      rounds=30, calls=500, rewarm=100)
    base = med(per["no-op runtime"])
    return [[label, f"{path}, no-op runtime", f"{med(v) * 1e6:.1f}", f"+{(med(v) - base) * 1e6:.1f} µs", "-"]
            for path, v in per.items() if path != "no-op runtime"]


def bench_http(res: Results, m: RefModel, inproc: Any, proc: AgentProcess) -> None:
    lm = inproc.server.active
    name = lm.bundle.manifest.inputs[0].name
    x = np.ascontiguousarray(m.x[:1])
    client = V2Http(proc.port, lm.bundle.manifest.name, name)
    want = inproc.infer({name: x})[lm.bundle.manifest.outputs[0].name]
    got = client.infer(x)
    assert np.allclose(got, want, atol=1e-4), "HTTP and Python API disagree"
    body = json.dumps({"inputs": [{"name": name, "shape": list(x.shape), "datatype": "FP32",
                                   "data": x.ravel().tolist()}]}).encode()
    paths: dict[str, Any] = {
        "Agent.infer (in process)": lambda: inproc.infer({name: x}),
        "HTTP, V2 JSON encode + POST + decode (stdlib json client)": lambda: client.infer(x),
        "HTTP, pre-encoded body (stdlib json), response unparsed": lambda: client.post(body),
    }
    from agent.localapi import InferenceClient
    from agent.v2 import encode_infer_request

    binary = InferenceClient(f"http://127.0.0.1:{proc.port}", binary=True)
    model = lm.bundle.manifest.name
    got_b = binary.infer(model, {name: x})[lm.bundle.manifest.outputs[0].name]
    assert np.allclose(got_b, want, atol=1e-4), "binary HTTP and Python API disagree"
    paths["HTTP, V2 binary tensors (InferenceClient)"] = lambda: binary.infer(model, {name: x})
    as_json = InferenceClient(f"http://127.0.0.1:{proc.port}", binary=False)
    got_j = as_json.infer(model, {name: x})[lm.bundle.manifest.outputs[0].name]
    assert np.allclose(got_j, want, atol=1e-4), "JSON HTTP and Python API disagree"
    paths["HTTP, V2 JSON (InferenceClient(binary=False))"] = lambda: as_json.infer(model, {name: x})
    body_j = encode_infer_request({name: x}, binary=False)[0]
    body_b = encode_infer_request({name: x})[0]
    per = interleaved(paths, rounds=40, calls=40 if m.size == 8 else 20)
    api = med(per["Agent.infer (in process)"])
    floor = stdlib_http_floor(body, json.dumps({"outputs": []}).encode())
    per["floor: stdlib ThreadingHTTPServer echo (same client, no inference)"] = floor
    rows = []
    for path, vals in per.items():
        if path.startswith("floor"):
            added_s = "(the HTTP cost alone, run after the others)"
        else:
            added_s = "-" if vals is per["Agent.infer (in process)"] else f"{(med(vals) - api) * 1e3:+.3f}"
        rows.append([m.label, path, f"{med(vals) * 1e3:.3f}", added_s])
    added_j = med(per["HTTP, V2 JSON (InferenceClient(binary=False))"]) - api
    res.add(f"HTTP added latency over the Python API, {m.label}, V2 JSON (InferenceClient)", "≤ 0.5 ms",
            f"{added_j * 1e3:.3f} ms (request body {len(body_j)} B)", added_j * 1e3 <= GOALS["http_ms"])
    added = med(per["HTTP, V2 JSON encode + POST + decode (stdlib json client)"]) - api
    wire = med(per["HTTP, pre-encoded body (stdlib json), response unparsed"]) - api
    res.add(f"HTTP added latency over the Python API, {m.label}, V2 JSON from a stdlib-json client", "report",
            f"{added * 1e3:.3f} ms (wire only: {wire * 1e3:.3f} ms; request body {len(body)} B)", None)
    added_b = med(per["HTTP, V2 binary tensors (InferenceClient)"]) - api
    res.add(f"HTTP added latency over the Python API, {m.label}, V2 binary tensor extension", "≤ 0.5 ms",
            f"{added_b * 1e3:.3f} ms (request body {len(body_b)} B)", added_b * 1e3 <= GOALS["http_ms"])
    res.details.setdefault("HTTP vs Python API, ms per request (medians of 40 interleaved blocks; "
                           "server: a separate `edgefleet agent run` process)",
                           [["model", "path", "ms/request", "added vs Python API (ms)"]]).extend(rows)


_ECHO_SERVER = r"""
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
reply = sys.argv[1].encode()
class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    def log_message(self, *a):
        pass
    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)
srv = ThreadingHTTPServer(("127.0.0.1", 0), H)
srv.daemon_threads = True
print(srv.server_address[1], flush=True)
srv.serve_forever()
"""


def stdlib_http_floor(body: bytes, reply: bytes) -> list[float]:
    """Per-request seconds against a bare stdlib HTTP/1.1 server that only echoes a fixed reply."""
    proc = subprocess.Popen([sys.executable, "-c", _ECHO_SERVER, reply.decode()], stdout=subprocess.PIPE, text=True)
    try:
        port = int(proc.stdout.readline())  # type: ignore[union-attr]
        client = V2Http(port, "echo", "x")
        return interleaved({"echo": lambda: client.post(body)}, rounds=20, calls=40)["echo"]
    finally:
        proc.terminate()
        proc.wait()


# RSS is read after the agent has sent telemetry (with its drift sketches) twice, so that
# the pages of that path are counted too: processes measured for RSS send it every second.
RSS_ENV = {"EDGEFLEET_TELEMETRY_INTERVAL": "1"}
NO_RELEASE = {"EDGEFLEET_RELEASE_MEMORY": "false"}


def let_telemetry_run() -> None:
    time.sleep(2.5)


def add_rss(res: Results, figure: str, p: AgentProcess) -> None:
    """Read an agent process's RSS once its telemetry has run, against the goal."""
    let_telemetry_run()
    rss, uss = p.memory()
    res.add(figure, "≤ 80 MB", f"{rss:.1f} MiB = {rss * MB / 1e6:.1f} MB (USS {uss:.1f} MiB)",
            rss * MB / 1e6 <= GOALS["rss_mb"])


def serve_some(proc: AgentProcess, m: RefModel, n: int = 1000) -> None:
    from agent.bundle import read_manifest

    man = read_manifest(m.bundle)
    client = V2Http(proc.port, man.name, man.inputs[0].name)
    for i in range(n):
        client.infer(np.ascontiguousarray(m.x[i % len(m.x)][None]))


def import_deltas(models: dict[int, RefModel]) -> list[list[str]]:
    """RSS added by each import, in the order the agent loads them, in a fresh interpreter."""
    script = r"""
import sys, time, json
def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
steps = [("python interpreter", None)]
out = [("python interpreter", rss())]
def step(label, fn):
    fn(); out.append((label, rss()))
step("click (CLI root)", lambda: __import__("agent.cli"))
step("numpy", lambda: __import__("numpy"))
step("pydantic (agent.config)", lambda: __import__("agent.config"))
step("paho-mqtt (agent.connection)", lambda: __import__("agent.connection"))
step("datasketches (agent.sketch)", lambda: __import__("agent.sketch"))
step("onnxruntime", lambda: __import__("onnxruntime"))
step("rest of agent.daemon (+ runtimes, serving, localapi)", lambda: (__import__("agent.daemon"), __import__("agent.runtimes.ort")))
step("psutil (telemetry thread)", lambda: __import__("psutil"))
def load():
    from pathlib import Path
    from agent.bundle import unpack
    from agent.profiles import load_profile
    from agent.runtimes.base import load_bundle
    import tempfile
    b = unpack(Path(sys.argv[1]), Path(tempfile.mkdtemp()) / "b")
    globals()["lm"] = load_bundle(b, load_profile("x86-gateway-vnni").runtime_options, "a")
step("reference model session (8x8) + warm-up", load)
step("agent.trust (first deployment; TUF itself runs in a helper process)", lambda: __import__("agent.trust"))
print(json.dumps(out))
"""
    r = subprocess.run([sys.executable, "-c", script, str(models[8].bundle)], capture_output=True, text=True,
                       check=True, cwd=ROOT)
    steps = json.loads(r.stdout.strip().splitlines()[-1])
    rows = [["step", "RSS after (MiB)", "added (MiB)"]]
    prev = None
    for label, val in steps:
        rows.append([label, f"{val:.1f}", "-" if prev is None else f"{val - prev:+.1f}"])
        prev = val
    return rows


def bench_release_latency(res: Results, m: RefModel, a: Any, seconds: float = 1.5) -> None:
    """What agent.memory's release costs the requests served while it runs: one thread
    calls ``Agent.infer`` back to back; halfway through, the agent releases its cold
    pages and warms its model up again (as after a deployment)."""
    name = a.server.active.bundle.manifest.inputs[0].name
    feed = {name: np.ascontiguousarray(m.x[:1])}
    spans: list[tuple[float, float]] = []
    stop = threading.Event()

    def load() -> None:
        while not stop.is_set():
            t = time.perf_counter()
            a.infer(feed)
            spans.append((t, time.perf_counter()))

    th = threading.Thread(target=load)
    th.start()
    time.sleep(seconds)
    t0 = time.perf_counter()
    a._release_memory()
    t1 = time.perf_counter()
    time.sleep(seconds)
    stop.set()
    th.join()
    during = [e - s for s, e in spans if e >= t0 and s <= t1]
    before = [e - s for s, e in spans if e < t0]
    after = [e - s for s, e in spans if s > t1 + 0.1]
    res.add(f"Memory release while serving ({m.label}): release + warm-up, wall time", "measured",
            f"{(t1 - t0) * 1e3:.1f} ms", None)
    res.add(f"Memory release while serving ({m.label}): requests during it", "report",
            f"{len(during)} requests, slowest {max(during, default=0) * 1e3:.2f} ms; median "
            f"{med(before) * 1e6:.0f} µs before, {med(after) * 1e6:.0f} µs after", None)


def bench_memory_and_http(res: Results, models: dict[int, RefModel], inproc: dict[int, Any],
                          broker_url: str, tmp: Path, repo_root: Path) -> None:
    # Idle: no model installed, connected to the broker.
    for env, note in ((RSS_ENV, ""), (RSS_ENV | NO_RELEASE, ", release_memory off")):
        idle = AgentProcess(tmp / "idle", broker_url, "bench-idle", trust_root=repo_root, env=env)
        try:
            idle.wait("/v2/health/live")
            let_telemetry_run()
            rss, uss = idle.memory()
            res.add(f"Agent RSS, idle (no model, connected){note}", "report",
                    f"{rss:.1f} MiB (USS {uss:.1f} MiB)", None)
        finally:
            idle.stop()
    for size, m in models.items():
        d = tmp / f"serving{size}"
        install(m.bundle, d)
        p = AgentProcess(d, broker_url, f"bench-serving{size}", env=RSS_ENV)
        try:
            p.wait("/v2/health/ready")
            serve_some(p, m, 200)
            bench_http(res, m, inproc[size], p)
            serve_some(p, m, 1000)
            add_rss(res, f"Agent RSS, {m.label} loaded and serving", p)
        finally:
            p.stop()
        # The same process without agent.memory's release, for comparison.
        p = AgentProcess(d, broker_url, f"bench-serving{size}-keep", env=RSS_ENV | NO_RELEASE)
        try:
            p.wait("/v2/health/ready")
            serve_some(p, m, 1200)
            add_rss(res, f"Agent RSS, {m.label} loaded and serving, release_memory off", p)
        finally:
            p.stop()
    for size, m in models.items():
        if m.selected is None:
            continue
        # The bundle this profile's device would run: another runtime may load fewer libraries.
        d = tmp / f"selected{size}"
        install(m.selected, d)
        sel = RefModel(size, m.selected, "", "", m.x)
        p = AgentProcess(d, broker_url, f"bench-selected{size}", env=RSS_ENV)
        try:
            p.wait("/v2/health/ready")
            serve_some(p, sel, 1200)
            add_rss(res, f"Agent RSS, digits CNN {size}x{size}, the compiler's selection for {PROFILE} "
                    f"({m.selected.name}) loaded and serving", p)
        finally:
            p.stop()
    tuned = {"OPENBLAS_NUM_THREADS": "1", "MALLOC_ARENA_MAX": "2"} | RSS_ENV
    m = models[8]
    p = AgentProcess(tmp / "serving8", broker_url, "bench-serving8-tuned", env=tuned)
    try:
        p.wait("/v2/health/ready")
        serve_some(p, m, 1200)
        add_rss(res, f"Agent RSS, {m.label} loaded and serving, OPENBLAS_NUM_THREADS=1 MALLOC_ARENA_MAX=2", p)
    finally:
        p.stop()
    res.details["RSS added per import, fresh interpreter, in the agent's load order"] = import_deltas(models)


def bench_ota_rss(res: Results, m: RefModel, broker_url: str, tmp: Path, repo, publisher) -> None:
    """RSS after a model arrives over the air (metadata checked by the TUF helper) and
    serves: the ONNX model, and the compiler's selection when that is another bundle."""
    from agent import topics
    from agent.bundle import read_manifest
    from agent.daemon import RELEASE_DELAY_S
    from agent.protocol import Deployment, encode

    bundles = [(m.label, m.bundle, m)]
    if m.selected is not None:
        bundles.append((f"digits CNN {m.size}x{m.size}, the compiler's selection ({m.selected.name})",
                        m.selected, RefModel(m.size, m.selected, "", "", m.x)))
    for i, (label, bundle, ref) in enumerate(bundles):
        device = f"bench-ota{i}"
        p = AgentProcess(tmp / f"ota{i}", broker_url, device, trust_root=repo.metadata_dir / "1.root.json",
                         env=RSS_ENV)
        try:
            p.wait("/v2/health/live")
            tp = publish_bundle(repo, bundle)
            man = read_manifest(bundle)
            dep = Deployment(deployment_id=f"ota{i}", model=man.ref, target_path=tp, health_window_s=0.0)
            publisher.publish(topics.device_topic(device, "deploy"), encode(dep), qos=1, retain=True)
            p.wait("/v2/health/ready", timeout=60)
            ready = time.monotonic()
            serve_some(p, ref, 1000)
            # the agent gives memory back once no deployment has followed for a while
            time.sleep(max(0.0, ready + RELEASE_DELAY_S + 0.5 - time.monotonic()))
            add_rss(res, f"Agent RSS, {label} deployed over the air and serving", p)
        finally:
            p.stop()


def bench_tuf_helper(res: Results, repo, bundle: Path, tmp: Path, runs: int = 5) -> None:
    """The TUF helper process one deployment runs: wall time and its own peak RSS."""
    script = r"""
import json, resource, sys, time
from pathlib import Path
from agent.transfer import NotFound
from agent.trust import lookup_target
root = Path(sys.argv[1])

class Files:  # fetch_bytes over the repository folder, as the agent's MQTT client offers it
    def fetch_bytes(self, path, max_bytes):
        f = root / path
        if not f.is_file():
            raise NotFound(path)
        return f.read_bytes()[: max_bytes + 1]

t0 = time.perf_counter()
lookup_target(Path(sys.argv[2]), sys.argv[3], Files())
wall = time.perf_counter() - t0
print(json.dumps([wall, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024]))
"""
    tp = publish_bundle(repo, bundle)
    walls, peaks = [], []
    for i in range(runs):
        trust = tmp / f"tuf-helper{i}"
        trust.mkdir()
        (trust / "root.json").write_bytes((repo.metadata_dir / "1.root.json").read_bytes())
        r = subprocess.run([sys.executable, "-c", script, str(repo.root_dir), str(trust), tp],
                           capture_output=True, text=True, check=True, cwd=ROOT)
        wall, peak = json.loads(r.stdout.strip().splitlines()[-1])
        walls.append(wall)
        peaks.append(peak)
    res.add("TUF metadata refresh in the helper process, first contact (wall time)", "measured",
            f"{med(walls) * 1e3:.0f} ms (n={runs})", None)
    res.add("TUF helper process, peak RSS (it exits after each deployment)", "report",
            f"{med(peaks):.1f} MiB", None)


def bench_cold_start(res: Results, m: RefModel, broker_url: str, tmp: Path, runs: int) -> None:
    d = tmp / "cold"
    install(m.bundle, d)
    ready, kept = [], []
    for _ in range(runs + 1):  # interleaved: with agent.memory's release at start, and without
        for env, out in ((None, ready), (NO_RELEASE, kept)):
            p = AgentProcess(d, broker_url, "bench-cold", env=env)
            try:
                out.append(p.wait("/v2/health/ready"))
            finally:
                p.stop()
    ready, kept = ready[1:], kept[1:]  # the first spawn pays for a cold page cache; it is not counted
    imports = []
    for _ in range(5):
        t = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import agent.cli, agent.daemon, agent.runtimes.ort"], check=True, cwd=ROOT)
        imports.append(time.perf_counter() - t)
    bare = []
    for _ in range(5):
        t = time.perf_counter()
        subprocess.run([sys.executable, "-c", "pass"], check=True)
        bare.append(time.perf_counter() - t)
    cold = med(ready)
    res.add(f"Cold start to ready (spawn → /v2/health/ready 200), {m.label}", "≤ 1.5 s",
            f"{cold:.2f} s (min {min(ready):.2f}, max {max(ready):.2f}, n={len(ready)})", cold <= GOALS["cold_s"])
    res.add(f"Cold start to ready, {m.label}, release_memory off", "≤ 1.5 s",
            f"{med(kept):.2f} s (min {min(kept):.2f}, max {max(kept):.2f}, n={len(kept)})",
            med(kept) <= GOALS["cold_s"])
    res.details["Cold start breakdown (medians)"] = [
        ["part", "seconds"],
        ["spawn → ready (edgefleet agent run)", f"{cold:.3f}"],
        ["the same with release_memory off", f"{med(kept):.3f}"],
        ["bare `python -c pass`", f"{med(bare):.3f}"],
        ["`python -c 'import agent.cli, agent.daemon, agent.runtimes.ort'`", f"{med(imports):.3f}"],
        ["rest: console-script entry points, settings, slots, model load + warm-up, API bind",
         f"{cold - med(imports):.3f}"],
    ]


def publish_bundle(repo, bundle_file: Path) -> str:
    from agent.bundle import read_manifest
    from agent.trust import TargetCustom

    man = read_manifest(bundle_file)
    return repo.add_bundle(bundle_file, TargetCustom(name=man.name, version=man.version, profile=man.profile,
                                                     format=man.format, precision=man.precision))


def bench_activation(res: Results, models: dict[int, RefModel], broker_url: str, tmp: Path, repo, publisher,
                     reps: int) -> None:
    from agent import topics
    from agent.config import AgentSettings
    from agent.daemon import Agent
    from agent.lifecycle import State
    from agent.protocol import Deployment, encode
    from tests.support import linear_bundle

    cases: dict[str, list[tuple[str, str]]] = {}
    lin = []
    for nm in ("lin-a", "lin-b"):
        man, *_ = linear_bundle(tmp / f"{nm}.efb", name=nm)
        lin.append((publish_bundle(repo, tmp / f"{nm}.efb"), man.ref))
    cases[f"small bundle (linear 4x3 ONNX, {(tmp / 'lin-a.efb').stat().st_size / 1024:.0f} KiB)"] = lin
    for size, m in models.items():
        pair = []
        for suffix in ("a", "b"):
            f = renamed(m.bundle, tmp / f"cnn{size}-{suffix}.efb", f"digits-cnn{size}-{suffix}")
            from agent.bundle import read_manifest

            pair.append((publish_bundle(repo, f), read_manifest(f).ref))
        cases[f"{m.label}, {m.bundle.stat().st_size / 1024:.0f} KiB"] = pair

    rows = [["bundle", "deploy → committed", "activating → serving", "downloading", "verifying", "installing",
             "self_test", "activating", "health_check (window 0 s)"]]
    runs = [(label, pair, True) for label, pair in cases.items()]
    # The same deployments of the 8x8 CNN without agent.memory. Back to back, as here, no
    # release runs between them (it waits RELEASE_DELAY_S for the next deployment).
    label8 = next(label for label in cases if label.startswith(models[8].label))
    runs.append((f"{label8}, release_memory off", cases[label8], False))
    for ci, (label, pair, release) in enumerate(runs):
        d = tmp / f"act{ci}"
        a = Agent(AgentSettings(broker_url=broker_url, device_id=f"bench-act{ci}", profile=PROFILE, data_dir=d,
                                trust_root=repo.metadata_dir / "1.root.json", release_memory=release))
        marks: dict[str, dict[str, float]] = {}
        orig_save, orig_swap = a.store.save, a.server.swap

        def save(rec, _orig=orig_save, _marks=marks):
            _orig(rec)
            _marks.setdefault(rec.deployment_id or "", {}).setdefault(rec.state.value, time.perf_counter())

        def swap(new, _orig=orig_swap, _a=a, _marks=marks):
            old = _orig(new)
            rec = _a.record
            if new is not None and rec.state == State.ACTIVATING:
                _marks.setdefault(rec.deployment_id or "", {}).setdefault("swapped", time.perf_counter())
            return old

        a.store.save = save  # type: ignore[method-assign]
        a.server.swap = swap  # type: ignore[method-assign]
        a.start()
        totals, acts = [], []
        per_state: dict[str, list[float]] = {}
        order = ["downloading", "verifying", "installing", "self_test", "activating", "health_check", "committed"]
        try:
            for i in range(reps + 1):
                dep_id = f"{ci}-{i}"
                tp, ref = pair[i % 2]
                dep = Deployment(deployment_id=dep_id, model=ref, target_path=tp, health_window_s=0.0)
                t0 = time.perf_counter()
                publisher.publish(topics.device_topic(f"bench-act{ci}", "deploy"), encode(dep), qos=1, retain=True)
                deadline = time.monotonic() + 60
                while "committed" not in marks.get(dep_id, {}) and time.monotonic() < deadline:
                    if a.record.deployment_id == dep_id and a.record.state.value in ("failed", "rolled_back"):
                        raise RuntimeError(f"deployment {dep_id} ended {a.record.state}: {a.record.error}")
                    time.sleep(0.001)
                mk = marks[dep_id]
                if i == 0:
                    continue  # the first deployment also pins metadata
                totals.append(mk["committed"] - t0)
                acts.append(mk["swapped"] - mk["activating"])
                for s0, s1 in zip(order, order[1:], strict=False):
                    per_state.setdefault(s0, []).append(mk[s1] - mk[s0])
        finally:
            a.stop()
        ms = [f"{med(totals) * 1e3:.0f} ms", f"{med(acts) * 1e3:.2f} ms"]
        ms += [f"{med(per_state[s]) * 1e3:.1f}" for s in order[:-1]]
        rows.append([label] + ms)
        res.add(f"Time to activate (activating saved → new model serving), {label}", "measured",
                f"{med(acts) * 1e3:.2f} ms (n={len(acts)})", None)
        res.add(f"Deploy → committed (health window 0 s), {label}", "measured",
                f"{med(totals) * 1e3:.0f} ms (n={len(totals)})", None)
    res.details["Deployment timings, medians (ms); real Mosquitto + TUF repository over MQTT, in-process agent"] = rows


# --------------------------------------------------------------------------- report


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for dist in ("edgefleet", "numpy", "onnxruntime", "ai-edge-litert", "paho-mqtt", "tuf", "pydantic", "datasketches",
                 "psutil", "torch"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            pass
    mosq = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    try:
        r = subprocess.run([mosq, "-h"], capture_output=True, text=True, timeout=5)
        first = (r.stdout or r.stderr).splitlines()[0]
        out["mosquitto"] = first.split("version")[-1].strip()
    except (OSError, IndexError, subprocess.TimeoutExpired):
        pass
    return out


def machine() -> str:
    try:
        r = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=5)
        model = next((ln.split(":", 1)[1].strip() for ln in r.stdout.splitlines() if ln.startswith("Model name")), "?")
    except (OSError, subprocess.TimeoutExpired):
        model = platform.processor() or "?"
    import psutil

    return (f"{model}, {os.cpu_count()} logical CPUs, {psutil.virtual_memory().total / (1 << 30):.0f} GiB RAM, "
            f"{platform.system()} {platform.release()}")


def render_console(res: Results) -> None:
    from rich.console import Console
    from rich.table import Table

    con = Console()
    t = Table(title="edgefleet agent benchmarks (issue #3)")
    for c in ("Figure", "Goal", "Measured", "Met"):
        t.add_column(c)
    for r in res.rows:
        t.add_row(r.figure, r.goal, r.measured,
                  "-" if r.met is None else ("[green]met[/]" if r.met else "[bold red]not met[/]"))
    con.print(t)
    for title, rows in res.details.items():
        dt_ = Table(title=title)
        for c in rows[0]:
            dt_.add_column(c)
        for r in rows[1:]:
            dt_.add_row(*r)
        con.print(dt_)


def render_markdown(res: Results, cmd: str, models: dict[int, RefModel], elapsed: float,
                    before: dict[str, Any] | None = None) -> str:
    v = versions()
    lines = [
        "# Agent benchmark results (issue #3)",
        "",
        f"- Command: `{cmd}`",
        f"- Machine: {machine()} (a shared VM: see the load note below)",
        f"- Date: {dt.datetime.now(dt.UTC).strftime('%Y-%m-%d %H:%M UTC')}; the run took {elapsed:.0f} s",
        "- Versions: " + ", ".join(f"{k} {val}" for k, val in v.items()),
        "- Reference model: the digits CNN trained by `compiler.demo_models.train_digits_cnn` and compiled by "
        f"`compiler.pipeline.compile_model` for `{PROFILE}`; the selected bundle is measured: "
        + "; ".join(f"{m.size}x{m.size}: `{m.bundle.name}` ({m.technique}, {m.kib:.0f} KiB"
                    + (f"; {m.note}" if m.note else "") + ")" for m in models.values()),
        "- ONNX Runtime runs with the profile's options (2 intra-op threads, 1 inter-op, CPU EP); batch 1.",
        "",
        "## Goals",
        "",
    ]
    mark = {None: "—", True: "met", False: "**not met**"}
    if before is None:
        lines += ["| Figure | Goal | Measured | Met |", "|---|---|---|---|"]
        for r in res.rows:
            lines.append(f"| {r.figure} | {r.goal} | {r.measured} | {mark[r.met]} |")
    else:
        lines += [f"Before: {before['label']}. After: this tree, measured right after it on the same machine.", "",
                  "| Figure | Goal | Before | Met before | After | Met after |", "|---|---|---|---|---|---|"]
        old = {r["figure"]: r for r in before["rows"]}
        for r in res.rows:
            b = old.get(r.figure)
            lines.append(f"| {r.figure} | {r.goal} | {b['measured'] if b else 'n/a'} | "
                         f"{mark[b['met']] if b else '—'} | {r.measured} | {mark[r.met]} |")
    for title, rows in res.details.items():
        lines += ["", f"## {title}", "", "| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
        lines += ["| " + " | ".join(r) + " |" for r in rows[1:]]
    if res.notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in res.notes]
    if before is not None:
        lines += ["", f"## Before: {before['label']}", ""] + [f"- {n}" for n in before["notes"][:1]]
        for title, rows in before["details"].items():
            lines += ["", f"### Before: {title}", "", "| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
            lines += ["| " + " | ".join(r) + " |" for r in rows[1:]]
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "agent-benchmarks-results.md")
    ap.add_argument("--no-write", action="store_true", help="Print only; do not write --out.")
    ap.add_argument("--epochs", type=int, default=2, help="Training epochs of the reference CNN.")
    ap.add_argument("--cnn-width", type=float, default=1.0,
                    help="Channel multiplier of the reference CNN (1: 16-32-64 channels; 2: 32-64-128).")
    ap.add_argument("--cache-dir", type=Path, help="Keep (and reuse) the compiled reference bundles here.")
    ap.add_argument("--cold-runs", type=int, default=9)
    ap.add_argument("--deploy-reps", type=int, default=10)
    ap.add_argument("--json-out", type=Path, help="Also write the figures as JSON (for --before).")
    ap.add_argument("--before", type=Path, help="JSON of an earlier run (e.g. of the previous tree) to show "
                    "side by side with this one.")
    ap.add_argument("--before-label", default="the previous tree", help="How to name the --before run.")
    ap.add_argument("--prepare", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.prepare is not None:
        prepare(args.prepare, args.epochs, args.cnn_width)
        return 0

    import logging

    import paho.mqtt.client as mqtt

    from hub.repository import Repository
    from tests.support import MosquittoBroker, RepoResponder, free_port

    logging.basicConfig(level=logging.ERROR)
    t_start = time.perf_counter()
    load_before = os.getloadavg()
    res = Results()
    with tempfile.TemporaryDirectory(prefix="agent-bench-") as tmp_s:
        tmp = Path(tmp_s)
        cache = args.cache_dir or tmp / "models"
        cache.mkdir(parents=True, exist_ok=True)
        models, prep_s = reference_models(cache, args.epochs, args.cnn_width)
        print(f"reference bundles ready in {prep_s:.0f} s: "
              + ", ".join(f"{m.size}x{m.size} {m.bundle.name}" for m in models.values()), flush=True)
        mosq = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        broker = MosquittoBroker(mosq, tmp / "mosquitto", free_port())
        broker.start()
        repo = Repository(tmp / "repo", b"bench-passphrase")
        repo.init()
        responder = RepoResponder(broker.url, repo)
        publisher = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
        publisher.connect("127.0.0.1", broker.port)
        publisher.loop_start()
        inproc: dict[int, Any] = {}
        try:
            print("python API overhead ...", flush=True)
            inproc = bench_python_api(res, models, broker.url, tmp)
            bench_release_latency(res, models[8], inproc[8])
            print("HTTP latency and RSS (edgefleet agent run processes) ...", flush=True)
            bench_memory_and_http(res, models, inproc, broker.url, tmp, repo.metadata_dir / "1.root.json")
            for a in inproc.values():
                a.stop()
            inproc = {}
            bench_ota_rss(res, models[8], broker.url, tmp, repo, publisher)
            bench_tuf_helper(res, repo, models[8].bundle, tmp)
            print("cold start ...", flush=True)
            bench_cold_start(res, models[8], broker.url, tmp, args.cold_runs)
            print("activation and deployment ...", flush=True)
            bench_activation(res, models, broker.url, tmp, repo, publisher, args.deploy_reps)
        finally:
            for a in inproc.values():
                a.stop()
            publisher.loop_stop()
            publisher.disconnect()
            responder.stop()
            broker.stop()
    elapsed = time.perf_counter() - t_start
    load_after = os.getloadavg()
    res.notes += [
        f"Machine load (1-minute load average) before / after the run: {load_before[0]:.1f} / {load_after[0]:.1f} "
        f"on {os.cpu_count()} CPUs. Other work on a shared VM inflates and scatters every figure here; "
        "compare runs only at similar load.",
        "Overhead rows: `session.run` is the agent's own `InferenceSession` (reached through the runtime), so the "
        "raw and API paths share the model, the thread pool and the memory; blocks of calls alternate, in flipped "
        "order every round. `Agent.infer` includes the drift sketch observer that every served request feeds; "
        "`ModelServer.infer` is the same path without observers. The drift sketch runs on other threads "
        "(`SketchAccumulator.update`), so after each block of `Agent.infer` calls the benchmark waits until that "
        "work is done, outside the timing (the `Agent.infer` row is the latency a caller sees), "
        "and before the next path's block, so that it never lands on another row. The drift-sketch CPU row is the "
        "observers thread's own run time (Linux `schedstat`) over 20,000 further `Agent.infer` calls, divided by "
        "the calls. "
        "The steady-state rows time the same paths in blocks of about 0.2 s: the observers thread sketches beside "
        "the requests, inside the timing, as in a serving loop (what is left queued at a block's end is drained "
        "untimed, so that it never lands on the next path), and the drift sample's rate window sees a serving loop's "
        "rate for all but the first milliseconds of a block. "
        "`OnnxRuntime.infer` calls the session's C++ `run` directly (bound at load, CPU provider only), skipping "
        "the per-call Python checks of `InferenceSession.run`; that is why it can be faster than `session.run`.",
        "HTTP rows: the server is a separate `edgefleet agent run` process (as an application on the device would "
        "see it); added latency = median HTTP request − median in-process `Agent.infer`, measured interleaved. The "
        "JSON goal row is `InferenceClient(binary=False)` (the agent's orjson codec); the stdlib-json rows encode and "
        "decode with the standard library's `json` on `http.client` (keep-alive), as a client without this package would; "
        "the binary row is `InferenceClient` with the V2 binary tensor extension (`Inference-Header-Content-Length`, "
        "raw little-endian tensors in the body, outputs returned the same way).",
        "RSS is the resident set of the agent process from psutil (`memory_full_info`); MB = 10^6 bytes for the goal, "
        "MiB = 2^20 bytes as measured. USS is the memory unique to the process (shared-library pages excluded).",
        "Cold start: the first spawn (cold page cache) is discarded; the agent connects to a local Mosquitto, "
        "which it does after the API is up, so the broker does not gate readiness.",
        f"Reference bundles were prepared in {prep_s:.0f} s ({args.epochs} training epochs), not counted in the figures.",
    ]
    render_console(res)
    if args.json_out is not None:
        args.json_out.write_text(json.dumps({"rows": [r.__dict__ for r in res.rows], "details": res.details,
                                             "notes": res.notes, "elapsed_s": elapsed}, indent=1))
    cmd = ("python benchmarks/agent_bench.py" + (f" --epochs {args.epochs}" if args.epochs != 2 else "")
           + (f" --cnn-width {args.cnn_width:g}" if args.cnn_width != 1.0 else ""))
    if args.cache_dir is not None:
        cmd += f" --cache-dir {args.cache_dir}"
    if not args.no_write:
        before = None
        if args.before is not None:
            before = json.loads(args.before.read_text()) | {"label": args.before_label}
        args.out.write_text(render_markdown(res, cmd, models, elapsed, before))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
