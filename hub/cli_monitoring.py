"""Monitoring commands: ``edgefleet drift ...``, ``edgefleet alerts ...`` and
``edgefleet captures ...``.

Thin clients of the REST API (``--hub URL``, default ``$EDGEFLEET_HUB``). With
``--json``, ``drift show`` prints one object per feature (inputs, then the
prediction row with ``role: "prediction"``), exactly the statistics of
:func:`hub.drift.drift_report`; ``alerts`` prints the alert objects.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

import click
from rich.console import Console
from rich.table import Table

from hub._client import HubClient, HubClientError, default_hub_url

__all__ = ["drift_group", "alerts_group", "captures_group", "MonitoringClient"]

console = Console() if Console().is_terminal else Console(width=160)  # piped: whole cells
_STATUS_STYLE = {"ok": "green", "warn": "yellow", "alert": "bold red",
                 "warning": "yellow", "critical": "bold red", "open": "red", "resolved": "green"}


class MonitoringClient(HubClient):
    """The monitoring part of the REST API."""

    def __enter__(self) -> MonitoringClient:
        return self

    def drift(self, name: str, version: str | None, params: dict[str, str]) -> dict[str, Any]:
        path = f"/api/v1/drift/{quote(name, safe='')}" + (f"/{quote(version, safe='')}" if version else "")
        return self._request("GET", path, params=params)  # type: ignore[no-any-return]

    def performance(self, name: str, params: dict[str, str]) -> dict[str, Any]:
        return self._request("GET", f"/api/v1/performance/{quote(name, safe='')}", params=params)  # type: ignore[no-any-return]

    def operations(self, params: dict[str, str]) -> dict[str, Any]:
        return self._request("GET", "/api/v1/operations", params=params)  # type: ignore[no-any-return]

    def alerts(self, params: dict[str, str]) -> list[dict[str, Any]]:
        return self._request("GET", "/api/v1/alerts", params=params)  # type: ignore[no-any-return]

    def retrain(self, params: dict[str, str]) -> list[dict[str, Any]]:
        return self._request("GET", "/api/v1/retrain", params=params)  # type: ignore[no-any-return]

    def evaluate(self) -> dict[str, Any]:
        return self._request("POST", "/api/v1/monitoring/evaluate")  # type: ignore[no-any-return]

    def captures(self, params: dict[str, str]) -> list[dict[str, Any]]:
        return self._request("GET", "/api/v1/captures", params=params)  # type: ignore[no-any-return]

    def capture_npz(self, capture_id: int) -> bytes:
        return self._send("GET", f"/api/v1/captures/{capture_id}/npz").content

    def policy(self, name: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        path = f"/api/v1/monitoring/policies/{quote(name, safe='')}"
        if body is None:
            return self._request("GET", path)  # type: ignore[no-any-return]
        return self._request("PUT", path, json=body)  # type: ignore[no-any-return]


def _hub_option(f: Any) -> Any:
    return click.option(
        "--hub", "hub_url", default=default_hub_url, show_default="$EDGEFLEET_HUB or http://127.0.0.1:8080",
        help="Hub REST API URL.",
    )(f)


def _split_ref(ref: str) -> tuple[str, str | None]:
    name, sep, version = ref.partition(":")
    if not name or (sep and not version):
        raise click.BadParameter(f"{ref!r} is not NAME or NAME:VERSION", param_hint="MODEL")
    return name, version or None


def _fmt(v: Any, digits: int = 4) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}g}" if abs(v) < 1e-3 and v != 0 else f"{v:.{digits}f}"
    return str(v)


def _styled(status: str) -> str:
    style = _STATUS_STYLE.get(status)
    return f"[{style}]{status}[/]" if style else status


def _params(**kw: Any) -> dict[str, str]:
    return {k: str(v) for k, v in kw.items() if v is not None}


# --------------------------------------------------------------------------- drift


@click.group("drift")
def drift_group() -> None:
    """Fleet drift, performance and operations of deployed models."""


def _feature_table(title: str, rows: list[dict[str, Any]]) -> Table:
    t = Table(title=title)
    for name in ("feature", "kind", "rows", "psi", "ks", "js", "chi2 p", "missing", "out of range", "status", "why"):
        t.add_column(name, justify="right" if name in ("rows", "psi", "ks", "js", "chi2 p") else "left")
    for r in rows:
        t.add_row(
            r["feature"] + (" (prediction)" if r.get("role") == "prediction" and r["feature"] != "prediction" else ""),
            r["kind"], str(r["rows"]), _fmt(r["psi"]), _fmt(r["ks"]), _fmt(r["js"]), _fmt(r["chi2_p"], 3),
            f"{r['missing_rate']:.1%}", f"{r['out_of_range_rate']:.1%}", _styled(r["status"]),
            r["reason"][:60],
        )
    return t


@drift_group.command("show")
@click.argument("model")
@click.option("--select", "select_expr", help="Cohort selector, e.g. profile=rpi4,tag=canary.  [default: all]")
@click.option("--window", default="1h", show_default=True, help="Time window: 15m, 1h, 7d, ...")
@click.option("--control", help="Also compare with this control cohort (selector).")
@click.option("--json", "as_json", is_flag=True,
              help="Print one JSON object per feature (and the prediction row).")
@_hub_option
def drift_show(model: str, select_expr: str | None, window: str, control: str | None,
               as_json: bool, hub_url: str) -> None:
    """Per-feature drift of MODEL (NAME or NAME:VERSION) against its bundle reference."""
    name, version = _split_ref(model)
    try:
        with MonitoringClient(hub_url) as c:
            res = c.drift(name, version, _params(select=select_expr, window=window, control=control))
    except HubClientError as e:
        raise click.ClickException(str(e)) from e
    rows = list(res["features"]) + ([res["prediction"]] if res.get("prediction") else [])
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    title = (f"Drift of {res['model']} in cohort {res['cohort']} over {_fmt(res['window_s'] / 3600, 3)} h: "
             f"{res['devices']} devices, {res['sketches']} sketches, {res['rows']} rows, status {res['status']}")
    console.print(_feature_table(title, rows))
    if res.get("rejected"):
        console.print(f"[yellow]rejected sketches:[/] {res['rejected']}")
    if res.get("control") is not None:
        crow = list(res.get("control_features") or []) + (
            [res["prediction_vs_control"]] if res.get("prediction_vs_control") else [])
        console.print(_feature_table(
            f"Cohort {res['cohort']} against control {res['control']} ({res['control_devices']} devices)", crow))


@drift_group.command("performance")
@click.argument("model")
@click.option("--window", default="1h", show_default=True, help="Width of one window.")
@click.option("--periods", default=24, show_default=True, type=click.IntRange(1, 1000), help="Windows back.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@_hub_option
def drift_performance(model: str, window: str, periods: int, as_json: bool, hub_url: str) -> None:
    """Accuracy, precision, recall, F1 and AUC per window from labelled feedback."""
    name, version = _split_ref(model)
    try:
        with MonitoringClient(hub_url) as c:
            res = c.performance(name, _params(version=version, window=window, periods=periods))
    except HubClientError as e:
        raise click.ClickException(str(e)) from e
    if as_json:
        click.echo(json.dumps(res, indent=2))
        return
    for v in res["versions"]:
        st = v["staleness"]
        t = Table(title=f"{name}:{v['version']}: age {_fmt((st['age_s'] or 0) / 86400, 3)} d, "
                        f"{st['metric']} decay {_fmt(st['decay'])}")
        for name in ("window start", "n", "accuracy", "precision", "recall", "f1", "auc"):
            t.add_column(name)
        for w in [*v["windows"], {**v["overall"], "window_start": "overall"}]:
            t.add_row(str(w["window_start"]), str(w["n"]), *(_fmt(w[k]) for k in
                                                             ("accuracy", "precision", "recall", "f1", "auc")))
        console.print(t)


@drift_group.command("ops")
@click.option("--select", "select_expr", help="Cohort selector.  [default: all]")
@click.option("--window", default="5m", show_default=True, help="Time window.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@_hub_option
def drift_ops(select_expr: str | None, window: str, as_json: bool, hub_url: str) -> None:
    """Latency, throughput, errors, CPU and RSS per device, per model and fleet-wide."""
    try:
        with MonitoringClient(hub_url) as c:
            res = c.operations(_params(select=select_expr, window=window))
    except HubClientError as e:
        raise click.ClickException(str(e)) from e
    if as_json:
        click.echo(json.dumps(res, indent=2))
        return
    t = Table(title=f"Operations of cohort {res['cohort']}")
    for name in ("scope", "model", "requests", "req/s", "error rate", "p50 ms", "p95 ms", "cpu %", "rss MiB"):
        t.add_column(name)
    for s in [res["fleet"], *res["models"], *res["devices"]]:
        t.add_row(s["key"], s.get("model") or "-", str(s["requests"]), _fmt(s["throughput_rps"], 3),
                  _fmt(s["error_rate"], 3), _fmt(s["p50_ms"], 3), _fmt(s["p95_ms"], 3),
                  _fmt(s["cpu_percent"], 3), _fmt(None if s["rss_bytes"] is None else s["rss_bytes"] / 2**20, 3))
    console.print(t)


@drift_group.command("policy")
@click.argument("name")
@click.option("--set", "policy_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Replace the policy with this JSON file.")
@_hub_option
def drift_policy(name: str, policy_file: Path | None, hub_url: str) -> None:
    """Show (or replace) the monitoring policy of model NAME as JSON."""
    try:
        body = None if policy_file is None else json.loads(policy_file.read_text())
    except (OSError, ValueError) as e:
        raise click.ClickException(f"cannot read {policy_file}: {e}") from e
    try:
        with MonitoringClient(hub_url) as c:
            click.echo(json.dumps(c.policy(name, body), indent=2))
    except HubClientError as e:
        raise click.ClickException(str(e)) from e


# --------------------------------------------------------------------------- alerts


def _alert_table(rows: list[dict[str, Any]]) -> Table:
    t = Table(title="Alerts")
    for name in ("id", "state", "severity", "kind", "model", "subject", "cohort", "value", "opened", "resolved",
                 "message"):
        t.add_column(name)
    for a in rows:
        t.add_row(str(a["id"]), _styled(a["state"]), _styled(a["severity"]), a["kind"], a["model"],
                  a["subject"], a["cohort"], _fmt(a["value"]), a["opened"][:19].replace("T", " "),
                  (a["resolved"] or "-")[:19].replace("T", " "), a["message"][:70])
    return t


@click.group("alerts", invoke_without_command=True)
@click.option("--state", type=click.Choice(["open", "resolved"]), help="Only alerts in this state.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@_hub_option
@click.pass_context
def alerts_group(ctx: click.Context, state: str | None, as_json: bool, hub_url: str) -> None:
    """Monitoring alerts (drift, performance, staleness); newest first."""
    ctx.obj = hub_url
    if ctx.invoked_subcommand is not None:
        return
    try:
        with MonitoringClient(hub_url) as c:
            rows = c.alerts(_params(state=state))
    except HubClientError as e:
        raise click.ClickException(str(e)) from e
    if as_json:
        click.echo(json.dumps(rows, indent=2))
    else:
        console.print(_alert_table(rows) if rows else "[dim]no alerts[/]")


@alerts_group.command("retrain")
@click.option("--state", type=click.Choice(["active", "ended"]), help="Only episodes in this state.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_obj
def alerts_retrain(hub_url: str, state: str | None, as_json: bool) -> None:
    """Retraining episodes; each fired its trigger once, when it started."""
    try:
        with MonitoringClient(hub_url) as c:
            rows = c.retrain(_params(state=state))
    except HubClientError as e:
        raise click.ClickException(str(e)) from e
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    t = Table(title="Retraining episodes")
    for name in ("id", "state", "model", "reason", "cohort", "started", "ended", "details"):
        t.add_column(name)
    for ep in rows:
        t.add_row(str(ep["id"]), ep["state"], ep["model"], ep["reason"], ep["cohort"], ep["started"][:19],
                  (ep["ended"] or "-")[:19], json.dumps(ep["details"])[:80])
    console.print(t if rows else "[dim]no retraining episodes[/]")


@alerts_group.command("evaluate")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_obj
def alerts_evaluate(hub_url: str, as_json: bool) -> None:
    """Evaluate the alert rules now instead of waiting for the next interval."""
    try:
        with MonitoringClient(hub_url) as c:
            res = c.evaluate()
    except HubClientError as e:
        raise click.ClickException(str(e)) from e
    if as_json:
        click.echo(json.dumps(res, indent=2))
        return
    console.print(f"opened {len(res['opened'])}, escalated {len(res['escalated'])}, "
                  f"resolved {len(res['resolved'])}, retraining started {len(res['retrain_started'])}")
    for err in res["errors"]:
        console.print(f"[red]error:[/] {err}")


@click.group("captures")
def captures_group() -> None:
    """Raw samples that devices captured and uploaded (only where the device owner
    enabled capture: capture_per_minute and capture_upload in the agent config)."""


@captures_group.command("list")
@click.option("--model", help="NAME or NAME:VERSION.")
@click.option("--device", help="Only this device.")
@click.option("--limit", default=50, show_default=True, type=click.IntRange(1, 10_000))
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@_hub_option
def captures_list(model: str | None, device: str | None, limit: int, as_json: bool, hub_url: str) -> None:
    """Captured samples, newest first."""
    try:
        with MonitoringClient(hub_url) as c:
            rows = c.captures(_params(model=model, device=device, limit=limit))
    except HubClientError as e:
        raise click.ClickException(str(e)) from e
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        console.print("[dim]no captured samples[/]")
        return
    t = Table(title="captured samples")
    for col_name in ("id", "device", "model", "served at", "bytes"):
        t.add_column(col_name, justify="right" if col_name in ("id", "bytes") else "left")
    for r in rows:
        served = datetime.fromtimestamp(r["ts"], UTC).strftime("%Y-%m-%d %H:%M:%S")
        t.add_row(str(r["id"]), r["device_id"], f"{r['model_name']}:{r['model_version']}", served, str(r["size"]))
    console.print(t)


@captures_group.command("get")
@click.argument("capture_id", type=int)
@click.option("-o", "--out", type=click.Path(dir_okay=False, path_type=Path),
              help="Where to write the .npz.  [default: capture-ID.npz]")
@_hub_option
def captures_get(capture_id: int, out: Path | None, hub_url: str) -> None:
    """Download one sample as .npz (arrays in/<input> and out/<output>)."""
    try:
        with MonitoringClient(hub_url) as c:
            data = c.capture_npz(capture_id)
    except HubClientError as e:
        raise click.ClickException(str(e)) from e
    path = out or Path(f"capture-{capture_id}.npz")
    path.write_bytes(data)
    click.echo(f"wrote {path} ({len(data)} bytes)")
