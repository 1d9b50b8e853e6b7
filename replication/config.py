"""Configuration: the model table (`configs/models.yaml`, plus a user's own table merged over it) and run profiles
(`configs/profiles/*.yaml`).

Both are YAML data, validated on load (pydantic) into frozen dataclasses. Every mistake (an unknown or misspelt key,
a wrong type, an unknown model or dataset name) is a `ConfigError` naming the file, the key, the allowed values and,
for a typo, the closest allowed name. `json_schemas()` gives the same schema to editors
(`configs/schema/*.json`, written by `python -m replication.config`). Torch-free, so `analysis` can read profiles
too.
"""
from __future__ import annotations

import dataclasses
import difflib
import functools
import hashlib
import json
import re
import types
import typing
from dataclasses import field
from pathlib import Path
from typing import Annotated, Any, Literal, Optional

import yaml
from pydantic import (BeforeValidator, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr,
                      TypeAdapter, ValidationError)
from pydantic.dataclasses import dataclass
from pydantic.json_schema import SkipJsonSchema

from data_prep import paths
from replication import shapes

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
MODEL_TABLE = CONFIG_DIR / "models.yaml"
PROFILE_DIR = CONFIG_DIR / "profiles"
SCHEMA_DIR = CONFIG_DIR / "schema"

PLAIN = "plain"  # template name: "User: {instruction}\nAssistant:" (in the `templates` section of models.yaml)
CHAT = "chat"  # template name: the tokenizer's own chat template, with the generation prompt

EXPERIMENTS = ("knowledge", "truthfulness", "refusal", "confidence")
# Datasets with the hard-coded patching few-shot lines of the original (Knowledge+Truthfulness/patching.py).
KNOWLEDGE_DATASETS = ("cities", "neg_cities", "larger_than", "smaller_than", "sp_en_trans", "neg_sp_en_trans",
                      "tulu_extracted")
TRUE_FALSE_DATASETS = ("cities", "neg_cities", "larger_than", "smaller_than", "sp_en_trans", "neg_sp_en_trans",
                       "animal_class", "neg_animal_class", "element_symb", "neg_element_symb", "facts",
                       "neg_facts", "inventors", "neg_inventors", "tulu_extracted")
# The per-model settings an experiment reads; it refuses to run on a model that lacks one (`ptr sweep` chooses them).
REQUIRED_SETTINGS = {
    "knowledge": (),
    "truthfulness": ("probe_layer", "intervene_layer"),
    "refusal": ("refusal_layer", "refusal_apply_layer", "refusal_pos", "refusal_coef_add", "refusal_coef_sub"),
    "confidence": (),
}



class ConfigError(ValueError):
    """A configuration file is wrong; the message names the file, the key and the fix."""


def _suggest(value: Any, allowed) -> str:
    close = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1)
    return f" Did you mean {close[0]!r}?" if close else ""


def choice(*allowed: str) -> Any:
    """A string type with fixed values (an enum in the JSON schema); a wrong value names them and the closest."""
    def check(value: Any) -> Any:
        if value not in allowed:
            raise ValueError(f"is {value!r}; allowed values: {', '.join(map(repr, allowed))}."
                             f"{_suggest(value, allowed)}")
        return value
    return Annotated[Literal[allowed], BeforeValidator(check)]


# Field types: YAML values are taken as they are (no "5" -> 5); an int is accepted where a float is wanted.
Int, Float, Str, Bool = StrictInt, StrictFloat, StrictStr, StrictBool
Positive = Annotated[StrictInt, Field(gt=0)]
# Metadata of a field added after cubes were shipped: at its default it is left out of the configuration (and so
# of the hashes), so the profiles that do not set it keep their hashes and their cubes stay valid.
HASHED_WHEN_SET = {"hashed_when_set": True}
Dtype = choice("float32", "bfloat16", "float16")
Device = choice("auto", "cpu", "cuda")
KnowledgeDataset = choice(*KNOWLEDGE_DATASETS)
TrueFalseDataset = choice(*TRUE_FALSE_DATASETS)
SETTINGS_SOURCES = ("original", "chosen", "provisional", "sweep")
STRICT = ConfigDict(extra="forbid")  # an unknown key is an error


def config_dataclass(cls):
    """A frozen dataclass checked by pydantic on construction, unknown keys being errors: the classes that YAML
    configuration is read into (with `_build`)."""
    return dataclass(frozen=True, config=STRICT)(cls)


# --------------------------------------------------------------------------------------------------------------
# Model table


