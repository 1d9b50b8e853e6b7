"""Experiment results as labelled xarray Datasets in zarr (format 3) stores.

One store per experiment per profile (``results/<profile>/<experiment>.zarr``). Work is written in *units*
(e.g. one model pair x one dataset); each unit is a zarr group ``units/<name>`` holding one Dataset. A unit is
finished only once its completion marker is set, after all its data is written, so a unit interrupted midway
is recomputed on the next run, never half-read. Provenance lives in the root group's attrs and is merged on
every open (zarr replaces attrs wholesale on some writes; we never let that touch the root).

Torch-free on purpose: `analysis` reads cubes through this module.
"""
from __future__ import annotations

import datetime as dt
import re
from pathlib import Path
from typing import Any

import xarray as xr
import zarr

UNITS_GROUP = "units"
COMPLETE_ATTR = "ptr_unit_complete"
HASH_ATTR = "experiment_hash"  # root attr: the configuration the finished units were computed with
_UNIT_NAME = re.compile(r"^[A-Za-z0-9_.+=\-]+$")


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


class StaleCubeError(RuntimeError):
    """A store's finished units were computed under another configuration than the current run's."""


class CubeStore:
    """A zarr store of finished units plus provenance attrs (see module docstring)."""

    def __init__(self, path: str | Path, provenance: dict[str, Any] | None = None):
        self.path = Path(path)
        if provenance is None and (self.path / UNITS_GROUP / "zarr.json").exists():
            return  # an existing store opened for reading: write nothing (results may be read-only)
        root = zarr.open_group(str(self.path), mode="a", zarr_format=3)
        root.require_group(UNITS_GROUP)
        if provenance:
            self._refuse_stale(provenance.get(HASH_ATTR))
            self.update_attrs(**provenance)

    def _refuse_stale(self, experiment_hash: str | None) -> None:
        """Finished units computed under another configuration are never mixed with new ones."""
        previous = self.attrs.get(HASH_ATTR)
        if experiment_hash and previous and previous != experiment_hash and self.unit_names():
            raise StaleCubeError(
                f"{self.path} holds {len(self.unit_names())} finished unit(s) computed with another configuration "
                f"of this experiment (settings, models, dtype or seed changed: hash {previous[:12]} there, "
                f"{experiment_hash[:12]} now). Nothing was changed. Run with --fresh to set the old cube aside "
                f"(renamed, not deleted) and start again, or restore the configuration to resume it.")

    @property
    def attrs(self) -> dict[str, Any]:
        return dict(zarr.open_group(str(self.path), mode="r").attrs)

    def update_attrs(self, **values: Any) -> None:
        root = zarr.open_group(str(self.path), mode="a")
        merged = dict(root.attrs)
        merged.update(values)
        root.attrs.put(merged)

    def _units(self) -> zarr.Group:
        return zarr.open_group(str(self.path), mode="r", path=UNITS_GROUP)

    def has_unit(self, name: str) -> bool:
        units = self._units()
        return name in units and bool(units[name].attrs.get(COMPLETE_ATTR, False))

    def unit_names(self) -> list[str]:
        """Finished units, sorted by name."""
        units = self._units()
        return sorted(n for n, g in units.groups() if g.attrs.get(COMPLETE_ATTR, False))

    def write_unit(self, name: str, dataset: xr.Dataset, started_at: str | None = None) -> None:
        """Write (or overwrite an unfinished) unit; the completion marker is set last."""
        if not _UNIT_NAME.match(name):
            raise ValueError(
                f"unit name {name!r} has characters other than letters, digits and _.+=- ; "
                "use e.g. 'llama-3.1-8b__cities'"
            )
        group = f"{UNITS_GROUP}/{name}"
        dataset = _variable_length_strings(dataset)
        dataset.attrs = {**dataset.attrs, "started_at": started_at or now(), "finished_at": now()}
        dataset.to_zarr(str(self.path), group=group, mode="w", zarr_format=3, consolidated=False)
        unit = zarr.open_group(str(self.path), mode="a", path=group)
        unit.attrs.put({**dict(unit.attrs), COMPLETE_ATTR: True})

    def unit_attrs(self, name: str) -> dict[str, Any]:
        """A finished unit's attrs (its own metadata and start/finish times) without loading its arrays."""
        return {k: v for k, v in self._units()[name].attrs.items() if k != COMPLETE_ATTR}

    def read_unit(self, name: str) -> xr.Dataset:
        if not self.has_unit(name):
            raise KeyError(f"{self.path}: no finished unit {name!r}; finished units: {self.unit_names()}")
        with xr.open_zarr(str(self.path), group=f"{UNITS_GROUP}/{name}", consolidated=False) as ds:
            ds = ds.load()
        ds.attrs.pop(COMPLETE_ATTR, None)
        return ds

    def read_units(self, kind: str | None = None) -> dict[str, xr.Dataset]:
        """Finished units by name; with `kind`, only those named '<kind>__...'."""
        return {name: self.read_unit(name) for name in self.unit_names()
                if kind is None or name.split("__")[0] == kind}


def _variable_length_strings(dataset: xr.Dataset) -> xr.Dataset:
    """Fixed-width numpy strings have no zarr v3 spec; variable-length UTF-8 does."""
    for name, var in list(dataset.variables.items()):
        if var.dtype.kind == "U":
            as_object = {name: var.astype(object)}
            dataset = dataset.assign_coords(as_object) if name in dataset.coords else dataset.assign(as_object)
    return dataset


def open_cube(path: str | Path) -> CubeStore:
    """Open an existing store read-side; a clear error if the experiment has not been run."""
    path = Path(path)
    if not (path / "zarr.json").exists():
        raise FileNotFoundError(
            f"no cube at {path}: run the experiment first (e.g. `ptr run {path.stem} --profile "
            f"{path.parent.name}`)"
        )
    return CubeStore(path)


def set_aside(path: str | Path) -> Path | None:
    """Rename an existing store to `<name>.stale-<UTC time>.zarr` beside it (kept, never deleted); the new path,
    or None when there was no store."""
    path = Path(path)
    if not path.exists():
        return None
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%S")
    return path.rename(path.with_name(f"{path.stem}.stale-{stamp}{path.suffix}"))
