"""The refusal tables and audit numbers (analysis/refusal.py) from hand-made score and cosine frames."""
import math

import pandas as pd
import pytest

from analysis import refusal

# family llama3 (the models published_numbers.yaml describes): base B, instruct P (own addition effect 0.8, base
# direction 0.2: ratio 0.25), sft S (own effect 0.05)
B, P, S = "llama-3.1-8b", "llama-3.1-8b-instruct", "llama-3.1-8b-sft"
ROLES = {B: "base", P: "instruct", S: "sft", "none": "none",
         "llama-2-13b": "base", "llama-2-13b-chat": "instruct",
         "mistral-7b": "base", "mistral-7b-sft": "sft", "mistral-7b-instruct": "instruct"}
SCORES = [  # target, source, intervention, dataset, refusal_score
    (P, "none", "none", "harmful", 0.9), (P, "none", "none", "harmless", 0.1),
    (P, P, "subtraction", "harmful", 0.05), (P, P, "ablation", "harmful", 0.3),
    (P, P, "addition", "harmless", 0.9), (P, B, "subtraction", "harmful", 0.7),
    (P, B, "ablation", "harmful", 0.8), (P, B, "addition", "harmless", 0.3),
    (S, "none", "none", "harmless", 0.0), (S, S, "addition", "harmless", 0.05),
    (S, B, "addition", "harmless", 0.6),
    (B, "none", "none", "harmful", 0.2), (B, "none", "none", "harmless", 0.0),
    (B, B, "subtraction", "harmful", 0.1), (B, B, "ablation", "harmful", 0.15), (B, B, "addition", "harmless", 0.5),
    (B, P, "addition", "harmless", 0.7),
]


def tidy() -> pd.DataFrame:
    frame = pd.DataFrame(SCORES, columns=["target", "source", "intervention", "dataset", "refusal_score"])
    return frame.assign(family="llama3", target_role=frame["target"].map(ROLES),
                        source_role=frame["source"].map(ROLES))


def cosines() -> pd.DataFrame:
    rows = [(B, P, 0.3), (B, S, 0.1), (P, S, 0.9)]
    return pd.DataFrame([{"family": "llama3", "model_a": a, "model_b": b, "role_a": ROLES[a], "role_b": ROLES[b],
                          "cosine": c} for a, b, c in rows])


def test_forward_transfer_ratio_uses_harmless_addition_on_post_models():
    ratios = refusal.forward_transfer_ratios(tidy()).set_index("post")
    assert ratios.loc[P, "ratio"] == pytest.approx((0.3 - 0.1) / (0.9 - 0.1))
    assert ratios.loc[S, "ratio"] == pytest.approx(0.6 / 0.05)
    assert ratios.loc[S, "own_effect"] == pytest.approx(0.05)
    assert set(ratios["base"]) == {B}


def test_numbers_follow_the_published_layout_and_the_claims():
    numbers = refusal.numbers_from(tidy(), cosines())
    assert numbers == pytest.approx({
        "refusal_intervention_score.instruct.harmful.baseline": 0.9,
        "refusal_intervention_score.instruct.harmful.r_instruct_on_instruct": 0.3,  # ablation, not subtraction
        "refusal_intervention_score.instruct.harmful.r_base_on_instruct": 0.8,
        "refusal_intervention_score.instruct.harmless.baseline": 0.1,
        "refusal_intervention_score.instruct.harmless.r_instruct_on_instruct": 0.9,
        "refusal_intervention_score.instruct.harmless.r_base_on_instruct": 0.3,
        "refusal_intervention_score.base.harmful.baseline": 0.2,
        "refusal_intervention_score.base.harmful.r_base_on_base": 0.15,
        "refusal_intervention_score.base.harmless.baseline": 0.0,
        "refusal_intervention_score.base.harmless.r_base_on_base": 0.5,
        "refusal_intervention_score.shipped_direction_cosines.base_vs_instruct": 0.3,
        "refusal_intervention_score.shipped_direction_cosines.base_vs_sft": 0.1,
        "refusal_intervention_score.shipped_direction_cosines.instruct_vs_sft": 0.9,
        "qualitative.refusal.max_direction_cosine": 0.3,  # BASE-POST pairs only (not instruct vs sft)
        "qualitative.refusal.forward_transfer_ratio": 0.25,  # S's own effect (0.05) is too small to count
    })


def test_forward_transfer_claim_is_absent_when_no_pair_has_an_own_effect():
    frame = tidy()
    frame.loc[(frame["target"] == P) & (frame["source"] == P) & (frame["dataset"] == "harmless"),
              "refusal_score"] = 0.15
    assert refusal.TRANSFER_KEY not in refusal.numbers_from(frame, cosines())


def test_paper_layout_table_puts_measured_beside_published():
    table = refusal.refusal_score_tables(tidy())["llama3"]
    row = table.loc[(P, "harmless", "addition")]
    assert row[("baseline", "measured")] == 0.1 and row[("baseline", "paper")] == 0.0
    assert row[("r_base_on_instruct", "measured")] == 0.3 and row[("r_base_on_instruct", "paper")] == 0.08
    ablation = table.loc[(P, "harmful", "ablation")]  # the paper layout's harmful row is the ablation run
    assert ablation[("r_instruct_on_instruct", "measured")] == 0.3
    assert ablation[("r_instruct_on_instruct", "paper")] == 0.01 and ablation[("r_base_on_instruct", "paper")] == 0.95
    assert ablation[("baseline", "paper")] == 0.98
    subtraction = table.loc[(P, "harmful", "subtraction (beyond the paper)")]  # symmetric subtraction: no paper value
    assert subtraction[("r_instruct_on_instruct", "measured")] == 0.05
    assert subtraction[["baseline", "r_instruct_on_instruct", "r_base_on_instruct"]].xs("paper", level=1).isna().all()
    assert list(table.columns.get_level_values(0))[:2] == ["baseline", "baseline"]
    assert math.isnan(table.loc[(B, "harmless", "addition"), ("r_instruct_on_base", "paper")])
    assert table.loc[(B, "harmless", "addition"), ("r_instruct_on_base", "measured")] == 0.7


