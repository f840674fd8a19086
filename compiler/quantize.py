"""Static int8 post-training quantization with ONNX Runtime (QDQ, per-channel).

Settings follow the target profile:

* x86 with VNNI: int8 activations, int8 weights, full range.
* x86 without VNNI (AVX2 only): uint8 activations and ``reduce_range`` (7-bit
  weights), because the AVX2 u8s8 kernels saturate their 16-bit intermediate sums
  with full-range weights, which costs accuracy (REFERENCE.md).
* ARM: uint8 activations when the profile lists uint8, else int8; full range.

Per-channel weights by default; the pipeline also builds per-tensor weights and lets
measured selection choose. Graph outputs stay float (``float_output``), and every
model is compacted (:func:`compact_qdq`).
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_static,
)

from agent.profiles import Profile
from compiler.errors import TechniqueError

__all__ = [
    "CalibrationMethodName",
    "StaticQuantSettings",
    "static_settings_for",
    "NpzCalibrationReader",
    "preprocess_for_quantization",
    "quantize_static_qdq",
    "quantize_preprocessed",
    "compact_qdq",
    "quantize_dynamic_int8",
    "convert_fp16",
    "fp16_storage_model",
    "run_fp16_storage",
]

CalibrationMethodName = Literal["minmax", "entropy", "percentile"]
_METHODS = {
    "minmax": CalibrationMethod.MinMax,
    "entropy": CalibrationMethod.Entropy,
    "percentile": CalibrationMethod.Percentile,
}
CALIBRATION_BATCH = 32


@dataclass(frozen=True)
class StaticQuantSettings:
    """Everything that decides the bytes of a static-quantized model."""

    activation_type: Literal["int8", "uint8"] = "int8"
    weight_type: Literal["int8"] = "int8"
    per_channel: bool = True
    reduce_range: bool = False
    calibrate_method: CalibrationMethodName = "minmax"
    exclude_nodes: tuple[str, ...] = field(default_factory=tuple)
    # The graph's outputs stay float when a Gemm/MatMul computes them: ORT's QGemm
    # (MatMulIntegerToFloat) then writes float directly instead of int8 followed by a
    # QuantizeLinear/DequantizeLinear pair (less work per call, no rounding of the
    # outputs); its inputs and weights are still int8. Not for Conv: ORT has no
    # float-output QLinearConv, so a last Conv would run in float.
    float_output: bool = True

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["exclude_nodes"] = list(self.exclude_nodes)
        d["format"] = "QDQ"
        return d


def static_settings_for(
    profile: Profile, calibrate_method: CalibrationMethodName = "minmax"
) -> StaticQuantSettings:
    """Static QDQ settings for a profile (see the module docstring)."""
    hw = profile.hardware
    if hw.arch == "x86_64":
        if hw.vnni and "int8" in profile.dtypes:
            return StaticQuantSettings("int8", calibrate_method=calibrate_method)
        return StaticQuantSettings("uint8", reduce_range=True, calibrate_method=calibrate_method)
    act: Literal["int8", "uint8"] = "uint8" if "uint8" in profile.dtypes else "int8"
    return StaticQuantSettings(act, calibrate_method=calibrate_method)


class NpzCalibrationReader(CalibrationDataReader):
    """Feeds calibration rows to ONNX Runtime's calibrator in fixed batches, in order."""

    def __init__(self, input_name: str, x: np.ndarray, batch: int = CALIBRATION_BATCH) -> None:
        self._input_name = input_name
        self._x = np.ascontiguousarray(x, dtype=np.float32)
        self._batch = batch
        self._it = self._batches()

    def _batches(self) -> Iterator[dict[str, np.ndarray]]:
        for i in range(0, len(self._x), self._batch):
            yield {self._input_name: self._x[i : i + self._batch]}

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)

    def rewind(self) -> None:
        self._it = self._batches()


