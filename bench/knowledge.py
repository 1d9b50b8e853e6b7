"""Benchmark of activation patching (the knowledge experiment): the fast path
(replication.mechanics.patching.patch_effects: cached prefix, skipped layers, batched pairs and layers, two-logit
head) against the reference loop (one nnsight trace of the whole FALSE prompt per layer and position), same model,
same inputs, same run.

    python -m bench.knowledge --model tiny                                   # seconds on a CPU
    python -m bench.knowledge --model gemma-3-270m --pairs 2 --layers-per-batch 3          # the demo model, CPU
    python -m bench.knowledge --profile paper-shape-full --model llama-3.1-8b --dtype bfloat16 --device cuda \\
        --pairs 16 --layers-per-batch 8                                      # the paper's model shape, GPU

`--model` is a model key of replication/configs/models.yaml (its real weights, which must be available), or of
`--profile`'s models: with a random-weight profile (paper-shape, paper-shape-full) the model of that key's real
shape with random weights (replication/shapes.py), no weights needed. Inputs are synthetic
pairs shaped like the cities prompts: a shared few-shot prefix, then `--n-toks` statement tokens of which three
(the subject) differ. Reported: patched runs per second of both paths and their ratio, FLOPs (counted by
torch.utils.flop_counter) and FLOP/s against a measured matmul rate, peak memory (CUDA max allocated, or the
process's peak RSS so far on a CPU). No speed is reported when the paths disagree: in float32 by more than 1e-4,
in float64 1e-9; in half precision the fast path must be no further from a float32 computation than the
reference loop is (x2 + 1e-3), since both round differently.
"""
from __future__ import annotations

import argparse
import copy
import json
import resource
import sys
import time

import torch
from nnsight import LanguageModel
from torch.utils.flop_counter import FlopCounterMode

from replication.config import ModelSpec, load_model_table, load_profile
from replication.mechanics.patching import PatchModel, patch_effects, reference_patch_effects
from replication.models import DTYPES, load_model, resolve_device

TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4}


def build(name: str, profile: str | None, dtype: str, device: str) -> tuple[PatchModel, ModelSpec]:
    """The model `name` of the model table, or of `profile` (a random-weight profile's models need no weights;
    replication.models.build_shape_model initialises them in the target dtype on the device)."""
    name = "tiny-llama" if name == "tiny" else name
    spec = load_profile(profile).model_spec(name) if profile else load_model_table()[name]
    return PatchModel.from_spec(load_model(spec, dtype=dtype, device=device), spec), spec


def synthetic_pairs(n_pairs: int, length: int, n_toks: int, vocab: int, seed: int = 0):
    """TRUE and FALSE ids [pairs, length]: shared tokens except three subject tokens after the statement's 3rd."""
    generator = torch.Generator().manual_seed(seed)
    true_ids = torch.randint(5, min(vocab, 1000), (n_pairs, length), generator=generator)
    false_ids = true_ids.clone()
    subject = slice(length - n_toks + 3, length - n_toks + 6)
    false_ids[:, subject] = torch.randint(5, min(vocab, 1000), (n_pairs, 3), generator=generator)
    return true_ids, false_ids


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def peak_memory_mib(device: str) -> float:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def timed(function, device: str):
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    synchronize(device)
    start = time.perf_counter()
    value = function()
    synchronize(device)
    return value, time.perf_counter() - start, peak_memory_mib(device)


def counted_flops(function) -> int:
    with FlopCounterMode(display=False) as counter:
        function()
    return counter.get_total_flops()


def matmul_rate(dtype: torch.dtype, device: str, size: int) -> float:
    """FLOP/s of a square matmul in the model's dtype: what the hardware reaches on the easiest work."""
    a = torch.randn(size, size, dtype=dtype, device=device)
    a @ a
    repeats = 20 if device == "cuda" else 5
    _, seconds, _ = timed(lambda: [a @ a for _ in range(repeats)], device)
    return 2 * size**3 * repeats / seconds


