"""Refusal: tables and figure data from ``results/<profile>/refusal.zarr`` (written by
replication/experiments/refusal.py).

Refusal score S = fraction of the test instructions whose greedy completion starts with a refusal phrase.
r_X -> h_Y: model X's refusal direction steering model Y; harmful instructions get it subtracted (or ablated),
harmless ones get it added. Forward transfer = the base model's direction on a post-trained model; backward = a
post-trained model's direction on the base model.

The paper's table (published_numbers.yaml, `refusal_intervention_score`) has one harmful number per cell without
naming the intervention. They are read here as the original's `ablation` run (HARMFUL_INTERVENTION): each
direction projected out at resid_pre/mid/post of every block. Why: Refusal/README.md runs the harmful case with
`--intervention_type ablation`, which gives r_base_on_base on BASE (0.21 -> 0.17) directly; the INSTRUCT cells
(own direction 0.01, BASE's 0.95) need `--intervene_chat`, and the same flag gives them. The original's
`--intervention_type subtraction` run is not symmetric: in apply_refusal_dir.py's fixed-coefficient branch the
chat (post-trained) direction is subtracted at the one block but the base direction falls into the `else` and
is ablated at that one block only, so its two cells are two different interventions.

Here `subtraction` is the intended symmetric version (every direction subtracted at the one block with the
steered model's refusal_coef_sub): beyond the paper, its rows are labelled so (INTERVENTION_LABEL) and never
carry the paper's values. The original's literal subtraction run is not computed: its chat-direction cell is the
`subtraction` row's own-direction cell on a post-trained model, and its base-direction cell (one-block ablation)
is a condition the paper does not report.

Only the models published_numbers.yaml `models:` names (Llama-3.1-8B) get the paper's values and published
audit keys, in the roles it gives them; other families' rows get none, whatever order the profile lists them in.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import xarray as xr

from analysis.audit import load_published
from analysis.figures import pca_arrows
from replication import results
from replication.cubes import CubeStore, profile_cube

EXPERIMENT = "refusal"
SECTION = "refusal_intervention_score"
SHIPPED = f"{SECTION}.shipped_direction_cosines"
HARMFUL_INTERVENTION = "ablation"  # the original README's harmful run (see the module docstring)
INTERVENTION_OF = {"harmful": HARMFUL_INTERVENTION, "harmless": "addition"}  # the paper layout's interventions
ROW_ORDER = [("harmful", "ablation"), ("harmful", "subtraction"), ("harmless", "addition")]
# How a table row names its intervention: conditions the paper does not report say so.
INTERVENTION_LABEL = {"ablation": "ablation", "subtraction": "subtraction (beyond the paper)",
                      "addition": "addition"}
COSINE_KEY = "qualitative.refusal.max_direction_cosine"
TRANSFER_KEY = "qualitative.refusal.forward_transfer_ratio"
MIN_OWN_EFFECT = 0.1  # forward-transfer ratios of pairs whose own addition effect is smaller mean nothing


def cube(profile_name: str) -> CubeStore:
    return profile_cube(profile_name, EXPERIMENT)


def families(profile_name: str) -> pd.DataFrame:
    """One row per model: family, model, role, refusal_layer, refusal_pos (base first within a family)."""
    rows = []
    for name, unit in cube(profile_name).read_units("family").items():
        for model in unit["model"].values:
            row = unit.sel(model=model)
            rows.append({"family": name.split("__")[1], "model": model, "role": str(row["role"].values),
                         "refusal_layer": int(row["refusal_layer"]), "refusal_pos": int(row["refusal_pos"])})
    return pd.DataFrame(rows)


def is_degenerate(completion: str) -> bool:
    """A completion that repeats itself (e.g. 'security security security ...'): at least 4 words, at most half of
    them distinct. Steering too hard breaks generation; such a completion scores 0 without complying."""
    words = completion.split()
    return len(words) >= 4 and len(set(words)) <= len(words) / 2


def degenerate_fraction(unit: xr.Dataset) -> float:
    """The fraction of a generation unit's completions that repeat themselves."""
    return float(np.mean([is_degenerate(str(c)) for c in unit["completion"].values]))


def scores(profile_name: str) -> pd.DataFrame:
    """Tidy: family, target, source, target_role, source_role, intervention, dataset, coef, layer, n,
    refusal_score, degenerate (fraction of completions that repeat themselves, `is_degenerate`); source and
    intervention 'none' for the baseline."""
    models = families(profile_name).set_index("model")
    rows = []
    for unit in cube(profile_name).read_units("generation").values():
        a = unit.attrs
        rows.append({"family": models.loc[a["target"], "family"], "target": a["target"], "source": a["source"],
                     "target_role": models.loc[a["target"], "role"],
                     "source_role": models["role"].get(a["source"], "none"), "intervention": a["intervention"],
                     "dataset": a["dataset"], "coef": a["coef"], "layer": a["layer"],
                     "n": unit.sizes["instruction"], "refusal_score": float(unit["refusal_score"]),
                     "degenerate": degenerate_fraction(unit)})
    return pd.DataFrame(rows)


