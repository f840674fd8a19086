"""The agent's localhost inference endpoint (Open Inference Protocol V2 over HTTP/1.1)
and a small client for applications on the device.

The standard library serves it, and orjson writes and reads the V2 JSON
(:mod:`agent.v2`), so the agent extra stays small. The server binds 127.0.0.1 only; it is
for applications on the device, not for the network.

The server is a small HTTP/1.1 implementation on ``socketserver`` (a thread per
connection, keep-alive, ``Content-Length`` bodies, ``Expect: 100-continue``) rather
than ``http.server``: the standard handler parses every request's headers with the
``email`` package and writes headers and body separately, which together cost more
than a small model's inference. Each response goes out in one write with TCP_NODELAY
set. Request lines and header blocks are bounded (64 KiB, 100 fields) and bodies by
:data:`agent.v2.MAX_REQUEST_BYTES`; chunked request bodies are refused (411).

Infer requests may carry tensors as JSON or as raw bytes with the V2 binary tensor
extension (``Inference-Header-Content-Length``; see :mod:`agent.v2`), which
:class:`InferenceClient` uses by default.

One route is an edgefleet extension, not V2: ``POST /v2/models/{name}[/versions/{v}]/feedback``
with ``{"label", "prediction", "request_id"?, "score"?, "ts"?}`` reports the true label
of a prediction (``Agent.feedback``); labels go to the hub with the next telemetry.

``GET /metrics`` answers in the Prometheus text format (:mod:`agent.metrics`): requests
and their latencies since start, the active model, and, under the daemon, the lifecycle
state, the broker link and the spool.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import socket
import socketserver
import sys
import termios
import threading
import time
from collections.abc import Callable
from email.utils import formatdate
from pathlib import Path
from typing import Any

import numpy as np
import orjson

import agent
from agent.serving import ModelServer, NoModelError
from agent.v2 import (
    HEADER_LENGTH,
    MAX_REQUEST_BYTES,
    V2Error,
    decode_infer_request,
    decode_infer_response,
    encode_infer_body,
    encode_infer_request,
    model_metadata,
)

__all__ = ["LocalApi", "InferenceClient"]

log = logging.getLogger(__name__)
_MODEL_ROUTE = re.compile(r"^/v2/models/([^/]+)(?:/versions/([^/]+))?(/ready|/infer|/feedback)?$")
_FEEDBACK_KEYS = frozenset({"label", "prediction", "request_id", "score", "ts"})
_MAX_LINE = 65536
_MAX_HEADERS = 100
MAX_CONNECTIONS = 64
IDLE_TIMEOUT_S = 60.0
# At the connection limit, a connection that has waited this long for its next request,
# with nothing unread on its socket, may be closed to make way for a new one.
_RECLAIM_MIN_IDLE_S = 1.0
# How long a new connection at the limit waits for the idle one it displaced to close.
_RECLAIM_WAIT_S = 0.5
# After refusing a request whose body was not read (413, 411, ...), the response is sent,
# the connection half-closed, and the rest of the body read and dropped for at most this
# long: closing with unread data makes the kernel reset the connection, and the client
# would see the reset instead of the response.
_LINGER_S = 2.0
_LINGER_MAX_BYTES = 2 * MAX_REQUEST_BYTES
_CONTENT_LENGTH = re.compile(r"[0-9]{1,20}")
_BUSY_BODY = b'{"error": "too many connections; retry later"}'
_TOO_BUSY = (b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\nContent-Type: application/json\r\n"
             b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(_BUSY_BODY), _BUSY_BODY))
_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 411: "Length Required",
            413: "Content Too Large", 414: "URI Too Long", 431: "Request Header Fields Too Large",
            500: "Internal Server Error", 501: "Not Implemented", 503: "Service Unavailable",
            505: "HTTP Version Not Supported"}
_SERVER = f"edgefleet-agent/{agent.__version__}"
_JSON = "application/json"


class _BadRequest(Exception):
    """The request cannot be parsed; answer ``status`` and close the connection."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class _Date:
    """The ``Date`` header value, formatted at most once a second."""

    def __init__(self) -> None:
        self._second = 0
        self._value = ""

    def __call__(self) -> str:
        now = int(time.time())
        if now != self._second:
            self._value = formatdate(now, usegmt=True)
            self._second = now
        return self._value


