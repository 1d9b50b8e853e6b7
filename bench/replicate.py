"""End-to-end time of each step of `ptr replicate` for a profile: the per-step table of the README.

    python -m bench.replicate --profile demo [--fresh] [--steps data,posttrain,knowledge,...]

Each step is the CLI command a user runs (`ptr data`, `ptr posttrain`, `ptr run EXPERIMENT`, `ptr report`), timed
in its own process with the environment it is given (PTR_CACHE_DIR, PTR_RESULTS_DIR, ...), so a first run on a
fresh clone (nothing cached) and a rerun (`--fresh`: every experiment's cube set aside and recomputed, data and
post-trained models kept) are both measured the way a user meets them. Writes
results/bench/<device>-<profile>-replicate.{json,md}; a step that fails stops the table there with its error.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time

import click

from bench.run import device_name, write_results
from data_prep.paths import REPO_ROOT
from replication.cubes import now
from replication.provenance import git_commit

EXPERIMENTS = ("knowledge", "truthfulness", "refusal", "confidence")
STEPS = ("data", "posttrain", *EXPERIMENTS, "report", "audit")


def command(step: str, profile: str, fresh: bool) -> list[str]:
    """The `ptr` command line of one step."""
    if step in EXPERIMENTS:
        return ["run", step, "--profile", profile, *(["--fresh"] if fresh else [])]
    return [step, "--profile", profile]


def time_step(step: str, profile: str, fresh: bool) -> dict:
    """Wall and CPU seconds of one step in a child process (CPU: user + system of the child, all its threads)."""
    before, start = os.times(), time.perf_counter()
    completed = subprocess.run([sys.executable, "-m", "ptr", *command(step, profile, fresh)], cwd=REPO_ROOT,
                               capture_output=True, text=True)
    wall, after = time.perf_counter() - start, os.times()
    result = {"step": step, "command": "ptr " + " ".join(command(step, profile, fresh)), "wall_s": wall,
              "cpu_s": (after.children_user - before.children_user) + (after.children_system - before.children_system)}
    if completed.returncode != 0:
        result["error"] = (completed.stderr.strip().splitlines() or ["failed"])[-1]
    return result


def markdown(results: dict) -> str:
    lines = [f"# `ptr replicate` step by step on {results['device']} (profile {results['profile']}"
             f"{', --fresh rerun' if results['fresh'] else ''})", "",
             f"Commit {results['git_commit']}, started {results['started_at']}, {results['cpus']} CPUs; other load on "
             "the machine shows as wall time above CPU time / CPUs.", "",
             "| step | command | wall | CPU |", "|---|---|---:|---:|"]
    for row in results["steps"]:
        status = f" (failed: {row['error']})" if "error" in row else ""
        lines.append(f"| {row['step']} | `{row['command']}`{status} | {row['wall_s'] / 60:.1f} min "
                     f"| {row['cpu_s'] / 60:.1f} min |")
    total = sum(row["wall_s"] for row in results["steps"])
    lines += [f"| total | | {total / 60:.1f} min | {sum(r['cpu_s'] for r in results['steps']) / 60:.1f} min |", ""]
    return "\n".join(lines)


@click.command()
@click.option("--profile", default="demo", show_default=True)
@click.option("--fresh", is_flag=True, help="Set every experiment's cube aside and recompute it (a rerun).")
@click.option("--steps", default=",".join(STEPS), show_default=True, help="Comma-separated steps, in order.")
def main(profile: str, fresh: bool, steps: str) -> None:
    """Time each step of `ptr replicate` and write results/bench/<device>-<profile>-replicate.{json,md}."""
    chosen = steps.split(",")
    unknown = sorted(set(chosen) - set(STEPS))
    if unknown:
        raise click.BadParameter(f"unknown steps {unknown}; allowed: {', '.join(STEPS)}", param_hint="--steps")
    results = {"device": device_name(), "profile": profile, "fresh": fresh, "git_commit": git_commit(),
               "started_at": now(), "cpus": os.cpu_count(), "steps": []}
    name = f"{results['device']}-{profile}-replicate{'-fresh' if fresh else ''}"
    for step in chosen:
        click.echo(f"{now()} {step} ...")
        results["steps"].append(time_step(step, profile, fresh))
        click.echo(f"{now()} {step}: {results['steps'][-1]['wall_s'] / 60:.1f} min")
        write_results(results, name, markdown(results), echo=False)  # each step kept, should a later one be stopped
        if "error" in results["steps"][-1]:
            break
    write_results(results, name, markdown(results))


if __name__ == "__main__":
    main()
