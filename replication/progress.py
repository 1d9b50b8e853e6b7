"""Progress and logs of long runs: bars on a terminal, plain timestamped lines in a file.

`progress_bar` is the one progress bar of the package: tqdm, shown only when stderr is a terminal (tqdm's own TTY
check, `disable=None`), so `ptr run all > log 2>&1` gets no carriage returns or cursor moves. What a log file gets
instead are the `logging` lines: one per finished unit with its duration (replication.cubes), timestamped by the
handler `setup_logging` installs. `quiet_third_party` silences library output that tells the user nothing.
"""
from __future__ import annotations

import logging
import os
import sys

from tqdm.auto import tqdm

LOG_FORMAT = "%(asctime)s %(message)s"


def progress_bar(iterable=None, *, enabled: bool = True, **kwargs) -> tqdm:
    """`tqdm(iterable, **kwargs)`, drawn only on a terminal (and never when `enabled` is False)."""
    return tqdm(iterable, disable=None if enabled else True, **kwargs)


class _TqdmHandler(logging.Handler):
    """Log lines written through tqdm.write to the current sys.stderr, so that on a terminal they print above the
    bars, not through them."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # logging's contract: a failing handler reports, never raises
            self.handleError(record)


def setup_logging(level: int = logging.INFO) -> None:
    """Timestamped lines of the package's loggers on stderr (`2026-11-30 05:35:44,123 knowledge.zarr: unit ...`)."""
    handler = _TqdmHandler()
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    for name in ("replication", "data_prep"):
        logger = logging.getLogger(name)
        logger.handlers[:] = [handler]
        logger.setLevel(level)
        logger.propagate = False


def quiet_third_party(debug: bool = False) -> None:
    """Silence what transformers and huggingface_hub print that says nothing to the user: weight-loading and
    download bars, and advisory warnings. With `debug`, everything is kept. Takes effect for libraries imported
    afterwards (it sets their environment variables)."""
    if debug:
        return
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # also transformers' "Loading weights" bars
