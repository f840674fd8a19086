"""``edgefleet compile`` as a library: build, measure, bundle and select candidates.

The flow for one compile:

1. load the data files and the model, and check that they fit each other;
2. plan candidates per profile (ONNX fp32 / static int8 with the accuracy-aware
   fallback of :mod:`compiler.accuracy_tuning` / dynamic int8 / fp16, TFLite
   fp32 / int8 through pt2e, and with ``--train`` structured pruning, a distilled
   student and unstructured pruning), building each distinct model once even when
   several profiles share it;
3. evaluate each on the eval set and on the self-test rows (1 thread, so the bytes
   written into bundles do not depend on this host's thread scheduling), and check
   TFLite int8 against ONNX int8 (argmax agreement >= 99%);
4. time every distinct (model, thread count) at batch 1, interleaved across runtimes;
5. decide per profile with :func:`compiler.selection.select`;
6. write one bundle per (profile, candidate) with :func:`agent.bundle.write_bundle`,
   recording the decision as ``lineage.settings["selected"]``, and ``report.json``.

Bundles hold nothing measured on the host except that decision (latency goes to the
report only): the same inputs, seed and selection give byte-identical bundles.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import logging
import math
import os
import platform
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from agent.bundle import write_bundle
from agent.features import build_reference
from agent.profiles import Profile
from compiler.accuracy_tuning import TuningTarget, tune_static_qdq
from compiler.compatibility import lowest_ir_version, onnx_blockers
from compiler.datasets import Dataset, check_input_shape, load_npz
from compiler.errors import CompilerInputError, DataFileError, TechniqueError
from compiler.measure import (
    LatencySettings,
    host_threads,
    measure_against,
    ort_session,
    run_batched,
)
from compiler.metrics import Metric, evaluate_metric, score
from compiler.model_source import (
    OPSET,
    OnnxModel,
    is_factory_spec,
    load_factory_model,
    load_model,
    with_dynamic_batch,
)
from compiler.quantize import (
    FP16_MAX,
    CalibrationMethodName,
    StaticQuantSettings,
    convert_fp16,
    fp16_overflows,
    quantize_dynamic_int8,
    run_fp16_storage,
    static_settings_for,
)
from compiler.report import CandidateRecord, CompileReport, ProfileSummary
from compiler.selection import Measured, select

log = logging.getLogger(__name__)

__all__ = [
    "AGREEMENT_MIN",
    "CompileOptions",
    "CompileProgress",
    "TrainSettings",
    "compile_model",
    "host_info",
    "SELFTEST_ROWS",
]

SELFTEST_ROWS = 8
# TFLite int8 must give the same argmax as ONNX int8 on at least this share of rows.
AGREEMENT_MIN = 0.99


class CompileProgress(Protocol):
    """Where the pipeline reports progress (the CLI draws it with rich)."""

    def begin(self, total: int) -> None: ...

    def advance(self, description: str) -> None: ...


class _NoProgress:
    def begin(self, total: int) -> None:
        pass

    def advance(self, description: str) -> None:
        pass


@dataclass(frozen=True)
class TrainSettings:
    """``--train``: labelled data enabling pruning and distillation candidates."""

    path: Path
    prune_ratio: float = 0.5
    prune_epochs: int = 5
    # The student's width multiplier; None derives the largest width whose student has
    # at most 1/student_size_ratio of the teacher's parameters.
    student_width: float | None = None
    student_size_ratio: float = 4.0
    distill_epochs: int = 15
    temperature: float = 4.0
    alpha: float = 0.7
    sparsity: float = 0.5


@dataclass(frozen=True)
class CompileOptions:
    name: str = "model"
    version: str = "0.1.0"
    seed: int = 0
    latency: LatencySettings = field(default_factory=LatencySettings)
    calibrate_method: CalibrationMethodName = "minmax"
    metric: Metric = field(default_factory=lambda: Metric("accuracy"))
    dynamic_int8: bool = True
    tflite: bool = True
    fp16: bool = True
    train: TrainSettings | None = None
    state_dict: Path | None = None  # with a ``module:factory`` model
    # Tolerable metric drop for static int8 (accuracy-aware fallback) and selection;
    # None: each profile's limits.max_accuracy_drop.
    max_accuracy_drop: float | None = None


@dataclass
class _Artifact:
    """A candidate model, built once and shared by every profile that wants it."""

    key: str
    format: str
    precision: str
    technique: str
    runtime: str
    build: Callable[[], tuple[bytes, list[str]]]
    settings: dict[str, Any]
    tag: str = ""  # bundle-name suffix; the precision when empty
    model: bytes | None = None
    notes: list[str] = field(default_factory=list)
    error: str | None = None
    blockers: list[str] = field(default_factory=list)
    selftest_in: np.ndarray | None = None
    selftest_out: dict[str, np.ndarray] = field(default_factory=dict)
    input_name: str = ""
    input_shape: list[int] = field(default_factory=list)
    output_shapes: dict[str, list[int]] = field(default_factory=dict)
    eval_logits: np.ndarray | None = None
    metrics: dict[str, float | None] = field(default_factory=dict)
    agreement: float | None = None
    agreement_onnx_int8: float | None = None
    # A TFLite int8 artifact: the ONNX int8 model of the same weights it must agree with.
    int8_reference: _Artifact | None = None
    excluded_nodes: list[dict[str, Any]] = field(default_factory=list)

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.model or b"").hexdigest()

    @property
    def label(self) -> str:
        return self.tag or self.precision


def host_info() -> dict[str, Any]:
    """CPU model, VNNI flag and core count of this host, for the report."""
    model_name, flags = platform.processor() or "unknown", ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model_name in ("unknown", "x86_64", ""):
                model_name = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = line.split(":", 1)[1]
    except OSError:
        pass
    fl = set(flags.split())
    import onnxruntime

    return {
        "cpu": model_name,
        "machine": platform.machine(),
        "cores": os.cpu_count(),
        "vnni": bool({"avx512_vnni", "avx_vnni"} & fl),
        "onnxruntime": onnxruntime.__version__,
    }


def _libraries() -> dict[str, str]:
    out = {}
    for dist in (
        "edgefleet", "torch", "onnx", "onnxruntime", "onnxscript", "numpy",
        "litert-torch", "ai-edge-litert", "torch-pruning",
    ):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


def _edgefleet_version() -> str:
    try:
        return importlib.metadata.version("edgefleet")
    except importlib.metadata.PackageNotFoundError:
        from agent import __version__

        return __version__


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    try:
        import torch

        torch.manual_seed(seed)
    except ImportError:  # pragma: no cover - torch is part of the compiler extra
        pass


def _layout(rank: int) -> str:
    return {4: "NCHW", 3: "NLC", 2: "NC"}.get(rank, "any")


def _labels(eval_data: Dataset | None, n_out: int) -> list[str]:
    if eval_data is None or eval_data.y is None or eval_data.y.ndim != 1:
        return []
    if eval_data.y.dtype.kind not in "iu":
        return []
    return [str(i) for i in range(n_out)]


def _onnx_opset(model: bytes) -> int | None:
    """The default-domain opset an ONNX model imports (an ONNX input keeps its own;
    only torch exports are made at ``OPSET``)."""
    import onnx

    proto = onnx.load_model_from_string(model)
    return next((int(o.version) for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)


def _check_labels_fit_metric(data: Dataset, role: str, metric: Metric) -> None:
    """Refuse labels the metric cannot use, before anything is built (one-hot or float
    labels with accuracy would otherwise leave every candidate unmeasured)."""
    y = data.y
    if y is None or not metric.needs_class_labels:
        return
    if y.ndim != 1 or y.dtype.kind not in "iu":
        raise DataFileError(
            f"{role} data {data.path}: metric {metric.name} needs 'y' as 1-D integer class labels, "
            f"got shape {tuple(y.shape)} of {y.dtype} (for one-hot labels save y.argmax(1); for "
            "regression targets use --metric mse or cosine)"
        )


def _check_classifier_output(shape: Sequence[Any], metric: Metric, data: Dataset) -> None:
    """Without class labels, ``metric`` falls back to top-1 agreement with fp32, which
    needs (rows, classes) outputs with two classes or more; refuse anything else rather
    than check nothing (a (rows,) output has no argmax, a (rows, 1) one agrees always).
    An unknown rank or class dimension passes here and is checked on the fp32 outputs."""
    dims = list(shape)
    if not dims or (len(dims) >= 2 and (not isinstance(dims[-1], int) or dims[-1] > 1)):
        return  # unknown rank, or a classifier; an unknown one is checked on fp32's outputs
    raise CompilerInputError(
        f"metric {metric.name} needs class labels 'y' in {data.path}, or a classifier output to compare "
        f"with the fp32 model's top-1; this model's output has shape {_shape_text(dims)}. Give labels, "
        "or use --metric mse or cosine (fidelity to the fp32 outputs)"
    )


def _shape_text(dims: list[Any]) -> str:
    parts = [str(d) if isinstance(d, int) and d >= 0 else "N" for d in dims]
    return "(" + ", ".join(parts) + ("," if len(parts) == 1 else "") + ")"


def _selection_metric(art: _Artifact, metric: Metric, by_agreement: bool) -> float | None:
    """What selection compares (higher is better): the metric, or without class labels
    the top-1 agreement with the fp32 model (1 for the fp32 model itself)."""
    value = score(metric, art.metrics.get(metric.name))
    if value is None and by_agreement:
        return 1.0 if art.key == "onnx-fp32" else art.agreement
    return value


def _check_labels(eval_data: Dataset | None, n_out: int) -> None:
    if eval_data is None or eval_data.y is None or eval_data.y.dtype.kind not in "iu":
        return
    if eval_data.y.ndim == 1 and len(eval_data.y) and (
        eval_data.y.min() < 0 or eval_data.y.max() >= n_out
    ):
        raise DataFileError(
            f"eval data {eval_data.path}: labels 'y' range over "
            f"{int(eval_data.y.min())}..{int(eval_data.y.max())}, but the model has "
            f"{n_out} output classes"
        )


def _selftest_tolerance(precision: str, outputs: dict[str, np.ndarray]) -> float:
    """Self-test tolerance: tight for float, a few quantization steps for int8.

    fp32 gets 1e-4 (scaled up for large outputs, as float sums differ by kernel).
    An 8-bit output has steps of about range/255 (0.8% of its magnitude), and a
    device's integer kernels may round intermediate layers differently from this
    host, so int8 allows 1% of the output magnitude (at least 1e-2).
    """
    mag = max((float(np.abs(v).max()) for v in outputs.values() if v.size), default=1.0)
    if precision.startswith("fp32"):
        return max(1e-4, 1e-5 * mag)
    if precision.startswith("fp16"):
        return max(1e-2, 2e-3 * mag)
    return max(1e-2, 1e-2 * mag)


def _settings_key(prefix: str, qs: StaticQuantSettings) -> str:
    return prefix + hashlib.sha256(repr(sorted(qs.as_dict().items())).encode()).hexdigest()[:12]


def _module_to_onnx(module: Any, example: np.ndarray) -> bytes:
    """Export a (pruned/distilled) torch module like a ``.pt2`` input."""
    import torch

    from compiler.model_source import _quiet_exporter, pt2_to_onnx

    x = torch.from_numpy(np.ascontiguousarray(example[:2]))
    if x.shape[0] < 2:
        x = x.repeat(2, *([1] * (x.dim() - 1)))
    try:
        with _quiet_exporter():
            ep = torch.export.export(
                module.eval(), (x,), dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=65536)},)
            )
    except Exception as e:  # noqa: BLE001 - torch.export raises many types
        raise TechniqueError(f"exporting the optimised module failed: {e}") from e
    try:
        return pt2_to_onnx(ep, np.asarray(example)).SerializeToString(deterministic=True)
    except CompilerInputError as e:
        raise TechniqueError(str(e)) from e


# What a pt2e int8 TFLite artifact records of its quantization (compiler.tflite.convert_int8_pt2e).
_PT2E_SETTINGS: dict[str, Any] = {
    "quantizer": "pt2e PT2EQuantizer", "per_channel": True, "symmetric": True,
    "activation_observer": "histogram", "io": "int8",
}


class _Planner:
    """Which artifacts each profile gets; distinct artifacts are shared through ``cache``."""

    def __init__(
        self, model: OnnxModel, calib: Dataset, eval_data: Dataset | None,
        train: Dataset | None, options: CompileOptions,
    ) -> None:
        self.model = model
        self.calib = calib
        self.eval = eval_data
        self.train = train
        self.options = options
        self.cache: dict[str, _Artifact] = {}
        self._torch_module: Any = None
        self._trained_modules: dict[str, tuple[Any, ...]] = {}
        self._tflite_fp32_model: tuple[bytes, list[str]] | None = None

    def _get(self, art: _Artifact) -> _Artifact:
        return self.cache.setdefault(art.key, art)

    def torch_module(self) -> Any:
        if self._torch_module is None:
            self._torch_module = self.model.torch_module()
        return self._torch_module

    def target(self, profile: Profile) -> TuningTarget:
        drop = self.options.max_accuracy_drop
        return TuningTarget(
            max_drop=profile.limits.max_accuracy_drop if drop is None else drop,
            floor=profile.limits.accuracy_floor,
        )

    def onnx_static(self, qs: StaticQuantSettings, target: TuningTarget) -> _Artifact:
        """Static QDQ int8 with the accuracy-aware fallback (:mod:`compiler.accuracy_tuning`).

        Per-tensor weights are tagged ``int8-pertensor`` (bundle name), so that a profile
        can carry both granularities.
        """
        key = _settings_key("onnx-int8-", qs) + f"-{target.max_drop}-{target.floor}"
        if key in self.cache:
            return self.cache[key]
        art = _Artifact(
            key=key,
            format="onnx",
            precision="int8",
            technique="static-qdq" if qs.per_channel else "static-qdq-per-tensor",
            runtime="onnxruntime",
            build=functools.partial(self._build_static, key, qs, target),
            tag="" if qs.per_channel else "int8-pertensor",
            settings={"opset": OPSET, "calibration_rows": self.calib.rows, **qs.as_dict()},
        )
        return self._get(art)

    def _build_static(
        self, key: str, qs: StaticQuantSettings, target: TuningTarget
    ) -> tuple[bytes, list[str]]:
        """Build the ``key`` artifact; record the tuning outcome on it."""
        return self._tuned(self.cache[key], self.model.data, qs, target, "onnx-fp32")

    def _tuned(
        self, art: _Artifact, data: bytes, qs: StaticQuantSettings, target: TuningTarget, fp32_key: str
    ) -> tuple[bytes, list[str]]:
        """Static QDQ int8 of the fp32 ONNX ``data`` with the accuracy-aware fallback,
        measured against the outputs of its fp32 artifact ``fp32_key`` (built and
        evaluated on the eval set before any int8 one); the tuning outcome is recorded
        on ``art``."""
        ev = self.eval if self.eval is not None else self.calib
        fp32 = self.cache.get(fp32_key)
        known = fp32.eval_logits if fp32 is not None and self.eval is not None else None
        result, notes = tune_static_qdq(data, self.model.input.name, self.calib.x, qs, ev.x, ev.y,
                                        self.options.metric, target, fp32_out=known)
        art.excluded_nodes = [e.as_dict() for e in result.excluded]
        art.settings["exclude_nodes"] = [e.node for e in result.excluded]
        art.settings["accuracy_tuning"] = result.as_dict(target)
        return result.model, notes + result.notes(target)

    def onnx(self, profile: Profile) -> list[_Artifact]:
        m, opts = self.model, self.options
        out = [
            self._get(
                _Artifact(
                    key="onnx-fp32",
                    format="onnx",
                    precision="fp32",
                    technique="baseline",
                    runtime="onnxruntime",
                    build=lambda: (m.data, []),
                    settings={"opset": OPSET, "source": m.source_kind},
                )
            )
        ]
        int8 = bool({"int8", "uint8"} & set(profile.dtypes))
        if int8:
            qs = static_settings_for(profile, opts.calibrate_method)
            out.append(self.onnx_static(qs, self.target(profile)))
            # Per-tensor weights too: at batch 1 ONNX Runtime's QGemm runs them faster than
            # per-channel (measured: digits MLP 2.0-2.1x vs 1.8x fp32 on a VNNI host), at
            # a possible accuracy cost; selection measures both (docs/compiler.md).
            out.append(self.onnx_static(replace(qs, per_channel=False), self.target(profile)))
        if opts.dynamic_int8 and int8:
            # Dynamic int8 is a candidate everywhere int8 is; selection keeps it only
            # when it measures faster than fp32 (it is usually slower for convolutions).
            out.append(
                self._get(
                    _Artifact(
                        key="onnx-int8-dynamic",
                        format="onnx",
                        precision="int8-dynamic",
                        technique="dynamic-int8",
                        runtime="onnxruntime",
                        build=lambda: quantize_dynamic_int8(m.data),
                        settings={"opset": OPSET, "weight_type": "int8", "activations": "uint8 at run time"},
                    )
                )
            )
        if opts.fp16 and ("fp16" in profile.dtypes or profile.hardware.fp16):
            out.append(
                self._get(
                    _Artifact(
                        key="onnx-fp16",
                        format="onnx",
                        precision="fp16",
                        technique="fp16",
                        runtime="onnxruntime",
                        build=self._build_fp16,
                        settings={"opset": OPSET, "keep_io_types": True},
                    )
                )
            )
        if self.train is not None and self.model.module is not None:
            out += self._trained(profile)
        return out

    def _build_fp16(self) -> tuple[bytes, list[str]]:
        """fp16 ONNX, blocked when an activation on the calibration rows is beyond fp16's
        range (:func:`compiler.quantize.fp16_overflows`)."""
        data, notes = convert_fp16(self.model.data)
        over = fp16_overflows(self.model.data, self.model.input.name, self.calib.x)
        if over:
            shown = ", ".join(over[:3]) + (f" and {len(over) - 3} more" if len(over) > 3 else "")
            self.cache["onnx-fp16"].blockers.append(
                f"activations overflow fp16 (beyond {FP16_MAX:g}) on the calibration rows: {shown}; "
                "this host computes fp16 in fp32 and cannot show it"
            )
        return data, notes

    def _tflite_fp32(self) -> tuple[bytes, list[str]]:
        """The fp32 .tflite of the source model, converted once per compile."""
        if self._tflite_fp32_model is None:
            from compiler import tflite

            self._tflite_fp32_model = tflite.convert_fp32(self.torch_module(), self.calib.x)
        return self._tflite_fp32_model

    def _pruned_module(self) -> tuple[Any, list[str]]:
        """The teacher with its channels pruned and fine-tuned (trained once, shared by
        the ONNX and TFLite candidates)."""
        if "pruned" not in self._trained_modules:
            import torch

            from compiler import pruning

            ts, train = self.options.train, self.train
            assert ts is not None and train is not None and train.y is not None
            teacher = self.torch_module()
            small = pruning.prune_channels(
                teacher, torch.from_numpy(self.calib.x[:2]), ts.prune_ratio, train.x, train.y,
                epochs=ts.prune_epochs, seed=self.options.seed,
            )
            note = f"parameters {pruning.parameter_count(teacher)} -> {pruning.parameter_count(small)}"
            self._trained_modules["pruned"] = (small, [note])
        return self._trained_modules["pruned"]

    def _student_module(self) -> tuple[Any, list[str], dict[str, Any]]:
        """The distilled width-scaled student, its notes and the settings it was derived
        with (trained once, shared by the ONNX and TFLite candidates)."""
        if "student" not in self._trained_modules:
            import torch

            from compiler import pruning

            ts, train = self.options.train, self.train
            assert ts is not None and train is not None and train.y is not None
            teacher = self.torch_module()
            ex = torch.from_numpy(self.calib.x[:2])
            notes = []
            width = ts.student_width
            if width is None:
                width, _ = pruning.student_width_for_ratio(teacher, ex, ts.student_size_ratio)
                notes.append(
                    f"width {width:.2f}: the largest (0.01 steps) with >= "
                    f"{ts.student_size_ratio:g}x fewer parameters than the teacher"
                )
            st = pruning.width_scaled_student(
                teacher, ex, width, train.x, train.y,
                epochs=ts.distill_epochs, seed=self.options.seed, temperature=ts.temperature, alpha=ts.alpha,
            )
            n_t, n_s = pruning.parameter_count(teacher), pruning.parameter_count(st)
            notes.append(f"parameters {n_t} -> {n_s} ({n_t / n_s:.2f}x fewer)")
            derived = {"width": width, "size_ratio_goal": ts.student_size_ratio,
                       "parameter_ratio": round(n_t / n_s, 4)}
            self._trained_modules["student"] = (st, notes, derived)
        return self._trained_modules["student"]  # type: ignore[return-value]

    def _trained_onnx(self, which: str) -> bytes:
        """The ONNX export of the pruned model (``"pruned"``) or the student, once."""
        key = f"{which}-onnx"
        if key not in self._trained_modules:
            module = self._pruned_module()[0] if which == "pruned" else self._student_module()[0]
            self._trained_modules[key] = (_module_to_onnx(module, self.calib.x),)
        return self._trained_modules[key][0]  # type: ignore[no-any-return]

    def _trained_int8(self, which: str, qs: StaticQuantSettings, target: TuningTarget) -> _Artifact:
        """Static QDQ int8 of the pruned model or the student, with the accuracy-aware
        fallback against that model's own fp32 (selection then judges it against the
        source model's fp32, as every candidate)."""
        ts = self.options.train
        assert ts is not None
        key = _settings_key(f"onnx-{which}-int8-", qs) + f"-{target.max_drop}-{target.floor}"
        if key in self.cache:
            return self.cache[key]
        pct = int(round(ts.prune_ratio * 100))
        cfg = self._trained_settings()

        def build() -> tuple[bytes, list[str]]:
            # Exported like the source model, with its input name (_tuned and _evaluate rely on it).
            model, notes = self._tuned(art, self._trained_onnx(which), qs, target, f"onnx-{which}")
            if which == "pruned":
                head = list(self._pruned_module()[1])
            else:
                _, head, derived = self._student_module()
                art.settings.update(derived)
                art.tag = f"int8-student{int(round(derived['width'] * 100))}"
            return model, [*head, *notes]

        art = _Artifact(
            key=key, format="onnx", precision="int8",
            technique="structured-pruning+int8" if which == "pruned" else "distillation+int8",
            runtime="onnxruntime", build=build,
            tag=f"int8-pruned{pct}" if which == "pruned" else "int8-student",
            settings={"opset": OPSET, **cfg["common"], **cfg[which], "calibration_rows": self.calib.rows,
                      **qs.as_dict()},
        )
        return self._get(art)

    def _trained_settings(self) -> dict[str, Any]:
        ts, train = self.options.train, self.train
        assert ts is not None and train is not None
        return {
            "common": {"train_rows": train.rows, "train_sha256": train.sha256},
            "pruned": {"ratio": ts.prune_ratio, "importance": "L2 magnitude", "fine_tune_epochs": ts.prune_epochs},
            "student": {"width": ts.student_width, "epochs": ts.distill_epochs,
                        "temperature": ts.temperature, "alpha": ts.alpha},
        }

    def _trained(self, profile: Profile) -> list[_Artifact]:
        from compiler import pruning

        ts = self.options.train
        assert ts is not None
        example = self.calib.x

        def pruned() -> tuple[bytes, list[str]]:
            return self._trained_onnx("pruned"), list(self._pruned_module()[1])

        cfg = self._trained_settings()
        common = {"opset": OPSET, **cfg["common"]}

        def student() -> tuple[bytes, list[str]]:
            # Records the derived width on its artifact (``student_art``, created below).
            _, notes, derived = self._student_module()
            student_art.settings.update(derived)
            student_art.tag = f"fp32-student{int(round(derived['width'] * 100))}"
            data = self._trained_onnx("student")
            return data, [*notes, f"ONNX file {len(self.model.data) / len(data):.2f}x smaller than the "
                          "fp32 teacher's"]

        student_art = _Artifact(
            key="onnx-student", format="onnx", precision="fp32", technique="distillation",
            runtime="onnxruntime", build=student, tag="fp32-student",
            settings={**common, **cfg["student"]},
        )

        def sparse() -> tuple[bytes, list[str]]:
            data = _module_to_onnx(pruning.magnitude_prune(self.torch_module(), ts.sparsity), example)
            dense = pruning.compressed_size(self.model.data)
            comp = pruning.compressed_size(data)
            return data, [
                f"zlib-compressed {comp} bytes vs fp32 {dense} ({dense / max(comp, 1):.2f}x smaller "
                "on the wire); dense runtimes run it exactly like fp32"
            ]

        pct = int(round(ts.prune_ratio * 100))
        out = [
            self._get(_Artifact(
                key="onnx-pruned", format="onnx", precision="fp32", technique="structured-pruning",
                runtime="onnxruntime", build=pruned, tag=f"fp32-pruned{pct}",
                settings={**common, **cfg["pruned"]},
            )),
            self._get(student_art),
            self._get(_Artifact(
                key="onnx-sparse", format="onnx", precision="fp32",
                technique="unstructured-pruning", runtime="onnxruntime", build=sparse,
                tag=f"fp32-sparse{int(round(ts.sparsity * 100))}",
                settings={**common, "sparsity": ts.sparsity, "fine_tune_epochs": 0},
            )),
        ]
        # After their fp32 artifacts, so that these are built (and evaluated) first.
        if {"int8", "uint8"} & set(profile.dtypes):
            qs = static_settings_for(profile, self.options.calibrate_method)
            out += [self._trained_int8("pruned", qs, self.target(profile)),
                    self._trained_int8("student", qs, self.target(profile))]
        return out

    def _trained_tflite(self, profile: Profile) -> list[_Artifact]:
        """The pruned model and the student as fp32 TFLite (litert-torch), and as
        full-integer int8 TFLite (pt2e) where the profile takes int8, for profiles that
        run LiteRT; the same trained modules as the ONNX candidates."""
        from compiler import tflite

        out = self._trained_tflite_pair("fp32", tflite.convert_fp32, {})
        if "int8" in profile.dtypes:
            int8 = self._trained_tflite_pair("int8", tflite.convert_int8_pt2e,
                                             {**_PT2E_SETTINGS, "calibration_rows": self.calib.rows})
            for art, which in zip(int8, ("pruned", "student"), strict=True):
                if art.int8_reference is None:
                    art.int8_reference = self._trained_int8(which, self._reference_settings(), self.target(profile))
            out += int8
        return out

    def _trained_tflite_pair(
        self, precision: str, convert: Callable[[Any, np.ndarray], tuple[bytes, list[str]]],
        extra: dict[str, Any],
    ) -> list[_Artifact]:
        """TFLite artifacts of the pruned model and the student, converted by ``convert``."""
        ts = self.options.train
        assert ts is not None
        calib_x = self.calib.x
        cfg = self._trained_settings()
        common = {"converter": "litert-torch", "batch": 1, **cfg["common"], **extra}
        suffix = "" if precision == "fp32" else f"-{precision}"
        plus = "" if precision == "fp32" else f"+{precision}"

        def pruned() -> tuple[bytes, list[str]]:
            small, notes = self._pruned_module()
            data, conv_notes = convert(small, calib_x)
            return data, [*notes, *conv_notes]

        def student() -> tuple[bytes, list[str]]:
            st, notes, derived = self._student_module()
            student_art.settings.update(derived)
            student_art.tag = f"{precision}-student{int(round(derived['width'] * 100))}"
            data, conv_notes = convert(st, calib_x)
            return data, [*notes, *conv_notes]

        student_art = _Artifact(
            key=f"tflite-student{suffix}", format="tflite", precision=precision, technique=f"distillation{plus}",
            runtime="litert", build=student, tag=f"{precision}-student",
            settings={**common, **cfg["student"]},
        )
        pct = int(round(ts.prune_ratio * 100))
        return [
            self._get(_Artifact(
                key=f"tflite-pruned{suffix}", format="tflite", precision=precision,
                technique=f"structured-pruning{plus}", runtime="litert", build=pruned,
                tag=f"{precision}-pruned{pct}", settings={**common, **cfg["pruned"]},
            )),
            self._get(student_art),
        ]

    def tflite(self, profile: Profile) -> list[_Artifact]:
        from compiler import tflite

        module = self.torch_module()
        calib = self.calib
        out = [
            self._get(_Artifact(
                key="tflite-fp32", format="tflite", precision="fp32", technique="baseline",
                runtime="litert", build=self._tflite_fp32,
                settings={"converter": "litert-torch", "batch": 1},
            ))
        ]
        if self.options.fp16 and ("fp16" in profile.dtypes or profile.hardware.fp16):
            def fp16() -> tuple[bytes, list[str]]:
                data, notes = self._tflite_fp32()
                half, more = tflite.convert_fp16_weights(data)
                return half, [*notes, *more]

            out.append(self._get(_Artifact(
                key="tflite-fp16", format="tflite", precision="fp16", technique="fp16",
                runtime="litert", build=fp16,
                settings={"converter": "litert-torch", "batch": 1,
                          "quantizer": "ai-edge-quantizer float casting", "weights": "fp16"},
            )))
        if "int8" in profile.dtypes:
            art = self._get(_Artifact(
                key="tflite-int8", format="tflite", precision="int8", technique="pt2e-static",
                runtime="litert", build=lambda: tflite.convert_int8_pt2e(module, calib.x),
                settings={"converter": "litert-torch", **_PT2E_SETTINGS, "calibration_rows": calib.rows,
                          "batch": 1},
            ))
            out.append(art)
            if art.int8_reference is None:  # shared when a profile builds the same settings anyway
                art.int8_reference = self.onnx_static(self._reference_settings(), self.target(profile))
        if self.train is not None and self.model.module is not None:
            out += self._trained_tflite(profile)
        return out

    def _reference_settings(self) -> StaticQuantSettings:
        """The ONNX int8 settings (s8s8, per-channel) TFLite int8 models are checked against."""
        return StaticQuantSettings("int8", calibrate_method=self.options.calibrate_method)


