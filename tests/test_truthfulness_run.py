"""Truthfulness end to end on two tiny models: the cube's units against direct recomputation, resuming, and the
analysis tables and audit numbers read from it."""
import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
import zarr

from analysis import truthfulness as analysis
from analysis.audit import audit, load_published
from data_prep.prompts import intervention_prompt
from replication.config import PROFILE_DIR, load_model_table, load_profile
from replication.cubes import COMPLETE_ATTR, UNITS_GROUP, open_cube
from replication.experiments import truthfulness as tr
from replication.models import load_model

TABLE = load_model_table()
DATASETS = ["cities", "sp_en_trans", "animal_class"]
N = 8  # statements per dataset (activations)
N_PROMPTS = 6  # intervention prompts per dataset


def tiny_profile(directory: Path):
    """tiny-llama and a second random tiny Llama standing in for its post-trained version (no post-training)."""
    table = dict(TABLE)
    table["tiny-llama-other"] = dataclasses.replace(TABLE["tiny-llama"], key="tiny-llama-other", role="instruct",
                                                    seed=11)
    spec = yaml.safe_load((PROFILE_DIR / "tiny.yaml").read_text())
    spec["families"] = {"tiny": {"base": "tiny-llama", "post": ["tiny-llama-other"]}}
    spec["experiments"]["truthfulness"].update(datasets=DATASETS, similarity_datasets=[*DATASETS, "neg_cities"],
                                               max_statements=N, max_intervention_statements=N_PROMPTS, batch_size=3)
    path = directory / "tinytest.yaml"
    path.write_text(yaml.safe_dump(spec))
    return load_profile(path, model_table=table)


@pytest.fixture(scope="module")
def ran(processed_data, tmp_path_factory):
    directory = tmp_path_factory.mktemp("truthfulness")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PTR_RESULTS_DIR", str(directory / "results"))
        profile = tiny_profile(directory)
        path = tr.run(profile, progress=False)
        yield profile, path


@pytest.fixture(scope="module")
def models():
    return {key: load_model(TABLE["tiny-llama"] if key == "tiny-llama" else
                            dataclasses.replace(TABLE["tiny-llama"], seed=11), dtype="float32", device="cpu")
            for key in ("tiny-llama", "tiny-llama-other")}


