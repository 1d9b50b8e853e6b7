"""True/false statement tables (Marks & Tegmark, Bürger et al., the authors' tulu_extracted) and few-shot lines.

Raw CSVs are validated on load; errors name the file, the row and the problem.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd

from data_prep.errors import DataError
from data_prep.sources import sources_with_role

REQUIRED_COLUMNS = ("statement", "label")
OPTIONAL_COLUMNS = ("id",)  # tulu_extracted: the Tulu-3 SFT mixture id shared by a true/false pair
FEW_SHOT_LINE = re.compile(r".+ This statement is: (TRUE|FALSE)", re.DOTALL)  # some unused sets span lines
FEW_SHOT_COUNT = 4


def truth_datasets() -> tuple[str, ...]:
    """Names of the statement tables: the stems of the sources with role `truth`."""
    return tuple(Path(s.name).stem for s in sources_with_role("truth"))


def load_truth_csv(path: Path) -> pd.DataFrame:
    """Columns statement (str), label (int 0/1) and id where the file has one, in file order."""
    if path.stat().st_size == 0 or not path.read_text(encoding="utf-8").strip():
        raise DataError(f"{path}: the file is empty; expected a CSV header with columns {list(REQUIRED_COLUMNS)}")
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
    except pd.errors.ParserError as exc:
        raise DataError(f"{path}: not a well-formed CSV ({exc})") from exc
    missing = [c for c in REQUIRED_COLUMNS if c not in table.columns]
    if missing:
        raise DataError(f"{path}: missing required column(s) {missing}; the header has {list(table.columns)}")
    if table.empty:
        raise DataError(f"{path}: the file has a header but no data rows")
    for i, (statement, label) in enumerate(zip(table["statement"], table["label"])):
        where = f"{path}, data row {i + 1} (line {i + 2})"
        if label.strip() not in ("0", "1"):
            raise DataError(f"{where}: label {label!r} is not one of the allowed values 0, 1")
        if not statement.strip():
            raise DataError(f"{where}: empty statement")
    columns = [c for c in OPTIONAL_COLUMNS if c in table.columns] + list(REQUIRED_COLUMNS)
    table = table[columns].copy()
    table["label"] = table["label"].str.strip().astype(int)
    return table


def load_few_shot_json(path: Path) -> dict[str, list[str]]:
    """few_shot_samples.json -> {dataset: its 4 lines "<statement> This statement is: TRUE|FALSE"}."""
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(entries, list):
        raise DataError(f"{path}: expected a list of {{dataset_name, few_shot_examples}} objects")
    lines_by_dataset: dict[str, list[str]] = {}
    for i, entry in enumerate(entries):
        where = f"{path}, entry {i}"
        if not isinstance(entry, dict) or set(entry) != {"dataset_name", "few_shot_examples"}:
            raise DataError(f"{where}: expected exactly the keys dataset_name, few_shot_examples")
        name, lines = entry["dataset_name"], entry["few_shot_examples"]
        if name in lines_by_dataset:
            raise DataError(f"{where}: dataset {name!r} appears twice")
        if not isinstance(lines, list) or len(lines) != FEW_SHOT_COUNT:
            raise DataError(f"{where} ({name}): expected a list of {FEW_SHOT_COUNT} lines")
        for line in lines:
            if not isinstance(line, str) or not FEW_SHOT_LINE.fullmatch(line):
                raise DataError(f"{where} ({name}): line {line!r} is not '<statement> This statement is: TRUE|FALSE'")
        lines_by_dataset[name] = lines
    return lines_by_dataset
