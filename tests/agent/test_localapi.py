"""The V2 endpoint: protocol shapes, errors, and the Unix socket."""

from __future__ import annotations

import http.client
import json
import socket
import time

import numpy as np
import pytest

from agent.localapi import InferenceClient
from agent.v2 import V2Error
from tests.support import free_port


@pytest.fixture
def served(bench, tmp_path):
    port = free_port()
    a = bench.agent(api_port=port, api_socket=tmp_path / "agent.sock")
    tp, m, w, b = bench.bundle("1.0.0", seed=1)
    bench.deploy("dev1", "d1", tp, m.ref)
    assert bench.wait_for(a, "d1") == "installed"
    return a, port, w, b, tmp_path / "agent.sock"


def _post(port: int, path: str, body: bytes) -> tuple[int, dict]:
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    c.request("POST", path, body, {"Content-Type": "application/json"})
    r = c.getresponse()
    return r.status, json.loads(r.read() or b"{}")


def test_v2_routes_and_errors(served):
    a, port, w, b, _ = served
    ic = InferenceClient(f"http://127.0.0.1:{port}")
    meta = ic.metadata("lin")
    assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 4]}]
    assert meta["versions"] == ["1.0.0"] and meta["platform"] == "onnxruntime_onnx"
    x = np.ones((3, 4), np.float32)
    np.testing.assert_allclose(ic.infer("lin", {"input": x})["logits"], x @ w + b, rtol=1e-5)
    nested = {"id": "r1", "inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32",
                                      "data": [[1, 2, 3, 4]]}], "outputs": [{"name": "logits"}]}
    status, resp = _post(port, "/v2/models/lin/versions/1.0.0/infer", json.dumps(nested).encode())
    assert status == 200 and resp["id"] == "r1" and resp["model_version"] == "1.0.0"
    assert resp["outputs"][0]["shape"] == [1, 3]
    cases = [
        (b"{not json", 400, "not valid JSON"),
        (b'{"inputs": []}', 400, "non-empty"),
        (json.dumps({"inputs": [{"name": "nope", "shape": [1, 4], "datatype": "FP32", "data": [0] * 4}]}).encode(), 400, "unknown input"),
        (json.dumps({"inputs": [{"name": "input", "shape": [1, 5], "datatype": "FP32", "data": [0] * 5}]}).encode(), 400, "does not match"),
        (json.dumps({"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32", "data": [0] * 3}]}).encode(), 400, "do not fill"),
        (json.dumps({"inputs": [{"name": "input", "shape": [1, 4], "datatype": "INT64", "data": [0] * 4}]}).encode(), 400, "expects FP32"),
        (json.dumps({"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP99", "data": [0] * 4}]}).encode(), 400, "unknown datatype"),
    ]
    for body, code, text in cases:
        status, resp = _post(port, "/v2/models/lin/infer", body)
        assert status == code and text in resp["error"], (body, resp)
    status, resp = _post(port, "/v2/models/other/infer", nested and json.dumps(nested).encode())
    assert status == 404
    with pytest.raises(V2Error) as ei:
        ic.metadata("lin/versions/9.9.9")
    assert ei.value.status == 404
    assert a.model_ref == "lin:1.0.0"


