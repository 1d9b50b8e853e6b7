"""What produced a cube: code, configuration, models, data, software, numerics. Torch-free."""
from __future__ import annotations

import hashlib
import importlib.metadata
import json
import platform
import subprocess
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from data_prep.paths import REPO_ROOT, processed_dir
from replication.config import EXPERIMENTS
from replication.cubes import now

PACKAGES = ("torch", "transformers", "nnsight", "tokenizers", "xarray", "zarr", "numpy", "scikit-learn", "gguf")


def git_commit() -> str:
    """HEAD commit, with '+dirty' when the work tree differs from it; 'unknown' outside a checkout."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, check=True).stdout
    try:
        commit = git("rev-parse", "HEAD").strip()
        dirty = bool(git("status", "--porcelain", "--untracked-files=no").strip())
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("+dirty" if dirty else "")


def package_versions(names: Iterable[str] = PACKAGES) -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def data_fingerprint(manifest: Path | None = None) -> dict[str, Any]:
    """sha256 of the processed-data manifest (which itself lists the sha256 of every input and output)."""
    manifest = manifest or processed_dir() / "manifest.json"
    if not manifest.exists():
        return {"manifest": None, "sha256": None}
    return {"manifest": str(manifest), "sha256": hashlib.sha256(manifest.read_bytes()).hexdigest()}


def provenance(profile, model_specs: Iterable, *, dtype: str, device: str, seed: int,
               experiment: str) -> dict[str, Any]:
    """JSON-serialisable provenance for a cube's root attrs.

    `profile` needs `.name`, `.config_hash()` and `.experiment_hash(name)`; each model spec needs `.key`,
    `.hf_id`, `.revision`. A store that is not one of the four experiments (a settings sweep) has no
    experiment_hash: its results choose settings, so they must outlive the settings they choose.
    """
    return {
        "experiment": experiment,
        "git_commit": git_commit(),
        "profile": profile.name,
        "config_hash": profile.config_hash(),
        "experiment_hash": profile.experiment_hash(experiment) if experiment in EXPERIMENTS else None,
        "models": {s.key: {"hf_id": s.hf_id, "revision": s.revision} for s in model_specs},
        "data": data_fingerprint(),
        "packages": package_versions(),
        "dtype": dtype,
        "device": device,
        "seed": seed,
        "started_at": now(),
        "finished_at": None,  # set by the experiment when every unit is done; a rerun clears it until then
        "host": platform.node(),
    }


def as_json(value: Any) -> str:
    """Canonical JSON, for hashing configurations."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)
