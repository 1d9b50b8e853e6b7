"""The post-training step's refusal evaluation, early-settled (`posttrain.refusal_flags`) against the recorded one.

Reads a finished post-trained model of the cache and its base, computes the refusal rates of both with the current
code and prints them beside the ones recorded in the model card, with the number of decoding steps run (the
full-length generation runs `max_new_tokens` per batch) and the wall time. Example (the demo):
`PTR_CACHE_DIR=... python -m bench.posttrain_refusal gemma-3-270m-sft`.
"""
from __future__ import annotations

import json
import sys
import time

from replication.config import load_model_table
from replication.models import load_model
from replication.models.posttrained import CARD, load_recipe, target
from replication.mechanics.generation import hf_module
from replication import posttrain


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


if __name__ == "__main__":
    main(sys.argv[1])