def preprocess_for_quantization(model: bytes, workdir: Path) -> tuple[bytes, str | None]:
    """Run ORT's ``quant_pre_process`` (shape inference + graph optimisation).

    Returns the processed model and ``None``, or the original model and the reason
    pre-processing was skipped (some graphs defeat symbolic shape inference; the
    quantizer still works on them, with less fusion).
    """
    from onnxruntime.quantization.shape_inference import quant_pre_process

    src, dst = workdir / "pre_in.onnx", workdir / "pre_out.onnx"
    src.write_bytes(model)
    try:
        quant_pre_process(str(src), str(dst))
    except Exception as e:  # noqa: BLE001 - symbolic shape inference raises anything
        return model, f"quant_pre_process skipped: {type(e).__name__}: {e}"
    return dst.read_bytes(), None


def quantize_static_qdq(
    model: bytes, input_name: str, calib_x: np.ndarray, settings: StaticQuantSettings
) -> tuple[bytes, list[str]]:
    """Quantize ``model`` (fp32 ONNX bytes) statically; returns (model bytes, notes).

    Calibration is deterministic for the same data and settings, so the same inputs
    give byte-identical models.

    Raises:
        TechniqueError: ONNX Runtime's quantizer failed on this graph.
    """
    with tempfile.TemporaryDirectory(prefix="edgefleet-q-") as tmp:
        work = Path(tmp)
        pre, skipped = preprocess_for_quantization(model, work)
        q = quantize_preprocessed(pre, input_name, calib_x, settings, work)
        return q, [skipped] if skipped else []


def quantize_preprocessed(
    pre: bytes,
    input_name: str,
    calib_x: np.ndarray,
    settings: StaticQuantSettings,
    workdir: Path,
    calibration_cache: Path | None = None,
    compact: bool = True,
) -> bytes:
    """Static QDQ quantization of an already pre-processed model.

    With ``calibration_cache`` (a path in ``workdir``), ranges computed by the first
    call are reused by later ones (accuracy-aware tuning quantizes the same model
    many times with different ``exclude_nodes``; the ranges do not depend on them).
    ``compact=False`` returns the quantizer's model with its own names (accuracy
    tuning reads them); :func:`compact_qdq` gives the same outputs in fewer bytes.

    Raises:
        TechniqueError: ONNX Runtime's quantizer failed on this graph.
    """
    src, dst = workdir / "fp32.onnx", workdir / "int8.onnx"
    src.write_bytes(pre)
    qtype = {"int8": QuantType.QInt8, "uint8": QuantType.QUInt8}
    extra: dict[str, Any] = {}
    if settings.float_output and (ops := _output_op_types(pre)):
        # Per op type: for hidden nodes of these types the consumer quantizes the same
        # tensor at its input, so only graph outputs end up float.
        extra["OpTypesToExcludeOutputQuantization"] = ops
    try:
        quantize_static(
            str(src),
            str(dst),
            NpzCalibrationReader(input_name, calib_x),
            quant_format=QuantFormat.QDQ,
            per_channel=settings.per_channel,
            reduce_range=settings.reduce_range,
            activation_type=qtype[settings.activation_type],
            weight_type=qtype[settings.weight_type],
            calibrate_method=_METHODS[settings.calibrate_method],
            nodes_to_exclude=list(settings.exclude_nodes),
            calibration_cache_path=None if calibration_cache is None else str(calibration_cache),
            extra_options=extra,
        )
    except Exception as e:  # noqa: BLE001 - the quantizer raises many untyped errors
        raise TechniqueError(f"static quantization failed: {type(e).__name__}: {e}") from e
    return compact_qdq(dst.read_bytes()) if compact else dst.read_bytes()


def _output_op_types(model: bytes) -> list[str]:
    """Op types among Gemm/MatMul of the nodes that compute a graph output."""
    import onnx

    g = onnx.load_model_from_string(model).graph
    outputs = {o.name for o in g.output}
    return sorted({n.op_type for n in g.node if outputs & set(n.output)} & {"Gemm", "MatMul"})


