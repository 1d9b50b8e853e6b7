"""Benchmarks: each `python -m bench.<experiment>` times an experiment's fast path against its slow obvious
implementation on the same inputs and checks that both agree."""
