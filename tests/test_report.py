"""The report: .qmd parsing, output conversion, and fallback renders of a small fixture results directory."""
import json
import os
import re
import subprocess
import sys

import nbformat
import numpy as np
import pypdf
import pytest
import xarray as xr
from click.testing import CliRunner

from data_prep.paths import REPO_ROOT
from replication.cubes import CubeStore, set_aside
from report import render as rr

SECTIONS = ["Summary", "Knowledge", "Truthfulness", "Refusal", "Confidence", "Audit", "Provenance"]
PROVENANCE = {
    "experiment": "example", "git_commit": "0123456789abcdef0123456789abcdef01234567", "profile": "demo",
    "config_hash": "feedface" * 8, "dtype": "float32", "device": "cpu", "seed": 7, "host": "fixture-host",
    "started_at": "2025-11-24T10:00:00+00:00",
    "models": {"tiny-base": {"hf_id": "org/tiny-base", "revision": "rev-base-1"},
               "tiny-post": {"hf_id": "org/tiny-post", "revision": "rev-post-2"}},
    "data": {"manifest": "data/processed/manifest.json", "sha256": "5e" * 32},
    "packages": {"python": "3.11.9", "xarray": "2026.9.0"},
}


def write_cube(path, units=("tiny-base__cities", "tiny-post__cities")):
    store = CubeStore(path, provenance=PROVENANCE)
    for unit in units:
        store.write_unit(unit, xr.Dataset({"effect": (("layer",), np.arange(3.0))}, coords={"layer": [0, 1, 2]}))
    return store


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    """One fallback render (HTML + PDF) of profile demo with one cube (not one of the experiments' names, so
    the experiment sections report their cubes missing whatever analysis modules exist)."""
    results = tmp_path_factory.mktemp("results")
    write_cube(results / "demo" / "example.zarr")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PTR_RESULTS_DIR", str(results))
        yield rr.render("demo", out_dir=tmp_path_factory.mktemp("out"))


def test_parse_qmd_reads_front_matter_markdown_chunks_and_options():
    text = ("---\ntitle: \"T\"\n---\n\n# Intro\n\nSee @fig-a.\n\n```{python}\n#| label: fig-a\n"
            "#| fig-cap: \"A chart.\"\n#| echo: false\nx = 1\nx\n```\n\nAfter.\n")
    front, blocks = rr.parse_qmd(text)
    assert front == {"title": "T"}
    assert [type(b).__name__ for b in blocks] == ["str", "Chunk", "str"]
    chunk = blocks[1]
    assert chunk.options == {"label": "fig-a", "fig-cap": "A chart.", "echo": False}
    assert chunk.code == "x = 1\nx"
    assert chunk.line == 9  # line of the opening fence in the file
    assert rr.chunk_kind(chunk.options) == "fig" and rr.chunk_kind({"label": "setup"}) is None


@pytest.mark.parametrize("text, message", [
    ("```{python}\nx = 1\n", "never closed"),
    ("```{r}\n1\n```\n", "only python chunks"),
    ("```{python}\n#| fig-width: 3\n1\n```\n", "not supported"),
    ("```{python}\n#| label: tbl-x\n1\n```\n", "needs a `tbl-cap`"),
    ("```{python}\n#| echo: true\n1\n```\n", "never shows code"),
    ("---\ntitle: x\n\nbody\n", "never closed with a --- line"),
])
def test_parse_qmd_errors_name_the_problem(text, message):
    with pytest.raises(ValueError, match=message):
        rr.parse_qmd(text)


def test_the_document_parses_and_its_captioned_chunks_have_captions():
    _, blocks = rr.parse_qmd(rr.DOCUMENT.read_text())
    labels = [b.options.get("label") for b in blocks if isinstance(b, rr.Chunk)]
    assert "tbl-audit" in labels and "fig-run-times" in labels
    assert len(labels) == len(set(labels)), "chunk labels must be unique"


