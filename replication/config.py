"""Configuration: the model table (`configs/models.yaml`) and run profiles (`configs/profiles/*.yaml`).

Both are YAML data, validated on load into frozen dataclasses. Every mistake (an unknown or misspelt key, a wrong
type, an unknown model or dataset name) is a `ConfigError` naming the file, the key, the allowed values and, for
a typo, the closest allowed name. Torch-free, so `analysis` can read profiles too.
"""
from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from replication import shapes
from replication.paths import results_dir

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
MODEL_TABLE = CONFIG_DIR / "models.yaml"
PROFILE_DIR = CONFIG_DIR / "profiles"

PLAIN = "plain"  # template name: "User: {instruction}\nAssistant:" (in the `templates` section of models.yaml)
CHAT = "chat"  # template name: the tokenizer's own chat template, with the generation prompt

EXPERIMENTS = ("knowledge", "truthfulness", "refusal", "confidence")
# Datasets with the hard-coded patching few-shot lines of the original (methods_reference §1.3).
KNOWLEDGE_DATASETS = ("cities", "neg_cities", "larger_than", "smaller_than", "sp_en_trans", "neg_sp_en_trans",
                      "tulu_extracted")
TRUE_FALSE_DATASETS = ("cities", "neg_cities", "larger_than", "smaller_than", "sp_en_trans", "neg_sp_en_trans",
                       "animal_class", "neg_animal_class", "element_symb", "neg_element_symb", "facts",
                       "neg_facts", "inventors", "neg_inventors", "tulu_extracted")
# The per-model settings an experiment reads; a profile may only run an experiment on models that have them.
REQUIRED_SETTINGS = {
    "knowledge": (),
    "truthfulness": ("probe_layer", "intervene_layer"),
    "refusal": ("refusal_layer", "refusal_apply_layer", "refusal_pos", "refusal_coef_add", "refusal_coef_sub"),
    "confidence": (),
}

Dtype = Literal["float32", "bfloat16", "float16"]
Device = Literal["auto", "cpu", "cuda"]


class ConfigError(ValueError):
    """A configuration file is wrong; the message names the file, the key and the fix."""


# --------------------------------------------------------------------------------------------------------------
# Model table


@dataclass(frozen=True)
class Architecture:
    """Module paths inside a Hugging Face *ForCausalLM of one architecture (dotted attribute paths)."""
    layers_path: str  # the decoder-layer list, from the top model
    mlp_out_path: str  # the MLP output projection (W_out), relative to one decoder layer
    final_norm_path: str  # the final RMSNorm, from the top model
    unembed_path: str  # the unembedding W_U, from the top model
    norm_gain_offset: float  # RMSNorm output = x_normed * (offset + weight): 0 for Llama/Mistral/Qwen2, 1 for Gemma
    # The module (relative to one decoder layer) whose output is added to the residual stream after attention:
    # self_attn (o_proj output) for Llama/Mistral/Qwen2, post_attention_layernorm for Gemma3 (refusal steering at
    # TransformerLens resid_mid).
    attn_out_path: str
    # The RMSNorm (relative to one decoder layer) that the MLP output passes through before it joins the residual
    # stream (Gemma3: post_feedforward_layernorm); None = added directly (Llama/Mistral/Qwen2). Its gain scales
    # each neuron's output direction (entropy neurons).
    mlp_out_norm_path: Optional[str] = None


@dataclass(frozen=True)
class ModelSettings:
    """Per-model experiment settings of the original code (methods_reference §1.4, §1.5). None = not set.

    Layer convention: "layer l" is the output of decoder layer l (HF hidden_states[l + 1]); `refusal_layer` and
    `refusal_apply_layer` are TransformerLens block indices (resid_pre l = the input of decoder layer l).
    """
    probe_layer: Optional[int] = None  # truthfulness probes; also the last intervened layer
    intervene_layer: Optional[int] = None  # first layer of the truthfulness intervention (..probe_layer inclusive)
    refusal_layer: Optional[int] = None  # refusal-direction extraction: resid_pre of this block
    refusal_apply_layer: Optional[int] = None  # steering hooks (resid_pre/mid/post) on this block
    refusal_pos: Optional[int] = None  # token position of the extraction (negative, from the end)
    refusal_coef_add: Optional[float] = None  # addition coefficient on the unit direction
    refusal_coef_sub: Optional[float] = None  # subtraction coefficient on the unit direction
    # Whose coefficients apply: the steered model's (Llama-3.1) or the direction's source model's (Llama-2-13b,
    # where the original fixes "chat direction 5, base direction 4" whatever the model steered).
    refusal_coef_of: Literal["steered_model", "direction_model"] = "steered_model"
    # Template used when extracting the direction, if not the model's own (Tulu: the plain base template).
    refusal_extract_template: Optional[str] = None
    # dtype of the refusal experiment for this model, if not the profile's (the original runs Llama-2-13b(-chat)
    # in float16 where the Llama-3.1 family runs in bfloat16).
    refusal_dtype: Optional[Dtype] = None


