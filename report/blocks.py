"""Building blocks for the cells of report/index.qmd: profile, cube status, tables, provenance, charts.

The document's kernel runs in report/, so cells `import blocks`. Torch-free: reads cubes through
replication.cubes and numbers through analysis.

Display conventions (Quarto and the fallback renderer choose the same way, see report/render.py):
tables are shown as `Table(frame)` (markdown only, so both make a native table with its caption); altair
charts carry interactive HTML (vega-embed, JavaScript bundled offline) for HTML and SVG for PDF.
"""
from __future__ import annotations

import datetime as dt
import functools
import importlib
import json
import os
from pathlib import Path

import altair as alt
import pandas as pd
import vl_convert as vlc
import yaml
import zarr
from IPython.display import Markdown

from analysis import audit
from analysis.figures import markdown_table
from data_prep.paths import REPO_ROOT
from replication.config import load_profile, resolve_profile
from replication.cubes import UNITS_GROUP, StaleCubeError, is_set_aside, open_cube, unfinished_note

DEFAULT_PROFILE = "demo"
NOT_COMPUTED = "Not yet computed for this profile"


def profile() -> str:
    """The profile being reported: env var PTR_PROFILE (set by the renderers), default demo."""
    return os.environ.get("PTR_PROFILE", DEFAULT_PROFILE)


class Table:
    """A DataFrame displayed as a pipe table (text/markdown); numeric columns and those named in `right` are
    right-aligned."""

    def __init__(self, frame: pd.DataFrame, right: tuple[str, ...] = ()):
        self.frame = frame
        self.right = tuple(right)

    def _repr_markdown_(self) -> str:
        return markdown_table(self.frame, right=self.right)


def _shown(path: Path) -> str:
    return str(path.relative_to(REPO_ROOT)) if path.is_relative_to(REPO_ROOT) else str(path)


def cube_path(experiment: str, profile_name: str) -> Path:
    return resolve_profile(profile_name).results / f"{experiment}.zarr"


def has_cube(experiment: str, profile_name: str) -> bool:
    """Whether the experiment's cube exists with at least one finished unit."""
    path = cube_path(experiment, profile_name)
    return (path / "zarr.json").exists() and bool(open_cube(path).unit_names())


def measured(experiment: str, profile_name: str) -> dict[str, float] | Exception | None:
    """The experiment's audit numbers (analysis.<experiment>.measured_numbers), the error raised computing them
    (a cube still being computed lacks units the analysis needs), or None without a cube."""
    if not has_cube(experiment, profile_name):
        return None
    return _measured(experiment, profile_name, cube_path(experiment, profile_name))


@functools.cache
def _measured(experiment: str, profile_name: str, _path: Path) -> dict[str, float] | Exception:
    try:
        return importlib.import_module(f"analysis.{experiment}").measured_numbers(profile_name)
    except Exception as error:  # shown in the section's status line; the report goes on
        return error


def error_text(error: Exception) -> str:
    """'KeyError: ...' on one line, without backticks (it is shown as inline code)."""
    return " ".join(f"{type(error).__name__}: {error}".replace("`", "'").split())


def is_computed(experiment: str, profile_name: str) -> bool:
    """The experiment's cube exists and its analysis runs: its section can show figures and tables."""
    return isinstance(measured(experiment, profile_name), dict)


def cube_status(experiment: str, profile_name: str) -> Markdown:
    """One line: which cube the section reads, whether it exists and is complete, and the profile's models."""
    path = cube_path(experiment, profile_name)
    rerun = f"run `ptr run {experiment} --profile {profile_name}`"
    numbers = measured(experiment, profile_name)
    if numbers is None:
        return Markdown(f"Reads the cube `{_shown(path)}`. *{NOT_COMPUTED}* ({rerun}).")
    store = open_cube(path)
    units = store.unit_names()
    if isinstance(numbers, StaleCubeError):
        return Markdown(f"Reads the cube `{_shown(path)}`: *STALE*, not shown: {error_text(numbers)}")
    unfinished = f" **{unfinished_note(store)}**" if unfinished_note(store) else ""
    if isinstance(numbers, Exception):
        return Markdown(f"Reads the cube `{_shown(path)}`: {len(units)} finished unit(s), *incomplete*: its analysis "
                        f"fails with `{error_text(numbers)}` ({rerun} to finish it).{unfinished}")
    return Markdown(f"Reads the cube `{_shown(path)}`: {len(units)} finished unit(s).{unfinished} "
                    f"Profile **{profile_name}**; {experiment_models(experiment, profile_name)}.")


