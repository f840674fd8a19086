"""Hub commands: ``edgefleet hub serve``, ``models``, ``devices`` and ``deploy``.

All but ``hub serve`` are thin clients of the REST API (``--hub URL``, default
``$EDGEFLEET_HUB`` or http://127.0.0.1:8080). Listing commands take ``--json`` for
machine-readable output; errors are one line, never a traceback.
"""

from __future__ import annotations

import getpass
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click
from rich.console import Console
from rich.live import Live
from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn
from rich.table import Table

from hub._client import HubClient, HubClientError, default_hub_url

__all__ = ["hub_group", "models_group", "devices_group", "deploy_command"]

F = TypeVar("F", bound=Callable[..., Any])
_TERMINAL = {"installed", "failed", "rolled_back", "rejected", "skipped"}
_STYLE = {"installed": "green", "failed": "red", "rejected": "red", "rolled_back": "yellow",
          "skipped": "dim", "pending": "cyan", "in_progress": "cyan"}

console = Console()


def _hub_option(f: F) -> F:
    return click.option(
        "--hub", "hub_url", default=default_hub_url, show_default="$EDGEFLEET_HUB or http://127.0.0.1:8080",
        help="Hub REST API URL.",
    )(f)


def _client(hub_url: str) -> HubClient:
    return HubClient(hub_url)


def _fail(e: HubClientError) -> click.ClickException:
    return click.ClickException(str(e))


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


def _ago(ts: str | None) -> str:
    return ts.replace("T", " ")[:19] if ts else "-"


# --------------------------------------------------------------------------- hub serve


@click.group("hub")
def hub_group() -> None:
    """Run the hub: registry, repository, fleet and deployments."""


@hub_group.command("serve")
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Data folder (SQLite, repository, keys).  [default: ./edgefleet-hub]")
@click.option("--db", "db_url", help="Database URL, e.g. postgresql+psycopg://user@host/db.")
@click.option("--broker", "broker_url", help="MQTT broker URL; without it an embedded broker starts.")
@click.option("--host", help="API listen address.  [default: 127.0.0.1]")
@click.option("--port", type=int, help="API listen port (0 picks one).  [default: 8080]")
def serve_command(data_dir: Path | None, db_url: str | None, broker_url: str | None,
                  host: str | None, port: int | None) -> None:
    """Start the hub and serve until interrupted."""
    from pydantic import ValidationError

    from hub.app import Hub
    from hub.config import HubSettings
    from hub.server import serve

    overrides: dict[str, Any] = {
        k: v for k, v in {"data_dir": data_dir, "db_url": db_url, "broker_url": broker_url,
                          "host": host, "port": port}.items() if v is not None
    }
    try:
        settings = HubSettings(**overrides)
    except ValidationError as e:
        raise click.ClickException(f"bad hub settings: {e}") from e

    def ready(hub: Hub, url: str) -> None:
        console.print(f"[bold green]edgefleet hub[/] ready at [bold]{url}[/] (API docs {url}/docs)")
        kind = "embedded" if hub.broker is not None else "external"
        console.print(f"  MQTT broker ({kind}): {hub.broker_url}")
        console.print(f"  database: {hub.db.engine.url.render_as_string(hide_password=True)}")
        console.print(f"  trusted root for devices: {hub.root_json_path}")

    try:
        serve(settings, on_ready=ready)
    except OSError as e:
        raise click.ClickException(f"cannot start the hub: {e}") from e


# --------------------------------------------------------------------------- models


@click.group("models")
def models_group() -> None:
    """Model bundles in the hub's registry."""


@models_group.command("push")
@click.argument("bundles", nargs=-1, required=True,
                type=click.Path(exists=True, dir_okay=False, path_type=Path))
@_hub_option
def models_push(bundles: tuple[Path, ...], hub_url: str) -> None:
    """Upload bundle files; each is verified and signed by the hub."""
    rows: list[dict[str, Any]] = []
    failed = 0
    with _client(hub_url) as c, Progress(
        "[progress.description]{task.description}", BarColumn(), DownloadColumn(),
        TransferSpeedColumn(), console=console, transient=True,
    ) as progress:
        for path in bundles:
            task = progress.add_task(path.name, total=path.stat().st_size)
            try:
                res = c.upload(path, lambda n, t=task: progress.advance(t, n))
            except HubClientError as e:
                if not getattr(e, "status", None):
                    raise _fail(e) from e
                console.print(f"[red]✗[/] {path.name}: {e}")
                failed += 1
                continue
            finally:
                progress.remove_task(task)
            rows.append({**res["bundle"], "new": res["created"]})
    if rows:
        t = Table(title="Uploaded bundles")
        for col in ("model", "profile", "format", "precision", "size", "sha256", ""):
            t.add_column(col)
        for b in rows:
            t.add_row(f"{b['name']}:{b['version']}", b["profile"], b["format"], b["precision"],
                      _size(b["size_bytes"]), b["sha256"][:12], "new" if b["new"] else "already there")
        console.print(t)
    if failed:
        raise SystemExit(1)


