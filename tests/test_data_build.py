"""build_all: manifest contents, skipping current units, rebuilding stale ones."""
from __future__ import annotations

import hashlib
import json

import pytest

from data_prep import build
from data_prep.build import build_all
from data_prep.datasets import read_pairs, read_truth
from data_prep.errors import DataError
from data_prep.sources import source


def byte_encode(text: str) -> list[int]:
    """A tokenizer with one token per UTF-8 byte: the pair builder must work for any tokenizer."""
    return list(text.encode("utf-8"))


def test_manifest_lists_inputs_outputs_and_counts(processed_data):
    root = processed_data / "processed"
    manifest = json.loads((root / "manifest.json").read_text())
    units = manifest["units"]
    assert units["pairs/llama3/cities"]["counts"] == {"pairs": 238}
    assert units["truth/facts"]["counts"] == {"rows": 561, "true": 279, "false": 282}
    assert units["refusal"]["counts"]["harmless_train"] == 25058
    for name, entry in units.items():
        for raw, sha in entry["inputs"].items():
            assert sha == source(raw).sha256, name
        for rel, sha in entry["outputs"].items():
            assert hashlib.sha256((root / rel).read_bytes()).hexdigest() == sha, rel


def mtimes(root):
    return {p.relative_to(root).as_posix(): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


def test_current_units_are_skipped_and_stale_ones_rebuilt(tmp_path, monkeypatch, mirror):
    monkeypatch.setenv("PTR_DATA_DIR", str(tmp_path))
    root = tmp_path / "processed"
    build_all(mirror=mirror, tokenizers={"bytes": byte_encode}, progress=False)
    first = mtimes(root)
    assert len(read_pairs("bytes", "cities")) > 0

    build_all(mirror=mirror, tokenizers={"bytes": byte_encode}, progress=False)
    assert mtimes(root) == first  # nothing rewritten, not even the manifest

    (root / "truth" / "cities" / "data.parquet").write_bytes(b"PAR1")  # a damaged output is rebuilt
    build_all(mirror=mirror, tokenizers={"bytes": byte_encode}, progress=False)
    assert len(read_truth("cities")) == 1496
    changed = {k for k, v in mtimes(root).items() if first[k] != v}
    assert changed == {"truth/cities/data.parquet", "truth/cities/README.md", "manifest.json"}

    shifted = lambda text: [b + 1 for b in byte_encode(text)]  # another tokenizer under the same key
    before = mtimes(root)
    build_all(mirror=mirror, tokenizers={"bytes": shifted}, progress=False)
    changed = {k for k, v in mtimes(root).items() if before[k] != v}
    assert changed == {f"pairs/bytes/{d}.json" for d in ("cities", "neg_cities", "larger_than", "smaller_than",
                                                         "sp_en_trans", "neg_sp_en_trans", "tulu_extracted")} | {
        "manifest.json"}


def test_a_rebuilt_unit_removes_the_files_it_no_longer_writes(tmp_path, monkeypatch, mirror):
    monkeypatch.setenv("PTR_DATA_DIR", str(tmp_path))
    root = tmp_path / "processed"
    build_all(mirror=mirror, progress=False)
    manifest = json.loads((root / "manifest.json").read_text())
    entry = manifest["units"]["truth/cities"]
    entry["outputs"]["truth/cities.csv"] = "0" * 64  # as an older layout wrote it
    entry["code_version"] = "older"
    (root / "manifest.json").write_text(json.dumps(manifest))
    (root / "truth" / "cities.csv").write_text("statement,label\n")
    build_all(mirror=mirror, progress=False)
    assert not (root / "truth" / "cities.csv").exists() and len(read_truth("cities")) == 1496
    assert "truth/cities.csv" not in json.loads((root / "manifest.json").read_text())["units"]["truth/cities"]["outputs"]


def test_a_new_code_version_rebuilds_everything(tmp_path, monkeypatch, mirror):
    monkeypatch.setenv("PTR_DATA_DIR", str(tmp_path))
    build_all(mirror=mirror, progress=False)
    before = mtimes(tmp_path / "processed")
    monkeypatch.setattr(build, "code_version", lambda: "another version")
    build_all(mirror=mirror, progress=False)
    after = mtimes(tmp_path / "processed")
    assert all(after[k] != v for k, v in before.items())


def test_byte_tokenizer_roles_cover_every_statement_byte(tmp_path, monkeypatch, mirror):
    monkeypatch.setenv("PTR_DATA_DIR", str(tmp_path))
    build_all(mirror=mirror, tokenizers={"bytes": byte_encode}, progress=False)
    for pair in read_pairs("bytes", "sp_en_trans"):
        assert len(pair.roles) == len(byte_encode(pair.true)) == len(byte_encode(pair.false))
        assert pair.roles[:4] == ["The#1", "The#2", "The#3", "Spanish#1"]


def test_bad_raw_file_stops_the_build_with_its_name(tmp_path, monkeypatch, mirror):
    monkeypatch.setenv("PTR_DATA_DIR", str(tmp_path))
    cached = tmp_path / "raw" / "truth" / "facts.csv"
    cached.parent.mkdir(parents=True)
    cached.write_text("statement,label\nx,1\n")
    with pytest.raises(DataError, match="facts.csv.*delete the cached file"):
        build_all(mirror=mirror, progress=False)


def test_processed_tables_are_hugging_face_datasets_anyone_can_load(processed_data, mirror, tmp_path):
    """load_dataset("parquet") without this package gives the typed features (the truth label a ClassLabel) and
    the same rows as our readers and as the raw files."""
    import datasets
    import pandas as pd

    from data_prep.datasets import read_refusal
    from data_prep.truth import load_truth_csv

    root = processed_data / "processed"
    for name in ("cities", "tulu_extracted"):
        loaded = datasets.load_dataset("parquet", data_files=str(root / "truth" / name / "data.parquet"),
                                       cache_dir=str(tmp_path / "cache"))["train"]
        assert loaded.features["label"] == datasets.ClassLabel(names=["false", "true"])
        raw = load_truth_csv(mirror / "truth" / f"{name}.csv")
        assert loaded.to_pandas().to_dict("list") == raw.to_dict("list") == read_truth(name).to_dict("list")
        card = (root / "truth" / name / "README.md").read_text()
        assert card.startswith("---\nconfigs:") and f"Rows: {len(raw)}." in card and source(f"truth/{name}.csv").repository in card
    assert read_truth("cities")["label"].dtype == "int64"
    harmful = datasets.load_dataset(str(root / "refusal" / "harmful_test"), cache_dir=str(tmp_path / "cache"))
    assert harmful["train"]["instruction"] == read_refusal("harmful", "test")
    assert isinstance(read_refusal("harmless", "train")[0], str)
    assert pd.read_parquet(root / "refusal" / "harmless_train" / "data.parquet").shape == (25058, 1)
