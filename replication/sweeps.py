"""`ptr sweep`: choose the per-model settings an experiment reads, for models that have none (a user's own pair,
the demo models), and record them in the user's model table with what was measured.

`choices(experiment, profile)` runs the experiment's sweep (resumable; the grids in
results/<profile>/<experiment>_sweep.zarr) and returns, per model, the chosen settings and a short record of the
measurements behind them. `record(path, experiment, choices)` writes both into a model-table file (the settings,
`settings_source: sweep`, and `sweep.<experiment>`), for the models that file defines.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from data_prep.paths import results_dir
from replication.config import ConfigError, Profile, load_model_table
from replication.cubes import open_cube
from replication.experiments import refusal, truthfulness


@dataclass(frozen=True)
class Choice:
    settings: dict[str, Any]  # setting name -> chosen value
    measured: dict[str, Any]  # what the choice rests on (plain numbers and names, for the model table)


def choices(experiment: str, profile: Profile) -> dict[str, Choice]:
    """{model key: Choice} for every model of the profile's `experiment` families."""
    return {"truthfulness": truthfulness_choices, "refusal": refusal_choices}[experiment](profile)


def truthfulness_choices(profile: Profile) -> dict[str, Choice]:
    """A family shares probe_layer / intervene_layer (its probes are transferred between its models): the layers
    its base model's sweep chooses apply to each of its models."""
    units = truthfulness.sweep(profile)
    result = {}
    for family in profile.family_names("truthfulness"):
        base = profile.families[family].base
        unit = units[base]
        probe, start = int(unit.attrs["probe_layer"]), int(unit.attrs["intervene_layer"])
        effect = unit["intervention_effect"].mean("test_dataset")
        chosen = (unit["start_layer"] == start) & (unit["end_layer"] == probe)
        measured = {
            "swept_model": base, "profile": profile.name,
            "datasets": [str(d) for d in unit["test_dataset"].values],
            "statements_per_dataset": int(unit.attrs["max_statements"]) or "all",
            "probe_accuracy": round(float(unit["accuracy"].mean("test_dataset")[probe]), 4),
            "intervention_effect": round(float(effect.where(chosen, drop=True).item()), 4),
            "grid": str(results_dir(profile.name) / "truthfulness_sweep.zarr"),
        }
        for key in (base, *profile.families[family].post):
            result[key] = Choice({"probe_layer": probe, "intervene_layer": start}, measured)
    return result


def refusal_choices(profile: Profile) -> dict[str, Choice]:
    chosen = refusal.sweep(profile)
    store = open_cube(results_dir(profile.name) / "refusal_sweep.zarr")
    result = {}
    for key, settings in chosen.items():
        unit = store.read_unit(f"sweep__{key}")
        at = ((unit["candidate_layer"] == settings["refusal_layer"])
              & (unit["candidate_position"] == settings["refusal_pos"]))
        scores = unit["candidate_score"].where(at, drop=True).isel(candidate=0)
        measured = {
            "profile": profile.name, "validation_instructions": int(unit.attrs["n_validation"]),
            "max_new_tokens": int(unit.attrs["max_new_tokens"]),
            "refusal_unsteered": {kind: round(float(unit["baseline"].sel(kind=kind)), 4) for kind in ("harmful",
                                                                                                     "harmless")},
            "refusal_direction_ablated_harmful": round(float(scores.sel(steered="ablation_harmful")), 4),
            "refusal_direction_added_harmless": round(float(scores.sel(steered="addition_harmless")), 4),
            "mean_difference_norm": round(float(unit["mean_difference_norm"].sel(
                layer=settings["refusal_layer"], position=settings["refusal_pos"])), 4),
            "grid": str(results_dir(profile.name) / "refusal_sweep.zarr"),
        }
        result[key] = Choice({name: _plain_number(value) for name, value in settings.items()}, measured)
    return result


def _plain_number(value: Any) -> Any:
    """A numpy scalar from zarr attrs as a plain int / float (YAML-ready)."""
    return value.item() if hasattr(value, "item") else value


def record(path: Path, experiment: str, chosen: dict[str, Choice]) -> list[str]:
    """Write the choices into the model-table file `path` for the models it defines; returns their keys. The file
    is rewritten (key order kept, comments not) and must still load."""
    path = Path(path)
    data = yaml.safe_load(path.read_text()) or {}
    models = data.get("models") or {}
    written = [key for key in chosen if key in models]
    for key in written:
        entry = models[key]
        entry["settings"] = {**(entry.get("settings") or {}), **chosen[key].settings}
        entry["settings_source"] = "sweep"
        entry["sweep"] = {**(entry.get("sweep") or {}), experiment: chosen[key].measured}
    if written:
        before = path.read_text()
        path.write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True, width=120))
        try:
            load_model_table(user=path)
        except ConfigError as error:
            path.write_text(before)
            raise ConfigError(f"the sweep's choices would make {path} invalid, so it was left as it was: {error}")
    return written