@models_group.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@_hub_option
def models_list(as_json: bool, hub_url: str) -> None:
    """Every model version and its bundles."""
    try:
        with _client(hub_url) as c:
            models = c.models()
    except HubClientError as e:
        raise _fail(e) from e
    if as_json:
        click.echo(json.dumps(models, indent=2))
        return
    t = Table(title="Models")
    for col in ("model", "profile", "format", "precision", "runtime", "size", "selected", "sha256", "uploaded"):
        t.add_column(col)
    for m in models:
        for v in m["versions"]:
            for b in v["bundles"]:
                t.add_row(f"{m['name']}:{v['version']}", b["profile"], b["format"], b["precision"],
                          b["runtime"], _size(b["size_bytes"]), "yes" if b["selected"] else "",
                          b["sha256"][:12], _ago(b["created"]))
    console.print(t if models else "[dim]no models yet: edgefleet models push BUNDLE[/]")


# --------------------------------------------------------------------------- devices


@click.group("devices")
def devices_group() -> None:
    """Devices the hub has heard from."""


def _device_table(devices: list[dict[str, Any]]) -> Table:
    t = Table(title="Devices")
    for col in ("device", "profile", "online", "state", "model", "previous", "last seen", "error"):
        t.add_column(col)
    for d in devices:
        t.add_row(
            d["device_id"], d["profile"] or "-",
            "[green]online[/]" if d["online"] else "[red]offline[/]",
            d["state"] or "-", d["model"] or "-", d["previous_model"] or "-",
            _ago(d["last_seen"]), (d["last_error"] or "")[:60],
        )
    return t


@devices_group.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@_hub_option
def devices_list(as_json: bool, hub_url: str) -> None:
    """All devices, with presence, lifecycle state and model."""
    try:
        with _client(hub_url) as c:
            devices = c.devices()
    except HubClientError as e:
        raise _fail(e) from e
    if as_json:
        click.echo(json.dumps(devices, indent=2))
    else:
        console.print(_device_table(devices) if devices else "[dim]no devices yet[/]")


@devices_group.command("show")
@click.argument("device_id")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@_hub_option
def devices_show(device_id: str, as_json: bool, hub_url: str) -> None:
    """One device in full."""
    try:
        with _client(hub_url) as c:
            d = c.device(device_id)
    except HubClientError as e:
        raise _fail(e) from e
    if as_json:
        click.echo(json.dumps(d, indent=2))
        return
    t = Table(show_header=False, title=f"Device {device_id}")
    t.add_column(style="bold")
    t.add_column()
    for k, v in d.items():
        t.add_row(k, v if isinstance(v, str) else json.dumps(v))
    console.print(t)


# --------------------------------------------------------------------------- deploy


def _deployment_table(dep: dict[str, Any]) -> Table:
    counts = ", ".join(f"{k} {v}" for k, v in sorted(dep["counts"].items()))
    t = Table(title=f"Deployment {dep['id'][:12]} of {dep['model']}: {counts}")
    for col in ("device", "profile", "bundle", "outcome", "state", "progress", "detail"):
        t.add_column(col)
    for d in dep["devices"]:
        style = _STYLE.get(d["outcome"], "")
        prog = "" if d["progress"] is None else f"{d['progress']:.0%}"
        t.add_row(d["device_id"], d["profile"] or "-",
                  f"{d['precision']} {(d['bundle_sha256'] or '')[:10]}" if d["bundle_sha256"] else "-",
                  f"[{style}]{d['outcome']}[/]" if style else d["outcome"], d["state"] or "-",
                  prog, (d["error"] or "")[:80])
    return t


@click.command("deploy")
@click.argument("model")
@click.option("--device", "devices", multiple=True, required=True, help="Device id (repeat).")
@click.option("--allow-downgrade", is_flag=True, help="Sign off installing an older version.")
@click.option("--precision", help="Bundle precision to pick, e.g. int8 or fp32.")
@click.option("--format", "fmt", type=click.Choice(["onnx", "tflite"]), help="Bundle format to pick.")
@click.option("--wait", "wait_s", type=float, default=0.0,
              help="Seconds to wait for every device to finish (0: do not wait).")
@click.option("--json", "as_json", is_flag=True, help="Print the final deployment as JSON.")
@_hub_option
def deploy_command(model: str, devices: tuple[str, ...], allow_downgrade: bool,
                   precision: str | None, fmt: str | None, wait_s: float, as_json: bool,
                   hub_url: str) -> None:
    """Deploy MODEL (NAME:VERSION) to the given devices.

    With --wait, exits 1 unless every device that got the deployment installed it.
    """
    body = {"model": model, "devices": list(devices), "allow_downgrade": allow_downgrade,
            "precision": precision, "format": fmt, "created_by": getpass.getuser()[:64]}
    try:
        with _client(hub_url) as c:
            dep = c.deploy(body)
            if wait_s > 0:
                deadline = time.monotonic() + wait_s
                with Live(_deployment_table(dep), console=console, transient=as_json) as live:
                    while time.monotonic() < deadline and not all(
                        d["outcome"] in _TERMINAL for d in dep["devices"]
                    ):
                        time.sleep(0.5)
                        dep = c.deployment(dep["id"])
                        live.update(_deployment_table(dep))
            elif not as_json:
                console.print(_deployment_table(dep))
    except HubClientError as e:
        raise _fail(e) from e
    if as_json:
        click.echo(json.dumps(dep, indent=2))
    if wait_s > 0:
        sent = [d for d in dep["devices"] if d["outcome"] != "skipped"]
        if not sent or any(d["outcome"] != "installed" for d in sent):
            raise SystemExit(1)
