"""Compare the cubes of two result directories unit by unit: the evidence that a faster path computes the same
numbers. For every cube (`<experiment>.zarr`) and every finished unit present in both: per numeric variable (and
numeric coordinate) the largest absolute difference (NaN where both are NaN counts as equal; shapes must match),
per string or boolean variable whether it is equal; and the unit's wall time in each (its started_at/finished_at
attrs). Units found in only one directory are listed. A unit computed on fewer items in one directory (e.g. the
demo's refusal transfer curves once `transfer_n_test` cut them to the first 32 instructions) is compared on the
items both have, and says so; the items' own coordinates (e.g. instruction_text) are then compared like any
variable, so other items would show as unequal.

    python -m bench.compare_cubes BEFORE_DIR AFTER_DIR [--experiment confidence ...] [--json OUT]

BEFORE_DIR and AFTER_DIR hold the cubes themselves (e.g. results/demo). Exit status 1 when a string or boolean
variable differs, a shape differs or a unit's variables differ in name; numeric differences are reported, not
judged (the tolerance depends on what changed).
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from pathlib import Path

import numpy as np
import xarray as xr

from replication.cubes import open_cube


def wall_seconds(attrs: dict) -> float | None:
    """A unit's wall time from its started_at/finished_at attrs (None where either is missing)."""
    if "started_at" not in attrs or "finished_at" not in attrs:
        return None
    return (dt.datetime.fromisoformat(attrs["finished_at"]) - dt.datetime.fromisoformat(attrs["started_at"])
            ).total_seconds()


def compare_arrays(a: np.ndarray, b: np.ndarray) -> dict:
    """{"max_abs_diff": float} for numbers, {"equal": bool} for anything else; {"shape": ...} if shapes differ."""
    if a.shape != b.shape:
        return {"shape": [list(a.shape), list(b.shape)]}
    if a.dtype.kind in "iuf" and b.dtype.kind in "iuf":
        a, b = a.astype(np.float64), b.astype(np.float64)
        both_nan = np.isnan(a) & np.isnan(b)
        difference = np.where(both_nan, 0.0, np.abs(a - b))
        return {"max_abs_diff": float(np.max(difference)) if difference.size else 0.0}
    return {"equal": bool(np.array_equal(a, b))}


def compare_units(a: xr.Dataset, b: xr.Dataset) -> dict:
    """Per variable and coordinate of two units: the comparison of `compare_arrays` on the leading items both have
    along every dimension (`truncated`: the dimensions cut, with both sizes); names in one only."""
    truncated = {dim: [a.sizes[dim], b.sizes[dim]] for dim in set(a.dims) & set(b.dims) if a.sizes[dim] != b.sizes[dim]}
    common = {dim: slice(0, min(sizes)) for dim, sizes in truncated.items()}
    a, b = a.isel(common), b.isel(common)
    names_a, names_b = set(a.variables), set(b.variables)
    result = {name: compare_arrays(a[name].values, b[name].values) for name in sorted(names_a & names_b)}
    return {"variables": result, "truncated": truncated, "only_before": sorted(names_a - names_b),
            "only_after": sorted(names_b - names_a)}


def compare_dirs(before: Path, after: Path, experiments: list[str] | None = None) -> dict:
    """{experiment: {"units": {unit: comparison + wall times}, "only_before": [...], "only_after": [...]}}."""
    report = {}
    cubes = sorted({p.stem for p in before.glob("*.zarr")} & {p.stem for p in after.glob("*.zarr")})
    for experiment in experiments or cubes:
        store_a, store_b = open_cube(before / f"{experiment}.zarr"), open_cube(after / f"{experiment}.zarr")
        units_a, units_b = set(store_a.unit_names()), set(store_b.unit_names())
        units = {}
        for name in sorted(units_a & units_b):
            units[name] = {**compare_units(store_a.read_unit(name), store_b.read_unit(name)),
                           "seconds_before": wall_seconds(store_a.unit_attrs(name)),
                           "seconds_after": wall_seconds(store_b.unit_attrs(name))}
        report[experiment] = {"units": units, "only_before": sorted(units_a - units_b),
                              "only_after": sorted(units_b - units_a)}
    return report


def failures(report: dict) -> list[str]:
    """What must not differ whatever the tolerance: strings, booleans, shapes, the set of variables."""
    found = []
    for experiment, cube in report.items():
        for unit, result in cube["units"].items():
            if result["only_before"] or result["only_after"]:
                found.append(f"{experiment}/{unit}: variables {result['only_before']} vs {result['only_after']}")
            for name, comparison in result["variables"].items():
                if "shape" in comparison or comparison.get("equal") is False:
                    found.append(f"{experiment}/{unit}/{name}: {comparison}")
    return found


def print_report(report: dict) -> None:
    for experiment, cube in report.items():
        print(f"== {experiment}: {len(cube['units'])} units in both; only before: {cube['only_before']}; "
              f"only after: {cube['only_after']}")
        total = {"before": 0.0, "after": 0.0}
        for unit, result in cube["units"].items():
            before, after = result["seconds_before"], result["seconds_after"]
            times = "" if before is None or after is None else f"  {before:7.1f} s -> {after:7.1f} s"
            total["before"] += before or 0.0
            total["after"] += after or 0.0
            numeric = {n: c["max_abs_diff"] for n, c in result["variables"].items() if "max_abs_diff" in c}
            worst = max(numeric.items(), key=lambda item: item[1], default=("-", 0.0))
            unequal = [n for n, c in result["variables"].items() if c.get("equal") is False or "shape" in c]
            cut = "".join(f"; compared on the first {min(n)} of {n[0]} / {n[1]} {dim}"
                          for dim, n in result["truncated"].items())
            print(f"{unit}:{times}  largest |diff| {worst[1]:.3g} ({worst[0]}); unequal: {unequal or 'none'}{cut}")
            for name, value in sorted(numeric.items()):
                print(f"    {name:32s} {value:.3g}")
        print(f"   unit time: {total['before']:.1f} s -> {total['after']:.1f} s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("before", type=Path)
    parser.add_argument("after", type=Path)
    parser.add_argument("--experiment", action="append", help="only these cubes (default: every cube in both)")
    parser.add_argument("--json", type=Path, help="also write the full comparison here")
    args = parser.parse_args(argv)
    report = compare_dirs(args.before, args.after, args.experiment)
    print_report(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    problems = failures(report)
    for problem in problems:
        print("DIFFERS:", problem)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
