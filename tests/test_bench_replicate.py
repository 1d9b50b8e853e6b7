"""bench/replicate.py: the per-step table of `ptr replicate` (the command, timing of a failed run, the table)."""

from bench import replicate


def test_the_command_is_the_one_a_user_runs():
    assert replicate.command("demo", fresh=False) == ["replicate", "--profile", "demo"]
    assert replicate.command("tiny", fresh=True) == ["run", "all", "--profile", "tiny", "--fresh"]


def test_a_failing_run_is_timed_and_its_error_kept(monkeypatch):
    monkeypatch.setattr(replicate, "command", lambda profile, fresh: ["run", "nonsense", "--profile", profile])
    result = replicate.time_run("tiny", fresh=False)
    assert result["command"] == "ptr run nonsense --profile tiny" and result["wall_s"] > 0
    assert result["steps"] == [] and "nonsense" in result["error"]


def test_table_rows_and_total_in_minutes():
    results = {"device": "cpu-x", "command": "ptr run all --profile demo --fresh", "git_commit": "abc",
               "started_at": "t", "cpus": 2, "wall_s": 660.0, "error": "boom",
               "steps": [{"step": "run knowledge", "wall_s": 90.0, "cpu_s": 120.0},
                         {"step": "run refusal", "wall_s": 510.0, "cpu_s": 960.0}]}
    table = replicate.markdown(results)
    assert "# `ptr run all --profile demo --fresh` step by step on cpu-x" in table
    assert "| run knowledge | 1.5 min | 2.0 min |" in table and "| run refusal | 8.5 min | 16.0 min |" in table
    assert "(failed after these steps: boom)" in table
    assert "| total (the whole command) | 11.0 min | 18.0 min |" in table


def test_run_writes_each_experiments_timings(tiny_data, tmp_path):
    """The --timings file bench.replicate reads: one row per experiment, wall and CPU seconds."""
    import json
    import os
    import subprocess
    import sys

    from data_prep.paths import REPO_ROOT

    timings = tmp_path / "timings.json"
    environment = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "PTR_DATA_DIR": str(tiny_data),
                   "PTR_RESULTS_DIR": str(tmp_path)}
    completed = subprocess.run([sys.executable, "-m", "ptr", "run", "confidence", "--profile", "tiny", "--timings",
                                str(timings)], cwd=REPO_ROOT, env=environment, capture_output=True, text=True)
    assert completed.returncode == 0, completed.stderr
    rows = json.loads(timings.read_text())
    assert [row["step"] for row in rows] == ["run confidence"]
    assert rows[0]["wall_s"] > 0 and rows[0]["cpu_s"] > 0
