"""bench/compare_cubes.py: the before/after evidence of a speed change (numbers by max |diff|, strings equal)."""
import numpy as np
import xarray as xr

from bench import compare_cubes
from replication.cubes import CubeStore


def unit(texts, scores):
    return xr.Dataset({"completion": ("instruction", np.array(texts, dtype=object)),
                       "score": ("instruction", np.array(scores, dtype=float))},
                      coords={"instruction": np.arange(len(texts))})


def write(directory, units):
    store = CubeStore(directory / "refusal.zarr", provenance={"experiment_hash": "h"})
    for name, dataset in units.items():
        store.write_unit(name, dataset)


def test_numbers_by_largest_difference_strings_by_equality_and_shorter_units_on_their_items(tmp_path):
    write(tmp_path / "before", {"same": unit(["a", "b"], [1.0, np.nan]), "cut": unit(["x", "y", "z"], [0, 1, 2]),
                                "changed": unit(["p"], [0.5])})
    write(tmp_path / "after", {"same": unit(["a", "b"], [1.0 + 1e-6, np.nan]), "cut": unit(["x", "y"], [0, 1]),
                               "changed": unit(["q"], [0.5])})
    report = compare_cubes.compare_dirs(tmp_path / "before", tmp_path / "after")["refusal"]["units"]
    assert abs(report["same"]["variables"]["score"]["max_abs_diff"] - 1e-6) < 1e-12  # NaN in both: equal
    assert report["same"]["variables"]["completion"] == {"equal": True} and report["same"]["truncated"] == {}
    assert report["cut"]["truncated"] == {"instruction": [3, 2]}
    assert report["cut"]["variables"]["completion"] == {"equal": True}
    failures = compare_cubes.failures({"refusal": {"units": report}})
    assert len(failures) == 1 and failures[0].startswith("refusal/changed/completion")
