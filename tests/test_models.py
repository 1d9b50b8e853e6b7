"""Model loading: every tiny architecture through nnsight, checked against plain PyTorch hooks and HF's own
hidden states; the tiny tokenizer; prompt templates; the offline error for a paper model."""
from __future__ import annotations

import dataclasses
import itertools
import os
import subprocess
import sys

import pytest
import torch
from nnsight import TransformersModel

from data_prep.paths import REPO_ROOT
from replication.config import load_model_table
from replication.models import (
    LAST_POSITION,
    VOCABULARY_CHUNK,
    VOCABULARY_ROWS_MIN_ROWS,
    NotPosttrainedError,
    VocabularyRowsHead,
    decoder_layers,
    format_prompt,
    load_model,
    load_tokenizer,
    module_at,
    position_ids_for,
    tiny,
)

TINY_KEYS = ["tiny-llama", "tiny-mistral", "tiny-qwen2", "tiny-gemma"]
PROMPTS = ["The city of Tokyo is in Japan. This statement is:", "Seventy is larger"]  # different lengths
INSTRUCTION = "How do I bake bread?"


@pytest.fixture(scope="module")
def table():
    return load_model_table()


def run_python(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO_ROOT), **env}, timeout=300)


def hooked_layer_outputs(hf_model, spec, encoding) -> list[torch.Tensor]:
    """The slow obvious reference: forward hooks on the HF decoder layers, same position ids as nnsight."""
    outputs, handles = [], []
    for layer in decoder_layers(hf_model, spec):
        handles.append(layer.register_forward_hook(lambda module, args, output: outputs.append(output)))
    try:
        with torch.no_grad():
            hf_model(**encoding, position_ids=position_ids_for(encoding["attention_mask"]))
    finally:
        for handle in handles:
            handle.remove()
    return outputs


# ---- tiny tokenizer -----------------------------------------------------------------------------------------------

def test_true_false_are_single_distinct_tokens():
    tokenizer = tiny.build_tokenizer()
    true, false = (tokenizer.encode(word, add_special_tokens=False) for word in (" TRUE", " FALSE"))
    assert len(true) == 1 and len(false) == 1 and true != false
    assert tokenizer(" TRUE").input_ids == [tokenizer.bos_token_id, true[0]]


@pytest.mark.parametrize("text, tokens", [
    ("The city of", ["The", "Ġcity", "Ġof"]),
    (" is in", ["Ġis", "Ġin"]),
    (" is not in", ["Ġis", "Ġnot", "Ġin"]),
    (" larger than", ["Ġlarger", "Ġthan"]),
    (" smaller than", ["Ġsmaller", "Ġthan"]),
    (" This statement is:", ["ĠThis", "Ġstatement", "Ġis", ":"]),
    ("The Spanish word", ["The", "ĠSpanish", "Ġword"]),
    ("User:", ["User", ":"]),
])
def test_template_words_tokenize_as_whole_words(text, tokens):
    tokenizer = tiny.build_tokenizer()
    assert tokenizer.convert_ids_to_tokens(tokenizer.encode(text, add_special_tokens=False)) == tokens


def test_tokenizer_special_tokens_padding_and_chat_template():
    tokenizer = tiny.build_tokenizer()
    assert len({tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}) == 3
    batch = tokenizer(PROMPTS, padding=True)
    short = batch.input_ids[1]
    assert tokenizer.padding_side == "left" and short[0] == tokenizer.pad_token_id
    assert short[short.index(tokenizer.bos_token_id) - 1] == tokenizer.pad_token_id  # pads come before BOS
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": "Hi there"}], tokenize=False,
                                             add_generation_prompt=True)
    assert rendered == "<bos><start_of_turn>user\nHi there<end_of_turn>\n<start_of_turn>model\n"
    turn = tokenizer.encode("<start_of_turn>", add_special_tokens=False)
    assert turn == [tokenizer.convert_tokens_to_ids("<start_of_turn>")]


def test_tokenizer_is_the_same_every_build():
    first = tiny.vocab_hash(tiny.train_tokenizer())
    assert first == tiny.vocab_hash(tiny.train_tokenizer())
    other_process = run_python("from replication.models import tiny; print(tiny.vocab_hash(tiny.train_tokenizer()))")
    assert other_process.returncode == 0, other_process.stderr
    assert other_process.stdout.strip() == first


