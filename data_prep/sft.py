"""SFT material for the project's own post-trained models (replication.posttrain). Pure data, no torch.

Only the TRAIN splits of the refusal data are used, so the TEST splits stay held out for the refusal experiment and
for the post-trained model's acceptance check. Harmful instructions (AdvBench) get refusal replies; harmless ones
(Alpaca) get helpful replies, which replication.posttrain writes (the base model's own answers, or a fixed string).
"""
from __future__ import annotations

import hashlib
import json
import random
from dataclasses import asdict, dataclass

from data_prep.datasets import read_refusal
from data_prep.errors import DataError
from data_prep.sources import source

RAW_FILES = {"harmful": "refusal/advbench.csv", "harmless": "refusal/alpaca.json"}  # the raw files of the splits

# Refusal replies in the style of chat models' refusals. Each starts with one of the refusal score's phrases
# (replication.mechanics.refusal_score), so a model that learnt them scores as refusing; several phrasings, so the model
# learns to refuse rather than one string.
REFUSAL_REPLIES = (
    "I'm sorry, but I can't help with that.",
    "I cannot assist with that request.",
    "I'm sorry, but I cannot provide instructions for that, as it could cause harm.",
    "I can't help with that. It could hurt people or break the law.",
    "I am sorry, but I will not help with this request.",
    "As an AI assistant, I cannot help with anything that could cause harm.",
    "I apologize, but I cannot assist with that.",
    "I will not help with that, because it could be used to harm others.",
)


@dataclass(frozen=True)
class SFTMaterial:
    """The instructions of an SFT data set, before the helpful replies are written."""
    harmful: tuple[str, ...]  # AdvBench train instructions
    refusals: tuple[str, ...]  # the refusal reply of each harmful instruction
    harmless: tuple[str, ...]  # Alpaca train instructions, to be answered helpfully

    def sha256(self) -> str:
        """sha256 of the canonical JSON of the material (part of the post-training recipe hash)."""
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()


def sample(items: list[str], n: int, rng: random.Random, what: str) -> list[str]:
    """n distinct items drawn with `rng` (deterministic for a seeded rng)."""
    if n > len(items):
        raise DataError(f"the SFT recipe asks for {n} {what} instructions; the train split has {len(items)}")
    return rng.sample(items, n)


def refusal_reply(index: int) -> str:
    """The refusal phrasings in turn, so each is used about equally often."""
    return REFUSAL_REPLIES[index % len(REFUSAL_REPLIES)]


def sft_material(n_harmful: int, n_harmless: int, seed: int) -> SFTMaterial:
    """n_harmful AdvBench and n_harmless Alpaca instructions sampled (with `seed`) from the TRAIN splits."""
    rng = random.Random(seed)
    harmful = sample(read_refusal("harmful", "train"), n_harmful, rng, "harmful")
    harmless = sample(read_refusal("harmless", "train"), n_harmless, rng, "harmless")
    return SFTMaterial(tuple(harmful), tuple(refusal_reply(i) for i in range(n_harmful)), tuple(harmless))


def material_sources() -> dict[str, dict[str, str]]:
    """Where each kind of instruction comes from (for the model card): raw file, its origin and sha256, split."""
    return {kind: {"file": name, "url": source(name).url, "sha256": source(name).sha256, "split": "train"}
            for kind, name in RAW_FILES.items()}


def cut_reply(completion: str, stop: str) -> str:
    """A generated completion made into a reply: leading whitespace dropped, cut at the first `stop`, stripped."""
    return completion.lstrip().split(stop, 1)[0].strip()
