"""Patching pairs: the generic pattern builder reproduces the original's Llama-3 pairs exactly."""
from __future__ import annotations

import json
import re

import pytest

from data_prep.datasets import read_pairs, read_pairs_file, read_truth
from data_prep.errors import DataError
from data_prep.pairs import (Pair, build_pairs, choose_pattern, difference_roles, knowledge_positions,
                             pair_by_last_word, pattern_roles, template_pieces, token_pattern)
from data_prep.sources import fetch

PUBLISHED_PAIRS = {"cities": 238, "neg_cities": 215, "larger_than": 406, "smaller_than": 487, "sp_en_trans": 25,
                   "neg_sp_en_trans": 33, "tulu_extracted": 55}

# The original's hard-coded Llama-3 filters (patching_process_data.py; token ids with BOS 128000 first):
# dataset -> (number of tokens, {start position: the token ids required there}).
ORIGINAL_LLAMA3_FILTERS = {
    "cities": (11, {0: [128000, 791, 3363, 315], 7: [374, 304], 10: [13]}),
    "neg_cities": (12, {0: [128000, 791, 3363, 315], 7: [374, 539, 304], 11: [13]}),
    "larger_than": (10, {4: [374, 8294, 1109], 9: [13]}),
    "smaller_than": (10, {4: [374, 9333, 1109], 9: [13]}),
    "sp_en_trans": (12, {0: [128000, 791, 15506, 3492, 364], 7: [6, 3445, 364], 11: [4527]}),
    "neg_sp_en_trans": (14, {0: [128000, 791, 15506, 3492, 364], 7: [6, 1587, 539, 3152, 364], 13: [4527]}),
}


@pytest.mark.parametrize("dataset", sorted(PUBLISHED_PAIRS))
def test_llama3_pair_counts_equal_the_published_ones(processed_data, dataset):
    assert len(read_pairs("llama3", dataset)) == PUBLISHED_PAIRS[dataset]


def test_llama3_cities_pairs_equal_the_shipped_cities_paired_json(processed_data):
    shipped = json.loads(fetch("paper_artifacts/cities_paired.json").read_text())
    pairs = read_pairs("llama3", "cities")
    assert [p.true for p in pairs] == shipped["llama3_true_prompts"]
    assert [p.false for p in pairs] == shipped["llama3_false_prompts"]


def original_pairs(statements, labels, keep):
    """The original's matching loop, written out as in patching_process_data.py."""
    true_statements = [s for s, label, k in zip(statements, labels, keep) if k and label == 1]
    false_statements = [s for s, label, k in zip(statements, labels, keep) if k and label == 0]
    false_by_last_word = {}
    for statement in false_statements:
        false_by_last_word.setdefault(statement.strip().split()[-1], []).append(statement)
    pairs = []
    for statement in true_statements:
        word = statement.strip().split()[-1]
        if word in false_by_last_word:
            pool = false_by_last_word[word]
            pairs.append((statement, pool.pop(-1) if len(pool) > 1 else pool[0]))
    return pairs


@pytest.mark.parametrize("dataset", sorted(ORIGINAL_LLAMA3_FILTERS))
def test_generic_pattern_equals_the_original_hard_coded_filter(processed_data, llama3_encode, dataset):
    length, required = ORIGINAL_LLAMA3_FILTERS[dataset]
    table = read_truth(dataset)

    def original_keep(statement):
        tokens = [128000] + llama3_encode(statement)
        return len(tokens) == length and all(tokens[i:i + len(ids)] == ids for i, ids in required.items())

    expected = original_pairs(table["statement"], table["label"], [original_keep(s) for s in table["statement"]])
    assert [(p.true, p.false) for p in read_pairs("llama3", dataset)] == expected


def test_roles_of_the_chosen_patterns(processed_data):
    assert read_pairs("llama3", "cities")[0].roles == ["The", "city", "of", "[s1]", "[s2]", "[s3]", "is", "in",
                                                      "[o1]", "."]
    # Figure 1a's token axis
    assert read_pairs("llama3", "larger_than")[0].roles == ["[s1]", "[s2]", "[s3]", "is", "larger", "than",
                                                           "[o1]", "[o2]", "."]
    assert read_pairs("llama3", "neg_sp_en_trans")[0].roles == ["The", "Spanish", "word", "'", "[s1]", "[s2]", "'",
                                                               "does", "not", "mean", "'", "[o1]", "'."]
    info = read_pairs_file("llama3", "sp_en_trans")["pattern"]
    assert info["slot_lengths"] == {"s": 2, "o": 1} and not info["slot_lengths_fixed_by_config"]


def test_tulu_pairs_are_consecutive_rows_of_equal_length_with_knowledge_roles(processed_data, llama3_encode):
    table = read_truth("tulu_extracted")
    rows = list(zip(table["statement"][0::2], table["statement"][1::2]))
    equal = [(t, f) for t, f in rows if len(llama3_encode(t)) == len(llama3_encode(f))]
    pairs = read_pairs("llama3", "tulu_extracted")
    assert [(p.true, p.false) for p in pairs] == equal
    for pair in pairs:
        t, f = llama3_encode(pair.true), llama3_encode(pair.false)
        assert knowledge_positions(pair.roles) == [i for i in range(len(t)) if t[i] != f[i]]
        assert len(pair.roles) == len(t)


