"""The knowledge experiment end to end on tiny models (cube layout, resumability, equality with the reference
loop through the whole pipeline) and its analysis: the original's aggregation and normalisation reproduce the
maps computed from the authors' shipped patching results."""
import dataclasses
import json
import weakref
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
import zarr

from analysis import knowledge as analysis
from analysis.audit import audit, load_published
from data_prep.build import build_all
from data_prep.prompts import patching_prompts
from replication.config import PROFILE_DIR, load_model_table, load_profile
from replication.cubes import COMPLETE_ATTR, UNITS_GROUP, open_cube
from replication.experiments import knowledge
from replication.mechanics.patching import PatchModel, reference_patch_effects
from replication.models import load_model

DATA = Path(__file__).parent / "data"
SHIPPED = "paper_artifacts/patching_results.json"
DATASETS = ["cities", "larger_than", "tulu_extracted"]  # tulu_extracted: pairs of different lengths


def printed_map(name: str) -> np.ndarray:
    return pd.read_csv(DATA / name, comment="#", index_col="layer").to_numpy()


# ---- analysis on the authors' shipped results ------------------------------------------------------------------

@pytest.fixture(scope="module")
def shipped_effects(mirror) -> np.ndarray:
    path = mirror / SHIPPED
    if not path.is_file():
        pytest.skip(f"{path} is not in the mirror")
    records = json.loads(path.read_text())["llama-3.1-8b-instruct_cities_true_false"]
    return analysis.original_effects(records)


def test_shipped_results_reproduce_the_printed_mean_map(shipped_effects):
    assert shipped_effects.shape == (238, 32, 14)
    mean = analysis.mean_map(shipped_effects)
    assert np.abs(mean - printed_map("knowledge_shipped_mean_map.csv")).max() <= 0.005 + 1e-9
    assert round(mean.min(), 3) == -6.949 and round(mean.max(), 3) == 5.155


def test_shipped_results_reproduce_the_printed_normalized_map(shipped_effects):
    normalized = analysis.normalize(analysis.mean_map(shipped_effects))
    assert np.allclose(normalized, printed_map("knowledge_shipped_normalized_map.csv"), rtol=0, atol=1e-12)


def test_normalize_bins_as_the_original():
    # 20 bins of width (1 + 2e-5) / 20 over [-1e-5, 1 + 1e-5]: 0.56 falls in bin 12 -> 0.2, 0.74 in bin 15 -> 0.5.
    values = np.array([[0.0, 0.3, 0.56], [0.74, 0.97, 1.0]])
    expected = np.array([[0.0, 0.0, 0.2], [0.5, 1.0, 1.0]])
    assert np.allclose(analysis.normalize(values), expected, rtol=0, atol=1e-12)
    assert np.allclose(analysis.normalize(values * 7 - 3), expected, rtol=0, atol=1e-12)  # affine invariant


def test_knowledge_others_last_map_averages_per_pair_then_over_pairs():
    nan = np.nan
    # one layer; pair 0 has 3 positions (padded in front), pair 1 has 4
    effects = np.array([[[nan, 1.0, 2.0, 6.0]], [[3.0, 5.0, 7.0, 8.0]]])
    is_knowledge = np.array([[False, True, False, False], [False, True, True, False]])
    expected = np.array([[(1.0 + 6.0) / 2, (2.0 + 3.0) / 2, (6.0 + 8.0) / 2]])
    assert np.allclose(analysis.knowledge_others_last_map(effects, is_knowledge), expected)


