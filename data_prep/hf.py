"""Processed tables as Hugging Face datasets: a directory with `data.parquet` (typed: the datasets Features ride in
the parquet schema, e.g. the truth label as a ClassLabel) and a short dataset card `README.md`. Anyone can load one
without this package: `datasets.load_dataset("parquet", data_files="data/processed/truth/cities/data.parquet")`
or `datasets.load_dataset("data/processed/truth/cities")`. Our readers (data_prep.datasets) read the same files
with pandas."""
from __future__ import annotations

import io

import datasets
import pandas as pd
import yaml

from data_prep.datasets import DATA_FILE

TRUTH_LABEL = datasets.ClassLabel(names=["false", "true"])  # 0 = false, 1 = true, as in the original CSVs
datasets.disable_progress_bars()  # one bar per written file otherwise; `ptr data` has its own
CARD_FILE = "README.md"


def truth_features(columns: list[str]) -> datasets.Features:
    kinds = {"id": datasets.Value("string"), "statement": datasets.Value("string"), "label": TRUTH_LABEL}
    return datasets.Features({c: kinds[c] for c in columns})


def instruction_features() -> datasets.Features:
    return datasets.Features({"instruction": datasets.Value("string")})


def dataset_files(directory: str, table: pd.DataFrame, features: datasets.Features, title: str,
                  description: str) -> dict[str, bytes]:
    """{relative path: bytes} of the dataset directory: the parquet file and its card."""
    dataset = datasets.Dataset.from_pandas(table, features=features, preserve_index=False)
    buffer = io.BytesIO()
    dataset.to_parquet(buffer)
    front = {"configs": [{"config_name": "default", "data_files": DATA_FILE}],
             "dataset_info": {"features": features._to_yaml_list()}}
    card = (f"---\n{yaml.safe_dump(front, sort_keys=False)}---\n\n# {title}\n\n{description}\n\n"
            f"Rows: {len(table)}. Columns: {', '.join(f'`{c}` ({_kind(f)})' for c, f in features.items())}.\n\n"
            f"Built by `ptr data` (data_prep/build.py); load with\n"
            f"`datasets.load_dataset(\"parquet\", data_files=\"{directory}/{DATA_FILE}\")`.\n")
    return {f"{directory}/{DATA_FILE}": buffer.getvalue(), f"{directory}/{CARD_FILE}": card.encode("utf-8")}


def _kind(feature) -> str:
    if isinstance(feature, datasets.ClassLabel):
        return "class label: " + ", ".join(f"{i} = {n}" for i, n in enumerate(feature.names))
    return feature.dtype
