"""The paper-shape profile: the paper profile with random-weight models of the paper models' real configs and their
real tokenizers; profile inheritance (`extends`); scaling; the memory plan."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from click.testing import CliRunner

from replication import shapes
from replication.config import ConfigError, load_profile
from replication.memory import GIB, InsufficientMemoryError, check_fits, parameter_count, plan_lines, residencies
from replication.models import load_model


@pytest.fixture(scope="module")
def paper():
    return load_profile("paper")


@pytest.fixture(scope="module")
def paper_shape():
    return load_profile("paper-shape")


def test_paper_shape_is_the_paper_profile_but_for_the_weights_and_sample_sizes(paper, paper_shape):
    assert paper_shape.families == paper.families
    assert (paper_shape.dtype, paper_shape.seed, paper_shape.batch_size) == (paper.dtype, paper.seed, paper.batch_size)
    for name in ("knowledge", "truthfulness", "refusal", "confidence"):
        ours, theirs = paper_shape.experiment(name), paper.experiment(name)
        assert getattr(ours, "datasets", None) == getattr(theirs, "datasets", None)
        assert ours.families == theirs.families
    assert paper_shape.experiment("knowledge").max_pairs == 2 and paper.experiment("knowledge").max_pairs is None
    for key in paper.models():
        real, shaped = paper.model_spec(key), paper_shape.model_spec(key)
        assert (real.source, shaped.source) == ("hub", "shape")
        # everything the experiments read from the model table is the paper's, except the mapped layers
        for name in ("family", "role", "template", "tokenizer_key", "adds_bos", "prompt_prefix", "hf_id", "revision"):
            assert getattr(shaped, name) == getattr(real, name), name
        config = shaped.shape["config"]
        assert config["num_hidden_layers"] == 4 and config["num_attention_heads"] == 4
        assert config["vocab_size"] == shapes.shape_table()[key]["config"]["vocab_size"]


def test_layer_settings_are_mapped_to_the_scaled_depth(paper, paper_shape):
    real, shaped = paper.model_spec("llama-3.1-8b").settings, paper_shape.model_spec("llama-3.1-8b").settings
    assert (real.probe_layer, real.intervene_layer, real.refusal_layer) == (12, 8, 11)
    # round(l * 3 / 31): the same relative depth in 4 layers
    assert (shaped.probe_layer, shaped.intervene_layer, shaped.refusal_layer) == (1, 1, 1)
    assert (shaped.refusal_pos, shaped.refusal_coef_add) == (real.refusal_pos, real.refusal_coef_add)
    assert [shapes.scaled_layer(layer, 32, 4) for layer in (0, 31)] == [0, 3]


def test_scaled_config_keeps_head_dim_group_size_and_everything_else():
    config = shapes.shape_table()["llama-3.1-8b"]["config"]
    scaled = shapes.scaled_config(config, layers=4, heads=4)
    assert (config["hidden_size"], config["num_attention_heads"], config["num_key_value_heads"]) == (4096, 32, 8)
    assert (scaled["hidden_size"], scaled["num_attention_heads"], scaled["num_key_value_heads"]) == (512, 4, 1)
    assert scaled["intermediate_size"] == 14336 // 8 and scaled["num_hidden_layers"] == 4
    unchanged = set(config) - {"hidden_size", "num_attention_heads", "num_key_value_heads", "intermediate_size",
                               "num_hidden_layers", "head_dim"}
    assert {k: scaled[k] for k in unchanged} == {k: config[k] for k in unchanged}
    assert shapes.scaled_config(config, None, None) == config
    with pytest.raises(ValueError, match="multiple of 4"):
        shapes.scaled_config(config, layers=None, heads=6)


def test_a_paper_shape_model_has_the_real_vocabulary_and_tokenizer(paper_shape):
    spec = paper_shape.model_spec("mistral-7b-instruct")
    model = load_model(spec, dtype="float32", device="cpu")
    config = model._module.config
    assert config.vocab_size == spec.shape["config"]["vocab_size"] == 32768
    assert config.num_hidden_layers == 4 and config.hidden_size == 512
    tokenizer = model.tokenizer
    assert tokenizer("The city of").input_ids[0] == tokenizer.bos_token_id == 1
    assert tokenizer.padding_side == "left"
    again = load_model(spec, dtype="float32", device="cpu")  # the same seed gives the same weights
    assert all(torch.equal(a, b) for a, b in zip(model._module.parameters(), again._module.parameters()))
    other = load_model(paper_shape.model_spec("mistral-7b"), dtype="float32", device="cpu")
    assert not torch.equal(model._module.lm_head.weight, other._module.lm_head.weight)


def test_parameter_count_from_the_config_equals_the_built_model(paper_shape):
    spec = paper_shape.model_spec("llama-2-13b-chat")
    model = load_model(spec, dtype="float32", device="cpu")
    assert parameter_count(spec) == sum(p.numel() for p in model._module.parameters())


def test_memory_plan_of_the_paper_profile(paper):
    llama2_13b = parameter_count(paper.model_spec("llama-2-13b"))
    assert 13.0e9 < llama2_13b < 13.1e9  # Llama-2-13B: 13,015,864,320 parameters
    lines = plan_lines(residencies(paper), ("knowledge", "refusal"))
    assert lines == [f"knowledge: at most 1 model(s) at once, largest llama-2-13b = "
                     f"{llama2_13b * 2 / GIB:.3g} GiB of weights in bfloat16",
                     f"refusal: at most 1 model(s) at once, largest llama-2-13b = {llama2_13b * 2 / GIB:.3g} GiB of "
                     "weights in float16"]  # refusal runs Llama-2-13B in float16 (its refusal_dtype)


def test_a_run_that_does_not_fit_the_gpu_is_refused_before_loading(paper, monkeypatch):
    properties = dataclasses.make_dataclass("Properties", [("total_memory", int)])
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: properties(32 * GIB))
    rows = residencies(paper)
    check_fits(rows, ("knowledge", "truthfulness", "refusal"), "cuda")  # one 13B model in 16 bits (24 GiB) fits 32 GiB
    with pytest.raises(InsufficientMemoryError, match="confidence holds llama-3.1-8b"):
        check_fits(rows, ("confidence",), "cuda")  # Llama-3.1-8B in float32 (30 GiB) x HEADROOM does not
    check_fits(rows, ("confidence",), "cpu")  # CPU memory is not planned


def test_ptr_run_dry_run_prints_the_plan_and_runs_nothing(tmp_path, monkeypatch):
    from ptr.cli import main

    monkeypatch.setenv("PTR_RESULTS_DIR", str(tmp_path))
    result = CliRunner().invoke(main, ["run", "all", "--profile", "paper-shape", "--dry-run"])
    assert result.exit_code == 0, result.output
    assert [line.split(":")[1].strip() for line in result.output.splitlines()] == \
        ["knowledge", "truthfulness", "refusal", "confidence"]
    assert not any(tmp_path.iterdir())


def test_extends_merges_mappings_and_detects_cycles(tmp_path):
    child = tmp_path / "child.yaml"
    child.write_text("extends: tiny\ndescription: child\nexperiments:\n  knowledge:\n    max_pairs: 1\n")
    profile, tiny = load_profile(child), load_profile("tiny")
    assert profile.experiment("knowledge").max_pairs == 1
    assert profile.experiment("knowledge").datasets == tiny.experiment("knowledge").datasets
    assert profile.families == tiny.families and profile.description == "child"
    loop = tmp_path / "loop.yaml"
    loop.write_text(f"extends: {loop}\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_profile(loop)


def test_the_audit_compares_paper_shape_with_the_published_numbers_and_says_the_weights_are_random():
    from analysis.audit import compares_to_paper, note

    assert compares_to_paper("paper") and compares_to_paper("paper-shape") and not compares_to_paper("tiny")
    assert "RANDOM weights" in note("paper-shape") and "meaningless" in note("paper-shape")
    assert "RANDOM" not in note("paper") and "compared with the published" in note("paper")


@pytest.mark.parametrize("name, ids", [("llama3", (8378, 7989)), ("mistral", (12673, 11989)),
                                       ("mistral-tulu2", (12673, 11989)), ("llama2", (15676, 17131))])
def test_answer_ids_are_the_originals_last_token_of_true_and_false(name, ids, mirror):
    from data_prep.tokenizers import reference_tokenizer
    from replication.mechanics.forward import answer_token_ids

    tokenizer = reference_tokenizer(name)
    assert answer_token_ids(tokenizer) == ids
    # the word piece a TRUE line of the few-shot prompt ends with (Llama-2 encodes " TRUE" alone as "▁", "▁TRUE")
    assert tokenizer("Paris. This statement is: TRUE").input_ids[-1] == ids[0]
