"""Every table of the paper that a profile's cubes can give, by title (`ptr analyze`). An experiment whose cube
is missing or unfinished contributes a one-row note instead of failing the others."""
from __future__ import annotations

import importlib

import pandas as pd

from analysis.audit import EXPERIMENTS


def all_tables(profile_name: str) -> dict[str, pd.DataFrame]:
    result = {}
    for experiment in EXPERIMENTS:
        try:
            result.update(importlib.import_module(f"analysis.{experiment}").tables(profile_name))
        except (FileNotFoundError, KeyError) as error:  # no cube, or a cube without the units a table needs
            fix = f"ptr run {experiment} --profile {profile_name}"
            result[f"{experiment.capitalize()}: not available"] = pd.DataFrame(
                {"problem": [str(error).strip("'\"")], "fix": [fix]})
    return result