def executed_cell(options, outputs):
    cell = nbformat.v4.new_code_cell("", metadata={"options": options, "line": 1})
    cell.outputs = [nbformat.v4.new_output("display_data", data=data) for data in outputs]
    return cell


CHART = {"text/html": "<div>chart</div>", "image/svg+xml": "<svg xmlns='http://www.w3.org/2000/svg'/>"}
TABLE = {"text/markdown": "| a |\n|--:|\n| 1 |", "text/plain": "<Table>"}


def test_numbering_and_cross_references_follow_document_order(tmp_path):
    nb = nbformat.v4.new_notebook(cells=[
        executed_cell({"label": "tbl-b", "tbl-cap": "B"}, [TABLE]),
        executed_cell({"label": "fig-empty", "fig-cap": "shows nothing"}, []),
        executed_cell({"label": "fig-a", "fig-cap": "A"}, [CHART]),
        executed_cell({"label": "tbl-c", "tbl-cap": "C"}, [TABLE]),
    ])
    numbers = rr.numbering(nb)
    assert numbers == {"tbl-b": "Table 1", "fig-a": "Figure 1", "tbl-c": "Table 2"}
    assert rr.resolve_refs("see @fig-a and @tbl-c, not @fig-empty; mail a@fig-a", numbers) == (
        "see [Figure 1](#fig-a) and [Table 2](#tbl-c), not **?@fig-empty**; mail a@fig-a")


def test_cell_markdown_picks_representation_and_captions_per_format(tmp_path):
    numbers = {"fig-a": "Figure 1", "tbl-b": "Table 1"}
    fig = executed_cell({"label": "fig-a", "fig-cap": "A chart."}, [CHART])
    html = rr.cell_markdown(fig, "html", numbers, tmp_path)
    assert "{=html}\n<div>chart</div>" in html and "{#fig-a .figure}" in html and "Figure 1: A chart." in html
    pdf = rr.cell_markdown(fig, "pdf", numbers, tmp_path)
    assert re.fullmatch(r"!\[A chart\.\]\((image-\d+\.svg)\)\{#fig-a\}", pdf)  # typst numbers it
    assert (tmp_path / re.search(r"image-\d+\.svg", pdf).group()).read_text() == CHART["image/svg+xml"]
    table = executed_cell({"label": "tbl-b", "tbl-cap": "B."}, [TABLE])
    assert rr.cell_markdown(table, "html", numbers, tmp_path).endswith(": Table 1: B. {#tbl-b}")
    assert rr.cell_markdown(table, "pdf", numbers, tmp_path).endswith(": B. {#tbl-b}")
    plain = executed_cell({}, [{"text/plain": "42"}])
    assert rr.cell_markdown(plain, "html", {}, tmp_path) == "```\n42\n```"


def test_a_figure_chunk_showing_text_is_an_error(tmp_path):
    cell = executed_cell({"label": "fig-a", "fig-cap": "A"}, [{"text/markdown": "*missing*"}])
    with pytest.raises(ValueError, match="fig-a .* must display one chart or image or nothing"):
        rr.cell_markdown(cell, "html", {"fig-a": "Figure 1"}, tmp_path)


def test_raw_html_fence_is_longer_than_any_backtick_run():
    block = rr._raw_html("a ```` b")
    assert block.startswith("`````{=html}\n") and block.endswith("\n`````")


