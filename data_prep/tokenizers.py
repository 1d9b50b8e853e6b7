"""The paper models' real tokenizers, built offline as `transformers` fast tokenizers, and the pair stand-ins.

`reference_tokenizer(name)` rebuilds each real tokenizer from a public copy of its vocabulary (no Hugging Face hub):

llama3*:  Llama-3 BPE from quicktok-v1's rank table (128000 tokens) + Llama-3.1's 256 special tokens (128000-128255),
          pre-tokenised with Meta's split regex, BOS <|begin_of_text|> prepended (Meta's tokenizer.json).
          llama3-instruct: EOS <|eot_id|> (Llama-3.1-8B-Instruct's tokenizer_config);
          llama3-tulu3: <pad> added as 128256 and set as pad (Llama-3.1-Tulu-3-8B-SFT's special_tokens_map).
mistral*: Mistral v3 SentencePiece (32768) from mistral-common's `.model.v3`; ids 10-770 renamed
          [control_8]..[control_768] as in Mistral-7B-v0.3's tokenizer.json.
          mistral-tulu2: nyu-dice-lab/Mistral-7B-Base-SFT-Tulu2 (axolotl) appended five Llama-3 special tokens
          (32768-32772) and made <|begin_of_text|> its BOS and <|end_of_text|> its EOS and pad, which is why its
          BOS id is 32768 and why the original prefixes "<s> " (id 1) to its prompts.
llama2:   Llama-2 SentencePiece (32000) from llama.cpp's vocab-only `ggml-vocab-llama-spm.gguf` (a raw file).

Leading "▁": llama2 has HF's legacy Llama normalizer (prepend "▁" to every text segment, spaces to "▁"), which
reproduces sentencepiece (all 46 llama.cpp test vectors). mistral has the non-legacy Metaspace pre-tokenizer
(prepend "▁" only at the start of the text, and not when the text starts with a space), recalled from
Mistral-7B-v0.3's tokenizer.json ("legacy": false), not verified from the file here: it equals sentencepiece except
for text that starts with a space or follows a special token (e.g. the Tulu-2 SFT's "<s> " prefix).

`standin_encoder(tokenizer_key)` is `encode(text) -> ids` without BOS for building patching pairs, from the same
tokenizers.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from pathlib import Path

from data_prep.errors import DataError
from data_prep.pairs import Encode

LLAMA_SPM_GGUF = "tokenizers/ggml-vocab-llama-spm.gguf"  # raw file name (data_prep/sources.yaml)
# Meta's Llama-3 pre-tokenizer split (tokenizer.json, pre_tokenizer.pretokenizers[0].pattern.Regex)
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_SPECIALS = ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                   "<|eot_id|>")
# Llama-3.1's 256 special tokens from id 128000 (Meta's tokenizer.json; quicktok has Llama-3.0's names, which
# number every unnamed one as reserved)
LLAMA31_SPECIALS = ("<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                    "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|reserved_special_token_2|>",
                    "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>",
                    *(f"<|reserved_special_token_{i}|>" for i in range(3, 248)))


@dataclass(frozen=True)
class ReferenceSpec:
    vocabulary: str               # key of _VOCABULARIES
    bos: str
    eos: str
    pad: str | None = None        # None where the real tokenizer has no pad token
    appended: tuple[str, ...] = ()  # special tokens the fine-tune appended after the base vocabulary, in id order
    source: str = ""              # where these facts come from


REFERENCE_SPECS = {
    "llama3": ReferenceSpec("llama3", "<|begin_of_text|>", "<|end_of_text|>",
                            source="meta-llama/Llama-3.1-8B tokenizer_config.json"),
    "llama3-instruct": ReferenceSpec("llama3", "<|begin_of_text|>", "<|eot_id|>",
                                     source="meta-llama/Llama-3.1-8B-Instruct tokenizer_config.json"),
    "llama3-tulu3": ReferenceSpec("llama3", "<|begin_of_text|>", "<|end_of_text|>", pad="<pad>", appended=("<pad>",),
                                  source="allenai/Llama-3.1-Tulu-3-8B-SFT special_tokens_map.json (pad <pad>, id "
                                         "128256; config vocab_size 128264 pads the embedding)"),
    "mistral": ReferenceSpec("mistral-v3", "<s>", "</s>", source="mistralai/Mistral-7B-v0.3 tokenizer_config.json"),
    "mistral-tulu2": ReferenceSpec("mistral-v3", "<|begin_of_text|>", "<|end_of_text|>", pad="<|end_of_text|>",
                                   appended=LLAMA3_SPECIALS,
                                   source="nyu-dice-lab Mistral-7B-Base-SFT-* added_tokens.json (32768-32772) and "
                                          "special_tokens_map.json (sibling repos; the Tulu2 repo's own files were "
                                          "not readable here)"),
    "llama2": ReferenceSpec("llama-spm", "<s>", "</s>", source="meta-llama/Llama-2-7b-hf tokenizer_config.json"),
}


def reference_tokenizer(name: str):
    """A new `PreTrainedTokenizerFast` behaving like the real tokenizer `name` (see REFERENCE_SPECS).

    Each call returns a fresh object (callers may set padding_side etc.); the expensive vocabulary is cached.
    """
    from transformers import PreTrainedTokenizerFast

    if name not in REFERENCE_SPECS:
        raise DataError(f"no reference tokenizer {name!r}; known: {sorted(REFERENCE_SPECS)}")
    spec = REFERENCE_SPECS[name]
    return PreTrainedTokenizerFast(tokenizer_object=_backend(name), bos_token=spec.bos, eos_token=spec.eos,
                                   pad_token=spec.pad, unk_token=_VOCABULARY_UNK[spec.vocabulary],
                                   clean_up_tokenization_spaces=False)


@cache
def _vocabulary_json(vocabulary: str) -> str:
    return _VOCABULARIES[vocabulary]().to_str()


@cache
def _backend_json(name: str) -> str:
    from tokenizers import AddedToken, Tokenizer, processors

    spec = REFERENCE_SPECS[name]
    backend = Tokenizer.from_str(_vocabulary_json(spec.vocabulary))
    base_size = backend.get_vocab_size(with_added_tokens=True)
    backend.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in spec.appended])
    if backend.get_vocab_size(with_added_tokens=True) != base_size + len(spec.appended):
        raise DataError(f"reference tokenizer {name}: appended tokens {spec.appended} are not all new")
    bos_id = backend.token_to_id(spec.bos)
    # the real ones prepend BOS through the post-processor (Meta's tokenizer.json; transformers' Llama template)
    backend.post_processor = processors.TemplateProcessing(
        single=f"{spec.bos}:0 $A:0", pair=f"{spec.bos}:0 $A:0 {spec.bos}:1 $B:1", special_tokens=[(spec.bos, bos_id)])
    return backend.to_str()


def _backend(name: str):
    from tokenizers import Tokenizer

    return Tokenizer.from_str(_backend_json(name))


def _llama3_vocabulary():
    """Meta's Llama-3 tokenizer from quicktok's rank table: byte-level BPE whose merges follow the ranks."""
    import quicktok
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, pre_tokenizers
    from tokenizers.models import BPE
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    encoding = quicktok.get_encoding("llama3")
    n_ranked = encoding.n_vocab - len(LLAMA31_SPECIALS)
    if min(map(encoding.encode_single_token, encoding.special_tokens_set)) != n_ranked:
        raise DataError(f"quicktok's llama3 encoding does not have {n_ranked} ranked tokens; check quicktok-v1")
    ranks = {encoding.decode_single_token_bytes(i): i for i in range(n_ranked)}
    byte_char = bytes_to_unicode()

    def text(piece: bytes) -> str:
        return "".join(byte_char[b] for b in piece)

    merges = []  # (rank of the merged token, left, right): tiktoken's merge order
    for piece, rank in ranks.items():
        splits = [(ranks[piece[:k]], ranks[piece[k:]], piece[:k], piece[k:]) for k in range(1, len(piece))
                  if piece[:k] in ranks and piece[k:] in ranks]
        merges += [(rank, text(left), text(right)) for _, _, left, right in sorted(splits)]
    merges.sort(key=lambda m: m[0])
    backend = Tokenizer(BPE({text(p): i for p, i in ranks.items()}, [(l, r) for _, l, r in merges],
                            fuse_unk=False, ignore_merges=True))
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False)])
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in LLAMA31_SPECIALS])
    return backend


def _spm_bpe(pieces: list[str], scores: list[float], special_ids: set[int], legacy: bool):
    """A SentencePiece BPE model as HF's Llama tokenizer.json has it (byte fallback, "▁" for spaces)."""
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import BPE
    from transformers.tokenization_utils_base import generate_merges

    vocab = {piece: i for i, piece in enumerate(pieces)}
    special = [pieces[i] for i in sorted(special_ids)]
    merges = generate_merges(vocab, {p: s for p, s in zip(pieces, scores)}, skip_tokens=special)
    backend = Tokenizer(BPE(vocab, merges, unk_token=pieces[0], fuse_unk=True, byte_fallback=True))
    if legacy:
        backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    else:
        backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
    backend.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in special])
    return backend