# ONNX Runtime's quantizer names every tensor it adds after the float tensor, with a
# long suffix (``relu_1_DequantizeLinear_Output``); each name is stored once per use.
# Longest first: ``_quantized_scale`` before ``_quantized`` and ``_scale``.
_TENSOR_SUFFIXES = (
    ("_DequantizeLinear_Output", "_dq"),
    ("_QuantizeLinear_Output", "_q"),
    ("_QuantizeLinear_Input", "_f"),
    ("_quantized_zero_point", "_z"),
    ("_quantized_scale", "_s"),
    ("_zero_point", "_z"),
    ("_quantized", "_q"),
    ("_scale", "_s"),
)
_NODE_SUFFIXES = (("_DequantizeLinear", "_dq"), ("_QuantizeLinear", "_q"))


def _short(name: str, suffixes: tuple[tuple[str, str], ...]) -> str:
    for long, short in suffixes:
        if name.endswith(long):
            return name[: -len(long)] + short
    return name


def _renames(names: list[str], suffixes: tuple[tuple[str, str], ...], keep: set[str]) -> dict[str, str]:
    """Short names for ``names`` (sorted, so the result does not depend on graph order);
    a name whose short form is taken keeps its long one."""
    taken = set(names) | keep
    out: dict[str, str] = {}
    for name in sorted(set(names) - keep):
        new = _short(name, suffixes)
        if new != name and new not in taken:
            out[name] = new
            taken.add(new)
    return out


def compact_qdq(model: bytes) -> bytes:
    """Drop or shorten what a QDQ model carries but does not need (docs/compiler.md,
    "Where the int8 bytes go"); outputs are bit-identical, ORT fuses the same ops.

    * zero-point inputs of int32 bias DequantizeLinear nodes that are all zeros (the
      input is optional and defaults to 0; ORT fuses the same QLinearConv/QGemm);
    * ``value_info`` (intermediate shapes from pre-processing; ORT infers them);
    * opset imports of domains no node uses (the quantizer declares nine);
    * duplicate activation zero points: Q/DQ zero-point initializers of activations
      holding one repeated value (every ReLU output's -128) become one shared
      initializer per (type, shape, value), named after its content (weights keep their
      own: ORT's exact int8 path fails on a weight zero point that is shared);
    * the quantizer's long suffixes, shortened in tensor and Q/DQ node names
      (``relu_1_DequantizeLinear_Output`` -> ``relu_1_dq``, ``head.1.weight_quantized``
      -> ``head.1.weight_q``, ``_scale`` -> ``_s``, ``_zero_point`` -> ``_z``). The
      float tensor and the graph's input and output names stay, so the model still reads
      like the fp32 graph; the names compute nodes had (``nodes_to_exclude`` matches
      them) are kept.

    Deterministic: the same model gives the same bytes.
    """
    import onnx
    from onnx import numpy_helper

    proto = onnx.load_model_from_string(model)
    g = proto.graph
    inits = {i.name: i for i in g.initializer}
    zero_points: set[str] = set()
    for n in g.node:
        if n.op_type != "DequantizeLinear" or len(n.input) != 3:
            continue
        x, zp = inits.get(n.input[0]), inits.get(n.input[2])
        if x is None or zp is None or x.data_type != onnx.TensorProto.INT32:
            continue
        if not numpy_helper.to_array(zp).any():
            zero_points.add(n.input[2])
            del n.input[2]
    used = {i for n in g.node for i in n.input}
    for name in zero_points - used:
        g.initializer.remove(inits[name])
    del g.value_info[:]
    # Names inside control-flow subgraphs (If/Loop bodies) may refer to outer tensors,
    # and their nodes and model-local functions use opsets too; this pass does not
    # follow them, so such models keep their names and opset imports.
    if not any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
               for n in g.node for a in n.attribute):
        _share_zero_points(g)
        _shorten_names(g)
        if not proto.functions:
            domains = {n.domain for n in g.node} | {""}
            kept = [o for o in proto.opset_import if o.domain in domains]
            del proto.opset_import[:]
            proto.opset_import.extend(kept)
    return proto.SerializeToString(deterministic=True)


