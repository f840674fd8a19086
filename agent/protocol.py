"""MQTT payloads: typed, versioned, bounded.

Every JSON payload is a pydantic model carrying ``v`` (the protocol version). Readers
ignore unknown fields (new optional fields may appear within a version) but refuse an
unknown ``v``. :func:`decode` is the only way payloads are read: it enforces the size
limit before parsing and turns every failure into a :class:`~agent.errors.PayloadError`
that says what was wrong, so a caller can log it, count it and carry on.

Artifact and metadata bytes travel as binary *chunk frames* (:func:`encode_frame`,
:func:`decode_frame`)::

    b"EFC1" | uint32 big-endian header length | header JSON (ChunkHeader) | data

Each frame carries the sha256 of its data, so a corrupted chunk is caught on its own
and re-requested, without waiting for the whole-file hash.

Captured samples (opt-in on the device, see :mod:`agent.capture`) travel the same way
with their own magic: ``b"EFS1" | uint32 | header JSON (CaptureHeader) | npz bytes``
(:func:`encode_capture`, :func:`decode_capture`).
"""

from __future__ import annotations

import hashlib
import json
import struct
import time
from collections import Counter
from typing import Annotated, Any, Final, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from agent.errors import PayloadError, first_error

__all__ = [
    "PROTOCOL_VERSION",
    "MAX_JSON_PAYLOAD",
    "MAX_CHUNK_DATA",
    "Payload",
    "Presence",
    "Hello",
    "SlotInfo",
    "StatusReport",
    "LatencyStats",
    "Telemetry",
    "CandidateStats",
    "Deployment",
    "RepoRequest",
    "ChunkHeader",
    "LabelRecord",
    "Feedback",
    "MAX_FEEDBACK_ITEMS",
    "CaptureHeader",
    "MAX_CAPTURE_BYTES",
    "encode_capture",
    "decode_capture",
    "decode",
    "encode",
    "encode_frame",
    "decode_frame",
    "PayloadCounters",
]

PROTOCOL_VERSION: Final = 1
MAX_JSON_PAYLOAD: Final = 256 * 1024
MAX_CHUNK_DATA: Final = 1024 * 1024
_FRAME_MAGIC: Final = b"EFC1"
_CAPTURE_MAGIC: Final = b"EFS1"
MAX_FEEDBACK_ITEMS: Final = 1000
MAX_COUNT: Final = 2**63 - 1  # counters and sequence numbers fit a signed 64-bit column
MAX_EPOCH: Final = 2**53 - 1  # exact in JSON numbers everywhere, JavaScript included
Count = Annotated[int, Field(ge=0, le=MAX_COUNT)]
MAX_CAPTURE_BYTES: Final = 1024 * 1024
_MAX_FRAME_HEADER: Final = 4096

LifecycleState = str  # the agent's lifecycle state names; see agent.lifecycle.State


class Payload(BaseModel):
    """Base of every JSON payload."""

    model_config = ConfigDict(extra="ignore", frozen=True)
    v: Literal[1] = PROTOCOL_VERSION
    ts: float = Field(default_factory=time.time, description="Sender's wall clock, seconds.")


class Presence(Payload):
    online: bool


class SlotInfo(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)
    slot: Literal["a", "b"]
    model: str | None = Field(None, description="name:version installed in this slot")
    sha256: str | None = None


class Hello(Payload):
    device_id: str
    profile: str
    agent_version: str
    runtimes: dict[str, str] = Field(description="Runtime name -> version, for those that load.")
    unavailable_runtimes: dict[str, str] = Field(
        default_factory=dict, description="Runtime name -> why it cannot be used here."
    )
    tags: list[str] = Field(default_factory=list, max_length=64)
    platform: str = ""
    model: str | None = Field(None, description="Active model, name:version.")
    previous_model: str | None = None


class StatusReport(Payload):
    """Where a device's update lifecycle stands. ``seq`` increases per device."""

    seq: Count
    seq_epoch: int | None = Field(
        None, ge=0, le=MAX_EPOCH, description="Identifies the device's counter: a new one starts when its spool is recreated."
    )
    deployment_id: str | None = None
    state: str = Field(max_length=32, description="Lifecycle state name.")
    outcome: Literal[
        "idle", "in_progress", "installed", "failed", "rolled_back", "rejected", "candidate"
    ]
    model: str | None = Field(None, description="Active model, name:version.")
    previous_model: str | None = None
    target_model: str | None = Field(None, description="The model this deployment installs.")
    error: str | None = Field(None, max_length=4000)
    error_kind: str | None = Field(None, max_length=64)
    progress: float | None = Field(None, ge=0, le=1)
    conditions: list[str] = Field(
        default_factory=list, description="Standing conditions, e.g. metadata_expired."
    )


