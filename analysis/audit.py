"""The audit: measured numbers beside the paper's published ones, and the paper's qualitative claims checked.

Published numbers, tolerances, claims and the models the numbers describe live in
``analysis/published_numbers.yaml`` (versioned, with its source). Measured numbers come from the experiment
modules: each ``analysis/<experiment>.py`` (knowledge, truthfulness, refusal, confidence) exposes
``measured_numbers(profile_name) -> dict[str, float]``. A module that does not exist yet, or whose cube
``results/<profile>/<experiment>.zarr`` is missing, contributes nothing.

Keys a module may return (any other key is an error that names it):

* Published keys, the dotted path of a number in published_numbers.yaml, e.g.
  ``knowledge_causal_tracing.corr.cities``. A module returns them only from the rows of the models the file's
  ``models:`` names (``Published.models``, role -> model key; the role in a key such as ``base_on_sft`` is that
  model's), never from the order of a profile's families; a profile without those models returns none. They are
  compared with the paper only for a profile that runs those models (``compares_to_paper``: ``paper``, and
  ``paper-shape`` with random weights, whose report and audit say its values are meaningless).
* Qualitative keys, one per claim, for every profile. POST is each post-trained model of the profile's
  families, BASE its base model; each key aggregates over all (BASE, POST) pairs and datasets the cube holds:

  ``qualitative.knowledge.min_map_corr`` (analysis/knowledge.py)
      the smallest Pearson r between the normalised causal-tracing maps of BASE and POST.
  ``qualitative.truthfulness.max_ie_shortfall`` (analysis/truthfulness.py)
      the largest IE(POST's direction on POST) - IE(BASE's direction on POST), intervention effects as in
      ``truthfulness_intervention_effect``; negative when BASE's direction steers POST better everywhere.
  ``qualitative.truthfulness.max_probe_shortfall_pct`` (analysis/truthfulness.py)
      the largest accuracy(POST's probe on POST) - accuracy(BASE's probe on POST), in percentage points.
  ``qualitative.refusal.max_direction_cosine`` (analysis/refusal.py)
      the largest cosine between the unit refusal directions of BASE and POST at the refusal layer.
  ``qualitative.refusal.forward_transfer_ratio`` (analysis/refusal.py)
      the largest (S(BASE's direction added to POST) - S(POST)) / (S(POST's direction added to POST) - S(POST)),
      S = refusal score on the harmless test instructions; omit a pair whose own effect (the denominator)
      is below 0.1, as the ratio then means nothing.
  ``qualitative.confidence.min_entropy_neuron_overlap`` (analysis/confidence.py)
      the smallest number of entropy neurons (of 10) that BASE and POST share.

The audit table has one row per check: ``kind`` (published/claim), ``key``, ``statement`` (the claim; empty
for published numbers), ``reference`` (published value or claim threshold), ``measured``, ``difference``
(measured - reference), ``criterion`` and ``status``: pass / fail / not measured for published numbers,
holds / does not hold / not measured for claims.
"""
from __future__ import annotations

import datetime as dt
import difflib
import fnmatch
import importlib
import json
import math
import operator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from analysis.figures import markdown_table
from replication.config import ConfigError, load_model_table, load_profile, resolve_profile
from replication.cubes import open_cube, profile_cube

PUBLISHED_FILE = Path(__file__).with_name("published_numbers.yaml")
EXPERIMENTS = ("knowledge", "truthfulness", "refusal", "confidence")
RESERVED = ("version", "source", "models", "tolerances", "claims")
OPS = {">": operator.gt, ">=": operator.ge, "<": operator.lt, "<=": operator.le}
COLUMNS = ["kind", "key", "statement", "reference", "measured", "difference", "criterion", "status"]
FAILURES = ("fail", "does not hold")


@dataclass(frozen=True)
class Tolerance:
    match: str
    abs: float | None
    rel: float | None
    why: str

    def allows(self, measured: float, published: float) -> bool:
        limit = self.abs if self.abs is not None else self.rel * abs(published)
        return abs(measured - published) <= limit + 1e-9

    @property
    def criterion(self) -> str:
        if self.abs == 0:
            return "exact"
        return f"within ±{self.abs:g}" if self.abs is not None else f"within ±{self.rel:.0%}"


