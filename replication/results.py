"""An experiment's results as one labelled xarray Dataset, assembled from the units of its cube.

The cube (``results/<profile>/<experiment>.zarr``, see `replication.cubes`) stays a store of units so that a run
resumes where it stopped; this module is the reading side. A unit's name says what it holds
(``intervention__<model>__<dataset>``): UNIT_KEYS names those parts, and they become labelled dimensions along
which the units are stacked (outer join: a unit that lacks a label is NaN there). Unit attributes that differ
between units (e.g. ``started_at``, ``map_kind``) become variables along the same dimensions; those equal in every
unit stay attributes (over the cube's provenance of the same name, e.g. ``started_at``).

    import replication.results as r
    r.load("knowledge", "tiny")                      # dims source_model, target_model, dataset, pair, layer, ...
    r.load("truthfulness", "tiny", kind="probes")    # one kind of unit, plain variable names
    r.load("truthfulness", "tiny")                   # every kind: variables and attributes named "<kind>.<name>"

Torch-free: analysis reads cubes through here.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import xarray as xr

from data_prep.paths import results_dir
from replication.cubes import open_cube

# Per experiment: unit kind -> the dimensions its name's parts label, in order. Kind None: names without a kind
# prefix (every knowledge unit is `<source>__<target>__<dataset>`).
UNIT_KEYS: dict[str, dict[str | None, tuple[str, ...]]] = {
    "knowledge": {None: ("source_model", "target_model", "dataset")},
    "truthfulness": {"activations": ("model",), "intervention": ("model", "dataset"), "probes": ("family",),
                     "similarity": ("family",), "pca": ("family",), "sweep": ("model",)},
    "refusal": {"direction": ("model",), "family": ("family",), "sweep": ("model",),
                "generation": ("target_model", "source_model", "intervention", "dataset"),
                "curve": ("target_model", "source_model", "scale")},
    "confidence": {"weights": ("model",), "outputs": ("model", "dataset"), "ablation": ("model", "dataset"),
                   "pairs": ()},
}
NUMERIC_KEYS = {"scale"}  # name parts that are numbers (refusal's steering scale, written with :g)


def cube_path(experiment: str, profile: str) -> Path:
    if experiment not in UNIT_KEYS:
        raise ValueError(f"unknown experiment {experiment!r}; known: {sorted(UNIT_KEYS)}")
    return results_dir(profile) / f"{experiment}.zarr"


def load(experiment: str, profile: str, kind: str | None = None) -> xr.Dataset:
    """The finished units of `experiment`'s cube for `profile` as one Dataset (see the module docstring). With
    `kind` (e.g. "probes"), only that kind of unit, with its variables' own names; without it, every kind, with
    variables named "<kind>.<name>" where the experiment has several kinds."""
    path = cube_path(experiment, profile)
    keys = UNIT_KEYS[experiment]
    if kind is not None and kind not in keys:
        raise ValueError(f"{experiment} has no unit kind {kind!r}; its kinds: {sorted(k for k in keys if k)}")
    store = open_cube(path)
    selected = [kind] if kind is not None or len(keys) == 1 else list(keys)
    parts = []
    for k in selected:
        units = store.read_units(k)  # k None: every unit (an experiment of one kind)
        if units:
            stacked = stack_units(units, keys[k], has_kind=k is not None)
            parts.append(stacked if len(selected) == 1 else _prefixed(stacked, k))
    if not parts:
        raise FileNotFoundError(f"{store.path} has no finished units{f' of kind {kind!r}' if kind else ''}: run "
                                f"`ptr run {experiment} --profile {profile}` first")
    merged = xr.merge(parts, join="outer", compat="no_conflicts", combine_attrs="drop")
    provenance = {k: _attr_value(v) for k, v in store.attrs.items()}
    return merged.assign_attrs({**provenance, **{k: v for part in parts for k, v in part.attrs.items()}})


def stack_units(units: dict[str, xr.Dataset], dims: tuple[str, ...], has_kind: bool = True) -> xr.Dataset:
    """Units of one kind stacked along `dims`, labelled from their names (`<kind>__<label>__...`)."""
    labelled, attrs = [], []
    for name, unit in units.items():
        labels = name.split("__")[1 if has_kind else 0:]
        if len(labels) != len(dims):
            raise ValueError(f"unit {name!r} does not name its {dims} (expected {len(dims)} parts after the kind)")
        coords = {d: [float(v) if d in NUMERIC_KEYS else v] for d, v in zip(dims, labels)}
        # a unit's own scalar label (knowledge units carry source_model etc.) gives way to the name's
        unit = unit.drop_vars([d for d in dims if d in unit.coords and unit[d].ndim == 0])
        attrs.append((coords, unit.attrs))
        labelled.append(_index_every_dim(unit.reset_coords()).drop_attrs().expand_dims(coords))
    shared, varying = _split_attrs(attrs)
    stacked = xr.merge(labelled, join="outer", compat="no_conflicts", combine_attrs="drop")
    return _original_dtypes(stacked, labelled).assign(varying).assign_attrs(shared)


def _index_every_dim(unit: xr.Dataset) -> xr.Dataset:
    """Positions as labels for dimensions that have none, so units of different lengths align (outer join);
    text as Python strings, which the outer join can pad (numpy's StringDType takes no missing value)."""
    unit = unit.assign_coords({d: np.arange(n) for d, n in unit.sizes.items() if d not in unit.indexes})
    return unit.map(lambda v: v.astype(object) if v.dtype.kind == "T" else v)


def _original_dtypes(stacked: xr.Dataset, units: list[xr.Dataset]) -> xr.Dataset:
    """The merge widens every variable for its missing values (bool and int to float); where nothing is missing
    after all, the units' own dtype comes back."""
    dtypes = {name: var.dtype for unit in units for name, var in unit.data_vars.items()}
    return stacked.assign({name: var.astype(dtypes[name]) for name, var in stacked.data_vars.items()
                           if var.dtype != dtypes[name] and var.dtype.kind != "O" and bool(var.notnull().all())})


def _split_attrs(attrs: list[tuple[dict, dict]]) -> tuple[dict, dict[str, xr.DataArray]]:
    """Attributes equal in every unit (kept as attributes) and the others, as variables along the unit dims;
    `attrs` holds (unit labels, unit attributes) per unit."""
    labels = {d for c, _ in attrs for d in c}
    names = sorted({k for _, a in attrs for k in a} - labels)  # an attribute repeating a label is left out
    values = {k: [_attr_value(a.get(k)) for _, a in attrs] for k in names}
    shared = {k: v[0] for k, v in values.items() if all(x == v[0] for x in v)}
    varying = {k: xr.merge([xr.DataArray(np.full([1] * len(c), value, dtype=object), coords=c, dims=list(c), name=k)
                            for (c, _), value in zip(attrs, values[k])], join="outer", compat="no_conflicts")[k]
               for k in names if k not in shared}
    return shared, {k: _typed(v) for k, v in varying.items()}


def _typed(values: xr.DataArray) -> xr.DataArray:
    """Attribute values held as objects get their own numpy dtype where every unit has one (e.g. a layer)."""
    return values.copy(data=np.array(values.values.tolist())) if bool(values.notnull().all()) else values


def _attr_value(value):
    """Attribute values as scalars: lists and mappings as their JSON text (comparable, storable)."""
    return json.dumps(value) if isinstance(value, (list, dict)) else value


def _prefixed(dataset: xr.Dataset, kind: str) -> xr.Dataset:
    """Variables (not dimensions' labels) and attributes renamed '<kind>.<name>', and the kind's positional
    dimensions with them: one kind's `statement` is not another's."""
    own_dims = [d for d in dataset.dims if d not in _SHARED_DIMS]
    names = {v: f"{kind}.{v}" for v in dataset.variables if v not in dataset.dims or v in own_dims}
    return dataset.rename(names).drop_attrs().assign_attrs({f"{kind}.{k}": v for k, v in dataset.attrs.items()})


# Dimensions whose labels mean the same thing in every kind of unit (a model key, a dataset name, a layer).
_SHARED_DIMS = {"model", "source_model", "target_model", "dataset", "family", "layer", "truth", "intervention",
                "scale"}
