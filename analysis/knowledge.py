"""Knowledge analysis: patching maps, their normalisation and the BASE / POST comparisons (methods_reference §1.3,
the original's patching_visualize.py).

A map is [layers x columns] of patch effects averaged over pairs: one column per token position for the template
datasets, and for tulu_extracted (pairs of different lengths and knowledge positions) three columns: the mean over
the knowledge positions, over the other positions but the last, and the last token, each per pair, then over pairs.
Maps are compared after the original's 20-bin normalisation: Pearson r, max |difference| over the whole map and
over the knowledge columns ([s*] / [o*] tokens; tulu_extracted: the knowledge column).

Comparisons per (BASE, POST) pair and dataset: BASE's own map vs POST's ("own"), and cross-model patching against
the target model's own map: BASE->POST vs POST ("forward"), POST->BASE vs BASE ("backward").
"""
from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass

import numpy as np
import pandas as pd
import xarray as xr
import yaml
from scipy.stats import pearsonr

from analysis.audit import PUBLISHED_FILE, load_published
from data_prep.sources import fetch
from replication.config import load_profile
from replication.cubes import profile_cube

EXPERIMENT = "knowledge"
PUBLISHED = "knowledge_causal_tracing"
COMPARISONS = {  # name: (map A, map B) as (source, target) with B = BASE or POST
    "own": (("base", "base"), ("post", "post")),
    "forward": (("base", "post"), ("post", "post")),
    "backward": (("post", "base"), ("base", "base")),
}
SUBJECT, OBJECT = re.compile(r"\[s\d+\]"), re.compile(r"\[o\d+\]")


@dataclass(frozen=True)
class Map:
    values: np.ndarray  # mean patch effect [layers, columns]
    columns: list[str]  # column labels: token roles, or knowledge / others / last_token
    knowledge: np.ndarray  # [columns] bool: the knowledge columns
    n_pairs: int
    # Mean over pairs of logit(' TRUE') - logit(' FALSE') on the TRUE prompt minus on the FALSE prompt: the most a
    # patch can move. Near 0, the normalised map (20 bins between its min and max) is mostly noise.
    clean_gap: float = float("nan")

    def last(self, n: int) -> Map:
        """The last n columns (maps end with the same suffix tokens, so they are aligned on the last token)."""
        return dataclasses.replace(self, values=self.values[:, -n:], columns=self.columns[-n:],
                                   knowledge=self.knowledge[-n:])


def original_effects(records: list[dict]) -> np.ndarray:
    """Records of the original's patching_results.json -> effects [pairs, layers, n_toks] in token order.
    The original stores logit_diffs[tok_idx - 1][layer] with tok_idx counted back from the last token."""
    return np.array([record["logit_diffs"] for record in records], dtype=np.float64)[:, ::-1, :].transpose(0, 2, 1)


def mean_map(effects: np.ndarray) -> np.ndarray:
    """Mean over pairs: [pairs, layers, positions] -> [layers, positions]."""
    return effects.mean(axis=0)


def knowledge_others_last_map(effects: np.ndarray, is_knowledge: np.ndarray) -> np.ndarray:
    """tulu_extracted's map [layers, 3] from effects [pairs, layers, positions] (NaN where a pair has no token)
    and is_knowledge [pairs, positions]: per pair the mean over knowledge positions, over the other positions
    except the last, and the last position; then the mean over pairs."""
    columns = []
    for pair_effects, knowledge in zip(effects, is_knowledge):
        present = ~np.isnan(pair_effects[0])
        others = present & ~knowledge
        others[-1] = False
        columns.append([pair_effects[:, knowledge].mean(axis=1), pair_effects[:, others].mean(axis=1),
                        pair_effects[:, -1]])
    return np.mean(columns, axis=0).T


def normalize(values: np.ndarray) -> np.ndarray:
    """The original's normalize(): 20 equal-width bins over [min - 1e-5, max + 1e-5]; values in bins 1-10 become
    0, in bins 11-20 0.1, 0.2, ..., 1.0."""
    bins = np.linspace(values.min() - 1e-5, values.max() + 1e-5, 21)
    bin_values = np.concatenate((np.zeros(10), np.linspace(0.1, 1.0, 10)))
    return bin_values[np.digitize(values, bins) - 1]


