"""ONNX Runtime.

The request path calls the session's C++ ``run`` directly, bound once at load with the
output names: ``InferenceSession.run`` adds Python-side checks on every call (missing
inputs, OrtValue ownership, graph capture) that cost more than a small model's
inference. The one check that matters here (every required input is present) is done
with a single set comparison; ORT itself rejects unknown names, dtypes and shapes.
"""

from __future__ import annotations

import functools
import logging
import platform
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import onnxruntime as ort

from agent.bundle import TensorSpec
from agent.errors import RuntimeLoadError
from agent.profiles import RuntimeOptions
from agent.runtimes.base import register

_ORT_TYPES = {
    "tensor(float)": "float32", "tensor(double)": "float64", "tensor(float16)": "float16",
    "tensor(int64)": "int64", "tensor(int32)": "int32", "tensor(int16)": "int16",
    "tensor(int8)": "int8", "tensor(uint8)": "uint8", "tensor(uint16)": "uint16",
    "tensor(uint32)": "uint32", "tensor(uint64)": "uint64", "tensor(bool)": "bool",
    "tensor(string)": "string",
}


def _spec(arg: ort.NodeArg) -> TensorSpec:
    shape = [d if isinstance(d, int) and d > 0 else -1 for d in arg.shape]
    dtype = _ORT_TYPES.get(arg.type, "float32")
    return TensorSpec(name=arg.name, dtype=dtype, shape=shape)  # type: ignore[arg-type]


log = logging.getLogger(__name__)

_InvalidArgument = ort.capi.onnxruntime_pybind11_state.InvalidArgument
_Fail = ort.capi.onnxruntime_pybind11_state.Fail


@functools.cache
def x86_without_vnni() -> bool:
    """True on an x86-64 host whose CPU lacks AVX-512 VNNI and AVX-VNNI (read from
    Linux ``/proc/cpuinfo``; False where it cannot be read, or off x86).

    There, ONNX Runtime's default int8 GEMM (u8s8 through ``vpmaddubsw``) saturates its
    16-bit intermediate sums on signed-int8 (s8s8) models, so such a model computes
    something other than it does on the VNNI target it was built for (on the 8x8 digits
    CNN: 98.4% instead of 99.3% agreement with fp32). Sessions on such hosts use ORT's
    exact path, ``session.x64quantprecision=1``: the same speed for the 8x8 digits CNN,
    27% slower for the 32x32 one (measured once by hand, 2026-11-27, on an AMD EPYC with
    AVX2; no committed benchmark repeats it, and this session's hosts have VNNI). It does
    not touch float kernels.
    """
    if platform.machine() not in ("x86_64", "AMD64"):
        return False
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return not {"avx512_vnni", "avx_vnni"} & set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return False


def open_session(
    model: str | bytes, configure: Callable[[ort.SessionOptions], None], providers: list[str]
) -> ort.InferenceSession:
    """An ``InferenceSession`` whose options ``configure`` fills in; on an x86 host
    without VNNI, with ONNX Runtime's exact int8 path (:func:`x86_without_vnni`).

    ONNX Runtime 1.32 cannot build some graphs on that path (an int8 transformer
    encoder fails with "Attempt to replace the existing tensor"); those are opened
    again on the default path, with a warning, since a model that loads beats one
    that does not.

    Raises:
        Exception: whatever ONNX Runtime raises when the model cannot load at all.
    """
    so = ort.SessionOptions()
    configure(so)
    if not x86_without_vnni():
        return ort.InferenceSession(model, so, providers=providers)
    so.add_session_config_entry("session.x64quantprecision", "1")
    try:
        return ort.InferenceSession(model, so, providers=providers)
    except Exception as e:  # ORT raises its own untyped Fail errors
        log.warning("onnxruntime cannot use its exact int8 path for this model (%s); "
                    "using the default path, whose int8 sums may saturate on this CPU", str(e)[:200])
    so = ort.SessionOptions()
    configure(so)
    return ort.InferenceSession(model, so, providers=providers)


@register
class OnnxRuntime:
    key: ClassVar[str] = "onnxruntime"

    def __init__(self) -> None:
        self._session: ort.InferenceSession | None = None
        self._inputs: list[TensorSpec] = []
        self._outputs: list[TensorSpec] = []
        self._output_names: list[str] = []
        self._input_names: frozenset[str] = frozenset()
        self._required: frozenset[str] = frozenset()
        self._run: Any = None  # run(output_names, feed, run_options), None when unloaded

    @classmethod
    def library_version(cls) -> str:
        return str(ort.__version__)

    def load(self, model_path: str, options: RuntimeOptions) -> None:
        def configure(so: ort.SessionOptions) -> None:
            so.intra_op_num_threads = options.intra_op_threads
            so.inter_op_num_threads = 1
            so.log_severity_level = 3

        available = set(ort.get_available_providers())
        providers = [p for p in options.execution_providers if p in available]
        if "CPUExecutionProvider" not in providers:
            providers.append("CPUExecutionProvider")
        try:
            self._session = open_session(model_path, configure, providers)
        except Exception as e:  # ORT raises its own untyped Fail/InvalidGraph errors
            raise RuntimeLoadError(f"onnxruntime could not load {model_path}: {e}") from e
        self._inputs = [_spec(a) for a in self._session.get_inputs()]
        self._outputs = [_spec(a) for a in self._session.get_outputs()]
        self._output_names = [o.name for o in self._outputs]
        meta = self._session.get_inputs()
        self._input_names = frozenset(a.name for a in meta)
        self._required = frozenset(a.name for a in meta if not a.type.startswith("optional"))
        # Only a CPU-only session may skip InferenceSession.run: with another provider,
        # run() falls back to CPU when the provider fails, which the raw call does not.
        raw = getattr(self._session, "_sess", None)
        cpu_only = providers == ["CPUExecutionProvider"]
        self._run = raw.run if raw is not None and cpu_only else self._session.run

    @property
    def inputs(self) -> list[TensorSpec]:
        return self._inputs

    @property
    def outputs(self) -> list[TensorSpec]:
        return self._outputs

    def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        run = self._run
        if run is None:
            raise RuntimeError("model not loaded")
        names = self._output_names
        if inputs.keys() != self._input_names:
            missing = self._required - inputs.keys()
            if missing:
                raise ValueError(f"missing inputs {sorted(missing)}; model inputs are {sorted(self._input_names)}")
        try:
            res = run(names, inputs, None)
        except (_InvalidArgument, _Fail) as e:
            raise ValueError(str(e)) from e
        return dict(zip(names, res, strict=True))

    def warmup(self, inputs: dict[str, np.ndarray] | None = None) -> None:
        if inputs is None:
            return
        for _ in range(3):
            self.infer(inputs)

    def unload(self) -> None:
        self._session = None
        self._run = None
