"""Shared fixtures. `processed_data` builds the processed datasets once per session from the raw mirror into a
temporary PTR_DATA_DIR (patching pairs for the Llama-3 tokenizer via quicktok), so tests read processed data
through the data_prep readers exactly as the experiments do. `tiny_data` builds the tiny profile's data and
`tiny_results` runs its four experiments once into a temporary results directory."""
from __future__ import annotations

import importlib
from pathlib import Path

import pytest

from data_prep import paths

DEFAULT_MIRROR = paths.REPO_ROOT.parent / "shared" / "data" / "raw"


@pytest.fixture(scope="session")
def mirror() -> Path:
    """The raw-data mirror (PTR_DATA_MIRROR, else ../shared/data/raw); tests that need it skip without it."""
    path = paths.mirror_dir() or DEFAULT_MIRROR
    if not path.is_dir():
        pytest.skip(f"raw data mirror {path} does not exist (set PTR_DATA_MIRROR to a copy of the raw files)")
    return path


@pytest.fixture(scope="session")
def llama3_encode():
    import quicktok

    return quicktok.get_encoding("llama3").encode


@pytest.fixture(scope="session")
def processed_data(tmp_path_factory, mirror, llama3_encode) -> Path:
    """A PTR_DATA_DIR holding raw/ (fetched from the mirror) and processed/ (built), set for the whole session."""
    from data_prep.build import build_all

    data_dir = tmp_path_factory.mktemp("ptr_data")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PTR_DATA_DIR", str(data_dir))
        patch.setenv("PTR_DATA_MIRROR", str(mirror))
        build_all(mirror=mirror, tokenizers={"llama3": llama3_encode}, progress=False)
        yield data_dir


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory, mirror) -> Path:
    """A PTR_DATA_DIR with the tiny profile's processed data (patching pairs for its tokenizers), built from the
    mirror; the tiny post-trained model made if the cache lacks it."""
    from data_prep.build import build_all
    from replication.config import load_profile
    from replication.models import pair_tokenizers
    from replication.posttrain import posttrain_profile

    profile = load_profile("tiny")
    data_dir = tmp_path_factory.mktemp("tiny_data")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PTR_DATA_DIR", str(data_dir))
        patch.setenv("PTR_DATA_MIRROR", str(mirror))
        build_all(mirror=mirror, tokenizers=pair_tokenizers(profile), progress=False)
        posttrain_profile(profile, progress=False)
    return data_dir


@pytest.fixture(scope="session")
def tiny_results(tmp_path_factory, tiny_data):
    """A results directory with the tiny profile's four cubes, computed from `tiny_data`."""
    import torch

    from replication.config import load_profile

    profile = load_profile("tiny")
    results = tmp_path_factory.mktemp("tiny_results")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PTR_DATA_DIR", str(tiny_data))
        patch.setenv("PTR_RESULTS_DIR", str(results))
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # tiny models gain nothing from threads, and on a busy CPU they cost
        try:
            for experiment in ("knowledge", "truthfulness", "refusal", "confidence"):
                importlib.import_module(f"replication.experiments.{experiment}").run(profile, progress=False)
        finally:
            torch.set_num_threads(threads)
    return results
