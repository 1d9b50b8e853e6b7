"""Confidence: tables and figure data from ``results/<profile>/confidence.zarr`` (written by
replication/experiments/confidence.py).

Entropy neurons (paper's table and Figure 1d). For each (BASE, POST) pair of a family:

* overlap = the number of entropy neurons the two models share, out of the n_neurons selected per model (10 in
  the paper): last-layer neurons with ||w_out|| strictly above the 75% quantile, then the 10 with the smallest
  LogitVar = Var_vocab cos(w_out, W_U[:, v]);
* IoU = |A ∩ B| / |A ∪ B|;
* average ratio difference = the mean over the shared neurons of |r_BASE - r_POST|, where
  r = ||w_out|| / ln(LogitVar) is the original code's `norm_log_var_ratio` (IoU.py). r is negative because
  LogitVar < 1. The positive ratios in the authors' shipped neuron_analysis_results.json (e.g. 10186 for neuron
  12111) came from an older code version (methods_reference §1.6), so they are not comparable with r.

Both W_U variants are in the cube: "tl" (TransformerLens default processing: final-norm gain folded in, centred
over the vocabulary; what the original used) and "raw" (lm_head as stored). Tables use "tl" and report how much
the selection moves under "raw".

Output confidence: on the few-shot TRUE/FALSE prompts, p = P(TRUE) / (P(TRUE) + P(FALSE)); the answer is TRUE iff
p >= 0.5, its confidence max(p, 1 - p); accuracy, mean confidence, mean next-token entropy (nats, full
vocabulary) and the expected calibration error over 10 equal-width confidence bins (lower, upper].

Beyond the paper: the mean change in entropy and confidence when the entropy neurons are mean-ablated at the last
position, against a control group of as many random neurons from above the norm threshold.
"""
from __future__ import annotations

import pandas as pd
import yaml

from analysis.audit import PUBLISHED_FILE, load_published
from replication.cubes import CubeStore, profile_cube

EXPERIMENT = "confidence"
PAPER_WU = "tl"  # the W_U variant of the paper's selection (replication.experiments.confidence.PAPER_WU)
OVERLAP_KEY = "entropy_neurons.overlap_out_of_10.{base}.base_vs_{role}"
RATIO_KEY = "entropy_neurons.average_ratio_difference.{base}.base_vs_{role}"
MIN_OVERLAP_KEY = "qualitative.confidence.min_entropy_neuron_overlap"
FIGURE1D_BASE = "llama-3.1-8b"  # the family of the paper's Venn diagram (Figure 1d)


def cube(profile_name: str) -> CubeStore:
    return profile_cube(profile_name, EXPERIMENT)


def _pairs(store: CubeStore) -> pd.DataFrame:
    """One row per (BASE, POST) pair: label, base, post, post_role."""
    pairs = store.read_unit("pairs")
    return pd.DataFrame({"pair": pairs.pair.values, "base": pairs.base.values, "post": pairs.post.values,
                         "post_role": pairs.post_role.values})


def _selected(store: CubeStore, model: str, wu: str = PAPER_WU) -> list[int]:
    return store.read_unit(f"weights__{model}").selected.sel(wu=wu).values.tolist()


def entropy_neuron_table(profile_name: str) -> pd.DataFrame:
    """The paper's table: per pair, shared entropy neurons (of n), IoU and average ratio difference (TL W_U),
    the published values where the paper has the pair, and the overlap and IoU under the raw W_U."""
    store = cube(profile_name)
    pairs = store.read_unit("pairs")
    published = load_published().numbers
    rows = []
    for row in _pairs(store).itertuples():
        stats = pairs.sel(pair=row.pair)
        keys = {"base": row.base, "role": row.post_role}
        rows.append({
            "pair": row.pair,
            "overlap": int(stats.overlap.sel(wu=PAPER_WU)),
            "of": store.read_unit(f"weights__{row.base}").sizes["rank"],
            "iou": float(stats.iou.sel(wu=PAPER_WU)),
            "avg_ratio_difference": float(stats.mean_abs_ratio_difference.sel(wu=PAPER_WU)),
            "paper_overlap": published.get(OVERLAP_KEY.format(**keys)),
            "paper_avg_ratio_difference": published.get(RATIO_KEY.format(**keys)),
            "overlap_raw_wu": int(stats.overlap.sel(wu="raw")),
            "iou_raw_wu": float(stats.iou.sel(wu="raw")),
        })
    return pd.DataFrame(rows).set_index("pair")


