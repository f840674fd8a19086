"""Test support: a real Mosquitto process, tiny real ONNX models, bundle builders."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from agent.bundle import Manifest, write_bundle
from agent.features import build_reference


def missing_service(name: str, why: str):
    """Skip a test that needs ``name``, or fail it when CI requires that service.

    CI sets ``EDGEFLEET_TEST_REQUIRE=mosquitto,postgres`` so that a missing service is
    an error there, while a bare machine still runs everything else.
    """
    import os

    import pytest

    required = {s.strip() for s in os.environ.get("EDGEFLEET_TEST_REQUIRE", "").split(",") if s.strip()}
    if name in required:
        pytest.fail(f"{name} is required here (EDGEFLEET_TEST_REQUIRE) but unavailable: {why}")
    pytest.skip(f"{name} unavailable: {why}")


def owns_installed_libraries() -> bool:
    """Whether the kernel will page out the installed libraries' code for this process
    (agent.memory's rule: it owns them or may write them)."""
    import onnxruntime

    from agent.memory import _owned

    return _owned(onnxruntime.__file__, {})


def kill_pid_in(pidfile: Path) -> None:
    """SIGKILL the process whose id a test's command wrote to ``pidfile``, if it did."""
    if pidfile.exists():
        os.kill(int(pidfile.read_text()), 9)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MosquittoBroker:
    def __init__(self, binary: str, workdir: Path, port: int, extra_conf: str = ""):
        self.binary = binary
        self.workdir = workdir
        self.port = port
        self.extra_conf = extra_conf
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        conf = self.workdir / "mosquitto.conf"
        conf.write_text(
            f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
            f"max_inflight_messages 1000\nset_tcp_nodelay true\nmax_queued_messages 10000\n"
            f"{self.extra_conf}"
        )
        self.proc = subprocess.Popen(
            [self.binary, "-c", str(conf)], stdout=subprocess.DEVNULL,
            stderr=open(self.workdir / "mosquitto.log", "ab"),
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"mosquitto did not start on {self.port}")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
            self.proc = None


def linear_onnx(w: np.ndarray, b: np.ndarray, *, in_name: str = "input", out_name: str = "logits") -> bytes:
    """A real ONNX model computing x @ w + b (float32, dynamic batch)."""
    n_in, n_out = w.shape
    graph = helper.make_graph(
        [helper.make_node("MatMul", [in_name, "W"], ["xw"]), helper.make_node("Add", ["xw", "B"], [out_name])],
        "linear",
        [helper.make_tensor_value_info(in_name, TensorProto.FLOAT, ["N", n_in])],
        [helper.make_tensor_value_info(out_name, TensorProto.FLOAT, ["N", n_out])],
        [helper.make_tensor("W", TensorProto.FLOAT, w.shape, w.astype(np.float32).ravel().tolist()),
         helper.make_tensor("B", TensorProto.FLOAT, b.shape, b.astype(np.float32).ravel().tolist())],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def linear_bundle(
    out: Path, *, version: str = "1.0.0", profile: str = "x86-gateway-vnni", seed: int = 0,
    name: str = "lin", n_in: int = 4, n_out: int = 3, bad_selftest: bool = False,
    model_bytes: bytes | None = None, weights: tuple[np.ndarray, np.ndarray] | None = None,
) -> tuple[Manifest, str, np.ndarray, np.ndarray]:
    """Write a bundle of a random (or given) linear model; returns (manifest, sha256, W, b)."""
    rng = np.random.default_rng(seed)
    if weights is not None:
        w, b = weights
        n_in, n_out = w.shape
    else:
        w = rng.normal(size=(n_in, n_out)).astype(np.float32)
        b = rng.normal(size=(n_out,)).astype(np.float32)
    x = rng.normal(size=(8, n_in)).astype(np.float32)
    y = x @ w + b
    if bad_selftest:
        y = y + 1.0
    ref = build_reference(x, y.argmax(1), classes=[str(i) for i in range(n_out)])
    man, sha = write_bundle(
        out,
        manifest=dict(
            name=name, version=version, format="onnx", precision="fp32", runtime="onnxruntime",
            min_runtime_version="1.17", profile=profile,
            inputs=[dict(name="input", dtype="float32", shape=[-1, n_in])],
            outputs=[dict(name="logits", dtype="float32", shape=[-1, n_out])],
            labels=[str(i) for i in range(n_out)], selftest_tolerance=1e-4,
        ),
        model=model_bytes if model_bytes is not None else linear_onnx(w, b),
        selftest_inputs={"input": x}, selftest_outputs={"logits": y}, reference=ref,
    )
    return man, sha, w, b


class RepoResponder:
    """Serves a TUF repository folder over the agent's repo/get -> repo/data protocol.

    Implements the hub's side of the transfer contract on a real broker, for agent tests
    that should not depend on the whole hub. ``mutate`` can corrupt served bytes.
    """

    def __init__(self, broker_url: str, repository, *, mutate=None, drop_every: int = 0):
        import paho.mqtt.client as mqtt

        from agent import topics
        from agent.connection import parse_broker_url
        from agent.protocol import ChunkHeader, RepoRequest, decode, encode_frame

        self.repository = repository
        self.mutate = mutate
        self.drop_every = drop_every
        self.requests = 0
        addr = parse_broker_url(broker_url)
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"responder-{time.time_ns()}")

        def on_connect(c, u, f, rc, p):
            c.subscribe(topics.device_wildcard("repo/get"), qos=0)

        def on_message(c, u, msg):
            dt = topics.parse_device_topic(msg.topic)
            if dt is None:
                return
            req = decode(RepoRequest, msg.payload)
            self.requests += 1
            if self.drop_every and self.requests % self.drop_every == 0:
                return
            out = topics.device_topic(dt.device_id, "repo/data")
            try:
                total, data = self.repository.read(req.path, req.offset, req.length)
            except (FileNotFoundError, ValueError):
                c.publish(out, encode_frame(ChunkHeader(rid=req.rid, path=req.path, status="not_found")))
                return
            if self.mutate is not None:
                data = self.mutate(req.path, req.offset, data)
            c.publish(out, encode_frame(ChunkHeader(rid=req.rid, path=req.path, offset=req.offset, total=total), data))

        self.client.on_connect = on_connect
        self.client.on_message = on_message
        self.client.connect(addr.host, addr.port)
        self.client.loop_start()

    def stop(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()
