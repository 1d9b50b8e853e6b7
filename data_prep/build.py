"""Build every processed dataset into processed_dir() with manifest.json.

Statement tables and refusal splits are written as Hugging Face datasets (data_prep/hf.py: parquet with typed
features, and a dataset card). The few-shot lines and the patching pairs stay JSON: the few-shot file is four
lines per dataset, and a pairs file is one document (how the pairs were chosen, the tokenizer's fingerprint, then
the pairs with per-token roles) that a table would split into a file plus side metadata.

Work is done in units (one truth table, the few-shot lines, the refusal splits, one dataset's pairs under one
tokenizer). The manifest records, per unit, the sha256 of its inputs and outputs, its counts, the data_prep code
version and (for pairs) a tokenizer fingerprint; a unit whose entry is current and whose outputs are intact is
skipped.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from tqdm import tqdm

from data_prep import hf, paths
from data_prep.datasets import MANIFEST
from data_prep.pairs import Encode, build_pairs, patching_specs
from data_prep.refusal import refusal_splits
from data_prep.sources import fetch, sha256_of, source, sources_with_role
from data_prep.truth import load_few_shot_json, load_truth_csv

PACKAGE_DIR = Path(__file__).parent
FEW_SHOT_SOURCE = "truth/few_shot_samples.json"
REFUSAL_SOURCES = ("refusal/advbench.csv", "refusal/alpaca.json")


@dataclass(frozen=True)
class Unit:
    name: str  # manifest key, e.g. "truth/cities" or "pairs/llama3/cities"
    inputs: tuple[str, ...]  # raw source names
    make: Callable[[dict[str, Path]], tuple[dict[str, bytes], dict]]  # raw paths -> (outputs, counts)
    tokenizer: str | None = None  # fingerprint of the tokenizer, for pair units


def code_version() -> str:
    """sha256 over data_prep's code and configuration: any change rebuilds everything."""
    digest = hashlib.sha256()
    for path in sorted(PACKAGE_DIR.glob("*.py")) + sorted(PACKAGE_DIR.glob("*.yaml")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def tokenizer_fingerprint(encode: Encode) -> str:
    """sha256 of the token ids of every patching few-shot statement: tells tokenizers under one key apart."""
    texts = [s for spec in patching_specs().values() for s in spec.few_shot_true + spec.few_shot_false]
    return hashlib.sha256(json.dumps([encode(t) for t in texts]).encode()).hexdigest()


def to_json(value) -> bytes:
    return (json.dumps(value, ensure_ascii=False, indent=1) + "\n").encode("utf-8")


def truth_unit(name: str) -> Unit:
    raw = f"truth/{name}.csv"

    def make(raw_paths):
        table = load_truth_csv(raw_paths[raw])
        labels = table["label"]
        counts = {"rows": len(table), "true": int((labels == 1).sum()), "false": int((labels == 0).sum())}
        src = source(raw)
        description = (f"True and false statements (`{name}`), from {src.repository} at commit {src.commit}, file "
                       f"`{src.path}`, in file order; checked and normalised by data_prep/truth.py.")
        return hf.dataset_files(f"truth/{name}", table, hf.truth_features(list(table.columns)),
                                f"Truth statements: {name}", description), counts

    return Unit(f"truth/{name}", (raw,), make)


def few_shot_unit() -> Unit:
    def make(raw_paths):
        lines_by_dataset = load_few_shot_json(raw_paths[FEW_SHOT_SOURCE])
        return {"few_shot.json": to_json(lines_by_dataset)}, {"datasets": len(lines_by_dataset)}

    return Unit("few_shot", (FEW_SHOT_SOURCE,), make)


def refusal_unit() -> Unit:
    def make(raw_paths):
        splits = refusal_splits(*(raw_paths[name] for name in REFUSAL_SOURCES))
        outputs = {}
        for (kind, split), items in splits.items():
            origin = source(REFUSAL_SOURCES[0] if kind == "harmful" else REFUSAL_SOURCES[1])
            description = (f"The {split} split of the {kind} instructions ({origin.repository} at commit "
                           f"{origin.commit}, `{origin.path}`), split as the original code does "
                           f"(data_prep/refusal.py).")
            outputs |= hf.dataset_files(f"refusal/{kind}_{split}", pd.DataFrame({"instruction": items}),
                                        hf.instruction_features(), f"Refusal instructions: {kind}, {split}",
                                        description)
        return outputs, {f"{kind}_{split}": len(items) for (kind, split), items in splits.items()}

    return Unit("refusal", REFUSAL_SOURCES, make)


def pairs_unit(tokenizer_key: str, encode: Encode, dataset: str, fingerprint: str) -> Unit:
    raw = f"truth/{dataset}.csv"

    def make(raw_paths):
        pair_set = build_pairs(dataset, load_truth_csv(raw_paths[raw]), encode, tokenizer_key)
        document = {"dataset": dataset, "tokenizer_key": tokenizer_key, "tokenizer_fingerprint": fingerprint,
                    "pattern": pair_set.pattern,
                    "pairs": [{"true": p.true, "false": p.false, "roles": p.roles} for p in pair_set.pairs]}
        return {f"pairs/{tokenizer_key}/{dataset}.json": to_json(document)}, {"pairs": len(pair_set.pairs)}

    return Unit(f"pairs/{tokenizer_key}/{dataset}", (raw,), make, tokenizer=fingerprint)


def all_units(tokenizers: dict[str, Encode]) -> Iterator[Unit]:
    for src in sources_with_role("truth"):
        yield truth_unit(Path(src.name).stem)
    yield few_shot_unit()
    yield refusal_unit()
    for key, encode in tokenizers.items():
        fingerprint = tokenizer_fingerprint(encode)
        for dataset in patching_specs():
            yield pairs_unit(key, encode, dataset, fingerprint)


def is_current(entry: dict | None, unit: Unit, version: str, root: Path) -> bool:
    if entry is None:
        return False
    expected = {name: source(name).sha256 for name in unit.inputs}
    return (entry.get("inputs") == expected and entry.get("code_version") == version
            and entry.get("tokenizer") == unit.tokenizer
            and all((root / rel).is_file() and sha256_of(root / rel) == sha for rel, sha in entry["outputs"].items()))


def write_atomic(path: Path, content: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_bytes(content)
    partial.replace(path)


def build_all(mirror: str | Path | None = None, tokenizers: dict[str, Encode] | None = None,
              progress: bool = True) -> Path:
    """Fetch and verify the raw files, build every processed output (pairs for each tokenizer given, keyed by
    tokenizer_key), and return the manifest path. Current units are skipped."""
    root = paths.processed_dir()
    manifest_path = root / MANIFEST
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {"units": {}}
    version = code_version()
    units = list(all_units(tokenizers or {}))
    for unit in tqdm(units, desc="processed data", unit="unit", disable=None if progress else True):  # TTY only
        if is_current(manifest["units"].get(unit.name), unit, version, root):
            continue
        raw_paths = {name: fetch(name, mirror) for name in unit.inputs}
        outputs, counts = unit.make(raw_paths)
        for rel, content in outputs.items():
            write_atomic(root / rel, content)
        previous = manifest["units"].get(unit.name) or {"outputs": {}}
        for rel in set(previous["outputs"]) - set(outputs):  # e.g. truth/cities.csv, before truth/cities/
            (root / rel).unlink(missing_ok=True)
        manifest["units"][unit.name] = {
            "inputs": {name: source(name).sha256 for name in unit.inputs},
            "outputs": {rel: hashlib.sha256(content).hexdigest() for rel, content in outputs.items()},
            "counts": counts, "code_version": version, "tokenizer": unit.tokenizer,
        }
        write_atomic(manifest_path, to_json(manifest))
    return manifest_path
