"""Knowledge: where base and post-trained models store facts, by activation patching (methods_reference §1.3).

For every (BASE, POST) pair of the profile and every dataset, four maps of patch effects
(replication.mechanics.patching): each model's own (TRUE and FALSE prompts in the same model), and cross-model
patching both ways, TRUE states of BASE patched into POST's FALSE run ("forward") and of POST into BASE's
("backward"). One cube unit per (source model, target model, dataset) in results/<profile>/knowledge.zarr:

    patch_effect     (pair, layer, position)  logit(' TRUE') - logit(' FALSE') after the patch, float32
    role             (pair, position)         token role: [s1].. subject, [o1].. object, [k1]/[c1].. for
                                              tulu_extracted, template words, then This / statement / is / :
    is_knowledge     (pair, position)         subject, object or (tulu_extracted) differing token
    true_logit_diff  (pair)                   unpatched TRUE run of the source model
    false_logit_diff (pair)                   unpatched FALSE run of the target model
    true_statement, false_statement (pair)
  coords: pair (index into the dataset's pairs), layer, position (offset from the last token: -n .. -1; a pair
  with fewer tokens, possible in tulu_extracted, is NaN / '' in the front positions), and the scalars
  source_model, target_model, dataset. attrs: direction (own/forward/backward), map_kind, n_pairs, answer_ids.

One model is held at a time: a cross-model map needs of its source model only the unpatched TRUE runs
(replication.mechanics.patching.true_run), so a pair's models are loaded in turn: BASE makes its TRUE runs, POST
makes its own and patches its own map and the forward map, BASE again patches its own map and the backward map.
A model's TRUE runs are made once for its own map and its cross-model map (where their tokens agree) and kept on
the CPU until their target is loaded; the two maps into a model share its unpatched FALSE runs and their patched
rows share forwards (at most `batch_size` pairs in all). A 13B pair then fits a GPU that holds one 13B model; the
kept runs take layers x n_toks x hidden numbers per pair (about 6 MB per pair for Llama-2-13B in bf16).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import xarray as xr
from replication.progress import progress_bar

from data_prep.datasets import read_pairs
from data_prep.errors import DataError
from data_prep.pairs import KNOWLEDGE_ROLE, Pair, difference_roles, offset_roles, patching_spec
from data_prep.paths import results_dir
from data_prep.prompts import SUFFIX, patching_prompts
from replication.config import ModelSpec, Profile
from replication.cubes import CubeStore, now
from replication.mechanics.forward import answer_token_ids
from replication.mechanics.patching import PatchModel, TrueRun, patch_true_runs, true_run
from replication.models import load_model, load_tokenizer, release, resolve_device
from replication.provenance import provenance

EXPERIMENT = "knowledge"


@dataclass(frozen=True)
class TokenizedPair:
    true_ids: list[int]  # the TRUE prompt as the source model tokenizes it
    false_ids: list[int]  # the FALSE prompt as the target model tokenizes it
    roles: list[str]  # one label per patched position: tokens patched before the statement, the statement's
    # token roles, then the suffix tokens

    @property
    def n_toks(self) -> int:
        return len(self.roles)


def unit_name(source: str, target: str, dataset: str) -> str:
    return f"{source}__{target}__{dataset}"


def prompt_prefix(source: ModelSpec, target: ModelSpec) -> str:
    """Literal text put before the prompts. The original gives both models the Mistral SFT's prompts ("<s> ...")
    whenever that model is one of the two, otherwise the first model's."""
    return source.prompt_prefix or target.prompt_prefix


@dataclass(frozen=True)
class PromptTokens:
    ids: list[int]
    ends: list[int]  # where each token ends, in characters from the statement's start
    first: int  # the first token inside the statement
    suffix: int  # the first token of SUFFIX


def prompt_tokens(tokenizer, prompt: str, statement: str) -> PromptTokens:
    """A prompt ending in `statement` + SUFFIX, tokenized with character offsets: a token belongs where its last
    character is (special tokens have no characters)."""
    encoded = tokenizer(prompt, return_offsets_mapping=True)
    start = len(prompt) - len(statement + SUFFIX)
    ends = [b - start if b > a else -start for a, b in encoded.offset_mapping]
    first = next(i for i, end in enumerate(ends) if end > 0)
    suffix = next(i for i, end in enumerate(ends) if end > len(statement))
    return PromptTokens(encoded.input_ids, ends, first, suffix)


def statement_roles(dataset: str, pair: Pair, true_ids: list[int], false_ids: list[int],
                    token_ends: tuple[list[int], list[int]]) -> list[str] | None:
    """Roles of the statement tokens as the prompt tokenizes them: by template piece (from each token's end, in
    characters from the statement's start; both statements must agree), or where TRUE and FALSE ids differ."""
    spec = patching_spec(dataset)
    if spec.pairing == "consecutive_rows":
        return difference_roles(true_ids, false_ids)
    roles = [offset_roles(spec.template, statement, ends) for statement, ends in zip((pair.true, pair.false),
                                                                                     token_ends)]
    return roles[0] if roles[0] == roles[1] else None


