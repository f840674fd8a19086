"""A/B slots: what an install leaves on disk, and how it makes room."""

from __future__ import annotations

import shutil
from collections import namedtuple
from pathlib import Path

import pytest

from agent.errors import DiskSpaceError
from agent.slots import Slots
from tests.support import linear_bundle

Usage = namedtuple("Usage", "total used free")


def _bundles(tmp_path: Path, n: int = 2) -> list[tuple[Path, str]]:
    out = []
    for i in range(n):
        path = tmp_path / f"b{i}.efb"
        _, sha, _, _ = linear_bundle(path, version=f"1.0.{i}", seed=i, n_in=64, n_out=32)
        out.append((path, sha))
    return out


def test_reinstalling_a_slot_leaves_nothing_behind(tmp_path: Path):
    (b0, s0), (b1, s1) = _bundles(tmp_path)
    slots = Slots(tmp_path / "slots")
    slots.install(b0, "a", sha256=s0)
    slots.install(b1, "a", sha256=s1)
    assert slots.bundle("a").manifest.version == "1.0.1"
    assert sorted(p.name for p in slots.root.iterdir()) == ["a"]


def test_a_slot_cleared_halfway_is_removed_at_the_next_start(tmp_path: Path):
    # A crash while an old slot was being deleted leaves it under a staging name, out of
    # place: the slot itself is simply empty, never half deleted with its manifest.
    (b0, s0), _ = _bundles(tmp_path)
    slots = Slots(tmp_path / "slots")
    slots.install(b0, "b", sha256=s0)
    gone = slots.root / ".staging-old-b-1-1"
    shutil.move(slots.path("b"), gone)
    (gone / "model.onnx").unlink()
    assert slots.bundle("b") is None
    slots.clean_staging()
    assert not gone.exists()


def test_the_old_contents_of_the_slot_count_as_room(tmp_path: Path, monkeypatch):
    (b0, s0), (b1, s1) = _bundles(tmp_path)
    slots = Slots(tmp_path / "slots")
    slots.install(b0, "a", sha256=s0)
    old = sum(f.stat().st_size for f in slots.path("a").rglob("*") if f.is_file())
    need = int(b1.stat().st_size * 1.1)
    # Less free than the bundle needs, but enough once slot a's old model is gone.
    monkeypatch.setattr(shutil, "disk_usage", lambda p: Usage(1 << 30, 0, need - old // 2))
    slots.install(b1, "a", sha256=s1)
    assert slots.bundle("a").manifest.version == "1.0.1"


def test_not_enough_room_even_without_the_old_slot_says_how_much(tmp_path: Path, monkeypatch):
    (b0, s0), (b1, s1) = _bundles(tmp_path)
    slots = Slots(tmp_path / "slots")
    slots.install(b0, "a", sha256=s0)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: Usage(1 << 30, 0, 100))
    with pytest.raises(DiskSpaceError, match=r"need \d+ bytes to install, 100 free in .* and \d+ in slot a's old"):
        slots.install(b1, "a", sha256=s1)
    assert slots.bundle("a").manifest.version == "1.0.0"  # refused before anything was touched
