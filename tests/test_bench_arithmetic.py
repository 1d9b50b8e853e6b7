"""bench/arithmetic.py: the matrix-product FLOPs of a step and its floor at the peak rate."""
import json

import torch

from bench import arithmetic


def test_a_step_counts_its_matrix_products_forward_and_backward():
    layer = torch.nn.Linear(64, 32, bias=False)
    x = torch.randn(8, 64)
    flops, seconds = arithmetic.count(lambda: layer(x))
    assert flops == 2 * 8 * 64 * 32 and seconds > 0
    flops, _ = arithmetic.count(lambda: layer(x).sum().backward())
    assert flops == 2 * (2 * 8 * 64 * 32)  # the weight's gradient; the input needs none


def test_the_peak_rate_is_a_rate():
    assert arithmetic.peak_rate(32, [64], repeats=1) > 1e6


def test_floor_and_share_of_the_measured_wall_time(tmp_path, monkeypatch):
    bench_dir = tmp_path / "results" / "bench"
    bench_dir.mkdir(parents=True)
    (bench_dir / "cpu-x-demo-replicate.json").write_text(json.dumps({"steps": [
        {"step": "posttrain", "wall_s": 300.0}, {"step": "run knowledge", "wall_s": 120.0}]}))
    monkeypatch.setattr(arithmetic, "REPO_ROOT", tmp_path)
    walls = arithmetic.measured_walls("cpu-x", "demo")
    assert walls == {"posttrain": 300.0, "knowledge": 120.0}
    results = {"profile": "demo", "device": "cpu-x", "git_commit": "abc", "threads": 2, "peak_flops_per_s": 1e11,
               "steps": [{"step": "knowledge", "flops": 6e12, "measured_wall_s": walls["knowledge"]},
                         {"step": "refusal", "flops": 1.2e13}]}
    table = arithmetic.markdown(results)
    assert "| knowledge | 6 | 1.0 min | 2.0 min | 50% |" in table
    assert "| refusal | 12 | 2.0 min | | |" in table and "| total | 18 | 3.0 min | | |" in table
