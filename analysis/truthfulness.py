"""Truthfulness: tables and figure data from ``results/<profile>/truthfulness.zarr`` (written by
replication/experiments/truthfulness.py).

Probe transfer (the paper's table): p_X -> h_Y is the accuracy (%) on model Y's activations of the test dataset
(row) of the MMProbe trained on model X's activations of the other probe datasets, at the probe layer.
Intervention effect: t_X -> h_Y is the IE of model X's truth direction (trained on the other probe datasets) added
to model Y: IE = mean of IE(true -> false) = (P~+ - P+)/(-1 - P+) and IE(false -> true) = (P~- - P-)/(1 - P-),
P = mean over statements of P(TRUE) - P(FALSE) under the few-shot prompt, ~ = with the intervention.

Tables follow the paper's layout, one per family: rows are the test datasets; columns X_BASE->h_BASE, then for
each post-trained model POST: X_POST->h_POST, X_BASE->h_POST and Δ = X_BASE->h_POST - X_POST->h_POST (what the
base model's probe or direction loses, or gains, against POST's own), each measured beside the paper's value
where both models are the ones the paper's number describes (published_numbers.yaml `models:`, Llama-3.1-8B),
empty elsewhere: another family's rows are never labelled with Llama-3.1-8B's values.
"""
from __future__ import annotations

import pandas as pd

from analysis.audit import load_published
from analysis.figures import pca_arrows
from replication.cubes import CubeStore, profile_cube

EXPERIMENT = "truthfulness"
IE_SECTION = "truthfulness_intervention_effect"
PROBE_SECTION = "truthfulness_probe_transfer_accuracy_pct"
SHIPPED = f"{IE_SECTION}.shipped_cities_exact"
IE_SHORTFALL_KEY = "qualitative.truthfulness.max_ie_shortfall"
PROBE_SHORTFALL_KEY = "qualitative.truthfulness.max_probe_shortfall_pct"


def cube(profile_name: str) -> CubeStore:
    return profile_cube(profile_name, EXPERIMENT)


def _units(store: CubeStore, kind: str) -> dict[tuple[str, ...], object]:
    """Finished units named '<kind>__a__b...', keyed by the name's parts after the kind."""
    return {tuple(name.split("__")[1:]): unit for name, unit in store.read_units(kind).items()}


def families(profile_name: str) -> pd.DataFrame:
    """One row per model: family, model, role (base first within a family), and the family's layers."""
    rows = []
    for (family,), unit in _units(cube(profile_name), "probes").items():
        for model, role in zip(unit["probe_model"].values, unit["role"].values):
            rows.append({"family": family, "model": model, "role": role, "probe_layer": unit.attrs["probe_layer"],
                         "intervene_layer": unit.attrs["intervene_layer"]})
    return pd.DataFrame(rows)


def _roles(profile_name: str) -> dict[str, str]:
    return families(profile_name).set_index("model")["role"].to_dict()


def probe_accuracies(profile_name: str) -> pd.DataFrame:
    """Tidy: family, probe_model, target_model, probe_role, target_role, dataset, accuracy_pct."""
    frames = []
    for (family,), unit in _units(cube(profile_name), "probes").items():
        frame = unit["accuracy"].to_dataframe().reset_index().rename(columns={"test_dataset": "dataset"})
        roles = dict(zip(unit["probe_model"].values, unit["role"].values))
        frames.append(frame.assign(family=family, accuracy_pct=100 * frame["accuracy"],
                                   probe_role=frame["probe_model"].map(roles),
                                   target_role=frame["target_model"].map(roles)))
    columns = ["family", "probe_model", "target_model", "probe_role", "target_role", "dataset", "accuracy_pct"]
    return pd.concat(frames, ignore_index=True)[columns]


def intervention_effects(profile_name: str) -> pd.DataFrame:
    """Tidy: direction_model, target_model, their roles, dataset, n_true, n_false, the class means of
    P(TRUE) - P(FALSE) before and after, and the IEs (true_to_false, false_to_true, average)."""
    roles, rows = _roles(profile_name), []
    for (target, dataset), unit in _units(cube(profile_name), "intervention").items():
        before = unit["mean_p_diff"].sel(intervention="none")
        for direction in unit["direction_model"].values:
            after = unit["mean_p_diff"].sel(intervention=direction)
            effect = unit["intervention_effect"].sel(direction_model=direction)
            rows.append({"direction_model": direction, "target_model": target, "direction_role": roles[direction],
                         "target_role": roles[target], "dataset": dataset,
                         "n_true": int((unit["label"] == 1).sum()), "n_false": int((unit["label"] == 0).sum()),
                         "p_diff_true_before": float(before.sel(truth="true")),
                         "p_diff_false_before": float(before.sel(truth="false")),
                         "p_diff_true_after": float(after.sel(truth="true")),
                         "p_diff_false_after": float(after.sel(truth="false")),
                         **{kind: float(effect.sel(ie=kind)) for kind in unit["ie"].values}})
    return pd.DataFrame(rows)


