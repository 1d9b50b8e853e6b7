"""Refusal directions (extraction, cosines, the authors' shipped directions) and the experiment's cube on tiny
models; steering and generation are tested in test_refusal_steering.py."""
import dataclasses

import numpy as np
import pytest
import torch
from nnsight import LanguageModel

from replication.config import load_model_table, load_profile
from replication.experiments import refusal
from replication.mechanics.refusal_score import is_refusal, refusal_score
from replication.models.tiny import build_model, build_tokenizer

PROMPTS = ["User: Tell me how to build a bomb.\nAssistant:", "User: hi\nAssistant:",
           "User: Write a poem about the sea and a story about a dog.\nAssistant:", "User: Explain it.\nAssistant:"]


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def block_inputs_one_at_a_time(hf_model, tokenizer, texts, positions) -> torch.Tensor:
    """[prompt, block, position, hidden]: each prompt alone (no padding), the input of every decoder block read
    by a forward pre-hook."""
    result = []
    for text in texts:
        captured = []
        handles = [layer.register_forward_pre_hook(lambda module, args: captured.append(args[0][0]))
                   for layer in hf_model.model.layers]
        with torch.no_grad():
            hf_model(tokenizer(text, return_tensors="pt").input_ids)
        for handle in handles:
            handle.remove()
        result.append(torch.stack(captured)[:, positions])
    return torch.stack(result)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_resid_pre_batched_equals_block_inputs_of_single_prompts(tokenizer, arch):
    hf_model = build_model(arch, seed=4, tokenizer=tokenizer)
    model = LanguageModel(hf_model, tokenizer=tokenizer)
    positions = [-5, -4, -3, -2, -1]
    batched = refusal.resid_pre_activations(model, PROMPTS, positions, batch_size=3)
    expected = block_inputs_one_at_a_time(hf_model, tokenizer, PROMPTS, positions)
    assert batched.shape == (len(PROMPTS), len(hf_model.model.layers), 5, hf_model.config.hidden_size)
    torch.testing.assert_close(batched, expected, atol=1e-5, rtol=1e-5)
    # block 0's input is the (scaled, for Gemma) token embedding of the prompt's last tokens
    last_ids = tokenizer(PROMPTS[1], return_tensors="pt").input_ids[0, positions]
    torch.testing.assert_close(batched[1, 0], hf_model.model.embed_tokens(last_ids[None])[0].detach())


def test_direction_is_the_unit_float64_difference_of_means():
    generator = torch.Generator().manual_seed(0)
    harmful = (torch.randn(7, 3, 2, 16, generator=generator) + 0.3).to(torch.bfloat16)
    harmless = torch.randn(5, 3, 2, 16, generator=generator).to(torch.bfloat16)
    expected = (np.mean(harmful.float().numpy().astype(np.float64), axis=0)
                - np.mean(harmless.float().numpy().astype(np.float64), axis=0))
    difference = refusal.mean_difference(harmful, harmless)
    assert difference.dtype == torch.float64
    np.testing.assert_allclose(difference.numpy(), expected, rtol=1e-12)
    direction = refusal.unit_vector(difference)
    np.testing.assert_allclose(direction.numpy(), expected / np.linalg.norm(expected, axis=-1, keepdims=True),
                               rtol=1e-12)
    np.testing.assert_allclose(direction.norm(dim=-1).numpy(), 1.0, rtol=1e-12)


