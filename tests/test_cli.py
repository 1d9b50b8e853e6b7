"""The CLI on the tiny profile's cubes: `ptr analyze` prints every experiment's tables (a note, not a crash, for a
missing cube); `ptr run` refuses a cube computed under another configuration until --fresh sets it aside."""
import shutil

import pytest
import yaml
from click.testing import CliRunner

from analysis import knowledge, tables
from ptr.cli import main
from replication.config import MODEL_TABLE, PROFILE_DIR
from replication.cubes import open_cube


def test_all_tables_has_every_experiment_and_numbers_from_the_cubes(tiny_results, monkeypatch):
    monkeypatch.setenv("PTR_RESULTS_DIR", str(tiny_results))
    result = tables.all_tables("tiny")
    for experiment in ("Knowledge", "Truthfulness", "Refusal", "Confidence"):
        assert any(title.startswith(f"{experiment}:") for title in result), experiment
    assert not [title for title in result if title.endswith("not available")]
    own = result["Knowledge: BASE vs POST causal-tracing maps"]
    comparison = knowledge.comparison_table("tiny")
    expected = comparison[comparison.comparison == "own"]
    assert own["corr"].tolist() == pytest.approx(expected["corr"].tolist())
    assert own["corr"].between(-1, 1).all() and len(own) == len(expected) > 0


def test_analyze_cli_prints_tables_and_notes_a_missing_cube(tiny_results, tmp_path, monkeypatch):
    (tmp_path / "tiny").mkdir()
    for name in ("knowledge.zarr", "confidence.zarr"):  # refusal and truthfulness left out
        (tmp_path / "tiny" / name).symlink_to(tiny_results / "tiny" / name)
    monkeypatch.setenv("PTR_RESULTS_DIR", str(tmp_path))
    output = CliRunner().invoke(main, ["analyze", "--profile", "tiny"])
    assert output.exit_code == 0, output.output
    assert "## Knowledge: BASE vs POST causal-tracing maps" in output.output
    assert "## Confidence: entropy-neuron overlap" in output.output
    assert "## Refusal: not available" in output.output
    assert "ptr run truthfulness --profile tiny" in output.output


def test_run_refuses_a_cube_from_another_configuration_until_fresh(tiny_data, tiny_results, tmp_path, monkeypatch):
    results = tmp_path / "results"
    shutil.copytree(tiny_results / "tiny" / "confidence.zarr", results / "tiny" / "confidence.zarr")
    profile = yaml.safe_load((PROFILE_DIR / "tiny.yaml").read_text())
    profile["experiments"]["confidence"]["n_neurons"] = 3  # another configuration of the same profile name
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(profile))
    monkeypatch.setenv("PTR_DATA_DIR", str(tiny_data))
    monkeypatch.setenv("PTR_RESULTS_DIR", str(results))
    command = ["run", "confidence", "--profile", str(tmp_path / "tiny.yaml")]
    refused = CliRunner().invoke(main, command)
    assert refused.exit_code == 1 and "another configuration" in refused.output and "--fresh" in refused.output
    done = CliRunner().invoke(main, [*command, "--fresh"])
    assert done.exit_code == 0, done.output
    (kept,) = (results / "tiny").glob("confidence.stale-*.zarr")
    assert open_cube(kept).read_unit("weights__tiny-llama").sizes["rank"] == 4
    assert open_cube(results / "tiny" / "confidence.zarr").read_unit("weights__tiny-llama").sizes["rank"] == 3


def test_sweep_prints_each_choice_beside_the_model_table(tiny_data, tmp_path, monkeypatch):
    monkeypatch.setenv("PTR_DATA_DIR", str(tiny_data))
    monkeypatch.setenv("PTR_RESULTS_DIR", str(tmp_path))
    output = CliRunner().invoke(main, ["sweep", "refusal", "--profile", "tiny"])
    assert output.exit_code == 0, output.output
    store = open_cube(tmp_path / "tiny" / "refusal_sweep.zarr")
    lines = output.stdout.splitlines()
    for key in ("tiny-llama", "tiny-llama-sft"):
        chosen = store.unit_attrs(f"sweep__{key}")
        for name in ("refusal_layer", "refusal_apply_layer", "refusal_pos", "refusal_coef_add", "refusal_coef_sub"):
            (line,) = [line for line in lines if line.split()[:2] == [key, name]]
            assert line.split()[3] == str(chosen[name])
    differing = sum("<- differs" in line for line in lines)
    assert lines[-1] == (f"{differing} setting(s) differ from {MODEL_TABLE}" if differing
                         else "the model table holds these settings")
