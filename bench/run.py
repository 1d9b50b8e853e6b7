"""`make bench`: every experiment's benchmark for a profile, each in its own process, collected into
results/bench/<device>.json and a markdown table beside it.

    python -m bench.run --profile demo            # or tiny, paper-shape, ...; `--only knowledge,refusal` for a subset

Each benchmark times its fast path against the slow obvious one on the same inputs in the same run and refuses
to report a speed when they disagree (see the module docstrings in bench/).
"""
from __future__ import annotations

import json
import platform
import subprocess
import sys

import click

from data_prep.paths import REPO_ROOT
from replication.cubes import now
from replication.provenance import git_commit

# Arguments per experiment and profile: the knowledge bench takes a model (of the model table or a profile); the
# others a profile. paper-shape: the paper models' real shapes with random weights (scaled for a CPU; -full: a GPU).
PROFILE_NAMES = ("tiny", "demo", "paper", "paper-shape", "paper-shape-full")
BENCH_ARGS = {
    "knowledge": {
        "tiny": ["--model", "tiny", "--pairs", "4", "--slow-pairs", "2"],
        "demo": ["--model", "gemma-3-270m", "--pairs", "2", "--slow-pairs", "1", "--layers-per-batch", "3"],
        "paper": ["--profile", "paper", "--model", "llama-3.1-8b", "--dtype", "bfloat16", "--device", "cuda",
                  "--pairs", "16", "--layers-per-batch", "8"],
        "paper-shape": ["--profile", "paper-shape", "--model", "llama-3.1-8b", "--dtype", "bfloat16", "--pairs", "4",
                        "--slow-pairs", "1"],
        "paper-shape-full": ["--profile", "paper-shape-full", "--model", "llama-3.1-8b", "--dtype", "bfloat16",
                             "--device", "cuda", "--pairs", "16", "--layers-per-batch", "8"],
    },
    "truthfulness": {name: ["--profile", name] for name in PROFILE_NAMES},
    "refusal": {"tiny": ["--profile", "tiny"], "demo": ["--profile", "demo", "--prompts", "16", "--batch-size", "8"],
                "paper": ["--profile", "paper"], "paper-shape": ["--profile", "paper-shape", "--prompts", "8"],
                "paper-shape-full": ["--profile", "paper-shape-full"]},
    "confidence": {name: ["--profile", name] for name in PROFILE_NAMES},
}


def device_name() -> str:
    """A file-name-safe name of the accelerator (or CPU) the benchmarks ran on."""
    import torch

    name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu-{platform.machine()}"
    return name.lower().replace(" ", "-")


def run_one(experiment: str, args: list[str]) -> dict:
    completed = subprocess.run([sys.executable, "-m", f"bench.{experiment}", *args], cwd=REPO_ROOT,
                               capture_output=True, text=True)
    if completed.returncode != 0:
        return {"error": completed.stderr.strip().splitlines()[-1] if completed.stderr else "failed"}
    return json.loads(completed.stdout)


def markdown(results: dict) -> str:
    """One section per experiment: its flat key/value pairs (nested dicts joined with '.')."""
    def flat(value, prefix=""):
        if isinstance(value, dict):
            for key, inner in value.items():
                yield from flat(inner, f"{prefix}{key}.")
        else:
            yield prefix.rstrip("."), value

    lines = [f"# Benchmarks on {results['device']} (profile {results['profile']})", "",
             f"Commit {results['git_commit']}, started {results['started_at']}.", ""]
    for experiment, report in results["experiments"].items():
        lines += [f"## {experiment}", "", "| quantity | value |", "|---|---|"]
        lines += [f"| {key} | {value:.4g} |" if isinstance(value, float) else f"| {key} | {value} |"
                  for key, value in flat(report)]
        lines.append("")
    return "\n".join(lines)


@click.command()
@click.option("--profile", default="demo", show_default=True, type=click.Choice(list(BENCH_ARGS["knowledge"])))
@click.option("--only", default=",".join(BENCH_ARGS), show_default=True, help="Comma-separated experiments.")
def main(profile: str, only: str) -> None:
    """Run the benchmarks and write results/bench/<device>.{json,md}."""
    results = {"device": device_name(), "profile": profile, "git_commit": git_commit(), "started_at": now(),
               "experiments": {}}
    for experiment in only.split(","):
        click.echo(f"bench {experiment} ({profile}) ...")
        results["experiments"][experiment] = run_one(experiment, BENCH_ARGS[experiment][profile])
    write_results(results, f"{results['device']}-{profile}", markdown(results))


def write_results(results: dict, name: str, table: str, *, echo: bool = True) -> None:
    """results/bench/<name>.json and .md (the table), and (with `echo`) the table on the terminal."""
    out = REPO_ROOT / "results" / "bench"
    out.mkdir(parents=True, exist_ok=True)
    stem = out / name
    stem.with_suffix(".json").write_text(json.dumps(results, indent=2))
    stem.with_suffix(".md").write_text(table)
    if echo:
        click.echo(table)
        click.echo(f"written: {stem}.json, {stem}.md")


if __name__ == "__main__":
    main()