@dataclass(frozen=True)
class ModelSpec:
    key: str  # the model-table key, e.g. "llama-3.1-8b"
    family: str  # e.g. "llama3"; a base and its post-trained models share it
    role: Literal["base", "sft", "instruct"]
    source: Literal["hub", "gguf", "tiny", "posttrain", "shape"]
    arch: str  # a key of the `architectures` section
    architecture: Architecture  # resolved from `arch`
    tokenizer_key: str  # which tokenizer family patching pairs are built for: llama3, llama2, mistral, gemma3, tiny
    template: str  # refusal prompt: "chat" or a format string with one "{instruction}" (names resolved)
    adds_bos: bool  # whether the tokenizer prepends BOS itself (then templates must not contain it)
    hf_id: Optional[str] = None  # hub: what is downloaded (or a local directory); other sources: origin, provenance
    revision: Optional[str] = None  # hub: pinned commit sha (or a branch, with revision_pinned: false)
    revision_pinned: bool = True
    prompt_prefix: str = ""  # literal text the original prepends to patching prompts (Mistral SFT: "<s> ")
    settings: ModelSettings = field(default_factory=ModelSettings)
    settings_source: Literal["original", "chosen", "provisional", "sweep"] = "original"
    chosen_settings: tuple[str, ...] = ()  # for settings_source original: the settings chosen here, not original
    gguf: Optional[dict[str, str]] = None  # source gguf: package, version, filename, sha256 (see replication.gguf)
    base: Optional[str] = None  # source posttrain: the model-table key of the model it is trained from
    recipe: Optional[str] = None  # source posttrain: the post-training recipe name (see replication.posttrain)
    seed: Optional[int] = None  # source tiny / shape: weight-initialisation seed
    # source shape (set by a profile's random_weights, never in the model table): the real model's config (scaled),
    # its real tokenizer's name and where the config comes from (replication.shapes)
    shape: Optional[dict[str, Any]] = None

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


@dataclass(frozen=True)
class Family:
    base: str  # model key of the base model
    post: tuple[str, ...]  # model keys of its post-trained versions


@dataclass(frozen=True)
class KnowledgeSettings:
    datasets: tuple[str, ...]
    max_pairs: Optional[int] = None  # pairs per dataset, first N in file order; None = all
    families: Optional[tuple[str, ...]] = None  # None = every family of the profile
    batch_size: Optional[int] = None  # None = the profile's batch_size (pairs per batched forward)
    layers_per_batch: Optional[int] = None  # patched layers per batched forward (rows = pairs x layers); None = all


@dataclass(frozen=True)
class TruthfulnessSettings:
    datasets: tuple[str, ...]  # probe-transfer / intervention datasets (the paper's table columns)
    similarity_datasets: tuple[str, ...]  # datasets whose base/post truth directions are compared
    # statements per dataset whose activations are read: the first ceil(N/2) true and floor(N/2) false ones in file
    # order (truthfulness.balanced_head); None = all
    max_statements: Optional[int] = None
    # intervention statements (few-shot prompts) per probe dataset, chosen the same way; None = max_statements
    max_intervention_statements: Optional[int] = None
    intervention_coef: float = 1.0
    families: Optional[tuple[str, ...]] = None
    batch_size: Optional[int] = None


@dataclass(frozen=True)
class RefusalSettings:
    n_train: int  # harmful and harmless training instructions each (direction extraction)
    n_test: int  # test instructions per kind (steering evaluation)
    max_new_tokens: int  # greedy generation length
    # False: keep generating after an end-of-sequence token and keep the text decoded after it, as the original
    # (whose loop always runs max_new_tokens steps); True: a completion ends at its first end token.
    stop_at_eos: bool = True
    # Beyond the paper: fractions of the addition coefficient at which every direction is also added to each model
    # on the harmless test instructions (a transfer curve; 1.0 is the addition condition itself). It tells a
    # direction that does not transfer from one whose full-strength addition breaks generation.
    transfer_scales: tuple[float, ...] = ()
    families: Optional[tuple[str, ...]] = None
    batch_size: Optional[int] = None