@config_dataclass
class Architecture:
    """Module paths inside a Hugging Face *ForCausalLM of one architecture (dotted attribute paths)."""
    layers_path: Str  # the decoder-layer list, from the top model
    mlp_out_path: Str  # the MLP output projection (W_out), relative to one decoder layer
    final_norm_path: Str  # the final RMSNorm, from the top model
    unembed_path: Str  # the unembedding W_U, from the top model
    norm_gain_offset: Float  # RMSNorm output = x_normed * (offset + weight): 0 for Llama/Mistral/Qwen2, 1 for Gemma
    # The module (relative to one decoder layer) whose output is added to the residual stream after attention:
    # self_attn (o_proj output) for Llama/Mistral/Qwen2, post_attention_layernorm for Gemma3 (refusal steering at
    # TransformerLens resid_mid).
    attn_out_path: Str
    # The RMSNorm (relative to one decoder layer) that the MLP output passes through before it joins the residual
    # stream (Gemma3: post_feedforward_layernorm); None = added directly (Llama/Mistral/Qwen2). Its gain scales
    # each neuron's output direction (entropy neurons).
    mlp_out_norm_path: Optional[Str] = None


@config_dataclass
class ModelSettings:
    """Per-model experiment settings of the original code (Knowledge+Truthfulness/config.ini, Refusal/*.py).
    None = not set.

    Layer convention: "layer l" is the output of decoder layer l (HF hidden_states[l + 1]); `refusal_layer` and
    `refusal_apply_layer` are TransformerLens block indices (resid_pre l = the input of decoder layer l).
    """
    probe_layer: Optional[Int] = None  # truthfulness probes; also the last intervened layer
    intervene_layer: Optional[Int] = None  # first layer of the truthfulness intervention (..probe_layer inclusive)
    refusal_layer: Optional[Int] = None  # refusal-direction extraction: resid_pre of this block
    refusal_apply_layer: Optional[Int] = None  # steering hooks (resid_pre/mid/post) on this block
    refusal_pos: Optional[Int] = None  # token position of the extraction (negative, from the end)
    refusal_coef_add: Optional[Float] = None  # addition coefficient on the unit direction
    refusal_coef_sub: Optional[Float] = None  # subtraction coefficient on the unit direction
    # Whose coefficients apply: the steered model's (Llama-3.1) or the direction's source model's (Llama-2-13b,
    # where the original fixes "chat direction 5, base direction 4" whatever the model steered).
    refusal_coef_of: choice("steered_model", "direction_model") = "steered_model"
    # Template used when extracting the direction, if not the model's own (Tulu: the plain base template).
    refusal_extract_template: Optional[Str] = None
    # dtype of the refusal experiment for this model, if not the profile's (the original runs Llama-2-13b(-chat)
    # in float16 where the Llama-3.1 family runs in bfloat16).
    refusal_dtype: Optional[Dtype] = None


@config_dataclass
class ModelSpec:
    key: SkipJsonSchema[Str]  # the model-table key, e.g. "llama-3.1-8b" (set from the table)
    family: Str  # e.g. "llama3"; a base and its post-trained models share it
    role: choice("base", "sft", "instruct")
    source: choice("hub", "gguf", "tiny", "posttrain", "shape")
    arch: Str  # a key of the `architectures` section
    architecture: SkipJsonSchema[Architecture]  # resolved from `arch`
    tokenizer_key: Str  # which tokenizer family patching pairs are built for: llama3, llama2, mistral, gemma3, tiny
    template: Str  # refusal prompt: "chat" or a format string with one "{instruction}" (names resolved)
    adds_bos: Bool  # whether the tokenizer prepends BOS itself (then templates must not contain it)
    hf_id: Optional[Str] = None  # hub: what is downloaded (or a local directory); other sources: origin, provenance
    revision: Optional[Str] = None  # hub: pinned commit sha (or a branch, with revision_pinned: false)
    revision_pinned: Bool = True
    prompt_prefix: Str = ""  # literal text the original prepends to patching prompts (Mistral SFT: "<s> ")
    settings: ModelSettings = field(default_factory=ModelSettings)
    settings_source: choice(*SETTINGS_SOURCES) = "original"
    chosen_settings: tuple[Str, ...] = ()  # for settings_source original: the settings chosen here, not original
    gguf: Optional[dict[Str, Str]] = None  # source gguf: package, version, filename, sha256 (see replication.models.gguf)
    base: Optional[Str] = None  # source posttrain: the model-table key of the model it is trained from
    recipe: Optional[Str] = None  # source posttrain: the post-training recipe name (see replication.posttrain)
    seed: Optional[Int] = None  # source tiny / shape: weight-initialisation seed
    # source shape (set by a profile's random_weights, never in the model table): the real model's config (scaled),
    # its real tokenizer's name and where the config comes from (replication.shapes)
    shape: SkipJsonSchema[Optional[dict[str, Any]]] = None
    # What `ptr sweep` measured when it chose this model's settings, per experiment swept (a record for the reader,
    # not part of the configuration hash: the settings themselves are)
    sweep: dict[Str, dict[Str, Any]] = field(default_factory=dict, compare=False)

    @property
    def layers_path(self) -> str:
        return self.architecture.layers_path

    @property
    def mlp_out_path(self) -> str:
        return self.architecture.mlp_out_path

    @property
    def final_norm_path(self) -> str:
        return self.architecture.final_norm_path

    @property
    def unembed_path(self) -> str:
        return self.architecture.unembed_path

    @property
    def norm_gain_offset(self) -> float:
        return self.architecture.norm_gain_offset

    @property
    def mlp_out_norm_path(self) -> Optional[str]:
        return self.architecture.mlp_out_norm_path


