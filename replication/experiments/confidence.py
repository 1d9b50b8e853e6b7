"""Confidence (paper §6, Figure 1d): entropy neurons compared across base and post-trained models, and the
confidence and calibration of each model's TRUE/FALSE answers.

Entropy neurons (Stolfo et al. 2024; the original `Confidence/IoU.py`, methods_reference §1.6, §4.4) are
last-layer MLP neurons whose output weight w_out is large but writes almost only into the null space of the
unembedding, so they change the output entropy through the final norm rather than through direct logit effects.
Per neuron: norm = ||w_out||, LogitVar = unbiased variance over the vocabulary of cos(w_out, W_U[:, v]). Selection:
norm strictly above the (1 - top_norm_fraction) quantile, then the n_neurons with the smallest LogitVar.

W_U variants: "tl" = the unembedding as TransformerLens processes it by default (what the original used): the
final RMSNorm gain folded in (W_U[d, v] * gain[d], gain = norm_gain_offset + weight, per the model table) and then
centred over the vocabulary; "raw" = the lm_head weights as stored. Both are stored so the analysis can report
how much the choice matters. Weights are read from the model loaded in float32 (as the original), whatever the
profile's dtype. Where the model table names an RMSNorm on the MLP output (Gemma's post-feedforward norm; none of
the paper's models has one) its gain scales w_out, so that w_out is the direction the neuron writes.

Output confidence: each model reads the few-shot TRUE/FALSE prompts of the truthfulness intervention, on the same
statements (data_prep.prompts.intervention_table: statements outside the few-shot text, at most
max_statements, balanced between true and false); at the last position we record the entropy of the next-token
distribution and P(TRUE) / (P(TRUE) + P(FALSE)), from which the answer, its confidence and the calibration
(expected calibration error, reliability curve) follow.

Beyond the paper (on the profile's ablation_datasets): the entropy neurons are mean-ablated at the last position
(Stolfo et al.'s causal check), beside a control group of as many random high-norm neurons, and the change in
output entropy and answer confidence is recorded.

Cube units (results/<profile>/confidence.zarr): weights__<model>, outputs__<model>__<dataset>,
ablation__<model>__<dataset>, pairs (derived from the weights units, rewritten on every run).
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import xarray as xr
from replication.progress import progress_bar

from data_prep.paths import results_dir
from data_prep.prompts import intervention_table
from replication.config import ModelSpec, Profile
from replication.cubes import CubeStore, now
from replication.mechanics.forward import SharedPrefixes, answer_token_ids
from replication.models import LAST_POSITION, WEIGHTS_DTYPE, load_model, module_at
from replication.provenance import provenance

EXPERIMENT = "confidence"
WU_VARIANTS = ("tl", "raw")  # TransformerLens-processed W_U (as the original) / raw lm_head weights
PAPER_WU = "tl"
LOG_FLOOR = 1e-10  # the original's max(1e-10, LogitVar) inside the log of the ratio
CHUNK_NEURONS = 256  # neurons per cosine block: [256, d_vocab] floats at a time, never [d_mlp, d_vocab]
N_BINS = 10  # equal-width confidence bins of the calibration error and the reliability curve


# ---------------------------------------------------------------------------------------------------------------
# Weights


def mlp_output_matrix(model, spec: ModelSpec) -> torch.Tensor:
    """The last decoder layer's W_out, [d_mlp, d_model]: row i is the direction neuron i writes into the residual
    stream (HF's down_proj.weight is [d_model, d_mlp], so its columns). Where the MLP output passes through an
    RMSNorm first (the table's mlp_out_norm_path; Gemma's post-feedforward norm), the rows are scaled by that norm's
    gain; its 1/rms is one positive number per token for all neurons, so it changes no direction and no ranking."""
    last_layer = module_at(model, spec.layers_path)[-1]
    W_out = module_at(last_layer, spec.mlp_out_path).weight.detach().float().T
    if spec.mlp_out_norm_path is None:
        return W_out
    return W_out * rms_norm_gain(module_at(last_layer, spec.mlp_out_norm_path), spec)


def rms_norm_gain(norm_module, spec: ModelSpec) -> torch.Tensor:
    """An RMSNorm's effective per-dimension gain: offset + weight (the table's offset: 1 for Gemma's (1 + w))."""
    return spec.norm_gain_offset + norm_module.weight.detach().float()


def raw_unembedding(model, spec: ModelSpec) -> torch.Tensor:
    """The unembedding as stored, [d_model, d_vocab] (HF's lm_head.weight is [d_vocab, d_model])."""
    return module_at(model, spec.unembed_path).weight.detach().float().T


def fold_norm_gain(W_U: torch.Tensor, gain: torch.Tensor) -> torch.Tensor:
    """W_U[d, v] * gain[d]: the final norm's gain moved into the unembedding (TransformerLens fold_ln)."""
    return W_U * gain[:, None]


def center_over_vocab(W_U: torch.Tensor) -> torch.Tensor:
    """W_U minus its mean over the vocabulary, per model dimension (TransformerLens center_unembed); logits shift
    by the same amount for every token, so the output distribution is unchanged."""
    return W_U - W_U.mean(dim=1, keepdim=True)


def unembedding(model, spec: ModelSpec, variant: str) -> torch.Tensor:
    """[d_model, d_vocab] for a W_U variant: "tl" (gain folded, centred) or "raw"."""
    if variant == "raw":
        return raw_unembedding(model, spec)
    if variant == "tl":
        return center_over_vocab(fold_norm_gain(raw_unembedding(model, spec),
                                                 rms_norm_gain(module_at(model, spec.final_norm_path), spec)))
    raise ValueError(f"unknown W_U variant {variant!r}; allowed: {WU_VARIANTS}")


def neuron_norms(W_out: torch.Tensor) -> torch.Tensor:
    return W_out.norm(dim=1)


def logit_var(W_out: torch.Tensor, W_U: torch.Tensor, chunk_neurons: int = CHUNK_NEURONS) -> torch.Tensor:
    """LogitVar per neuron: the unbiased variance over the vocabulary of cos(w_out, W_U[:, v]).

    In the original's order and the inputs' dtype (IoU.py: `W / W.norm(dim=1).unsqueeze(1) @ W_U / W_U.norm(dim=0)`,
    i.e. ((W / |W|) @ W_U) / |W_U|): in float32 the other order, W / |W| @ (W_U / |W_U|), rounds differently, and
    where two candidates' LogitVars are that close the last selected rank falls the other way. Neither order is
    exact; this one decides such a tie as the paper did. On CPU, blocks of CHUNK_NEURONS rows give the same bits
    as the original's one product (tested); on a GPU the summation order inside a product is cuBLAS's choice."""
    column_norms = W_U.norm(dim=0)
    unit_W_out = W_out / W_out.norm(dim=1).unsqueeze(1)
    return torch.cat([((block @ W_U) / column_norms).var(dim=1) for block in unit_W_out.split(chunk_neurons)])


def select_entropy_neurons(norm: torch.Tensor, logit_var_: torch.Tensor, top_norm_fraction: float,
                           n_neurons: int) -> torch.Tensor:
    """Neuron indices, smallest LogitVar first: norm strictly above the (1 - top_norm_fraction) quantile (linear
    interpolation, as pandas and torch.quantile), then the n_neurons lowest LogitVar (ties: lower index first, as
    pandas nsmallest)."""
    threshold = torch.quantile(norm, 1 - top_norm_fraction)
    candidates = torch.nonzero(norm > threshold).squeeze(1)
    order = torch.argsort(logit_var_[candidates], stable=True)
    return candidates[order[:n_neurons]]


def norm_log_var_ratio(norm: torch.Tensor, logit_var_: torch.Tensor) -> torch.Tensor:
    """norm / ln(LogitVar), the original's `norm_log_var_ratio` (negative while LogitVar < 1), in float64 as the
    original's pandas row-apply computes it from its float32 columns."""
    return norm.double() / torch.log(logit_var_.double().clamp(min=LOG_FLOOR))


def weight_analysis(model, spec: ModelSpec, top_norm_fraction: float, n_neurons: int) -> xr.Dataset:
    """Norm, LogitVar, ratio and the selected entropy neurons of one model, for both W_U variants."""
    W_out = mlp_output_matrix(model, spec)
    variances = {variant: logit_var(W_out, unembedding(model, spec, variant)) for variant in WU_VARIANTS}
    return weights_dataset(neuron_norms(W_out), variances, top_norm_fraction, n_neurons).assign_attrs(
        model=spec.key, d_model=W_out.shape[1], d_vocab=raw_unembedding(model, spec).shape[1],
        mlp_out_norm=spec.mlp_out_norm_path or "none")


def weights_dataset(norm: torch.Tensor, logit_vars: dict[str, torch.Tensor], top_norm_fraction: float,
                    n_neurons: int) -> xr.Dataset:
    """The weights unit: per neuron norm; per W_U variant LogitVar, ratio and the selection (by rank); the norm
    threshold; how many neurons the two variants' selections share."""
    variants = list(logit_vars)
    selections = [select_entropy_neurons(norm, logit_vars[v], top_norm_fraction, n_neurons) for v in variants]
    if min(len(s) for s in selections) < n_neurons:
        raise ValueError(f"only {min(len(s) for s in selections)} of {len(norm)} neurons lie above the norm "
                         f"threshold, fewer than n_neurons={n_neurons}; lower n_neurons or raise top_norm_fraction")
    return xr.Dataset(
        {
            "norm": ("neuron", norm.cpu().numpy()),
            "logit_var": (("wu", "neuron"), torch.stack([logit_vars[v] for v in variants]).cpu().numpy()),
            "ratio": (("wu", "neuron"), torch.stack([norm_log_var_ratio(norm, logit_vars[v])
                                                     for v in variants]).cpu().numpy()),
            "selected": (("wu", "rank"), torch.stack(selections).cpu().numpy()),
            "norm_threshold": torch.quantile(norm, 1 - top_norm_fraction).item(),
            "variant_overlap": overlap_count(selections[0].tolist(), selections[-1].tolist()),
        },
        coords={"wu": variants, "neuron": np.arange(len(norm)), "rank": np.arange(n_neurons)},
        attrs={"top_norm_fraction": top_norm_fraction, "n_neurons": n_neurons, "d_mlp": len(norm)},
    )


# ---------------------------------------------------------------------------------------------------------------
# Comparing selections


def overlap_count(a: Sequence[int], b: Sequence[int]) -> int:
    return len(set(a) & set(b))


def iou(a: Sequence[int], b: Sequence[int]) -> float:
    """|A ∩ B| / |A ∪ B| of two neuron-index sets (0 for two empty sets, as the original)."""
    union = set(a) | set(b)
    return overlap_count(a, b) / len(union) if union else 0.0


def mean_abs_ratio_difference(selected_a: Sequence[int], selected_b: Sequence[int], ratio_a: np.ndarray,
                              ratio_b: np.ndarray) -> float:
    """Mean over the neurons selected in both models of |ratio_a - ratio_b| (NaN when none is shared)."""
    shared = sorted(set(selected_a) & set(selected_b))
    return float(np.mean(np.abs(ratio_a[shared] - ratio_b[shared]))) if shared else float("nan")


def pair_label(base: ModelSpec, post: ModelSpec) -> str:
    """'llama-3.1-8b BASE vs INSTRUCT': the keys of published_numbers.yaml (entropy_neurons)."""
    return f"{base.key} BASE vs {post.role.upper()}"


def compare_pairs(weights: dict[str, xr.Dataset], pairs: Sequence[tuple[ModelSpec, ModelSpec]]) -> xr.Dataset:
    """Overlap, IoU and mean |ratio difference| of the selections of every (base, post) pair, per W_U variant."""
    def per_pair(statistic):
        return [[statistic(weights[base.key].sel(wu=wu), weights[post.key].sel(wu=wu)) for wu in WU_VARIANTS]
                for base, post in pairs]
    return xr.Dataset(
        {
            "overlap": (("pair", "wu"), per_pair(lambda a, b: overlap_count(a.selected.values, b.selected.values))),
            "iou": (("pair", "wu"), per_pair(lambda a, b: iou(a.selected.values, b.selected.values))),
            "mean_abs_ratio_difference": (("pair", "wu"), per_pair(lambda a, b: mean_abs_ratio_difference(
                a.selected.values, b.selected.values, a.ratio.values, b.ratio.values))),
        },
        coords={"pair": [pair_label(base, post) for base, post in pairs], "wu": list(WU_VARIANTS),
                "base": ("pair", [base.key for base, _ in pairs]), "post": ("pair", [post.key for _, post in pairs]),
                "post_role": ("pair", [post.role for _, post in pairs])},
    )


# ---------------------------------------------------------------------------------------------------------------
# Output confidence


def mlp_out_module(model, spec: ModelSpec):
    """The last decoder layer's MLP output projection; its input holds the neuron activations."""
    return module_at(module_at(model, spec.layers_path)[-1], spec.mlp_out_path)


def last_position_logits(model, spec: ModelSpec, prompts: Sequence[str], batch_size: int, progress: bool = False,
                         neuron_values: tuple[torch.Tensor, torch.Tensor] | None = None,
                         prefixes: SharedPrefixes | None = None) -> torch.Tensor:
    """[n_prompts, d_vocab] float32 logits of the next token after each prompt: batches of similar length through
    nnsight, the prompts' shared few-shot tokens run once (`prefixes`, built here unless given), only the last
    position's logits computed (logits_to_keep=LAST_POSITION). With `neuron_values` = (neuron indices, values), those
    last-layer neurons take these values at the last position (mean ablation)."""
    prefixes = prefixes or SharedPrefixes(model, prompts, batch_size=batch_size)
    result = None
    for batch in progress_bar(prefixes.batches(batch_size), desc="forward", enabled=progress, leave=False):
        with torch.inference_mode(), model.trace(batch.input_ids, **batch.inputs, logits_to_keep=LAST_POSITION):
            if neuron_values is not None:
                neurons, values = neuron_values
                activations = mlp_out_module(model, spec).input
                activations[:, -1, neurons] = values.to(activations.device, activations.dtype)
            logits = model.output.logits[:, -1, :].save()
        if result is None:
            result = torch.empty(len(prompts), logits.shape[-1])
        result[batch.indices] = logits.float().cpu()
    return result


def last_position_mlp_activations(model, spec: ModelSpec, prompts: Sequence[str], batch_size: int,
                                  prefixes: SharedPrefixes | None = None) -> torch.Tensor:
    """[n_prompts, d_mlp] float32: the last layer's neuron activations at each prompt's last position."""
    prefixes = prefixes or SharedPrefixes(model, prompts, batch_size=batch_size)
    result = None
    for batch in prefixes.batches(batch_size):
        with torch.inference_mode(), model.trace(batch.input_ids, **batch.inputs) as tracer:
            activations = mlp_out_module(model, spec).input[:, -1, :].save()
            tracer.stop()  # nothing after the last MLP is needed
        if result is None:
            result = torch.empty(len(prompts), activations.shape[-1])
        result[batch.indices] = activations.float().cpu()
    return result


def next_token_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of softmax(logits) over the last dimension."""
    log_p = torch.log_softmax(logits.double(), dim=-1)
    return -(log_p.exp() * log_p).sum(dim=-1)


def true_probability(logits: torch.Tensor, true_id: int, false_id: int) -> torch.Tensor:
    """P(TRUE) / (P(TRUE) + P(FALSE)) = sigmoid(logit_TRUE - logit_FALSE)."""
    return torch.sigmoid(logits[:, true_id].double() - logits[:, false_id].double())


def answer_confidence(p_true: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(confidence, correct) of the answer TRUE iff p_true >= 0.5: confidence = max(p_true, 1 - p_true)."""
    answer = (p_true >= 0.5).astype(int)
    return np.maximum(p_true, 1 - p_true), answer == labels


def reliability_bins(confidence: np.ndarray, correct: np.ndarray, n_bins: int = N_BINS) -> xr.Dataset:
    """Reliability-curve data: per equal-width bin (lower, upper] of [0, 1] (the first includes 0), the count,
    mean confidence and accuracy of the answers in it (NaN for empty bins)."""
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    bin_of = np.digitize(confidence, edges[1:-1], right=True)
    count = np.bincount(bin_of, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_confidence = np.bincount(bin_of, weights=confidence, minlength=n_bins) / count
        accuracy = np.bincount(bin_of, weights=correct.astype(float), minlength=n_bins) / count
    return xr.Dataset(
        {"bin_count": ("bin", count), "bin_confidence": ("bin", mean_confidence), "bin_accuracy": ("bin", accuracy)},
        coords={"bin": np.arange(n_bins), "bin_lower": ("bin", edges[:-1]), "bin_upper": ("bin", edges[1:])},
    )


def expected_calibration_error(bins: xr.Dataset) -> float:
    """ECE = sum over bins of (n_bin / N) * |accuracy_bin - mean confidence_bin| (Guo et al. 2017)."""
    weight = bins.bin_count / bins.bin_count.sum()
    return float((weight * abs(bins.bin_accuracy - bins.bin_confidence)).fillna(0.0).sum())


def output_confidence(model, spec: ModelSpec, statements: pd.DataFrame, batch_size: int,
                      progress: bool = False) -> xr.Dataset:
    """The model's next-token distribution after each statement's prompt (column `prompt`), summarised by
    `confidence_dataset`."""
    logits = last_position_logits(model, spec, statements["prompt"].tolist(), batch_size, progress)
    return confidence_dataset(statements, logits, *answer_token_ids(model.tokenizer))


def confidence_dataset(statements: pd.DataFrame, logits: torch.Tensor, true_id: int, false_id: int) -> xr.Dataset:
    """Per statement: label, entropy, p_true, confidence, correct; the reliability bins; the summary scalars."""
    labels = statements["label"].to_numpy()
    p_true = true_probability(logits, true_id, false_id).numpy()
    confidence, correct = answer_confidence(p_true, labels)
    entropy = next_token_entropy(logits).numpy()
    bins = reliability_bins(confidence, correct)
    per_statement = xr.Dataset(
        {"label": ("statement", labels), "entropy": ("statement", entropy), "p_true": ("statement", p_true),
         "confidence": ("statement", confidence), "correct": ("statement", correct)},
        coords={"statement": np.arange(len(labels)), "text": ("statement", statements["statement"].to_numpy())},
    )
    summary = {"accuracy": correct.mean(), "mean_confidence": confidence.mean(), "mean_entropy": entropy.mean(),
               "ece": expected_calibration_error(bins)}
    return xr.merge([per_statement, bins]).assign(summary).assign_attrs(
        true_token_id=true_id, false_token_id=false_id)


# ---------------------------------------------------------------------------------------------------------------
# Mean ablation of the entropy neurons (beyond the paper: Stolfo et al.'s causal check of what the neurons do)


def control_neurons(weights: xr.Dataset, seed: int) -> np.ndarray:
    """As many random neurons as were selected, from those above the norm threshold that were not selected (TL
    selection): the baseline an entropy-neuron ablation is compared with."""
    candidates = np.flatnonzero(weights.norm.values > float(weights.norm_threshold))
    pool = np.setdiff1d(candidates, weights.selected.sel(wu=PAPER_WU).values)
    return np.sort(np.random.default_rng(seed).choice(pool, size=weights.sizes["rank"], replace=False))


def mean_ablation(model, spec: ModelSpec, statements: pd.DataFrame, weights: xr.Dataset, clean: xr.Dataset,
                  batch_size: int, seed: int, progress: bool = False) -> xr.Dataset:
    """Per neuron group (the entropy neurons, a random control group): the next-token entropy and p_true per
    statement with the group's activations at the last position set to their mean over the dataset's prompts, and
    the mean change in entropy and answer confidence against the clean run (`clean`: the outputs unit)."""
    prompts = statements["prompt"].tolist()
    groups = {"entropy_neurons": weights.selected.sel(wu=PAPER_WU).values, "control": control_neurons(weights, seed)}
    prefixes = SharedPrefixes(model, prompts, batch_size=batch_size)  # the three passes share the prefix runs
    means = last_position_mlp_activations(model, spec, prompts, batch_size, prefixes).mean(dim=0)
    true_id, false_id = answer_token_ids(model.tokenizer)
    entropy, p_true = [], []
    for neurons in groups.values():
        index = torch.as_tensor(neurons)
        logits = last_position_logits(model, spec, prompts, batch_size, progress, (index, means[index]), prefixes)
        entropy.append(next_token_entropy(logits).numpy())
        p_true.append(true_probability(logits, true_id, false_id).numpy())
    entropy, p_true = np.stack(entropy), np.stack(p_true)
    confidence, _ = answer_confidence(p_true, statements["label"].to_numpy())
    return xr.Dataset(
        {"neurons": (("group", "rank"), np.stack(list(groups.values()))),
         "neuron_mean": (("group", "rank"), np.stack([means[torch.as_tensor(n)].numpy() for n in groups.values()])),
         "entropy": (("group", "statement"), entropy), "p_true": (("group", "statement"), p_true),
         "delta_entropy": ("group", (entropy - clean.entropy.values).mean(axis=1)),
         "delta_confidence": ("group", (confidence - clean.confidence.values).mean(axis=1))},
        coords={"group": list(groups), "rank": np.arange(weights.sizes["rank"]),
                "statement": np.arange(len(prompts))},
    )


# ---------------------------------------------------------------------------------------------------------------
# The experiment


def weights_unit(key: str) -> str:
    return f"weights__{key}"


def outputs_unit(key: str, dataset: str) -> str:
    return f"outputs__{key}__{dataset}"


def ablation_unit(key: str, dataset: str) -> str:
    return f"ablation__{key}__{dataset}"


def open_store(profile: Profile) -> CubeStore:
    """The profile's confidence cube, with this run's provenance merged into its attrs."""
    specs = [profile.model_spec(key) for key in profile.models(EXPERIMENT)]
    return CubeStore(results_dir(profile.name) / f"{EXPERIMENT}.zarr", provenance=provenance(
        profile, specs, dtype=profile.dtype, device=profile.device, seed=profile.seed, experiment=EXPERIMENT))


def run_model(store: CubeStore, profile: Profile, key: str, progress: bool = True) -> None:
    """One model's missing units: weights, then per dataset output confidence (and mean ablation)."""
    settings, spec, model = profile.experiment(EXPERIMENT), profile.model_spec(key), None
    batch_size = profile.batch_size_for(EXPERIMENT)
    if not store.has_unit(weights_unit(key)):
        started = now()
        model = load_model(spec, dtype=WEIGHTS_DTYPE, device=profile.device)
        store.write_unit(weights_unit(key), weight_analysis(
            model, spec, settings.top_norm_fraction, settings.n_neurons), started_at=started)
    todo = [unit for dataset in settings.datasets for unit in (
            [outputs_unit(key, dataset)] + ([ablation_unit(key, dataset)]
                                            if dataset in settings.ablation_datasets else []))
            if not store.has_unit(unit)]
    if todo and (model is None or profile.dtype != WEIGHTS_DTYPE):
        model = load_model(spec, dtype=profile.dtype, device=profile.device)
    for dataset in settings.datasets:
        statements = intervention_table(dataset, settings.max_statements)
        if outputs_unit(key, dataset) in todo:
            started = now()
            store.write_unit(outputs_unit(key, dataset), output_confidence(
                model, spec, statements, batch_size, progress).assign_attrs(model=key, dataset=dataset),
                started_at=started)
        if ablation_unit(key, dataset) in todo:
            started = now()
            store.write_unit(ablation_unit(key, dataset), mean_ablation(
                model, spec, statements, store.read_unit(weights_unit(key)),
                store.read_unit(outputs_unit(key, dataset)), batch_size, profile.seed, progress,
            ).assign_attrs(model=key, dataset=dataset), started_at=started)


def run(profile: Profile, *, progress: bool = True) -> Path:
    """Every model's units (`run_model`), then the pair comparisons."""
    settings = profile.experiment(EXPERIMENT)
    extra = sorted(set(settings.ablation_datasets) - set(settings.datasets))
    if extra:
        raise ValueError(f"profile {profile.name}: experiments.confidence.ablation_datasets {extra} are not in its "
                         f"datasets {list(settings.datasets)}; the ablation compares with their output units")
    store = open_store(profile)
    keys = profile.models(EXPERIMENT)
    for key in progress_bar(keys, desc=EXPERIMENT, enabled=progress):
        run_model(store, profile, key, progress)
    weights = {key: store.read_unit(weights_unit(key)) for key in keys}
    pairs = [(profile.model_spec(base), profile.model_spec(post)) for base, post in profile.pairs(EXPERIMENT)]
    store.write_unit("pairs", compare_pairs(weights, pairs))  # derived in milliseconds: always rewritten
    store.update_attrs(finished_at=now())
    return store.path