# ---- tiny inputs with a toy word tokenizer ----

def word_tokenizer(pattern=r" ?[A-Za-z]+| ?[^A-Za-z ]"):
    vocabulary: dict[str, int] = {}
    return lambda text: [vocabulary.setdefault(w, len(vocabulary)) for w in re.findall(pattern, text)]


CITIES = template_pieces("The city of {s} is in {o}.")


def test_template_pieces_split_slots_from_quotes():
    assert CITIES == ["The", " city", " of", " {s}", " is", " in", " {o}", "."]
    assert template_pieces("The Spanish word '{s}' means '{o}'.") == [
        "The", " Spanish", " word", " '", "{s}", "'", " means", " '", "{o}", "'."]


def test_token_pattern_counts_slot_tokens_and_keeps_template_ids():
    encode = word_tokenizer()
    pattern = token_pattern("The city of Dar es Salaam is in Tanzania.", CITIES, encode)
    ids = encode("The city of is in.")
    assert pattern == ((ids[0],), (ids[1],), (ids[2],), 3, (ids[3],), (ids[4],), 1, (ids[5],))
    assert pattern_roles(CITIES, pattern) == ["The", "city", "of", "[s1]", "[s2]", "[s3]", "is", "in", "[o1]", "."]
    assert token_pattern("The town of Paris is in France.", CITIES, encode) is None  # does not fit the template


def test_token_spanning_two_pieces_does_not_fit():
    merges_period = word_tokenizer(r" ?[A-Za-z]+\.?| ?[^A-Za-z ]")  # "France." is one token
    assert token_pattern("The city of Paris is in France.", CITIES, merges_period) is None


def test_most_common_pattern_first_seen_wins_ties_and_fixed_lengths_restrict():
    pieces = ["{s}", " x", " {o}"]  # pattern: (subject token count, template word ids, object token count)
    a, b, c = (1, (7,), 3), (1, (7,), 4), (2, (7,), 3)
    assert choose_pattern([b, None, a, a, b], pieces, None) == b
    assert choose_pattern([b, a, a], pieces, None) == a
    assert choose_pattern([a, a, c], pieces, {"s": 2, "o": 3}) == c
    with pytest.raises(DataError, match="no statement fits"):
        choose_pattern([None, None], pieces, None)


def test_pairing_pops_while_several_candidates_then_reuses_the_last():
    true = ["A is in France.", "B is in France.", "C is in France.", "D is in Peru."]
    false = ["E is in France.", "F is in France.", "G is in Spain."]
    assert pair_by_last_word(true, false) == [("A is in France.", "F is in France."),
                                              ("B is in France.", "E is in France."),
                                              ("C is in France.", "E is in France.")]


def test_build_pairs_on_a_tiny_table():
    import pandas as pd

    table = pd.DataFrame({"statement": ["The city of Lyon is in France.", "The city of Oslo is in France.",
                                        "The city of Dar es Salaam is in Tanzania.", "The city of Rome is in Peru.",
                                        "The city of Lima is in Peru."], "label": [1, 0, 1, 1, 0]})
    pair_set = build_pairs("cities", table, word_tokenizer(), "toy")
    assert [(p.true, p.false) for p in pair_set.pairs] == [("The city of Lyon is in France.",
                                                            "The city of Oslo is in France."),
                                                           ("The city of Rome is in Peru.",
                                                            "The city of Lima is in Peru.")]
    assert pair_set.pattern["matching_pattern"] == {"true": 2, "false": 2}


def test_difference_roles_and_tulu_row_checks():
    assert difference_roles([5, 6, 7, 8], [5, 9, 7, 1]) == ["[c1]", "[k1]", "[c2]", "[k2]"]
    assert knowledge_positions(["The", "[s1]", "[o2]", "[k1]", "[c1]", "."]) == [1, 2, 3]
    import pandas as pd

    with pytest.raises(DataError, match="rows 1 and 2 must be labelled 1 then 0"):
        build_pairs("tulu_extracted", pd.DataFrame({"statement": ["a.", "b."], "label": [0, 1]}), word_tokenizer(), "x")
    with pytest.raises(DataError, match="even number of rows"):
        build_pairs("tulu_extracted", pd.DataFrame({"statement": ["a."], "label": [1]}), word_tokenizer(), "x")


def test_pair_roles_round_trip_as_lists(processed_data):
    pair = read_pairs("llama3", "cities")[0]
    assert isinstance(pair, Pair) and isinstance(pair.roles, list)


def test_unknown_pairs_requests(processed_data):
    with pytest.raises(DataError, match=r"no patching data for dataset 'facts'; known datasets"):
        read_pairs("llama3", "facts")
    with pytest.raises(DataError, match=r"no patching pairs were built for tokenizer 'gpt2' \(built: \['llama3'\]\)"):
        read_pairs("gpt2", "cities")


