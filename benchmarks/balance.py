"""Every rank finishes together: simulated work per rank for 1,000 slides with TCGA-like tile counts.

Tile counts per slide are drawn from a wide log-normal (median 4,000 tiles at 0.5 mpp, sigma 1.0,
between 100 and 60,000), uncapped and capped at --max-tiles-per-slide 2,000; a slide's work is its
views (tiles x K). Slides go to shards by the hash of their id (g2l_cache.planning.shard_of). Today's
way: 64 shards taken round-robin by the ranks. g2l's: the cache's shards (1,024 for a new cache)
shared out largest first onto the least-loaded rank (g2l_cache.assignment). Reports the slowest
rank's work over the mean rank's for 8 and 64 ranks. Writes results/balance.json.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))

from g2l_cache.assignment import largest_first, max_over_mean  # noqa: E402
from g2l_cache.build_config import DEFAULT_SHARDS  # noqa: E402
from g2l_cache.planning import shard_of  # noqa: E402

OLD_SHARDS = 64
TARGET = 1.02


def tile_counts(n: int, seed: int, cap: int | None) -> np.ndarray:
    counts = np.round(np.random.default_rng(seed).lognormal(np.log(4000), 1.0, n)).astype(int).clip(100, 60_000)
    return np.minimum(counts, cap) if cap else counts


def shard_loads(slide_ids: list[str], views: np.ndarray, n_shards: int) -> np.ndarray:
    loads = np.zeros(n_shards)
    for sid, v in zip(slide_ids, views):
        loads[shard_of(sid, n_shards)] += v
    return loads


def main() -> None:
    import argparse

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--slides", type=int, default=1000)
    p.add_argument("--views", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(ROOT / "results"))
    args = p.parse_args()
    slide_ids = [f"TCGA-{i // 100:02d}-{i:04d}-01Z-00-DX1" for i in range(args.slides)]
    cases = []
    for cap in (2000, None):
        views = tile_counts(args.slides, args.seed, cap) * args.views
        old = shard_loads(slide_ids, views, OLD_SHARDS)
        new = shard_loads(slide_ids, views, DEFAULT_SHARDS)
        for world in (8, 64):
            round_robin = [list(range(r, OLD_SHARDS, world)) for r in range(world)]
            case = {"tiles": "capped at 2000" if cap else "uncapped", "ranks": world,
                    "today_max_over_mean": round(max_over_mean(old, round_robin), 4),
                    "max_over_mean": round(max_over_mean(new, largest_first(new, world)), 4),
                    "shards": DEFAULT_SHARDS, "target": TARGET}
            case["met"] = case["max_over_mean"] <= TARGET
            cases.append(case)
            print(f"  {case['tiles']:15s} {world:3d} ranks: today {case['today_max_over_mean']:.4f} "
                  f"(64 shards round-robin), g2l {case['max_over_mean']:.4f} ({DEFAULT_SHARDS} shards, largest first)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "balance.json").write_text(json.dumps({"name": "balance", "slides": args.slides, "cases": cases,
                                                  "met": all(c["met"] for c in cases)}, indent=2))
    print(f"  -> {out / 'balance.json'}")


if __name__ == "__main__":
    main()
