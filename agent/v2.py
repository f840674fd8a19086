"""Open Inference Protocol (V2) tensors: JSON <-> numpy.

Transport-free, so the agent's localhost endpoint and the hub's cloud endpoint share it.
Errors are :class:`V2Error` with the HTTP status they map to.

Besides plain JSON, tensors may travel as raw bytes with the binary tensor data
extension that Triton and MLServer implement: the HTTP body is the JSON request
(``Inference-Header-Content-Length`` bytes long) followed by the raw little-endian,
row-major data of every input whose ``parameters`` carry ``binary_data_size`` (in the
order of ``inputs``). A request with ``"parameters": {"binary_data_output": true}``, or
an output asking ``"parameters": {"binary_data": true}``, gets its outputs the same way.
Decoding such a tensor is one ``np.frombuffer`` instead of parsing a JSON number list,
which is what dominates a JSON request of more than a few hundred values.

JSON is read and written with orjson, numbers straight from and to numpy arrays
(measured against the standard library by ``benchmarks/v2_json_codec.py``; figures in
docs/benchmarks.md). Like any strict JSON parser it
refuses ``NaN`` and ``Infinity`` tokens, which are not JSON; a non-finite output value
(NaN or ±inf) is written as ``null``, which decodes back to NaN (send tensors with
non-finite values, or ±inf that must survive, as binary data).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import orjson

from agent.bundle import TensorSpec

__all__ = ["V2Error", "DATATYPES", "decode_infer_request", "encode_infer_response", "encode_infer_body",
           "encode_infer_request", "decode_infer_response", "model_metadata", "HEADER_LENGTH"]

DATATYPES: dict[str, str] = {
    "BOOL": "bool", "UINT8": "uint8", "UINT16": "uint16", "UINT32": "uint32", "UINT64": "uint64",
    "INT8": "int8", "INT16": "int16", "INT32": "int32", "INT64": "int64",
    "FP16": "float16", "FP32": "float32", "FP64": "float64", "BYTES": "object",
}
_TO_V2 = {v: k for k, v in DATATYPES.items()}
_TO_V2["string"] = "BYTES"
MAX_REQUEST_BYTES = 64 << 20
HEADER_LENGTH = "Inference-Header-Content-Length"
"""HTTP header of the binary extension: the length of the JSON part of the body."""
_NP_DTYPES = {k: np.dtype(v) for k, v in DATATYPES.items()}
_WIRE_DTYPES = {k: d.newbyteorder("<") for k, d in _NP_DTYPES.items() if k != "BYTES"}
_ORJSON_KINDS = frozenset("biuf")  # numpy kinds orjson writes itself (OPT_SERIALIZE_NUMPY)


_NON_FINITE_HINT = " (NaN and Infinity are not JSON: send null, or the tensor as binary data)"


def _dumps(obj: Any) -> bytes:
    return orjson.dumps(obj, option=orjson.OPT_SERIALIZE_NUMPY)


class V2Error(Exception):
    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def v2_datatype(dtype: str) -> str:
    return _TO_V2.get(dtype, "BYTES")


def _check_shape(shape: Any, where: str) -> list[int]:
    # type() is int, not isinstance: JSON true is a bool, and bool is an int subclass.
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise V2Error(f"{where}: shape must be a list of non-negative integers")
    return shape


def _json_tensor(data: Any, dt: str, *, exact: bool = True) -> np.ndarray:
    """JSON values as an array of V2 datatype ``dt``. Integer and BOOL tensors take
    exactly what they can hold: numpy would truncate 1.9 to 1 and (before numpy 2)
    wrap 300 to 44 in INT8 without a word.

    The checks run in numpy on the array numpy infers (its dtype says whether every
    value was an integer, or a boolean; min and max say whether they fit). Only where
    numpy cannot tell (integers past int64 mixed with others come out as float64 or
    object), or where ``exact`` says booleans may hide among integers (numpy reads
    ``[1, true]`` as int64), are the values checked one by one in Python."""
    dtype = _NP_DTYPES[dt]
    if dtype.kind not in "iub":
        return np.asarray(data, dtype=dtype)
    raw = np.asarray(data)
    if raw.size == 0:
        return raw.astype(dtype)
    if dtype.kind == "b":
        if raw.dtype.kind != "b":
            raise ValueError("values must be true or false")
        return raw
    if raw.dtype.kind in "iu" and not exact:
        info = np.iinfo(dtype)
        if raw.min() < info.min or raw.max() > info.max:
            raise ValueError(f"values out of range for {dt}")
        return raw.astype(dtype)
    if raw.dtype.kind == "b":
        raise ValueError("values must be integers")
    values = np.asarray(data, dtype=object)  # float64 or object: the JSON values as they came
    if not all(type(v) is int for v in values.flat):
        raise ValueError("values must be integers")
    arr = np.asarray(data, dtype=dtype)  # numpy 2 raises OverflowError out of range
    if not (values == arr).all():  # numpy 1.x wraps instead
        raise ValueError(f"values out of range for {dt}")
    return arr


def decode_infer_request(
    body: bytes | dict[str, Any], specs: list[TensorSpec], header_length: int | None = None
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Parse a V2 infer request into named arrays, checked against the model's inputs.

    ``header_length`` (the ``Inference-Header-Content-Length`` header) says that only the
    first ``header_length`` bytes of ``body`` are JSON and binary tensor data follows.

    Returns (inputs, request fields other than ``inputs``).

    Raises:
        V2Error(400): malformed JSON, unknown/missing inputs, bad datatype, shape or data,
            binary data that does not add up.
        V2Error(413): the body is over ``MAX_REQUEST_BYTES``.
    """
    binary = b""
    if isinstance(body, bytes | bytearray):
        if len(body) > MAX_REQUEST_BYTES:
            raise V2Error(f"request of {len(body)} bytes exceeds {MAX_REQUEST_BYTES}", 413)
        if header_length is not None:
            if not 0 < header_length <= len(body):
                raise V2Error(f"{HEADER_LENGTH} {header_length} does not fit a body of {len(body)} bytes")
            binary = body[header_length:]
            body = body[:header_length]
        try:
            req = orjson.loads(body)
        except orjson.JSONDecodeError as e:  # also bad UTF-8
            hint = _NON_FINITE_HINT if b"NaN" in body or b"Infinity" in body else ""
            raise V2Error(f"request body is not valid JSON: {e}{hint}") from e
        # numpy reads [1, true] as integers; only a body with such a token needs the
        # value-by-value check of integer tensors.
        booleans = b"true" in body or b"false" in body
    else:
        req = body
        booleans = True
    if not isinstance(req, dict) or not isinstance(req.get("inputs"), list) or not req["inputs"]:
        raise V2Error("request must be an object with a non-empty 'inputs' list")
    if "id" in req and not isinstance(req["id"], str):
        raise V2Error(f"'id' must be a string, got {type(req['id']).__name__}")
    by_name = {s.name: s for s in specs}
    out: dict[str, np.ndarray] = {}
    offset = 0
    for i, t in enumerate(req["inputs"]):
        where = f"inputs[{i}]"
        if not isinstance(t, dict):
            raise V2Error(f"{where}: must be an object")
        name = t.get("name")
        if not isinstance(name, str):
            raise V2Error(f"{where}: 'name' must be a string, got {type(name).__name__}")
        if name not in by_name:
            raise V2Error(f"{where}: unknown input {name!r}; model inputs are {sorted(by_name)}")
        if name in out:
            raise V2Error(f"{where}: input {name!r} is given twice")
        spec = by_name[name]
        dt = t.get("datatype")
        if dt not in DATATYPES:
            raise V2Error(f"{where}: unknown datatype {dt!r}")
        shape = _check_shape(t.get("shape"), where)
        params = t.get("parameters")
        size = params.get("binary_data_size") if isinstance(params, dict) else None
        if size is not None:
            arr = _binary_tensor(binary, offset, size, dt, shape, where)
            offset += size
        else:
            if "data" not in t:
                raise V2Error(f"{where}: missing 'data'")
            try:
                arr = _json_tensor(t["data"], dt, exact=booleans)
            except (ValueError, TypeError, OverflowError) as e:
                raise V2Error(f"{where}: data does not match datatype {dt}: {e}") from e
            if arr.size != math.prod(shape):
                raise V2Error(f"{where}: {arr.size} values do not fill shape {shape}")
            arr = arr.reshape(shape)
        if spec.dtype != "string" and arr.dtype != np.dtype(spec.dtype):
            raise V2Error(f"{where}: datatype {dt} but the model expects {v2_datatype(spec.dtype)}")
        if len(shape) != len(spec.shape) or any(
            s != -1 and s != d for s, d in zip(spec.shape, shape, strict=False)
        ):
            raise V2Error(f"{where}: shape {shape} does not match the model's {spec.shape}")
        out[name] = arr
    if offset != len(binary):
        raise V2Error(f"{len(binary) - offset} bytes of binary data follow the request that no input claims")
    missing = set(by_name) - set(out)
    if missing:
        raise V2Error(f"missing inputs {sorted(missing)}")
    _check_requested_outputs(req.get("outputs"))
    rest = {k: v for k, v in req.items() if k != "inputs"}
    return out, rest


