"""Rebuild the Parquet tables and the manifest from what the shards hold (rank 0, after a barrier)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from g2l_cache.layout import CacheLayout, dir_bytes, read_manifest, write_manifest
from g2l_cache.slides import SlideSpec
from g2l_cache.store import close_env, iter_prefix, shared_env, target_prefix, unpack
from g2l_cache.views import ViewPolicy, sample_view, view_param_names
from g2l_cache.work import make_view_id
from g2l_cache.tiling import make_tile_id

SLIDE_COLUMNS = ["slide_id", "path", "file_size", "file_mtime", "mpp", "mpp_source", "mpp_override",
                 "width", "height", "reader", "status", "error", "n_candidates", "n_tiles", "shard"]


class _TableWriter:
    """Streams record batches to one Parquet file, written under a temp name and renamed at the end."""

    def __init__(self, path: Path):
        self.path, self.tmp = path, path.with_suffix(".parquet.tmp")
        self.writer: pq.ParquetWriter | None = None
        self.schema: pa.Schema | None = None

    def write(self, columns: dict[str, list]) -> None:
        if not columns or not next(iter(columns.values())):
            return
        table = pa.table(columns) if self.schema is None else pa.table(columns, schema=self.schema)
        if self.writer is None:
            self.schema = table.schema
            self.writer = pq.ParquetWriter(self.tmp, self.schema)
        self.writer.write_table(table)

    def close(self, empty_schema: pa.Schema) -> None:
        if self.writer is None:
            pq.write_table(empty_schema.empty_table(), self.tmp)
        else:
            self.writer.close()
        os.replace(self.tmp, self.path)


def _empty_schemas() -> dict[str, pa.Schema]:
    params = {"crop_x": pa.int64(), "crop_y": pa.int64(), "crop_size": pa.int64(), "hflip": pa.bool_(),
              "vflip": pa.bool_(), "jitter_applied": pa.bool_(), "brightness": pa.float64(),
              "contrast": pa.float64(), "saturation": pa.float64(), "hue": pa.float64(),
              "jitter_order": pa.string(), "blur_applied": pa.bool_(), "blur_sigma": pa.float64(),
              "blur_kernel": pa.int64()}
    return {
        "tiles": pa.schema([("tile_id", pa.string()), ("slide_id", pa.string()), ("x", pa.int64()),
                            ("y", pa.int64()), ("size0", pa.int64()), ("read_mpp", pa.float64()),
                            ("tile_px", pa.int64()), ("tissue_fraction", pa.float64()),
                            ("shard", pa.int64())]),
        "views": pa.schema([("view_id", pa.string()), ("tile_id", pa.string()),
                            ("slide_id", pa.string()), ("shard", pa.int64()),
                            ("view_index", pa.int64())] + [(k, params[k]) for k in view_param_names()]),
    }


def finalise_cache(layout: CacheLayout, specs: list[SlideSpec], teacher_info: dict,
                   world_size: int) -> dict:
    """Write slides/tiles/views Parquet and the manifest's counts, teachers and shard states."""
    manifest = read_manifest(layout.root)
    settings = manifest["settings"]
    policy = ViewPolicy(**settings["views"]["policy"])
    k_views, seed = settings["views"]["per_tile"], settings["seed"]
    schemas = _empty_schemas()
    tiles_out, views_out = _TableWriter(layout.tiles), _TableWriter(layout.views)
    slide_rows: list[dict] = []
    shard_states, n_tiles = [], 0
    teachers = dict(manifest["teachers"])
    teachers[teacher_info["fingerprint"]] = {**teachers.get(teacher_info["fingerprint"], {}),
                                             **teacher_info}
    target_counts = {fp: 0 for fp in teachers}
    for shard in range(manifest["n_shards"]):
        path = layout.shard(shard)
        if not path.exists():
            shard_states.append({"index": shard, "path": str(path.relative_to(layout.root)),
                                 "state": "empty", "slides": 0, "tiles": 0, "bytes": 0})
            continue
        env = shared_env(path)
        shard_tiles = shard_slides = 0
        try:
            for key, value in iter_prefix(env, b"slide/"):
                rec = json.loads(unpack(value, key))
                shard_slides += 1
                slide_rows.append(_slide_row(rec, shard))
                if rec["status"] != "ok":
                    continue
                shard_tiles += len(rec["tiles"])
                tiles_out.write(_tile_columns(rec, shard))
                views_out.write(_view_columns(rec, shard, k_views, seed, policy))
            for fp in teachers:
                target_counts[fp] += sum(1 for _ in iter_prefix(env, target_prefix(fp), values=False))
        finally:
            close_env(path)
        n_tiles += shard_tiles
        shard_states.append({"index": shard, "path": str(path.relative_to(layout.root)),
                             "state": "complete", "slides": shard_slides, "tiles": shard_tiles,
                             "bytes": dir_bytes(path)})
    tiles_out.close(schemas["tiles"])
    views_out.close(schemas["views"])
    slides_table = pa.Table.from_pylist(slide_rows) if slide_rows else None
    tmp = layout.slides.with_suffix(".parquet.tmp")
    pq.write_table(slides_table if slides_table is not None else
                   pa.schema([(c, pa.string()) for c in SLIDE_COLUMNS]).empty_table(), tmp)
    os.replace(tmp, layout.slides)

    n_views = n_tiles * k_views
    for fp, info in teachers.items():
        info.update(n_targets=target_counts[fp], complete=target_counts[fp] == n_views)
    ok = sum(r["status"] == "ok" for r in slide_rows)
    inputs = {s["slide_id"]: s for s in manifest.get("slide_inputs", [])}
    inputs.update({s.slide_id: {"slide_id": s.slide_id, "path": s.path,
                                "mpp_override": s.mpp_override} for s in specs})
    manifest.update(
        status="complete" if teachers[teacher_info["fingerprint"]]["complete"] else "partial",
        teachers=teachers, shards=shard_states, last_world_size=world_size,
        slide_inputs=[inputs[k] for k in sorted(inputs)],
        counts={"slides": len(slide_rows), "slides_ok": ok, "slides_failed": len(slide_rows) - ok,
                "tiles": n_tiles, "views": n_views})
    write_manifest(layout.root, manifest)
    return manifest


