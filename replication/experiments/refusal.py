"""Refusal (paper §5, Figure 1c): difference-in-means refusal directions of a base model and its post-trained
versions, how similar they are, and how well each steers its own and the other model (methods_reference §1.5,
§4.3, §5 item 10; the original Refusal/extract_refusal_dir.py and apply_refusal_dir.py, after Kissane et al.).

Data: AdvBench (harmful) and Alpaca (harmless) instructions split 80/20 as the original (data_prep); the first
n_train train instructions of each kind give the direction, the first n_test test instructions of each kind are
steered.

Direction of a model: mean over harmful minus mean over harmless of the residual stream entering block L
(TransformerLens resid_pre L = HF hidden_states[L]) at token position p, unit-normalised; L = refusal_layer,
p = refusal_pos (negative, from the end of the prompt) from the model table; means accumulated in float64. The
prompt template is the model's own (`template`) unless the table names another for extraction
(`refusal_extract_template`: the original extracts the Tulu SFT direction with the plain base template).

Precision and tokens: a model runs in its table's `refusal_dtype` if set (Llama-2-13b(-chat): float16, as the
original), else in the profile's dtype; provenance records which (`model_dtypes`). The means are float64 and the
stored directions float32, where the original's are bf16 (its shipped unit directions). Every prompt starts with
one BOS; the original's Mistral template "<s>[INST] ..." plus the tokenizer's BOS gave two, a bug kept corrected
here (no published number uses Mistral's refusal).

Steering (replication/mechanics/steering.py): greedy generation of max_new_tokens with hooks at every position;
addition / subtraction = +/- coef x r at resid_pre, resid_mid and resid_post of block refusal_apply_layer
(three edits, so about 3 x coef in effect, as the original); ablation = r projected out at those three points of
every block. Harmful test instructions get subtraction and ablation, harmless ones addition; the coefficients are
the steered model's refusal_coef_sub / refusal_coef_add (or the direction model's, where the table says
`refusal_coef_of: direction_model`, as the original's Llama-2-13b branch). Each model is steered by its own
direction and by each paired model's: forward transfer = the base direction on a post-trained model, backward
= a post-trained direction on the base. Refusal score = fraction of completions starting with one of the 25
refusal phrases (replication/mechanics/refusal_score.py).
The conditions of one model on one instruction set are generated together, stacked in each forward pass
(`greedy_generate_many`); every condition's completions equal its own generation's.

Cube ``results/<profile>/refusal.zarr``, resumable per unit:

* ``direction__<model>``: unit directions at every block and the last DIRECTION_POSITIONS positions (the sweep
  reads them), the norm of each mean difference, and the per-instruction activations at the model's
  (refusal_layer, refusal_pos) (Figure 1c).
* ``family__<family>``: cosine of every two models' directions (at their settings, and per layer at their
  positions), and the 2-D PCA of each model's activations with every direction projected (Figure 1c).
* ``generation__<target>__<source>__<intervention>__<dataset>``: every completion, its refusal flag and the
  refusal score of one condition; source and intervention are "none" for the unsteered baseline.
* ``curve__<target>__<source>__<scale>``: the same for one point of a transfer curve (beyond the paper): the
  source's direction added to the target on the first transfer_n_test harmless instructions (all n_test by
  default) at `scale` x the addition coefficient.

`sweep(profile)` chooses refusal_layer / refusal_pos / coefficients for models without the original's settings
(the demo models), writing its grid to ``results/<profile>/refusal_sweep.zarr``.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import xarray as xr

from data_prep.datasets import instructions, read_refusal
from data_prep.paths import results_dir
from replication.config import ModelSpec, Profile
from replication.cubes import CubeStore, now
from replication.mechanics.directions import cosine_similarity, mean_difference, pca_projection, unit_vector
from replication.mechanics.forward import resid_pre_activations
from replication.mechanics.generation import greedy_generate, greedy_generate_many
from replication.mechanics.refusal_score import is_refusal, refusal_score
from replication.mechanics.steering import Steering
from replication.models import load_model, model_dtype, prompts, release
from replication.progress import progress_bar
from replication.provenance import provenance

EXPERIMENT = "refusal"
KINDS = ("harmful", "harmless")
NONE = "none"  # source and intervention of the unsteered baseline
# (intervention, dataset) of the steered conditions: refusal is removed from harmful instructions (subtraction,
# ablation) and induced on harmless ones (addition). The paper's harmful cells are the ablation condition (the
# original README's run); subtraction, every direction subtracted at the one block, is beyond the paper: the
# original's subtraction run subtracts only the post-trained direction and ablates the base direction at that
# block, a one-block ablation not computed here (analysis/refusal.py says why).
STEERED = (("subtraction", "harmful"), ("ablation", "harmful"), ("addition", "harmless"))
DIRECTION_POSITIONS = 5  # directions are kept at the last 5 prompt positions (at least), for the sweep


# ---------------------------------------------------------------------------------------------------------------
# Directions


def direction_cosines(directions: torch.Tensor) -> torch.Tensor:
    """[model, model] cosine of every two directions ([model, hidden]), in float64."""
    directions = directions.double()
    return cosine_similarity(directions[:, None], directions[None, :])


def stored_positions(spec: ModelSpec) -> list[int]:
    """The positions whose directions are kept: the last DIRECTION_POSITIONS, and refusal_pos if further back."""
    return list(range(-max(DIRECTION_POSITIONS, -spec.settings.refusal_pos), 0))


def direction_unit(model, spec: ModelSpec, train: dict[str, list[str]], *, batch_size: int,
                   progress: bool = False) -> xr.Dataset:
    """Directions of one model at every block and stored position, and its activations at its settings."""
    n = len(train["harmful"])
    if len(train["harmless"]) != n:
        raise ValueError("the harmful and harmless training sets must be equally large")
    template = spec.settings.refusal_extract_template
    positions = stored_positions(spec)
    acts = {kind: resid_pre_activations(model, prompts(model, spec, train[kind], template), positions,
                                        batch_size=batch_size, progress=progress) for kind in KINDS}
    difference = mean_difference(acts["harmful"], acts["harmless"])  # [block, position, hidden]
    layer, position = spec.settings.refusal_layer, positions.index(spec.settings.refusal_pos)
    chosen = torch.stack([acts[kind][:, layer, position] for kind in KINDS]).float()  # [kind, instruction, hidden]
    return xr.Dataset(
        {"direction": (("layer", "position", "hidden"), unit_vector(difference).float().numpy()),
         "mean_difference_norm": (("layer", "position"), difference.norm(dim=-1).numpy()),
         "activation": (("kind", "instruction", "hidden"), chosen.numpy())},
        coords={"layer": np.arange(difference.shape[0]), "position": positions, "kind": list(KINDS),
                "instruction": np.arange(n),
                "instruction_text": (("kind", "instruction"), np.array([train[k] for k in KINDS], dtype=object))},
        attrs={"model": spec.key, "role": spec.role, "refusal_layer": layer, "refusal_pos": spec.settings.refusal_pos,
               "template": template or spec.template},
    )


def chosen_direction(unit: xr.Dataset) -> torch.Tensor:
    """The model's refusal direction: at its (refusal_layer, refusal_pos)."""
    return torch.from_numpy(unit["direction"].sel(layer=unit.attrs["refusal_layer"],
                                                  position=unit.attrs["refusal_pos"]).values)


