"""The deviations table: every place where the paper profile computes differently from the original code.

The rows are data, docs/deviations.yaml (fields in ROW_FIELDS, described at the top of that file). This module reads
and checks them, renders docs/DEVIATIONS.md (`python -m report.deviations` rewrites it; a test checks it is up to
date) and gives the report appendix its table. Torch-free, like the rest of report/.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, fields
from pathlib import Path

import pandas as pd
import yaml

from data_prep.paths import REPO_ROOT

DEVIATIONS_YAML = Path(__file__).with_name("deviations.yaml")  # a link to docs/deviations.yaml: the wheel carries it
DEVIATIONS_MD = REPO_ROOT / "docs" / "DEVIATIONS.md"
EXPERIMENTS = ("data", "knowledge", "truthfulness", "refusal", "confidence", "audit")
PENDING = "(pending)"  # the test of a row whose change is still open
TEST_REFERENCE = re.compile(r"(tests/test_\w+\.py)::(test_\w+)")

INTRODUCTION = """\
# Deviations from the original code

Every place where this project's `paper` profile computes something differently from the original code
([HZD01/post-training-mechanistic-analysis](https://github.com/HZD01/post-training-mechanistic-analysis) @ 4abef9d):
what the original does, what is done here, why, which published numbers (`analysis/published_numbers.yaml`) it can
move and by how much, and the test that pins the behaviour here. Generated from `docs/deviations.yaml` by
`python -m report.deviations`; edit the YAML, not this file.

Computed as the original, so not listed: the patching and intervention few-shot prompts and their shuffles, the
patch metric logit(' TRUE') - logit(' FALSE'), the 20-bin normalisation and the map comparisons (Pearson r, max
|difference|), the per-dataset centring and the mass-mean probe with its 1-D logistic threshold, the intervention
direction, layers and effect formula, the refusal templates, layers, positions and coefficients of the Llama
models, the three hook points of steering, the 16-token greedy completions and the 25-phrase refusal score, the
entropy-neuron selection (strictly above the 0.75 norm quantile, the 10 smallest LogitVar) and IoU.
"""


@dataclass(frozen=True)
class Deviation:
    id: str
    experiment: str
    original: str
    here: str
    why: str
    moves: str  # the published numbers it can move and by how much
    test: str  # tests/<file>.py::<function>, or PENDING


ROW_FIELDS = tuple(f.name for f in fields(Deviation))


def load_deviations(path: Path = DEVIATIONS_YAML) -> list[Deviation]:
    """The rows of the deviations file, checked: every field present and non-empty, no other field, known
    experiment, unique id, test a `tests/<file>.py::<function>` reference or (pending)."""
    rows = yaml.safe_load(path.read_text(encoding="utf-8"))
    if not isinstance(rows, list) or not rows:
        raise ValueError(f"{path}: expected a YAML list of rows with the fields {', '.join(ROW_FIELDS)}")
    deviations, seen = [], set()
    for number, row in enumerate(rows, start=1):
        label = row.get("id", "no id") if isinstance(row, dict) else repr(row)
        where = f"{path}, row {number} ({label})"
        if not isinstance(row, dict) or set(row) != set(ROW_FIELDS):
            keys = sorted(row) if isinstance(row, dict) else []
            raise ValueError(f"{where}: has fields {keys}; give exactly {', '.join(ROW_FIELDS)}")
        empty = [name for name in ROW_FIELDS if not isinstance(row[name], str) or not row[name].strip()]
        if empty:
            raise ValueError(f"{where}: fields {empty} must be non-empty text")
        if row["experiment"] not in EXPERIMENTS:
            raise ValueError(f"{where}: unknown experiment {row['experiment']!r}; allowed: {', '.join(EXPERIMENTS)}")
        if row["id"] in seen:
            raise ValueError(f"{where}: id {row['id']!r} is used twice; ids must be unique")
        if row["test"] != PENDING and not TEST_REFERENCE.fullmatch(row["test"]):
            raise ValueError(f"{where}: test {row['test']!r} must read tests/<file>.py::<test function> or {PENDING}")
        seen.add(row["id"])
        deviations.append(Deviation(**{name: row[name].strip() for name in ROW_FIELDS}))
    return deviations


def missing_tests(deviations: list[Deviation], root: Path = REPO_ROOT) -> list[str]:
    """The test references of `deviations` whose file has no `def <function>(` (pending rows excepted)."""
    missing = []
    for deviation in deviations:
        match = TEST_REFERENCE.fullmatch(deviation.test)
        if match is None:
            continue
        path, function = root / match[1], match[2]
        if not path.is_file() or not re.search(rf"^\s*def {function}\(", path.read_text(), re.M):
            missing.append(deviation.test)
    return missing


def _cell(text: str) -> str:
    """Text in one pipe-table cell: no line breaks, pipes escaped."""
    return " ".join(text.split()).replace("|", r"\|")


def _test_cell(test: str, link_prefix: str | None) -> str:
    """The test as code, linked to its file (at `link_prefix` + the path) unless link_prefix is None."""
    match = TEST_REFERENCE.fullmatch(test)
    if match is None:
        return test
    return f"`{test}`" if link_prefix is None else f"[`{test}`]({link_prefix}{match[1]})"


def table(deviations: list[Deviation], link_prefix: str | None = None) -> pd.DataFrame:
    """One row per deviation: experiment, id, original -> here, why, what it can move, the test (as code; a
    markdown link to its file at `link_prefix` + path when given)."""
    return pd.DataFrame({
        "experiment": [d.experiment for d in deviations],
        "id": [d.id for d in deviations],
        "original → here": [_cell(f"{d.original} → {d.here}") for d in deviations],
        "why": [_cell(d.why) for d in deviations],
        "can move (published numbers; by how much)": [_cell(d.moves) for d in deviations],
        "test": [_test_cell(d.test, link_prefix) for d in deviations],
    })


def markdown(deviations: list[Deviation]) -> str:
    """docs/DEVIATIONS.md: the introduction, then one table per experiment (links relative to docs/)."""
    parts = [INTRODUCTION]
    frame = table(deviations, link_prefix="../")
    for experiment in EXPERIMENTS:
        rows = frame[frame["experiment"] == experiment].drop(columns="experiment")
        if rows.empty:
            continue
        header = "| " + " | ".join(rows.columns) + " |"
        rule = "|" + "|".join("---" for _ in rows.columns) + "|"
        body = ["| " + " | ".join(row) + " |" for row in rows.itertuples(index=False)]
        parts.append(f"## {experiment.capitalize()}\n\n" + "\n".join([header, rule, *body]) + "\n")
    return "\n".join(parts)


def write_markdown(path: Path = DEVIATIONS_MD) -> Path:
    path.write_text(markdown(load_deviations()), encoding="utf-8")
    return path


if __name__ == "__main__":
    print(f"wrote {write_markdown()}")