def transfer_curves(profile_name: str) -> pd.DataFrame:
    """Beyond the paper: per target model and direction source, the refusal score and degenerate fraction on the
    harmless instructions against the fraction of the addition coefficient: 0 (the unsteered baseline), the curve
    units' scales, and 1 (the addition condition), every point on the curve units' instructions (`n`: the first n
    harmless test instructions, fewer than the table's where the profile sets transfer_n_test). Empty when the
    profile has no transfer_scales."""
    store = cube(profile_name)
    curve = list(store.read_units("curve").values())
    if not curve:
        return pd.DataFrame()
    harmless = [u for u in store.read_units("generation").values() if u.attrs["dataset"] == "harmless"]
    models = families(profile_name).set_index("model")
    sources = {(u.attrs["target"], u.attrs["source"]) for u in curve}
    texts = {u.attrs["target"]: list(u["instruction_text"].values) for u in curve}  # a target's curves share them
    rows = [_curve_point(unit, models, unit.attrs["source"], unit.attrs["scale"]) for unit in curve]
    for unit in (u for u in harmless if u.attrs["target"] in texts):
        a, first = unit.attrs, _first(unit, texts[unit.attrs["target"]])
        if a["intervention"] == "addition" and (a["target"], a["source"]) in sources:
            rows.append(_curve_point(first, models, a["source"], 1.0))
        if a["source"] == "none":  # each curve starts at the baseline
            rows += [_curve_point(first, models, source, 0.0) for target, source in sources if target == a["target"]]
    return pd.DataFrame(rows).sort_values(["target", "source", "scale"], ignore_index=True)


def _first(unit: xr.Dataset, texts: list[str]) -> xr.Dataset:
    """The unit's rows on the first len(texts) instructions, which must be `texts` (the curve's instructions)."""
    first = unit.isel(instruction=slice(0, len(texts)))
    if list(first["instruction_text"].values) != texts:
        raise ValueError(f"the transfer curve of {unit.attrs['target']} was generated on other instructions than "
                         f"the first {len(texts)} of its harmless conditions; rerun it: `ptr run refusal --fresh`")
    return first


def _curve_point(unit: xr.Dataset, models: pd.DataFrame, source: str, scale: float) -> dict:
    target = unit.attrs["target"]
    return {"family": models.loc[target, "family"], "target": target, "target_role": models.loc[target, "role"],
            "source": source, "source_role": models.loc[source, "role"], "scale": float(scale),
            "coef": unit.attrs["coef"], "n": unit.sizes["instruction"],
            "refusal_score": float(unit["refusal"].mean()), "degenerate": degenerate_fraction(unit)}


def degenerate_table(tidy: pd.DataFrame) -> pd.DataFrame:
    """The `scores` frame's degenerate fractions in the refusal table's layout: rows (model, dataset,
    intervention), columns baseline and r_X_on_Y."""
    frame = tidy.assign(column=[_column(s, t) for s, t in zip(tidy["source_role"], tidy["target_role"])])
    baselines = frame[frame["source"] == "none"].set_index(["target", "dataset"])["degenerate"]
    steered = frame[frame["source"] != "none"]
    table = steered.pivot_table(index=["target", "dataset", "intervention"], columns="column", values="degenerate",
                                sort=False)
    table.insert(0, "baseline", [baselines[(t, d)] for t, d, _ in table.index])
    table.index.names = ["model", "dataset", "intervention"]
    table.columns.name = None
    return table[["baseline", *sorted(c for c in table.columns if c != "baseline")]]


def score_cube(profile_name: str) -> xr.DataArray:
    """Refusal scores as target x source x intervention x dataset (NaN where a condition is not run)."""
    generation = results.load(EXPERIMENT, profile_name, kind="generation")["refusal_score"]
    return generation.rename(target_model="target", source_model="source")


def _role_order(tidy: pd.DataFrame, model: str) -> int:
    """Rows of the base model first, then the post-trained models."""
    return int(tidy.loc[tidy["target"] == model, "target_role"].iloc[0] != "base")


def _column(source_role: str, target_role: str) -> str:
    return "baseline" if source_role == "none" else f"r_{source_role}_on_{target_role}"