@pytest.mark.slow
def test_html_has_sections_table_interactive_figure_and_provenance(rendered):
    html = rendered["html"].read_text()
    for section in SECTIONS:
        assert re.search(rf"<h2[^>]*>{section}</h2>", html), section
    assert " ".join(html.split()).count("Not yet computed for this profile") == 4  # pandoc wraps long lines
    assert re.search(r"<table.*?<caption>\s*Table 1: Audit", html, re.S)
    assert "not measured" in html
    figure = re.search(r'<div id="fig-run-times" class="figure">(.*?)</div>\s*</div>', html, re.S).group(1)
    spec = json.loads(re.search(r'vegaEmbed\("#vega-chart-1", (\{.*?\}), \{"actions"', figure, re.S).group(1))
    assert spec["mark"]["type"] == "bar" and spec["encoding"]["x"]["field"] == "seconds"
    assert "Figure 1: Compute time of each cube, one bar segment per finished unit." in " ".join(figure.split())
    assert "vegaEmbed" in html and not re.search(r"<script[^>]+src=", html)  # JavaScript inlined, no CDN
    for value in ["org/tiny-base", "rev-base-1", "rev-post-2", "5e" * 32, "0123456789ab", "fixture-host"]:
        assert value in html, value


@pytest.mark.slow
def test_pdf_has_pages_sections_table_and_figure(rendered):
    pdf = rendered["pdf"]
    assert pdf.read_bytes().startswith(b"%PDF")
    reader = pypdf.PdfReader(pdf)
    assert len(reader.pages) >= 1
    text = " ".join(" ".join(page.extract_text() for page in reader.pages).split())  # one space everywhere
    for section in SECTIONS:
        assert section in text, section
    assert "Table 1: Audit" in text and "Figure 1: Compute time" in text
    assert "rev-base-1" in text and "5e" * 32 in text


@pytest.mark.slow
def test_report_renders_without_any_cube(tmp_path, monkeypatch):
    monkeypatch.setenv("PTR_RESULTS_DIR", str(tmp_path / "results"))
    html = " ".join(rr.render("tiny", formats=("html",), out_dir=tmp_path)["html"].read_text().split())
    assert html.count("Not yet computed for this profile") == 4
    assert "No cubes yet for this profile." in html and "Table 1: Audit" in html
    assert 'id="fig-run-times"' not in html


@pytest.mark.slow
def test_a_failing_chunk_names_its_line():
    notebook = rr.to_notebook([rr.Chunk("1 / 0", {}, line=12)])
    with pytest.raises(RuntimeError, match="chunk at line 12 of index.qmd(.|\n)*ZeroDivisionError"):
        rr.execute(notebook, "demo")


@pytest.mark.slow
def test_the_report_kernel_imports_this_checkout(tmp_path, monkeypatch):
    """The kernel starts in report/: this checkout goes first on its import path, before what the environment puts
    there (here a decoy `analysis` package, as another checkout sharing the virtual environment would be)."""
    (tmp_path / "analysis").mkdir()
    (tmp_path / "analysis" / "__init__.py").write_text("")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    notebook = rr.to_notebook([rr.Chunk("import analysis\nprint(analysis.__file__)", {}, line=1)])
    assert rr.execute(notebook, "tiny").cells[0].outputs[0].text.strip() == str(REPO_ROOT / "analysis" / "__init__.py")


def test_render_rejects_unknown_formats():
    with pytest.raises(ValueError, match="unknown report formats"):
        rr.render("demo", formats=("docx",))


def test_quarto_renders_the_same_project_with_the_profile_set(tmp_path, monkeypatch):
    """A stand-in `quarto` on PATH records how it is called (the real binary is not installed here)."""
    log = tmp_path / "quarto-call.txt"
    fake = tmp_path / "bin" / "quarto"
    fake.parent.mkdir()
    fake.write_text(f'#!/bin/sh\necho "$@" "PTR_PROFILE=$PTR_PROFILE" "QUARTO_PYTHON=$QUARTO_PYTHON" '
                    f'"PYTHONPATH=$PYTHONPATH" > {log}\n')
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}:{os.environ['PATH']}")
    monkeypatch.delenv("PYTHONPATH", raising=False)
    result = CliRunner().invoke(rr.main, ["--profile", "paper", "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert log.read_text().split() == ["render", str(rr.REPORT_DIR), "--to", "html,typst", "--output-dir",
                                       str(tmp_path / "out"), "PTR_PROFILE=paper", f"QUARTO_PYTHON={sys.executable}",
                                       f"PYTHONPATH={REPO_ROOT}"]
    assert result.output.split() == [str(tmp_path / "out" / "report.html"), str(tmp_path / "out" / "report.pdf")]


def test_render_with_quarto_without_quarto_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="quarto is not on PATH"):
        rr.render_with_quarto("demo")


