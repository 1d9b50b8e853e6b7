"""Memory planning before a run: which models each experiment holds at once, and their weights' size.

Parameters are counted from each model's config on PyTorch's meta device (no weights are read or allocated):
the profile's random-weight shape, the real config.json of a paper model (replication/configs/shapes.yaml), or
the tiny models' code. The planner knows how each experiment loads its models (the dtypes come from
replication.models: `model_dtype` for refusal, `WEIGHTS_DTYPE` for confidence), so it needs no experiment.
`check_fits` refuses a run whose largest set of resident models does not fit the visible GPU, before any model is
loaded.
"""
from __future__ import annotations

from dataclasses import dataclass

import psutil
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from replication import shapes
from replication.config import ModelSpec, Profile, load_model_table
from replication.models import WEIGHTS_DTYPE, model_dtype, tiny

GIB = 2 ** 30
BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# Activations, KV caches and the CUDA context on top of the weights (measured runs stay well under this).
HEADROOM = 1.2


class InsufficientMemoryError(RuntimeError):
    """The visible GPU is too small for the models an experiment holds at once."""


@dataclass(frozen=True)
class Residency:
    experiment: str
    models: tuple[str, ...]  # held in memory at the same time
    dtype: str
    gib: float | None  # their weights, GiB; None when a model's size is unknown here


def parameter_count(spec: ModelSpec) -> int | None:
    """Parameters of the model of `spec` from its config alone, or None where no config is at hand."""
    if spec.source == "shape":
        config = AutoConfig.for_model(**spec.shape["config"])
    elif spec.source == "hub" and spec.key in shapes.shape_table():
        config = AutoConfig.for_model(**shapes.shape_table()[spec.key]["config"])
    elif spec.source == "tiny":
        config = tiny.build_config(spec.arch, tiny.build_tokenizer())
    elif spec.source == "posttrain":  # post-training keeps the architecture
        return parameter_count(load_model_table()[spec.base])
    else:
        return None
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


def residencies(profile: Profile) -> list[Residency]:
    """Per experiment, each set of models it holds at once, in the dtype the experiment loads them in: one model at
    a time everywhere (knowledge keeps a cross-model map's source runs, not its source model; refusal runs a model
    in its refusal_dtype where the table sets one; confidence reads the weights in float32 first)."""
    counts = {key: parameter_count(profile.model_spec(key)) for key in profile.models()}

    def residency(experiment: str, keys: tuple[str, ...], dtype: str) -> Residency:
        sizes = [counts[key] for key in keys]
        return Residency(experiment, keys, dtype, None if None in sizes else sum(sizes) * BYTES[dtype] / GIB)

    rows = [residency(experiment, (key,), profile.dtype) for experiment in ("knowledge", "truthfulness")
            for key in profile.models(experiment)]
    rows += [residency("refusal", (key,), model_dtype(profile, profile.model_spec(key)))
             for key in profile.models("refusal")]
    rows += [residency("confidence", (key,), WEIGHTS_DTYPE) for key in profile.models("confidence")]
    return rows


def plan_lines(rows: list[Residency], experiments: tuple[str, ...]) -> list[str]:
    """One line per experiment: its largest set of resident models (of `residencies`) and their weights' size."""
    lines = []
    for experiment in experiments:
        known = [r for r in rows if r.experiment == experiment and r.gib is not None]
        if not known:
            lines.append(f"{experiment}: model sizes unknown here (no config at hand)")
            continue
        largest = max(known, key=lambda r: r.gib)
        lines.append(f"{experiment}: at most {len(largest.models)} model(s) at once, largest "
                     f"{' + '.join(largest.models)} = {largest.gib:.3g} GiB of weights in {largest.dtype}")
    return lines


def check_fits(rows: list[Residency], experiments: tuple[str, ...], device: str) -> None:
    """Raise InsufficientMemoryError when `device` is a GPU smaller than HEADROOM x the largest resident set."""
    if device != "cuda":
        return
    total = torch.cuda.get_device_properties(0).total_memory / GIB
    for row in rows:
        if row.experiment in experiments and row.gib is not None and row.gib * HEADROOM > total:
            raise InsufficientMemoryError(
                f"{row.experiment} holds {' + '.join(row.models)} at once: {row.gib:.1f} GiB of weights in "
                f"{row.dtype} (x{HEADROOM} with activations) but the GPU has {total:.1f} GiB; use a larger GPU or "
                f"leave that family out of experiments.{row.experiment}.families")



def available_gib(device: str) -> float:
    """Memory a run can fill: the GPU's total, or the host's available memory on the CPU."""
    if device == "cuda":
        return torch.cuda.get_device_properties(0).total_memory / GIB
    return psutil.virtual_memory().available / GIB


def fits_together(rows: list[Residency], experiments: tuple[str, ...], device: str) -> bool:
    """Whether every model the experiments load, in each dtype it is loaded in, fits in memory at once (with
    HEADROOM), so that a run of several experiments can keep them loaded (models.keep_loaded); False where a size
    is unknown here."""
    loaded = {(row.models, row.dtype): row.gib for row in rows if row.experiment in experiments}
    return None not in loaded.values() and sum(loaded.values()) * HEADROOM <= available_gib(device)
