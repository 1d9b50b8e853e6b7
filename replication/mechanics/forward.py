"""Batched forward passes: left-padded batches of similar length, activations read at chosen positions, and the
P(' TRUE') / P(' FALSE') readout of the few-shot prompts (with optional residual-stream edits).

Positions count from the end of a prompt, so left padding keeps position -1 every row's last token; results go
back into the caller's order by index.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch.nn import functional
from transformers import DynamicCache

from data_prep.prompts import SUFFIX
from replication.mechanics.generation import hf_module
from replication.models import LAST_POSITION, position_ids_for
from replication.progress import progress_bar


def length_batches(tokenizer, texts: Sequence[str], batch_size: int) -> list[list[int]]:
    """Indices of `texts` in batches of similar token length (less padding); callers put results back by index."""
    lengths = [len(ids) for ids in tokenizer(list(texts)).input_ids]
    order = sorted(range(len(texts)), key=lengths.__getitem__)
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def encode(tokenizer, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and attention mask of a left-padded batch, with the tokenizer's special tokens (BOS)."""
    if tokenizer.padding_side != "left":
        raise ValueError("the tokenizer must pad on the left, so that position -1 is every row's last token")
    batch = tokenizer(list(texts), padding=True, return_tensors="pt")
    return batch.input_ids, batch.attention_mask


def last_token_activations(model, layers: Sequence, statements: Sequence[str], *, batch_size: int,
                           progress: bool = False) -> torch.Tensor:
    """[statement, layer, hidden] float32: the output of each decoder layer in `layers` at each statement's last
    token (generate_acts.py; no prompt, the statement alone)."""
    result = None
    batches = length_batches(model.tokenizer, statements, batch_size)
    for batch in progress_bar(batches, desc="activations", enabled=progress, leave=False):
        input_ids, attention_mask = encode(model.tokenizer, [statements[i] for i in batch])
        with torch.inference_mode(), model.trace(input_ids, attention_mask=attention_mask) as tracer:
            acts = torch.stack([layer.output[:, -1, :] for layer in layers], dim=1).save()
            tracer.stop()  # nothing after the last decoder layer is needed
        if result is None:
            result = torch.empty(len(statements), *acts.shape[1:])
        result[batch] = acts.float().cpu()
    return result


@torch.inference_mode()
def resid_pre_activations(model, texts: Sequence[str], positions: Sequence[int], *, batch_size: int,
                          progress: bool = False) -> torch.Tensor:
    """[prompt, block, position, hidden] in the model's dtype: the residual stream entering every decoder block
    (TransformerLens resid_pre = HF hidden_states[block]) at `positions` (negative: from the end of the prompt)."""
    hf_model = hf_module(model)
    device = next(hf_model.parameters()).device
    result = None
    for batch in progress_bar(length_batches(model.tokenizer, texts, batch_size), desc="activations", leave=False,
                      enabled=progress):
        input_ids, attention_mask = (t.to(device) for t in encode(model.tokenizer, [texts[i] for i in batch]))
        states = hf_model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=LAST_POSITION,
                          position_ids=position_ids_for(attention_mask), output_hidden_states=True).hidden_states
        # hidden_states[-1] is after the final norm, not the input of a block
        acts = torch.stack(states[:-1], dim=1)[:, :, list(positions)]
        if result is None:
            result = torch.empty(len(texts), *acts.shape[1:], dtype=acts.dtype)
        result[batch] = acts.cpu()
    return result


def suffix_token_ids(tokenizer) -> list[int]:
    """The tokens that " This statement is:" becomes after a statement's final '.' (the end of every prompt)."""
    period = tokenizer.encode(".", add_special_tokens=False)
    with_suffix = tokenizer.encode("." + SUFFIX, add_special_tokens=False)
    if with_suffix[:len(period)] != period:
        raise ValueError(f"the tokenizer merges the statement's '.' with {SUFFIX!r}; the edit positions are undefined")
    return with_suffix[len(period):]


