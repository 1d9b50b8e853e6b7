"""Prompt strings: patching prompts equal the shipped ones; intervention prompts follow interventions.py."""
from __future__ import annotations

import json
import random

import pytest

from data_prep.datasets import patching_lines, read_few_shot, read_pairs, read_truth
from data_prep.pairs import Pair
from data_prep.prompts import intervention_prompt, intervention_statements, patching_prompts
from data_prep.sources import fetch


def test_patching_prompts_reproduce_all_238_shipped_prompts(processed_data):
    shipped = json.loads(fetch("paper_artifacts/patching_results.json").read_text())
    records = shipped["llama-3.1-8b-instruct_cities_true_false"]
    prompts = patching_prompts("cities", read_pairs("llama3", "cities"))
    assert len(records) == len(prompts) == 238
    assert [(r["true_prompt"], r["false_prompt"]) for r in records] == prompts


def test_patching_prompts_match_the_original_global_random_loop():
    pairs = [Pair(f"T{i}.", f"F{i}.", []) for i in range(5)]
    # the original: set_random_seed(1) once, then random.shuffle(example_list) before every pair
    random.seed(1)
    example_list = patching_lines("larger_than")
    expected = []
    for pair in pairs:
        random.shuffle(example_list)
        expected.append((''.join(example_list) + pair.true + " This statement is:",
                         ''.join(example_list) + pair.false + " This statement is:"))
    assert patching_prompts("larger_than", pairs) == expected
    assert len({true for true, _ in expected}) == 5  # the order changes from pair to pair


# methods_reference §1.4: statements kept by interventions.py (true kept, false kept)
KEPT = {"cities": (746, 746), "sp_en_trans": (175, 175), "larger_than": (988, 988), "smaller_than": (988, 988),
        "neg_cities": (746, 746), "neg_sp_en_trans": (175, 175), "tulu_extracted": (98, 98),
        "animal_class": (78, 82), "inventors": (227, 175), "element_symb": (91, 91), "facts": (277, 280)}


@pytest.mark.parametrize("dataset", sorted(KEPT))
def test_intervention_statement_counts(processed_data, dataset):
    kept = intervention_statements(dataset)
    assert ((kept["label"] == 1).sum(), (kept["label"] == 0).sum()) == KEPT[dataset]


def original_prepare_data(prompts, statements, seed=1):
    """interventions.prepare_data, as in the original."""
    queries = []
    for i, statement in enumerate(statements):
        random.seed(seed + i)
        shuffled_prompts = prompts.copy()
        random.shuffle(shuffled_prompts)
        concatenated_prompts = "\n".join(shuffled_prompts)
        if statement not in concatenated_prompts:
            queries.append(concatenated_prompts + "\n" + statement + " This statement is:")
    return queries


@pytest.mark.parametrize("dataset", ["cities", "facts"])
def test_intervention_prompts_equal_the_original_prepare_data(processed_data, dataset):
    table = read_truth(dataset)
    kept = intervention_statements(dataset)
    for label in (1, 0):
        statements = table.loc[table["label"] == label, "statement"].tolist()
        expected = original_prepare_data(read_few_shot(dataset), statements)
        subset = kept[kept["label"] == label]
        assert [intervention_prompt(dataset, s, i) for s, i in zip(subset["statement"], subset["prompt_index"])] \
            == expected


def test_intervention_prompt_shape(processed_data):
    prompt = intervention_prompt("cities", "The city of Paris is in France.", 0)
    lines = prompt.split("\n")
    assert sorted(lines[:4]) == sorted(read_few_shot("cities"))
    assert lines[4] == "The city of Paris is in France. This statement is:"
    dropped = set(read_truth("cities")["statement"]) - set(intervention_statements("cities")["statement"])
    assert dropped == {"The city of Dar es Salaam is in Italy.", "The city of Kozhikode is in the United States.",
                       "The city of Dar es Salaam is in Tanzania.", "The city of Kozhikode is in India."}
