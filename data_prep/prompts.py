"""Prompt strings of the original experiments (pure string functions over the processed data).

Patching (patching.py): 4 hard-coded few-shot lines, one list shuffled in place again for every pair.
Interventions (interventions.py): the 4 few_shot_samples.json lines, shuffled with random.seed(1 + i).
"""
from __future__ import annotations

import random
from collections.abc import Sequence

import pandas as pd

from data_prep.datasets import patching_lines, read_few_shot, read_truth
from data_prep.pairs import Pair

SUFFIX = " This statement is:"


def patching_prompts(dataset: str, pairs: Sequence[Pair], seed: int = 1) -> list[tuple[str, str]]:
    """(true_prompt, false_prompt) per pair: the few-shot lines concatenated, then "<statement> This statement is:".

    The original seeds once (set_random_seed(1); only python's `random` matters) and shuffles the same list in
    place before each pair, so pair i's order depends on all earlier shuffles."""
    lines = patching_lines(dataset)
    rng = random.Random(seed)
    prompts = []
    for pair in pairs:
        rng.shuffle(lines)
        prefix = "".join(lines)
        prompts.append((prefix + pair.true + SUFFIX, prefix + pair.false + SUFFIX))
    return prompts


def intervention_prompt(dataset: str, statement: str, i: int, seed: int = 1) -> str:
    """The i-th statement's prompt: few-shot lines shuffled with random.seed(seed + i), joined with newlines."""
    lines = read_few_shot(dataset)
    random.Random(seed + i).shuffle(lines)
    return "\n".join(lines) + "\n" + statement + SUFFIX


def intervention_statements(dataset: str) -> pd.DataFrame:
    """The statements used by the intervention experiment, in file order: columns statement, label and
    prompt_index (the statement's position among the statements with its label: the `i` of intervention_prompt).
    Statements that occur inside the few-shot text are dropped (after numbering, as in the original)."""
    table = read_truth(dataset)[["statement", "label"]].copy()
    table["prompt_index"] = table.groupby("label").cumcount()
    few_shot_text = "\n".join(read_few_shot(dataset))
    inside = table["statement"].map(lambda s: s in few_shot_text)
    return table[~inside].reset_index(drop=True)


def balanced_head(table: pd.DataFrame, max_statements: int | None) -> pd.DataFrame:
    """At most `max_statements` rows: the first ceil(n/2) true and first floor(n/2) false statements in file order
    (kept in file order). Balanced so that small samples hold both classes (larger_than's first 100 rows hold 3
    true statements). None = every row."""
    if max_statements is None:
        return table.reset_index(drop=True)
    quota = table["label"].map({1: (max_statements + 1) // 2, 0: max_statements // 2})
    return table[table.groupby("label").cumcount() < quota].reset_index(drop=True)


def intervention_table(dataset: str, max_statements: int | None) -> pd.DataFrame:
    """The intervention statements (those not inside the few-shot text) with their prompts: columns statement,
    label, prompt_index, prompt."""
    table = balanced_head(intervention_statements(dataset), max_statements)
    table["prompt"] = [intervention_prompt(dataset, s, i) for s, i in zip(table["statement"], table["prompt_index"])]
    return table
