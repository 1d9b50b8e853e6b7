"""Patched positions and their roles from the prompt's own tokenization (character offsets of the statement in
the prompt) on the paper models' real tokenizers (data_prep.tokenizers.reference_tokenizer): SentencePiece
(Mistral v3, Llama-2), Llama-3 unchanged, tulu_extracted's fixed prefix length in the original, and cross-model
tokens when the two models' tokenizers differ in special tokens (the Mistral Tulu-2 SFT)."""
from __future__ import annotations

import pytest

from data_prep.datasets import read_truth
from data_prep.errors import DataError
from data_prep.pairs import Pair, build_pairs
from data_prep.prompts import SUFFIX, patching_prompts
from data_prep.tokenizers import reference_tokenizer
from replication.experiments.knowledge import tokenize_pair

SFT_PREFIX = "<s> "  # what the original prepends to the Mistral SFT's prompts (models.yaml prompt_prefix)


def pairs_and_prompts(dataset: str, key: str, max_pairs: int | None = None):
    tokenizer = reference_tokenizer(key)
    pair_set = build_pairs(dataset, read_truth(dataset),
                           lambda text: tokenizer.encode(text, add_special_tokens=False), key)
    pairs = pair_set.pairs[:max_pairs]
    return tokenizer, pairs, patching_prompts(dataset, pairs)


def statement_tokens(tokenizer, prompt: str, statement: str) -> list[int]:
    """Slow and obvious: the prompt's token ids whose characters overlap the statement and the suffix."""
    encoded = tokenizer(prompt, return_offsets_mapping=True)
    start = len(prompt) - len(statement + SUFFIX)
    return [i for i, (a, b) in zip(encoded.input_ids, encoded.offset_mapping) if b > start and b > a]


@pytest.mark.parametrize("dataset, key", [("larger_than", "mistral"), ("smaller_than", "mistral"),
                                          ("tulu_extracted", "mistral"), ("larger_than", "llama2"),
                                          ("tulu_extracted", "llama2"), ("sp_en_trans", "mistral")])
def test_sentencepiece_roles_are_the_statement_tokens_in_the_prompt(processed_data, dataset, key):
    tokenizer, pairs, prompts = pairs_and_prompts(dataset, key)
    assert pairs
    for pair, (true_prompt, false_prompt) in zip(pairs, prompts):
        tokens = tokenize_pair(tokenizer, tokenizer, dataset, pair, true_prompt, false_prompt, "")
        lead = ["\\n"] if dataset == "tulu_extracted" else []  # the newline before the statement (original)
        patched = tokens.false_ids[len(tokens.false_ids) - tokens.n_toks + len(lead):]
        assert patched == statement_tokens(tokenizer, false_prompt, pair.false)
        assert tokens.roles == lead + pair.roles + ["This", "statement", "is", ":"]
        if dataset == "larger_than":  # the first subject token follows the newline: "F", not the alone "▁F"
            assert tokenizer.convert_ids_to_tokens(patched[:1])[0][0] != "▁"


def test_llama3_patched_positions_are_the_originals(processed_data):
    """The original's fixed roles (find_dataset_tokens), counted from the end: 14 positions for every cities pair."""
    tokenizer, pairs, prompts = pairs_and_prompts("cities", "llama3")
    original = ["The", "city", "of", "[s1]", "[s2]", "[s3]", "is", "in", "[o1]", ".", "This", "statement", "is", ":"]
    assert len(pairs) == 238
    for pair, prompt in zip(pairs, prompts):
        tokens = tokenize_pair(tokenizer, tokenizer, "cities", pair, *prompt, "")
        assert tokens.roles == original
        assert tokens.false_ids[-14:] == tokenizer(pair.false + SUFFIX, add_special_tokens=False).input_ids


def visualizer_columns(tokenizer, true_prompt: str, false_prompt: str, few_shot_example_toks: int):
    """patching_visualize.py (tulu): knowledge = positions after the first few_shot_example_toks tokens where the
    TRUE and FALSE ids differ; others = the rest but the last."""
    false = tokenizer(false_prompt).input_ids[few_shot_example_toks:]
    true = tokenizer(true_prompt).input_ids[few_shot_example_toks:]
    knowledge = [i for i in range(len(false)) if false[i] != true[i]]
    others = [i for i in range(len(false)) if i not in knowledge and i != len(false) - 1]
    return len(false), knowledge, others