def test_compare_maps_truncates_and_measures_the_knowledge_columns():
    columns = ["The", "[s1]", "is", "[o1]", ":"]
    knowledge_cols = np.array([False, True, False, True, False])
    values = np.array([[0.0, 10.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0, 10.0]])
    a = analysis.Map(values, columns, knowledge_cols, 5)
    assert analysis.compare_maps(a, a) == {"corr": pytest.approx(1.0), "max_diff": 0.0, "max_diff_knowledge": 0.0}
    moved = values.copy()
    moved[0, 1], moved[0, 3] = 0.0, 10.0  # the subject's peak moves to the object
    b = analysis.Map(moved, columns, knowledge_cols, 5)
    metrics = analysis.compare_maps(a, b)
    assert metrics["max_diff"] == metrics["max_diff_knowledge"] == 1.0
    assert metrics["corr"] == pytest.approx(3 / 8)  # 10 binary cells, two 1.0 in each map, one shared
    longer = analysis.Map(np.hstack([np.full((2, 1), -5.0), values]), ["\n", *columns],
                          np.array([False, *knowledge_cols]), 5)
    assert analysis.compare_maps(longer, a)["max_diff"] == 0.0  # the extra first column is dropped


# ---- the experiment end to end on tiny models ------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_data(processed_data, mirror):
    """Processed data with patching pairs for the tiny tokenizer."""
    tokenizer = load_model(load_model_table()["tiny-llama"]).tokenizer
    build_all(mirror=mirror, tokenizers={"tiny": lambda text: tokenizer.encode(text, add_special_tokens=False)},
              progress=False)
    return processed_data


@pytest.fixture(scope="module")
def tiny_profile(tmp_path_factory):
    """A two-model tiny profile: tiny-llama and a randomly initialised 'post-trained' model of the same shape."""
    table = load_model_table()
    table["tiny-post"] = dataclasses.replace(table["tiny-llama"], key="tiny-post", role="sft", seed=11)
    path = tmp_path_factory.mktemp("profiles") / "knowledge-test.yaml"
    tiny = yaml.safe_load((PROFILE_DIR / "tiny.yaml").read_text())
    tiny["families"] = {"tiny": {"base": "tiny-llama", "post": ["tiny-post"]}}
    tiny["experiments"]["knowledge"] = {"datasets": DATASETS, "max_pairs": 3, "batch_size": 2, "layers_per_batch": 3}
    path.write_text(yaml.safe_dump(tiny))
    return load_profile(path, model_table=table)


@pytest.fixture(scope="module")
def cube(tiny_data, tiny_profile, tmp_path_factory):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PTR_RESULTS_DIR", str(tmp_path_factory.mktemp("results")))
        patch.setattr(analysis, "load_profile", lambda name: tiny_profile)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # tiny models gain nothing from threads, and on a busy CPU they cost
        yield knowledge.run(tiny_profile, progress=False)
        torch.set_num_threads(threads)


def test_run_holds_one_model_at_a_time(tiny_data, tiny_profile, tmp_path, monkeypatch):
    """BASE, POST, then BASE again for the backward maps, each freed before the next loads (the cross-model maps
    keep the source's TRUE runs, not the source model); the same units as `cube` (computed with no such check)."""
    monkeypatch.setenv("PTR_RESULTS_DIR", str(tmp_path))
    loaded, alive_at_load = [], []
    original = knowledge.load_model

    def tracked(spec, **kwargs):
        alive_at_load.append([key for key, model in loaded if model() is not None])
        model = original(spec, **kwargs)
        loaded.append((spec.key, weakref.ref(model)))
        return model

    monkeypatch.setattr(knowledge, "load_model", tracked)
    true_runs = []  # (model loaded, the TRUE prompts' first tokens): own and cross-model maps share a model's runs
    original_runs = knowledge.source_runs
    monkeypatch.setattr(knowledge, "source_runs", lambda model, tokens, size: true_runs.append(
        (loaded[-1][0], tuple(tokens[0].true_ids))) or original_runs(model, tokens, size))
    store = open_cube(knowledge.run(tiny_profile, progress=False))
    assert [key for key, _ in loaded] == ["tiny-llama", "tiny-post", "tiny-llama"]
    assert alive_at_load == [[], [], []]
    assert len(store.unit_names()) == 4 * len(DATASETS)
    assert len(true_runs) == 2 * len(DATASETS)  # once per model and dataset, not once per map
    assert len(set(true_runs)) == len(true_runs)
    for key, other in [("tiny-llama", "tiny-post"), ("tiny-post", "tiny-llama")]:
        for dataset in DATASETS:  # a shared run gives a unit's TRUE logit differences
            own = store.read_unit(knowledge.unit_name(key, key, dataset))
            cross = store.read_unit(knowledge.unit_name(key, other, dataset))
            assert np.array_equal(own["true_logit_diff"].values, cross["true_logit_diff"].values)


