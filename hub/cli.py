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

__all__ = ["hub_group", "models_group", "devices_group", "deploy_command", "rollout_group", "audit_command"]

F = TypeVar("F", bound=Callable[..., Any])
_TERMINAL = {"installed", "failed", "rolled_back", "rejected", "skipped"}
_STYLE = {"installed": "green", "failed": "red", "rejected": "red", "rolled_back": "yellow",
          "skipped": "dim", "pending": "cyan", "in_progress": "cyan"}

# Piped output (logs, files, grep) keeps whole table cells instead of 80 columns.
console = Console() if Console().is_terminal else Console(width=160)
err_console = Console(stderr=True)


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
@click.option("--mqtt-listen", metavar="[HOST:]PORT",
              help="Where the embedded broker listens, e.g. 0.0.0.0:1883 for devices on the network "
                   "(no authentication: see docs/security.md).  [default: 127.0.0.1, a free port]")
@click.option("--host", help="API listen address.  [default: 127.0.0.1]")
@click.option("--port", type=int, help="API listen port (0 picks one).  [default: 8080]")
def serve_command(data_dir: Path | None, db_url: str | None, broker_url: str | None, mqtt_listen: str | None,
                  host: str | None, port: int | None) -> None:
    """Start the hub and serve until interrupted."""
    from pydantic import ValidationError

    from hub.app import Hub
    from hub.config import HubSettings
    from hub.server import HubStartError, serve

    overrides: dict[str, Any] = {
        k: v for k, v in {"data_dir": data_dir, "db_url": db_url, "broker_url": broker_url,
                          "host": host, "port": port}.items() if v is not None
    }
    if mqtt_listen is not None:
        if broker_url is not None:
            raise click.UsageError("--mqtt-listen sets up the embedded broker; with --broker there is none")
        listen_host, _, listen_port = mqtt_listen.rpartition(":")
        if not listen_port.isdigit() or not 0 < int(listen_port) <= 65535:
            raise click.BadParameter(f"{mqtt_listen!r}: expected [HOST:]PORT with a port 1-65535",
                                     param_hint="--mqtt-listen")
        overrides["embedded_broker_port"] = int(listen_port)
        if listen_host:
            overrides["embedded_broker_host"] = listen_host.strip("[]")
    try:
        settings = HubSettings(**overrides)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(str(x) for x in err['loc'])}: {err['msg']}" for err in e.errors())
        raise click.ClickException(f"bad hub settings: {problems}") from e

    def ready(hub: Hub, url: str) -> None:
        console.print(f"[bold green]edgefleet hub[/] ready at [bold]{url}[/] (API docs {url}/docs)")
        if hub.broker is None:
            console.print(f"  MQTT broker (external): {hub.broker_url}")
        elif hub.broker.host in ("0.0.0.0", "::"):
            console.print(f"  MQTT broker (embedded): listening on {hub.broker.host} port {hub.broker.port}; "
                          f"devices use mqtt://<this machine's address>:{hub.broker.port}")
        else:
            console.print(f"  MQTT broker (embedded): {hub.broker_url}")
        console.print(f"  database: {hub.db.engine.url.render_as_string(hide_password=True)}")
        console.print(f"  trusted root for devices: {hub.root_json_path}")

    try:
        serve(settings, on_ready=ready)
    except (OSError, HubStartError) as e:
        raise click.ClickException(f"cannot start the hub: {e}") from e


# --------------------------------------------------------------------------- models


@click.group("models")
def models_group() -> None:
    """Model bundles in the hub's registry."""


def _selected_bundles(out_dir: Path) -> list[Path]:
    """The bundle ``edgefleet compile`` selected for each profile, from its report.json."""
    report_path = out_dir / "report.json"
    try:
        report = json.loads(report_path.read_text())
        chosen = {name: info.get("selected") for name, info in report["profiles"].items()}
    except FileNotFoundError as e:
        raise click.BadParameter(f"{out_dir} has no report.json: give bundle files, or the --out folder of "
                                 "`edgefleet compile`", param_hint="BUNDLES") from e
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise click.BadParameter(f"{report_path} is not a compile report ({e})", param_hint="BUNDLES") from e
    for profile, name in sorted(chosen.items()):
        console.print(f"{profile}: " + (f"selected {name}" if name else "[yellow]nothing selected[/] (see report.json)"))
    paths = [out_dir / name for name in chosen.values() if isinstance(name, str)]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise click.BadParameter(f"{out_dir} lacks bundles its report selected: {', '.join(missing)}",
                                 param_hint="BUNDLES")
    return sorted(set(paths))


