"""Steering hooks and batched greedy generation against plain-PyTorch references with TransformerLens semantics.

The reference runs one unpadded prompt through a hand-written decoder forward that computes resid_pre, resid_mid
and resid_post explicitly and edits each (TransformerLens `hook_resid_pre/mid/post`), and generates greedily by
recomputing the whole sequence at every step, as the original `_generate_with_hooks` does.
"""
import pytest
import torch
from nnsight import LanguageModel

from replication.mechanics.generation import greedy_generate, greedy_generate_many, truncate_at_stop
from replication.mechanics.steering import INTERVENTIONS, Steering, ablate_direction, add_direction, steered
from replication.models.tiny import build_model, build_tokenizer

# Where each tiny architecture adds the attention output to the residual (the model table's attn_out_path).
ATTN_OUT = {"llama": "self_attn", "mistral": "self_attn", "qwen2": "self_attn", "gemma3": "post_attention_layernorm"}
PROMPTS = ["User: Tell me how to build a bomb.\nAssistant:", "User: Write a poem about the sea.\nAssistant:",
           "User: hi\nAssistant:", "User: Give me a recipe for bread and a story about a dog.\nAssistant:"]


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def tl_edit(steering: Steering | None, n_layers: int):
    """edit(point, layer, activation): the TransformerLens hooks of `steering` at resid_pre/mid/post."""
    def edit(point, layer, activation):
        if steering is None or layer not in steering.steered_layers(n_layers):
            return activation
        if steering.intervention == "ablation":
            return ablate_direction(activation, steering.direction)
        sign = 1.0 if steering.intervention == "addition" else -1.0
        return add_direction(activation, steering.direction, sign * steering.coef)
    return edit


@torch.no_grad()
def reference_logits(hf_model, input_ids: torch.Tensor, steering: Steering | None) -> torch.Tensor:
    """Logits of one unpadded sequence (1, seq) from an explicit resid_pre -> resid_mid -> resid_post forward."""
    base, config = hf_model.model, hf_model.config
    edit = tl_edit(steering, len(base.layers))
    seq = input_ids.shape[1]
    position_ids = torch.arange(seq)[None]
    distance = torch.arange(seq)[:, None] - torch.arange(seq)[None, :]  # query index - key index
    residual = base.embed_tokens(input_ids)
    for index, layer in enumerate(base.layers):
        gemma = hasattr(layer, "pre_feedforward_layernorm")  # Gemma3 norms the sub-block outputs too
        layer_type = (getattr(config, "layer_types", None) or ["full_attention"] * len(base.layers))[index]
        window = config.sliding_window if layer_type == "sliding_attention" else seq
        visible = (distance >= 0) & (distance < window)
        mask = torch.zeros(seq, seq).masked_fill(~visible, float("-inf"))[None, None]
        rotary = base.rotary_emb(residual, position_ids, layer_type) if gemma \
            else base.rotary_emb(residual, position_ids)
        resid_pre = edit("resid_pre", index, residual)
        attn_out, _ = layer.self_attn(layer.input_layernorm(resid_pre), position_embeddings=rotary,
                                      attention_mask=mask, position_ids=position_ids)
        if gemma:
            attn_out = layer.post_attention_layernorm(attn_out)
        resid_mid = edit("resid_mid", index, resid_pre + attn_out)
        if gemma:
            mlp_out = layer.post_feedforward_layernorm(layer.mlp(layer.pre_feedforward_layernorm(resid_mid)))
        else:
            mlp_out = layer.mlp(layer.post_attention_layernorm(resid_mid))
        residual = edit("resid_post", index, resid_mid + mlp_out)
    return hf_model.lm_head(base.norm(residual))


def reference_generate(hf_model, tokenizer, prompt: str, steering: Steering | None, max_new_tokens: int) -> str:
    """The original's loop: no cache, recompute the whole sequence, append the argmax; decode skipping specials."""
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    for _ in range(max_new_tokens):
        next_token = reference_logits(hf_model, ids, steering)[0, -1].argmax()
        ids = torch.cat([ids, next_token.view(1, 1)], dim=1)
    return tokenizer.decode(ids[0, -max_new_tokens:], skip_special_tokens=True)


def make_steering(hf_model, arch: str, intervention: str, seed: int = 0, strength: float = 4.0) -> Steering:
    """A random unit direction; coef scaled to the residual norm so the intervention changes the outputs."""
    generator = torch.Generator().manual_seed(seed)
    direction = torch.randn(hf_model.config.hidden_size, generator=generator)
    scale = hf_model.model.embed_tokens.weight.norm(dim=-1).mean().item()
    return Steering(intervention, direction / direction.norm(), layer=1, coef=strength * scale,
                    layers_path="model.layers", attn_out_path=ATTN_OUT[arch])


