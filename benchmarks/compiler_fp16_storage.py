"""What fp16 storage costs the reference models, as `compile` scores fp16 (issue #5).

ONNX Runtime's CPU provider keeps an fp16 model's intermediates in fp32 between operators
it has no fp16 kernel for, so the host's run of an fp16 model says little about fp16
hardware. ``compile`` also scores the fp32 model with fp16 storage emulated
(``compiler.quantize.fp16_storage_model``) and keeps the lower figure. This benchmark
trains the digits CNN and MLP (as ``compiler_techniques.py`` does), compiles them for the
fp16 profile ``jetson-orin-cuda``, and prints, per model: fp32 accuracy, the host's run of
the fp16 model, the emulated figure, and the top-1 agreement of the emulated model's
predictions with fp32.

Run:  python benchmarks/compiler_fp16_storage.py [--epochs 15] [--width 1] [--size 32]
"""

from __future__ import annotations

import argparse
import datetime as dt
import platform
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent.profiles import load_profile  # noqa: E402
from compiler import demo_models as dm  # noqa: E402
from compiler.datasets import load_npz  # noqa: E402
from compiler.measure import LatencySettings  # noqa: E402
from compiler.model_source import load_model  # noqa: E402
from compiler.pipeline import CompileOptions, compile_model  # noqa: E402
from compiler.quantize import run_fp16_storage  # noqa: E402

PROFILE = "jetson-orin-cuda"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--width", type=float, default=1.0, help="Width multiplier of both models.")
    ap.add_argument("--size", type=int, default=32, help="Digits upscaled to SIZE x SIZE.")
    args = ap.parse_args()
    print(f"# fp16 storage, {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC, {platform.processor() or platform.machine()}, "
          f"profile {PROFILE}, {args.size}x{args.size}, {args.epochs} epochs, width {args.width:g}")
    print("| Model | fp32 accuracy | fp16, host run | fp16, storage emulated | emulated top-1 agreement with fp32 |")
    print("|---|---:|---:|---:|---:|")
    for name, train in (("CNN", dm.train_digits_cnn), ("MLP", dm.train_digits_mlp)):
        root = Path(tempfile.mkdtemp(prefix=f"fp16-{name}-"))
        module, x_tr, _, x_te, y_te = train(seed=0, epochs=args.epochs, size=args.size, width=args.width)
        pt2 = dm.export_pt2(module, x_tr, root / "m.pt2")
        calib, ev = dm.write_calib_eval(root, x_tr, x_te, y_te, calib_rows=256)
        rep = compile_model(pt2, [load_profile(PROFILE)], calib, ev, root / "out",
                            CompileOptions(name=name.lower(), version="1.0.0", seed=0, tflite=False,
                                           dynamic_int8=False, latency=LatencySettings(warmup=3, rounds=2,
                                                                                       runs_per_round=5)))
        fp32 = next(c for c in rep.candidates if c.format == "onnx" and c.precision == "fp32")
        fp16 = next(c for c in rep.candidates if c.format == "onnx" and c.precision == "fp16")
        note = next((n for n in fp16.notes if "fp16 storage emulated" in n), "")
        # The host's figure is in the note when emulation scored lower; recompute both here.
        data = load_npz(ev, "eval", need_labels=True)
        src = load_model(pt2, data.x[:1])
        emulated = run_fp16_storage(src.data, src.input.name, data.x)[0]
        emu_acc = float((emulated.argmax(1) == data.y).mean())
        agree = float((emulated.argmax(1) == np.asarray(fp32_pred(src, data.x))).mean())
        host = fp16.accuracy if "no worse" in note else _host_from(note)
        print(f"| {name} width {args.width:g} | {fp32.accuracy:.4f} | {host:.4f} | {emu_acc:.4f} | {agree:.4f} |")


def fp32_pred(src, x: np.ndarray) -> np.ndarray:  # type: ignore[no-untyped-def]
    import onnxruntime as ort

    sess = ort.InferenceSession(src.data, providers=["CPUExecutionProvider"])
    return sess.run(None, {src.input.name: x})[0].argmax(1)


def _host_from(note: str) -> float:
    return float(note.rsplit("measured ", 1)[1])


if __name__ == "__main__":
    main()
