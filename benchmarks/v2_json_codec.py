"""JSON cost of a V2 infer request, standard library against the agent's codec (orjson).

For FP32 tensors of 64, 1,024 (the 32x32 reference input) and 16,384 values: encoding a
request as a client does (``json.dumps`` of ``tolist()``, against
``agent.v2.encode_infer_request(binary=False)``) and decoding it as the endpoint does
(``json.loads`` + ``np.asarray``, against ``agent.v2.decode_infer_request``), timed side
by side with ``timeit``: median of 7 repeats, each the mean of enough calls for ~0.2 s.

Run:  python benchmarks/v2_json_codec.py [--out docs/v2-json-codec-results.md]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import statistics
import sys
import timeit
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent.bundle import TensorSpec  # noqa: E402
from agent.v2 import decode_infer_request, encode_infer_request  # noqa: E402


def per_call_us(fn, repeat: int = 7) -> float:
    number = max(1, int(0.2 / max(timeit.timeit(fn, number=3) / 3, 1e-7)))
    return statistics.median(t / number * 1e6 for t in timeit.repeat(fn, number=number, repeat=repeat))


def stdlib_encode(x: np.ndarray) -> bytes:
    return json.dumps({"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32",
                                   "data": x.ravel().tolist()}]}).encode()


def stdlib_decode(body: bytes) -> np.ndarray:
    t = json.loads(body)["inputs"][0]
    return np.asarray(t["data"], dtype=np.float32).reshape(t["shape"])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, help="Also write the table to this file.")
    args = ap.parse_args()
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())
    lines = [
        f"# V2 JSON codec, {cpu}, Python {platform.python_version()}, "
        f"{dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M UTC}",
        "",
        "Command: `python benchmarks/v2_json_codec.py" + (f" --out {args.out}`" if args.out else "`"),
        "",
        "| values | stdlib encode µs | agent encode µs | stdlib decode µs | agent decode µs | encode ratio | decode ratio |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    print("\n".join(lines), flush=True)
    rng = np.random.default_rng(0)
    for n in (64, 1024, 16384):
        lines.append(row(n, rng.standard_normal((1, n)).astype(np.float32)))
        print(lines[-1], flush=True)
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")


def row(n: int, x: np.ndarray) -> str:
    spec = [TensorSpec(name="input", dtype="float32", shape=[-1, n])]
    body = encode_infer_request({"input": x}, binary=False)[0]
    sbody = stdlib_encode(x)
    assert np.array_equal(decode_infer_request(body, spec)[0]["input"], x)
    assert np.array_equal(stdlib_decode(sbody), x)
    se = per_call_us(lambda: stdlib_encode(x))
    ae = per_call_us(lambda: encode_infer_request({"input": x}, binary=False))
    sd = per_call_us(lambda: stdlib_decode(sbody))
    ad = per_call_us(lambda: decode_infer_request(body, spec))
    return f"| {n} | {se:.1f} | {ae:.1f} | {sd:.1f} | {ad:.1f} | {se / ae:.1f}x | {sd / ad:.1f}x |"


if __name__ == "__main__":
    main()