def test_run_writes_one_unit_per_model_pair_and_dataset(cube, tiny_profile):
    store = open_cube(cube)
    expected = {knowledge.unit_name(s, t, d) for s, t in [("tiny-llama", "tiny-llama"), ("tiny-post", "tiny-post"),
                                                          ("tiny-llama", "tiny-post"), ("tiny-post", "tiny-llama")]
                for d in DATASETS}
    assert set(store.unit_names()) == expected
    assert store.attrs["experiment"] == "knowledge" and store.attrs["profile"] == tiny_profile.name
    assert store.attrs["config_hash"] == tiny_profile.config_hash() and "finished_at" in store.attrs
    unit = store.read_unit("tiny-llama__tiny-post__cities")
    assert unit.attrs["direction"] == "forward" and unit.attrs["n_pairs"] == 3
    assert unit["patch_effect"].dims == ("pair", "layer", "position")
    assert unit.sizes == {"pair": 3, "layer": 4, "position": unit.sizes["position"]}
    roles = list(unit["role"].values[0])
    assert roles[:3] == ["The", "city", "of"] and roles[-4:] == ["This", "statement", "is", ":"]
    assert unit["is_knowledge"].values[0].tolist() == [r.startswith(("[s", "[o")) for r in roles]
    assert not np.isnan(unit["patch_effect"].values).any()
    assert store.read_unit("tiny-llama__tiny-llama__tulu_extracted").attrs["map_kind"] == "knowledge_others_last"


@pytest.mark.parametrize("dataset", ["larger_than", "tulu_extracted"])
def test_unit_values_equal_the_reference_loop(cube, tiny_profile, dataset):
    """The whole pipeline (pairs, prompts, tokenisation, batching, padding, cube) against the original's loop."""
    unit = open_cube(cube).read_unit(f"tiny-post__tiny-llama__{dataset}")
    models = {key: PatchModel.from_spec(load_model(tiny_profile.model_spec(key)), tiny_profile.model_spec(key))
              for key in ("tiny-llama", "tiny-post")}
    pairs = knowledge.dataset_pairs(tiny_profile, tiny_profile.model_spec("tiny-llama"), dataset)
    prompts = patching_prompts(dataset, pairs, seed=tiny_profile.seed)
    lengths = set()
    for i in range(len(pairs)):
        tokenizer = models["tiny-llama"].lm.tokenizer
        tokens = knowledge.tokenize_pair(tokenizer, tokenizer, dataset, pairs[i], *prompts[i], "")
        expected = reference_patch_effects(models["tiny-post"], models["tiny-llama"], torch.tensor(tokens.true_ids),
                                           torch.tensor(tokens.false_ids), tokens.n_toks)
        stored = unit["patch_effect"].values[i]
        assert np.isnan(stored[:, :-tokens.n_toks]).all()  # aligned on the last token, padded in front
        assert np.allclose(stored[:, -tokens.n_toks:], expected.numpy(), rtol=0, atol=1e-4)
        assert list(unit["role"].values[i][-tokens.n_toks:]) == tokens.roles
        assert unit["false_statement"].values[i] == pairs[i].false
        lengths.add(tokens.n_toks)
    assert (len(lengths) > 1) == (dataset == "tulu_extracted")  # the padding is exercised


