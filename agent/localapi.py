"""The agent's localhost inference endpoint (Open Inference Protocol V2 over HTTP/1.1)
and a small client for applications on the device.

Only the standard library is used, so the agent extra stays small. The server binds
127.0.0.1 only; it is for applications on the device, not for the network.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socketserver
import threading
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np

import agent
from agent.serving import ModelServer, NoModelError
from agent.v2 import (
    MAX_REQUEST_BYTES,
    V2Error,
    decode_infer_request,
    encode_infer_response,
    model_metadata,
    v2_datatype,
)

__all__ = ["LocalApi", "InferenceClient"]

log = logging.getLogger(__name__)
_MODEL_ROUTE = re.compile(r"^/v2/models/([^/]+)(?:/versions/([^/]+))?(/ready|/infer)?$")


class _Handler(BaseHTTPRequestHandler):
    server_version = f"edgefleet-agent/{agent.__version__}"
    protocol_version = "HTTP/1.1"
    # Headers and body go out in separate writes; without TCP_NODELAY, Nagle plus the
    # client's delayed ACK adds ~40 ms to every keep-alive response.
    disable_nagle_algorithm = True
    models: ModelServer  # set on the subclass

    def address_string(self) -> str:
        # Unix-socket peers have no (host, port) address.
        return self.client_address[0] if isinstance(self.client_address, tuple) else "unix"

    def log_message(self, fmt: str, *args: Any) -> None:  # quiet by default
        log.debug("%s " + fmt, self.address_string(), *args)

    def _send(self, status: int, body: dict[str, Any] | None = None) -> None:
        data = json.dumps(body).encode() if body is not None else b""
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _error(self, status: int, message: str) -> None:
        self._send(status, {"error": message})

    def _model_for(self, name: str, version: str | None):
        m = self.models.active
        if m is None or m.bundle.manifest.name != name:
            raise V2Error(f"model {name!r} is not served here", 404)
        if version is not None and version != m.bundle.manifest.version:
            raise V2Error(f"model {name!r} version {version!r} is not served here", 404)
        return m

    def do_GET(self) -> None:  # noqa: N802 - http.server naming
        path = self.path.split("?", 1)[0]
        try:
            if path == "/v2/health/live":
                return self._send(200, {"live": True})
            if path == "/v2/health/ready":
                ready = self.models.active is not None
                return self._send(200 if ready else 503, {"ready": ready})
            if path == "/v2":
                return self._send(200, {"name": "edgefleet-agent", "version": agent.__version__,
                                        "extensions": []})
            m = _MODEL_ROUTE.match(path)
            if m is None or m.group(3) == "/infer":
                return self._error(404, f"no route {path}")
            lm = self._model_for(m.group(1), m.group(2))
            if m.group(3) == "/ready":
                return self._send(200, {"name": lm.bundle.manifest.name, "ready": True})
            man = lm.bundle.manifest
            return self._send(200, model_metadata(
                man.name, [man.version], f"{man.runtime}_{man.format}",
                list(man.inputs), list(man.outputs)))
        except V2Error as e:
            return self._error(e.status, str(e))

    def do_POST(self) -> None:  # noqa: N802
        path = self.path.split("?", 1)[0]
        m = _MODEL_ROUTE.match(path)
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            return self._error(400, "bad Content-Length")
        if length > MAX_REQUEST_BYTES:
            return self._error(413, f"request of {length} bytes exceeds {MAX_REQUEST_BYTES}")
        body = self.rfile.read(length)
        if m is None or m.group(3) != "/infer":
            return self._error(404, f"no route {path}")
        try:
            lm = self._model_for(m.group(1), m.group(2))
            inputs, rest = decode_infer_request(body, list(lm.bundle.manifest.inputs))
            try:
                outputs, served = self.models.infer(inputs)
            except ValueError as e:
                raise V2Error(f"inference failed: {e}") from e
            man = served.bundle.manifest
            return self._send(200, encode_infer_response(man.name, man.version, outputs, rest))
        except NoModelError as e:
            return self._error(503, str(e))
        except V2Error as e:
            return self._error(e.status, str(e))


class _UnixHTTPServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True


class LocalApi:
    """Serves :class:`ModelServer` on 127.0.0.1:port and/or a Unix socket, in background threads.

    The Unix socket is created with mode 0660 so that access can be granted by group.
    """

    def __init__(self, models: ModelServer, port: int = 0, *, socket_path: Path | None = None):
        handler = type("Handler", (_Handler,), {"models": models})
        unix_handler = type("UnixHandler", (_Handler,), {"models": models, "disable_nagle_algorithm": False})
        self._servers: list[socketserver.BaseServer] = []
        self.port = 0
        if port:
            httpd = ThreadingHTTPServer(("127.0.0.1", port), handler)
            httpd.daemon_threads = True
            self.port = httpd.server_address[1]
            self._servers.append(httpd)
        self.socket_path = socket_path
        if socket_path is not None:
            socket_path.unlink(missing_ok=True)
            unix = _UnixHTTPServer(str(socket_path), unix_handler)
            os.chmod(socket_path, 0o660)
            self._servers.append(unix)

    def start(self) -> None:
        for srv in self._servers:
            threading.Thread(target=srv.serve_forever, name="local-api", daemon=True).start()

    def stop(self) -> None:
        for srv in self._servers:
            srv.shutdown()
            srv.server_close()
        if self.socket_path is not None:
            self.socket_path.unlink(missing_ok=True)


class InferenceClient:
    """Client for the localhost V2 endpoint, for applications on the device."""

    def __init__(self, base_url: str, timeout: float = 10.0):
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.base_url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as e:
            detail = e.read().decode(errors="replace")
            raise V2Error(f"{method} {path}: HTTP {e.code}: {detail}", e.code) from e

    def metadata(self, model: str) -> dict[str, Any]:
        return self._call("GET", f"/v2/models/{model}")

    def infer(self, model: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        body = {"inputs": [
            {"name": k, "shape": list(v.shape), "datatype": v2_datatype(v.dtype.name),
             "data": v.ravel().tolist()} for k, v in inputs.items()]}
        resp = self._call("POST", f"/v2/models/{model}/infer", body)
        from agent.v2 import DATATYPES

        return {o["name"]: np.asarray(o["data"], dtype=DATATYPES[o["datatype"]]).reshape(o["shape"])
                for o in resp["outputs"]}
