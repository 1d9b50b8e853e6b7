"""Experiment results as labelled xarray Datasets in zarr (format 3) stores.

One store per experiment per profile (``results/<profile>/<experiment>.zarr``). Work is written in *units*
(e.g. one model pair x one dataset); each unit is a zarr group ``units/<name>`` holding one Dataset. A unit is
finished only once its completion marker is set, after all its data is written, so a unit interrupted midway
is recomputed on the next run, never half-read. Provenance lives in the root group's attrs and is merged on
every open (zarr replaces attrs wholesale on some writes; we never let that touch the root).

One writer at a time: a store opened for writing holds `<cube>.lock` (filelock) for as long as it lives; who holds
it (pid, host, start time, command) is written beside it in `<cube>.lock.json`, for the message a second writer
gets. Readers take no lock; `profile_cube` refuses a cube computed under another configuration than the profile's.

Torch-free on purpose: `analysis` reads cubes through this module.
"""
from __future__ import annotations

import datetime as dt
import json
import logging
import os
import re
import socket
import sys
from pathlib import Path
from typing import Any

import xarray as xr
import zarr
from filelock import FileLock, Timeout

from data_prep.paths import results_dir
from replication.config import ConfigError, load_profile, resolve_profile

UNITS_GROUP = "units"
COMPLETE_ATTR = "ptr_unit_complete"
HASH_ATTR = "experiment_hash"  # root attr: the configuration the finished units were computed with
FINISHED_ATTR = "finished_at"  # root attr: set when a run has every unit; cleared (None) while a run is going on
LOCK_WAIT_S = 5.0  # how long a second writer waits for the cube's lock before giving up
_UNIT_NAME = re.compile(r"^[A-Za-z0-9_.+=\-]+$")
log = logging.getLogger(__name__)


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


class StaleCubeError(RuntimeError):
    """A store's finished units were computed under another configuration than the current run's."""


class CubeLockedError(RuntimeError):
    """Another process is writing the cube."""


def lock_cube(path: str | Path, wait: float = LOCK_WAIT_S) -> FileLock:
    """Take the writer lock of the cube at `path`, waiting up to `wait` seconds; held until `.release()`, the lock
    object's end, or the process's end (an OS lock: a killed run leaves no stale lock)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # one lock object per path in a process (reentrant): a process may hold several stores of one cube
    lock, holder = FileLock(f"{path}.lock", is_singleton=True), Path(f"{path}.lock.json")
    reentered = lock.is_locked
    try:
        lock.acquire(timeout=wait)
    except Timeout:
        raise CubeLockedError(f"{path} is being written by another run ({_holder(holder)}); waited {wait:g} s. Let "
                              f"that run finish, or stop it (finished units are kept) and run again.") from None
    if not reentered:
        holder.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started_at": now(),
                                      "command": " ".join(sys.argv)}) + "\n")
    return lock


def _holder(path: Path) -> str:
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError):
        return "holder unknown"
    return f"pid {info['pid']} on {info['host']}, since {info['started_at']}: {info['command']}"


class CubeStore:
    """A zarr store of finished units plus provenance attrs (see module docstring)."""

    def __init__(self, path: str | Path, provenance: dict[str, Any] | None = None):
        self.path = Path(path)
        if provenance is None and (self.path / UNITS_GROUP / "zarr.json").exists():
            return  # an existing store opened for reading: write nothing (results may be read-only)
        self._lock = lock_cube(self.path)  # released with the store
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
    def finished(self) -> bool:
        """Whether the last run finished (an unfinished cube: a run going on, or interrupted; resuming ends it)."""
        return bool(self.attrs.get(FINISHED_ATTR))

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
        seconds = (dt.datetime.fromisoformat(dataset.attrs["finished_at"])
                   - dt.datetime.fromisoformat(dataset.attrs["started_at"])).total_seconds()
        log.info("%s: unit %s done (started %s, %.1f s)", self.path.name, name, dataset.attrs["started_at"], seconds)

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


def profile_cube(profile: str | Path, experiment: str) -> CubeStore:
    """The cube of `experiment` for a profile (name or YAML path), for reading. A cube whose finished units were
    computed under another configuration than the profile's current one is refused (StaleCubeError)."""
    try:
        ref = resolve_profile(profile)
        folder, name, shown = ref.results, ref.name, ref.arg
        current = load_profile(ref.path).experiment_hash(experiment)
    except ConfigError:  # a profile made in code (tests, notebooks; `ptr` rejects these first): no hash to compare
        folder, name, shown, current = results_dir(str(profile)), str(profile), str(profile), None
    store = open_cube(folder / f"{experiment}.zarr")
    recorded = store.attrs.get(HASH_ATTR)
    if current and recorded and recorded != current and store.unit_names():
        raise StaleCubeError(
            f"{store.path} was computed with another configuration of {experiment} than profile {name}'s "
            f"current one (hash {recorded[:12]} there, {current[:12]} now), so its numbers are not this profile's. "
            f"Restore that configuration, or recompute: `ptr run {experiment} --profile {shown} --fresh` (the old "
            f"cube is kept beside it).")
    return store


def unfinished_note(store: CubeStore) -> str:
    """'' for a finished cube; else one sentence saying the numbers are partial and how to finish them."""
    if store.finished:
        return ""
    return (f"UNFINISHED: {store.path.name} holds {len(store.unit_names())} finished unit(s) of a run still going "
            f"on or interrupted; its numbers are partial. Running the experiment again resumes it.")


SET_ASIDE = ".stale-"  # in the name of a cube set aside by `set_aside`: <experiment>.stale-<UTC time>.zarr


def is_set_aside(path: str | Path) -> bool:
    return SET_ASIDE in Path(path).name


def set_aside(path: str | Path) -> Path | None:
    """Rename an existing store to `<name>.stale-<UTC time>.zarr` beside it (kept, never deleted), under its
    writer lock; the new path, or None when there was no store."""
    path = Path(path)
    if not path.exists():
        return None
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%S")
    lock = lock_cube(path)
    try:
        return path.rename(path.with_name(f"{path.stem}{SET_ASIDE}{stamp}{path.suffix}"))
    finally:
        lock.release()