def statement_end_positions(tokenizer) -> tuple[int, int]:
    """Positions (from the end of a prompt) of the statement's final token and the token before it.

    The original uses -len_suffix and -len_suffix - 1 with len_suffix = len(tokenizer.encode('This statement is:')),
    which counts BOS: for Llama-3 that is 5 = BOS + the 4 suffix tokens, i.e. exactly these positions. Counting the
    suffix tokens in context gives the same positions there and stays right for tokenizers where the suffix alone
    tokenises differently (e.g. 'This' vs ' This') or that add no BOS."""
    n_suffix = len(suffix_token_ids(tokenizer))
    return -n_suffix - 1, -n_suffix - 2


def answer_token_ids(tokenizer) -> tuple[int, int]:
    """As the original (interventions.py, patching): the last token of tokenizer(" TRUE") and of tokenizer(" FALSE")
    (on the SentencePiece tokenizers a lone "\u2581" precedes the word piece "\u2581TRUE")."""
    return tokenizer(" TRUE").input_ids[-1], tokenizer(" FALSE").input_ids[-1]


def true_false_probabilities(model, layers: Sequence, prompts: Sequence[str], *, batch_size: int,
                             edit_layers: Sequence[int] = (), shifts: torch.Tensor | None = None,
                             progress: bool = False, prefixes: SharedPrefixes | None = None) -> torch.Tensor:
    """[prompt, 2] float32: P(' TRUE') and P(' FALSE') at each prompt's last position (softmax over the vocabulary).

    With `shifts` ([prompt, hidden]), row i is added to the output of each decoder layer in `edit_layers` at the
    statement's final token and the one before (interventions.py), before later layers read it. The prompts' shared
    few-shot tokens run once (`prefixes`, built here unless given: `edit_prefixes` builds one to reuse)."""
    tokenizer = model.tokenizer
    answer_ids = list(answer_token_ids(tokenizer))
    suffix = torch.tensor(suffix_token_ids(tokenizer))
    positions = statement_end_positions(tokenizer)
    prefixes = prefixes or edit_prefixes(model, prompts, batch_size=batch_size)
    if prefixes.keep < -min(positions):
        raise ValueError(f"the shared prefixes leave each prompt {prefixes.keep} tokens of its own; the edits need "
                         f"{-min(positions)}: build them with edit_prefixes")
    if not all(torch.equal(ids[-len(suffix):], suffix) for ids in prefixes.ids):
        raise ValueError(f"a prompt does not end in the tokens of {SUFFIX!r}; the edit positions would be wrong")
    probabilities = torch.empty(len(prompts), 2)
    for batch in progress_bar(prefixes.batches(batch_size), desc="prompts", enabled=progress, leave=False):
        with torch.inference_mode(), model.trace(batch.input_ids, **batch.inputs, logits_to_keep=LAST_POSITION):
            if shifts is not None:
                for index in edit_layers:
                    hidden = layers[index].output
                    shift = shifts[batch.indices].to(hidden.device)  # float32: added, then rounded to the model dtype
                    for position in positions:
                        hidden[:, position, :] += shift
            logits = model.output.logits[:, -1, :].save()
        probabilities[batch.indices] = logits.float().softmax(dim=-1)[:, answer_ids].cpu()
    return probabilities


def edit_prefixes(model, prompts: Sequence[str], *, batch_size: int, share: bool = True) -> SharedPrefixes:
    """The shared prefixes of TRUE/FALSE prompts for `true_false_probabilities`: every prompt keeps its statement's
    last two tokens and the suffix as its own tokens (the edits land there)."""
    return SharedPrefixes(model, prompts, keep=-min(statement_end_positions(model.tokenizer)),
                          batch_size=batch_size, share=share)


# ---------------------------------------------------------------------------------------------------------------
# Shared prefixes: prompts that begin with the same tokens (the few-shot lines) run those tokens once