def test_tulu_llama3_positions_are_the_visualizers_len_minus_64(processed_data):
    """The published tulu_extracted row went through patching_visualize.py, which slices [64:] and asserts that
    as many positions were patched: the two-model run's `len - 64`. BOS and the few-shot lines take 65 tokens, so
    that is the newline before the statement (in "others"), the statement and the suffix; the one-model run's
    `len - 65` (statement and suffix only) fails the visualizer's assertion."""
    tokenizer, pairs, prompts = pairs_and_prompts("tulu_extracted", "llama3")
    assert len(pairs) == 55
    for pair, (true_prompt, false_prompt) in zip(pairs, prompts):
        tokens = tokenize_pair(tokenizer, tokenizer, "tulu_extracted", pair, true_prompt, false_prompt, "")
        n, knowledge, others = visualizer_columns(tokenizer, true_prompt, false_prompt, 64)
        assert tokens.n_toks == n == len(tokens.false_ids) - 64
        assert tokens.roles[0] == "\\n" and tokens.roles[1:-4] == pair.roles
        is_knowledge = [role.startswith("[k") for role in tokens.roles]
        assert [i for i, k in enumerate(is_knowledge) if k] == knowledge
        assert [i for i, k in enumerate(is_knowledge[:-1]) if not k] == others


# The original's tulu_extracted prefix lengths for the other families (Mistral 70, Llama-2 69) against the real
# prefix (BOS and the four few-shot lines), which depends on the shuffle: the first line has SentencePiece's "▁".
TULU_FIXED_PREFIX = {"mistral": 70, "llama2": 69}


@pytest.mark.parametrize("key", sorted(TULU_FIXED_PREFIX))
def test_tulu_fixed_prefix_of_the_original_on_sentencepiece(processed_data, key):
    tokenizer, pairs, prompts = pairs_and_prompts("tulu_extracted", key)
    prefixes = []
    for pair, prompt in zip(pairs, prompts):
        tokens = tokenize_pair(tokenizer, tokenizer, "tulu_extracted", pair, *prompt, "")
        prefixes.append(len(tokens.false_ids) - tokens.n_toks + 1)  # BOS and the lines (the newline is patched)
    fixed = TULU_FIXED_PREFIX[key]
    counts = {"drops statement tokens": sum(p < fixed for p in prefixes), "exact": prefixes.count(fixed),
              "adds prefix tokens": sum(p > fixed for p in prefixes)}
    # Mistral: 70 is BOS and the lines (statement and suffix patched, as Llama-3's one-model len - 65) unless the
    # "Albert Einstein" line comes first (69 tokens: the first statement token is left out). Llama-2: 69 is short
    # of the real 70-71 for every pair, so the newline and the last line's tokens would be patched.
    expected = {"mistral": {"drops statement tokens": 10, "exact": 27, "adds prefix tokens": 0},
                "llama2": {"drops statement tokens": 0, "exact": 0, "adds prefix tokens": 35}}
    assert counts == expected[key]


def test_cross_model_tokens_for_the_mistral_sft(processed_data):
    """Each model tokenizes its own prompt: the base's BOS is 1, the Tulu-2 SFT's 32768 (and both read the literal
    "<s> " the original prepends as id 1)."""
    base, sft = reference_tokenizer("mistral"), reference_tokenizer("mistral-tulu2")
    _, pairs, prompts = pairs_and_prompts("cities", "mistral", max_pairs=5)
    for pair, prompt in zip(pairs, prompts):
        forward = tokenize_pair(base, sft, "cities", pair, *prompt, SFT_PREFIX)
        assert forward.true_ids[:2] == [1, 1] and forward.false_ids[:2] == [32768, 1]
        assert forward.true_ids[2:] == base(SFT_PREFIX + prompt[0]).input_ids[2:]
        backward = tokenize_pair(sft, base, "cities", pair, *prompt, SFT_PREFIX)
        assert backward.true_ids[0] == 32768 and backward.false_ids[0] == 1
        assert forward.roles == backward.roles and forward.n_toks == 14


def test_cross_model_length_mismatch_names_the_pair(processed_data):
    base, pairs, prompts = pairs_and_prompts("cities", "mistral", max_pairs=1)
    llama3 = reference_tokenizer("llama3")
    with pytest.raises(DataError, match=r"patching pair 'The city of .*source model tokenizes the TRUE prompt"):
        tokenize_pair(llama3, base, "cities", pairs[0], *prompts[0], "")


def test_pairs_from_another_tokenizer_are_an_error(processed_data):
    tokenizer, pairs, prompts = pairs_and_prompts("larger_than", "mistral", max_pairs=1)
    wrong = Pair(pairs[0].true, pairs[0].false, pairs[0].roles[1:])  # as the alone tokenization labels them
    with pytest.raises(DataError, match="were the pairs built with this tokenizer"):
        tokenize_pair(tokenizer, tokenizer, "larger_than", wrong, *prompts[0], "")
