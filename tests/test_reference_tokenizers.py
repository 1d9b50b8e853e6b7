"""The paper models' real tokenizers built offline (data_prep.tokenizers.reference_tokenizer) against reference ids:
llama.cpp's test vectors (46 strings, ids of the original tokenizers), the ids the original code hard-codes for its
patching patterns (patching_process_data.py, produced by the real HF tokenizers), mistral-common, quicktok; and the
shapes table (replication/configs/shapes.yaml) against the tokenizers."""
from __future__ import annotations

import pytest

from data_prep.sources import fetch
from data_prep.tokenizers import REFERENCE_SPECS, reference_tokenizer, standin_encoder
from replication.config import load_model_table
from replication.shapes import shape_table


@pytest.fixture(scope="module")
def raw_tokenizer_files(mirror, tmp_path_factory):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PTR_DATA_DIR", str(tmp_path_factory.mktemp("ptr_data")))
        patch.setenv("PTR_DATA_MIRROR", str(mirror))
        yield {name: fetch(f"tokenizers/{name}") for name in
               ("ggml-vocab-llama-spm.gguf", "ggml-vocab-llama-spm.gguf.inp", "ggml-vocab-llama-spm.gguf.out",
                "ggml-vocab-llama-bpe.gguf.inp", "ggml-vocab-llama-bpe.gguf.out")}


def llama_cpp_vectors(files, vocab):
    """(text, ids) of llama.cpp's test-tokenizer-0 (strings separated by __ggml_vocab_test__ lines)."""
    texts = files[f"ggml-vocab-{vocab}.gguf.inp"].read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")
    lines = files[f"ggml-vocab-{vocab}.gguf.out"].read_text(encoding="utf-8").split("\n")
    assert texts[-1] == "" and lines[-1] == ""
    return [(text, [int(i) for i in line.split()]) for text, line in zip(texts[:-1], lines[:-1], strict=True)]


@pytest.mark.parametrize("name, vocab", [("llama2", "llama-spm"), ("llama3", "llama-bpe")])
def test_all_46_llama_cpp_vectors(raw_tokenizer_files, name, vocab):
    tokenizer = reference_tokenizer(name)
    vectors = llama_cpp_vectors(raw_tokenizer_files, vocab)
    assert len(vectors) == 46
    wrong = [(text, ids, tokenizer.encode(text, add_special_tokens=False)) for text, ids in vectors
             if tokenizer.encode(text, add_special_tokens=False) != ids]
    assert wrong == []


def test_llama3_equals_quicktok_on_the_llama_cpp_vectors(raw_tokenizer_files, llama3_encode):
    tokenizer = reference_tokenizer("llama3")
    for text, _ in llama_cpp_vectors(raw_tokenizer_files, "llama-bpe"):
        assert tokenizer.encode(text, add_special_tokens=False) == llama3_encode(text), text


# (text, ids with BOS) from the patterns of the original's patching_process_data.py (per family)
ORIGINAL_IDS = {
    "llama3": [("The city of", [128000, 791, 3363, 315]), ("The Spanish word '", [128000, 791, 15506, 3492, 364])],
    "llama2": [("The city of", [1, 450, 4272, 310]), ("The Spanish word '", [1, 450, 10432, 1734, 525])],
    "mistral": [("The city of", [1, 1183, 3758, 1070]), ("The Spanish word '", [1, 1183, 10945, 2475, 1232])],
}


@pytest.mark.parametrize("name", sorted(ORIGINAL_IDS))
def test_ids_the_original_code_hard_codes(raw_tokenizer_files, name):
    tokenizer = reference_tokenizer(name)
    for text, ids in ORIGINAL_IDS[name]:
        assert tokenizer(text).input_ids == ids


def test_mistral_equals_mistral_common_on_text_without_a_leading_space():
    pytest.importorskip("sentencepiece")
    import mistral_common
    from mistral_common.tokens.tokenizers.sentencepiece import SentencePieceTokenizer

    model = mistral_common.__path__[0] + "/data/mistral_instruct_tokenizer_240323.model.v3"
    official = SentencePieceTokenizer(model)
    tokenizer = reference_tokenizer("mistral")
    for text in ("The city of Paris is in France.", "Äpfel 3333 ½ 🚀 (normal)\n\n  x", "It's  tab\there"):
        assert tokenizer(text).input_ids == official.encode(text, bos=True, eos=False), text