def wu_choice_table(profile_name: str) -> pd.DataFrame:
    """Per model: how many of the entropy neurons selected with the TL-processed W_U are also selected with the
    raw lm_head weights."""
    store = cube(profile_name)
    rows = []
    for ds in store.read_units("weights").values():
        rows.append({"model": ds.attrs["model"], "shared_tl_raw": int(ds.variant_overlap),
                     "of": ds.sizes["rank"]})
    return pd.DataFrame(rows).set_index("model")


def scatter_data(profile_name: str, wu: str = PAPER_WU) -> pd.DataFrame:
    """Norm-vs-LogitVar scatter (the original fig1.py, log y): one row per model and neuron, entropy neurons
    marked, plus the norm threshold of the selection."""
    store = cube(profile_name)
    frames = []
    for ds in store.read_units("weights").values():
        selected = set(ds.selected.sel(wu=wu).values.tolist())
        frames.append(pd.DataFrame({
            "model": ds.attrs["model"], "neuron": ds.neuron.values, "norm": ds.norm.values,
            "logit_var": ds.logit_var.sel(wu=wu).values, "norm_threshold": float(ds.norm_threshold),
            "entropy_neuron": [n in selected for n in ds.neuron.values.tolist()]}))
    return pd.concat(frames, ignore_index=True)


def venn_data(profile_name: str, wu: str = PAPER_WU) -> pd.DataFrame:
    """Figure 1d: per family (named by its base model), every neuron selected in any of its models, with one
    membership column per role (BASE, SFT, INSTRUCT) and the region it falls in, e.g. "BASE & SFT"."""
    store = cube(profile_name)
    rows = []
    for base, family in _pairs(store).groupby("base", sort=False):
        members = {"BASE": set(_selected(store, base, wu))}
        members.update({role.upper(): set(_selected(store, post, wu))
                        for post, role in zip(family.post, family.post_role)})
        for neuron in sorted(set().union(*members.values())):
            inside = {role: neuron in ids for role, ids in members.items()}
            rows.append({"family": base, "neuron": neuron, **inside,
                         "region": " & ".join(role for role, hit in inside.items() if hit)})
    return pd.DataFrame(rows)


def figure1d_comparison(profile_name: str) -> pd.DataFrame:
    """The Llama-3.1-8B entropy-neuron ids beside those of the paper's Figure 1d (empty without that family)."""
    paper = _figure1d_ids()
    venn = venn_data(profile_name)
    venn = venn[venn.family == FIGURE1D_BASE]
    rows = []
    for role, paper_ids in paper.items():
        if role.upper() in venn and not venn.empty:
            measured = sorted(venn.neuron[venn[role.upper()]].tolist())
            rows.append({"role": role.upper(), "measured": measured, "paper": sorted(paper_ids),
                         "shared": len(set(measured) & set(paper_ids))})
    return pd.DataFrame(rows, columns=["role", "measured", "paper", "shared"])


def _figure1d_ids() -> dict[str, list[int]]:
    return yaml.safe_load(PUBLISHED_FILE.read_text())["entropy_neurons"][f"figure1d_neuron_ids_{FIGURE1D_BASE}"]


def calibration_table(profile_name: str) -> pd.DataFrame:
    """Per model and dataset: statements, accuracy, mean confidence, ECE and mean next-token entropy."""
    store = cube(profile_name)
    rows = []
    for ds in store.read_units("outputs").values():
        rows.append({"model": ds.attrs["model"], "dataset": ds.attrs["dataset"],
                     "n": ds.sizes["statement"], "accuracy": float(ds.accuracy),
                     "mean_confidence": float(ds.mean_confidence), "ece": float(ds.ece),
                     "mean_entropy": float(ds.mean_entropy)})
    return pd.DataFrame(rows).set_index(["model", "dataset"])