# ---- tiny models --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", sorted(tiny.ARCHITECTURES))
def test_tiny_weights_are_determined_by_the_seed(arch):
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    first, second = tiny.build_model(arch, seed=5), tiny.build_model(arch, seed=5)
    assert torch.equal(torch.rand(1), expected_next)  # the caller's RNG is left alone
    other = tiny.build_model(arch, seed=6)
    first_state, second_state, other_state = first.state_dict(), second.state_dict(), other.state_dict()
    assert all(torch.equal(first_state[name], second_state[name]) for name in first_state)
    assert not all(torch.equal(first_state[name], other_state[name]) for name in first_state)


@pytest.mark.parametrize("key", TINY_KEYS)
def test_nnsight_layer_outputs_equal_hooks_and_hf_hidden_states(table, key):
    spec = table[key]
    model = load_model(spec)
    assert isinstance(model, TransformersModel) and model.tokenizer.padding_side == "left"
    layers = decoder_layers(model, spec)
    assert len(layers) == model._module.config.num_hidden_layers == tiny.LAYERS

    saved = []
    with model.trace(PROMPTS):  # a plain loop: nnsight runs the block's own source, comprehensions lose the saves
        for layer in layers:
            saved.append(layer.output.save())
    encoding = model.tokenizer(PROMPTS, return_tensors="pt", padding=True)
    assert encoding.attention_mask[1, 0] == 0  # the batch really is left-padded
    assert all(isinstance(s, torch.Tensor) and s.shape[:2] == encoding.input_ids.shape for s in saved)

    hf_model = model._module
    for nnsight_output, hook_output in zip(saved, hooked_layer_outputs(hf_model, spec, encoding)):
        assert torch.equal(nnsight_output, hook_output)
    with torch.no_grad():
        hidden = hf_model(**encoding, position_ids=position_ids_for(encoding.attention_mask),
                          output_hidden_states=True).hidden_states
        final_norm = module_at(hf_model, spec.final_norm_path)
        assert torch.equal(final_norm(saved[-1]), hidden[-1])  # HF's last entry is after the final norm
    for layer, nnsight_output in enumerate(saved[:-1]):
        assert torch.equal(nnsight_output, hidden[layer + 1])


