"""TRUE/FALSE statement pairs for activation patching, for any tokenizer (methods_reference §1.3).

The original (patching_process_data.py) keeps the statements whose token ids match a pattern hard-coded per model
family, e.g. Llama-3 cities "<BOS> The city of [3 tokens] is in [1 token] .", and pairs each TRUE statement with
a FALSE statement ending in the same word. Here the pattern is found from the data instead: a statement fits when
its tokens split cleanly at the template's word boundaries; its pattern is the template words' token ids plus the
subject/object token counts; the most common pattern over the dataset is kept. For Llama-3 this reproduces the
original's hard-coded patterns and pair counts exactly.

A tokenizer is a plain `encode(text) -> list[int]` without BOS.

Statements are tokenized twice. Alone, as the original filters them (its patterns and pair sets); and as they are
tokenized inside the patching prompt, where every statement follows a few-shot line's newline (`in_prompt`). The
two differ for SentencePiece tokenizers: alone a statement starts with "▁" (SentencePiece's dummy prefix), after
a newline it does not, so "▁Fif ty" alone is "F if ty" in the prompt. The original labels the prompt's last tokens
with the alone roles; here the roles (and the patched positions) are the statement's tokens in the prompt. Of the
original's statements, those whose prompt tokenization has another shape than the dataset's most common one are
dropped (the original mislabels them, and stops where a TRUE and a FALSE prompt differ in length);
`labelled_differently_by_original` lists the pairs whose alone roles differ from their prompt roles. For Llama-3
the two tokenizations agree and nothing changes.

Token roles (one label per statement token):
  [s1] [s2] ..  subject tokens         [o1] [o2] ..  object tokens
  The, city ..  template words (a word of n > 1 tokens: word#1 .. word#n)
  tulu_extracted: [k1] [k2] ..  the positions where the TRUE and FALSE token ids differ (the knowledge tokens),
                  [c1] [c2] ..  the positions they share (context).
`KNOWLEDGE_ROLE` matches the subject, object and differing (knowledge) roles.
"""
from __future__ import annotations

import re
from bisect import bisect_right
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from itertools import accumulate
from pathlib import Path

import pandas as pd
import yaml

from data_prep.errors import DataError
from data_prep.truth import truth_datasets

Encode = Callable[[str], list[int]]
PATCHING_YAML = Path(__file__).with_name("patching.yaml")
PAIRINGS = ("last_word", "consecutive_rows")
SLOTS = ("s", "o")
KNOWLEDGE_ROLE = re.compile(r"\[[sok]\d+\]")
_PIECE = re.compile(r" ?\{[so]\}| ?[^ {]+")  # template words; a slot is split off the quotes around it
_SLOT = re.compile(r"( ?)\{([so])\}")
PROMPT_LEAD = "\n"  # what precedes a statement in the patching prompt: the end of the last few-shot line


@dataclass(frozen=True)
class Pair:
    true: str
    false: str
    roles: list[str]  # one label per statement token (both statements have the same number of tokens)


@dataclass(frozen=True)
class PatchingSpec:
    name: str
    pairing: str
    few_shot_true: list[str]
    few_shot_false: list[str]
    template: str | None = None
    fixed_slot_lengths: dict[str, dict[str, int]] = field(default_factory=dict)
    patched_before_statement: int = 0  # prompt tokens right before the statement that are patched too


@dataclass(frozen=True)
class PairSet:
    pairs: list[Pair]
    pattern: dict  # how the pairs were chosen (json-serialisable; stored with the pairs)


