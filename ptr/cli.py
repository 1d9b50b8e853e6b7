"""`ptr`: the command line of the replication package. It orchestrates data_prep -> replication -> analysis ->
report; it is the only package that imports all of them (heavy imports happen inside each command)."""
from __future__ import annotations

import importlib
import os
import sys
import time
from pathlib import Path

import click

EXPERIMENTS = ("knowledge", "truthfulness", "refusal", "confidence")
_PROFILE = click.option(
    "--profile", default="demo", show_default=True,
    help="Profile name (paper, demo, tiny) or path to a profile YAML file.",
)


def _use_model_table(ctx: click.Context, param: click.Parameter, value: str | None) -> None:
    if value:  # through the environment, so every step (and any subprocess) reads the same table
        os.environ["PTR_MODELS"] = str(Path(value).resolve())


_MODELS = click.option(
    "--models", type=click.Path(dir_okay=False, exists=True), expose_value=False, callback=_use_model_table,
    help="Your own model table (YAML), merged over the built-in one; also read from PTR_MODELS.",
)


def PROFILE_OPTION(command):  # noqa: N802 (a decorator, like the click options)
    """--profile, and --models: whatever reads a profile reads the model table too."""
    return _PROFILE(_MODELS(command))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Replication of Du et al. (2025), "How Post-Training Reshapes LLMs" (arXiv 2504.02904).

    Typical order: `ptr data`, `ptr posttrain` (demo/tiny), `ptr run EXPERIMENT` for each experiment,
    `ptr report`, `ptr audit`. `make replicate` runs them all. `ptr sweep` chooses the settings of models the
    original code has none for (written into your own model table, --models).
    """


@main.command()
@PROFILE_OPTION
@click.option("--mirror", type=click.Path(file_okay=False, exists=True), default=None,
              help="Directory with byte-exact copies of the raw files (instead of downloading). "
                   "Also read from the PTR_DATA_MIRROR environment variable.")
def data(profile: str, mirror: str | None) -> None:
    """Fetch and verify the raw data, then build every processed dataset (and the patching pairs for the
    tokenizers of the profile's models) into data/processed/ with a manifest. Finished outputs are skipped."""
    from data_prep.build import build_all
    from replication.config import load_profile
    from replication.models import pair_tokenizers

    prof = load_profile(profile)
    manifest = build_all(mirror=mirror, tokenizers=pair_tokenizers(prof))
    click.echo(f"processed data ready: {manifest}")


@main.command()
@PROFILE_OPTION
def posttrain(profile: str) -> None:
    """Make the profile's own post-trained models (demo: Gemma-3-270m SFT; tiny: tiny SFT). A finished model
    (same recipe hash) is never retrained."""
    from replication.config import load_profile
    from replication.posttrain import posttrain_profile

    for path in posttrain_profile(load_profile(profile)):
        click.echo(f"post-trained model: {path}")


@main.command()
@click.argument("experiment", type=click.Choice(EXPERIMENTS + ("all",)))
@PROFILE_OPTION
@click.option("--fresh", is_flag=True,
              help="Set the existing cube aside (renamed to <experiment>.stale-<time>.zarr, not deleted) and start "
                   "again. Needed when the experiment's configuration changed since its units were computed.")
@click.option("--dry-run", is_flag=True,
              help="Print the models each experiment holds in memory at once and their size, then stop.")
def run(experiment: str, profile: str, fresh: bool = False, dry_run: bool = False) -> None:
    """Run one experiment (or all) for a profile and write its cube to results/<profile>/<experiment>.zarr.
    Resumable: finished units are skipped; a cube computed under another configuration is refused (see --fresh).
    Each run first prints its memory plan and stops when the visible GPU is too small for it."""
    from data_prep.paths import results_dir
    from replication.config import ConfigError, load_profile
    from replication.cubes import StaleCubeError, set_aside
    from replication.memory import InsufficientMemoryError, check_fits, plan_lines, residencies
    from replication.models import resolve_device

    prof = load_profile(profile)
    names = EXPERIMENTS if experiment == "all" else (experiment,)
    try:
        for name in names:
            prof.check_settings(name)
    except ConfigError as error:
        raise click.ClickException(str(error)) from None
    device, resident = resolve_device(prof.device), residencies(prof)
    for line in plan_lines(resident, names):
        click.echo(f"memory plan ({device}): {line}")
    if dry_run:
        return
    try:
        check_fits(resident, names, device)
    except InsufficientMemoryError as error:
        raise click.ClickException(str(error)) from None
    for name in names:
        start = time.time()
        if fresh and (kept := set_aside(results_dir(prof.name) / f"{name}.zarr")):
            click.echo(f"{name}: previous cube kept as {kept}")
        try:
            path = importlib.import_module(f"replication.experiments.{name}").run(prof)
        except StaleCubeError as error:
            raise click.ClickException(f"{error} (`ptr run {name} --profile {profile} --fresh`)") from None
        click.echo(f"{name}: {path} ({time.time() - start:.0f} s)")


@main.command()
@click.argument("experiment", type=click.Choice(["truthfulness", "refusal"]))
@PROFILE_OPTION
def sweep(experiment: str, profile: str) -> None:
    """Choose per-model settings for models the original code has none for (your own pair, the demo models):
    truthfulness probe_layer / intervene_layer, refusal layer / position / coefficients. Writes the grid to
    results/<profile>/<experiment>_sweep.zarr (resumable) and prints each choice beside the model table's value.
    With your own model table (--models / PTR_MODELS) the choices of the models it defines are written into it
    (settings_source: sweep, with what was measured), so `ptr run` can use them."""
    from replication.config import MODEL_TABLE, ConfigError, load_profile
    from data_prep.paths import user_model_table
    from replication.sweeps import choices, record

    prof = load_profile(profile)
    chosen = choices(experiment, prof)
    differ = 0
    for key, choice in chosen.items():
        recorded = prof.model_spec(key).settings
        for name, value in choice.settings.items():
            same = getattr(recorded, name) == value
            differ += not same
            click.echo(f"{key:<28} {name:<20} swept {value!s:<10} model table {getattr(recorded, name)!s:<10}"
                       f"{'' if same else '  <- differs'}")
    user = user_model_table()
    if user:
        try:
            written = record(user, experiment, chosen)
        except ConfigError as error:
            raise click.ClickException(str(error)) from None
        click.echo(f"written into {user}: {', '.join(written) or 'none of these models (it defines none of them)'}")
    click.echo(f"{differ} setting(s) differ from {user or MODEL_TABLE}" if differ
               else "the model table holds these settings")


@main.command()
@PROFILE_OPTION
def analyze(profile: str) -> None:
    """Compute every table of the paper from the profile's cubes and print them."""
    from analysis.tables import all_tables

    for title, table in all_tables(profile).items():
        click.echo(f"\n## {title}\n")
        click.echo(table.to_string())


@main.command()
@PROFILE_OPTION
@click.option("--to", "formats", default="html,pdf", show_default=True, help="Comma-separated output formats.")
@click.option("--engine", type=click.Choice(["auto", "quarto", "fallback"]), default="auto", show_default=True,
              help="auto = Quarto when it is on PATH, else the built-in fallback renderer (nbclient+pandoc+typst).")
def report(profile: str, formats: str, engine: str) -> None:
    """Render the report (HTML and PDF) from the profile's cubes to report/_output/<profile>/."""
    from report.render import render_auto

    paths = render_auto(profile, tuple(f.strip() for f in formats.split(",")), engine=engine)
    for fmt, path in paths.items():
        click.echo(f"{fmt}: {path}")
    return paths


@main.command()
@PROFILE_OPTION
@click.option("--strict", is_flag=True, help="Exit non-zero when a replicated number fails its tolerance.")
def audit(profile: str, strict: bool) -> None:
    """Compare every replicated number with the published one (paper profile) or check the paper's claims
    qualitatively (demo, tiny). Writes results/<profile>/audit.{json,md}."""
    from analysis.audit import run_audit, summary

    table, exit_code = run_audit(profile, strict=strict)
    click.echo(table.to_string(index=False))
    if exit_code:
        sys.exit(exit_code)
    return summary(table)


@main.command()
@PROFILE_OPTION
@click.pass_context
def replicate(ctx: click.Context, profile: str) -> None:
    """Everything, in order: data -> post-training -> the four experiments -> report -> audit. Each step is
    resumable and skips what is already current; a summary (time per step, report paths, audit counts) ends it."""
    from data_prep.paths import results_dir
    from replication.config import load_profile

    steps = [("data", data, {"mirror": None})]
    if load_profile(profile).posttrained_models():
        steps.append(("posttrain", posttrain, {}))
    steps += [(f"run {name}", run, {"experiment": name}) for name in EXPERIMENTS]
    steps += [("report", report, {"formats": "html,pdf", "engine": "auto"}), ("audit", audit, {"strict": False})]
    timings, outputs = [], {}
    for title, command, kwargs in steps:
        click.secho(f"==> {title}", bold=True)
        start = time.time()
        outputs[title] = ctx.invoke(command, profile=profile, **kwargs)
        timings.append((title, time.time() - start))
    click.secho("\nSummary", bold=True)
    for title, seconds in timings:
        click.echo(f"  {title:<20} {seconds:8.1f} s")
    click.echo(f"  {'total':<20} {sum(s for _, s in timings):8.1f} s")
    for fmt, path in outputs["report"].items():
        click.echo(f"  report ({fmt}): {path}")
    counts = ", ".join(f"{n} {status}" for status, n in outputs["audit"].items())
    click.echo(f"  audit: {counts} ({results_dir(load_profile(profile).name) / 'audit.md'})")


if __name__ == "__main__":
    main()
