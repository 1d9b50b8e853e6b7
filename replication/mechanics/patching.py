"""Activation patching between a TRUE and a FALSE prompt (methods_reference §1.3, §4.1).

The patch effect at (layer l, position p) is logit(' TRUE') - logit(' FALSE') at the last position of the FALSE
prompt's run when the residual stream at (l, p) (the output of decoder layer l) is replaced by the TRUE prompt's.
TRUE states may come from another model (cross-model patching); positions are the last `n_toks` tokens (statement
and " This statement is:"), never the few-shot prefix that both prompts share.

Two implementations of the same numbers, tested equal on every tiny architecture (tests/test_knowledge_patching.py):

* `reference_patch_effects`: the original loop, one nnsight trace of the whole FALSE prompt per (layer, position).
* `patch_effects`: minimal recomputation. A patch at (l, p) changes nothing before position p and nothing at layers
  up to l, so for each position p one batched forward runs only the tokens from p on, attending to the FALSE run's
  cached keys/values for the tokens before p; the layers up to a group's first patched layer are skipped (their
  output is the FALSE run's); the LM head computes only the two answer logits. A batch holds several pairs (of equal
  token counts), from one or more source models (`patch_true_runs`), times the patched layers of one group.

Everything goes through nnsight (reading and writing layer outputs, skipping modules); the model's own forward
does the rest, so architecture details (rotary embeddings, sliding windows, logit soft-capping) need no code here.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch.nn import functional
from transformers import DynamicCache

from replication.mechanics.forward import answer_token_ids
from replication.models import decoder_layers, module_at


@dataclass(frozen=True)
class PatchModel:
    """An nnsight model with what patching needs: its decoder layers, its LM head and the two answer tokens."""
    lm: object  # nnsight LanguageModel
    layers: list  # envoys of the decoder layers
    head: object  # envoy of the LM head (the unembedding)
    answer_ids: tuple[int, int]  # token ids of ' TRUE' and ' FALSE'

    @classmethod
    def from_spec(cls, lm, spec) -> PatchModel:
        """From a loaded model and its model-table spec (layers_path, unembed_path)."""
        return cls(lm, decoder_layers(lm, spec), module_at(lm, spec.unembed_path), answer_token_ids(lm.tokenizer))

    @property
    def device(self) -> torch.device:
        return self.head._module.weight.device

    def answer_unembedding(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The LM head's weight rows (and bias entries) of the TRUE and FALSE tokens."""
        module = self.head._module
        ids = list(self.answer_ids)
        return module.weight[ids], None if module.bias is None else module.bias[ids]


def answer_logits_only(model: PatchModel) -> None:
    """Inside a trace: the LM head computes only the TRUE and FALSE logits, columns 0 and 1 of the output (the rest
    of the vocabulary is never read)."""
    weight, bias = model.answer_unembedding()
    model.head.skip(functional.linear(model.head.input, weight, bias))


def logit_difference(logits: torch.Tensor, answer_ids: tuple[int, int]) -> torch.Tensor:
    """logit(TRUE) - logit(FALSE) at the last position, per batch row, subtracted in float32."""
    last = logits[:, -1].float()
    return last[:, answer_ids[0]] - last[:, answer_ids[1]]


@dataclass(frozen=True)
class Run:
    """An unpatched run of a batch of prompts."""
    states: torch.Tensor  # residual stream at the last n_toks positions: [layers, batch, n_toks, hidden]
    keys_values: list  # per layer (K, V) of every position: [batch, kv_heads, T, head_dim] each
    logit_diff: torch.Tensor  # [batch]


def unpatched_run(model: PatchModel, ids: torch.Tensor, n_toks: int) -> Run:
    """Run prompts of equal length (ids [batch, T]) keeping the residual stream and the keys and values."""
    cache = DynamicCache()  # no config: plain layers that keep every position, whatever the model's sliding windows
    states = []
    with torch.inference_mode(), model.lm.trace(ids, attention_mask=torch.ones_like(ids), cache=cache, use_cache=True,
                                                logits_to_keep=1):
        for layer in model.layers:
            states.append(layer.output[:, -n_toks:].save())
        answer_logits_only(model)
        logits = model.lm.output.logits.save()
    keys_values = [(cached.keys, cached.values) for cached in cache.layers]
    return Run(torch.stack(states), keys_values, logit_difference(logits, (0, 1)))


