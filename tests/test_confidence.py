"""Confidence, weights side: TransformerLens-style W_U, LogitVar, entropy-neuron selection, pair comparisons and
calibration formulas, each against a slow obvious implementation or hand-computed values."""
import dataclasses

import numpy as np
import pandas as pd
import pytest
import torch
import xarray as xr

from replication.config import load_model_table
from replication.experiments import confidence as conf
from replication.models import tiny

TABLE = load_model_table()
ARCH_KEYS = {"llama": "tiny-llama", "mistral": "tiny-mistral", "gemma3": "tiny-gemma"}


def tiny_model(arch: str, seed: int = 0):
    """A tiny HF model and its table spec, with a random final-norm gain (the default init is all ones / zeros,
    which would hide a wrong gain convention)."""
    model = tiny.build_model(arch, seed)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        model.model.norm.weight.copy_(torch.randn(model.model.norm.weight.shape, generator=generator))
    return model, TABLE[ARCH_KEYS[arch]]


# ---------------------------------------------------------------------------------------------------------------
# W_U processing


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_tl_unembedding_equals_explicit_formula(arch):
    model, spec = tiny_model(arch)
    lm_head = model.lm_head.weight.detach().double().numpy()  # [vocab, d_model]
    weight = model.model.norm.weight.detach().double().numpy()
    n_vocab, d_model = lm_head.shape
    expected = np.empty((d_model, n_vocab))
    for d in range(d_model):
        folded = [lm_head[v, d] * (spec.norm_gain_offset + weight[d]) for v in range(n_vocab)]
        mean = sum(folded) / n_vocab
        expected[d] = [value - mean for value in folded]
    got = conf.unembedding(model, spec, "tl").double().numpy()
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(conf.unembedding(model, spec, "raw").numpy(), lm_head.T.astype(np.float32))


@pytest.mark.parametrize("arch", ["llama", "mistral", "gemma3"])
def test_tl_unembedding_gives_the_models_own_output_distribution(arch):
    """The model table's gain convention is right: unit-gain RMS-normalised x times the processed W_U gives the
    same next-token distribution as the model's final norm followed by lm_head (centring only shifts logits)."""
    model, spec = tiny_model(arch)
    x = torch.randn(5, model.config.hidden_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = model.lm_head(model.model.norm(x))
    unit_gain = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + model.config.rms_norm_eps)
    processed = unit_gain @ conf.unembedding(model, spec, "tl")
    torch.testing.assert_close(torch.log_softmax(processed, -1), torch.log_softmax(reference, -1),
                               rtol=0, atol=1e-5)
    assert not torch.allclose(processed, reference, atol=1e-3)  # centring shifted the logits themselves
    other_convention = dataclasses.replace(spec, architecture=dataclasses.replace(
        spec.architecture, norm_gain_offset=1.0 - spec.norm_gain_offset))
    wrong = unit_gain @ conf.unembedding(model, other_convention, "tl")
    assert not torch.allclose(torch.log_softmax(wrong, -1), torch.log_softmax(reference, -1), atol=1e-3)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_mlp_output_matrix_rows_are_what_neurons_write(arch):
    """activation @ W_out points where the last layer's MLP path writes into the residual stream: down_proj alone
    (Llama), or down_proj then the post-feedforward RMSNorm (Gemma3, given a random gain here)."""
    model, spec = tiny_model(arch)
    layer = model.model.layers[-1]
    activation = torch.randn(4, model.config.intermediate_size, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        write = layer.mlp.down_proj(activation)
        if arch == "gemma3":
            layer.post_feedforward_layernorm.weight.normal_(generator=torch.Generator().manual_seed(3))
            write = layer.post_feedforward_layernorm(write)
    W_out = conf.mlp_output_matrix(model, spec)
    assert W_out.shape == (model.config.intermediate_size, model.config.hidden_size)
    cosine = torch.nn.functional.cosine_similarity(activation @ W_out, write, dim=-1)
    torch.testing.assert_close(cosine, torch.ones(4), rtol=0, atol=1e-5)
    if arch == "llama":
        torch.testing.assert_close(activation @ W_out, write)
    else:
        plain = activation @ layer.mlp.down_proj.weight.T
        assert torch.nn.functional.cosine_similarity(plain, write, dim=-1).max() < 0.99  # the gain matters


# ---------------------------------------------------------------------------------------------------------------
# LogitVar and selection


def slow_logit_var(W_out: np.ndarray, W_U: np.ndarray) -> np.ndarray:
    """One neuron at a time: the cosine with every unembedding column, then its unbiased variance."""
    column_norms = np.array([np.linalg.norm(W_U[:, v]) for v in range(W_U.shape[1])])
    out = []
    for w in W_out:
        cosines = (w @ W_U) / (np.linalg.norm(w) * column_norms)
        out.append(np.var(cosines, ddof=1))
    return np.array(out)


def original_selection(norm: np.ndarray, logit_var: np.ndarray, top_fraction: float, n: int) -> list[int]:
    """The original Confidence/IoU.py filter_neurons, in pandas."""
    df = pd.DataFrame({"norm": norm, "cos_var": logit_var})
    top = df[df["norm"] > df["norm"].quantile(1 - top_fraction)]
    return top.nsmallest(n, "cos_var").index.tolist()


@pytest.mark.parametrize("variant", conf.WU_VARIANTS)
@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_logit_var_and_selection_equal_slow_loop_and_original(arch, variant):
    model, spec = tiny_model(arch, seed=3)
    W_out = conf.mlp_output_matrix(model, spec).double()
    W_U = conf.unembedding(model, spec, variant).double()
    got = conf.logit_var(W_out, W_U, chunk_neurons=37)  # chunks that do not divide d_mlp
    expected = slow_logit_var(W_out.numpy(), W_U.numpy())
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-10)
    norm = conf.neuron_norms(W_out)
    np.testing.assert_allclose(norm.numpy(), [np.linalg.norm(w) for w in W_out.numpy()], rtol=1e-12)
    selected = conf.select_entropy_neurons(norm, got, 0.25, 10).tolist()
    assert selected == original_selection(norm.numpy(), expected, 0.25, 10)
    assert len(selected) == 10


