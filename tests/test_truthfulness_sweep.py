"""The layer sweep: the choice rule on hand-made numbers, and a sweep of a tiny model against direct probes."""
import numpy as np
import pytest
import torch

from replication.config import load_model_table
from replication.experiments import truthfulness as tr
from replication.models import load_model

DATASETS = ["cities", "sp_en_trans", "animal_class"]


def test_choose_layers_takes_the_best_probe_layer_and_the_narrowest_near_best_range():
    accuracy = np.array([[0.5, 0.5], [0.6, 0.7], [0.9, 0.8], [0.7, 0.7]])  # layer 2 is best
    candidates = [(2, 2), (1, 2), (0, 2), (3, 3), (1, 3)]
    effects = np.array([[0.5, 0.5], [0.80, 0.82], [0.84, 0.84], [0.99, 0.99], [0.9, 0.9]])
    # at layer 2 the best mean IE is 0.84; 0.81 is within 0.05 of it, so the range 1..2 is enough
    assert tr.choose_layers(accuracy, candidates, effects) == (1, 2)
    effects[1] = [0.70, 0.72]
    assert tr.choose_layers(accuracy, candidates, effects) == (0, 2)


@pytest.mark.slow
def test_sweep_unit_on_a_tiny_model(processed_data):
    model = load_model(load_model_table()["tiny-llama"], dtype="float32", device="cpu")
    layers = list(model.model.layers)
    result = tr.sweep_unit(model, layers, DATASETS, max_statements=10, max_intervention_statements=4,
                           n_probe_layers=2, widths=(1, 2), coefficient=1.0, batch_size=4)
    assert result["accuracy"].shape == (4, 3)
    acts = {d: tr.centre(tr.last_token_activations(model, layers, list(tr.probe_statements(d, 10)["statement"]),
                                                   batch_size=1)) for d in DATASETS}
    labels = {d: tr.probe_statements(d, 10)["label"].to_numpy() for d in DATASETS}
    probe = tr.fit_mm_probe(torch.cat([acts[d][:, 1] for d in DATASETS[1:]]),
                            np.concatenate([labels[d] for d in DATASETS[1:]]))
    assert float(result["accuracy"].sel(layer=1, test_dataset="cities")) == tr.probe_accuracy(
        probe, acts["cities"][:, 1], labels["cities"])
    ends = np.argsort(-result["accuracy"].mean("test_dataset").values, kind="stable")[:2]
    expected = [(e - w + 1, e) for e in ends for w in (1, 2) if e - w + 1 >= 0]
    assert list(zip(result["start_layer"].values, result["end_layer"].values)) == expected
    assert np.isfinite(result["intervention_effect"].values).all()
    assert (result.attrs["intervene_layer"], result.attrs["probe_layer"]) == tr.choose_layers(
        result["accuracy"].values, expected, result["intervention_effect"].values)
