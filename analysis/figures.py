"""Presentation helpers shared by the analysis modules, the audit and the report (torch-free): markdown tables,
measured-beside-paper cells, and the altair charts the report's sections are built from (token heatmaps of
causal tracing, PCA planes with direction arrows, layer heatmaps)."""
from __future__ import annotations

import json
import math
import re

import altair as alt
import numpy as np
import pandas as pd

# The paper's colour bar (the original's patching_visualize.py draw_figure): -1 blue, 0 near-white, +1 red, so red is
# where patching restores TRUE. Used for every map on -1 .. 1 (knowledge maps, their differences, cosines).
DIVERGING_DOMAIN = [-1.0, 0.0, 1.0]
DIVERGING_RANGE = ["rgb(0, 0, 255)", "rgb(245, 245, 245)", "rgb(255, 0, 0)"]
LABEL_FONT = 10  # axis labels of the heatmaps: legible at 100% zoom after the figure is scaled to the page
MARKDOWN_SPECIAL = re.compile(r"([\\`*_{}\[\]<>#+\-!~^$@|])")
UNPRINTABLE = re.compile(r"[^\S ]|[\x00-\x1f\x7f-\x9f]")  # whitespace other than a space, control characters


def format_cell(value) -> str:
    """Numbers to 4 significant digits, missing values as an em dash, text with pipes escaped."""
    if value is None:
        return "—"
    if isinstance(value, float):
        return "—" if math.isnan(value) else f"{value:.4g}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def escape_markdown(text: str) -> str:
    """Free text (model outputs, instructions) shown literally in a markdown table: every markdown character
    backslash-escaped, line breaks, tabs and control characters as ·."""
    return MARKDOWN_SPECIAL.sub(r"\\\1", UNPRINTABLE.sub("·", str(text)))


def markdown_table(frame: pd.DataFrame, max_width: int = 40, right: tuple[str, ...] = ()) -> str:
    """`frame` as a pipe table; numeric columns (and the columns named in `right`) right-aligned.

    Cells are padded to their column's width: the widest cell, capped at `max_width` but never narrower than
    the longest word of the header. In a table wider than the page, pandoc sizes the columns in proportion
    to these widths (the dashes under the header), so long text columns get more room but not all of it.
    """
    header = [str(c) for c in frame.columns]
    rows = [[format_cell(v) for v in row] for row in frame.itertuples(index=False)]
    numeric = [pd.api.types.is_numeric_dtype(frame[c]) or c in right for c in frame.columns]
    widths = [max(3, *(len(word) for word in h.split()), min(max_width, max((len(r[i]) for r in rows), default=0)))
              for i, h in enumerate(header)]

    def line(cells):
        padded = (c.rjust(w) if n else c.ljust(w) for c, w, n in zip(cells, widths, numeric))
        return "| " + " | ".join(padded) + " |"
    rule = "|" + "|".join(("-" * (w + 1) + ":") if n else (":" + "-" * (w + 1)) for w, n in zip(widths, numeric)) + "|"
    return "\n".join([line(header), rule, *(line(r) for r in rows)])


def beside(measured, paper) -> str:
    """One cell: the measured value, and the paper's in parentheses when there is one ('0.97 (0.99)')."""
    text = format_cell(float(measured) if measured is not None else None)
    if paper is None or (isinstance(paper, float) and math.isnan(paper)):
        return text
    return f"{text} ({format_cell(float(paper))})"


def beside_paper(table: pd.DataFrame) -> pd.DataFrame:
    """A table whose columns are (name, 'measured' | 'paper') pairs -> one text column per name, each cell
    `beside(measured, paper)`; the row index becomes ordinary columns."""
    names = list(dict.fromkeys(table.columns.get_level_values(0)))
    cells = {name: [beside(m, p) for m, p in zip(table[(name, "measured")], table[(name, "paper")])]
             for name in names}
    return pd.concat([table.index.to_frame(index=False), pd.DataFrame(cells)], axis=1)


# --- charts ------------------------------------------------------------------------------------------------

def runs(flags) -> list[tuple[int, int]]:
    """Index ranges (first, last) of the consecutive True values of `flags`."""
    result, start = [], None
    for i, flag in enumerate(list(flags) + [False]):
        if flag and start is None:
            start = i
        elif not flag and start is not None:
            result.append((start, i - 1))
            start = None
    return result


