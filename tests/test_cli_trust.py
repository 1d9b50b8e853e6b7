"""Runs a researcher can trust (issue 15), each failure of the issue reproduced through the command line as a user
meets it: `ptr` run as a subprocess (its output written to a pipe, not a terminal) on the tiny profile's cubes in a
temporary PTR_RESULTS_DIR. Cubes are the session's `tiny_results` (linked, or copied where a test changes them)."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from analysis import audit
from data_prep.paths import REPO_ROOT
from replication.config import PROFILE_DIR, resolve_profile
from replication.cubes import CubeStore, lock_cube, open_cube

EXPERIMENTS = ("knowledge", "truthfulness", "refusal", "confidence")


def ptr(*args: str, cwd: Path | None = None, **env: str) -> subprocess.CompletedProcess:
    """`ptr ARGS` in a fresh interpreter of this checkout, with `env` added to the environment."""
    inherited = {key: value for key, value in os.environ.items() if key != "PTR_DEBUG"}
    environment = {**inherited, "PYTHONPATH": str(REPO_ROOT), **env}
    return subprocess.run([sys.executable, "-m", "ptr", *args], cwd=cwd or REPO_ROOT, env=environment,
                          capture_output=True, text=True, timeout=600)


def results_with(tmp_path: Path, tiny_results: Path, profile: str = "tiny", copied: tuple[str, ...] = ()) -> Path:
    """A results folder whose `profile` holds the tiny cubes: linked, or copied for those in `copied`."""
    results = tmp_path / "results"
    (results / profile).mkdir(parents=True)
    for experiment in EXPERIMENTS:
        source, target = tiny_results / "tiny" / f"{experiment}.zarr", results / profile / f"{experiment}.zarr"
        shutil.copytree(source, target) if experiment in copied else target.symlink_to(source)
    return results


# --- one results folder per profile, however it is named -------------------------------------------------------

def test_a_profile_path_resolves_to_its_name_and_results_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("PTR_RESULTS_DIR", str(tmp_path / "results"))
    (tmp_path / "cfg").mkdir()
    shutil.copy(PROFILE_DIR / "tiny.yaml", tmp_path / "cfg" / "mine.yaml")
    monkeypatch.chdir(tmp_path)
    relative, absolute = resolve_profile("cfg/mine.yaml"), resolve_profile(tmp_path / "cfg" / "mine.yaml")
    assert relative == absolute and relative.name == "mine" and relative.results == tmp_path / "results" / "mine"
    assert relative.arg == str(tmp_path / "cfg" / "mine.yaml")  # works from any working directory
    named = resolve_profile("tiny")
    assert (named.name, named.arg, named.results) == ("tiny", "tiny", tmp_path / "results" / "tiny")


def test_readers_find_the_cubes_of_a_profile_given_by_relative_or_absolute_path(tiny_results, tmp_path,
                                                                               monkeypatch):
    results = results_with(tmp_path, tiny_results, profile="mine")
    (tmp_path / "cfg").mkdir()
    shutil.copy(PROFILE_DIR / "tiny.yaml", tmp_path / "cfg" / "mine.yaml")  # the tiny configuration, named mine
    analyzed = ptr("analyze", "--profile", "cfg/mine.yaml", cwd=tmp_path, PTR_RESULTS_DIR=str(results))
    assert analyzed.returncode == 0, analyzed.stderr
    assert "## Knowledge: BASE vs POST causal-tracing maps" in analyzed.stdout
    assert "not available" not in analyzed.stdout
    audited = ptr("audit", "--profile", str(tmp_path / "cfg" / "mine.yaml"), PTR_RESULTS_DIR=str(results))
    assert audited.returncode == 0, audited.stderr
    document = json.loads((results / "mine" / "audit.json").read_text())
    monkeypatch.setenv("PTR_RESULTS_DIR", str(tiny_results))
    assert document["summary"] == audit.summary(audit.audit("tiny", audit.collect_measured("tiny")))
    assert "holds" in audited.stdout


def test_an_unknown_profile_is_an_error_listing_the_known_ones_and_writes_nothing(tmp_path):
    for command in ("audit", "report", "analyze", "run knowledge"):
        result = ptr(*command.split(), "--profile", "tinny", PTR_RESULTS_DIR=str(tmp_path))
        assert result.returncode == 1, command
        assert "unknown profile 'tinny'. Did you mean 'tiny'?" in result.stderr and "demo, paper" in result.stderr
        assert "Traceback" not in result.stderr
    assert not list(tmp_path.iterdir())


# --- one run at a time per cube; no stale or unfinished cube read as if current ------------------------------

def test_a_second_writer_waits_then_fails_naming_the_holder(tiny_data, tmp_path):
    cube = tmp_path / "tiny" / "confidence.zarr"
    lock = lock_cube(cube)  # this test process is the first writer
    try:
        result = ptr("run", "confidence", "--profile", "tiny", PTR_DATA_DIR=str(tiny_data),
                     PTR_RESULTS_DIR=str(tmp_path))
    finally:
        lock.release()
    assert result.returncode == 1
    assert f"{cube} is being written by another run (pid {os.getpid()} on " in result.stderr
    assert "waited 5 s" in result.stderr and "Traceback" not in result.stderr
    assert not (cube / "zarr.json").exists()  # the second writer wrote nothing


def test_a_store_opened_twice_in_one_process_shares_its_lock(tmp_path):
    first = CubeStore(tmp_path / "x.zarr", provenance={"experiment_hash": "a"})
    second = CubeStore(tmp_path / "x.zarr", provenance={"experiment_hash": "a"})  # reentrant: no wait
    blocked = subprocess.run([sys.executable, "-c", "import sys; from replication.cubes import lock_cube; "
                              f"lock_cube({str(tmp_path / 'x.zarr')!r}, wait=0.2)"],
                             env={**os.environ, "PYTHONPATH": str(REPO_ROOT)}, capture_output=True, text=True)
    assert "CubeLockedError" in blocked.stderr and f"pid {os.getpid()}" in blocked.stderr
    del first, second  # the lock ends with the stores
    free = subprocess.run([sys.executable, "-c", "from replication.cubes import lock_cube; "
                           f"lock_cube({str(tmp_path / 'x.zarr')!r}, wait=0.2)"],
                          env={**os.environ, "PYTHONPATH": str(REPO_ROOT)}, capture_output=True, text=True)
    assert free.returncode == 0, free.stderr


def test_readers_refuse_a_cube_of_another_configuration_and_label_an_unfinished_one(tiny_results, tmp_path):
    results = results_with(tmp_path, tiny_results, copied=("confidence", "knowledge"))
    open_cube(results / "tiny" / "confidence.zarr").update_attrs(experiment_hash="0" * 64)  # another configuration
    open_cube(results / "tiny" / "knowledge.zarr").update_attrs(finished_at=None)  # interrupted
    analyzed = ptr("analyze", "--profile", "tiny", PTR_RESULTS_DIR=str(results))
    assert analyzed.returncode == 0, analyzed.stderr
    assert "## Confidence: not available (stale cube)" in analyzed.stdout
    assert "ptr run confidence --profile tiny --fresh" in analyzed.stdout
    assert "## Knowledge: BASE vs POST causal-tracing maps (UNFINISHED cube: partial numbers)" in analyzed.stdout
    assert "## Refusal:" in analyzed.stdout and "UNFINISHED" not in analyzed.stdout.split("## Refusal:")[1]

    audited = ptr("audit", "--profile", "tiny", PTR_RESULTS_DIR=str(results))
    assert audited.returncode == 1 and "Traceback" not in audited.stderr
    assert "was computed with another configuration of confidence" in audited.stderr
    assert "knowledge: cube unfinished, not audited (`ptr run knowledge --profile tiny` resumes it)" in audited.stdout


# --- no vacuous passes -------------------------------------------------------------------------------------------

def test_audit_report_and_analyze_refuse_a_profile_without_cubes(tmp_path):
    for command in ("audit --strict", "report", "analyze"):
        result = ptr(*command.split(), "--profile", "paper", PTR_RESULTS_DIR=str(tmp_path))
        assert result.returncode == 1, command
        assert "has no results in" in result.stderr and "`ptr run all --profile paper`" in result.stderr, command
    assert not (tmp_path / "paper" / "audit.json").exists()


def test_strict_fails_when_a_published_number_is_not_measured():
    measured = {"knowledge_causal_tracing.corr.cities": audit.load_published().numbers[
        "knowledge_causal_tracing.corr.cities"]}
    table = audit.audit("paper", measured)
    assert (table["status"] == "pass").sum() == 1 and not table["status"].isin(audit.FAILURES).any()
    assert audit.exit_code(table, strict=True) == 1 and audit.exit_code(table, strict=False) == 0
    everything = {key: value for key, value in audit.load_published().numbers.items()}
    claims = {claim.measured: claim.threshold + (1 if claim.op.startswith(">") else -1)
              for claim in audit.load_published().claims}
    assert audit.exit_code(audit.audit("paper", everything | claims), strict=True) == 0


def test_audit_prints_its_table_when_it_cannot_write_it(tiny_results, tmp_path):
    results = results_with(tmp_path, tiny_results)
    (results / "tiny" / "audit.json").mkdir()  # unwritable as a file (a read-only folder, even for root)
    result = ptr("audit", "--profile", "tiny", PTR_RESULTS_DIR=str(results))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "the audit above could not be written" in result.stderr
    assert "holds" in result.stdout and "qualitative.knowledge.min_map_corr" in result.stdout


# --- errors in one line ------------------------------------------------------------------------------------------

def test_a_config_error_is_one_line_and_debug_shows_the_traceback(tmp_path):
    text = (PROFILE_DIR / "tiny.yaml").read_text().replace("batch_size: 8", "batch_sise: 8")
    (tmp_path / "typo.yaml").write_text(text)
    result = ptr("run", "knowledge", "--profile", str(tmp_path / "typo.yaml"), PTR_RESULTS_DIR=str(tmp_path))
    assert result.returncode == 1
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"Error: {tmp_path / 'typo.yaml'}: unknown key 'batch_sise' in the top level. "
                           "Did you mean 'batch_size'?")
    for debug in (("--debug",), ()):
        shown = ptr(*debug, "run", "knowledge", "--profile", str(tmp_path / "typo.yaml"),
                    PTR_RESULTS_DIR=str(tmp_path), **({} if debug else {"PTR_DEBUG": "1"}))
        assert shown.returncode == 1 and "Traceback" in shown.stderr and "ConfigError" in shown.stderr


def test_a_results_folder_that_cannot_be_written_is_one_line(tiny_data):
    unwritable = Path("/sys/ptr-results")  # sysfs refuses new folders (EPERM, or EROFS in a container), even to root
    result = ptr("run", "confidence", "--profile", "tiny", PTR_DATA_DIR=str(tiny_data),
                 PTR_RESULTS_DIR=str(unwritable))
    assert result.returncode == 1
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"Error: cannot write {unwritable}") and "PTR_RESULTS_DIR" in line


def test_missing_models_offline_are_all_listed_at_once_with_their_fetch_commands(tmp_path):
    from replication.config import load_profile

    result = ptr("run", "all", "--profile", "paper", HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path),
                 HF_HUB_CACHE=str(tmp_path / "hub"), PTR_RESULTS_DIR=str(tmp_path))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    profile = load_profile("paper")
    hub = [profile.model_spec(key) for key in profile.models() if profile.model_spec(key).source == "hub"]
    assert len(hub) > 1 and f"{len(hub)} model(s) not available" in result.stderr
    for spec in hub:
        assert f"  hf download {spec.hf_id} --revision {spec.revision}\n" in result.stderr + "\n", spec.key


def test_data_offline_suggests_fetching_a_tokenizer_not_a_whole_model(tmp_path):
    environment = {key: value for key, value in os.environ.items() if key != "PTR_DATA_MIRROR"}
    result = subprocess.run([sys.executable, "-m", "ptr", "data", "--profile", "paper"], cwd=REPO_ROOT,
                            env={**environment, "PYTHONPATH": str(REPO_ROOT), "HF_HUB_OFFLINE": "1",
                                 "HF_HOME": str(tmp_path), "HF_HUB_CACHE": str(tmp_path / "hub"),
                                 "PTR_DATA_DIR": str(tmp_path / "data")},
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    (error,) = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    commands = re.findall(r"`(hf download [^`]*)`", error)
    assert commands and all('--include "tokenizer*"' in command for command in commands), error


# --- logs that read well in a file -------------------------------------------------------------------------------

def test_a_run_logged_to_a_file_has_no_bars_and_a_timestamped_line_per_unit(tiny_data, tmp_path):
    log = tmp_path / "log"
    with log.open("w") as file:
        subprocess.run([sys.executable, "-m", "ptr", "run", "confidence", "--profile", "tiny"], cwd=REPO_ROOT,
                       env={**os.environ, "PYTHONPATH": str(REPO_ROOT), "PTR_DATA_DIR": str(tiny_data),
                            "PTR_RESULTS_DIR": str(tmp_path)}, stdout=file, stderr=subprocess.STDOUT, check=True)
    text = log.read_text()
    assert "\r" not in text and "\x1b[" not in text and "Loading weights" not in text
    store = open_cube(tmp_path / "tiny" / "confidence.zarr")
    unit_lines = re.findall(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} confidence\.zarr: unit (\S+) done "
                            r"\(started \S+, \d+\.\d s\)$", text, flags=re.M)
    assert sorted(unit_lines) == store.unit_names()


def test_the_report_kernel_prints_no_encryption_warning():
    code = ("import nbformat; from report.render import execute; "
            "nb = execute(nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell('print(6 * 7)')]), 'tiny'); "
            "print(nb.cells[0].outputs[0]['text'])")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO_ROOT)}, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "42" and "encryption" not in result.stderr


def test_version_prints_the_package_version_and_git_commit():
    import importlib.metadata

    result = ptr("--version")
    assert result.returncode == 0, result.stderr
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True).stdout
    assert result.stdout.startswith(f"ptr {importlib.metadata.version('post-training-reshapes')}, git commit "
                                    f"{commit.strip()}")