def _run(art: _Artifact, x: np.ndarray, threads: int = 1) -> list[np.ndarray]:
    assert art.model is not None
    if art.runtime == "litert":
        from compiler.tflite import LiteRtRunner

        return LiteRtRunner(art.model, threads).run(x)
    return run_batched(ort_session(art.model, threads), art.input_name, x)


def _evaluate(
    art: _Artifact,
    model: OnnxModel,
    calib: Dataset,
    eval_data: Dataset | None,
    fp32_logits: np.ndarray | None,
    metric: Metric,
) -> None:
    assert art.model is not None
    if art.runtime == "litert":
        from compiler.tflite import LiteRtRunner

        runner = LiteRtRunner(art.model, 1)
        art.input_name = runner.input_name
        names = runner.output_names
        rows = runner.fixed_batch or SELFTEST_ROWS
        art.input_shape = [runner.fixed_batch or -1, *model.input.spec_shape()[1:]]
        st_in = calib.x[:rows]
        st = runner.run(st_in)
    else:
        sess = ort_session(art.model, threads=1)
        art.input_name = model.input.name
        names = [o.name for o in sess.get_outputs()]
        art.input_shape = model.input.spec_shape()
        st_in = calib.x[:SELFTEST_ROWS]
        st = run_batched(sess, art.input_name, st_in)
    art.selftest_in = st_in
    art.selftest_out = dict(zip(names, st, strict=True))
    fixed = art.input_shape[0] if art.input_shape and art.input_shape[0] > 0 else -1
    art.output_shapes = {n: [fixed, *list(v.shape[1:])] for n, v in art.selftest_out.items()}
    if art.runtime == "onnxruntime":
        art.output_shapes = {o.name: o.spec_shape() for o in model.outputs}
    if eval_data is None:
        return
    logits = _run(art, eval_data.x)[0]
    scores = _scores(art, logits, eval_data, fp32_logits, metric)
    if art.format == "onnx" and art.precision == "fp16":
        logits, scores = _fp16_storage_scores(art, model, eval_data, fp32_logits, metric, logits, scores)
    art.eval_logits = logits
    art.metrics.update(scores)
    pred = logits.argmax(axis=-1) if logits.ndim >= 2 else None
    for name, value in list(art.metrics.items()):
        if value is not None and not math.isfinite(value):
            art.metrics[name] = None  # NaN/inf outputs: not a measurement, and not JSON
            art.blockers.append(f"{name} is not a finite number on the eval rows (NaN or inf outputs)")
    if fp32_logits is not None and pred is not None and fp32_logits.ndim >= 2:
        art.agreement = float((pred == fp32_logits.argmax(axis=-1)).mean())


