"""Benchmark of steered greedy generation (replication/mechanics/generation.py): left-padded batches with a KV cache
against the same function one prompt at a time (batch 1, no padding), on the same prompts and the same steering;
wall time, generated tokens per second, peak memory each adds, and whether the completions are identical.
Each timing runs in a fresh process, so peak RSS (CPU) belongs to that computation alone.

    python -m bench.refusal --profile demo [--model KEY] [--prompts 32] [--batch-size 16] [--max-new-tokens 16]

Steering: the model's own refusal direction (difference in means over its first 32 train instructions of each
kind, at its refusal_layer / refusal_pos) added with its refusal_coef_add at refusal_apply_layer, on harmless
test instructions, generating through EOS so that every row yields exactly max_new_tokens tokens.
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import time

import torch

from bench.common import in_child

N_DIRECTION = 32  # train instructions of each kind for the benchmark's direction


def _setup(profile_name: str, key: str | None, n_prompts: int):
    from replication.config import load_profile
    from replication.experiments import refusal
    from replication.models import load_model, resolve_device

    profile = load_profile(profile_name)
    spec = profile.model_spec(key or profile.models(refusal.EXPERIMENT)[-1])
    model = load_model(spec, dtype=profile.dtype, device=profile.device)
    train = {kind: refusal.instructions(kind, "train", N_DIRECTION) for kind in refusal.KINDS}
    direction = refusal.chosen_direction(refusal.direction_unit(model, spec, train, batch_size=16))
    steer = refusal.Steering("addition", direction, spec.settings.refusal_apply_layer, spec.settings.refusal_coef_add,
                             spec.layers_path, spec.architecture.attn_out_path)
    prompts = refusal.prompts(model, spec, refusal.instructions("harmless", "test", n_prompts))
    return spec, model, steer, prompts, resolve_device(profile.device)


def _timed(profile_name: str, key: str | None, n_prompts: int, batch_size: int, max_new_tokens: int, queue) -> None:
    """In a child process: set up, then time one generation of every prompt and its added peak memory."""
    from replication.mechanics.generation import greedy_generate

    spec, model, steer, prompts, device = _setup(profile_name, key, n_prompts)
    greedy_generate(model, prompts[:1], max_new_tokens=2, steering=steer, progress=False)  # warm-up
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    completions = greedy_generate(model, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                                  steering=steer, progress=False, stop_at_eos=False)
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = (torch.cuda.max_memory_allocated() / 2**20 if device == "cuda"
            else (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024)
    queue.put({"model": spec.key, "device": device, "batch_size": batch_size, "seconds": seconds,
               "tokens_per_s": len(prompts) * max_new_tokens / seconds, "peak_mib": peak,
               "completions": completions})


def run(profile_name: str, key: str | None = None, n_prompts: int = 32, batch_size: int = 16,
        max_new_tokens: int = 16) -> dict:
    batched = in_child(_timed, profile_name, key, n_prompts, batch_size, max_new_tokens)
    single = in_child(_timed, profile_name, key, n_prompts, 1, max_new_tokens)
    same = [a == b for a, b in zip(batched["completions"], single["completions"])]
    return {
        "model": batched["model"], "device": batched["device"], "prompts": n_prompts,
        "max_new_tokens": max_new_tokens, "batch_size": batch_size, "threads": torch.get_num_threads(),
        "batched_s": batched["seconds"], "batch1_s": single["seconds"],
        "speedup": single["seconds"] / batched["seconds"],
        "batched_tokens_per_s": batched["tokens_per_s"], "batch1_tokens_per_s": single["tokens_per_s"],
        "batched_peak_mib": batched["peak_mib"], "batch1_peak_mib": single["peak_mib"],
        "peak_memory_kind": "CUDA max allocated" if batched["device"] == "cuda" else "added CPU peak RSS",
        "identical_completions": sum(same), "all_identical": all(same),
        "example": {"batched": batched["completions"][0], "batch1": single["completions"][0]},
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="demo")
    parser.add_argument("--model", default=None, help="model key (default: the profile's last refusal model)")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    args = parser.parse_args(argv)
    json.dump(run(args.profile, args.model, args.prompts, args.batch_size, args.max_new_tokens), sys.stdout,
              indent=2)
    print()


if __name__ == "__main__":
    main()