# A group's own cost in tokens: its prefix is one more batch row, its cache is copied into every row's batch.
# Fewer shared tokens than this (a BOS, a first word) are not worth a group.
GROUP_COST_TOKENS = 8


@dataclass(frozen=True)
class PrefixBatch:
    """One batched forward of prompts whose first tokens come from cached prefix runs: the trace's inputs."""
    indices: list[int]  # the prompts' indices, in batch order
    input_ids: torch.Tensor  # [rows, S]: each row's last S tokens (left-padded where a prompt is shorter)
    inputs: dict  # attention_mask, position_ids and (where any row reads one) the cache of the tokens before


def shared_prefix_groups(ids: Sequence[Sequence[int]], keep: int) -> list[list[int]]:
    """Prompts (token ids) in groups whose shared first tokens are worth running once; singletons share none.

    Groups are runs of the prompts sorted by their tokens (a run's shared prefix is the smallest common prefix of
    neighbours); the split maximises the tokens saved, sum over groups of (size - 1) x shared prefix length -
    GROUP_COST_TOKENS, where each row keeps at least `keep` tokens of its own after the prefix (dynamic programming
    over the runs, O(prompts^2) at worst)."""
    order = sorted(range(len(ids)), key=lambda i: list(ids[i]))
    caps = [len(ids[i]) - keep for i in order]
    neighbours = [common_prefix_length(ids[a], ids[b]) for a, b in zip(order, order[1:])]
    best, start = [0] * (len(order) + 1), [0] * (len(order) + 1)
    for end in range(1, len(order) + 1):
        best[end], start[end] = best[end - 1], end - 1  # the last prompt alone
        shared = caps[end - 1]
        for first in range(end - 2, -1, -1):
            shared = min(shared, neighbours[first], caps[first])
            if shared <= 0:
                break
            saved = best[first] + (end - first - 1) * shared - GROUP_COST_TOKENS
            if saved > best[end]:
                best[end], start[end] = saved, first
    groups, end = [], len(order)
    while end > 0:
        groups.append([order[i] for i in range(start[end], end)])
        end = start[end]
    return groups[::-1]


