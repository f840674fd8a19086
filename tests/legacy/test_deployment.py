"""An in-process agent deploys over a real Mosquitto from a real TUF repository."""

from __future__ import annotations

import numpy as np

from tests.legacy.bundles import tflite_bundle, tflite_expected
from tests.support import linear_bundle


def test_deploy_onnx_then_litert_then_refuse_a_bad_model(device_bench):
    bench = device_bench
    a = bench.agent()
    man1, _sha, w, b = linear_bundle(bench.tmp / "lin.efb", version="1.0.0", seed=1)
    bench.deploy("legacy1", "d1", bench.publish(bench.tmp / "lin.efb"), man1.ref)
    assert bench.wait_for(a, "d1") == "installed"
    x = np.linspace(-1, 1, 8, dtype=np.float32).reshape(2, 4)
    np.testing.assert_allclose(a.infer({"input": x})["logits"], x @ w + b, rtol=1e-5, atol=1e-5)

    man2, _ = tflite_bundle(bench.tmp / "t.efb")
    bench.deploy("legacy1", "d2", bench.publish(bench.tmp / "t.efb"), man2.ref)
    assert bench.wait_for(a, "d2") == "installed", a.record.error
    in_name, out_name, tx, ty = tflite_expected()
    np.testing.assert_allclose(a.infer({in_name: tx[:1]})[out_name], ty[:1], atol=1e-5)
    st = a.status()
    assert st["model"] == "tiny-tflite:1.0.0"
    assert sorted(st["slots"].values()) == ["lin:1.0.0", "tiny-tflite:1.0.0"]

    man3, _ = tflite_bundle(bench.tmp / "bad.efb", version="1.1.0", bad_selftest=True)
    bench.deploy("legacy1", "d3", bench.publish(bench.tmp / "bad.efb"), man3.ref)
    assert bench.wait_for(a, "d3") == "failed"
    assert a.record.error_kind == "selftest"
    assert a.model_ref == "tiny-tflite:1.0.0"
    np.testing.assert_allclose(a.infer({in_name: tx[:1]})[out_name], ty[:1], atol=1e-5)
