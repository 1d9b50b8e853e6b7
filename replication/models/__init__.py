"""Loading models and tokenizers from model-table specs, and the model-family-independent ways to use them.

`load_model` is the single way to get a model: it returns an `nnsight.TransformersModel` around the Hugging Face
model, whatever the source (hub id or local directory, GGUF package, post-trained model in the cache (made beforehand
by `ptr posttrain`: loading never trains), tiny random model built in code). Facts other code relies on (transformers
5.24, nnsight 0.8.1):

* A decoder layer returns a plain tensor: read and write `layer.output`, never `layer.output[0]` (that would be
  batch element 0, silently).
* "Layer l" is the output of decoder layer l = HF `hidden_states[l + 1]` for every layer but the last: HF's last
  `hidden_states` entry is after the final norm (`final_norm(layer.output)` of the last layer).
* nnsight pads on the left and, for a left-padded batch, passes position ids counted from each row's first real
  token, so a padded prompt gets the same states as the prompt alone. A plain HF forward of the same batch
  without `position_ids` counts the pad positions and differs: reference implementations must pass the same ids
  (`position_ids_for(attention_mask)`).
* The last position's logits through the whole LM head: `logits_to_keep=LAST_POSITION`, not `1` (below).
* Parameters are loaded with `requires_grad=False` (analysis only; no autograd graphs are kept). Code that trains
  a loaded model turns it back on.
"""
from __future__ import annotations

import contextlib
import gc
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch
from nnsight import TransformersModel
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from replication.config import CHAT, ModelSpec, Profile, load_model_table
from replication.models import tiny

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# The confidence experiment's dtype: the original's TransformerLens models are fp32; bf16 loading would round fp16
# weights. Here, beside model_dtype, because memory planning needs both without importing the experiments.
WEIGHTS_DTYPE = "float32"
# `logits_to_keep` for the last position's logits. An index tensor, not the int 1: for an int, transformers hands the
# LM head the strided view hidden_states[:, -1:, :], which torch.matmul multiplies as one matrix-vector product per
# row (a bmm over the head's weight expanded per row: on a CPU a batch of 16 through Gemma-3's 262k-word head took
# 470 ms instead of 120 ms); an index tensor gathers a contiguous copy, multiplied as one matrix product. Same
# logits up to float rounding (the two products sum in different orders).
LAST_POSITION = torch.tensor([-1])
# From this many rows on (in both factors) MKL's float32 product W @ x^T gives the bits of F.linear(x, W) = x @ W^T
# (measured on this project's x86-64 machines: `python -m bench.vocabulary_head`); with 2 to 11 rows it sums in
# another order. On other CPUs the two may differ by float rounding.
VOCABULARY_ROWS_MIN_ROWS = 12
VOCABULARY_CHUNK = 4096  # vocabulary rows per product: each transposed block is copied while it is in cache


