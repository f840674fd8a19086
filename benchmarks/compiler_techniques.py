"""Benchmark for issue #5: the compiler's techniques on reference models, measured here.

Models (trained inside the benchmark, no downloads): a CNN and an MLP on scikit-learn
digits upscaled to 32x32, and a small transformer encoder on a synthetic sequence task.
Every latency is batch 1, ONNX Runtime CPU, 2 intra-op threads, timed in interleaved
rounds against its fp32 baseline (p50 over all runs).

Run:  python benchmarks/compiler_techniques.py [--out docs/compiler-benchmarks-results.md]
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent.profiles import list_profiles  # noqa: E402
from compiler import demo_models as dm  # noqa: E402
from compiler.measure import LatencySettings, measure_latencies, ort_session, run_batched  # noqa: E402
from compiler.model_source import OnnxModel, load_model  # noqa: E402
from compiler.pipeline import CompileOptions, compile_model, host_info  # noqa: E402
from compiler.pruning import (  # noqa: E402
    compressed_size,
    magnitude_prune,
    parameter_count,
    prune_channels,
    width_scaled_student,
)
from compiler.quantize import (  # noqa: E402
    StaticQuantSettings,
    quantize_dynamic_int8,
    quantize_static_qdq,
)

THREADS = 2
TIMING = LatencySettings(warmup=100, rounds=30, runs_per_round=50)


@dataclass
class Row:
    model: str
    variant: str
    model_bytes: int
    p50_ms: float
    accuracy: float
    base: str = "fp32"
    extra: str = ""


def to_onnx(module: torch.nn.Module, x: np.ndarray, work: Path, tag: str) -> OnnxModel:
    path = dm.export_pt2(module, x, work / f"{tag}.pt2")
    return load_model(path, example=x[:4])


def accuracy(model: bytes, name: str, x: np.ndarray, y: np.ndarray) -> float:
    out = run_batched(ort_session(model, 1), name, x)[0]
    return float((out.argmax(1) == y).mean())


def time_models(models: list[bytes], name: str, x1: np.ndarray) -> list[float]:
    sessions = [ort_session(m, THREADS) for m in models]
    return [lat.p50_ms for lat in measure_latencies(sessions, name, x1, TIMING)]


def bench_model(
    label: str, module: torch.nn.Module, data: tuple[np.ndarray, ...], work: Path,
    structured: bool, teacher_width: bool,
) -> list[Row]:
    x_tr, y_tr, x_te, y_te = data
    fp32 = to_onnx(module, x_tr, work, label)
    name = fp32.input.name
    calib = x_tr[np.random.default_rng(0).choice(len(x_tr), 256, replace=False)]
    variants: dict[str, bytes] = {"fp32": fp32.data}
    variants["int8 static QDQ per-channel (VNNI: s8s8)"] = quantize_static_qdq(
        fp32.data, name, calib, StaticQuantSettings("int8"))[0]
    variants["int8 static QDQ per-channel (u8s8, reduce_range)"] = quantize_static_qdq(
        fp32.data, name, calib, StaticQuantSettings("uint8", reduce_range=True))[0]
    variants["int8 dynamic"] = quantize_dynamic_int8(fp32.data)[0]
    ex = torch.from_numpy(x_tr[:2])
    extras: dict[str, str] = {}
    if structured:
        pruned = prune_channels(module, ex, 0.5, x_tr, y_tr, epochs=5, seed=0)
        variants["50% structured channel pruning + fine-tune (fp32)"] = to_onnx(
            pruned, x_tr, work, label + "-pruned").data
        extras["50% structured channel pruning + fine-tune (fp32)"] = (
            f"params {parameter_count(module)} -> {parameter_count(pruned)}")
    sparse = magnitude_prune(module, 0.5)
    sparse_onnx = to_onnx(sparse, x_tr, work, label + "-sparse").data
    variants["50% unstructured magnitude pruning (fp32, no fine-tune)"] = sparse_onnx
    extras["50% unstructured magnitude pruning (fp32, no fine-tune)"] = (
        f"zlib size {compressed_size(sparse_onnx)} vs fp32 {compressed_size(fp32.data)}")
    if teacher_width:
        t0 = time.perf_counter()
        student = width_scaled_student(module, ex, 0.5, x_tr, y_tr, epochs=15, seed=0)
        variants["KD student, width 0.5 (fp32)"] = to_onnx(student, x_tr, work, label + "-kd").data
        extras["KD student, width 0.5 (fp32)"] = (
            f"params {parameter_count(module)} -> {parameter_count(student)}; "
            f"trained in {time.perf_counter() - t0:.0f} s")
    keys = list(variants)
    lat = time_models([variants[k] for k in keys], name, x_te[:1])
    return [
        Row(label, k, len(variants[k]), lat[i], accuracy(variants[k], name, x_te, y_te),
            extra=extras.get(k, ""))
        for i, k in enumerate(keys)
    ]


def profile_all_run(work: Path) -> tuple[float, dict[str, str | None]]:
    module, x_tr, _, x_te, y_te = dm.train_digits_cnn(size=32, seed=0)
    pt2 = dm.export_pt2(module, x_tr, work / "cnn-all.pt2")
    calib, ev = dm.write_calib_eval(work, x_tr, x_te, y_te)
    t0 = time.perf_counter()
    report = compile_model(pt2, list_profiles(), calib, ev, work / "all",
                           CompileOptions(name="digits-cnn32"))
    return time.perf_counter() - t0, {k: v.selected for k, v in report.profiles.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("docs/compiler-benchmarks-results.md"))
    args = ap.parse_args()
    torch.manual_seed(0)
    started = time.perf_counter()
    rows: list[Row] = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        m, *d = dm.train_digits_cnn(size=32, seed=0)
        rows += bench_model("CNN digits 32x32", m, tuple(d), work, True, True)
        m, *d = dm.train_digits_mlp(size=32, seed=0)
        rows += bench_model("MLP digits 32x32", m, tuple(d), work, True, True)
        m, *d = dm.train_sequence_encoder(seed=0)
        rows += bench_model("Transformer encoder (synthetic seq 16x8)", m, tuple(d), work,
                            False, False)
        all_s, selected = profile_all_run(work)
    write_results(args.out, rows, all_s, selected, time.perf_counter() - started)


def write_results(out: Path, rows: list[Row], all_s: float, selected: dict[str, str | None],
                  total_s: float) -> None:
    host = host_info()
    lines = [
        "# Compiler benchmark results (issue #5)",
        "",
        f"- Command: `python benchmarks/compiler_techniques.py --out {out}`",
        f"- Machine: {host['cpu']}, {host['cores']} cores, VNNI: {host['vnni']}; "
        f"onnxruntime {host['onnxruntime']}, torch {torch.__version__}",
        f"- Date: {dt.datetime.now(dt.UTC).strftime('%Y-%m-%d %H:%M UTC')}; whole run {total_s:.0f} s",
        f"- Latency: batch 1, {THREADS} threads, p50 of {TIMING.total_runs} runs per variant, "
        f"interleaved in {TIMING.rounds} rounds with its fp32 baseline.",
        "- Ratios are fp32 / variant (size and speed: >1 is better); accuracy drop in points.",
        "",
        "| Model | Variant | Model bytes | Size ratio | p50 ms | Speed-up | Accuracy | Drop (pts) | Notes |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    base = {r.model: r for r in rows if r.variant == "fp32"}
    for r in rows:
        b = base[r.model]
        lines.append(
            f"| {r.model} | {r.variant} | {r.model_bytes} | {b.model_bytes / r.model_bytes:.2f}x | "
            f"{r.p50_ms:.4f} | {b.p50_ms / r.p50_ms:.2f}x | {r.accuracy:.4f} | "
            f"{100 * (b.accuracy - r.accuracy):+.2f} | {r.extra} |"
        )
    lines += [
        "",
        f"`compile --profile all` on the 32x32 CNN (all {len(selected)} shipped profiles, "
        f"default timing): **{all_s:.1f} s** (goal: <= 300 s).",
        "",
        "Selected per profile: " + ", ".join(f"{k}: {v or 'none'}" for k, v in selected.items()),
        "",
    ]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
