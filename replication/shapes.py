"""Random-weight models of the paper models' exact shapes (the `paper-shape` profile), torch-free.

`replication/configs/shapes.yaml` holds the real `config.json` of every paper model and the name of its real
tokenizer (data_prep.tokenizers.reference_tokenizer). A profile with `random_weights:` builds each of its models
from that config with random weights instead of downloading it, so the paper path (tokenizers, templates, pair
building, per-model settings, three families, the audit) runs where the weights cannot be had.

On a small CPU the shape can be scaled (`random_weights: {layers: 4, heads: 4}`): fewer decoder layers, and fewer
attention heads of the same head dimension (hidden size = heads x head_dim; key/value heads and the MLP width
scaled by the same ratio, so grouped-query attention keeps its group size). The vocabulary, tokenizer, RoPE, norm
and every other config value stay the real model's. The per-model layer settings (probe, intervention and refusal
layers) are mapped to the scaled depth in proportion (`scaled_layer`); the scaled shape and settings are part of
the model spec, so they enter the provenance and the configuration hash. `layers: null, heads: null` is the full
shape (a GPU run).
"""
from __future__ import annotations

import hashlib
from functools import cache
from pathlib import Path
from typing import Any, Optional

import yaml

SHAPES_FILE = Path(__file__).resolve().parent / "configs" / "shapes.yaml"
LAYER_SETTINGS = ("probe_layer", "intervene_layer", "refusal_layer", "refusal_apply_layer")
MLP_MULTIPLE = 64  # a scaled MLP width is rounded to a multiple of this (as the real widths are)


@cache
def shape_table() -> dict[str, dict[str, Any]]:
    """`{model key: {"tokenizer": name, "config_source": ..., "config": {...config.json...}}}`."""
    return yaml.safe_load(SHAPES_FILE.read_text())["models"]


def scaled_layer(layer: int, n_layers: int, n_scaled: int) -> int:
    """Layer `layer` of an `n_layers`-deep model at the same relative depth of an `n_scaled`-deep one."""
    return round(layer * (n_scaled - 1) / (n_layers - 1)) if n_layers > 1 else 0


def scaled_config(config: dict[str, Any], layers: Optional[int], heads: Optional[int]) -> dict[str, Any]:
    """The config with `layers` decoder layers and `heads` attention heads (None = the real number)."""
    config = dict(config)
    n_heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // n_heads
    if heads is not None and heads < n_heads:
        group = n_heads // (config.get("num_key_value_heads") or n_heads)  # query heads per key/value head
        if heads % group:
            raise ValueError(f"{heads} heads cannot keep the model's {group} query heads per key/value head; "
                             f"choose random_weights.heads as a multiple of {group}")
        ratio = heads / n_heads
        config.update(
            num_attention_heads=heads, num_key_value_heads=heads // group, head_dim=head_dim,
            hidden_size=heads * head_dim,
            intermediate_size=max(MLP_MULTIPLE, round(config["intermediate_size"] * ratio / MLP_MULTIPLE)
                                  * MLP_MULTIPLE))
    if layers is not None and layers < config["num_hidden_layers"]:
        config["num_hidden_layers"] = layers
        if "layer_types" in config:  # a per-layer list follows the depth
            config["layer_types"] = config["layer_types"][:layers]
    return config


def scaled_settings(settings: dict[str, Any], n_layers: int, n_scaled: int) -> dict[str, Any]:
    """Per-model settings with every layer index mapped to the scaled depth."""
    return {name: scaled_layer(value, n_layers, n_scaled) if name in LAYER_SETTINGS and value is not None else value
            for name, value in settings.items()}


def weight_seed(key: str, seed: int) -> int:
    """A model's weight seed: the profile seed mixed with its key, so base and post-trained models differ."""
    return int(hashlib.sha256(f"{seed}:{key}".encode()).hexdigest()[:8], 16)