def test_cube_status_and_provenance_tables(tmp_path, monkeypatch):
    sys.path.insert(0, str(rr.REPORT_DIR))
    try:
        import blocks
    finally:
        sys.path.remove(str(rr.REPORT_DIR))
    monkeypatch.setenv("PTR_RESULTS_DIR", str(tmp_path))
    write_cube(tmp_path / "demo" / "knowledge.zarr")
    write_cube(tmp_path / "demo" / "refusal.zarr")
    set_aside(tmp_path / "demo" / "refusal.zarr")  # as `ptr run refusal --fresh` leaves it: not a cube of the run
    assert "2 finished unit(s)" in blocks.cube_status("knowledge", "demo").data
    assert "Not yet computed for this profile" in blocks.cube_status("refusal", "demo").data
    attrs = blocks.cube_attrs("demo")
    times = blocks.unit_times("demo")
    assert list(attrs) == ["knowledge"] and times["unit"].tolist() == ["tiny-base__cities", "tiny-post__cities"]
    runs = blocks.runs_table(attrs, times).frame.set_index("")["knowledge"]
    assert runs["git commit"] == "0123456789ab" and runs["seed"] == "7" and runs["finished units"] == "2"
    models = blocks.models_table(attrs).frame
    assert models.set_index("model").loc["tiny-post", "revision"] == "rev-post-2"
    assert blocks.runs_table({}, times) is None


