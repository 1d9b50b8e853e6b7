"""Batched greedy generation with left padding, a KV cache and optional steering hooks.

Greedy decoding as in the original's `_generate_with_hooks` (methods_reference §1.5): argmax of the last position,
`max_new_tokens` steps, hooks active at every position of every step, completions decoded with
`skip_special_tokens=True`. The original recomputes the whole sequence at each step; the KV cache gives the same
tokens (steering is position-wise and cached keys/values came from steered activations), which
`tests/test_refusal_steering.py` checks. Position ids count real tokens only, so a left-padded prompt sees the
same positions as the unpadded one.
`greedy_generate_many` runs several steerings of the same prompts in one batch, each on its own block of rows.
Its prompt prefill computes the layers below the lowest steered block once for every steering that edits none of
them (`shared_prefill`: addition, subtraction and the unsteered baseline share them; ablation edits every block).
"""
from __future__ import annotations

import contextlib
import operator
from collections.abc import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from replication.mechanics.steering import Steering, steered
from replication.models import LAST_POSITION
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


class _Stop(Exception):
    """Ends a forward pass once a hook has what it needs."""


def first_steered_layer(steering: Steering | None, n_layers: int) -> int:
    """The lowest block a steering edits (n_layers: none)."""
    return n_layers if steering is None else min(steering.steered_layers(n_layers))


def _pass_through(hidden_states, *args, **kwargs):
    return hidden_states


@contextlib.contextmanager
def skipped(layers: Sequence[torch.nn.Module]) -> Iterator[None]:
    """The layers pass their input through for the duration (their forward replaced by an instance attribute;
    a forward already set on the instance, as nnsight and transformers set, is put back)."""
    saved = [layer.__dict__.get("forward") for layer in layers]
    for layer in layers:
        layer.forward = _pass_through
    try:
        yield
    finally:
        for layer, forward in zip(layers, saved):
            if forward is None:
                del layer.forward
            else:
                layer.forward = forward


def prefill(hf_model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
            steerings: Sequence[Steering | None], cache: DynamicCache) -> torch.Tensor:
    """Last-position logits of the prompt rows under each steering, the rows repeated once per steering through
    every block, filling `cache`."""
    mask = attention_mask.repeat(len(steerings), 1)
    with steered(hf_model, steerings):
        return hf_model(input_ids=input_ids.repeat(len(steerings), 1), attention_mask=mask,
                        position_ids=position_ids_from_mask(mask), cache=cache, use_cache=True,
                        logits_to_keep=LAST_POSITION).logits[:, -1]


@torch.inference_mode()
def shared_prefill(hf_model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   steerings: Sequence[Steering | None], cache: DynamicCache) -> torch.Tensor:
    """Last-position logits of the prompt rows `input_ids` under each steering (block i of the rows: steering i),
    filling `cache`: what `hf_model` on the rows repeated once per steering gives within steered(), computed so.

    Blocks below `shared`, the lowest block edited by a steering that leaves block 0 alone (addition and
    subtraction edit one block), are computed alike by every steering that edits none of them (those and the
    unsteered baseline), so once for all of them. Pass 1 runs the prompt rows through the blocks below `shared`,
    once for those steerings and once for each other one (ablation edits every block) under its hooks, and stops
    at the input of block `shared`. Pass 2 runs every steering's rows from those inputs through the blocks from
    `shared` on (`prefill` with the blocks below passing their input through). The cache takes pass 1's keys and
    values below `shared`, copied to every steering's rows."""
    n_rows, n_layers = len(input_ids), hf_model.config.num_hidden_layers
    first = [first_steered_layer(s, n_layers) for s in steerings]
    shared = min([f for f in first if f > 0] + [n_layers - 1])
    own = [i for i, f in enumerate(first) if f < shared]  # steerings that edit a block below `shared`
    if len(steerings) - len(own) < 2 or all(s is None for s in steerings):  # nothing to share
        return prefill(hf_model, input_ids, attention_mask, steerings, cache)
    layers = operator.attrgetter(next(s for s in steerings if s is not None).layers_path)(hf_model)
    lower = [None, *(steerings[i] for i in own)]  # pass 1's blocks: the shared one, then one per own steering
    block_of = [1 + own.index(i) if i in own else 0 for i in range(len(steerings))]
    rows = torch.cat([block * n_rows + torch.arange(n_rows, device=input_ids.device) for block in block_of])
    lower_mask = attention_mask.repeat(len(lower), 1)
    lower_cache = DynamicCache(config=hf_model.config)
    captured = []

    def stop(module, args):
        captured.append(args[0])
        raise _Stop

    handle = layers[shared].register_forward_pre_hook(stop, prepend=True)  # before any steering's resid_pre edit
    try:
        with steered(hf_model, lower):
            hf_model(input_ids=input_ids.repeat(len(lower), 1), attention_mask=lower_mask,
                     position_ids=position_ids_from_mask(lower_mask), cache=lower_cache, use_cache=True)
    except _Stop:
        pass
    finally:
        handle.remove()
    inputs = captured[0].index_select(0, rows)
    handle = layers[shared].register_forward_pre_hook(lambda module, args: (inputs, *args[1:]), prepend=True)
    try:
        with skipped(layers[:shared]):
            logits = prefill(hf_model, input_ids, attention_mask, steerings, cache)
    finally:
        handle.remove()
    lower_cache.reorder_cache(rows)
    cache.layers[:shared] = lower_cache.layers[:shared]
    return logits