def token_role(tokenizer, token_id: int) -> str:
    """A prompt token's role: its text, stripped ("This", ":"), or escaped where it is blank ("\\n")."""
    text = tokenizer.decode([token_id])
    return text.strip() or text.encode("unicode_escape").decode()


def tokenize_pair(source_tokenizer, target_tokenizer, dataset: str, pair: Pair, true_prompt: str,
                  false_prompt: str, prefix: str) -> TokenizedPair:
    """Token ids of the TRUE prompt for the source model and of the FALSE prompt for the target model (each model
    tokenizes its own prompt, as the original's model.trace(prompt) does), and the roles of the patched positions:
    the statement's tokens in the prompt (character offsets) after the dataset's patched_before_statement
    tokens, then the suffix tokens. Checked: equal lengths,
    every token before the statement shared (the few-shot prefix, never patched), roles as the pairs were built."""
    where = f"patching pair {pair.true!r} / {pair.false!r}"
    true, false = (prompt_tokens(target_tokenizer, prefix + prompt, statement)
                   for prompt, statement in ((true_prompt, pair.true), (false_prompt, pair.false)))
    first, suffix = false.first, false.suffix
    if len(true.ids) != len(false.ids) or (true.first, true.suffix) != (first, suffix) \
            or true.ids[:first] != false.ids[:first]:
        raise DataError(f"{where}: the TRUE and FALSE prompts do not tokenize to a shared prefix of equal length "
                        f"followed by the statement and suffix (TRUE prompt {len(true.ids)} tokens, statement at "
                        f"{true.first}; FALSE prompt {len(false.ids)}, statement at {first})")
    roles = statement_roles(dataset, pair, true.ids[first:suffix], false.ids[first:suffix],
                            (true.ends[first:suffix], false.ends[first:suffix]))
    if roles != pair.roles:
        raise DataError(f"{where}: in the prompt the statement's tokens have roles {roles}, the pairs say "
                        f"{pair.roles}; were the pairs built with this tokenizer? Rebuild them with `ptr data`")
    start = first - patching_spec(dataset).patched_before_statement
    roles = ([token_role(target_tokenizer, i) for i in false.ids[start:first]] + roles
             + [token_role(target_tokenizer, i) for i in false.ids[suffix:]])
    source = prompt_tokens(source_tokenizer, prefix + true_prompt, pair.true)
    if (len(source.ids), source.first, source.suffix) != (len(true.ids), first, suffix):
        raise DataError(f"{where}: the source model tokenizes the TRUE prompt to {len(source.ids)} tokens "
                        f"(statement at {source.first}), the target model to {len(true.ids)} (statement at {first}); "
                        f"patched positions would not align (prompt prefix {prefix!r})")
    return TokenizedPair(source.ids, false.ids, roles)


def dataset_pairs(profile: Profile, spec: ModelSpec, dataset: str) -> list[Pair]:
    """The first max_pairs pairs of the dataset, in file order."""
    pairs = read_pairs(spec.tokenizer_key, dataset)
    return pairs[:profile.experiment(EXPERIMENT).max_pairs]


def batches(tokens: list[TokenizedPair], pairs_per_batch: int) -> list[list[int]]:
    """Pair indices in batches of equal prompt length and statement length (no padding needed)."""
    by_shape: dict[tuple[int, int], list[int]] = {}
    for i, pair in enumerate(tokens):
        by_shape.setdefault((len(pair.false_ids), pair.n_toks), []).append(i)
    return [group[start:start + pairs_per_batch] for group in by_shape.values()
            for start in range(0, len(group), pairs_per_batch)]


def source_runs(source: PatchModel, tokens: list[TokenizedPair], pairs_per_batch: int) -> list[TrueRun]:
    """The source model's TRUE runs, one per batch of `batches`, on the CPU."""
    return [true_run(source, torch.tensor([tokens[i].true_ids for i in batch]), tokens[batch[0]].n_toks).to("cpu")
            for batch in batches(tokens, pairs_per_batch)]


