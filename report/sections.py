"""The four findings' figures, tables and summary sentences for report/index.qmd, each computed from an experiment
cube through analysis/<experiment>.py (numbers) and analysis/figures.py (charts).

Every figure or table function takes the profile name and returns one altair chart or one `blocks.Table`, or None
when the profile has no results for its experiment (the chunk then displays nothing and the section's status line
says "not yet computed"). Models are named in the charts' titles and the tables' columns; figures show the
reference pair of a profile (analysis.knowledge.reference_pair: the Llama-3.1-8B BASE and INSTRUCT the paper
describes when the profile has them, else the first family's base and its instruct model, else its first
post-trained model) or every model, as their captions say.

Imported by the document's cells, which run in report/ (so `import blocks` is this folder's blocks.py).
"""
from __future__ import annotations

import functools
import re

import altair as alt
import numpy as np
import pandas as pd
from IPython.display import Markdown

import blocks
from analysis import confidence, knowledge, refusal, truthfulness
from analysis.audit import load_published
from analysis.figures import beside, beside_paper, escape_markdown, grid, layer_heatmap, pca_plane, token_heatmap
from replication.config import load_profile
from report import deviations

ROLE = {"base": "BASE", "sft": "SFT", "instruct": "INSTRUCT"}
SCATTER_MAX_NEURONS = 1500  # per model: ordinary neurons drawn in the scatter (every entropy neuron is drawn)


FAILED: dict[str, list[str]] = {}  # experiment: the figures and tables that could not be made, with the error


def needs(experiment: str):
    """Decorator: the figure or table of `experiment`, or None (nothing shown) when its cube is not computed or
    the function fails on it; a failure is listed by `failures` at the end of the section."""
    def wrap(function):
        @functools.wraps(function)
        def guarded(profile_name: str, *args, **kwargs):
            if not blocks.is_computed(experiment, profile_name):
                return None
            try:
                return function(profile_name, *args, **kwargs)
            except Exception as error:  # a cube still being computed may lack units a figure needs
                FAILED.setdefault(experiment, []).append(f"{function.__name__} (`{blocks.error_text(error)}`)")
                return None
        return guarded
    return wrap


def failures(experiment: str) -> Markdown | None:
    """A note listing the section's figures and tables that could not be made (None when all were)."""
    if not FAILED.get(experiment):
        return None
    return Markdown("**Not shown**, computing them from this cube failed (is it still being computed?): "
                    + "; ".join(FAILED[experiment]) + ".")


@functools.cache
def profile_config(profile_name: str):
    """The profile's configuration (read once per kernel)."""
    return load_profile(profile_name)


def role_of(profile_name: str, model: str) -> str:
    return ROLE.get(profile_config(profile_name).model_spec(model).role, "POST")


def named(profile_name: str, model: str) -> str:
    """'tiny-llama (BASE)'."""
    return f"{model} ({role_of(profile_name, model)})"


def family_of(profile_name: str, model: str) -> str:
    profile = profile_config(profile_name)
    return next(name for name, family in profile.families.items() if model in (family.base, *family.post))


def short_models(profile_name: str, frame: pd.DataFrame, columns: tuple[str, ...]) -> pd.DataFrame:
    """Model keys in `columns` shown by role (BASE, SFT, INSTRUCT), so that tables stay narrow; the section's
    status line is the legend (it names each role's model). A `family` column first when the rows span more than
    one family (a role names one model only within its family)."""
    families = [family_of(profile_name, m) for m in frame[columns[0]]]
    frame = frame.assign(**{c: [role_of(profile_name, m) for m in frame[c]] for c in columns})
    if len(set(families)) > 1 and "family" not in frame.columns:
        frame.insert(0, "family", families)
    return frame


def model_order(profile_name: str, models) -> list[str]:
    """The distinct `models` in the profile's order (each family's base first, then its post-trained models)."""
    rank = {model: i for i, model in enumerate(profile_config(profile_name).models())}
    return sorted(dict.fromkeys(models), key=lambda m: rank.get(m, len(rank)))