def _share_zero_points(g: Any) -> None:
    """One initializer per distinct uniform Q/DQ zero point (see :func:`compact_qdq`)."""
    from onnx import helper, numpy_helper

    inits = {i.name: i for i in g.initializer}
    uses: dict[str, list[tuple[Any, int]]] = {}
    elsewhere = {o.name for o in g.output}  # read other than as a Q/DQ zero point: left alone
    for n in g.node:
        for k, name in enumerate(n.input):
            if k == 2 and n.op_type in ("QuantizeLinear", "DequantizeLinear") and name in inits:
                if n.input[0] in inits:
                    # A weight's zero point stays its own: ORT's exact int8 path (x86
                    # without VNNI) converts each s8 weight and its zero point to u8 under
                    # a name derived from the zero point's, and fails on a shared one.
                    elsewhere.add(name)
                else:
                    uses.setdefault(name, []).append((n, 2))
            else:
                elsewhere.add(name)
    for name in elsewhere & uses.keys():
        del uses[name]
    groups: dict[tuple[int, tuple[int, ...], int], list[str]] = {}
    for name in sorted(uses):
        init = inits[name]
        values = numpy_helper.to_array(init)
        if values.size == 0 or (values != values.flat[0]).any():
            continue
        key = (init.data_type, tuple(init.dims), int(values.flat[0]))
        groups.setdefault(key, []).append(name)
    taken = set(inits) | {t for n in g.node for t in n.output} | {i.name for i in g.input}
    for (dtype, dims, value), names in sorted(groups.items()):
        if len(names) < 2:
            continue
        type_name = helper.tensor_dtype_to_np_dtype(dtype).name
        shape = "".join(f"_{d}" for d in dims)
        shared = f"zp_{type_name}{shape}_{value}".replace("-", "m")
        if shared in taken:
            continue
        taken.add(shared)
        g.initializer.append(inits[names[0]])
        g.initializer[-1].name = shared
        for name in names:
            g.initializer.remove(inits[name])
            for n, k in uses[name]:
                n.input[k] = shared


def _shorten_names(g: Any) -> None:
    """Shorten the quantizer's tensor and Q/DQ node names (see :func:`compact_qdq`)."""
    qdq_ops = ("QuantizeLinear", "DequantizeLinear")
    # Only what Q/DQ nodes read or write: a model's own tensor ending in "_scale" stays.
    tensors = [t for n in g.node if n.op_type in qdq_ops for t in (*n.input, *n.output) if t]
    everything = {i.name for i in g.initializer} | {t for n in g.node for t in (*n.input, *n.output)}
    keep = {v.name for v in (*g.input, *g.output)} | (everything - set(tensors))
    rename = _renames(tensors, _TENSOR_SUFFIXES, keep)
    for init in g.initializer:
        init.name = rename.get(init.name, init.name)
    for n in g.node:
        for k, t in enumerate(n.input):
            n.input[k] = rename.get(t, t)
        for k, t in enumerate(n.output):
            n.output[k] = rename.get(t, t)
    qdq = [n.name for n in g.node if n.op_type in qdq_ops]
    node_rename = _renames(qdq, _NODE_SUFFIXES, {n.name for n in g.node} - set(qdq))
    for n in g.node:
        if n.op_type in qdq_ops:
            n.name = node_rename.get(n.name, n.name)


