"""Presentation helpers shared by the analysis modules, the audit and the report (torch-free)."""
from __future__ import annotations

import math

import pandas as pd


def format_cell(value) -> str:
    """Numbers to 4 significant digits, missing values as an em dash, text with pipes escaped."""
    if isinstance(value, float):
        return "—" if math.isnan(value) else f"{value:.4g}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def markdown_table(frame: pd.DataFrame, max_width: int = 40) -> str:
    """`frame` as a pipe table; numeric columns right-aligned.

    Cells are padded to their column's width: the widest cell, capped at `max_width` but never narrower than
    the longest word of the header. In a table wider than the page, pandoc sizes the columns in proportion
    to these widths (the dashes under the header), so long text columns get more room but not all of it.
    """
    header = [str(c) for c in frame.columns]
    rows = [[format_cell(v) for v in row] for row in frame.itertuples(index=False)]
    numeric = [pd.api.types.is_numeric_dtype(frame[c]) for c in frame.columns]
    widths = [max(3, *(len(word) for word in h.split()), min(max_width, max((len(r[i]) for r in rows), default=0)))
              for i, h in enumerate(header)]

    def line(cells):
        padded = (c.rjust(w) if n else c.ljust(w) for c, w, n in zip(cells, widths, numeric))
        return "| " + " | ".join(padded) + " |"
    rule = "|" + "|".join(("-" * (w + 1) + ":") if n else (":" + "-" * (w + 1)) for w, n in zip(widths, numeric)) + "|"
    return "\n".join([line(header), rule, *(line(r) for r in rows)])