def by_model(profile_name: str, frame: pd.DataFrame) -> pd.DataFrame:
    """Rows in the profile's model order, otherwise kept in order."""
    order = model_order(profile_name, frame["model"])
    return frame.sort_values("model", kind="stable", key=lambda column: column.map(order.index))


def pair_title(profile_name: str, base: str, post: str) -> str:
    return f"Profile {profile_name}: BASE {base} vs {role_of(profile_name, post)} {post}"


def stacked(tables: dict[str, pd.DataFrame], key: str = "family") -> pd.DataFrame:
    """Per-family tables one under the other, with a `key` column only when there is more than one."""
    frames = [table.assign(**{key: name}) for name, table in tables.items()]
    frame = pd.concat(frames, ignore_index=True)
    return frame[[key, *frame.columns.drop(key)]] if len(tables) > 1 else frame.drop(columns=key)


# --- summary -----------------------------------------------------------------------------------------------

HEADLINES = {  # claim key: (what it measures, the sentence with the measured value)
    "qualitative.knowledge.min_map_corr": (
        "the correlation of BASE's and POST's causal-tracing maps",
        "BASE's and POST's normalised causal-tracing maps correlate at Pearson r ≥ {:.3f} on every dataset"),
    "qualitative.truthfulness.max_probe_shortfall_pct": (
        "the accuracy BASE's truth probe loses on POST",
        "BASE's truth probe classifies POST's statements at most {:.1f} points worse than POST's own probe"),
    "qualitative.truthfulness.max_ie_shortfall": (
        "the intervention effect BASE's truth direction loses on POST",
        "BASE's truth direction steers POST at most {:.3g} intervention effect less than POST's own"),
    "qualitative.refusal.max_direction_cosine": (
        "the cosine of BASE's and POST's refusal directions",
        "the refusal directions of BASE and POST have cosine ≤ {:.3f}"),
    "qualitative.refusal.forward_transfer_ratio": (
        "the forward transfer of the refusal direction (its own effect on POST is too small to compare with)",
        "added to POST, BASE's refusal direction has {:.2f} times the effect of POST's own on harmless "
        "instructions"),
    "qualitative.confidence.min_entropy_neuron_overlap": (
        "the overlap of the entropy neurons",
        "BASE and POST share at least {:.3g} of 10 entropy neurons (overlap expressed out of 10)"),
}


def summary(profile_name: str, audit_table: pd.DataFrame) -> Markdown:
    """One bullet per finding: its headline numbers measured for this profile and whether the paper's claims
    hold (from the audit's claim rows)."""
    claims = audit_table[audit_table["kind"] == "claim"].set_index("key")
    bullets = []
    for claim_group in _claims_by_finding():
        finding = claim_group[0].finding
        if not blocks.is_computed(finding.lower(), profile_name):
            state = "incomplete" if blocks.has_cube(finding.lower(), profile_name) else "not yet computed"
            bullets.append(f"- **{finding}**: {state} for this profile.")
            continue
        parts = []
        for claim in claim_group:
            row = claims.loc[claim.measured]
            noun, sentence = HEADLINES[claim.measured]
            if row["status"] == "not measured":
                parts.append(f"{noun} is not measurable from this profile's results")
            else:
                verdict = "holds" if row["status"] == "holds" else "does not hold"
                parts.append(f"{sentence.format(row['measured'])} (paper's claim {row['criterion']}: {verdict})")
        text = "; ".join(parts)
        bullets.append(f"- **{finding}**: {text[0].upper()}{text[1:]}.")
    return Markdown("\n".join(bullets))


def _claims_by_finding() -> list[list]:
    groups: dict[str, list] = {}
    for claim in load_published().claims:
        groups.setdefault(claim.finding, []).append(claim)
    return list(groups.values())


# --- knowledge ---------------------------------------------------------------------------------------------

def _knowledge_datasets(profile_name: str, maps: dict, models: tuple[tuple[str, str], ...]) -> list[str]:
    """The profile's knowledge datasets for which the cube has the map of every (source, target) in `models`."""
    return [d for d in profile_config(profile_name).experiment("knowledge").datasets
            if all((s, t, d) in maps for s, t in models)]


