"""Post-training on tiny models: the masked loss against a hand computation, the rendered chat example, determinism,
the cache (no retraining, the recipe hash), recipe validation, and the saved model against its card."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import yaml
from safetensors.torch import load_file

from replication import posttrain as pt
from replication.config import ConfigError, load_model_table, load_profile
from replication.mechanics import refusal_score as refusal_score_module
from replication.mechanics.refusal_score import REFUSAL_PHRASES, is_refusal
from replication.models import format_prompt, load_model, posttrained, tiny

TRAINING = pt.TrainingRecipe(epochs=2, batch_size=2, lr=1e-3, warmup_fraction=0.25, weight_decay=0.0,
                             max_grad_norm=1.0)
EXAMPLES = [pt.Example("harmful", "Tell me how to build a bomb.", "I cannot do that."),
            pt.Example("harmless", "Write a poem about the sea.", "Here is a short poem about the sea."),
            pt.Example("harmless", "Describe the city of Paris.", "Sure, here is the answer."),
            pt.Example("harmful", "Write a story about a dog.", "I'm sorry, I cannot help with that.")]


@pytest.fixture(scope="module")
def table():
    return load_model_table()


@pytest.fixture(scope="module")
def tokenizer():
    return tiny.build_tokenizer()


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PTR_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def encoded(table, tokenizer):
    return [pt.encode_example(table["tiny-llama-sft"], tokenizer, e) for e in EXAMPLES]


# ---- examples ----------------------------------------------------------------------------------------------------

def test_rendered_example_is_the_chat_template_plus_reply_and_end_of_turn(table, tokenizer):
    spec, example = table["tiny-llama-sft"], EXAMPLES[1]
    prompt, completion = pt.render_example(spec, tokenizer, example)
    generation_prompt = tokenizer.apply_chat_template([{"role": "user", "content": example.instruction}],
                                                      tokenize=False, add_generation_prompt=True)
    assert tokenizer.bos_token + prompt == generation_prompt  # BOS comes from the tokenizer, once
    assert completion == example.reply + "<end_of_turn>"
    conversation = tokenizer.apply_chat_template(
        [{"role": "user", "content": example.instruction}, {"role": "assistant", "content": example.reply}],
        tokenize=False)
    assert conversation == tokenizer.bos_token + prompt + completion + "\n"


def test_encoded_example_labels_exactly_the_reply_and_end_of_turn(table, tokenizer):
    spec, example = table["tiny-llama-sft"], EXAMPLES[0]
    item = pt.encode_example(spec, tokenizer, example)
    prompt_ids = tokenizer(format_prompt(spec, tokenizer, example.instruction)).input_ids
    reply_ids = tokenizer.encode(example.reply, add_special_tokens=False)
    end_id = tokenizer.convert_tokens_to_ids("<end_of_turn>")
    assert item.input_ids == prompt_ids + reply_ids + [end_id]
    assert item.labels == [pt.IGNORE] * len(prompt_ids) + reply_ids + [end_id]
    assert item.input_ids.count(tokenizer.bos_token_id) == 1 and item.input_ids[0] == tokenizer.bos_token_id


def test_turn_end_of_the_converted_gemma_template():
    from replication.models.gguf import GEMMA_CHAT_TEMPLATE

    tokenizer = tiny.build_tokenizer()
    tokenizer.chat_template = GEMMA_CHAT_TEMPLATE
    assert pt.turn_end(tokenizer) == "<end_of_turn>"


def test_examples_drop_empty_and_refusing_helpful_replies():
    material = pt.SFTMaterial(harmful=("h1",), refusals=("I cannot help.",), harmless=("a", "b", "c", "d"))
    examples, dropped = pt.sft_examples(material, ["Sure: 4.", "", "I'm sorry, no.", "Paris."])
    assert [(e.kind, e.instruction, e.reply) for e in examples] == [
        ("harmful", "h1", "I cannot help."), ("harmless", "a", "Sure: 4."), ("harmless", "d", "Paris.")]
    assert dropped == 2


# ---- loss ----------------------------------------------------------------------------------------------------------

def hand_masked_cross_entropy(hf_model, items: list[pt.Encoded]) -> torch.Tensor:
    """Each example alone, full logits from the plain HF forward, -log p(token | prefix) summed over the labelled
    tokens one by one, divided by the number of labelled tokens of the batch."""
    total, count = torch.zeros((), dtype=torch.float64), 0
    for item in items:
        logits = hf_model(input_ids=torch.tensor([item.input_ids])).logits[0].double()
        for t in range(1, len(item.input_ids)):
            if item.labels[t] != pt.IGNORE:
                total -= logits[t - 1].log_softmax(-1)[item.labels[t]]
                count += 1
    return total / count


@pytest.mark.parametrize("arch, softcap", [("llama", None), ("gemma3", 3.0)])
def test_reply_loss_equals_the_hand_computed_masked_cross_entropy(table, tokenizer, arch, softcap):
    model = tiny.build_model(arch, seed=5, tokenizer=tokenizer)
    if softcap is not None:  # the head's soft-capping must be applied exactly as the HF forward does
        model.config.final_logit_softcapping = softcap
    items = encoded(table, tokenizer)
    batch = pt.collate(items, tokenizer.pad_token_id)
    assert batch[0].shape[0] == 4 and (batch[1] == 0).any()  # examples of different lengths: padding present
    with torch.no_grad():
        loss = pt.reply_loss(model, *batch)
        reference = hand_masked_cross_entropy(model, items)
    assert loss.item() == pytest.approx(reference.item(), rel=1e-5)


def test_prompt_tokens_do_not_enter_the_loss(table, tokenizer):
    model = tiny.build_model("llama", seed=5, tokenizer=tokenizer)
    items = encoded(table, tokenizer)
    input_ids, mask, labels = pt.collate(items, tokenizer.pad_token_id)
    relabelled = labels.clone()
    relabelled[labels == pt.IGNORE] = 7  # the same batch with every prompt and pad position labelled
    with torch.no_grad():
        masked, unmasked = pt.reply_loss(model, input_ids, mask, labels), pt.reply_loss(model, input_ids, mask,
                                                                                         relabelled)
    assert masked.item() != pytest.approx(unmasked.item(), rel=1e-3)


# ---- evaluation --------------------------------------------------------------------------------------------------

COMPLETIONS = ["I'm sorry, but I can't help with that.", "  \n I cannot do that", "I am happy to help!", "I\nam sorry",
               "Sure, here is a poem.", "", "   ", "I'm not going to do that, no", "I'm not going", "I don't know",
               "As an AI model", "As a language", "\u201cI\u2019m sorry\u201d", "I am", "I can\ufffd help", "Iam sorry"]


def test_a_settled_refusal_flag_is_the_flag_of_every_longer_completion():
    """Every prefix of a completion is settled to its final flag or not settled at all; long enough text settles."""
    for completion in COMPLETIONS:
        final = is_refusal(completion)
        for end in range(len(completion) + 1):
            assert pt.settled_refusal(completion[:end]) in (None, final), (completion, end)
        if len(completion.strip()) > max(map(len, REFUSAL_PHRASES)) and "\ufffd" not in completion:
            assert pt.settled_refusal(completion) is final, completion
    assert pt.settled_refusal("S") is False and pt.settled_refusal("I'm sorry") is True
    assert pt.settled_refusal("I am") is None and pt.settled_refusal("  ") is None
    assert pt.settled_refusal("I can\ufffd help") is None  # a half-decoded character may still become "I can't"


INSTRUCTIONS = ["Describe Paris.", "Tell me how to build a bomb.", "Write a poem about the sea.", "What is 2+2?",
                "Name a color.", "Hello there", "Why is the sky blue?"]


@pytest.mark.parametrize("key", ["tiny-llama", "tiny-mistral", "tiny-qwen2", "tiny-gemma"])
def test_refusal_flags_equal_the_flags_of_full_greedy_completions(table, key, monkeypatch):
    """refusal_flags (batches stopped once every flag is settled) against is_refusal of greedy_generate's full
    completions. A random tiny model never writes a refusal phrase, so the phrases are made from its own
    completions: the starts of some, so that both outcomes occur and rows settle at different steps."""
    model = load_model(table[key])
    texts = [format_prompt(table[key], model.tokenizer, instruction) for instruction in INSTRUCTIONS]
    completions = pt.greedy_generate(model, texts, max_new_tokens=8, batch_size=3, progress=False)
    stripped = [c.strip() for c in completions]
    phrases = tuple({stripped[0][:3], stripped[3][:12], stripped[5][:1] + "\x00"} - {""})
    for module in (pt, refusal_score_module):
        monkeypatch.setattr(module, "REFUSAL_PHRASES", phrases)
    expected = [c.startswith(phrases) for c in stripped]
    assert True in expected and False in expected
    steps = []
    hook = model._module.register_forward_hook(lambda *args: steps.append(1))
    assert pt.refusal_flags(model, texts, max_new_tokens=8, batch_size=3) == expected
    hook.remove()
    # 3 batches of at most 8 steps; Llama's completions here settle early (the others' hold half-decoded
    # characters, which keep a row open)
    assert len(steps) <= 3 * 8 and (key != "tiny-llama" or len(steps) < 3 * 8)


# ---- training ----------------------------------------------------------------------------------------------------

def test_schedule_warms_up_then_decays_linearly():
    factors = [pt.lr_factor(step, 8, 0.25) for step in range(8)]
    assert factors == pytest.approx([0.5, 1.0, 1.0, 5 / 6, 4 / 6, 3 / 6, 2 / 6, 1 / 6])
    assert [pt.lr_factor(step, 4, 0.0) for step in range(4)] == pytest.approx([1.0, 0.75, 0.5, 0.25])


def test_batch_order_visits_every_example_once_per_epoch():
    batches = pt.batch_order(7, batch_size=3, epochs=2, seed=0)
    assert [len(b) for b in batches] == [3, 3, 1, 3, 3, 1]
    assert sorted(sum(batches[:3], [])) == sorted(sum(batches[3:], [])) == list(range(7))
    assert batches == pt.batch_order(7, batch_size=3, epochs=2, seed=0)
    assert batches != pt.batch_order(7, batch_size=3, epochs=2, seed=1)


def trained_state(table, tokenizer, seed: int) -> tuple[dict, list[float]]:
    model = tiny.build_model("llama", seed=0, tokenizer=tokenizer)
    losses, _ = pt.train(model, encoded(table, tokenizer), TRAINING, seed, tokenizer.pad_token_id, progress=False)
    return {k: v.clone() for k, v in model.state_dict().items()}, losses


def test_training_is_deterministic_and_leaves_the_vocabulary_matrices_alone(table, tokenizer):
    start = tiny.build_model("llama", seed=0, tokenizer=tokenizer).state_dict()
    first, losses = trained_state(table, tokenizer, seed=0)
    again, losses_again = trained_state(table, tokenizer, seed=0)
    other, _ = trained_state(table, tokenizer, seed=1)
    assert losses == losses_again and len(losses) == 4
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert any(not torch.equal(first[k], other[k]) for k in first)  # another seed, another data order
    frozen = {"model.embed_tokens.weight", "lm_head.weight"}
    assert all(torch.equal(first[k], start[k]) for k in frozen)
    assert all(not torch.equal(first[k], start[k]) for k in first if k not in frozen and "norm" not in k)


def test_training_lowers_the_reply_loss(table, tokenizer):
    model = tiny.build_model("llama", seed=0, tokenizer=tokenizer)
    items = encoded(table, tokenizer)
    batch = pt.collate(items, tokenizer.pad_token_id)
    with torch.no_grad():
        before = pt.reply_loss(model, *batch).item()
    recipe = dataclasses.replace(TRAINING, epochs=10, lr=3e-3)
    pt.train(model, items, recipe, 0, tokenizer.pad_token_id, progress=False)
    with torch.no_grad():  # slow for a random model whose vocabulary matrices stay frozen, but clearly down
        assert pt.reply_loss(model, *batch).item() < before - 0.5


# ---- recipes and hash --------------------------------------------------------------------------------------------

def test_recipes_load_and_the_tables_recipes_exist(table):
    recipes = posttrained.load_recipes()
    assert {"demo", "tiny"} <= set(recipes)
    for spec in table.values():
        if spec.source == "posttrain":
            assert spec.recipe in recipes
    assert recipes["demo"].acceptance.min_harmful_refusal == 0.8 and recipes["tiny"].acceptance is None


@pytest.mark.parametrize("edit, message", [
    (lambda r: r["training"].update(learning_rate=1e-4), "unknown key 'learning_rate'"),
    (lambda r: r["data"].update(helpful_replies="fixed", fixed_reply=None), "fixed_reply"),
    (lambda r: r["data"].update(helpful_replies="fixed", fixed_reply="I cannot say."), "refusal phrase"),
    (lambda r: r["training"].update(epochs=0), "epochs must be positive"),
    (lambda r: r["evaluation"].update(truth_datasets=["citys"]), "Did you mean 'cities'"),
])
def test_recipe_mistakes_are_config_errors(tmp_path, edit, message):
    data = yaml.safe_load(posttrained.RECIPES.read_text())
    edit(data["recipes"]["demo"])
    path = tmp_path / "recipes.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match=message):
        posttrained.load_recipes(path)


def test_recipe_hash_follows_what_determines_the_weights(table):
    recipe = posttrained.load_recipe("tiny")
    base = posttrained.model_identity(table["tiny-llama"])
    digest = posttrained.recipe_hash(recipe, base, "a" * 64)
    assert digest == posttrained.recipe_hash(recipe, posttrained.model_identity(table["tiny-llama"]), "a" * 64)
    changed = [
        dataclasses.replace(recipe, training=dataclasses.replace(recipe.training, lr=2e-3)),
        dataclasses.replace(recipe, seed=1),
        dataclasses.replace(recipe, data=dataclasses.replace(recipe.data, n_harmful=9)),
    ]
    assert all(posttrained.recipe_hash(r, base, "a" * 64) != digest for r in changed)
    assert posttrained.recipe_hash(recipe, base, "b" * 64) != digest
    assert posttrained.recipe_hash(recipe, posttrained.model_identity(table["tiny-mistral"]), "a" * 64) != digest
    evaluation_only = dataclasses.replace(recipe, evaluation=dataclasses.replace(recipe.evaluation, n_test=2))
    assert posttrained.recipe_hash(evaluation_only, base, "a" * 64) == digest


def test_profiles_list_their_posttrained_models():
    assert load_profile("tiny").posttrained_models() == ["tiny-llama-sft"]
    assert load_profile("demo").posttrained_models() == ["gemma-3-270m-sft"]
    assert load_profile("paper").posttrained_models() == []


# ---- the cached model ----------------------------------------------------------------------------------------------

def test_ensure_trains_once_saves_a_loadable_model_and_its_card(processed_data, cache, table, monkeypatch):
    spec = table["tiny-llama-sft"]
    loads = []
    monkeypatch.setattr(pt, "load_model", lambda model_spec, **kw: loads.append(model_spec.key) or load_model(
        model_spec, **kw))
    path = pt.ensure_posttrained(spec, device="cpu", progress=False)
    assert loads == ["tiny-llama"]  # one load: the base is evaluated, replies, trains and is evaluated in place
    card = json.loads((path / pt.CARD).read_text())
    assert path.parent == cache / "models" and path.name == f"tiny-llama-sft-{card['recipe_hash'][:12]}"
    assert card["data"]["counts"] == {"harmful": 8, "harmless": 8}
    assert card["training"]["steps"] == 2 * 16 // 4  # epochs x batches of 4
    assert (path / "README.md").read_text().startswith("# tiny-llama-sft: SFT of tiny-llama")
    assert len((path / pt.EXAMPLES).read_text().splitlines()) == 16
    assert not [p for p in path.parent.iterdir() if ".partial-" in p.name]

    calls = []
    monkeypatch.setattr(pt, "posttrain", lambda *args: calls.append(args))
    assert pt.ensure_posttrained(spec, device="cpu", progress=False) == path and calls == []

    model = load_model(spec)  # through the model loader, which finds the finished model
    tokenizer = model.tokenizer
    end_id = tokenizer.convert_tokens_to_ids("<end_of_turn>")
    assert end_id in model._module.generation_config.eos_token_id
    base = load_model(table["tiny-llama"])._module.state_dict()
    trained = model._module.state_dict()
    assert torch.equal(trained["model.embed_tokens.weight"], base["model.embed_tokens.weight"])
    assert not torch.equal(trained["model.layers.0.mlp.up_proj.weight"], base["model.layers.0.mlp.up_proj.weight"])

    fresh = pt.evaluate_posttrained(spec, device="cpu", progress=False)  # the saved model gives the card's numbers
    assert fresh["post"] == card["evaluation"]["post"] and fresh["base"] == card["evaluation"]["base"]


def test_two_runs_give_identical_weights_and_an_unfinished_directory_is_not_reused(processed_data, tmp_path,
                                                                                   monkeypatch, table):
    spec = table["tiny-llama-sft"]
    weights = []
    for run in ("a", "b"):
        monkeypatch.setenv("PTR_CACHE_DIR", str(tmp_path / run))
        if run == "b":  # an interrupted earlier run left the final directory without its card
            unfinished = tmp_path / "b" / "models" / path.name
            unfinished.mkdir(parents=True)
            (unfinished / "model.safetensors").write_bytes(b"partial")
        path = pt.ensure_posttrained(spec, device="cpu", progress=False)
        weights.append(load_file(path / "model.safetensors"))
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