@dataclass(frozen=True)
class Claim:
    id: str
    finding: str
    statement: str
    measured: str
    op: str
    threshold: float
    paper: str

    def holds(self, value: float) -> bool:
        return OPS[self.op](value, self.threshold)


@dataclass(frozen=True)
class Published:
    version: int
    source: dict[str, str]
    models: dict[str, str]  # role -> model key (models.yaml) of the model the role's published numbers describe
    numbers: dict[str, float]  # dotted key -> published value
    rules: list[Tolerance]  # in file order; the first that matches a key applies
    tolerances: dict[str, Tolerance]  # dotted key -> the rule that applies
    claims: list[Claim]

    @property
    def role_of(self) -> dict[str, str]:
        """model key -> the role its published numbers have (empty for a model the paper's tables do not describe)."""
        return {model: role for role, model in self.models.items()}


def load_published(path: Path = PUBLISHED_FILE) -> Published:
    """Read and validate the published-numbers file; errors name the file and the offending entry."""
    raw = yaml.safe_load(Path(path).read_text())
    missing = [k for k in RESERVED if k not in raw]
    if missing:
        raise ValueError(f"{path}: missing top-level keys {missing}; the file needs {list(RESERVED)}")
    numbers = {key: float(value) for key, value in _leaves({k: v for k, v in raw.items() if k not in RESERVED})
               if isinstance(value, (int, float))}
    rules = [_tolerance(path, rule) for rule in raw["tolerances"]]
    tolerances = {}
    for key in numbers:
        rule = next((r for r in rules if fnmatch.fnmatchcase(key, r.match)), None)
        if rule is None:
            raise ValueError(f"{path}: no tolerance rule matches the published number {key!r}; add one under "
                             "`tolerances:` (a `match:` glob with `abs:` or `rel:` and `why:`)")
        tolerances[key] = rule
    unused = [r.match for r in rules if r not in tolerances.values()]
    if unused:
        raise ValueError(f"{path}: tolerance rules {unused} apply to no published number (a typo, or an "
                         "earlier rule matches first)")
    claims = [_claim(path, c) for c in raw["claims"]]
    return Published(int(raw["version"]), dict(raw["source"]), _models(path, raw["models"]), numbers, rules,
                     tolerances, claims)


def _models(path: Path, models: Any) -> dict[str, str]:
    """`models:` (role -> model key), each a model of the model table with that role."""
    table = load_model_table()
    if not isinstance(models, dict) or not models:
        raise ValueError(f"{path}: `models:` must map each role (base, sft, instruct) to a model key of "
                         "replication/configs/models.yaml")
    for role, key in models.items():
        if key not in table or table[key].role != role:
            found = f"has role {table[key].role!r}" if key in table else "is not in replication/configs/models.yaml"
            raise ValueError(f"{path}: models.{role}: {key!r} {found}; name the model key whose role is {role!r}")
    return dict(models)


def _leaves(tree: dict, prefix: str = ""):
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            yield from _leaves(value, path + ".")
        else:
            yield path, value


def _tolerance(path: Path, rule: dict) -> Tolerance:
    if set(rule) - {"match", "abs", "rel", "why"} or ("abs" in rule) == ("rel" in rule) or "why" not in rule:
        raise ValueError(f"{path}: tolerance rule {rule} must have `match`, exactly one of `abs`/`rel`, and `why`")
    return Tolerance(rule["match"], rule.get("abs"), rule.get("rel"), rule["why"])


def _claim(path: Path, claim: dict) -> Claim:
    try:
        result = Claim(**claim)
    except TypeError as err:
        raise ValueError(f"{path}: claim {claim.get('id', claim)}: {err}; fields: id, finding, statement, "
                         "measured, op, threshold, paper") from None
    if result.op not in OPS or not result.measured.startswith("qualitative."):
        raise ValueError(f"{path}: claim {result.id}: op must be one of {list(OPS)} and measured a "
                         "'qualitative.' key")
    return result


def _profile(profile_name: str):
    try:
        return load_profile(profile_name)
    except ConfigError:  # results of a profile that is not defined here (e.g. a removed file): no comparison
        return None


