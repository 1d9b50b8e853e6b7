"""The post-training step's refusal evaluation, early-settled (`posttrain.refusal_flags`) against the recorded one.

Reads a finished post-trained model of the cache and its base, computes the refusal rates of both with the current
code and prints them beside the ones recorded in the model card, with the number of decoding steps run (the
full-length generation runs `max_new_tokens` per batch) and the wall time. Example (the demo):
`PTR_CACHE_DIR=... python -m bench.posttrain_refusal gemma-3-270m-sft`. With `--ratio N`, instead: the base
model's refusal rate of the first N harmful and harmless TEST instructions by full-length `greedy_generate` and by
`refusal_flags`, alternating in one process (the ratio of their wall times; both rates printed).
"""
from __future__ import annotations

import json
import sys
import time

from replication.config import load_model_table
from replication.models import load_model
from replication.models.posttrained import CARD, load_recipe, target
from data_prep.datasets import instructions
from replication import posttrain
from replication.mechanics.generation import greedy_generate, hf_module
from replication.mechanics.refusal_score import refusal_score
from replication.models import prompts


def main(key: str) -> None:
    spec = load_model_table()[key]
    made = target(spec)
    card = json.loads((made.directory / CARD).read_text())
    evaluation = load_recipe(spec.recipe).evaluation
    for role, model_spec in (("base", made.base_spec), ("post", spec)):
        model = load_model(model_spec)
        steps = []
        hook = hf_module(model).register_forward_hook(lambda *args: steps.append(1))
        for kind in ("harmful", "harmless"):
            steps.clear()
            start = time.perf_counter()
            rate = posttrain.refusal_rate(model, model_spec, kind, evaluation)
            n_batches = -(-evaluation.n_test // evaluation.batch_size)
            print(json.dumps({"model": role, "kind": kind, "rate": rate,
                              "recorded": card["evaluation"][role]["refusal"][kind],
                              "equal": rate == card["evaluation"][role]["refusal"][kind],
                              "decoding_steps": len(steps), "full_length_steps": n_batches * evaluation.max_new_tokens,
                              "wall_s": round(time.perf_counter() - start, 1)}), flush=True)
        hook.remove()
        del model


def ratio(key: str, n: int) -> None:
    spec = load_model_table()[key]
    made = target(spec)
    evaluation = load_recipe(spec.recipe).evaluation
    model = load_model(made.base_spec)
    for kind in ("harmful", "harmless"):
        texts = prompts(model, made.base_spec, instructions(kind, "test", n))
        times = {}
        for path in ("full", "settled", "full", "settled"):
            start = time.perf_counter()
            if path == "full":
                rate = refusal_score(greedy_generate(model, texts, max_new_tokens=evaluation.max_new_tokens,
                                                     batch_size=evaluation.batch_size, progress=False))
            else:
                flags = posttrain.refusal_flags(model, texts, max_new_tokens=evaluation.max_new_tokens,
                                                batch_size=evaluation.batch_size)
                rate = sum(flags) / len(flags)
            times.setdefault(path, []).append(time.perf_counter() - start)
            times.setdefault(f"{path}_rate", rate)
        print(json.dumps({"kind": kind, "n": n, **times,
                          "ratio": sum(times["settled"]) / sum(times["full"])}), flush=True)


if __name__ == "__main__":
    if "--ratio" in sys.argv:
        ratio(sys.argv[1], int(sys.argv[sys.argv.index("--ratio") + 1]))
    else:
        main(sys.argv[1])