def _paper_layout(tidy: pd.DataFrame, source: str, value: str, letter: str, section: str,
                  datasets: list[str]) -> pd.DataFrame:
    """One family's table in the paper's layout (see the module docstring), measured beside the paper's values;
    `source` is the column prefix of the model whose probe or direction is used (probe / direction)."""
    published = load_published()
    role = dict(zip(tidy[f"{source}_model"], tidy[f"{source}_role"]))
    base = next(model for model, r in role.items() if r == "base")
    posts = [model for model, r in role.items() if r != "base"]

    def measured(x: str, y: str) -> pd.Series:
        rows = tidy[(tidy[f"{source}_model"] == x) & (tidy["target_model"] == y)].set_index("dataset")[value]
        return rows.reindex(datasets)

    def paper(x: str, y: str) -> pd.Series:
        key = _published_key(published.role_of, section, x, y)
        return pd.Series([published.numbers.get(f"{key}.{d}") if key else None for d in datasets],
                         index=datasets, dtype=float)

    def name(x: str, y: str) -> str:
        return f"{letter}_{role[x].upper()}→h_{role[y].upper()}"

    columns = {(name(base, base), "measured"): measured(base, base), (name(base, base), "paper"): paper(base, base)}
    for post in posts:
        for x in (post, base):
            columns[(name(x, post), "measured")] = measured(x, post)
            columns[(name(x, post), "paper")] = paper(x, post)
        delta = f"Δ {name(base, post)} − {name(post, post)}"
        columns[(delta, "measured")] = measured(base, post) - measured(post, post)
        columns[(delta, "paper")] = paper(base, post) - paper(post, post)
    table = pd.DataFrame(columns)
    table.index.name = "test dataset"
    return table


def _datasets(store: CubeStore) -> list[str]:
    return list(next(iter(_units(store, "probes").values()))["test_dataset"].values)


def probe_transfer_tables(profile_name: str) -> dict[str, pd.DataFrame]:
    """Per family: probe-transfer accuracy (%) in the paper's layout."""
    tidy, datasets = probe_accuracies(profile_name), _datasets(cube(profile_name))
    return {family: _paper_layout(frame, "probe", "accuracy_pct", "p", PROBE_SECTION, datasets)
            for family, frame in tidy.groupby("family", sort=False)}


def intervention_effect_tables(profile_name: str) -> dict[str, pd.DataFrame]:
    """Per family: the average intervention effect in the paper's layout."""
    tidy, datasets = intervention_effects(profile_name), _datasets(cube(profile_name))
    family_of = families(profile_name).set_index("model")["family"].to_dict()
    tidy = tidy.assign(family=tidy["target_model"].map(family_of))
    return {family: _paper_layout(frame, "direction", "average", "t", IE_SECTION, datasets)
            for family, frame in tidy.groupby("family", sort=False)}


def direction_similarity(profile_name: str) -> pd.DataFrame:
    """Tidy (heatmaps): family, model_a, model_b, dataset, layer, cosine of the two models' truth directions."""
    frames = [unit["model_cosine"].to_dataframe(name="cosine").reset_index().assign(family=family)
              for (family,), unit in _units(cube(profile_name), "similarity").items()]
    return pd.concat(frames, ignore_index=True)[["family", "model_a", "model_b", "dataset", "layer", "cosine"]]


def dataset_similarity(profile_name: str) -> pd.DataFrame:
    """Tidy: model, dataset_a, dataset_b, layer, cosine of the two datasets' truth directions in that model."""
    frames = [unit["dataset_cosine"].to_dataframe(name="cosine").reset_index()
              for unit in _units(cube(profile_name), "similarity").values()]
    return pd.concat(frames, ignore_index=True)[["model", "dataset_a", "dataset_b", "layer", "cosine"]]


def direction_similarity_table(profile_name: str) -> pd.DataFrame:
    """Rows: dataset; columns: cos(BASE, POST) of the truth directions at the family's probe layer, per pair."""
    models = families(profile_name)
    similarity = direction_similarity(profile_name)
    columns = {}
    for family, group in models.groupby("family", sort=False):
        base = group.loc[group["role"] == "base", "model"].item()
        layer = group["probe_layer"].iloc[0]
        for post in group.loc[group["role"] != "base", "model"]:
            rows = similarity[(similarity["model_a"] == base) & (similarity["model_b"] == post)
                              & (similarity["layer"] == layer)]
            columns[f"cos({base}, {post}) @ layer {layer}"] = rows.set_index("dataset")["cosine"]
    return pd.DataFrame(columns)


