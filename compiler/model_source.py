"""Reading the compiler's input model and converting it to a canonical ONNX graph.

Accepted inputs:

* a ``torch.export`` ExportedProgram saved with ``torch.export.save`` (``.pt2``),
  converted with the dynamo ONNX exporter (opset :data:`OPSET`) to a graph with one
  input ``input`` and outputs ``logits`` (``logits``, ``output_1``, ... if several),
  whose batch dimension is symbolic (``batch``);
* an ONNX file, used as is (names are read from its graph);
* ``package.module:factory`` plus a state_dict file (:func:`load_factory_model`): the
  factory is called with no arguments, the weights are loaded strictly, and the module
  is exported like a ``.pt2``. Only a ``module:factory`` model (or a ``.pt2``) can feed
  TFLite conversion and the ``--train`` techniques, which need torch.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from compiler.errors import ModelLoadError

__all__ = [
    "OPSET",
    "OnnxModel",
    "TensorInfo",
    "load_model",
    "load_factory_model",
    "is_factory_spec",
    "onnx_tensor_infos",
    "strip_exporter_metadata",
    "with_dynamic_batch",
]

OPSET = 18
MAX_MODEL_FILE_BYTES = 2 << 30
BATCH_DIM = "batch"


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str  # numpy spelling, e.g. "float32"
    shape: list[int | str]  # str = symbolic dimension

    def spec_shape(self) -> list[int]:
        """Shape for a bundle TensorSpec: symbolic/unknown dimensions become -1."""
        return [d if isinstance(d, int) and d > 0 else -1 for d in self.shape]


@dataclass(frozen=True)
class OnnxModel:
    """The canonical fp32 ONNX model every candidate starts from."""

    data: bytes
    inputs: list[TensorInfo]
    outputs: list[TensorInfo]
    source_path: Path
    source_kind: str  # "pt2" or "onnx"
    source_sha256: str
    exported: Any = field(default=None, repr=False, compare=False)  # torch ExportedProgram
    module: Any = field(default=None, repr=False, compare=False)  # torch nn.Module (factory)

    def torch_module(self) -> Any:
        """A torch module computing this model, or None for ONNX inputs."""
        if self.module is not None:
            return self.module
        if self.exported is not None:
            from torchao.quantization.pt2e import allow_exported_model_train_eval

            # An unlifted program refuses .eval() unless told how to switch modes.
            module = self.exported.module()
            allow_exported_model_train_eval(module)
            return module
        return None

    @property
    def input(self) -> TensorInfo:
        return self.inputs[0]

    @property
    def output(self) -> TensorInfo:
        return self.outputs[0]


def _np_dtype(elem_type: int) -> str:
    try:
        return str(np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type)))
    except (KeyError, TypeError, ValueError):
        return "unknown"


def onnx_tensor_infos(model: onnx.ModelProto) -> tuple[list[TensorInfo], list[TensorInfo]]:
    """Graph inputs (initializers excluded) and outputs as :class:`TensorInfo`."""
    inits = {i.name for i in model.graph.initializer}

    def info(v: onnx.ValueInfoProto) -> TensorInfo:
        tt = v.type.tensor_type
        dims: list[int | str] = []
        for d in tt.shape.dim:
            if d.HasField("dim_value") and d.dim_value > 0:
                dims.append(int(d.dim_value))
            else:
                dims.append(d.dim_param or "?")
        return TensorInfo(name=v.name, dtype=_np_dtype(tt.elem_type), shape=dims)

    ins = [info(v) for v in model.graph.input if v.name not in inits]
    outs = [info(v) for v in model.graph.output]
    return ins, outs


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Silence the exporter's progress prints and known-harmless warnings."""
    names = ["torch.onnx", "torch._dynamo", "torch.export", "onnxscript"]
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with (
            warnings.catch_warnings(),
            contextlib.redirect_stdout(io.StringIO()),
        ):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, lvl in zip(loggers, levels, strict=True):
            lg.setLevel(lvl)


def _name_batch_dim(model: onnx.ModelProto, names: set[str]) -> None:
    """Give the first dimension of the named graph inputs/outputs the symbol ``batch``."""
    for v in [*model.graph.input, *model.graph.output]:
        if v.name in names and v.type.tensor_type.shape.dim:
            d0 = v.type.tensor_type.shape.dim[0]
            if not d0.HasField("dim_value"):
                d0.dim_param = BATCH_DIM


