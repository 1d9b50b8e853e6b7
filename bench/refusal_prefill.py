"""Benchmark of the shared prompt prefill of stacked steering conditions (generation.shared_prefill) against the
prefill it replaced (`generation.prefill`: every condition's rows through every block), in one process,
alternating, on the same prompts: wall time of `greedy_generate_many` each way, their ratio, and whether the
completions are identical.

    python -m bench.refusal_prefill --profile demo [--model KEY] [--prompts 16] [--repeats 2] [--cube PATH]

Conditions: a model's harmless conditions of refusal.run (baseline, addition with each direction, the transfer
curve points), with the directions of the profile's refusal cube (run `ptr run refusal` first) or of `--cube`.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

from replication.cubes import open_cube, profile_cube
from replication.mechanics import generation


def run(profile_name: str, key: str | None = None, n_prompts: int = 16, repeats: int = 2,
        cube: str | None = None) -> dict:
    from replication.config import load_profile
    from replication.experiments import refusal
    from replication.models import load_model, model_dtype

    profile = load_profile(profile_name)
    key = key or profile.models(refusal.EXPERIMENT)[0]
    spec = profile.model_spec(key)
    settings = profile.experiment(refusal.EXPERIMENT)
    store = profile_cube(profile_name, refusal.EXPERIMENT) if cube is None else open_cube(cube)
    group = [c for c in refusal.conditions(profile, key) if c.dataset == "harmless"]
    steers = [refusal.condition_steering(profile, c, None if c.source == refusal.NONE else refusal.chosen_direction(
        store.read_unit(f"direction__{c.source}"))) for c in group]
    model = load_model(spec, dtype=model_dtype(profile, spec), device=profile.device)
    prompts = refusal.prompts(model, spec, refusal.instructions("harmless", "test", n_prompts))
    shared = generation.shared_prefill
    seconds, completions = {"shared": [], "every_block": []}, {}
    for _ in range(repeats):
        for name, prefill in (("every_block", generation.prefill), ("shared", shared)):
            generation.shared_prefill = prefill
            try:
                start = time.perf_counter()
                completions[name] = generation.greedy_generate_many(
                    model, prompts, steers, max_new_tokens=settings.max_new_tokens,
                    batch_size=profile.batch_size_for(refusal.EXPERIMENT), progress=False,
                    stop_at_eos=settings.stop_at_eos)
                seconds[name].append(time.perf_counter() - start)
            finally:
                generation.shared_prefill = shared
    return {"model": key, "conditions": len(steers), "prompts": n_prompts, "repeats": repeats,
            "every_block_s": min(seconds["every_block"]), "shared_s": min(seconds["shared"]),
            "ratio": min(seconds["shared"]) / min(seconds["every_block"]),
            "identical_completions": completions["shared"] == completions["every_block"]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="demo")
    parser.add_argument("--model", default=None, help="model key (default: the profile's first refusal model)")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--cube", default=None, help="a refusal cube with the directions (default: the profile's)")
    args = parser.parse_args(argv)
    json.dump(run(args.profile, args.model, args.prompts, args.repeats, args.cube), sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