def diverging_scale() -> alt.Scale:
    """The paper's colour scale on -1 .. 1 (blue, near-white, red)."""
    return alt.Scale(domain=DIVERGING_DOMAIN, range=DIVERGING_RANGE, interpolate="rgb", clamp=True)


def token_heatmap(values: np.ndarray, columns: list[str], outlined, *, title, legend_title: str = "value",
                  cell_width: float = 12.0, cell_height: float | None = None,
                  layer_axis: bool = True) -> alt.LayerChart:
    """A [layers x token columns] map as the paper draws it (layer 0 at the top, tokens in order along x, labelled
    by role; the paper's colour scale on -1 .. 1), the runs of `outlined` columns framed in black (the knowledge
    positions of the paper's Figure 1a). `layer_axis=False` leaves out the layer title and labels (for a panel
    right of another with the same layers)."""
    n_layers, n_columns = values.shape
    cell_height = cell_height or max(3.0, min(8.0, 150 / n_layers))
    layer, column = np.meshgrid(np.arange(n_layers), np.arange(n_columns), indexing="ij")
    cells = pd.DataFrame({"layer": layer.ravel(), "column": column.ravel(), "value": values.ravel()})
    cells["token"] = [columns[c] for c in cells["column"]]
    for axis, field in (("x", "column"), ("y", "layer")):
        cells[f"{axis}0"], cells[f"{axis}1"] = cells[field] - 0.5, cells[field] + 0.5
    x_scale = alt.Scale(domain=[-0.5, n_columns - 0.5], nice=False, zero=False)
    y_scale = alt.Scale(domain=[-0.5, n_layers - 0.5], nice=False, zero=False, reverse=True)
    x_axis = alt.Axis(values=list(range(n_columns)), labelExpr=f"{json.dumps(columns)}[datum.value]",
                      labelAngle=-90, labelFontSize=LABEL_FONT, labelOverlap=False, labelFlush=False, labelPadding=2,
                      grid=False, ticks=False, title=None)
    y_axis = alt.Axis(tickMinStep=1, format="d", grid=False, title="layer" if layer_axis else None,
                      labels=layer_axis, ticks=layer_axis, labelFontSize=LABEL_FONT)
    position = {"x": alt.X("x0:Q", scale=x_scale, axis=x_axis), "x2": "x1",
                "y": alt.Y("y0:Q", scale=y_scale, axis=y_axis), "y2": "y1"}  # the same in both layers
    base = alt.Chart(cells).mark_rect().encode(
        **position,
        color=alt.Color("value:Q", scale=diverging_scale(), title=legend_title),
        tooltip=["layer:Q", "token:N", alt.Tooltip("value:Q", format=".2f")])
    frames = pd.DataFrame([{"x0": a - 0.5, "x1": b + 0.5, "y0": -0.5, "y1": n_layers - 0.5}
                           for a, b in runs(outlined)], columns=["x0", "x1", "y0", "y1"])
    outline = alt.Chart(frames).mark_rect(fill=None, stroke="black", strokeWidth=1.5).encode(**position)
    return alt.layer(base, outline).properties(
        title=alt.TitleParams(title, fontSize=11), width=max(cell_width * n_columns, 110),
        height=cell_height * n_layers)


def pca_arrows(unit, family: str, coordinates: str, explained: str) -> list[dict]:
    """The arrows of a PCA figure (Figures 1b, 1c): for every model of a cube unit, each direction's coordinates in
    that model's first two components (variable `coordinates` [model, direction_model, component]) and the
    variance they explain (variable `explained` [model, component])."""
    arrows = []
    for model in unit["model"].values:
        ratio = unit[explained].sel(model=model).values
        for direction in unit["direction_model"].values:
            pc1, pc2 = unit[coordinates].sel(model=model, direction_model=direction).values
            arrows.append({"family": family, "model": model, "direction_model": direction, "pc1": pc1, "pc2": pc2,
                           "explained_pc1": ratio[0], "explained_pc2": ratio[1]})
    return arrows