@pytest.mark.slow
def test_units_and_provenance(ran):
    profile, path = ran
    store = open_cube(path)
    keys = ("tiny-llama", "tiny-llama-other")
    assert set(store.unit_names()) == {*(f"activations__{k}" for k in keys), "similarity__tiny", "probes__tiny",
                                       "pca__tiny", *(f"intervention__{k}__{d}" for k in keys for d in DATASETS)}
    assert store.attrs["experiment"] == "truthfulness" and set(store.attrs["models"]) == set(keys)
    assert store.attrs["config_hash"] == profile.config_hash() and "finished_at" in store.attrs
    acts = store.read_unit("activations__tiny-llama")
    assert dict(acts.sizes) == {"dataset": 4, "truth": 2, "layer": 4, "hidden": 64, "statement": N * len(DATASETS)}
    assert acts["n_statements"].values.tolist() == [[N // 2, N // 2]] * 4
    similarity = store.read_unit("similarity__tiny")
    np.testing.assert_allclose(similarity["model_cosine"].sel(model_a="tiny-llama", model_b="tiny-llama").values,
                               1, atol=1e-5)
    np.testing.assert_allclose(similarity["dataset_cosine"].sel(dataset_a="cities", dataset_b="cities").values,
                               1, atol=1e-5)


@pytest.mark.slow
def test_cube_equals_direct_recomputation(ran, models):
    _, path = ran
    store = open_cube(path)
    units = {key: store.read_unit(f"activations__{key}") for key in models}
    layers = {key: list(model.model.layers) for key, model in models.items()}
    statements = tr.probe_statements("cities", N)
    for key, model in models.items():  # probe-layer activations: batch of 1, centred by hand
        direct = tr.last_token_activations(model, layers[key], list(statements["statement"]), batch_size=1)[:, 2]
        got, labels = tr.probe_data(units[key], ["cities"])
        torch.testing.assert_close(got, direct - direct.mean(0), rtol=0, atol=1e-5)
        assert labels.tolist() == statements["label"].tolist()
    probes = store.read_unit("probes__tiny")
    probe = tr.fit_mm_probe(*tr.probe_data(units["tiny-llama"], ["sp_en_trans", "animal_class"]))
    assert float(probes["accuracy"].sel(probe_model="tiny-llama", target_model="tiny-llama-other",
                                        test_dataset="cities")) == tr.probe_accuracy(
        probe, *tr.probe_data(units["tiny-llama-other"], ["cities"]))
    # the base direction on the other model, cities held out: prompts rebuilt from data_prep, one at a time
    unit = store.read_unit("intervention__tiny-llama-other__cities")
    table = tr.intervention_table("cities", N_PROMPTS)
    assert unit.sizes["statement"] == N_PROMPTS and unit["label"].values.tolist() == table["label"].tolist()
    prompts = [intervention_prompt("cities", s, i) for s, i in zip(table["statement"], table["prompt_index"])]
    direction = tr.truth_direction(*tr.probe_data(units["tiny-llama"], ["sp_en_trans", "animal_class"]))
    shifts = torch.as_tensor(np.where(table["label"] == 1, -1.0, 1.0))[:, None].float() * direction
    model = models["tiny-llama-other"]
    for condition, kwargs in (("none", {}), ("tiny-llama", {"edit_layers": [1, 2], "shifts": shifts})):
        direct = tr.true_false_probabilities(model, layers["tiny-llama-other"], prompts, batch_size=1, **kwargs)
        np.testing.assert_allclose(unit["p_true"].sel(intervention=condition).values, direct[:, 0], rtol=1e-4)
        np.testing.assert_allclose(unit["p_false"].sel(intervention=condition).values, direct[:, 1], rtol=1e-4)
    p_diff = (unit["p_true"] - unit["p_false"]).values
    is_true = unit["label"].values == 1
    np.testing.assert_allclose(unit["mean_p_diff"].sel(truth="true").values, p_diff[:, is_true].mean(1), atol=1e-7)
    before, after = unit["mean_p_diff"].sel(intervention="none").values, unit["mean_p_diff"].sel(
        intervention="tiny-llama").values
    assert float(unit["intervention_effect"].sel(direction_model="tiny-llama", ie="average")) == pytest.approx(
        tr.average_intervention_effect(before[0], after[0], before[1], after[1]))


@pytest.mark.slow
def test_rerun_skips_finished_units_and_redoes_an_unfinished_one(ran):
    profile, path = ran
    store = open_cube(path)
    finished = {name: store.read_unit(name).attrs["finished_at"] for name in store.unit_names()}
    name = "intervention__tiny-llama__animal_class"
    old = store.read_unit(name)
    group = zarr.open_group(str(path), mode="a", path=f"{UNITS_GROUP}/{name}")
    group.attrs.put({k: v for k, v in group.attrs.items() if k != COMPLETE_ATTR})
    tr.run(profile, progress=False)
    for unit_name, stamp in finished.items():
        if unit_name != name:
            assert store.read_unit(unit_name).attrs["finished_at"] == stamp
    np.testing.assert_allclose(store.read_unit(name)["p_true"].values, old["p_true"].values, rtol=1e-6)


@pytest.mark.slow
def test_analysis_tables_and_audit_numbers(ran, monkeypatch):
    profile, _ = ran
    assert not [k for k in analysis.measured_numbers(profile.name) if not k.startswith("qualitative.")]
    # the published numbers describe llama3's models: read the tiny models' cube as if it were theirs
    as_paper = dataclasses.replace(load_published(), models={"base": "tiny-llama", "instruct": "tiny-llama-other"})
    monkeypatch.setattr(analysis, "load_published", lambda: as_paper)
    probe_table = analysis.probe_transfer_tables(profile.name)["tiny"]
    assert list(probe_table.index) == DATASETS
    columns = [c for c, _ in probe_table.columns[::2]]
    assert columns == ["p_BASE→h_BASE", "p_INSTRUCT→h_INSTRUCT", "p_BASE→h_INSTRUCT",
                       "Δ p_BASE→h_INSTRUCT − p_INSTRUCT→h_INSTRUCT"]
    tidy = analysis.probe_accuracies(profile.name)
    own = tidy.query("probe_model == 'tiny-llama-other' and target_model == 'tiny-llama-other'")
    assert probe_table[("p_INSTRUCT→h_INSTRUCT", "measured")].tolist() == own.set_index("dataset").loc[
        DATASETS, "accuracy_pct"].tolist()
    assert probe_table.loc["cities", ("p_BASE→h_INSTRUCT", "paper")] == 95.91
    np.testing.assert_allclose(probe_table[("Δ p_BASE→h_INSTRUCT − p_INSTRUCT→h_INSTRUCT", "measured")],
                               probe_table[("p_BASE→h_INSTRUCT", "measured")]
                               - probe_table[("p_INSTRUCT→h_INSTRUCT", "measured")])
    ie_table = analysis.intervention_effect_tables(profile.name)["tiny"]
    assert ie_table.loc["cities", ("t_BASE→h_BASE", "paper")] == 0.83
    numbers = analysis.measured_numbers(profile.name)
    assert numbers["truthfulness_intervention_effect.base_on_instruct.cities"] == pytest.approx(
        ie_table.loc["cities", ("t_BASE→h_INSTRUCT", "measured")])
    assert numbers["truthfulness_intervention_effect.shipped_cities_exact.instruct_on_base"] == pytest.approx(
        analysis.intervention_effects(profile.name).query(
            "direction_model == 'tiny-llama-other' and target_model == 'tiny-llama' and dataset == 'cities'")[
            "average"].item())
    assert numbers["qualitative.truthfulness.max_probe_shortfall_pct"] == pytest.approx(
        -probe_table[("Δ p_BASE→h_INSTRUCT − p_INSTRUCT→h_INSTRUCT", "measured")].min())
    assert numbers["qualitative.truthfulness.max_ie_shortfall"] == pytest.approx(
        -ie_table[("Δ t_BASE→h_INSTRUCT − t_INSTRUCT→h_INSTRUCT", "measured")].min())
    assert "truthfulness_probe_transfer_accuracy_pct.base_on_instruct.facts" not in numbers  # not run
    checked = audit(profile.name, numbers)  # every key is one the audit knows
    assert set(checked.loc[checked["kind"] == "claim", "key"]) >= {"qualitative.truthfulness.max_ie_shortfall"}
    points, arrows = analysis.pca_data(profile.name)
    assert len(points) == 2 * N and set(arrows["direction_model"]) == {"tiny-llama", "tiny-llama-other"}
    similarity = analysis.direction_similarity_table(profile.name)
    assert list(similarity.columns) == ["cos(tiny-llama, tiny-llama-other) @ layer 2"]