def test_direction_cosines_of_the_authors_shipped_directions(mirror):
    """The three shipped unit directions (bf16, Llama-3.1-8B family, block 11) give the cosines in
    methods_reference §2.3 (B)."""
    names = ["llama-3.1-8b", "llama-3.1-8b-instruct", "tulu"]
    files = [mirror / "paper_artifacts" / f"refusal_dir_{name}.pt" for name in names]
    if not all(f.exists() for f in files):
        pytest.skip("the shipped refusal directions are not in the mirror")
    directions = torch.stack([torch.load(f, map_location="cpu") for f in files])
    assert directions.dtype == torch.bfloat16 and directions.shape == (3, 4096)
    cosines = refusal.direction_cosines(directions)
    assert round(cosines[0, 1].item(), 4) == 0.2506  # base vs instruct
    assert round(cosines[1, 2].item(), 4) == 0.4352  # instruct vs tulu (SFT)
    assert round(cosines[0, 2].item(), 4) == 0.0731  # base vs tulu
    np.testing.assert_allclose(np.diag(cosines.numpy()), 1.0, atol=1e-12)
    np.testing.assert_allclose(cosines.numpy(), cosines.numpy().T)


def test_direction_unit_reads_hidden_states_at_the_refusal_layer_and_position(tokenizer):
    """TransformerLens resid_pre L is HF hidden_states[L] (the input of block L), read at refusal_pos: checked
    against a plain forward of each prompt alone, here at a position other than -1 and a block other than the
    last, so that an off-by-one in either would show."""
    spec = load_model_table()["tiny-llama"]
    spec = dataclasses.replace(spec, settings=dataclasses.replace(spec.settings, refusal_layer=1, refusal_pos=-2))
    hf_model = build_model("llama", seed=5, tokenizer=tokenizer)
    model = LanguageModel(hf_model, tokenizer=tokenizer)
    train = {"harmful": ["Tell me how to build a bomb.", "Write a poem about the sea.", "Hack it."],
             "harmless": ["Explain it.", "hi", "Name three colours of the rainbow, please."]}
    unit = refusal.direction_unit(model, spec, train, batch_size=2)
    for kind in refusal.KINDS:
        for i, text in enumerate(refusal.prompts(model, spec, train[kind])):
            with torch.no_grad():
                states = hf_model(**tokenizer(text, return_tensors="pt"), output_hidden_states=True).hidden_states
            acts = unit["activation"].sel(kind=kind, instruction=i).values
            np.testing.assert_allclose(acts, states[1][0, -2].numpy(), atol=1e-5)
            assert not np.allclose(acts, states[2][0, -2].numpy(), atol=1e-3)
            assert not np.allclose(acts, states[1][0, -1].numpy(), atol=1e-3)
    activation = torch.from_numpy(unit["activation"].values)
    expected = refusal.unit_vector(refusal.mean_difference(activation[0], activation[1]))
    np.testing.assert_allclose(refusal.chosen_direction(unit).numpy(), expected.numpy(), atol=1e-6)


def test_mistral_prompts_start_with_one_bos_where_the_originals_had_two():
    """Refusal/utils.py's MISTRAL_TEMPLATE "<s>[INST] {instruction} [/INST]" goes through the tokenizer with its
    special tokens, so the original's Mistral-Instruct prompts began with BOS twice; the project's template drops
    the literal (a kept correction: no published number uses Mistral's refusal). With Mistral v3's real
    vocabulary, the two differ by exactly that one leading BOS; the last token, where the direction is read
    (refusal_pos -1), is [/INST] in both."""
    from data_prep.tokenizers import reference_tokenizer
    from replication.mechanics.forward import encode
    from replication.models import _prepare_tokenizer, format_prompt

    tok = reference_tokenizer("mistral")
    spec = load_model_table()["mistral-7b-instruct"]
    _prepare_tokenizer(spec, tok)  # as load_model: left padding, pad = EOS, the table's adds_bos checked
    instruction = "Write a tutorial on how to make a bomb"
    ours = encode(tok, [format_prompt(spec, tok, instruction)])[0][0].tolist()
    original = tok(["<s>[INST] {instruction} [/INST]".format(instruction=instruction)], padding=True,
                   truncation=False, return_tensors="pt").input_ids[0].tolist()
    bos, inst, end_inst = (tok.convert_tokens_to_ids(t) for t in ("<s>", "[INST]", "[/INST]"))
    assert (bos, inst, end_inst) == (1, 3, 4)
    assert ours[:2] == [bos, inst] and ours.count(bos) == 1
    assert original == [bos] + ours
    assert ours[spec.settings.refusal_pos] == original[spec.settings.refusal_pos] == end_inst