def unit_map(unit: xr.Dataset) -> Map:
    """The map of one cube unit (one source model, target model and dataset)."""
    effects = unit["patch_effect"].values
    gap = float((unit["true_logit_diff"] - unit["false_logit_diff"]).mean())
    if unit.attrs["map_kind"] == "knowledge_others_last":
        values = knowledge_others_last_map(effects, unit["is_knowledge"].values)
        return Map(values, ["knowledge", "others", "last_token"], np.array([True, False, False]), effects.shape[0],
                   gap)
    roles = unit["role"].values
    if not (roles == roles[0]).all():
        raise ValueError(f"unit {unit.attrs.get('direction')} {unit['dataset'].item()}: pairs have different token "
                         "roles; such a dataset needs map_kind knowledge_others_last")
    return Map(mean_map(effects), list(roles[0]), unit["is_knowledge"].values[0], effects.shape[0], gap)


def compare_maps(a: Map, b: Map) -> dict[str, float]:
    """Pearson r and max |difference| (overall, knowledge columns) of the normalised maps, truncated to the
    shorter token count."""
    n = min(len(a.columns), len(b.columns))
    a, b = a.last(n), b.last(n)
    if a.columns != b.columns:
        raise ValueError(f"maps with different columns cannot be compared: {a.columns} vs {b.columns}")
    norm_a, norm_b = normalize(a.values), normalize(b.values)
    diff = np.abs(norm_a - norm_b)
    return {"corr": float(pearsonr(norm_a.ravel(), norm_b.ravel())[0]), "max_diff": quantum(diff.max()),
            "max_diff_knowledge": quantum(diff[:, a.knowledge].max())}


def quantum(value: float) -> float:
    """A difference of normalised values, a multiple of 0.1, without float noise (0.30000000000000004 -> 0.3)."""
    return round(float(value), 10)


def figure1a_numbers(base: Map, post: Map) -> dict[str, float]:
    """Figure 1(a) (larger_than, BASE - POST): max |difference| of the normalised maps at the subject tokens,
    the object tokens and the last token."""
    diff = np.abs(normalize(base.values) - normalize(post.values))
    subject = [bool(SUBJECT.fullmatch(c)) for c in base.columns]
    object_ = [bool(OBJECT.fullmatch(c)) for c in base.columns]
    return {"subject_max_diff": quantum(diff[:, subject].max()), "object_max_diff": quantum(diff[:, object_].max()),
            "last_token_max_diff": quantum(diff[:, -1].max())}


def paper_map() -> tuple[Map, dict]:
    """The authors' shipped cities map (published_numbers.yaml `knowledge_causal_tracing.shipped_map`: the raw
    file, its record, model and token columns) as a Map, and that entry (model, dataset, source) for its labels."""
    entry = yaml.safe_load(PUBLISHED_FILE.read_text())[PUBLISHED]["shipped_map"]
    records = json.loads(fetch(entry["source"]).read_text())[entry["record"]]
    effects = original_effects(records)
    columns = list(entry["columns"])
    if effects.shape[2] != len(columns):
        raise ValueError(f"analysis/published_numbers.yaml {PUBLISHED}.shipped_map: {len(columns)} columns for a "
                         f"map of {effects.shape[2]} tokens; list one column label per token")
    is_knowledge = np.array([bool(SUBJECT.fullmatch(c) or OBJECT.fullmatch(c)) for c in columns])
    return Map(mean_map(effects), columns, is_knowledge, effects.shape[0]), entry


def unit_maps(profile_name: str) -> dict[tuple[str, str, str], Map]:
    """Every finished unit's map, keyed (source model, target model, dataset)."""
    units = profile_cube(profile_name, EXPERIMENT).read_units()
    return {(u["source_model"].item(), u["target_model"].item(), u["dataset"].item()): unit_map(u)
            for u in units.values()}


def published_pair(profile_name: str) -> tuple[str, str] | None:
    """The pair the paper's knowledge table describes, (BASE, INSTRUCT) of published_numbers.yaml `models:`, when
    the profile compares it; else None (the profile has no published knowledge numbers)."""
    models = load_published().models
    pair = (models["base"], models["instruct"])
    return pair if pair in load_profile(profile_name).pairs(EXPERIMENT) else None


