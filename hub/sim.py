"""A fleet simulator: many *real* agents (``agent.daemon.Agent``) in a few processes.

For tests, demos and benchmarks. Every simulated device is the real agent with its
own data folder, MQTT connection, lifecycle, slots, spool and telemetry; faults are
injected only through the agent's configuration, never by special cases in it:

- ``--fail-install R``: an ``installing_enter`` state hook that exits 1
  (:mod:`agent.hooks`), so installs fail and the old model keeps serving;
- ``--fail-health R``: an ``exec`` health probe running ``false``
  (:class:`agent.health.ProbeConfig`), so the agent rolls back in its health window;
- ``--offline R``: the device's agent is stopped (graceful: it publishes offline
  presence) and started again, ``--offline-period`` seconds each;
- ``--latency-factor F``: the sim processes register a runtime under the key
  ``onnxruntime`` that wraps the real ONNX Runtime and sleeps ``(F - 1) x`` each
  inference's time (``agent.runtimes.base.register``).

Which devices get a fault is deterministic: with rate R, device *i* has it when
``floor((i + 1) R) > floor(i R)``, which spreads them evenly over the ids, so small
waves (a canary) see the configured share.

Simulated devices share the host's cores, so the sim runs them with profiles copied
from the shipped ones with ``intra_op_threads = 1`` and a latency budget of 1 s
(``SimConfig.latency_budget_ms``): on a loaded host the self-test's p95 would
otherwise exceed a real device's 20 ms budget for reasons no device has. Each process also drives local
inference on every agent (``Agent.infer`` on random normal inputs) so that telemetry
and drift sketches carry traffic.

A sim process runs at most ``SimConfig.max_agents_per_process`` agents (25), and
more processes are started than ``processes`` asks for when the fleet needs them.
Two reasons. First, the agents of one process share its GIL, and a hundred agents
deploying at once in one process spend much of their time handing it around (the
operating system schedules 40 processes better than one interpreter schedules 500
threads). Second, and a hard limit at about 150 agents, paho's
network loop watches its socket with ``select()``: a
socket numbered ``FD_SETSIZE`` (1024) or above makes ``select()`` fail, and paho
then drops the connection without calling ``on_disconnect``. An agent holds about
six descriptors (the MQTT socket and paho's wake-up socket pair, the spool's SQLite
database, WAL and shared-memory files), so 250 agents in one process put the later
ones' sockets past 1024: they connected, were dropped within a second, and
reconnected, forever and silently (about 20,000 connections in two minutes for 1,000
devices in 4 processes, a third of the fleet never seen online, and a reconnect
storm that drove the load average past 300). Each sim process also lowers its soft
``RLIMIT_NOFILE`` to ``FD_SETSIZE``, so that should an agent still need a descriptor
past it, opening fails loudly (``EMFILE``, logged by the agent) rather than leaving a
socket ``select()`` cannot watch.
"""

from __future__ import annotations

import logging
import math
import multiprocessing as mp
import re
import resource
import signal
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import click

__all__ = ["SimConfig", "SimDevice", "plan_devices", "process_count", "SimFleet", "sim_command"]

log = logging.getLogger(__name__)

# select()'s limit: paho cannot watch a socket whose descriptor is this or above.
FD_SETSIZE = 1024


@dataclass(frozen=True)
class SimConfig:
    """Everything a simulated fleet is made of."""

    broker_url: str
    devices: int
    data_dir: Path
    profiles: tuple[str, ...] = ("x86-gateway-vnni",)
    fail_install: float = 0.0
    fail_health: float = 0.0
    offline: float = 0.0
    offline_period_s: float = 20.0
    latency_factor: float = 1.0
    trust_root: Path | None = None
    processes: int = 2
    prefix: str = "sim"
    tags: tuple[str, ...] = ()
    telemetry_interval: float = 2.0
    infer_interval: float = 0.5
    infer_batch: int = 16
    preinstall: tuple[Path, ...] = ()
    health_window_probe_timeout_s: float = 5.0
    latency_budget_ms: float = 1000.0
    log_level: str = "WARNING"
    # See the module docstring: less GIL contention than with more, and far below
    # the ~150 agents at which descriptors would pass FD_SETSIZE (about six each).
    max_agents_per_process: int = 25
    # The GIL switch interval of each sim process (Python's default is 0.005 s). Every
    # thread waiting for the GIL wakes once per interval; with hundreds of agent
    # threads busy at once (a 1,000-device wave) that was ~180,000 context switches a
    # second, 80 % of the CPU in the kernel. A device runs one agent and never sees it.
    switch_interval_s: float = 0.05


