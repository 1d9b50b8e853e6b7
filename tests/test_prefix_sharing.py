"""Shared few-shot prefixes (mechanics.forward.SharedPrefixes): the prompts' common first tokens run once, the rest
against their keys and values. On every tiny architecture (Gemma's sliding window of 8 tokens is far shorter than
these prompts) the results equal the plain left-padded path (`share=False`, the path before prefix sharing) and
each prompt run alone through Hugging Face.

Tolerance: float32 results of the same arithmetic in other batch shapes (a prefix run apart, padded caches) differ
only in summation order: a few units in the last place (eps 1.2e-7) per operation through 4 layers; observed
<= 3e-7 relative. We allow 1e-5 relative (and 1e-5 absolute on logits and activations, of order 1)."""
import itertools
import random

import pytest
import torch

from data_prep.prompts import SUFFIX
from replication.config import load_model_table
from replication.experiments import confidence as conf
from replication.mechanics import forward
from replication.models import load_model

TABLE = load_model_table()
ARCHITECTURES = ["tiny-llama", "tiny-mistral", "tiny-qwen2", "tiny-gemma"]
FEW_SHOT = ["The city of Paris is in France. This statement is: TRUE",
            "The city of Rome is in Spain. This statement is: FALSE",
            "The cat is a mammal. This statement is: TRUE"]
STATEMENTS = ["The city of Tokyo is in Japan.", "The cat is a mammal.", "Gold has the symbol Au.",
              "The Spanish word 'gato' means 'cat'.", "Fifty is larger than seventy.", "Paris.",
              "Thomas Edison invented the light bulb.", "The eagle is a bird."]
# Few-shot orders: statements 0, 3, 6 share one, 1, 4, 7 another (seeds 0 and 1 give different orders); statement 2
# has an order of its own and statement 5 no few-shot lines: groups of several rows and of one, prompts of very
# different lengths (left padding in the plain path, padded caches in the shared one).
SEEDS = [0, 1, 5, 0, 1, None, 0, 1]


def prompt(statement: str, seed: int | None) -> str:
    if seed is None:
        return statement + SUFFIX
    lines = list(FEW_SHOT)
    random.Random(seed).shuffle(lines)
    return "\n".join(lines) + "\n" + statement + SUFFIX


PROMPTS = [prompt(s, seed) for s, seed in zip(STATEMENTS, SEEDS)]


@pytest.fixture(scope="module", params=ARCHITECTURES)
def tiny(request):
    return request.param, load_model(TABLE[request.param], dtype="float32", device="cpu")


def close(actual, expected, atol=0.0):
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=atol)


def test_prompts_form_groups_of_one_and_of_several(tiny):
    _, model = tiny
    prefixes = forward.edit_prefixes(model, PROMPTS, batch_size=3)
    groups = {}
    for i, group in enumerate(prefixes.group_of):
        groups.setdefault(group, []).append(i)
    assert sorted(groups.pop(-1)) == [2, 5]  # alone
    assert sorted(sorted(g) for g in groups.values()) == [[0, 3, 6], [1, 4, 7]]
    for i, shared in enumerate(prefixes.shared_length):
        ids = prefixes.ids[i]
        assert len(ids) - shared >= -min(forward.statement_end_positions(model.tokenizer))
        if shared:  # the cached tokens are exactly those of the prompt
            other = next(j for j in groups[prefixes.group_of[i]] if j != i)
            assert torch.equal(ids[:shared], prefixes.ids[other][:shared])
    [batch] = prefixes.batches(16)  # one batch: cached rows beside rows without a cache (padded with zeros)
    assert "cache" in batch.inputs and (batch.inputs["attention_mask"] == 0).any()