# ---- reference: the original loop ------------------------------------------------------------------------------

def patched_logit_difference(model: PatchModel, false_ids: torch.Tensor, layer: int, positions: list[int],
                             states: torch.Tensor) -> float:
    """One forward of the whole FALSE prompt (ids [1, T]) with layer `layer`'s output at `positions` replaced by
    `states` ([len(positions), hidden]); the logit difference at the last position."""
    with torch.inference_mode(), model.lm.trace(false_ids):
        model.layers[layer].output[0, positions] = states
        logits = model.lm.output.logits.save()
    return logit_difference(logits, model.answer_ids).item()


def reference_patch_effects(source: PatchModel, target: PatchModel, true_ids: torch.Tensor,
                            false_ids: torch.Tensor, n_toks: int) -> torch.Tensor:
    """Patch effects of one pair (ids [T] each), as the original computes them: [layers, n_toks]."""
    length = false_ids.shape[-1]
    true_states = unpatched_run(source, true_ids[None].to(source.device), n_toks).states[:, 0].to(target.device)
    false_ids = false_ids.to(target.device)
    effects = torch.empty(len(target.layers), n_toks)
    for p in range(n_toks):
        for layer in range(len(target.layers)):
            effects[layer, p] = patched_logit_difference(target, false_ids[None], layer, [length - n_toks + p],
                                                         true_states[layer, p:p + 1])
    return effects


# ---- fast: minimal recomputation, batched ----------------------------------------------------------------------

def layer_groups(n_layers: int, group_size: int) -> list[range]:
    """Contiguous groups of patched layers, one batched forward each: smaller groups waste fewer layers (a group
    runs every layer above its first), larger ones make larger batches."""
    return [range(a, min(a + group_size, n_layers)) for a in range(0, n_layers, group_size)]


def patched_suffix_run(model: PatchModel, suffix_ids: torch.Tensor, prefix_keys_values: list,
                       false_states: torch.Tensor, true_states: torch.Tensor, group: range) -> torch.Tensor:
    """Patch effects at the first suffix position for every layer of `group`: [pairs, len(group)].

    suffix_ids [pairs, m]: the FALSE tokens from the patched position on; prefix_keys_values: per layer the FALSE
    run's (K, V) of the tokens before it; false_states [layers, pairs, m, hidden]: the FALSE run's residual stream
    at these tokens; true_states [layers, pairs, hidden]: the TRUE states at the patched position.
    Batch row i * len(group) + j is pair i patched at layer group[j].
    """
    size, first = len(group), group[0]

    def rows(x):
        return x.repeat_interleave(size, dim=0)

    cache = DynamicCache(ddp_cache_data=[(rows(k), rows(v)) for k, v in prefix_keys_values])
    # Layers up to `first` are skipped: the FALSE run's output of layer `first`, patched in the rows of `first`.
    # Skipped layers before it are handed the same tensor, never read: a skipped layer ignores its input.
    start = rows(false_states[first]).clone()
    start[0::size, 0] = true_states[first]
    ids = rows(suffix_ids)
    # The mask must cover the cached tokens too: given none beside a cache, nnsight makes one of the input's
    # length, which the model misreads.
    mask = torch.ones(ids.shape[0], cache.get_seq_length() + ids.shape[1], dtype=torch.long, device=ids.device)
    with torch.inference_mode(), model.lm.trace(ids, attention_mask=mask, cache=cache, use_cache=True,
                                                logits_to_keep=1):
        for layer in model.layers[:first + 1]:
            layer.skip(start)
        for j in range(1, size):
            model.layers[first + j].output[j::size, 0] = true_states[first + j]
        answer_logits_only(model)
        logits = model.lm.output.logits.save()
    return logit_difference(logits, (0, 1)).view(-1, size)


