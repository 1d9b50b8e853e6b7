"""replication.results.load: one labelled Dataset per experiment, checked unit by unit against the cube's own
units (the slow obvious reading: CubeStore.read_unit)."""
from __future__ import annotations

import numpy as np
import pytest
import xarray as xr

from replication import results
from replication.cubes import open_cube


def unit_labels(experiment: str, name: str) -> tuple[str | None, dict]:
    keys = results.UNIT_KEYS[experiment]
    parts = name.split("__")
    kind = parts[0] if None not in keys else None
    labels = parts[1:] if kind else parts
    return kind, {d: float(v) if d in results.NUMERIC_KEYS else v for d, v in zip(keys[kind], labels)}


def as_compared(values: np.ndarray) -> np.ndarray:
    return values.astype(object) if values.dtype.kind in "TUO" else values


@pytest.mark.parametrize("experiment", ["knowledge", "truthfulness", "refusal", "confidence"])
def test_load_holds_every_unit_at_its_labels(tiny_results, monkeypatch, experiment):
    monkeypatch.setenv("PTR_RESULTS_DIR", str(tiny_results))
    store = open_cube(tiny_results / "tiny" / f"{experiment}.zarr")
    by_kind = {kind: results.load(experiment, "tiny", kind=kind) for kind in results.UNIT_KEYS[experiment]
               if kind is None or store.read_units(kind)}
    checked = 0
    for name in store.unit_names():
        unit = store.read_unit(name)
        kind, labels = unit_labels(experiment, name)
        cell = by_kind[kind].sel(labels)
        for var in list(unit.data_vars) + [c for c in unit.coords if c not in unit.indexes and c not in labels]:
            got = cell[var].sel({d: unit[d].values for d in unit[var].dims if d in unit.indexes})
            got = got.isel({d: slice(0, unit.sizes[d]) for d in unit[var].dims if d not in unit.indexes})
            got = got.transpose(*unit[var].dims)
            np.testing.assert_array_equal(as_compared(got.values), as_compared(unit[var].values), err_msg=f"{name} {var}")
            checked += 1
        for attr, value in unit.attrs.items():
            if attr in labels:
                continue
            stored = cell[attr].item() if attr in cell else by_kind[kind].attrs[attr]  # varying, else shared
            assert stored == results._attr_value(value), (name, attr)
    assert checked > len(store.unit_names())


def test_knowledge_is_one_cube_along_labelled_dimensions(tiny_results, monkeypatch):
    monkeypatch.setenv("PTR_RESULTS_DIR", str(tiny_results))
    cube = results.load("knowledge", "tiny")
    assert cube["patch_effect"].dims == ("source_model", "target_model", "dataset", "pair", "layer", "position")
    assert sorted(cube["source_model"].values) == ["tiny-llama", "tiny-llama-sft"]
    assert sorted(cube["dataset"].values) == ["cities", "larger_than"]
    assert cube.attrs["experiment"] == "knowledge" and cube.attrs["profile"] == "tiny"  # the cube's provenance
    assert cube["patch_effect"].dtype == np.float32


def test_every_kind_in_one_dataset_with_kind_named_variables(tiny_results, monkeypatch):
    monkeypatch.setenv("PTR_RESULTS_DIR", str(tiny_results))
    whole = results.load("truthfulness", "tiny")
    probes = results.load("truthfulness", "tiny", kind="probes")
    xr.testing.assert_equal(whole["probes.accuracy"].rename({"probes.probe_model": "probe_model",
                                                             "probes.test_dataset": "test_dataset"}).drop_vars(
        [c for c in whole["probes.accuracy"].coords if c.startswith("probes.")], errors="ignore"),
        probes["accuracy"].drop_vars([c for c in probes["accuracy"].coords if c not in probes["accuracy"].dims]))
    # one kind's positional `statement` is not another's; a kind's shared attributes keep their kind
    assert {"activations.statement", "intervention.statement"} <= set(whole.dims)
    assert whole.attrs["probes.probe_layer"] == probes.attrs["probe_layer"]


def test_unknown_kind_and_missing_cube_are_one_line_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("PTR_RESULTS_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="ptr run knowledge --profile tiny"):
        results.load("knowledge", "tiny")
    with pytest.raises(ValueError, match="known: \\['confidence', 'knowledge'"):
        results.load("knowlege", "tiny")
    with pytest.raises(ValueError, match="its kinds: \\['activations'"):
        results.load("truthfulness", "tiny", kind="probe")
