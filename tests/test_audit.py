"""The audit: the published file, pass/fail against tolerances, claims, collection from modules, writers."""
import json
import math
import sys
import types

import pandas as pd
import pytest

from replication.cubes import CubeStore
import yaml

from analysis import audit
from analysis.figures import markdown_table

PUBLISHED = audit.load_published()


def test_published_file_has_version_source_and_a_tolerance_for_every_number():
    assert PUBLISHED.version >= 1 and "2504.02904" in PUBLISHED.source["citation"]
    assert set(PUBLISHED.tolerances) == set(PUBLISHED.numbers)
    tol = PUBLISHED.tolerances
    assert tol["knowledge_causal_tracing.corr.cities"].abs == 0.02
    assert tol["knowledge_causal_tracing.max_diff_knowledge.cities"].abs == 0.1
    assert tol["truthfulness_intervention_effect.base_on_instruct.facts"].abs == 0.05
    assert tol["truthfulness_probe_transfer_accuracy_pct.base_on_sft.cities"].abs == 3
    assert tol["refusal_intervention_score.instruct.harmless.r_base_on_instruct"].abs == 0.05
    assert tol["knowledge_causal_tracing.pairs.cities"].criterion == "exact"
    assert tol["entropy_neurons.overlap_out_of_10.llama-3.1-8b.base_vs_sft"].criterion == "exact"


def test_published_numbers_are_the_files_numeric_leaves():
    assert PUBLISHED.numbers["knowledge_causal_tracing.corr.smaller_than"] == 0.9805
    assert PUBLISHED.numbers["refusal_intervention_score.instruct.harmful.baseline"] == 0.98
    assert PUBLISHED.numbers["entropy_neurons.overlap_out_of_10.mistral-7b.base_vs_instruct"] == 9
    assert not any(k.endswith(("metric_notes", "notes")) or "figure1d_neuron_ids" in k for k in PUBLISHED.numbers)


def test_a_number_without_tolerance_is_an_error(tmp_path):
    raw = yaml.safe_load(audit.PUBLISHED_FILE.read_text())
    raw["new_table"] = {"x": 1.5}
    path = tmp_path / "published.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ValueError, match="no tolerance rule matches the published number 'new_table.x'"):
        audit.load_published(path)


def test_a_tolerance_rule_that_matches_nothing_is_an_error(tmp_path):
    raw = yaml.safe_load(audit.PUBLISHED_FILE.read_text())
    raw["tolerances"].append({"match": "knowledge_causal_tracing.corrr.*", "abs": 0.01, "why": "typo"})
    path = tmp_path / "published.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ValueError, match=r"rules \['knowledge_causal_tracing.corrr.\*'\] apply to no published"):
        audit.load_published(path)


def test_published_numbers_name_the_models_they_describe():
    assert PUBLISHED.models == {"base": "llama-3.1-8b", "sft": "llama-3.1-8b-sft",
                                "instruct": "llama-3.1-8b-instruct"}
    assert PUBLISHED.role_of["llama-3.1-8b-sft"] == "sft" and "llama-2-13b" not in PUBLISHED.role_of


@pytest.mark.parametrize("models, message", [
    ({"base": "llama-3.1-8b-instruct"}, r"models.base: 'llama-3.1-8b-instruct' has role 'instruct'"),
    ({"base": "llama-3.1-8B"}, r"models.base: 'llama-3.1-8B' is not in replication/configs/models.yaml"),
    ({}, r"`models:` must map each role"),
])
def test_models_must_be_model_keys_of_their_role(tmp_path, models, message):
    raw = yaml.safe_load(audit.PUBLISHED_FILE.read_text())
    raw["models"] = models
    path = tmp_path / "published.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ValueError, match=message):
        audit.load_published(path)


def rows(table):
    return table.set_index("key")