@dataclass(frozen=True)
class TrueRun:
    """What patching needs of the source model: its unpatched TRUE run of a batch of pairs."""
    states: torch.Tensor  # residual stream at the last n_toks positions: [layers, pairs, n_toks, hidden]
    logit_diff: torch.Tensor  # [pairs]

    def to(self, device) -> TrueRun:
        return TrueRun(self.states.to(device), self.logit_diff.to(device))

    def pairs(self, selected: slice) -> TrueRun:
        return TrueRun(self.states[:, selected], self.logit_diff[selected])


def true_run(source: PatchModel, true_ids: torch.Tensor, n_toks: int) -> TrueRun:
    """The source model's TRUE run of a batch (ids [pairs, T]). Computed apart from the patching, it lets a
    cross-model map hold one model at a time: the source's runs first, then the target's patches."""
    run = unpatched_run(source, true_ids.to(source.device), n_toks)
    return TrueRun(run.states, run.logit_diff)


@dataclass(frozen=True)
class PatchEffects:
    effects: torch.Tensor  # [pairs, layers, n_toks]
    true_logit_diff: torch.Tensor  # unpatched TRUE run of the source model [pairs]
    false_logit_diff: torch.Tensor  # unpatched FALSE run of the target model [pairs]


def patch_effects(source: PatchModel, target: PatchModel, true_ids: torch.Tensor, false_ids: torch.Tensor,
                  n_toks: int, layers_per_batch: int | None = None) -> PatchEffects:
    """Patch effects of a batch of pairs with equal token counts (ids [pairs, T]); a batched forward holds the
    pairs times `layers_per_batch` patched layers (None: all layers)."""
    return patch_true_runs([true_run(source, true_ids, n_toks)], target, false_ids, n_toks, layers_per_batch)[0]


def patch_true_runs(trues: Sequence[TrueRun], target: PatchModel, false_ids: torch.Tensor, n_toks: int,
                    layers_per_batch: int | None = None) -> list[PatchEffects]:
    """`patch_effects` of the TRUE runs (`true_run`) of one or more source models, computed beforehand, into the
    same FALSE prompts: one unpatched FALSE run, and every patched forward holds the rows of all sources (a
    model's own map and a cross-model map into it share their forwards). One PatchEffects per source."""
    prefix = false_ids.shape[1] - n_toks
    false_ids = false_ids.to(target.device)
    false_run = unpatched_run(target, false_ids, n_toks)
    n_pairs, n_layers = false_ids.shape[0], len(target.layers)
    true_states = torch.cat([true.states.to(target.device) for true in trues], dim=1)  # rows: source-major
    pair_of_row = torch.arange(n_pairs, device=target.device).repeat(len(trues))
    # A row whose TRUE state equals the FALSE one bit for bit at a position (own model, tokens before the first that
    # differs) is not patched there: the patch is a no-op, the effect the unpatched FALSE run's.
    effects = false_run.logit_diff[pair_of_row, None, None].repeat(1, n_layers, n_toks)
    for p in range(n_toks):
        differs = (true_states[:, :, p] != false_run.states[:, pair_of_row, p]).any(dim=2).any(dim=0)  # [rows]
        patched = torch.nonzero(differs).squeeze(1)
        if len(patched) == 0:
            continue
        pairs = pair_of_row[patched]
        before = [(k[pairs, :, :prefix + p], v[pairs, :, :prefix + p]) for k, v in false_run.keys_values]
        for group in layer_groups(n_layers, layers_per_batch or n_layers):
            effects[patched[:, None], torch.tensor(list(group), device=target.device), p] = patched_suffix_run(
                target, false_ids[pairs, prefix + p:], before, false_run.states[:, pairs, p:],
                true_states[:, patched, p], group)
    return [PatchEffects(rows, true.logit_diff, false_run.logit_diff)
            for rows, true in zip(effects.split(n_pairs), trues, strict=True)]
