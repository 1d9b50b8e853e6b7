"""`ptr`: the command line of the replication package. It orchestrates data_prep -> replication -> analysis ->
report; it is the only package that imports all of them (heavy imports happen inside each command).

Errors: the package's own errors (configuration, data, a model not available, a stale or locked cube, a results
folder that cannot be written) end a command with one message and exit code 1; `--debug` (or PTR_DEBUG=1) shows
the traceback instead. The handling lives in one place, `Cli.invoke`.
"""
from __future__ import annotations

import errno
import importlib
import importlib.metadata
import json
import os
import time
from pathlib import Path

import click

EXPERIMENTS = ("knowledge", "truthfulness", "refusal", "confidence")
PACKAGE = "post-training-reshapes"
_PROFILE = click.option(
    "--profile", default="demo", show_default=True,
    help="Profile name (paper, demo, tiny) or path to a profile YAML file.",
)
# OSErrors that say the results (or data) folder cannot be written: shown as one line, like the package's own errors
DISK_ERRNOS = (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT)


_TIMINGS = click.option(
    "--timings", type=click.Path(dir_okay=False), default=None,
    help="Write each step's wall and CPU seconds to this JSON file, rewritten after every step "
         "(bench/replicate.py reads it).")


class StepClock:
    """Wall and CPU seconds of one step. CPU: this process (every thread) and its finished children (the report's
    kernel)."""

    def __init__(self, step: str):
        self.step, self.wall, self.cpu = step, time.perf_counter(), self.cpu_seconds()

    @staticmethod
    def cpu_seconds() -> float:
        times = os.times()
        return times.user + times.system + times.children_user + times.children_system

    def stop(self) -> dict:
        return {"step": self.step, "wall_s": time.perf_counter() - self.wall, "cpu_s": self.cpu_seconds() - self.cpu}


def write_timings(path: str | None, rows: list[dict]) -> None:
    if path:
        Path(path).write_text(json.dumps(rows, indent=1) + "\n")


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


def domain_errors() -> tuple[type[Exception], ...]:
    """The package's own error types, whose messages name the problem and the fix (imported when an error needs
    them: some of their modules import torch)."""
    from data_prep.errors import DataError
    from replication.config import ConfigError
    from replication.cubes import CubeLockedError, StaleCubeError
    from replication.memory import InsufficientMemoryError
    from replication.models import ModelNotAvailableError

    return ConfigError, DataError, ModelNotAvailableError, StaleCubeError, CubeLockedError, InsufficientMemoryError


def one_line(error: Exception) -> str | None:
    """The message a domain error ends a command with, or None for an error that is a bug (traceback shown)."""
    if isinstance(error, OSError) and not isinstance(error, FileNotFoundError) and error.errno in DISK_ERRNOS:
        where = f" {error.filename}" if error.filename else ""
        return (f"cannot write{where}: {error.strerror}. Check the free space and permissions of that folder "
                f"(results: PTR_RESULTS_DIR, data: PTR_DATA_DIR, models: PTR_CACHE_DIR).")
    if isinstance(error, FileNotFoundError) and error.errno is None:  # raised with a message of the package's own
        return str(error)
    if isinstance(error, domain_errors()):
        return str(error)
    return None


class Cli(click.Group):
    """The `ptr` group: a domain error ends any command with one message and exit code 1 (see module docstring)."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise
        except Exception as error:
            message = None if ctx.params.get("debug") else one_line(error)
            if message is None:
                raise
            raise click.ClickException(message) from None


def print_version(ctx: click.Context, _param, value: bool) -> None:
    if not value or ctx.resilient_parsing:
        return
    from replication.provenance import git_commit

    try:
        version = importlib.metadata.version(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        version = "unknown (not installed)"
    click.echo(f"ptr {version}, git commit {git_commit()}")
    ctx.exit()


def resolve(profile: str):
    """The profile argument (name or path) resolved: (ProfileRef, validated Profile)."""
    from replication.config import load_profile, resolve_profile

    ref = resolve_profile(profile)
    return ref, load_profile(ref.path)


def require_cubes(ref) -> dict[str, str]:
    """Each experiment's cube state; an error naming the command to run when the profile has no cube at all."""
    from analysis.audit import cube_states

    states = cube_states(ref.arg)
    if set(states.values()) == {"missing"}:
        raise click.ClickException(f"profile {ref.name} has no results in {ref.results}: nothing to read. Run the "
                                   f"experiments first: `ptr run all --profile {ref.arg}`.")
    return states


@click.group(cls=Cli, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--version", is_flag=True, expose_value=False, is_eager=True, callback=print_version,
              help="Print the package version and git commit, then stop.")