ROWS_PER_FIGURE = 3  # datasets per knowledge figure: three rows of 32-layer maps fit an A4 page with the caption
KNOWLEDGE_PARTS = 3  # knowledge figures per kind in index.qmd (fig-knowledge-maps, -maps-2, -maps-3): 9 datasets


def _map_panel(a: knowledge.Map, title, values: np.ndarray | None = None, layer_axis: bool = True):
    return token_heatmap(knowledge.normalize(a.values) if values is None else values, a.columns, a.knowledge,
                         title=title, legend_title="normalised effect", layer_axis=layer_axis)


def _map_rows(rows: list[list], title: str):
    """Rows of map panels (one dataset a row) under one title, sharing one colour legend below them."""
    return alt.vconcat(*[alt.hconcat(*row, spacing=8) for row in rows], spacing=14).properties(
        title=title).configure_legend(orient="bottom", direction="horizontal", gradientLength=220,
                                      titleFontSize=11, labelFontSize=10)


def _part(profile_name: str, datasets: list[str], part: int) -> list[str]:
    """The datasets of figure `part` (1, 2, ...); a dataset beyond the document's last part is an error."""
    if len(datasets) > ROWS_PER_FIGURE * KNOWLEDGE_PARTS:
        raise ValueError(f"profile {profile_name} has {len(datasets)} knowledge datasets; the report shows at most "
                         f"{ROWS_PER_FIGURE * KNOWLEDGE_PARTS} (add chunks to report/index.qmd and raise "
                         "sections.KNOWLEDGE_PARTS)")
    return datasets[(part - 1) * ROWS_PER_FIGURE:part * ROWS_PER_FIGURE]


def _unit_maps(profile_name: str) -> dict:
    """analysis.knowledge.unit_maps, read once per results directory."""
    return _cached_maps(profile_name, blocks.cube_path("knowledge", profile_name))


@functools.cache
def _cached_maps(profile_name: str, _path) -> dict:
    return knowledge.unit_maps(profile_name)


@needs("knowledge")
def knowledge_maps(profile_name: str, part: int = 1):
    """One row per dataset (`part` of them, ROWS_PER_FIGURE a figure): BASE's and POST's normalised maps and
    BASE − POST (the reference pair)."""
    maps = _unit_maps(profile_name)
    base, post = knowledge.reference_pair(profile_name)
    post_role = role_of(profile_name, post)
    rows = []
    for dataset in _part(profile_name, _knowledge_datasets(profile_name, maps, ((base, base), (post, post))), part):
        a, b = maps[base, base, dataset], maps[post, post, dataset]
        n = min(len(a.columns), len(b.columns))
        a, b = a.last(n), b.last(n)
        difference = knowledge.normalize(a.values) - knowledge.normalize(b.values)
        rows.append([_map_panel(a, [dataset, f"BASE {base}"]),
                     _map_panel(b, [dataset, f"{post_role} {post}"], layer_axis=False),
                     _map_panel(a, [dataset, f"BASE − {post_role}"], difference, layer_axis=False)])
    return _map_rows(rows, pair_title(profile_name, base, post)) if rows else None


@needs("knowledge")
def knowledge_paper_maps(profile_name: str):
    """The profile's cities maps (BASE, POST of the reference pair) beside the paper's: the authors' shipped
    Llama-3.1-8B-Instruct map (analysis.knowledge.paper_map), all normalised alike."""
    maps = _unit_maps(profile_name)
    base, post = knowledge.reference_pair(profile_name)
    paper, entry = knowledge.paper_map()
    dataset = entry["dataset"]
    panels = [_map_panel(maps[model, model, dataset], [f"this profile: {dataset}", f"{role_of(profile_name, model)} "
                                                       f"{model}"], layer_axis=i == 0)
              for i, model in enumerate((base, post)) if (model, model, dataset) in maps]
    if not panels:
        return None
    panels.append(_map_panel(paper, [f"paper: {dataset}", f"{entry['model']} (authors' {entry['source'].split('/')[-1]})"]))
    return _map_rows([panels], f"Profile {profile_name} beside the paper's own map ({dataset})")


