"""Why static int8 gains are small at batch 1 on this host (issue #5 investigation).

Prints, for the 32x32 digits CNN and MLP: the op types of the int8 graph after ONNX
Runtime's optimiser (are QDQ pairs fused into QLinearConv/QGemm?), fp32 vs int8 p50 at
1/2 threads, batch 1/32 and optimisation level ALL/BASIC, batch-1 session options
(``session.qdqisint8allowed``: keep s8s8 instead of ORT's s8->u8 rewrite; spinning off),
and ORT's per-call overhead.

Run:  python benchmarks/compiler_int8_investigation.py
"""

from __future__ import annotations

import collections
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


OPTION_SETS: dict[str, dict[str, str]] = {
    "default": {},
    "qdqisint8allowed=1": {"session.qdqisint8allowed": "1"},
    "allow_spinning=0": {"session.intra_op.allow_spinning": "0"},
}


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