def _scores(
    art: _Artifact, logits: np.ndarray, eval_data: Dataset, fp32_logits: np.ndarray | None, metric: Metric
) -> dict[str, float | None]:
    """Accuracy (with class labels) and ``metric`` of ``logits`` on the eval rows."""
    out: dict[str, float | None] = {}
    y = eval_data.y
    pred = logits.argmax(axis=-1) if logits.ndim >= 2 else None
    if y is not None and y.dtype.kind in "iu" and y.ndim == 1 and pred is not None:
        out["accuracy"] = float((pred == y).mean())
    if metric.name != "accuracy":
        # Without labels, mse/cosine measure fidelity to fp32; the baseline is then
        # measured against itself (mse 0, cosine 1), so that candidates have a reference.
        reference = fp32_logits if fp32_logits is not None or art.key != "onnx-fp32" else logits
        out[metric.name] = evaluate_metric(metric, logits, y, reference)
    return out


def _fp16_storage_scores(
    art: _Artifact, model: OnnxModel, eval_data: Dataset, fp32_logits: np.ndarray | None, metric: Metric,
    logits: np.ndarray, scores: dict[str, float | None],
) -> tuple[np.ndarray, dict[str, float | None]]:
    """The fp16 candidate's eval logits and scores: those of the source model with fp16
    storage emulated (:func:`compiler.quantize.fp16_storage_model`) when they are worse
    than the host's run of the fp16 model, which keeps intermediates in fp32."""
    emulated = run_fp16_storage(model.data, model.input.name, eval_data.x)[0]
    em = _scores(art, emulated, eval_data, fp32_logits, metric)
    name, host, emu = metric.name, scores.get(metric.name), em.get(metric.name)
    higher = metric.higher_is_better
    if (host is None or emu is None) and fp32_logits is not None and fp32_logits.ndim >= 2 and logits.ndim >= 2:
        # No labels for the metric: compare the two by top-1 agreement with fp32.
        ref = fp32_logits.argmax(axis=-1)
        name, higher = "top-1 agreement with fp32", True
        host = float((logits.argmax(axis=-1) == ref).mean())
        emu = float((emulated.argmax(axis=-1) == ref).mean())
    if host is None or emu is None or not (math.isfinite(host) and math.isfinite(emu)):
        return logits, scores
    worse = emu < host if higher else emu > host
    how = "every weight and tensor rounded to fp16, fp32 arithmetic inside each operator"
    if worse:
        art.notes.append(f"{name} {emu:.4g} with fp16 storage emulated ({how}); the host's CPU "
                         f"provider, which keeps intermediates in fp32, measured {host:.4g}")
        return emulated, em
    art.notes.append(f"{name} with fp16 storage emulated ({how}): {emu:.4g}, no worse than the "
                     f"host's run ({host:.4g})")
    return logits, scores