@needs("knowledge")
def knowledge_cross_maps(profile_name: str, part: int = 1):
    """One row per dataset: cross-model maps forward (BASE's states patched into POST) and backward (the reverse)."""
    maps = _unit_maps(profile_name)
    base, post = knowledge.reference_pair(profile_name)
    post_role = role_of(profile_name, post)
    rows = [[_map_panel(maps[base, post, dataset], [dataset, f"forward, BASE → {post_role}"]),
             _map_panel(maps[post, base, dataset], [dataset, f"backward, {post_role} → BASE"], layer_axis=False)]
            for dataset in _part(profile_name, _knowledge_datasets(profile_name, maps, ((base, post), (post, base))),
                                 part)]
    return _map_rows(rows, pair_title(profile_name, base, post)) if rows else None


def _comparison_rows(profile_name: str, comparisons: tuple[str, ...]) -> pd.DataFrame:
    table = knowledge.comparison_table(profile_name, _unit_maps(profile_name))
    return table[table["comparison"].isin(comparisons)]


@needs("knowledge")
def knowledge_table(profile_name: str) -> blocks.Table:
    """The paper's knowledge-storage table: BASE's vs POST's own maps, measured (paper)."""
    rows = _comparison_rows(profile_name, ("own",))
    frame = pd.DataFrame({
        "BASE": rows["base"], "POST": rows["post"], "dataset": rows["dataset"],
        **{label: [beside(m, p) for m, p in zip(rows[metric], rows[f"paper_{metric}"])]
           for label, metric in (("pairs", "pairs"), ("r", "corr"), ("max diff", "max_diff"),
                                 ("knowledge max diff", "max_diff_knowledge"))},
        "clean gap BASE / POST": [f"{a:.2f} / {b:.2f}" for a, b in zip(rows["clean_gap_a"], rows["clean_gap_b"])]})
    return blocks.Table(short_models(profile_name, frame, ("BASE", "POST")),
                        right=("pairs", "r", "max diff", "knowledge max diff", "clean gap BASE / POST"))


@needs("knowledge")
def knowledge_cross_table(profile_name: str) -> blocks.Table:
    """Forward and backward cross-model maps against the target model's own map."""
    rows = _comparison_rows(profile_name, ("forward", "backward"))
    post = [role_of(profile_name, p) for p in rows["post"]]
    frame = pd.DataFrame({
        "BASE": rows["base"], "POST": rows["post"], "dataset": rows["dataset"],
        "patching": [f"forward, BASE → {p}" if c == "forward" else f"backward, {p} → BASE"
                     for c, p in zip(rows["comparison"], post)],
        "compared with": [f"{p}'s own map" if c == "forward" else "BASE's own map"
                          for c, p in zip(rows["comparison"], post)],
        "r": rows["corr"], "max diff": rows["max_diff"], "knowledge max diff": rows["max_diff_knowledge"]})
    return blocks.Table(short_models(profile_name, frame, ("BASE", "POST")))


# --- truthfulness ------------------------------------------------------------------------------------------

def _model_pairs(models: pd.DataFrame) -> list[tuple[str, str]]:
    """Every unordered pair of models within a family, base first (model order as in the profile)."""
    pairs = []
    for _, family in models.groupby("family", sort=False):
        keys = list(family["model"])
        pairs += [(a, b) for i, a in enumerate(keys) for b in keys[i + 1:]]
    return pairs


@needs("truthfulness")
def truth_cosine_chart(profile_name: str):
    """Cosine of two models' truth directions per dataset and layer, one panel per model pair."""
    similarity = truthfulness.direction_similarity(profile_name)
    panels = [layer_heatmap(similarity[(similarity["model_a"] == a) & (similarity["model_b"] == b)], y="dataset",
                            title=f"{named(profile_name, a)} vs {named(profile_name, b)}")
              for a, b in _model_pairs(truthfulness.families(profile_name))]
    return grid(panels, 2, f"Profile {profile_name}: cosine of truth directions")


