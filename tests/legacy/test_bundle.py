"""Bundle write/read on this stack (npz self-test vectors, tar members, limits)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from agent.bundle import BundleLimits, read_manifest, unpack
from agent.errors import BundleError
from agent.slots import Slots
from tests.legacy.bundles import tflite_bundle, tflite_expected
from tests.support import linear_bundle


def test_onnx_bundle_roundtrip_is_deterministic(tmp_path: Path):
    _, sha1, w, b = linear_bundle(tmp_path / "one.efb")
    _, sha2, *_ = linear_bundle(tmp_path / "two.efb")
    assert sha1 == sha2
    bundle = unpack(tmp_path / "one.efb", tmp_path / "out")
    assert bundle.sha256 == sha1 and bundle.manifest.ref == "lin:1.0.0"
    st = bundle.selftest()
    assert st.inputs["input"].dtype == np.float32 and st.inputs["input"].shape == (8, 4)
    np.testing.assert_allclose(st.outputs["logits"], st.inputs["input"] @ w + b, rtol=1e-5)
    assert bundle.reference().model_dump()


def test_tflite_bundle_roundtrip(tmp_path: Path):
    man, sha = tflite_bundle(tmp_path / "t.efb")
    assert read_manifest(tmp_path / "t.efb").members["model.tflite"].size == man.members["model.tflite"].size
    bundle = unpack(tmp_path / "t.efb", tmp_path / "out")
    in_name, out_name, x, y = tflite_expected()
    np.testing.assert_array_equal(bundle.selftest().inputs[in_name], x)
    np.testing.assert_array_equal(bundle.selftest().outputs[out_name], y)
    assert bundle.sha256 == sha


def test_flipped_byte_and_oversized_member_are_refused(tmp_path: Path):
    linear_bundle(tmp_path / "good.efb")
    data = bytearray((tmp_path / "good.efb").read_bytes())
    data[data.index(b"linear")] ^= 0x20
    (tmp_path / "flip.efb").write_bytes(bytes(data))
    with pytest.raises(BundleError, match="does not match its manifest"):
        unpack(tmp_path / "flip.efb", tmp_path / "flip")
    with pytest.raises(BundleError):
        unpack(tmp_path / "good.efb", tmp_path / "small", BundleLimits(max_model_bytes=16))


def test_slots_install_and_activate(tmp_path: Path):
    _, sha, *_ = linear_bundle(tmp_path / "b.efb")
    slots = Slots(tmp_path / "slots")
    installed = slots.install(tmp_path / "b.efb", "a", sha256=sha)
    slots.activate("a")
    assert slots.active_name() == "a" and slots.inactive_name() == "b"
    assert slots.bundle("a") == installed
    with pytest.raises(ValueError):
        slots.install(tmp_path / "b.efb", "a", sha256=sha)