def reference_pair(profile_name: str) -> tuple[str, str]:
    """The pair the figures show: `published_pair` when the profile has it, else the first family's base and its
    instruct model (else its first post-trained model)."""
    if pair := published_pair(profile_name):
        return pair
    profile = load_profile(profile_name)
    family = profile.families[profile.family_names(EXPERIMENT)[0]]
    instruct = [key for key in family.post if profile.model_spec(key).role == "instruct"]
    return family.base, (instruct or list(family.post))[0]


def comparison_table(profile_name: str, maps: dict[tuple[str, str, str], Map] | None = None) -> pd.DataFrame:
    """One row per (BASE, POST) pair, dataset and comparison (own / forward / backward) whose maps are in the
    cube, with r, max_diff, max_diff_knowledge, both maps' clean gaps (`Map.clean_gap`) and, for the own maps of
    the pair the paper describes (`published_pair`), the paper's numbers."""
    profile = load_profile(profile_name)
    maps = unit_maps(profile_name) if maps is None else maps
    published = load_published().numbers
    reference = published_pair(profile_name)
    rows = []
    for base, post in profile.pairs(EXPERIMENT):
        models = {"base": base, "post": post}
        for dataset in profile.experiment(EXPERIMENT).datasets:
            for comparison, (a, b) in COMPARISONS.items():
                key_a = (models[a[0]], models[a[1]], dataset)
                key_b = (models[b[0]], models[b[1]], dataset)
                if key_a not in maps or key_b not in maps:
                    continue
                row = {"base": base, "post": post, "dataset": dataset, "comparison": comparison,
                       "map_a": "{}->{}".format(*key_a[:2]), "map_b": "{}->{}".format(*key_b[:2]),
                       "pairs": maps[key_a].n_pairs, **compare_maps(maps[key_a], maps[key_b]),
                       "clean_gap_a": maps[key_a].clean_gap, "clean_gap_b": maps[key_b].clean_gap}
                is_paper_row = comparison == "own" and (base, post) == reference
                for metric in ("pairs", "corr", "max_diff", "max_diff_knowledge"):
                    row[f"paper_{metric}"] = published.get(f"{PUBLISHED}.{metric}.{dataset}") if is_paper_row \
                        else None
                rows.append(row)
    return pd.DataFrame(rows)


def measured_numbers(profile_name: str) -> dict[str, float]:
    """Audit keys (analysis/audit.py): the paper's table and Figure 1(a) for the pair the paper describes
    (`published_pair`; none for a profile without it), and the claim qualitative.knowledge.min_map_corr
    (smallest r of BASE vs POST own maps over all pairs and datasets)."""
    maps = unit_maps(profile_name)
    table = comparison_table(profile_name, maps)
    if table.empty:
        return {}
    own = table[table["comparison"] == "own"]
    numbers = {"qualitative.knowledge.min_map_corr": float(own["corr"].min())} if not own.empty else {}
    pair = published_pair(profile_name)
    if pair is None:
        return numbers
    base, post = pair
    for row in own[(own["base"] == base) & (own["post"] == post)].itertuples():
        for metric in ("corr", "max_diff", "max_diff_knowledge", "pairs"):
            numbers[f"{PUBLISHED}.{metric}.{row.dataset}"] = float(getattr(row, metric))
    if (base, base, "larger_than") in maps and (post, post, "larger_than") in maps:
        for name, value in figure1a_numbers(maps[base, base, "larger_than"], maps[post, post, "larger_than"]).items():
            numbers[f"{PUBLISHED}.figure1a_larger_than_base_minus_post.{name}"] = value
    return numbers


def tables(profile_name: str) -> dict[str, pd.DataFrame]:
    """Every knowledge table, by title."""
    comparison = comparison_table(profile_name)
    own = comparison["comparison"] == "own"
    cross = comparison[~own].drop(columns=[c for c in comparison if c.startswith("paper_")])
    return {"Knowledge: BASE vs POST causal-tracing maps": comparison[own].drop(columns="comparison"),
            "Knowledge: cross-model patching (forward BASE->POST, backward POST->BASE)": cross}
