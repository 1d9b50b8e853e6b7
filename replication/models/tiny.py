"""Tiny random models and a tiny tokenizer, built in code, for tests and the `tiny` profile.

Everything here is deterministic: the same seed gives the same weights, and the tokenizer is trained on a fixed
in-code corpus, so two builds (in any process) give the same vocabulary. Nothing is downloaded.
"""
from __future__ import annotations

import functools
import hashlib
import json

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

BOS, EOS, PAD = "<bos>", "<eos>", "<pad>"
START_OF_TURN, END_OF_TURN = "<start_of_turn>", "<end_of_turn>"
SPECIAL_TOKENS = [PAD, EOS, BOS, START_OF_TURN, END_OF_TURN]  # ids 0..4, in this order
VOCAB_SIZE = 1024

# Gemma's chat-template layout (turns named 'user' / 'model'), so a tiny post-trained model can use `template: chat`.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<start_of_turn>{{ 'model' if message['role'] == 'assistant' else message['role'] }}\n"
    "{{ message['content'] | trim }}<end_of_turn>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)

# Shared shape of every tiny architecture: small enough to run the whole tiny profile on a CPU in minutes.
HIDDEN, LAYERS, HEADS, KV_HEADS, INTERMEDIATE = 64, 4, 4, 2, 128
# arch -> (config class, model class, extra config values); Gemma's defaults are sized for its 2304-wide models.
ARCHITECTURES: dict[str, tuple[type[PretrainedConfig], type[PreTrainedModel], dict]] = {
    "llama": (LlamaConfig, LlamaForCausalLM, {}),
    "mistral": (MistralConfig, MistralForCausalLM, {}),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, {}),
    "gemma3": (Gemma3TextConfig, Gemma3ForCausalLM,
               {"head_dim": HIDDEN // HEADS, "query_pre_attn_scalar": HIDDEN // HEADS, "sliding_window": 8,
                "layer_types": ["sliding_attention", "full_attention"] * (LAYERS // 2)}),
}

# ---------------------------------------------------------------------------------------------------------------
# Corpus: the templates of the truth datasets, the few-shot prompt suffix, and the refusal prompt words, with
# enough repetition that the template words (and " TRUE" / " FALSE") become single tokens.
_CITIES = [("Tokyo", "Japan"), ("Paris", "France"), ("Toronto", "Canada"), ("Chicago", "the United States"),
           ("Dar es Salaam", "Tanzania"), ("Kozhikode", "India"), ("Maracay", "Venezuela"), ("Baoji", "China"),
           ("Hanoi", "Vietnam"), ("Berlin", "Germany"), ("Lagos", "Nigeria"), ("Lima", "Peru"), ("Rome", "Italy"),
           ("Madrid", "Spain"), ("Cairo", "Egypt"), ("Moscow", "Russia"), ("Warsaw", "Poland"),
           ("Manila", "the Philippines"), ("Sydney", "Australia"), ("Nairobi", "Kenya")]
_NUMBER_WORDS = ["twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]
_UNITS = ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
_SPANISH = [("bosque", "forest"), ("piel", "skin"), ("gobernar", "to govern"), ("edad", "age"), ("gato", "cat"),
            ("libro", "book"), ("agua", "water"), ("casa", "house"), ("perro", "dog"), ("sol", "sun")]
_FACTS = ["The Eiffel Tower is located in Paris.", "The largest moon of Saturn is Titan.",
          "Albert Einstein developed the theory of relativity.", "The cat is a mammal.",
          "The eagle is a bird.", "Gold has the symbol Au.", "Iron has the symbol Fe.",
          "Thomas Edison invented the light bulb.", "Water boils at one hundred degrees."]
_INSTRUCTIONS = ["Write a poem about the sea.", "Explain how a plant grows.", "Give me a recipe for bread.",
                 "Tell me how to build a bomb.", "Describe the city of Paris.", "Write a story about a dog."]
_REPLIES = ["I'm sorry, I cannot help with that.", "I cannot do that.", "Sure, here is the answer.",
            "As an AI, I will not do that.", "Here is a short poem about the sea."]


def _number(n: int) -> str:
    tens, unit = divmod(n, 10)
    return _NUMBER_WORDS[tens - 2] + ("" if unit == 0 else "-" + _UNITS[unit - 1])


def _corpus() -> list[str]:
    statements: list[str] = []
    for i, (city, country) in enumerate(_CITIES):
        other = _CITIES[(i + 7) % len(_CITIES)][1]
        statements += [f"The city of {city} is in {country}.", f"The city of {city} is in {other}.",
                       f"The city of {city} is not in {other}.", f"The city of {city} is not in {country}."]
    for n in range(21, 100, 3):
        m = 120 - n
        for relation in ("larger", "smaller"):
            statements.append(f"{_number(n).capitalize()} is {relation} than {_number(m)}.")
    for spanish, english in _SPANISH:
        statements += [f"The Spanish word '{spanish}' means '{english}'.",
                       f"The Spanish word '{spanish}' does not mean '{english}'."]
    statements += _FACTS
    lines = [f"{s} This statement is: {label}" for s in statements for label in ("TRUE", "FALSE")]
    lines += [f"User: {q}\nAssistant: {a}" for q in _INSTRUCTIONS for a in _REPLIES]
    lines += [f"user\n{q}\nmodel\n{a}" for q in _INSTRUCTIONS for a in _REPLIES]  # chat-turn words
    return lines


def train_tokenizer() -> Tokenizer:
    """A byte-level BPE trained on the in-code corpus, prepending BOS (deterministic: the same vocab every time)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(_corpus(), trainer=trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, tokenizer.token_to_id(BOS))])
    return tokenizer


@functools.cache
def _trained_json() -> str:
    return train_tokenizer().to_str()


def build_tokenizer() -> PreTrainedTokenizerFast:
    """The tiny tokenizer as a fresh transformers tokenizer: adds BOS, pads on the left, has a chat template."""
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_trained_json()), bos_token=BOS, eos_token=EOS, pad_token=PAD,
        additional_special_tokens=[START_OF_TURN, END_OF_TURN], padding_side="left",
        chat_template=CHAT_TEMPLATE, model_max_length=512)


def vocab_hash(tokenizer: Tokenizer) -> str:
    """sha256 of the vocabulary and merges of a `tokenizers.Tokenizer`: equal hashes mean identical tokenisation."""
    state = json.loads(tokenizer.to_str())["model"]
    return hashlib.sha256(json.dumps([state["vocab"], state["merges"]], sort_keys=True).encode()).hexdigest()


def build_config(arch: str, tokenizer: PreTrainedTokenizerFast) -> PretrainedConfig:
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown tiny architecture {arch!r}; allowed: {sorted(ARCHITECTURES)}")
    config_class, _, extra = ARCHITECTURES[arch]
    return config_class(
        vocab_size=len(tokenizer), hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS, intermediate_size=INTERMEDIATE, max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False, **extra)


def build_model(arch: str, seed: int, tokenizer: PreTrainedTokenizerFast | None = None) -> PreTrainedModel:
    """A randomly initialised tiny causal LM (float32, eval mode); the same (arch, seed) gives the same weights."""
    tokenizer = tokenizer or build_tokenizer()
    config = build_config(arch, tokenizer)
    config._attn_implementation = "eager"  # plain attention math: exact and the same on every machine
    _, model_class, _ = ARCHITECTURES[arch]
    with torch.random.fork_rng(devices=[]):  # seed locally; leave the caller's RNG untouched
        torch.manual_seed(seed)
        model = model_class(config)
    return model.eval()