def pca_plane(points: pd.DataFrame, arrows: pd.DataFrame, *, color: str, color_title: str, title: str,
              explained: tuple[float, float], labels: list[str] | None = None, size: int = 200) -> alt.LayerChart:
    """Points (pc1, pc2, `color`) in a model's PCA plane with arrows from the origin for directions (pc1, pc2,
    label), each labelled at its tip and coloured by its place in `labels` (the same colour in every panel): all
    arrows scaled by one factor so the longest reaches 90% of the farthest point; equal axes, so an arrow's angle
    on the page is its angle in the plane."""
    extent = float(np.abs(points[["pc1", "pc2"]].to_numpy()).max()) or 1.0
    longest = float(np.hypot(arrows["pc1"], arrows["pc2"]).max()) or 1.0
    tips = arrows.assign(pc1=arrows["pc1"] * 0.9 * extent / longest, pc2=arrows["pc2"] * 0.9 * extent / longest)
    tips = tips.assign(angle=np.degrees(np.arctan2(tips["pc1"], tips["pc2"])), x0=0.0, y0=0.0)
    scale = alt.Scale(domain=[-1.05 * extent, 1.05 * extent], nice=False)
    x = alt.X("pc1:Q", scale=scale, title=f"PC1 ({explained[0]:.0%} of variance)")
    y = alt.Y("pc2:Q", scale=scale, title=f"PC2 ({explained[1]:.0%} of variance)")
    dots = alt.Chart(points).mark_circle(size=18, opacity=0.6).encode(
        x=x, y=y, color=alt.Color(f"{color}:N", title=color_title, scale=alt.Scale(scheme="set1")),
        tooltip=[alt.Tooltip(f"{color}:N", title=color_title), alt.Tooltip("pc1:Q", format=".3g"),
                 alt.Tooltip("pc2:Q", format=".3g")])
    # Arrows coloured through stroke and fill, not color: the points' colour scale (and legend) stays the only one,
    # shared by every panel of a grid.
    arrow_scale = alt.Scale(scheme="dark2", domain=labels or sorted(set(tips["label"])))
    arrows_base = alt.Chart(tips)
    shafts = arrows_base.mark_rule(strokeWidth=2.5).encode(
        x="x0:Q", y="y0:Q", x2="pc1", y2="pc2", stroke=alt.Stroke("label:N", scale=arrow_scale, legend=None))
    heads = arrows_base.mark_point(shape="triangle", filled=True, size=90, opacity=1).encode(
        x="pc1:Q", y="pc2:Q", angle=alt.Angle("angle:Q", scale=None),
        fill=alt.Fill("label:N", scale=arrow_scale, legend=None), tooltip=[alt.Tooltip("label:N", title="direction of")])
    labels = arrows_base.mark_text(fontSize=10, fontWeight="bold", dy=-9).encode(
        x="pc1:Q", y="pc2:Q", text="label:N", fill=alt.Fill("label:N", scale=arrow_scale, legend=None))
    return alt.layer(dots, shafts, heads, labels).properties(title=title, width=size, height=size)


def layer_heatmap(frame: pd.DataFrame, *, y: str, title: str, value: str = "cosine",
                  cell: float = 14, max_width: float = 300) -> alt.Chart:
    """`value` (-1 .. 1, the paper's colour scale) by layer (x) and `y` rows, values written in the cells when
    they fit."""
    n_layers = frame["layer"].nunique()
    width = max(120.0, min(cell * n_layers, max_width))
    base = alt.Chart(frame).encode(
        x=alt.X("layer:O", title="layer", axis=alt.Axis(labelAngle=0, labelOverlap=True, labelFontSize=LABEL_FONT)),
        y=alt.Y(f"{y}:N", title=None, sort=None, axis=alt.Axis(labelFontSize=LABEL_FONT)))
    heat = base.mark_rect().encode(
        color=alt.Color(f"{value}:Q", scale=diverging_scale(), title=value),
        tooltip=[f"{y}:N", "layer:O", alt.Tooltip(f"{value}:Q", format=".3f")])
    layers = [heat]
    if width / n_layers >= 28:
        layers.append(base.mark_text(fontSize=9).encode(text=alt.Text(f"{value}:Q", format=".2f")))
    return alt.layer(*layers).properties(title=title, width=width)


def grid(charts: list, columns: int, title: str | None = None, legend_below: bool = False):
    """Charts in rows of `columns`, sharing colour scales (one legend, below them if `legend_below`), with an
    overall title."""
    chart = alt.concat(*charts, columns=columns)
    if legend_below:
        chart = chart.configure_legend(orient="bottom", direction="horizontal", gradientLength=200)
    return chart.properties(title=title) if title else chart
