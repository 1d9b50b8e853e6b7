"""Render the report (report/index.qmd) to HTML and PDF, with Quarto when installed, otherwise without it.

    python -m report.render --profile demo --to html,pdf

The fallback executes the same cells Quarto would (a Jupyter kernel running this interpreter, working
directory report/, PTR_PROFILE set) and picks each output's representation as Quarto does: HTML prefers
text/html, then text/markdown, SVG, PNG; PDF prefers text/markdown, then SVG, PNG; text/plain last. It then
writes pandoc markdown and converts it with pandoc (HTML, resources embedded) or pandoc + typst (PDF).

Chunk options understood: `label`, `fig-cap` (with a `fig-` label: the chunk shows one chart or image, or
nothing), `tbl-cap` (with a `tbl-` label: the chunk shows one markdown table, or nothing) and `echo` (code is
never shown). `@fig-...`/`@tbl-...` in the text become numbered links, as in Quarto.
"""
from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import click
import nbformat
import pypandoc
import typst
import yaml
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError
from traitlets.config import Config

from data_prep.paths import REPO_ROOT, work_root
from replication.config import resolve_profile

REPORT_DIR = Path(__file__).resolve().parent
DOCUMENT = REPORT_DIR / "index.qmd"
OUTPUT_DIR = work_root() / "report" / "_output"  # report/_output in a checkout; under the current directory when installed
FORMATS = ("html", "pdf")
OPTIONS = {"label", "fig-cap", "tbl-cap", "echo"}
PRIORITY = {
    "html": ["text/html", "text/markdown", "image/svg+xml", "image/png", "text/plain"],
    "pdf": ["text/markdown", "image/svg+xml", "image/png", "text/plain"],
}
KINDS = {"fig": "Figure", "tbl": "Table"}
CROSS_REF = re.compile(r"(?<![\w@])@((?:fig|tbl)-[\w-]*\w)")
CSS = REPORT_DIR / "fallback.css"
TYPST_HEADER = REPORT_DIR / "typst-header.typ"
FILTER = REPORT_DIR / "filters.lua"  # collapsed appendix tables in HTML, the profile box in typst (Quarto runs it too)
PANDOC_ARGS = ["--standalone", "--toc", "--metadata=toc-title:Contents", f"--lua-filter={FILTER}"]


@dataclass(frozen=True)
class Chunk:
    code: str
    options: dict = field(default_factory=dict)
    line: int = 0  # line of the opening fence in the .qmd


def chunk_kind(options: dict) -> str | None:
    """'fig' or 'tbl' for a cross-referenced chunk (label fig-... / tbl-...), else None."""
    prefix = str(options.get("label", "")).split("-")[0]
    return prefix if prefix in KINDS else None


def parse_qmd(text: str, source: str = "index.qmd") -> tuple[dict, list[str | Chunk]]:
    """Front matter and the document as a list of markdown strings and python chunks."""
    front, offset = {}, 0
    if text.startswith("---\n"):
        end = text.find("\n---\n", 4)
        if end < 0:
            raise ValueError(f"{source}:1: the front matter opened with --- is never closed with a --- line")
        front = yaml.safe_load(text[4:end]) or {}
        offset = text[:end + 5].count("\n")
        text = text[end + 5:]
    blocks: list[str | Chunk] = []
    markdown: list[str] = []
    lines = text.split("\n")
    i = 0
    while i < len(lines):
        fence = re.match(r"^```\s*\{(\w+)[^}]*\}\s*$", lines[i])
        if not fence:
            markdown.append(lines[i])
            i += 1
            continue
        start = offset + i + 1
        if fence.group(1) != "python":
            raise ValueError(f"{source}:{start}: only python chunks can be executed, found {{{fence.group(1)}}}")
        try:
            close = next(j for j in range(i + 1, len(lines)) if re.match(r"^```\s*$", lines[j]))
        except StopIteration:
            raise ValueError(f"{source}:{start}: python chunk is never closed with ```") from None
        body = lines[i + 1:close]
        n_options = next((k for k, line in enumerate(body) if not line.startswith("#|")), len(body))
        options = yaml.safe_load("\n".join(line[3:] for line in body[:n_options])) or {}
        unknown = set(options) - OPTIONS
        if unknown:
            raise ValueError(f"{source}:{start}: chunk options {sorted(unknown)} are not supported by the "
                             f"fallback renderer (supported: {sorted(OPTIONS)})")
        if options.get("echo", False):
            raise ValueError(f"{source}:{start}: `echo: true` is not supported; the report never shows code")
        kind = chunk_kind(options)
        if kind and f"{kind}-cap" not in options:
            raise ValueError(f"{source}:{start}: chunk {options['label']} needs a `{kind}-cap` option")
        blocks += ["\n".join(markdown), Chunk("\n".join(body[n_options:]).strip("\n"), options, start)]
        markdown = []
        i = close + 1
    blocks.append("\n".join(markdown))
    return front, [b for b in blocks if isinstance(b, Chunk) or b.strip()]


