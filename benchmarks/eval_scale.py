"""Evaluation at benchmark scale: peak memory and time of `g2l eval compare` on PCam-sized sets.

Embeds nothing: draws random 1536-d embeddings with a weak class signal, labels and patient groups
for 32k test x 262k train tiles (kNN + linear probe), plus a 30k-tile multi-centre set (robustness
index), writes them as `g2l embed` files and runs `eval compare` on both in a child process.
Targets: peak RSS <= 4 GB and <= 10 min on 2 cores. Writes results/eval_scale.json.
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from _common import RESULTS, WORK, fresh, save


def tile_set(path: Path, n_train: int, n_test: int, dim: int, tiles_per_group: int, centres: int,
             seed: int) -> None:
    """A labelled set as an embedding file: 2 classes, groups of tiles, centres with an offset."""
    import polars as pl

    from g2l_student.evaluation.embedder import write_embeddings

    rng = np.random.default_rng(seed)
    n = n_train + n_test
    group = np.arange(n) // tiles_per_group
    label = (rng.random(group.max() + 1) < 0.5)[group]  # a patient's tiles share its label
    centre = rng.integers(0, centres, group.max() + 1)[group]
    x = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, 65536):  # in chunks: no float64 copy of the whole set
        stop = min(n, start + 65536)
        x[start:stop] = rng.standard_normal((stop - start, dim), dtype=np.float32)
        x[start:stop, :8] += 0.6 * label[start:stop, None] + 0.3 * centre[start:stop, None]
    split = np.where(group < group[n_train] if n_train < n else True, "train", "test")
    table = pl.DataFrame({"path": [f"t{i}.png" for i in range(n)], "label": np.where(label, "tumour", "normal"),
                          "split": split, "center": [f"c{c}" for c in centre], "group": [f"p{g}" for g in group]})
    key = {"model": "random", "model_fingerprint": f"random-{seed}", "data": path.stem,
           "data_fingerprint": f"{path.stem}-{n}-{dim}-{seed}", "data_mpp": None, "model_mpp": 0.5}
    write_embeddings(path, table, x, key)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--train", type=int, default=262_144)
    p.add_argument("--test", type=int, default=32_768)
    p.add_argument("--robustness", type=int, default=30_000)
    p.add_argument("--dim", type=int, default=1536)
    p.add_argument("--bootstrap", type=int, default=1000)
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args()
    work = fresh(WORK / "eval-scale")
    work.mkdir(parents=True)
    big, robust = work / "pcam-like.parquet", work / "multi-centre.parquet"  # one model per task
    tile_set(big, args.train, args.test, args.dim, tiles_per_group=100, centres=1, seed=0)
    tile_set(robust, 0, args.robustness, args.dim, tiles_per_group=50, centres=3, seed=1)
    # the robustness set has no split column: compare splits it by group itself
    import pyarrow.parquet as pq

    table = pq.read_table(robust)
    pq.write_table(table.drop(["split"]).replace_schema_metadata(table.schema.metadata), robust)
    del table
    code = ("import sys; sys.path.insert(0, %r); from g2l_student.evaluation.compare import compare; "
            "compare(%r, %r, n_boot=%d, map_method='pca')") % (
        str(Path(__file__).resolve().parent.parent), [str(big), str(robust)], str(work / "report"), args.bootstrap)
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        sys.exit(f"eval compare failed:\n{proc.stderr[-3000:]}")
    peak_gb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024 / 1e9  # KiB on Linux
    import polars as pl

    metrics = pl.read_csv(work / "report" / "metrics.csv").to_dicts()
    save("eval_scale", {"peak_rss_gb": peak_gb, "seconds": seconds, "n_query": args.test,
                        "n_reference": args.train, "n_robustness": args.robustness, "dim": args.dim,
                        "bootstrap": args.bootstrap, "targets": {"peak_rss_gb": 4.0, "seconds": 600},
                        "metrics": metrics}, args.out)


if __name__ == "__main__":
    main()