def family_unit(units: dict[str, xr.Dataset]) -> xr.Dataset:
    """Cosines of the models' directions and the Figure 1c PCA (each model's activations, every direction)."""
    keys = list(units)
    directions = torch.stack([chosen_direction(units[k]) for k in keys])
    by_layer = torch.stack([torch.from_numpy(u["direction"].sel(position=u.attrs["refusal_pos"]).values)
                            for u in units.values()], dim=1)  # [layer, model, hidden]
    points, arrows, explained = [], [], []
    for key in keys:
        acts = torch.from_numpy(units[key]["activation"].values)  # [kind, instruction, hidden]
        coords, direction_coords, ratio = pca_projection(acts.flatten(0, 1).double(), directions.double())
        points.append(coords.reshape(*acts.shape[:2], -1))
        arrows.append(direction_coords)
        explained.append(ratio)
    first = units[keys[0]]
    return xr.Dataset(
        {"cosine": (("model_a", "model_b"), direction_cosines(directions).numpy()),
         "cosine_by_layer": (("layer", "model_a", "model_b"),
                             torch.stack([direction_cosines(d) for d in by_layer]).numpy()),
         "pca_coordinates": (("model", "kind", "instruction", "component"), torch.stack(points).float().numpy()),
         "pca_direction_coordinates": (("model", "direction_model", "component"),
                                       torch.stack(arrows).float().numpy()),
         "pca_explained_variance_ratio": (("model", "component"), torch.stack(explained).float().numpy())},
        coords={"model_a": keys, "model_b": keys, "model": keys, "direction_model": keys,
                "layer": first["layer"].values, "kind": list(KINDS), "instruction": first["instruction"].values,
                "component": [1, 2],
                "role": ("model", [units[k].attrs["role"] for k in keys]),
                "refusal_layer": ("model", [units[k].attrs["refusal_layer"] for k in keys]),
                "refusal_pos": ("model", [units[k].attrs["refusal_pos"] for k in keys])},
    )