class VocabularyRowsHead(torch.nn.Linear):
    """The LM head on a CPU in float32 (bias-free): the logits as W @ x^T, the vocabulary as the product's rows, in
    blocks of VOCABULARY_CHUNK words (a remainder of fewer than VOCABULARY_ROWS_MIN_ROWS joins the block before),
    each copied into a plain [rows, vocabulary] tensor.

    For a few rows and a large vocabulary MKL's F.linear is slow: through Gemma-3's 262k-word head 16 rows took
    115 ms, 80 rows 298 ms, 160 rows 499 ms; this way 72, 211 and 401 ms. The unblocked W @ x^T is as fast but
    leaves the logits transposed in memory, where an argmax over the vocabulary is 6-8 times slower. Where a
    gradient is taken (post-training) or there are fewer rows, it is F.linear: training is that of the plain head."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        rows = hidden_states.reshape(-1, self.in_features)
        if torch.is_grad_enabled() or min(rows.shape[0], self.out_features) < VOCABULARY_ROWS_MIN_ROWS:
            return super().forward(hidden_states)
        logits = rows.new_empty(rows.shape[0], self.out_features)
        start = 0
        while start < self.out_features:
            stop = start + VOCABULARY_CHUNK
            if self.out_features - stop < VOCABULARY_ROWS_MIN_ROWS:
                stop = self.out_features
            logits[:, start:stop] = (self.weight[start:stop] @ rows.T).T
            start = stop
        return logits.reshape(*hidden_states.shape[:-1], self.out_features)


def use_vocabulary_rows_head(model: torch.nn.Module, spec: ModelSpec, dtype: str, device: str) -> None:
    """The HF model's LM head becomes a `VocabularyRowsHead` where that is measured faster: CPU, float32, a plain
    bias-free nn.Linear (the same parameters, tied or not)."""
    head = module_at(model, spec.unembed_path)
    if device == "cpu" and dtype == "float32" and type(head) is torch.nn.Linear and head.bias is None:
        head.__class__ = VocabularyRowsHead


class ModelNotAvailableError(RuntimeError):
    """The weights of a model cannot be had here; the message says how to get them."""


class NotPosttrainedError(ModelNotAvailableError):
    """A post-trained model is not in the cache yet: loading never trains; `ptr posttrain` makes it."""


# Models kept loaded inside `keep_loaded`, by (spec, dtype, device); None outside it.
_kept: dict[tuple[str, str, str], TransformersModel] | None = None


@contextlib.contextmanager
def keep_loaded(enabled: bool = True) -> Iterator[None]:
    """Inside the block `load_model` hands back a model it loaded before (same spec, dtype and device) instead of
    reading it again, so a `ptr replicate` or `ptr run all` loads each model once; they are let go at the end.
    For analysis only: the callers enable it where `memory.fits_together` says every model fits at once, and
    nothing that trains a model runs inside it."""
    global _kept
    if not enabled or _kept is not None:  # nested: the outer block keeps them
        yield
        return
    _kept = {}
    try:
        yield
    finally:
        _kept = None
        release()


def load_model(spec: ModelSpec, *, dtype: str = "float32", device: str = "cpu") -> TransformersModel:
    """The model of `spec` wrapped for nnsight 0.8 (eval mode, no grad); `model.tokenizer` pads on the left."""
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; allowed: {', '.join(DTYPES)} (profile key 'dtype')")
    device = resolve_device(device)
    if _kept is None:
        return _load_model(spec, dtype, device)
    key = (repr(spec), dtype, device)  # every field of the spec
    if key not in _kept:
        _kept[key] = _load_model(spec, dtype, device)
    return _kept[key]


def _load_model(spec: ModelSpec, dtype: str, device: str) -> TransformersModel:
    if spec.source == "tiny":
        tokenizer = tiny.build_tokenizer()
        model = tiny.build_model(spec.arch, spec.seed, tokenizer).to(device=device, dtype=DTYPES[dtype])
    elif spec.source == "shape":
        tokenizer = _reference_tokenizer(spec)
        model = build_shape_model(spec, dtype=DTYPES[dtype], device=device)
    else:
        location, revision = _weights_location(spec)
        tokenizer = _from_pretrained(AutoTokenizer, spec, location, revision)
        model = _from_pretrained(AutoModelForCausalLM, spec, location, revision,
                                 dtype=DTYPES[dtype], device_map=device)
    model.eval().requires_grad_(False)
    use_vocabulary_rows_head(model, spec, dtype, device)
    _prepare_tokenizer(spec, tokenizer)
    return TransformersModel(model, tokenizer=tokenizer, task="text-generation")


def release() -> None:
    """Free the memory of a model no longer referenced, before the next one is loaded."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def load_tokenizer(spec: ModelSpec) -> PreTrainedTokenizerBase:
    """The tokenizer of `spec` alone (no weights), padding on the left; for building data."""
    if spec.source == "tiny":
        tokenizer = tiny.build_tokenizer()
    elif spec.source == "shape":
        tokenizer = _reference_tokenizer(spec)
    elif spec.source == "posttrain":  # post-training keeps the tokenizer (config checks the tokenizer_key)
        return load_tokenizer(load_model_table()[spec.base])
    else:
        location, revision = _weights_location(spec)
        tokenizer = _from_pretrained(AutoTokenizer, spec, location, revision, tokenizer_only=True)
    _prepare_tokenizer(spec, tokenizer)
    return tokenizer


def build_shape_model(spec: ModelSpec, *, dtype: torch.dtype, device: str):
    """A random-weight model of the shape in `spec.shape` (the real model's config, maybe scaled; replication.shapes),
    initialised on `device` (a full-size model never passes through CPU memory), seeded by `spec.seed`."""
    config = AutoConfig.for_model(**spec.shape["config"])
    with torch.random.fork_rng(devices=[] if device == "cpu" else None), torch.device(device):
        torch.manual_seed(spec.seed)
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def _reference_tokenizer(spec: ModelSpec) -> PreTrainedTokenizerBase:
    """The real tokenizer of a paper model, built offline (data_prep.tokenizers; a new object per call)."""
    from data_prep.tokenizers import reference_tokenizer

    return reference_tokenizer(spec.shape["tokenizer"])