def to_notebook(blocks: list[str | Chunk]) -> nbformat.NotebookNode:
    cells = [nbformat.v4.new_code_cell(b.code, metadata={"options": b.options, "line": b.line})
             if isinstance(b, Chunk) else nbformat.v4.new_markdown_cell(b) for b in blocks]
    return nbformat.v4.new_notebook(cells=cells)


def kernel_environment(profile: str) -> dict[str, str]:
    """The environment of the report's Python: the profile, and this checkout first on the import path. The kernel
    starts in report/, so without it `import analysis` finds whatever the interpreter has installed, which may be
    another checkout (one virtual environment shared by two clones) reading that checkout's results."""
    path = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PTR_PROFILE": profile, "PYTHONPATH": path}


def execute(notebook: nbformat.NotebookNode, profile: str) -> nbformat.NotebookNode:
    """Run every cell in a kernel of this interpreter (jupyter_client runs kernelspec 'python' as sys.executable)."""
    with tempfile.TemporaryDirectory() as sockets:
        # IPC sockets in a private directory, not TCP: nothing to eavesdrop on, and no kernel warning saying so
        client = NotebookClient(notebook, kernel_name="python3", timeout=1800,
                                resources={"metadata": {"path": str(REPORT_DIR)}},
                                config=Config({"KernelManager": {"transport": "ipc", "ip": f"{sockets}/kernel"}}))
        try:
            client.execute(env=kernel_environment(profile))
        except CellExecutionError as err:
            cell = next((c for c in notebook.cells
                         if any(o.get("output_type") == "error" for o in c.get("outputs", []))), None)
            where = f"the chunk at line {cell.metadata['line']} of {DOCUMENT.name}" if cell else DOCUMENT.name
            raise RuntimeError(f"executing the report failed in {where}:\n{err}") from None
    return notebook


def _displays(cell) -> list[dict]:
    return [o for o in cell.outputs if o.output_type in ("display_data", "execute_result")]


def numbering(notebook: nbformat.NotebookNode) -> dict[str, str]:
    """'fig-x' -> 'Figure 1' etc., in document order, for labelled chunks that displayed something."""
    counts = dict.fromkeys(KINDS, 0)
    numbers = {}
    for cell in notebook.cells:
        kind = chunk_kind(cell.metadata.get("options", {})) if cell.cell_type == "code" else None
        if kind and _displays(cell):
            counts[kind] += 1
            numbers[cell.metadata["options"]["label"]] = f"{KINDS[kind]} {counts[kind]}"
    return numbers


def resolve_refs(text: str, numbers: dict[str, str]) -> str:
    """`@fig-x` -> a link 'Figure N'; an unknown label is shown as ?@fig-x, as Quarto does."""
    return CROSS_REF.sub(lambda m: f"[{numbers[m.group(1)]}](#{m.group(1)})" if m.group(1) in numbers
                         else f"**?@{m.group(1)}**", text)