def experiment_models(experiment: str, profile_name: str) -> str:
    """'models: family tiny: tiny-llama (BASE), tiny-llama-sft (SFT)' from the profile's configuration."""
    profile = load_profile(profile_name)
    families = []
    for name in profile.family_names(experiment):
        family = profile.families[name]
        models = ", ".join(f"{key} ({profile.model_spec(key).role.upper()})" for key in (family.base, *family.post))
        families.append(f"family {name}: {models}")
    return "models: " + "; ".join(families)


def status_summary(profile_name: str, audit_table: pd.DataFrame) -> Markdown:
    computed = [e for e in audit.EXPERIMENTS if is_computed(e, profile_name)]
    counts = ", ".join(f"{n} {status}" for status, n in audit.summary(audit_table).items())
    results = _shown(resolve_profile(profile_name).results)
    return Markdown(
        f"This report covers profile **{profile_name}** (results in `{results}`). "
        f"Experiments computed: {len(computed)} of {len(audit.EXPERIMENTS)}"
        f"{' (' + ', '.join(computed) + ')' if computed else ''}. Audit checks: {counts}.")


# --- audit -------------------------------------------------------------------------------------------------

def audit_table(profile_name: str) -> pd.DataFrame:
    """The audit of the experiments whose cubes are computed (audit.collect_measured, skipping incomplete cubes)."""
    numbers = {}
    for experiment in audit.EXPERIMENTS:
        if is_computed(experiment, profile_name):
            numbers.update(measured(experiment, profile_name))
    return audit.audit(profile_name, numbers)


PROFILE_NOTES = Path(__file__).with_name("profile_notes.yaml")
NOTE_KEYS = {"title", "can", "cannot"}


def profile_notes() -> dict[str, dict[str, str]]:
    """report/profile_notes.yaml, validated: profile name -> {title, can, cannot}."""
    notes = yaml.safe_load(PROFILE_NOTES.read_text()) or {}
    for name, note in notes.items():
        if not isinstance(note, dict) or set(note) != NOTE_KEYS:
            found = sorted(note) if isinstance(note, dict) else type(note).__name__
            raise ValueError(f"{PROFILE_NOTES}: profile {name!r} has {found}; give exactly {sorted(NOTE_KEYS)}")
    return notes


def profile_note(profile_name: str) -> Markdown:
    """The box at the top of the report: what the profile's models can and cannot show (report/profile_notes.yaml;
    a profile without an entry, e.g. a user's own file, gets its configuration's description)."""
    note = profile_notes().get(profile_name)
    if note is None:
        note = {"title": f"Profile {profile_name}", "can": load_profile(profile_name).description or "—",
                "cannot": "not described in report/profile_notes.yaml."}
    return Markdown(f"::: {{.profile-note}}\n**{note['title']}.** **Can show:** {note['can']} "
                    f"**Cannot show:** {note['cannot']}\n:::")


def audit_note(profile_name: str, table: pd.DataFrame) -> Markdown:
    published = audit.load_published()
    text = (f"{audit.note(profile_name)} Published numbers: version {published.version} of "
            f"`analysis/published_numbers.yaml` ({published.source['citation']})")
    unmeasured = audit.unmeasured_keys(table)
    if unmeasured:
        text += (f" {len(unmeasured)} published numbers are not measured yet; `ptr audit --profile "
                 f"{profile_name}` lists them in `audit.md`.")
    return Markdown(text)


def audit_rows(table: pd.DataFrame) -> Table:
    return Table(audit.display_frame(audit.measured_rows(table)))


# --- provenance --------------------------------------------------------------------------------------------

def cube_attrs(profile_name: str) -> dict[str, dict]:
    """Root attrs (provenance) of every cube of the profile, by cube name (not those set aside by `--fresh`)."""
    directory = resolve_profile(profile_name).results
    paths = sorted(p for p in directory.glob("*.zarr") if not is_set_aside(p)) if directory.exists() else []
    return {path.stem: open_cube(path).attrs for path in paths}


def unit_times(profile_name: str) -> pd.DataFrame:
    """Start, finish and compute time (seconds) of every finished unit of every cube."""
    rows = []
    for cube in cube_attrs(profile_name):
        path = cube_path(cube, profile_name)
        for unit in open_cube(path).unit_names():
            attrs = zarr.open_group(str(path), mode="r", path=f"{UNITS_GROUP}/{unit}").attrs
            start, end = (dt.datetime.fromisoformat(attrs[k]) for k in ("started_at", "finished_at"))
            rows.append({"cube": cube, "unit": unit, "started": start, "finished": end,
                         "seconds": (end - start).total_seconds()})
    return pd.DataFrame(rows, columns=["cube", "unit", "started", "finished", "seconds"])


