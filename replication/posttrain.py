"""The post-training step: supervised fine-tuning (SFT) of a base model by a recipe, making the project's own
post-trained models (`ptr posttrain`; `ptr replicate` runs it before the experiments).

A model-table entry with `source: posttrain` names its `base` model and a `recipe` of configs/recipes.yaml.
`ensure_posttrained(spec)` returns the directory of the finished model (weights, tokenizer, model card), training
it only when no finished model of the same recipe hash exists (the recipes, the hash and the cache directory are
replication.models.posttrained, where loading finds the model; loading never trains). Work happens in a temporary
directory renamed into place at the end, so an interrupted run never looks finished.

The recipe (the SFT stage of the paper's SFT models, whose Tulu mixtures include refusals, in miniature):

* data (TRAIN splits only, data_prep.sft): AdvBench instructions with refusal replies, Alpaca instructions with
  helpful replies, either the base model's own greedy answers under the plain template (cut at a stop string;
  empty ones and ones that start with a refusal phrase are dropped) or a fixed string (tiny recipe);
* each example is the chat-template prompt followed by the reply and the template's end-of-turn token; the loss is
  the mean cross-entropy over reply tokens (+ end of turn) only, and only those positions go through the LM head;
* full fine-tuning, AdamW, linear warm-up then linear decay, gradient clipping; the vocabulary matrices
  (embedding and unembedding; tied in Gemma, where they hold most of the parameters) stay frozen;
* deterministic from the recipe seed (data order from a seeded generator; no dropout).

`evaluate_posttrained(spec)` measures the acceptance metrics on the held-out TEST splits (refusal rates of the
post-trained model and its base; few-shot TRUE/FALSE accuracy of both); the model card holds them too.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import math
import os
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

import torch
import torch.nn.functional as F
from replication.progress import progress_bar

from data_prep.datasets import instructions
from data_prep.prompts import intervention_table
from data_prep.sft import SFTMaterial, cut_reply, material_sources
from replication.config import ModelSpec, Profile, load_model_table
from replication.mechanics.forward import true_false_probabilities
from replication.mechanics.generation import greedy_generate, hf_module
from replication.mechanics.refusal_score import REFUSAL_PHRASES, is_refusal
from replication.models import format_prompt, load_model, prompts, resolve_device
from replication.models.posttrained import (
    CARD,
    Acceptance,
    DataRecipe,
    EvaluationRecipe,
    Recipe,
    TrainingRecipe,
    is_finished,
    load_recipe,
    model_identity,
    target,
)
from replication.provenance import git_commit, package_versions

EXAMPLES = "sft_data.jsonl"
IGNORE = -100  # label of positions that do not count in the loss


# ---------------------------------------------------------------------------------------------------------------
# Examples


@dataclass(frozen=True)
class Example:
    kind: Literal["harmful", "harmless"]
    instruction: str
    reply: str


@dataclass(frozen=True)
class Encoded:
    input_ids: list[int]  # BOS + chat-template prompt + reply + end of turn
    labels: list[int]  # IGNORE on the prompt, the token itself on the reply and end of turn


def turn_end(tokenizer) -> str:
    """The chat template's end-of-turn marker (e.g. Gemma's '<end_of_turn>'): what the template writes after a reply,
    whitespace stripped. It must be one token, so that the model can learn to emit it and generation can stop."""
    marker = "\x00REPLY\x00"
    text = tokenizer.apply_chat_template([{"role": "user", "content": "x"}, {"role": "assistant", "content": marker}],
                                         tokenize=False)
    end = text[text.index(marker) + len(marker):].strip()
    if len(tokenizer.encode(end, add_special_tokens=False)) != 1:
        raise ValueError(f"the chat template's end of turn {end!r} is not a single token")
    return end


def render_example(spec: ModelSpec, tokenizer, example: Example) -> tuple[str, str]:
    """(prompt, completion) text: the instruction in the model's template, then the reply and the end of turn."""
    return format_prompt(spec, tokenizer, example.instruction), example.reply + turn_end(tokenizer)


