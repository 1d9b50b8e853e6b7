"""Shared by the benchmarks: each timed path runs in a fresh process, so its peak memory is its own."""
from __future__ import annotations

import multiprocessing
from pathlib import Path


def in_child(target, *args) -> dict:
    """`target(*args, queue)` in a spawned process; returns the dict it puts on the queue."""
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=target, args=(*args, queue))
    process.start()
    result = queue.get()
    process.join()
    return result


def status_mib(field: str) -> float:
    """A memory field of /proc/self/status (VmRSS: resident now, VmHWM: peak resident), in MiB."""
    line = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith(field + ":"))
    return int(line.split()[1]) / 1024


def reset_peak_memory() -> None:
    """Linux: reset this process's peak resident set (VmHWM) to its current one, so loading does not hide a peak."""
    Path("/proc/self/clear_refs").write_text("5")
