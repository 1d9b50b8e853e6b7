"""Where things live on disk. The only module that reads path settings from the environment."""
from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def work_root() -> Path:
    """Where data/, cache/ and results/ go by default: the checkout when running from one, else (an installed
    wheel, whose REPO_ROOT is site-packages) the current directory."""
    return REPO_ROOT if (REPO_ROOT / "pyproject.toml").is_file() else Path.cwd()


def _dir(env_var: str, default: Path) -> Path:
    value = os.environ.get(env_var)
    return Path(value).expanduser().resolve() if value else default


def data_dir() -> Path:
    """Parent of ``raw/`` (download cache) and ``processed/`` (built datasets)."""
    return _dir("PTR_DATA_DIR", work_root() / "data")


def raw_dir() -> Path:
    return data_dir() / "raw"


def processed_dir() -> Path:
    return data_dir() / "processed"


def mirror_dir() -> Path | None:
    """A local directory holding byte-exact copies of the raw files (read instead of downloading)."""
    value = os.environ.get("PTR_DATA_MIRROR")
    return Path(value).expanduser().resolve() if value else None


def cache_dir() -> Path:
    """Converted and post-trained model directories."""
    return _dir("PTR_CACHE_DIR", work_root() / "cache")


def results_dir(profile: str) -> Path:
    return _dir("PTR_RESULTS_DIR", work_root() / "results") / profile


def user_model_table() -> Path | None:
    """The user's own model table, merged over the built-in one (`ptr --models FILE` sets it)."""
    value = os.environ.get("PTR_MODELS")
    return Path(value).expanduser().resolve() if value else None