# ---------------------------------------------------------------------------------------------------------------
# Conditions and generations


@dataclass(frozen=True)
class Condition:
    """Generation on `target` of the `dataset` test instructions, steered by `source`'s direction (or not), at
    `scale` times the intervention's coefficient (None: the condition of the paper's table, scale 1)."""
    target: str
    source: str
    intervention: str
    dataset: str
    scale: float | None = None

    @property
    def unit(self) -> str:
        if self.scale is not None:  # a point of a transfer curve
            return f"curve__{self.target}__{self.source}__{self.scale:g}"
        return f"generation__{self.target}__{self.source}__{self.intervention}__{self.dataset}"


def partners(profile: Profile, key: str) -> list[str]:
    """The models whose directions steer `key` besides its own: a base's post-trained models, a post's base."""
    pairs = profile.pairs(EXPERIMENT)
    return list(dict.fromkeys([post for base, post in pairs if base == key]
                              + [base for base, post in pairs if post == key]))


def conditions(profile: Profile, target: str) -> list[Condition]:
    """The baselines of `target`, then each steered condition with its own direction and each partner's, then the
    transfer-curve points (addition on harmless instructions at the profile's transfer_scales other than 1)."""
    sources = [target, *partners(profile, target)]
    baselines = [Condition(target, NONE, NONE, kind) for kind in KINDS]
    curve = [Condition(target, source, "addition", "harmless", scale) for source in sources
             for scale in profile.experiment(EXPERIMENT).transfer_scales if scale != 1.0]
    return baselines + [Condition(target, source, intervention, dataset)
                        for source in sources for intervention, dataset in STEERED] + curve


def instruction_count(profile: Profile, condition: Condition) -> int:
    """How many of its dataset's test instructions (the first ones) a condition is generated on: n_test, or for a
    transfer-curve point transfer_n_test where the profile sets it."""
    settings = profile.experiment(EXPERIMENT)
    return (settings.transfer_n_test or settings.n_test) if condition.scale is not None else settings.n_test


def coefficient(profile: Profile, condition: Condition) -> float:
    """The coefficient of an addition (refusal_coef_add) or subtraction (refusal_coef_sub), of the steered model
    or of the direction's model, as the steered model's refusal_coef_of says; ablation has none (0)."""
    if condition.intervention not in ("addition", "subtraction"):
        return 0.0
    steered = profile.model_spec(condition.target)
    owner = steered if steered.settings.refusal_coef_of == "steered_model" else profile.model_spec(condition.source)
    coef = owner.settings.refusal_coef_add if condition.intervention == "addition" else owner.settings.refusal_coef_sub
    return coef if condition.scale is None else condition.scale * coef


