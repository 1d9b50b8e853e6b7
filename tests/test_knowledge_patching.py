"""The patching engine (replication.mechanics.patching) on every tiny architecture: the fast path (cached prefix,
skipped layers, batched pairs and layers, two-logit head) equals the reference loop (one nnsight trace of the whole
FALSE prompt per layer and position), and patching reproduces the runs it interpolates between."""
import argparse
import dataclasses

import pytest
import torch

from replication.config import load_model_table
from replication.models import load_model
from replication.mechanics.patching import (PatchModel, layer_groups, logit_difference, patch_effects,
                                  patch_true_runs, patched_logit_difference, reference_patch_effects, true_run,
                                  unpatched_run)

ARCHITECTURES = ["tiny-llama", "tiny-mistral", "tiny-qwen2", "tiny-gemma"]
PREFIX = ("The city of Dar es Salaam is in Italy. This statement is: FALSE\n"
          "The city of Kozhikode is in India. This statement is: TRUE\n"
          "The city of Dar es Salaam is in Tanzania. This statement is: TRUE\n"
          "The city of Kozhikode is in the United States. This statement is: FALSE\n")
# (TRUE subject, FALSE subject, object): the statements differ only in the subject, as the real pairs do.
PAIRS = [("Hanoi", "Berlin", "Vietnam"), ("Lagos", "Cairo", "Nigeria")]
N_TOKS = 12  # "The city of X is in Y." (8 tokens: the tiny tokenizer has these names as one token) + the suffix (4)
SUBJECT = 3  # the patched position of X


def patch_model(key: str, dtype=torch.float32, seed: int | None = None) -> PatchModel:
    spec = load_model_table()[key]
    if seed is not None:
        spec = dataclasses.replace(spec, seed=seed)
    lm = load_model(spec)
    lm._module.to(dtype)
    return PatchModel.from_spec(lm, spec)


def prompt_ids(model: PatchModel, which: int) -> torch.Tensor:
    """[pairs, T] ids of the TRUE (which=0) or FALSE (which=1) prompts."""
    prompts = [PREFIX + f"The city of {pair[which]} is in {pair[2]}. This statement is:" for pair in PAIRS]
    ids = model.lm.tokenizer(prompts, return_tensors="pt", padding=True)
    assert ids.attention_mask.all(), "the test prompts must tokenize to equal lengths"
    return ids.input_ids


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy CPU their synchronisation dominates."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", params=ARCHITECTURES)
def model(request) -> PatchModel:
    return patch_model(request.param)


def reference(source: PatchModel, target: PatchModel) -> torch.Tensor:
    true_ids, false_ids = prompt_ids(source, 0), prompt_ids(target, 1)
    return torch.stack([reference_patch_effects(source, target, t, f, N_TOKS) for t, f in zip(true_ids, false_ids)])


@pytest.fixture(scope="module")
def expected(model) -> torch.Tensor:
    """The reference loop's effects of the model on its own prompts (slow: computed once per architecture)."""
    return reference(model, model)


def test_test_prompts_fit_the_statement_pattern(model):
    true_ids, false_ids = prompt_ids(model, 0), prompt_ids(model, 1)
    differing = (true_ids != false_ids).nonzero()[:, 1].unique().tolist()
    assert differing == [true_ids.shape[1] - N_TOKS + SUBJECT]  # only the subject
    assert model.lm.tokenizer.decode(false_ids[0, -N_TOKS:]).startswith("The city of")


@pytest.mark.parametrize("layers_per_batch", [None, 3, 1])
def test_fast_path_equals_reference_loop_float32(model, expected, layers_per_batch):
    fast = patch_effects(model, model, prompt_ids(model, 0), prompt_ids(model, 1), N_TOKS, layers_per_batch)
    assert fast.effects.shape == expected.shape == (len(PAIRS), len(model.layers), N_TOKS)
    assert torch.allclose(fast.effects, expected, rtol=0, atol=1e-4)
    # The maps are not flat: patching the subject moves the logit difference off the FALSE run's value.
    assert (expected[:, 0, SUBJECT] - fast.false_logit_diff).abs().min() > 1e-4


@pytest.mark.parametrize("key", ARCHITECTURES)
def test_minimal_recomputation_is_exact_in_float64(key):
    model = patch_model(key, torch.float64)
    expected = reference(model, model)
    fast = patch_effects(model, model, prompt_ids(model, 0), prompt_ids(model, 1), N_TOKS, layers_per_batch=2)
    assert torch.allclose(fast.effects.double(), expected.double(), rtol=0, atol=1e-10)


@pytest.mark.parametrize("key", ARCHITECTURES)
def test_cross_model_fast_path_equals_reference(key):
    """TRUE states of one model patched into another of the same shape (a different random seed)."""
    source, target = patch_model(key), patch_model(key, seed=7)
    expected = reference(source, target)
    fast = patch_effects(source, target, prompt_ids(source, 0), prompt_ids(target, 1), N_TOKS, layers_per_batch=3)
    assert torch.allclose(fast.effects, expected, rtol=0, atol=1e-4)
    # Across models even the shared-prefix states differ, so no position is a no-op.
    assert (expected[:, 0, 0] - fast.false_logit_diff).abs().min() > 1e-6


