"""Support for the hub-side monitoring tests: bundles carrying a real reference, device
sketches made by the real agent accumulator, rows written through the hub's tables,
a hub app with monitoring settings, and a local webhook receiver."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
from fastapi.testclient import TestClient

from agent.bundle import Reference, write_bundle
from agent.sketch import DriftSketch, SketchAccumulator
from hub.app import Hub, create_app
from hub.db import Database
from hub.models import Device, DriftSketchRow
from hub.monitoring import MonitoringSettings
from tests.hub.bundles import tiny_onnx
from tests.hub.conftest import make_settings
from tests.monitoring.conftest import mixed_rows

__all__ = [
    "make_ref_bundle",
    "device_sketch",
    "store_sketches",
    "add_devices",
    "MonHub",
    "start_hub",
    "WebhookReceiver",
]


def make_ref_bundle(out_dir: Path, reference: Reference, *, name: str = "clf", version: str = "1.0.0") -> Path:
    """A real, verifiable bundle whose reference.json is ``reference``."""
    model, w, b = tiny_onnx()
    x = np.arange(8, dtype=np.float32).reshape(2, 4) / 8
    manifest: dict[str, Any] = {
        "name": name, "version": version, "format": "onnx", "precision": "fp32",
        "runtime": "onnxruntime", "min_runtime_version": "1.17", "profile": "x86-gateway-vnni",
        "inputs": [{"name": "x", "dtype": "float32", "shape": [-1, 4]}],
        "outputs": [{"name": "y", "dtype": "float32", "shape": [-1, 3]}],
        "task": "classification", "lineage": {"settings": {"selected": True}, "compiler_version": "test"},
    }
    path = out_dir / f"{name}-{version}.efb"
    write_bundle(path, manifest=manifest, model=model, selftest_inputs={"x": x},
                 selftest_outputs={"y": x @ w + b}, reference=reference)
    return path


def device_sketch(
    reference: Reference, model: str, rng: np.random.Generator, start: float, end: float, *,
    rows: int = 300, shift: float = 0.0, scale: float = 1.0, latency_ms: float = 4.0,
    cat_p: np.ndarray | None = None,
) -> DriftSketch:
    """One device window, sketched by the agent's own accumulator."""
    acc = SketchAccumulator(reference, model, start=start)
    x = mixed_rows(rng, rows, shift=shift, scale=scale) if cat_p is None else mixed_rows(
        rng, rows, shift=shift, scale=scale, cat_p=cat_p)
    acc.update(x, (x[:, 0] > 0).astype(np.int64))
    acc.observe_latency(rng.gamma(4.0, latency_ms / 4.0, size=rows))
    return acc.snapshot_and_reset(end)


def store_sketches(db: Database, items: Sequence[tuple[str, DriftSketch]]) -> None:
    """Write sketches into the drift ingest table, as the MQTT ingest stores them."""
    with db.session() as s:
        for device_id, sk in items:
            s.add(DriftSketchRow(
                device_id=device_id, model=sk.model, window_start=sk.window_start,
                window_end=sk.window_end, rows=sk.rows, sketch=json.loads(sk.encode()),
            ))


def store_raw_sketch(db: Database, device_id: str, model: str, start: float, payload: dict[str, Any]) -> None:
    """A stored row whose payload does not validate (hostile data at rest)."""
    with db.session() as s:
        s.add(DriftSketchRow(device_id=device_id, model=model, window_start=start,
                             window_end=start + 60, rows=0, sketch=payload))


def add_devices(db: Database, devices: Sequence[tuple[str, str, list[str]]], *, model: str | None = None,
                online: bool = True) -> None:
    with db.session() as s:
        for device_id, profile, tags in devices:
            s.add(Device(device_id=device_id, profile=profile, tags=tags, model=model, online=online,
                         last_seen=datetime.now(UTC)))


@dataclass
class MonHub:
    client: TestClient

    @property
    def hub(self) -> Hub:
        hub: Hub = self.client.app.state.hub  # type: ignore[attr-defined]
        return hub

    @property
    def db(self) -> Database:
        return self.hub.db


def start_hub(tmp_path: Path, db_url: str, broker_url: str, settings: MonitoringSettings,
              stack: list[TestClient]) -> MonHub:
    app = create_app(make_settings(tmp_path / f"hub{len(stack)}", db_url, broker_url))
    app.state.monitoring_settings = settings
    client = TestClient(app)
    client.__enter__()
    stack.append(client)
    return MonHub(client)


class WebhookReceiver:
    """An HTTP server on 127.0.0.1 that records JSON POSTs; ``fail_first`` answers 500s first."""

    def __init__(self, fail_first: int = 0) -> None:
        self.received: list[dict[str, Any]] = []
        self.attempts = 0
        self._fail = fail_first
        self._cond = threading.Condition()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server naming
                body = self.rfile.read(int(self.headers.get("content-length", "0")))
                with outer._cond:
                    outer.attempts += 1
                    if outer._fail > 0:
                        outer._fail -= 1
                        self.send_response(500)
                        self.end_headers()
                        return
                    outer.received.append(json.loads(body))
                    outer._cond.notify_all()
                self.send_response(204)
                self.end_headers()

            def log_message(self, *_: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def wait(self, pred: Callable[[list[dict[str, Any]]], bool], timeout: float = 10.0) -> list[dict[str, Any]]:
        with self._cond:
            if not self._cond.wait_for(lambda: pred(self.received), timeout):
                raise AssertionError(f"webhook condition not met; got {self.received}")
            return list(self.received)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def webhook_receiver(fail_first: int = 0) -> Iterator[WebhookReceiver]:
    r = WebhookReceiver(fail_first)
    try:
        yield r
    finally:
        r.close()