def test_paper_audit_compares_within_tolerance():
    measured = {
        "knowledge_causal_tracing.corr.cities": 0.9923 - 0.019,    # inside ±0.02
        "knowledge_causal_tracing.corr.neg_cities": 0.9853 + 0.021,  # outside
        "knowledge_causal_tracing.pairs.cities": 238,               # exact
        "knowledge_causal_tracing.pairs.neg_cities": 214,           # off by one
        "knowledge_causal_tracing.max_diff.cities": 0.5,             # one 0.1 step
        "truthfulness_probe_transfer_accuracy_pct.base_on_sft.cities": 85.32 - 3.5,
        "entropy_neurons.average_ratio_difference.mistral-7b.base_vs_instruct": 0.000044,  # +47%
    }
    table = rows(audit.audit("paper", measured))
    status = table["status"]
    assert status["knowledge_causal_tracing.corr.cities"] == "pass"
    assert status["knowledge_causal_tracing.corr.neg_cities"] == "fail"
    assert status["knowledge_causal_tracing.pairs.cities"] == "pass"
    assert status["knowledge_causal_tracing.pairs.neg_cities"] == "fail"
    assert status["knowledge_causal_tracing.max_diff.cities"] == "pass"
    assert status["truthfulness_probe_transfer_accuracy_pct.base_on_sft.cities"] == "fail"
    assert status["entropy_neurons.average_ratio_difference.mistral-7b.base_vs_instruct"] == "pass"
    assert table.loc["knowledge_causal_tracing.pairs.neg_cities", "difference"] == -1
    assert table.loc["knowledge_causal_tracing.corr.cities", "reference"] == 0.9923
    unmeasured = table[(table["kind"] == "published") & (table["status"] == "not measured")]
    assert len(unmeasured) == len(PUBLISHED.numbers) - len(measured)
    assert math.isnan(unmeasured["measured"].iloc[0])
    counts = audit.summary(audit.audit("paper", measured))
    assert counts == {"pass": 4, "fail": 3, "not measured": len(PUBLISHED.numbers) - 7 + len(PUBLISHED.claims)}


def paper_qualitative_values() -> dict[str, float]:
    """The claims' quantities from the published numbers, as defined in the docstring of analysis/audit.py."""
    n = PUBLISHED.numbers

    def table(prefix):
        return {k[len(prefix) + 1:]: v for k, v in n.items() if k.startswith(prefix + ".")}
    ie, acc = "truthfulness_intervention_effect", "truthfulness_probe_transfer_accuracy_pct"
    datasets = table(f"{ie}.base_on_base")

    def shortfall(p):  # POST's own direction/probe on POST minus BASE's, worst case
        return max(n[f"{p}.{post}_on_{post}.{d}"] - n[f"{p}.base_on_{post}.{d}"]
                   for post in ("sft", "instruct") for d in datasets)
    harmless = table("refusal_intervention_score.instruct.harmless")
    cosines = table("refusal_intervention_score.shipped_direction_cosines")
    return {
        "qualitative.knowledge.min_map_corr": min(table("knowledge_causal_tracing.corr").values()),
        "qualitative.truthfulness.max_ie_shortfall": shortfall(ie),
        "qualitative.truthfulness.max_probe_shortfall_pct": shortfall(acc),
        "qualitative.refusal.max_direction_cosine": max(
            v for k, v in cosines.items() if k.startswith("base_vs")),
        "qualitative.refusal.forward_transfer_ratio": (harmless["r_base_on_instruct"] - harmless["baseline"])
        / (harmless["r_instruct_on_instruct"] - harmless["baseline"]),
        "qualitative.confidence.min_entropy_neuron_overlap": min(table("entropy_neurons.overlap_out_of_10").values()),
    }


def test_every_claim_holds_for_the_papers_own_numbers():
    values = paper_qualitative_values()
    assert set(values) == {c.measured for c in PUBLISHED.claims}
    claims = audit.audit("paper", values).query("kind == 'claim'")
    assert (claims["status"] == "holds").all(), claims[["key", "measured", "criterion"]]


def test_demo_audit_checks_only_claims_and_labels_the_models_as_different():
    measured = {
        "knowledge_causal_tracing.corr.cities": 0.3,  # a published key: accepted, not compared for demo
        "qualitative.knowledge.min_map_corr": 0.95,
        "qualitative.refusal.max_direction_cosine": 0.7,
        "qualitative.confidence.min_entropy_neuron_overlap": 7,
    }
    table = audit.audit("demo", measured)
    assert (table["kind"] == "claim").all() and len(table) == len(PUBLISHED.claims)
    status = rows(table)["status"]
    assert status["qualitative.knowledge.min_map_corr"] == "holds"
    assert status["qualitative.refusal.max_direction_cosine"] == "does not hold"
    assert status["qualitative.confidence.min_entropy_neuron_overlap"] == "holds"  # >= 7 at the boundary
    assert status["qualitative.truthfulness.max_ie_shortfall"] == "not measured"
    assert "different" in audit.note("demo") and "not compared" in audit.note("tiny")
    assert "compared with the published" in audit.note("paper")


def test_unknown_measured_key_is_an_error_with_a_suggestion():
    with pytest.raises(ValueError, match="did you mean 'knowledge_causal_tracing.corr.cities'"):
        audit.audit("paper", {"knowledge_causal_tracing.corr.citties": 0.99})