# --------------------------------------------------------------------------------------------------------------
# Profiles


@config_dataclass
class Family:
    base: Str  # model key of the base model
    post: tuple[Str, ...]  # model keys of its post-trained versions


@config_dataclass
class KnowledgeSettings:
    datasets: tuple[KnowledgeDataset, ...]
    max_pairs: Optional[Positive] = None  # pairs per dataset, first N in file order; None = all
    families: Optional[tuple[Str, ...]] = None  # None = every family of the profile
    batch_size: Optional[Positive] = None  # None = the profile's batch_size (pairs per batched forward)
    # patched layers per batched forward (rows = pairs x layers); None = all
    layers_per_batch: Optional[Positive] = None


@config_dataclass
class TruthfulnessSettings:
    datasets: tuple[TrueFalseDataset, ...]  # probe-transfer / intervention datasets (the paper's table columns)
    similarity_datasets: tuple[TrueFalseDataset, ...]  # datasets whose base/post truth directions are compared
    # statements per dataset whose activations are read: the first ceil(N/2) true and floor(N/2) false ones in file
    # order (truthfulness.balanced_head); None = all
    max_statements: Optional[Positive] = None
    # intervention statements (few-shot prompts) per probe dataset, chosen the same way; None = max_statements
    max_intervention_statements: Optional[Positive] = None
    intervention_coef: Float = 1.0
    families: Optional[tuple[Str, ...]] = None
    batch_size: Optional[Positive] = None


@config_dataclass
class RefusalSettings:
    n_train: Positive  # harmful and harmless training instructions each (direction extraction)
    n_test: Positive  # test instructions per kind (steering evaluation)
    max_new_tokens: Positive  # greedy generation length
    # False: keep generating after an end-of-sequence token and keep the text decoded after it, as the original
    # (whose loop always runs max_new_tokens steps); True: a completion ends at its first end token.
    stop_at_eos: Bool = True
    # Beyond the paper: fractions of the addition coefficient at which every direction is also added to each model
    # on the harmless test instructions (a transfer curve; 1.0 is the addition condition itself). It tells a
    # direction that does not transfer from one whose full-strength addition breaks generation.
    transfer_scales: tuple[Float, ...] = ()
    # the first N harmless test instructions the transfer curves are computed on (a curve's points at 0 and 1 are
    # the baseline's and the addition's completions of those N); None = all n_test. The demo's saves time.
    transfer_n_test: Optional[Positive] = field(default=None, metadata=HASHED_WHEN_SET)
    families: Optional[tuple[Str, ...]] = None
    batch_size: Optional[Positive] = None


@config_dataclass
class ConfidenceSettings:
    # keep last-layer neurons with ||w_out|| above the (1 - fraction) quantile
    top_norm_fraction: Annotated[Float, Field(gt=0, le=1)]
    n_neurons: Positive  # then the n with the smallest LogitVar
    datasets: tuple[TrueFalseDataset, ...]  # datasets for output confidence (entropy of the next-token distribution)
    max_statements: Optional[Positive] = None
    families: Optional[tuple[Str, ...]] = None
    batch_size: Optional[Positive] = None
    # datasets (among `datasets`) on which the entropy neurons are mean-ablated (beyond the paper); () = none
    ablation_datasets: tuple[TrueFalseDataset, ...] = ()