class LatencyStats(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)
    p50_ms: float | None = Field(None, ge=0)
    p95_ms: float | None = Field(None, ge=0)
    max_ms: float | None = Field(None, ge=0)


class CandidateStats(BaseModel):
    """How a shadow or split candidate did in one telemetry window."""

    model_config = ConfigDict(extra="ignore", frozen=True)
    model: str = Field(description="Candidate name:version.")
    mode: Literal["shadow", "split"]
    ratio: float = Field(ge=0, le=1)
    requests: Count = Field(0, description="Requests the candidate ran.")
    errors: Count = 0
    compared: Count = Field(0, description="shadow: rows compared with the active model.")
    agreed: Count = Field(0, description="shadow: rows whose top class matched.")
    max_abs_diff: float | None = Field(None, ge=0, description="shadow: largest output difference.")
    skipped: Count = Field(0, description="shadow: samples dropped because the queue was full.")
    latency: LatencyStats = Field(default_factory=LatencyStats)


class Telemetry(Payload):
    """One telemetry window of one device (batched: one message per interval)."""

    seq: Count
    window_start: float
    window_end: float
    model: str | None = None
    inference_count: Count
    error_count: Count
    latency: LatencyStats = Field(default_factory=LatencyStats)
    cpu_percent: float | None = Field(None, ge=0)
    rss_bytes: Count | None = None
    dropped_records: Count = Field(0, description="Spool records dropped so far.")
    payload_errors: dict[str, int] = Field(
        default_factory=dict, description="Malformed inbound payloads by kind."
    )
    candidate: CandidateStats | None = Field(None, description="Shadow or split candidate, if any.")
    capture: dict[str, int] | None = Field(
        None, description="Sample capture counters (captured, evicted, oversized, unsupported, uploaded, stored), if on."
    )
    feedback_dropped: Count = Field(0, description="Labels dropped because too many were pending.")
    observe_skipped: Count = Field(
        0, description="Requests served but not sketched, because sketching fell behind (so far)."
    )
    observe_unsampled: Count = Field(
        0, description="Requests served but left out of the sketch by its rate limit, "
        "drift_max_rows_per_s (so far)."
    )


class Deployment(Payload):
    """Desired state for one device, retained on its deploy topic.

    Nothing here is trusted: the agent looks ``target_path`` up in TUF metadata and
    takes name, version, hashes and downgrade permission from the signed entry.
    """

    deployment_id: str = Field(min_length=1, max_length=64)
    model: str = Field(max_length=200, description="name:version")
    target_path: str = Field(max_length=512, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
                             description="TUF target path of the bundle (one file name, as "
                             "the hub's <sha256>.efb).")
    health_window_s: float = Field(5.0, ge=0, le=86400)
    mode: Literal["activate", "shadow", "split"] = Field(
        "activate",
        description="activate: replace the active model. shadow: run beside it on a sample of "
        "requests and report agreement; responses never change. split: serve a share of "
        "requests with it (A/B).",
    )
    ratio: float = Field(
        0.1, ge=0, le=1, description="shadow: share of requests mirrored; split: share served."
    )


class RepoRequest(Payload):
    """Ask the hub's repository for ``length`` bytes of ``path`` from ``offset``."""

    rid: str = Field(min_length=1, max_length=64)
    path: str = Field(min_length=1, max_length=512)
    offset: Count = 0
    length: int = Field(gt=0, le=MAX_CHUNK_DATA)


class ChunkHeader(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)
    v: Literal[1] = PROTOCOL_VERSION
    rid: str = Field(max_length=64)
    path: str = Field(max_length=512)
    status: Literal["ok", "not_found", "error"] = "ok"
    offset: Count = 0
    total: Count = Field(0, description="Size of the whole file.")
    sha256: str = Field("", description="sha256 of this frame's data.")
    error: str | None = None


Label = int | str


MAX_LABEL_CHARS: Final = 128
MAX_SCORE_LABELS: Final = 1000


