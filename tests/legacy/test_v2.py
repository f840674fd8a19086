"""The V2 JSON codec (orjson writing numpy arrays) on this stack's numpy 1.x."""

from __future__ import annotations

import json

import numpy as np
import pytest

from agent.bundle import TensorSpec
from agent.v2 import (
    V2Error,
    decode_infer_request,
    decode_infer_response,
    encode_infer_body,
    encode_infer_request,
)


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64", "int8", "int64", "uint64", "bool"])
def test_json_round_trip(dtype: str):
    x = (np.arange(6) % 3).astype(dtype).reshape(2, 3)
    body, _ = encode_infer_request({"x": x}, binary=False)
    got, _ = decode_infer_request(body, [TensorSpec(name="x", dtype=dtype, shape=[-1, 3])])
    assert got["x"].dtype == x.dtype and np.array_equal(got["x"], x)
    out = decode_infer_response(encode_infer_body("m", "1", {"y": x}, {})[0])
    assert out["y"].dtype == x.dtype and np.array_equal(out["y"], x)


def test_non_finite_and_bad_json():
    out = decode_infer_response(encode_infer_body("m", None, {"y": np.array([np.nan, 1.0], np.float32)}, {})[0])
    assert np.isnan(out["y"][0]) and out["y"][1] == 1.0
    with pytest.raises(V2Error, match="NaN and Infinity are not JSON"):
        decode_infer_request(b'{"inputs":[{"name":"x","shape":[1],"datatype":"FP32","data":[NaN]}]}',
                             [TensorSpec(name="x", dtype="float32", shape=[1])])


@pytest.mark.parametrize(("dtype", "data", "text"), [
    ("INT8", [1, 300], "out of"),  # numpy 1.x wraps 300 to 44 without a word
    ("INT32", [1.9, 2], "values must be integers"),  # and truncates 1.9 to 1
    ("UINT8", [-1], "out of"),
])
def test_integer_json_values_are_taken_exactly(dtype: str, data: list, text: str):
    np_dtype = {"INT8": "int8", "INT32": "int32", "UINT8": "uint8"}[dtype]
    body = json.dumps({"inputs": [{"name": "x", "shape": [len(data)], "datatype": dtype, "data": data}]}).encode()
    with pytest.raises(V2Error, match=text):
        decode_infer_request(body, [TensorSpec(name="x", dtype=np_dtype, shape=[-1])])
