"""How batch-1 static int8 and 50% channel pruning pay off as the reference models grow
(issue #5).

The digits CNN and MLP of ``compiler_techniques.py`` (width 1: 0.14 M and 0.30 M
parameters, 0.02-0.09 ms per call) spend much of a batch-1 call in ONNX Runtime's per-call
and per-node overhead, which int8 does not shrink. This benchmark trains the same two
architectures at widths 1, 2 and 4 (every channel / hidden size scaled; the CNN at width 2
has CIFAR-style 32-64-128 channels) and, for each:

* times fp32, static int8 QDQ per-channel and per-tensor (built as the compiler builds
  them) and the 50% channel-pruned, fine-tuned model as ``compile`` times candidates
  (``compiler.measure.measure_against``: one model open at a time, alternating with
  fp32, steady loop), at 2 intra-op threads (the ``x86-gateway-vnni`` profile) and 1;
  three times, median and range of the fp32/variant ratios;
* measures test accuracy and model size;
* runs ``compile`` for ``x86-gateway-vnni`` and records what it selected and the speed-up
  its own timing measured, so the figure is the product's, not just the quantizer's.

Run:  python benchmarks/compiler_int8_scaling.py [--out docs/compiler-int8-scaling-results.md]
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent.profiles import load_profile  # noqa: E402
from compiler import demo_models as dm  # noqa: E402
from compiler.measure import LatencySettings, measure_against, ort_session, run_batched  # noqa: E402
from compiler.model_source import load_model  # noqa: E402
from compiler.pipeline import CompileOptions, compile_model, host_info  # noqa: E402
from compiler.pruning import parameter_count, prune_channels  # noqa: E402
from compiler.quantize import StaticQuantSettings, quantize_static_qdq  # noqa: E402

PROFILE = "x86-gateway-vnni"
WIDTHS = (1.0, 2.0, 4.0)
TIMING = LatencySettings(warmup=100, rounds=30, runs_per_round=50, alternations=3)
REPEATS = 3


def opener(model: bytes, threads: int, feed: dict[str, np.ndarray]) -> Callable[[], Callable[[], object]]:
    return lambda: functools.partial(ort_session(model, threads).run, None, feed)


def accuracy(model: bytes, name: str, x: np.ndarray, y: np.ndarray) -> float:
    return float((run_batched(ort_session(model, 1), name, x)[0].argmax(1) == y).mean())


def bench(kind: str, width: float, work: Path) -> list[dict[str, object]]:
    train = dm.train_digits_cnn if kind == "CNN" else dm.train_digits_mlp
    module, x_tr, y_tr, x_te, y_te = train(size=32, seed=0, width=width)
    tag = f"{kind.lower()}-w{width:g}"
    pt2 = dm.export_pt2(module, x_tr, work / f"{tag}.pt2")
    fp32 = load_model(pt2, example=x_tr[:4])
    name = fp32.input.name
    calib = x_tr[np.random.default_rng(0).choice(len(x_tr), 256, replace=False)]
    pruned = prune_channels(module, torch.from_numpy(x_tr[:2]), 0.5, x_tr, y_tr, epochs=5, seed=0)
    variants = {
        "fp32": fp32.data,
        "int8 per-channel": quantize_static_qdq(fp32.data, name, calib, StaticQuantSettings("int8"))[0],
        "int8 per-tensor": quantize_static_qdq(
            fp32.data, name, calib, StaticQuantSettings("int8", per_channel=False))[0],
        "50% pruned + fine-tuned (fp32)": load_model(
            dm.export_pt2(pruned, x_tr, work / f"{tag}-pruned.pt2"), example=x_tr[:4]).data,
    }
    feed = {name: np.ascontiguousarray(x_te[:1])}
    rows: list[dict[str, object]] = []
    for threads in (2, 1):
        ratios: dict[str, list[float]] = {k: [] for k in variants if k != "fp32"}
        base: list[float] = []
        for _ in range(REPEATS):
            b, lats = measure_against(opener(variants["fp32"], threads, feed),
                                      [opener(variants[k], threads, feed) for k in ratios], TIMING)
            base.append(b.p50_ms * 1e3)
            for k, lat in zip(ratios, lats, strict=True):
                ratios[k].append(b.p50_ms / lat.p50_ms)
        for k, rs in ratios.items():
            rows.append(dict(model=kind, width=width, params=parameter_count(module), threads=threads,
                             variant=k, fp32_us=float(np.median(base)), speedup=float(np.median(rs)),
                             lo=min(rs), hi=max(rs), load=os.getloadavg()[0]))
    acc = {k: accuracy(v, name, x_te, y_te) for k, v in variants.items()}
    for r in rows:
        r["size_ratio"] = len(variants["fp32"]) / len(variants[str(r["variant"])])
        r["drop"] = 100 * (acc["fp32"] - acc[str(r["variant"])])
        r["fp32_acc"] = acc["fp32"]
    calib_path, eval_path = dm.write_calib_eval(work / tag, x_tr, x_te, y_te)
    report = compile_model(pt2, [load_profile(PROFILE)], calib_path, eval_path, work / f"{tag}-out",
                           CompileOptions(name=tag))
    cands = [c for c in report.candidates if c.profile == PROFILE]
    fp = next(c for c in cands if c.technique == "baseline" and c.format == "onnx")
    sel = next((c for c in cands if c.selected), None)
    for r in rows:
        r["selected"] = (
            f"{sel.format} {sel.precision} {sel.technique}, "
            f"{fp.latency_ms_p50 / sel.latency_ms_p50:.2f}x" if sel and sel.latency_ms_p50 and fp.latency_ms_p50
            else "none")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("docs/compiler-int8-scaling-results.md"))
    ap.add_argument("--widths", default=",".join(f"{w:g}" for w in WIDTHS))
    args = ap.parse_args()
    widths = [float(w) for w in args.widths.split(",")]
    started = time.perf_counter()
    load0 = os.getloadavg()[0]
    rows: list[dict[str, object]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for kind in ("CNN", "MLP"):
            for w in widths:
                rows += bench(kind, w, Path(tmp))
                print(f"{kind} width {w:g} done ({time.perf_counter() - started:.0f} s)", flush=True)
    host = host_info()
    lines = [
        "# Batch-1 int8 and pruning against model size (issue #5)",
        "",
        f"- Command: `python benchmarks/compiler_int8_scaling.py --out {args.out}`",
        f"- Machine: {host['cpu']}, {host['cores']} cores, VNNI: {host['vnni']}; "
        f"onnxruntime {host['onnxruntime']}, torch {torch.__version__}",
        f"- Date: {dt.datetime.now(dt.UTC).strftime('%Y-%m-%d %H:%M UTC')}; whole run "
        f"{time.perf_counter() - started:.0f} s; 1-minute load average {load0:.1f} at the start, "
        f"{os.getloadavg()[0]:.1f} at the end",
        f"- Speed-up: fp32 p50 / variant p50, batch 1, as `compile` times candidates "
        f"(`measure_against`: one model open at a time, {TIMING.alternations} alternations with fp32, "
        f"{TIMING.total_runs} timed calls per model in a steady loop), repeated {REPEATS} times: "
        "median (range) of the ratios.",
        "- Accuracy on the digits test split (450 rows); drop in points against fp32.",
        f"- `compile` selection: what `edgefleet compile` picked for `{PROFILE}` and its own "
        "measured speed-up over the fp32 ONNX candidate (2 threads, the compiler's timing).",
        "",
        "| Model | Width | Params | fp32 accuracy | Threads | fp32 p50 µs | Variant | Speed-up | Size ratio | Drop (pts) | compile selected |",
        "|---|---:|---:|---:|---:|---:|---|---|---:|---:|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['width']:g} | {r['params']:,} | {r['fp32_acc']:.4f} | {r['threads']} | {r['fp32_us']:.1f} | "
            f"{r['variant']} | {r['speedup']:.2f}x ({r['lo']:.2f}-{r['hi']:.2f}) | "
            f"{r['size_ratio']:.2f}x | {r['drop']:+.2f} | {r['selected']} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
