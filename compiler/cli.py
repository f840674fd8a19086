"""``edgefleet compile``: the click command (transport only; logic is in the pipeline)."""

from __future__ import annotations

import re
from pathlib import Path

import click
from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from agent.bundle import SemVer
from agent.errors import EdgefleetError, ProfileError
from agent.profiles import Profile, list_profiles, load_profile
from compiler.errors import CompilerInputError
from compiler.measure import LatencySettings
from compiler.metrics import parse_metric
from compiler.pipeline import CompileOptions, TrainSettings, compile_model

__all__ = ["compile_command"]

# Same rule as agent.bundle.Manifest.name; checked here so a bad name fails before work.
_MODEL_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")


class _RichProgress:
    def __init__(self, progress: Progress) -> None:
        self._p = progress
        self._task = progress.add_task("starting", total=None)

    def begin(self, total: int) -> None:
        self._p.update(self._task, total=total, completed=0)

    def advance(self, description: str) -> None:
        task = self._p.tasks[0]
        if task.total is not None and task.completed < task.total:
            # Advance for the step that just finished, then show the one starting.
            self._p.update(self._task, advance=1 if task.description != "starting" else 0)
        self._p.update(self._task, description=description)


def _profiles(names: tuple[str, ...], directory: Path | None = None) -> list[Profile]:
    """The named profiles (or all) from ``directory``, else the shipped ones."""
    try:
        if "all" in names:
            return list_profiles(directory)
        return [load_profile(n, directory) for n in dict.fromkeys(names)]
    except ProfileError as e:
        raise click.BadParameter(str(e), param_hint="--profile") from e


@click.command("compile")
@click.argument("model")
@click.option(
    "--profile",
    "profile_names",
    multiple=True,
    required=True,
    help="Firmware profile name (repeatable), or 'all'.",
)
@click.option(
    "--profiles-dir",
    type=click.Path(path_type=Path, file_okay=False, exists=True),
    help="Folder of profile TOML files to use instead of the shipped firmware_profiles/.",
)
@click.option(
    "--calibration",
    required=True,
    type=click.Path(path_type=Path, dir_okay=False),
    help="Calibration .npz with array 'x'.",
)
@click.option(
    "--eval",
    "eval_path",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Evaluation .npz with 'x' and, for accuracy, labels 'y'.",
)
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path, file_okay=False))
@click.option("--name", default=None, help="Model name (default: the model file's stem).")
@click.option("--version", "version", default="0.1.0", show_default=True, help="Semantic version.")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option(
    "--calibrate-method",
    type=click.Choice(["minmax", "entropy", "percentile"]),
    default="minmax",
    show_default=True,
    help="Static int8 calibration method.",
)
@click.option(
    "--metric",
    default="accuracy",
    show_default=True,
    help="accuracy, topK (e.g. top5), mse, or cosine (embeddings; vs fp32 without labels).",
)
@click.option(
    "--latency-rounds",
    default=LatencySettings().rounds,
    show_default=True,
    type=click.IntRange(1, 1000),
    help="Timed batch-1 runs per candidate, in units of 40 (15: 600 runs, split over 3 "
    "alternations with the fp32 baseline).",
)
@click.option(
    "--state-dict",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Weights for a package.module:factory MODEL (torch.save'd state_dict).",
)
@click.option(
    "--train",
    "train_path",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Labelled training .npz ('x', 'y'): enables structured pruning + fine-tuning, "
    "a distilled width-scaled student, and unstructured pruning (reported only).",
)
@click.option(
    "--train-epochs",
    default=None,
    type=click.IntRange(1, 1000),
    help="Epochs for pruning fine-tuning (default 5) and distillation (default 15).",
)
@click.option(
    "--max-accuracy-drop",
    type=click.FloatRange(0.0, None),
    default=None,
    help="Tolerable metric drop vs fp32 (absolute, e.g. 0.01 = 1 point of accuracy) for "
    "static int8's accuracy-aware fallback and for selection [default: each profile's "
    "limits.max_accuracy_drop].",
)
@click.option("--tflite/--no-tflite", default=True, show_default=True,
              help="Build TFLite candidates for profiles that run LiteRT.")
def compile_command(
    model: str,
    profile_names: tuple[str, ...],
    profiles_dir: Path | None,
    calibration: Path,
    eval_path: Path | None,
    out_dir: Path,
    name: str | None,
    version: str,
    seed: int,
    calibrate_method: str,
    metric: str,
    latency_rounds: int,
    state_dict: Path | None,
    train_path: Path | None,
    train_epochs: int | None,
    max_accuracy_drop: float | None,
    tflite: bool,
) -> None:
    """Compile MODEL (.pt2, .onnx, or package.module:factory with --state-dict) into one
    bundle per profile and candidate.

    Every candidate is measured on this host (size, batch-1 latency, accuracy) and
    one per profile is selected; DIR/report.json says why each was kept or rejected.
    """
    try:
        SemVer.parse(version)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--version") from e
    profiles = _profiles(profile_names, profiles_dir)
    try:
        chosen_metric = parse_metric(metric)
    except CompilerInputError as e:
        raise click.BadParameter(str(e), param_hint="--metric") from e
    default_name = model.rpartition(":")[2] if state_dict is not None else Path(model).stem
    model_name = (name or default_name).lower()
    if not _MODEL_NAME.match(model_name):
        raise click.BadParameter(
            f"{model_name!r} is not a valid model name ([a-z0-9][a-z0-9_.-]{{0,63}})",
            param_hint="--name",
        )
    options = CompileOptions(
        name=model_name,
        version=version,
        seed=seed,
        latency=LatencySettings(rounds=latency_rounds),
        calibrate_method=calibrate_method,  # type: ignore[arg-type]
        metric=chosen_metric,
        tflite=tflite,
        max_accuracy_drop=max_accuracy_drop,
        state_dict=state_dict,
        train=None
        if train_path is None
        else TrainSettings(
            train_path,
            **({} if train_epochs is None else {"prune_epochs": train_epochs, "distill_epochs": train_epochs}),
        ),
    )
    console = Console()
    if not console.is_terminal:
        # Piped output (CI logs, files): do not squeeze the table into 80 columns.
        console = Console(width=200)
    err_console = Console(stderr=True)
    try:
        with Progress(
            SpinnerColumn(),
            TextColumn("{task.description}"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total}"),
            TimeElapsedColumn(),
            console=err_console,
            transient=True,
        ) as progress:
            report = compile_model(
                model, profiles, calibration, eval_path, out_dir, options, _RichProgress(progress)
            )
    except EdgefleetError as e:
        raise click.ClickException(str(e)) from e
    report.print(console)
    console.print(f"report: {out_dir / 'report.json'}")
