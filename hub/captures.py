"""The hub's archive of captured samples: raw inputs that devices upload only when
their owner switched capture on (:mod:`agent.capture`).

A sample arrives as one MQTT message on ``.../{device_id}/capture`` holding a capture
frame. The hub checks the frame (magic, header, size, sha256), opens the npz inside
without pickles and with a cap on its unpacked size, checks that the model version
is registered, then stores the frame under ``data_dir/captures/{device_id}/`` and a
row in ``captured_sample``. A resent sample (same device and sample id) is ignored.
The archive is bounded in bytes (``EDGEFLEET_HUB_CAPTURE_MAX_BYTES``): past the
bound the oldest samples are deleted, rows and files, and counted.

Samples are listed with ``GET /api/v1/captures`` and downloaded as ``.npz`` from
``GET /api/v1/captures/{id}/npz`` (``edgefleet captures list|get``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from sqlalchemy import func
from sqlmodel import Session, col, select

from agent.capture import sample_arrays
from agent.errors import PayloadError
from agent.protocol import decode_capture
from agent.slots import atomic_write
from hub.models import ModelVersion
from hub.models_monitoring import CapturedSample

__all__ = ["CaptureArchive"]

log = logging.getLogger(__name__)


@dataclass
class CaptureArchive:
    folder: Path
    max_bytes: int = 1 << 30
    evicted: int = field(default=0, init=False)

    def store(
        self, session: Session, device_id: str, frame: bytes, now: datetime, *, clock_offset: float = 0.0
    ) -> CapturedSample | None:
        """Check and keep one uploaded sample; None when it was already stored.
        ``clock_offset`` moves the device's timestamp onto the hub's clock.

        Raises:
            PayloadError: ``oversized``, ``not_frame``, ``schema``, ``version``,
                ``chunk_hash`` (from the frame), ``sample`` (the npz inside is not a
                valid sample) or ``unknown_model``. Nothing is stored.
        """
        header, data = decode_capture(frame)
        try:
            sample_arrays(data)
        except ValueError as e:
            raise PayloadError(f"capture {header.sample_id}: {e}", "sample") from e
        name, sep, version = header.model.partition(":")
        known = session.exec(
            select(ModelVersion.id).where(ModelVersion.name == name, ModelVersion.version == version)
        ).first()
        if not sep or known is None:
            raise PayloadError(f"capture {header.sample_id}: unknown model {header.model!r}", "unknown_model")
        dup = session.exec(
            select(CapturedSample.id).where(
                CapturedSample.device_id == device_id, CapturedSample.sample_id == header.sample_id
            )
        ).first()
        if dup is not None:
            return None
        path = self.path(device_id, header.sample_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, frame)
        row = CapturedSample(
            device_id=device_id, sample_id=header.sample_id, model_name=name, model_version=version,
            ts=header.ts + clock_offset, size=len(frame), sha256=header.sha256, received=now,
        )
        session.add(row)
        session.flush()
        self._evict(session)
        return row

    def _evict(self, session: Session) -> None:
        total = session.exec(select(func.coalesce(func.sum(CapturedSample.size), 0))).one()
        while total > self.max_bytes:
            oldest = session.exec(select(CapturedSample).order_by(col(CapturedSample.id)).limit(64)).all()
            if len(oldest) <= 1:
                return
            for row in oldest[:-1]:
                if total <= self.max_bytes:
                    break
                self.path(row.device_id, row.sample_id).unlink(missing_ok=True)
                session.delete(row)
                total -= row.size
                self.evicted += 1
            session.flush()

    def path(self, device_id: str, sample_id: str) -> Path:
        # both are validated against [A-Za-z0-9_.-] (topic parser and CaptureHeader),
        # and neither may be "." or "..", so the path stays inside the folder
        if device_id in (".", "..") or sample_id in (".", ".."):
            raise PayloadError(f"capture: invalid id {device_id!r}/{sample_id!r}", "schema")
        return self.folder / device_id / f"{sample_id}.efs"

    def npz(self, row: CapturedSample) -> bytes:
        """The npz data of a stored sample (checked against its sha256 again).

        Raises:
            FileNotFoundError: the file was removed behind the hub's back.
            PayloadError: the file no longer matches what was stored.
        """
        _header, data = decode_capture(self.path(row.device_id, row.sample_id).read_bytes())
        return data
