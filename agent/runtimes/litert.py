"""LiteRT (``ai-edge-litert``), falling back to ``tflite-runtime`` on older device stacks."""

from __future__ import annotations

import threading
from typing import Any, ClassVar

import numpy as np

try:
    from ai_edge_litert import interpreter as _tfl  # maintained successor

    _LIB = "ai-edge-litert"
except ImportError:  # pragma: no cover - exercised in the legacy-stack CI job
    from tflite_runtime import interpreter as _tfl  # type: ignore[no-redef]

    _LIB = "tflite-runtime"

from agent.bundle import TensorSpec
from agent.errors import RuntimeLoadError
from agent.profiles import RuntimeOptions
from agent.runtimes.base import register


def _dtype_name(dt: Any) -> str:
    return np.dtype(dt).name


@register
class LiteRtRuntime:
    key: ClassVar[str] = "litert"

    def __init__(self) -> None:
        self._interp: Any = None
        self._lock = threading.Lock()  # an Interpreter is not thread-safe
        self._in: list[dict[str, Any]] = []
        self._out: list[dict[str, Any]] = []
        self._shapes: list[tuple[int, ...]] = []  # current input shapes, so a call need not ask
        self._in_dtypes: list[np.dtype] = []

    @classmethod
    def library_version(cls) -> str:
        from importlib.metadata import version

        return f"{version(_LIB)}"

    def load(self, model_path: str, options: RuntimeOptions) -> None:
        try:
            self._interp = _tfl.Interpreter(model_path=model_path, num_threads=options.intra_op_threads)
            self._interp.allocate_tensors()
        except (ValueError, RuntimeError) as e:
            raise RuntimeLoadError(f"LiteRT could not load {model_path}: {e}") from e
        self._in = self._interp.get_input_details()
        self._out = self._interp.get_output_details()
        self._shapes = [tuple(int(v) for v in d["shape"]) for d in self._in]
        # An input already of the tensor's dtype needs no conversion (the common case).
        self._in_dtypes = [np.dtype(d["dtype"]) for d in self._in]

    @staticmethod
    def _spec(d: dict[str, Any]) -> TensorSpec:
        shape = [int(s) if s > 0 else -1 for s in d.get("shape_signature", d["shape"])]
        return TensorSpec(name=d["name"], dtype=_dtype_name(d["dtype"]), shape=shape)  # type: ignore[arg-type]

    @property
    def inputs(self) -> list[TensorSpec]:
        return [self._spec(d) for d in self._in]

    @property
    def outputs(self) -> list[TensorSpec]:
        return [self._spec(d) for d in self._out]

    @staticmethod
    def _to_input(d: dict[str, Any], value: np.ndarray) -> np.ndarray:
        """Quantize float inputs of full-integer models with the tensor's scale and zero point."""
        arr = np.asarray(value)
        dt = np.dtype(d["dtype"])
        scale, zero = d.get("quantization", (0.0, 0))
        if dt.kind in "iu" and arr.dtype.kind == "f" and scale:
            info = np.iinfo(dt)
            return np.clip(np.round(arr / scale) + zero, info.min, info.max).astype(dt)
        return np.asarray(arr, dtype=dt)

    @staticmethod
    def _from_output(d: dict[str, Any], value: np.ndarray) -> np.ndarray:
        """Dequantize integer outputs of full-integer models to float32."""
        scale, zero = d.get("quantization", (0.0, 0))
        if np.dtype(d["dtype"]).kind in "iu" and scale:
            return ((value.astype(np.float32) - zero) * scale).astype(np.float32)
        return value

    def _run_one(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
        interp = self._interp
        if any(have != arr.shape for have, arr in zip(self._shapes, arrays, strict=True)):
            try:
                for k, (d, arr) in enumerate(zip(self._in, arrays, strict=True)):
                    interp.resize_tensor_input(d["index"], list(arr.shape))
                    self._shapes[k] = arr.shape
                interp.allocate_tensors()
            except (ValueError, RuntimeError):
                self._shapes = [()] * len(self._in)  # unknown now: resize and allocate next time
                raise
        for d, arr in zip(self._in, arrays, strict=True):
            interp.set_tensor(d["index"], arr)
        interp.invoke()
        return [interp.get_tensor(d["index"]).copy() for d in self._out]

    def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self._interp is None:
            raise RuntimeError("model not loaded")
        arrays = []
        for d, dt in zip(self._in, self._in_dtypes, strict=True):
            try:
                value = inputs[d["name"]]
            except KeyError as e:
                raise ValueError(f"missing input {e}") from e
            ok = type(value) is np.ndarray and value.dtype == dt
            arrays.append(value if ok else self._to_input(d, value))
        with self._lock:
            try:
                outs = self._run_one(arrays)
            except (ValueError, RuntimeError) as e:
                raise ValueError(str(e)) from e
        return {d["name"]: self._from_output(d, o) for d, o in zip(self._out, outs, strict=True)}

    def warmup(self, inputs: dict[str, np.ndarray] | None = None) -> None:
        if inputs is not None:
            for _ in range(3):
                self.infer(inputs)

    def unload(self) -> None:
        with self._lock:
            self._interp = None
