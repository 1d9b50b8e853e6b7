"""Cube store: write/read round trips, resume semantics, provenance attrs that survive later writes."""
import numpy as np
import pytest
import xarray as xr
import zarr

from replication.cubes import COMPLETE_ATTR, UNITS_GROUP, CubeStore, StaleCubeError, open_cube, set_aside
from replication.config import load_profile
from replication.provenance import git_commit, package_versions


def unit_dataset(seed: int) -> xr.Dataset:
    rng = np.random.default_rng(seed)
    return xr.Dataset(
        {"patch_effect": (("layer", "token"), rng.normal(size=(3, 4)))},
        coords={"layer": [0, 1, 2], "token": ["[s1]", "is", "in", "[o1]"], "dataset": "cities"},
        attrs={"n_pairs": 7},
    )


def test_round_trip_keeps_values_labels_and_attrs(tmp_path):
    store = CubeStore(tmp_path / "knowledge.zarr", provenance={"git_commit": "abc", "models": {"m": {"hf_id": "x"}}})
    original = unit_dataset(0)
    store.write_unit("m__cities", original)
    back = CubeStore(tmp_path / "knowledge.zarr").read_unit("m__cities")
    xr.testing.assert_identical(back.drop_attrs(), original.drop_attrs())
    assert back.attrs["n_pairs"] == 7 and "finished_at" in back.attrs
    assert store.attrs["models"] == {"m": {"hf_id": "x"}}


def test_root_attrs_survive_unit_writes_and_are_merged(tmp_path):
    path = tmp_path / "c.zarr"
    CubeStore(path, provenance={"git_commit": "abc", "seed": 1})
    store = CubeStore(path, provenance={"seed": 2, "device": "cpu"})
    store.write_unit("a", unit_dataset(0))
    store.write_unit("b", unit_dataset(1))
    store.update_attrs(finished_at="t")
    assert open_cube(path).attrs == {"git_commit": "abc", "seed": 2, "device": "cpu", "finished_at": "t"}


@pytest.mark.filterwarnings("ignore:The data type")  # the simulated half-write uses fixed-width strings
def test_unfinished_unit_is_invisible_and_rewritten(tmp_path):
    path = tmp_path / "c.zarr"
    store = CubeStore(path)
    store.write_unit("done", unit_dataset(0))
    # Simulate a run killed after writing data but before the completion marker.
    unit_dataset(1).to_zarr(str(path), group=f"{UNITS_GROUP}/half", mode="w", zarr_format=3, consolidated=False)
    assert store.unit_names() == ["done"]
    assert not store.has_unit("half")
    with pytest.raises(KeyError, match="no finished unit 'half'"):
        store.read_unit("half")
    store.write_unit("half", unit_dataset(2))
    assert store.unit_names() == ["done", "half"]
    np.testing.assert_array_equal(store.read_unit("half").patch_effect, unit_dataset(2).patch_effect)
    assert zarr.open_group(str(path), path=f"{UNITS_GROUP}/half").attrs[COMPLETE_ATTR] is True


def test_bad_unit_name_and_missing_cube_errors(tmp_path):
    store = CubeStore(tmp_path / "c.zarr")
    with pytest.raises(ValueError, match="unit name 'a/b'"):
        store.write_unit("a/b", unit_dataset(0))
    with pytest.raises(FileNotFoundError, match="ptr run refusal --profile demo"):
        open_cube(tmp_path / "demo" / "refusal.zarr")


def test_provenance_pieces():
    commit = git_commit()
    assert commit == "unknown" or len(commit.split("+")[0]) == 40
    versions = package_versions(["xarray", "no-such-package-xyz"])
    assert versions["xarray"] == xr.__version__ and versions["no-such-package-xyz"] == "not installed"


def test_reading_an_existing_store_writes_nothing(tmp_path):
    path = tmp_path / "c.zarr"
    store = CubeStore(path, provenance={"seed": 1})
    store.write_unit("a", unit_dataset(0))
    snapshot = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in path.rglob("*") if p.is_file()}
    reader = open_cube(path)
    assert reader.unit_names() == ["a"] and reader.attrs["seed"] == 1
    assert reader.unit_attrs("a")["finished_at"] >= reader.unit_attrs("a")["started_at"]
    reader.read_units()
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in path.rglob("*") if p.is_file()} == snapshot


EXPERIMENTS = ("knowledge", "truthfulness", "refusal", "confidence")
PROVENANCE_KEYS = {"experiment", "git_commit", "profile", "config_hash", "experiment_hash", "models", "data",
                   "packages", "dtype", "device", "seed", "started_at", "finished_at"}


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_cube_records_provenance_and_its_finish(tiny_results, experiment):
    attrs = open_cube(tiny_results / "tiny" / f"{experiment}.zarr").attrs
    assert PROVENANCE_KEYS <= set(attrs), PROVENANCE_KEYS - set(attrs)
    assert attrs["experiment"] == experiment and attrs["profile"] == "tiny"
    assert attrs["experiment_hash"] == load_profile("tiny").experiment_hash(experiment)
    assert attrs["finished_at"] is not None and attrs["finished_at"] >= attrs["started_at"]
    assert attrs["data"]["sha256"] and set(attrs["models"]) and "torch" in attrs["packages"]


def test_a_cube_from_another_configuration_is_refused_then_set_aside_intact(tmp_path):
    path = tmp_path / "knowledge.zarr"
    store = CubeStore(path, provenance={"experiment_hash": "a" * 64, "seed": 1})
    store.write_unit("m__cities", xr.Dataset({"effect": ("layer", np.arange(3.0))}))
    CubeStore(path, provenance={"experiment_hash": "a" * 64, "seed": 1})  # same configuration: resumes
    with pytest.raises(StaleCubeError, match=r"1 finished unit.*aaaaaaaaaaaa there, bbbbbbbbbbbb now.*--fresh"):
        CubeStore(path, provenance={"experiment_hash": "b" * 64, "seed": 1})
    assert open_cube(path).attrs["experiment_hash"] == "a" * 64  # the refusal changed nothing
    kept = set_aside(path)
    assert not path.exists() and kept.name.startswith("knowledge.stale-") and kept.suffix == ".zarr"
    assert open_cube(kept).read_unit("m__cities").effect.values.tolist() == [0.0, 1.0, 2.0]
    fresh = CubeStore(path, provenance={"experiment_hash": "b" * 64, "seed": 1})
    assert fresh.unit_names() == [] and set_aside(tmp_path / "missing.zarr") is None


def test_a_cube_without_finished_units_takes_the_new_configuration(tmp_path):
    path = tmp_path / "refusal.zarr"
    CubeStore(path, provenance={"experiment_hash": "a" * 64})
    assert CubeStore(path, provenance={"experiment_hash": "b" * 64}).attrs["experiment_hash"] == "b" * 64


def test_read_units_of_one_kind(tmp_path):
    store = CubeStore(tmp_path / "c.zarr", provenance={"seed": 1})
    for name in ("weights__a", "weights__b", "outputs__a__cities", "weightsx__c"):
        store.write_unit(name, xr.Dataset({"v": ("i", np.arange(2.0))}))
    assert list(store.read_units("weights")) == ["weights__a", "weights__b"]
    assert len(store.read_units()) == 4 and list(store.read_units("outputs")) == ["outputs__a__cities"]
