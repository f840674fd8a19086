"""Both runtimes load a real model and pass its self-test through the agent's own path
(``load_bundle`` + ``run_selftest``), on whichever LiteRT library this stack has."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from agent.bundle import unpack
from agent.daemon import run_selftest
from agent.errors import RuntimeLoadError, SelfTestError
from agent.profiles import load_profile
from agent.runtimes.base import load_bundle
from tests.legacy.bundles import tflite_bundle, tflite_expected
from tests.support import linear_bundle

OPTIONS = load_profile("x86-gateway-vnni").runtime_options


def test_onnx_linear_model_loads_and_passes_selftest(tmp_path: Path):
    _, _, w, b = linear_bundle(tmp_path / "lin.efb")
    lm = load_bundle(unpack(tmp_path / "lin.efb", tmp_path / "lin"), OPTIONS, "a")
    run_selftest(lm)
    x = np.ones((2, 4), np.float32)
    np.testing.assert_allclose(lm.runtime.infer({"input": x})["logits"], x @ w + b, rtol=1e-5)
    lm.retire()


def test_litert_model_loads_and_passes_selftest(tmp_path: Path):
    tflite_bundle(tmp_path / "t.efb")
    lm = load_bundle(unpack(tmp_path / "t.efb", tmp_path / "t"), OPTIONS, "a")
    run_selftest(lm)  # batch 3 on a model converted for batch 1: the runtime resizes
    in_name, out_name, x, y = tflite_expected()
    np.testing.assert_allclose(lm.runtime.infer({in_name: x[1:2]})[out_name], y[1:2], atol=1e-5)
    assert [s.name for s in lm.runtime.inputs] == [in_name]
    lm.retire()


def test_litert_bad_selftest_is_caught(tmp_path: Path):
    tflite_bundle(tmp_path / "t.efb", bad_selftest=True)
    lm = load_bundle(unpack(tmp_path / "t.efb", tmp_path / "t"), OPTIONS, "a")
    with pytest.raises(SelfTestError, match="differs"):
        run_selftest(lm)


def test_unloadable_models_raise_runtime_load_error(tmp_path: Path):
    linear_bundle(tmp_path / "bad.efb", model_bytes=b"\x08\x07not-an-onnx-model")
    with pytest.raises(RuntimeLoadError):
        load_bundle(unpack(tmp_path / "bad.efb", tmp_path / "bad"), OPTIONS, "a")
    tflite_bundle(tmp_path / "t.efb")
    b = unpack(tmp_path / "t.efb", tmp_path / "t")
    b.model_path.write_bytes(b"TFL3 but not really a flatbuffer" * 4)
    with pytest.raises(RuntimeLoadError):
        load_bundle(b, OPTIONS, "a")