def test_report_code_never_imports_torch():
    code = ("import sys; sys.path.insert(0, 'report'); import blocks, sections, report.render; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, check=True)


# --- analysis/figures.py: cells and charts of the sections --------------------------------------------------

def test_beside_paper_puts_the_paper_value_in_parentheses():
    import pandas as pd

    from analysis.figures import beside, beside_paper

    assert beside(0.99287, 0.9923) == "0.9929 (0.9923)" and beside(3.0, None) == "3"
    assert beside(float("nan"), 1) == "— (1)"
    table = pd.DataFrame({("r", "measured"): [0.5, 0.25], ("r", "paper"): [0.9, None]},
                         index=pd.Index(["cities", "facts"], name="dataset"))
    table.columns = pd.MultiIndex.from_tuples(table.columns)
    flat = beside_paper(table)
    assert flat.columns.tolist() == ["dataset", "r"] and flat["r"].tolist() == ["0.5 (0.9)", "0.25"]


def test_escape_markdown_shows_model_output_literally():
    from analysis.figures import escape_markdown

    assert escape_markdown("**bold** <b>|x_y") == "\\*\\*bold\\*\\* \\<b\\>\\|x\\_y"
    assert escape_markdown("a\nb\x02c\td") == "a·b·c·d"


def test_token_heatmap_frames_each_run_of_knowledge_columns():
    from analysis.figures import runs, token_heatmap

    assert runs([False, True, True, False, True]) == [(1, 2), (4, 4)]
    values = np.arange(12.0).reshape(3, 4) / 12
    chart = token_heatmap(values, ["The", "[s1]", "[s2]", ":"], [False, True, True, False], title="t").to_dict()
    cells, frames = (chart["datasets"][layer["data"]["name"]] for layer in chart["layer"])
    assert len(cells) == 12 and {c["token"] for c in cells} == {"The", "[s1]", "[s2]", ":"}
    assert frames == [{"x0": 0.5, "x1": 2.5, "y0": -0.5, "y1": 2.5}]  # one frame around both subject tokens
    axis = chart["layer"][0]["encoding"]["x"]["axis"]
    assert axis["values"] == [0, 1, 2, 3] and '["The", "[s1]", "[s2]", ":"][datum.value]' == axis["labelExpr"]


def test_pca_plane_scales_arrows_together_to_the_points():
    import pandas as pd

    from analysis.figures import pca_plane

    points = pd.DataFrame({"pc1": [2.0, -1.0], "pc2": [0.0, 1.0], "kind": ["a", "b"]})
    arrows = pd.DataFrame({"pc1": [0.5, 0.0], "pc2": [0.0, 0.25], "label": ["BASE", "POST"]})
    chart = pca_plane(points, arrows, color="kind", color_title="kind", title="t", explained=(0.5, 0.25)).to_dict()
    tips = chart["datasets"][chart["layer"][1]["data"]["name"]]
    assert [(t["pc1"], t["pc2"]) for t in tips] == [(pytest.approx(1.8), 0.0), (0.0, pytest.approx(0.9))]
    assert chart["layer"][0]["encoding"]["x"]["title"] == "PC1 (50% of variance)"


def test_token_heatmap_draws_the_papers_colours_with_layer_0_on_top():
    """The original's colour bar (patching_visualize.py draw_figure): -1 blue, 0 near-white, +1 red, linear between;
    layer 0 in the top row, as px.imshow(origin='upper') draws it."""
    import vl_convert as vlc

    from analysis.figures import token_heatmap

    chart = token_heatmap(np.array([[-1.0, 0.0, 1.0], [0.5, 0.5, 0.5]]), ["a", "b", "c"], [False] * 3, title="t")
    svg = vlc.vegalite_to_svg(chart.to_dict())
    cells = re.findall(r'<path[^>]*? d="M([\d.]+),([\d.]+)h[^"]*" fill="(rgb[^"]+)"', svg)  # cell corner, colour
    by_row = sorted(cells, key=lambda c: (float(c[1]), float(c[0])))
    assert [fill for _, _, fill in by_row] == ["rgb(0, 0, 255)", "rgb(245, 245, 245)", "rgb(255, 0, 0)",
                                                *["rgb(250, 123, 123)"] * 3]  # layer 0 (top row) first


def test_every_profile_has_a_note_saying_what_it_can_show(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(rr.REPORT_DIR))
    import blocks

    from data_prep.paths import REPO_ROOT

    profiles = {p.stem for p in (REPO_ROOT / "replication" / "configs" / "profiles").glob("*.yaml")}
    notes = blocks.profile_notes()
    assert profiles <= set(notes)
    box = blocks.profile_note("demo").data
    assert box.startswith("::: {.profile-note}") and notes["demo"]["title"] in box
    assert "near noise" in box and "Cannot show:" in box
    bad = tmp_path / "notes.yaml"
    bad.write_text("tiny: {title: T, can: x}\n")
    monkeypatch.setattr(blocks, "PROFILE_NOTES", bad)
    with pytest.raises(ValueError, match=r"profile 'tiny' has \['can', 'title'\]; give exactly"):
        blocks.profile_notes()


def test_the_browser_check_sees_console_errors_and_undrawn_charts(tmp_path):
    """A page with one console error, no chart and an image from the network: the check reports all three."""
    from report import check

    try:
        check.chromium()
    except check.CheckError as error:
        pytest.skip(str(error))
    page = tmp_path / "page.html"
    page.write_text("<html><body><p>no chart</p><img src='http://192.0.2.1/x.png'>"
                    "<script>console.error('broken chart');</script></body></html>")
    result = check.check_html(page, n_figures=1, screenshot=tmp_path / "shot.png", timeout=2)
    assert result.charts == 0 and any("broken chart" in e for e in result.errors)
    assert result.remote_requests == ["http://192.0.2.1/x.png"]
    assert (tmp_path / "shot.png").stat().st_size > 0