_date = _Date()


class _Handler(socketserver.StreamRequestHandler):
    """One client connection: requests are answered in order until either side closes."""

    models: ModelServer  # set on the subclass
    feedback: Callable[..., None] | None = None  # Agent.feedback, when the agent serves labels
    metrics: _LazyMetrics | None = None  # GET /metrics
    # Each socket read or write; an idle keep-alive connection or a client stalled
    # mid-request is closed after it (InferenceClient reconnects to a closed idle one).
    timeout = IDLE_TIMEOUT_S
    rbufsize = 1 << 16
    wbufsize = 0  # every response is one write of header + body

    def setup(self) -> None:
        super().setup()
        if self.connection.family in (socket.AF_INET, socket.AF_INET6):
            # Without it, Nagle plus the client's delayed ACK can add ~40 ms to a response.
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def handle(self) -> None:
        try:
            self._serve()
        finally:
            self.server.waiting(self.connection, False)  # type: ignore[attr-defined]

    def _serve(self) -> None:
        while True:
            self.server.waiting(self.connection, True)  # type: ignore[attr-defined]
            try:
                request = self._read_request()
            except _BadRequest as e:
                self._respond(e.status, _error_body(str(e)), keep_alive=False)
                self._linger()
                return
            except (ConnectionError, TimeoutError):
                return
            if request is None:
                return
            method, target, headers, body, keep_alive = request
            try:
                # HEAD is GET without the body (watchdogs and `curl -I` probe health so).
                status, payload, extra = self._dispatch("GET" if method == "HEAD" else method, target, headers, body)
            except Exception:  # a bug must answer 500, not drop the connection silently
                log.exception("local API: %s %s failed", method, target)
                status, payload, extra = 500, _error_body("internal error"), None
            try:
                self._respond(status, payload, keep_alive=keep_alive, extra=extra, head_only=method == "HEAD")
            except (ConnectionError, TimeoutError):
                return
            if not keep_alive:
                return

    # ------------------------------------------------------------------ HTTP/1.1

    def _read_request(self) -> tuple[str, str, dict[str, str], bytes, bool] | None:
        """(method, target, headers with lower-case names, body, keep-alive), or None at EOF."""
        rfile = self.rfile
        line = rfile.readline(_MAX_LINE + 1)
        while line in (b"\r\n", b"\n"):  # tolerate blank lines between requests
            line = rfile.readline(_MAX_LINE + 1)
        if not line:
            return None
        self.server.waiting(self.connection, False)  # type: ignore[attr-defined]
        if len(line) > _MAX_LINE:
            raise _BadRequest(414, "request line too long")
        parts = line.decode("latin-1").split()
        if len(parts) != 3:
            raise _BadRequest(400, f"bad request line {line[:100]!r}")
        method, target, version = parts
        if version not in ("HTTP/1.1", "HTTP/1.0"):
            raise _BadRequest(505, f"unsupported protocol {version[:20]!r}")
        headers: dict[str, str] = {}
        lines = 0  # not len(headers): a repeated name would never reach the limit
        while True:
            line = rfile.readline(_MAX_LINE + 1)
            if not line:
                raise ConnectionError("client closed the connection mid-request")
            if line in (b"\r\n", b"\n"):
                break
            lines += 1
            if len(line) > _MAX_LINE or lines > _MAX_HEADERS:
                raise _BadRequest(431, "request header fields too large")
            name, sep, value = line.decode("latin-1").partition(":")
            if not sep or not name or name[0] in " \t" or name != name.rstrip():
                raise _BadRequest(400, f"bad header line {line[:100]!r}")
            key, value = name.lower(), value.strip()
            if key == "content-length" and key in headers and headers[key] != value:
                # Which one frames the body is ambiguous (request smuggling): refuse.
                raise _BadRequest(400, "conflicting Content-Length headers")
            headers[key] = value
        conn = headers.get("connection", "").lower()
        keep_alive = "close" not in conn if version == "HTTP/1.1" else "keep-alive" in conn
        if "transfer-encoding" in headers:
            raise _BadRequest(411, "chunked request bodies are not supported; send Content-Length")
        raw_length = headers.get("content-length", "0")
        if not _CONTENT_LENGTH.fullmatch(raw_length):
            raise _BadRequest(400, f"bad Content-Length {raw_length[:30]!r}: must be digits")
        length = int(raw_length)
        if length > MAX_REQUEST_BYTES:
            raise _BadRequest(413, f"request of {length} bytes exceeds {MAX_REQUEST_BYTES}")
        body = b""
        if length:
            if headers.get("expect", "").lower() == "100-continue":
                self.wfile.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            body = rfile.read(length)
            if len(body) < length:
                raise ConnectionError("client closed the connection mid-body")
        return method, target, headers, body, keep_alive

    def _linger(self) -> None:
        """Half-close, then read and drop what the client still sends (bounded), so that
        it reads the error response rather than a connection reset."""
        conn = self.connection
        try:
            self.wfile.flush()
            conn.shutdown(socket.SHUT_WR)
            deadline = time.monotonic() + _LINGER_S
            dropped = 0
            while dropped < _LINGER_MAX_BYTES:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                conn.settimeout(left)
                chunk = conn.recv(1 << 16)
                if not chunk:
                    break
                dropped += len(chunk)
        except OSError:  # timeouts and resets included: the connection is closed next anyway
            pass

    def _respond(self, status: int, body: bytes, *, keep_alive: bool,
                 extra: dict[str, str] | None = None, head_only: bool = False) -> None:
        content_type = _JSON
        head = [f"HTTP/1.1 {status} {_REASONS.get(status, '')}", f"Server: {_SERVER}", f"Date: {_date()}"]
        if extra:
            content_type = extra.pop("Content-Type", _JSON)
            head += [f"{k}: {v}" for k, v in extra.items()]
        head += [f"Content-Type: {content_type}", f"Content-Length: {len(body)}"]
        if not keep_alive:
            head.append("Connection: close")
        self.wfile.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + (b"" if head_only else body))

    # ------------------------------------------------------------------ V2 routes

    def _dispatch(self, method: str, target: str, headers: dict[str, str],
                  body: bytes) -> tuple[int, bytes, dict[str, str] | None]:
        path = target.split("?", 1)[0]
        if method == "POST":
            return self._post(path, headers, body)
        if method == "GET":
            return self._get(path, headers)
        return 501, _error_body(f"unsupported method {method!r}"), None

    def _model_for(self, name: str, version: str | None):
        m = self.models.active
        if m is None or m.bundle.manifest.name != name:
            raise V2Error(f"model {name!r} is not served here", 404)
        if version is not None and version != m.bundle.manifest.version:
            raise V2Error(f"model {name!r} version {version!r} is not served here", 404)
        return m

    def _get(self, path: str, headers: dict[str, str]) -> tuple[int, bytes, dict[str, str] | None]:
        try:
            if path == "/metrics":
                return self._get_metrics(headers.get("accept", ""))
            if path == "/v2/health/live":
                return 200, _json({"live": True}), None
            if path == "/v2/health/ready":
                ready = self.models.active is not None
                return (200 if ready else 503), _json({"ready": ready}), None
            if path == "/v2":
                return 200, _json({"name": "edgefleet-agent", "version": agent.__version__,
                                   "extensions": ["binary_tensor_data"]}), None
            m = _MODEL_ROUTE.match(path)
            if m is None or m.group(3) in ("/infer", "/feedback"):
                return 404, _error_body(f"no route {path}"), None
            lm = self._model_for(m.group(1), m.group(2))
            if m.group(3) == "/ready":
                return 200, _json({"name": lm.bundle.manifest.name, "ready": True}), None
            man = lm.bundle.manifest
            return 200, _json(model_metadata(
                man.name, [man.version], f"{man.runtime}_{man.format}",
                list(man.inputs), list(man.outputs))), None
        except V2Error as e:
            return e.status, _error_body(str(e)), None

    def _get_metrics(self, accept: str) -> tuple[int, bytes, dict[str, str] | None]:
        if self.metrics is None:
            return 404, _error_body("no route /metrics"), None
        try:
            body, content_type = self.metrics.render(accept)
        except ImportError as e:  # an install without the agent extra's prometheus-client
            return 501, _error_body(f"metrics need the prometheus-client package: {e}"), None
        return 200, body, {"Content-Type": content_type}

    def _post(self, path: str, headers: dict[str, str], body: bytes) -> tuple[int, bytes, dict[str, str] | None]:
        m = _MODEL_ROUTE.match(path)
        if m is not None and m.group(3) == "/feedback" and self.feedback is not None:
            return self._post_feedback(m.group(1), m.group(2), body)
        if m is None or m.group(3) != "/infer":
            return 404, _error_body(f"no route {path}"), None
        try:
            header_length = None
            if (hl := headers.get("inference-header-content-length")) is not None:
                try:
                    header_length = int(hl)
                except ValueError as e:
                    raise V2Error(f"bad {HEADER_LENGTH} {hl[:20]!r}") from e
            lm = self._model_for(m.group(1), m.group(2))
            inputs, rest = decode_infer_request(body, list(lm.bundle.manifest.inputs), header_length)
            try:
                outputs, served = self.models.infer(inputs)
            except ValueError as e:
                raise V2Error(f"inference failed: {e}") from e
            man = served.bundle.manifest
            data, json_length = encode_infer_body(man.name, man.version, outputs, rest)
            if json_length is None:
                return 200, data, None
            return 200, data, {"Content-Type": "application/octet-stream", HEADER_LENGTH: str(json_length)}
        except NoModelError as e:
            return 503, _error_body(str(e)), None
        except V2Error as e:
            return e.status, _error_body(str(e)), None


    def _post_feedback(self, name: str, version: str | None, body: bytes) -> tuple[int, bytes, None]:
        """``{"label", "prediction", "request_id"?, "score"?, "ts"?}``: the true label of a
        prediction of ``name`` (default version: the one active now), sent to the hub
        with the next telemetry interval (edgefleet extension, not part of V2)."""
        try:
            # orjson, as for infer: it refuses deep nesting and integers over 64 bits with
            # a JSONDecodeError, where json raises RecursionError or a bare ValueError.
            obj = orjson.loads(body)
        except orjson.JSONDecodeError as e:
            return 400, _error_body(f"feedback body is not JSON: {e}"), None
        if not isinstance(obj, dict):
            return 400, _error_body("feedback body must be a JSON object"), None
        unknown = sorted(set(obj) - _FEEDBACK_KEYS)
        if unknown:
            return 400, _error_body(f"unknown feedback fields {unknown}"), None
        if "label" not in obj or "prediction" not in obj:
            return 400, _error_body("feedback needs 'label' and 'prediction'"), None
        if version is None:
            active = self.models.active
            if active is None or active.bundle.manifest.name != name:
                return 404, _error_body(f"model {name!r} is not served here; give its version"), None
            version = active.bundle.manifest.version
        report = self.feedback
        assert report is not None  # routed here only when set
        try:
            report(obj["label"], obj["prediction"], model=f"{name}:{version}",
                          request_id=obj.get("request_id"), ts=obj.get("ts"), score=obj.get("score"))
        except ValueError as e:
            return 400, _error_body(str(e)), None
        return 200, _json({"accepted": True}), None


