"""The V2 endpoint: protocol shapes, errors, and the Unix socket."""

from __future__ import annotations

import http.client
import json
import socket

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
