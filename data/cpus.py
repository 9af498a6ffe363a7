"""How many CPUs this process may really use: its affinity mask (which SLURM and cgroups-aware launchers
set to the job's allocation), never os.cpu_count(), which counts the whole machine."""

from __future__ import annotations

import os


def available_cpus() -> int:
    """CPUs this process may run on: the affinity mask, capped by SLURM's per-task count when set."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    slurm = os.environ.get("SLURM_CPUS_PER_TASK")
    if slurm and slurm.isdigit() and int(slurm) > 0:
        cpus = min(cpus, int(slurm))
    return max(1, cpus)


def local_ranks() -> int:
    """Processes of this job on this node (torchrun's LOCAL_WORLD_SIZE), 1 outside torchrun."""
    value = os.environ.get("LOCAL_WORLD_SIZE", "")
    return int(value) if value.isdigit() and int(value) > 0 else 1


def default_workers() -> int:
    """Loader workers per rank when data.workers is null: this node's CPUs shared among its ranks, one
    kept for each rank's own process (the training loop)."""
    return max(1, available_cpus() // local_ranks() - 1)