@dataclass(frozen=True)
class ConfidenceSettings:
    top_norm_fraction: float  # keep last-layer neurons with ||w_out|| above the (1 - fraction) quantile
    n_neurons: int  # then the n with the smallest LogitVar
    datasets: tuple[str, ...]  # datasets for output confidence (entropy of the next-token distribution)
    max_statements: Optional[int] = None
    families: Optional[tuple[str, ...]] = None
    batch_size: Optional[int] = None
    # datasets (among `datasets`) on which the entropy neurons are mean-ablated (beyond the paper); () = none
    ablation_datasets: tuple[str, ...] = ()


@dataclass(frozen=True)
class Experiments:
    knowledge: KnowledgeSettings
    truthfulness: TruthfulnessSettings
    refusal: RefusalSettings
    confidence: ConfidenceSettings


@dataclass(frozen=True)
class RandomWeights:
    """Build every model with random weights from its real config (replication/shapes.py), optionally smaller."""
    layers: Optional[int] = None  # decoder layers; None = the real number
    heads: Optional[int] = None  # attention heads (hidden size = heads x head_dim); None = the real number


@dataclass(frozen=True)
class Profile:
    name: str
    description: str
    dtype: Dtype
    device: Device
    seed: int
    batch_size: int
    families: dict[str, Family]
    experiments: Experiments
    random_weights: Optional[RandomWeights] = None
    model_table: dict[str, ModelSpec] = field(repr=False, compare=False, default_factory=dict)
    source_path: Optional[Path] = field(default=None, repr=False, compare=False)

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


def load_model_table(path: Optional[Path | str] = None) -> dict[str, ModelSpec]:
    """Read and validate the model table (default: replication/configs/models.yaml)."""
    path = Path(path) if path else MODEL_TABLE
    data = _read_yaml(path)
    _check_keys(data, ("architectures", "templates", "models"), "the top level", path)
    architectures = {name: _build(Architecture, entry, f"architectures.{name}", path)
                     for name, entry in _mapping(data.get("architectures"), "architectures", path).items()}
    templates = {name: _check_template(text, f"templates.{name}", path)
                 for name, text in _mapping(data.get("templates"), "templates", path).items()}
    if PLAIN not in templates:
        raise ConfigError(f"{path}: the templates section needs a {PLAIN!r} entry (the plain base template)")
    specs = {key: _model_spec(key, entry, architectures, templates, path)
             for key, entry in _mapping(data.get("models"), "models", path).items()}
    for spec in specs.values():
        _check_posttrain(spec, specs, path)
    return specs


def load_profile(name_or_path: str | Path, model_table: Optional[dict[str, ModelSpec]] = None) -> Profile:
    """Read and validate a profile: a name in replication/configs/profiles/ (paper, demo, tiny) or a YAML path."""
    path = _profile_path(name_or_path)
    data = _profile_data(path)
    table = model_table if model_table is not None else load_model_table()
    data.setdefault("name", path.stem)
    profile = _build(Profile, data, "", path, skip=("model_table", "source_path"))
    profile = dataclasses.replace(profile, model_table=table, source_path=path)
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
    return ProfileRef(name=str(name), path=path, results=results_dir(str(name)))


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


