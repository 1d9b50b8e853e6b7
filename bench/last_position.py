"""Benchmark of how the last position's logits are asked for: `logits_to_keep=LAST_POSITION` (an index tensor:
the LM head multiplies a contiguous copy, one matrix product) against `logits_to_keep=1` (the path before: a
strided view, which torch.matmul multiplies as one matrix-vector product per row), on a profile's first model, in
one process, alternating:

* confidence: the prompts of one dataset through `last_position_logits` (batches of the profile's batch size);
* generation: `greedy_generate_many` of the first harmful test instructions under stacked unsteered conditions,
  as refusal stacks its conditions (each prefill computes the last position's logits of every row).

Reports wall seconds each way, their ratio, the largest logit difference and whether the completions are equal.

    python -m bench.last_position --profile demo [--dataset cities] [--prompts 16] [--conditions 5] [--repeats 2]
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from replication.experiments import confidence
from replication.mechanics import generation

PATHS = {"int_1": 1, "last_position": None}  # None: the module's LAST_POSITION


def timed(run, repeats: int) -> tuple[dict, dict]:
    """Seconds (best of `repeats`) and the last result of `run(logits_to_keep)` per path, alternating."""
    seconds, results = {name: [] for name in PATHS}, {}
    for _ in range(repeats):
        for name, keep in PATHS.items():
            start = time.perf_counter()
            results[name] = run(keep)
            seconds[name].append(time.perf_counter() - start)
    return {name: min(values) for name, values in seconds.items()}, results


def with_logits_to_keep(module, keep, call):
    """`call()` with `module.LAST_POSITION` replaced by `keep` (None: left as it is)."""
    saved = module.LAST_POSITION
    module.LAST_POSITION = saved if keep is None else keep
    try:
        return call()
    finally:
        module.LAST_POSITION = saved


def run(profile_name: str, dataset: str, n_prompts: int, n_conditions: int, repeats: int) -> dict:
    from data_prep.datasets import instructions
    from data_prep.prompts import intervention_table
    from replication.config import load_profile
    from replication.models import load_model, prompts

    profile = load_profile(profile_name)
    key = profile.models(confidence.EXPERIMENT)[0]
    spec = profile.model_spec(key)
    model = load_model(spec, dtype=profile.dtype, device=profile.device)
    batch_size = profile.batch_size_for(confidence.EXPERIMENT)

    table = intervention_table(dataset, profile.experiment(confidence.EXPERIMENT).max_statements)
    statements = table["prompt"].tolist()
    conf_seconds, logits = timed(lambda keep: with_logits_to_keep(confidence, keep, lambda: (
        confidence.last_position_logits(model, spec, statements, batch_size))), repeats)

    texts = prompts(model, spec, instructions("harmful", "test", n_prompts))
    gen_seconds, completions = timed(lambda keep: with_logits_to_keep(generation, keep, lambda: (
        generation.greedy_generate_many(model, texts, [None] * n_conditions, max_new_tokens=16,
                                        batch_size=batch_size, progress=False))), repeats)
    return {"model": key, "repeats": repeats,
            "confidence": {"dataset": dataset, "prompts": len(statements), "batch_size": batch_size,
                           "int_1_s": conf_seconds["int_1"], "last_position_s": conf_seconds["last_position"],
                           "ratio": conf_seconds["last_position"] / conf_seconds["int_1"],
                           "max_abs_logit_diff": (logits["int_1"] - logits["last_position"]).abs().max().item()},
            "generation": {"prompts": n_prompts, "conditions": n_conditions, "max_new_tokens": 16,
                           "int_1_s": gen_seconds["int_1"], "last_position_s": gen_seconds["last_position"],
                           "ratio": gen_seconds["last_position"] / gen_seconds["int_1"],
                           "identical_completions": completions["int_1"] == completions["last_position"]}}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="demo")
    parser.add_argument("--dataset", default="cities")
    parser.add_argument("--prompts", type=int, default=16, help="harmful instructions generated")
    parser.add_argument("--conditions", type=int, default=5, help="stacked unsteered conditions")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)
    json.dump(run(args.profile, args.dataset, args.prompts, args.conditions, args.repeats), sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
