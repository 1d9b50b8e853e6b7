"""The arithmetic a profile's replication asks for: the matrix-product FLOPs of the post-training and of each
experiment, counted by torch's FlopCounterMode, and the time they take at this machine's peak matrix-product rate
(measured here on the model's own shapes). That time is a floor: no implementation of the same computation in the
same dtype runs it faster; a step's measured wall time (bench.replicate) over its floor is its overhead.

    python -m bench.arithmetic --profile demo [--steps posttrain,knowledge,...]

Each step runs in this process, in a scratch directory: the experiments write their cubes to a scratch results
directory (the user's are untouched; models come from the user's cache), the post-training trains a scratch copy
(its base model linked from the user's cache). Counted: matrix products (mm, addmm, bmm, attention), forward and
backward; elementwise work (norms, activations, softmax) and memory traffic are not, so the floor is a lower
bound. Writes results/bench/<device>-<profile>-arithmetic.{json,md} after each step, with the wall times of the
last bench.replicate run of the profile beside the floors where there is one.
"""
from __future__ import annotations

import contextlib
import importlib
import json
import os
import tempfile
import time
from pathlib import Path

import click
import torch
from torch.nn import functional
from torch.utils.flop_counter import FlopCounterMode

from bench.run import device_name, write_results
from data_prep.paths import REPO_ROOT, cache_dir
from replication.cubes import now
from replication.provenance import git_commit

EXPERIMENTS = ("knowledge", "truthfulness", "refusal", "confidence")
ROWS = (256, 512, 1024)  # batch rows of the timed products: large enough for the peak rate


def peak_rate(d_model: int, widths: list[int], repeats: int = 5) -> float:
    """The best FLOP/s of F.linear over the model's product shapes ([rows, d_model] x [d_model, width] and back),
    float32, on this machine's threads."""
    best = 0.0
    for rows in ROWS:
        for width in widths:
            for inner, outer in ((d_model, width), (width, d_model)):
                x, weight = torch.randn(rows, inner), torch.randn(outer, inner)
                functional.linear(x, weight)
                start = time.perf_counter()
                for _ in range(repeats):
                    functional.linear(x, weight)
                best = max(best, 2 * rows * inner * outer * repeats / (time.perf_counter() - start))
    return best


@contextlib.contextmanager
def environment(**values: str):
    """os.environ with `values` set for the duration."""
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def count(step) -> tuple[float, float]:
    """(matrix-product FLOPs, wall seconds) of `step()` under FlopCounterMode (slow: its per-op bookkeeping made
    the demo's knowledge step several times longer than its own run; a plain TorchDispatchMode of the same formulas
    counts nothing inside an nnsight trace)."""
    start = time.perf_counter()
    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops(), time.perf_counter() - start


def posttrain_step(profile, scratch: Path):
    """The profile's post-training from scratch: a scratch cache holding links to the user's base models."""
    from replication.posttrain import posttrain_profile

    def step():
        models = scratch / "cache" / "models"
        models.mkdir(parents=True)
        for base in (cache_dir() / "models").iterdir():
            if not (models / base.name).exists() and "-sft-" not in base.name:
                (models / base.name).symlink_to(base)
        with environment(PTR_CACHE_DIR=str(scratch / "cache")):
            posttrain_profile(profile)
    return step


def experiment_step(profile, name: str, scratch: Path):
    def step():
        with environment(PTR_RESULTS_DIR=str(scratch / "results")):
            importlib.import_module(f"replication.experiments.{name}").run(profile, progress=False)
    return step


def measured_walls(device: str, profile: str) -> dict[str, float]:
    """Wall seconds per step of the profile's last bench.replicate run (first run), by step name."""
    path = REPO_ROOT / "results" / "bench" / f"{device}-{profile}-replicate.json"
    if not path.is_file():
        return {}
    return {row["step"].split()[-1]: row["wall_s"] for row in json.loads(path.read_text())["steps"]}


def markdown(results: dict) -> str:
    rate = results["peak_flops_per_s"]
    lines = [f"# Matrix-product arithmetic of `{results['profile']}` on {results['device']}", "",
             f"Commit {results['git_commit']}, {results['threads']} torch threads; peak float32 matrix-product rate "
             f"measured on the model's shapes: {rate / 1e9:.0f} GFLOP/s. Floor = FLOPs / peak rate; measured = wall "
             f"time of the step in the last `bench.replicate` run.", "",
             "| step | TFLOP | floor at peak | measured | floor / measured |", "|---|---:|---:|---:|---:|"]
    for row in results["steps"]:
        floor = row["flops"] / rate
        wall = row.get("measured_wall_s")
        lines.append(f"| {row['step']} | {row['flops'] / 1e12:.3g} | {floor / 60:.1f} min | "
                     + (f"{wall / 60:.1f} min | {floor / wall:.0%} |" if wall else "| |"))
    total = sum(row["flops"] for row in results["steps"])
    lines += [f"| total | {total / 1e12:.3g} | {total / rate / 60:.1f} min | | |", ""]
    return "\n".join(lines)


@click.command()
@click.option("--profile", default="demo", show_default=True)
@click.option("--steps", default=",".join(("posttrain",) + EXPERIMENTS), show_default=True,
              help="Comma-separated steps to count.")
def main(profile: str, steps: str) -> None:
    """Count each step's matrix-product FLOPs and write results/bench/<device>-<profile>-arithmetic.*"""
    from replication.config import load_profile
    from replication.mechanics.generation import hf_module
    from replication.models import load_model, release

    prof = load_profile(profile)
    spec = prof.model_spec(prof.models(EXPERIMENTS[0])[0])
    config = hf_module(load_model(spec, dtype=prof.dtype, device=prof.device)).config
    release()
    device = device_name()
    results = {"device": device, "profile": profile, "git_commit": git_commit(), "started_at": now(),
               "threads": torch.get_num_threads(),
               "peak_flops_per_s": peak_rate(config.hidden_size, [config.intermediate_size]), "steps": []}
    walls = measured_walls(device, profile)
    with tempfile.TemporaryDirectory() as scratch:
        for name in steps.split(","):
            click.echo(f"{now()} {name} ...")
            step = posttrain_step(prof, Path(scratch)) if name == "posttrain" else \
                experiment_step(prof, name, Path(scratch))
            flops, seconds = count(step)
            results["steps"].append({"step": name, "flops": flops, "counted_wall_s": seconds}
                                    | ({"measured_wall_s": walls[name]} if name in walls else {}))
            write_results(results, f"{device}-{profile}-arithmetic", markdown(results), echo=False)  # so far
    click.echo(markdown(results))


if __name__ == "__main__":
    main()
