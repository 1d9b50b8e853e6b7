"""Refusal-direction steering with TransformerLens hook semantics, as plain PyTorch hooks on a Hugging Face model.

The original (methods_reference §1.5) hooks TransformerLens' `resid_pre`, `resid_mid` and `resid_post` of a block:

    resid_mid  = resid_pre + attn_out          (attn_out: what the attention sub-block adds to the residual)
    resid_post = resid_mid + mlp_out

and edits each of the three values in place, at every position (prompt and generated tokens). Hugging Face decoder
layers compute the residual sums inline, so the three points are reached as:

* resid_pre:  a forward pre-hook on the decoder layer edits its input;
* resid_mid:  a forward hook on the module whose output is added to the residual after attention (`attn_out_path`
  in the model table: `self_attn` for Llama/Mistral/Qwen2, `post_attention_layernorm` for Gemma3) applies the same
  edit to that output. For addition, adding c*r to a summand adds c*r to the sum. For ablation the edit is a linear
  projection P, and resid_pre was already projected, so resid_pre + P(attn_out) = P(resid_pre + attn_out);
* resid_post: a forward hook on the decoder layer edits its output (a tensor in transformers >= 5).

`tests/test_refusal_steering.py` checks this against a hand-written decoder forward with explicit resid_pre/mid/post.
"""
from __future__ import annotations

import contextlib
import operator
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial

import torch

INTERVENTIONS = ("addition", "subtraction", "ablation")


def add_direction(activation: torch.Tensor, direction: torch.Tensor, coef: float) -> torch.Tensor:
    """TransformerLens `act_add_hook` (coef > 0) and `subtract_hook` (coef < 0): activation + coef * direction."""
    return activation + coef * direction.to(activation)  # the activation's dtype and device


def ablate_direction(activation: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
    """TransformerLens `direction_ablation_hook`: remove the component along the (re-normalised) direction."""
    unit = (direction / (direction.norm() + 1e-8)).to(activation)
    return activation - (activation @ unit)[..., None] * unit


@dataclass(frozen=True)
class Steering:
    """One intervention on a model: `layer` is the TransformerLens block whose resid_pre/mid/post are edited for
    addition and subtraction (by `coef` times the unit `direction`); ablation edits every block and ignores both."""
    intervention: str
    direction: torch.Tensor  # (hidden,), unit norm
    layer: int
    coef: float
    layers_path: str  # model-table paths: the decoder-layer list, from the top model
    attn_out_path: str  # the module (relative to a layer) whose output is added to the residual after attention

    def __post_init__(self):
        if self.intervention not in INTERVENTIONS:
            raise ValueError(f"unknown intervention {self.intervention!r}; allowed: {', '.join(INTERVENTIONS)}")

    def edit(self) -> Callable[[torch.Tensor], torch.Tensor]:
        if self.intervention == "ablation":
            return partial(ablate_direction, direction=self.direction)
        sign = 1.0 if self.intervention == "addition" else -1.0
        return partial(add_direction, direction=self.direction, coef=sign * self.coef)

    def steered_layers(self, n_layers: int) -> list[int]:
        return list(range(n_layers)) if self.intervention == "ablation" else [self.layer]


def _edit_first(edit, output):
    """Attention modules return (output, weights); norms return a tensor."""
    return (edit(output[0]), *output[1:]) if isinstance(output, tuple) else edit(output)


def _edit_blocks(edits: list, activation: torch.Tensor) -> torch.Tensor:
    """Apply edits[i] to the i-th of len(edits) equal blocks of rows (None: leave the block as it is)."""
    if len(edits) == 1:
        return edits[0](activation)
    blocks = activation.split(len(activation) // len(edits))
    return torch.cat([block if edit is None else edit(block) for edit, block in zip(edits, blocks, strict=True)])


@contextlib.contextmanager
def steered(hf_model: torch.nn.Module, steering: Steering | None | Sequence[Steering | None]) -> Iterator[None]:
    """Register the resid_pre / resid_mid / resid_post hooks of `steering` for the duration of the block.

    A sequence of steerings (None: unsteered) edits a batch made of len(steerings) equal blocks of rows, block i
    by steering i (`generation.greedy_generate_many` stacks conditions so). Each block's edit is the single
    steering's edit applied to that block alone. Hooks go only on blocks that some steering edits, so an unsteered
    model runs without any."""
    steerings = [steering] if steering is None or isinstance(steering, Steering) else list(steering)
    active = [s for s in steerings if s is not None]
    if not active:
        yield
        return
    if len({(s.layers_path, s.attn_out_path) for s in active}) > 1:
        raise ValueError("the steerings of one batch must name the same layers_path and attn_out_path")
    layers = operator.attrgetter(active[0].layers_path)(hf_model)
    n_layers = len(layers)
    handles = []
    try:
        for index in sorted({i for s in active for i in s.steered_layers(n_layers)}):
            edits = [s.edit() if s is not None and index in s.steered_layers(n_layers) else None for s in steerings]
            edit = partial(_edit_blocks, edits)
            layer = layers[index]
            attn_out = operator.attrgetter(active[0].attn_out_path)(layer)
            handles += [
                layer.register_forward_pre_hook(lambda module, args, edit=edit: (edit(args[0]), *args[1:])),
                attn_out.register_forward_hook(lambda module, args, output, edit=edit: _edit_first(edit, output)),
                layer.register_forward_hook(lambda module, args, output, edit=edit: edit(output)),
            ]
        yield
    finally:
        for handle in handles:
            handle.remove()