def common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class SharedPrefixes:
    """Prompts whose shared first tokens run once: per group of prompts (`shared_prefix_groups`), one forward of
    the tokens they share keeps its keys and values; each prompt's remaining tokens then run against them, in
    batches (`batches`). Build it once per model and prompt list and reuse it for every pass over those prompts
    (truthfulness runs each prompt once plain and once per edit).

    A batch row holds the prompt's last S tokens (S: the batch's longest unshared tail) after the cached keys and
    values of its earlier tokens, left-padded so that padding stays at the very start of each row: position -1
    is every row's last token, and distances between real tokens (sliding windows) are those of the prompt alone.
    The tokens are exactly the prompt's own (a split falls on a common prefix of the group's token ids), and the
    model's own forward does the rest through nnsight (rotary positions from explicit position ids, masks and
    soft-capping as in a plain forward); results equal the plain left-padded path within float rounding.
    `share=False` gives the plain path: no prefix runs, batches of whole prompts."""

    def __init__(self, model, prompts: Sequence[str], *, keep: int = 1, batch_size: int, share: bool = True):
        tokenizer = model.tokenizer
        if tokenizer.padding_side != "left":
            raise ValueError("the tokenizer must pad on the left, so that position -1 is every row's last token")
        self.model, self.pad_id, self.keep = model, tokenizer.pad_token_id, keep
        self.ids = [torch.tensor(row) for row in tokenizer(list(prompts)).input_ids]
        groups = shared_prefix_groups(self.ids, keep) if share else [[i] for i in range(len(self.ids))]
        shared: list[torch.Tensor] = []  # the token ids of each shared prefix
        self.group_of, self.shared_length = [-1] * len(prompts), [0] * len(prompts)
        for group in groups:
            if len(group) > 1:
                length = min(min(len(self.ids[i]) - keep for i in group),
                             min(common_prefix_length(self.ids[group[0]], self.ids[i]) for i in group))
                for i in group:
                    self.group_of[i], self.shared_length[i] = len(shared), length
                shared.append(self.ids[group[0]][:length])
        self.prefix_keys_values = self._prefix_runs(shared, batch_size)

    @torch.inference_mode()
    def _prefix_runs(self, prefixes: list[torch.Tensor], batch_size: int) -> list[list[tuple]]:
        """Per prefix, per layer: (K, V) [1, kv_heads, length, head_dim] of its tokens."""
        result = [None] * len(prefixes)
        for start in range(0, len(prefixes), batch_size):
            rows = prefixes[start:start + batch_size]
            width = max(len(row) for row in rows)
            input_ids = torch.stack([functional.pad(row, (width - len(row), 0), value=self.pad_id) for row in rows])
            mask = torch.stack([functional.pad(torch.ones_like(row), (width - len(row), 0)) for row in rows])
            cache = DynamicCache()  # no config: plain layers that keep every position, whatever the sliding windows
            with self.model.trace(input_ids.to(self.device), attention_mask=mask.to(self.device),
                                  position_ids=position_ids_for(mask).to(self.device), cache=cache, use_cache=True,
                                  logits_to_keep=LAST_POSITION):
                pass
            for j, row in enumerate(rows):
                result[start + j] = [(layer.keys[j:j + 1, :, width - len(row):],
                                      layer.values[j:j + 1, :, width - len(row):]) for layer in cache.layers]
        return result

    @property
    def device(self) -> torch.device:
        return next(hf_module(self.model).parameters()).device

    def batches(self, batch_size: int) -> Iterator[PrefixBatch]:
        """Batches of at most `batch_size` prompts with similar unshared tails (the tokens each row must run), built
        one at a time (a batch's cache copies its rows' prefixes: only one is held at once)."""
        tails = [len(row) - shared for row, shared in zip(self.ids, self.shared_length)]
        order = sorted(range(len(self.ids)), key=lambda i: (tails[i], len(self.ids[i])))
        return (self._batch(order[i:i + batch_size]) for i in range(0, len(order), batch_size))

    def _batch(self, indices: list[int]) -> PrefixBatch:
        width = max(len(self.ids[i]) - self.shared_length[i] for i in indices)  # S
        own = [min(width, len(self.ids[i])) for i in indices]  # tokens each row runs
        cached = [len(self.ids[i]) - n for i, n in zip(indices, own)]  # tokens each row reads from its prefix run
        past = max(cached)
        input_ids = torch.stack([functional.pad(self.ids[i][-n:], (width - n, 0), value=self.pad_id)
                                 for i, n in zip(indices, own)])
        mask = torch.stack([functional.pad(torch.ones(len(self.ids[i]), dtype=torch.long),
                                           (past + width - len(self.ids[i]), 0)) for i in indices])
        device = self.device
        inputs = {"attention_mask": mask.to(device), "position_ids": position_ids_for(mask)[:, past:].to(device)}
        if past > 0:
            inputs.update(cache=self._cache(indices, cached, past), use_cache=True)
        return PrefixBatch(indices, input_ids.to(device), inputs)

    def _cache(self, indices: list[int], cached: list[int], past: int) -> DynamicCache:
        """The batch's cache: per row the keys and values of its first `cached` tokens, left-padded to `past`."""
        runs = [self.prefix_keys_values[self.group_of[i]] if n else None for i, n in zip(indices, cached)]
        reference = next(run for run in runs if run is not None)

        def rows(layer: int, part: int) -> torch.Tensor:
            return torch.cat([functional.pad((run or reference)[layer][part][:, :, :n], (0, 0, past - n, 0))
                              for run, n in zip(runs, cached)])

        return DynamicCache(ddp_cache_data=[(rows(layer, 0), rows(layer, 1)) for layer in range(len(reference))])
