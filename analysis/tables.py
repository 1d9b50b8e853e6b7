"""Every table of the paper that a profile's cubes can give, by title (`ptr analyze`). An experiment whose cube
is missing, stale (computed under another configuration) or lacks the units a table needs contributes a one-row
note instead of failing the others; the titles of tables from an unfinished cube say so."""
from __future__ import annotations

import importlib

import pandas as pd

from analysis.audit import EXPERIMENTS, cube_states
from replication.config import resolve_profile
from replication.cubes import StaleCubeError

UNFINISHED = " (UNFINISHED cube: partial numbers)"


def all_tables(profile_name: str) -> dict[str, pd.DataFrame]:
    result, states = {}, cube_states(profile_name)
    for experiment in EXPERIMENTS:
        fix = f"ptr run {experiment} --profile {resolve_profile(profile_name).arg}"
        try:
            tables = importlib.import_module(f"analysis.{experiment}").tables(profile_name)
        except StaleCubeError as error:
            result[f"{experiment.capitalize()}: not available (stale cube)"] = pd.DataFrame(
                {"problem": [str(error)], "fix": [f"{fix} --fresh"]})
            continue
        except (FileNotFoundError, KeyError) as error:  # no cube, or a cube without the units a table needs
            result[f"{experiment.capitalize()}: not available"] = pd.DataFrame(
                {"problem": [str(error).strip("'\"")], "fix": [fix]})
            continue
        suffix = UNFINISHED if states[experiment] == "unfinished" else ""
        result.update({title + suffix: table for title, table in tables.items()})
    return result
