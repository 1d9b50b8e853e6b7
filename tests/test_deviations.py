"""The deviations table (docs/deviations.yaml -> docs/DEVIATIONS.md and the report appendix): complete rows, tests
that exist, the generated document up to date, and the two measurements the table cites that need only the
authors' shipped results (bf16 rounding of patch effects and of the intervention class means)."""
import itertools
import json

import numpy as np
import pytest
from scipy.stats import pearsonr

from analysis import knowledge
from replication.experiments import truthfulness
from report import deviations
from report import render as rr

STEP_MEASUREMENTS = ("test_bf16_rounding_of_patch_effects_barely_moves_the_shipped_normalised_map",
                     "test_a_bf16_step_in_the_class_means_barely_moves_the_shipped_intervention_effects")


@pytest.fixture(scope="module")
def rows() -> list[deviations.Deviation]:
    return deviations.load_deviations()


def test_every_experiment_has_rows_and_every_row_its_fields(rows):
    assert {row.experiment for row in rows} >= {"data", "knowledge", "truthfulness", "refusal", "confidence"}
    assert len({row.id for row in rows}) == len(rows)
    for row in rows:
        assert all(getattr(row, name) for name in deviations.ROW_FIELDS), row.id
        assert "→" not in row.original + row.here, "the renderer joins original and here with an arrow"


def test_every_named_test_exists(rows):
    assert deviations.missing_tests(rows) == []
    named = {row.test for row in rows}
    assert {f"tests/test_deviations.py::{name}" for name in STEP_MEASUREMENTS} <= named


def test_missing_test_and_bad_rows_are_reported(tmp_path):
    ghost = deviations.Deviation("x", "data", "a", "b", "c", "d", "tests/test_deviations.py::test_no_such_test")
    pending = deviations.Deviation("y", "data", "a", "b", "c", "d", deviations.PENDING)
    assert deviations.missing_tests([ghost, pending]) == ["tests/test_deviations.py::test_no_such_test"]
    path = tmp_path / "deviations.yaml"
    path.write_text("- {id: x, experiment: data, original: a, here: b, why: c, moves: d}\n")
    with pytest.raises(ValueError, match=r"row 1 \(x\): has fields .*give exactly id, experiment"):
        deviations.load_deviations(path)
    path.write_text("- {id: x, experiment: physics, original: a, here: b, why: c, moves: d, test: (pending)}\n")
    with pytest.raises(ValueError, match="unknown experiment 'physics'"):
        deviations.load_deviations(path)
    path.write_text("- {id: x, experiment: data, original: a, here: b, why: c, moves: d, test: tests/x.py}\n")
    with pytest.raises(ValueError, match=r"must read tests/<file>.py::<test function> or \(pending\)"):
        deviations.load_deviations(path)


def test_deviations_md_is_generated_from_the_yaml(rows):
    expected = deviations.markdown(rows)
    assert deviations.DEVIATIONS_MD.read_text(encoding="utf-8") == expected, (
        "docs/DEVIATIONS.md is out of date: run `python -m report.deviations`")
    for row in rows:
        assert f"| {row.id} |" in expected
    assert "[`tests/test_deviations.py::" in expected and "](../tests/test_deviations.py)" in expected


def test_report_appendix_shows_the_table(rows, monkeypatch):
    _, blocks = rr.parse_qmd(rr.DOCUMENT.read_text())
    chunk = next(b for b in blocks if isinstance(b, rr.Chunk) and b.options.get("label") == "tbl-deviations")
    assert chunk.code.strip() == "sections.deviations_table()"
    monkeypatch.syspath_prepend(str(rr.REPORT_DIR))
    import sections

    shown = sections.deviations_table()._repr_markdown_()
    for row in rows:
        assert row.id in shown
    assert "tests/test_deviations.py::" in shown


# ---- measurements cited by the table (the authors' shipped result files) -----------------------------------------

def bf16_step(values: np.ndarray) -> np.ndarray:
    """The spacing of bfloat16 numbers (8 significant bits) at each value."""
    magnitude = np.where(values == 0, 2.0**-126, np.abs(values))
    return 2.0 ** (np.floor(np.log2(magnitude)) - 7)


def test_bf16_rounding_of_patch_effects_barely_moves_the_shipped_normalised_map(mirror):
    """The original rounds each logit difference to bf16, here it is kept in float32: at most half a bf16 step
    apart. Moving every shipped effect by a whole step, all one way or at random, leaves the normalised map as is."""
    path = mirror / "paper_artifacts" / "patching_results.json"
    if not path.is_file():
        pytest.skip(f"{path} is not in the mirror")
    effects = knowledge.original_effects(json.loads(path.read_text())["llama-3.1-8b-instruct_cities_true_false"])
    mean = knowledge.mean_map(effects)
    normalized = knowledge.normalize(mean)
    rng = np.random.default_rng(0)
    shifts = [np.ones_like(effects), -np.ones_like(effects), *(rng.uniform(-1, 1, effects.shape) for _ in range(5))]
    largest_mean_change = 0.0
    for shift in shifts:
        moved = knowledge.mean_map(effects + shift * bf16_step(effects))
        largest_mean_change = max(largest_mean_change, np.abs(moved - mean).max())
        np.testing.assert_array_equal(knowledge.normalize(moved), normalized)
        assert pearsonr(knowledge.normalize(moved).ravel(), normalized.ravel())[0] == pytest.approx(1.0)
    assert 0.01 < largest_mean_change <= 0.034  # the maps did move, by little


def test_a_bf16_step_in_the_class_means_barely_moves_the_shipped_intervention_effects(mirror):
    """The original's class means of P(TRUE) - P(FALSE) are bf16 values (steps of 2^-8 near 1), here float64: moving
    each of the four means of every shipped (direction, model) combination by up to one step moves its averaged
    intervention effect by at most 0.003."""
    path = mirror / "paper_artifacts" / "label_change_intervention_results.json"
    if not path.is_file():
        pytest.skip(f"{path} is not in the mirror")
    shipped = json.loads(path.read_text())[0]
    step, largest = 2.0**-8, 0.0
    for direction, model in itertools.product(("m1", "m2"), repeat=2):
        true_before, false_before = shipped[f"p_diff_{model}_true_base"], shipped[f"p_diff_{model}_false_base"]
        true_after = true_before + shipped[f"nif_{direction}_{model}_true_false"] * (-1 - true_before)
        false_after = false_before + shipped[f"nif_{direction}_{model}_false_true"] * (1 - false_before)
        means = (true_before, true_after, false_before, false_after)
        effect = truthfulness.average_intervention_effect(*means)
        assert effect == pytest.approx(shipped[f"avg_nif_{direction}_{model}"], abs=1e-12)
        for signs in itertools.product((-1, 0, 1), repeat=4):
            moved = truthfulness.average_intervention_effect(*(m + s * step for m, s in zip(means, signs)))
            largest = max(largest, abs(moved - effect))
    assert 0.001 < largest <= 0.003
