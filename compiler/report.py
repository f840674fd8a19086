"""The compile report: ``report.json`` and the console table, from the same records."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from rich.console import Console
from rich.table import Table

__all__ = ["REPORT_SCHEMA_VERSION", "CandidateRecord", "ProfileSummary", "CompileReport"]

REPORT_SCHEMA_VERSION = 1


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CandidateRecord(_Model):
    """One (profile, format, precision, technique) candidate and the verdict on it."""

    profile: str
    format: str
    precision: str
    technique: str = Field(description="How it was made: baseline, static-qdq, static-qdq-per-tensor, ...")
    runtime: str
    bundle: str | None = Field(None, description="Bundle file name in the output folder.")
    bundle_sha256: str | None = None
    size_bytes: int | None = Field(None, description="Bundle file size.")
    model_bytes: int | None = Field(None, description="Model file size inside the bundle.")
    latency_ms_p50: float | None = Field(None, description="Batch-1 p50 on this host.")
    latency_ms_p95: float | None = None
    latency_threads: int | None = None
    accuracy: float | None = Field(None, description="Top-1 accuracy on eval; null without labels.")
    metrics: dict[str, float | None] = Field(default_factory=dict)
    metric_drop: float | None = Field(None, description="Baseline metric minus this one.")
    agreement_with_fp32: float | None = Field(
        None, description="Share of eval rows whose argmax equals the fp32 model's."
    )
    agreement_with_onnx_int8: float | None = Field(
        None, description="TFLite int8 only: share of eval rows whose argmax equals ONNX int8's."
    )
    excluded_nodes: list[dict[str, Any]] = Field(
        default_factory=list,
        description="Static int8 only: nodes kept in fp32 by the accuracy-aware fallback "
        "(node, op_type, tensor, relative_error, reason).",
    )
    selected: bool = False
    passed: bool = False
    reasons: list[str] = Field(default_factory=list)
    notes: list[str] = Field(default_factory=list)
    settings: dict[str, Any] = Field(default_factory=dict)


class ProfileSummary(_Model):
    selected: str | None = Field(None, description="Bundle file name of the selected candidate.")
    notes: list[str] = Field(default_factory=list)


class CompileReport(_Model):
    schema_version: int = REPORT_SCHEMA_VERSION
    name: str
    version: str
    model: dict[str, Any]
    data: dict[str, Any]
    host: dict[str, Any]
    settings: dict[str, Any]
    profiles: dict[str, ProfileSummary]
    candidates: list[CandidateRecord]
    skipped: list[str] = Field(
        default_factory=list, description="Techniques not tried in this compile, and why."
    )

    def write(self, path: Path) -> None:
        """Write atomically as indented JSON."""
        path.parent.mkdir(parents=True, exist_ok=True)
        data = json.dumps(self.model_dump(mode="json"), indent=2, allow_nan=False) + "\n"
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as fh:
                fh.write(data)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def table(self) -> Table:
        t = Table(title=f"edgefleet compile: {self.name} {self.version}", show_lines=False)
        t.add_column("profile")
        t.add_column("format")
        t.add_column("precision")
        t.add_column("technique")
        t.add_column("size", justify="right")
        t.add_column("p50 ms", justify="right")
        t.add_column("accuracy", justify="right")
        t.add_column("kept fp32", overflow="fold")
        t.add_column("selected", justify="center")
        t.add_column("verdict", overflow="fold")
        for c in self.candidates:
            t.add_row(
                c.profile,
                c.format,
                c.precision,
                c.technique,
                _size(c.size_bytes),
                "-" if c.latency_ms_p50 is None else f"{c.latency_ms_p50:.4f}",
                "-" if c.accuracy is None else f"{c.accuracy:.4f}",
                _kept(c),
                "[bold green]yes[/]" if c.selected else "",
                _verdict(c),
                style=None if c.passed else "dim",
            )
        return t

    def print(self, console: Console) -> None:
        console.print(self.table())
        for note in self.model.get("notes", []):
            console.print(f"[yellow]model[/]: {note}")
        for line in self.skipped:
            console.print(f"[yellow]skipped[/]: {line}")
        for name, p in self.profiles.items():
            for note in p.notes:
                console.print(f"[yellow]{name}[/]: {note}")


def _verdict(c: CandidateRecord) -> str:
    """The first reason, shortened: report.json has them all."""
    if not c.reasons:
        return ""
    first = c.reasons[0].removeprefix("selected: ")
    more = f" (+{len(c.reasons) - 1} more)" if len(c.reasons) > 1 else ""
    return first + more


def _kept(c: CandidateRecord) -> str:
    """Nodes the accuracy-aware fallback kept in fp32, with the error that chose them."""
    if not c.excluded_nodes:
        return ""
    return ", ".join(f"{e['node']} ({e['relative_error']:.0%})" for e in c.excluded_nodes)


def _size(n: int | None) -> str:
    if n is None:
        return "-"
    if n >= 1 << 20:
        return f"{n / (1 << 20):.2f} MiB"
    if n >= 1 << 10:
        return f"{n / (1 << 10):.1f} KiB"
    return f"{n} B"