def test_unix_socket_serves_the_same_api(served):
    *_, sock_path = served
    s = socket.socket(socket.AF_UNIX)
    s.connect(str(sock_path))
    s.sendall(b"GET /v2/health/ready HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    data = b""
    while chunk := s.recv(4096):
        data += chunk
    assert data.startswith(b"HTTP/1.1 200") and b'"ready": true' in data


def _raw(port: int, data: bytes) -> bytes:
    """Send raw bytes on a fresh connection; everything the server sends until it closes."""
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    s.sendall(data)
    out = b""
    while chunk := s.recv(65536):
        out += chunk
    s.close()
    return out


def test_binary_tensor_extension(served):
    a, port, w, b, _ = served
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    got = InferenceClient(f"http://127.0.0.1:{port}").infer("lin", {"input": x})  # binary by default
    np.testing.assert_allclose(got["logits"], x @ w + b, rtol=1e-5)
    header = json.dumps({"id": "b1", "inputs": [{"name": "input", "shape": [3, 4], "datatype": "FP32",
                                                  "parameters": {"binary_data_size": x.nbytes}}],
                         "outputs": [{"name": "logits", "parameters": {"binary_data": True}}]}).encode()
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    c.request("POST", "/v2/models/lin/infer", header + x.tobytes(),
              {"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": str(len(header))})
    r = c.getresponse()
    data = r.read()
    n = int(r.getheader("Inference-Header-Content-Length"))
    meta = json.loads(data[:n])
    assert r.status == 200 and meta["id"] == "b1"
    assert meta["outputs"][0]["parameters"]["binary_data_size"] == 3 * 3 * 4 and "data" not in meta["outputs"][0]
    np.testing.assert_allclose(np.frombuffer(data[n:], "<f4").reshape(3, 3), x @ w + b, rtol=1e-5)
    # JSON and binary inputs answer the same; a JSON client still works.
    np.testing.assert_allclose(InferenceClient(f"http://127.0.0.1:{port}", binary=False).infer(
        "lin", {"input": x})["logits"], x @ w + b, rtol=1e-5)
    cases = [
        (x.tobytes() + b"zz", str(len(header)), "no input claims"),
        (x.tobytes()[:-4], str(len(header)), "left in the body"),
        (x.tobytes(), "999999", "does not fit"),
        (x.tobytes(), "nan", "bad Inference-Header-Content-Length"),
    ]
    for tail, hl, text in cases:
        c.request("POST", "/v2/models/lin/infer", header + tail, {"Inference-Header-Content-Length": hl})
        r = c.getresponse()
        body = json.loads(r.read())
        assert r.status == 400 and text in body["error"], (hl, body)
    wrong = header.replace(str(x.nbytes).encode(), b"40")
    c.request("POST", "/v2/models/lin/infer", wrong + x.tobytes()[:40], {"Inference-Header-Content-Length": str(len(wrong))})
    r = c.getresponse()
    assert r.status == 400 and "does not fit shape" in json.loads(r.read())["error"]
    c.request("GET", "/v2")
    assert "binary_tensor_data" in json.loads(c.getresponse().read())["extensions"]


def test_http_keep_alive_expect_and_bad_requests(served):
    _, port, *_ = served
    x = [1.0, 2.0, 3.0, 4.0]
    body = json.dumps({"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32", "data": x}]}).encode()
    # Many requests on one connection, and the answer to Expect: 100-continue.
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    for _ in range(20):
        c.request("POST", "/v2/models/lin/infer", body, {"Content-Type": "application/json"})
        r = c.getresponse()
        assert r.status == 200 and r.getheader("Date") and r.read()
    out = _raw(port, b"POST /v2/models/lin/infer HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
                     b"Connection: close\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
    assert out.startswith(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\n")
    # HTTP/1.0 without keep-alive: the server closes after the answer.
    assert _raw(port, b"GET /v2/health/live HTTP/1.0\r\n\r\n").startswith(b"HTTP/1.1 200 OK")
    for request, status in [
        (b"NONSENSE\r\n\r\n", b"400"),
        (b"GET /v2 HTTP/2.0\r\n\r\n", b"505"),
        (b"GET /v2 HTTP/1.1\r\nno colon here\r\n\r\n", b"400"),
        (b"POST /v2/models/lin/infer HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", b"411"),
        (b"POST /v2/models/lin/infer HTTP/1.1\r\nContent-Length: %d\r\n\r\n" % (1 << 40), b"413"),
        (b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\n\r\n", b"414"),
        (b"DELETE /v2 HTTP/1.1\r\nConnection: close\r\n\r\n", b"501"),
        (b"GET /v2 HTTP/1.1\r\n" + b"X-A: 1\r\n" * 5000 + b"\r\n", b"431"),  # one name, repeated
        (b"GET /v2 HTTP/1.9\r\n\r\n", b"505"),
        (b"POST /v2/models/lin/infer HTTP/1.1\r\nContent-Length: +90\r\n\r\n", b"400"),
        (b"POST /v2/models/lin/infer HTTP/1.1\r\nContent-Length: 4\r\nContent-Length: 90\r\n\r\nabcd", b"400"),
    ]:
        out = _raw(port, request)
        assert out.startswith(b"HTTP/1.1 " + status), (request[:40], out[:80])
    # HEAD: GET's status and headers, no body.
    head = _raw(port, b"HEAD /v2/health/ready HTTP/1.1\r\nConnection: close\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and b"Content-Length: " in head and head.endswith(b"\r\n\r\n")


def test_an_oversized_body_gets_its_413_not_a_reset(served, monkeypatch):
    """The server refuses a body over the limit before reading it; the client, still
    sending, must get the 413 rather than a broken pipe (lingering close), and
    InferenceClient refuses such a body before sending it."""
    from agent import localapi

    _, port, *_ = served
    monkeypatch.setattr(localapi, "MAX_REQUEST_BYTES", 1 << 16)
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    c.request("POST", "/v2/models/lin/infer", b"x" * (8 << 20), {"Content-Type": "application/json"})
    r = c.getresponse()
    assert r.status == 413 and b"exceeds" in r.read()
    c.close()
    with pytest.raises(V2Error) as ei:
        InferenceClient(f"http://127.0.0.1:{port}").infer("lin", {"input": np.ones((300, 4096 // 16), np.float32)})
    assert ei.value.status == 413 and "exceeds the agent's limit" in str(ei.value)


def test_connections_are_bounded_and_stalled_clients_time_out(monkeypatch):
    """Clients that open connections and stop mid-request hold a thread each: past
    ``max_connections`` the next is answered 503 at once, and a stalled one is closed
    after the handler's timeout, which frees its place."""
    import time

    from agent import localapi
    from agent.serving import ModelServer

    monkeypatch.setattr(localapi._Handler, "timeout", 0.5)
    api = localapi.LocalApi(ModelServer(), free_port(), max_connections=2)
    api.start()
    try:
        stalled = [socket.create_connection(("127.0.0.1", api.port), timeout=5) for _ in range(2)]
        for s in stalled:
            s.sendall(b"POST /v2/models/m/infer HTTP/1.1\r\nContent-Length: 100\r\n\r\nabc")
        time.sleep(0.2)
        busy = _raw(api.port, b"GET /v2/health/live HTTP/1.1\r\n\r\n")
        assert busy.startswith(b"HTTP/1.1 503") and b"Retry-After: 1" in busy
        assert json.loads(busy.split(b"\r\n\r\n", 1)[1])["error"].startswith("too many connections")
        for s in stalled:
            assert s.recv(100) == b""  # closed by the server after its timeout
            s.close()
        deadline = time.monotonic() + 5
        while not (ok := _raw(api.port, b"GET /v2/health/live HTTP/1.1\r\nConnection: close\r\n\r\n")
                   ).startswith(b"HTTP/1.1 200") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert ok.startswith(b"HTTP/1.1 200")
    finally:
        api.stop()


def test_at_the_limit_an_idle_connection_makes_way_for_a_new_one():
    """Keep-alive clients that went quiet (or connected and sent nothing) must not lock
    others out for the idle timeout: at the limit, the connection idle longest is
    closed and the new client is served; one inside a request keeps its place."""
    from agent import localapi
    from agent.serving import ModelServer

    api = localapi.LocalApi(ModelServer(), free_port(), max_connections=2)
    api.start()
    try:
        # One keep-alive connection that finished a request and went quiet, then one
        # that is stalled inside a request (headers sent, body missing).
        quiet = socket.create_connection(("127.0.0.1", api.port), timeout=5)
        quiet.sendall(b"GET /v2/health/live HTTP/1.1\r\n\r\n")
        assert quiet.recv(4096).startswith(b"HTTP/1.1 200")
        inside = socket.create_connection(("127.0.0.1", api.port), timeout=5)
        inside.sendall(b"POST /v2/models/m/infer HTTP/1.1\r\nContent-Length: 100\r\n\r\nabc")
        # Idle for less than the minimum: it keeps its place, the newcomer gets 503.
        busy = _raw(api.port, b"GET /v2/health/live HTTP/1.1\r\n\r\n")
        assert busy.startswith(b"HTTP/1.1 503"), busy[:80]
        time.sleep(localapi._RECLAIM_MIN_IDLE_S + 0.2)
        ok = _raw(api.port, b"GET /v2/health/live HTTP/1.1\r\nConnection: close\r\n\r\n")
        assert ok.startswith(b"HTTP/1.1 200")
        assert quiet.recv(100) == b""  # the quiet one was closed to make way
        # The stalled request kept its place; with two connections inside requests,
        # a new one is refused.
        inside.settimeout(0.3)
        with pytest.raises(TimeoutError):
            inside.recv(100)
        second = socket.create_connection(("127.0.0.1", api.port), timeout=5)
        second.sendall(b"POST /v2/models/m/infer HTTP/1.1\r\nContent-Length: 100\r\n\r\nabc")
        time.sleep(0.2)
        busy = _raw(api.port, b"GET /v2/health/live HTTP/1.1\r\n\r\n")
        assert busy.startswith(b"HTTP/1.1 503") and b"Retry-After: 1" in busy
        for s in (quiet, inside, second):
            s.close()
    finally:
        api.stop()


def test_unread_bytes_are_asked_of_the_kernel_without_reading():
    """The reclaimer must neither block nor take bytes from a connection's handler: it
    asks how many bytes wait (FIONREAD) instead of peeking with recv."""
    from agent import localapi

    a, b = socket.socketpair()
    try:
        a.settimeout(60)  # a recv here would wait for data; the check must not
        t0 = time.monotonic()
        assert localapi._has_unread(a) is False
        b.sendall(b"GET /")
        deadline = time.monotonic() + 2
        while localapi._has_unread(a) is not True and time.monotonic() < deadline:
            time.sleep(0.01)
        assert localapi._has_unread(a) is True
        assert a.recv(10) == b"GET /"  # nothing was taken from the stream
        assert time.monotonic() - t0 < 2
    finally:
        a.close()
        b.close()
    assert localapi._has_unread(a) is None  # closed: cannot tell, so never reclaimed
