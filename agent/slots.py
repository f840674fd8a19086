"""A/B model slots on disk.

::

    slots/a/            an unpacked bundle (manifest.json last, so it marks completeness)
    slots/b/            the other slot
    slots/pointer.json  {"active": "a"|"b"|null}

Installing writes into the *inactive* slot through a staging folder that is renamed
into place; the active slot is never touched, so the device keeps serving. Activation
rewrites ``pointer.json`` atomically (temp file, fsync, rename, fsync of the folder):
after a crash the pointer names either the old or the new slot, never neither.
The previous model stays in its slot, so rolling back is one pointer write.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Literal

from agent.bundle import Bundle, BundleLimits, open_unpacked, unpack
from agent.errors import BundleError, DiskSpaceError

__all__ = ["SlotName", "Slots", "other", "atomic_write", "fsync_path", "set_aside_unreadable"]

SlotName = Literal["a", "b"]


def other(slot: SlotName) -> SlotName:
    return "b" if slot == "a" else "a"


def fsync_path(path: Path) -> None:
    """Flush a file's data, or a folder's entries, to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def set_aside_unreadable(path: Path, *companions: str) -> Path:
    """Rename an unreadable file (and ``path.name + suffix`` for each of ``companions``,
    such as SQLite's ``-wal``) to ``<name>.unreadable-<unix time>``, kept for diagnosis;
    returns the new path of ``path``. A companion that does not exist is skipped."""
    aside = path.with_name(f"{path.name}.unreadable-{int(time.time())}")
    for suffix in ("", *companions):
        src = path.with_name(path.name + suffix)
        if src.exists():
            os.replace(src, aside.with_name(aside.name + suffix))
    return aside


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a crash leaves the old or the new content."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        fsync_path(path.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class Slots:
    def __init__(self, root: Path, limits: BundleLimits = BundleLimits(), *, create: bool = True):
        """``create=False`` (readers such as ``edgefleet agent status``) writes nothing."""
        self.root = root
        self.limits = limits
        if create:
            root.mkdir(parents=True, exist_ok=True)
        self._pointer = root / "pointer.json"

    def active_name(self) -> SlotName | None:
        name = self.pointer()
        return name if name in ("a", "b") else None  # type: ignore[return-value]

    def pointer(self) -> str:
        """What ``pointer.json`` says: ``"a"``, ``"b"``, ``"none"`` (serve nothing: set
        when a first deployment rolled back to nothing), ``"missing"`` (nothing was ever
        activated: a slot may hold a first deployment that failed or is still under
        way), or ``"unknown"`` (torn or unreadable; only outside interference leaves it
        so, since it is written atomically)."""
        try:
            data = json.loads(self._pointer.read_text())
        except FileNotFoundError:
            return "missing"
        except (OSError, ValueError):
            return "unknown"
        if not isinstance(data, dict) or "active" not in data:
            return "unknown"
        name = data["active"]
        if name is None:
            return "none"
        return name if name in ("a", "b") else "unknown"

    def inactive_name(self) -> SlotName:
        active = self.active_name()
        return "a" if active is None else other(active)

    def path(self, slot: SlotName) -> Path:
        return self.root / slot

    def bundle(self, slot: SlotName) -> Bundle | None:
        """The bundle in ``slot``, or None when the slot is empty or incomplete."""
        p = self.path(slot)
        if not (p / "manifest.json").exists():
            return None
        try:
            return open_unpacked(p)
        except BundleError:
            return None

    def install(self, bundle_file: Path, slot: SlotName, *, sha256: str) -> Bundle:
        """Unpack ``bundle_file`` into ``slot`` (which must not be active).

        Raises:
            BundleError: the bundle is malformed (nothing is installed).
            DiskSpaceError: not enough free space for the unpacked model.
            ValueError: ``slot`` is the active slot.
        """
        if slot == self.active_name():
            raise ValueError(f"refusing to install into the active slot {slot!r}")
        need = int(bundle_file.stat().st_size * 1.1)
        target = self.path(slot)
        free = shutil.disk_usage(self.root).free
        if free < need:
            # The slot's old contents go anyway: make room with them first (the slot is
            # not active, so it is nobody's rollback target).
            old = _tree_size(target)
            if free + old < need:
                raise DiskSpaceError(f"need {need} bytes to install, {free} free in {self.root}"
                                     + (f" and {old} in slot {slot}'s old contents" if old else ""))
            self._clear(slot)
        staging = Path(tempfile.mkdtemp(dir=self.root, prefix=f".staging-{slot}-"))
        try:
            bundle = unpack(bundle_file, staging, self.limits)
            (staging / ".sha256").write_text(sha256)
            # The files' data reaches the disk before the rename that makes them the
            # slot: otherwise a power cut soon after could leave a renamed folder of
            # empty or short files (ext4 does not order data before renames).
            for f in staging.iterdir():
                fsync_path(f)
            fsync_path(staging)
            self._clear(slot)
            os.replace(staging, target)
            fsync_path(self.root)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return Bundle(target, bundle.manifest, sha256)

    def _clear(self, slot: SlotName) -> None:
        """Empty ``slot`` at once: its folder is renamed out of place, then deleted, so a
        crash never leaves a half-deleted slot that still looks complete (a
        ``manifest.json`` without its model). A leftover is removed at the next start."""
        target = self.path(slot)
        if not target.exists():
            return
        gone = self.root / f".staging-old-{slot}-{os.getpid()}-{time.monotonic_ns()}"
        os.replace(target, gone)
        fsync_path(self.root)
        shutil.rmtree(gone, ignore_errors=True)

    def activate(self, slot: SlotName) -> None:
        atomic_write(self._pointer, json.dumps({"active": slot}).encode())

    def activate_none(self) -> None:
        atomic_write(self._pointer, json.dumps({"active": None}).encode())

    def clean_staging(self) -> None:
        for p in self.root.glob(".staging-*"):
            shutil.rmtree(p, ignore_errors=True)


def _tree_size(path: Path) -> int:
    """Bytes of the regular files under ``path`` (0 when it does not exist)."""
    if not path.exists():
        return 0
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())
