"""Truthfulness (paper §4, Figure 1b): truth directions, probe transfer and truth-direction interventions between a
base model and its post-trained versions (methods_reference §1.4, §4.2; the original generate_acts.py, utils.py,
probes.py, probe_transfer.py and interventions.py).

Per family of models (a base model and its post-trained versions), written as resumable units of the cube
``results/<profile>/truthfulness.zarr``:

1. ``activations__<model>``: the residual stream after every decoder layer at the last token of each bare statement
   (no prompt; left-padded batches in the model's dtype), centred per dataset. Stored: per-layer class means and
   truth directions (mean(true) - mean(false)) of every dataset, and the probe-layer activations of the probe
   datasets, from which everything below is computed.
2. ``similarity__<family>``: cosine similarity of truth directions between every two models (per dataset and
   layer) and between every two datasets (per model and layer).
3. ``probes__<family>``: for each probe dataset, an MMProbe trained on the other probe datasets of each model, and
   its accuracy on the held-out dataset of every model of the family (p_X -> h_Y).
4. ``pca__<family>``: 2-D PCA of each model's probe-layer activations of the first probe dataset, with every
   model's truth direction projected (Figure 1b).
5. ``intervention__<model>__<dataset>``: P(' TRUE') and P(' FALSE') per statement under the few-shot prompt,
   without intervention and with the truth direction of each family model (trained on the other probe datasets)
   subtracted from true / added to false statements at layers intervene_layer..probe_layer, at the statement's
   final token and the one before; the intervention effects (IE) follow.

`sweep` chooses probe_layer / intervene_layer for a model without settings from the original (the demo model).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import xarray as xr
from sklearn.linear_model import LogisticRegression

from data_prep.datasets import read_truth
from data_prep.paths import results_dir
from data_prep.prompts import balanced_head, intervention_table
from replication.config import ModelSpec, Profile
from replication.cubes import CubeStore, now
from replication.mechanics.directions import centre, cosine_similarity, pca_projection
from replication.mechanics.forward import edit_prefixes, last_token_activations, true_false_probabilities
from replication.models import decoder_layers, load_model, release
from replication.progress import progress_bar
from replication.provenance import provenance

EXPERIMENT = "truthfulness"
TRUTH = ("true", "false")  # order of the class axis of class means
IE_KINDS = ("true_to_false", "false_to_true", "average")
NO_INTERVENTION = "none"


# ---------------------------------------------------------------------------------------------------------------
# Data


def probe_statements(dataset: str, max_statements: int | None) -> pd.DataFrame:
    """The bare statements (columns statement, label) whose activations are read."""
    return balanced_head(read_truth(dataset)[["statement", "label"]], max_statements)


# ---------------------------------------------------------------------------------------------------------------
# Directions and probes (plain tensors)


def class_means(acts: torch.Tensor, labels) -> torch.Tensor:
    """[2, ...]: the mean activation of the true (label 1) and of the false (label 0) statements."""
    is_true = torch.as_tensor(np.asarray(labels) == 1)
    return torch.stack([acts[is_true].mean(dim=0), acts[~is_true].mean(dim=0)])


def truth_direction(acts: torch.Tensor, labels) -> torch.Tensor:
    """mean(true) - mean(false): the MMProbe direction."""
    true_mean, false_mean = class_means(acts, labels)
    return true_mean - false_mean


@dataclass
class MMProbe:
    """The original's MMProbe: the difference-in-means direction, then a 1-D logistic regression on the projection
    (which learns the threshold and the sign; no covariance whitening, unlike Marks & Tegmark's)."""
    direction: torch.Tensor
    classifier: LogisticRegression

    def predict(self, acts: torch.Tensor) -> np.ndarray:
        return self.classifier.predict(projection(acts, self.direction))


def projection(acts: torch.Tensor, direction: torch.Tensor) -> np.ndarray:
    """[statement, 1]: acts @ direction, the probe's only feature."""
    return (acts @ direction).numpy()[:, None]


def fit_mm_probe(acts: torch.Tensor, labels) -> MMProbe:
    direction = truth_direction(acts, labels)
    # C=inf is sklearn >= 1.8's spelling of the original's penalty=None (no regularisation)
    classifier = LogisticRegression(C=np.inf, fit_intercept=True).fit(projection(acts, direction), labels)
    return MMProbe(direction, classifier)


def probe_accuracy(probe: MMProbe, acts: torch.Tensor, labels) -> float:
    """Fraction of statements whose predicted label is right."""
    return float((probe.predict(acts) == np.asarray(labels)).mean())


def leave_one_out(datasets: Sequence[str]) -> list[tuple[str, tuple[str, ...]]]:
    """(test dataset, the other datasets in their order) for every dataset: train on the rest, test on one."""
    return [(test, tuple(d for d in datasets if d != test)) for test in datasets]


def intervention_direction(acts: torch.Tensor, labels) -> torch.Tensor:
    """The original's intervention vector ((mu_true - mu_false) . theta_hat) theta_hat with theta the probe direction;
    for the MMProbe theta = mu_true - mu_false, so this is the mean difference itself."""
    delta = truth_direction(acts, labels)
    unit = delta / delta.norm()
    return (delta @ unit) * unit


def intervention_effect(before: float, after: float, target: float) -> float:
    """Fraction of the largest possible move of mean P(TRUE) - P(FALSE) towards `target` that the intervention
    achieved: (after - before) / (target - before); target -1 for true statements, +1 for false ones."""
    return (after - before) / (target - before)


def average_intervention_effect(true_before: float, true_after: float, false_before: float,
                                false_after: float) -> float:
    """The paper's reported IE: the mean of IE(true -> false) and IE(false -> true)."""
    true_to_false = intervention_effect(true_before, true_after, -1.0)
    false_to_true = intervention_effect(false_before, false_after, 1.0)
    return (true_to_false + false_to_true) / 2


# ---------------------------------------------------------------------------------------------------------------
# Units


def activations_unit(model, layers: Sequence, tables: dict[str, pd.DataFrame], probe_datasets: Sequence[str],
                     probe_layer: int, *, batch_size: int, progress: bool = False) -> xr.Dataset:
    """Class means and truth directions per dataset and layer, and the probe-layer activations of the probe
    datasets; all centred per dataset."""
    means, probe_acts, probe_rows = [], [], []
    for name, table in progress_bar(tables.items(), desc="datasets", enabled=progress, leave=False):
        acts = centre(last_token_activations(model, layers, list(table["statement"]), batch_size=batch_size,
                                             progress=progress))
        means.append(class_means(acts, table["label"]))
        if name in probe_datasets:
            probe_acts.append(acts[:, probe_layer])
            probe_rows.append(table.assign(dataset=name))
    means = torch.stack(means)  # [dataset, truth, layer, hidden]
    rows = pd.concat(probe_rows, ignore_index=True)
    return xr.Dataset(
        {
            "class_mean": (("dataset", "truth", "layer", "hidden"), means.numpy()),
            "direction": (("dataset", "layer", "hidden"), (means[:, 0] - means[:, 1]).numpy()),
            "n_statements": (("dataset", "truth"),
                             [[int((t["label"] == 1).sum()), int((t["label"] == 0).sum())] for t in tables.values()]),
            "probe_acts": (("statement", "hidden"), torch.cat(probe_acts).numpy()),
        },
        coords={"dataset": list(tables), "truth": list(TRUTH), "layer": np.arange(means.shape[2]),
                "statement_dataset": ("statement", rows["dataset"].to_numpy(str)),
                "label": ("statement", rows["label"].to_numpy()),
                "statement_text": ("statement", rows["statement"].to_numpy(str))},
        attrs={"probe_layer": probe_layer},
    )


def probe_data(unit: xr.Dataset, datasets: Sequence[str]) -> tuple[torch.Tensor, np.ndarray]:
    """Probe-layer activations and labels of `datasets` (each centred by its own mean), concatenated."""
    rows = unit["statement_dataset"].isin(list(datasets)).values
    return torch.from_numpy(unit["probe_acts"].values[rows]), unit["label"].values[rows]


def family_directions(units: dict[str, xr.Dataset], test: str, train: Sequence[str]) -> dict[str, torch.Tensor]:
    """Each model's intervention direction trained on `train` (for the held-out `test`, which it never sees)."""
    return {key: intervention_direction(*probe_data(unit, train)) for key, unit in units.items()}


def similarity_unit(units: dict[str, xr.Dataset]) -> xr.Dataset:
    """Cosine similarity of truth directions: between models (per dataset, layer) and between datasets (per model,
    layer)."""
    directions = torch.stack([torch.from_numpy(u["direction"].values) for u in units.values()])  # [m, d, l, h]
    keys, first = list(units), next(iter(units.values()))
    between_models = cosine_similarity(directions[:, None], directions[None, :])
    between_datasets = cosine_similarity(directions[:, :, None], directions[:, None, :])
    return xr.Dataset(
        {"model_cosine": (("model_a", "model_b", "dataset", "layer"), between_models.numpy()),
         "dataset_cosine": (("model", "dataset_a", "dataset_b", "layer"), between_datasets.numpy())},
        coords={"model_a": keys, "model_b": keys, "model": keys, "dataset": first["dataset"].values,
                "dataset_a": first["dataset"].values, "dataset_b": first["dataset"].values,
                "layer": first["layer"].values},
    )


def probes_unit(units: dict[str, xr.Dataset], datasets: Sequence[str], roles: Sequence[str]) -> xr.Dataset:
    """Accuracy of every model's probe (trained on the other datasets) on every model's held-out dataset; `roles`
    (base/sft/instruct, one per model) label the models for the tables."""
    keys = list(units)
    accuracy = np.empty((len(keys), len(keys), len(datasets)))
    directions = np.empty((len(keys), len(datasets), units[keys[0]].sizes["hidden"]), dtype=np.float32)
    for t, (test, train) in enumerate(leave_one_out(datasets)):
        for p, probe_key in enumerate(keys):
            probe = fit_mm_probe(*probe_data(units[probe_key], train))
            directions[p, t] = probe.direction.numpy()
            for h, target_key in enumerate(keys):
                accuracy[p, h, t] = probe_accuracy(probe, *probe_data(units[target_key], [test]))
    return xr.Dataset(
        {"accuracy": (("probe_model", "target_model", "test_dataset"), accuracy),
         "probe_direction": (("probe_model", "test_dataset", "hidden"), directions)},
        coords={"probe_model": keys, "target_model": keys, "test_dataset": list(datasets),
                "role": ("probe_model", list(roles))},
    )


def pca_unit(units: dict[str, xr.Dataset], datasets: Sequence[str]) -> xr.Dataset:
    """Figure 1b: each model's probe-layer activations of the first dataset on their top 2 principal components,
    with every model's truth direction (trained on the other datasets) projected."""
    (test, train), keys = leave_one_out(datasets)[0], list(units)
    directions = torch.stack(list(family_directions(units, test, train).values()))
    coords, direction_coords, explained = zip(*(pca_projection(probe_data(units[k], [test])[0], directions)
                                                for k in keys))
    labels = probe_data(units[keys[0]], [test])[1]
    return xr.Dataset(
        {"coordinates": (("model", "statement", "component"), torch.stack(coords).numpy()),
         "direction_coordinates": (("model", "direction_model", "component"), torch.stack(direction_coords).numpy()),
         "explained_variance_ratio": (("model", "component"), torch.stack(explained).numpy())},
        coords={"model": keys, "direction_model": keys, "component": [1, 2], "label": ("statement", labels)},
        attrs={"dataset": test},
    )


def intervention_shifts(labels, direction: torch.Tensor, coefficient: float) -> torch.Tensor:
    """[statement, hidden]: -coefficient x direction for true statements (pushed towards FALSE), +coefficient x
    direction for false ones (pushed towards TRUE)."""
    signs = torch.where(torch.as_tensor(np.asarray(labels) == 1), -coefficient, coefficient)
    return signs[:, None] * direction


def mean_p_diff(probabilities: torch.Tensor, labels) -> torch.Tensor:
    """[..., 2] float64: mean of P(TRUE) - P(FALSE) over the true and over the false statements (probabilities:
    [..., statement, answer])."""
    p_diff = (probabilities[..., 0] - probabilities[..., 1]).double()
    is_true = torch.as_tensor(np.asarray(labels) == 1)
    return torch.stack([p_diff[..., is_true].mean(dim=-1), p_diff[..., ~is_true].mean(dim=-1)], dim=-1)


def intervention_effects(before: torch.Tensor, after: torch.Tensor) -> list[float]:
    """IE true -> false, IE false -> true and their average (IE_KINDS), from the (true, false) class means of
    P(TRUE) - P(FALSE) before and after the intervention."""
    (true_before, false_before), (true_after, false_after) = before.tolist(), after.tolist()
    return [intervention_effect(true_before, true_after, -1.0), intervention_effect(false_before, false_after, 1.0),
            average_intervention_effect(true_before, true_after, false_before, false_after)]


def intervention_unit(model, layers: Sequence, table: pd.DataFrame, directions: dict[str, torch.Tensor], *,
                      edit_layers: Sequence[int], coefficient: float, batch_size: int,
                      progress: bool = False) -> xr.Dataset:
    """P(TRUE), P(FALSE) per statement without and with each direction, the class means of P(TRUE) - P(FALSE) and
    the intervention effects."""
    prompts, labels = list(table["prompt"]), table["label"].to_numpy()
    conditions = [NO_INTERVENTION, *directions]
    prefixes = edit_prefixes(model, prompts, batch_size=batch_size)  # every condition reads the same prompts
    probabilities = torch.stack([
        true_false_probabilities(
            model, layers, prompts, batch_size=batch_size, edit_layers=edit_layers, progress=progress,
            prefixes=prefixes,
            shifts=None if name == NO_INTERVENTION else intervention_shifts(labels, directions[name], coefficient))
        for name in conditions])  # [condition, statement, answer]
    means = mean_p_diff(probabilities, labels)
    return xr.Dataset(
        {"p_true": (("intervention", "statement"), probabilities[..., 0].numpy()),
         "p_false": (("intervention", "statement"), probabilities[..., 1].numpy()),
         "mean_p_diff": (("intervention", "truth"), means.numpy()),
         "intervention_effect": (("direction_model", "ie"), [intervention_effects(means[0], m) for m in means[1:]])},
        coords={"intervention": conditions, "direction_model": list(directions), "truth": list(TRUTH),
                "ie": list(IE_KINDS), "label": ("statement", labels),
                "prompt_index": ("statement", table["prompt_index"].to_numpy()),
                "statement_text": ("statement", table["statement"].to_numpy(str))},
        attrs={"edit_layers": list(edit_layers), "coefficient": coefficient},
    )


# ---------------------------------------------------------------------------------------------------------------
# Running a profile


def family_layers(specs: Sequence[ModelSpec]) -> tuple[int, int]:
    """(intervene_layer, probe_layer), which must be the same for every model of a family: probes are transferred
    between the models at one layer (probe_transfer.py uses model 1's layer for both)."""
    values = {(s.settings.intervene_layer, s.settings.probe_layer) for s in specs}
    if len(values) != 1 or None in next(iter(values)):
        raise ValueError(f"models {[s.key for s in specs]} need one shared intervene_layer and probe_layer in "
                         f"replication/configs/models.yaml (settings); found {sorted(values, key=str)}")
    return next(iter(values))


def load(profile: Profile, spec: ModelSpec):
    """(model, its decoder layers) in the profile's dtype and device."""
    model = load_model(spec, dtype=profile.dtype, device=profile.device)
    return model, decoder_layers(model, spec)


def model_activations(profile: Profile, spec: ModelSpec, tables: dict[str, pd.DataFrame], datasets: Sequence[str],
                      probe_layer: int, *, progress: bool) -> xr.Dataset:
    """The activations unit of one model (loaded here, released on return)."""
    model, layers = load(profile, spec)
    return activations_unit(model, layers, tables, datasets, probe_layer,
                            batch_size=profile.batch_size_for(EXPERIMENT), progress=progress)


def write_interventions(store: CubeStore, profile: Profile, spec: ModelSpec, units: dict[str, xr.Dataset],
                        splits: Sequence[tuple[str, tuple[str, ...]]], edit_layers: Sequence[int], *,
                        progress: bool) -> None:
    """The intervention units of one target model (loaded once here), one per (test dataset, its train datasets)."""
    settings = profile.experiment(EXPERIMENT)
    model, layers = load(profile, spec)
    for test, train in progress_bar(splits, desc=f"interventions on {spec.key}", enabled=progress, leave=False):
        started = now()
        store.write_unit(f"intervention__{spec.key}__{test}", intervention_unit(
            model, layers, intervention_table(test, settings.max_intervention_statements or settings.max_statements),
            family_directions(units, test, train),
            edit_layers=edit_layers, coefficient=settings.intervention_coef,
            batch_size=profile.batch_size_for(EXPERIMENT), progress=progress), started_at=started)


def run(profile: Profile, *, progress: bool = True) -> Path:
    """Run (or resume) the truthfulness experiment of `profile`; returns the cube path."""
    profile.check_settings(EXPERIMENT)
    settings = profile.experiment(EXPERIMENT)
    specs = {key: profile.model_spec(key) for key in profile.models(EXPERIMENT)}
    store = CubeStore(results_dir(profile.name) / f"{EXPERIMENT}.zarr",
                      provenance=provenance(profile, specs.values(), dtype=profile.dtype, device=profile.device,
                                            seed=profile.seed, experiment=EXPERIMENT))
    datasets = settings.datasets
    tables = {name: probe_statements(name, settings.max_statements)
              for name in dict.fromkeys([*datasets, *settings.similarity_datasets])}
    for family in progress_bar(profile.family_names(EXPERIMENT), desc="families", enabled=progress):
        keys = [profile.families[family].base, *profile.families[family].post]
        intervene_layer, probe_layer = family_layers([specs[k] for k in keys])
        for key in keys:
            if not store.has_unit(f"activations__{key}"):
                started = now()
                store.write_unit(f"activations__{key}", model_activations(
                    profile, specs[key], tables, datasets, probe_layer, progress=progress), started_at=started)
                release()
        units = {key: store.read_unit(f"activations__{key}") for key in keys}
        family_units = {
            f"similarity__{family}": lambda: similarity_unit(units),
            f"probes__{family}": lambda: probes_unit(units, datasets, [specs[k].role for k in keys]).assign_attrs(
                probe_layer=probe_layer, intervene_layer=intervene_layer),
            f"pca__{family}": lambda: pca_unit(units, datasets),
        }
        for name, build in family_units.items():
            if not store.has_unit(name):
                store.write_unit(name, build())
        for key in keys:
            todo = [(test, train) for test, train in leave_one_out(datasets)
                    if not store.has_unit(f"intervention__{key}__{test}")]
            if todo:
                write_interventions(store, profile, specs[key], units, todo,
                                    range(intervene_layer, probe_layer + 1), progress=progress)
                release()
    store.update_attrs(finished_at=now())
    return store.path


# ---------------------------------------------------------------------------------------------------------------
# Choosing probe_layer and intervene_layer for a model the original has no settings for (the demo model)

SWEEP_IE_TOLERANCE = 0.05  # intervene_layer: the narrowest range ending at probe_layer within 0.05 of the best IE


def layer_accuracies(acts: dict[str, torch.Tensor], labels: dict[str, np.ndarray]) -> np.ndarray:
    """[layer, test dataset]: leave-one-dataset-out MMProbe accuracy at every layer (acts: [statement, layer,
    hidden] per dataset, centred)."""
    n_layers = next(iter(acts.values())).shape[1]
    return np.array([[probe_accuracy(fit_mm_probe(torch.cat([acts[d][:, layer] for d in train]),
                                                  np.concatenate([labels[d] for d in train])),
                                     acts[test][:, layer], labels[test])
                      for test, train in leave_one_out(list(acts))]
                     for layer in range(n_layers)])


def choose_layers(accuracy: np.ndarray, candidates: Sequence[tuple[int, int]], effects: np.ndarray
                  ) -> tuple[int, int]:
    """(intervene_layer, probe_layer): the probe layer with the best mean leave-one-out accuracy; then, among the
    candidate ranges (start, end) ending there, the narrowest whose mean IE (over datasets) is within
    SWEEP_IE_TOLERANCE of the best of them (editing more layers tends to saturate the effect, so the widest range
    would always win outright)."""
    probe_layer = int(np.argmax(accuracy.mean(axis=1)))
    ending = {start: effect for (start, end), effect in zip(candidates, effects.mean(axis=1)) if end == probe_layer}
    best = max(ending.values())
    return max(start for start, effect in ending.items() if effect >= best - SWEEP_IE_TOLERANCE), probe_layer


def sweep_unit(model, layers: Sequence, datasets: Sequence[str], *, max_statements: int | None,
               max_intervention_statements: int | None, n_probe_layers: int, widths: Sequence[int],
               coefficient: float, batch_size: int, progress: bool = False) -> xr.Dataset:
    """Per-layer leave-one-out probe accuracy; and the average IE of the model's own direction (trained on the
    other datasets at the range's end layer) for ranges of `widths` layers ending at each of the
    `n_probe_layers` most accurate layers; with the chosen layers (choose_layers) in the attrs."""
    tables = {d: probe_statements(d, max_statements) for d in datasets}
    acts = {d: centre(last_token_activations(model, layers, list(t["statement"]), batch_size=batch_size,
                                             progress=progress)) for d, t in tables.items()}
    labels = {d: t["label"].to_numpy() for d, t in tables.items()}
    accuracy = layer_accuracies(acts, labels)
    ends = np.argsort(-accuracy.mean(axis=1), kind="stable")[:n_probe_layers]
    candidates = [(int(end) - width + 1, int(end)) for end in ends for width in widths if end - width + 1 >= 0]
    effects = np.empty((len(candidates), len(datasets)))
    for t, (test, train) in enumerate(progress_bar(leave_one_out(datasets), desc="sweep", enabled=progress)):
        table = intervention_table(test, max_intervention_statements)
        prompts, test_labels = list(table["prompt"]), table["label"].to_numpy()
        prefixes = edit_prefixes(model, prompts, batch_size=batch_size)
        before = mean_p_diff(true_false_probabilities(model, layers, prompts, batch_size=batch_size,
                                                      prefixes=prefixes), test_labels)
        for c, (start, end) in enumerate(candidates):
            direction = intervention_direction(torch.cat([acts[d][:, end] for d in train]),
                                               np.concatenate([labels[d] for d in train]))
            after = mean_p_diff(true_false_probabilities(
                model, layers, prompts, batch_size=batch_size, edit_layers=range(start, end + 1),
                shifts=intervention_shifts(test_labels, direction, coefficient), prefixes=prefixes), test_labels)
            effects[c, t] = intervention_effects(before, after)[-1]
    intervene_layer, probe_layer = choose_layers(accuracy, candidates, effects)
    return xr.Dataset(
        {"accuracy": (("layer", "test_dataset"), accuracy),
         "intervention_effect": (("candidate", "test_dataset"), effects)},
        coords={"layer": np.arange(accuracy.shape[0]), "test_dataset": list(datasets),
                "start_layer": ("candidate", [start for start, _ in candidates]),
                "end_layer": ("candidate", [end for _, end in candidates])},
        attrs={"probe_layer": probe_layer, "intervene_layer": intervene_layer, "ie_tolerance": SWEEP_IE_TOLERANCE,
               "max_statements": max_statements or 0, "max_intervention_statements": max_intervention_statements or 0},
    )


def model_sweep(profile: Profile, spec: ModelSpec, **options) -> xr.Dataset:
    """The sweep unit of one model (loaded here, released on return)."""
    model, layers = load(profile, spec)
    settings = profile.experiment(EXPERIMENT)
    return sweep_unit(model, layers, settings.datasets, coefficient=settings.intervention_coef,
                      batch_size=profile.batch_size_for(EXPERIMENT), **options)


def sweep(profile: Profile, *, max_statements: int | None = 200, max_intervention_statements: int | None = 12,
          n_probe_layers: int = 2, widths: Sequence[int] = (1, 3, 5, 7),
          progress: bool = True) -> dict[str, xr.Dataset]:
    """Sweep the layers of each family's base model (written to results/<profile>/truthfulness_sweep.zarr,
    resumable per model); returns {model key: sweep unit}, whose attrs hold the chosen probe_layer and
    intervene_layer to record in the model table (settings_source: sweep)."""
    specs = [profile.model_spec(profile.families[f].base) for f in profile.family_names(EXPERIMENT)]
    store = CubeStore(results_dir(profile.name) / f"{EXPERIMENT}_sweep.zarr",
                      provenance=provenance(profile, specs, dtype=profile.dtype, device=profile.device,
                                            seed=profile.seed, experiment=f"{EXPERIMENT}_sweep"))
    for spec in specs:
        if not store.has_unit(f"sweep__{spec.key}"):
            started = now()
            store.write_unit(f"sweep__{spec.key}", model_sweep(
                profile, spec, max_statements=max_statements, max_intervention_statements=max_intervention_statements,
                n_probe_layers=n_probe_layers, widths=widths, progress=progress), started_at=started)
            release()
    return {spec.key: store.read_unit(f"sweep__{spec.key}") for spec in specs}