def _published_key(role_of: dict[str, str], target: str, source: str, dataset: str, intervention: str
                   ) -> str | None:
    """The published key of a condition (source "none": the baseline), or None when the paper has no such cell:
    a model the paper's numbers do not describe (published_numbers.yaml `models:`), or an intervention other than
    the paper layout's for the dataset."""
    if target not in role_of or (source != "none" and (source not in role_of
                                                       or INTERVENTION_OF[dataset] != intervention)):
        return None
    column = "baseline" if source == "none" else f"r_{role_of[source]}_on_{role_of[target]}"
    return f"{SECTION}.{role_of[target]}.{dataset}.{column}"


def refusal_score_tables(tidy: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """Per family, the paper's layout of the `scores` frame: rows (target model, dataset, intervention labelled
    by INTERVENTION_LABEL), columns baseline and r_X_on_Y (X, Y roles) for every direction X steering Y, each
    measured beside the paper's value (only on the paper layout's rows of the models the paper describes)."""
    published = load_published()
    tables = {}
    for family, frame in tidy.groupby("family", sort=False):
        baselines = frame[frame["source"] == "none"].set_index(["target", "dataset"])["refusal_score"]
        cells: dict[tuple, dict] = {}
        for row in frame[frame["source"] != "none"].itertuples():
            in_paper_layout = INTERVENTION_OF[row.dataset] == row.intervention  # else no paper value, even baseline
            row_cells = cells.setdefault((row.target, row.dataset, row.intervention), {})
            for column, source, value in (("baseline", "none", baselines[(row.target, row.dataset)]),
                                          (_column(row.source_role, row.target_role), row.source, row.refusal_score)):
                key = _published_key(published.role_of, row.target, source, row.dataset, row.intervention)
                row_cells[(column, "measured")] = value
                row_cells[(column, "paper")] = published.numbers.get(key) if key and in_paper_layout else None
        table = pd.DataFrame.from_dict(cells, orient="index").astype(float)
        order = sorted(table.index, key=lambda row: (_role_order(frame, row[0]), row[0], ROW_ORDER.index(row[1:])))
        table = table.loc[order]
        table.index = pd.MultiIndex.from_tuples([(m, d, INTERVENTION_LABEL[i]) for m, d, i in order],
                                                names=["model", "dataset", "intervention"])
        table.columns = pd.MultiIndex.from_tuples(table.columns)
        order = ["baseline"] + sorted(c for c in table.columns.get_level_values(0).unique() if c != "baseline")
        tables[family] = table[order]
    return tables


def direction_cosines(profile_name: str) -> pd.DataFrame:
    """Tidy: family, model_a, model_b, role_a, role_b, cosine of their refusal directions (at each model's
    settings), and the cosine of the authors' shipped Llama-3.1-8B directions for the same pair (NaN unless both
    are models the paper's numbers describe)."""
    published = load_published()
    rows = []
    for name, unit in cube(profile_name).read_units("family").items():
        roles = dict(zip(unit["model"].values, unit["role"].values))
        models = list(unit["model_a"].values)
        for i, a in enumerate(models):
            for b in models[i + 1:]:
                rows.append({"family": name.split("__")[1], "model_a": a, "model_b": b, "role_a": roles[a],
                             "role_b": roles[b], "cosine": float(unit["cosine"].sel(model_a=a, model_b=b)),
                             "paper_shipped": _shipped(published, a, b)})
    return pd.DataFrame(rows)


def _shipped_keys(role_of: dict[str, str], a: str, b: str) -> list[str]:
    """The keys a shipped-direction cosine of models a and b may have (the file names pairs base_vs_instruct,
    instruct_vs_sft, ...), none unless both are models the paper's numbers describe."""
    if a not in role_of or b not in role_of:
        return []
    return [f"{SHIPPED}.{role_of[a]}_vs_{role_of[b]}", f"{SHIPPED}.{role_of[b]}_vs_{role_of[a]}"]


def _shipped(published, a: str, b: str) -> float:
    values = [published.numbers[k] for k in _shipped_keys(published.role_of, a, b) if k in published.numbers]
    return values[0] if values else float("nan")


def cosine_by_layer(profile_name: str) -> pd.DataFrame:
    """Tidy (figure): family, layer, model_a, model_b, cosine of the directions at every block (each model at its
    refusal_pos)."""
    frames = [unit["cosine_by_layer"].to_dataframe(name="cosine").reset_index().assign(family=name.split("__")[1])
              for name, unit in cube(profile_name).read_units("family").items()]
    return pd.concat(frames, ignore_index=True)[["family", "layer", "model_a", "model_b", "cosine"]]


def pca_data(profile_name: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Figure 1c: (points: family, model, kind, instruction, pc1, pc2; arrows: family, model, direction_model,
    pc1, pc2 of the unit refusal directions, explained variance of pc1 and pc2)."""
    points, arrows = [], []
    for name, unit in cube(profile_name).read_units("family").items():
        family = name.split("__")[1]
        coords = unit["pca_coordinates"].to_dataframe().reset_index()
        wide = coords.pivot_table(index=["model", "kind", "instruction"], columns="component",
                                  values="pca_coordinates").reset_index()
        wide.columns = ["model", "kind", "instruction", "pc1", "pc2"]
        points.append(wide.assign(family=family))
        arrows += pca_arrows(unit, family, "pca_direction_coordinates", "pca_explained_variance_ratio")
    return pd.concat(points, ignore_index=True), pd.DataFrame(arrows)


def sample_completions(profile_name: str, n: int = 3) -> pd.DataFrame:
    """The first n completions of every condition: target, source, intervention, dataset, instruction,
    completion, refusal."""
    rows = []
    for unit in cube(profile_name).read_units("generation").values():
        a = unit.attrs
        for i in range(min(n, unit.sizes["instruction"])):
            rows.append({"target": a["target"], "source": a["source"], "intervention": a["intervention"],
                         "dataset": a["dataset"], "instruction": str(unit["instruction_text"].values[i]),
                         "completion": str(unit["completion"].values[i]),
                         "refusal": bool(unit["refusal"].values[i])})
    return pd.DataFrame(rows)


def tables(profile_name: str) -> dict[str, pd.DataFrame]:
    """Every refusal table, by title."""
    tidy = scores(profile_name)
    result = {f"Refusal: refusal score, {family}": table for family, table in refusal_score_tables(tidy).items()}
    result["Refusal: fraction of degenerate (self-repeating) completions"] = degenerate_table(tidy)
    curves = transfer_curves(profile_name)
    if not curves.empty:
        result["Refusal: transfer curves, addition at fractions of the coefficient (beyond the paper)"] = \
            curves.pivot_table(index=["target", "source", "n", "scale"], values=["refusal_score", "degenerate"],
                              sort=False)
    result["Refusal: cosine of the refusal directions"] = direction_cosines(profile_name)
    return result


def forward_transfer_ratios(tidy: pd.DataFrame) -> pd.DataFrame:
    """Per (BASE, POST) pair of the `scores` frame: (S(r_BASE added to POST) - S(POST)) / (S(r_POST added to
    POST) - S(POST)) on the harmless test instructions, S = refusal score, with both effects."""
    harmless = tidy[(tidy["dataset"] == "harmless") & (tidy["target_role"] != "base")]
    rows = []
    for post, frame in harmless.groupby("target", sort=False):
        by_source = frame.set_index("source")["refusal_score"]
        base = frame.loc[frame["source_role"] == "base", "source"].item()
        own_effect = by_source[post] - by_source["none"]
        rows.append({"base": base, "post": post, "own_effect": own_effect,
                     "base_effect": by_source[base] - by_source["none"],
                     "ratio": (by_source[base] - by_source["none"]) / own_effect if own_effect else float("nan")})
    return pd.DataFrame(rows)


def measured_numbers(profile_name: str) -> dict[str, float]:
    """Audit numbers. Published keys (refusal_intervention_score.<target role>.<dataset>.<baseline | r_X_on_Y>,
    harmful = HARMFUL_INTERVENTION, harmless = addition; and the cosines of the shipped directions' roles) come
    from the rows of the models published_numbers.yaml `models:` names, in its roles; only keys the published
    file has are returned (none for a profile without those models). Qualitative keys: the largest BASE-POST
    direction cosine, and the largest forward-transfer ratio over pairs whose own addition effect is at least
    MIN_OWN_EFFECT (absent when no pair qualifies)."""
    return numbers_from(scores(profile_name), direction_cosines(profile_name))


def numbers_from(tidy: pd.DataFrame, cosines: pd.DataFrame) -> dict[str, float]:
    """`measured_numbers` of a `scores` and a `direction_cosines` frame."""
    published = load_published()
    candidates = [(_published_key(published.role_of, row.target, row.source, row.dataset, row.intervention),
                   row.refusal_score) for row in tidy.itertuples()]
    for row in cosines.itertuples():
        candidates += [(key, row.cosine) for key in _shipped_keys(published.role_of, row.model_a, row.model_b)]
    numbers = {key: float(value) for key, value in candidates if key in published.numbers}
    base_post = cosines[(cosines["role_a"] == "base") | (cosines["role_b"] == "base")]
    numbers[COSINE_KEY] = float(base_post["cosine"].max())
    ratios = forward_transfer_ratios(tidy)
    meaningful = ratios[ratios["own_effect"] >= MIN_OWN_EFFECT]
    if len(meaningful):
        numbers[TRANSFER_KEY] = float(meaningful["ratio"].max())
    return numbers