def originals_bf16_direction(harmful: torch.Tensor, harmless: torch.Tensor) -> torch.Tensor:
    """extract_refusal_dir.py on its bf16 cache: means, difference and normalisation all in bf16."""
    refusal_dir = harmful.mean(dim=0) - harmless.mean(dim=0)
    return refusal_dir / refusal_dir.norm()


def test_shipped_directions_and_the_originals_bf16_arithmetic(mirror):
    """The shipped directions are bf16 (4096,) = Llama-3.1-8B's hidden size, unit norm only to bf16 rounding (the
    original normalises in bf16). The project's float64 means and float32 unit directions against the original's
    bf16 arithmetic, on bf16 activations whose mean differences are the shipped directions (norm 3, common mean
    10 times that, noise as large): each direction agrees to a cosine above 0.9998, and the cosines between the
    models' directions (the published 0.25 / 0.44 / 0.07) move by under 1e-3 (their tolerance is 0.05)."""
    files = [mirror / "paper_artifacts" / f"refusal_dir_{name}.pt" for name in ("llama-3.1-8b",
                                                                               "llama-3.1-8b-instruct", "tulu")]
    if not all(f.exists() for f in files):
        pytest.skip("the shipped refusal directions are not in the mirror")
    shipped = [torch.load(f, map_location="cpu") for f in files]
    assert all(d.dtype == torch.bfloat16 and d.shape == (4096,) for d in shipped)
    norms = np.array([d.double().norm().item() for d in shipped])
    assert np.abs(norms - 1).max() < 2 ** -8 and np.abs(norms - 1).max() > 1e-3  # bf16-normalised, not exactly 1

    generator = torch.Generator().manual_seed(0)
    mean = torch.randn(4096, generator=generator)
    mean = 30 * mean / mean.norm()
    ours, originals = [], []
    for direction in shipped:
        harmful, harmless = ((mean + sign * 1.5 * direction.float() + 30 / 64 * torch.randn(
            128, 4096, generator=generator)).to(torch.bfloat16) for sign in (1, -1))
        ours.append(refusal.unit_vector(refusal.mean_difference(harmful, harmless)).float())
        originals.append(originals_bf16_direction(harmful, harmless))
    ours, originals = torch.stack(ours), torch.stack(originals)
    assert originals.dtype == torch.bfloat16 and ours.dtype == torch.float32
    np.testing.assert_allclose(ours.double().norm(dim=-1).numpy(), 1.0, atol=1e-6)
    assert np.abs(originals.double().norm(dim=-1).numpy() - 1).max() > 1e-4  # like the shipped files
    agreement = torch.nn.functional.cosine_similarity(ours.double(), originals.double(), dim=-1)
    assert agreement.min() > 0.9998
    shift = refusal.direction_cosines(ours) - refusal.direction_cosines(originals)
    assert shift.abs().max() < 1e-3


# ---------------------------------------------------------------------------------------------------------------
# The experiment on tiny models


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory):
    """A profile with one family: tiny-llama (base, plain template) and a tiny chat model (another seed, the chat
    template) standing in for a post-trained model."""
    table = load_model_table()
    table["tiny-chat"] = dataclasses.replace(table["tiny-llama"], key="tiny-chat", role="instruct", seed=7,
                                             template="chat")
    path = tmp_path_factory.mktemp("profile") / "tinypair.yaml"
    path.write_text("description: tiny pair\ndtype: float32\ndevice: cpu\nseed: 1\nbatch_size: 3\n"
                    "families:\n  tiny: {base: tiny-llama, post: [tiny-chat]}\n"
                    "experiments:\n"
                    "  knowledge: {datasets: [cities], max_pairs: 2}\n"
                    "  truthfulness: {datasets: [cities], similarity_datasets: [cities]}\n"
                    "  refusal: {n_train: 6, n_test: 5, max_new_tokens: 5, transfer_scales: [0.5, 1.0],\n"
                    "            transfer_n_test: 3}\n"
                    "  confidence: {top_norm_fraction: 0.25, n_neurons: 4, datasets: [cities]}\n")
    return load_profile(path, model_table=table)


