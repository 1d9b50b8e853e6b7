"""Batched forward passes: left-padded batches of similar length, activations read at chosen positions, and the
P(' TRUE') / P(' FALSE') readout of the few-shot prompts (with optional residual-stream edits).

Positions count from the end of a prompt, so left padding keeps position -1 every row's last token; results go
back into the caller's order by index.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from data_prep.prompts import SUFFIX
from replication.mechanics.generation import hf_module
from replication.models import position_ids_for
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
        states = hf_model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=1,
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
                             progress: bool = False) -> torch.Tensor:
    """[prompt, 2] float32: P(' TRUE') and P(' FALSE') at each prompt's last position (softmax over the vocabulary).

    With `shifts` ([prompt, hidden]), row i is added to the output of each decoder layer in `edit_layers` at the
    statement's final token and the one before (interventions.py), before later layers read it."""
    tokenizer = model.tokenizer
    answer_ids = list(answer_token_ids(tokenizer))
    suffix = torch.tensor(suffix_token_ids(tokenizer))
    positions = statement_end_positions(tokenizer)
    probabilities = torch.empty(len(prompts), 2)
    for batch in progress_bar(length_batches(tokenizer, prompts, batch_size), desc="prompts", enabled=progress,
                      leave=False):
        input_ids, attention_mask = encode(tokenizer, [prompts[i] for i in batch])
        if not (input_ids[:, -len(suffix):] == suffix).all():
            raise ValueError(f"a prompt does not end in the tokens of {SUFFIX!r}; the edit positions would be wrong")
        with torch.inference_mode(), model.trace(input_ids, attention_mask=attention_mask, logits_to_keep=1):
            if shifts is not None:
                for index in edit_layers:
                    hidden = layers[index].output
                    shift = shifts[batch].to(hidden.device)  # float32: added, then rounded to the model dtype
                    for position in positions:
                        hidden[:, position, :] += shift
            logits = model.output.logits[:, -1, :].save()
        probabilities[batch] = logits.float().softmax(dim=-1)[:, answer_ids].cpu()
    return probabilities
