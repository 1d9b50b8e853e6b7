"""Benchmark of the CPU LM head (`replication.models.VocabularyRowsHead`) against the plain one (F.linear), on a
random head of a model's shape (float32, no gradient), per row count, in one process, alternating: milliseconds
each way (best of `--repeats`), their ratio, and whether the logits are equal bit for bit (the head's
VOCABULARY_ROWS_MIN_ROWS is where they are on this project's machines; on another BLAS they may differ by rounding).

    python -m bench.vocabulary_head [--vocabulary 262144] [--hidden 640] [--rows 1 2 11 12 16 80 160 256]
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch
from torch.nn import functional

from replication.models import VocabularyRowsHead

GEMMA3_HEAD = (262_144, 640)  # the demo model's vocabulary and hidden size


def best_ms(call, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return 1e3 * min(times)


def run(vocabulary: int, hidden: int, row_counts: list[int], repeats: int) -> dict:
    generator = torch.Generator().manual_seed(0)
    head = VocabularyRowsHead(hidden, vocabulary, bias=False)
    torch.nn.init.normal_(head.weight, std=0.05, generator=generator)
    rows = []
    for count in row_counts:
        x = torch.randn(count, hidden, generator=generator)
        plain_ms = best_ms(lambda: functional.linear(x, head.weight), repeats)
        head_ms = best_ms(lambda: head(x), repeats)
        rows.append({"rows": count, "f_linear_ms": plain_ms, "vocabulary_rows_ms": head_ms,
                     "ratio": head_ms / plain_ms,
                     "bits_equal": torch.equal(head(x), functional.linear(x, head.weight))})
    return {"vocabulary": vocabulary, "hidden": hidden, "threads": torch.get_num_threads(), "repeats": repeats,
            "rows": rows}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocabulary", type=int, default=GEMMA3_HEAD[0])
    parser.add_argument("--hidden", type=int, default=GEMMA3_HEAD[1])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 2, 11, 12, 16, 80, 160, 256])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    json.dump(run(args.vocabulary, args.hidden, args.rows, args.repeats), sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