def pt2_to_onnx(exported: Any, example: np.ndarray) -> onnx.ModelProto:
    """Convert an ExportedProgram to ONNX with the dynamo exporter.

    Raises:
        ModelLoadError: the exporter failed, or the batch dimension is not dynamic and
            re-exporting with a dynamic batch failed too.
    """
    import torch

    x = torch.from_numpy(np.ascontiguousarray(example[:2]))
    n_out = len(exported.graph_signature.user_outputs)
    out_names = ["logits"] + [f"output_{i}" for i in range(1, n_out)]
    try:
        with _quiet_exporter():
            prog = torch.onnx.export(
                exported,
                (x,),
                None,
                dynamo=True,
                opset_version=OPSET,
                input_names=["input"],
                output_names=out_names,
                verbose=False,
            )
            if prog is None:  # only when an output path is given, which we never do
                raise ModelLoadError("the ONNX exporter returned no program")
            model = prog.model_proto
            ins, _ = onnx_tensor_infos(model)
            if len(ins) == 1 and ins[0].shape and isinstance(ins[0].shape[0], int):
                # The program was exported with a fixed batch; re-trace with a dynamic one.
                batch = torch.export.Dim("batch", min=1, max=65536)
                prog = torch.onnx.export(
                    exported.module(),
                    (x if x.shape[0] > 1 else x.repeat(2, *([1] * (x.dim() - 1))),),
                    None,
                    dynamo=True,
                    opset_version=OPSET,
                    input_names=["input"],
                    output_names=out_names,
                    dynamic_shapes=({0: batch},),
                    verbose=False,
                )
                if prog is None:
                    raise ModelLoadError("the ONNX exporter returned no program")
                model = prog.model_proto
    except ModelLoadError:
        raise
    except Exception as e:  # noqa: BLE001 - the exporter raises many unrelated types
        raise ModelLoadError(f"converting the ExportedProgram to ONNX failed: {e}") from e
    _name_batch_dim(model, {"input", *out_names})
    # The exporter stamps no timestamps, but clear free-text fields that could vary.
    model.doc_string = ""
    strip_exporter_metadata(model)
    return model


def strip_exporter_metadata(model: onnx.ModelProto) -> None:
    """Remove the dynamo exporter's debugging metadata, in place.

    Every node carries ``pkg.torch.onnx.*``/``namespace`` entries (the FX node, the
    Python stack trace with absolute source paths of the machine that exported it,
    module class names) and the graph and its inputs carry the ExportedProgram's
    signature: 18 KB of a 550 KB CNN (3% of fp32, 11% of its int8 model; counted once by
    hand), and bytes
    that depend on where the checkout lives. Nothing reads them at inference time.
    """
    g = model.graph
    for node in g.node:
        del node.metadata_props[:]
    del g.metadata_props[:]
    for value in (*g.input, *g.output, *g.value_info, *g.initializer):
        del value.metadata_props[:]


