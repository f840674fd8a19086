"""Opt-in capture of raw inference samples, rate-limited and capped in bytes.

By default raw inputs never leave the device: the hub sees drift sketches only.
Some teams need real samples to label and retrain on. The device owner can switch
capture on in the agent's configuration (it cannot be switched on from the hub):

``capture_per_minute``
    At most this many served requests are captured per minute (a token bucket
    with a burst of one, so captures are spread out). 0, the default, is off.
``capture_max_bytes``
    The capture folder's byte cap. When a new sample would exceed it, the oldest
    samples are deleted first, and every eviction is counted.
``capture_max_sample_bytes``
    A request whose sample is larger than this is not captured (counted as
    ``oversized``).
``capture_upload``
    Also send samples to the hub (topic ``capture``), each deleted from the device
    once the broker acknowledges it. Off by default: samples then stay in
    ``<data_dir>/captures`` for the owner to collect.

Each sample is one file, exactly the frame that goes over MQTT
(:func:`agent.protocol.encode_capture`): a JSON header naming the model, the time and
the sha256 of the data, then an ``.npz`` holding every input tensor as ``in/<name>``
and every output as ``out/<name>``. ``numpy.load(..., allow_pickle=False)`` reads it.

Capture runs on the model server's observers thread, off the request path, on the
copies of each request the server already makes for the drift sketch.
"""

from __future__ import annotations

import io
import itertools
import os
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from agent.npz import load_npz_bounded
from agent.protocol import MAX_CAPTURE_BYTES, CaptureHeader, encode_capture

__all__ = ["CaptureStore", "read_sample", "sample_arrays"]

_SUFFIX = ".efs"