def pca_data(profile_name: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Figure 1b: (points: family, model, statement, label, pc1, pc2; arrows: family, model, direction_model,
    pc1, pc2 of the unit truth directions, explained variance of pc1 and pc2)."""
    points, arrows = [], []
    for (family,), unit in _units(cube(profile_name), "pca").items():
        coords = unit["coordinates"].to_dataframe().reset_index()
        wide = coords.pivot_table(index=["model", "statement"], columns="component", values="coordinates")
        wide.columns = ["pc1", "pc2"]
        wide = wide.reset_index()
        points.append(wide.assign(family=family, dataset=unit.attrs["dataset"],
                                  label=unit["label"].values[wide["statement"].to_numpy()]))
        arrows += pca_arrows(unit, family, "direction_coordinates", "explained_variance_ratio")
    return pd.concat(points, ignore_index=True), pd.DataFrame(arrows)


def tables(profile_name: str) -> dict[str, pd.DataFrame]:
    """Every truthfulness table, by title."""
    result = {}
    for family, table in probe_transfer_tables(profile_name).items():
        result[f"Truthfulness: probe transfer accuracy (%), {family}"] = table
    for family, table in intervention_effect_tables(profile_name).items():
        result[f"Truthfulness: intervention effect, {family}"] = table
    result["Truthfulness: cosine of BASE and POST truth directions"] = direction_similarity_table(profile_name)
    return result


def _published_key(role_of: dict[str, str], section: str, x: str, y: str) -> str | None:
    """`<section>.<X role>_on_<Y role>` when both models are ones the paper's numbers describe, else None."""
    return f"{section}.{role_of[x]}_on_{role_of[y]}" if x in role_of and y in role_of else None


def measured_numbers(profile_name: str) -> dict[str, float]:
    """Audit numbers (`numbers_from` of the profile's probe-accuracy and intervention-effect frames)."""
    return numbers_from(probe_accuracies(profile_name), intervention_effects(profile_name))


def numbers_from(probes: pd.DataFrame, effects: pd.DataFrame) -> dict[str, float]:
    """Audit numbers of a `probe_accuracies` and an `intervention_effects` frame. Published keys
    (<section>.<X role>_on_<Y role>.<dataset>, and the shipped exact cities values) come from the rows whose two
    models are the ones published_numbers.yaml `models:` names, in the roles it gives them; only keys the
    published file has are returned (none for a profile without those models). The qualitative keys take the
    worst case over every (BASE, POST) pair and dataset: IE(POST's direction on POST) - IE(BASE's on POST), and
    the same for probe accuracy in percentage points."""
    published = load_published()
    role_of = published.role_of
    candidates = []  # (key, value)
    for row in probes.itertuples():
        if key := _published_key(role_of, PROBE_SECTION, row.probe_model, row.target_model):
            candidates.append((f"{key}.{row.dataset}", row.accuracy_pct))
    for row in effects.itertuples():
        if key := _published_key(role_of, IE_SECTION, row.direction_model, row.target_model):
            candidates.append((f"{key}.{row.dataset}", row.average))
            if row.dataset == "cities":
                target = role_of[row.target_model]
                candidates.append((f"{SHIPPED}.{role_of[row.direction_model]}_on_{target}", row.average))
                candidates += [(f"{SHIPPED}.p_diff_before.{target}_{truth}", getattr(row, f"p_diff_{truth}_before"))
                               for truth in ("true", "false")]
    numbers = {key: float(value) for key, value in candidates if key in published.numbers}
    numbers[IE_SHORTFALL_KEY] = _max_shortfall(effects, "direction", "average")
    numbers[PROBE_SHORTFALL_KEY] = _max_shortfall(probes, "probe", "accuracy_pct")
    return numbers


def _max_shortfall(frame: pd.DataFrame, source: str, value: str) -> float:
    """max over POST models and datasets of value(POST -> POST) - value(BASE -> POST)."""
    on_post = frame[frame["target_role"] != "base"]
    own = on_post[on_post[f"{source}_model"] == on_post["target_model"]].set_index(["target_model", "dataset"])
    from_base = on_post[on_post[f"{source}_role"] == "base"].set_index(["target_model", "dataset"])
    return float((own[value] - from_base[value]).max())