def _check_tflite_int8(arts: Sequence[_Artifact], rows: np.ndarray) -> None:
    """Each TFLite int8 model must predict like the ONNX int8 model of the same weights
    (``int8_reference``; same argmax) on >= 99% of ``rows``."""
    for art in arts:
        if art.format != "tflite" or art.precision != "int8" or art.model is None or art.error:
            continue
        ref = art.int8_reference
        if ref is None or ref.model is None or ref.error:
            art.blockers.append("no ONNX int8 model to check TFLite int8 agreement against")
            continue
        a = _run(art, rows)[0]
        b = _run(ref, rows)[0]
        if a.ndim < 2:
            continue
        art.agreement_onnx_int8 = float((a.argmax(-1) == b.argmax(-1)).mean())
        if art.agreement_onnx_int8 < AGREEMENT_MIN:
            art.blockers.append(
                f"TFLite int8 agrees with ONNX int8 on {art.agreement_onnx_int8:.2%} of "
                f"{len(rows)} rows, under {AGREEMENT_MIN:.0%}"
            )


def _baseline_key(plan: Sequence[_Artifact]) -> str:
    """The candidate a profile's others must beat: fp32 ONNX, else (LiteRT-only) fp32 TFLite."""
    return "onnx-fp32" if any(a.key == "onnx-fp32" for a in plan) else "tflite-fp32"


