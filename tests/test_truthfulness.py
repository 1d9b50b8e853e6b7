"""Truthfulness methods: batched nnsight reads and edits against plain Hugging Face forwards (one prompt at a time,
output_hidden_states / forward hooks), the IE formula against the authors' shipped numbers, probes, centring,
splits, PCA and the edit positions."""
import json

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.decomposition import PCA

from data_prep.prompts import SUFFIX
from replication.config import load_model_table
from replication.experiments import truthfulness as tr
from replication.mechanics import forward
from replication.models import load_model, position_ids_for

TABLE = load_model_table()
STATEMENTS = ["The city of Tokyo is in Japan.", "The cat is a mammal.", "Gold has the symbol Au.",
              "The Spanish word 'gato' means 'cat'.", "Fifty is larger than seventy.", "Paris.",
              "Thomas Edison invented the light bulb.", "The eagle is a bird."]
FEW_SHOT = ("The city of Paris is in France. This statement is: TRUE\n"
            "The city of Rome is in Spain. This statement is: FALSE\n")
PROMPTS = [FEW_SHOT + s + SUFFIX for s in STATEMENTS]
SHIPPED = "label_change_intervention_results.json"


@pytest.fixture(scope="module", params=["tiny-llama", "tiny-gemma"])
def tiny(request):
    model = load_model(TABLE[request.param], dtype="float32", device="cpu")
    return model, list(model.model.layers)


def hf_alone(model, text, hooks=()):
    """Logits and hidden states of `text` alone (no padding) through the plain Hugging Face model."""
    hf = model._module
    handles = [hf.model.layers[index].register_forward_hook(hook) for index, hook in hooks]
    try:
        with torch.no_grad():
            return hf(**model.tokenizer(text, return_tensors="pt"), output_hidden_states=True)
    finally:
        for handle in handles:
            handle.remove()


def test_batched_activations_equal_hidden_states_of_each_statement_alone(tiny):
    model, layers = tiny
    acts = tr.last_token_activations(model, layers, STATEMENTS, batch_size=3)
    assert model.tokenizer(STATEMENTS[:3], padding=True, return_tensors="pt").attention_mask.min() == 0
    assert acts.shape == (len(STATEMENTS), len(layers), model._module.config.hidden_size)
    last_layer_outputs = {}
    hook = (len(layers) - 1, lambda module, args, output: last_layer_outputs.update(value=output[0, -1]))
    for i, statement in enumerate(STATEMENTS):
        hidden_states = hf_alone(model, statement, hooks=[hook]).hidden_states
        for layer in range(len(layers) - 1):  # layer l = hidden_states[l + 1]
            torch.testing.assert_close(acts[i, layer], hidden_states[layer + 1][0, -1], rtol=0, atol=2e-5)
        # HF's last hidden_states entry is after the final norm; the decoder layer's own output is not
        torch.testing.assert_close(acts[i, -1], last_layer_outputs["value"], rtol=0, atol=2e-5)
        assert not torch.allclose(acts[i, -1], hidden_states[-1][0, -1], atol=1e-3)