def agreement(model: PatchModel, spec: ModelSpec, args, true_ids, false_ids, fast, slow) -> tuple[float, bool, str]:
    """(max |fast - reference| over the pairs both computed, whether the paths agree, the criterion)."""
    n = slow.shape[0]
    difference = (fast[:n].double() - slow.double()).abs().max().item()
    dtype = model.head._module.weight.dtype
    if dtype in TOLERANCE:
        return difference, difference <= TOLERANCE[dtype], f"max |fast - reference| <= {TOLERANCE[dtype]:g}"
    # Half precision: both against a float32 copy of the model (fast path: equal to the loop in float32, tested).
    copy32 = PatchModel.from_spec(LanguageModel(copy.deepcopy(model.lm._module).float(),
                                                tokenizer=model.lm.tokenizer), spec)
    truth = patch_effects(copy32, copy32, true_ids[:n], false_ids[:n], args.n_toks,
                          args.layers_per_batch).effects.cpu()
    del copy32
    fast_error = (fast[:n].float() - truth).abs().max().item()
    slow_error = (slow.float() - truth).abs().max().item()
    return difference, fast_error <= 2 * slow_error + 1e-3, (
        f"float32 error: fast {fast_error:.4g} <= 2 x reference {slow_error:.4g} + 1e-3")


def reference_trace_flops(model: PatchModel, ids: torch.Tensor) -> int:
    """FLOPs of one reference-loop trace: a forward of one whole prompt with logits at every position."""
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        model.lm._module(ids[None].to(model.device))
    return counter.get_total_flops()


def run(args) -> dict:
    device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, spec = build(args.model, args.profile, args.dtype, device)
    n_layers = len(model.layers)
    vocab = model.head._module.weight.shape[0]
    true_ids, false_ids = synthetic_pairs(args.pairs, args.prompt_tokens, args.n_toks, vocab)
    slow_pairs = min(args.slow_pairs, args.pairs)

    def fast_path():
        return patch_effects(model, model, true_ids, false_ids, args.n_toks, args.layers_per_batch).effects.cpu()

    def slow_path():
        return torch.stack([reference_patch_effects(model, model, t, f, args.n_toks)
                            for t, f in zip(true_ids[:slow_pairs], false_ids[:slow_pairs])])

    patch_effects(model, model, true_ids[:1], false_ids[:1], args.n_toks, args.layers_per_batch)  # warm-up
    fast, fast_s, fast_mem = timed(fast_path, device)
    slow, slow_s, slow_mem = timed(slow_path, device)
    difference, agrees, criterion = agreement(model, spec, args, true_ids, false_ids, fast, slow)
    fast_runs, slow_runs = args.pairs * n_layers * args.n_toks, slow_pairs * n_layers * args.n_toks
    fast_flops = counted_flops(fast_path)
    slow_flops = reference_trace_flops(model, false_ids[0]) * slow_runs
    rate = matmul_rate(model.head._module.weight.dtype, device, 4096 if device == "cuda" else 1024)
    report = {
        "model": args.model, "dtype": args.dtype, "device": device, "threads": torch.get_num_threads(),
        "layers": n_layers, "prompt_tokens": args.prompt_tokens, "n_toks": args.n_toks,
        "pairs_fast": args.pairs, "pairs_reference": slow_pairs, "layers_per_batch": args.layers_per_batch,
        "max_abs_difference": difference, "agreement": criterion, "agrees": agrees,
        "matmul_flop_per_s": rate,
        "reference": {"seconds": slow_s, "seconds_per_pair": slow_s / slow_pairs, "flops": slow_flops,
                      "flop_per_s": slow_flops / slow_s, "peak_memory_mib": slow_mem},
        "fast": {"seconds": fast_s, "seconds_per_pair": fast_s / args.pairs, "flops": fast_flops,
                 "flop_per_s": fast_flops / fast_s, "peak_memory_mib": fast_mem},
        "memory": "CUDA max allocated per path" if device == "cuda" else "process peak RSS so far (fast ran first)",
    }
    if agrees:
        report["fast"]["patched_runs_per_s"] = fast_runs / fast_s
        report["reference"]["patched_runs_per_s"] = slow_runs / slow_s
        report["speedup"] = (fast_runs / fast_s) / (slow_runs / slow_s)
        report["fast"]["fraction_of_matmul_rate"] = fast_flops / fast_s / rate
    else:
        report["refused"] = "the fast path disagrees with the reference loop; no speed reported"
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny", help="tiny, or a model key of the model table or of --profile")
    parser.add_argument("--profile", default=None, help="take --model from this profile (e.g. paper-shape-full)")
    parser.add_argument("--dtype", default="float32", choices=list(DTYPES))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--pairs", type=int, default=4, help="pairs timed on the fast path")
    parser.add_argument("--slow-pairs", type=int, default=1, help="of those, pairs timed on the reference loop")
    parser.add_argument("--prompt-tokens", type=int, default=75)
    parser.add_argument("--n-toks", type=int, default=14, help="patched positions (statement + suffix)")
    parser.add_argument("--layers-per-batch", type=int, default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    report = run(parser.parse_args(argv))
    json.dump(report, sys.stdout, indent=2)
    print()
    if not report["agrees"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
