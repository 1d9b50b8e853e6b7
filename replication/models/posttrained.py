"""Where the project's own post-trained models live, and how a finished one is recognised (the recipe hash).

A model-table entry with `source: posttrain` names its `base` model and a `recipe` of configs/recipes.yaml. Its
directory is `cache/models/<key>-<hash12>`, where the hash covers what determines the weights: the recipe's seed,
data and training sections, the base model's identity and the SFT material's sha256. A directory holding `card.json`
with that hash is a finished model. Loading only finds it (replication.models); making it is the post-training step
(replication.posttrain, `ptr posttrain`), which the pipeline runs before the experiments.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from data_prep.paths import cache_dir
from data_prep.sft import SFTMaterial, sft_material
from replication.config import (
    CONFIG_DIR,
    TRUE_FALSE_DATASETS,
    ConfigError,
    Float,
    Int,
    ModelSpec,
    Str,
    _build,
    _check_choice,
    _mapping,
    _read_yaml,
    choice,
    config_dataclass,
    load_model_table,
)
from replication.mechanics.refusal_score import is_refusal
from replication.models import tiny

RECIPES = CONFIG_DIR / "recipes.yaml"
CARD = "card.json"  # written last inside the temporary directory: a directory with it is a finished model
# Bump when the training code changes what a recipe produces, so cached models are retrained.
TRAINING_CODE_VERSION = 1


# ---------------------------------------------------------------------------------------------------------------
# Recipes (validated YAML data)


@config_dataclass
class DataRecipe:
    n_harmful: Int  # AdvBench train instructions, with refusal replies
    n_harmless: Int  # Alpaca train instructions, with helpful replies
    helpful_replies: choice("base_model", "fixed")
    fixed_reply: Optional[Str] = None  # helpful_replies: fixed
    max_reply_tokens: Int = 32  # base_model: greedy tokens generated per reply
    reply_stop: Str = "\n"  # base_model: a reply ends before this string
    generation_batch_size: Int = 16  # base_model


@config_dataclass
class TrainingRecipe:
    epochs: Int
    batch_size: Int
    lr: Float  # peak learning rate
    warmup_fraction: Float  # of the steps, linear warm-up from 0; then linear decay to 0
    weight_decay: Float
    max_grad_norm: Float


@config_dataclass
class EvaluationRecipe:
    n_test: Int  # first n of each refusal TEST split
    max_new_tokens: Int
    truth_datasets: tuple[Str, ...]
    n_statements: Int  # per truth dataset
    batch_size: Int


@config_dataclass
class Acceptance:
    min_harmful_refusal: Float
    max_harmless_refusal: Float
    max_accuracy_change: Float  # |post - base| mean few-shot accuracy


@config_dataclass
class Recipe:
    name: Str
    description: Str
    seed: Int
    data: DataRecipe
    training: TrainingRecipe
    evaluation: EvaluationRecipe
    acceptance: Optional[Acceptance] = None

    def weight_defining(self) -> dict:
        """The sections that determine the trained weights (hashed); evaluation and acceptance are not."""
        return {"seed": self.seed, "data": dataclasses.asdict(self.data),
                "training": dataclasses.asdict(self.training)}


def load_recipes(path: Path | str = RECIPES) -> dict[str, Recipe]:
    """Read and validate configs/recipes.yaml (unknown keys, wrong types and bad values are ConfigErrors)."""
    path = Path(path)
    data = _read_yaml(path)
    entries = _mapping(data.get("recipes"), "recipes", path)
    recipes = {name: _build(Recipe, {"name": name, **_mapping(entry, f"recipes.{name}", path)},
                            f"recipes.{name}", path) for name, entry in entries.items()}
    for recipe in recipes.values():
        _check_recipe(recipe, path)
    return recipes


def load_recipe(name: str, path: Path | str = RECIPES) -> Recipe:
    recipes = load_recipes(path)
    _check_choice(name, recipes, "recipe", Path(path))
    return recipes[name]


def _check_recipe(recipe: Recipe, path: Path) -> None:
    where = f"recipes.{recipe.name}"
    positive = {"data.n_harmful": recipe.data.n_harmful, "data.n_harmless": recipe.data.n_harmless,
                "data.max_reply_tokens": recipe.data.max_reply_tokens,
                "data.generation_batch_size": recipe.data.generation_batch_size,
                "training.epochs": recipe.training.epochs, "training.batch_size": recipe.training.batch_size,
                "training.lr": recipe.training.lr, "training.max_grad_norm": recipe.training.max_grad_norm,
                "evaluation.n_test": recipe.evaluation.n_test,
                "evaluation.max_new_tokens": recipe.evaluation.max_new_tokens,
                "evaluation.n_statements": recipe.evaluation.n_statements,
                "evaluation.batch_size": recipe.evaluation.batch_size}
    for name, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{path}: {where}.{name} must be positive, got {value}")
    if not 0 <= recipe.training.warmup_fraction < 1:
        raise ConfigError(f"{path}: {where}.training.warmup_fraction must be in [0, 1), got "
                          f"{recipe.training.warmup_fraction}")
    if recipe.data.helpful_replies == "fixed" and not recipe.data.fixed_reply:
        raise ConfigError(f"{path}: {where}.data: helpful_replies 'fixed' needs a non-empty fixed_reply")
    if recipe.data.fixed_reply and is_refusal(recipe.data.fixed_reply):
        raise ConfigError(f"{path}: {where}.data.fixed_reply {recipe.data.fixed_reply!r} starts with a refusal phrase")
    if not recipe.data.reply_stop:
        raise ConfigError(f"{path}: {where}.data.reply_stop must be a non-empty string")
    for dataset in recipe.evaluation.truth_datasets:
        _check_choice(dataset, TRUE_FALSE_DATASETS, f"{where}.evaluation.truth_datasets entry", path)


# ---------------------------------------------------------------------------------------------------------------
# Identity and hash


def tensors_sha256(state: dict[str, torch.Tensor]) -> str:
    """sha256 over the names and bytes of a state dict, in name order."""
    digest = hashlib.sha256()
    for name in sorted(state):
        digest.update(name.encode())
        digest.update(state[name].detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def model_identity(spec: ModelSpec) -> dict:
    """What determines a base model's weights and vocabulary. Tiny models are defined by code, so their weights
    and vocabulary are hashed; the others are pinned by their source (GGUF package and sha256, hub revision)."""
    if spec.source == "tiny":
        tokenizer = tiny.build_tokenizer()
        return {"source": "tiny", "arch": spec.arch, "seed": spec.seed,
                "weights_sha256": tensors_sha256(tiny.build_model(spec.arch, spec.seed, tokenizer).state_dict()),
                "vocab_sha256": tiny.vocab_hash(tokenizer.backend_tokenizer)}
    if spec.source == "posttrain":
        raise ValueError(f"model {spec.key!r} is itself post-trained; a recipe starts from a base model")
    return {"source": spec.source, "hf_id": spec.hf_id, "revision": spec.revision, "gguf": spec.gguf}


def recipe_hash(recipe: Recipe, base_identity: dict, data_sha256: str) -> str:
    """sha256 of the canonical JSON of the weight-defining recipe, the base identity and the SFT material."""
    canonical = json.dumps({"recipe": recipe.weight_defining(), "base": base_identity, "data_sha256": data_sha256,
                            "training_code_version": TRAINING_CODE_VERSION}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


# ---------------------------------------------------------------------------------------------------------------
# The cached model


def model_dir(spec: ModelSpec, digest: str) -> Path:
    return cache_dir() / "models" / f"{spec.key}-{digest[:12]}"


def is_finished(directory: Path, digest: str) -> bool:
    """True when `directory` holds a finished model of exactly this recipe hash."""
    try:
        return json.loads((directory / CARD).read_text())["recipe_hash"] == digest
    except (OSError, ValueError, KeyError):
        return False


@dataclass(frozen=True)
class Target:
    """What a post-trained model is made from, and the directory its finished version has."""
    recipe: Recipe
    base_spec: ModelSpec
    material: SFTMaterial
    digest: str  # the recipe hash
    directory: Path


def target(spec: ModelSpec) -> Target:
    """The recipe, base model, SFT material, recipe hash and cache directory of the post-trained model `spec`."""
    if spec.source != "posttrain":
        raise ValueError(f"model {spec.key!r} has source {spec.source!r}, not 'posttrain'")
    recipe = load_recipe(spec.recipe)
    base_spec = load_model_table()[spec.base]
    material = sft_material(recipe.data.n_harmful, recipe.data.n_harmless, recipe.seed)
    digest = recipe_hash(recipe, model_identity(base_spec), material.sha256())
    return Target(recipe, base_spec, material, digest, model_dir(spec, digest))