def _open_error(art: _Artifact, threads: int, x1: np.ndarray) -> str | None:
    """Why ``art`` cannot be opened and run once for timing at ``threads``, or None."""
    try:
        _timing_call(art, threads, x1)()
    except Exception as e:  # noqa: BLE001 - runtimes raise untyped errors
        log.warning("opening %s for timing failed", art.key, exc_info=True)
        return f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
    return None


def _timing_call(art: _Artifact, threads: int, x1: np.ndarray) -> Callable[[], object]:
    assert art.model is not None
    if art.runtime == "litert":
        from compiler.tflite import LiteRtRunner

        runner = LiteRtRunner(art.model, threads)
        return functools.partial(runner.run1, np.ascontiguousarray(x1[:1]))
    sess = ort_session(art.model, threads)
    return functools.partial(sess.run, None, {art.input_name: np.ascontiguousarray(x1[:1])})


def _load(model_spec: Path | str, calib: Dataset, options: CompileOptions) -> OnnxModel:
    text = str(model_spec)
    if options.state_dict is not None:
        if not is_factory_spec(text):
            raise CompilerInputError(
                f"--state-dict needs MODEL as package.module:factory, got {text!r}"
            )
        return load_factory_model(text, options.state_dict, calib.x)
    if is_factory_spec(text):
        raise CompilerInputError(f"model {text}: a module:factory model needs --state-dict")
    return load_model(Path(model_spec), example=calib.x)