@dataclass(frozen=True)
class SimDevice:
    device_id: str
    profile: str
    fail_install: bool
    fail_health: bool
    offline: bool
    index: int


def _spread(i: int, rate: float) -> bool:
    return rate > 0 and math.floor((i + 1) * rate + 1e-9) > math.floor(i * rate + 1e-9)


def plan_devices(cfg: SimConfig) -> list[SimDevice]:
    """The simulated devices and their faults. Pure and deterministic."""
    return [
        SimDevice(
            device_id=f"{cfg.prefix}-{i:04d}",
            profile=cfg.profiles[i % len(cfg.profiles)],
            fail_install=_spread(i, cfg.fail_install),
            fail_health=_spread(i, cfg.fail_health),
            offline=_spread(i, cfg.offline),
            index=i,
        )
        for i in range(cfg.devices)
    ]


def process_count(cfg: SimConfig) -> int:
    """How many sim processes run ``cfg``'s devices: ``cfg.processes``, or more when
    that would put over ``cfg.max_agents_per_process`` agents in one."""
    if cfg.devices <= 0:
        return 1
    needed = math.ceil(cfg.devices / max(1, cfg.max_agents_per_process))
    return max(1, min(cfg.devices, max(cfg.processes, needed)))


# --------------------------------------------------------------------------- in a sim process


def _preimport() -> None:
    """Import what the agent imports on first use (TUF, for its first deployment).

    A real device imports it once, alone. A hundred agents of one process starting a
    deployment together all queued on that one import's module lock, under a heavy
    load, for minutes. Importing it up front changes no agent's behaviour.
    """
    import importlib

    for name in ("agent.trust", "tuf.api.metadata", "tuf.ngclient", "psutil"):
        importlib.import_module(name)