def test_run_resumes_finished_units_and_redoes_unfinished_ones(cube, tiny_profile, monkeypatch):
    store = open_cube(cube)
    before = store.read_unit("tiny-post__tiny-post__cities")["patch_effect"].values
    computed = []
    original = knowledge.patch_dataset
    monkeypatch.setattr(knowledge, "patch_dataset", lambda *a, **k: computed.append(k["desc"]) or original(*a, **k))
    knowledge.run(tiny_profile, progress=False)
    assert computed == []
    group = zarr.open_group(str(cube), mode="a", path=f"{UNITS_GROUP}/tiny-post__tiny-post__cities")
    group.attrs.put({k: v for k, v in group.attrs.items() if k != COMPLETE_ATTR})  # as if interrupted
    knowledge.run(tiny_profile, progress=False)
    assert computed == ["tiny-post__tiny-post__cities"]
    # Redone alone, not beside the cross-model map into the same model as in the first run: float rounding only.
    redone = open_cube(cube).read_unit("tiny-post__tiny-post__cities")["patch_effect"].values
    assert np.allclose(redone, before, rtol=0, atol=1e-5)


def test_analysis_tables_and_audit_keys(cube, tiny_profile, monkeypatch):
    assert not [k for k in analysis.measured_numbers(tiny_profile.name) if not k.startswith("qualitative.")]
    assert analysis.comparison_table(tiny_profile.name)["paper_corr"].isna().all()
    # the published numbers describe llama3's models: read the tiny models' cube as if it were theirs
    as_paper = dataclasses.replace(load_published(), models={"base": "tiny-llama", "instruct": "tiny-post"})
    monkeypatch.setattr(analysis, "load_published", lambda: as_paper)
    table = analysis.comparison_table(tiny_profile.name)
    assert len(table) == 9  # 3 datasets x own / forward / backward
    assert set(table["comparison"]) == {"own", "forward", "backward"}
    assert table["corr"].between(-1, 1).all() and (table["pairs"] == 3).all()
    numbers = analysis.measured_numbers(tiny_profile.name)
    own = table[table["comparison"] == "own"]
    assert numbers["qualitative.knowledge.min_map_corr"] == own["corr"].min()
    cities = own[own["dataset"] == "cities"].iloc[0]
    assert numbers["knowledge_causal_tracing.corr.cities"] == cities["corr"]
    assert numbers["knowledge_causal_tracing.pairs.larger_than"] == 3
    assert cities["paper_corr"] == 0.9923  # the paper's number beside the reference pair's row
    base_unit = open_cube(cube).read_unit("tiny-llama__tiny-llama__cities")  # the clean gap: TRUE run minus FALSE run
    expected_gap = float(np.mean(base_unit["true_logit_diff"].values - base_unit["false_logit_diff"].values))
    assert cities["clean_gap_a"] == pytest.approx(expected_gap) and cities["map_a"] == "tiny-llama->tiny-llama"
    assert set(numbers) >= {f"knowledge_causal_tracing.figure1a_larger_than_base_minus_post.{k}"
                            for k in ("subject_max_diff", "object_max_diff", "last_token_max_diff")}
    audited = audit(tiny_profile.name, numbers)  # every key is one the audit knows
    assert audited.loc[audited["key"] == "qualitative.knowledge.min_map_corr", "status"].item() in (
        "holds", "does not hold")


def test_paper_map_is_the_authors_shipped_cities_map(mirror, monkeypatch, tmp_path):
    """analysis.knowledge.paper_map reads the shipped file through data_prep's reader and labels its columns: the
    same normalised map and token roles as the independent transcription in tests/data."""
    monkeypatch.setenv("PTR_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("PTR_DATA_MIRROR", str(mirror))
    paper, entry = analysis.paper_map()
    header = (DATA / "knowledge_shipped_normalized_map.csv").read_text().splitlines()
    columns = next(line for line in header if not line.startswith("#")).split(",")[1:]
    assert paper.columns == columns and paper.n_pairs == 238
    assert np.allclose(analysis.normalize(paper.values), printed_map("knowledge_shipped_normalized_map.csv"), atol=1e-9)
    assert [c for c, k in zip(paper.columns, paper.knowledge) if k] == ["[s1]", "[s2]", "[s3]", "[o1]"]
    assert (entry["model"], entry["dataset"]) == ("llama-3.1-8b-instruct", "cities")
