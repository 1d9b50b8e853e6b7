"""Benchmark of the truthfulness forward passes on a profile's first model: batched nnsight traces (left-padded,
grouped by length) against the slow obvious loop of one trace per statement, on the same inputs, for the two
heavy steps: last-token activations of bare statements at every layer, and P(TRUE)/P(FALSE) of few-shot prompts
with the truth direction added at the intervention layers. Each timing runs in a fresh process; its peak memory
is the resident-set high-water mark during the computation above the resident set before it (Linux: the mark is
reset through /proc/self/clear_refs first, so model loading does not hide it). No speed is reported unless the two
versions agree: largest difference within TOLERANCE (by the profile's dtype) of the largest value.

    python -m bench.truthfulness --profile demo [--statements 100] [--prompts 24]
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from bench.common import in_child, reset_peak_memory, status_mib
from replication.experiments import truthfulness as tr

TOLERANCE = {"float32": 1e-4, "bfloat16": 3e-2, "float16": 3e-2}  # batching changes rounding only


def _inputs(profile_name: str, n_statements: int, n_prompts: int):
    """The model, its layers and settings, and the inputs: statements, prompts and their intervention shifts."""
    from replication.config import load_profile

    profile = load_profile(profile_name)
    settings = profile.experiment(tr.EXPERIMENT)
    spec = profile.model_spec(profile.models(tr.EXPERIMENT)[0])
    model, layers = tr.load(profile, spec)
    dataset = settings.datasets[0]
    statements = tr.probe_statements(dataset, n_statements)
    table = tr.intervention_table(dataset, n_prompts)
    acts = tr.last_token_activations(model, layers, list(statements["statement"]), batch_size=len(statements))
    direction = tr.intervention_direction(tr.centre(acts[:, spec.settings.probe_layer]), statements["label"])
    shifts = tr.intervention_shifts(table["label"], direction, settings.intervention_coef)
    edit_layers = range(spec.settings.intervene_layer, spec.settings.probe_layer + 1)
    return (spec.key, model, layers, profile.batch_size_for(tr.EXPERIMENT), list(statements["statement"]),
            list(table["prompt"]), shifts, edit_layers)


def _timed(profile_name: str, step: str, batched: bool, n_statements: int, n_prompts: int, queue) -> None:
    """In a child process: build the inputs, then time one step (batched or one trace per item) and its added peak
    RSS."""
    key, model, layers, batch_size, statements, prompts, shifts, edit_layers = _inputs(
        profile_name, n_statements, n_prompts)
    batch_size = batch_size if batched else 1
    items = statements if step == "activations" else prompts

    def compute(texts):
        if step == "activations":
            return tr.last_token_activations(model, layers, texts, batch_size=batch_size)
        return tr.true_false_probabilities(model, layers, texts, batch_size=batch_size, edit_layers=edit_layers,
                                           shifts=shifts[:len(texts)])

    compute(items[:2])  # warm-up: first-call set-up is not part of the method's cost
    reset_peak_memory()
    rss_before = status_mib("VmRSS")
    start = time.perf_counter()
    values = compute(items)
    seconds = time.perf_counter() - start
    queue.put({"model": key, "step": step, "batch_size": batch_size, "items": len(items), "seconds": seconds,
               "items_per_s": len(items) / seconds, "peak_added_mib": status_mib("VmHWM") - rss_before,
               "values": values.tolist()})


def run(profile_name: str, n_statements: int = 100, n_prompts: int = 24) -> dict:
    """Per step: batched and one-trace-per-item wall time, items/s, added peak RSS, the speed-up and the largest
    difference between the two results."""
    from replication.config import load_profile

    dtype = load_profile(profile_name).dtype
    report = {"threads": torch.get_num_threads(), "dtype": dtype}
    for step in ("activations", "intervention"):
        batched = in_child(_timed, profile_name, step, True, n_statements, n_prompts)
        loop = in_child(_timed, profile_name, step, False, n_statements, n_prompts)
        batched_values, loop_values = torch.tensor(batched["values"]), torch.tensor(loop["values"])
        difference, largest = (batched_values - loop_values).abs().max().item(), loop_values.abs().max().item()
        if difference > TOLERANCE[dtype] * largest:
            raise SystemExit(f"{step}: batched and one-at-a-time results disagree (largest difference {difference:.3g}"
                             f" for values up to {largest:.3g}); no speed is reported")
        report["model"] = batched["model"]
        report[step] = {
            "items": batched["items"], "batch_size": batched["batch_size"],
            "batched_s": batched["seconds"], "loop_s": loop["seconds"],
            "batched_items_per_s": batched["items_per_s"], "loop_items_per_s": loop["items_per_s"],
            "speedup": loop["seconds"] / batched["seconds"],
            "batched_peak_added_mib": batched["peak_added_mib"], "loop_peak_added_mib": loop["peak_added_mib"],
            "max_abs_difference": difference, "max_abs_value": largest,
        }
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="demo")
    parser.add_argument("--statements", type=int, default=100)
    parser.add_argument("--prompts", type=int, default=24)
    args = parser.parse_args(argv)
    json.dump(run(args.profile, args.statements, args.prompts), sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
