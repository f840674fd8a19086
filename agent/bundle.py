"""The model bundle: one signed file per (model, version, device profile).

A bundle is a POSIX tar archive (uncompressed, so it can be read as a stream) holding
exactly these members, in this order:

``manifest.json``
    A :class:`Manifest`: identity, runtime, tensor specs, preprocessing, target
    profile, lineage, and the sha256 and size of every other member.
``model.onnx`` or ``model.tflite``
    The model itself.
``selftest.npz``
    Self-test vectors: arrays ``in.<input name>`` and ``out.<output name>``.
``reference.json``
    A :class:`Reference`: the reference histograms used for drift monitoring.

A bundle is content-addressed by the sha256 of the whole file (:func:`file_sha256`).
Writing is deterministic: the same inputs give byte-identical files.

Reading is defensive. :func:`unpack` never writes outside its target folder, accepts
only the member names above as regular files, enforces byte limits while streaming,
and checks every member against the manifest's hashes, so a truncated, corrupt or
oversized file is refused with a :class:`~agent.errors.BundleError` that says what
was wrong and where.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import re
import tarfile
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from dataclasses import field as dc_field
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from agent.errors import BundleError, ManifestError, first_error
from agent.npz import load_npz_bounded

__all__ = [
    "BUNDLE_SCHEMA_VERSION",
    "BundleLimits",
    "TensorSpec",
    "Preprocessing",
    "Lineage",
    "MemberInfo",
    "Manifest",
    "FeatureReference",
    "PredictionReference",
    "Reference",
    "SelfTest",
    "Bundle",
    "SemVer",
    "write_bundle",
    "read_manifest",
    "unpack",
    "file_sha256",
]

BUNDLE_SCHEMA_VERSION: Literal[1] = 1

MANIFEST_NAME = "manifest.json"
SELFTEST_NAME = "selftest.npz"
# Self-test arrays once unpacked: a few rows of the model's inputs and outputs (8 rows of
# a 224x224x3 float image are 4.8 MB).
MAX_SELFTEST_UNPACKED = 64 << 20
REFERENCE_NAME = "reference.json"
MODEL_NAMES = {"onnx": "model.onnx", "tflite": "model.tflite"}
_ALLOWED_MEMBERS = {MANIFEST_NAME, SELFTEST_NAME, REFERENCE_NAME, *MODEL_NAMES.values()}

_SEMVER = re.compile(
    r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)"
    r"(?:-([0-9A-Za-z-]+(?:\.[0-9A-Za-z-]+)*))?(?:\+([0-9A-Za-z-.]+))?$"
)
_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")

DType = Literal[
    "bool", "uint8", "uint16", "uint32", "uint64", "int8", "int16", "int32", "int64",
    "float16", "float32", "float64", "string",
]


@dataclass(frozen=True)
class BundleLimits:
    """Byte limits enforced while reading a bundle."""

    max_bundle_bytes: int = 1 << 30
    max_model_bytes: int = 1 << 30
    max_manifest_bytes: int = 1 << 20
    max_selftest_bytes: int = 64 << 20
    max_reference_bytes: int = 8 << 20

    def for_member(self, name: str) -> int:
        if name == MANIFEST_NAME:
            return self.max_manifest_bytes
        if name == SELFTEST_NAME:
            return self.max_selftest_bytes
        if name == REFERENCE_NAME:
            return self.max_reference_bytes
        return self.max_model_bytes


@dataclass(frozen=True, order=True)
class SemVer:
    """A semantic version; ordering follows semver precedence (build metadata ignored)."""

    major: int
    minor: int
    patch: int
    # Releases sort after pre-releases: (1,) > (0, ...).
    pre_key: tuple[Any, ...]
    text: str = dc_field(default="", compare=False, repr=False)

    @classmethod
    def parse(cls, text: str) -> SemVer:
        m = _SEMVER.fullmatch(text)
        if not m:
            raise ValueError(f"{text!r} is not a semantic version (MAJOR.MINOR.PATCH)")
        pre = m.group(4)
        if pre is None:
            pre_key: tuple[Any, ...] = (1,)
        else:
            parts = tuple(
                (0, int(p), "") if p.isdigit() else (1, 0, p) for p in pre.split(".")
            )
            pre_key = (0, parts)
        return cls(int(m.group(1)), int(m.group(2)), int(m.group(3)), pre_key, text)

    def __str__(self) -> str:
        return self.text


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TensorSpec(_Strict):
    name: str = Field(min_length=1, max_length=128, description="Tensor name in the model graph.")
    dtype: DType = Field(description="Element type, numpy spelling.")
    shape: list[int] = Field(max_length=8, description="Dimensions; -1 marks a variable one.")

    @field_validator("shape")
    @classmethod
    def _dims(cls, v: list[int]) -> list[int]:
        if any(d < -1 or d == 0 for d in v):
            raise ValueError("dimensions must be positive or -1 (variable)")
        return v


class Preprocessing(_Strict):
    """What the application must do to raw inputs before calling the model."""

    layout: Literal["NCHW", "NHWC", "NC", "NLC", "any"] = "any"
    scale: float = Field(1.0, description="Multiply raw values by this first.")
    mean: list[float] = Field(default_factory=list, description="Per-channel mean to subtract.")
    std: list[float] = Field(default_factory=list, description="Per-channel std to divide by.")
    notes: str = Field("", max_length=2000)


class Lineage(_Strict):
    training_data_sha256: str | None = Field(None, description="sha256 of the training data.")
    hyperparameters: dict[str, Any] = Field(default_factory=dict)
    metrics: dict[str, float | None] = Field(default_factory=dict)
    code_version: str | None = None
    compiler_version: str | None = None
    libraries: dict[str, str] = Field(default_factory=dict)
    inputs: dict[str, str] = Field(
        default_factory=dict, description="sha256 of each compiler input (model, data)."
    )
    settings: dict[str, Any] = Field(default_factory=dict, description="Compiler settings.")


class MemberInfo(_Strict):
    sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
    size: int = Field(ge=0)


class Manifest(_Strict):
    """The bundle manifest. Every field is checked when a bundle is read."""

    schema_version: Literal[1] = BUNDLE_SCHEMA_VERSION
    name: str = Field(description="Model name: lowercase letters, digits, '_', '.', '-'.")
    version: str = Field(description="Semantic version of the model.")
    format: Literal["onnx", "tflite"]
    precision: str = Field(max_length=32, description="e.g. fp32, int8-qdq, fp16.")
    runtime: Literal["onnxruntime", "litert"]
    min_runtime_version: str = Field(max_length=32)
    profile: str = Field(min_length=1, max_length=64, description="Target firmware profile.")
    inputs: list[TensorSpec] = Field(min_length=1, max_length=64)
    outputs: list[TensorSpec] = Field(min_length=1, max_length=64)
    preprocessing: Preprocessing = Field(default_factory=Preprocessing)
    task: Literal["classification", "regression", "embedding"] = "classification"
    labels: list[str] = Field(default_factory=list, max_length=100_000)
    selftest_tolerance: float = Field(1e-4, ge=0, description="Max abs difference allowed.")
    lineage: Lineage = Field(default_factory=Lineage)
    members: dict[str, MemberInfo] = Field(
        description="sha256 and size of every member other than the manifest."
    )

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _NAME.fullmatch(v):
            raise ValueError("must match [a-z0-9][a-z0-9_.-]{0,63}")
        return v

    @field_validator("version")
    @classmethod
    def _version(cls, v: str) -> str:
        SemVer.parse(v)
        return v

    @field_validator("members")
    @classmethod
    def _members(cls, v: dict[str, MemberInfo]) -> dict[str, MemberInfo]:
        unknown = set(v) - (_ALLOWED_MEMBERS - {MANIFEST_NAME})
        if unknown:
            raise ValueError(f"unknown members {sorted(unknown)}")
        return v

    @property
    def model_file(self) -> str:
        return MODEL_NAMES[self.format]

    @property
    def semver(self) -> SemVer:
        return SemVer.parse(self.version)

    @property
    def ref(self) -> str:
        """``name:version``, how models are named everywhere else."""
        return f"{self.name}:{self.version}"


class FeatureReference(_Strict):
    """Reference distribution of one input feature (or summary feature of a tensor)."""

    name: str = Field(max_length=128)
    kind: Literal["numeric", "categorical"] = "numeric"
    edges: list[float] = Field(
        default_factory=list, max_length=1025, description="Bin edges; numeric only."
    )
    categories: list[str] = Field(default_factory=list, max_length=1024)
    counts: list[float] = Field(max_length=1025)
    low: float | None = Field(None, description="Lowest valid value (schema), if any.")
    high: float | None = Field(None, description="Highest valid value (schema), if any.")

    @model_validator(mode="after")
    def _bins(self) -> FeatureReference:
        _check_histogram(self.kind, self.edges, self.counts)
        return self


class PredictionReference(_Strict):
    kind: Literal["class", "numeric"] = "class"
    classes: list[str] = Field(default_factory=list, max_length=100_000)
    edges: list[float] = Field(default_factory=list, max_length=1025)
    counts: list[float] = Field(max_length=100_000)

    @model_validator(mode="after")
    def _bins(self) -> PredictionReference:
        _check_histogram(self.kind, self.edges, self.counts)
        return self


def _check_histogram(kind: str, edges: list[float], counts: list[float]) -> None:
    """A numeric histogram's edges increase (two or more, finite) with one count per
    bin; every count is finite and not negative. Devices bin live traffic with these
    edges (agent.features), so a reference that breaks this would fail on every batch."""
    if any(not math.isfinite(c) or c < 0 for c in counts):
        raise ValueError("counts must be finite and not negative")
    if kind != "numeric":
        return
    increasing = all(b > a for a, b in zip(edges, edges[1:], strict=False))
    if len(edges) < 2 or not all(math.isfinite(e) for e in edges) or not increasing:
        raise ValueError("edges must be two or more finite numbers, increasing")
    if len(counts) != len(edges) - 1:
        raise ValueError(f"{len(edges)} edges make {len(edges) - 1} bins, but there are {len(counts)} counts")


class Reference(_Strict):
    """Reference histograms shipped in a bundle; devices histogram with the same edges."""

    summary: Literal["elementwise", "per_channel_mean_std", "flat_mean_std"] = Field(
        "elementwise",
        description="How device inputs map to features: raw elements, or summary features.",
    )
    features: list[FeatureReference] = Field(default_factory=list, max_length=4096)
    predictions: PredictionReference | None = None
    rows: int = Field(0, ge=0, description="How many reference rows built these histograms.")


@dataclass(frozen=True)
class SelfTest:
    inputs: dict[str, np.ndarray]
    outputs: dict[str, np.ndarray]
    tolerance: float


@dataclass(frozen=True)
class Bundle:
    """A bundle unpacked and checked on disk."""

    root: Path
    manifest: Manifest
    sha256: str

    @property
    def model_path(self) -> Path:
        return self.root / self.manifest.model_file

    def selftest(self) -> SelfTest:
        return _load_selftest((self.root / SELFTEST_NAME).read_bytes(), self.manifest)

    def reference(self) -> Reference:
        return _parse_reference((self.root / REFERENCE_NAME).read_bytes())


# --------------------------------------------------------------------------- writing


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mode = 0o644
    info.mtime = 0
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.type = tarfile.REGTYPE
    return info


def _npz_bytes(arrays: Mapping[str, np.ndarray]) -> bytes:
    # np.savez stamps zip entries with the current time; build the zip ourselves so the
    # bytes depend only on the arrays.
    import zipfile

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
        for key in sorted(arrays):
            arr_buf = io.BytesIO()
            np.lib.format.write_array(arr_buf, np.ascontiguousarray(arrays[key]), allow_pickle=False)
            zi = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            zf.writestr(zi, arr_buf.getvalue())
    return buf.getvalue()


def _canonical_json(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def write_bundle(
    out: Path,
    *,
    manifest: Mapping[str, Any],
    model: bytes,
    selftest_inputs: Mapping[str, np.ndarray],
    selftest_outputs: Mapping[str, np.ndarray],
    reference: Reference,
) -> tuple[Manifest, str]:
    """Write a bundle to ``out`` atomically and deterministically.

    ``manifest`` holds every :class:`Manifest` field except ``members``, which is
    computed here. Returns the validated manifest and the bundle's sha256.

    Raises:
        ManifestError: the manifest fields do not validate.
    """
    st = {f"in.{k}": np.asarray(v) for k, v in selftest_inputs.items()}
    st.update({f"out.{k}": np.asarray(v) for k, v in selftest_outputs.items()})
    members: dict[str, bytes] = {
        SELFTEST_NAME: _npz_bytes(st),
        REFERENCE_NAME: _canonical_json(reference.model_dump(mode="json")),
    }
    fields = dict(manifest)
    fmt = fields.get("format")
    if fmt not in MODEL_NAMES:
        raise ManifestError(f"manifest: format must be one of {sorted(MODEL_NAMES)}, got {fmt!r}")
    members[MODEL_NAMES[fmt]] = model
    fields["members"] = {
        name: {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
        for name, data in members.items()
    }
    try:
        man = Manifest.model_validate(fields)
    except ValidationError as e:
        raise ManifestError(f"manifest: {first_error(e)}") from e
    missing = {i.name for i in man.inputs} - set(selftest_inputs)
    if missing:
        raise ManifestError(f"self-test vectors lack inputs {sorted(missing)}")

    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            with tarfile.open(fileobj=fh, mode="w", format=tarfile.PAX_FORMAT) as tf:
                ordered = [(MANIFEST_NAME, _canonical_json(man.model_dump(mode="json")))]
                ordered += [(MODEL_NAMES[fmt], model), (SELFTEST_NAME, members[SELFTEST_NAME])]
                ordered += [(REFERENCE_NAME, members[REFERENCE_NAME])]
                for name, data in ordered:
                    tf.addfile(_tarinfo(name, len(data)), io.BytesIO(data))
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; bundles are not secret
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return man, file_sha256(out)


# --------------------------------------------------------------------------- reading


def file_sha256(path: Path, *, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def _parse_manifest(data: bytes, where: str) -> Manifest:
    try:
        return Manifest.model_validate_json(data)
    except ValidationError as e:
        raise ManifestError(f"{where}: manifest.json: {first_error(e)}") from e


def _parse_reference(data: bytes) -> Reference:
    try:
        return Reference.model_validate_json(data)
    except ValidationError as e:
        raise BundleError(f"reference.json: {first_error(e)}") from e


def _load_selftest(data: bytes, manifest: Manifest) -> SelfTest:
    try:
        arrays = load_npz_bounded(data, MAX_SELFTEST_UNPACKED)
    except ValueError as e:
        raise BundleError(f"selftest.npz: {e}") from e
    inputs = {k[3:]: v for k, v in arrays.items() if k.startswith("in.")}
    outputs = {k[4:]: v for k, v in arrays.items() if k.startswith("out.")}
    missing = {t.name for t in manifest.inputs} - set(inputs)
    if missing:
        raise BundleError(f"selftest.npz: missing inputs {sorted(missing)}")
    specs = {t.name: t for t in manifest.inputs}
    for kind, group in (("in", inputs), ("out", outputs)):
        for name, arr in group.items():
            where = f"selftest.npz: {kind}.{name}"
            if arr.dtype.kind not in "biuf":
                raise BundleError(f"{where} has dtype {arr.dtype}; numbers are needed")
            if arr.ndim == 0 or arr.shape[0] == 0:
                raise BundleError(f"{where} needs a row axis and at least one row, got shape {arr.shape}")
            spec = specs.get(name) if kind == "in" else None
            if spec is not None and spec.dtype != "string":
                if arr.dtype != np.dtype(spec.dtype):
                    raise BundleError(f"{where} is {arr.dtype}, the manifest says {spec.dtype}")
                if spec.shape and arr.ndim != len(spec.shape):
                    raise BundleError(f"{where} has shape {arr.shape}, the manifest's rank is {len(spec.shape)}")
    return SelfTest(inputs, outputs, manifest.selftest_tolerance)


def _open_tar(path: Path, limits: BundleLimits) -> tarfile.TarFile:
    try:
        size = path.stat().st_size
    except OSError as e:
        raise BundleError(f"{path}: cannot read ({e.strerror})") from e
    if size > limits.max_bundle_bytes:
        raise BundleError(f"{path}: {size} bytes exceeds the bundle limit {limits.max_bundle_bytes}")
    try:
        return tarfile.open(path, mode="r:")
    except (tarfile.TarError, OSError, EOFError) as e:
        raise BundleError(f"{path}: not a bundle (tar) file: {e}") from e


def _check_member(path: Path, m: tarfile.TarInfo, limits: BundleLimits) -> None:
    if m.name not in _ALLOWED_MEMBERS:
        # Catches '../x', '/etc/x', 'a/b' and any name we did not write.
        raise BundleError(f"{path}: unexpected member {m.name!r}")
    if not m.isreg():
        raise BundleError(f"{path}: member {m.name!r} is not a regular file (links are refused)")
    if m.issparse():  # unpacks to its declared size, not its bytes in the archive
        raise BundleError(f"{path}: member {m.name!r} is a sparse file (refused: bundles hold plain files)")
    limit = limits.for_member(m.name)
    if m.size > limit:
        raise BundleError(f"{path}: member {m.name!r} is {m.size} bytes, over the limit {limit}")


def _iter_members(path: Path, limits: BundleLimits):
    """Yield (TarInfo, file object) for each member after checking name, type and size."""
    tf = _open_tar(path, limits)
    seen: set[str] = set()
    try:
        while True:
            try:
                m = tf.next()
            except (tarfile.TarError, OSError, EOFError) as e:
                raise BundleError(f"{path}: corrupt or truncated archive: {e}") from e
            if m is None:
                break
            _check_member(path, m, limits)
            if m.name in seen:
                raise BundleError(f"{path}: duplicate member {m.name!r}")
            seen.add(m.name)
            fh = tf.extractfile(m)
            if fh is None:  # pragma: no cover - isreg() members always have data
                raise BundleError(f"{path}: member {m.name!r} has no data")
            yield m, fh
    finally:
        tf.close()


def _read_member(path: Path, m: tarfile.TarInfo, fh: Any) -> bytes:
    try:
        data = fh.read(m.size + 1)
    except (tarfile.TarError, OSError, EOFError) as e:
        raise BundleError(f"{path}: member {m.name!r} is truncated: {e}") from e
    if len(data) != m.size:
        raise BundleError(f"{path}: member {m.name!r} is truncated ({len(data)} of {m.size} bytes)")
    return data


def read_manifest(path: Path, limits: BundleLimits = BundleLimits()) -> Manifest:
    """Read and validate only the manifest of a bundle file.

    Raises:
        BundleError: the file is not a bundle, or the first member is not the manifest.
        ManifestError: the manifest does not validate.
    """
    for m, fh in _iter_members(path, limits):
        if m.name != MANIFEST_NAME:
            raise BundleError(f"{path}: first member must be {MANIFEST_NAME}, found {m.name!r}")
        return _parse_manifest(_read_member(path, m, fh), str(path))
    raise BundleError(f"{path}: empty archive")


def unpack(path: Path, dest: Path, limits: BundleLimits = BundleLimits()) -> Bundle:
    """Unpack and verify a bundle file into the empty or new folder ``dest``.

    Every member is streamed to disk under a byte limit and hashed on the way; all
    must match the manifest. On any failure ``dest`` is left without a manifest, so
    a half-unpacked folder is never mistaken for a bundle.

    Raises:
        BundleError: truncated, corrupt, oversized, unsafe or inconsistent bundle.
        ManifestError: the manifest does not validate.
    """
    dest.mkdir(parents=True, exist_ok=True)
    if any(dest.iterdir()):
        raise BundleError(f"{dest}: unpack target is not empty")
    manifest: Manifest | None = None
    got: dict[str, MemberInfo] = {}
    manifest_bytes = b""
    for m, fh in _iter_members(path, limits):
        if manifest is None:
            if m.name != MANIFEST_NAME:
                raise BundleError(f"{path}: first member must be {MANIFEST_NAME}, found {m.name!r}")
            manifest_bytes = _read_member(path, m, fh)
            manifest = _parse_manifest(manifest_bytes, str(path))
            continue
        want = manifest.members.get(m.name)
        if want is None:
            raise BundleError(f"{path}: member {m.name!r} is not listed in the manifest")
        h = hashlib.sha256()
        n = 0
        target = dest / m.name  # m.name is one of a fixed set of plain names
        with open(target, "wb") as out:
            while True:
                try:
                    block = fh.read(1 << 20)
                except (tarfile.TarError, OSError, EOFError) as e:
                    raise BundleError(f"{path}: member {m.name!r} is truncated: {e}") from e
                if not block:
                    break
                n += len(block)
                if n > m.size:
                    raise BundleError(f"{path}: member {m.name!r} is longer than its header")
                h.update(block)
                out.write(block)
        if n != m.size:
            raise BundleError(f"{path}: member {m.name!r} is truncated ({n} of {m.size} bytes)")
        got[m.name] = MemberInfo(sha256=h.hexdigest(), size=n)
        if got[m.name] != want:
            raise BundleError(f"{path}: member {m.name!r} does not match its manifest sha256/size")
    if manifest is None:
        raise BundleError(f"{path}: empty archive")
    missing = set(manifest.members) - set(got)
    if missing:
        raise BundleError(f"{path}: missing members {sorted(missing)}")
    if manifest.model_file not in got:
        raise BundleError(f"{path}: no {manifest.model_file} for format {manifest.format!r}")
    for required in (SELFTEST_NAME, REFERENCE_NAME):
        if required not in got:
            raise BundleError(f"{path}: no {required} (every bundle carries its self-test data and drift reference)")
    # Parse the small members now so a bad bundle fails here, not at install time.
    _parse_reference((dest / REFERENCE_NAME).read_bytes())
    _load_selftest((dest / SELFTEST_NAME).read_bytes(), manifest)
    # The manifest is written last: its presence marks a complete unpack.
    (dest / MANIFEST_NAME).write_bytes(manifest_bytes)
    return Bundle(dest, manifest, file_sha256(path))


def open_unpacked(root: Path) -> Bundle:
    """Open a folder previously produced by :func:`unpack` (trusting its contents)."""
    manifest = _parse_manifest((root / MANIFEST_NAME).read_bytes(), str(root))
    sha = (root / ".sha256").read_text().strip() if (root / ".sha256").exists() else ""
    return Bundle(root, manifest, sha)