def check_label(v: Any) -> Any:
    """The rules a label (or prediction) keeps wherever it is stored: an integer of at
    most 53 bits (exact in JSON) or a string of 1-128 characters, never a boolean.
    Raises ValueError saying which rule it broke."""
    if isinstance(v, bool):
        raise ValueError("labels must be integers or strings, not booleans")
    if isinstance(v, float):  # pydantic would turn 1e17 into an int past the 53 bits
        raise ValueError("labels must be integers or strings, not numbers with a fraction or exponent")
    if isinstance(v, str) and not 1 <= len(v) <= MAX_LABEL_CHARS:
        raise ValueError(f"string labels must be 1-{MAX_LABEL_CHARS} characters, got {len(v)}")
    if isinstance(v, int) and abs(v) > 2**53:
        raise ValueError("integer labels must fit 53 bits")
    return v


def check_score(v: Any) -> Any:
    """A score map holds 1-1000 labels, each a string label's 1-128 characters (so
    that one label with its scores always fits a payload)."""
    if isinstance(v, dict):
        if not 1 <= len(v) <= MAX_SCORE_LABELS:
            raise ValueError(f"score maps hold 1-{MAX_SCORE_LABELS} labels, got {len(v)}")
        long = next((k for k in v if not 1 <= len(k) <= MAX_LABEL_CHARS), None)
        if long is not None:
            raise ValueError(f"score map labels must be 1-{MAX_LABEL_CHARS} characters, got {len(long)}")
    return v


def check_model_ref(v: str) -> str:
    """``name:version``, both parts present."""
    name, sep, version = v.partition(":")
    if not sep or not name or not version:
        raise ValueError(f"model must be name:version, got {v[:40]!r}")
    return v


class LabelRecord(BaseModel):
    """One prediction whose true label became known on the device. The rules are the
    hub's (``hub.monitoring.FeedbackItem`` applies the same checks), so a label the
    device accepts is never refused when it arrives."""

    model_config = ConfigDict(extra="ignore", frozen=True, allow_inf_nan=False)
    model: str = Field(min_length=3, max_length=129, description="name:version that predicted.")
    request_id: str | None = Field(
        None, min_length=1, max_length=63, description="Makes resends idempotent (the hub scopes it by device)."
    )
    ts: float = Field(ge=0, le=1e11, description="When the prediction was made (device clock, seconds).")
    label: Label = Field(description="True label (int or string).")
    prediction: Label = Field(description="Predicted label, same type as label.")
    score: float | dict[str, float] | None = Field(
        None, description="Binary: score of the greater label. Multi-class: score per label."
    )

    @field_validator("label", "prediction", mode="before")
    @classmethod
    def _label(cls, v: Any) -> Any:
        return check_label(v)  # before: in lax mode pydantic would take True as 1

    @field_validator("score")
    @classmethod
    def _score(cls, v: Any) -> Any:
        return check_score(v)

    @field_validator("model")
    @classmethod
    def _model(cls, v: str) -> str:
        return check_model_ref(v)

    @model_validator(mode="after")
    def _same_type(self) -> LabelRecord:
        if type(self.label) is not type(self.prediction):
            raise ValueError("label and prediction must have the same type")
        return self


class Feedback(Payload):
    """Labels that came back on the device, batched per telemetry interval.

    Labels and predictions are not raw inputs; they leave the device like telemetry.
    """

    seq: Count
    items: list[LabelRecord] = Field(min_length=1, max_length=MAX_FEEDBACK_ITEMS)


class CaptureHeader(BaseModel):
    """Header of one captured sample frame (see :mod:`agent.capture`)."""

    model_config = ConfigDict(extra="ignore", frozen=True, allow_inf_nan=False)
    v: Literal[1] = PROTOCOL_VERSION
    sample_id: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    model: str = Field(min_length=3, max_length=129, description="name:version that served it.")
    ts: float = Field(ge=0, le=1e11, description="When the request was served (device clock).")
    sha256: str = Field("", description="sha256 of the npz data.")


P = TypeVar("P", bound=BaseModel)


def encode(payload: BaseModel) -> bytes:
    return payload.model_dump_json().encode()