def originals_logit_var(W_out: torch.Tensor, W_U: torch.Tensor) -> torch.Tensor:
    """IoU.py's expression (its names: last_layer_neurons, unemb): Python evaluates it left to right, as
    ((W / |W|) @ W_U) / |W_U|."""
    normalized_composition = W_out / W_out.norm(dim=1).unsqueeze(1) @ W_U / W_U.norm(dim=0)
    return normalized_composition.var(dim=1)


def unit_columns_first_logit_var(W_out: torch.Tensor, W_U: torch.Tensor) -> torch.Tensor:
    """The other order, (W / |W|) @ (W_U / |W_U|): the same number in exact arithmetic, other float32 bits."""
    return (W_out / W_out.norm(dim=1, keepdim=True) @ (W_U / W_U.norm(dim=0, keepdim=True))).var(dim=1)


def test_float32_near_tie_at_rank_10_falls_the_originals_way():
    """Eleven high-norm neurons whose 10th and 11th LogitVars are closer than float32 rounding: the two orders of
    normalisation select different 10th neurons, and the project selects the original's."""
    generator = torch.Generator().manual_seed(0)
    d_model, d_vocab = 64, 400
    W_U = torch.randn(d_model, d_vocab, generator=generator)
    # a family of nearly parallel neurons: LogitVars equal to about 1e-7 relative, where rounding decides order
    family = 10 * (torch.randn(d_model, generator=generator)
                   + 1e-3 * torch.randn(600, d_model, generator=generator))
    original_values, other_values = originals_logit_var(family, W_U), unit_columns_first_logit_var(family, W_U)
    by_original = torch.argsort(original_values, stable=True).tolist()
    by_other = torch.argsort(other_values, stable=True).tolist()

    def strictly_swapped(a, b):  # strict in both orders: the rows' positions (stable ties) cannot decide
        return bool(original_values[a] < original_values[b] and other_values[a] > other_values[b])

    # the first rank p where the orders swap two neighbours after agreeing on the set of everything before them
    p = next(p for p in range(9, len(family) - 1) if set(by_original[:p]) == set(by_other[:p])
             and by_original[p:p + 2] == by_other[p:p + 2][::-1] and strictly_swapped(*by_original[p:p + 2]))
    high = by_original[p - 9:p + 2]  # nine neurons clearly before the tie, then the tied two
    low_norm = torch.randn(33, d_model, generator=generator)  # norm about 8 < 10: outside the top 25% of 44
    W_out = torch.cat([family[high], low_norm])
    assert W_out.dtype == torch.float32
    norm = conf.neuron_norms(W_out)

    got = conf.select_entropy_neurons(norm, conf.logit_var(W_out, W_U), 0.25, 10).tolist()
    original = original_selection(norm.numpy(), originals_logit_var(W_out, W_U).numpy(), 0.25, 10)
    other = original_selection(norm.numpy(), unit_columns_first_logit_var(W_out, W_U).numpy(), 0.25, 10)
    assert sorted(original[:9]) == sorted(other[:9]) == list(range(9))
    assert (original[9], other[9]) == (9, 10)  # the near-tie: the orders disagree at rank 10 ...
    assert got == original  # ... and the project falls the original's way
    # bit for bit, also where blocks of 256 neurons (a multiple of the BLAS tile) make up the 600
    torch.testing.assert_close(conf.logit_var(family, W_U), original_values, rtol=0, atol=0)


