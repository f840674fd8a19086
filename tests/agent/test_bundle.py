"""The bundle reader refuses everything it did not write, with a clear error."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest

from agent.bundle import BundleLimits, SemVer, read_manifest, unpack
from agent.errors import BundleError, ManifestError
from tests.support import linear_bundle


@pytest.fixture
def good(tmp_path: Path) -> Path:
    linear_bundle(tmp_path / "good.efb")
    return tmp_path / "good.efb"


def test_roundtrip_and_determinism(tmp_path: Path, good: Path):
    _, sha2, *_ = linear_bundle(tmp_path / "again.efb")
    assert good.read_bytes() == (tmp_path / "again.efb").read_bytes()
    b = unpack(good, tmp_path / "out")
    assert b.sha256 == sha2
    assert b.manifest.ref == "lin:1.0.0"
    assert b.selftest().inputs["input"].shape == (8, 4)
    assert read_manifest(good).members["model.onnx"].size > 0


def _rewrite(src: Path, dst: Path, edit) -> None:
    """Copy a bundle member by member, letting ``edit`` change (info, data) pairs."""
    with tarfile.open(src) as tf, tarfile.open(dst, "w", format=tarfile.PAX_FORMAT) as out:
        for m in tf.getmembers():
            data = tf.extractfile(m).read()
            for info, payload in edit(m, data):
                out.addfile(info, io.BytesIO(payload) if payload is not None else None)


def test_truncated_file(tmp_path: Path, good: Path):
    data = good.read_bytes()
    # Cuts inside the header, the manifest, the model and the last member.
    for cut in (10, 700, 2100, 4700):
        bad = tmp_path / f"cut{cut}.efb"
        bad.write_bytes(data[:cut])
        with pytest.raises(BundleError, match=r"truncated|not a bundle|corrupt|empty|missing"):
            unpack(bad, tmp_path / f"out{cut}")
        assert not (tmp_path / f"out{cut}" / "manifest.json").exists()


def test_flipped_byte_in_model(tmp_path: Path, good: Path):
    data = bytearray(good.read_bytes())
    # The model member follows the manifest; flip a byte inside it.
    idx = data.index(b"linear")
    data[idx] ^= 0x20
    bad = tmp_path / "flip.efb"
    bad.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="does not match its manifest"):
        unpack(bad, tmp_path / "out")


def test_path_traversal_member_is_refused(tmp_path: Path, good: Path):
    bad = tmp_path / "trav.efb"

    def edit(m, data):
        yield m, data
        if m.name == "manifest.json":
            evil = tarfile.TarInfo("../../evil.txt")
            evil.size = 4
            yield evil, b"evil"

    _rewrite(good, bad, edit)
    with pytest.raises(BundleError, match="unexpected member '../../evil.txt'"):
        unpack(bad, tmp_path / "out" / "x")
    assert not (tmp_path / "evil.txt").exists()


@pytest.mark.parametrize("kind", [tarfile.SYMTYPE, tarfile.LNKTYPE])
def test_links_are_refused(tmp_path: Path, good: Path, kind):
    bad = tmp_path / "link.efb"

    def edit(m, data):
        if m.name == "selftest.npz":
            link = tarfile.TarInfo("selftest.npz")
            link.type = kind
            link.linkname = "/etc/passwd"
            yield link, None
        else:
            yield m, data

    _rewrite(good, bad, edit)
    with pytest.raises(BundleError, match="not a regular file"):
        unpack(bad, tmp_path / "out")


def test_oversized_member_is_refused(tmp_path: Path, good: Path):
    with pytest.raises(BundleError, match="over the limit"):
        unpack(good, tmp_path / "out", BundleLimits(max_model_bytes=100))
    with pytest.raises(BundleError, match="exceeds the bundle limit"):
        unpack(good, tmp_path / "out2", BundleLimits(max_bundle_bytes=1000))


def test_manifest_errors_name_the_field(tmp_path: Path, good: Path):
    bad = tmp_path / "man.efb"

    def edit(m, data):
        if m.name == "manifest.json":
            data = data.replace(b'"version":"1.0.0"', b'"version":"one"')
            m.size = len(data)
        yield m, data

    _rewrite(good, bad, edit)
    with pytest.raises(ManifestError, match="version"):
        read_manifest(bad)


@pytest.mark.parametrize("name", ["lin\\n", "Lin", "../lin", ""])
def test_manifest_name_must_be_the_whole_pattern(tmp_path: Path, good: Path, name: str):
    # "$" matched before a final newline, so "lin\n" passed the name check (review).
    bad = tmp_path / "name.efb"

    def edit(m, data):
        if m.name == "manifest.json":
            data = data.replace(b'"name":"lin"', b'"name":"' + name.encode() + b'"')
            m.size = len(data)
        yield m, data

    _rewrite(good, bad, edit)
    with pytest.raises(ManifestError, match="name"):
        read_manifest(bad)


def test_device_ids_must_be_the_whole_pattern():
    from agent.topics import valid_device_id

    assert valid_device_id("cam-01") and valid_device_id("a" * 64)
    assert not any(valid_device_id(d) for d in ("cam-01\n", "cam/01", "", "a" * 65, "cam 01"))


def test_not_a_tar(tmp_path: Path):
    p = tmp_path / "x.efb"
    p.write_bytes(b"{}" * 300)
    with pytest.raises(BundleError):
        unpack(p, tmp_path / "out")


def test_unpack_target_must_be_empty(tmp_path: Path, good: Path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "f").write_text("x")
    with pytest.raises(BundleError, match="not empty"):
        unpack(good, tmp_path / "out")


def test_semver_order():
    v = [SemVer.parse(s) for s in ("1.0.0-alpha", "1.0.0-alpha.1", "1.0.0-beta", "1.0.0", "1.2.0", "1.10.0")]
    assert v == sorted(v)
    with pytest.raises(ValueError):
        SemVer.parse("1.0")


def test_a_sparse_member_is_refused(tmp_path: Path, good: Path):
    # GNU tar's sparse members pass as regular files and unpack to their declared size: a
    # 10 KB archive can write 200 MB (found in review).
    import shutil
    import subprocess

    if shutil.which("tar") is None:
        pytest.skip("needs GNU tar to write a sparse member")
    src = tmp_path / "model.onnx"
    with open(src, "wb") as f:
        f.truncate(200 << 20)  # all hole
    with tarfile.open(good) as tf:  # a valid manifest first, as unpack wants it
        (tmp_path / "manifest.json").write_bytes(tf.extractfile("manifest.json").read())
    bad = tmp_path / "sparse.efb"
    subprocess.run(["tar", "--format=gnu", "-S", "-cf", str(bad), "-C", str(tmp_path), "manifest.json", "model.onnx"],
                   check=True)
    assert bad.stat().st_size < 1 << 20
    with pytest.raises(BundleError, match="'model.onnx' is a sparse file"):
        unpack(bad, tmp_path / "out")


def test_a_version_must_be_the_whole_pattern():
    from agent.bundle import SemVer

    assert str(SemVer.parse("1.2.3-rc.1")) == "1.2.3-rc.1"
    for bad in ("1.0.0\n", "1.0", "v1.0.0", "1.0.0 "):
        with pytest.raises(ValueError, match="not a semantic version"):
            SemVer.parse(bad)
