"""Compare two refusal cubes of a profile (e.g. before and after a change to generation): per generation or curve
unit, how many completions are identical strings, and per direction unit the largest absolute difference of each
variable (NaN where both are NaN counts as equal). A unit computed on fewer instructions in one cube (a transfer curve under transfer_n_test) is compared
on the instructions both have, which must be the same texts.

    python -m bench.refusal_cubes BEFORE/refusal.zarr AFTER/refusal.zarr

Recorded (issue 19): the demo's cube of commit d658b4c against one of commit c1f064b (shared prefill, transfer
curves on the first 32 harmless instructions): 27 units; every completion identical (24 generation units x 100,
8 curve units on their 32), directions, norms, activations, cosines and PCA with max abs difference 0.0.
"""
from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from replication.cubes import open_cube


def max_abs_difference(before: np.ndarray, after: np.ndarray) -> float:
    """Largest |after - before|, NaN where both are NaN counted equal (NaN where only one is)."""
    before, after = before.astype(float), after.astype(float)
    return float(np.max(np.where(np.isnan(before) & np.isnan(after), 0.0, np.abs(after - before)), initial=0.0))


def compare(before_path: str, after_path: str) -> dict:
    before, after = open_cube(before_path), open_cube(after_path)
    names = sorted(set(before.unit_names()) & set(after.unit_names()))
    completions, arrays = {}, {}
    for name in names:
        old, new = before.read_unit(name), after.read_unit(name)
        if "completion" in new:
            n = min(old.sizes["instruction"], new.sizes["instruction"])
            old_texts, new_texts = (list(u["instruction_text"].values[:n]) for u in (old, new))
            if old_texts != new_texts:
                raise ValueError(f"{name}: the cubes' units were generated on other instructions")
            same = sum(a == b for a, b in zip(old["completion"].values[:n], new["completion"].values[:n]))
            completions[name] = {"compared": n, "identical": int(same), "n_before": old.sizes["instruction"],
                                 "n_after": new.sizes["instruction"]}
        else:
            arrays[name] = {v: max_abs_difference(old[v].values, new[v].values) for v in new.data_vars}
    return {"units_compared": len(names),
            "only_before": sorted(set(before.unit_names()) - set(after.unit_names())),
            "only_after": sorted(set(after.unit_names()) - set(before.unit_names())),
            "all_completions_identical": all(c["identical"] == c["compared"] for c in completions.values()),
            "completions": completions, "max_abs_difference": arrays}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("before")
    parser.add_argument("after")
    args = parser.parse_args(argv)
    json.dump(compare(args.before, args.after), sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