def compares_to_paper(profile_name: str) -> bool:
    """Whether the profile runs the models the published numbers describe (published_numbers.yaml `models:`):
    `paper`, and `paper-shape` (the same models' architectures with random weights)."""
    profile = _profile(profile_name)
    return profile is not None and set(load_published().models.values()) <= set(profile.models())


def random_weights(profile_name: str) -> bool:
    profile = _profile(profile_name)
    return profile is not None and profile.random_weights is not None


def note(profile_name: str) -> str:
    """One sentence saying what the audit of this profile can and cannot show."""
    if compares_to_paper(profile_name) and random_weights(profile_name):
        return (f"Profile '{profile_name}' runs the paper's model architectures and tokenizers with RANDOM weights: "
                "every published number is measured and compared, but the values are meaningless; the run only "
                "shows that the paper's pipeline runs end to end.")
    if compares_to_paper(profile_name):
        return (f"Profile '{profile_name}' runs the paper's models, so measured numbers are compared with the "
                "published ones within stated tolerances, and the paper's qualitative claims are checked.")
    return (f"Profile '{profile_name}' runs different (smaller) models from the paper's, so its numbers are not "
            "compared with the published ones; the checks below test whether the paper's qualitative claims "
            "hold for these models.")


def audit(profile_name: str, measured: dict[str, float], published: Published | None = None) -> pd.DataFrame:
    """The audit table (columns: see module docstring) for `measured` numbers of profile `profile_name`."""
    published = published or load_published()
    _check_keys(measured, published)
    rows = []
    if compares_to_paper(profile_name):
        for key, reference in published.numbers.items():
            tolerance = published.tolerances[key]
            value = measured.get(key)
            status = "not measured" if value is None else "pass" if tolerance.allows(value, reference) else "fail"
            rows.append(_row("published", key, "", reference, value, tolerance.criterion, status))
    for claim in published.claims:
        value = measured.get(claim.measured)
        status = "not measured" if value is None else "holds" if claim.holds(value) else "does not hold"
        rows.append(_row("claim", claim.measured, claim.statement, claim.threshold, value,
                         f"{claim.op} {claim.threshold:g}", status))
    return pd.DataFrame(rows, columns=COLUMNS)


def _row(kind, key, statement, reference, value, criterion, status) -> dict[str, Any]:
    measured = math.nan if value is None else float(value)
    return {"kind": kind, "key": key, "statement": statement, "reference": float(reference),
            "measured": measured, "difference": measured - reference, "criterion": criterion, "status": status}


def _check_keys(measured: dict[str, float], published: Published) -> None:
    known = set(published.numbers) | {c.measured for c in published.claims}
    for key in measured:
        if key not in known:
            hint = difflib.get_close_matches(key, known, n=1)
            raise ValueError(f"measured key {key!r} is neither a published number nor a claim's key"
                             + (f"; did you mean {hint[0]!r}?" if hint else "")
                             + " (keys: see the docstring of analysis/audit.py)")


def summary(table: pd.DataFrame) -> dict[str, int]:
    """Count of rows per status, in a fixed order, zero counts left out."""
    order = ["pass", "fail", "holds", "does not hold", "not measured"]
    counts = table["status"].value_counts()
    return {status: int(counts[status]) for status in order if status in counts}


def cube_states(profile_name: str) -> dict[str, str]:
    """Each experiment's cube: 'missing', 'unfinished' (a run going on or interrupted) or 'finished'."""
    states = {}
    for experiment in EXPERIMENTS:
        cube = resolve_profile(profile_name).results / f"{experiment}.zarr"
        states[experiment] = ("missing" if not (cube / "zarr.json").exists()
                              else "finished" if open_cube(cube).finished else "unfinished")
    return states