@config_dataclass
class Experiments:
    knowledge: KnowledgeSettings
    truthfulness: TruthfulnessSettings
    refusal: RefusalSettings
    confidence: ConfidenceSettings


@config_dataclass
class RandomWeights:
    """Build every model with random weights from its real config (replication/shapes.py), optionally smaller."""
    layers: Optional[Int] = None  # decoder layers; None = the real number
    heads: Optional[Int] = None  # attention heads (hidden size = heads x head_dim); None = the real number


@config_dataclass
class Profile:
    name: Str
    description: Str
    dtype: Dtype
    device: Device
    seed: Int
    batch_size: Positive
    families: dict[Str, Family]
    experiments: Experiments
    random_weights: Optional[RandomWeights] = None
    model_table: SkipJsonSchema[dict[str, ModelSpec]] = field(repr=False, compare=False, default_factory=dict)
    source_path: SkipJsonSchema[Optional[Path]] = field(default=None, repr=False, compare=False)

    def experiment(self, name: str):
        """The settings dataclass of one experiment."""
        _check_choice(name, EXPERIMENTS, "experiment", self.source_path)
        return getattr(self.experiments, name)

    def family_names(self, experiment: Optional[str] = None) -> tuple[str, ...]:
        if experiment is None:
            return tuple(self.families)
        selected = self.experiment(experiment).families
        return tuple(self.families) if selected is None else selected

    def pairs(self, experiment: Optional[str] = None) -> list[tuple[str, str]]:
        """(base_key, post_key) for every post-trained model of the families used (by `experiment`)."""
        return [(self.families[f].base, post) for f in self.family_names(experiment) for post in self.families[f].post]

    def models(self, experiment: Optional[str] = None) -> list[str]:
        """Every model key used (by `experiment`), each once: a family's base, then its post-trained models."""
        keys = [key for f in self.family_names(experiment) for key in (self.families[f].base, *self.families[f].post)]
        return list(dict.fromkeys(keys))

    def posttrained_models(self) -> list[str]:
        """The keys of the profile's models made by the project's own post-training (source posttrain)."""
        return [key for key in self.models() if self.model_spec(key).source == "posttrain"]

    def model_spec(self, key: str) -> ModelSpec:
        _check_choice(key, self.model_table, "model key", MODEL_TABLE)
        return self.model_table[key]

    def missing_settings(self, experiment: str) -> dict[str, list[str]]:
        """{model key: names of the per-model settings `experiment` reads that the model table does not set}."""
        missing = {key: [name for name in REQUIRED_SETTINGS[experiment]
                         if getattr(self.model_spec(key).settings, name) is None]
                   for key in self.models(experiment)}
        return {key: names for key, names in missing.items() if names}

    def check_settings(self, experiment: str) -> None:
        """Refuse, in one line, to run `experiment` on a model whose settings are still to be chosen."""
        for key, names in self.missing_settings(experiment).items():
            profile = self.name if self.source_path is None or self.source_path.parent == PROFILE_DIR \
                else self.source_path
            user = paths.user_model_table()
            raise ConfigError(f"model {key!r} lacks settings.{', settings.'.join(names)} for {experiment}: choose "
                              f"them with `ptr sweep {experiment} --profile {profile}"
                              f"{'' if user else ' --models YOUR_MODELS.yaml'}` (it writes them into "
                              f"{user or 'that file'}), or set them in its model-table entry")

    def batch_size_for(self, experiment: str) -> int:
        return self.experiment(experiment).batch_size or self.batch_size

    def to_dict(self) -> dict[str, Any]:
        """The resolved configuration: profile values plus the full spec of every model it uses."""
        data = {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self) if f.compare}
        data["models"] = {key: _plain(self.model_table[key]) for key in self.models()}
        return data

    def config_hash(self) -> str:
        """sha256 of the canonical JSON of `to_dict()` (provenance: equal hashes = equal configuration)."""
        return _sha256_json(self.to_dict())

    def experiment_hash(self, experiment: str) -> str:
        """sha256 of what one experiment's numbers depend on: its settings, the profile's dtype and seed, and the
        full spec of each of its models. A cube computed under another hash is stale (replication.cubes)."""
        return _sha256_json({"experiment": experiment, "settings": _plain(self.experiment(experiment)),
                             "dtype": self.dtype, "seed": self.seed,
                             "models": {key: _plain(self.model_table[key]) for key in self.models(experiment)}})