@click.option("--debug", is_flag=True, envvar="PTR_DEBUG",
              help="Show the full traceback of an error (also PTR_DEBUG=1), and third-party libraries' warnings.")
def main(debug: bool) -> None:
    """Replication of Du et al. (2025), "How Post-Training Reshapes LLMs" (arXiv 2504.02904).

    Typical order: `ptr data`, `ptr posttrain` (demo/tiny), `ptr run EXPERIMENT` for each experiment,
    `ptr report`, `ptr audit`. `make replicate` runs them all. `ptr sweep` chooses the settings of models the
    original code has none for (written into your own model table, --models).
    """
    from replication.progress import quiet_third_party, setup_logging

    quiet_third_party(debug)
    setup_logging()


@main.command()
@PROFILE_OPTION
@click.option("--mirror", type=click.Path(file_okay=False, exists=True), default=None,
              help="Directory with byte-exact copies of the raw files (instead of downloading). "
                   "Also read from the PTR_DATA_MIRROR environment variable.")
def data(profile: str, mirror: str | None) -> None:
    """Fetch and verify the raw data, then build every processed dataset (and the patching pairs for the
    tokenizers of the profile's models) into data/processed/ with a manifest. Finished outputs are skipped."""
    from data_prep.build import build_all
    from replication.models import pair_tokenizers

    _, prof = resolve(profile)
    manifest = build_all(mirror=mirror, tokenizers=pair_tokenizers(prof))
    click.echo(f"processed data ready: {manifest}")


@main.command()
@PROFILE_OPTION
def posttrain(profile: str) -> None:
    """Make the profile's own post-trained models (demo: Gemma-3-270m SFT; tiny: tiny SFT). A finished model
    (same recipe hash) is never retrained."""
    from replication.posttrain import posttrain_profile

    for path in posttrain_profile(resolve(profile)[1]):
        click.echo(f"post-trained model: {path}")


@main.command()
@click.argument("experiment", type=click.Choice(EXPERIMENTS + ("all",)))
@PROFILE_OPTION
@click.option("--fresh", is_flag=True,
              help="Set the existing cube aside (renamed to <experiment>.stale-<time>.zarr, not deleted) and start "
                   "again. Needed when the experiment's configuration changed since its units were computed.")
@click.option("--dry-run", is_flag=True,
              help="Print the models each experiment holds in memory at once and their size, then stop.")
@_TIMINGS
def run(experiment: str, profile: str, fresh: bool = False, dry_run: bool = False,
        timings: str | None = None) -> list[dict]:
    """Run one experiment (or all) for a profile and write its cube to results/<profile>/<experiment>.zarr.
    Resumable: finished units are skipped; a cube computed under another configuration is refused (see --fresh).
    Each run first prints its memory plan and stops when the visible GPU is too small for it. `all` keeps each
    model loaded from one experiment to the next where every model fits in memory at once."""
    from replication.cubes import StaleCubeError, set_aside
    from replication.memory import check_fits, fits_together, plan_lines, residencies
    from replication.models import check_available, keep_loaded, resolve_device

    ref, prof = resolve(profile)
    names = EXPERIMENTS if experiment == "all" else (experiment,)
    for name in names:
        prof.check_settings(name)  # a missing setting: one line naming `ptr sweep` (Cli.invoke)
    device, resident = resolve_device(prof.device), residencies(prof)
    for line in plan_lines(resident, names):
        click.echo(f"memory plan ({device}): {line}")
    if dry_run:
        return
    check_available(prof, names)  # every missing model at once, before hours of the others' work
    check_fits(resident, names, device)
    steps = []
    with keep_loaded(len(names) > 1 and fits_together(resident, names, device)):
        for name in names:
            clock = StepClock(f"run {name}")
            if fresh and (kept := set_aside(ref.results / f"{name}.zarr")):
                click.echo(f"{name}: previous cube kept as {kept}")
            click.echo(f"{name}: started")
            try:
                path = importlib.import_module(f"replication.experiments.{name}").run(prof)
            except StaleCubeError as error:
                raise click.ClickException(f"{error} (`ptr run {name} --profile {ref.arg} --fresh`)") from None
            steps.append(clock.stop())
            click.echo(f"{name}: {path} ({steps[-1]['wall_s']:.0f} s)")
            write_timings(timings, steps)
    return steps


