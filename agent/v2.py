"""Open Inference Protocol (V2) tensors: JSON <-> numpy.

Transport-free, so the agent's localhost endpoint and the hub's cloud endpoint share it.
Errors are :class:`V2Error` with the HTTP status they map to.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from agent.bundle import TensorSpec

__all__ = ["V2Error", "DATATYPES", "decode_infer_request", "encode_infer_response", "model_metadata"]

DATATYPES: dict[str, str] = {
    "BOOL": "bool", "UINT8": "uint8", "UINT16": "uint16", "UINT32": "uint32", "UINT64": "uint64",
    "INT8": "int8", "INT16": "int16", "INT32": "int32", "INT64": "int64",
    "FP16": "float16", "FP32": "float32", "FP64": "float64", "BYTES": "object",
}
_TO_V2 = {v: k for k, v in DATATYPES.items()}
_TO_V2["string"] = "BYTES"
MAX_REQUEST_BYTES = 64 << 20


class V2Error(Exception):
    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def v2_datatype(dtype: str) -> str:
    return _TO_V2.get(dtype, "BYTES")


def _check_shape(shape: Any, where: str) -> list[int]:
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise V2Error(f"{where}: shape must be a list of non-negative integers")
    return shape


def decode_infer_request(
    body: bytes | dict[str, Any], specs: list[TensorSpec]
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Parse a V2 infer request into named arrays, checked against the model's inputs.

    Returns (inputs, request fields other than ``inputs``).

    Raises:
        V2Error(400): malformed JSON, unknown/missing inputs, bad datatype, shape or data.
    """
    if isinstance(body, bytes | bytearray):
        if len(body) > MAX_REQUEST_BYTES:
            raise V2Error(f"request of {len(body)} bytes exceeds {MAX_REQUEST_BYTES}", 413)
        try:
            req = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise V2Error(f"request body is not valid JSON: {e}") from e
    else:
        req = body
    if not isinstance(req, dict) or not isinstance(req.get("inputs"), list) or not req["inputs"]:
        raise V2Error("request must be an object with a non-empty 'inputs' list")
    by_name = {s.name: s for s in specs}
    out: dict[str, np.ndarray] = {}
    for i, t in enumerate(req["inputs"]):
        where = f"inputs[{i}]"
        if not isinstance(t, dict):
            raise V2Error(f"{where}: must be an object")
        name = t.get("name")
        if name not in by_name:
            raise V2Error(f"{where}: unknown input {name!r}; model inputs are {sorted(by_name)}")
        spec = by_name[name]
        dt = t.get("datatype")
        if dt not in DATATYPES:
            raise V2Error(f"{where}: unknown datatype {dt!r}")
        shape = _check_shape(t.get("shape"), where)
        if "data" not in t:
            raise V2Error(f"{where}: missing 'data'")
        try:
            arr = np.asarray(t["data"], dtype=DATATYPES[dt])
        except (ValueError, TypeError) as e:
            raise V2Error(f"{where}: data does not match datatype {dt}: {e}") from e
        if arr.size != int(np.prod(shape)):
            raise V2Error(f"{where}: {arr.size} values do not fill shape {shape}")
        arr = arr.reshape(shape)
        if spec.dtype != "string" and arr.dtype != np.dtype(spec.dtype):
            raise V2Error(f"{where}: datatype {dt} but the model expects {v2_datatype(spec.dtype)}")
        if len(shape) != len(spec.shape) or any(
            s != -1 and s != d for s, d in zip(spec.shape, shape, strict=False)
        ):
            raise V2Error(f"{where}: shape {shape} does not match the model's {spec.shape}")
        out[name] = arr
    missing = set(by_name) - set(out)
    if missing:
        raise V2Error(f"missing inputs {sorted(missing)}")
    rest = {k: v for k, v in req.items() if k != "inputs"}
    return out, rest


def encode_infer_response(
    model_name: str,
    model_version: str | None,
    outputs: dict[str, np.ndarray],
    request: dict[str, Any],
) -> dict[str, Any]:
    wanted = None
    if isinstance(request.get("outputs"), list):
        wanted = {o.get("name") for o in request["outputs"] if isinstance(o, dict)}
    resp: dict[str, Any] = {"model_name": model_name, "outputs": []}
    if model_version is not None:
        resp["model_version"] = model_version
    if "id" in request:
        resp["id"] = request["id"]
    for name, arr in outputs.items():
        if wanted is not None and name not in wanted:
            continue
        resp["outputs"].append(
            {
                "name": name,
                "shape": list(arr.shape),
                "datatype": v2_datatype(arr.dtype.name),
                "data": arr.ravel().tolist(),
            }
        )
    return resp


def model_metadata(name: str, versions: list[str], platform: str,
                   inputs: list[TensorSpec], outputs: list[TensorSpec]) -> dict[str, Any]:
    def t(s: TensorSpec) -> dict[str, Any]:
        return {"name": s.name, "datatype": v2_datatype(s.dtype), "shape": s.shape}

    return {
        "name": name,
        "versions": versions,
        "platform": platform,
        "inputs": [t(s) for s in inputs],
        "outputs": [t(s) for s in outputs],
    }