@cache
def patching_specs() -> dict[str, PatchingSpec]:
    """patching.yaml, validated on load."""
    doc = yaml.safe_load(PATCHING_YAML.read_text())
    allowed = {"pairing", "template", "few_shot_true", "few_shot_false", "fixed_slot_lengths",
               "patched_before_statement"}
    specs = {}
    for name, entry in doc.items():
        where = f"{PATCHING_YAML}, dataset {name!r}"
        if name not in truth_datasets():
            raise DataError(f"{where}: not a truth dataset; known: {sorted(truth_datasets())}")
        unknown = set(entry) - allowed
        if unknown:
            raise DataError(f"{where}: unknown keys {sorted(unknown)}; allowed keys: {sorted(allowed)}")
        if entry.get("pairing") not in PAIRINGS:
            raise DataError(f"{where}: pairing {entry.get('pairing')!r} is not one of {PAIRINGS}")
        if (entry["pairing"] == "last_word") != ("template" in entry):
            raise DataError(f"{where}: pairing last_word needs a template; consecutive_rows takes none")
        for key in ("few_shot_true", "few_shot_false"):
            if not isinstance(entry.get(key), list) or not all(isinstance(s, str) for s in entry[key]):
                raise DataError(f"{where}: {key} must be a list of statements")
        if "template" in entry:
            template_pieces(entry["template"])
            slots = [m.group(2) for m in _SLOT.finditer(entry["template"])]
            if slots != list(SLOTS):
                raise DataError(f"{where}: template must contain {{s}} then {{o}} once each, got {entry['template']!r}")
        before = entry.get("patched_before_statement", 0)
        if not isinstance(before, int) or before < 0:
            raise DataError(f"{where}: patched_before_statement must be a token count >= 0, got {before!r}")
        for key, lengths in entry.get("fixed_slot_lengths", {}).items():
            if set(lengths) != set(SLOTS) or not all(isinstance(n, int) and n > 0 for n in lengths.values()):
                raise DataError(f"{where}: fixed_slot_lengths[{key!r}] must be {{s: n, o: m}} with n, m >= 1")
        specs[name] = PatchingSpec(name=name, **entry)
    return specs


def patching_spec(name: str) -> PatchingSpec:
    specs = patching_specs()
    if name not in specs:
        raise DataError(f"no patching data for dataset {name!r}; known datasets (data_prep/patching.yaml): "
                        f"{sorted(specs)}")
    return specs[name]


def in_prompt(encode: Encode) -> Encode:
    """`encode` of a statement as it is tokenized inside the patching prompt, after PROMPT_LEAD."""
    lead = encode(PROMPT_LEAD)

    def encode_in_prompt(text: str) -> list[int]:
        tokens = encode(PROMPT_LEAD + text)
        if tokens[:len(lead)] != lead:
            raise DataError(f"the tokenizer merges the newline before a statement with its first characters "
                            f"({text[:30]!r}...); patched positions cannot start at the statement")
        return tokens[len(lead):]

    return encode_in_prompt


# ---- template datasets ----

def template_pieces(template: str) -> list[str]:
    """'The city of {s} is in {o}.' -> ['The', ' city', ' of', ' {s}', ' is', ' in', ' {o}', '.']"""
    pieces = _PIECE.findall(template)
    if "".join(pieces) != template:
        raise DataError(f"template {template!r} cannot be split into words and {{s}}/{{o}} slots "
                        f"(single spaces between words); fix it in {PATCHING_YAML}")
    return pieces


def split_statement(statement: str, pieces: list[str]) -> list[str] | None:
    """The statement's text for each template piece, or None when the statement does not fit the template."""
    regex = "".join(re.escape(m.group(1)) + f"(?P<{m.group(2)}>.+)" if (m := _SLOT.fullmatch(p)) else re.escape(p)
                    for p in pieces)
    match = re.fullmatch(regex, statement)
    if match is None:
        return None
    return [m.group(1) + match.group(m.group(2)) if (m := _SLOT.fullmatch(p)) else p for p in pieces]


def token_pattern(statement: str, pieces: list[str], encode: Encode) -> tuple | None:
    """Per piece: the token ids of a template word, or the token count of a slot. None when the statement does
    not fit the template or its tokens do not split at the piece boundaries (a token spans two pieces)."""
    texts = split_statement(statement, pieces)
    if texts is None:
        return None
    tokens = encode(statement)
    pattern, start, prefix = [], 0, ""
    for piece, text in zip(pieces, texts):
        prefix += text
        prefix_tokens = encode(prefix)
        end = len(prefix_tokens)
        if tokens[:end] != prefix_tokens:
            return None
        pattern.append(end - start if _SLOT.fullmatch(piece) else tuple(tokens[start:end]))
        start = end
    return tuple(pattern)


def slot_lengths(pieces: list[str], pattern: tuple) -> dict[str, int]:
    return {m.group(2): n for p, n in zip(pieces, pattern) if (m := _SLOT.fullmatch(p))}