def condition_steering(profile: Profile, condition: Condition, direction: torch.Tensor | None) -> Steering | None:
    """The hooks of a condition on its target model (None for the baseline)."""
    if condition.intervention == NONE:
        return None
    spec = profile.model_spec(condition.target)
    return Steering(condition.intervention, direction, spec.settings.refusal_apply_layer,
                    coefficient(profile, condition), spec.layers_path, spec.architecture.attn_out_path)


def generation_units(model, spec: ModelSpec, items: Sequence[str], steers: Sequence[Steering | None], *,
                     max_new_tokens: int, batch_size: int, stop_at_eos: bool, progress: bool = False
                     ) -> list[xr.Dataset]:
    """Per steering (None: the baseline), the completions of the instructions in the model's own template, their
    refusal flags and the refusal score. The steerings share forward passes (`greedy_generate_many`); each unit
    equals that of the steering alone (`greedy_generate`)."""
    runs = greedy_generate_many(model, prompts(model, spec, items), steers, max_new_tokens=max_new_tokens,
                                batch_size=batch_size, progress=progress, stop_at_eos=stop_at_eos)
    return [xr.Dataset(
        {"completion": ("instruction", np.array(completions, dtype=object)),
         "refusal": ("instruction", np.array([is_refusal(c) for c in completions])),
         "refusal_score": refusal_score(completions)},
        coords={"instruction": np.arange(len(items)),
                "instruction_text": ("instruction", np.array(items, dtype=object))},
        attrs={"max_new_tokens": max_new_tokens, "stop_at_eos": stop_at_eos, "template": spec.template,
               "layer": -1 if steer is None else steer.layer, "coef": 0.0 if steer is None else steer.coef},
    ) for steer, completions in zip(steers, runs, strict=True)]


# ---------------------------------------------------------------------------------------------------------------
# Running a profile


def open_store(profile: Profile, name: str = EXPERIMENT) -> CubeStore:
    """The profile's cube; provenance records each model's dtype beside the profile's."""
    specs = [profile.model_spec(key) for key in profile.models(EXPERIMENT)]
    return CubeStore(results_dir(profile.name) / f"{name}.zarr", provenance=provenance(
        profile, specs, dtype=profile.dtype, device=profile.device, seed=profile.seed, experiment=name)
        | {"model_dtypes": {spec.key: model_dtype(profile, spec) for spec in specs}})


def run(profile: Profile, *, progress: bool = True) -> Path:
    """Run (or resume) the refusal experiment of `profile`; returns the cube path."""
    profile.check_settings(EXPERIMENT)
    settings = profile.experiment(EXPERIMENT)
    batch_size = profile.batch_size_for(EXPERIMENT)
    keys = profile.models(EXPERIMENT)
    store = open_store(profile)
    train = {kind: instructions(kind, "train", settings.n_train) for kind in KINDS}
    test = {kind: instructions(kind, "test", settings.n_test) for kind in KINDS}

    held = {}  # the last model of the direction loop, kept for the steering loop, which begins with it
    for key in progress_bar(keys, desc="refusal directions", enabled=progress):
        if not store.has_unit(f"direction__{key}"):
            spec = profile.model_spec(key)
            held.clear()
            release()
            held[key] = load_model(spec, dtype=model_dtype(profile, spec), device=profile.device)
            store.write_unit(f"direction__{key}", direction_unit(held[key], spec, train, batch_size=batch_size,
                                                                 progress=progress))
    units = {key: store.read_unit(f"direction__{key}") for key in keys}
    for family in profile.family_names(EXPERIMENT):
        if not store.has_unit(f"family__{family}"):
            members = [profile.families[family].base, *profile.families[family].post]
            store.write_unit(f"family__{family}", family_unit({key: units[key] for key in members}))

    for key in progress_bar(keys[::-1], desc="refusal steering", enabled=progress):
        todo = [c for c in conditions(profile, key) if not store.has_unit(c.unit)]
        if not todo:
            continue
        spec = profile.model_spec(key)
        model = held.pop(key, None)
        held.clear()
        release()
        if model is None:
            model = load_model(spec, dtype=model_dtype(profile, spec), device=profile.device)
        groups = {}  # every condition on the same instructions in one generation (units equal separate ones')
        for condition in todo:
            groups.setdefault((condition.dataset, instruction_count(profile, condition)), []).append(condition)
        for (dataset, count), group in progress_bar(groups.items(), desc=key, leave=False, enabled=progress):
            steers = [condition_steering(profile, c, None if c.source == NONE else chosen_direction(units[c.source]))
                      for c in group]
            generated = generation_units(model, spec, test[dataset][:count], steers, batch_size=batch_size,
                                         max_new_tokens=settings.max_new_tokens, stop_at_eos=settings.stop_at_eos,
                                         progress=progress)
            for condition, unit in zip(group, generated, strict=True):
                store.write_unit(condition.unit, unit.assign_attrs(
                    target=condition.target, source=condition.source, intervention=condition.intervention,
                    dataset=condition.dataset, scale=1.0 if condition.scale is None else condition.scale))
        del model
        release()
    store.update_attrs(finished_at=now())
    return store.path


