"""The report's sections on real cubes: the tiny profile's four experiments are run once into a temporary results
directory, the fallback renderer makes HTML and PDF from them, and every section figure and table is found (by its
label and caption) with numbers computed from the cubes; a section whose cube is missing shows the placeholder."""
import html as html_lib
import json
import re
import unicodedata

import pypdf
import pytest

from report import render as rr

EXPERIMENTS = ("knowledge", "truthfulness", "refusal", "confidence")
SECTION_ITEMS = {  # labels of the figures and tables each section shows for the tiny profile
    "knowledge": ["fig-knowledge-maps", "fig-knowledge-paper", "tbl-knowledge", "fig-knowledge-cross",
                  "tbl-knowledge-cross"],
    "truthfulness": ["fig-truth-cosine", "tbl-truth-cosine", "tbl-truth-probe", "tbl-truth-ie", "fig-truth-pca"],
    "refusal": ["tbl-refusal-cosine", "fig-refusal-cosine", "tbl-refusal-scores", "tbl-refusal-degenerate",
                "fig-refusal-transfer", "tbl-refusal-samples", "fig-refusal-pca"],
    "confidence": ["tbl-entropy-neurons", "fig-entropy-scatter", "fig-entropy-venn", "fig-reliability",
                   "tbl-calibration", "tbl-ablation"],
}
NOT_FOR_TINY = ["tbl-figure1d",  # the Llama-3.1-8B family's neuron ids beside the paper's: only with that family
                "fig-knowledge-maps-2", "fig-knowledge-maps-3",  # tiny's two knowledge datasets fit one figure
                "fig-knowledge-cross-2", "fig-knowledge-cross-3"]
PLACEHOLDER = "Not yet computed for this profile"


@pytest.fixture(scope="module")
def rendered(tiny_results, tmp_path_factory):
    """The fallback render (HTML and PDF) of the tiny profile, with its HTML and PDF text."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PTR_RESULTS_DIR", str(tiny_results))
        paths = rr.render("tiny", out_dir=tmp_path_factory.mktemp("report"))
    html = paths["html"].read_text()
    pdf_text = " ".join(body_text(page) for page in pypdf.PdfReader(paths["pdf"]).pages)
    return {"html": html, "html_text": plain(html), "pdf_text": pdf_text, "dir": paths["html"].parent}


def body_text(page, footer: float = 70.0) -> str:
    """A PDF page's text without its footer (the page number, which would split a caption running over a page)."""
    parts = []
    page.extract_text(visitor_text=lambda text, cm, tm, font, size: parts.append(text) if cm[5] > footer else None)
    return " ".join(parts)


def plain(html: str) -> str:
    """The visible text of an HTML document (scripts and tags dropped, entities decoded)."""
    html = re.sub(r"<script.*?</script>", " ", html, flags=re.S)
    return html_lib.unescape(re.sub(r"<[^>]+>", " ", html))


def normalized(text: str) -> str:
    """Text compared across HTML and PDF: ligatures and quotes unified, no whitespace, no hyphens (typst hyphenates
    at line ends), no markdown escapes."""
    text = unicodedata.normalize("NFKC", text)
    text = text.translate(str.maketrans({"’": "'", "‘": "'", "“": '"', "”": '"', "\u00ad": None, "\\": None}))
    return re.sub(r"[\s\-‐]+", "", text)


def contains(text: str, phrase: str) -> bool:
    return normalized(phrase) in normalized(text)


def captions() -> dict[str, str]:
    """Caption of every labelled chunk of the document, by label."""
    _, blocks = rr.parse_qmd(rr.DOCUMENT.read_text())
    return {b.options["label"]: b.options.get("fig-cap") or b.options.get("tbl-cap")
            for b in blocks if isinstance(b, rr.Chunk) and rr.chunk_kind(b.options)}


def test_every_section_item_has_a_caption_naming_what_it_reproduces():
    caps = captions()
    for label in [*sum(SECTION_ITEMS.values(), []), *NOT_FOR_TINY]:
        assert label in caps, label
        if label[-2:] in ("-2", "-3"):  # a continued figure refers to its first part
            assert f"as in @{label[:-2]}" in caps[label], label
            continue
        assert re.search(r"cf\. (paper|the paper's|the original)|[Bb]eyond the paper|paper Figure", caps[label]), label


