"""Confidence, model side: the nnsight last-position forward against a direct Hugging Face forward, the
per-statement output-confidence unit, and `run` end to end (resumable) on tiny models."""
import dataclasses

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
import zarr

from data_prep.prompts import intervention_table
from replication.config import PROFILE_DIR, load_model_table, load_profile
from replication.cubes import COMPLETE_ATTR, open_cube
from replication.experiments import confidence as conf
from replication.models import load_model, position_ids_for

TABLE = load_model_table()
PROMPTS = ["The city of Tokyo is in Japan. This statement is:",
           "Paris.",
           "The Spanish word 'gato' means 'cat'. This statement is:",
           "Fifty is larger than seventy. This statement is:",
           "The cat is a mammal."]


@pytest.fixture(scope="module")
def tiny_llama():
    return load_model(TABLE["tiny-llama"], dtype="float32", device="cpu")


def test_nnsight_last_position_equals_direct_hf_forward(tiny_llama):
    got = conf.last_position_logits(tiny_llama, TABLE["tiny-llama"], PROMPTS, batch_size=2)
    hf, tokenizer = tiny_llama._module, tiny_llama.tokenizer
    with torch.no_grad():
        alone = torch.stack([hf(**tokenizer(p, return_tensors="pt")).logits[0, -1] for p in PROMPTS])
        batch = tokenizer(PROMPTS, return_tensors="pt", padding=True)
        batched = hf(**batch, position_ids=position_ids_for(batch.attention_mask)).logits[:, -1]
    assert batch.attention_mask.min() == 0  # the batch really is left-padded
    torch.testing.assert_close(got, batched, rtol=0, atol=1e-6)
    torch.testing.assert_close(got, alone, rtol=0, atol=1e-5)


def test_output_confidence_unit(tiny_llama):
    statements = pd.DataFrame({"statement": PROMPTS, "label": [1, 0, 1, 0, 1], "prompt": PROMPTS})
    ds = conf.output_confidence(tiny_llama, TABLE["tiny-llama"], statements, batch_size=3)
    hf, tokenizer = tiny_llama._module, tiny_llama.tokenizer
    true_id, false_id = tokenizer(" TRUE").input_ids[-1], tokenizer(" FALSE").input_ids[-1]
    assert tokenizer.decode([true_id]) == " TRUE" and tokenizer.decode([false_id]) == " FALSE"
    for i, prompt in enumerate(PROMPTS):
        with torch.no_grad():
            p = torch.softmax(hf(**tokenizer(prompt, return_tensors="pt")).logits[0, -1].double(), -1)
        assert ds.p_true.values[i] == pytest.approx(float(p[true_id] / (p[true_id] + p[false_id])), abs=1e-5)
        assert ds.entropy.values[i] == pytest.approx(float(-(p * p.log()).sum()), abs=1e-4)
    answers = (ds.p_true.values >= 0.5).astype(int)
    assert ds.correct.values.tolist() == (answers == statements.label.values).tolist()
    assert float(ds.accuracy) == pytest.approx(ds.correct.values.mean())
    assert float(ds.mean_entropy) == pytest.approx(ds.entropy.values.mean())
    assert int(ds.bin_count.sum()) == len(PROMPTS)
    assert float(ds.ece) == pytest.approx(conf.expected_calibration_error(
        conf.reliability_bins(ds.confidence.values, ds.correct.values)))
    assert ds.text.values.tolist() == PROMPTS


def hf_last_position(model, prompts, edit=None):
    """Direct HF forward of a left-padded batch; `edit(activations)` may change the last MLP's input in place."""
    hf, tokenizer = model._module, model.tokenizer
    captured = []

    def hook(module, args):
        activations = args[0].clone()
        if edit is not None:
            edit(activations)
        captured.append(activations[:, -1, :])
        return (activations,)

    handle = hf.model.layers[-1].mlp.down_proj.register_forward_pre_hook(hook)
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = hf(**batch, position_ids=position_ids_for(batch.attention_mask)).logits[:, -1]
    handle.remove()
    return logits, captured[0]


def test_neuron_activations_and_patched_forward_equal_hf_hooks(tiny_llama):
    spec = TABLE["tiny-llama"]
    neurons, values = torch.tensor([3, 40, 77]), torch.tensor([0.5, -1.0, 2.0])

    def set_neurons(activations):
        activations[:, -1, neurons] = values

    clean, activations = hf_last_position(tiny_llama, PROMPTS)
    patched, _ = hf_last_position(tiny_llama, PROMPTS, set_neurons)
    torch.testing.assert_close(conf.last_position_mlp_activations(tiny_llama, spec, PROMPTS, 2), activations,
                               rtol=0, atol=1e-6)
    got = conf.last_position_logits(tiny_llama, spec, PROMPTS, 2, neuron_values=(neurons, values))
    torch.testing.assert_close(got, patched, rtol=0, atol=1e-6)
    assert (got - clean).abs().max() > 1e-2  # the patch changed the output


