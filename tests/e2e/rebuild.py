"""Rebuild a compiled bundle under another version (same model and vectors)."""

from __future__ import annotations

from pathlib import Path

from agent.bundle import unpack, write_bundle


def rebuild_with_version(bundle: Path, version: str, tmp: Path) -> Path:
    b = unpack(bundle, tmp / f"unpacked-{bundle.stem}-{version}")
    st = b.selftest()
    fields = b.manifest.model_dump(mode="json", exclude={"members"})
    fields["version"] = version
    out = tmp / bundle.name.replace(b.manifest.version, version)
    write_bundle(out, manifest=fields, model=b.model_path.read_bytes(), selftest_inputs=st.inputs,
                 selftest_outputs=st.outputs, reference=b.reference())
    return out
