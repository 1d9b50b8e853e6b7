"""`ptr analyze`: every experiment's tables from the tiny profile's cubes, and a note (not a crash) for a missing
cube."""
import pytest
from click.testing import CliRunner

from analysis import knowledge, tables
from ptr.cli import main


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