def test_nan_measurement_fails_rather_than_passing():
    table = rows(audit.audit("paper", {"knowledge_causal_tracing.corr.cities": float("nan"),
                                       "qualitative.knowledge.min_map_corr": float("nan")}))
    assert table.loc["knowledge_causal_tracing.corr.cities", "status"] == "fail"
    assert table.loc["qualitative.knowledge.min_map_corr", "status"] == "does not hold"


@pytest.fixture
def results(tmp_path, monkeypatch):
    monkeypatch.setenv("PTR_RESULTS_DIR", str(tmp_path))
    return tmp_path


def fake_experiment(monkeypatch, name, numbers=None, cube_dir=None):
    """Put a module analysis.<name> in place (with measured_numbers when `numbers` is given) and its cube."""
    module = types.ModuleType(f"analysis.{name}")
    if numbers is not None:
        module.measured_numbers = lambda profile_name: numbers
    monkeypatch.setitem(sys.modules, f"analysis.{name}", module)
    if cube_dir is not None:
        CubeStore(cube_dir / f"{name}.zarr", provenance={"finished_at": "2026-01-01T00:00:00+00:00"})


def test_collect_measured_uses_modules_whose_cube_exists(results, monkeypatch):
    fake_experiment(monkeypatch, "knowledge", {"qualitative.knowledge.min_map_corr": 0.97}, results / "demo")
    fake_experiment(monkeypatch, "refusal", {"qualitative.refusal.max_direction_cosine": 0.2})  # no cube
    monkeypatch.setitem(sys.modules, "analysis.truthfulness", None)  # module missing
    CubeStore(results / "demo" / "truthfulness.zarr", provenance={"finished_at": "2026-01-01T00:00:00+00:00"})
    fake_experiment(monkeypatch, "confidence", {"qualitative.confidence.min_entropy_neuron_overlap": 9})
    CubeStore(results / "demo" / "confidence.zarr", provenance={"finished_at": None})  # a run in progress
    assert audit.collect_measured("demo") == {"qualitative.knowledge.min_map_corr": 0.97}


def test_collect_measured_requires_measured_numbers(results, monkeypatch):
    fake_experiment(monkeypatch, "confidence", None, results / "demo")
    with pytest.raises(AttributeError, match="analysis.confidence has no measured_numbers"):
        audit.collect_measured("demo")


def test_run_audit_writes_files_and_strict_exit_code(results, monkeypatch):
    fake_experiment(monkeypatch, "knowledge", {"qualitative.knowledge.min_map_corr": 0.97}, results / "demo")
    table, code = audit.run_audit("demo")
    assert code == 0 and rows(table).loc["qualitative.knowledge.min_map_corr", "status"] == "holds"
    assert audit.run_audit("demo", strict=True)[1] == 0  # nothing failed; not measured is no failure
    document = json.loads((results / "demo" / "audit.json").read_text())
    assert document["profile"] == "demo" and document["compared_with_paper"] is False
    assert document["published_version"] == PUBLISHED.version
    assert document["summary"] == {"holds": 1, "not measured": len(PUBLISHED.claims) - 1}
    assert document["rows"][1]["measured"] is None  # NaN written as null
    md = (results / "demo" / "audit.md").read_text()
    assert md.startswith("# Audit: profile demo") and "| holds" in md and "different" in md

    fake_experiment(monkeypatch, "knowledge", {"qualitative.knowledge.min_map_corr": 0.5})
    assert audit.run_audit("demo")[1] == 0
    assert audit.run_audit("demo", strict=True)[1] == 1


def test_paper_markdown_lists_unmeasured_numbers(tmp_path):
    table = audit.audit("paper", {"knowledge_causal_tracing.corr.cities": 0.99})
    paths = audit.write_audit(table, "paper", tmp_path)
    md = paths["md"].read_text()
    assert "| knowledge_causal_tracing.corr.cities" in md and "| pass" in md
    assert f"Published numbers not measured ({len(PUBLISHED.numbers) - 1})" in md
    assert "knowledge_causal_tracing.corr.neg_cities" in md.split("not measured (")[1]
    tolerances = md.split("## Tolerances")[1]
    assert "| knowledge_causal_tracing.corr.*" in tolerances and "within ±0.02" in tolerances
    assert "exact" in tolerances and "within ±50%" in tolerances


def test_markdown_table_formats_aligns_and_escapes():
    frame = pd.DataFrame({"name": ["a|b", "c"], "value": [0.123456, float("nan")], "n": [238, 7]})
    lines = markdown_table(frame).split("\n")
    assert lines[0] == "| name |  value |   n |"
    assert lines[1] == "|:-----|-------:|----:|"
    assert lines[2] == "| a\\|b | 0.1235 | 238 |"
    assert lines[3] == "| c    |      — |   7 |"
