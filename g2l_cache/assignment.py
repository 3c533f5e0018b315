"""Which rank works on which shards: largest first onto the least-loaded rank, from the work each
shard holds, so every rank of a multi-GPU build finishes together.

A shard is written by one process at a time, so shards (not slides) are what ranks share out. Phase
one (planning) shares them by their slide counts; phase two (the teacher) by their planned views,
which the main rank reads from the shards and records in the manifest: every rank, a resumed build
and a later teacher on the same number of processes get the same assignment.
"""

from __future__ import annotations

import heapq
import json
from collections.abc import Sequence

import numpy as np

from g2l_cache.layout import CacheLayout
from g2l_cache.store import close_env, index_path, iter_prefix, shared_env, unpack


def largest_first(loads: Sequence[float], world: int) -> list[list[int]]:
    """Shards per rank: each shard, heaviest first, to the rank with the least work so far (ties to the
    lower rank; equal shards in index order). Deterministic, so every rank computes the same."""
    order = sorted(range(len(loads)), key=lambda s: (-loads[s], s))
    heap = [(0.0, rank) for rank in range(world)]
    shards: list[list[int]] = [[] for _ in range(world)]
    for s in order:
        load, rank = heapq.heappop(heap)
        shards[rank].append(s)
        heapq.heappush(heap, (load + loads[s], rank))
    return [sorted(mine) for mine in shards]


def max_over_mean(loads: Sequence[float], shards_of_rank: list[list[int]]) -> float:
    """The slowest rank's work over the mean rank's (1.0: all finish together)."""
    per_rank = np.array([sum(loads[s] for s in mine) for mine in shards_of_rank], dtype=np.float64)
    return float(per_rank.max() / per_rank.mean()) if per_rank.sum() > 0 else 1.0


def planned_views(layout: CacheLayout, n_shards: int) -> list[int]:
    """Views of the ok slides planned in each shard (read from the shards' slide records)."""
    loads = [0] * n_shards
    for shard in range(n_shards):
        path = layout.shard(shard)
        if not index_path(path).exists():
            continue
        try:
            for key, value in iter_prefix(shared_env(path), b"slide/"):
                record = json.loads(unpack(value, key))
                if record["status"] == "ok":
                    loads[shard] += int(record["n_views"])
        finally:
            close_env(path)
    return loads


def teacher_assignment(layout: CacheLayout, manifest: dict, world: int) -> dict:
    """The phase-two assignment for `world` processes: the manifest's when the shards' planned views
    are those it was made from, else a new one (to be recorded by the caller)."""
    loads = planned_views(layout, manifest["n_shards"])
    recorded = manifest.get("assignment")
    if recorded and recorded.get("world_size") == world and recorded.get("loads") == loads:
        return recorded
    shards = largest_first(loads, world)
    return {"world_size": world, "loads": loads, "shards_of_rank": shards,
            "max_over_mean": round(max_over_mean(loads, shards), 4)}