def _model_spec(key: str, entry: Any, architectures: dict, templates: dict, path: Path) -> ModelSpec:
    where = f"models.{key}"
    entry = dict(_mapping(entry, where, path))
    _check_choice(entry.get("arch"), architectures, f"{where}.arch", path)
    entry["architecture"] = architectures[entry["arch"]]
    entry["template"] = _resolve_template(entry.get("template"), templates, f"{where}.template", path)
    settings = dict(_mapping(entry.get("settings", {}), f"{where}.settings", path))
    if settings.get("refusal_extract_template") is not None:
        settings["refusal_extract_template"] = _resolve_template(
            settings["refusal_extract_template"], templates, f"{where}.settings.refusal_extract_template", path)
    entry["settings"] = settings
    spec = _build(ModelSpec, {"key": key, **entry}, where, path)

    setting_names = [f.name for f in dataclasses.fields(ModelSettings)]
    for name in spec.chosen_settings:
        _check_choice(name, setting_names, f"{where}.chosen_settings entry", path)
    needed = {"hub": ("hf_id", "revision"), "gguf": ("gguf",), "tiny": ("seed",), "posttrain": ("base", "recipe"),
              "shape": ("shape",)}
    for name in needed[spec.source]:
        if getattr(spec, name) is None:
            raise ConfigError(f"{path}: {where}: source {spec.source!r} needs the key {name!r}")
    if spec.source == "hub" and spec.revision_pinned and not re.fullmatch(r"[0-9a-f]{40}", spec.revision):
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
    if profile.batch_size <= 0:
        raise ConfigError(f"{path}: batch_size must be positive, got {profile.batch_size}")
    fraction = profile.experiments.confidence.top_norm_fraction
    if not 0 < fraction <= 1:
        raise ConfigError(f"{path}: experiments.confidence.top_norm_fraction must be in (0, 1], got {fraction}")
    for experiment in EXPERIMENTS:
        settings = getattr(profile.experiments, experiment)
        where = f"experiments.{experiment}"
        for name in ("batch_size", "max_pairs", "max_statements", "max_intervention_statements", "n_train", "n_test",
                     "max_new_tokens", "n_neurons", "layers_per_batch"):
            value = getattr(settings, name, None)
            if value is not None and value <= 0:
                raise ConfigError(f"{path}: {where}.{name} must be positive (or null where allowed), got {value}")
        for name in settings.families or ():
            _check_choice(name, profile.families, f"{where}.families entry", path)
        allowed = KNOWLEDGE_DATASETS if experiment == "knowledge" else TRUE_FALSE_DATASETS
        for key in ("datasets", "similarity_datasets", "ablation_datasets"):
            for dataset in getattr(settings, key, ()):
                _check_choice(dataset, allowed, f"{where}.{key} entry", path)
        for key in profile.models(experiment):
            missing = [s for s in REQUIRED_SETTINGS[experiment] if getattr(table[key].settings, s) is None]
            if missing:
                raise ConfigError(f"{path}: {where} runs model {key!r}, which lacks "
                                  f"settings.{', settings.'.join(missing)} in the model table ({MODEL_TABLE.name}); "
                                  f"add them there or leave its family out of {where}.families")


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


# --------------------------------------------------------------------------------------------------------------
# Generic validation: YAML mapping -> frozen dataclass, checking keys and types against the type hints.


def _read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"configuration file {path} does not exist") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {error}") from None
    return _mapping(data, "the top level", path)


def _mapping(value: Any, where: str, path: Path) -> dict:
    if not isinstance(value, dict):
        raise ConfigError(f"{path}: {where} must be a mapping (key: value), got {type(value).__name__}")
    return value


def _suggest(value: str, allowed) -> str:
    close = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1)
    return f" Did you mean {close[0]!r}?" if close else ""


def _check_choice(value: Any, allowed, what: str, path: Optional[Path]) -> None:
    if value not in allowed:
        raise ConfigError(f"{path}: unknown {what} {value!r}.{_suggest(value, allowed)} "
                          f"Allowed: {', '.join(map(str, allowed))}.")


def _check_keys(data: dict, allowed, where: str, path: Path) -> None:
    for key in data:
        if key not in allowed:
            raise ConfigError(f"{path}: unknown key {key!r} in {where}.{_suggest(key, allowed)} "
                              f"Allowed keys: {', '.join(allowed)}.")


def _build(cls, data: Any, where: str, path: Path, skip: tuple[str, ...] = ()):
    """`cls` from a YAML mapping; `where` is the dotted location of the mapping in the file ("" = top level)."""
    data = _mapping(data, where or "the top level", path)
    hints = typing.get_type_hints(cls)
    fields = [f for f in dataclasses.fields(cls) if f.name not in skip]
    _check_keys(data, [f.name for f in fields], where or "the top level", path)
    values = {}
    for f in fields:
        if f.name in data:
            values[f.name] = _coerce(data[f.name], hints[f.name], f"{where}.{f.name}".lstrip("."), path)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{path}: {where or 'the top level'} lacks the required key {f.name!r}")
    return cls(**values)


def _coerce(value: Any, hint: Any, where: str, path: Path) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return value if isinstance(value, hint) else _build(hint, value, where, path)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{path}: {where} is {value!r}; allowed values: {', '.join(map(repr, args))}."
                              f"{_suggest(value, args)}")
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(value, inner, where, path)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: {where} must be a list, got {value!r}")
        return tuple(_coerce(v, args[0], f"{where}[{i}]", path) for i, v in enumerate(value))
    if origin is dict:
        return {_coerce(k, args[0], where, path): _coerce(v, args[1], f"{where}.{k}", path)
                for k, v in _mapping(value, where, path).items()}
    if hint is Path:
        return Path(value)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise ConfigError(f"{path}: {where} must be of type {hint.__name__}, got {value!r} "
                          f"({type(value).__name__})")
    return value


def _plain(value: Any) -> Any:
    """JSON-ready copy of a config value (dataclasses -> dicts, tuples -> lists, paths -> strings)."""
    if dataclasses.is_dataclass(value):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value) if f.compare}
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value