@main.command()
@click.argument("experiment", type=click.Choice(["truthfulness", "refusal"]))
@PROFILE_OPTION
def sweep(experiment: str, profile: str) -> None:
    """Choose per-model settings for models the original code has none for (your own pair, the demo models):
    truthfulness probe_layer / intervene_layer, refusal layer / position / coefficients. Writes the grid to
    results/<profile>/<experiment>_sweep.zarr (resumable) and prints each choice beside the model table's value.
    With your own model table (--models / PTR_MODELS) the choices of the models it defines are written into it
    (settings_source: sweep, with what was measured), so `ptr run` can use them."""
    from data_prep.paths import user_model_table
    from replication.config import MODEL_TABLE
    from replication.sweeps import choices, record

    _, prof = resolve(profile)
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
        written = record(user, experiment, chosen)
        click.echo(f"written into {user}: {', '.join(written) or 'none of these models (it defines none of them)'}")
    click.echo(f"{differ} setting(s) differ from {user or MODEL_TABLE}" if differ
               else "the model table holds these settings")


@main.command()
@PROFILE_OPTION
def analyze(profile: str) -> None:
    """Compute every table of the paper from the profile's cubes and print them. Tables of an unfinished cube say
    so in their title; a cube computed under another configuration is not read (a note says how to recompute)."""
    from analysis.tables import all_tables

    ref, _ = resolve(profile)
    require_cubes(ref)
    for title, table in all_tables(ref.arg).items():
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

    ref, _ = resolve(profile)
    require_cubes(ref)
    paths = render_auto(ref.arg, tuple(f.strip() for f in formats.split(",")), engine=engine)
    for fmt, path in paths.items():
        click.echo(f"{fmt}: {path}")
    return paths


@main.command()
@PROFILE_OPTION
@click.option("--strict", is_flag=True,
              help="Exit non-zero when a replicated number fails its tolerance, a claim does not hold, or a "
                   "published number is not measured.")
def audit(profile: str, strict: bool) -> None:
    """Compare every replicated number with the published one (paper profile) or check the paper's claims
    qualitatively (demo, tiny). Prints the table, then writes results/<profile>/audit.{json,md}."""
    from analysis import audit as audit_module

    ref, _ = resolve(profile)
    for experiment, state in require_cubes(ref).items():
        if state != "finished":
            click.echo(f"{experiment}: cube {state}, not audited (`ptr run {experiment} --profile {ref.arg}`"
                       f"{' resumes it' if state == 'unfinished' else ''})")
    table = audit_module.audit(ref.arg, audit_module.collect_measured(ref.arg))
    click.echo(table.to_string(index=False))
    counts = audit_module.summary(table)
    click.echo(", ".join(f"{n} {status}" for status, n in counts.items()))
    try:
        audit_module.write_audit(table, ref.arg)
    except OSError as error:  # the table above is complete; only the files are missing
        raise click.ClickException(f"the audit above could not be written: {one_line(error) or error}") from None
    code = audit_module.exit_code(table, strict)
    if code:
        raise click.ClickException("--strict: a check failed, a claim does not hold or a published number is "
                                   "not measured (see the table above)")
    return counts


@main.command()
@PROFILE_OPTION
@_TIMINGS
@click.pass_context
def replicate(ctx: click.Context, profile: str, timings: str | None = None) -> None:
    """Everything, in order: data -> post-training -> the four experiments -> report -> audit. Each step is
    resumable and skips what is already current; a summary (time per step, report paths, audit counts) ends it.
    The experiments run as `ptr run all`: each model is loaded once where all fit in memory at once."""
    ref, prof = resolve(profile)
    steps = [("data", data, {"mirror": None})]
    if prof.posttrained_models():
        steps.append(("posttrain", posttrain, {}))
    steps += [("run", run, {"experiment": "all"}), ("report", report, {"formats": "html,pdf", "engine": "auto"}),
              ("audit", audit, {"strict": False})]
    rows, outputs = [], {}
    for title, command, kwargs in steps:
        click.secho(f"==> {title}", bold=True)
        clock = StepClock(title)
        outputs[title] = ctx.invoke(command, profile=profile, **kwargs)
        # `run all` times each experiment itself
        rows += outputs[title] if title == "run" else [clock.stop()]
        write_timings(timings, rows)
    click.secho("\nSummary", bold=True)
    for row in rows:
        click.echo(f"  {row['step']:<20} {row['wall_s']:8.1f} s")
    click.echo(f"  {'total':<20} {sum(row['wall_s'] for row in rows):8.1f} s")
    for fmt, path in outputs["report"].items():
        click.echo(f"  report ({fmt}): {path}")
    counts = ", ".join(f"{n} {status}" for status, n in outputs["audit"].items())
    click.echo(f"  audit: {counts} ({ref.results / 'audit.md'})")


if __name__ == "__main__":
    main()
