"""Op compatibility: can the target's runtime version load this model?

ONNX Runtime supports ONNX opsets up to a version-dependent maximum (its
"ONNX Runtime compatibility" table); a model using a newer opset, or an operator
domain the runtime does not ship, fails to load on the device even though it runs
here. Each problem found becomes a rejection reason.
"""

from __future__ import annotations

import onnx

__all__ = ["ORT_MAX_OPSET", "onnx_blockers"]

# onnxruntime minor version -> highest default-domain opset it implements.
ORT_MAX_OPSET: dict[tuple[int, int], int] = {
    (1, 14): 18,
    (1, 15): 19,
    (1, 16): 19,
    (1, 17): 20,
    (1, 18): 21,
    (1, 19): 21,
    (1, 20): 21,
    (1, 21): 22,
    (1, 22): 22,
}
_ORT_DOMAINS = {"", "ai.onnx", "ai.onnx.ml", "com.microsoft", "com.microsoft.nchwc"}


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
    known = [v for v in ORT_MAX_OPSET if v <= mv]
    # Versions newer than the table support at least the newest entry.
    max_opset = ORT_MAX_OPSET[max(known)] if known else None
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
