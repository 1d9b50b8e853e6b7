"""Batched greedy generation with left padding, a KV cache and optional steering hooks.

Greedy decoding as in the original's `_generate_with_hooks` (methods_reference §1.5): argmax of the last position,
`max_new_tokens` steps, hooks active at every position of every step, completions decoded with
`skip_special_tokens=True`. The original recomputes the whole sequence at each step; the KV cache gives the same
tokens (steering is position-wise and cached keys/values came from steered activations), which
`tests/test_refusal_steering.py` checks. Position ids count real tokens only, so a left-padded prompt sees the
same positions as the unpadded one.
`greedy_generate_many` runs several steerings of the same prompts in one batch, each on its own block of rows.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from replication.mechanics.steering import Steering, steered
from replication.progress import progress_bar


def hf_module(model) -> torch.nn.Module:
    """The Hugging Face model inside an nnsight LanguageModel (or the model itself)."""
    return getattr(model, "_module", model)


def eos_token_ids(model) -> set[int]:
    """Every id that ends a reply: the tokenizer's EOS and the generation config's (chat models list several)."""
    ids = {model.tokenizer.eos_token_id}
    configured = hf_module(model).generation_config.eos_token_id
    ids |= set(configured) if isinstance(configured, (list, tuple)) else {configured}
    return {i for i in ids if i is not None}


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """0, 1, 2, ... over the real tokens of each left-padded row (pads get 0)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


@torch.inference_mode()
def greedy_tokens(hf_model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  max_new_tokens: int, stop_ids: set[int] = frozenset()) -> torch.Tensor:
    """(batch, steps) greedy continuation of a left-padded batch; stops early once every row has produced one of
    `stop_ids` (rows are independent, so the tokens of unfinished rows do not depend on when it stops)."""
    cache = DynamicCache(config=hf_model.config)
    position_ids = position_ids_from_mask(attention_mask)
    step_ids = input_ids
    stop = torch.tensor(sorted(stop_ids), dtype=torch.long, device=input_ids.device)
    finished = torch.zeros(len(input_ids), dtype=torch.bool, device=input_ids.device)
    new_tokens = []
    for _ in range(max_new_tokens):
        logits = hf_model(input_ids=step_ids, attention_mask=attention_mask, position_ids=position_ids,
                          cache=cache, use_cache=True, logits_to_keep=1).logits[:, -1]
        next_token = logits.argmax(-1)
        new_tokens.append(next_token)
        finished |= torch.isin(next_token, stop)
        if stop_ids and bool(finished.all()):
            break
        step_ids = next_token[:, None]
        attention_mask = F.pad(attention_mask, (0, 1), value=1)
        position_ids = position_ids[:, -1:] + 1
    return torch.stack(new_tokens, dim=1)


def truncate_at_stop(tokens: list[int], stop_ids: set[int]) -> list[int]:
    """The tokens before the first stop token."""
    for i, token in enumerate(tokens):
        if token in stop_ids:
            return tokens[:i]
    return tokens


def greedy_generate(model, prompts: list[str], *, max_new_tokens: int = 16, batch_size: int = 8,
                    steering: Steering | None = None, progress: bool = True, stop_at_eos: bool = True) -> list[str]:
    """Greedy completions of already-formatted prompts, in input order.

    `model` is a loaded model (nnsight LanguageModel with `.tokenizer`). Prompts are tokenised with the tokenizer's
    own special-token handling (BOS where it adds one), left-padded, and batched in order of length so that rows of
    a batch need little padding. `stop_at_eos=False` keeps generating after an end-of-sequence token, as the
    original does (its completions include the text decoded after EOS).
    """
    return greedy_generate_many(model, prompts, [steering], max_new_tokens=max_new_tokens, batch_size=batch_size,
                                progress=progress, stop_at_eos=stop_at_eos)[0]


def greedy_generate_many(model, prompts: list[str], steerings: Sequence[Steering | None], *,
                         max_new_tokens: int = 16, batch_size: int = 8, progress: bool = True,
                         stop_at_eos: bool = True) -> list[list[str]]:
    """`greedy_generate` of the same prompts under each of `steerings` (None: unsteered), one list per steering.

    The conditions share each forward pass: a batch holds the same `batch_size` prompts (the same rows, the same
    left padding as `greedy_generate` gives them) once per steering, block i steered by steering i, so the
    weights are read once per step for every condition (on a CPU the 270M demo model's steps are bound by reading
    its weights) and the tokenisation is done once.
    """
    tokenizer, hf_model = model.tokenizer, hf_module(model)
    stop_ids = eos_token_ids(model)
    encoded = tokenizer(prompts).input_ids
    order = sorted(range(len(prompts)), key=lambda i: (len(encoded[i]), i))
    completions: list[list[str | None]] = [[None] * len(prompts) for _ in steerings]
    device = next(hf_model.parameters()).device
    with steered(hf_model, steerings):
        for start in progress_bar(range(0, len(prompts), batch_size), desc="generate", unit="batch", enabled=progress):
            rows = order[start:start + batch_size]
            batch = tokenizer.pad({"input_ids": [encoded[i] for i in rows]}, return_tensors="pt",
                                  padding_side="left").to(device)
            tokens = greedy_tokens(hf_model, batch.input_ids.repeat(len(steerings), 1),
                                   batch.attention_mask.repeat(len(steerings), 1), max_new_tokens,
                                   stop_ids if stop_at_eos else set())
            for block, block_tokens in zip(completions, tokens.split(len(rows))):
                for row, row_tokens in zip(rows, block_tokens.tolist()):
                    kept = truncate_at_stop(row_tokens, stop_ids) if stop_at_eos else row_tokens
                    block[row] = tokenizer.decode(kept, skip_special_tokens=True)
    return completions
