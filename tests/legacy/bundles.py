"""Bundles of the committed LiteRT fixture (see make_fixture.py); no torch needed."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from agent.bundle import Manifest, write_bundle
from agent.features import build_reference

FIXTURES = Path(__file__).resolve().parent / "fixtures"
TFLITE_MODEL = FIXTURES / "tiny_mlp.tflite"
TFLITE_EXPECTED = FIXTURES / "tiny_mlp_expected.npz"


def tflite_expected() -> tuple[str, str, np.ndarray, np.ndarray]:
    """(input name, output name, x, y) that ai-edge-litert computed for the fixture."""
    with np.load(TFLITE_EXPECTED) as d:
        return str(d["input_name"]), str(d["output_name"]), d["x"].copy(), d["y"].copy()


def tflite_bundle(
    out: Path, *, name: str = "tiny-tflite", version: str = "1.0.0",
    profile: str = "x86-gateway-vnni", bad_selftest: bool = False,
) -> tuple[Manifest, str]:
    """Write a LiteRT bundle of the fixture model; returns (manifest, sha256)."""
    in_name, out_name, x, y = tflite_expected()
    if bad_selftest:
        y = y + 1.0
    ref = build_reference(x, y.argmax(1), classes=["0", "1", "2"])
    return write_bundle(
        out,
        manifest=dict(
            name=name, version=version, format="tflite", precision="fp32", runtime="litert",
            min_runtime_version="1.0", profile=profile,
            inputs=[dict(name=in_name, dtype="float32", shape=[-1, 4])],
            outputs=[dict(name=out_name, dtype="float32", shape=[-1, 3])],
            labels=["0", "1", "2"], selftest_tolerance=1e-4,
        ),
        model=TFLITE_MODEL.read_bytes(),
        selftest_inputs={in_name: x}, selftest_outputs={out_name: y}, reference=ref,
    )