# ---- the Mistral v3 stand-in (mistral-common) ----

# The original's Mistral patterns (patching_process_data.py): subject/object token counts, and the token ids of
# "The city of" / " is in" / "." there.
ORIGINAL_MISTRAL_SLOTS = {"cities": {"s": 3, "o": 1}, "neg_cities": {"s": 3, "o": 1}, "larger_than": {"s": 4, "o": 3},
                          "smaller_than": {"s": 4, "o": 4}, "sp_en_trans": {"s": 2, "o": 1},
                          "neg_sp_en_trans": {"s": 2, "o": 1}}


def test_mistral_standin_reproduces_the_original_mistral_patterns(processed_data):
    pytest.importorskip("sentencepiece", reason="the Mistral stand-in tokenizer needs the sentencepiece package")
    from data_prep.tokenizers import standin_encoder

    encode = standin_encoder("mistral")
    for dataset, slots in ORIGINAL_MISTRAL_SLOTS.items():
        pair_set = build_pairs(dataset, read_truth(dataset), encode, "mistral")
        assert pair_set.pattern["alone_slot_lengths"] == slots, dataset
        assert pair_set.pattern["slot_lengths_fixed_by_config"] == (dataset == "smaller_than")
        assert pair_set.pairs
    cities = build_pairs("cities", read_truth("cities"), encode, "mistral").pattern["pieces"]
    # in the prompt "The" follows a newline: no "▁" (id 1183 alone), the rest as alone
    assert [p["tokens"] for p in cities] == [encode("\nThe")[2:], [3758], [1070], 3, [1117], [1065], 1, [29491]]


# In the prompt a statement follows a newline, where SentencePiece puts no "▁": the first word splits differently.
# (dataset, tokenizer) -> (statements of the original's pattern dropped for another shape in the prompt, pairs, the
# prompt's subject/object token counts, pairs whose original labels (alone roles counted from the end) are wrong).
# Llama-2: "Eighty" is "▁E ight y" alone but "E ight y" or "Eight y" after a newline, depending on the number.
PROMPT_SHAPES = {("larger_than", "mistral"): (0, 389, {"s": 5, "o": 3}, 389),
                 ("smaller_than", "mistral"): (0, 249, {"s": 5, "o": 4}, 249),
                 ("cities", "mistral"): (0, 229, {"s": 3, "o": 1}, 0),
                 ("larger_than", "llama2"): (159, 66, {"s": 5, "o": 4}, 0),
                 ("smaller_than", "llama2"): (159, 88, {"s": 5, "o": 4}, 0),
                 ("larger_than", "llama3"): (0, 406, {"s": 3, "o": 2}, 0)}


@pytest.mark.parametrize("dataset, key", sorted(PROMPT_SHAPES))
def test_roles_are_the_statement_tokens_inside_the_prompt(processed_data, dataset, key):
    from data_prep.prompts import SUFFIX, patching_prompts
    from data_prep.tokenizers import reference_tokenizer

    tokenizer = reference_tokenizer(key)
    encode = lambda text: tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
    pair_set = build_pairs(dataset, read_truth(dataset), encode, key)
    dropped, kept, slots, relabelled = PROMPT_SHAPES[dataset, key]
    assert pair_set.pattern["dropped_other_prompt_shape"] == dropped
    assert len(pair_set.pairs) == kept and pair_set.pattern["slot_lengths"] == slots
    assert len(pair_set.pattern["labelled_differently_by_original"]) == relabelled
    # slow and obvious: the last tokens of every prompt are the statement's, as many as it has roles
    for pair, prompts in zip(pair_set.pairs, patching_prompts(dataset, pair_set.pairs)):
        for statement, prompt in zip((pair.true, pair.false), prompts):
            encoded = tokenizer(prompt, return_offsets_mapping=True)
            start = len(prompt) - len(statement + SUFFIX)
            inside = [i for i, (a, b) in enumerate(encoded.offset_mapping) if b > start]
            assert len(inside) == len(pair.roles) + 4
            assert encoded.offset_mapping[inside[0]][0] >= start - 1  # at most the space "▁" maps to


def test_patching_yaml_typo_is_an_error_naming_the_key(tmp_path, monkeypatch):
    from data_prep import pairs

    bad = tmp_path / "patching.yaml"
    bad.write_text("cities:\n  pairing: last_word\n  template: 'The city of {s} is in {o}.'\n"
                   "  few_shot_true: []\n  few_shot_false: []\n  fixed_slot_length: {}\n")
    monkeypatch.setattr(pairs, "PATCHING_YAML", bad)
    pairs.patching_specs.cache_clear()
    try:
        with pytest.raises(DataError, match=r"dataset 'cities': unknown keys \['fixed_slot_length'\]"):
            pairs.patching_specs()
    finally:
        monkeypatch.undo()
        pairs.patching_specs.cache_clear()
