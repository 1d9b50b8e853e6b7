"""Your own model pair, as the README's "Your own model pair" walks through it, offline: two small random Qwen2
models saved with save_pretrained to local directories (as if downloaded), a model table and a profile of one's
own, `ptr sweep` writing the settings into that table, then `ptr run` with them, through the CLI in subprocesses."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import yaml
from click.testing import CliRunner

from data_prep.paths import REPO_ROOT
from ptr.cli import main
from replication.config import ConfigError, load_model_table, load_profile
from replication.cubes import open_cube
from replication.models import tiny
from replication.sweeps import Choice, record

MODELS = {  # key -> (role, template, weight seed)
    "my-base": ("base", "plain", 21),
    "my-instruct": ("instruct", "chat", 22),
}


def model_table() -> dict:
    """What a user writes for a downloaded pair: no settings (the sweeps choose them)."""
    return {"models": {key: {"hf_id": f"./models/{key}", "family": "mine", "role": role, "source": "hub",
                             "arch": "qwen2", "template": template, "tokenizer_key": "mine", "adds_bos": True}
                       for key, (role, template, _) in MODELS.items()}}


def profile() -> dict:
    return {
        "description": "My own pair (two small random Qwen2 models)",
        "dtype": "float32", "device": "cpu", "seed": 1, "batch_size": 16,
        "families": {"mine": {"base": "my-base", "post": ["my-instruct"]}},
        "experiments": {
            "knowledge": {"datasets": ["cities"], "max_pairs": 2},
            "truthfulness": {"datasets": ["cities", "sp_en_trans", "animal_class"],
                             "similarity_datasets": ["cities"], "max_statements": 16},
            "refusal": {"n_train": 8, "n_test": 4, "max_new_tokens": 3},
            "confidence": {"top_norm_fraction": 0.25, "n_neurons": 4, "datasets": ["cities"], "max_statements": 8},
        },
    }


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A user's directory: models/<key>/ saved as from the hub, my_models.yaml, mine.yaml."""
    root = tmp_path_factory.mktemp("own_pair")
    tokenizer = tiny.build_tokenizer()
    for key, (_, _, seed) in MODELS.items():
        tiny.build_model("qwen2", seed, tokenizer).save_pretrained(root / "models" / key)
        tokenizer.save_pretrained(root / "models" / key)
    (root / "my_models.yaml").write_text(yaml.safe_dump(model_table(), sort_keys=False))
    (root / "mine.yaml").write_text(yaml.safe_dump(profile(), sort_keys=False))
    return root


def ptr(workspace, *args: str) -> subprocess.CompletedProcess:
    """`ptr ARGS --profile mine.yaml --models my_models.yaml` in a fresh process, from the user's directory."""
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env.pop("PTR_MODELS", None)
    return subprocess.run([sys.executable, "-m", "ptr", *args, "--profile", "mine.yaml", "--models", "my_models.yaml"],
                          cwd=workspace, env=env, capture_output=True, text=True)


def ptr_here(workspace, *args: str):
    """The same command in this process (a fresh process costs ~10 s of imports on a busy machine)."""
    return CliRunner().invoke(main, [*args, "--profile", "mine.yaml", "--models", "my_models.yaml"])