def _sha256_json(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


# --------------------------------------------------------------------------------------------------------------
# Loading


@config_dataclass
class ModelTableFile:
    """A model-table file as written: the built-in one, or a user's own (`--models` / PTR_MODELS), whose sections
    may each be left out and whose entries replace the built-in entries of the same name."""
    architectures: dict[Str, Architecture] = field(default_factory=dict)
    templates: dict[Str, Str] = field(default_factory=dict)  # name -> format string with one "{instruction}"
    models: dict[Str, dict[Str, Any]] = field(default_factory=dict)  # key -> a ModelSpec's fields (checked as one)


def load_model_table(path: Optional[Path | str] = None, user: Optional[Path | str] = None) -> dict[str, ModelSpec]:
    """Read and validate the model table: `path` (default: replication/configs/models.yaml) with the user's own
    table `user` (default: the PTR_MODELS file, set by `ptr --models`) merged over it."""
    files = [Path(path) if path else MODEL_TABLE]
    user = user or paths.user_model_table()
    if user:
        files.append(Path(user))
    architectures, templates, entries = {}, {}, {}  # name -> (value, the file it comes from)
    for file in files:
        table = _build(ModelTableFile, _read_yaml(file), "", file)
        architectures |= {name: (arch, file) for name, arch in table.architectures.items()}
        templates |= {name: (_check_template(text, f"templates.{name}", file), file)
                      for name, text in table.templates.items()}
        entries |= {key: (entry, file) for key, entry in table.models.items()}
    if PLAIN not in templates:
        raise ConfigError(f"{files[0]}: the templates section needs a {PLAIN!r} entry (the plain base template)")
    architectures = {name: arch for name, (arch, _) in architectures.items()}
    templates = {name: text for name, (text, _) in templates.items()}
    specs = {key: _model_spec(key, entry, architectures, templates, file) for key, (entry, file) in entries.items()}
    for spec in specs.values():
        _check_posttrain(spec, specs, entries[spec.key][1])
    return specs


def load_profile(name_or_path: str | Path, model_table: Optional[dict[str, ModelSpec]] = None) -> Profile:
    """Read and validate a profile: a name in replication/configs/profiles/ (paper, demo, tiny) or a YAML path."""
    path = _profile_path(name_or_path)
    data = _profile_data(path)
    table = model_table if model_table is not None else load_model_table()
    data.setdefault("name", path.stem)
    for key in ("model_table", "source_path"):  # set here, never by the file
        if key in data:
            raise ConfigError(f"{path}: unknown key {key!r} in the top level. Allowed keys: "
                              f"{', '.join(_file_keys(Profile))}.")
    profile = _build(Profile, {**data, "model_table": table, "source_path": path}, "", path)
    _check_profile(profile, path)
    if profile.random_weights is not None:
        profile = dataclasses.replace(profile, model_table={**table, **_random_weight_specs(profile, path)})
    return profile


@dataclass(frozen=True)
class ProfileRef:
    """Where a profile argument (a name or a YAML path) leads: the profile's name, its file and its results folder.
    `ptr run` writes results/<name>/ whatever the argument was; every reader resolves the argument the same way."""
    name: str  # the file's `name:` key (or that of the profile it extends), else the file's stem
    path: Path  # the profile's YAML file (absolute)
    results: Path  # results/<name>/ (PTR_RESULTS_DIR/<name>/)

    @property
    def arg(self) -> str:
        """The argument that names this profile from any working directory: the name of a profile of
        replication/configs/profiles/, else the file's absolute path."""
        return self.name if self.path == (PROFILE_DIR / f"{self.name}.yaml").resolve() else str(self.path)


def resolve_profile(name_or_path: str | Path) -> ProfileRef:
    """The profile's name and results folder for a profile name or YAML path, without validating the whole
    profile; an unknown name is a ConfigError listing the known ones."""
    path = _profile_path(name_or_path).resolve()
    name = _profile_data(path).get("name", path.stem)
    return ProfileRef(name=str(name), path=path, results=paths.results_dir(str(name)))


def _profile_data(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    """A profile's YAML; `extends: NAME` starts from that profile's values, which this file's values override
    (mappings merged key by key, everything else replaced)."""
    data = _read_yaml(path)
    parent = data.pop("extends", None)
    if parent is None:
        return data
    parent_path = _profile_path(parent)
    if parent_path.resolve() in seen:
        raise ConfigError(f"{path}: 'extends: {parent}' makes a cycle of profiles")
    return _merged(_profile_data(parent_path, (*seen, path.resolve())), data)


def _merged(base: dict, override: dict) -> dict:
    merged = dict(base)
    for key, value in override.items():
        merged[key] = _merged(base[key], value) if isinstance(value, dict) and isinstance(base.get(key), dict) \
            else value
    return merged


def _random_weight_specs(profile: Profile, path: Path) -> dict[str, ModelSpec]:
    """The profile's models as random-weight models of their real shapes (source 'shape'), layer settings mapped
    to the scaled depth."""
    table, scale, specs = shapes.shape_table(), profile.random_weights, {}
    for key in profile.models():
        _check_choice(key, table, "model key (random_weights needs its config)", shapes.SHAPES_FILE)
        spec, entry = profile.model_table[key], table[key]
        config = shapes.scaled_config(entry["config"], scale.layers, scale.heads)
        real_layers, layers = entry["config"]["num_hidden_layers"], config["num_hidden_layers"]
        settings = shapes.scaled_settings(_plain(spec.settings), real_layers, layers)
        specs[key] = dataclasses.replace(
            spec, source="shape", seed=shapes.weight_seed(key, profile.seed),
            settings=_build(ModelSettings, settings, f"models.{key}.settings", path),
            shape={"tokenizer": entry["tokenizer"], "config_source": entry["config_source"], "config": config})
    return specs


def available_profiles() -> list[str]:
    return sorted(p.stem for p in PROFILE_DIR.glob("*.yaml"))


def _profile_path(name_or_path: str | Path) -> Path:
    candidate = Path(name_or_path)
    if candidate.suffix in (".yaml", ".yml"):
        if not candidate.is_file():
            raise ConfigError(f"profile file {candidate} does not exist")
        return candidate
    _check_choice(str(name_or_path), available_profiles(), "profile", PROFILE_DIR)
    return PROFILE_DIR / f"{name_or_path}.yaml"


def _local_directory(hf_id: Any, path: Path) -> Optional[Path]:
    """A hub model's hf_id written as a directory path (/..., ~/..., ./..., ../...; relative to the table file),
    resolved; None for a hub id."""
    if not isinstance(hf_id, str) or not hf_id.startswith(("/", "~", "./", "../")):
        return None
    return (path.parent / Path(hf_id).expanduser()).resolve()


def _model_spec(key: str, entry: dict, architectures: dict, templates: dict, path: Path) -> ModelSpec:
    where = f"models.{key}"
    entry = dict(entry)
    _check_choice(entry.get("arch"), architectures, f"{where}.arch", path)
    entry["architecture"] = architectures[entry["arch"]]
    entry["template"] = _resolve_template(entry.get("template"), templates, f"{where}.template", path)
    settings = dict(_mapping(entry.get("settings", {}), f"{where}.settings", path))
    if settings.get("refusal_extract_template") is not None:
        settings["refusal_extract_template"] = _resolve_template(
            settings["refusal_extract_template"], templates, f"{where}.settings.refusal_extract_template", path)
    entry["settings"] = settings
    local = _local_directory(entry.get("hf_id"), path) if entry.get("source") == "hub" else None
    if local is not None:
        entry["hf_id"] = str(local)
    spec = _build(ModelSpec, {"key": key, **entry}, where, path)

    setting_names = [f.name for f in dataclasses.fields(ModelSettings)]
    for name in spec.chosen_settings:
        _check_choice(name, setting_names, f"{where}.chosen_settings entry", path)
    needed = {"hub": ("hf_id",) if local else ("hf_id", "revision"), "gguf": ("gguf",), "tiny": ("seed",),
              "posttrain": ("base", "recipe"), "shape": ("shape",)}
    for name in needed[spec.source]:
        if getattr(spec, name) is None:
            raise ConfigError(f"{path}: {where}: source {spec.source!r} needs the key {name!r}"
                              + (" (a commit sha; or give hf_id as a local directory, e.g. ./models/NAME)"
                                 if name == "revision" else ""))
    if spec.source == "hub" and not local and spec.revision_pinned \
            and not re.fullmatch(r"[0-9a-f]{40}", spec.revision):
        raise ConfigError(f"{path}: {where}.revision {spec.revision!r} is not a 40-hex commit sha; pin a commit "
                          f"or mark it unpinned with 'revision_pinned: false'")
    if spec.gguf is not None:
        missing = [name for name in ("package", "version", "filename", "sha256") if name not in spec.gguf]
        if missing:
            raise ConfigError(f"{path}: {where}.gguf lacks {', '.join(missing)}")
    return spec


def _check_posttrain(spec: ModelSpec, specs: dict[str, ModelSpec], path: Path) -> None:
    if spec.source != "posttrain":
        return
    where = f"models.{spec.key}.base"
    _check_choice(spec.base, specs, where, path)
    base = specs[spec.base]
    for name in ("family", "arch", "tokenizer_key"):
        if getattr(base, name) != getattr(spec, name):
            raise ConfigError(f"{path}: models.{spec.key}.{name} is {getattr(spec, name)!r} but its base "
                              f"{spec.base!r} has {getattr(base, name)!r}; post-training keeps them")


def _check_profile(profile: Profile, path: Path) -> None:
    """What the schema cannot say: model keys exist and make pairs, experiment family selections exist."""
    table = profile.model_table
    for name, family in profile.families.items():
        where = f"families.{name}"
        for key in (family.base, *family.post):
            _check_choice(key, table, f"{where} model key", path)
        base = table[family.base]
        if base.role != "base":
            raise ConfigError(f"{path}: {where}.base {family.base!r} has role {base.role!r}, not 'base'")
        for key in family.post:
            post = table[key]
            if post.role == "base":
                raise ConfigError(f"{path}: {where}.post {key!r} has role 'base'; list post-trained models only")
            if post.tokenizer_key != base.tokenizer_key:  # cross-model patching uses one set of token ids
                raise ConfigError(f"{path}: {where}: {key!r} has tokenizer_key {post.tokenizer_key!r} but the base "
                                  f"{family.base!r} has {base.tokenizer_key!r}")
    for experiment in EXPERIMENTS:
        for name in getattr(profile.experiments, experiment).families or ():
            _check_choice(name, profile.families, f"experiments.{experiment}.families entry", path)
    refusal = profile.experiments.refusal
    if (refusal.transfer_n_test or 0) > refusal.n_test:
        raise ConfigError(f"{path}: experiments.refusal.transfer_n_test {refusal.transfer_n_test} exceeds n_test "
                          f"{refusal.n_test}: the curves use the first transfer_n_test of the n_test instructions; "
                          f"lower it or remove it")


def _resolve_template(value: Any, templates: dict[str, str], where: str, path: Path) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"{path}: {where} must be a template name ({', '.join([CHAT, *templates])}) or a format "
                          f"string containing '{{instruction}}', got {value!r}")
    if value == CHAT or value in templates:
        return templates.get(value, value)
    if "{instruction}" not in value:
        _check_choice(value, [CHAT, *templates], where, path)
    return _check_template(value, where, path)


def _check_template(text: Any, where: str, path: Path) -> str:
    if not isinstance(text, str) or text.count("{instruction}") != 1:
        raise ConfigError(f"{path}: {where} must be a string containing '{{instruction}}' exactly once, got {text!r}")
    return text


def _read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"configuration file {path} does not exist") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {error}") from None
    return _mapping({} if data is None else data, "the top level", path)