def test_batched_activations_equal_one_padded_hf_forward(tiny):
    model, layers = tiny
    acts = tr.last_token_activations(model, layers, STATEMENTS, batch_size=len(STATEMENTS))
    batch = model.tokenizer(STATEMENTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden_states = model._module(**batch, position_ids=position_ids_for(batch.attention_mask),
                                      output_hidden_states=True).hidden_states
    for layer in range(len(layers) - 1):
        torch.testing.assert_close(acts[:, layer], hidden_states[layer + 1][:, -1], rtol=0, atol=1e-5)


def test_edit_positions_are_the_statement_end_and_the_token_before(tiny):
    model, _ = tiny
    tokenizer = model.tokenizer
    for prompt, statement in zip(PROMPTS, STATEMENTS):
        ids = tokenizer(prompt).input_ids
        n_statement = len(tokenizer(FEW_SHOT + statement).input_ids)  # tokens up to and including the final '.'
        last, before = forward.statement_end_positions(tokenizer)
        assert len(ids) + last == n_statement - 1 and len(ids) + before == n_statement - 2
        assert tokenizer.decode(ids[last]).endswith(".")


def test_edit_positions_equal_the_originals_len_suffix_for_llama3(llama3_encode):
    class Llama3Tokenizer:  # tiktoken Llama-3 ids plus BOS, as the original's tokenizer.encode
        def encode(self, text, add_special_tokens=True):
            return [128000] * add_special_tokens + llama3_encode(text)

    tokenizer = Llama3Tokenizer()
    len_suffix = len(tokenizer.encode("This statement is:"))
    assert len_suffix == 5  # methods_reference §1.4
    assert forward.statement_end_positions(tokenizer) == (-len_suffix, -len_suffix - 1)


def test_intervention_equals_plain_forward_hooks(tiny):
    model, layers = tiny
    tokenizer = model.tokenizer
    true_id, false_id = forward.answer_token_ids(tokenizer)
    assert tokenizer.decode([true_id]) == " TRUE" and tokenizer.decode([false_id]) == " FALSE"
    generator = torch.Generator().manual_seed(0)
    hidden_size = model._module.config.hidden_size
    shifts = torch.randn(len(PROMPTS), hidden_size, generator=generator) * 10
    edit_layers = [1, 2]
    got = tr.true_false_probabilities(model, layers, PROMPTS, batch_size=3, edit_layers=edit_layers, shifts=shifts)
    baseline = tr.true_false_probabilities(model, layers, PROMPTS, batch_size=3)
    for i, (prompt, statement) in enumerate(zip(PROMPTS, STATEMENTS)):
        end = len(tokenizer(FEW_SHOT + statement).input_ids) - 1  # absolute index of the statement's last token

        def add_shift(module, args, output, i=i, end=end):
            output = output.clone()
            output[:, end - 1:end + 1] += shifts[i]
            return output

        for shift_layers, result in ((edit_layers, got), ((), baseline)):
            logits = hf_alone(model, prompt, hooks=[(layer, add_shift) for layer in shift_layers]).logits
            expected = torch.softmax(logits[0, -1], dim=-1)[[true_id, false_id]]
            torch.testing.assert_close(result[i], expected, rtol=1e-4, atol=0)
    # the edit moves every prompt's answer probabilities (of a random tiny model: all near 1/vocabulary) by 10x
    # the tolerance above
    assert ((got - baseline) / baseline).abs().amax(dim=1).min() > 1e-3


def test_prompt_without_the_suffix_is_refused(tiny):
    model, layers = tiny
    with pytest.raises(ValueError, match="does not end in the tokens"):
        tr.true_false_probabilities(model, layers, STATEMENTS[:2], batch_size=2)


def test_intervention_effect_reproduces_the_authors_shipped_numbers(mirror):
    shipped = json.loads((mirror / "paper_artifacts" / SHIPPED).read_text())[0]
    before = {"m1": (shipped["p_diff_m1_true_base"], shipped["p_diff_m1_false_base"]),
              "m2": (shipped["p_diff_m2_true_base"], shipped["p_diff_m2_false_base"])}
    for direction in ("m1", "m2"):
        for model in ("m1", "m2"):
            true_before, false_before = before[model]
            name = f"{direction}_{model}"
            # the 'after' means, solved from the shipped effects: after = before + IE * (target - before)
            true_after = true_before + shipped[f"nif_{name}_true_false"] * (-1 - true_before)
            false_after = false_before + shipped[f"nif_{name}_false_true"] * (1 - false_before)
            for value in (true_after, false_after):  # means of bf16 values: multiples of 2^-8
                assert value * 256 == pytest.approx(round(value * 256), abs=1e-9)
            assert tr.intervention_effect(true_before, true_after, -1.0) == pytest.approx(
                shipped[f"nif_{name}_true_false"], abs=1e-12)
            assert tr.intervention_effect(false_before, false_after, 1.0) == pytest.approx(
                shipped[f"nif_{name}_false_true"], abs=1e-12)
            assert tr.average_intervention_effect(true_before, true_after, false_before, false_after) == \
                pytest.approx(shipped[f"avg_nif_{name}"], abs=1e-12)
    # base direction on the base model, by hand: true statements 0.9453125 -> -0.90625 of a possible -1.9453125
    assert tr.intervention_effect(0.9453125, -0.90625, -1.0) == pytest.approx(0.9518072289156626, abs=1e-15)


def test_leave_one_out_trains_cities_on_exactly_the_original_five():
    datasets = ["cities", "sp_en_trans", "inventors", "animal_class", "element_symb", "facts"]
    splits = dict(tr.leave_one_out(datasets))
    assert set(splits["cities"]) == {"sp_en_trans", "animal_class", "inventors", "element_symb", "facts"}
    assert list(splits) == datasets
    for test, train in splits.items():
        assert len(train) == 5 and test not in train


def synthetic_acts(seed, n, offset, hidden=16):
    """Statements of one dataset: truth signal +-1 along axis 0, noise, and a dataset offset along axis 0."""
    generator = torch.Generator().manual_seed(seed)
    labels = np.array([1, 0] * (n // 2))
    acts = 0.3 * torch.randn(n, 3, hidden, generator=generator)
    acts[:, :, 0] += torch.as_tensor(2.0 * labels - 1)[:, None] + offset
    return acts, labels


def test_activations_unit_centres_each_dataset_before_training(monkeypatch):
    data = {"a": synthetic_acts(0, 40, 10.0), "b": synthetic_acts(1, 40, -10.0), "c": synthetic_acts(2, 40, 4.0)}
    tables = {name: pd.DataFrame({"statement": [f"{name}{i}" for i in range(40)], "label": labels})
              for name, (_, labels) in data.items()}
    monkeypatch.setattr(tr, "last_token_activations",
                        lambda model, layers, statements, **kw: data[statements[0][0]][0])
    unit = tr.activations_unit(None, None, tables, ["a", "b", "c"], probe_layer=1, batch_size=4)
    for name, (acts, labels) in data.items():
        centred = acts - acts.mean(dim=0)
        got, got_labels = tr.probe_data(unit, [name])
        torch.testing.assert_close(got, centred[:, 1])
        assert got_labels.tolist() == labels.tolist()
        np.testing.assert_allclose(unit["class_mean"].sel(dataset=name, truth="true").values,
                                   centred[labels == 1].mean(dim=0).numpy(), atol=1e-6)
        np.testing.assert_allclose(unit["direction"].sel(dataset=name).values,
                                   (acts[labels == 1].mean(0) - acts[labels == 0].mean(0)).numpy(), atol=1e-5)
    assert unit["n_statements"].sel(dataset="a").values.tolist() == [20, 20]
    # Trained on centred a + b, the probe separates c; on the raw activations the offsets swamp the signal.
    probe = tr.fit_mm_probe(*tr.probe_data(unit, ["a", "b"]))
    assert tr.probe_accuracy(probe, *tr.probe_data(unit, ["c"])) == 1.0
    raw_probe = tr.fit_mm_probe(torch.cat([data["a"][0][:, 1], data["b"][0][:, 1]]),
                                np.concatenate([data["a"][1], data["b"][1]]))
    assert tr.probe_accuracy(raw_probe, data["c"][0][:, 1], data["c"][1]) == 0.5


def test_mm_probe_is_difference_in_means_and_a_1d_threshold():
    acts, labels = synthetic_acts(3, 50, 0.0)
    acts = acts[:, 0]
    probe = tr.fit_mm_probe(acts, labels)
    torch.testing.assert_close(probe.direction, acts[labels == 1].mean(0) - acts[labels == 0].mean(0))
    scores = (acts @ probe.direction).numpy()
    threshold = -probe.classifier.intercept_[0] / probe.classifier.coef_[0, 0]
    assert probe.classifier.coef_[0, 0] > 0
    assert probe.predict(acts).tolist() == (scores > threshold).astype(int).tolist()
    flipped = tr.fit_mm_probe(acts, 1 - labels)  # the LR learns the sign
    assert tr.probe_accuracy(flipped, acts, 1 - labels) == tr.probe_accuracy(probe, acts, labels) > 0.95


def test_intervention_direction_is_the_mean_difference():
    acts, labels = synthetic_acts(4, 30, 0.0)
    direction = tr.intervention_direction(acts[:, 0], labels)
    torch.testing.assert_close(direction, acts[labels == 1, 0].mean(0) - acts[labels == 0, 0].mean(0))


def test_cosine_similarity():
    a = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    b = torch.tensor([[0.0, 2.0], [-3.0, -3.0]])
    torch.testing.assert_close(tr.cosine_similarity(a, b), torch.tensor([0.0, -1.0]))


def test_pca_projection_matches_sklearn_up_to_sign():
    acts, _ = synthetic_acts(5, 60, 0.0)
    acts = acts[:, 0]
    directions = torch.randn(2, acts.shape[1], generator=torch.Generator().manual_seed(1))
    coords, direction_coords, explained = tr.pca_projection(acts, directions)
    reference = PCA(n_components=2).fit(acts.numpy())
    units = directions / directions.norm(dim=1, keepdim=True)
    signs = np.sign(units[0].numpy() @ reference.components_.T)
    np.testing.assert_allclose(coords.numpy(), reference.transform(acts.numpy()) * signs, atol=1e-4)
    np.testing.assert_allclose(explained.numpy(), reference.explained_variance_ratio_, atol=1e-5)
    np.testing.assert_allclose(direction_coords.numpy(), units.numpy() @ reference.components_.T * signs, atol=1e-5)
    assert (direction_coords[0] > 0).all()


def test_balanced_head_keeps_file_order_and_both_classes():
    table = pd.DataFrame({"statement": list("abcdefgh"), "label": [0, 0, 0, 1, 0, 1, 1, 1]})
    assert tr.balanced_head(table, 4)["statement"].tolist() == ["a", "b", "d", "f"]
    assert tr.balanced_head(table, 3)["statement"].tolist() == ["a", "d", "f"]
    assert tr.balanced_head(table, None)["statement"].tolist() == list("abcdefgh")


def test_family_layers_must_agree():
    assert tr.family_layers([TABLE["llama-3.1-8b"], TABLE["llama-3.1-8b-instruct"]]) == (8, 12)
    with pytest.raises(ValueError, match="one shared intervene_layer and probe_layer"):
        tr.family_layers([TABLE["llama-3.1-8b"], TABLE["mistral-7b"]])


def test_bfloat16_model_reads_and_edits_in_its_dtype():
    """The paper runs in bf16: the reads come back as float32 and the edit is added to bf16 states; results agree
    with the float32 model to bf16 precision."""
    models = {dtype: load_model(TABLE["tiny-llama"], dtype=dtype, device="cpu") for dtype in ("float32", "bfloat16")}
    shifts = torch.randn(len(PROMPTS), 64, generator=torch.Generator().manual_seed(2)) * 10
    results = {}
    for dtype, model in models.items():
        layers = list(model.model.layers)
        acts = tr.last_token_activations(model, layers, STATEMENTS, batch_size=3)
        probabilities = tr.true_false_probabilities(model, layers, PROMPTS, batch_size=3, edit_layers=[1, 2],
                                                    shifts=shifts)
        assert acts.dtype == probabilities.dtype == torch.float32
        results[dtype] = acts, probabilities
    (acts32, p32), (acts16, p16) = results["float32"], results["bfloat16"]
    torch.testing.assert_close(acts16, acts32, rtol=0.05, atol=0.05)
    torch.testing.assert_close(p16, p32, rtol=0.05, atol=0)
