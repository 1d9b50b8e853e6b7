"""End-to-end time of each step of `ptr replicate` for a profile: the per-step table of the README.

    python -m bench.replicate --profile demo [--fresh]

The command a user runs, in one child process with the environment it is given (PTR_CACHE_DIR, PTR_RESULTS_DIR,
...): `ptr replicate` for a first run (on a fresh clone nothing is cached: data, post-training, every experiment,
report, audit), `ptr run all --fresh` for a rerun (every experiment's cube set aside and recomputed; data and
post-trained models kept). Both keep each model loaded from one experiment to the next where memory allows, so the
steps are timed inside that process (their `--timings` file: wall seconds, and CPU seconds of the process's threads
and its children), not as separate commands. Writes results/bench/<device>-<profile>-replicate[-fresh].{json,md};
a run that fails keeps the steps it finished and its error.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click

from bench.run import device_name, write_results
from data_prep.paths import REPO_ROOT
from replication.cubes import now
from replication.provenance import git_commit


def command(profile: str, fresh: bool) -> list[str]:
    """The `ptr` command line a user runs: the whole replication, or a rerun of every experiment."""
    return ["run", "all", "--profile", profile, "--fresh"] if fresh else ["replicate", "--profile", profile]


def time_run(profile: str, fresh: bool) -> dict:
    """Per-step rows of one run of `command` (from its --timings file), its total wall time and any error."""
    with tempfile.TemporaryDirectory() as scratch:
        timings = Path(scratch) / "timings.json"
        start = time.perf_counter()
        completed = subprocess.run([sys.executable, "-m", "ptr", *command(profile, fresh), "--timings", str(timings)],
                                   cwd=REPO_ROOT, capture_output=True, text=True)
        result = {"command": "ptr " + " ".join(command(profile, fresh)), "wall_s": time.perf_counter() - start,
                  "steps": json.loads(timings.read_text()) if timings.is_file() else []}
    if completed.returncode != 0:
        result["error"] = (completed.stderr.strip().splitlines() or ["failed"])[-1]
    return result


def markdown(results: dict) -> str:
    lines = [f"# `{results['command']}` step by step on {results['device']}", "",
             f"Commit {results['git_commit']}, started {results['started_at']}, {results['cpus']} CPUs, one process "
             f"(models kept loaded between experiments where memory allows); other load on the machine shows as "
             f"wall time above CPU time / CPUs.", "",
             "| step | wall | CPU |", "|---|---:|---:|"]
    for row in results["steps"]:
        lines.append(f"| {row['step']} | {row['wall_s'] / 60:.1f} min | {row['cpu_s'] / 60:.1f} min |")
    if "error" in results:
        lines.append(f"| (failed after these steps: {results['error']}) | | |")
    lines += [f"| total (the whole command) | {results['wall_s'] / 60:.1f} min "
              f"| {sum(r['cpu_s'] for r in results['steps']) / 60:.1f} min |", ""]
    return "\n".join(lines)


@click.command()
@click.option("--profile", default="demo", show_default=True)
@click.option("--fresh", is_flag=True, help="Time `ptr run all --fresh` (a rerun) instead of `ptr replicate`.")
def main(profile: str, fresh: bool) -> None:
    """Time each step of `ptr replicate` (or of a rerun) and write results/bench/<device>-<profile>-replicate.*"""
    results = {"device": device_name(), "profile": profile, "fresh": fresh, "git_commit": git_commit(),
               "started_at": now(), "cpus": os.cpu_count()}
    click.echo(f"{now()} ptr {' '.join(command(profile, fresh))} ...")
    results.update(time_run(profile, fresh))
    write_results(results, f"{results['device']}-{profile}-replicate{'-fresh' if fresh else ''}", markdown(results))
    if "error" in results:
        raise click.ClickException(f"the run failed: {results['error']}")


if __name__ == "__main__":
    main()