@pytest.mark.slow
def test_html_has_every_figure_and_table_with_its_caption(rendered):
    text = normalized(rendered["html_text"])
    caps = captions()
    for label in sum(SECTION_ITEMS.values(), []):
        assert f'id="{label}"' in rendered["html"], label
        assert normalized(caps[label]) in text, label
    for label in NOT_FOR_TINY:
        assert f'id="{label}"' not in rendered["html"]
    assert PLACEHOLDER not in rendered["html"] and "Not shown" not in rendered["html"]
    for label in (label for items in SECTION_ITEMS.values() for label in items if label.startswith("fig-")):
        figure = re.search(rf'<div id="{label}" class="figure">(.*?)<div class="caption">', rendered["html"], re.S)
        assert "vegaEmbed(" in figure.group(1), label  # an interactive chart


@pytest.mark.slow
def test_pdf_has_every_caption(rendered):
    text = normalized(rendered["pdf_text"])
    caps = captions()
    for label in sum(SECTION_ITEMS.values(), []):
        assert normalized(caps[label]) in text, label


@pytest.mark.slow
def test_report_numbers_come_from_the_cubes(rendered, tiny_results, monkeypatch):
    """Headline numbers of each finding, computed here through analysis, are what the report shows."""
    from analysis import confidence, knowledge, refusal, truthfulness
    from analysis.figures import format_cell

    monkeypatch.setenv("PTR_RESULTS_DIR", str(tiny_results))
    text = rendered["html_text"]
    table = knowledge.comparison_table("tiny")
    own = table[table["comparison"] == "own"]
    assert contains(text, f"Pearson r ≥ {own['corr'].min():.3f} on every dataset")
    assert all(format_cell(float(r)) in text for r in table["corr"])
    probes = truthfulness.probe_accuracies("tiny")
    assert all(format_cell(float(a)) in text for a in probes["accuracy_pct"])
    cosine = refusal.direction_cosines("tiny")["cosine"].max()
    assert contains(text, f"cosine ≤ {cosine:.3f}") and format_cell(float(cosine)) in text
    neurons = confidence.entropy_neuron_table("tiny")
    assert all(f"{o} of {n}" in text for o, n in zip(neurons["overlap"], neurons["of"]))
    assert contains(text, "ratio = ‖w_out‖ / ln(LogitVar)")
    assert re.search(r"Audit checks: (\d+ (holds|does not hold|not measured)(, )?)+\.", text)


@pytest.mark.slow
def test_a_section_without_its_cube_shows_the_placeholder(tiny_results, tmp_path, monkeypatch):
    """Only the knowledge and confidence cubes: truthfulness and refusal show the placeholder and none of their
    figures or tables; the others are complete."""
    (tmp_path / "results" / "tiny").mkdir(parents=True)
    for experiment in ("knowledge", "confidence"):
        (tmp_path / "results" / "tiny" / f"{experiment}.zarr").symlink_to(tiny_results / "tiny" / f"{experiment}.zarr")
    monkeypatch.setenv("PTR_RESULTS_DIR", str(tmp_path / "results"))
    html = rr.render("tiny", formats=("html",), out_dir=tmp_path / "out")["html"].read_text()
    assert html.count(PLACEHOLDER) == 2
    assert "ptr run truthfulness --profile tiny" in html and "ptr run refusal --profile tiny" in html
    for experiment, labels in SECTION_ITEMS.items():
        for label in labels:
            assert (f'id="{label}"' in html) == (experiment in ("knowledge", "confidence")), label
    summary = plain(html).split("What this profile")[1].split("Throughout")[0]
    for finding in ("Truthfulness", "Refusal"):
        assert contains(summary, f"{finding}: not yet computed for this profile"), finding
    assert contains(summary, "Knowledge: BASE's and POST's normalised causal-tracing maps correlate")


