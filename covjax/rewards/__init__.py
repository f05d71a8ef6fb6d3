"""Verifiers that read text and nothing else: `math` (final-answer extraction + math-verify,
under a hard time limit per check), and `code`'s sandbox. Import the submodule you need.

`default_workers` is the one default both size their worker pools by."""

from __future__ import annotations

import os


def usable_cpus() -> int:
    """The CPUs this process may run on: its affinity mask where the OS has one (taskset, a
    container's cpuset, SLURM's binding), else all the machine's; at least 1."""
    if hasattr(os, "process_cpu_count"):  # Python 3.13+: the affinity mask, or PYTHON_CPU_COUNT
        return os.process_cpu_count() or 1
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0)) or 1
    return os.cpu_count() or 1


# A pool's upper bound: a TPU host reports 200+ CPUs, and each worker may hold gigabytes.
MAX_WORKERS = 64


def default_workers() -> int:
    """The default size of a verifier pool: the usable CPUs, at most MAX_WORKERS."""
    return min(MAX_WORKERS, usable_cpus())