def test_mean_ablation(tiny_llama):
    spec = TABLE["tiny-llama"]
    model_weights = conf.weight_analysis(tiny_llama, spec, 0.25, 5)
    control = conf.control_neurons(model_weights, seed=1)
    selected = model_weights.selected.sel(wu="tl").values
    assert len(control) == 5 and not set(control) & set(selected)
    assert (model_weights.norm.values[control] > float(model_weights.norm_threshold)).all()
    np.testing.assert_array_equal(control, conf.control_neurons(model_weights, seed=1))

    statements = pd.DataFrame({"statement": PROMPTS, "label": [1, 0, 1, 0, 1], "prompt": PROMPTS})
    clean = conf.output_confidence(tiny_llama, spec, statements, batch_size=2)
    ablated = conf.mean_ablation(tiny_llama, spec, statements, model_weights, clean, batch_size=2, seed=1)
    means = conf.last_position_mlp_activations(tiny_llama, spec, PROMPTS, 2).mean(0)
    for group, neurons in (("entropy_neurons", selected), ("control", control)):
        def to_means(activations, neurons=neurons):
            activations[:, -1, neurons] = means[neurons]
        logits, _ = hf_last_position(tiny_llama, PROMPTS, to_means)
        entropy = conf.next_token_entropy(logits).numpy()
        np.testing.assert_allclose(ablated.entropy.sel(group=group).values, entropy, atol=1e-5)
        np.testing.assert_allclose(float(ablated.delta_entropy.sel(group=group)),
                                   (entropy - clean.entropy.values).mean(), atol=1e-5)
        np.testing.assert_allclose(ablated.neuron_mean.sel(group=group).values, means[neurons].numpy(), atol=1e-6)
    # one statement: its own activations are the mean, so ablation changes nothing
    alone = conf.mean_ablation(tiny_llama, spec, statements.iloc[:1], model_weights,
                               conf.output_confidence(tiny_llama, spec, statements.iloc[:1], 2), 2, seed=1)
    np.testing.assert_allclose(alone.delta_entropy.values, 0.0, atol=1e-5)


def tiny_profile(tmp_path):
    """A two-model tiny profile: tiny-llama and a second random tiny Llama standing in for its post-trained
    version (no post-training needed)."""
    table = dict(TABLE)
    table["tiny-llama-other"] = dataclasses.replace(TABLE["tiny-llama"], key="tiny-llama-other", role="instruct",
                                                    seed=11)
    spec = yaml.safe_load((PROFILE_DIR / "tiny.yaml").read_text())
    spec["families"] = {"tiny": {"base": "tiny-llama", "post": ["tiny-llama-other"]}}
    spec["experiments"]["confidence"].update(datasets=["cities", "animal_class"], max_statements=6, n_neurons=5,
                                             ablation_datasets=["cities"])
    path = tmp_path / "tinytest.yaml"
    path.write_text(yaml.safe_dump(spec))
    return load_profile(path, model_table=table)


@pytest.mark.slow
def test_run_writes_a_resumable_cube(processed_data, tmp_path, monkeypatch):
    monkeypatch.setenv("PTR_RESULTS_DIR", str(tmp_path / "results"))
    profile = tiny_profile(tmp_path)
    path = conf.run(profile, progress=False)
    store = open_cube(path)
    expected_units = ["ablation__tiny-llama-other__cities", "ablation__tiny-llama__cities",
                      "outputs__tiny-llama-other__animal_class", "outputs__tiny-llama-other__cities",
                      "outputs__tiny-llama__animal_class", "outputs__tiny-llama__cities", "pairs",
                      "weights__tiny-llama", "weights__tiny-llama-other"]
    assert store.unit_names() == expected_units
    assert store.attrs["experiment"] == "confidence" and store.attrs["profile"] == "tinytest"

    base, post = store.read_unit("weights__tiny-llama"), store.read_unit("weights__tiny-llama-other")
    model = load_model(TABLE["tiny-llama"], dtype="float32", device="cpu")
    fresh = conf.weight_analysis(model, TABLE["tiny-llama"], 0.25, 5)
    np.testing.assert_array_equal(base.selected.values, fresh.selected.values)
    np.testing.assert_allclose(base.logit_var.values, fresh.logit_var.values, rtol=1e-6)
    pairs = store.read_unit("pairs")
    assert pairs.pair.values.tolist() == ["tiny-llama BASE vs INSTRUCT"]
    for wu in conf.WU_VARIANTS:
        a, b = base.selected.sel(wu=wu).values, post.selected.sel(wu=wu).values
        assert int(pairs.overlap.sel(wu=wu)[0]) == len(set(a) & set(b))

    outputs = store.read_unit("outputs__tiny-llama__cities")
    assert outputs.sizes["statement"] == 6 and outputs.attrs["dataset"] == "cities"
    expected = intervention_table("cities", 6)
    assert outputs.text.values.tolist() == expected.statement.tolist()
    assert outputs.label.values.tolist() == expected.label.tolist() and outputs.label.values.sum() == 3

    # A second run recomputes nothing; a unit without its completion marker is recomputed; ablation datasets must
    # have output units.
    finished = {name: store.read_unit(name).attrs["finished_at"] for name in expected_units if name != "pairs"}
    zarr.open_group(str(path), mode="a", path="units/outputs__tiny-llama__cities").attrs.put({COMPLETE_ATTR: False})
    conf.run(profile, progress=False)
    again = {name: store.read_unit(name).attrs["finished_at"] for name in finished}
    assert {n for n in finished if again[n] != finished[n]} <= {"outputs__tiny-llama__cities"}
    assert store.has_unit("outputs__tiny-llama__cities")
    np.testing.assert_array_equal(store.read_unit("outputs__tiny-llama__cities").p_true.values,
                                  outputs.p_true.values)
    confidence = dataclasses.replace(profile.experiments.confidence, ablation_datasets=("facts",))
    bad = dataclasses.replace(profile, experiments=dataclasses.replace(profile.experiments, confidence=confidence))
    with pytest.raises(ValueError, match=r"ablation_datasets \['facts'\] are not in its datasets"):
        conf.run(bad, progress=False)