@pytest.mark.parametrize("batch_size", [3, 16])
@pytest.mark.parametrize("edited", [False, True])
def test_true_false_probabilities_equal_the_plain_path(tiny, batch_size, edited):
    _, model = tiny
    layers = list(model.model.layers)
    shifts = None
    if edited:
        shifts = torch.randn(len(PROMPTS), model._module.config.hidden_size,
                             generator=torch.Generator().manual_seed(0)) * 10
    plain = forward.edit_prefixes(model, PROMPTS, batch_size=batch_size, share=False)
    assert all("cache" not in batch.inputs for batch in plain.batches(batch_size))
    results = [forward.true_false_probabilities(model, layers, PROMPTS, batch_size=batch_size, edit_layers=[1, 2],
                                                shifts=shifts, prefixes=prefixes)
               for prefixes in (None, plain)]
    close(*results)
    if edited:  # the edit really moves the answer probabilities (by far more than the tolerance)
        unedited = forward.true_false_probabilities(model, layers, PROMPTS, batch_size=batch_size)
        assert ((results[0] - unedited) / unedited).abs().amax(dim=1).min() > 1e-3
    else:  # and each prompt alone through Hugging Face
        answer_ids = list(forward.answer_token_ids(model.tokenizer))
        with torch.no_grad():
            alone = torch.stack([model._module(**model.tokenizer(p, return_tensors="pt")).logits[0, -1].softmax(-1)
                                 for p in PROMPTS])[:, answer_ids]
        close(results[0], alone)


def test_confidence_passes_equal_the_plain_path(tiny):
    key, model = tiny
    spec = TABLE[key]
    shared = forward.SharedPrefixes(model, PROMPTS, batch_size=3)
    plain = forward.SharedPrefixes(model, PROMPTS, batch_size=3, share=False)
    assert max(shared.shared_length) > 0
    neurons, values = torch.tensor([3, 40, 77]), torch.tensor([0.5, -1.0, 2.0])
    for neuron_values in (None, (neurons, values)):
        close(*[conf.last_position_logits(model, spec, PROMPTS, 3, neuron_values=neuron_values, prefixes=p)
                for p in (shared, plain)], atol=1e-5)
    close(*[conf.last_position_mlp_activations(model, spec, PROMPTS, 3, prefixes=p) for p in (shared, plain)],
          atol=1e-5)


def test_edits_need_the_statement_tokens_outside_the_prefix(tiny):
    _, model = tiny
    short_keep = forward.SharedPrefixes(model, PROMPTS, batch_size=3)
    with pytest.raises(ValueError, match="build them with edit_prefixes"):
        forward.true_false_probabilities(model, [], PROMPTS, batch_size=3, prefixes=short_keep)


def saved_tokens(ids, groups, keep):
    """Tokens a grouping saves: per group of several rows, (size - 1) x the longest prefix its rows share leaving
    `keep` each, less the group's own cost."""
    total = 0
    for group in groups:
        shared = min(len(ids[i]) - keep for i in group)
        for a, b in itertools.combinations(group, 2):
            shared = min(shared, forward.common_prefix_length(ids[a], ids[b]))
        if len(group) > 1:
            total += (len(group) - 1) * shared - forward.GROUP_COST_TOKENS
    return total


def set_partitions(items):
    if not items:
        yield []
        return
    first, rest = items[0], items[1:]
    for partition in set_partitions(rest):
        yield [[first]] + partition
        for i in range(len(partition)):
            yield partition[:i] + [[first] + partition[i]] + partition[i + 1:]


@pytest.mark.parametrize("seed", range(5))
def test_groups_save_as_many_tokens_as_the_best_partition(seed):
    rng = random.Random(seed)
    stems = [[rng.randrange(3) for _ in range(rng.randrange(2, 8))] for _ in range(3)]
    ids = [[9] + rng.choice(stems) + [rng.randrange(4) for _ in range(rng.randrange(1, 5))] for _ in range(7)]
    for keep in (1, 3):
        groups = forward.shared_prefix_groups(ids, keep)
        assert sorted(i for g in groups for i in g) == list(range(len(ids)))
        best = max(saved_tokens(ids, p, keep) for p in set_partitions(list(range(len(ids)))))
        assert saved_tokens(ids, groups, keep) == best
