"""Self-test data, drift references and capture arrays come from outside the device:
their declared sizes and contents are not trusted (zip bombs, headers that claim
terabytes, object arrays, histograms devices cannot bin with)."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest

from agent.bundle import unpack
from agent.capture import sample_arrays
from agent.errors import BundleError
from agent.npz import load_npz_bounded
from tests.support import linear_bundle


def _npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, arr, allow_pickle=True)
    return buf.getvalue()


def _header_only(dtype: str, shape: tuple[int, ...]) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": dtype, "fortran_order": False, "shape": shape})
    return buf.getvalue()


def _zip(members: dict[str, bytes], deflate: bool = False) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED if deflate else zipfile.ZIP_STORED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def test_declared_sizes_are_checked_before_anything_is_allocated():
    ok = _zip({"a.npy": _npy(np.arange(6, dtype=np.float32).reshape(2, 3))})
    assert load_npz_bounded(ok, 1 << 20)["a"].shape == (2, 3)
    cases = [
        (_zip({"big.npy": _header_only("<f4", (1 << 40,))}), "declares shape (1099511627776,)"),
        (_zip({"bomb.npy": _header_only("<f4", (1 << 22,)) + bytes(16 << 20)}, deflate=True), "once unpacked"),
        (_zip({"obj.npy": _npy(np.array([{"a": 1}], dtype=object))}), "holds Python objects"),
        (_zip({"notes.txt": b"hi"}), "is not an .npy array"),
        (b"PK\x03\x04" + b"\0" * 30, "not a valid npz archive"),
        (_zip({"t.npy": _npy(np.zeros(100, np.float32))[:90]}), "is corrupt"),  # truncated member
    ]
    for data, message in cases:
        with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
            load_npz_bounded(data, 1 << 20)
    with pytest.raises(ValueError, match="3 arrays exceed 2"):
        load_npz_bounded(_zip({f"{k}.npy": _npy(np.zeros(1)) for k in "abc"}), 1 << 20, max_arrays=2)


def test_a_capture_sample_that_declares_terabytes_is_refused():
    with pytest.raises(ValueError, match="declares shape"):
        sample_arrays(_zip({"in/x.npy": _header_only("<f4", (1 << 40,))}))


def _rebuilt(tmp: Path, selftest: bytes | None = None, reference: bytes | None = None,
             drop: str | None = None) -> Path:
    """The linear test bundle with its selftest.npz or reference.json replaced, or the
    member ``drop`` left out (member hashes updated)."""
    src = tmp / "base.efb"
    linear_bundle(src)
    with tarfile.open(src) as tf:
        members = {m.name: tf.extractfile(m).read() for m in tf.getmembers()}  # type: ignore[union-attr]
    manifest = json.loads(members.pop("manifest.json"))
    if selftest is not None:
        members["selftest.npz"] = selftest
    if reference is not None:
        members["reference.json"] = reference
    if drop is not None:
        del members[drop]
    manifest["members"] = {n: {"sha256": hashlib.sha256(d).hexdigest(), "size": len(d)} for n, d in members.items()}
    out = tmp / "bad.efb"
    with tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as tf:
        for name, data in [("manifest.json", json.dumps(manifest).encode()), *members.items()]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return out


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"in.input.npy": _header_only("<f4", (1 << 40,))}, "declares shape"),
        ({"in.input.npy": _npy(np.float32(1.0))}, "needs a row axis"),
        ({"in.input.npy": _npy(np.ones((2, 4), np.float64))}, "is float64, the manifest says float32"),
        ({"in.input.npy": _npy(np.ones((2, 4, 1), np.float32))}, "the manifest's rank is 2"),
        ({"in.input.npy": _npy(np.ones((2, 4), np.float32)), "out.logits.npy": _npy(np.array(["a", "b"]))},
         "out.logits has dtype <U1"),
    ],
)
def test_bad_selftest_arrays_reject_the_bundle(tmp_path: Path, arrays: dict[str, bytes], message: str):
    with pytest.raises(BundleError, match=message):
        unpack(_rebuilt(tmp_path, _zip(arrays)), tmp_path / "out")


@pytest.mark.parametrize(
    ("feature", "message"),
    [
        ({"name": "f", "edges": [0.0, 2.0, 1.0], "counts": [1, 1]}, "edges must be two or more finite numbers, increasing"),
        ({"name": "f", "edges": [0.0], "counts": []}, "edges must be two or more"),
        ({"name": "f", "edges": [0.0, 1.0, 2.0], "counts": [1, 1, 1]}, "3 edges make 2 bins, but there are 3 counts"),
        ({"name": "f", "edges": [0.0, 1.0], "counts": [-1]}, "counts must be finite and not negative"),
    ],
)
def test_a_reference_devices_cannot_bin_with_rejects_the_bundle(tmp_path: Path, feature: dict, message: str):
    reference = json.dumps({"summary": "elementwise", "features": [feature], "rows": 2}).encode()
    with pytest.raises(BundleError, match=f"reference.json: features.0: Value error, {message}"):
        unpack(_rebuilt(tmp_path, reference=reference), tmp_path / "out")


@pytest.mark.parametrize("member", ["selftest.npz", "reference.json"])
def test_a_bundle_without_selftest_or_reference_is_rejected(tmp_path: Path, member: str):
    with pytest.raises(BundleError, match=f"no {member}"):
        unpack(_rebuilt(tmp_path, drop=member), tmp_path / "out")
