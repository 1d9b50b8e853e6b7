"""Truthfulness tables and audit numbers (analysis/truthfulness.py) from hand-made frames of three families: the
published numbers describe llama3's models, whatever order the families' rows come in."""
import math

import pandas as pd
import pytest

from analysis import truthfulness

FAMILIES = {  # family: {model: role}; each family's values are offset so that a leak shows
    "llama3": {"llama-3.1-8b": "base", "llama-3.1-8b-sft": "sft", "llama-3.1-8b-instruct": "instruct"},
    "mistral": {"mistral-7b": "base", "mistral-7b-sft": "sft", "mistral-7b-instruct": "instruct"},
    "llama2-13b": {"llama-2-13b": "base", "llama-2-13b-chat": "instruct"},
}
OFFSET = {"llama3": 0.0, "mistral": 0.1, "llama2-13b": 0.2}
DATASETS = ["cities", "facts"]
ROLE_VALUE = {"base": 0.5, "sft": 0.6, "instruct": 0.7}


def value(family: str, source_role: str, target_role: str, dataset: str) -> float:
    """A distinct value per (family, source role, target role, dataset)."""
    return ROLE_VALUE[source_role] + ROLE_VALUE[target_role] / 10 + DATASETS.index(dataset) / 100 + OFFSET[family]


def pairs(family: str):
    """(source, target) of the family: every model on itself, the base on every post and every post on the base."""
    models = FAMILIES[family]
    base = next(m for m, r in models.items() if r == "base")
    posts = [m for m in models if m != base]
    return [(base, base)] + [(p, p) for p in posts] + [(base, p) for p in posts] + [(p, base) for p in posts]


def frames(order: list[str]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(`probe_accuracies`, `intervention_effects`) frames of the three families, rows in the families' `order`."""
    probes, effects = [], []
    for family in order:
        roles = FAMILIES[family]
        for source, target in pairs(family):
            for dataset in DATASETS:
                v = value(family, roles[source], roles[target], dataset)
                before = value(family, roles[target], roles[target], dataset)  # the target's, unsteered
                probes.append({"family": family, "probe_model": source, "target_model": target,
                               "probe_role": roles[source], "target_role": roles[target], "dataset": dataset,
                               "accuracy_pct": 100 * v})
                effects.append({"direction_model": source, "target_model": target, "direction_role": roles[source],
                                "target_role": roles[target], "dataset": dataset, "n_true": 10, "n_false": 10,
                                "p_diff_true_before": before, "p_diff_false_before": -before, "p_diff_true_after": 0.0,
                                "p_diff_false_after": 0.0, "true_to_false": v, "false_to_true": v, "average": v})
    return pd.DataFrame(probes), pd.DataFrame(effects)


@pytest.mark.parametrize("order", [["llama3", "mistral", "llama2-13b"],   # the paper profile's order
                                   ["llama2-13b", "llama3", "mistral"],   # sorted unit names
                                   ["llama2-13b", "mistral", "llama3"]])  # the paper profile's, reversed
def test_published_numbers_are_read_from_the_models_the_paper_describes(order):
    numbers = truthfulness.numbers_from(*frames(order))
    expected = {}
    for source_role, target_role in [("base", "base"), ("sft", "sft"), ("base", "sft"), ("instruct", "instruct"),
                                     ("base", "instruct")]:
        for dataset in DATASETS:
            v = value("llama3", source_role, target_role, dataset)
            expected[f"truthfulness_intervention_effect.{source_role}_on_{target_role}.{dataset}"] = v
            expected[f"truthfulness_probe_transfer_accuracy_pct.{source_role}_on_{target_role}.{dataset}"] = 100 * v
    shipped = "truthfulness_intervention_effect.shipped_cities_exact"
    for source_role, target_role in [("base", "base"), ("instruct", "base"), ("base", "instruct"),
                                     ("instruct", "instruct")]:
        expected[f"{shipped}.{source_role}_on_{target_role}"] = value("llama3", source_role, target_role, "cities")
    for role in ("base", "instruct"):
        expected[f"{shipped}.p_diff_before.{role}_true"] = value("llama3", role, role, "cities")
        expected[f"{shipped}.p_diff_before.{role}_false"] = -value("llama3", role, role, "cities")
    published = {k: v for k, v in numbers.items() if not k.startswith("qualitative.")}
    assert published == pytest.approx(expected)
    # the claims' quantities still take the worst case over every family: POST's own minus BASE's on POST
    assert numbers[truthfulness.IE_SHORTFALL_KEY] == pytest.approx(max(
        value(f, r, r, d) - value(f, "base", r, d) for f in FAMILIES for r in set(FAMILIES[f].values()) - {"base"}
        for d in DATASETS))


def test_a_profile_without_the_papers_models_has_no_published_numbers():
    probes, effects = frames(["mistral", "llama2-13b"])
    assert set(truthfulness.numbers_from(probes, effects)) == {truthfulness.IE_SHORTFALL_KEY,
                                                             truthfulness.PROBE_SHORTFALL_KEY}


@pytest.mark.parametrize("order", [["llama3", "mistral", "llama2-13b"], ["llama2-13b", "llama3", "mistral"]])
def test_paper_values_sit_beside_the_described_models_only(order):
    probes, _ = frames(order)
    tables = {family: truthfulness._paper_layout(frame, "probe", "accuracy_pct", "p", truthfulness.PROBE_SECTION,
                                                 DATASETS)
              for family, frame in probes.groupby("family", sort=False)}
    llama3 = tables["llama3"]
    assert llama3.loc["cities", ("p_BASE→h_INSTRUCT", "paper")] == 95.91
    assert llama3.loc["facts", ("p_SFT→h_SFT", "paper")] == 77.58
    assert llama3.loc["cities", ("p_BASE→h_INSTRUCT", "measured")] == pytest.approx(
        100 * value("llama3", "base", "instruct", "cities"))
    for family in ("mistral", "llama2-13b"):
        assert tables[family].xs("paper", axis=1, level=1).isna().all().all()
        assert not math.isnan(tables[family].loc["cities", ("p_BASE→h_BASE", "measured")])