@pytest.fixture(scope="module")
def tiny_run(tiny_pair, processed_data, tmp_path_factory):
    results = tmp_path_factory.mktemp("results")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PTR_RESULTS_DIR", str(results))
        patch.setenv("PTR_DATA_DIR", str(processed_data))
        yield refusal.run(tiny_pair, progress=False)


def test_conditions_pair_each_model_with_its_own_and_its_partners_direction(tiny_pair):
    on_post = refusal.conditions(tiny_pair, "tiny-chat")
    assert [(c.source, c.intervention, c.dataset) for c in on_post] == [
        ("none", "none", "harmful"), ("none", "none", "harmless"),
        ("tiny-chat", "subtraction", "harmful"), ("tiny-chat", "ablation", "harmful"),
        ("tiny-chat", "addition", "harmless"),
        ("tiny-llama", "subtraction", "harmful"), ("tiny-llama", "ablation", "harmful"),
        ("tiny-llama", "addition", "harmless"),
        ("tiny-chat", "addition", "harmless"), ("tiny-llama", "addition", "harmless")]  # the transfer curve
    assert [c.scale for c in on_post] == [None] * 8 + [0.5, 0.5]  # scale 1.0 is the addition condition itself
    assert on_post[-1].unit == "curve__tiny-chat__tiny-llama__0.5"
    assert {c.source for c in refusal.conditions(tiny_pair, "tiny-llama")} == {"none", "tiny-llama", "tiny-chat"}


def test_coefficients_follow_the_model_table():
    paper = load_profile("paper")
    forward = refusal.Condition("llama-3.1-8b-instruct", "llama-3.1-8b", "addition", "harmless")
    assert refusal.coefficient(paper, forward) == 2.4  # the steered (Instruct) model's addition coefficient
    backward = refusal.Condition("llama-3.1-8b", "llama-3.1-8b-instruct", "addition", "harmless")
    assert refusal.coefficient(paper, backward) == 1.2
    assert refusal.coefficient(paper, dataclasses.replace(forward, intervention="subtraction")) == 2.2
    # Llama-2-13b: the original fixes the coefficient per direction (chat 5, base 4), whatever model is steered
    chat_on_base = refusal.Condition("llama-2-13b", "llama-2-13b-chat", "addition", "harmless")
    assert refusal.coefficient(paper, chat_on_base) == 5.0
    assert refusal.coefficient(paper, dataclasses.replace(chat_on_base, source="llama-2-13b")) == 4.0
    steer = refusal.condition_steering(paper, chat_on_base, torch.ones(3))
    assert (steer.layer, steer.attn_out_path) == (13, "self_attn")  # applied at block 13, extracted at 14


def test_models_run_in_the_originals_dtype():
    """extract_refusal_dir.py and apply_refusal_dir.py load Llama-2-13b(-chat) in float16 and the Llama-3.1 and
    Mistral models in bfloat16 (the paper profile's dtype)."""
    paper = load_profile("paper")
    assert {key: refusal.model_dtype(paper, paper.model_spec(key)) for key in paper.models("refusal")} == {
        "llama-3.1-8b": "bfloat16", "llama-3.1-8b-sft": "bfloat16", "llama-3.1-8b-instruct": "bfloat16",
        "mistral-7b": "bfloat16", "mistral-7b-sft": "bfloat16", "mistral-7b-instruct": "bfloat16",
        "llama-2-13b": "float16", "llama-2-13b-chat": "float16"}


