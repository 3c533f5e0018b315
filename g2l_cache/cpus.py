"""The CPU cores this process may use: its affinity (what Slurm's --cpus-per-task and a cgroup's cpuset
give it), not the machine's count, which oversubscribes a node shared by several jobs."""

from __future__ import annotations

import os


def usable_cores() -> int:
    """Cores in this process's CPU affinity (the machine's count where affinity is not available)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1