@pytest.mark.parametrize("key", ARCHITECTURES)
def test_sources_sharing_forwards_equal_each_alone(key):
    """A model's own TRUE runs and another model's patched into it in the same forwards (`patch_true_runs`, as the
    knowledge experiment does with the two maps into a model) give each source's effects alone up to float
    rounding; the own rows are not patched where their patch is a no-op, though the other source's rows are."""
    target, other = patch_model(key), patch_model(key, seed=7)
    false_ids = prompt_ids(target, 1)
    runs = [true_run(target, prompt_ids(target, 0), N_TOKS), true_run(other, prompt_ids(other, 0), N_TOKS)]
    shared = patch_true_runs(runs, target, false_ids, N_TOKS, layers_per_batch=3)
    for run, together in zip(runs, shared, strict=True):
        alone = patch_true_runs([run], target, false_ids, N_TOKS, layers_per_batch=3)[0]
        assert together.effects.shape == (len(PAIRS), len(target.layers), N_TOKS)
        torch.testing.assert_close(together.effects, alone.effects, rtol=0, atol=1e-5)
        assert torch.equal(together.true_logit_diff, run.logit_diff)
        assert torch.equal(together.false_logit_diff, alone.false_logit_diff)
    own, unpatched = shared[0].effects, shared[0].false_logit_diff[:, None, None]
    assert torch.equal(own[:, :, :SUBJECT], unpatched.expand(-1, len(target.layers), SUBJECT))
    assert (shared[1].effects[:, :, :SUBJECT] - unpatched).abs().max() > 1e-6  # the other source's rows ran


def test_patching_a_whole_layer_reproduces_the_true_run(model):
    true_ids, false_ids = prompt_ids(model, 0)[:1], prompt_ids(model, 1)[:1]
    length = true_ids.shape[1]
    true_states = unpatched_run(model, true_ids, length).states
    with torch.inference_mode(), model.lm.trace(true_ids):  # the TRUE run as the patched runs are traced
        true_logits = model.lm.output.logits.save()
    true_logit_diff = logit_difference(true_logits, model.answer_ids).item()
    assert abs(true_logit_diff - unpatched_run(model, false_ids, length).logit_diff.item()) > 1e-4
    for layer in range(len(model.layers)):
        patched = patched_logit_difference(model, false_ids, layer, list(range(length)), true_states[layer, 0])
        assert patched == true_logit_diff


def test_patch_effects_obey_causality(model):
    """Exact identities: positions before the subject hold the same state in both prompts (the patch is a
    no-op); at the last layer only the last position reaches the logits, and there it is the TRUE run."""
    fast = patch_effects(model, model, prompt_ids(model, 0), prompt_ids(model, 1), N_TOKS, layers_per_batch=3)
    baseline = fast.false_logit_diff[:, None, None]
    assert torch.equal(fast.effects[:, :, :SUBJECT], baseline.expand(-1, len(model.layers), SUBJECT))
    assert torch.allclose(fast.effects[:, -1, :-1], fast.false_logit_diff[:, None], rtol=0, atol=1e-5)
    assert torch.allclose(fast.effects[:, -1, -1], fast.true_logit_diff, rtol=0, atol=1e-5)


def test_layer_groups_cover_every_layer_once():
    assert layer_groups(7, 3) == [range(0, 3), range(3, 6), range(6, 7)]
    assert layer_groups(4, 4) == [range(0, 4)]
    assert [layer for group in layer_groups(18, 5) for layer in group] == list(range(18))


def bench_args(**overrides):
    from bench import knowledge as bench
    args = dict(model="tiny", profile=None, dtype="float32", device="cpu", pairs=2, slow_pairs=1, prompt_tokens=40,
                n_toks=10, layers_per_batch=3, threads=None)
    return bench.run(argparse.Namespace(**{**args, **overrides}))


def test_bench_reports_speed_only_when_both_paths_agree(monkeypatch):
    report = bench_args()
    assert report["agrees"] and report["max_abs_difference"] <= 1e-4
    assert report["speedup"] == pytest.approx(report["fast"]["patched_runs_per_s"]
                                              / report["reference"]["patched_runs_per_s"])
    assert 0 < report["fast"]["flops"] < report["reference"]["flops"] * report["pairs_fast"]

    from bench import knowledge as bench
    original = bench.patch_effects

    def off_by_a_bit(*args, **kwargs):
        result = original(*args, **kwargs)
        return dataclasses.replace(result, effects=result.effects + 1e-3)

    monkeypatch.setattr(bench, "patch_effects", off_by_a_bit)
    refused = bench_args()
    assert not refused["agrees"] and "speedup" not in refused and "refused" in refused


def test_bench_runs_a_paper_model_shape_from_a_profile():
    """`make bench PROFILE=paper-shape`: the model of a random-weight profile, Mistral-7B's architecture scaled."""
    report = bench_args(model="mistral-7b", profile="paper-shape")
    assert report["agrees"] and report["max_abs_difference"] <= 1e-4
    assert report["layers"] == 4 and report["model"] == "mistral-7b"
