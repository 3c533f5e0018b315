"""Stage-two data: cached views replayed bit-for-bit with their teacher targets, split by slide."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import polars as pl
import torch
from torch.utils.data import Dataset

from g2l_cache import CacheReader, G2LError, apply_view, sample_view
from g2l_student.choices import VIEW_CHOICES



def select_views(reader: CacheReader, slides_file: str | None = None,
                 where: str | None = None) -> np.ndarray:
    """Rows of views.parquet to use (sorted), optionally subset; nothing per view is kept but the rows.

    `slides_file`: text file with one slide id per line, or a CSV with a `slide_id` column.
    `where`: a SQL condition over view/tile/slide columns, e.g. "slide_id LIKE '%centre-a%'"
    (parsed by polars' SQL engine, never evaluated as Python). Only the columns it names are read.
    """
    if not slides_file and not where:
        return np.arange(reader.n_views, dtype=np.int64)
    tiles = pl.scan_parquet(reader.layout.tiles).with_row_index("tile_index").select(
        pl.col("tile_index").cast(pl.Int64), "x", "y", "tissue_fraction")
    slides = pl.scan_parquet(reader.layout.slides).filter(pl.col("status") == "ok").select(
        "slide_id", pl.col("path").alias("slide_path"), pl.col("mpp").alias("slide_mpp"), "mpp_source")
    views = (pl.scan_parquet(reader.layout.views).with_row_index("row")
             .join(tiles, on="tile_index", how="left").join(slides, on="slide_id", how="left"))
    if slides_file:
        wanted = read_slide_list(slides_file)
        ok = set(reader.slides().filter(pl.col("status") == "ok")["slide_id"].to_list())
        unknown = wanted - ok
        if unknown:
            raise G2LError(f"{len(unknown)} slide(s) in {slides_file} are not ok slides of the cache "
                           f"(e.g. {sorted(unknown)[0]}).")
        views = views.filter(pl.col("slide_id").is_in(sorted(wanted)))
    if where:
        columns = [c for c in views.collect_schema().names() if c != "row"]
        try:
            rows = views.filter(pl.sql_expr(where)).select("row").collect()["row"].to_numpy()
        except Exception as exc:
            raise G2LError(f"--where {where!r} is not a valid condition ({str(exc).splitlines()[0]}); "
                           f"columns: {', '.join(columns)}.") from None
    else:
        rows = views.select("row").collect()["row"].to_numpy()
    if len(rows) == 0:
        raise G2LError("no cached views left after --slides/--where; loosen the selection.")
    return np.sort(rows.astype(np.int64))


def view_slides(reader: CacheReader, views: np.ndarray) -> np.ndarray:
    """The slide (row of slides.parquet) of each view."""
    return reader.tile_index["slide"][reader.view_index["tile"][views]]


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


# A TCGA slide barcode starts with its patient: TCGA-<site>-<participant>.
_TCGA_PATIENT = re.compile(r"^(TCGA-[A-Z0-9]{2}-[A-Z0-9]{4})(?:-|$)", re.IGNORECASE)


def patients_of_slides(slide_ids: list[str], patient_csv: str | None = None) -> tuple[dict[str, str], str]:
    """The patient of each slide and where it came from: "csv" (`patient_csv` with slide_id and
    patient_id columns), "tcga" (every id is a TCGA barcode), or "slide" (each slide its own)."""
    if patient_csv:
        p = Path(patient_csv)
        if not p.is_file():
            raise G2LError(f"--patient-of {p} does not exist.")
        table = pl.read_csv(p, infer_schema_length=0)
        if not {"slide_id", "patient_id"} <= set(table.columns):
            raise G2LError(f"--patient-of {p} needs 'slide_id' and 'patient_id' columns; it has "
                           f"{', '.join(table.columns)}.")
        known = dict(zip(table["slide_id"].to_list(), table["patient_id"].to_list()))
        missing = sorted(set(slide_ids) - set(known))
        if missing:
            raise G2LError(f"--patient-of {p} has no patient for {len(missing)} slide(s), e.g. "
                           f"{missing[0]}; add a row for every slide of the cache.")
        return {s: known[s] for s in slide_ids}, "csv"
    matches = {s: _TCGA_PATIENT.match(s) for s in slide_ids}
    if slide_ids and all(matches.values()):
        return {s: m.group(1).upper() for s, m in matches.items()}, "tcga"
    return {s: s for s in slide_ids}, "slide"


def split_by_slide(slide_ids: list[str], val_fraction: float, seed: int,
                   patients: dict[str, str] | None = None) -> tuple[list[str], list[str]]:
    """Seeded train/validation split of whole slides (of whole patients when `patients` maps
    slide -> patient): no slide, and no patient, is on both sides."""
    if not 0 <= val_fraction < 1:
        raise G2LError(f"--val-fraction must be in [0, 1), got {val_fraction}.")
    ids = sorted(set(slide_ids))
    if val_fraction == 0:
        return ids, []
    patient = patients or {s: s for s in ids}
    groups = sorted({patient[s] for s in ids})
    if len(groups) < 2:
        raise G2LError(f"a validation split needs at least 2 {'patients' if patients else 'slides'}; "
                       "use --val-fraction 0.")
    n_val = min(len(groups) - 1, max(1, round(val_fraction * len(groups))))
    order = np.random.default_rng([seed, 7]).permutation(len(groups))
    held_out = {groups[i] for i in order[:n_val]}
    return [s for s in ids if patient[s] not in held_out], [s for s in ids if patient[s] in held_out]


def samples_per_epoch(tiles: np.ndarray, views_per_epoch: str) -> int:
    """How many views an epoch visits: one per tile, or all of them (`tiles`: tile of each view)."""
    return len(tiles) if views_per_epoch == "all" else int(np.count_nonzero(np.diff(tiles)) + (len(tiles) > 0))


def epoch_rows(tiles: np.ndarray, epoch: int, seed: int, views_per_epoch: str) -> np.ndarray:
    """Positions in a view selection that an epoch visits, in visiting order.

    `tiles`: the tile of each selected view, a tile's views next to each other (views are stored
    tile by tile). "one": each tile contributes one of its K views, and K epochs in a row visit
    all K of them (a seeded order per tile, drawn anew every K epochs); "all": every view. The
    visiting order is a (seed, epoch) permutation, so an epoch can be replayed or resumed exactly.
    """
    if views_per_epoch not in VIEW_CHOICES:
        raise G2LError(f"--views-per-epoch must be one of {', '.join(VIEW_CHOICES)}.")
    if views_per_epoch == "all":
        rows = np.arange(len(tiles))
    else:
        starts = np.flatnonzero(np.r_[True, tiles[1:] != tiles[:-1]])
        counts = np.diff(np.r_[starts, len(tiles)])
        cycle, position = divmod(epoch, int(counts.max()) if len(counts) else 1)
        keys = np.random.default_rng([seed, 2000 + cycle]).random(len(tiles))
        # views sorted by (tile, key): each tile's block is a seeded order of its views
        in_cycle_order = np.lexsort((keys, np.repeat(np.arange(len(starts)), counts)))
        rows = in_cycle_order[starts + position % counts]
    return rows[np.random.default_rng([seed, 1000 + epoch]).permutation(len(rows))]


class CachedViews(Dataset):
    """Item i: (the [0, 1] view i of the cache as the teacher saw it, embedding target, patch target).

    Items are rows of views.parquet; nothing is stored per view here (the reader's index is a
    shared memory map), so DataLoader workers cost no memory per view. With several teachers
    (`teacher_fp` a list) their targets are concatenated in that order."""

    def __init__(self, reader: CacheReader, teacher_fp: str | list[str] | None):
        self.reader = reader
        self.teacher_fps = [teacher_fp] if isinstance(teacher_fp, str) else list(teacher_fp or [])

    def __len__(self) -> int:
        return self.reader.n_views

    def __getitem__(self, i: int):
        view = self.reader.replay(i)
        if not self.teacher_fps:
            return view, torch.zeros(0), torch.zeros(0)
        pairs = [self.reader.target(fp, i) for fp in self.teacher_fps]
        emb, patch = (np.concatenate(x) if len(x) > 1 else x[0] for x in zip(*pairs))
        return view, torch.from_numpy(emb.astype(np.float32)), torch.from_numpy(patch.astype(np.float32))


def whole_group_sample(group_of: np.ndarray, limit: int, rng: np.random.Generator) -> np.ndarray:
    """Rows of a seeded sample of whole groups (`group_of`: integer group code of each row) of at
    most `limit` rows (at least one group)."""
    counts = np.bincount(group_of)
    order = rng.permutation(len(counts))
    n_groups = max(1, int(np.searchsorted(np.cumsum(counts[order]), limit, side="right")))
    return np.flatnonzero(np.isin(group_of, order[:n_groups]))


def fresh_item(tiles: np.ndarray, k: int) -> np.ndarray:
    """FreshViews items for view `k` of each tile (rows of tiles.parquet)."""
    return (np.int64(k) << 32) | tiles.astype(np.int64)


class FreshViews(Dataset):
    """Item (k << 32 | tile): view k of that tile drawn as the cache draws its views
    (`sample_view(cache seed, tile_id, k)` on the stored tile), for any k; k < K replays a cached
    view, k >= K is one no cache holds. No targets: a live teacher makes them."""

    def __init__(self, reader: CacheReader):
        self.reader = reader
        self._tile_ids: np.ndarray | None = None

    def __len__(self) -> int:
        return self.reader.n_tiles

    def __getitem__(self, item: int):
        tile, k = int(item) & 0xFFFFFFFF, int(item) >> 32
        if self._tile_ids is None:  # read once per process (DataLoader workers included)
            self._tile_ids = pl.read_parquet(self.reader.layout.tiles, columns=["tile_id"])["tile_id"].to_numpy()
        params = sample_view(self.reader.seed, str(self._tile_ids[tile]), k, self.reader.policy)
        return apply_view(self.reader.tile_pixels(tile), params), torch.zeros(0), torch.zeros(0)
