"""Truth tables and few-shot lines: processed copies equal the sources; malformed input gives clear errors."""
from __future__ import annotations

import csv
import json

import pytest

from data_prep.datasets import patching_lines, read_few_shot, read_truth
from data_prep.errors import DataError
from data_prep.truth import load_truth_csv, truth_datasets

ALL_TRUTH = ("animal_class", "cities", "element_symb", "facts", "inventors", "larger_than", "neg_animal_class",
             "neg_cities", "neg_element_symb", "neg_facts", "neg_inventors", "neg_sp_en_trans", "smaller_than",
             "sp_en_trans", "tulu_extracted")


def test_the_fifteen_truth_datasets():
    assert sorted(truth_datasets()) == sorted(ALL_TRUTH)


@pytest.mark.parametrize("name", ALL_TRUTH)
def test_processed_table_equals_the_source_csv(processed_data, mirror, name):
    with open(mirror / "truth" / f"{name}.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    table = read_truth(name)
    assert table["statement"].tolist() == [r["statement"] for r in rows]
    assert table["label"].tolist() == [int(r["label"]) for r in rows]
    assert table["label"].dtype.kind == "i"
    if name == "tulu_extracted":
        assert table["id"].tolist() == [r["id"] for r in rows]


def test_published_row_and_label_counts(processed_data):
    # methods_reference §1.7
    expected = {"cities": (748, 748), "larger_than": (990, 990), "sp_en_trans": (177, 177), "facts": (279, 282),
                "inventors": (229, 177), "animal_class": (80, 84), "neg_facts": (282, 279),
                "tulu_extracted": (100, 100)}
    for name, (n_true, n_false) in expected.items():
        labels = read_truth(name)["label"]
        assert ((labels == 1).sum(), (labels == 0).sum()) == (n_true, n_false), name


def write(tmp_path, text):
    path = tmp_path / "table.csv"
    path.write_text(text)
    return path


def test_missing_column_is_named(tmp_path):
    with pytest.raises(DataError, match=r"table.csv: missing required column\(s\) \['label'\]"):
        load_truth_csv(write(tmp_path, "statement,truth\nThe sky is blue.,1\n"))


def test_empty_file(tmp_path):
    with pytest.raises(DataError, match="table.csv: the file is empty"):
        load_truth_csv(write(tmp_path, ""))


def test_header_only(tmp_path):
    with pytest.raises(DataError, match="no data rows"):
        load_truth_csv(write(tmp_path, "statement,label\n"))


def test_wrong_label_names_file_and_row(tmp_path):
    with pytest.raises(DataError, match=r"table.csv, data row 2 \(line 3\): label 'yes' is not one of the allowed"):
        load_truth_csv(write(tmp_path, "statement,label\nA.,1\nB.,yes\nC.,0\n"))


def test_empty_statement_names_the_row(tmp_path):
    with pytest.raises(DataError, match=r"data row 1 \(line 2\): empty statement"):
        load_truth_csv(write(tmp_path, "statement,label\n  ,1\n"))


def test_few_shot_lines(processed_data, mirror):
    entries = json.loads((mirror / "truth" / "few_shot_samples.json").read_text())
    assert len(entries) == 18
    for entry in entries:
        assert read_few_shot(entry["dataset_name"]) == entry["few_shot_examples"]
    assert read_few_shot("cities") == [
        "The city of Dar es Salaam is in Italy. This statement is: FALSE",
        "The city of Kozhikode is in the United States. This statement is: FALSE",
        "The city of Dar es Salaam is in Tanzania. This statement is: TRUE",
        "The city of Kozhikode is in India. This statement is: TRUE",
    ]


def test_patching_lines_true_then_false():
    assert patching_lines("cities") == [
        "The city of Dar es Salaam is in Tanzania. This statement is: TRUE\n",
        "The city of Kozhikode is in India. This statement is: TRUE\n",
        "The city of Dar es Salaam is in Italy. This statement is: FALSE\n",
        "The city of Kozhikode is in the United States. This statement is: FALSE\n",
    ]
    # neg_sp_en_trans: the sp_en_trans words with "does not mean", labels flipped
    negated = [line.replace(" means ", " does not mean ") for line in patching_lines("sp_en_trans")]
    flipped = ([line.replace("TRUE", "FALSE") for line in negated[:2]]
               + [line.replace("FALSE", "TRUE") for line in negated[2:]])
    assert patching_lines("neg_sp_en_trans") == flipped[2:] + flipped[:2]
    for name in ("cities", "neg_cities", "larger_than", "smaller_than", "sp_en_trans", "neg_sp_en_trans",
                 "tulu_extracted"):
        lines = patching_lines(name)
        assert len(lines) == 4 and all(line.endswith(" This statement is: TRUE\n") for line in lines[:2])
        assert all(line.endswith(" This statement is: FALSE\n") for line in lines[2:])


def test_patching_lines_are_the_few_shot_samples_lines_reordered(processed_data):
    # Independent check of the reconstructed lines (neg_cities, neg_sp_en_trans): for the template datasets the
    # hard-coded patching lines are the few_shot_samples.json lines in another order; tulu_extracted's differ.
    for name in ("cities", "neg_cities", "larger_than", "smaller_than", "sp_en_trans", "neg_sp_en_trans"):
        assert sorted(line.rstrip("\n") for line in patching_lines(name)) == sorted(read_few_shot(name)), name
    assert not set(read_few_shot("tulu_extracted")) & {line.rstrip("\n") for line in patching_lines("tulu_extracted")}


def test_unknown_dataset_lists_known_ones(processed_data):
    with pytest.raises(DataError, match=r"unknown truth dataset 'city'; known: \['animal_class', 'cities'"):
        read_truth("city")
    with pytest.raises(DataError, match="unknown few-shot dataset 'neg_facts'"):
        read_few_shot("neg_facts")
    with pytest.raises(DataError, match="no patching data for dataset 'facts'"):
        patching_lines("facts")


def test_unbuilt_processed_dir_says_how_to_build(tmp_path, monkeypatch):
    monkeypatch.setenv("PTR_DATA_DIR", str(tmp_path))
    with pytest.raises(DataError, match=r"was not built .* run `ptr data` \(or `make data`\)"):
        read_truth("cities")