def load_model(path: Path, example: np.ndarray | None = None) -> OnnxModel:
    """Load ``path`` (.pt2 or .onnx) as a canonical ONNX model.

    ``example`` (rows of calibration data) is needed to trace a ``.pt2``.

    Raises:
        ModelLoadError: missing/unreadable file, unknown format, ONNX that fails the
            checker, a graph without exactly one input, or a failed conversion.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > MAX_MODEL_FILE_BYTES:
            raise ModelLoadError(f"model {path}: {size} bytes is over {MAX_MODEL_FILE_BYTES}")
        raw = path.read_bytes()
    except OSError as e:
        raise ModelLoadError(f"model {path}: cannot read ({e.strerror})") from e
    digest = hashlib.sha256(raw).hexdigest()
    exported = None
    if raw[:2] == b"PK" or path.suffix == ".pt2":
        import torch

        try:
            with _quiet_exporter():
                exported = torch.export.load(str(path))
        except Exception as e:  # noqa: BLE001 - torch.export.load raises many types
            raise ModelLoadError(
                f"model {path}: not a readable torch.export program (.pt2): {e}"
            ) from e
        if example is None:
            raise ModelLoadError(f"model {path}: an example input is needed to convert .pt2")
        proto = pt2_to_onnx(exported, example)
        kind = "pt2"
    else:
        try:
            proto = onnx.load_model_from_string(raw)
        except Exception as e:  # noqa: BLE001 - protobuf DecodeError and friends
            raise ModelLoadError(f"model {path}: neither a .pt2 nor a readable ONNX file: {e}") from e
        if not proto.graph.node:
            raise ModelLoadError(f"model {path}: not a .pt2 or ONNX model (empty graph)")
        kind = "onnx"
    return _finish(proto, path, kind, digest, exported, None)

_FACTORY = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


def is_factory_spec(text: str) -> bool:
    """``package.module:factory`` (and not an existing file path)."""
    return bool(_FACTORY.match(text)) and not Path(text).exists()


def load_factory_model(spec: str, state_dict: Path, example: np.ndarray) -> OnnxModel:
    """Build ``module:factory()``, load ``state_dict`` into it, and convert it to ONNX.

    The state_dict is read with ``torch.load(weights_only=True)`` (no pickled code) and
    loaded strictly, so missing or unexpected keys are an error. ``source_sha256`` hashes
    the spec and the state_dict bytes.

    Raises:
        ModelLoadError: the module or factory cannot be imported or called, it does not
            return an ``nn.Module``, the state_dict is unreadable or does not fit, or
            the export fails.
    """
    import importlib

    import torch

    mod_name, _, fn_name = spec.partition(":")
    try:
        factory = getattr(importlib.import_module(mod_name), fn_name)
    except (ImportError, AttributeError, SyntaxError) as e:
        raise ModelLoadError(f"model {spec}: cannot import {fn_name!r} from {mod_name!r}: {e}") from e
    except Exception as e:  # noqa: BLE001 - importing user code runs it
        raise ModelLoadError(f"model {spec}: importing {mod_name!r} failed: {type(e).__name__}: {e}") from e
    try:
        module = factory()
    except Exception as e:  # noqa: BLE001 - user code raises anything
        raise ModelLoadError(f"model {spec}: calling the factory failed: {type(e).__name__}: {e}") from e
    if not isinstance(module, torch.nn.Module):
        raise ModelLoadError(f"model {spec}: the factory returned {type(module).__name__}, not a torch.nn.Module")
    try:
        raw = Path(state_dict).read_bytes()
    except OSError as e:
        raise ModelLoadError(f"state_dict {state_dict}: cannot read ({e.strerror})") from e
    try:
        sd = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
        if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
            sd = sd["state_dict"]
        module.load_state_dict(sd, strict=True)
    except Exception as e:  # noqa: BLE001 - unpickling and key mismatches raise many types
        raise ModelLoadError(f"state_dict {state_dict}: does not load into {spec}: {_one_line(e)}") from e
    module.eval()
    x = torch.from_numpy(np.ascontiguousarray(example[:2]))
    if x.shape[0] < 2:
        x = x.repeat(2, *([1] * (x.dim() - 1)))
    try:
        with _quiet_exporter():
            exported = torch.export.export(
                module, (x,), dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=65536)},)
            )
    except Exception as e:  # noqa: BLE001 - torch.export raises many types
        raise ModelLoadError(f"model {spec}: torch.export failed: {e}") from e
    proto = pt2_to_onnx(exported, np.asarray(example))
    digest = hashlib.sha256(spec.encode() + b"\0" + raw).hexdigest()
    return _finish(proto, Path(state_dict), "module:factory", digest, exported, module)


def _finish(
    proto: onnx.ModelProto, path: Path, kind: str, digest: str, exported: Any, module: Any
) -> OnnxModel:
    try:
        onnx.checker.check_model(proto)
    except onnx.checker.ValidationError as e:
        raise ModelLoadError(f"model {path}: ONNX checker failed: {_one_line(e)}") from e
    ins, outs = onnx_tensor_infos(proto)
    if len(ins) != 1:
        raise ModelLoadError(
            f"model {path}: exactly one graph input is supported, found {[i.name for i in ins]}"
        )
    if ins[0].dtype != "float32":
        raise ModelLoadError(f"model {path}: input {ins[0].name!r} is {ins[0].dtype}, need float32")
    if not outs:
        raise ModelLoadError(f"model {path}: graph has no outputs")
    return OnnxModel(
        data=proto.SerializeToString(deterministic=True),
        inputs=ins,
        outputs=outs,
        source_path=path,
        source_kind=kind,
        source_sha256=digest,
        exported=exported,
        module=module,
    )


def with_dynamic_batch(model: OnnxModel, rows: np.ndarray) -> tuple[OnnxModel, str]:
    """``model`` with its fixed batch dimension made symbolic, when the graph allows it.

    Many ONNX files are exported with a batch of 1 built into the input and output
    shapes; calibration, evaluation and self-tests run many rows per call. The first
    dimension of the input, and of every output that has the same fixed size, becomes
    ``batch``, and stale intermediate shapes are dropped. Then the result is checked on
    calibration rows: run on ``2 × batch`` rows at once, and on 1 row (and ``batch + 1``
    rows when the batch is over 1), the rewritten model must give, row for row, what the
    original gives a batch at a time. Graphs with the batch built into their arithmetic
    (a ``Reshape`` to ``[1, -1]``, a sum over the batch, rows mixed in pairs) fail that
    check and are refused. Other batch sizes are not tried.

    Returns the model and a note for the report.

    Raises:
        ModelLoadError: the check failed (the message says how), or ``rows`` has fewer
            than ``2 × batch`` rows to check with.
    """
    from compiler.measure import ort_session

    batch = model.input.shape[0]
    assert isinstance(batch, int) and batch > 0
    where = f"model input {model.input.name!r} has a fixed batch size of {batch}"
    advice = "export it with a dynamic batch dimension (a named first dimension in ONNX, a batch Dim in torch.export)"
    need = 2 * batch
    if len(rows) < need:
        raise ModelLoadError(f"{where}; {need} calibration rows are needed to check it with other batch sizes, "
                             f"got {len(rows)}; {advice}")
    proto = onnx.load_model_from_string(model.data)
    inits = {i.name for i in proto.graph.initializer}  # old IR versions list weights as inputs
    for v in [*proto.graph.input, *proto.graph.output]:
        dims = v.type.tensor_type.shape.dim
        if v.name not in inits and dims and dims[0].HasField("dim_value") and dims[0].dim_value == batch:
            dims[0].dim_param = BATCH_DIM  # replaces the value (one field of a oneof)
    del proto.graph.value_info[:]
    data = proto.SerializeToString(deterministic=True)
    x = np.ascontiguousarray(rows[:need], dtype=np.float32)

    name = model.input.name
    try:
        before = ort_session(model.data, 1)
        parts = [before.run(None, {name: x[i : i + batch]}) for i in range(0, need, batch)]
    except Exception as e:  # noqa: BLE001 - ORT raises untyped errors
        raise ModelLoadError(f"{where}, and it does not run on calibration rows: {_ort_error(e)}") from e
    for k, out in enumerate(model.outputs):
        if any(p[k].ndim == 0 or p[k].shape[0] != batch for p in parts):
            raise ModelLoadError(f"{where}, and output {out.name!r} is not batched along its first "
                                 f"dimension (shape {list(parts[0][k].shape)}); {advice}")
    want = [np.concatenate([p[k] for p in parts]) for k in range(len(model.outputs))]
    try:
        after = ort_session(data, 1)
    except Exception as e:  # noqa: BLE001 - TechniqueError, with ORT's message
        raise ModelLoadError(f"{where}; with a dynamic batch ONNX Runtime cannot load it: {_ort_error(e)}; "
                             f"{advice}") from e
    for n in sorted({need, 1, batch + 1} if batch > 1 else {need, 1}):
        rows_n = f"{n} row{'s' if n != 1 else ''}"
        try:
            got = after.run(None, {name: x[:n]})
        except Exception as e:  # noqa: BLE001 - ORT raises untyped errors
            raise ModelLoadError(f"{where}, built into the graph (running {rows_n} at once failed: "
                                 f"{_ort_error(e)}); {advice}") from e
        for k, out in enumerate(model.outputs):
            w, g = want[k][:n], got[k]
            if g.shape != w.shape:
                raise ModelLoadError(f"{where}, built into the graph: output {out.name!r} for {rows_n} at once "
                                     f"has shape {list(g.shape)}, expected {list(w.shape)}; {advice}")
            finite = np.abs(w[np.isfinite(w)]) if np.issubdtype(w.dtype, np.floating) else np.abs(w)
            scale = float(finite.max()) if finite.size else 0.0
            if not np.allclose(g, w, rtol=1e-4, atol=1e-5 * max(1.0, scale), equal_nan=True):
                diff = np.abs(g.astype(np.float64) - w.astype(np.float64))
                worst = float(np.nanmax(np.where(np.isfinite(diff), diff, np.nan))) if diff.size else 0.0
                raise ModelLoadError(f"{where}, built into the graph: output {out.name!r} for {rows_n} at once "
                                     f"differs from {batch} row{'s' if batch != 1 else ''} at a time (by up to {worst:.3g}); "
                                     f"{advice}")
    ins, outs = onnx_tensor_infos(proto)
    note = (f"input {model.input.name!r} had a fixed batch size of {batch}; its batch dimension was made "
            f"dynamic, checked on calibration rows (the same outputs for {need} and 1 rows at once as "
            f"{batch} at a time)")
    return replace(model, data=data, inputs=ins, outputs=outs), note


def _one_line(e: Exception, limit: int = 400) -> str:
    """An exception's message on one line (torch and the ONNX checker print several),
    shortened in the middle past ``limit`` characters."""
    text = " ".join(str(e).split())
    return text if len(text) <= limit else text[:150] + " ... " + text[-(limit - 160):]


def _ort_error(e: Exception) -> str:
    """ONNX Runtime's message on one line, without its source path in the middle."""
    text = re.sub(r"/onnxruntime_src/\S+ \S+ ", "", _one_line(e, limit=10**9))
    return text if len(text) <= 400 else text[:150] + " ... " + text[-240:]