def _mistral_v3_vocabulary():
    import mistral_common
    import sentencepiece

    model = Path(mistral_common.__file__).parent / "data" / "mistral_instruct_tokenizer_240323.model.v3"
    sp = sentencepiece.SentencePieceProcessor(model_file=str(model))
    pieces = [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
    first_byte = next(i for i in range(len(pieces)) if sp.is_byte(i))  # 771: <unk>, <s>, </s> + 768 controls
    # mistral-common names some reserved controls ([IMG], ...); the HF tokenizer calls ids 10.. [control_8]..
    pieces[10:first_byte] = [f"[control_{i - 2}]" for i in range(10, first_byte)]
    return _spm_bpe(pieces, [sp.get_score(i) for i in range(len(pieces))], set(range(first_byte)), legacy=False)


def _llama_spm_vocabulary():
    from gguf import GGUFReader

    from data_prep.sources import fetch

    fields = GGUFReader(fetch(LLAMA_SPM_GGUF)).fields

    def array(key):
        field = fields[key]
        return [field.contents(i) for i in range(len(field.data))]

    types = array("tokenizer.ggml.token_type")  # llama.cpp: 1 normal, 2 unknown, 3 control, 6 byte
    return _spm_bpe(array("tokenizer.ggml.tokens"), array("tokenizer.ggml.scores"),
                    {i for i, t in enumerate(types) if t in (2, 3)}, legacy=True)


_VOCABULARIES = {"llama3": _llama3_vocabulary, "mistral-v3": _mistral_v3_vocabulary, "llama-spm": _llama_spm_vocabulary}
_VOCABULARY_UNK = {"llama3": None, "mistral-v3": "<unk>", "llama-spm": "<unk>"}

# tokenizer_key (models.yaml) -> the reference tokenizer whose vocabulary it shares
STANDIN_TOKENIZERS = {"llama3": "llama3", "mistral": "mistral", "llama2": "llama2"}


def standin_encoder(tokenizer_key: str) -> Encode:
    """`encode(text) -> ids` (no BOS) of the real vocabulary `tokenizer_key`, for building patching pairs."""
    if tokenizer_key not in STANDIN_TOKENIZERS:
        raise DataError(f"no stand-in tokenizer for {tokenizer_key!r}; known: {sorted(STANDIN_TOKENIZERS)}")
    tokenizer = reference_tokenizer(STANDIN_TOKENIZERS[tokenizer_key])
    return lambda text: tokenizer.encode(text, add_special_tokens=False)