def test_an_incomplete_cube_is_reported_not_drawn(tiny_results, tmp_path, monkeypatch):
    """A cube still being computed (here: the confidence cube without its 'pairs' unit) is named incomplete with
    the analysis error; its section shows no figure or table and its claim is not measured."""
    import shutil

    import zarr

    from replication.cubes import COMPLETE_ATTR, UNITS_GROUP

    cube = tmp_path / "tiny" / "confidence.zarr"
    shutil.copytree(tiny_results / "tiny" / "confidence.zarr", cube)
    unit = zarr.open_group(str(cube), mode="a", path=f"{UNITS_GROUP}/pairs")
    unit.attrs.put({k: v for k, v in unit.attrs.items() if k != COMPLETE_ATTR})
    monkeypatch.setenv("PTR_RESULTS_DIR", str(tmp_path))
    monkeypatch.syspath_prepend(str(rr.REPORT_DIR))
    import blocks
    import sections

    status = blocks.cube_status("confidence", "tiny").data
    assert "incomplete" in status and "no finished unit 'pairs'" in status
    assert sections.entropy_neuron_table("tiny") is None and sections.entropy_scatter("tiny") is None
    table = blocks.audit_table("tiny")
    assert table.set_index("key").loc["qualitative.confidence.min_entropy_neuron_overlap", "status"] == "not measured"
    assert "Confidence**: incomplete for this profile" in sections.summary("tiny", table).data


@pytest.mark.slow
def test_the_appendix_tables_are_collapsed_in_html_and_shown_in_pdf(rendered):
    for label, summary in (("tbl-refusal-samples", "Show the sample completions"),
                           ("tbl-runs", "Show the provenance tables")):
        collapsed = re.search(rf"<details><summary>{summary}</summary>(.*?)</details>", rendered["html"], re.S)
        assert collapsed and f'id="{label}"' in collapsed.group(1), label
    assert "<details>" not in rendered["pdf_text"] and contains(rendered["pdf_text"], captions()["tbl-runs"])


@pytest.mark.slow
def test_every_chart_shows_its_values_on_hover(rendered):
    """Each chart of the HTML declares a tooltip on the marks that carry its data (vega-embed's tooltip handler,
    bundled with it, shows them)."""
    specs = [json.loads(spec) for spec in re.findall(r'vegaEmbed\("#vega-chart-\d+", (.*?), \{"actions"',
                                                      rendered["html"], re.S)]
    assert len(specs) == len(json.loads((rendered["dir"] / rr.DECLARED).read_text())["figures"])
    for spec in specs:
        assert '"tooltip"' in json.dumps(spec), spec.get("title")


@pytest.mark.slow
def test_knowledge_maps_have_the_paper_map_beside_them(rendered):
    figure = re.search(r'<div id="fig-knowledge-paper" class="figure">(.*?)<div class="caption">', rendered["html"],
                       re.S).group(1)
    assert "llama-3.1-8b-instruct (authors' patching_results.json)" in figure
    assert "BASE tiny-llama" in figure and "SFT tiny-llama-sft" in figure


@pytest.mark.slow
def test_the_pdf_shows_what_the_report_declares(rendered):
    from report import check

    declared = json.loads((rendered["dir"] / rr.DECLARED).read_text())
    assert "fig-knowledge-paper" in declared["figures"] and "tbl-refusal-samples" in declared["tables"]
    pages, captions_found = check.pdf_captions(rendered["dir"] / "report.pdf")
    assert captions_found == {"Figure": len(declared["figures"]), "Table": len(declared["tables"])}
    assert pages > 10


@pytest.mark.slow
def test_the_html_draws_every_chart_in_chromium_without_errors(rendered):
    from report import check

    try:
        check.chromium()
    except check.CheckError as error:
        pytest.skip(str(error))
    n_figures = len(json.loads((rendered["dir"] / rr.DECLARED).read_text())["figures"])
    result = check.check_html(rendered["dir"] / "report.html", n_figures, rendered["dir"] / "screenshot.png")
    assert result.errors == [] and result.charts == n_figures and result.remote_requests == []
    assert result.screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