def _raw_html(html: str) -> str:
    fence = "`" * max(3, 1 + max((len(r) for r in re.findall(r"`+", html)), default=0))
    return f"{fence}{{=html}}\n{html}\n{fence}"


def _text(value) -> str:
    return "".join(value) if isinstance(value, list) else value


@dataclass(frozen=True)
class Shown:
    mime: str  # the representation chosen
    markdown: str
    image: str | None = None  # file name in the build directory, for images


def _output(output: dict, fmt: str, assets: Path) -> Shown:
    mime = next(m for m in PRIORITY[fmt] if m in output.data)
    data = output.data[mime]
    if mime in ("image/svg+xml", "image/png"):
        path = assets / f"image-{len(list(assets.iterdir())) + 1}.{'svg' if mime == 'image/svg+xml' else 'png'}"
        path.write_bytes(_text(data).encode() if mime == "image/svg+xml" else base64.b64decode(data))
        return Shown(mime, f"![]({path.name})", path.name)
    if mime == "text/html":
        return Shown(mime, _raw_html(_text(data)))
    if mime == "text/markdown":
        return Shown(mime, _text(data))
    return Shown(mime, f"```\n{_text(data)}\n```")


def cell_markdown(cell, fmt: str, numbers: dict[str, str], assets: Path) -> str:
    """Pandoc markdown for one executed code cell: its outputs, with the figure or table caption."""
    options = cell.metadata.get("options", {})
    kind = chunk_kind(options)
    parts = [f"```\n{_text(o.text)}\n```" for o in cell.outputs
             if o.output_type == "stream" and o.name == "stdout"]
    shown = [_output(o, fmt, assets) for o in _displays(cell)]
    if not kind or not shown:
        return "\n\n".join(parts + [s.markdown for s in shown])
    label = options["label"]
    expected = ("text/html", "image/svg+xml", "image/png") if kind == "fig" else ("text/markdown",)
    if len(shown) != 1 or shown[0].mime not in expected:
        raise ValueError(f"chunk {label} (line {cell.metadata['line']} of {DOCUMENT.name}) must display one "
                         f"{'chart or image' if kind == 'fig' else 'markdown table'} or nothing; it displayed "
                         f"{[s.mime for s in shown]}")
    content = shown[0]
    caption = resolve_refs(options[f"{kind}-cap"], numbers)
    if fmt == "html":  # typst numbers its figures and tables itself; HTML needs the number in the caption
        caption = f"{numbers[label]}: {caption}"
    if kind == "tbl":
        captioned = f"{content.markdown}\n\n: {caption} {{#{label}}}"
    elif fmt == "pdf":  # an image with a caption and an id is a numbered typst figure
        captioned = f"![{caption}]({content.image}){{#{label}}}"
    else:
        captioned = f"::: {{#{label} .figure}}\n{content.markdown}\n\n::: caption\n{caption}\n:::\n:::"
    return "\n\n".join(parts + [captioned])


def to_pandoc_markdown(notebook: nbformat.NotebookNode, front: dict, fmt: str, assets: Path) -> str:
    numbers = numbering(notebook)
    body = [resolve_refs(c.source, numbers) if c.cell_type == "markdown" else cell_markdown(c, fmt, numbers, assets)
            for c in notebook.cells]
    header = f"---\n{yaml.safe_dump(front, allow_unicode=True)}---"
    return "\n\n".join([header] + [b for b in body if b.strip()]) + "\n"


DECLARED = "declared.json"  # beside the rendered report: the figures and tables it shows (report.check reads it)


def declare(numbers: dict[str, str], out_dir: Path) -> Path:
    """Write the labels of the figures and tables the report shows, in order, for the browser and PDF checks."""
    declared = {kind: [label for label in numbers if label.startswith(f"{kind}-")] for kind in KINDS}
    path = out_dir / DECLARED
    path.write_text(json.dumps({"figures": declared["fig"], "tables": declared["tbl"]}, indent=1) + "\n")
    return path