def encode_example(spec: ModelSpec, tokenizer, example: Example) -> Encoded:
    """Prompt and completion tokenised separately (as at inference, where the prompt is tokenised alone and the
    reply generated after it); only completion tokens are labelled."""
    prompt, completion = render_example(spec, tokenizer, example)
    prompt_ids = tokenizer(prompt).input_ids
    completion_ids = tokenizer(completion, add_special_tokens=False).input_ids
    return Encoded(prompt_ids + completion_ids, [IGNORE] * len(prompt_ids) + completion_ids)


def helpful_replies(base_model, base_spec: ModelSpec, instructions: tuple[str, ...], data: DataRecipe,
                    progress: bool) -> list[str]:
    """One reply per instruction: the fixed reply, or the base model's greedy answer under its own template, cut at
    `reply_stop` ('' where nothing usable came out)."""
    if data.helpful_replies == "fixed":
        return [data.fixed_reply] * len(instructions)
    prompts = [format_prompt(base_spec, base_model.tokenizer, instruction) for instruction in instructions]
    completions = greedy_generate(base_model, prompts, max_new_tokens=data.max_reply_tokens,
                                  batch_size=data.generation_batch_size, progress=progress)
    return [cut_reply(completion, data.reply_stop) for completion in completions]


def sft_examples(material: SFTMaterial, replies: list[str]) -> tuple[list[Example], int]:
    """The harmful examples, then the harmless ones whose reply is non-empty and not a refusal; and how many
    harmless instructions were dropped."""
    harmful = [Example("harmful", i, r) for i, r in zip(material.harmful, material.refusals)]
    harmless = [Example("harmless", i, r) for i, r in zip(material.harmless, replies) if r and not is_refusal(r)]
    return harmful + harmless, len(material.harmless) - len(harmless)


# ---------------------------------------------------------------------------------------------------------------
# Training


