"""Op compatibility: can the target's runtime version load this model?

ONNX Runtime supports ONNX opsets and IR versions up to a version-dependent maximum
(its "ONNX Runtime compatibility" table); a model using a newer one, or an operator
domain the runtime does not ship, fails to load on the device even though it runs
here. Each problem found becomes a rejection reason.
"""

from __future__ import annotations

import onnx

__all__ = ["ORT_SUPPORT", "onnx_blockers", "lowest_ir_version"]

# onnxruntime minor version -> (highest default-domain opset it implements, highest
# ONNX IR version it loads). IR: 1.17 says "Unsupported model IR version: 10, max
# supported IR version: 9"; torch.onnx in torch 2.13 stamps IR 10 although an opset-18
# graph needs only IR 8, so the compiler stamps each ONNX candidate with the lowest IR
# version its content needs (:func:`lowest_ir_version`). 1.18 loading IR 10 and refusing
# 11 was checked here with onnxruntime 1.18.1 (the legacy device stack).
ORT_SUPPORT: dict[tuple[int, int], tuple[int, int]] = {
    (1, 14): (18, 8),
    (1, 15): (19, 9),
    (1, 16): (19, 9),
    (1, 17): (20, 9),
    (1, 18): (21, 10),
    (1, 19): (21, 10),
    (1, 20): (21, 10),
    (1, 21): (22, 10),
    (1, 22): (22, 11),
}
_ORT_DOMAINS = {"", "ai.onnx", "ai.onnx.ml", "com.microsoft", "com.microsoft.nchwc"}
# Element types that need a newer IR than their opsets do: float8 (IR 9), 4-bit ints
# (IR 10), float4 (IR 11).
_IR_FOR_TYPE = {17: 9, 18: 9, 19: 9, 20: 9, 21: 10, 22: 10, 23: 11}


def _types_used(proto: onnx.ModelProto) -> set[int]:
    g = proto.graph
    types = {t.data_type for t in g.initializer}
    for vi in (*g.input, *g.output, *g.value_info):
        if vi.type.HasField("tensor_type"):
            types.add(vi.type.tensor_type.elem_type)
    for n in g.node:
        for a in n.attribute:
            if a.HasField("t"):
                types.add(a.t.data_type)
            if a.name == "to" and a.type == onnx.AttributeProto.INT:
                types.add(a.i)
    return types


def lowest_ir_version(model: bytes) -> bytes:
    """``model`` stamped with the lowest ONNX IR version its opsets and element types
    need, without the opset imports of domains no node uses (ONNX Runtime's quantizer
    declares ``ai.onnx.ml`` 5, which alone would need IR 10). Unchanged when it already
    is so, when it has model-local functions (whose rules changed between IR versions),
    or when it has subgraphs (If/Loop/Scan), whose nodes and types are not walked."""
    proto = onnx.load_model_from_string(model)
    subgraphs = any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
                    for n in proto.graph.node for a in n.attribute)
    if proto.functions or subgraphs:  # If/Loop/Scan bodies: their domains and types are not walked
        return model
    used = {n.domain or "" for n in proto.graph.node} | {""}
    keep = [imp for imp in proto.opset_import if (imp.domain or "") in used or imp.domain == "ai.onnx"]
    need = onnx.helper.find_min_ir_version_for(keep, ignore_unknown=True)
    need = max([need, *(_IR_FOR_TYPE.get(t, 0) for t in _types_used(proto))])
    if proto.ir_version <= need and len(keep) == len(proto.opset_import):
        return model
    del proto.opset_import[:]
    proto.opset_import.extend(keep)
    proto.ir_version = min(proto.ir_version, need)
    return proto.SerializeToString()


def _minor(version: str) -> tuple[int, int] | None:
    parts = version.split(".")
    try:
        return int(parts[0]), int(parts[1]) if len(parts) > 1 else 0
    except ValueError:
        return None


def onnx_blockers(model: bytes, min_runtime_version: str) -> list[str]:
    """Reasons the device's ONNX Runtime (at least ``min_runtime_version``) cannot run it."""
    proto = onnx.load_model_from_string(model)
    reasons: list[str] = []
    mv = _minor(min_runtime_version)
    if mv is None:
        return [f"cannot parse the profile's onnxruntime version {min_runtime_version!r}"]
    known = [v for v in ORT_SUPPORT if v <= mv]
    # Versions newer than the table support at least the newest entry.
    max_opset, max_ir = ORT_SUPPORT[max(known)] if known else (None, None)
    if max_ir is not None and proto.ir_version > max_ir:
        reasons.append(f"model has ONNX IR version {proto.ir_version}; onnxruntime {min_runtime_version} "
                       f"loads up to {max_ir}")
    # Only the default domain's version matters here; tools also declare unused domains
    # (ai.onnx.training, ...), so other domains are judged by the nodes that use them.
    for imp in proto.opset_import:
        if imp.domain in ("", "ai.onnx"):
            if max_opset is None:
                reasons.append(f"onnxruntime {min_runtime_version} predates opset support data")
            elif imp.version > max_opset:
                reasons.append(
                    f"model uses ONNX opset {imp.version}; onnxruntime {min_runtime_version} "
                    f"supports up to {max_opset}"
                )
    used = {(n.domain or "") for n in proto.graph.node}
    for dom in sorted(used - _ORT_DOMAINS):
        reasons.append(f"nodes in domain {dom!r} need a custom-op library on the device")
    return reasons
