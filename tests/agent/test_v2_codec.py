"""The V2 tensor codec (agent.v2) without a server: JSON written from numpy by orjson,
read back exactly, and bad bodies refused with the place they went wrong."""

from __future__ import annotations

import json

import numpy as np
import pytest

from agent import v2
from agent.bundle import TensorSpec
from agent.v2 import (
    V2Error,
    decode_infer_request,
    decode_infer_response,
    encode_infer_body,
    encode_infer_request,
    encode_infer_response,
)

DTYPES = ["float16", "float32", "float64", "int8", "int16", "int32", "int64",
          "uint8", "uint16", "uint32", "uint64", "bool"]


def _values(dtype: str) -> np.ndarray:
    rng = np.random.default_rng(0)
    if dtype == "bool":
        return rng.random((2, 3)) > 0.5
    if dtype.startswith("float"):
        return rng.standard_normal((2, 3)).astype(dtype) * np.asarray(1e3, dtype)
    info = np.iinfo(dtype)
    return np.array([[info.min, info.max, 0], [1, 2, 3]], dtype=dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_json_request_round_trips_every_numeric_datatype_exactly(dtype: str) -> None:
    x = _values(dtype)
    body, header_length = encode_infer_request({"x": x}, binary=False)
    assert header_length is None
    decoded, _ = decode_infer_request(body, [TensorSpec(name="x", dtype=dtype, shape=[-1, 3])])
    assert decoded["x"].dtype == x.dtype
    np.testing.assert_array_equal(decoded["x"], x)


@pytest.mark.parametrize("dtype", DTYPES)
def test_json_response_round_trips_every_numeric_datatype_exactly(dtype: str) -> None:
    y = _values(dtype)
    body, header_length = encode_infer_body("m", "1", {"y": y}, {})
    assert header_length is None
    out = decode_infer_response(body)
    assert out["y"].dtype == y.dtype
    np.testing.assert_array_equal(out["y"], y)


def test_non_native_byte_order_and_strided_arrays_are_written_by_value() -> None:
    x = np.arange(12, dtype=">f4").reshape(3, 4)[:, ::2]  # big-endian, not contiguous
    body, _ = encode_infer_request({"x": x}, binary=False)
    assert json.loads(body)["inputs"][0]["data"] == [0.0, 2.0, 4.0, 6.0, 8.0, 10.0]
    decoded, _ = decode_infer_request(body, [TensorSpec(name="x", dtype="float32", shape=[3, 2])])
    np.testing.assert_array_equal(decoded["x"], x.astype("<f4"))


def test_strings_travel_as_json_lists() -> None:
    for s in (np.array(["a", "β"], dtype=object), np.array([b"a", "β".encode()], dtype=object),
              np.array(["a", "β"])):
        body, _ = encode_infer_body("m", None, {"s": s}, {})
        assert json.loads(body)["outputs"][0] == {"name": "s", "shape": [2], "datatype": "BYTES", "data": ["a", "β"]}


def test_bytes_that_are_not_text_name_the_output() -> None:
    with pytest.raises(V2Error) as ei:
        encode_infer_body("m", None, {"s": np.array([b"\xff"], dtype=object)}, {})
    assert ei.value.status == 500 and "'s'" in str(ei.value)


def test_zero_d_empty_and_mixed_binary_outputs() -> None:
    outputs = {"scalar": np.float32(2.5) * np.ones((), np.float32), "empty": np.zeros((0, 3), np.int64),
               "logits": np.arange(6, dtype=np.float32).reshape(2, 3)}
    request = {"outputs": [{"name": "scalar"}, {"name": "empty"},
                           {"name": "logits", "parameters": {"binary_data": True}}]}
    body, header_length = encode_infer_body("m", None, outputs, request)
    assert header_length is not None
    out = decode_infer_response(body, header_length)
    for k, want in outputs.items():
        assert out[k].shape == want.shape and out[k].dtype == want.dtype
        np.testing.assert_array_equal(out[k], want)


def test_non_finite_outputs_are_null_and_decode_as_nan() -> None:
    y = np.array([np.nan, np.inf, -np.inf, 1.5], np.float32)
    body, _ = encode_infer_body("m", None, {"y": y}, {})
    assert json.loads(body)["outputs"][0]["data"] == [None, None, None, 1.5]
    out = decode_infer_response(body)["y"]
    assert np.isnan(out[:3]).all() and out[3] == 1.5


def test_encode_infer_response_is_plain_python_for_any_json_library() -> None:
    resp = encode_infer_response("m", "1", {"y": np.ones((1, 2), np.float32)}, {"id": "r"})
    assert json.loads(json.dumps(resp)) == {
        "model_name": "m", "model_version": "1", "id": "r",
        "outputs": [{"name": "y", "shape": [1, 2], "datatype": "FP32", "data": [1.0, 1.0]}],
    }


SPEC = [TensorSpec(name="input", dtype="float32", shape=[-1, 4])]
GOOD = b'{"inputs":[{"name":"input","shape":[1,4],"datatype":"FP32","data":[1,2,3,4]}]}'


@pytest.mark.parametrize(
    ("body", "status", "text"),
    [
        (GOOD[:-7], 400, "not valid JSON"),  # truncated
        (GOOD.replace(b"[1,2,3,4]", b"[1,NaN,3,4]"), 400, "NaN and Infinity are not JSON"),
        (GOOD.replace(b"[1,2,3,4]", b"[1,Infinity,3,4]"), 400, "not valid JSON"),
        (b"\xff\xfe" + GOOD, 400, "not valid JSON"),  # not UTF-8
        (b"[" * 2000 + b"]" * 2000, 400, "not valid JSON"),  # nested too deep
        (GOOD.replace(b"[1,2,3,4]", b'[1,"x",3,4]'), 400, "inputs[0]: data does not match datatype FP32"),
        (GOOD.replace(b"[1,2,3,4]", b"[1,1e999,3,4]"), 400, "number is infinity"),
        (GOOD.replace(b'{"inputs"', b'{"id":1180591620717411303424,"inputs"'), 400, "'id' must be a string"),
        (GOOD.replace(b'{"inputs"', b'{"id":7,"inputs"'), 400, "'id' must be a string"),
        (b" " * 4097, 413, "exceeds"),
        (GOOD.replace(b'"shape":[1,4]', b'"shape":[true,4]'), 400, "shape must be a list of non-negative"),
        (GOOD.replace(b'{"inputs":[', b'{"inputs":[' + GOOD[11:-2] + b","), 400, "inputs[1]: input 'input' is given twice"),
        (GOOD.replace(b'"name":"input"', b'"name":["input"]'), 400, "inputs[0]: 'name' must be a string, got list"),
        (GOOD.replace(b'"name":"input"', b'"name":{"a":1}'), 400, "inputs[0]: 'name' must be a string, got dict"),
        (GOOD[:-1] + b',"outputs":[{"name":["y"]}]}', 400, "outputs[0]: must be an object with a string 'name'"),
        (GOOD[:-1] + b',"outputs":{"name":"y"}}', 400, "'outputs' must be a list"),
        (GOOD[:-1] + b',"outputs":[{"name":"y","parameters":[1]}]}', 400, "outputs[0]: 'parameters' must be an object"),
        (GOOD.replace(b'"data":[1,2,3,4]', b'"parameters":{"binary_data_size":true}'), 400,
         "binary_data_size must be a non-negative integer"),
    ],
)
def test_bad_request_bodies_say_what_is_wrong(
    body: bytes, status: int, text: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(v2, "MAX_REQUEST_BYTES", 4096)
    with pytest.raises(V2Error) as ei:
        decode_infer_request(body, SPEC)
    assert ei.value.status == status and text in str(ei.value)


@pytest.mark.parametrize(("dtype", "value"), [("INT8", 300), ("UINT8", -1), ("INT64", 2**63)])
def test_integers_out_of_range_for_their_datatype_are_refused(dtype: str, value: int) -> None:
    np_dtype = {"INT8": "int8", "UINT8": "uint8", "INT64": "int64"}[dtype]
    body = json.dumps({"inputs": [{"name": "x", "shape": [1], "datatype": dtype, "data": [value]}]}).encode()
    with pytest.raises(V2Error) as ei:
        decode_infer_request(body, [TensorSpec(name="x", dtype=np_dtype, shape=[1])])
    assert ei.value.status == 400 and "inputs[0]: data does not match datatype" in str(ei.value)


@pytest.mark.parametrize(("dtype", "data", "text"), [
    ("INT32", [1.9, -2.7], "values must be integers"),  # numpy would truncate them to 1, -2
    ("INT64", [1, 2.0], "values must be integers"),
    ("UINT8", [True, False], "values must be integers"),
    ("INT32", [1, True], "values must be integers"),  # numpy reads it as [1, 1] of int64
    ("INT64", [[7], [False]], "values must be integers"),
    ("BOOL", [0, 1], "values must be true or false"),
    ("INT8", [[1, 2], [3, 300]], "out of"),  # numpy 2: "out of bounds"; before: the check here
])
def test_json_values_an_integer_or_bool_tensor_cannot_hold_are_refused(dtype: str, data: list, text: str) -> None:
    np_dtype = v2._NP_DTYPES[dtype]
    body = json.dumps({"inputs": [{"name": "x", "shape": np.shape(data), "datatype": dtype, "data": data}]})
    with pytest.raises(V2Error) as ei:
        decode_infer_request(body.encode(), [TensorSpec(name="x", dtype=np_dtype.name, shape=list(np.shape(data)))])
    assert ei.value.status == 400 and text in str(ei.value), str(ei.value)


def test_nested_and_empty_integer_and_bool_data_are_taken() -> None:
    for dtype, data, shape in [("INT64", [[1, -2], [3, 2**62]], [2, 2]), ("BOOL", [[True], [False]], [2, 1]),
                               ("INT32", [], [0, 3]), ("UINT64", [2**64 - 1], [1])]:
        np_dtype = v2._NP_DTYPES[dtype]
        body = json.dumps({"inputs": [{"name": "x", "shape": shape, "datatype": dtype, "data": data}]}).encode()
        spec = TensorSpec(name="x", dtype=np_dtype.name, shape=[-1] + shape[1:])
        got, _ = decode_infer_request(body, [spec])
        np.testing.assert_array_equal(got["x"], np.asarray(data, dtype=np_dtype).reshape(shape))
        assert got["x"].dtype == np_dtype


def test_the_non_finite_hint_is_given_only_when_the_body_has_such_a_token() -> None:
    with pytest.raises(V2Error) as ei:
        decode_infer_request(GOOD[:-7], SPEC)
    assert "NaN" not in str(ei.value)


def test_bad_response_bodies_are_a_bad_gateway() -> None:
    for body in (b'{"outputs": [', b'{"outputs": [{"name": "y"}]}', b"NaN"):
        with pytest.raises(V2Error) as ei:
            decode_infer_response(body)
        assert ei.value.status == 502
