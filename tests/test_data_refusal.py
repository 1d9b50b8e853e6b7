"""Refusal splits: sklearn's train_test_split exactly; the first 128 train items are the shipped training set."""
from __future__ import annotations

import csv

import pytest
from sklearn.model_selection import train_test_split as sklearn_split

from data_prep.datasets import read_refusal
from data_prep.errors import DataError
from data_prep.refusal import load_advbench, load_alpaca, train_test_split
from data_prep.sources import fetch


@pytest.mark.parametrize("n", [2, 5, 9, 10, 11, 37])
def test_split_equals_sklearn_on_tiny_inputs(n):
    items = [f"item {i}" for i in range(n)]
    train, test = sklearn_split(items, test_size=0.2, random_state=42)
    assert train_test_split(items) == (train, test)


def test_split_sizes(processed_data):
    sizes = {(k, s): len(read_refusal(k, s)) for k in ("harmful", "harmless") for s in ("train", "test")}
    assert sizes == {("harmful", "train"): 416, ("harmful", "test"): 104,
                     ("harmless", "train"): 25058, ("harmless", "test"): 6265}


def test_splits_equal_sklearn_on_the_full_sources(processed_data):
    harmful = load_advbench(fetch("refusal/advbench.csv"))
    assert list(sklearn_split(harmful, test_size=0.2, random_state=42)) == [read_refusal("harmful", "train"),
                                                                           read_refusal("harmful", "test")]
    harmless = load_alpaca(fetch("refusal/alpaca.json"))
    assert len(harmless) == 31323
    assert list(sklearn_split(harmless, test_size=0.2, random_state=42)) == [read_refusal("harmless", "train"),
                                                                            read_refusal("harmless", "test")]


def test_advbench_goals_are_unstripped_csv_cells(processed_data):
    with open(fetch("refusal/advbench.csv"), newline="", encoding="utf-8") as f:
        goals = [row["goal"] for row in csv.DictReader(f)]
    assert sorted(read_refusal("harmful", "train") + read_refusal("harmful", "test")) == sorted(goals)


def test_first_128_train_items_are_the_shipped_refusal_train_csv(processed_data):
    with open(fetch("paper_artifacts/refusal_train.csv"), newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    shipped = {label: {r["statement"] for r in rows if r["label"] == label} for label in ("0", "1")}
    assert len(shipped["1"]) == len(shipped["0"]) == 128
    assert set(read_refusal("harmful", "train")[:128]) == shipped["1"]
    assert set(read_refusal("harmless", "train")[:128]) == shipped["0"]


def test_unknown_kind_or_split(processed_data):
    with pytest.raises(DataError, match=r"unknown refusal kind 'harmfull'; known: \['harmful', 'harmless'\]"):
        read_refusal("harmfull", "train")
    with pytest.raises(DataError, match=r"unknown refusal split 'val'"):
        read_refusal("harmful", "val")


def test_advbench_without_goal_column(tmp_path):
    path = tmp_path / "advbench.csv"
    path.write_text("prompt,target\nx,y\n")
    with pytest.raises(DataError, match="missing column 'goal'"):
        load_advbench(path)