def _json(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj).encode()


def _error_body(message: str) -> bytes:
    return _json({"error": message})


def _has_unread(conn: socket.socket) -> bool | None:
    """Whether bytes wait unread on ``conn``; None when that cannot be told (a closed
    socket). Asks the kernel (``FIONREAD``) and never reads: a ``recv`` on a socket with
    a timeout waits for data first, and the connection's own handler may take the bytes
    between a readiness check and the ``recv``."""
    try:
        buf = fcntl.ioctl(conn.fileno(), termios.FIONREAD, b"\0\0\0\0")
    except (OSError, ValueError):
        return None
    return int.from_bytes(buf, sys.byteorder) > 0


class _Bounded(socketserver.ThreadingMixIn):
    """A thread per connection, at most ``MAX_CONNECTIONS`` at once, so that clients
    that hold connections open cannot take the device's memory one thread at a time.

    At the limit, a new connection first takes the place of the connection that has
    waited longest for its next request (an idle keep-alive connection, or one that
    connected and sent nothing): that one is closed, as an HTTP server may close an
    idle connection at any time. Only when every connection is inside a request is
    the new one answered 503 with Retry-After and closed.
    """

    daemon_threads = True

    def __init__(self, address: Any, handler: Any, max_connections: int) -> None:
        self._busy = threading.BoundedSemaphore(max_connections)
        self._idle: dict[socket.socket, float] = {}  # connection -> when it began to wait
        self._idle_lock = threading.Lock()
        super().__init__(address, handler)  # type: ignore[call-arg]

    def waiting(self, conn: socket.socket, idle: bool) -> None:
        """Mark ``conn`` as waiting for a request (idle), or as inside one."""
        with self._idle_lock:
            if idle:
                self._idle[conn] = time.monotonic()
            else:
                self._idle.pop(conn, None)

    def _close_longest_idle(self) -> bool:
        """Close the connection that has waited longest for its next request, if one has
        waited at least ``_RECLAIM_MIN_IDLE_S`` and has nothing unread (a request on its
        way is never cut off). True when one was closed."""
        cutoff = time.monotonic() - _RECLAIM_MIN_IDLE_S
        victim = None
        with self._idle_lock:
            for conn, since in sorted(self._idle.items(), key=lambda kv: kv[1]):
                if since > cutoff:
                    break
                if _has_unread(conn) is not False:
                    continue  # the next request is arriving (or the socket is gone: leave it)
                del self._idle[conn]
                victim = conn
                break
        if victim is None:
            return False
        try:
            victim.shutdown(socket.SHUT_RDWR)  # its handler reads EOF and ends, freeing a place
        except OSError:
            pass
        return True

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._busy.acquire(blocking=False) and not (
            self._close_longest_idle() and self._busy.acquire(timeout=_RECLAIM_WAIT_S)
        ):
            try:
                request.sendall(_TOO_BUSY)
            except OSError:
                pass
            self.shutdown_request(request)  # type: ignore[attr-defined]
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._busy.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._busy.release()


