"""bench/replicate.py: the per-step table of `ptr replicate` (commands, timing of a real step, the table)."""

from click.testing import CliRunner

from bench import replicate


def test_each_step_is_the_command_a_user_runs():
    assert [replicate.command(step, "demo", fresh=True) for step in replicate.STEPS] == [
        ["data", "--profile", "demo"], ["posttrain", "--profile", "demo"],
        *[["run", name, "--profile", "demo", "--fresh"] for name in replicate.EXPERIMENTS],
        ["report", "--profile", "demo"], ["audit", "--profile", "demo"]]
    assert replicate.command("refusal", "tiny", fresh=False) == ["run", "refusal", "--profile", "tiny"]


def test_a_failing_step_is_timed_and_its_error_kept(monkeypatch):
    monkeypatch.setattr(replicate, "command", lambda step, profile, fresh: ["run", "nonsense", "--profile", profile])
    row = replicate.time_step("knowledge", "tiny", fresh=False)
    assert row["command"] == "ptr run nonsense --profile tiny" and row["wall_s"] > 0 and row["cpu_s"] > 0
    assert "nonsense" in row["error"]


def test_table_rows_and_total_in_minutes():
    results = {"device": "cpu-x", "profile": "demo", "fresh": True, "git_commit": "abc", "started_at": "t",
               "cpus": 2, "steps": [{"step": "data", "command": "ptr data --profile demo", "wall_s": 90.0,
                                     "cpu_s": 120.0},
                                    {"step": "refusal", "command": "ptr run refusal --profile demo --fresh",
                                     "wall_s": 510.0, "cpu_s": 960.0, "error": "boom"}]}
    table = replicate.markdown(results)
    assert "| data | `ptr data --profile demo` | 1.5 min | 2.0 min |" in table
    assert "(failed: boom) | 8.5 min | 16.0 min |" in table
    assert "| total | | 10.0 min | 18.0 min |" in table and "--fresh rerun" in table


def test_unknown_steps_are_refused():
    result = CliRunner().invoke(replicate.main, ["--steps", "data,posttrian"])
    assert result.exit_code != 0 and "posttrian" in result.output and "allowed" in result.output