def patch_dataset(runs: list[list[TrueRun]], target: PatchModel, tokens: list[TokenizedPair], *,
                  pairs_per_batch: int, layers_per_batch: int | None, progress: bool = True, desc: str = ""
                  ) -> list[dict[str, np.ndarray]]:
    """Patch effects of every pair from the TRUE runs (`source_runs`) of one or more source models into `target`,
    aligned on the last token, one result per source: effects [pairs, layers, n_max] (NaN in front for pairs
    with fewer tokens) and the unpatched logit differences [pairs]. The sources share each forward, a batch's
    pairs split so that a forward holds at most `pairs_per_batch` pairs in all."""
    n_max = max(pair.n_toks for pair in tokens)
    results = [{"effects": np.full((len(tokens), len(target.layers), n_max), np.nan, dtype=np.float32),
                "true_logit_diff": np.empty(len(tokens), dtype=np.float32),
                "false_logit_diff": np.empty(len(tokens), dtype=np.float32)} for _ in runs]
    per_forward = max(1, pairs_per_batch // len(runs))
    for batch, batch_runs in progress_bar(list(zip(batches(tokens, pairs_per_batch), zip(*runs), strict=True)),
                                          desc=desc, unit="batch", leave=False, enabled=progress):
        n_toks = tokens[batch[0]].n_toks
        for start in range(0, len(batch), per_forward):
            part, selected = batch[start:start + per_forward], slice(start, start + per_forward)
            patched = patch_true_runs([run.pairs(selected) for run in batch_runs], target,
                                      torch.tensor([tokens[i].false_ids for i in part]), n_toks, layers_per_batch)
            for result, effects in zip(results, patched, strict=True):
                result["effects"][part, :, n_max - n_toks:] = effects.effects.cpu().numpy()
                result["true_logit_diff"][part] = effects.true_logit_diff.cpu().numpy()
                result["false_logit_diff"][part] = effects.false_logit_diff.cpu().numpy()
    return results


def unit_dataset(source_key: str, target_key: str, dataset: str, direction: str, pairs: list[Pair],
                 tokens: list[TokenizedPair], patched: dict[str, np.ndarray], answer_ids: tuple[int, int]
                 ) -> xr.Dataset:
    n_layers, n_max = patched["effects"].shape[1:]
    roles = np.array([[""] * (n_max - t.n_toks) + t.roles for t in tokens], dtype=object)
    is_knowledge = np.vectorize(lambda role: bool(KNOWLEDGE_ROLE.fullmatch(role)), otypes=[bool])(roles)
    # tulu_extracted pairs differ in length and knowledge positions: the original maps it to three columns.
    map_kind = "knowledge_others_last" if patching_spec(dataset).pairing == "consecutive_rows" else "positions"
    return xr.Dataset(
        {"patch_effect": (("pair", "layer", "position"), patched["effects"]),
         "role": (("pair", "position"), roles),
         "is_knowledge": (("pair", "position"), is_knowledge),
         "true_logit_diff": ("pair", patched["true_logit_diff"]),
         "false_logit_diff": ("pair", patched["false_logit_diff"]),
         "true_statement": ("pair", np.array([p.true for p in pairs], dtype=object)),
         "false_statement": ("pair", np.array([p.false for p in pairs], dtype=object))},
        coords={"pair": np.arange(len(pairs)), "layer": np.arange(n_layers), "position": np.arange(-n_max, 0),
                "source_model": source_key, "target_model": target_key, "dataset": dataset},
        attrs={"direction": direction, "map_kind": map_kind, "n_pairs": len(pairs), "answer_ids": list(answer_ids),
               "metric": "logit(' TRUE') - logit(' FALSE') at the last position of the patched FALSE run"},
    )


def unit_plan(profile: Profile) -> list[tuple[tuple[str, str], list[tuple[str, str, str]]]]:
    """Per (BASE, POST) pair of the profile, its (source, target, direction) runs: own maps, forward, backward."""
    return [((base, post), [(base, base, "own"), (post, post, "own"), (base, post, "forward"),
                            (post, base, "backward")])
            for base, post in profile.pairs(EXPERIMENT)]


def check_answer_ids(tokenizers: dict, keys: tuple[str, ...]) -> None:
    """Patching compares logit(' TRUE') - logit(' FALSE') across models: their tokenizers must agree on the ids."""
    ids = {key: answer_token_ids(tokenizers[key]) for key in keys}
    if len(set(ids.values())) > 1:
        raise ValueError(f"the models {', '.join(keys)} tokenize ' TRUE' / ' FALSE' differently: {ids}")


@dataclass
class MapInputs:
    """One map's pairs, their tokens and, once its source model has run, the source's TRUE runs."""
    pairs: list[Pair]
    tokens: list[TokenizedPair]
    runs: list[TrueRun] | None = None


def map_inputs(profile: Profile, source_spec: ModelSpec, target_spec: ModelSpec, tokenizers: dict, dataset: str
               ) -> MapInputs:
    """Every pair of `dataset` for a map from `source_spec` to `target_spec`, tokenized by each model's tokenizer."""
    pairs = dataset_pairs(profile, target_spec, dataset)
    prefix = prompt_prefix(source_spec, target_spec)
    prompts = patching_prompts(dataset, pairs, seed=profile.seed)
    tokens = [tokenize_pair(tokenizers[source_spec.key], tokenizers[target_spec.key], dataset, pair, *prompt, prefix)
              for pair, prompt in zip(pairs, prompts)]
    return MapInputs(pairs, tokens)


Map = tuple[str, str, str, str]  # (source, target, direction, dataset)


def patching_units(profile: Profile, target: PatchModel, maps: list[Map], inputs: list[MapInputs],
                   progress: bool = True) -> list[xr.Dataset]:
    """Maps into `target` with the same FALSE prompts (one dataset): their sources' TRUE runs (`inputs[i].runs`)
    patched into `target`'s FALSE runs in shared forwards, every pair of the dataset; one unit per map."""
    (_, target_key, _, dataset), tokens = maps[0], inputs[0].tokens
    patched = patch_dataset([i.runs for i in inputs], target, tokens,
                            pairs_per_batch=profile.batch_size_for(EXPERIMENT),
                            layers_per_batch=profile.experiment(EXPERIMENT).layers_per_batch, progress=progress,
                            desc=" + ".join(unit_name(*m[:2], dataset) for m in maps))
    return [unit_dataset(source, target_key, dataset, direction, i.pairs, i.tokens, result, target.answer_ids)
            for (source, _, direction, _), i, result in zip(maps, inputs, patched, strict=True)]


def patch_groups(todo: dict[Map, MapInputs | None], key: str) -> list[list[Map]]:
    """The maps into model `key` that can be patched now, in groups that share forwards: per dataset, once every
    map into `key` has its TRUE runs (a model's own map waits for the cross-model map into it), split by FALSE
    prompt tokens (maps with another prompt prefix, the Mistral SFT's, run apart)."""
    by_dataset: dict[str, list[Map]] = {}
    for m in todo:
        if m[1] == key:
            by_dataset.setdefault(m[3], []).append(m)
    groups = []
    for maps in by_dataset.values():
        if all(todo[m] is not None for m in maps):
            by_tokens: dict[tuple, list[Map]] = {}
            for m in maps:
                by_tokens.setdefault(tuple((tuple(t.false_ids), t.n_toks) for t in todo[m].tokens), []).append(m)
            groups += by_tokens.values()
    return groups


def run(profile: Profile, *, progress: bool = True) -> Path:
    """Every knowledge unit of the profile not yet in the cube, one model in memory at a time; returns the cube
    path."""
    specs = {key: profile.model_spec(key) for key in profile.models(EXPERIMENT)}
    store = CubeStore(results_dir(profile.name) / f"{EXPERIMENT}.zarr",
                      provenance=provenance(profile, specs.values(), dtype=profile.dtype,
                                            device=resolve_device(profile.device), seed=profile.seed,
                                            experiment=EXPERIMENT))
    tokenizers = {key: load_tokenizer(spec) for key, spec in specs.items()}
    for (base, post), runs in unit_plan(profile):
        # A base's own maps, shared by its post-trained models, are done with the first of them.
        todo = {(source, target, direction, dataset): None for source, target, direction in runs
                for dataset in profile.experiment(EXPERIMENT).datasets
                if not store.has_unit(unit_name(source, target, dataset))}
        check_answer_ids(tokenizers, (base, post))
        for key in (base, post, base):  # BASE again for the backward maps (POST's runs into BASE)
            # loaded when it has TRUE runs to make or maps into it to patch (its own maps wait for the cross-model
            # maps into it: they share forwards)
            if not any(source == key and inputs is None for (source, *_), inputs in todo.items()) \
                    and not patch_groups(todo, key):
                continue
            model = PatchModel.from_spec(load_model(specs[key], dtype=profile.dtype, device=profile.device),
                                         specs[key])
            true_runs = {}  # this model's TRUE runs by their tokens: its own map and its cross-model map share them
            for (source, target, direction, dataset), inputs in list(todo.items()):
                if source == key and inputs is None:
                    inputs = map_inputs(profile, specs[source], specs[target], tokenizers, dataset)
                    true_ids = tuple(tuple(pair.true_ids) for pair in inputs.tokens)
                    if true_ids not in true_runs:
                        true_runs[true_ids] = source_runs(model, inputs.tokens, profile.batch_size_for(EXPERIMENT))
                    inputs.runs = true_runs[true_ids]
                    todo[(source, target, direction, dataset)] = inputs
            for maps in progress_bar(patch_groups(todo, key), desc=f"knowledge {key}", unit="dataset",
                                     enabled=progress):
                started = now()
                units = patching_units(profile, model, maps, [todo[m] for m in maps], progress)
                for m, unit in zip(maps, units, strict=True):
                    store.write_unit(unit_name(*m[:2], m[3]), unit, started_at=started)
                    del todo[m]
            del model
            release()
    store.update_attrs(finished_at=now())
    return store.path