def render(profile: str, formats=FORMATS, out_dir: Path | None = None) -> dict[str, Path]:
    """Render with the fallback renderer; returns {format: path} of report.html / report.pdf."""
    unknown = set(formats) - set(FORMATS)
    if unknown:
        raise ValueError(f"unknown report formats {sorted(unknown)}; choose from {list(FORMATS)}")
    out_dir = Path(out_dir) if out_dir else OUTPUT_DIR / resolve_profile(profile).name  # a name or a YAML path
    out_dir.mkdir(parents=True, exist_ok=True)
    front, blocks = parse_qmd(DOCUMENT.read_text(), DOCUMENT.name)
    notebook = execute(to_notebook(blocks), profile)
    declare(numbering(notebook), out_dir)
    outputs = {}
    for fmt in formats:
        with tempfile.TemporaryDirectory() as build:
            build = Path(build)
            markdown = to_pandoc_markdown(notebook, front, fmt, build)
            target = out_dir / f"report.{fmt}"
            if fmt == "html":
                pypandoc.convert_text(markdown, "html5", format="markdown", outputfile=str(target), extra_args=[
                    *PANDOC_ARGS, "--embed-resources", f"--resource-path={build}", f"--css={CSS}",
                    "--variable=document-css:true"])
            else:
                typ = build / "report.typ"
                # --columns=1000: pandoc gives typst auto column widths (fit to content, wrapping) instead of fixed
                # fractions from the pipe table's dashes, which let long cells overflow into their neighbours.
                pypandoc.convert_text(markdown, "typst", format="markdown", outputfile=str(typ), extra_args=[
                    *PANDOC_ARGS, f"--include-in-header={TYPST_HEADER}", "--variable=papersize:a4", "--columns=1000"])
                typst.compile(str(typ), output=str(target))
        outputs[fmt] = target
    return outputs


def render_with_quarto(profile: str, formats=FORMATS, out_dir: Path | None = None) -> dict[str, Path]:
    """Render with the `quarto` binary (same cells, same profile variable); returns {format: path}."""
    quarto = shutil.which("quarto")
    if quarto is None:
        raise FileNotFoundError("quarto is not on PATH; install it (https://quarto.org) or use render()")
    out_dir = Path(out_dir) if out_dir else OUTPUT_DIR / resolve_profile(profile).name  # a name or a YAML path
    (out_dir / DECLARED).unlink(missing_ok=True)  # only the fallback renderer knows what it shows (report.check)
    to = ",".join("typst" if fmt == "pdf" else fmt for fmt in formats)
    env = {**kernel_environment(profile), "QUARTO_PYTHON": sys.executable}
    subprocess.run([quarto, "render", str(REPORT_DIR), "--to", to, "--output-dir", str(out_dir.resolve())],
                   env=env, check=True)
    return {fmt: out_dir / f"report.{fmt}" for fmt in formats}


def render_auto(profile: str, formats=FORMATS, out_dir: Path | None = None, engine: str = "auto") -> dict[str, Path]:
    """Quarto when asked for or (engine "auto") when it is on PATH, else the fallback renderer."""
    use_quarto = engine == "quarto" or (engine == "auto" and shutil.which("quarto"))
    return (render_with_quarto if use_quarto else render)(profile, formats, out_dir)


@click.command()
@click.option("--profile", default="demo", show_default=True, help="Profile whose results to report.")
@click.option("--to", "formats", default="html,pdf", show_default=True, help="Comma-separated: html, pdf.")
@click.option("--engine", type=click.Choice(["auto", "quarto", "fallback"]), default="auto", show_default=True,
              help="auto = Quarto when on PATH, else the fallback renderer.")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), help="Output directory (default: "
              "report/_output/<profile>).")
def main(profile: str, formats: str, engine: str, out_dir: Path | None) -> None:
    formats = tuple(f.strip() for f in formats.split(","))
    for path in render_auto(profile, formats, out_dir, engine).values():
        click.echo(path)


if __name__ == "__main__":
    main()
