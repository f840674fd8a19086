"""The V2 JSON codec (orjson writing numpy arrays) on this stack's numpy 1.x."""

from __future__ import annotations

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
