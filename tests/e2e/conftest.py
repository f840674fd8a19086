"""End-to-end fixtures: a compiled model, a hub process, agent processes."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from compiler.report import CompileReport


@dataclass(frozen=True)
class Compiled:
    out: Path
    report: CompileReport
    eval_x: object
    eval_y: object

    def bundles(self, precision: str, fmt: str = "onnx", technique: str | None = None) -> list[Path]:
        return [self.out / c.bundle for c in self.report.candidates
                if c.precision == precision and c.format == fmt and c.bundle
                and (technique is None or c.technique == technique)]


@pytest.fixture(scope="session")
def compiled(tmp_path_factory) -> Compiled:
    """The digits CNN compiled for two profiles, once per test session."""
    import numpy as np

    from agent.profiles import load_profile
    from compiler.demo_models import export_pt2, train_digits_cnn, write_calib_eval
    from compiler.pipeline import CompileOptions, compile_model

    d = tmp_path_factory.mktemp("compiled")
    module, x_tr, _y, x_te, y_te = train_digits_cnn(seed=0, epochs=8)
    pt2 = export_pt2(module, x_tr, d / "cnn.pt2")
    calib, ev = write_calib_eval(d, x_tr, x_te, y_te)
    report = compile_model(pt2, [load_profile("x86-gateway-vnni"), load_profile("rpi4-arm64")],
                           calib, ev, d / "out", CompileOptions(name="digits-cnn", version="1.0.0"))
    return Compiled(d / "out", report, np.asarray(x_te), np.asarray(y_te))
