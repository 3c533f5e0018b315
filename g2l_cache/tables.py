"""Column layouts: each slide's tile and view tables, and the fixed-width index stage two maps.

A slide's tables are made once, when it is planned, and stored in its shard; `finalise` only
concatenates them. The index (`index/views.npy`, `index/tiles.npy`) holds what replaying a view
needs in fixed-width columns, memory-mapped and shared by every reader process.
"""

from __future__ import annotations

import itertools

import numpy as np
import pyarrow as pa

from g2l_cache.tiling import TileRecord, make_tile_id
from g2l_cache.view_batch import sample_view_columns
from g2l_cache.views import JITTER_OPS, ViewParams, ViewPolicy, view_param_names

_PARAM_TYPES = {"crop_x": pa.int64(), "crop_y": pa.int64(), "crop_size": pa.int64(),
                "hflip": pa.bool_(), "vflip": pa.bool_(), "jitter_applied": pa.bool_(),
                "brightness": pa.float64(), "contrast": pa.float64(), "saturation": pa.float64(),
                "hue": pa.float64(), "jitter_order": pa.string(), "blur_applied": pa.bool_(),
                "blur_sigma": pa.float64(), "blur_kernel": pa.int64()}

TILE_SCHEMA = pa.schema([("tile_id", pa.string()), ("slide_id", pa.string()), ("x", pa.int64()),
                         ("y", pa.int64()), ("size0", pa.int64()), ("read_mpp", pa.float64()),
                         ("tile_px", pa.int64()), ("tissue_fraction", pa.float64())])
VIEW_SCHEMA = pa.schema([("view_id", pa.string()), ("tile_id", pa.string()), ("slide_id", pa.string()),
                         ("view_index", pa.int64())] + [(k, _PARAM_TYPES[k]) for k in view_param_names()])
# Columns finalise adds: where each tile's bytes and each view's target row are.
TILE_LOCATION_SCHEMA = pa.schema([("shard", pa.int64()), ("offset", pa.int64()), ("length", pa.int64()),
                                  ("crc32", pa.int64())])
VIEW_LOCATION_SCHEMA = pa.schema([("shard", pa.int64()), ("tile_index", pa.int64()),
                                  ("target_row", pa.int64())])

JITTER_ORDERS = ["".join(p) for p in itertools.permutations(JITTER_OPS)]
_ORDER_CODE = {o: i for i, o in enumerate(JITTER_ORDERS)}
_FLAGS = ("hflip", "vflip", "jitter_applied", "blur_applied")

# 39 bytes per view. The jitter factors fit float32 exactly for replay: apply_view casts them to
# float32 before use. blur_sigma stays float64 because the blur weights are computed in float64.
VIEW_INDEX_DTYPE = np.dtype([("tile", "<u4"), ("row", "<u4"), ("k", "u1"), ("flags", "u1"),
                             ("order", "u1"), ("crop_x", "<u2"), ("crop_y", "<u2"),
                             ("brightness", "<f4"), ("contrast", "<f4"), ("saturation", "<f4"),
                             ("hue", "<f4"), ("blur_sigma", "<f8")])
# 22 bytes per tile: its shard, its row in slides.parquet, and where its encoded bytes are.
TILE_INDEX_DTYPE = np.dtype([("shard", "<u2"), ("slide", "<u4"), ("offset", "<i8"),
                             ("length", "<u4"), ("crc", "<u4")])


def make_view_id(tile_id: str, k: int) -> str:
    return f"{tile_id}#{k}"


def slide_tables(slide_id: str, tiles: list[TileRecord], read_mpp: float, tile_px: int,
                 k_views: int, seed: int, policy: ViewPolicy) -> tuple[pa.Table, pa.Table]:
    """The tile table and the view table (tile-major: view v is view v % K of tile v // K)."""
    n = len(tiles)
    tile_ids = [make_tile_id(slide_id, t.x, t.y) for t in tiles]
    tile_table = pa.table({"tile_id": tile_ids, "slide_id": [slide_id] * n, "x": [t.x for t in tiles],
                           "y": [t.y for t in tiles], "size0": [t.size0 for t in tiles],
                           "read_mpp": [float(read_mpp)] * n, "tile_px": [tile_px] * n,
                           "tissue_fraction": [float(t.tissue_fraction) for t in tiles]},
                          schema=TILE_SCHEMA)
    cols = sample_view_columns(seed, [(t, k) for t in tile_ids for k in range(k_views)], policy)
    cols.update(view_id=[make_view_id(t, k) for t in tile_ids for k in range(k_views)],
                tile_id=[t for t in tile_ids for _ in range(k_views)], slide_id=[slide_id] * (n * k_views),
                view_index=list(range(k_views)) * n)
    return tile_table, pa.table({c: cols[c] for c in VIEW_SCHEMA.names}, schema=VIEW_SCHEMA)


def view_index_rows(views: pa.Table, first_tile: int, k_views: int, row_start: int) -> np.ndarray:
    """Index entries of one slide's view table whose tiles start at global tile `first_tile`."""
    n = views.num_rows
    out = np.zeros(n, dtype=VIEW_INDEX_DTYPE)
    col = {name: views.column(name).to_numpy(zero_copy_only=False) for name in views.column_names}
    out["tile"] = first_tile + np.arange(n) // k_views
    out["row"] = row_start + np.arange(n)
    out["k"] = col["view_index"]
    out["flags"] = sum((col[f].astype(np.uint8) << i) for i, f in enumerate(_FLAGS))
    out["order"] = [_ORDER_CODE[o] for o in col["jitter_order"]]
    for name in ("crop_x", "crop_y", "brightness", "contrast", "saturation", "hue", "blur_sigma"):
        out[name] = col[name]
    return out


def params_from_index(entry: np.void, policy: ViewPolicy) -> ViewParams:
    """The ViewParams of one index entry (crop size and blur kernel are the policy's)."""
    flags = int(entry["flags"])
    return ViewParams(int(entry["crop_x"]), int(entry["crop_y"]), policy.crop_size, bool(flags & 1),
                      bool(flags & 2), bool(flags & 4), float(entry["brightness"]),
                      float(entry["contrast"]), float(entry["saturation"]), float(entry["hue"]),
                      JITTER_ORDERS[int(entry["order"])], bool(flags & 8), float(entry["blur_sigma"]),
                      policy.blur_kernel)