def test_own_pair_from_local_directories_sweep_then_run(workspace, processed_data, monkeypatch):
    monkeypatch.chdir(workspace)
    for name, value in {"PTR_DATA_DIR": processed_data, "PTR_RESULTS_DIR": workspace / "results",
                        "PTR_CACHE_DIR": workspace / "cache", "PTR_MODELS": workspace / "my_models.yaml"}.items():
        monkeypatch.setenv(name, str(value))
    table = load_model_table()
    assert table["my-base"].hf_id == str(workspace / "models" / "my-base")  # relative to the table file
    assert table["my-base"].revision is None and "llama-3.1-8b" in table  # merged over the built-in table
    mine = load_profile(workspace / "mine.yaml")
    with pytest.raises(ConfigError, match=r"'my-base' lacks settings\.probe_layer.*ptr sweep truthfulness"):
        mine.check_settings("truthfulness")

    refused = ptr_here(workspace, "run", "refusal")
    assert refused.exit_code != 0 and "ptr sweep refusal --profile" in refused.output

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models gain nothing from threads, and on a busy CPU they cost
    try:
        for experiment in ("truthfulness", "refusal"):
            swept = ptr_here(workspace, "sweep", experiment)
            assert swept.exit_code == 0, swept.output[-3000:]
            (line,) = [line for line in swept.stdout.splitlines() if line.startswith("written into")]
            assert line.startswith(f"written into {workspace / 'my_models.yaml'}: ")
            assert set(line.split(": ")[1].split(", ")) == set(MODELS)
        ran = ptr_here(workspace, "run", "refusal")
        assert ran.exit_code == 0, ran.output[-3000:]
    finally:
        torch.set_num_threads(threads)

    written = yaml.safe_load((workspace / "my_models.yaml").read_text())["models"]
    grid = open_cube(workspace / "results" / "mine" / "truthfulness_sweep.zarr").read_unit("sweep__my-base")
    for key in MODELS:  # a family shares its base model's layers
        assert written[key]["settings_source"] == "sweep"
        assert {name: written[key]["settings"][name] for name in ("probe_layer", "intervene_layer")} == {
            name: int(grid.attrs[name]) for name in ("probe_layer", "intervene_layer")}
        measured = written[key]["sweep"]["truthfulness"]
        assert measured["swept_model"] == "my-base"
        assert measured["probe_accuracy"] == pytest.approx(
            float(grid["accuracy"].mean("test_dataset")[grid.attrs["probe_layer"]]), abs=1e-4)
    refusal_grid = open_cube(workspace / "results" / "mine" / "refusal_sweep.zarr")
    for key in MODELS:
        chosen = refusal_grid.unit_attrs(f"sweep__{key}")
        for name in ("refusal_layer", "refusal_apply_layer", "refusal_pos", "refusal_coef_add", "refusal_coef_sub"):
            assert written[key]["settings"][name] == pytest.approx(chosen[name])
        assert 0 <= written[key]["sweep"]["refusal"]["refusal_unsteered"]["harmful"] <= 1

    ran = ptr(workspace, "run", "truthfulness")  # a fresh process: the settings come from the file alone
    assert ran.returncode == 0, ran.stderr[-3000:]
    profile = load_profile(workspace / "mine.yaml")
    for experiment in ("truthfulness", "refusal"):
        cube = open_cube(workspace / "results" / "mine" / f"{experiment}.zarr")
        assert cube.attrs["finished_at"] is not None
        assert cube.attrs["experiment_hash"] == profile.experiment_hash(experiment)
        assert cube.attrs["models"]["my-instruct"]["hf_id"] == str(workspace / "models" / "my-instruct")


def test_record_writes_only_the_models_the_file_defines_and_never_breaks_it(tmp_path):
    path = tmp_path / "my_models.yaml"
    data = model_table()
    del data["models"]["my-instruct"]
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    chosen = {"my-base": Choice({"probe_layer": 1, "intervene_layer": 0}, {"probe_accuracy": 0.75}),
              "llama-3.1-8b": Choice({"probe_layer": 3, "intervene_layer": 2}, {})}  # built-in: not the user's
    assert record(path, "truthfulness", chosen) == ["my-base"]
    entry = yaml.safe_load(path.read_text())["models"]["my-base"]
    assert entry["settings"] == {"probe_layer": 1, "intervene_layer": 0} and entry["settings_source"] == "sweep"
    assert entry["sweep"] == {"truthfulness": {"probe_accuracy": 0.75}}
    assert load_model_table(user=path)["my-base"].settings.probe_layer == 1
    before = path.read_text()
    with pytest.raises(ConfigError, match="left as it was.*probe_layer must be of type int"):
        record(path, "truthfulness", {"my-base": Choice({"probe_layer": "1"}, {})})
    assert path.read_text() == before