def decode(cls: type[P], data: bytes, *, limit: int = MAX_JSON_PAYLOAD) -> P:
    """Parse one JSON payload of type ``cls``.

    Raises:
        PayloadError: oversized, not UTF-8 JSON, not an object, missing or unknown
            protocol version, or not matching the schema. ``kind`` says which.
    """
    if len(data) > limit:
        raise PayloadError(f"{cls.__name__}: payload of {len(data)} bytes exceeds {limit}", "oversized")
    try:
        obj = json.loads(data)
    except (ValueError, RecursionError) as e:  # JSONDecodeError, bad UTF-8, an integer of 4,300+
        # digits (ValueError), nesting deeper than the interpreter's stack (RecursionError)
        raise PayloadError(f"{cls.__name__}: not valid JSON ({type(e).__name__}: {str(e)[:200]})",
                           "not_json") from e
    if not isinstance(obj, dict):
        raise PayloadError(f"{cls.__name__}: payload must be a JSON object", "schema")
    if "v" not in obj:
        raise PayloadError(f"{cls.__name__}: missing protocol version 'v'", "version")
    if obj["v"] != PROTOCOL_VERSION:
        raise PayloadError(
            f"{cls.__name__}: unknown protocol version {obj['v']!r} (this agent speaks {PROTOCOL_VERSION})",
            "version",
        )
    try:
        return cls.model_validate(obj)
    except ValidationError as e:
        raise PayloadError(f"{cls.__name__}: {first_error(e)}", "schema") from e


def _pack(magic: bytes, header: BaseModel, data: bytes) -> bytes:
    h = header.model_dump_json().encode()
    return magic + struct.pack(">I", len(h)) + h + data


def _unpack(what: str, magic: bytes, cls: type[P], frame: bytes, limit: int) -> tuple[P, bytes]:
    if len(frame) < 8 or frame[:4] != magic:
        raise PayloadError(f"{what}: bad magic or truncated", "not_frame")
    (hlen,) = struct.unpack(">I", frame[4:8])
    if hlen > _MAX_FRAME_HEADER or len(frame) < 8 + hlen:
        raise PayloadError(f"{what}: header length {hlen} is invalid or truncated", "not_frame")
    header = decode(cls, frame[8 : 8 + hlen], limit=_MAX_FRAME_HEADER)
    data = frame[8 + hlen :]
    if len(data) > limit:
        raise PayloadError(f"{what}: {len(data)} data bytes exceed {limit}", "oversized")
    return header, data


def encode_frame(header: ChunkHeader, data: bytes = b"") -> bytes:
    if header.status == "ok" and not header.sha256:
        header = header.model_copy(update={"sha256": hashlib.sha256(data).hexdigest()})
    return _pack(_FRAME_MAGIC, header, data)


def decode_frame(frame: bytes, *, limit: int = MAX_CHUNK_DATA) -> tuple[ChunkHeader, bytes]:
    """Split and check one chunk frame.

    Raises:
        PayloadError: bad magic, truncated or oversized header, data over ``limit``,
            or data that does not match the header's sha256.
    """
    header, data = _unpack("chunk frame", _FRAME_MAGIC, ChunkHeader, frame, limit)
    if header.status == "ok" and hashlib.sha256(data).hexdigest() != header.sha256:
        raise PayloadError(
            f"chunk frame: data of {header.path}@{header.offset} does not match its sha256",
            "chunk_hash",
        )
    return header, data


def encode_capture(header: CaptureHeader, data: bytes) -> bytes:
    """One captured-sample frame; fills in the data's sha256."""
    header = header.model_copy(update={"sha256": hashlib.sha256(data).hexdigest()})
    return _pack(_CAPTURE_MAGIC, header, data)


def decode_capture(frame: bytes, *, limit: int = MAX_CAPTURE_BYTES) -> tuple[CaptureHeader, bytes]:
    """Split and check one captured-sample frame (the npz inside is not parsed here).

    Raises:
        PayloadError: bad magic, truncated or oversized header, data over ``limit``,
            or data that does not match the header's sha256.
    """
    if len(frame) > limit + _MAX_FRAME_HEADER + 8:
        raise PayloadError(f"capture frame: {len(frame)} bytes exceed {limit}", "oversized")
    header, data = _unpack("capture frame", _CAPTURE_MAGIC, CaptureHeader, frame, limit)
    if hashlib.sha256(data).hexdigest() != header.sha256:
        raise PayloadError(f"capture frame: data of sample {header.sample_id} does not match its sha256", "chunk_hash")
    return header, data


class PayloadCounters:
    """Counts malformed payloads by kind; thread-safe enough for counters (GIL)."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()

    def add(self, err: PayloadError) -> None:
        self.counts[err.kind] += 1

    def snapshot(self) -> dict[str, int]:
        return dict(self.counts)