def pattern_roles(pieces: list[str], pattern: tuple) -> list[str]:
    """Token-role labels of a pattern, e.g. ['The', 'city', 'of', '[s1]', '[s2]', '[s3]', 'is', 'in', '[o1]', '.']"""
    return count_roles(pieces, [part if _SLOT.fullmatch(piece) else len(part) for piece, part in zip(pieces, pattern)])


def count_roles(pieces: list[str], counts: list[int]) -> list[str]:
    """Token-role labels given each piece's token count: [s1].. / [o1].. in slots, the word (word#1.. when it
    takes several tokens) elsewhere."""
    roles = []
    for piece, n in zip(pieces, counts):
        if m := _SLOT.fullmatch(piece):
            roles += [f"[{m.group(2)}{j}]" for j in range(1, n + 1)]
        else:
            word = piece.strip()
            roles += [word] if n == 1 else [f"{word}#{j}" for j in range(1, n + 1)]
    return roles


def offset_roles(template: str, statement: str, token_ends: list[int]) -> list[str] | None:
    """Roles of a statement's tokens from where each token ends (character offset in the statement): a token
    belongs to the template piece holding its last character. None when the statement does not fit the template
    or a piece gets no token of its own (a token spans it)."""
    pieces = template_pieces(template)
    texts = split_statement(statement, pieces)
    if texts is None:
        return None
    bounds = list(accumulate(len(text) for text in texts))  # piece i ends before character bounds[i]
    counts = Counter(bisect_right(bounds, end - 1) for end in token_ends)
    if sorted(counts) != list(range(len(pieces))):
        return None
    return count_roles(pieces, [counts[i] for i in range(len(pieces))])


def choose_pattern(patterns: list[tuple | None], pieces: list[str], fixed: dict[str, int] | None) -> tuple:
    """The most common pattern (ties: the first seen), among those with the `fixed` slot lengths if given."""
    candidates = Counter(p for p in patterns if p is not None and (fixed is None or slot_lengths(pieces, p) == fixed))
    if not candidates:
        raise DataError(f"no statement fits the template pieces {pieces}" +
                        (f" with slot lengths {fixed}" if fixed else "") + "; check data_prep/patching.yaml")
    return candidates.most_common(1)[0][0]


def last_word(statement: str) -> str:
    return statement.strip().split()[-1]


def pair_by_last_word(true_statements: list[str], false_statements: list[str]) -> list[tuple[str, str]]:
    """The original's matching: each TRUE statement (in order) takes a FALSE statement with the same last word,
    popping the pool's last one while more than one is left, else reusing the single one; unmatched TRUE
    statements are dropped."""
    pool: dict[str, list[str]] = {}
    for statement in false_statements:
        pool.setdefault(last_word(statement), []).append(statement)
    pairs = []
    for statement in true_statements:
        candidates = pool.get(last_word(statement))
        if candidates:
            pairs.append((statement, candidates.pop() if len(candidates) > 1 else candidates[0]))
    return pairs