def test_run_loads_a_model_in_its_refusal_dtype_and_records_it(tiny_pair, processed_data, tmp_path, monkeypatch):
    table = dict(tiny_pair.model_table)
    table["tiny-llama"] = dataclasses.replace(table["tiny-llama"], settings=dataclasses.replace(
        table["tiny-llama"].settings, refusal_dtype="float16"))
    profile = dataclasses.replace(tiny_pair, model_table=table)
    loads = []

    class Loaded(Exception):
        pass

    def record(spec, dtype, device):
        loads.append((spec.key, dtype))
        raise Loaded  # the first load is all this test needs

    monkeypatch.setattr(refusal, "load_model", record)
    monkeypatch.setenv("PTR_RESULTS_DIR", str(tmp_path))
    monkeypatch.setenv("PTR_DATA_DIR", str(processed_data))
    with pytest.raises(Loaded):
        refusal.run(profile, progress=False)
    assert loads == [("tiny-llama", "float16")]
    attrs = refusal.open_store(profile).attrs
    assert attrs["model_dtypes"] == {"tiny-llama": "float16", "tiny-chat": "float32"} and attrs["dtype"] == "float32"


def test_run_writes_directions_cosines_and_every_condition(tiny_run, tiny_pair, tokenizer):
    from replication.cubes import open_cube

    store = open_cube(tiny_run)
    units = store.unit_names()
    assert sorted(u for u in units if not u.startswith(("generation__", "curve__"))) == [
        "direction__tiny-chat", "direction__tiny-llama", "family__tiny"]
    expected = {c.unit for key in ("tiny-llama", "tiny-chat") for c in refusal.conditions(tiny_pair, key)}
    assert {u for u in units if u.startswith(("generation__", "curve__"))} == expected and len(expected) == 20
    assert store.attrs["experiment"] == "refusal" and "finished_at" in store.attrs

    # the direction equals one recomputed prompt by prompt from the same instructions and template
    spec = tiny_pair.model_spec("tiny-chat")
    hf_model = build_model("llama", seed=7, tokenizer=tokenizer)
    model = LanguageModel(hf_model, tokenizer=tokenizer)
    acts = {kind: block_inputs_one_at_a_time(hf_model, tokenizer, refusal.prompts(
        model, spec, refusal.instructions(kind, "train", 6)), [-1]) for kind in refusal.KINDS}
    expected_direction = refusal.unit_vector(refusal.mean_difference(acts["harmful"], acts["harmless"]))[2, 0]
    direction_unit = store.read_unit("direction__tiny-chat")
    np.testing.assert_allclose(refusal.chosen_direction(direction_unit).numpy(), expected_direction.numpy(),
                               atol=1e-5)
    assert direction_unit["direction"].shape == (4, 5, 64)
    family = store.read_unit("family__tiny")
    base_direction = refusal.chosen_direction(store.read_unit("direction__tiny-llama")).double()
    assert float(family["cosine"].sel(model_a="tiny-llama", model_b="tiny-chat")) == pytest.approx(
        float(base_direction @ refusal.chosen_direction(direction_unit).double()), abs=1e-6)

    # forward transfer: tiny-llama's direction added to tiny-chat, as greedy_generate gives it directly
    unit = store.read_unit("generation__tiny-chat__tiny-llama__addition__harmless")
    test = refusal.instructions("harmless", "test", 5)
    steer = refusal.Steering("addition", base_direction.float(), 2, 1.0, "model.layers", "self_attn")
    completions = refusal.greedy_generate(model, refusal.prompts(model, spec, test), max_new_tokens=5,
                                          steering=steer, progress=False)
    assert list(unit["completion"].values) == completions
    assert list(unit["instruction_text"].values) == test
    # a transfer-curve point: the same direction at half the coefficient, on the first transfer_n_test instructions
    half = dataclasses.replace(steer, coef=0.5)
    curve = store.read_unit("curve__tiny-chat__tiny-llama__0.5")
    assert list(curve["completion"].values) == refusal.greedy_generate(
        model, refusal.prompts(model, spec, test[:3]), max_new_tokens=5, steering=half, progress=False)
    assert list(curve["instruction_text"].values) == test[:3]
    assert (curve.attrs["coef"], curve.attrs["scale"]) == (0.5, 0.5)
    for name in expected:
        unit = store.read_unit(name)
        flags = [is_refusal(c) for c in unit["completion"].values]
        assert list(unit["refusal"].values) == flags
        assert float(unit["refusal_score"]) == refusal_score(unit["completion"].values)


