"""Why static int8 gains are small at batch 1 on this host (issue #5 investigation).

Prints, for the 32x32 digits CNN and MLP: the op types of the int8 graph after ONNX
Runtime's optimiser (are QDQ pairs fused into QLinearConv/QGemm?), per-node kernel
times of fp32 and int8 at batch 1 (ORT's profiler, median), fp32 vs int8 p50 at
1/2 threads, batch 1/32 and optimisation level ALL/BASIC, batch-1 session options
(``session.qdqisint8allowed``: keep s8s8 instead of ORT's s8->u8 rewrite; spinning off),
batch-1 quantization variants (per-tensor weights; the first node kept in fp32) timed
both with one session alive at a time (as a device runs it) and interleaved, at 1 and
2 threads, and ORT's per-call overhead.

Run:  python benchmarks/compiler_int8_investigation.py
"""

from __future__ import annotations

import collections
import functools
import gc
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnx.helper as oh
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from compiler import demo_models as dm  # noqa: E402
from compiler.measure import LatencySettings, measure_calls  # noqa: E402
from compiler.model_source import load_model  # noqa: E402
from compiler.quantize import StaticQuantSettings, quantize_static_qdq  # noqa: E402


def session(model: bytes, threads: int, level: str = "ALL", dump: str | None = None,
            config: dict[str, str] | None = None) -> ort.InferenceSession:
    so = ort.SessionOptions()
    for k, v in (config or {}).items():
        so.add_session_config_entry(k, v)
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, f"ORT_ENABLE_{level}")
    so.log_severity_level = 3
    if dump:
        so.optimized_model_filepath = dump
    return ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])


def p50_pair(a: ort.InferenceSession, b: ort.InferenceSession, x: np.ndarray, runs: int) -> tuple[float, float]:
    feed = {"input": x}
    for s in (a, b):
        for _ in range(20):
            s.run(None, feed)
    samples: list[list[float]] = [[], []]
    for r in range(10):
        for i in (r % 2, 1 - r % 2):
            s = (a, b)[i]
            for _ in range(runs):
                t0 = time.perf_counter_ns()
                s.run(None, feed)
                samples[i].append((time.perf_counter_ns() - t0) / 1e6)
    return float(np.median(samples[0])), float(np.median(samples[1]))


TIMING = LatencySettings(warmup=100, rounds=30, runs_per_round=50)

OPTION_SETS: dict[str, dict[str, str]] = {
    "default": {},
    "qdqisint8allowed=1": {"session.qdqisint8allowed": "1"},
    "allow_spinning=0": {"session.intra_op.allow_spinning": "0"},
}


def isolated_p50(model: bytes, threads: int, feed: dict[str, np.ndarray], runs: int = 1500) -> float:
    """p50 ms at batch 1 of ``model`` with no other session alive."""
    s = session(model, threads)
    for _ in range(200):
        s.run(None, feed)
    ts = []
    for _ in range(runs):
        t0 = time.perf_counter_ns()
        s.run(None, feed)
        ts.append((time.perf_counter_ns() - t0) / 1e6)
    del s
    gc.collect()
    return float(np.median(ts))