@models_group.command("push")
@click.argument("bundles", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@_hub_option
def models_push(bundles: tuple[Path, ...], hub_url: str) -> None:
    """Upload bundle files; each is verified and signed by the hub.

    A folder written by `edgefleet compile --out` uploads the bundle its report.json
    selected for each profile (the others are candidates it measured and set aside).
    """
    bundles = tuple(p for b in bundles for p in (_selected_bundles(b) if b.is_dir() else [b]))
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
@click.option("--select", "select_expr", help="Only devices matching profile=P,tag=T,id=D (or all).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@_hub_option
def devices_list(select_expr: str | None, as_json: bool, hub_url: str) -> None:
    """All devices, with presence, lifecycle state and model."""
    try:
        with _client(hub_url) as c:
            devices = c.devices(select_expr)
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


# --------------------------------------------------------------------------- rollouts

_CAMPAIGN_STYLE = {"completed": "green", "rolled_back": "yellow", "aborted": "red", "paused": "yellow",
                   "rolling_back": "yellow", "awaiting_approval": "magenta"}
_DEVICE_STATE_STYLE = {"updated": "green", "reverted": "yellow", "failed": "red", "health_failed": "red",
                       "revert_failed": "red", "skipped": "dim", "cancelled": "dim", "pending": "cyan",
                       "deploying": "cyan", "reverting": "yellow", "timed_out": "red"}
_CAMPAIGN_DONE = {"completed", "rolled_back", "aborted"}


@click.group("rollout")
def rollout_group() -> None:
    """Staged rollout campaigns: waves, gates, pause/resume/rollback."""


def _counts_text(counts: dict[str, int]) -> str:
    return ", ".join(
        f"[{_DEVICE_STATE_STYLE.get(k, '')}]{k} {v}[/]" if k in _DEVICE_STATE_STYLE else f"{k} {v}"
        for k, v in sorted(counts.items())
    ) or "-"


def _campaign_view(c: dict[str, Any]) -> Table:
    state = c["state"]
    style = _CAMPAIGN_STYLE.get(state, "cyan")
    t = Table(title=f"Campaign {c['id']}: {c['model']} → {c['selector']}  [{style}]{state}[/]",
              caption=c.get("reason") or None)
    for col in ("wave", "target", "devices", "progress", "status", "by state"):
        t.add_column(col)
    from rich.progress_bar import ProgressBar

    for w in c["waves"]:
        done = sum(v for k, v in w["counts"].items() if k not in ("pending", "deploying", "skipped"))
        bar = ProgressBar(total=max(w["size"], 1), completed=done if w["size"] else 0, width=24)
        t.add_row(str(w["index"] + 1), w["target"], str(w["size"]), bar, w["status"], _counts_text(w["counts"]))
    return t


@rollout_group.command("create")
@click.argument("model")
@click.option("--select", "select_expr", required=True,
              help="Devices: profile=NAME,tag=VALUE,id=ID (comma = and) or all.")
@click.option("--waves", default="100", show_default=True,
              help="Cumulative waves: percentages (10,50,100) or counts (1n,10n,100).")
@click.option("--soak", default="0s", show_default=True, help="Soak time per wave (30s, 5m, 1h).")
@click.option("--gate", "gates", multiple=True,
              help="install_failures<=N|N%, health_failures<=N|N%, error_rate<=R, "
                   "p95_regression<=X, psi<=P (repeatable); error_rate and p95_regression take "
                   "' min=N', the least inferences they judge on (default 200).")
@click.option("--approve-waves", is_flag=True, help="Wait for 'rollout approve' before each next wave.")
@click.option("--rate", help="Most devices started per minute, e.g. 20/min.")
@click.option("--on-fail", type=click.Choice(["pause", "rollback"]), default="pause", show_default=True)
@click.option("--precision", help="Bundle precision to pick, e.g. int8 or fp32.")
@click.option("--format", "fmt", type=click.Choice(["onnx", "tflite"]), help="Bundle format to pick.")
@click.option("--json", "as_json", is_flag=True, help="Print the campaign as JSON.")
@_hub_option
def rollout_create(model: str, select_expr: str, waves: str, soak: str, gates: tuple[str, ...],
                   approve_waves: bool, rate: str | None, on_fail: str, precision: str | None,
                   fmt: str | None, as_json: bool, hub_url: str) -> None:
    """Start a campaign rolling MODEL (NAME:VERSION) out; prints its id."""
    from hub.errors import InvalidCampaign
    from hub.rollout import parse_duration, parse_rate

    try:
        body = {"model": model, "select": select_expr, "waves": waves, "soak_s": parse_duration(soak),
                "gates": list(gates), "approve_waves": approve_waves,
                "rate_per_min": parse_rate(rate) if rate else None, "on_fail": on_fail,
                "precision": precision, "format": fmt, "created_by": getpass.getuser()[:64]}
    except InvalidCampaign as e:
        raise click.BadParameter(str(e)) from e
    try:
        with _client(hub_url) as c:
            camp = c.create_campaign(body)
    except HubClientError as e:
        raise _fail(e) from e
    if as_json:
        click.echo(json.dumps(camp, indent=2))
        return
    skipped = camp["counts"].get("skipped", 0)
    n = sum(v for k, v in camp["counts"].items() if k != "skipped")
    # The summary on stderr, the id alone on stdout: id=$(edgefleet rollout create ...)
    err_console.print(f"campaign [bold]{camp['id']}[/]: {camp['model']} to {n} devices in "
                      f"{len(camp['waves'])} waves" + (f" ({skipped} skipped)" if skipped else ""), highlight=False)
    click.echo(camp["id"])


@rollout_group.command("status")
@click.argument("campaign_id")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (state, waves, devices).")
@click.option("--watch", is_flag=True, help="Live progress until the campaign ends (Ctrl-C stops watching).")
@click.option("--interval", type=float, default=1.0, show_default=True, help="Seconds between refreshes.")
@_hub_option
def rollout_status(campaign_id: str, as_json: bool, watch: bool, interval: float, hub_url: str) -> None:
    """Waves, gates and device states of a campaign."""
    try:
        with _client(hub_url) as c:
            camp = c.campaign(campaign_id)
            if watch and not as_json:
                with Live(_campaign_view(camp), console=console, refresh_per_second=4) as live:
                    while camp["state"] not in _CAMPAIGN_DONE:
                        time.sleep(interval)
                        camp = c.campaign(campaign_id)
                        live.update(_campaign_view(camp))
                return
    except HubClientError as e:
        raise _fail(e) from e
    except KeyboardInterrupt:
        return
    if as_json:
        click.echo(json.dumps(camp, indent=2))
        return
    console.print(_campaign_view(camp))
    for w in camp["waves"]:
        for v in w["verdicts"]:
            mark = "[green]✓[/]" if v["passed"] else "[red]✗[/]"
            console.print(f"  wave {w['index'] + 1} {mark} {v['gate']}: {v['value']} ({v['note']})")


@rollout_group.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@_hub_option
def rollout_list(as_json: bool, hub_url: str) -> None:
    """Campaigns, newest first."""
    try:
        with _client(hub_url) as c:
            rows = c.campaigns()
    except HubClientError as e:
        raise _fail(e) from e
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    t = Table(title="Campaigns")
    for col in ("id", "model", "select", "state", "wave", "devices", "created", "by"):
        t.add_column(col)
    for r in rows:
        style = _CAMPAIGN_STYLE.get(r["state"], "cyan")
        t.add_row(r["id"], r["model"], r["selector"], f"[{style}]{r['state']}[/]",
                  f"{r['wave_index'] + 1}/{r['waves']}", _counts_text(r["counts"]), _ago(r["created"]),
                  r["created_by"])
    console.print(t if rows else "[dim]no campaigns yet[/]")


def _command(name: str, doc: str) -> None:
    @rollout_group.command(name, help=doc)
    @click.argument("campaign_id")
    @click.option("--reason", help="Why (kept in the audit log).")
    @click.option("--json", "as_json", is_flag=True, help="Print the campaign as JSON.")
    @_hub_option
    def cmd(campaign_id: str, reason: str | None, as_json: bool, hub_url: str) -> None:
        try:
            with _client(hub_url) as c:
                camp = c.campaign_command(campaign_id, name, getpass.getuser()[:64], reason)
        except HubClientError as e:
            raise _fail(e) from e
        if as_json:
            click.echo(json.dumps(camp, indent=2))
        else:
            console.print(f"campaign {camp['id']}: {camp['state']}")


for _name, _doc in (
    ("pause", "Stop starting devices (in-flight ones finish). Idempotent."),
    ("resume", "Continue a paused campaign; after a failed gate this overrides that wave. Idempotent."),
    ("approve", "Let a campaign waiting for approval start its next wave."),
    ("abort", "End the campaign: nothing more is started; updated devices keep the new version."),
    ("rollback", "Send every updated device back to its previous version. Idempotent."),
):
    _command(_name, _doc)


# --------------------------------------------------------------------------- audit


@click.command("audit")
@click.option("--campaign", "campaign_id", help="Only this campaign.")
@click.option("--action", help="Only this action, e.g. rollout.pause or campaign.transition.")
@click.option("--actor", help="Only this actor ('hub' is the campaign engine).")
@click.option("--limit", type=int, default=1000, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@_hub_option
def audit_command(campaign_id: str | None, action: str | None, actor: str | None, limit: int,
                  as_json: bool, hub_url: str) -> None:
    """Who did what, when and why: operator actions and campaign transitions."""
    try:
        with _client(hub_url) as c:
            rows = c.audit(campaign_id=campaign_id, action=action, actor=actor, limit=limit)
    except HubClientError as e:
        raise _fail(e) from e
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    t = Table(title="Audit log")
    for col in ("when", "who", "what", "campaign", "change", "why"):
        t.add_column(col)
    for r in rows:
        d = r["detail"]
        change = f"{d['from']} → {d['to']}" if "from" in d and "to" in d else ""
        t.add_row(_ago(r["ts"]), r["actor"], r["action"], r["campaign_id"] or "-", change, r["reason"] or "")
    console.print(t if rows else "[dim]no entries[/]")
