"""Refusal instruction sets (methods_reference §1.5): AdvBench harmful and Alpaca harmless instructions, split
80/20 exactly as the original's sklearn `train_test_split(test_size=0.2, random_state=42)`."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd

from data_prep.errors import DataError

TEST_FRACTION = 0.2
SPLIT_SEED = 42
KINDS = ("harmful", "harmless")
SPLITS = ("train", "test")


def load_advbench(path: Path) -> list[str]:
    """The `goal` column, unstripped, in file order (the original reads it with pandas)."""
    table = pd.read_csv(path, dtype=str, keep_default_na=False)
    if "goal" not in table.columns:
        raise DataError(f"{path}: missing column 'goal'; the header has {list(table.columns)}")
    return _check_instructions(table["goal"].tolist(), path)


def load_alpaca(path: Path) -> list[str]:
    """andyrdt/refusal_direction's alpaca.json: a list of {instruction, category}, already restricted to the
    Alpaca instructions with an empty input (the original's filter on tatsu-lab/alpaca)."""
    entries = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(entries, list) or not all(isinstance(e, dict) and "instruction" in e for e in entries):
        raise DataError(f"{path}: expected a JSON list of objects with an 'instruction' key")
    return _check_instructions([e["instruction"] for e in entries], path)


def _check_instructions(instructions: list, path: Path) -> list[str]:
    if not instructions:
        raise DataError(f"{path}: no instructions")
    for i, text in enumerate(instructions):
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"{path}, item {i + 1}: empty or non-text instruction {text!r}")
    return instructions


def train_test_split(items: list[str], test_fraction: float = TEST_FRACTION,
                     seed: int = SPLIT_SEED) -> tuple[list[str], list[str]]:
    """sklearn's train_test_split(items, test_size=test_fraction, random_state=seed): a RandomState(seed)
    permutation; test = its first ceil(test_fraction * n) indices, train = the rest, in permutation order."""
    n_test = math.ceil(test_fraction * len(items))
    order = np.random.RandomState(seed).permutation(len(items))
    return [items[i] for i in order[n_test:]], [items[i] for i in order[:n_test]]


def refusal_splits(advbench: Path, alpaca: Path) -> dict[tuple[str, str], list[str]]:
    """{(kind, split): instructions} for kind harmful/harmless and split train/test."""
    splits = {}
    for kind, instructions in (("harmful", load_advbench(advbench)), ("harmless", load_alpaca(alpaca))):
        splits[kind, "train"], splits[kind, "test"] = train_test_split(instructions)
    return splits
