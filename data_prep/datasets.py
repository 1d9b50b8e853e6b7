"""Readers: the only way other packages read processed data (built by `ptr data` / `make data`).

The statement tables and refusal splits are Hugging Face datasets (data_prep/hf.py); pandas reads their parquet
files directly, which needs no datasets cache and returns the same values."""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from data_prep import paths
from data_prep.errors import DataError
from data_prep.pairs import Pair, patching_spec
from data_prep.refusal import KINDS, SPLITS
from data_prep.truth import truth_datasets

MANIFEST = "manifest.json"
DATA_FILE = "data.parquet"  # of each Hugging Face dataset directory (data_prep/hf.py)
BUILD_HINT = "run `ptr data` (or `make data`) to build it"


def processed_file(relative: str) -> Path:
    """A processed file; a clear error when the processed data (or this file) was not built."""
    root = paths.processed_dir()
    if not (root / MANIFEST).exists():
        raise DataError(f"the processed data directory {root} was not built (no {MANIFEST}); {BUILD_HINT}")
    path = root / relative
    if not path.exists():
        raise DataError(f"{path} is missing from the processed data; {BUILD_HINT}")
    return path


def _check_name(name: str, known: list[str] | tuple[str, ...], what: str) -> None:
    if name not in known:
        raise DataError(f"unknown {what} {name!r}; known: {sorted(known)}")


def read_truth(name: str) -> pd.DataFrame:
    """Columns statement (str), label (int 0/1) (+ id for tulu_extracted), in file order."""
    _check_name(name, truth_datasets(), "truth dataset")
    return pd.read_parquet(processed_file(f"truth/{name}/{DATA_FILE}"))  # label: the ClassLabel's int 0/1


def read_few_shot(name: str) -> list[str]:
    """The 4 lines of few_shot_samples.json for `name` ("<statement> This statement is: TRUE|FALSE")."""
    lines_by_dataset = json.loads(processed_file("few_shot.json").read_text(encoding="utf-8"))
    _check_name(name, list(lines_by_dataset), "few-shot dataset")
    return list(lines_by_dataset[name])


def patching_lines(name: str) -> list[str]:
    """The hard-coded patching few-shot lines (patching.yaml): TRUE lines, then FALSE lines, each ending in \\n."""
    spec = patching_spec(name)
    return ([f"{s} This statement is: TRUE\n" for s in spec.few_shot_true]
            + [f"{s} This statement is: FALSE\n" for s in spec.few_shot_false])


def read_pairs_file(tokenizer_key: str, name: str) -> dict:
    """The whole pairs file: dataset, tokenizer_key, pattern (how the pairs were chosen), pairs."""
    patching_spec(name)  # unknown dataset -> error listing the known ones
    pairs_root = paths.processed_dir() / "pairs"
    if not (pairs_root / tokenizer_key).is_dir():
        built = sorted(p.name for p in pairs_root.iterdir()) if pairs_root.is_dir() else []
        raise DataError(f"no patching pairs were built for tokenizer {tokenizer_key!r} (built: {built}); "
                        f"{BUILD_HINT} with a profile that uses this tokenizer")
    return json.loads(processed_file(f"pairs/{tokenizer_key}/{name}.json").read_text(encoding="utf-8"))


def read_pairs(tokenizer_key: str, name: str) -> list[Pair]:
    return [Pair(p["true"], p["false"], p["roles"]) for p in read_pairs_file(tokenizer_key, name)["pairs"]]


def read_refusal(kind: str, split: str) -> list[str]:
    """kind harmful (AdvBench) / harmless (Alpaca), split train / test."""
    _check_name(kind, KINDS, "refusal kind")
    _check_name(split, SPLITS, "refusal split")
    return pd.read_parquet(processed_file(f"refusal/{kind}_{split}/{DATA_FILE}"))["instruction"].tolist()


def instructions(kind: str, split: str, n: int) -> list[str]:
    """The first n instructions of a kind (harmful / harmless) and split (train / test)."""
    items = read_refusal(kind, split)
    if len(items) < n:
        raise ValueError(f"the {kind} {split} split has {len(items)} instructions; the profile asks for {n}")
    return items[:n]