def _check_requested_outputs(outputs: Any) -> None:
    """The request's optional ``outputs``: a list of objects with a string ``name``
    (checked before the model runs, so that a bad request costs no inference)."""
    if outputs is None:
        return
    if not isinstance(outputs, list):
        raise V2Error(f"'outputs' must be a list, got {type(outputs).__name__}")
    for i, o in enumerate(outputs):
        if not isinstance(o, dict) or not isinstance(o.get("name"), str):
            raise V2Error(f"outputs[{i}]: must be an object with a string 'name'")
        if "parameters" in o and not isinstance(o["parameters"], dict):
            raise V2Error(f"outputs[{i}]: 'parameters' must be an object")


def _binary_tensor(binary: bytes, offset: int, size: Any, dt: str, shape: list[int], where: str) -> np.ndarray:
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise V2Error(f"{where}: binary_data_size must be a non-negative integer")
    wire = _WIRE_DTYPES.get(dt)
    if wire is None:
        raise V2Error(f"{where}: binary data of datatype {dt} is not supported; send it as JSON")
    if size != math.prod(shape) * wire.itemsize:
        raise V2Error(f"{where}: binary_data_size {size} does not fit shape {shape} of {dt}")
    if offset + size > len(binary):
        raise V2Error(f"{where}: {size} bytes of binary data announced, {len(binary) - offset} left in the body")
    arr = np.frombuffer(binary, dtype=wire, count=size // wire.itemsize, offset=offset)
    return arr.astype(arr.dtype.newbyteorder("="), copy=False).reshape(shape)


def _binary_outputs(request: dict[str, Any]) -> tuple[bool, dict[str, bool]]:
    """(all outputs binary, per-output choice) from a request's parameters."""
    params = request.get("parameters")
    default = bool(params.get("binary_data_output")) if isinstance(params, dict) else False
    per: dict[str, bool] = {}
    if isinstance(request.get("outputs"), list):
        for o in request["outputs"]:
            if isinstance(o, dict) and isinstance(o.get("parameters"), dict) and "binary_data" in o["parameters"]:
                per[str(o.get("name"))] = bool(o["parameters"]["binary_data"])
    return default, per


def _response_head(
    model_name: str, model_version: str | None, request: dict[str, Any]
) -> tuple[dict[str, Any], set[Any] | None]:
    """An infer response without outputs, and the output names the request asked for
    (None: all)."""
    wanted = None
    if isinstance(request.get("outputs"), list):
        wanted = {o.get("name") for o in request["outputs"] if isinstance(o, dict)}
    resp: dict[str, Any] = {"model_name": model_name, "outputs": []}
    if model_version is not None:
        resp["model_version"] = model_version
    if "id" in request:
        resp["id"] = request["id"]
    return resp, wanted


def _tensor_entry(
    name: str, arr: np.ndarray, binary: bool, chunks: list[bytes], as_list: bool = False
) -> dict[str, Any]:
    """One V2 tensor object: its data as raw little-endian bytes appended to ``chunks``
    (binary tensor extension) when ``binary`` and the type has a fixed width, else as a
    JSON ``data`` list: a flat numpy array for :func:`_dumps` to write, or a Python list
    with ``as_list``."""
    datatype = v2_datatype(arr.dtype.name)
    t: dict[str, Any] = {"name": name, "shape": list(arr.shape), "datatype": datatype}
    if binary and datatype in _WIRE_DTYPES:
        data = np.ascontiguousarray(arr, dtype=_WIRE_DTYPES[datatype]).tobytes()
        t["parameters"] = {"binary_data_size": len(data)}
        chunks.append(data)
    elif arr.dtype.kind in "OSU":  # BYTES: JSON strings; bytes (LiteRT string tensors) as UTF-8
        t["data"] = [_text(v, name) for v in arr.ravel().tolist()]
    elif as_list or arr.dtype.kind not in _ORJSON_KINDS:
        t["data"] = arr.ravel().tolist()
    else:  # C-contiguous, native byte order: what orjson writes
        t["data"] = np.ascontiguousarray(arr.ravel(), dtype=arr.dtype.newbyteorder("="))
    return t


def _text(v: Any, name: str) -> Any:
    if isinstance(v, bytes):
        try:
            return v.decode("utf-8")
        except UnicodeDecodeError as e:
            raise V2Error(f"output {name!r}: a BYTES element is not UTF-8 text ({e}); JSON cannot carry it", 500) from e
    return v


def encode_infer_body(
    model_name: str,
    model_version: str | None,
    outputs: dict[str, np.ndarray],
    request: dict[str, Any],
) -> tuple[bytes, int | None]:
    """The HTTP body of an infer response, and the value of ``Inference-Header-Content-Length``
    (None when every output is JSON)."""
    default, per = _binary_outputs(request)
    resp, wanted = _response_head(model_name, model_version, request)
    chunks: list[bytes] = []
    for name, arr in outputs.items():
        if wanted is None or name in wanted:
            resp["outputs"].append(_tensor_entry(name, arr, per.get(name, default), chunks))
    header = _dumps(resp)
    if not chunks:
        return header, None
    return b"".join([header, *chunks]), len(header)


def encode_infer_response(
    model_name: str,
    model_version: str | None,
    outputs: dict[str, np.ndarray],
    request: dict[str, Any],
) -> dict[str, Any]:
    resp, wanted = _response_head(model_name, model_version, request)
    resp["outputs"] = [_tensor_entry(name, arr, False, [], as_list=True) for name, arr in outputs.items()
                       if wanted is None or name in wanted]
    return resp


def encode_infer_request(
    inputs: dict[str, np.ndarray], *, binary: bool = True, binary_output: bool | None = None
) -> tuple[bytes, int | None]:
    """A client's infer request body and its ``Inference-Header-Content-Length`` (None for
    plain JSON). ``binary`` sends numeric tensors as raw bytes; ``binary_output`` (default:
    same as ``binary``) asks for the outputs that way."""
    binary_output = binary if binary_output is None else binary_output
    tensors: list[dict[str, Any]] = []
    chunks: list[bytes] = []
    for name, value in inputs.items():
        tensors.append(_tensor_entry(name, np.asarray(value), binary, chunks))
    req: dict[str, Any] = {"inputs": tensors}
    if binary_output:
        req["parameters"] = {"binary_data_output": True}
    header = _dumps(req)
    if not chunks:
        return header, None
    return b"".join([header, *chunks]), len(header)


def decode_infer_response(body: bytes, header_length: int | None = None) -> dict[str, np.ndarray]:
    """Outputs of an infer response (JSON, or JSON followed by binary tensor data).

    Raises:
        V2Error(502): the response does not parse or its binary data does not add up.
    """
    binary = b""
    if header_length is not None:
        binary, body = body[header_length:], body[:header_length]
    try:
        resp = orjson.loads(body)
        out: dict[str, np.ndarray] = {}
        offset = 0
        for o in resp["outputs"]:
            shape = list(o["shape"])
            size = (o.get("parameters") or {}).get("binary_data_size")
            if size is not None:
                out[o["name"]] = _binary_tensor(binary, offset, size, o["datatype"], shape, o["name"])
                offset += size
            else:
                out[o["name"]] = np.asarray(o["data"], dtype=_NP_DTYPES[o["datatype"]]).reshape(shape)
    except V2Error as e:
        raise V2Error(f"bad infer response: {e}", 502) from e
    except (ValueError, KeyError, TypeError, AttributeError, OverflowError) as e:
        raise V2Error(f"bad infer response: {e!r}", 502) from e
    return out


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