def test_selection_is_strictly_above_the_quantile_and_orders_by_logit_var():
    norm = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0])  # 0.5 quantile = 5 exactly
    logit_var = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.1, 0.5, 0.3, 0.4, 0.3])
    # neuron 4 (norm 5 = threshold) is out; among 5..8 the two smallest LogitVar are 6 and 8 (tie: lower index)
    assert conf.select_entropy_neurons(norm, logit_var, 0.5, 2).tolist() == [6, 8]
    assert conf.select_entropy_neurons(norm, logit_var, 0.5, 10).tolist() == [6, 8, 7, 5]
    # interpolated quantile: 0.75 of 9 values sits at position 6 -> 7.0; only norms 8 and 9 pass
    assert conf.select_entropy_neurons(norm, logit_var, 0.25, 10).tolist() == [8, 7]


def test_norm_log_var_ratio_is_the_originals_formula():
    norm = torch.tensor([2.0, 3.0, 1.0], dtype=torch.float64)
    logit_var = torch.tensor([1e-4, 0.5, 0.0], dtype=torch.float64)
    expected = [2.0 / np.log(1e-4), 3.0 / np.log(0.5), 1.0 / np.log(1e-10)]  # LogitVar floored at 1e-10
    np.testing.assert_allclose(conf.norm_log_var_ratio(norm, logit_var).numpy(), expected, rtol=1e-12)


def test_norm_log_var_ratio_of_float32_columns_equals_the_originals_row_apply():
    """IoU.py builds the ratio with pandas apply(axis=1) on float32 columns and an int64 index column: each row
    is float64, so the ratio is float64 arithmetic on float32 values (float32 arithmetic differs by ~1e-9)."""
    generator = torch.Generator().manual_seed(0)
    norm = torch.rand(50, generator=generator) + 0.5
    logit_var = torch.rand(50, generator=generator) * 1e-3
    df = pd.DataFrame({"norm": norm, "cos_var": logit_var})
    df["neuron_index"] = df.index
    expected = df.apply(lambda row: float(row["norm"] / np.log(max(1e-10, row["cos_var"]))), axis=1).to_numpy()
    got = conf.norm_log_var_ratio(norm, logit_var).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-15)  # to the last bit or two of torch's and numpy's log
    in_float32 = (norm / torch.log(logit_var)).double().numpy()
    assert np.abs(in_float32 / expected - 1).max() > 1e-9  # float32 arithmetic would not match


def test_weight_analysis_dataset():
    model, spec = tiny_model("gemma3", seed=5)
    ds = conf.weight_analysis(model, spec, 0.25, 10)
    assert ds.norm.shape == (model.config.intermediate_size,) and ds.selected.shape == (2, 10)
    for variant in conf.WU_VARIANTS:
        row = ds.sel(wu=variant)
        expected = conf.select_entropy_neurons(torch.from_numpy(ds.norm.values), torch.from_numpy(
            row.logit_var.values), 0.25, 10).tolist()
        assert row.selected.values.tolist() == expected
        assert (ds.norm.values[expected] > float(ds.norm_threshold)).all()
        np.testing.assert_allclose(row.ratio.values, ds.norm.values / np.log(row.logit_var.values), rtol=1e-6)
    tl, raw = (set(ds.selected.sel(wu=v).values.tolist()) for v in conf.WU_VARIANTS)
    assert int(ds.variant_overlap) == len(tl & raw)
    assert ds.attrs["d_vocab"] == model.config.vocab_size


# ---------------------------------------------------------------------------------------------------------------
# Comparing selections