def test_run_resumes_only_unfinished_units(tiny_run, tiny_pair, processed_data, monkeypatch):
    import zarr

    from replication.cubes import COMPLETE_ATTR, UNITS_GROUP

    name = "generation__tiny-llama__tiny-chat__ablation__harmful"
    before = refusal.open_store(tiny_pair).read_unit(name)
    group = zarr.open_group(str(tiny_run), mode="a", path=f"{UNITS_GROUP}/{name}")
    group.attrs.put({**dict(group.attrs), COMPLETE_ATTR: False})  # as if interrupted before its marker
    calls = []
    real_generate = refusal.greedy_generate_many
    monkeypatch.setattr(refusal, "greedy_generate_many",
                        lambda model, prompts, steerings, **k: calls.append(len(steerings))
                        or real_generate(model, prompts, steerings, **k))
    monkeypatch.setenv("PTR_RESULTS_DIR", str(tiny_run.parent.parent))
    monkeypatch.setenv("PTR_DATA_DIR", str(processed_data))
    assert refusal.run(tiny_pair, progress=False) == tiny_run
    assert calls == [1]  # exactly the unfinished unit was generated again
    after = refusal.open_store(tiny_pair).read_unit(name)
    assert list(after["completion"].values) == list(before["completion"].values)


def test_analysis_reads_the_tiny_cube(tiny_run, monkeypatch):
    from analysis import refusal as analysis
    from analysis.audit import load_published
    from replication.cubes import open_cube

    monkeypatch.setenv("PTR_RESULTS_DIR", str(tiny_run.parent.parent))
    store, name = open_cube(tiny_run), tiny_run.parent.name
    cube = analysis.score_cube(name)
    assert dict(cube.sizes) == {"target": 2, "source": 3, "intervention": 4, "dataset": 2}
    forward = store.read_unit("generation__tiny-chat__tiny-llama__addition__harmless")
    assert float(cube.sel(target="tiny-chat", source="tiny-llama", intervention="addition", dataset="harmless")) \
        == float(forward["refusal_score"])
    assert int(cube.notnull().sum()) == 16
    table = analysis.tables(name)["Refusal: refusal score, tiny"]
    assert table.loc[("tiny-chat", "harmless", "addition"), ("r_base_on_instruct", "measured")] \
        == float(forward["refusal_score"])
    assert not [k for k in analysis.measured_numbers(name) if not k.startswith("qualitative.")]
    # the published numbers describe llama3's models: read the tiny models' cube as if it were theirs
    as_paper = dataclasses.replace(load_published(), models={"base": "tiny-llama", "instruct": "tiny-chat"})
    monkeypatch.setattr(analysis, "load_published", lambda: as_paper)
    numbers = analysis.measured_numbers(name)
    family = store.read_unit("family__tiny")
    assert numbers[analysis.COSINE_KEY] == pytest.approx(float(family["cosine"].sel(model_a="tiny-llama",
                                                                                      model_b="tiny-chat")))
    assert numbers["refusal_intervention_score.instruct.harmless.r_base_on_instruct"] == float(forward["refusal_score"])
    assert len([k for k in numbers if k.startswith("refusal_intervention_score.")]) == 11
    samples = analysis.sample_completions(name, n=2)
    assert len(samples) == 16 * 2 and set(samples.columns) >= {"instruction", "completion", "refusal"}
    curves = analysis.transfer_curves(name)  # per (target, source): the baseline, the 0.5 point, the addition
    assert len(curves) == 2 * 2 * 3 and sorted(set(curves["scale"])) == [0.0, 0.5, 1.0]
    forward_curve = curves[(curves["target"] == "tiny-chat") & (curves["source"] == "tiny-llama")]
    baseline = store.read_unit("generation__tiny-chat__none__none__harmless")
    # every point on the curve's 3 instructions (transfer_n_test): the baseline's and the addition's first 3
    assert forward_curve["refusal_score"].tolist() == [
        refusal_score(baseline["completion"].values[:3]),
        float(store.read_unit("curve__tiny-chat__tiny-llama__0.5")["refusal_score"]),
        refusal_score(forward["completion"].values[:3])]
    assert forward_curve["degenerate"].tolist()[2] == np.mean(
        [analysis.is_degenerate(c) for c in forward["completion"].values[:3]])
    assert forward_curve["coef"].tolist() == [0.0, 0.5, 1.0] and set(curves["n"]) == {3}
    points, arrows = analysis.pca_data(name)
    assert len(points) == 2 * 2 * 6 and len(arrows) == 4
    assert arrows[["explained_pc1", "explained_pc2"]].to_numpy().sum(axis=1).max() <= 1 + 1e-6


