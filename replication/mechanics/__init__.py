"""Shared mechanics of the experiments: forward passes, directions, patching, steering, generation, refusal scores.

Each module is importable without any experiment; experiments and post-training build on them."""