def compile_model(
    model_path: Path | str,
    profiles: Sequence[Profile],
    calibration: Path,
    eval_path: Path | None,
    out_dir: Path,
    options: CompileOptions,
    progress: CompileProgress | None = None,
) -> CompileReport:
    """Compile ``model_path`` for ``profiles``; write bundles and ``report.json`` to ``out_dir``.

    ``model_path`` is a ``.pt2``/``.onnx`` file or, with ``options.state_dict``, a
    ``package.module:factory`` spec.

    Raises:
        DataFileError: a data file is unreadable or does not fit the model.
        ModelLoadError: the model cannot be read or converted.
        CompilerInputError: no profile given, or the model spec and state_dict disagree.
        agent.errors.ManifestError: the name/version do not make a valid manifest.
    """
    prog = progress or _NoProgress()
    if not profiles:
        raise CompilerInputError("at least one profile is required")
    _seed_everything(options.seed)
    calib = load_npz(calibration, "calibration")
    eval_data = load_npz(eval_path, "eval") if eval_path is not None else None
    train = load_npz(options.train.path, "train", need_labels=True) if options.train else None
    model = _load(model_path, calib, options)
    check_input_shape(calib, "calibration", model.input.shape)
    if eval_data is not None:
        check_input_shape(eval_data, "eval", model.input.shape)
    if train is not None:
        check_input_shape(train, "train", model.input.shape)
    _check_labels_fit_metric(eval_data if eval_data is not None else calib,
                             "eval" if eval_data is not None else "calibration", options.metric)
    batch = model.input.shape[0] if model.input.shape else None
    batch_note = None
    if isinstance(batch, int) and batch > 0:
        # Calibration, evaluation and the self-test run many rows per call: make the batch
        # dynamic when the graph allows it, or refuse before any candidate is built.
        model, batch_note = with_dynamic_batch(model, calib.x)
    if train is not None:
        assert train.y is not None
        if train.y.ndim != 1 or train.y.dtype.kind not in "iu":
            raise DataFileError(f"train data {train.path}: 'y' must be 1-D integer class labels")
        n_classes = model.output.shape[-1] if model.output.shape else None
        if isinstance(n_classes, int) and n_classes > 0 and (train.y.min() < 0 or train.y.max() >= n_classes):
            raise DataFileError(f"train data {train.path}: labels run from {int(train.y.min())} to "
                                f"{int(train.y.max())}, but the model has {n_classes} output classes")

    planner = _Planner(model, calib, eval_data, train, options)
    plans: dict[str, list[_Artifact]] = {}
    notes: dict[str, list[str]] = {p.name: [] for p in profiles}
    skipped: list[str] = []
    has_torch = model.torch_module() is not None
    if options.train is None:
        skipped.append(
            "structured pruning, distillation and unstructured pruning: skipped, they need "
            "labelled training data (--train TRAIN.npz)"
        )
    elif model.module is None:
        skipped.append(
            "structured pruning, distillation and unstructured pruning: skipped, they need "
            f"the model's nn.Module structure (give MODEL as package.module:factory with "
            f"--state-dict); a {model.source_kind} input has none"
        )
    for p in profiles:
        plan: list[_Artifact] = []
        if "onnx" in p.formats and "onnxruntime" in p.runtimes:
            plan += planner.onnx(p)
        else:
            notes[p.name].append(
                f"profile runs formats {p.formats} on runtimes {sorted(p.runtimes)}; "
                "ONNX candidates are not built for it"
            )
        if "tflite" in p.formats and "litert" in p.runtimes:
            if not options.tflite:
                notes[p.name].append("TFLite candidates disabled (--no-tflite)")
            elif not has_torch:
                notes[p.name].append(
                    "TFLite candidates need a torch model (.pt2 or module:factory); "
                    "an ONNX input cannot be converted with litert-torch"
                )
            else:
                plan += planner.tflite(p)
        plans[p.name] = plan
    if any(a.format == "tflite" for a in planner.cache.values()):
        from compiler.tflite import litert_version

        if litert_version() is None:
            skipped.append("TFLite: ai-edge-litert is not installed")

    artifacts = sorted(planner.cache.values(), key=lambda a: a.key != "onnx-fp32")
    n_bundles = sum(len(v) for v in plans.values())
    prog.begin(total=len(artifacts) * 2 + n_bundles + 2)

    # Build and evaluate each distinct artifact once; ONNX fp32 first (its predictions
    # are the reference for agreement and the drift reference).
    fp32_logits: np.ndarray | None = None
    # Without an eval set, candidates are measured on the calibration rows (optimistic
    # for int8, which saw them, but never unchecked).
    measure_on = eval_data if eval_data is not None else calib
    if eval_data is None:
        skipped.append("no --eval given: accuracy and fidelity are measured on the calibration rows")
    # Without class labels an accuracy-like metric cannot be measured; rather than leave
    # candidates unchecked, each is held to its top-1 agreement with the fp32 model.
    by_agreement = options.metric.needs_class_labels and measure_on.y is None
    if by_agreement:
        _check_classifier_output(model.output.shape, options.metric, measure_on)
        skipped.append(
            f"the {'eval' if eval_data is not None else 'calibration'} rows have no labels 'y', so "
            f"{options.metric.name} cannot be measured: every candidate is held to its top-1 agreement "
            "with the fp32 model instead (max_accuracy_drop applies to 1 - agreement; accuracy_floor "
            "is not checked)"
        )
    # The source model in ONNX Runtime is the reference for agreement and the drift
    # reference. A TFLite-only compile plans no ONNX candidate: evaluate it here, first.
    source_fp32 = _Artifact(key="onnx-fp32", format="onnx", precision="fp32", technique="baseline",
                            runtime="onnxruntime", build=lambda: (model.data, []), settings={})
    if "onnx-fp32" not in planner.cache:
        source_fp32.model = model.data
        try:
            _evaluate(source_fp32, model, calib, measure_on, None, options.metric)
        except TechniqueError as e:
            source_fp32.error = str(e)
        fp32_logits = source_fp32.eval_logits
        if by_agreement and fp32_logits is not None:
            _check_classifier_output(fp32_logits.shape, options.metric, measure_on)
    for art in artifacts:
        prog.advance(f"building {art.key}")
        try:
            art.model, art.notes = art.build()
            if art.format == "onnx" and art.model is not None:
                art.model = lowest_ir_version(art.model)
        except TechniqueError as e:
            art.error = str(e)
        except Exception as e:  # one candidate's failure rejects that candidate, not the compile
            log.exception("building %s failed", art.key)
            art.error = f"build failed: {type(e).__name__}: {e}"
        prog.advance(f"evaluating {art.key}")
        if art.model is None:
            continue
        try:
            _evaluate(art, model, calib, measure_on, fp32_logits, options.metric)
        except TechniqueError as e:
            art.error = str(e)
            continue
        except CompilerInputError:
            raise  # the data does not fit the metric: the user's to fix, not a candidate's failure
        except Exception as e:
            log.exception("evaluating %s failed", art.key)
            art.error = f"evaluation failed: {type(e).__name__}: {e}"
            continue
        if art.key == "onnx-fp32" and art.eval_logits is not None:
            fp32_logits = art.eval_logits
            if by_agreement:
                _check_classifier_output(fp32_logits.shape, options.metric, measure_on)

    fp32 = planner.cache.get("onnx-fp32") or source_fp32
    if fp32.error:
        raise TechniqueError(f"the fp32 model does not run in ONNX Runtime: {fp32.error}")
    _check_tflite_int8(
        artifacts, eval_data.x if eval_data is not None else calib.x
    )
    n_out = model.output.shape[-1] if model.output.shape and isinstance(model.output.shape[-1], int) else 0
    if not n_out and fp32.selftest_out:
        n_out = int(next(iter(fp32.selftest_out.values())).shape[-1])
    _check_labels(eval_data, n_out)
    labels = _labels(eval_data, n_out)
    assert fp32.model is not None
    calib_logits = run_batched(ort_session(fp32.model, threads=1), model.input.name, calib.x)[0]
    classes = [str(i) for i in range(calib_logits.shape[-1])] if calib_logits.ndim == 2 else None
    preds = calib_logits.argmax(axis=-1) if classes is not None else calib_logits.ravel()
    reference = build_reference(calib.x, preds, classes=labels or classes)

    # Latency: each candidate alternately with its profile's fp32 baseline, one model open
    # at a time (measure_against), once per (thread count, baseline).
    prog.advance("timing candidates at batch 1")
    groups: dict[tuple[int, str], dict[str, _Artifact]] = {}
    for p in profiles:
        key = (host_threads(p.runtime_options.intra_op_threads), _baseline_key(plans[p.name]))
        for art in plans[p.name]:
            if art.model is not None and not art.error:
                groups.setdefault(key, {})[art.sha256] = art
    timings: dict[tuple[str, int, str], tuple[float, float]] = {}
    for (th, base_key), arts in sorted(groups.items()):
        anchor = next((a for a in arts.values() if a.key == base_key), None)
        if anchor is None:  # the baseline failed to build: the profile selects nothing
            continue
        # Open each model once first: one that cannot run at this thread count is rejected
        # with the error, not the compile (an anchor that cannot: its profiles time nothing).
        failed = {a.sha256: err for a in arts.values() if (err := _open_error(a, th, calib.x))}
        for a in arts.values():
            if a.sha256 in failed:
                a.error = f"timing failed at {th} thread{'s' if th != 1 else ''}: {failed[a.sha256]}"
        if anchor.sha256 in failed:
            continue
        others = [a for a in arts.values() if a is not anchor and a.sha256 not in failed]
        base, lats = measure_against(
            functools.partial(_timing_call, anchor, th, calib.x),
            [functools.partial(_timing_call, a, th, calib.x) for a in others],
            options.latency,
        )
        for a, m in zip([anchor, *others], [base, *lats], strict=True):
            timings[(a.sha256, th, base_key)] = (m.p50_ms, m.p95_ms)

    # Selection per profile.
    records: dict[tuple[str, str], CandidateRecord] = {}
    summaries: dict[str, ProfileSummary] = {}
    ordered: list[CandidateRecord] = []
    for p in profiles:
        th = host_threads(p.runtime_options.intra_op_threads)
        baseline = _baseline_key(plans[p.name])
        measured = []
        for art in plans[p.name]:
            rec = CandidateRecord(
                profile=p.name,
                format=art.format,
                precision=art.precision,
                technique=art.technique,
                runtime=art.runtime,
                notes=list(art.notes),
                settings=dict(art.settings),
                metrics=dict(art.metrics),
                accuracy=art.metrics.get("accuracy"),
                agreement_with_fp32=art.agreement,
                agreement_with_onnx_int8=art.agreement_onnx_int8,
                model_bytes=len(art.model) if art.model else None,
                excluded_nodes=list(art.excluded_nodes),
            )
            records[(p.name, art.key)] = rec
            t = timings.get((art.sha256, th, baseline))
            if t is not None:
                rec.latency_ms_p50, rec.latency_ms_p95 = round(t[0], 5), round(t[1], 5)
                rec.latency_threads = th
            blockers = list(art.blockers)
            if art.model is not None and not art.error:
                if art.format == "onnx":
                    blockers += onnx_blockers(art.model, p.runtimes["onnxruntime"])  # type: ignore[index]
                else:
                    from compiler.tflite import tflite_blockers

                    blockers += tflite_blockers(art.model, p.runtimes["litert"])  # type: ignore[index]
            if art.technique == "unstructured-pruning":
                blockers.append(
                    "unstructured sparsity does not speed up dense runtimes; reported for its "
                    "compressed size only, never deployed"
                )
            measured.append(
                Measured(
                    key=art.key,
                    model_bytes=rec.model_bytes,
                    latency_p50_ms=t[0] if t else None,
                    latency_p95_ms=t[1] if t else None,
                    metric=_selection_metric(art, options.metric, by_agreement),
                    is_baseline=art.key == baseline,
                    errors=(art.error,) if art.error else (),
                    blockers=tuple(blockers),
                )
            )
        limits = p.limits
        if options.max_accuracy_drop is not None:
            limits = limits.model_copy(update={"max_accuracy_drop": options.max_accuracy_drop})
        if by_agreement or not options.metric.needs_class_labels:
            # The profile's floor is an accuracy; agreement, MSE and cosine are not.
            limits = limits.model_copy(update={"accuracy_floor": None})
        for art, d in zip(plans[p.name], select(measured, limits), strict=True):
            rec = records[(p.name, art.key)]
            rec.selected, rec.passed, rec.reasons = d.selected, d.passed, d.reasons
            rec.metric_drop = d.metric_drop
            ordered.append(rec)
        if plans[p.name] and not any(records[(p.name, a.key)].selected for a in plans[p.name]):
            notes[p.name].append("no candidate passed every check; nothing selected")

    # Bundles, after selection so that each records whether it is the profile's choice.
    out_dir.mkdir(parents=True, exist_ok=True)
    libraries = _libraries()
    version = _edgefleet_version()
    data_hashes = {"model": model.source_sha256, "calibration": calib.sha256}
    if eval_data is not None:
        data_hashes["eval"] = eval_data.sha256
    if train is not None:
        data_hashes["train"] = train.sha256
    for p in profiles:
        selected = None
        for art in plans[p.name]:
            prog.advance(f"bundling {p.name} {art.label}")
            rec = records[(p.name, art.key)]
            if art.error or art.model is None or art.selftest_in is None:
                continue
            fname = f"{options.name}-{options.version}-{p.name}-{art.format}-{art.label}.efb"
            _write(out_dir / fname, art, rec, p, model, options, labels, reference,
                   libraries, version, data_hashes)
            rec.bundle = fname
            rec.size_bytes = (out_dir / fname).stat().st_size
            if rec.selected:
                selected = fname
        summaries[p.name] = ProfileSummary(selected=selected, notes=notes[p.name])

    report = CompileReport(
        name=options.name,
        version=options.version,
        model={
            "path": str(model_path),
            "sha256": model.source_sha256,
            "kind": model.source_kind,
            "input": {"name": model.input.name, "shape": model.input.spec_shape()},
            "outputs": [o.name for o in model.outputs],
            **({"notes": [batch_note]} if batch_note else {}),
        },
        data={
            "calibration": {"path": str(calibration), "sha256": calib.sha256, "rows": calib.rows},
            "eval": None
            if eval_data is None
            else {
                "path": str(eval_path),
                "sha256": eval_data.sha256,
                "rows": eval_data.rows,
                "labels": eval_data.y is not None,
            },
            "train": None
            if train is None
            else {"path": str(train.path), "sha256": train.sha256, "rows": train.rows},
        },
        host=host_info(),
        settings={
            "seed": options.seed,
            "calibrate_method": options.calibrate_method,
            "metric": options.metric.name,
            "max_accuracy_drop": options.max_accuracy_drop,
            "latency": {
                "method": "each model timed alone (one open at a time), alternating with its "
                "profile's fp32 baseline; samples scaled by baseline p50 over all pairs / in its pair",
                "alternations": options.latency.alternations,
                "batch": 1,
                "warmup": options.latency.warmup,
                "runs": options.latency.total_runs,
                "interleaved_rounds": options.latency.rounds,
                "runs_per_round": options.latency.runs_per_round,
                "pause_s": options.latency.pause_s,
                "block_warmup": options.latency.block_warmup,
            },
        },
        profiles=summaries,
        candidates=ordered,
        skipped=skipped,
    )
    report.write(out_dir / "report.json")
    return report