def pair_tokenizers(profile) -> dict[str, Callable[[str], list[int]]]:
    """`{tokenizer_key: encode}` (no BOS) for every tokenizer family of the profile, for building patching pairs.

    The model's own tokenizer is used; where it cannot be had here (gated hub models offline), data_prep's exact
    stand-in for that vocabulary is used instead (Llama-3 BPE via quicktok, Mistral v3 SentencePiece), with a
    warning naming the substitution.
    """
    from data_prep.errors import DataError
    from data_prep.tokenizers import STANDIN_TOKENIZERS, standin_encoder

    encoders = {}
    for key in profile.models():
        spec = profile.model_spec(key)
        if spec.tokenizer_key in encoders:
            continue
        try:
            tokenizer = load_tokenizer(spec)
            encoders[spec.tokenizer_key] = lambda text, t=tokenizer: t.encode(text, add_special_tokens=False)
        except ModelNotAvailableError:
            if spec.tokenizer_key not in STANDIN_TOKENIZERS:
                raise
            warnings.warn(f"{spec.hf_id}'s tokenizer is not available here; building {spec.tokenizer_key} pairs "
                          "with data_prep's stand-in for the same vocabulary")
            try:
                encoders[spec.tokenizer_key] = standin_encoder(spec.tokenizer_key)
            except DataError as error:  # neither the tokenizer nor its stand-in's file: either fix will do
                raise DataError(f"{error} Or fetch the tokenizer itself (no weights): "
                                f"`{fetch_command(spec, tokenizer_only=True)}`.") from None
    return encoders


def resolve_device(device: str) -> str:
    """'auto' -> 'cuda' when available, else 'cpu'."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda"):
        raise ValueError(f"unknown device {device!r}; allowed: auto, cpu, cuda (profile key 'device')")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but no CUDA GPU is visible; use 'auto' or 'cpu'")
    return device


def module_at(root, path: str):
    """The submodule (or nnsight envoy) at a dotted attribute path, e.g. spec.layers_path or spec.unembed_path."""
    for name in path.split("."):
        root = getattr(root, name)
    return root


def decoder_layers(model, spec: ModelSpec) -> list:
    """The decoder layers of a loaded model (nnsight envoys for a TransformersModel), in order."""
    return list(module_at(model, spec.layers_path))


def format_prompt(spec: ModelSpec, tokenizer: PreTrainedTokenizerBase, instruction: str,
                  template: str | None = None) -> str:
    """`instruction` in the model's prompt template (or in `template`, e.g. settings.refusal_extract_template).

    The text is meant to be tokenised with the tokenizer's special tokens (BOS) added, so a chat template's
    leading BOS is dropped here: the prompt then starts with exactly one BOS.
    """
    template = template or spec.template
    if template != CHAT:
        return template.replace("{instruction}", instruction)
    text = tokenizer.apply_chat_template([{"role": "user", "content": instruction}], tokenize=False,
                                         add_generation_prompt=True)
    bos = tokenizer.bos_token
    return text[len(bos):] if spec.adds_bos and bos and text.startswith(bos) else text


def prompts(model, spec: ModelSpec, items: Sequence[str], template: str | None = None) -> list[str]:
    """Instructions in the model's template (or `template`), ready to tokenise with BOS."""
    return [format_prompt(spec, model.tokenizer, item, template) for item in items]


def model_dtype(profile: Profile, spec: ModelSpec) -> str:
    """The dtype a model runs in for the refusal experiment: its table's refusal_dtype (the original's float16
    Llama-2-13b models) or the profile's."""
    return spec.settings.refusal_dtype or profile.dtype


