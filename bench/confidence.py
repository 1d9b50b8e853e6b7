"""Benchmark of the confidence weight analysis on a profile's first model: LogitVar for every last-layer neuron,
vectorised (blocks of neurons times the whole unembedding) against a per-neuron loop, with wall time and the
peak memory each adds (peak resident memory during the computation minus resident memory before it; Linux
/proc). Each timing runs in a fresh process.

    python -m bench.confidence --profile demo [--loop-neurons 128]

The loop is timed on the first `loop_neurons` neurons and extrapolated to all of them (it is the slow obvious
version; running it on every neuron of a real model takes minutes); both versions are checked to agree there.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

from bench.common import in_child, reset_peak_memory, status_mib
from replication.experiments import confidence as conf


def per_neuron_logit_var(W_out: torch.Tensor, W_U: torch.Tensor) -> torch.Tensor:
    """The slow obvious LogitVar: one neuron's cosines with every unembedding column at a time."""
    column_norms = W_U.norm(dim=0)
    return torch.stack([((w @ W_U) / (w.norm() * column_norms)).var() for w in W_out])


def _weights(profile_name: str):
    from replication.config import load_profile
    from replication.models import load_model

    profile = load_profile(profile_name)
    spec = profile.model_spec(profile.models(conf.EXPERIMENT)[0])
    model = load_model(spec, dtype=conf.WEIGHTS_DTYPE, device="cpu")
    return spec.key, conf.mlp_output_matrix(model, spec).clone(), conf.unembedding(model, spec, "tl")


def _timed(profile_name: str, method: str, n_neurons: int | None, queue) -> None:
    """In a child process: load the weights, then time one LogitVar computation and its added peak RSS."""
    key, W_out, W_U = _weights(profile_name)
    W_out = W_out[:n_neurons] if n_neurons else W_out
    compute = conf.logit_var if method == "vectorised" else per_neuron_logit_var
    compute(W_out[:2], W_U)  # warm-up: first-call set-up is not part of the method's cost
    reset_peak_memory()
    rss_before = status_mib("VmRSS")
    start = time.perf_counter()
    values = compute(W_out, W_U)
    seconds = time.perf_counter() - start
    rss_after = status_mib("VmHWM")
    queue.put({"model": key, "method": method, "neurons": W_out.shape[0], "d_model": W_out.shape[1],
               "d_vocab": W_U.shape[1], "seconds": seconds, "peak_added_mib": rss_after - rss_before,
               "values": values.tolist()})


def run(profile_name: str, loop_neurons: int = 128) -> dict:
    """Timings of the vectorised LogitVar (all neurons, and the loop's subset) and of the per-neuron loop."""
    full = in_child(_timed, profile_name, "vectorised", None)
    subset = in_child(_timed, profile_name, "vectorised", loop_neurons)
    loop = in_child(_timed, profile_name, "loop", loop_neurons)
    agree = torch.allclose(torch.tensor(subset["values"]), torch.tensor(loop["values"]), rtol=1e-4, atol=0)
    return {
        "model": full["model"], "d_mlp": full["neurons"], "d_model": full["d_model"], "d_vocab": full["d_vocab"],
        "vectorised_all_s": full["seconds"], "vectorised_all_peak_added_mib": full["peak_added_mib"],
        "loop_neurons": loop["neurons"], "vectorised_subset_s": subset["seconds"], "loop_subset_s": loop["seconds"],
        "loop_all_s_extrapolated": loop["seconds"] * full["neurons"] / loop["neurons"],
        "loop_peak_added_mib": loop["peak_added_mib"], "loop_and_vectorised_agree": agree,
        "threads": torch.get_num_threads(), "load_average_1min": os.getloadavg()[0],
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="demo")
    parser.add_argument("--loop-neurons", type=int, default=128)
    args = parser.parse_args(argv)
    json.dump(run(args.profile, args.loop_neurons), sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