def collate(encoded: list[Encoded], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """input_ids, attention_mask, labels of a right-padded batch (positions count from 0 in every row)."""
    width = max(len(e.input_ids) for e in encoded)
    input_ids = torch.full((len(encoded), width), pad_id)
    attention_mask = torch.zeros((len(encoded), width), dtype=torch.long)
    labels = torch.full((len(encoded), width), IGNORE)
    for row, e in enumerate(encoded):
        n = len(e.input_ids)
        input_ids[row, :n], attention_mask[row, :n], labels[row, :n] = (
            torch.tensor(e.input_ids), 1, torch.tensor(e.labels))
    return input_ids, attention_mask, labels


def output_logits(hf_model, hidden: torch.Tensor) -> torch.Tensor:
    """The LM head on final hidden states, with the model's final logit soft-capping where it has one."""
    logits = hf_model.get_output_embeddings()(hidden)
    cap = getattr(hf_model.config, "final_logit_softcapping", None)
    return logits if cap is None else torch.tanh(logits / cap) * cap


def reply_loss(hf_model, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the labelled (reply) tokens. Position t predicts token t + 1; only the
    positions that predict a labelled token go through the LM head (the 262k-vocabulary head dominates the cost)."""
    hidden = hf_model.base_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    targets = labels[:, 1:]
    counted = targets != IGNORE
    logits = output_logits(hf_model, hidden[:, :-1][counted])
    return F.cross_entropy(logits.float(), targets[counted])


def set_trainable(hf_model) -> list[torch.nn.Parameter]:
    """Every parameter trains except the vocabulary matrices (embedding, unembedding), which stay frozen."""
    hf_model.requires_grad_(True)
    for matrix in (hf_model.get_input_embeddings(), hf_model.get_output_embeddings()):
        matrix.weight.requires_grad_(False)
    return [p for p in hf_model.parameters() if p.requires_grad]


def batch_order(n_examples: int, batch_size: int, epochs: int, seed: int) -> list[list[int]]:
    """Example indices per step: a fresh seeded permutation each epoch, cut into batches (the last may be short)."""
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(epochs):
        order = torch.randperm(n_examples, generator=generator).tolist()
        batches += [order[i:i + batch_size] for i in range(0, n_examples, batch_size)]
    return batches


def lr_factor(step: int, total: int, warmup_fraction: float) -> float:
    """Linear warm-up over the first warmup_fraction of the steps, then linear decay to 0 (the Tulu SFT schedule)."""
    warmup = math.ceil(warmup_fraction * total)
    if step < warmup:
        return (step + 1) / warmup
    return (total - step) / (total - warmup)


def train(hf_model, encoded: list[Encoded], training: TrainingRecipe, seed: int, pad_id: int,
          progress: bool = True) -> tuple[list[float], int]:
    """Fine-tune `hf_model` in place; returns the loss of every step and the number of trained parameters."""
    torch.manual_seed(seed)
    device = next(hf_model.parameters()).device
    parameters = set_trainable(hf_model)
    optimizer = torch.optim.AdamW(parameters, lr=training.lr, weight_decay=training.weight_decay)
    batches = batch_order(len(encoded), training.batch_size, training.epochs, seed)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, len(batches), training.warmup_fraction))
    hf_model.train()
    losses = []
    bar = progress_bar(batches, desc="sft", unit="step", enabled=progress)
    for batch in bar:
        tensors = [t.to(device) for t in collate([encoded[i] for i in batch], pad_id)]
        loss = reply_loss(hf_model, *tensors)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, training.max_grad_norm)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    hf_model.eval().requires_grad_(False)
    return losses, sum(p.numel() for p in parameters)


# ---------------------------------------------------------------------------------------------------------------
# Evaluation (held-out TEST splits)


def settled_refusal(text: str) -> bool | None:
    """`is_refusal` of every completion that begins with the decoded `text`, or None while more text could decide
    it either way. The refusal score reads only a completion's first characters (a prefix match with the refusal
    phrases), so most completions are settled after a few tokens. Characters after a U+FFFD are not trusted (a
    byte-fallback character cut in half decodes so until its last byte arrives)."""
    head = text.split("\ufffd", 1)[0].strip()
    if head.startswith(REFUSAL_PHRASES):
        return True
    if any(phrase.startswith(head) for phrase in REFUSAL_PHRASES):
        return None
    return False


def refusal_flags(model, prompts: list[str], *, max_new_tokens: int, batch_size: int,
                  progress: bool = False) -> list[bool]:
    """`is_refusal` of each prompt's `greedy_generate` completion, a batch stopped as soon as every row's flag is
    settled (`settled_refusal`, or its end of sequence): the same batches and tokens, only the steps that could not
    change a flag left out (tests/test_posttrain.py checks the flags against greedy_generate's full completions)."""
    if model.tokenizer.clean_up_tokenization_spaces:  # decoding more tokens could then rewrite text already decoded
        raise ValueError("refusal_flags needs a tokenizer whose decoding only appends text "
                         "(clean_up_tokenization_spaces is set)")
    completions = greedy_generate(model, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                                  progress=progress, until=lambda text: settled_refusal(text) is not None)
    return [is_refusal(completion) for completion in completions]


def refusal_rate(model, spec: ModelSpec, kind: str, evaluation: EvaluationRecipe, progress: bool = False) -> float:
    """Refusal score of the model's greedy completions of the first n_test TEST instructions, in its template
    (generated only as far as the score can still change: `refusal_flags`)."""
    texts = prompts(model, spec, instructions(kind, "test", evaluation.n_test))
    flags = refusal_flags(model, texts, max_new_tokens=evaluation.max_new_tokens, batch_size=evaluation.batch_size,
                          progress=progress)
    return sum(flags) / len(flags)


def few_shot_accuracy(model, dataset: str, evaluation: EvaluationRecipe) -> float:
    """Share of the sampled statements whose P(' TRUE') vs P(' FALSE') at the end of the few-shot prompt picks the
    right label."""
    table = intervention_table(dataset, evaluation.n_statements)
    probabilities = true_false_probabilities(model, [], table["prompt"].tolist(), batch_size=evaluation.batch_size)
    predicted_true = probabilities[:, 0] > probabilities[:, 1]
    return (predicted_true.numpy() == table["label"].to_numpy().astype(bool)).mean().item()


def evaluate(model, spec: ModelSpec, evaluation: EvaluationRecipe, progress: bool = False) -> dict:
    """Refusal rates (harmful / harmless) and few-shot accuracies (per dataset and their mean) of one model."""
    accuracies = {d: few_shot_accuracy(model, d, evaluation)
                  for d in progress_bar(evaluation.truth_datasets, desc="few-shot", enabled=progress, leave=False)}
    refusal = {kind: refusal_rate(model, spec, kind, evaluation, progress) for kind in ("harmful", "harmless")}
    return {"template": spec.template, "refusal": refusal,
            "few_shot_accuracy": accuracies,
            "mean_few_shot_accuracy": sum(accuracies.values()) / len(accuracies)}


def acceptance(post: dict, base: dict, criteria: Optional[Acceptance]) -> dict:
    """Each criterion's outcome and whether all hold (None: the recipe has no acceptance criteria)."""
    if criteria is None:
        return {"accepted": None}
    change = post["mean_few_shot_accuracy"] - base["mean_few_shot_accuracy"]
    checks = {"harmful_refusal": post["refusal"]["harmful"] >= criteria.min_harmful_refusal,
              "harmless_refusal": post["refusal"]["harmless"] <= criteria.max_harmless_refusal,
              "few_shot_accuracy": abs(change) <= criteria.max_accuracy_change}
    return {"accepted": all(checks.values()), "checks": checks, "accuracy_change": change,
            "criteria": dataclasses.asdict(criteria)}


def evaluate_posttrained(spec: ModelSpec, *, device: str = "auto", progress: bool = True) -> dict:
    """The acceptance metrics of a post-trained model and its base (trained first if needed), fresh from disk."""
    ensure_posttrained(spec, device=device, progress=progress)
    recipe = load_recipe(spec.recipe)
    base_spec = load_model_table()[spec.base]
    results = {}
    for role, model_spec in (("base", base_spec), ("post", spec)):
        model = load_model(model_spec, device=device)
        results[role] = evaluate(model, model_spec, recipe.evaluation, progress)
        del model
    results["acceptance"] = acceptance(results["post"], results["base"], recipe.acceptance)
    return results


# ---------------------------------------------------------------------------------------------------------------
# The cached model


def ensure_posttrained(spec: ModelSpec, *, device: str = "auto", progress: bool = True) -> Path:
    """The directory of the post-trained model of `spec` (source posttrain), trained and evaluated first unless a
    finished model with the same recipe hash is already in the cache."""
    made = target(spec)
    directory, digest = made.directory, made.digest
    if is_finished(directory, digest):
        return directory
    directory.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{directory.name}.partial-", dir=directory.parent))
    try:
        card = posttrain(spec, made.base_spec, made.recipe, made.material, work, resolve_device(device), progress)
        card["recipe_hash"] = digest
        (work / "README.md").write_text(model_card_markdown(card))
        (work / CARD).write_text(json.dumps(card, indent=2) + "\n")  # last: marks the directory finished
        work.chmod(0o755)  # mkdtemp's private mode would otherwise become the model directory's mode
        if not is_finished(directory, digest):  # another process may have finished the same model meanwhile
            shutil.rmtree(directory, ignore_errors=True)
            os.replace(work, directory)
    finally:
        shutil.rmtree(work, ignore_errors=True)  # nothing left after a successful rename
    return directory


def posttrain(spec: ModelSpec, base_spec: ModelSpec, recipe: Recipe, material: SFTMaterial, work: Path, device: str,
              progress: bool) -> dict:
    """Evaluate the base, write the helpful replies, fine-tune, evaluate the result, save it into `work`; the card."""
    times = {}
    start = time.perf_counter()
    model = load_model(base_spec, dtype="float32", device=device)
    tokenizer, hf_model = model.tokenizer, hf_module(model)
    base_metrics = evaluate(model, base_spec, recipe.evaluation, progress)
    times["evaluate_base"] = time.perf_counter() - start

    start = time.perf_counter()
    replies = helpful_replies(model, base_spec, material.harmless, recipe.data, progress)
    examples, dropped = sft_examples(material, replies)
    encoded = [encode_example(spec, tokenizer, example) for example in examples]
    times["replies"] = time.perf_counter() - start

    start = time.perf_counter()
    losses, n_trained = train(hf_model, encoded, recipe.training, recipe.seed, tokenizer.pad_token_id, progress)
    end_id = tokenizer.convert_tokens_to_ids(turn_end(tokenizer))
    hf_model.generation_config.eos_token_id = sorted({tokenizer.eos_token_id, end_id})  # generation ends a turn
    times["train"] = time.perf_counter() - start

    start = time.perf_counter()
    post_metrics = evaluate(model, spec, recipe.evaluation, progress)
    times["evaluate_post"] = time.perf_counter() - start

    hf_model.save_pretrained(work)
    tokenizer.save_pretrained(work)
    lines = [json.dumps(dataclasses.asdict(e), ensure_ascii=False) for e in examples]
    (work / EXAMPLES).write_text("\n".join(lines) + "\n", encoding="utf-8")
    times["total"] = sum(times.values())
    outcome = acceptance(post_metrics, base_metrics, recipe.acceptance)
    if outcome["accepted"] is False:
        warnings.warn(f"post-trained model {spec.key!r} fails the acceptance check of recipe {recipe.name!r}: "
                      f"{outcome['checks']}; see its model card")
    counts = {kind: sum(e.kind == kind for e in examples) for kind in ("harmful", "harmless")}
    return {
        "model": spec.key, "base": base_spec.key, "recipe": dataclasses.asdict(recipe),
        "base_identity": model_identity(base_spec),
        "data": {"sources": material_sources(),
                 "counts": counts, "harmless_dropped": dropped, "material_sha256": material.sha256(),
                 "examples_sha256": hashlib.sha256((work / EXAMPLES).read_bytes()).hexdigest(),
                 "examples_file": EXAMPLES, "reply_tokens": sum(sum(l != IGNORE for l in e.labels) for e in encoded)},
        "training": {"steps": len(losses), "epochs": recipe.training.epochs, "batch_size": recipe.training.batch_size,
                     "lr": recipe.training.lr,
                     "trainable_parameters": n_trained,
                     "first_loss": losses[0], "final_loss": losses[-1], "losses": losses},
        "evaluation": {"settings": dataclasses.asdict(recipe.evaluation), "post": post_metrics, "base": base_metrics},
        "acceptance": outcome,
        "wall_time_s": times, "device": device, "threads": torch.get_num_threads(),
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "git_commit": git_commit(),
        "packages": package_versions(("torch", "transformers", "nnsight", "tokenizers")),
    }


def model_card_markdown(card: dict) -> str:
    """README.md of a post-trained model: what it is, its data, training, acceptance metrics and cost."""
    recipe, data, training, ev = card["recipe"], card["data"], card["training"], card["evaluation"]
    post, base = ev["post"], ev["base"]
    rows = [f"| refusal rate, harmful (AdvBench test, first {ev['settings']['n_test']}) | "
            f"{post['refusal']['harmful']:.2f} | {base['refusal']['harmful']:.2f} |",
            f"| refusal rate, harmless (Alpaca test, first {ev['settings']['n_test']}) | "
            f"{post['refusal']['harmless']:.2f} | {base['refusal']['harmless']:.2f} |"]
    rows += [f"| few-shot accuracy, {d} (n={ev['settings']['n_statements']}) | {post['few_shot_accuracy'][d]:.3f} | "
             f"{base['few_shot_accuracy'][d]:.3f} |" for d in post["few_shot_accuracy"]]
    rows.append(f"| few-shot accuracy, mean | {post['mean_few_shot_accuracy']:.3f} | "
                f"{base['mean_few_shot_accuracy']:.3f} |")
    accepted = {True: "passed", False: "FAILED", None: "not checked (no criteria in the recipe)"}
    helpful = ("the base model's own greedy replies under the plain template "
               f"(at most {recipe['data']['max_reply_tokens']} tokens, cut at {recipe['data']['reply_stop']!r}; empty "
               "replies and replies starting with a refusal phrase dropped)"
               if recipe["data"]["helpful_replies"] == "base_model" else
               f"the fixed reply {recipe['data']['fixed_reply']!r} (a random model's own replies would be noise)")
    times = ", ".join(f"{name} {seconds:.0f} s" for name, seconds in card["wall_time_s"].items())
    return "\n".join([
        f"# {card['model']}: SFT of {card['base']} (recipe `{recipe['name']}`)", "",
        recipe["description"], "",
        f"Recipe hash `{card['recipe_hash']}`; made {card['created']} on {card['device']} "
        f"(torch threads: {card['threads']}), git {card['git_commit']}.", "",
        "## Data (TRAIN splits only)", "",
        f"* {data['counts']['harmful']} AdvBench instructions with refusal replies (data_prep/sft.py REFUSAL_REPLIES, "
        "in turn).",
        f"* {data['counts']['harmless']} Alpaca instructions with {helpful}; {data['harmless_dropped']} of "
        f"{recipe['data']['n_harmless']} dropped.",
        f"* Sampled with seed {recipe['seed']}; SFT material sha256 `{data['material_sha256']}`; the examples are in "
        f"`{data['examples_file']}` (sha256 `{data['examples_sha256']}`), {data['reply_tokens']} reply tokens.", "",
        "## Training", "",
        "Chat template prompt + reply + end-of-turn token; loss on the reply tokens (and end of turn) only. Full "
        "fine-tuning with the embedding and unembedding frozen, AdamW, linear warm-up then linear decay, gradient "
        "clipping, float32.", "",
        f"* {training['steps']} steps ({training['epochs']} epochs, batch {training['batch_size']}), peak learning "
        f"rate {training['lr']}, warm-up fraction {recipe['training']['warmup_fraction']}, weight decay "
        f"{recipe['training']['weight_decay']}, max grad norm {recipe['training']['max_grad_norm']}.",
        f"* {training['trainable_parameters']:,} trainable parameters; loss {training['first_loss']:.3f} (first step) "
        f"-> {training['final_loss']:.3f} (last step).", "",
        "## Acceptance (held-out TEST splits)", "",
        f"Refusal score of {ev['settings']['max_new_tokens']} greedy tokens (prefix match with the refusal phrases); "
        "this model under its chat template, the base under the plain template. Few-shot TRUE/FALSE accuracy: "
        "argmax of P(' TRUE') vs P(' FALSE') after the intervention few-shot prompt.", "",
        "| metric | this model | base |", "|---|---|---|", *rows, "",
        f"Acceptance: **{accepted[card['acceptance']['accepted']]}**"
        + (f" (criteria: {card['acceptance']['criteria']})." if card["acceptance"]["accepted"] is not None else "."),
        "", "## Cost", "", f"Wall time: {times}.", "",
    ])


def posttrain_profile(profile: Profile, *, progress: bool = True) -> list[Path]:
    """Every post-trained model of the profile, made if missing (`ptr posttrain`)."""
    return [ensure_posttrained(profile.model_spec(key), device=profile.device, progress=progress)
            for key in profile.posttrained_models()]