def test_overlap_iou_and_ratio_difference_on_hand_made_sets():
    a, b = [1, 2, 3, 4], [3, 4, 5]
    assert conf.overlap_count(a, b) == 2
    assert conf.iou(a, b) == pytest.approx(2 / 5)
    assert conf.iou([], []) == 0.0 and conf.iou([1], [2]) == 0.0 and conf.iou([7, 8], [8, 7]) == 1.0
    ratio_a, ratio_b = np.arange(6) * 1.0, np.arange(6) * 1.5
    # shared neurons 3 and 4: |3 - 4.5| = 1.5, |4 - 6| = 2
    assert conf.mean_abs_ratio_difference(a, b, ratio_a, ratio_b) == pytest.approx(1.75)
    assert np.isnan(conf.mean_abs_ratio_difference([0], [1], ratio_a, ratio_b))


def test_compare_pairs_labels_and_values():
    def weights(selected_tl, selected_raw, ratio):
        return xr.Dataset({"selected": (("wu", "rank"), [selected_tl, selected_raw]),
                           "ratio": (("wu", "neuron"), [ratio, ratio])}, coords={"wu": list(conf.WU_VARIANTS)})
    ratio = np.linspace(-1, 0, 8)
    cube = {"tiny-llama": weights([0, 1, 2], [0, 1, 2], ratio),
            "tiny-llama-sft": weights([2, 1, 5], [3, 4, 5], ratio + 0.25)}
    pairs = conf.compare_pairs(cube, [(TABLE["tiny-llama"], TABLE["tiny-llama-sft"])])
    label = "tiny-llama BASE vs SFT"
    assert pairs.pair.values.tolist() == [label]
    assert pairs.overlap.sel(pair=label).values.tolist() == [2, 0]
    assert pairs.iou.sel(pair=label, wu="tl") == pytest.approx(2 / 4)
    assert pairs.mean_abs_ratio_difference.sel(pair=label, wu="tl") == pytest.approx(0.25)
    assert np.isnan(pairs.mean_abs_ratio_difference.sel(pair=label, wu="raw"))
    assert conf.pair_label(TABLE["llama-2-7b"], TABLE["llama-2-7b-chat"]) == "llama-2-7b BASE vs INSTRUCT"


# ---------------------------------------------------------------------------------------------------------------
# Output-confidence formulas


def test_true_probability_and_entropy_equal_explicit_softmax():
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 3
    p = torch.softmax(logits, -1)
    np.testing.assert_allclose(conf.true_probability(logits, 7, 11).numpy(),
                               (p[:, 7] / (p[:, 7] + p[:, 11])).numpy(), rtol=1e-12)
    expected = [-sum(float(q) * np.log(float(q)) for q in row) for row in p]
    np.testing.assert_allclose(conf.next_token_entropy(logits).numpy(), expected, rtol=1e-10)
    assert conf.next_token_entropy(torch.zeros(1, 8)).item() == pytest.approx(np.log(8))


def test_answer_confidence():
    confidence, correct = conf.answer_confidence(np.array([0.9, 0.2, 0.5, 0.4]), np.array([1, 1, 1, 0]))
    np.testing.assert_allclose(confidence, [0.9, 0.8, 0.5, 0.6])
    assert correct.tolist() == [True, False, True, True]  # p = 0.5 answers TRUE


def test_reliability_bins_and_ece_hand_computed():
    confidence = np.array([0.55, 0.58, 0.62, 0.95, 0.99, 0.7])
    correct = np.array([True, False, True, True, True, False])
    bins = conf.reliability_bins(confidence, correct)
    assert bins.bin_count.values.tolist() == [0, 0, 0, 0, 0, 2, 2, 0, 0, 2]  # 0.7 falls in (0.6, 0.7]
    np.testing.assert_allclose(bins.bin_confidence.values[[5, 6, 9]], [0.565, 0.66, 0.97])
    np.testing.assert_allclose(bins.bin_accuracy.values[[5, 6, 9]], [0.5, 0.5, 1.0])
    assert np.isnan(bins.bin_accuracy.values[0])
    # ECE = 2/6 |0.5 - 0.565| + 2/6 |0.5 - 0.66| + 2/6 |1 - 0.97| = (0.065 + 0.16 + 0.03) / 3
    assert conf.expected_calibration_error(bins) == pytest.approx(0.255 / 3)
    np.testing.assert_allclose(bins.bin_lower.values, np.arange(10) / 10)
    perfect = conf.reliability_bins(np.array([1.0, 1.0, 0.0]), np.array([True, True, False]))
    assert conf.expected_calibration_error(perfect) == 0.0 and perfect.bin_count.values[[0, 9]].tolist() == [1, 2]