def _mapping(value: Any, where: str, path: Path) -> dict:
    if not isinstance(value, dict):
        raise ConfigError(f"{path}: {where} must be a mapping (key: value), got {type(value).__name__}")
    return value


def _check_choice(value: Any, allowed, what: str, path: Optional[Path]) -> None:
    if value not in allowed:
        raise ConfigError(f"{path}: unknown {what} {value!r}.{_suggest(value, allowed)} "
                          f"Allowed: {', '.join(map(str, allowed))}.")


# --------------------------------------------------------------------------------------------------------------
# Validation: pydantic checks a YAML mapping against a dataclass; its first error becomes one ConfigError line.

# pydantic error type -> what the value must be
EXPECTED = {"int_type": "of type int", "float_type": "of type float", "string_type": "of type str",
            "bool_type": "of type bool", "tuple_type": "a list", "list_type": "a list",
            "dict_type": "a mapping (key: value)", "dataclass_type": "a mapping (key: value)",
            "dataclass_args_type": "a mapping (key: value)"}


@functools.cache
def _adapter(cls) -> TypeAdapter:
    return TypeAdapter(cls)


def _build(cls, data: Any, where: str, path: Path):
    """`cls` from a YAML mapping; `where` is the dotted location of the mapping in the file ("" = top level)."""
    try:
        return _adapter(cls).validate_python(data)
    except ValidationError as error:
        # an unknown key first: a typo also makes its intended key "missing", and the typo is the news
        unknown = ("unexpected_keyword_argument", "extra_forbidden")
        errors = sorted(error.errors(), key=lambda e: e["type"] not in unknown)
        raise ConfigError(f"{path}: {_describe(errors[0], cls, where)}") from None