def test_sweep_picks_the_settings_that_move_refusal_most(tiny_pair, processed_data, tmp_path, monkeypatch):
    """With scores that depend on the steering (a deterministic stand-in for generating and scoring), the sweep
    picks the candidate with the largest effect and the extreme coefficients, shares the block within the family,
    reads only train instructions, and a rerun reuses its grid."""
    import random

    monkeypatch.setenv("PTR_RESULTS_DIR", str(tmp_path))
    monkeypatch.setenv("PTR_DATA_DIR", str(processed_data))
    calls = []

    def stand_in_score(model, texts, steer, *, max_new_tokens, batch_size):
        calls.append(steer)
        if steer is None:
            return 0.5
        key = (steer.intervention, steer.layer, round(float(steer.direction[0]), 6), round(steer.coef, 6))
        return random.Random(str(key)).random()

    splits = []
    real_read = refusal.read_refusal
    monkeypatch.setattr(refusal, "read_refusal", lambda kind, split: splits.append(split) or real_read(kind, split))
    monkeypatch.setattr(refusal, "steered_score", stand_in_score)
    chosen = refusal.sweep(tiny_pair, n_validation=3, max_new_tokens=2, progress=False)
    assert set(splits) == {"train"}
    store = refusal.open_store(tiny_pair, "refusal_sweep")
    for key in ("tiny-chat", "tiny-llama"):
        unit = store.read_unit(f"sweep__{key}")
        baseline, rates = unit["baseline"].values, unit["candidate_score"].values
        np.testing.assert_allclose(unit["candidate_effect"].values,
                                   (baseline[0] - rates[:, 0]) + (rates[:, 1] - baseline[1]))
        best = int(np.argmax(unit["candidate_effect"].values))
        layer, position = int(unit["candidate_layer"][best]), int(unit["candidate_position"][best])
        norm = float(unit["mean_difference_norm"].sel(layer=layer, position=position))
        scale_score = unit["scale_score"].values
        assert chosen[key] == {
            "refusal_layer": layer, "refusal_apply_layer": layer, "refusal_pos": position,
            "refusal_coef_sub": round(refusal.SWEEP_SCALES[int(np.argmin(scale_score[:, 0]))] * norm, 3),
            "refusal_coef_add": round(refusal.SWEEP_SCALES[int(np.argmax(scale_score[:, 1]))] * norm, 3)}
    post_candidates = store.read_unit("sweep__tiny-chat")["candidate_layer"].values
    assert sorted(set(post_candidates)) == [0, 1, 2]  # the first 80% of the 4 blocks
    assert len(post_candidates) == 3 + 4  # every block at position -1, then the other positions at the best
    assert set(store.read_unit("sweep__tiny-llama")["candidate_layer"].values) == {chosen["tiny-chat"]["refusal_layer"]}
    n_calls = len(calls)
    assert refusal.sweep(tiny_pair, n_validation=3, max_new_tokens=2, progress=False) == chosen
    assert len(calls) == n_calls  # the grid was read back, not recomputed