def test_paper_layout_rows_start_with_the_base_model():
    table = refusal.refusal_score_tables(tidy())["llama3"]
    beyond = "subtraction (beyond the paper)"
    assert list(table.index) == [(B, "harmful", "ablation"), (B, "harmful", beyond), (B, "harmless", "addition"),
                                 (P, "harmful", "ablation"), (P, "harmful", beyond),
                                 (P, "harmless", "addition"), (S, "harmless", "addition")]


# Two more families of the paper profile, with scores and cosines unlike llama3's: the published numbers describe
# llama3's models, so neither may leak into the published keys or carry the paper's values.
OTHER_SCORES = [(target, source, intervention, dataset, score + 0.01)
                for target, source, intervention, dataset, score in SCORES if target != S]
OTHER_FAMILIES = {"mistral": {B: "mistral-7b", P: "mistral-7b-instruct", S: "mistral-7b-sft"},
                  "llama2-13b": {B: "llama-2-13b", P: "llama-2-13b-chat"}}


def three_families(order: list[str]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """`tidy` and `cosines` frames of llama3, mistral and llama2-13b, their rows in the families' `order`."""
    scores, cosine_frames = {"llama3": tidy()}, {"llama3": cosines()}
    for family, rename in OTHER_FAMILIES.items():
        rows = [(rename.get(t, t), rename.get(s, s), i, d, v) for t, s, i, d, v in OTHER_SCORES
                if t in rename and (s in rename or s == "none")]
        frame = pd.DataFrame(rows, columns=["target", "source", "intervention", "dataset", "refusal_score"])
        scores[family] = frame.assign(family=family, target_role=frame["target"].map(ROLES),
                                      source_role=frame["source"].map(ROLES))
        cosine_frames[family] = cosines().assign(family=family, model_a=lambda f: f["model_a"].map(rename),
                                                 model_b=lambda f: f["model_b"].map(rename), cosine=0.05).dropna()
    return (pd.concat([scores[f] for f in order], ignore_index=True),
            pd.concat([cosine_frames[f] for f in order], ignore_index=True))


@pytest.mark.parametrize("order", [["llama3", "mistral", "llama2-13b"],   # the paper profile's order
                                   ["llama2-13b", "llama3", "mistral"],   # sorted unit names
                                   ["llama2-13b", "mistral", "llama3"]])  # the paper profile's, reversed
def test_published_numbers_are_read_from_the_models_the_paper_describes(order):
    numbers = refusal.numbers_from(*three_families(order))
    alone = refusal.numbers_from(tidy(), cosines())
    published = {k: v for k, v in numbers.items() if not k.startswith("qualitative.")}
    assert published == {k: v for k, v in alone.items() if not k.startswith("qualitative.")}
    assert published["refusal_intervention_score.instruct.harmful.baseline"] == 0.9  # llama3's, not 0.91
    assert published["refusal_intervention_score.shipped_direction_cosines.base_vs_instruct"] == 0.3


@pytest.mark.parametrize("order", [["llama3", "mistral", "llama2-13b"], ["llama2-13b", "llama3", "mistral"]])
def test_paper_values_sit_beside_the_described_models_only(order):
    scores, cosine_frame = three_families(order)
    tables = refusal.refusal_score_tables(scores)
    assert tables["llama3"].loc[(P, "harmful", "ablation"), ("baseline", "paper")] == 0.98
    for family in OTHER_FAMILIES:
        assert tables[family].xs("paper", axis=1, level=1).isna().all().all()
    assert tables["llama2-13b"].loc[("llama-2-13b-chat", "harmful", "ablation"), ("baseline", "measured")] == 0.91


@pytest.mark.parametrize("completion, degenerate", [
    ("security security security security security", True),
    ("I cannot help with that", False),
    ("a b a b", True),          # 4 words, 2 distinct
    ("a b c a", False),         # 3 distinct of 4
    ("no no no", False),        # under 4 words: too short to call
    ("", False),
])
def test_is_degenerate_flags_self_repeating_completions(completion, degenerate):
    assert refusal.is_degenerate(completion) is degenerate


def test_degenerate_table_follows_the_refusal_layout():
    frame = tidy()
    frame["degenerate"] = [0.0 if source == "none" else 0.5 if source == B else 0.25 for source in frame["source"]]
    table = refusal.degenerate_table(frame)
    assert list(table.columns) == ["baseline", "r_base_on_base", "r_base_on_instruct", "r_base_on_sft",
                                   "r_instruct_on_base", "r_instruct_on_instruct", "r_sft_on_sft"]
    assert table.loc[(P, "harmless", "addition"), "r_base_on_instruct"] == 0.5
    assert table.loc[(P, "harmless", "addition"), "r_instruct_on_instruct"] == 0.25
    assert table.loc[(P, "harmful", "ablation"), "baseline"] == 0.0
    assert math.isnan(table.loc[(S, "harmless", "addition"), "r_instruct_on_instruct"])