def _describe(error: dict, cls, where: str) -> str:
    loc, kind, value = error["loc"], error["type"], error.get("input")
    at, parent = _dotted(where, loc), _dotted(where, loc[:-1]) or "the top level"
    if kind in ("unexpected_keyword_argument", "extra_forbidden"):
        allowed = _file_keys(_hint_at(cls, loc[:-1]))
        return (f"unknown key {loc[-1]!r} in {parent}.{_suggest(loc[-1], allowed)} "
                f"Allowed keys: {', '.join(allowed)}.")
    if kind == "missing":
        return f"{parent} lacks the required key {loc[-1]!r}"
    if kind == "value_error":  # a `choice`
        return f"{at} {error['ctx']['error']}"
    if kind == "greater_than" and error["ctx"]["gt"] == 0:
        return f"{at} must be positive (or null where allowed), got {value!r}"
    if kind in EXPECTED:
        return f"{at} must be {EXPECTED[kind]}, got {value!r} ({type(value).__name__})"
    message = error["msg"].removeprefix("Input should be ")  # e.g. "less than or equal to 1"
    return f"{at} must be {message}, got {value!r}" if message != error["msg"] else f"{at}: {message}, got {value!r}"


def _dotted(where: str, loc: tuple) -> str:
    text = where
    for item in loc:
        text += f"[{item}]" if isinstance(item, int) else f".{item}" if text else str(item)
    return text