def calibration_comparison(profile_name: str) -> pd.DataFrame:
    """POST minus BASE per pair and dataset: the change in accuracy, confidence, ECE and entropy."""
    table = calibration_table(profile_name)
    metrics = ["accuracy", "mean_confidence", "ece", "mean_entropy"]
    rows = []
    for pair in _pairs(cube(profile_name)).itertuples():
        for dataset in table.loc[pair.base].index:
            change = table.loc[(pair.post, dataset), metrics] - table.loc[(pair.base, dataset), metrics]
            rows.append({"pair": pair.pair, "dataset": dataset, **{f"delta_{m}": change[m] for m in metrics}})
    return pd.DataFrame(rows).set_index(["pair", "dataset"])


def reliability_data(profile_name: str) -> pd.DataFrame:
    """Reliability curves: per model, dataset and confidence bin, the count, mean confidence and accuracy."""
    store = cube(profile_name)
    frames = []
    for ds in store.read_units("outputs").values():
        frames.append(pd.DataFrame({
            "model": ds.attrs["model"], "dataset": ds.attrs["dataset"], "bin_lower": ds.bin_lower.values,
            "bin_upper": ds.bin_upper.values, "count": ds.bin_count.values,
            "mean_confidence": ds.bin_confidence.values, "accuracy": ds.bin_accuracy.values}))
    return pd.concat(frames, ignore_index=True)


def ablation_table(profile_name: str) -> pd.DataFrame:
    """Beyond the paper: per model and dataset, the mean change in next-token entropy and answer confidence when
    the entropy neurons (TL selection) are mean-ablated at the last position, beside a random control group of
    as many high-norm neurons."""
    store = cube(profile_name)
    rows = []
    for ds in store.read_units("ablation").values():
        rows.append({"model": ds.attrs["model"], "dataset": ds.attrs["dataset"],
                     **{f"delta_entropy_{g}": float(ds.delta_entropy.sel(group=g)) for g in ds.group.values},
                     **{f"delta_confidence_{g}": float(ds.delta_confidence.sel(group=g))
                        for g in ds.group.values}})
    return pd.DataFrame(rows).set_index(["model", "dataset"])


def measured_numbers(profile_name: str) -> dict[str, float]:
    """Audit numbers: the published entropy-neuron keys the profile's pairs have, and the smallest overlap
    expressed out of 10 (overlap * 10 / n_neurons, so profiles selecting fewer neurons are comparable)."""
    table = entropy_neuron_table(profile_name)
    published = load_published().numbers
    numbers = {MIN_OVERLAP_KEY: float((table.overlap * 10 / table["of"]).min())}
    for row in _pairs(cube(profile_name)).itertuples():
        keys = {"base": row.base, "role": row.post_role}
        for key, value in ((OVERLAP_KEY.format(**keys), table.loc[row.pair, "overlap"]),
                           (RATIO_KEY.format(**keys), table.loc[row.pair, "avg_ratio_difference"])):
            if key in published:
                numbers[key] = float(value)
    return numbers


def tables(profile_name: str) -> dict[str, pd.DataFrame]:
    """Every confidence table, by title (the ablation table only when the cube has ablation units)."""
    result = {"Confidence: entropy-neuron overlap": entropy_neuron_table(profile_name),
              "Confidence: W_U choice (TL-processed vs raw lm_head)": wu_choice_table(profile_name),
              "Confidence: output confidence and calibration": calibration_table(profile_name),
              "Confidence: POST minus BASE": calibration_comparison(profile_name)}
    ablation = ablation_table(profile_name)
    if not ablation.empty:
        result["Confidence: mean-ablating the entropy neurons (beyond the paper)"] = ablation
    return result
