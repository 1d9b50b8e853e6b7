"""Benchmark of shared few-shot prefixes (mechanics.forward.SharedPrefixes) on a profile's first model: the
confidence prompts of each dataset through `last_position_logits`, plain left-padded batches (`share=False`, the
path before sharing) against shared prefixes, timed back to back in one process (alternating, `--repeats` times)
with the tokens each path runs (batch rows x width, padding included; the shared path's prefix runs counted once).
No speed is reported unless the two agree within TOLERANCE (float32 rounding of other batch shapes).

    python -m bench.prefix_sharing --profile demo [--datasets cities facts] [--repeats 2]
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from replication.experiments import confidence as conf
from replication.mechanics.forward import SharedPrefixes

TOLERANCE = 1e-3  # largest |logit difference| allowed, float32 (observed ~1e-5 on logits of order 10)


def forward_tokens(prefixes: SharedPrefixes, batch_size: int) -> int:
    """Token positions the path runs through the model: prefix runs (padded batches) plus every batch's rows x S."""
    prefix_lengths = sorted({(g, n) for g, n in zip(prefixes.group_of, prefixes.shared_length) if g >= 0})
    lengths = [n for _, n in prefix_lengths]
    prefix = sum(len(lengths[i:i + batch_size]) * max(lengths[i:i + batch_size])
                 for i in range(0, len(lengths), batch_size))
    return prefix + sum(batch.input_ids.numel() for batch in prefixes.batches(batch_size))


def main(argv: list[str] | None = None) -> int:
    from data_prep.prompts import intervention_table
    from replication.config import load_profile
    from replication.models import load_model

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="demo")
    parser.add_argument("--datasets", nargs="*", help="default: the profile's confidence datasets")
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args(argv)
    profile = load_profile(args.profile)
    settings = profile.experiment("confidence")
    batch_size = profile.batch_size_for("confidence")
    key = profile.models("confidence")[0]
    spec = profile.model_spec(key)
    model = load_model(spec, dtype=profile.dtype, device=profile.device)
    rows = []
    for dataset in args.datasets or settings.datasets:
        prompts = intervention_table(dataset, settings.max_statements)["prompt"].tolist()
        seconds = {False: [], True: []}
        logits = {}
        for _ in range(args.repeats):
            for share in (False, True):
                start = time.perf_counter()
                prefixes = SharedPrefixes(model, prompts, batch_size=batch_size, share=share)
                logits[share] = conf.last_position_logits(model, spec, prompts, batch_size, prefixes=prefixes)
                seconds[share].append(time.perf_counter() - start)
        difference = (logits[True] - logits[False]).abs().max().item()
        if difference > TOLERANCE:
            print(f"{dataset}: the paths disagree by {difference:.3g} > {TOLERANCE}; no timing reported")
            return 1
        row = {"model": key, "dataset": dataset, "prompts": len(prompts), "max_abs_logit_diff": difference,
               "groups": len({g for g in prefixes.group_of if g >= 0}),
               "tokens_plain": forward_tokens(SharedPrefixes(model, prompts, batch_size=batch_size, share=False),
                                              batch_size),
               "tokens_shared": forward_tokens(prefixes, batch_size),
               "seconds_plain": min(seconds[False]), "seconds_shared": min(seconds[True])}
        row["speedup"] = row["seconds_plain"] / row["seconds_shared"]
        rows.append(row)
        print(json.dumps(row))
    return 0


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    sys.exit(main())