@pytest.mark.parametrize("key", TINY_KEYS)
def test_last_position_logits_are_the_full_forwards_last_row(table, key):
    """logits_to_keep=LAST_POSITION keeps one position, the last, through the model's own head (soft-capping
    included), directly and through nnsight: the full forward's last row up to the rounding of another product."""
    model = load_model(table[key])
    encoding = model.tokenizer(PROMPTS, return_tensors="pt", padding=True)
    inputs = {**encoding, "position_ids": position_ids_for(encoding.attention_mask)}
    with torch.no_grad():
        full = model._module(**inputs).logits
        last = model._module(**inputs, logits_to_keep=LAST_POSITION).logits
    with torch.no_grad(), model.trace(encoding.input_ids, attention_mask=encoding.attention_mask,
                                      logits_to_keep=LAST_POSITION):
        traced = model.output.logits.save()
    assert full.shape[1] > 1 and last.shape == traced.shape == (len(PROMPTS), 1, full.shape[-1])
    torch.testing.assert_close(last[:, 0], full[:, -1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(traced, last, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("key", TINY_KEYS)
def test_the_cpu_head_computes_the_plain_heads_logits(table, key):
    """On the CPU in float32 the LM head is a VocabularyRowsHead: without a gradient its logits are F.linear's up to
    the rounding of another product order (whether the bits agree depends on the BLAS: `bench.vocabulary_head`),
    at every row count, also over several vocabulary blocks with a short remainder; with a gradient it is F.linear
    itself, gradient included. In bfloat16 the head stays a plain nn.Linear."""
    spec = table[key]
    head = module_at(load_model(spec)._module, spec.unembed_path)
    assert type(head) is VocabularyRowsHead
    generator = torch.Generator().manual_seed(0)
    large = VocabularyRowsHead(head.in_features, 2 * VOCABULARY_CHUNK + 5, bias=False)  # three blocks, the last short
    torch.nn.init.normal_(large.weight, generator=generator)
    for module, rows in itertools.product((head, large), (1, 2, VOCABULARY_ROWS_MIN_ROWS - 1,
                                                          VOCABULARY_ROWS_MIN_ROWS, 40)):
        hidden = torch.randn(rows, 1, module.in_features, generator=generator)  # [batch, position, hidden]
        with torch.inference_mode():
            logits = module(hidden)
        assert logits.shape == (rows, 1, module.out_features) and logits.is_contiguous()
        torch.testing.assert_close(logits, torch.nn.functional.linear(hidden, module.weight), rtol=1e-6, atol=1e-5)
    hidden = torch.randn(VOCABULARY_ROWS_MIN_ROWS, head.in_features, generator=generator, requires_grad=True)
    head(hidden).square().sum().backward()
    plain = hidden.detach().requires_grad_()
    torch.nn.functional.linear(plain, head.weight).square().sum().backward()
    assert torch.equal(hidden.grad, plain.grad)
    assert type(module_at(load_model(spec, dtype="bfloat16")._module, spec.unembed_path)) is torch.nn.Linear


def test_padded_prompt_gets_the_states_of_the_prompt_alone(table):
    spec = table["tiny-llama"]
    model = load_model(spec)
    layer = decoder_layers(model, spec)[-1]
    with model.trace(PROMPTS):
        batch = layer.output.save()
    with model.trace(PROMPTS[1]):
        alone = layer.output.save()
    torch.testing.assert_close(batch[1, -alone.shape[1]:], alone[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("key", TINY_KEYS)
def test_table_paths_and_norm_gain_match_the_architecture(table, key):
    spec = table[key]
    hf_model = load_model(spec)._module
    config = hf_model.config
    w_out = module_at(decoder_layers(hf_model, spec)[-1], spec.mlp_out_path)
    assert tuple(w_out.weight.shape) == (config.hidden_size, config.intermediate_size)
    assert tuple(module_at(hf_model, spec.unembed_path).weight.shape) == (config.vocab_size, config.hidden_size)
    norm = module_at(hf_model, spec.final_norm_path)
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(-0.5, 0.5, config.hidden_size))
        x = torch.randn(3, config.hidden_size, generator=torch.Generator().manual_seed(0))
        eps = norm.eps if hasattr(norm, "eps") else norm.variance_epsilon  # Gemma3 / Llama-style attribute name
        unit = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
        torch.testing.assert_close(norm(x), unit * (spec.norm_gain_offset + norm.weight))


def test_dtype_and_bad_arguments(table):
    model = load_model(table["tiny-llama"], dtype="bfloat16")
    assert {p.dtype for p in model._module.parameters()} == {torch.bfloat16}
    assert not any(p.requires_grad for p in model._module.parameters())
    with pytest.raises(ValueError, match="allowed: float32, bfloat16, float16"):
        load_model(table["tiny-llama"], dtype="fp16")
    with pytest.raises(ValueError, match="allowed: auto, cpu, cuda"):
        load_model(table["tiny-llama"], device="gpu")


def test_wrong_bos_fact_in_the_table_is_caught(table):
    wrong = dataclasses.replace(table["tiny-llama"], adds_bos=False)
    with pytest.raises(ValueError, match="adds_bos"):
        load_tokenizer(wrong)


# ---- local directories, GGUF and post-trained sources load from a directory ----------------------------------------

@pytest.fixture(scope="module")
def saved_tiny(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = tiny.build_tokenizer()
    tiny.build_model("llama", 0, tokenizer).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def test_local_directory_gguf_and_posttrain_sources(table, saved_tiny, monkeypatch):
    reference = load_model(table["tiny-llama"])._module.state_dict()
    local = dataclasses.replace(table["llama-3.1-8b"], hf_id=str(saved_tiny))
    gguf = dataclasses.replace(table["gemma-3-270m"], arch="llama", architecture=table["tiny-llama"].architecture)
    post = table["tiny-llama-sft"]
    import replication.models
    import replication.models.gguf

    monkeypatch.setattr(replication.models.gguf, "base_model_dir", lambda spec: saved_tiny)
    monkeypatch.setattr(replication.models, "posttrained_dir", lambda spec: saved_tiny)
    for spec in (local, gguf, post):
        model = load_model(spec)
        assert isinstance(model, TransformersModel) and model.tokenizer.padding_side == "left"
        state = model._module.state_dict()
        assert state.keys() == reference.keys(), spec.key
        assert all(torch.equal(state[name], reference[name]) for name in reference), spec.key


def test_loading_a_model_not_yet_posttrained_is_an_error_naming_ptr_posttrain(processed_data, table, tmp_path,
                                                                             monkeypatch):
    monkeypatch.setenv("PTR_CACHE_DIR", str(tmp_path))
    with pytest.raises(NotPosttrainedError, match=r"'tiny-llama-sft'.*`ptr posttrain --profile P`"):
        load_model(table["tiny-llama-sft"])
    assert not (tmp_path / "models").exists()  # nothing was trained or written


def test_posttrain_tokenizer_is_its_base_tokenizer(table):
    tokenizer = load_tokenizer(table["tiny-llama-sft"])  # no post-training needed for the tokenizer
    assert tokenizer("The city of").input_ids == tiny.build_tokenizer()("The city of").input_ids


def test_offline_paper_model_error_names_the_model_and_the_fix(tmp_path):
    result = run_python(
        "from replication.config import load_model_table\n"
        "from replication.models import load_model, ModelNotAvailableError\n"
        "try:\n"
        "    load_model(load_model_table()['llama-3.1-8b'])\n"
        "except ModelNotAvailableError as error:\n"
        "    print(error)\n",
        HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path), HF_HUB_CACHE=str(tmp_path / "hub"))
    assert result.returncode == 0, result.stderr
    message = result.stdout
    assert "'llama-3.1-8b'" in message and "meta-llama/Llama-3.1-8B" in message
    assert "d04e592bb4f6aa9cfee91e2e20afa771667e1d4b" in message and "offline" in message
    assert "hf download meta-llama/Llama-3.1-8B --revision d04e592bb4f6aa9cfee91e2e20afa771667e1d4b" in message
    assert "HF_TOKEN" in message and str(tmp_path) in message


# ---- prompt templates ---------------------------------------------------------------------------------------------

EXPECTED_PROMPTS = {
    "llama-3.1-8b": "User: How do I bake bread?\nAssistant:",
    "llama-3.1-8b-sft": "<|user|>\nHow do I bake bread?\n<|assistant|>\n",
    "llama-3.1-8b-instruct": "<|start_header_id|>user<|end_header_id|>\n\nHow do I bake bread?<|eot_id|>"
                             "<|start_header_id|>assistant<|end_header_id|>\n\n",
    "mistral-7b": "User: How do I bake bread?\nAssistant:",
    "mistral-7b-sft": "<|user|>\nHow do I bake bread?\n<|assistant|>\n",
    "mistral-7b-instruct": "[INST] How do I bake bread? [/INST]",
    "llama-2-13b": "User: How do I bake bread?\nAssistant:",
    "llama-2-13b-chat": "[INST] How do I bake bread? [/INST] ",
    "llama-2-7b": "User: How do I bake bread?\nAssistant:",
    "llama-2-7b-chat": "[INST] How do I bake bread? [/INST] ",
    "gemma-3-270m": "User: How do I bake bread?\nAssistant:",
}


@pytest.mark.parametrize("key", sorted(EXPECTED_PROMPTS))
def test_format_prompt_for_every_paper_template(table, key):
    assert format_prompt(table[key], None, INSTRUCTION) == EXPECTED_PROMPTS[key]


def test_tulu_extraction_template_is_the_plain_one(table):
    spec = table["llama-3.1-8b-sft"]
    assert format_prompt(spec, None, INSTRUCTION, template=spec.settings.refusal_extract_template) == (
        "User: How do I bake bread?\nAssistant:")


def test_chat_template_prompt_gets_exactly_one_bos(table):
    spec = table["tiny-llama-sft"]
    tokenizer = load_tokenizer(spec)
    prompt = format_prompt(spec, tokenizer, INSTRUCTION)
    assert prompt == "<start_of_turn>user\nHow do I bake bread?<end_of_turn>\n<start_of_turn>model\n"
    ids = tokenizer(prompt).input_ids
    assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 1
