"""What each part of the agent's request path adds to an ONNX Runtime call (issue #3).

    python benchmarks/agent_path_parts.py --cache-dir DIR [--size 32] [--rounds 120]

Loads the reference bundle that ``benchmarks/agent_bench.py`` compiled into ``--cache-dir``
(run that first) with the profile's runtime options and times, interleaved in blocks
whose order flips every round, the runtime's own call and the same call with the parts
of ``ModelServer.infer`` added one at a time: two ``perf_counter`` reads, the in-flight
count (``LoadedModel.acquire``/``release``), the append to a latency buffer (what a
request does since the tenth pass; the ``ModelServer.infer`` row adds reading the model
and its buffer as one, and the batched count in the windows), and then
``ModelServer.infer`` itself. For
comparison, the serving path before the tenth pass: a lock and an update of the serving
window per request, and of the health window. Medians of ``--rounds`` blocks; µs added
to the runtime's call. docs/benchmarks.md (ninth and tenth passes) has the findings.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from array import array
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache-dir", type=Path, required=True, help="agent_bench.py's --cache-dir")
    ap.add_argument("--size", type=int, choices=(8, 32), default=32)
    ap.add_argument("--rounds", type=int, default=120)
    args = ap.parse_args()

    import agent_bench as ab

    from agent import serving
    from agent.bundle import unpack
    from agent.profiles import load_profile
    from agent.runtimes.base import load_bundle
    from agent.serving import ModelServer

    models, _ = ab.reference_models(args.cache_dir, 2, 1.0)
    m = models[args.size]
    work = Path(tempfile.mkdtemp(prefix="agent-path-parts-"))
    try:
        lm = load_bundle(unpack(m.bundle, work / "b"), load_profile(ab.PROFILE).runtime_options, "a")
        feed = {lm.bundle.manifest.inputs[0].name: np.ascontiguousarray(m.x[:1])}
        rt = lm.runtime
        server = ModelServer()
        server.swap(lm)
        window, health, lock = server.window, server.health, server._stats_lock
        buffered = array("d")
        pc = time.perf_counter

        def clocks():
            t0 = pc()
            out = rt.infer(feed)
            return out, pc() - t0

        def inflight():
            lm.acquire()
            out, dt = clocks()
            lm.release()
            return out, dt

        def latency_buffer():
            out, dt = inflight()
            buffered.append(dt)
            if len(buffered) >= serving.LATENCY_FOLD:
                del buffered[:]
            return out

        def serving_window():
            out, dt = inflight()
            with lock:
                window._add(dt * 1000.0, True)
            return out

        def both_windows():
            out, dt = inflight()
            ms = dt * 1000.0
            with lock:
                window._add(ms, True)
                health._add(ms, True)
            return out

        runtime, clocks_k, inflight_k = "runtime call (OnnxRuntime.infer)", "+ two perf_counter reads", "+ in-flight count"
        window_k = "before: + serving window (lock, update)"
        paths = {
            runtime: lambda: rt.infer(feed),
            clocks_k: clocks,
            inflight_k: inflight,
            "+ latency buffer append": latency_buffer,
            "ModelServer.infer (health window open)": lambda: server.infer(feed),
            window_k: serving_window,
            "before: + health window": both_windows,
        }
        # Each part against the path it adds to.
        parent = {clocks_k: runtime, inflight_k: clocks_k, "+ latency buffer append": inflight_k,
                  window_k: inflight_k, "before: + health window": window_k}
        calls = 400 if args.size == 8 else 100
        per: dict[str, list[float]] = {k: [] for k in paths}
        names = list(paths)
        for r in range(args.rounds):
            for k in names if r % 2 == 0 else names[::-1]:
                f = paths[k]
                for _ in range(calls // 4):
                    f()
                t = time.perf_counter()
                for _ in range(calls):
                    f()
                per[k].append((time.perf_counter() - t) / calls)
        meds = {k: statistics.median(v) for k, v in per.items()}
        base = meds[runtime]
        print(f"{m.label}, {m.bundle.name}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
        for k in names:
            v = meds[k]
            step = f"  (this part: {(v - meds[parent[k]]) * 1e6:+.2f})" if k in parent else ""
            print(f"  {k:42s} {v * 1e6:8.2f} µs  {(v - base) * 1e6:+6.2f}{step}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