# ---------------------------------------------------------------------------------------------------------------
# Sweep: settings for models the original has none for (the demo models)

# Coefficients tried, as fractions of the mean-difference norm at the chosen block and position; the three hook
# points make 1/3 about Arditi et al.'s ActAdd (the unnormalised difference added once).
SWEEP_SCALES = (1 / 6, 1 / 3, 2 / 3, 1.0, 4 / 3)
SWEEP_LAYER_FRACTION = 0.8  # candidate blocks: the first 80% (Arditi et al. exclude the last 20%)
SETTINGS = ("refusal_layer", "refusal_apply_layer", "refusal_pos", "refusal_coef_add", "refusal_coef_sub")


def steered_score(model, texts: Sequence[str], steer: Steering | None, *, max_new_tokens: int,
                  batch_size: int) -> float:
    return refusal_score(greedy_generate(model, texts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                                         steering=steer, progress=False))


def sweep_model(model, spec: ModelSpec, train: dict[str, list[str]], validation: dict[str, list[str]],
                layers: Sequence[int] | None, *, max_new_tokens: int, batch_size: int,
                progress: bool = False) -> xr.Dataset:
    """One model's sweep on the validation instructions. Candidates (block, position) are scored by the refusal
    scores with their direction ablated (harmful instructions) and added with coef = 1/3 of the mean-difference
    norm (harmless), the effect being the drop plus the rise against the unsteered baselines. A coordinate search
    keeps it affordable: every block in `layers` (None = the first SWEEP_LAYER_FRACTION) at the last position,
    then the other last DIRECTION_POSITIONS positions at the best of those blocks. At the best candidate (the
    earliest on ties) each SWEEP_SCALES coefficient is scored for subtraction (harmful) and addition (harmless).
    The chosen settings are the unit's attrs."""
    positions = list(range(-DIRECTION_POSITIONS, 0))
    acts = {kind: resid_pre_activations(model, prompts(model, spec, train[kind]), positions, batch_size=batch_size)
            for kind in KINDS}
    difference = mean_difference(acts["harmful"], acts["harmless"])  # [block, position, hidden]
    directions, norms = unit_vector(difference).float(), difference.norm(dim=-1)
    n_layers = difference.shape[0]
    layers = list(range(int(SWEEP_LAYER_FRACTION * n_layers))) if layers is None else list(layers)
    texts = {kind: prompts(model, spec, validation[kind]) for kind in KINDS}

    def score(kind, intervention=NONE, layer=0, position=0, coef=0.0):
        steer = None if intervention == NONE else Steering(
            intervention, directions[layer, position], layer, coef, spec.layers_path, spec.architecture.attn_out_path)
        return steered_score(model, texts[kind], steer, max_new_tokens=max_new_tokens, batch_size=batch_size)

    def effects(candidates):
        rates = np.array([[score("harmful", "ablation", layer, p),
                           score("harmless", "addition", layer, p, norms[layer, p].item() / 3)]
                          for layer, p in progress_bar(candidates, desc=f"sweep {spec.key}", leave=False,
                                               enabled=progress)])
        return rates, (baseline[0] - rates[:, 0]) + (rates[:, 1] - baseline[1])

    baseline = np.array([score(kind) for kind in KINDS])
    last = len(positions) - 1
    candidates = [(layer, last) for layer in layers]
    rates, effect = effects(candidates)
    best_layer = candidates[int(np.argmax(effect))][0]
    more = [(best_layer, p) for p in range(last)]
    more_rates, more_effect = effects(more)
    candidates, rates, effect = (candidates + more, np.concatenate([rates, more_rates]),
                                 np.concatenate([effect, more_effect]))
    layer, p = candidates[int(np.argmax(effect))]
    norm = norms[layer, p].item()
    scale_rates = np.array([[score("harmful", "subtraction", layer, p, scale * norm),
                             score("harmless", "addition", layer, p, scale * norm)] for scale in SWEEP_SCALES])
    chosen = {"refusal_layer": layer, "refusal_apply_layer": layer, "refusal_pos": positions[p],
              "refusal_coef_sub": round(SWEEP_SCALES[int(np.argmin(scale_rates[:, 0]))] * norm, 3),
              "refusal_coef_add": round(SWEEP_SCALES[int(np.argmax(scale_rates[:, 1]))] * norm, 3)}
    return xr.Dataset(
        {"baseline": ("kind", baseline),
         "candidate_score": (("candidate", "steered"), rates),
         "candidate_effect": ("candidate", effect),
         "scale_score": (("scale", "coef_steered"), scale_rates),
         "mean_difference_norm": (("layer", "position"), norms.numpy())},
        coords={"kind": list(KINDS), "candidate_layer": ("candidate", [c[0] for c in candidates]),
                "candidate_position": ("candidate", [positions[c[1]] for c in candidates]),
                "steered": ["ablation_harmful", "addition_harmless"], "scale": list(SWEEP_SCALES),
                "coef_steered": ["subtraction_harmful", "addition_harmless"],
                "layer": np.arange(n_layers), "position": positions},
        attrs={"model": spec.key, "n_train": len(train["harmful"]), "n_validation": len(validation["harmful"]),
               "max_new_tokens": max_new_tokens, **chosen},
    )