@needs("truthfulness")
def truth_cosine_table(profile_name: str) -> blocks.Table:
    return blocks.Table(truthfulness.direction_similarity_table(profile_name).reset_index())


def _display_roles(column: str) -> str:
    """'r_base_on_sft' -> 'r_BASE→h_SFT' (the truthfulness tables' notation)."""
    match = re.fullmatch(r"r_(\w+?)_on_(\w+)", column)
    return f"r_{match[1].upper()}→h_{match[2].upper()}" if match else column


def _paper_layout(profile_name: str, tables: dict[str, pd.DataFrame], index: tuple[str, ...]) -> blocks.Table:
    """Per-family tables of (name, measured | paper) columns as one table of 'measured (paper)' cells, arrows in
    the column names spaced so that the headers can wrap."""
    frame = stacked({family: beside_paper(table) for family, table in tables.items()})
    frame = frame.rename(columns=lambda c: _display_roles(c).replace("→", " → "))
    if "model" in frame.columns:
        frame["model"] = [role_of(profile_name, m) for m in frame["model"]]
    return blocks.Table(frame, right=tuple(c for c in frame.columns if c not in ("family", *index)))


@needs("truthfulness")
def probe_transfer_table(profile_name: str) -> blocks.Table:
    return _paper_layout(profile_name, truthfulness.probe_transfer_tables(profile_name), ("test dataset",))


@needs("truthfulness")
def intervention_table(profile_name: str) -> blocks.Table:
    return _paper_layout(profile_name, truthfulness.intervention_effect_tables(profile_name), ("test dataset",))


def _pca_chart(profile_name: str, points: pd.DataFrame, arrows: pd.DataFrame, *, color: str, color_title: str,
               what: str):
    """One PCA plane per model (points `color`-ed, arrows of every model's direction of its family)."""
    panels = []
    for model in model_order(profile_name, points["model"]):
        own = points[points["model"] == model]
        tips = arrows[(arrows["family"] == own["family"].iloc[0]) & (arrows["model"] == model)]
        tips = tips.assign(label=[role_of(profile_name, m) for m in tips["direction_model"]])
        explained = (tips["explained_pc1"].iloc[0], tips["explained_pc2"].iloc[0])
        panels.append(pca_plane(own, tips, color=color, color_title=color_title, explained=explained,
                                labels=list(ROLE.values()), title=f"{what} of {named(profile_name, model)}"))
    return grid(panels, 2, f"Profile {profile_name}", legend_below=True)


@needs("truthfulness")
def truth_pca_chart(profile_name: str):
    points, arrows = truthfulness.pca_data(profile_name)
    points = points.assign(statement_label=np.where(points["label"] == 1, "true", "false"))
    dataset = points["dataset"].iloc[0]
    return _pca_chart(profile_name, points, arrows, color="statement_label", color_title="statement",
                      what=f"{dataset} statements in the activations")


# --- refusal -----------------------------------------------------------------------------------------------

@needs("refusal")
def refusal_cosine_table(profile_name: str) -> blocks.Table:
    cosines = refusal.direction_cosines(profile_name)
    frame = pd.DataFrame({"direction A": cosines["model_a"], "direction B": cosines["model_b"],
                          "cosine": cosines["cosine"],
                          "paper (Llama-3.1-8B's shipped directions)": cosines["paper_shipped"].astype(float)})
    return blocks.Table(short_models(profile_name, frame, ("direction A", "direction B")))