def _write(
    path: Path,
    art: _Artifact,
    rec: CandidateRecord,
    p: Profile,
    model: OnnxModel,
    options: CompileOptions,
    labels: list[str],
    reference: Any,
    libraries: dict[str, str],
    version: str,
    data_hashes: dict[str, str],
) -> None:
    assert art.model is not None and art.selftest_in is not None
    # The bundle's interface is float32 for every candidate (int8 TFLite models are
    # quantized/dequantized at the boundary by the runtime).
    inputs = [{"name": art.input_name, "dtype": "float32", "shape": art.input_shape}]
    outputs = [{"name": n, "dtype": "float32", "shape": s} for n, s in art.output_shapes.items()]
    if art.runtime == "onnxruntime":
        inputs = [{"name": t.name, "dtype": t.dtype, "shape": t.spec_shape()} for t in model.inputs]
        outputs = [{"name": t.name, "dtype": t.dtype, "shape": t.spec_shape()} for t in model.outputs]
    layout = _layout(len(model.input.shape))
    batch_note = " Batch fixed to 1." if art.input_shape and art.input_shape[0] == 1 else ""
    manifest = {
        "name": options.name,
        "version": options.version,
        "format": art.format,
        "precision": art.precision,
        "runtime": art.runtime,
        "min_runtime_version": p.runtimes[art.runtime],  # type: ignore[index]
        "profile": p.name,
        "inputs": inputs,
        "outputs": outputs,
        "preprocessing": {
            "layout": layout,
            "notes": "Feed float32 inputs prepared exactly like the calibration data." + batch_note,
        },
        "task": "classification",
        "labels": labels,
        "selftest_tolerance": _selftest_tolerance(art.precision, art.selftest_out),
        "lineage": {
            "training_data_sha256": data_hashes.get("train"),
            "hyperparameters": {"seed": options.seed},
            # Only deterministic metrics: host latency would break byte-identical
            # rebuilds, so it lives in report.json.
            "metrics": {**art.metrics, "model_bytes": float(len(art.model))},
            "code_version": version,
            "compiler_version": version,
            "libraries": libraries,
            "inputs": data_hashes,
            "settings": {
                "technique": art.technique,
                "seed": options.seed,
                **art.settings,
                **({"opset": _onnx_opset(art.model)} if art.format == "onnx" else {}),
                # The hub prefers the compiler's choice (hub.registry.is_selected).
                "selected": rec.selected,
            },
        },
    }
    _, sha = write_bundle(
        path,
        manifest=manifest,
        model=art.model,
        selftest_inputs={art.input_name: art.selftest_in},
        selftest_outputs=art.selftest_out,
        reference=reference,
    )
    rec.bundle_sha256 = sha
