"""Stand-in tokenizers for building patching pairs without the Hugging Face hub (`encode(text) -> ids`, no BOS).

llama3:  quicktok's Llama-3 BPE (the vocabulary of Llama-3.1-8B and its Tulu/Instruct variants);
mistral: mistral-common's v3 SentencePiece model (the 32768-token vocabulary of Mistral-7B-v0.3; needs the
         `sentencepiece` package).
"""
from __future__ import annotations

from pathlib import Path

from data_prep.errors import DataError
from data_prep.pairs import Encode


def _llama3() -> Encode:
    import quicktok

    return quicktok.get_encoding("llama3").encode


def _mistral() -> Encode:
    import mistral_common
    from mistral_common.tokens.tokenizers.sentencepiece import SentencePieceTokenizer

    model = Path(mistral_common.__file__).parent / "data" / "mistral_instruct_tokenizer_240323.model.v3"
    tokenizer = SentencePieceTokenizer(str(model))
    return lambda text: tokenizer.encode(text, bos=False, eos=False)


STANDIN_TOKENIZERS = {"llama3": _llama3, "mistral": _mistral}


def standin_encoder(tokenizer_key: str) -> Encode:
    if tokenizer_key not in STANDIN_TOKENIZERS:
        raise DataError(f"no stand-in tokenizer for {tokenizer_key!r}; known: {sorted(STANDIN_TOKENIZERS)}")
    return STANDIN_TOKENIZERS[tokenizer_key]()