@torch.inference_mode()
def greedy_tokens(hf_model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  steerings: Sequence[Steering | None], max_new_tokens: int, stop_ids: set[int] = frozenset(),
                  until: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """(len(steerings) x batch, steps) greedy continuation of a left-padded batch of prompts under each steering,
    block i of the rows under steering i; stops early once every row has produced one of `stop_ids` or, with
    `until` (the tokens so far [rows, steps] -> a bool per row: nothing more is needed of it), once every row is
    done (rows are independent, so the tokens of unfinished rows do not depend on when it stops)."""
    cache = DynamicCache(config=hf_model.config)
    next_token = shared_prefill(hf_model, input_ids, attention_mask, steerings, cache).argmax(-1)
    attention_mask = attention_mask.repeat(len(steerings), 1)
    position_ids = position_ids_from_mask(attention_mask)[:, -1:]
    stop = torch.tensor(sorted(stop_ids), dtype=torch.long, device=input_ids.device)
    new_tokens, finished = [next_token], torch.isin(next_token, stop)

    def all_done() -> bool:
        done = finished if stop_ids else torch.zeros_like(finished)
        return bool((done | until(torch.stack(new_tokens, dim=1)) if until else done).all())

    with steered(hf_model, steerings):
        while len(new_tokens) < max_new_tokens and not all_done():
            attention_mask = F.pad(attention_mask, (0, 1), value=1)
            position_ids = position_ids + 1
            next_token = hf_model(input_ids=next_token[:, None], attention_mask=attention_mask,
                                  position_ids=position_ids, cache=cache, use_cache=True,
                                  logits_to_keep=LAST_POSITION).logits[:, -1].argmax(-1)
            new_tokens.append(next_token)
            finished |= torch.isin(next_token, stop)
    return torch.stack(new_tokens, dim=1)


def truncate_at_stop(tokens: list[int], stop_ids: set[int]) -> list[int]:
    """The tokens before the first stop token."""
    for i, token in enumerate(tokens):
        if token in stop_ids:
            return tokens[:i]
    return tokens


def greedy_generate(model, prompts: list[str], *, max_new_tokens: int = 16, batch_size: int = 8,
                    steering: Steering | None = None, progress: bool = True, stop_at_eos: bool = True,
                    until: Callable[[str], bool] | None = None) -> list[str]:
    """Greedy completions of already-formatted prompts, in input order.

    `model` is a loaded model (nnsight LanguageModel with `.tokenizer`). Prompts are tokenised with the tokenizer's
    own special-token handling (BOS where it adds one), left-padded, and batched in order of length so that rows of
    a batch need little padding. `stop_at_eos=False` keeps generating after an end-of-sequence token, as the
    original does (its completions include the text decoded after EOS). `until(completion so far)` True: that row
    needs no more tokens; a batch stops once every row does (its completions are then shorter, as far as generated).
    """
    return greedy_generate_many(model, prompts, [steering], max_new_tokens=max_new_tokens, batch_size=batch_size,
                                progress=progress, stop_at_eos=stop_at_eos, until=until)[0]


def greedy_generate_many(model, prompts: list[str], steerings: Sequence[Steering | None], *,
                         max_new_tokens: int = 16, batch_size: int = 8, progress: bool = True,
                         stop_at_eos: bool = True, until: Callable[[str], bool] | None = None) -> list[list[str]]:
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

    def decode(row_tokens: list[int]) -> str:
        kept = truncate_at_stop(row_tokens, stop_ids) if stop_at_eos else row_tokens
        return tokenizer.decode(kept, skip_special_tokens=True)

    def rows_done(tokens: torch.Tensor) -> torch.Tensor:
        return torch.tensor([until(decode(row_tokens)) for row_tokens in tokens.tolist()], device=tokens.device)

    for start in progress_bar(range(0, len(prompts), batch_size), desc="generate", unit="batch", enabled=progress):
        rows = order[start:start + batch_size]
        batch = tokenizer.pad({"input_ids": [encoded[i] for i in rows]}, return_tensors="pt",
                              padding_side="left").to(device)
        tokens = greedy_tokens(hf_model, batch.input_ids, batch.attention_mask, steerings, max_new_tokens,
                               stop_ids if stop_at_eos else set(), rows_done if until else None)
        for block, block_tokens in zip(completions, tokens.split(len(rows))):
            for row, row_tokens in zip(rows, block_tokens.tolist()):
                block[row] = decode(row_tokens)
    return completions