class _TcpServer(_Bounded, socketserver.TCPServer):
    allow_reuse_address = True
    request_queue_size = 64


class _UnixServer(_Bounded, socketserver.UnixStreamServer):
    pass


class _LazyMetrics:
    """Builds the metrics endpoint (:class:`agent.metrics.MetricsEndpoint`) at the first
    scrape, so that an agent nobody scrapes never loads prometheus_client."""

    def __init__(self, make: Callable[[], Any]):
        self._make = make
        self._endpoint: Any = None
        self._lock = threading.Lock()

    def render(self, accept: str) -> tuple[bytes, str]:
        with self._lock:
            if self._endpoint is None:
                self._endpoint = self._make()
        return self._endpoint.render(accept)


def _serving_metrics(models: ModelServer) -> Any:
    from agent.metrics import MetricsEndpoint

    return MetricsEndpoint(models)


class LocalApi:
    """Serves :class:`ModelServer` on 127.0.0.1:port and/or a Unix socket, in background threads.

    The Unix socket is created with mode 0660 so that access can be granted by group.
    ``metrics`` builds the ``GET /metrics`` endpoint (an object whose ``render(accept)``
    returns the body and its content type) at the first scrape; by default, the serving figures of ``models``.
    """

    def __init__(self, models: ModelServer, port: int = 0, *, socket_path: Path | None = None,
                 feedback: Callable[..., None] | None = None, max_connections: int = MAX_CONNECTIONS,
                 metrics: Callable[[], Any] | None = None):
        lazy = _LazyMetrics(metrics if metrics is not None else lambda: _serving_metrics(models))
        handler = type("Handler", (_Handler,), {"models": models, "metrics": lazy,
                                                "feedback": staticmethod(feedback) if feedback else None})
        self._servers: list[socketserver.BaseServer] = []
        self.port = 0
        if port:
            httpd = _TcpServer(("127.0.0.1", port), handler, max_connections)
            self.port = httpd.server_address[1]
            self._servers.append(httpd)
        self.socket_path = socket_path
        if socket_path is not None:
            socket_path.unlink(missing_ok=True)
            unix = _UnixServer(str(socket_path), handler, max_connections)
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
    """Client for the localhost V2 endpoint, for applications on the device.

    Keeps one HTTP/1.1 connection per thread. ``binary`` (the default) sends and receives
    numeric tensors with the V2 binary tensor extension; ``binary=False`` uses plain JSON.
    Connection failures raise ``OSError`` (e.g. ``ConnectionRefusedError``); HTTP errors
    raise :class:`~agent.v2.V2Error` with the status.
    """

    def __init__(self, base_url: str, timeout: float = 10.0, *, binary: bool = True):
        from urllib.parse import urlsplit

        self.base_url = base_url.rstrip("/")
        url = urlsplit(self.base_url)
        if url.scheme != "http" or not url.hostname:
            raise ValueError(f"InferenceClient needs an http:// URL, got {base_url!r}")
        self._host, self._port, self._prefix = url.hostname, url.port or 80, url.path
        self.timeout = timeout
        self.binary = binary
        self._local = threading.local()

    def _request(self, method: str, path: str, body: bytes | None = None,
                 headers: dict[str, str] | None = None) -> tuple[bytes, Any]:
        import http.client

        if body is not None and len(body) > MAX_REQUEST_BYTES:
            raise V2Error(f"{method} {path}: request of {len(body)} bytes exceeds the agent's limit "
                          f"of {MAX_REQUEST_BYTES}", 413)
        for attempt in (0, 1):
            conn = getattr(self._local, "conn", None)
            fresh = conn is None
            if conn is None:
                conn = self._local.conn = http.client.HTTPConnection(self._host, self._port, timeout=self.timeout)
            try:
                conn.request(method, self._prefix + path, body, headers or {})
                resp = conn.getresponse()
                data = resp.read()
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                conn.close()
                self._local.conn = None
                if fresh or attempt:  # a new connection failed: the server is gone
                    raise
                continue  # the server closed an idle keep-alive connection: reconnect once
            except (OSError, http.client.HTTPException):
                conn.close()
                self._local.conn = None
                raise
            if resp.status >= 400:
                raise V2Error(f"{method} {path}: HTTP {resp.status}: {data.decode(errors='replace')}", resp.status)
            return data, resp
        raise AssertionError("unreachable")  # pragma: no cover

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        data = json.dumps(body).encode() if body is not None else None
        raw, _ = self._request(method, path, data, {"Content-Type": _JSON} if data is not None else None)
        return json.loads(raw)

    def metadata(self, model: str) -> dict[str, Any]:
        return self._call("GET", f"/v2/models/{model}")

    def infer(self, model: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Outputs of ``model`` for ``inputs``. Raises V2Error, OSError."""
        body, json_length = encode_infer_request(inputs, binary=self.binary)
        headers = {"Content-Type": _JSON}
        if json_length is not None:
            headers = {"Content-Type": "application/octet-stream", HEADER_LENGTH: str(json_length)}
        raw, resp = self._request("POST", f"/v2/models/{model}/infer", body, headers)
        hl = resp.getheader(HEADER_LENGTH)
        return decode_infer_response(raw, int(hl) if hl is not None else None)

    def feedback(self, model: str, label: int | str, prediction: int | str, *, request_id: str | None = None,
                 score: float | dict[str, float] | None = None) -> None:
        """Report the true label of one prediction of ``model`` (NAME or NAME/versions/V).
        Raises V2Error (400 with the reason for a bad field), OSError."""
        body: dict[str, Any] = {"label": label, "prediction": prediction}
        if request_id is not None:
            body["request_id"] = request_id
        if score is not None:
            body["score"] = score
        self._call("POST", f"/v2/models/{model}/feedback", body)

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None