def test_special_tokens_as_the_real_tokenizers_have_them():
    llama3 = reference_tokenizer("llama3")
    assert len(llama3) == 128256
    assert [llama3.convert_tokens_to_ids(t) for t in ("<|begin_of_text|>", "<|end_of_text|>",
            "<|reserved_special_token_0|>", "<|finetune_right_pad_id|>", "<|start_header_id|>", "<|end_header_id|>",
            "<|eom_id|>", "<|eot_id|>", "<|python_tag|>", "<|reserved_special_token_3|>",
            "<|reserved_special_token_247|>")] == [128000, 128001, 128002, 128004, 128006, 128007, 128008, 128009,
                                                 128010, 128011, 128255]
    assert (llama3.bos_token_id, llama3.eos_token_id, llama3.pad_token) == (128000, 128001, None)
    chat = "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
    assert llama3(chat).input_ids == [128000, 128006, 882, 128007, 271, 13347, 128009]
    assert reference_tokenizer("llama3-instruct").eos_token_id == 128009
    tulu3 = reference_tokenizer("llama3-tulu3")
    assert (len(tulu3), tulu3.pad_token, tulu3.pad_token_id) == (128257, "<pad>", 128256)

    mistral = reference_tokenizer("mistral")
    assert (len(mistral), mistral.bos_token_id, mistral.eos_token_id, mistral.unk_token_id) == (32768, 1, 2, 0)
    assert mistral("[INST] Hi [/INST]").input_ids[:2] == [1, 3]
    assert mistral.convert_ids_to_tokens([10, 770, 771]) == ["[control_8]", "[control_768]", "<0x00>"]
    llama2 = reference_tokenizer("llama2")
    assert (len(llama2), llama2.bos_token_id, llama2.eos_token_id, llama2.pad_token) == (32000, 1, 2, None)


def test_mistral_tulu2_has_its_llama3_tokens_and_bos_32768():
    tulu2 = reference_tokenizer("mistral-tulu2")
    assert len(tulu2) == 32773
    assert [tulu2.convert_tokens_to_ids(t) for t in ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                                                     "<|end_header_id|>", "<|eot_id|>")] == list(range(32768, 32773))
    assert (tulu2.bos_token_id, tulu2.eos_token_id, tulu2.pad_token_id) == (32768, 32769, 32769)
    # the original's "<s> " prefix: the tokenizer's BOS, then the base model's BOS (id 1), then the text
    assert tulu2("<s> The city of").input_ids == [32768, 1, 1183, 3758, 1070]
    assert tulu2("The city of").input_ids[1:] == reference_tokenizer("mistral")("The city of").input_ids[1:]


def test_each_call_returns_a_new_tokenizer():
    first = reference_tokenizer("mistral")
    first.padding_side = "left"
    first.add_special_tokens({"pad_token": "</s>"})
    second = reference_tokenizer("mistral")
    assert (second.padding_side, second.pad_token) == ("right", None)


def test_standin_encoders_are_the_reference_tokenizers_without_bos(raw_tokenizer_files):
    for key, name in (("llama3", "llama3"), ("mistral", "mistral"), ("llama2", "llama2")):
        assert standin_encoder(key)("The city of Paris") == reference_tokenizer(name)("The city of Paris").input_ids[1:]


def test_unknown_name_says_which_are_known():
    with pytest.raises(Exception, match="known: .*llama2"):
        reference_tokenizer("llama4")


def test_shapes_table_builds_configs_that_fit_their_tokenizers(raw_tokenizer_files):
    from transformers import AutoConfig

    shapes, models = shape_table(), load_model_table()
    assert set(shapes) == {key for key, spec in models.items() if spec.source == "hub"}
    for key, entry in shapes.items():
        assert entry["config_source"]["hf_id"] == models[key].hf_id, key
        tokenizer = reference_tokenizer(entry["tokenizer"])
        config = AutoConfig.for_model(**entry["config"])
        assert config.model_type == models[key].arch, key
        # the real embeddings: exactly the vocabulary, or padded (Tulu-3: 128257 tokens, 128264 rows)
        assert config.vocab_size == len(tokenizer) or (entry["tokenizer"] == "llama3-tulu3"
                                                       and config.vocab_size == 128264), key
        assert config.bos_token_id == tokenizer.bos_token_id, key
        eos_ids = config.eos_token_id if isinstance(config.eos_token_id, list) else [config.eos_token_id]
        assert tokenizer.eos_token_id in eos_ids, key
        assert getattr(config, "pad_token_id", None) in (None, tokenizer.pad_token_id), key
        assert config.hidden_size % config.num_attention_heads == 0, key
    assert set(REFERENCE_SPECS) == {entry["tokenizer"] for entry in shapes.values()}
