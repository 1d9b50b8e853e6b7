"""Models kept loaded across experiments (`replication.models.keep_loaded`, used by `ptr run all` and `ptr replicate`):
a model is read once, and the experiments' cubes are the same as when each experiment loads its own models."""
from __future__ import annotations

import importlib

import torch
import xarray as xr

from replication.config import load_profile
from replication.cubes import CubeStore
from replication.memory import fits_together, residencies
from replication.models import keep_loaded, load_model


def test_inside_the_block_a_model_is_loaded_once_and_let_go_after():
    spec = load_profile("tiny").model_spec("tiny-llama")
    with keep_loaded():
        first = load_model(spec, dtype="float32", device="cpu")
        with keep_loaded():  # nested: the outer block keeps its models
            assert load_model(spec, dtype="float32", device="cpu") is first
        assert load_model(spec, dtype="float32", device="cpu") is first
        assert load_model(spec, dtype="bfloat16", device="cpu") is not first  # another dtype, another model
    assert load_model(spec, dtype="float32", device="cpu") is not first
    with keep_loaded(enabled=False):
        assert load_model(spec, dtype="float32", device="cpu") is not load_model(spec, dtype="float32", device="cpu")


def test_kept_models_give_the_cubes_of_models_loaded_per_experiment(tiny_results, tiny_data, tmp_path,
                                                                    monkeypatch):
    """The four experiments (patching with skipped layers, probes, steering hooks, float32 weights) on kept models
    equal the session's tiny cubes, computed with a fresh load every time: nothing an experiment leaves on a model
    changes the next one's numbers."""
    monkeypatch.setenv("PTR_DATA_DIR", str(tiny_data))
    monkeypatch.setenv("PTR_RESULTS_DIR", str(tmp_path))
    profile = load_profile("tiny")
    experiments = ("knowledge", "truthfulness", "refusal", "confidence")
    assert fits_together(residencies(profile), experiments, "cpu")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the session's tiny cubes were computed
    try:
        with keep_loaded():
            for experiment in experiments:
                importlib.import_module(f"replication.experiments.{experiment}").run(profile, progress=False)
    finally:
        torch.set_num_threads(threads)
    for experiment in experiments:
        kept = CubeStore(tmp_path / "tiny" / f"{experiment}.zarr")
        fresh = CubeStore(tiny_results / "tiny" / f"{experiment}.zarr")
        assert kept.unit_names() == fresh.unit_names() and kept.unit_names()
        for name in fresh.unit_names():
            xr.testing.assert_equal(kept.read_unit(name), fresh.read_unit(name))


def test_models_that_do_not_fit_together_are_not_kept(monkeypatch):
    import replication.memory as memory

    rows = residencies(load_profile("tiny"))
    monkeypatch.setattr(memory, "available_gib", lambda device: 0.0)
    assert not fits_together(rows, ("refusal",), "cpu")
    unknown = [memory.Residency("refusal", ("x",), "float32", None)]
    monkeypatch.setattr(memory, "available_gib", lambda device: 1e6)
    assert not fits_together(unknown, ("refusal",), "cpu") and fits_together(rows, ("refusal",), "cpu")
