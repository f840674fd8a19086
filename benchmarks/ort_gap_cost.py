"""What Python work between two ONNX Runtime calls costs, by thread pool setting.

    python benchmarks/ort_gap_cost.py MODEL.onnx [--shape 1,1,32,32]

Finding behind it (issue #3, docs/benchmarks.md ninth pass): with the profile's 2
intra-op threads, the agent's ~1.4 µs of bookkeeping per request (no-op runtime) shows
up as 3-5 µs over ``session.run``. This times ``session.run`` back to back, and with a
fixed amount of pure-Python work before each call (a loop of 10 and of 60 additions,
about 0.3 and 1.1 µs alone), for 1 and 2 intra-op threads with ONNX Runtime's spinning
on and off. Each setting runs in its own process; within one, the paths are interleaved
in blocks and the order flips every round. Medians of 60 blocks of 100 calls.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

CHILD = r"""
import json, statistics, sys, time
import numpy as np
import onnxruntime as ort

model, shape, threads, spin = sys.argv[1], [int(d) for d in sys.argv[2].split(",")], int(sys.argv[3]), sys.argv[4]
o = ort.SessionOptions()
o.intra_op_num_threads = threads
o.inter_op_num_threads = 1
o.add_session_config_entry("session.intra_op.allow_spinning", spin)
s = ort.InferenceSession(model, o, providers=["CPUExecutionProvider"])
outs = [x.name for x in s.get_outputs()]
feed = {s.get_inputs()[0].name: np.random.default_rng(0).random(shape, dtype=np.float32)}
run = s._sess.run


def busy(n):
    x = 0
    for i in range(n):
        x += i
    return x


paths = {
    "session.run": lambda: run(outs, feed, None),
    "loop(10) + session.run": lambda: (busy(10), run(outs, feed, None)),
    "loop(60) + session.run": lambda: (busy(60), run(outs, feed, None)),
    "loop(10) alone": lambda: busy(10),
    "loop(60) alone": lambda: busy(60),
}
per = {k: [] for k in paths}
names = list(paths)
for r in range(60):
    for k in names if r % 2 == 0 else names[::-1]:
        f = paths[k]
        for _ in range(25):
            f()
        t = time.perf_counter()
        for _ in range(100):
            f()
        per[k].append((time.perf_counter() - t) / 100)
print(json.dumps({k: statistics.median(v) for k, v in per.items()}))
"""


def _cell(m: dict[str, float], k: str) -> str:
    return f"{m[k] * 1e6:6.2f} ({(m[k] - m['session.run']) * 1e6:+.2f})"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="an ONNX model with one float32 input")
    ap.add_argument("--shape", default="1,1,32,32", help="input shape, comma-separated")
    args = ap.parse_args()
    print(f"{'intra-op threads':>16} {'spinning':>8} {'run':>9} {'+loop(10)':>16} {'+loop(60)':>16} "
          f"{'loop(10)':>9} {'loop(60)':>9}")
    for threads in (2, 1):
        for spin in ("1", "0"):
            out = subprocess.run([sys.executable, "-c", CHILD, args.model, args.shape, str(threads), spin],
                                 capture_output=True, text=True, check=True)
            m = json.loads(out.stdout.strip().splitlines()[-1])
            base = m["session.run"]

            print(f"{threads:>16} {spin:>8} {base * 1e6:7.2f}µs {_cell(m, 'loop(10) + session.run'):>16} "
                  f"{_cell(m, 'loop(60) + session.run'):>16} {m['loop(10) alone'] * 1e6:7.2f}µs "
                  f"{m['loop(60) alone'] * 1e6:7.2f}µs")
    print(f"(µs per call; in brackets, the cost added to session.run; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