def quantize_dynamic_int8(model: bytes) -> tuple[bytes, list[str]]:
    """Dynamic int8 (weights int8 offline, activations quantized at run time).

    Often *slower* than fp32 for convolutions on x86 (ConvInteger has no fast
    kernel); it can pay off for MatMul/Gemm-heavy graphs. Selection keeps it only
    when it measures faster.

    Raises:
        TechniqueError: ONNX Runtime's quantizer failed on this graph.
    """
    from onnxruntime.quantization import quantize_dynamic

    notes: list[str] = []
    with tempfile.TemporaryDirectory(prefix="edgefleet-dq-") as tmp:
        work = Path(tmp)
        pre, skipped = preprocess_for_quantization(model, work)
        if skipped:
            notes.append(skipped)
        src, dst = work / "fp32.onnx", work / "dyn.onnx"
        src.write_bytes(pre)
        try:
            quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, per_channel=False)
        except Exception as e:  # noqa: BLE001 - the quantizer raises many untyped errors
            raise TechniqueError(f"dynamic quantization failed: {type(e).__name__}: {e}") from e
        return dst.read_bytes(), notes


def convert_fp16(model: bytes) -> tuple[bytes, list[str]]:
    """fp16 weights and arithmetic, fp32 graph inputs/outputs (``keep_io_types``).

    Built for profiles whose hardware or dtypes list fp16 (GPU/NPU targets). On an x86
    host CPU, ONNX Runtime runs most fp16 ops by casting back to fp32, so host latency
    is usually *worse* than fp32 and selection rejects it there; the report says so.

    Raises:
        TechniqueError: the converter failed on this graph.
    """
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    try:
        proto = convert_float_to_float16(
            onnx.load_model_from_string(model), keep_io_types=True, disable_shape_infer=False
        )
    except Exception as e:  # noqa: BLE001 - the converter raises many untyped errors
        raise TechniqueError(f"fp16 conversion failed: {type(e).__name__}: {e}") from e
    return proto.SerializeToString(deterministic=True), [
        "fp16 weights/activations, fp32 inputs and outputs (keep_io_types)"
    ]


FP16_MAX = 65504.0
FP16_CHECK_ROWS = 1024  # calibration rows the fp16 range check runs