@needs("refusal")
def refusal_cosine_chart(profile_name: str):
    """Cosine of two models' refusal directions at every layer (each model at its own token position)."""
    frame = refusal.cosine_by_layer(profile_name)
    pairs = set(_model_pairs(refusal.families(profile_name)))
    frame = frame[[(a, b) in pairs for a, b in zip(frame["model_a"], frame["model_b"])]].dropna(subset=["cosine"])
    frame = frame.assign(pair=[f"{named(profile_name, a)} vs {named(profile_name, b)}"
                               for a, b in zip(frame["model_a"], frame["model_b"])])
    chart = alt.Chart(frame).mark_line(point=True).encode(
        x=alt.X("layer:O", title="layer (input of the decoder layer, resid_pre)", axis=alt.Axis(labelAngle=0)),
        y=alt.Y("cosine:Q", scale=alt.Scale(domain=[-1, 1]), title="cosine"),
        color=alt.Color("pair:N", title="directions",
                        legend=alt.Legend(orient="bottom", columns=1, labelLimit=0)),
        tooltip=["pair:N", "layer:Q", alt.Tooltip("cosine:Q", format=".3f")])
    return chart.properties(width=420, height=160, title=f"Profile {profile_name}: cosine of refusal directions")


@needs("refusal")
def refusal_score_table(profile_name: str) -> blocks.Table:
    tables = refusal.refusal_score_tables(refusal.scores(profile_name))
    return _paper_layout(profile_name, tables, ("model", "dataset", "intervention"))


@needs("refusal")
def refusal_degenerate_table(profile_name: str) -> blocks.Table:
    """The fraction of completions that repeat themselves, per condition, in the refusal table's layout."""
    tables = {family: refusal.degenerate_table(frame).reset_index() for family, frame in
              refusal.scores(profile_name).groupby("family", sort=False)}
    frame = stacked(tables)
    frame.columns = [_display_roles(str(c)) for c in frame.columns]
    frame["model"] = [role_of(profile_name, m) for m in frame["model"]]
    return blocks.Table(frame)


@needs("refusal")
def refusal_transfer_chart(profile_name: str):
    """Beyond the paper: refusal score (solid) and degenerate fraction (dashed) on the harmless instructions as
    each direction is added at growing fractions of the addition coefficient; one panel per steered model."""
    curves = refusal.transfer_curves(profile_name)
    if curves.empty:
        return None
    curves = curves.assign(
        direction=[f"{ROLE.get(r, r)}'s direction" for r in curves["source_role"]],
        model=[named(profile_name, t) for t in curves["target"]])
    long = curves.melt(id_vars=["model", "direction", "scale", "coef"], value_vars=["refusal_score", "degenerate"],
                       var_name="measure", value_name="fraction")
    long["measure"] = long["measure"].map({"refusal_score": "refusal score", "degenerate": "degenerate"})
    chart = alt.Chart(long).mark_line(point=True).encode(
        x=alt.X("scale:Q", title="fraction of the addition coefficient"),
        y=alt.Y("fraction:Q", scale=alt.Scale(domain=[0, 1]), title="fraction of completions"),
        color=alt.Color("direction:N", title="direction added"),
        strokeDash=alt.StrokeDash("measure:N", title="measure", sort=["refusal score", "degenerate"]),
        tooltip=["model:N", "direction:N", "measure:N", alt.Tooltip("scale:Q", format=".3g"),
                 alt.Tooltip("coef:Q", format=".4g"), alt.Tooltip("fraction:Q", format=".2f")])
    return chart.properties(width=220, height=160).facet(
        column=alt.Column("model:N", title=None)).properties(
        title=f"Profile {profile_name}: refusal directions added at growing strength "
              f"(the first {' or '.join(str(n) for n in sorted(set(curves['n'])))} harmless test instructions)")


@needs("refusal")
def refusal_samples_table(profile_name: str, per_condition: int = 2) -> blocks.Table:
    """The first completions of every condition of the profile's first family."""
    models = refusal.families(profile_name)
    first = models.loc[models["family"] == models["family"].iloc[0], "model"].tolist()
    samples = refusal.sample_completions(profile_name, per_condition)
    samples = samples[samples["target"].isin(first)]
    order = {"target": first, "dataset": ["harmful", "harmless"], "source": ["none", *first],
             "intervention": ["none", "ablation", "subtraction", "addition"]}  # the refusal table's row order
    samples = samples.sort_values(["target", "dataset", "intervention", "source"], kind="stable",
                                  key=lambda column: column.map(order[column.name].index))
    frame = pd.DataFrame({
        "steered model": [role_of(profile_name, m) for m in samples["target"]],
        "steering": [_steering(profile_name, s, i) for s, i in zip(samples["source"], samples["intervention"])],
        "instruction": [escape_markdown(_shorten(t, 60)) for t in samples["instruction"]],
        "completion": [escape_markdown(t.strip()) or "(empty)" for t in samples["completion"]],
        "refusal": np.where(samples["refusal"], "yes", "no")})
    return blocks.Table(frame)