def _slide_row(rec: dict, shard: int) -> dict:
    return {"slide_id": rec["slide_id"], "path": rec["path"], "file_size": rec["file"]["size"],
            "file_mtime": rec["file"]["mtime"], "mpp": rec["mpp"], "mpp_source": rec["mpp_source"],
            "mpp_override": rec.get("mpp_override"), "width": rec["width"], "height": rec["height"],
            "reader": rec["reader"], "status": rec["status"], "error": rec["error"],
            "n_candidates": rec["n_candidates"], "n_tiles": len(rec["tiles"]) if rec["status"] == "ok" else 0,
            "shard": shard}


def _tile_columns(rec: dict, shard: int) -> dict[str, list]:
    tiles = rec["tiles"]
    return {"tile_id": [make_tile_id(rec["slide_id"], t[0], t[1]) for t in tiles],
            "slide_id": [rec["slide_id"]] * len(tiles), "x": [t[0] for t in tiles],
            "y": [t[1] for t in tiles], "size0": [t[2] for t in tiles],
            "read_mpp": [float(rec["read_mpp"])] * len(tiles), "tile_px": [rec["tile_px"]] * len(tiles),
            "tissue_fraction": [float(t[3]) for t in tiles], "shard": [shard] * len(tiles)}


def _view_columns(rec: dict, shard: int, k_views: int, seed: int, policy: ViewPolicy) -> dict[str, list]:
    cols: dict[str, list] = {c: [] for c in ["view_id", "tile_id", "slide_id", "shard", "view_index",
                                             *view_param_names()]}
    for t in rec["tiles"]:
        tile_id = make_tile_id(rec["slide_id"], t[0], t[1])
        for k in range(k_views):
            params = sample_view(seed, tile_id, k, policy).to_dict()
            cols["view_id"].append(make_view_id(tile_id, k))
            cols["tile_id"].append(tile_id)
            cols["slide_id"].append(rec["slide_id"])
            cols["shard"].append(shard)
            cols["view_index"].append(k)
            for name, value in params.items():
                cols[name].append(value)
    return cols