@pytest.mark.parametrize("arch", sorted(ATTN_OUT))
@pytest.mark.parametrize("intervention", INTERVENTIONS)
def test_hooks_equal_transformerlens_resid_pre_mid_post(tokenizer, arch, intervention):
    hf_model = build_model(arch, seed=1, tokenizer=tokenizer)
    steering = make_steering(hf_model, arch, intervention)
    ids = tokenizer(PROMPTS[0], return_tensors="pt").input_ids
    with torch.no_grad():
        plain = hf_model(ids).logits
    with torch.no_grad(), steered(hf_model, steering):
        hooked = hf_model(ids).logits
    expected = reference_logits(hf_model, ids, steering)
    torch.testing.assert_close(reference_logits(hf_model, ids, None), plain, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(hooked, expected, atol=1e-5, rtol=1e-5)
    assert (hooked - plain).abs().max() > 1e-2  # the intervention does change the model
    with torch.no_grad():  # and the hooks are gone afterwards
        torch.testing.assert_close(hf_model(ids).logits, plain)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
@pytest.mark.parametrize("intervention", [None, *INTERVENTIONS])
def test_batched_cached_generation_equals_recompute_loop(tokenizer, arch, intervention):
    hf_model = build_model(arch, seed=2, tokenizer=tokenizer)
    model = LanguageModel(hf_model, tokenizer=tokenizer)
    steering = None if intervention is None else make_steering(hf_model, arch, intervention, seed=3, strength=1.0)
    batched = greedy_generate(model, PROMPTS, max_new_tokens=12, batch_size=3, steering=steering, progress=False,
                              stop_at_eos=False)
    expected = [reference_generate(hf_model, tokenizer, p, steering, 12) for p in PROMPTS]
    assert batched == expected
    assert len(set(batched)) > 1  # the prompts do lead to different completions


@pytest.mark.parametrize("arch", sorted(ATTN_OUT))
@pytest.mark.parametrize("stop_at_eos", [False, True])
def test_conditions_sharing_forward_passes_equal_each_generated_alone(tokenizer, arch, stop_at_eos):
    """greedy_generate_many stacks the conditions of one model and prompts in a batch (refusal.run's fast path)
    and computes the prompt's blocks below the steered one once for the conditions that do not edit them: each
    condition's completions equal its own greedy_generate, token for token, whatever the others do. (Gemma3's
    tiny sliding window, 8 tokens, is shorter than the prompts: its cache keeps a window.)"""
    hf_model = build_model(arch, seed=2, tokenizer=tokenizer)
    model = LanguageModel(hf_model, tokenizer=tokenizer)
    steerings = [None, make_steering(hf_model, arch, "addition", seed=3, strength=1.0),
                 make_steering(hf_model, arch, "ablation", seed=4),
                 make_steering(hf_model, arch, "subtraction", seed=5, strength=1.0),
                 make_steering(hf_model, arch, "addition", seed=3, strength=0.25)]
    stacked = greedy_generate_many(model, PROMPTS, steerings, max_new_tokens=12, batch_size=3, progress=False,
                                   stop_at_eos=stop_at_eos)
    alone = [greedy_generate(model, PROMPTS, max_new_tokens=12, batch_size=3, steering=steering, progress=False,
                             stop_at_eos=stop_at_eos) for steering in steerings]
    assert stacked == alone
    assert len({tuple(c) for c in alone}) == len(steerings)  # every condition generates differently


def test_stop_at_eos_truncates_at_the_first_end_token(tokenizer):
    hf_model = build_model("llama", seed=2, tokenizer=tokenizer)
    model = LanguageModel(hf_model, tokenizer=tokenizer)
    through = greedy_generate(model, PROMPTS, max_new_tokens=10, progress=False, stop_at_eos=False)
    first_tokens = [tokenizer(t, add_special_tokens=False).input_ids[0] for t in through]
    with torch.no_grad():  # make EOS the argmax wherever the first generated token of prompt 0 would be
        hf_model.lm_head.weight[tokenizer.eos_token_id] = 2 * hf_model.lm_head.weight[first_tokens[0]]
    stopped = greedy_generate(model, PROMPTS, max_new_tokens=10, progress=False)
    after_eos = greedy_generate(model, PROMPTS, max_new_tokens=10, progress=False, stop_at_eos=False)
    assert stopped[0] == ""  # EOS came first
    for short, full in zip(stopped, after_eos):
        assert full.startswith(short)
    assert after_eos[0] != ""  # the original's behaviour: the text decoded after EOS is kept
    assert truncate_at_stop([5, 6, 1, 7, 1], {1}) == [5, 6] and truncate_at_stop([5, 6], {1}) == [5, 6]


def test_until_stops_a_batch_once_every_row_needs_no_more_tokens(tokenizer):
    model = LanguageModel(build_model("llama", seed=2, tokenizer=tokenizer), tokenizer=tokenizer)
    full = greedy_generate(model, PROMPTS, max_new_tokens=10, batch_size=2, progress=False, stop_at_eos=False)
    long_enough = lambda text: len(text) >= 3  # noqa: E731
    cut = greedy_generate(model, PROMPTS, max_new_tokens=10, batch_size=2, progress=False, stop_at_eos=False,
                          until=long_enough)
    assert all(f.startswith(c) and long_enough(c) for f, c in zip(full, cut))  # the same tokens, fewer of them
    assert sum(map(len, cut)) < sum(map(len, full))


def test_shared_prefill_computes_the_blocks_below_the_steered_one_once(tokenizer):
    """Addition and subtraction at block 1 and the baseline share block 0 over the prompt; ablation (every block)
    keeps its own rows: block 0's MLP sees 2 blocks of prompt rows, block 1's all 4."""
    hf_model = build_model("llama", seed=2, tokenizer=tokenizer)
    model = LanguageModel(hf_model, tokenizer=tokenizer)
    steerings = [None, make_steering(hf_model, "llama", "addition", seed=3, strength=1.0),
                 make_steering(hf_model, "llama", "subtraction", seed=5, strength=1.0),
                 make_steering(hf_model, "llama", "ablation", seed=4)]
    prompt_rows = {0: [], 1: []}
    handles = [hf_model.model.layers[i].mlp.register_forward_hook(
        lambda module, args, output, i=i: prompt_rows[i].append(len(args[0])) if args[0].shape[1] > 1 else None)
        for i in prompt_rows]
    try:
        greedy_generate_many(model, PROMPTS[:3], steerings, max_new_tokens=3, batch_size=3, progress=False)
    finally:
        for handle in handles:
            handle.remove()
    assert prompt_rows == {0: [2 * 3], 1: [4 * 3]}