def sweep(profile: Profile, *, n_validation: int = 32, max_new_tokens: int = 6, progress: bool = True
          ) -> dict[str, dict[str, float]]:
    """Choose refusal settings for the models of the profile's refusal families (for the model table, with
    `settings_source: sweep`). Directions come from the same first n_train train instructions as `run`; the next
    n_validation train instructions of each kind validate (the test split is never seen). A family's
    post-trained models choose their block and position (`sweep_model`); the base model keeps the first
    post-trained model's block (the original uses one block per family) and chooses its position; each model
    chooses its own coefficients. The grids are written to results/<profile>/refusal_sweep.zarr."""
    settings = profile.experiment(EXPERIMENT)
    store = open_store(profile, f"{EXPERIMENT}_sweep")
    train = {kind: read_refusal(kind, "train") for kind in KINDS}
    direction_items = {kind: train[kind][:settings.n_train] for kind in KINDS}
    validation = {kind: train[kind][settings.n_train:settings.n_train + n_validation] for kind in KINDS}
    chosen = {}
    for family in profile.family_names(EXPERIMENT):
        base, posts = profile.families[family].base, profile.families[family].post
        for key in [*posts, base]:
            if not store.has_unit(f"sweep__{key}"):
                spec = profile.model_spec(key)
                layers = None if key != base else [chosen[posts[0]]["refusal_layer"]]
                model = load_model(spec, dtype=model_dtype(profile, spec), device=profile.device)
                store.write_unit(f"sweep__{key}", sweep_model(
                    model, spec, direction_items, validation, layers, max_new_tokens=max_new_tokens,
                    batch_size=profile.batch_size_for(EXPERIMENT), progress=progress))
                del model
                release()
            chosen[key] = {name: store.read_unit(f"sweep__{key}").attrs[name] for name in SETTINGS}
    store.update_attrs(finished_at=now())
    return chosen
