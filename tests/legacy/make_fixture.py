"""Regenerate the LiteRT fixture of the legacy-stack tests (run in the main venv).

    python tests/legacy/make_fixture.py

Converts a tiny seeded torch MLP (4 -> 8 -> 3, ReLU) to ``fixtures/tiny_mlp.tflite``
with litert-torch, then runs it with ai-edge-litert on fixed inputs and writes
``fixtures/tiny_mlp_expected.npz`` (``x``: float32 [3, 4], ``y``: the outputs). The
legacy tests load both with tflite-runtime 2.14 (or ai-edge-litert in the main venv)
and never import torch. Commit both files; they are a few KB. Rerun only when the
model must change: the outputs are what ai-edge-litert computed at generation time.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

FIXTURES = Path(__file__).resolve().parent / "fixtures"
MODEL = FIXTURES / "tiny_mlp.tflite"
EXPECTED = FIXTURES / "tiny_mlp_expected.npz"
ROWS = 3  # the self-test batch; the model is converted for batch 1, so loading it
# with these vectors also exercises LiteRtRuntime's input resize.


def main() -> None:
    import litert_torch
    import torch
    from ai_edge_litert import interpreter

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3)).eval()
    edge = litert_torch.convert(model, (torch.zeros(1, 4),))
    FIXTURES.mkdir(parents=True, exist_ok=True)
    edge.export(str(MODEL))

    x = np.linspace(-1.0, 1.0, ROWS * 4, dtype=np.float32).reshape(ROWS, 4)
    interp = interpreter.Interpreter(model_path=str(MODEL))
    (inp,), (out,) = interp.get_input_details(), interp.get_output_details()
    rows = []
    for row in x:  # batch 1, as converted; the tests check the batched resize agrees
        interp.allocate_tensors()
        interp.set_tensor(inp["index"], row[None, :])
        interp.invoke()
        rows.append(interp.get_tensor(out["index"]).copy())
    y = np.concatenate(rows).astype(np.float32)
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    assert np.allclose(y, ref, atol=1e-5), "LiteRT disagrees with torch"
    with open(EXPECTED, "wb") as fh:
        np.savez(fh, x=x, y=y, input_name=np.array(inp["name"]), output_name=np.array(out["name"]))
    print(f"wrote {MODEL} ({MODEL.stat().st_size} bytes) and {EXPECTED}")
    print(f"input {inp['name']} {inp['shape'].tolist()}, output {out['name']} {out['shape'].tolist()}")


if __name__ == "__main__":
    main()