def _cap_descriptors() -> None:
    """Make descriptors past select()'s limit fail to open instead of failing silently
    in paho's loop (see the module docstring)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft > FD_SETSIZE:
        resource.setrlimit(resource.RLIMIT_NOFILE, (FD_SETSIZE, hard))


def _register_slow_runtime(factor: float) -> None:
    """Replace the ``onnxruntime`` runtime in this process with a slower wrapper."""
    import importlib

    import numpy as np

    from agent.profiles import RuntimeOptions
    from agent.runtimes.base import _REGISTRY, register

    importlib.import_module("agent.runtimes.ort")
    real = _REGISTRY["onnxruntime"]

    class SlowOnnxRuntime:
        key = "onnxruntime"

        def __init__(self) -> None:
            self._rt = real()

        @classmethod
        def library_version(cls) -> str:
            return real.library_version()

        def load(self, model_path: str, options: RuntimeOptions) -> None:
            self._rt.load(model_path, options)

        @property
        def inputs(self) -> Any:
            return self._rt.inputs

        @property
        def outputs(self) -> Any:
            return self._rt.outputs

        def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            t0 = time.perf_counter()
            out = self._rt.infer(inputs)
            time.sleep((factor - 1.0) * (time.perf_counter() - t0))
            return out

        def warmup(self, inputs: dict[str, np.ndarray] | None = None) -> None:
            self._rt.warmup(inputs)

        def unload(self) -> None:
            self._rt.unload()

    register(SlowOnnxRuntime)  # type: ignore[arg-type]


def _write_profiles(dest: Path, budget_ms: float) -> Path:
    import firmware_profiles

    src = Path(firmware_profiles.__file__).parent
    dest.mkdir(parents=True, exist_ok=True)
    for p in src.glob("*.toml"):
        text = re.sub(r"(?m)^intra_op_threads\s*=\s*\d+", "intra_op_threads = 1", p.read_text())
        text = re.sub(r"(?m)^latency_budget_ms\s*=\s*[0-9.]+", f"latency_budget_ms = {budget_ms}", text)
        out = dest / p.name
        if not out.exists() or out.read_text() != text:
            out.write_text(text)
    return dest


def _preinstall(data_dir: Path, profile: str, bundles: Sequence[Path]) -> None:
    """Factory-install the bundle built for ``profile`` when the device has no model."""
    from agent.bundle import BundleLimits, file_sha256, read_manifest
    from agent.slots import Slots

    slots = Slots(data_dir / "slots")
    if slots.active_name() is not None:
        return
    for b in bundles:
        if read_manifest(b, BundleLimits()).profile == profile:
            slots.install(b, "a", sha256=file_sha256(b))
            slots.activate("a")
            return


class _Worker:
    """The agents of one sim process."""

    def __init__(self, cfg: SimConfig, devices: Sequence[SimDevice]) -> None:
        from agent.config import AgentSettings
        from agent.health import ProbeConfig

        self.cfg = cfg
        self.devices = {d.device_id: d for d in devices}
        self.profiles_dir = _write_profiles(cfg.data_dir / "profiles", cfg.latency_budget_ms)
        self.settings: dict[str, AgentSettings] = {}
        for d in devices:
            ddir = cfg.data_dir / d.device_id
            ddir.mkdir(parents=True, exist_ok=True)
            hooks = ddir / "hooks"
            hooks.mkdir(exist_ok=True)
            hook = hooks / "installing_enter"
            if d.fail_install:
                hook.write_text("#!/bin/sh\necho 'simulated install failure' >&2\nexit 1\n")
                hook.chmod(0o755)
            else:
                hook.unlink(missing_ok=True)
            probes = [ProbeConfig(kind="exec", command=["false"], attempts=1,
                                  timeout_s=cfg.health_window_probe_timeout_s)] if d.fail_health else []
            if cfg.preinstall:
                _preinstall(ddir, d.profile, cfg.preinstall)
            self.settings[d.device_id] = AgentSettings(
                broker_url=cfg.broker_url, device_id=d.device_id, profile=d.profile, data_dir=ddir,
                telemetry_interval=cfg.telemetry_interval, tags=list(cfg.tags), trust_root=cfg.trust_root,
                profiles_dir=self.profiles_dir, health_probes=probes, hooks_dir=hooks,
                reconnect_max_delay=5.0, selftest_latency_runs=5,
                # Many agents share this process: none of them owns its memory to give back.
                release_memory=False,
            )
        self.agents: dict[str, Any] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()

    def set_online(self, device_id: str, online: bool) -> None:
        from agent.daemon import Agent

        with self._lock:
            running = self.agents.get(device_id)
        if online and running is None:
            a = Agent(self.settings[device_id])
            a.start()
            with self._lock:
                self.agents[device_id] = a
        elif not online and running is not None:
            with self._lock:
                del self.agents[device_id]
            running.stop()

    def start(self) -> None:
        for did in self.settings:
            self.set_online(did, True)
        if self.cfg.infer_interval > 0:
            threading.Thread(target=self._traffic, name="sim-traffic", daemon=True).start()
        if any(d.offline for d in self.devices.values()) and self.cfg.offline_period_s > 0:
            threading.Thread(target=self._flapper, name="sim-offline", daemon=True).start()

    def stop(self) -> None:
        self._stop.set()
        with self._lock:
            agents = list(self.agents.values())
            self.agents.clear()
        threads = [threading.Thread(target=a.stop) for a in agents]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)

    def _traffic(self) -> None:
        import numpy as np

        rng = np.random.default_rng(0)
        while not self._stop.wait(self.cfg.infer_interval):
            with self._lock:
                agents = list(self.agents.values())
            for a in agents:
                m = a.server.active
                if m is None:
                    continue
                spec = m.bundle.manifest.inputs[0]
                shape = [self.cfg.infer_batch if (s is None or s < 0) else s for s in spec.shape]
                x = rng.normal(size=shape).astype(spec.dtype)
                try:
                    a.infer({spec.name: x})
                except (ValueError, RuntimeError) as e:
                    log.debug("sim inference on %s failed: %s", a.settings.device_id, e)

    def _flapper(self) -> None:
        period = self.cfg.offline_period_s
        flappers = sorted(d for d, s in self.devices.items() if s.offline)
        t0 = time.monotonic()
        while not self._stop.wait(0.5):
            for k, did in enumerate(flappers):
                phase = ((time.monotonic() - t0) / period + k / max(1, len(flappers))) % 2
                want = phase < 1.0
                with self._lock:
                    have = did in self.agents
                if want != have and not self._stop.is_set():
                    self.set_online(did, want)


def _worker_main(cfg: SimConfig, devices: list[SimDevice], conn: Connection) -> None:
    logging.basicConfig(level=cfg.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        filename=str(cfg.data_dir / f"sim-{devices[0].index:04d}.log") if devices else None)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _cap_descriptors()
    _preimport()
    sys.setswitchinterval(cfg.switch_interval_s)
    if cfg.latency_factor != 1.0:
        _register_slow_runtime(cfg.latency_factor)
    w = _Worker(cfg, devices)
    w.start()
    conn.send(("ready", len(devices)))
    while True:
        try:
            msg = conn.recv()
        except EOFError:
            break
        if msg[0] == "stop":
            break
        if msg[0] == "online":
            w.set_online(msg[1], bool(msg[2]))
            conn.send(("ok", msg[1]))
    w.stop()
    conn.send(("stopped", None))


# --------------------------------------------------------------------------- controller


@dataclass
class SimFleet:
    """Start, control and stop a simulated fleet (the CLI and tests use this)."""

    cfg: SimConfig
    devices: list[SimDevice] = field(default_factory=list)
    _procs: list[tuple[Any, Connection, set[str]]] = field(default_factory=list)

    def start(self, timeout: float = 120.0) -> SimFleet:
        """Start the sim processes and wait until every agent has started.

        Raises:
            TimeoutError: a process did not report ready in time.
            RuntimeError: a process died while starting.
        """
        self.cfg.data_dir.mkdir(parents=True, exist_ok=True)
        self.devices = plan_devices(self.cfg)
        k = process_count(self.cfg)
        if k > self.cfg.processes:
            log.info("running %d devices in %d sim processes (at most %d agents each)",
                     len(self.devices), k, self.cfg.max_agents_per_process)
        ctx = mp.get_context("spawn")
        for p in range(k):
            mine = self.devices[p::k]
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_worker_main, args=(self.cfg, mine, child), daemon=True,
                               name=f"edgefleet-sim-{p}")
            proc.start()
            self._procs.append((proc, parent, {d.device_id for d in mine}))
        deadline = time.monotonic() + timeout
        for proc, conn, _ in self._procs:
            if not conn.poll(max(0.0, deadline - time.monotonic())):
                self.stop()
                raise TimeoutError("a sim process did not start in time")
            try:
                conn.recv()
            except EOFError as e:
                self.stop()
                raise RuntimeError(f"sim process {proc.name} died while starting") from e
        return self

    def set_online(self, device_id: str, online: bool, timeout: float = 60.0) -> None:
        """Start (online) or gracefully stop (offline) one device's agent.

        Raises:
            KeyError: no such simulated device.
            TimeoutError: its process did not answer.
        """
        for _proc, conn, ids in self._procs:
            if device_id in ids:
                conn.send(("online", device_id, online))
                if not conn.poll(timeout):
                    raise TimeoutError(f"sim process did not answer for {device_id}")
                conn.recv()
                return
        raise KeyError(device_id)

    def stop(self, timeout: float = 60.0) -> None:
        for _proc, conn, _ in self._procs:
            try:
                conn.send(("stop",))
            except (BrokenPipeError, OSError):
                pass
        for proc, conn, _ in self._procs:
            try:
                if conn.poll(timeout):
                    conn.recv()
            except (EOFError, OSError):
                pass
            proc.join(10)
            if proc.is_alive():
                proc.kill()
                proc.join(5)
        self._procs.clear()

    def pids(self) -> list[int]:
        return [p.pid for p, _, _ in self._procs if p.pid is not None]

    def __enter__(self) -> SimFleet:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --------------------------------------------------------------------------- CLI


@click.command("sim")
@click.option("--broker", "broker_url", required=True, help="MQTT broker URL, mqtt://host:port.")
@click.option("--devices", type=click.IntRange(1, 100_000), required=True, help="How many devices.")
@click.option("--profile", "profiles", multiple=True, help="Profile(s), assigned round-robin.  "
              "[default: x86-gateway-vnni]")
@click.option("--fail-install", type=click.FloatRange(0, 1), default=0.0, help="Share whose installs fail.")
@click.option("--fail-health", type=click.FloatRange(0, 1), default=0.0, help="Share failing health probes.")
@click.option("--offline", type=click.FloatRange(0, 1), default=0.0, help="Share that goes offline and back.")
@click.option("--offline-period", type=float, default=20.0, show_default=True,
              help="Seconds offline, then online, for --offline devices.")
@click.option("--latency-factor", type=click.FloatRange(1.0), default=1.0, help="Slow inference by F.")
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), default=Path("./edgefleet-sim"),
              show_default=True)
@click.option("--trust-root", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="The hub's root.json (else trust on first use).")
@click.option("--processes", type=click.IntRange(1, 256), default=2, show_default=True,
              help="Sim processes; more are started when needed to keep each at 25 agents or fewer.")
@click.option("--prefix", default="sim", show_default=True, help="Device id prefix.")
@click.option("--tag", "tags", multiple=True, help="Tag every device (repeatable).")
@click.option("--telemetry-interval", type=float, default=2.0, show_default=True)
@click.option("--infer-interval", type=float, default=0.5, show_default=True,
              help="Seconds between local inference batches per device (0: no traffic).")
@click.option("--preinstall", multiple=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Factory-install this bundle (the one matching each profile) on empty devices.")
def sim_command(broker_url: str, devices: int, profiles: tuple[str, ...], fail_install: float,
                fail_health: float, offline: float, offline_period: float, latency_factor: float,
                data_dir: Path, trust_root: Path | None, processes: int, prefix: str, tags: tuple[str, ...],
                telemetry_interval: float, infer_interval: float, preinstall: tuple[Path, ...]) -> None:
    """Run N simulated devices (the real agent) until interrupted."""
    cfg = SimConfig(
        broker_url=broker_url, devices=devices, data_dir=data_dir,
        profiles=profiles or SimConfig.profiles, fail_install=fail_install, fail_health=fail_health,
        offline=offline, offline_period_s=offline_period, latency_factor=latency_factor,
        trust_root=trust_root, processes=processes, prefix=prefix, tags=tags,
        telemetry_interval=telemetry_interval, infer_interval=infer_interval, preinstall=preinstall,
    )
    fleet = SimFleet(cfg)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    t0 = time.monotonic()
    try:
        fleet.start()
    except (TimeoutError, RuntimeError) as e:
        raise click.ClickException(str(e)) from e
    plan = fleet.devices
    click.echo(
        f"{len(plan)} simulated devices in {len(fleet.pids())} processes, started in "
        f"{time.monotonic() - t0:.1f}s: {sum(d.fail_install for d in plan)} failing installs, "
        f"{sum(d.fail_health for d in plan)} failing health, {sum(d.offline for d in plan)} flapping",
        err=True,
    )
    try:
        while not stop.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        fleet.stop()