def _short(value, n: int = 12) -> str:
    text = str(value)
    return text if len(text) <= n else text[:n] + ("+dirty" if text.endswith("+dirty") else "")


def runs_table(attrs: dict[str, dict], times: pd.DataFrame) -> Table | None:
    """Settings of each cube's run (one column per cube); None without cubes (so is every provenance table)."""
    if not attrs:
        return None
    columns = {}
    for cube, a in attrs.items():
        t = times[times["cube"] == cube]
        columns[cube] = {
            "git commit": _short(a.get("git_commit", "—")), "config hash": _short(a.get("config_hash", "—")),
            "dtype": a.get("dtype", "—"), "device": a.get("device", "—"), "seed": str(a.get("seed", "—")),
            "host": a.get("host", "—"), "started": _time(a.get("started_at")),
            "last unit finished": _time(t["finished"].max() if len(t) else None),
            "finished units": str(len(t)), "compute time (s)": f"{t['seconds'].sum():.0f}",
        }
    return Table(pd.DataFrame(columns).rename_axis("").reset_index())


def _time(value) -> str:
    if value is None:
        return "—"
    moment = value if isinstance(value, dt.datetime) else dt.datetime.fromisoformat(value)
    return moment.astimezone(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def models_table(attrs: dict[str, dict]) -> Table | None:
    if not attrs:
        return None
    rows = {}
    for cube, a in attrs.items():
        for key, model in a.get("models", {}).items():
            row = rows.setdefault(key, {"model": key, "Hugging Face id": model.get("hf_id", "—"),
                                        "revision": model.get("revision", "—"), "cubes": []})
            row["cubes"].append(cube)
    frame = pd.DataFrame(list(rows.values()), columns=["model", "Hugging Face id", "revision", "cubes"])
    frame["cubes"] = frame["cubes"].map(", ".join)
    return Table(frame)


def data_table(attrs: dict[str, dict]) -> Table | None:
    if not attrs:
        return None
    frame = pd.DataFrame([{"cube": cube, "processed-data manifest sha256": a.get("data", {}).get("sha256") or "—"}
                          for cube, a in attrs.items()], columns=["cube", "processed-data manifest sha256"])
    return Table(frame)


def packages_table(attrs: dict[str, dict]) -> Table | None:
    """Package versions, one column per cube, or a single column where all cubes agree."""
    if not attrs:
        return None
    frame = pd.DataFrame({cube: a.get("packages", {}) for cube, a in attrs.items()}).fillna("—")
    if frame.shape[1] > 1 and (frame.nunique(axis=1) == 1).all():
        frame = frame.iloc[:, :1].set_axis(["version"], axis=1)
    return Table(frame.rename_axis("package").reset_index())


def run_time_chart(times: pd.DataFrame) -> alt.Chart | None:
    """One bar per cube, stacked from its units' compute times (hover for a unit)."""
    if times.empty:
        return None
    return alt.Chart(times[["cube", "unit", "seconds"]]).mark_bar(stroke="white", strokeWidth=0.5).encode(
        x=alt.X("sum(seconds):Q", title="compute time (s)"),
        y=alt.Y("cube:N", title=None),
        color=alt.Color("cube:N", legend=None),
        detail="unit:N",
        tooltip=["cube", "unit", alt.Tooltip("seconds:Q", format=".1f")],
    ).properties(width=380)


# --- altair display ----------------------------------------------------------------------------------------

_charts_shown = 0


def _vega_mimebundle(spec: dict, **_) -> dict[str, str]:
    """HTML: vega-embed (its JavaScript bundled once, before the first chart; no network); PDF: SVG."""
    global _charts_shown
    _charts_shown += 1
    target = f"vega-chart-{_charts_shown}"
    spec_json = json.dumps(spec).replace("</", "<\\/")
    html = f'<div id="{target}"></div>\n<script>vegaEmbed("#{target}", {spec_json}, {{"actions": false}});</script>'
    if _charts_shown == 1:
        html = f"<script>{vlc.javascript_bundle()}</script>\n{html}"
    return {"text/html": html, "image/svg+xml": vlc.vegalite_to_svg(spec)}


alt.renderers.register("ptr-report", _vega_mimebundle)
alt.renderers.enable("ptr-report")