def _unoptimized_session(model: bytes) -> Any:
    """A one-thread CPU session with graph optimizations off: every node runs as
    written (no fusion hides an intermediate, no cast pair is folded away)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])


def fp16_overflows(model: bytes, input_name: str, x: np.ndarray) -> list[str]:
    """Float tensors of the fp32 ``model`` whose values on ``x`` (calibration rows) reach
    beyond fp16's largest finite value, as ``"name (max |v| 1.1e+05)"``.

    Host measurements cannot catch this: ONNX Runtime's CPU provider computes many fp16
    ops in fp32, so an fp16 model that overflows to inf on a GPU stays finite here. Every
    node output is made a graph output and read with graph optimizations off, so fused
    intermediates are seen too. At most ``FP16_CHECK_ROWS`` rows are run.
    """
    import onnx

    proto = onnx.load_model_from_string(model)
    present = {o.name for o in proto.graph.output}
    for node in proto.graph.node:
        for name in node.output:
            if name and name not in present:
                proto.graph.output.append(onnx.ValueInfoProto(name=name))
                present.add(name)
    sess = _unoptimized_session(proto.SerializeToString())
    names = [o.name for o in sess.get_outputs()]
    # A running maximum per tensor, a few rows at a time: every intermediate of every
    # row at once would take hundreds of MiB for an ordinary CNN.
    peaks = dict.fromkeys(names, 0.0)
    for start in range(0, min(len(x), FP16_CHECK_ROWS), 32):
        for name, v in zip(names, sess.run(names, {input_name: x[start:start + 32]}), strict=True):
            if v.dtype.kind == "f" and v.size:
                finite = np.abs(v[np.isfinite(v)])
                if finite.size:
                    peaks[name] = max(peaks[name], float(finite.max()))
    return [f"{name} (max |v| {peak:.3g})" for name, peak in peaks.items() if peak > FP16_MAX]


def fp16_storage_model(model: bytes) -> bytes:
    """The fp32 ``model`` with fp16 storage emulated: every float initializer and
    Constant rounded to fp16 as ``convert_fp16`` ships them (clamped to +-65504), and
    every other float graph input and node output passed through ``Cast`` to FLOAT16
    and back (past 65504 that gives inf, as fp16 hardware does). Arithmetic inside each operator stays fp32, as on GPUs
    that accumulate fp16 products in fp32 (tensor cores, TensorRT's fp16 mode).

    Why: ONNX Runtime's CPU provider runs an fp16 model's operators that lack fp16
    kernels in fp32, and drops the casts *between* such operators, so intermediate
    tensors never get rounded to fp16 on the host. ``x + 2048 - 2048`` comes back exact
    from the fp16 model there, while fp16 hardware returns a multiple of 2. Run the
    result with graph optimizations off, so that no cast pair is folded away.
    Operators with subgraphs (If, Loop, Scan) are rounded at their outputs only.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    from onnxruntime.transformers.float16 import convert_np_to_float16

    def as_shipped(t: onnx.TensorProto) -> onnx.TensorProto:
        # The converter's own rounding: values past fp16's range are clamped to +-65504
        # and tiny ones kept off zero, not turned into inf or 0 (``x / 65535``).
        arr = numpy_helper.to_array(t)
        half = convert_np_to_float16(np.atleast_1d(arr)).reshape(arr.shape)  # it refuses 0-d arrays
        return numpy_helper.from_array(half.astype(np.float32), t.name)

    proto = onnx.load_model_from_string(model)
    g = proto.graph
    for i, init in enumerate(g.initializer):
        if init.data_type == TensorProto.FLOAT:
            g.initializer[i].CopyFrom(as_shipped(init))
    constants: set[str] = set()  # Constant outputs, rounded in place like initializers
    for node in g.node:
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value" and a.t.data_type == TensorProto.FLOAT:
                    a.t.CopyFrom(as_shipped(a.t))
                    constants.update(node.output)
    inferred = onnx.shape_inference.infer_shapes(proto)
    types = {v.name: v.type.tensor_type.elem_type
             for v in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]}
    nodes: list[onnx.NodeProto] = []

    def round_into(src: str, dst: str) -> None:
        nodes.append(helper.make_node("Cast", [src], [f"{dst}__fp16"], to=TensorProto.FLOAT16))
        nodes.append(helper.make_node("Cast", [f"{dst}__fp16"], [dst], to=TensorProto.FLOAT))

    renamed: dict[str, str] = {}  # tensor -> its rounded copy, for the nodes that read it
    for inp in g.input:
        if types.get(inp.name) == TensorProto.FLOAT:
            renamed[inp.name] = f"{inp.name}__fp16r"
            round_into(inp.name, renamed[inp.name])
    outputs = {o.name for o in g.output}
    for node in g.node:
        for k, name in enumerate(node.input):
            if name in renamed:
                node.input[k] = renamed[name]
        nodes.append(node)
        for k, name in enumerate(node.output):
            if not name or name in constants or types.get(name) != TensorProto.FLOAT:
                continue
            if name in outputs:
                # A graph output keeps its name: the node writes a raw copy, rounded into it.
                node.output[k] = f"{name}__fp32"
                round_into(node.output[k], name)
            else:
                renamed[name] = f"{name}__fp16r"
                round_into(name, renamed[name])
    del g.node[:]
    g.node.extend(nodes)
    return proto.SerializeToString()


def run_fp16_storage(model: bytes, input_name: str, x: np.ndarray, batch: int = 64) -> list[np.ndarray]:
    """Outputs of :func:`fp16_storage_model` on ``x`` (ONNX Runtime, CPU, optimizations
    off so that the rounding casts stay), in ``batch``-row slices."""
    from compiler.measure import run_batched

    return run_batched(_unoptimized_session(fp16_storage_model(model)), input_name, x, batch)