def kernel_times(model: bytes, x1: np.ndarray, prefix: str, runs: int = 2000) -> list[tuple[str, str, float]]:
    """(op type, node, median µs) per node at batch 1, 1 thread, from ORT's profiler
    (1 µs resolution; profiling adds its own cost, so compare nodes, not totals)."""
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.enable_profiling = True
    so.profile_file_prefix = prefix
    so.log_severity_level = 3
    s = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
    for _ in range(runs):
        s.run(None, {"input": x1})
    events = json.loads(Path(s.end_profiling()).read_text())
    times: dict[tuple[str, str], list[float]] = collections.defaultdict(list)
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            times[(e["args"]["op_name"], e["name"].removesuffix("_kernel_time"))].append(e["dur"])
    return [(op, node, float(np.median(v[runs // 4:]))) for (op, node), v in times.items()]


def main() -> None:
    work = Path(tempfile.mkdtemp())
    xte = np.zeros((1, 1, 32, 32), np.float32)
    for label, train in [("cnn", dm.train_digits_cnn), ("mlp", dm.train_digits_mlp)]:
        m, xtr, _, xte, _ = train(size=32, seed=0, epochs=15)
        fp32 = load_model(dm.export_pt2(m, xtr, work / f"{label}.pt2"), example=xtr[:4]).data
        int8 = quantize_static_qdq(fp32, "input", xtr[:256], StaticQuantSettings("int8"))[0]
        dump = str(work / f"{label}-opt.onnx")
        session(int8, 1, dump=dump)
        ops = collections.Counter(n.op_type for n in onnx.load(dump).graph.node)
        print(label, "int8 graph after ORT optimisation:", dict(ops))
        for name, model in (("fp32", fp32), ("int8", int8)):
            for op, node, us in kernel_times(model, np.ascontiguousarray(xte[:1]), str(work / name)):
                print(f"{label} {name} kernel {op:18s} {node[:40]:40s} {us:6.1f} us")
        first = onnx.load_model_from_string(fp32).graph.node
        first_compute = next(n.name for n in first if n.op_type in ("Conv", "Gemm", "MatMul"))
        variants = {
            "per-channel": int8,
            "per-tensor": quantize_static_qdq(
                fp32, "input", xtr[:256], StaticQuantSettings("int8", per_channel=False))[0],
            f"first node ({first_compute}) fp32": quantize_static_qdq(
                fp32, "input", xtr[:256], StaticQuantSettings("int8", exclude_nodes=(first_compute,)))[0],
        }
        # As a device runs it: one session alive at a time (no other thread pool around),
        # fp32 and each variant alternately, five times; median and range of the ratios.
        x1 = {"input": np.ascontiguousarray(xte[:1])}
        for th in (1, 2):
            ratios: dict[str, list[float]] = collections.defaultdict(list)
            for _ in range(5):
                base = isolated_p50(fp32, th, x1)
                for name, model in variants.items():
                    ratios[name].append(base / isolated_p50(model, th, x1))
            for name, r in ratios.items():
                print(f"{label} isolated threads={th} batch=1 int8 {name}: speed-up median "
                      f"{np.median(r):.2f}x, range {min(r):.2f}-{max(r):.2f}x "
                      f"(load {os.getloadavg()[0]:.1f})")
        # Every variant at 1 and 2 threads in one interleaved measurement (so all see the
        # same host conditions), three times: on a shared 2-vCPU VM the second thread only
        # helps when the other vCPU is free, which changes from one measurement to the next.
        keys = [(name, th) for th in (1, 2) for name in ("fp32", *variants)]
        for rep in range(3):
            calls = [functools.partial(session(fp32 if name == "fp32" else variants[name], th).run,
                                       None, x1) for name, th in keys]
            p50 = {k: r.p50_ms for k, r in zip(keys, measure_calls(calls, TIMING), strict=True)}
            for name, th in keys:
                if name != "fp32":
                    print(f"{label} rep={rep} threads={th} batch=1 int8 {name}: fp32 "
                          f"{p50[('fp32', th)]:.4f} ms int8 {p50[(name, th)]:.4f} ms speed-up "
                          f"{p50[('fp32', th)] / p50[(name, th)]:.2f}x (load {os.getloadavg()[0]:.1f})")
        for threads in (1, 2):
            for batch in (1, 32):
                for level in ("ALL", "BASIC"):
                    a, b = p50_pair(session(fp32, threads, level), session(int8, threads, level),
                                    xte[:batch], 40 if batch == 1 else 10)
                    print(f"{label} threads={threads} batch={batch} opt={level}: fp32 {a:.4f} ms "
                          f"int8 {b:.4f} ms speed-up {a / b:.2f}x")
        for threads in (1, 2):
            for name, cfg in OPTION_SETS.items():
                a, b = p50_pair(session(fp32, threads, config=cfg), session(int8, threads, config=cfg),
                                xte[:1], 40)
                print(f"{label} threads={threads} batch=1 options={name}: fp32 {a:.4f} ms "
                      f"int8 {b:.4f} ms speed-up {a / b:.2f}x")
    graph = oh.make_graph(
        [oh.make_node("Identity", ["input"], ["y"])], "identity",
        [oh.make_tensor_value_info("input", onnx.TensorProto.FLOAT, [1, 1, 32, 32])],
        [oh.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 1, 32, 32])],
    )
    ident = session(oh.make_model(graph, opset_imports=[oh.make_opsetid("", 18)]).SerializeToString(), 1)
    feed = {"input": xte[:1]}
    for _ in range(200):
        ident.run(None, feed)
    ts = []
    for _ in range(2000):
        t0 = time.perf_counter_ns()
        ident.run(None, feed)
        ts.append((time.perf_counter_ns() - t0) / 1e6)
    print(f"ORT per-call overhead (Identity graph, batch 1): {np.median(ts):.4f} ms")


if __name__ == "__main__":
    main()