def collect_measured(profile_name: str) -> dict[str, float]:
    """Measured numbers from every experiment module whose module and finished cube exist (a run still in
    progress, or interrupted, has no `finished_at` in its root attrs and contributes nothing yet). A cube computed
    under another configuration than the profile's is refused (replication.cubes.StaleCubeError)."""
    measured: dict[str, float] = {}
    for experiment, state in cube_states(profile_name).items():
        if state != "finished":
            continue
        profile_cube(profile_name, experiment)  # refuses a stale cube
        name = f"analysis.{experiment}"
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as err:
            if err.name != name:
                raise
            continue
        if not hasattr(module, "measured_numbers"):
            raise AttributeError(f"{name} has no measured_numbers(profile_name); add it (the keys it must "
                                 "return are listed in the docstring of analysis/audit.py)")
        for key, value in module.measured_numbers(profile_name).items():
            if key in measured:
                raise ValueError(f"measured key {key!r} returned by {name} and by another experiment module")
            measured[key] = float(value)
    return measured


def measured_rows(table: pd.DataFrame) -> pd.DataFrame:
    """The rows worth reading: every claim, and the published numbers that were measured."""
    return table[(table["kind"] == "claim") | (table["status"] != "not measured")]


def unmeasured_keys(table: pd.DataFrame) -> list[str]:
    return table.loc[(table["kind"] == "published") & (table["status"] == "not measured"), "key"].tolist()


def display_frame(table: pd.DataFrame) -> pd.DataFrame:
    """Audit rows for reading: a claim's statement stands in for its key."""
    check = table["statement"].where(table["statement"] != "", table["key"])
    return pd.DataFrame({"Check": check, "Paper / threshold": table["reference"], "Measured": table["measured"],
                         "Difference": table["difference"], "Criterion": table["criterion"],
                         "Status": table["status"]})


def to_markdown(table: pd.DataFrame, profile_name: str, published: Published | None = None) -> str:
    """The audit as a markdown document (the content of audit.md)."""
    published = published or load_published()
    counts = ", ".join(f"{n} {status}" for status, n in summary(table).items())
    lines = [f"# Audit: profile {profile_name}", "",
             f"Published numbers: version {published.version} of analysis/published_numbers.yaml; "
             f"source: {published.source['citation']}", "", note(profile_name), "", f"Summary: {counts}.", "",
             markdown_table(display_frame(measured_rows(table)))]
    unmeasured = unmeasured_keys(table)
    if unmeasured:
        lines += ["", f"Published numbers not measured ({len(unmeasured)}): " + ", ".join(unmeasured) + "."]
    if compares_to_paper(profile_name):
        lines += ["", "## Tolerances", "", "The first rule whose pattern matches a number's key applies.", "",
                  markdown_table(pd.DataFrame([{"Numbers": r.match, "Criterion": r.criterion, "Why": r.why}
                                               for r in published.rules]), max_width=60)]
    return "\n".join(lines) + "\n"


def write_audit(table: pd.DataFrame, profile_name: str, directory: Path | None = None) -> dict[str, Path]:
    """Write ``audit.json`` and ``audit.md`` (default directory: the profile's results directory)."""
    published = load_published()
    directory = Path(directory) if directory else resolve_profile(profile_name).results
    directory.mkdir(parents=True, exist_ok=True)
    document = {
        "profile": profile_name,
        "generated_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "published_version": published.version,
        "published_source": published.source,
        "compared_with_paper": compares_to_paper(profile_name),
        "note": note(profile_name),
        "summary": summary(table),
        "rows": [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()}
                 for row in table.to_dict(orient="records")],
    }
    paths = {"json": directory / "audit.json", "md": directory / "audit.md"}
    paths["json"].write_text(json.dumps(document, indent=2, ensure_ascii=False) + "\n")
    paths["md"].write_text(to_markdown(table, profile_name, published))
    return paths


def exit_code(table: pd.DataFrame, strict: bool) -> int:
    """1 when `strict` and a check failed, a claim does not hold or a published number is not measured."""
    unmeasured = (table["kind"] == "published") & (table["status"] == "not measured")
    return int(strict and (table["status"].isin(FAILURES).any() or unmeasured.any()))


def run_audit(profile_name: str, strict: bool = False) -> tuple[pd.DataFrame, int]:
    """Collect, audit and write; the exit code of `exit_code`."""
    table = audit(profile_name, collect_measured(profile_name))
    write_audit(table, profile_name)
    return table, exit_code(table, strict)