def _steering(profile_name: str, source: str, intervention: str) -> str:
    """('none', 'none') -> 'no steering'; ('tiny-llama', 'addition') -> "BASE's direction added"."""
    if intervention == "none":
        return "no steering"
    verb = {"addition": "added", "subtraction": "subtracted", "ablation": "ablated"}[intervention]
    return f"{role_of(profile_name, source)}'s direction {verb}"


def _shorten(text: str, n: int) -> str:
    return text if len(text) <= n else text[:n - 1].rstrip() + "…"


@needs("refusal")
def refusal_pca_chart(profile_name: str):
    points, arrows = refusal.pca_data(profile_name)
    return _pca_chart(profile_name, points, arrows, color="kind", color_title="instruction",
                      what="instructions in the activations")


# --- confidence --------------------------------------------------------------------------------------------

@needs("confidence")
def entropy_neuron_table(profile_name: str) -> blocks.Table:
    table = confidence.entropy_neuron_table(profile_name).reset_index()
    frame = pd.DataFrame({
        "pair": table["pair"], "shared neurons": [f"{o} of {n}" for o, n in zip(table["overlap"], table["of"])],
        "paper (of 10)": table["paper_overlap"].astype(float), "IoU": table["iou"],
        "average ratio difference": table["avg_ratio_difference"],
        "paper": table["paper_avg_ratio_difference"].astype(float),
        "shared, raw W_U": [f"{o} of {n}" for o, n in zip(table["overlap_raw_wu"], table["of"])]})
    return blocks.Table(frame, right=("shared neurons", "shared, raw W_U"))


@needs("confidence")
def entropy_scatter(profile_name: str):
    """Norm of w_out vs LogitVar (log scale) per model, entropy neurons marked, the norm threshold drawn."""
    data = confidence.scatter_data(profile_name)
    shown = pd.concat([pd.concat([group[group["entropy_neuron"]],
                                  group[~group["entropy_neuron"]].sample(
                                      n=min(SCATTER_MAX_NEURONS, int((~group["entropy_neuron"]).sum())),
                                      random_state=0)])
                       for _, group in data.groupby("model", sort=False)], ignore_index=True)
    shown = shown.assign(kind=np.where(shown["entropy_neuron"], "entropy neuron", "other neuron"))
    panels = []
    for model in model_order(profile_name, shown["model"]):
        base = alt.Chart(shown[shown["model"] == model])
        dots = base.mark_point(filled=True).encode(
            x=alt.X("norm:Q", title="‖w_out‖", scale=alt.Scale(zero=False)),
            y=alt.Y("logit_var:Q", title="LogitVar (log scale)", scale=alt.Scale(type="log", nice=False)),
            color=alt.Color("kind:N", title=None, scale=alt.Scale(domain=["other neuron", "entropy neuron"],
                                                                 range=["#9aa7b5", "#d62728"])),
            size=alt.Size("kind:N", scale=alt.Scale(domain=["other neuron", "entropy neuron"], range=[8, 60]),
                          legend=None),
            tooltip=["neuron:Q", alt.Tooltip("norm:Q", format=".4f"), alt.Tooltip("logit_var:Q", format=".3g")])
        threshold = base.mark_rule(strokeDash=[4, 3], color="black").encode(x="mean(norm_threshold):Q")
        panels.append(alt.layer(dots, threshold).properties(title=named(profile_name, model), width=250, height=200))
    return grid(panels, 2, f"Profile {profile_name}: last-layer neurons")