class CaptureStore:
    """The device's capture folder: a byte-capped FIFO of sample frames.

    Thread-safe: :meth:`admit` and :meth:`add` are called from the observers thread,
    :meth:`oldest` / :meth:`remove` from the sender thread.
    """

    def __init__(
        self,
        folder: Path,
        *,
        per_minute: float,
        max_bytes: int,
        max_sample_bytes: int = 256 * 1024,
        clock=time.monotonic,
    ):
        if per_minute <= 0:
            raise ValueError("per_minute must be > 0 (capture is off otherwise)")
        if not 0 < max_sample_bytes <= MAX_CAPTURE_BYTES:
            raise ValueError(f"max_sample_bytes must be in (0, {MAX_CAPTURE_BYTES}]")
        if max_bytes < max_sample_bytes:
            raise ValueError("max_bytes must be at least max_sample_bytes")
        self.folder = folder
        self.folder.mkdir(parents=True, exist_ok=True)
        self.interval = 60.0 / per_minute
        self.max_bytes = max_bytes
        self.max_sample_bytes = max_sample_bytes
        self._clock = clock
        self._next = clock()
        self._admit_lock = threading.Lock()
        self._lock = threading.Lock()
        self._seq = itertools.count()
        self.counts: Counter[str] = Counter()
        for tmp in self.folder.glob("*.tmp"):
            tmp.unlink(missing_ok=True)  # a write cut short by a crash
        self._files: list[tuple[str, int]] = sorted(
            (p.name, p.stat().st_size) for p in self.folder.glob(f"*{_SUFFIX}")
        )
        self._bytes = sum(size for _, size in self._files)

    # ------------------------------------------------------------------ request path

    def admit(self) -> bool:
        """True when a token is available (at most ``per_minute`` per minute)."""
        now = self._clock()
        if now < self._next:
            return False
        if not self._admit_lock.acquire(blocking=False):
            return False
        try:
            if now < self._next:
                return False
            # keep the schedule while busy; after an idle gap restart it from now,
            # so idleness never banks a burst
            base = self._next if now - self._next < self.interval else now
            self._next = base + self.interval
            return True
        finally:
            self._admit_lock.release()

    # ------------------------------------------------------------------ sketch thread

    def add(
        self, model_ref: str, ts: float, inputs: dict[str, np.ndarray], outputs: dict[str, np.ndarray]
    ) -> str | None:
        """Store one sample; returns its id, or None when it was too large."""
        buf = io.BytesIO()
        arrays = {f"in/{k}": np.asarray(v) for k, v in inputs.items()}
        arrays.update({f"out/{k}": np.asarray(v) for k, v in outputs.items()})
        raw = sum(a.nbytes for a in arrays.values())
        if raw > self.max_sample_bytes:
            self.counts["oversized"] += 1
            return None
        if any(a.dtype.hasobject for a in arrays.values()):
            self.counts["unsupported"] += 1  # BYTES tensors: npz would have to pickle them
            return None
        # No object arrays, so nothing is pickled. (numpy 1.x's savez has no allow_pickle
        # option: it stored the keyword as an array named "allow_pickle", which made
        # every sample unreadable.)
        members: dict[str, Any] = arrays  # the stubs read any keyword as allow_pickle
        np.savez(buf, **members)
        data = buf.getvalue()
        sample_id = f"{time.time_ns():020d}-{next(self._seq) % 1_000_000:06d}"
        frame = encode_capture(CaptureHeader(sample_id=sample_id, model=model_ref, ts=ts), data)
        if len(frame) > self.max_sample_bytes + 4096:
            self.counts["oversized"] += 1
            return None
        name = sample_id + _SUFFIX
        tmp = self.folder / (name + ".tmp")
        with open(tmp, "wb") as f:
            f.write(frame)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.folder / name)
        with self._lock:
            self._files.append((name, len(frame)))
            self._bytes += len(frame)
            while self._bytes > self.max_bytes and len(self._files) > 1:
                old, size = self._files.pop(0)
                (self.folder / old).unlink(missing_ok=True)
                self._bytes -= size
                self.counts["evicted"] += 1
            self.counts["captured"] += 1
        return sample_id

    # ------------------------------------------------------------------ sender thread

    def oldest(self) -> tuple[str, bytes] | None:
        """The oldest stored sample frame, or None when the folder is empty."""
        while True:
            with self._lock:
                if not self._files:
                    return None
                name = self._files[0][0]
            try:
                return name, (self.folder / name).read_bytes()
            except FileNotFoundError:  # evicted meanwhile
                self._forget(name)

    def remove(self, name: str, *, uploaded: bool = True) -> None:
        (self.folder / name).unlink(missing_ok=True)
        if self._forget(name) and uploaded:
            self.counts["uploaded"] += 1

    def _forget(self, name: str) -> bool:
        with self._lock:
            for i, (n, size) in enumerate(self._files):
                if n == name:
                    del self._files[i]
                    self._bytes -= size
                    return True
        return False

    # ------------------------------------------------------------------ reporting

    def __len__(self) -> int:
        return len(self._files)

    @property
    def size_bytes(self) -> int:
        return self._bytes

    def snapshot(self) -> dict[str, int]:
        return {**self.counts, "stored": len(self._files), "stored_bytes": self._bytes}


def sample_arrays(
    data: bytes, *, max_arrays: int = 64, max_total_bytes: int = 8 * MAX_CAPTURE_BYTES
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Read the npz part of a sample into (inputs, outputs), refusing pickles.

    Raises:
        ValueError: not an npz, more than ``max_arrays`` arrays or ``max_total_bytes``
            once unpacked, a name that is not ``in/...`` or ``out/...``, or a
            non-numeric array.
    """
    arrays = load_npz_bounded(data, max_total_bytes, max_arrays)
    inputs: dict[str, np.ndarray] = {}
    outputs: dict[str, np.ndarray] = {}
    for n, arr in arrays.items():
        kind, sep, name = n.partition("/")
        if not sep or kind not in ("in", "out") or not name:
            raise ValueError(f"array {n!r} is neither in/<name> nor out/<name>")
        if arr.dtype.kind not in "biuf":
            raise ValueError(f"array {n!r} has dtype {arr.dtype}, not numeric")
        (inputs if kind == "in" else outputs)[name] = arr
    if not inputs:
        raise ValueError("the sample holds no input arrays")
    return inputs, outputs


def read_sample(path: Path) -> tuple[CaptureHeader, dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Read one stored sample file (device folder or hub store)."""
    from agent.protocol import decode_capture

    header, data = decode_capture(path.read_bytes())
    inputs, outputs = sample_arrays(data)
    return header, inputs, outputs
