"""``edgefleet compile`` as a library: build, measure, bundle and select candidates.

The flow for one compile:

1. load the data files and the model, and check that they fit each other;
2. build every distinct candidate model once (fp32, static int8 per quantization
   setting, ...), even when several profiles share it;
3. evaluate each on the eval set and on the self-test rows (1 thread, so the bytes
   written into bundles do not depend on this host's thread scheduling);
4. write one bundle per (profile, candidate) with :func:`agent.bundle.write_bundle`;
5. time every distinct (model, thread count) at batch 1, interleaved;
6. decide per profile with :func:`compiler.selection.select` and write ``report.json``.

Bundles are deterministic: they hold nothing measured on the host (latency goes to
the report only), so the same inputs and seed give byte-identical bundles.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import os
import platform
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from agent.bundle import write_bundle
from agent.features import build_reference
from agent.profiles import Profile
from compiler.compatibility import onnx_blockers
from compiler.datasets import Dataset, check_input_shape, load_npz
from compiler.errors import CompilerInputError, DataFileError, TechniqueError
from compiler.measure import (
    LatencySettings,
    host_threads,
    measure_latencies,
    ort_session,
    run_batched,
)
from compiler.metrics import Metric, evaluate_metric, score
from compiler.model_source import OPSET, OnnxModel, load_model
from compiler.quantize import (
    CalibrationMethodName,
    quantize_dynamic_int8,
    quantize_static_qdq,
    static_settings_for,
)
from compiler.report import CandidateRecord, CompileReport, ProfileSummary
from compiler.selection import Measured, select

__all__ = ["CompileOptions", "CompileProgress", "compile_model", "host_info", "SELFTEST_ROWS"]

SELFTEST_ROWS = 8


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
class CompileOptions:
    name: str = "model"
    version: str = "0.1.0"
    seed: int = 0
    latency: LatencySettings = field(default_factory=LatencySettings)
    calibrate_method: CalibrationMethodName = "minmax"
    metric: Metric = field(default_factory=lambda: Metric("accuracy"))
    dynamic_int8: bool = True


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
    model: bytes | None = None
    notes: list[str] = field(default_factory=list)
    error: str | None = None
    selftest_out: dict[str, np.ndarray] = field(default_factory=dict)
    eval_logits: np.ndarray | None = None
    metrics: dict[str, float | None] = field(default_factory=dict)
    agreement: float | None = None

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.model or b"").hexdigest()


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
    for dist in ("edgefleet", "torch", "onnx", "onnxruntime", "onnxscript", "numpy"):
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


def _plan_onnx_artifacts(
    model: OnnxModel,
    profile: Profile,
    calib: Dataset,
    options: CompileOptions,
    cache: dict[str, _Artifact],
) -> list[_Artifact]:
    """The ONNX artifacts this profile gets (shared through ``cache``)."""
    out: list[_Artifact] = []
    # fp32 is always built: it is the baseline every other candidate is judged against.
    if "onnx-fp32" not in cache:
        cache["onnx-fp32"] = _Artifact(
            key="onnx-fp32",
            format="onnx",
            precision="fp32",
            technique="baseline",
            runtime="onnxruntime",
            build=lambda: (model.data, []),
            settings={"opset": OPSET, "source": model.source_kind},
        )
    out.append(cache["onnx-fp32"])
    if {"int8", "uint8"} & set(profile.dtypes):
        qs = static_settings_for(profile, options.calibrate_method)
        key = "onnx-int8-" + hashlib.sha256(repr(sorted(qs.as_dict().items())).encode()).hexdigest()[:12]
        if key not in cache:
            cache[key] = _Artifact(
                key=key,
                format="onnx",
                precision="int8",
                technique="static-qdq",
                runtime="onnxruntime",
                build=functools.partial(
                    quantize_static_qdq, model.data, model.input.name, calib.x, qs
                ),
                settings={"opset": OPSET, "calibration_rows": calib.rows, **qs.as_dict()},
            )
        out.append(cache[key])
    if options.dynamic_int8 and {"int8", "uint8"} & set(profile.dtypes):
        # Dynamic int8 is a candidate everywhere int8 is; selection keeps it only when
        # it measures faster than fp32 (it is usually slower for convolutions).
        if "onnx-int8-dynamic" not in cache:
            cache["onnx-int8-dynamic"] = _Artifact(
                key="onnx-int8-dynamic",
                format="onnx",
                precision="int8-dynamic",
                technique="dynamic-int8",
                runtime="onnxruntime",
                build=lambda: quantize_dynamic_int8(model.data),
                settings={"opset": OPSET, "weight_type": "int8", "activations": "uint8 at run time"},
            )
        out.append(cache["onnx-int8-dynamic"])
    return out


def _evaluate(
    art: _Artifact,
    model: OnnxModel,
    calib: Dataset,
    eval_data: Dataset | None,
    fp32_logits: np.ndarray | None,
    metric: Metric,
) -> None:
    assert art.model is not None
    sess = ort_session(art.model, threads=1)
    names = [o.name for o in sess.get_outputs()]
    st = run_batched(sess, model.input.name, calib.x[:SELFTEST_ROWS])
    art.selftest_out = dict(zip(names, st, strict=True))
    if eval_data is None:
        return
    logits = run_batched(sess, model.input.name, eval_data.x)[0]
    art.eval_logits = logits
    y = eval_data.y
    pred = logits.argmax(axis=-1) if logits.ndim >= 2 else None
    if y is not None and y.dtype.kind in "iu" and y.ndim == 1 and pred is not None:
        art.metrics["accuracy"] = float((pred == y).mean())
    if metric.name != "accuracy":
        art.metrics[metric.name] = evaluate_metric(metric, logits, y, fp32_logits)
    if fp32_logits is not None and pred is not None and fp32_logits.ndim >= 2:
        art.agreement = float((pred == fp32_logits.argmax(axis=-1)).mean())


def compile_model(
    model_path: Path,
    profiles: Sequence[Profile],
    calibration: Path,
    eval_path: Path | None,
    out_dir: Path,
    options: CompileOptions,
    progress: CompileProgress | None = None,
) -> CompileReport:
    """Compile ``model_path`` for ``profiles``; write bundles and ``report.json`` to ``out_dir``.

    Raises:
        DataFileError: a data file is unreadable or does not fit the model.
        ModelLoadError: the model cannot be read or converted.
        CompilerInputError: no profile given.
        agent.errors.ManifestError: the name/version do not make a valid manifest.
    """
    prog = progress or _NoProgress()
    if not profiles:
        raise CompilerInputError("at least one profile is required")
    _seed_everything(options.seed)
    calib = load_npz(calibration, "calibration")
    eval_data = load_npz(eval_path, "eval") if eval_path is not None else None
    model = load_model(model_path, example=calib.x)
    check_input_shape(calib, "calibration", model.input.shape)
    if eval_data is not None:
        check_input_shape(eval_data, "eval", model.input.shape)

    cache: dict[str, _Artifact] = {}
    plans: dict[str, list[_Artifact]] = {}
    notes: dict[str, list[str]] = {p.name: [] for p in profiles}
    for p in profiles:
        if "onnx" not in p.formats or "onnxruntime" not in p.runtimes:
            notes[p.name].append(
                f"profile runs formats {p.formats} on runtimes {sorted(p.runtimes)}; "
                "ONNX candidates are not built for it"
            )
            plans[p.name] = []
            continue
        plans[p.name] = _plan_onnx_artifacts(model, p, calib, options, cache)

    artifacts = list(cache.values())
    n_bundles = sum(len(v) for v in plans.values())
    prog.begin(total=len(artifacts) * 2 + n_bundles + 1)

    # Build and evaluate each distinct artifact once; fp32 first (its predictions
    # are the reference for agreement and the drift reference).
    fp32_logits: np.ndarray | None = None
    for art in artifacts:
        prog.advance(f"building {art.key}")
        try:
            art.model, art.notes = art.build()
        except TechniqueError as e:
            art.error = str(e)
        prog.advance(f"evaluating {art.key}")
        if art.model is None:
            continue
        try:
            _evaluate(art, model, calib, eval_data, fp32_logits, options.metric)
        except TechniqueError as e:
            art.error = str(e)
            continue
        if art.key == "onnx-fp32" and art.eval_logits is not None:
            fp32_logits = art.eval_logits

    fp32 = cache.get("onnx-fp32")
    if fp32 is not None and fp32.error:
        raise TechniqueError(f"the fp32 model does not run in ONNX Runtime: {fp32.error}")
    n_out = model.output.shape[-1] if model.output.shape and isinstance(model.output.shape[-1], int) else 0
    if not n_out and fp32 is not None and fp32.selftest_out:
        n_out = int(next(iter(fp32.selftest_out.values())).shape[-1])
    _check_labels(eval_data, n_out)
    labels = _labels(eval_data, n_out)
    reference = None
    if fp32 is not None and fp32.model is not None:
        sess = ort_session(fp32.model, threads=1)
        calib_logits = run_batched(sess, model.input.name, calib.x)[0]
        classes = [str(i) for i in range(calib_logits.shape[-1])] if calib_logits.ndim == 2 else None
        preds = calib_logits.argmax(axis=-1) if classes is not None else calib_logits.ravel()
        reference = build_reference(calib.x, preds, classes=labels or classes)

    # Bundles.
    out_dir.mkdir(parents=True, exist_ok=True)
    records: dict[tuple[str, str], CandidateRecord] = {}
    libraries = _libraries()
    version = _edgefleet_version()
    data_hashes = {"model": model.source_sha256, "calibration": calib.sha256}
    if eval_data is not None:
        data_hashes["eval"] = eval_data.sha256
    for p in profiles:
        for art in plans[p.name]:
            prog.advance(f"bundling {p.name} {art.precision}")
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
                model_bytes=len(art.model) if art.model else None,
            )
            records[(p.name, art.key)] = rec
            if art.error or art.model is None or reference is None:
                continue
            fname = f"{options.name}-{options.version}-{p.name}-{art.format}-{art.precision}.efb"
            manifest = {
                "name": options.name,
                "version": options.version,
                "format": art.format,
                "precision": art.precision,
                "runtime": art.runtime,
                "min_runtime_version": p.runtimes[art.runtime],  # type: ignore[index]
                "profile": p.name,
                "inputs": [
                    {"name": t.name, "dtype": t.dtype, "shape": t.spec_shape()} for t in model.inputs
                ],
                "outputs": [
                    {"name": t.name, "dtype": t.dtype, "shape": t.spec_shape()} for t in model.outputs
                ],
                "preprocessing": {
                    "layout": _layout(len(model.input.shape)),
                    "notes": "Feed float32 inputs prepared exactly like the calibration data.",
                },
                "task": "classification",
                "labels": labels,
                "selftest_tolerance": _selftest_tolerance(art.precision, art.selftest_out),
                "lineage": {
                    "training_data_sha256": None,
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
                    },
                },
            }
            _, sha = write_bundle(
                out_dir / fname,
                manifest=manifest,
                model=art.model,
                selftest_inputs={model.input.name: calib.x[:SELFTEST_ROWS]},
                selftest_outputs=art.selftest_out,
                reference=reference,
            )
            rec.bundle = fname
            rec.bundle_sha256 = sha
            rec.size_bytes = (out_dir / fname).stat().st_size

    # Latency: every distinct (model, threads) once, interleaved per thread count.
    prog.advance("timing candidates at batch 1")
    by_threads: dict[int, dict[str, _Artifact]] = {}
    for p in profiles:
        th = host_threads(p.runtime_options.intra_op_threads)
        for art in plans[p.name]:
            if art.model is not None and not art.error:
                by_threads.setdefault(th, {})[art.sha256] = art
    timings: dict[tuple[str, int], tuple[float, float]] = {}
    x1 = calib.x[:1]
    for th, arts in sorted(by_threads.items()):
        sessions = [ort_session(a.model or b"", th) for a in arts.values()]
        lat = measure_latencies(sessions, model.input.name, x1, options.latency)
        for sha, m in zip(arts, lat, strict=True):
            timings[(sha, th)] = (m.p50_ms, m.p95_ms)

    # Selection per profile.
    summaries: dict[str, ProfileSummary] = {}
    ordered: list[CandidateRecord] = []
    for p in profiles:
        th = host_threads(p.runtime_options.intra_op_threads)
        measured = []
        for art in plans[p.name]:
            rec = records[(p.name, art.key)]
            t = timings.get((art.sha256, th))
            if t is not None:
                rec.latency_ms_p50, rec.latency_ms_p95 = round(t[0], 5), round(t[1], 5)
                rec.latency_threads = th
            blockers: list[str] = []
            if art.model is not None and art.format == "onnx":
                blockers = onnx_blockers(art.model, p.runtimes["onnxruntime"])  # type: ignore[index]
            metric_value = art.metrics.get(options.metric.name)
            measured.append(
                Measured(
                    key=art.key,
                    model_bytes=rec.model_bytes,
                    latency_p50_ms=t[0] if t else None,
                    latency_p95_ms=t[1] if t else None,
                    metric=score(options.metric, metric_value),
                    is_baseline=art.technique == "baseline",
                    errors=(art.error,) if art.error else (),
                    blockers=tuple(blockers),
                )
            )
        selected = None
        for art, d in zip(plans[p.name], select(measured, p.limits), strict=True):
            rec = records[(p.name, art.key)]
            rec.selected, rec.passed, rec.reasons = d.selected, d.passed, d.reasons
            rec.metric_drop = d.metric_drop
            if d.selected:
                selected = rec.bundle
            ordered.append(rec)
        if plans[p.name] and selected is None:
            notes[p.name].append("no candidate passed every check; nothing selected")
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
        },
        host=host_info(),
        settings={
            "seed": options.seed,
            "calibrate_method": options.calibrate_method,
            "metric": options.metric.name,
            "latency": {
                "batch": 1,
                "warmup": options.latency.warmup,
                "runs": options.latency.total_runs,
                "interleaved_rounds": options.latency.rounds,
            },
        },
        profiles=summaries,
        candidates=ordered,
    )
    report.write(out_dir / "report.json")
    return report