def position_ids_for(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids counting from each left-padded row's first real token (what nnsight passes for such a batch)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def _weights_location(spec: ModelSpec) -> tuple[str, str | None]:
    """(hub id or local directory, revision) holding the model's files; converts a GGUF package on demand."""
    if spec.source == "hub":
        local = Path(spec.hf_id).expanduser()
        return (str(local), None) if local.is_dir() else (spec.hf_id, spec.revision)
    if spec.source == "gguf":
        from replication.models.gguf import base_model_dir

        return str(base_model_dir(spec)), None
    if spec.source == "posttrain":
        return str(posttrained_dir(spec)), None
    raise ValueError(f"model {spec.key!r}: source {spec.source!r} has no weight files")


def posttrained_dir(spec: ModelSpec) -> Path:
    """The finished post-trained model's directory; NotPosttrainedError naming `ptr posttrain` when it is absent."""
    from replication.models.posttrained import is_finished, target

    made = target(spec)
    if not is_finished(made.directory, made.digest):
        raise NotPosttrainedError(
            f"model {spec.key!r} (SFT of {spec.base!r}, recipe {spec.recipe!r}) has not been post-trained yet: "
            f"{made.directory} holds no finished model. Make it with `ptr posttrain --profile P` (P: the profile "
            f"that uses it, e.g. demo or tiny), or run the whole pipeline with `ptr replicate --profile P`.")
    return made.directory


def _offline() -> bool:
    return any(os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")
               for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


TOKENIZER_FILES = ("tokenizer*", "*.model", "special_tokens_map.json", "config.json")  # no weights


def _from_pretrained(auto_class, spec: ModelSpec, location: str, revision: str | None,
                     tokenizer_only: bool = False, **kwargs):
    """`auto_class.from_pretrained`; a model not to be had here is a ModelNotAvailableError saying how to fetch its
    files (`tokenizer_only`: the tokenizer's alone)."""
    if revision is None:  # a local directory
        return auto_class.from_pretrained(location, **kwargs)
    try:
        return auto_class.from_pretrained(location, revision=revision, local_files_only=_offline(), **kwargs)
    except OSError as error:
        raise ModelNotAvailableError(_fetch_hint([spec], error, tokenizer_only=tokenizer_only)) from error


def fetch_command(spec: ModelSpec, tokenizer_only: bool = False) -> str:
    """The one command that puts a hub model's files (or its tokenizer's alone) into the Hugging Face cache."""
    include = " ".join(f'"{pattern}"' for pattern in TOKENIZER_FILES)
    return (f"hf download {spec.hf_id} --revision {spec.revision}"
            + (f" --include {include}" if tokenizer_only else ""))


def missing_models(profile, experiments) -> list[ModelSpec]:
    """The hub models that `experiments` of `profile` need (a post-trained model: its base) whose files are not in
    the Hugging Face cache here, when offline (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE); online, none."""
    from huggingface_hub import try_to_load_from_cache

    if not _offline():
        return []
    table, needed = profile.model_table, {}
    for key in dict.fromkeys(k for name in experiments for k in profile.models(name)):
        spec = profile.model_spec(key)
        while spec.source == "posttrain":
            spec = table[spec.base]
        if spec.source == "hub" and not Path(spec.hf_id).expanduser().is_dir():
            needed[spec.key] = spec
    return [spec for spec in needed.values()
            if not isinstance(try_to_load_from_cache(spec.hf_id, "config.json", revision=spec.revision), str)]


def check_available(profile, experiments) -> None:
    """A ModelNotAvailableError naming every missing model of `missing_models` at once, with its fetch command."""
    missing = missing_models(profile, experiments)
    if missing:
        raise ModelNotAvailableError(_fetch_hint(missing))


def _fetch_hint(specs: list[ModelSpec], error: OSError | None = None, tokenizer_only: bool = False) -> str:
    from huggingface_hub import constants

    state = ("offline mode is on (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE)" if _offline()
             else "the hub did not provide it (no network, or a gated model without access)")
    what = "the tokenizer of " if tokenizer_only else ""
    names = ", ".join(f"{what}{spec.key!r} ({spec.hf_id} at revision {spec.revision})" for spec in specs)
    commands = "\n".join(f"  {fetch_command(spec, tokenizer_only)}" for spec in specs)
    gated = [spec.hf_id for spec in specs if spec.hf_id.startswith("meta-llama/")]
    gated_note = (" Meta's Llama models are gated: set HF_TOKEN to a token of an account that accepted the licence "
                  f"on https://huggingface.co/{gated[0]}." if gated else "")
    cause = f"\n(underlying error: {str(error).splitlines()[0]})" if error is not None and str(error) else ""
    return (f"{len(specs)} model(s) not available: {names}. They are not in the Hugging Face cache "
            f"{constants.HF_HUB_CACHE} and {state}. Fetch them on a machine with access, then copy the cache here "
            f"(HF_HOME), or download to a directory (`--local-dir DIR`) and set the model's hf_id in "
            f"replication/configs/models.yaml to it.{gated_note}\n{commands}{cause}")


def _prepare_tokenizer(spec: ModelSpec, tokenizer: PreTrainedTokenizerBase) -> None:
    """Left padding (pad = EOS where there is no pad token, as nnsight does) and a check of the table's BOS fact."""
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    ids = tokenizer("a").input_ids
    adds_bos = tokenizer.bos_token_id is not None and ids[0] == tokenizer.bos_token_id
    if adds_bos != spec.adds_bos:
        raise ValueError(f"model {spec.key!r}: replication/configs/models.yaml says adds_bos: {spec.adds_bos}, but "
                         f"its tokenizer {'does' if adds_bos else 'does not'} prepend BOS; correct adds_bos there")
