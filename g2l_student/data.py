"""Stage-two data: cached views replayed bit-for-bit with their teacher targets, split by slide."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import torch
from torch.utils.data import Dataset

from g2l_cache import CacheReader, G2LError
from g2l_cache.views import ViewParams

VIEW_CHOICES = ("one", "all")


def select_views(reader: CacheReader, slides_file: str | None = None,
                 where: str | None = None) -> pl.DataFrame:
    """views.parquet joined with tile and slide columns, optionally subset (no copy of the cache).

    `slides_file`: text file with one slide id per line, or a CSV with a `slide_id` column.
    `where`: a SQL condition over view/tile/slide columns, e.g. "slide_id LIKE '%centre-a%'"
    (parsed by polars' SQL engine, never evaluated as Python).
    """
    tiles = reader.tiles().select("tile_id", "x", "y", "tissue_fraction")
    slides = reader.slides().filter(pl.col("status") == "ok").select(
        "slide_id", pl.col("path").alias("slide_path"), pl.col("mpp").alias("slide_mpp"))
    views = reader.views().join(tiles, on="tile_id").join(slides, on="slide_id")
    if slides_file:
        wanted = read_slide_list(slides_file)
        unknown = wanted - set(views["slide_id"].unique().to_list())
        if unknown:
            raise G2LError(f"{len(unknown)} slide(s) in {slides_file} are not ok slides of the cache "
                           f"(e.g. {sorted(unknown)[0]}).")
        views = views.filter(pl.col("slide_id").is_in(sorted(wanted)))
    if where:
        try:
            views = views.filter(pl.sql_expr(where))
        except Exception as exc:
            raise G2LError(f"--where {where!r} is not a valid condition ({exc}); columns: "
                           f"{', '.join(views.columns)}.") from None
    if views.height == 0:
        raise G2LError("no cached views left after --slides/--where; loosen the selection.")
    return views.sort("view_id")


def read_slide_list(path: str) -> set[str]:
    """Slide ids from a text file (one per line) or a CSV with a `slide_id` column."""
    p = Path(path)
    if not p.is_file():
        raise G2LError(f"slide list {p} does not exist.")
    if p.suffix.lower() == ".csv":
        df = pl.read_csv(p)
        if "slide_id" not in df.columns:
            raise G2LError(f"{p} needs a 'slide_id' column.")
        return set(df["slide_id"].cast(pl.Utf8).to_list())
    return {line.strip() for line in p.read_text().splitlines() if line.strip()}


def split_by_slide(slide_ids: list[str], val_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Seeded train/validation split of whole slides: no slide is on both sides."""
    if not 0 <= val_fraction < 1:
        raise G2LError(f"--val-fraction must be in [0, 1), got {val_fraction}.")
    ids = sorted(set(slide_ids))
    if val_fraction == 0:
        return ids, []
    if len(ids) < 2:
        raise G2LError("a validation split needs at least 2 slides; use --val-fraction 0.")
    n_val = min(len(ids) - 1, max(1, round(val_fraction * len(ids))))
    order = np.random.default_rng([seed, 7]).permutation(len(ids))
    val = sorted(ids[i] for i in order[:n_val])
    return [s for s in ids if s not in set(val)], val


def samples_per_epoch(views: pl.DataFrame, views_per_epoch: str) -> int:
    """How many views an epoch visits: one per tile, or all of them."""
    return views.height if views_per_epoch == "all" else views["tile_id"].n_unique()


def epoch_rows(views: pl.DataFrame, epoch: int, seed: int, views_per_epoch: str) -> np.ndarray:
    """Row indices of `views` (sorted by view_id) an epoch visits, in visiting order.

    "one": each tile contributes one of its K views, drawn from (seed, epoch); "all": every view.
    The order is a (seed, epoch) permutation, so an epoch can be replayed or resumed exactly.
    """
    if views_per_epoch not in VIEW_CHOICES:
        raise G2LError(f"--views-per-epoch must be one of {', '.join(VIEW_CHOICES)}.")
    rng = np.random.default_rng([seed, 1000 + epoch])
    if views_per_epoch == "all":
        rows = np.arange(views.height)
    else:
        tiles = views["tile_id"].to_numpy()
        starts = np.flatnonzero(np.r_[True, tiles[1:] != tiles[:-1]])
        counts = np.diff(np.r_[starts, len(tiles)])
        rows = starts + (rng.random(len(starts)) * counts).astype(np.int64)
    return rows[rng.permutation(len(rows))]


class CachedViews(Dataset):
    """Item i: (the [0, 1] view the teacher saw, teacher embedding target, mean patch target)."""

    def __init__(self, reader: CacheReader, views: pl.DataFrame, teacher_fp: str | None):
        self.reader = reader
        self.teacher_fp = teacher_fp
        self.embed_dim = reader.manifest["teachers"][teacher_fp]["embed_dim"] if teacher_fp else 0
        self.params = [ViewParams(**row) for row in
                       views.select(list(ViewParams.__dataclass_fields__)).to_dicts()]
        self.view_ids = views["view_id"].to_list()
        self.tile_ids = views["tile_id"].to_list()
        self.shards = views["shard"].to_list()

    def __len__(self) -> int:
        return len(self.view_ids)

    def __getitem__(self, i: int):
        view = self.reader.replay_view(self.tile_ids[i], self.shards[i], self.params[i])
        if self.teacher_fp is None:
            return view, torch.zeros(0), torch.zeros(0)
        emb, patch = self.reader.target(self.teacher_fp, self.view_ids[i], self.shards[i])
        return view, torch.from_numpy(emb.astype(np.float32)), torch.from_numpy(patch.astype(np.float32))

