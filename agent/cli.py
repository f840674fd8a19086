"""The ``edgefleet`` command.

The root group belongs to the agent, which never imports hub or compiler code. Other
command groups register under the ``edgefleet.commands`` entry-point group and are
loaded only when invoked; when their extra is not installed the command explains
which one to install instead of failing with a traceback.
"""

from __future__ import annotations

import json
import logging
import signal
from importlib.metadata import entry_points
from pathlib import Path

import click

import agent

__all__ = ["main", "cli"]

_EXTRA_FOR = {"hub": "hub", "models": "hub", "devices": "hub", "deploy": "hub", "demo": "all",
              "compile": "compiler", "rollout": "hub", "audit": "hub", "sim": "hub",
              "drift": "hub", "alerts": "hub"}


class _PluginGroup(click.Group):
    def _plugins(self) -> dict[str, object]:
        return {ep.name: ep for ep in entry_points(group="edgefleet.commands")}

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(super().list_commands(ctx)) | set(self._plugins()))

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        cmd = super().get_command(ctx, name)
        if cmd is not None:
            return cmd
        ep = self._plugins().get(name)
        if ep is None:
            return None
        try:
            return ep.load()  # type: ignore[attr-defined]
        except ImportError as e:
            extra = _EXTRA_FOR.get(name, "all")
            reason = str(e)

            @click.command(name=name, help=f"(unavailable: install edgefleet[{extra}])",
                           context_settings={"ignore_unknown_options": True})
            @click.argument("args", nargs=-1, type=click.UNPROCESSED)
            def unavailable(args: tuple[str, ...]) -> None:
                raise click.ClickException(
                    f"'edgefleet {name}' needs the {extra} extra: pip install 'edgefleet[{extra}]' ({reason})"
                )

            return unavailable


@click.group(cls=_PluginGroup)
@click.version_option(agent.__version__, prog_name="edgefleet")
@click.option("-v", "--verbose", count=True, help="More logging (-v info, -vv debug).")
def cli(verbose: int) -> None:
    """edgefleet: compile, sign, push, run and watch ML models on a device fleet."""
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


@cli.group("agent")
def agent_group() -> None:
    """The device daemon."""


# Settings whose option is not named after the field (for error messages).
_OPTION_NAMES = {"broker_url": "--broker", "tags": "--tag"}


@agent_group.command("run")
@click.option("--config", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="TOML config file ([agent] table); EDGEFLEET_* variables override it.")
@click.option("--broker", "broker_url", help="MQTT broker URL, mqtt://host:port.")
@click.option("--device-id")
@click.option("--profile")
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--api-port", type=int, help="Localhost V2 HTTP port (0 disables).")
@click.option("--api-socket", type=click.Path(dir_okay=False, path_type=Path),
              help="Also serve the V2 API on this Unix socket.")
@click.option("--telemetry-interval", type=float, help="Seconds between telemetry messages.")
@click.option("--tag", "tags", multiple=True, help="Device tag (repeatable).")
@click.option("--trust-root", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Provisioned TUF root.json.")
@click.option("--profiles-dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--repository-url", help="Fetch metadata and bundles over HTTP from the hub "
              "(http://HUB:PORT/api/v1/repository/) instead of MQTT.")
def agent_run(config: Path | None, tags: tuple[str, ...], **opts: object) -> None:
    """Run the agent until SIGTERM/SIGINT."""
    from agent.config import load_settings
    from agent.daemon import Agent
    from agent.errors import DataError

    if tags:
        opts["tags"] = list(tags)
    try:
        settings = load_settings(config, opts, option_names=_OPTION_NAMES)
        daemon = Agent(settings)
    except DataError as e:
        raise click.ClickException(str(e)) from e
    logging.getLogger().setLevel(min(logging.getLogger().level, logging.INFO))

    def _term(signum: int, _frame: object) -> None:
        daemon._stop.set()

    signal.signal(signal.SIGTERM, _term)
    signal.signal(signal.SIGINT, _term)
    daemon.start()
    api = ""
    if daemon.api is not None and daemon.api.port:
        api += f", local API http://127.0.0.1:{daemon.api.port}"
    if daemon.api is not None and daemon.api.socket_path:
        api += f", socket {daemon.api.socket_path}"
    click.echo(f"agent {settings.device_id} ({settings.profile}) running{api}", err=True)
    daemon.wait_stopped()
    daemon.stop()


@agent_group.command("status")
@click.option("--data-dir", type=click.Path(exists=True, file_okay=False, path_type=Path), required=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def agent_status(data_dir: Path, as_json: bool) -> None:
    """State, slots, active model, spool size and last error of an agent's data dir."""
    from rich.console import Console
    from rich.table import Table

    from agent.daemon import status_from_disk

    try:
        st = status_from_disk(data_dir)
    except FileNotFoundError as e:
        raise click.ClickException(str(e)) from e
    if as_json:
        click.echo(json.dumps(st, indent=2))
        return
    t = Table(title=f"agent {data_dir}", show_header=False)
    for k in ("state", "deployment_id", "target_model", "model", "active_slot"):
        t.add_row(k, str(st[k]))
    for s, ref in st["slots"].items():
        t.add_row(f"slot {s}", str(ref))
    t.add_row("spool", f"{st['spool_records']} records, {st['spool_bytes']} bytes, {st['spool_dropped']} dropped")
    if st.get("captured_samples"):
        t.add_row("captured samples", f"{st['captured_samples']} ({st['captured_bytes']} bytes)")
    t.add_row("last error", f"{st['last_error_kind']}: {st['last_error']}" if st["last_error"] else "-")
    t.add_row("history", " → ".join(st["history"]))
    Console().print(t)


def main() -> None:
    cli(prog_name="edgefleet")


if __name__ == "__main__":
    main()