def template_pairs(spec: PatchingSpec, table: pd.DataFrame, encode: Encode, tokenizer_key: str) -> PairSet:
    """The original's selection (the most common pattern of the statements tokenized alone), then, of those, the
    statements with the most common pattern as tokenized in the prompt, paired by last word; roles from the latter."""
    pieces = template_pieces(spec.template)
    patterns = [token_pattern(s, pieces, encode) for s in table["statement"]]
    chosen = choose_pattern(patterns, pieces, spec.fixed_slot_lengths.get(tokenizer_key))
    kept = table[[p == chosen for p in patterns]]
    prompt_patterns = [token_pattern(s, pieces, in_prompt(encode)) for s in kept["statement"]]
    prompt_chosen = choose_pattern(prompt_patterns, pieces, None)
    in_shape = kept[[p == prompt_chosen for p in prompt_patterns]]
    true_statements = in_shape.loc[in_shape["label"] == 1, "statement"].tolist()
    false_statements = in_shape.loc[in_shape["label"] == 0, "statement"].tolist()
    roles = pattern_roles(pieces, prompt_chosen)
    alone_roles = pattern_roles(pieces, chosen)
    pairs = [Pair(t, f, roles) for t, f in pair_by_last_word(true_statements, false_statements)]
    pattern = {
        "pairing": spec.pairing, "template": spec.template, "roles": roles, "alone_roles": alone_roles,
        "slot_lengths": slot_lengths(pieces, prompt_chosen), "alone_slot_lengths": slot_lengths(pieces, chosen),
        "slot_lengths_fixed_by_config": tokenizer_key in spec.fixed_slot_lengths,
        "pieces": [{"piece": p, "tokens": list(part) if isinstance(part, tuple) else part}
                   for p, part in zip(pieces, prompt_chosen)],
        "statements": len(table), "fitting_template": sum(p is not None for p in patterns),
        "matching_pattern": {"true": int((kept["label"] == 1).sum()), "false": int((kept["label"] == 0).sum())},
        "dropped_other_prompt_shape": len(kept) - len(in_shape),
        # The original labels the prompt's last tokens with the alone roles: wrong wherever they differ.
        "labelled_differently_by_original": list(range(len(pairs))) if roles != alone_roles else [],
    }
    return PairSet(pairs, pattern)


# ---- consecutive-row datasets (tulu_extracted) ----

def difference_roles(true_tokens: list[int], false_tokens: list[int]) -> list[str]:
    """[k1].. where the token ids differ, [c1].. where they agree (equal-length token lists)."""
    counts = {"k": 0, "c": 0}
    roles = []
    for t, f in zip(true_tokens, false_tokens, strict=True):
        kind = "k" if t != f else "c"
        counts[kind] += 1
        roles.append(f"[{kind}{counts[kind]}]")
    return roles


def consecutive_pairs(spec: PatchingSpec, table: pd.DataFrame, encode: Encode) -> PairSet:
    """Rows 2k, 2k+1 with equal token counts alone (the original's filter) and in the prompt (else the original's
    run stops: TRUE and FALSE prompts of different lengths); roles from the prompt tokenization. (The original
    finds tulu_extracted's knowledge tokens in the prompt too, after a fixed prefix length; see patching.yaml.)"""
    if len(table) % 2:
        raise DataError(f"{spec.name}: {len(table)} rows; consecutive_rows pairing needs an even number of rows")
    pairs, unequal, unequal_in_prompt = [], 0, 0
    rows = list(zip(table["statement"], table["label"]))
    encode_in_prompt = in_prompt(encode)
    for i in range(0, len(rows), 2):
        (t_statement, t_label), (f_statement, f_label) = rows[i], rows[i + 1]
        if (t_label, f_label) != (1, 0):
            raise DataError(f"{spec.name}: data rows {i + 1} and {i + 2} must be labelled 1 then 0 (a TRUE/FALSE "
                            f"pair), got {t_label} and {f_label}")
        t_tokens, f_tokens = encode(t_statement), encode(f_statement)
        if len(t_tokens) != len(f_tokens):
            unequal += 1
            continue
        t_prompt, f_prompt = encode_in_prompt(t_statement), encode_in_prompt(f_statement)
        if len(t_prompt) != len(f_prompt):
            unequal_in_prompt += 1
            continue
        pairs.append(Pair(t_statement, f_statement, difference_roles(t_prompt, f_prompt)))
    pattern = {"pairing": spec.pairing, "statements": len(table), "row_pairs": len(table) // 2,
               "skipped_unequal_token_length": unequal, "skipped_unequal_token_length_in_prompt": unequal_in_prompt}
    return PairSet(pairs, pattern)


def build_pairs(dataset: str, table: pd.DataFrame, encode: Encode, tokenizer_key: str) -> PairSet:
    """Patching pairs of `dataset` (a statement table with columns statement, label) under one tokenizer."""
    spec = patching_spec(dataset)
    if spec.pairing == "consecutive_rows":
        return consecutive_pairs(spec, table, encode)
    return template_pairs(spec, table, encode, tokenizer_key)


def knowledge_positions(roles: list[str]) -> list[int]:
    """Indices of the subject, object and knowledge ([k..]) tokens."""
    return [i for i, role in enumerate(roles) if KNOWLEDGE_ROLE.fullmatch(role)]