@needs("confidence")
def entropy_membership_chart(profile_name: str):
    """Figure 1d as set membership: per family, each selected neuron and the models selecting it."""
    venn = confidence.venn_data(profile_name)
    panels = []
    for family, group in venn.groupby("family", sort=False):
        roles = [c for c in ("BASE", "SFT", "INSTRUCT") if c in group.columns and group[c].notna().any()]
        long = group.melt(id_vars=["neuron", "region"], value_vars=roles, var_name="model", value_name="member")
        long = long[long["member"] == True]  # noqa: E712 (NaN where a family lacks the role)
        chart = alt.Chart(long).mark_square(size=140).encode(
            x=alt.X("model:N", sort=roles, title=None, axis=alt.Axis(labelAngle=0, orient="top")),
            y=alt.Y("neuron:O", title="neuron", sort="ascending"),
            color=alt.Color("region:N", title="selected by"),
            tooltip=["neuron:O", "region:N"])
        panels.append(chart.properties(title=f"family of {family}", width=45 * len(roles)))
    return grid(panels, 3, f"Profile {profile_name}: entropy neurons by model")


@needs("confidence")
def figure1d_table(profile_name: str) -> blocks.Table | None:
    """The Llama-3.1-8B neuron ids beside the paper's Figure 1d (None for profiles without that family)."""
    table = confidence.figure1d_comparison(profile_name)
    if table.empty:
        return None
    return blocks.Table(table.assign(measured=table["measured"].map(_ids), paper=table["paper"].map(_ids)))


def _ids(ids) -> str:
    return ", ".join(str(i) for i in ids)


@needs("confidence")
def reliability_chart(profile_name: str):
    """Accuracy against mean confidence per confidence bin, one line per model, one panel per dataset."""
    data = confidence.reliability_data(profile_name).dropna(subset=["mean_confidence"])
    models = [named(profile_name, m) for m in model_order(profile_name, data["model"])]
    data = data.assign(model=[named(profile_name, m) for m in data["model"]])
    diagonal = alt.Chart(pd.DataFrame({"x": [0.5, 1.0]})).mark_line(strokeDash=[4, 3], color="gray").encode(
        x="x:Q", y="x:Q")
    panels = []
    for dataset, group in data.groupby("dataset", sort=False):
        curve = alt.Chart(group).mark_line(point=True).encode(
            x=alt.X("mean_confidence:Q", title="confidence", scale=alt.Scale(domain=[0.5, 1])),
            y=alt.Y("accuracy:Q", title="accuracy", scale=alt.Scale(domain=[0, 1])),
            color=alt.Color("model:N", title="model", scale=alt.Scale(domain=models),
                            legend=alt.Legend(orient="bottom", columns=1, labelLimit=0)),
            tooltip=["model:N", alt.Tooltip("mean_confidence:Q", format=".3f"),
                     alt.Tooltip("accuracy:Q", format=".3f"), "count:Q"])
        panels.append(alt.layer(diagonal, curve).properties(title=dataset, width=170, height=150))
    return grid(panels, 3, f"Profile {profile_name}: reliability")


@needs("confidence")
def calibration_table(profile_name: str) -> blocks.Table:
    table = by_model(profile_name, confidence.calibration_table(profile_name).reset_index())
    table = short_models(profile_name, table, ("model",)).sort_values("dataset", kind="stable")
    return blocks.Table(table.rename(columns={"mean_confidence": "mean confidence", "ece": "ECE",
                                              "mean_entropy": "mean entropy (nats)"}))


@needs("confidence")
def ablation_table(profile_name: str) -> blocks.Table:
    table = short_models(profile_name, by_model(profile_name, confidence.ablation_table(profile_name).reset_index()),
                         ("model",))
    return blocks.Table(table.rename(columns=lambda c: c.replace("delta_", "Δ ").replace("_", " ")))


def deviations_table() -> blocks.Table:
    """Appendix: where the paper profile computes differently from the original code (docs/deviations.yaml; the
    same for every profile)."""
    return blocks.Table(deviations.table(deviations.load_deviations()))