def _unwrapped(hint: Any) -> Any:
    """The type inside Annotated[...] and Optional[...]."""
    while True:
        origin, args = typing.get_origin(hint), typing.get_args(hint)
        if origin is Annotated:
            hint = args[0]
        elif origin is typing.Union or origin is types.UnionType:
            hint = next(arg for arg in args if arg is not type(None))
        else:
            return hint


def _hint_at(cls, loc: tuple) -> Any:
    """The type at a location of a validation error (dataclass fields, dict values, tuple items)."""
    hint = cls
    for item in loc:
        hint = _unwrapped(hint)
        hint = typing.get_type_hints(hint, include_extras=True)[item] if dataclasses.is_dataclass(hint) \
            else typing.get_args(hint)[-1]
    return _unwrapped(hint)


def _file_keys(cls) -> list[str]:
    """The keys a file may hold for dataclass `cls`: its fields less those set by the loader (SkipJsonSchema)."""
    hints = typing.get_type_hints(cls, include_extras=True)
    return [f.name for f in dataclasses.fields(cls)
            if not any(isinstance(m, SkipJsonSchema) for m in getattr(hints[f.name], "__metadata__", ()))]


def json_schemas() -> dict[str, dict]:
    """JSON schemas of a model-table file and a profile file, for editors (`# yaml-language-server: $schema=...`):
    {file name in configs/schema/: schema}. A profile may `extends:` another and give only what it changes, so its
    schema requires nothing (load_profile checks the merged result)."""
    spec = _adapter(ModelSpec).json_schema()
    table = _adapter(ModelTableFile).json_schema()
    table["$defs"] = {**table.get("$defs", {}), **spec.pop("$defs", {}), "ModelSpec": spec}
    table["properties"]["models"]["additionalProperties"] = {"$ref": "#/$defs/ModelSpec"}
    profile = _without_required(_adapter(Profile).json_schema())
    profile["properties"]["extends"] = {"type": "string", "title": "Extends",
                                        "description": "a profile name or file whose values this file overrides"}
    return {"model-table.schema.json": table, "profile.schema.json": profile}


def _without_required(schema: Any) -> Any:
    if isinstance(schema, dict):
        return {key: _without_required(value) for key, value in schema.items() if key != "required"}
    if isinstance(schema, list):
        return [_without_required(value) for value in schema]
    return schema


def write_json_schemas(directory: Path = SCHEMA_DIR) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, schema in json_schemas().items():
        (directory / name).write_text(json.dumps(schema, indent=2, sort_keys=True) + "\n")
        written.append(directory / name)
    return written


def _plain(value: Any) -> Any:
    """JSON-ready copy of a config value (dataclasses -> dicts, tuples -> lists, paths -> strings; a HASHED_WHEN_SET
    field at its default left out)."""
    if dataclasses.is_dataclass(value):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value) if f.compare
                and not (f.metadata.get("hashed_when_set") and getattr(value, f.name) == f.default)}
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


if __name__ == "__main__":  # python -m replication.config: (re)write the JSON schemas in configs/schema/
    for written in write_json_schemas():
        print(written)
