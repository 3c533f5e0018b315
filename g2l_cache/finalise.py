"""Write the Parquet tables, the view/tile index and the manifest from what the shards hold.

Runs on rank 0 after every rank has closed its shards. Each slide's tables were made when it was
planned; this only concatenates them, adds where each tile and target sits, and counts targets
from the per-slide bitmaps (no target is read). When no shard changed since the last finalise and
the teacher is already recorded, nothing is rewritten.
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from g2l_cache.environment import library_versions
from g2l_cache.layout import CacheLayout, dir_bytes, read_manifest, write_manifest
from g2l_cache.slides import SlideSpec
from g2l_cache.store import (META_GENERATION, TLOC_DTYPE, bits_from_bytes, close_env, done_key, get_value,
                             index_path, iter_prefix, read_int, read_spent, shared_env, table_from_bytes,
                             tiles_key, tloc_key, unpack, views_key)
from g2l_cache.tables import (TILE_INDEX_DTYPE, TILE_LOCATION_SCHEMA, TILE_SCHEMA, VIEW_INDEX_DTYPE,
                              VIEW_LOCATION_SCHEMA, VIEW_SCHEMA, view_index_rows)

ROW_GROUP = 1 << 18  # rows per Parquet row group


class _TableWriter:
    """Streams tables to one Parquet file in large row groups, under a temp name until closed."""

    def __init__(self, path: Path, schema: pa.Schema):
        self.path, self.tmp = path, path.with_name(path.name + ".tmp")
        self.writer = pq.ParquetWriter(self.tmp, schema)
        self.pending: list[pa.Table] = []
        self.rows = 0

    def write(self, table: pa.Table) -> None:
        self.pending.append(table)
        self.rows += table.num_rows
        if self.rows >= ROW_GROUP:
            self._flush()

    def _flush(self) -> None:
        if self.pending:
            self.writer.write_table(pa.concat_tables(self.pending), row_group_size=ROW_GROUP)
        self.pending, self.rows = [], 0

    def close(self) -> Path:
        self._flush()
        self.writer.close()
        return self.tmp


class ShardEnvs(OrderedDict):
    """Shard index environments opened on demand, at most `max_open` at once (least recently used
    closed first): finalising a cache of thousands of shards must not hold them all open."""

    def __init__(self, layout: CacheLayout, max_open: int = 32):
        super().__init__()
        self.layout, self.max_open = layout, max_open

    def __getitem__(self, shard: int):
        if shard in self:
            self.move_to_end(shard)
            return super().__getitem__(shard)
        while len(self) >= self.max_open:
            close_env(self.layout.shard(self.popitem(last=False)[0]))
        env = shared_env(self.layout.shard(shard))
        super().__setitem__(shard, env)
        return env

    def close(self) -> None:
        for shard in list(self):
            close_env(self.layout.shard(shard))
        self.clear()


def _add_columns(table: pa.Table, schema: pa.Schema, columns: dict[str, np.ndarray]) -> pa.Table:
    for field in schema:
        table = table.append_column(field, pa.array(columns[field.name], type=field.type))
    return table


def merged_slide_inputs(manifest: dict, specs: list[SlideSpec]) -> list[dict]:
    """The manifest's slide inputs with `specs` added (a build without SLIDES works on these)."""
    inputs = {s["slide_id"]: s for s in manifest.get("slide_inputs", [])}
    inputs.update({s.slide_id: {"slide_id": s.slide_id, "path": s.path, "mpp_override": s.mpp_override}
                   for s in specs})
    return [inputs[k] for k in sorted(inputs)]


def finalise_cache(layout: CacheLayout, specs: list[SlideSpec], teacher_info: dict,
                   world_size: int, teacher_pass: dict | None = None) -> dict:
    """Write slides/tiles/views Parquet, the index and the manifest's counts, teachers and shards;
    `teacher_pass` (time, device, views of this build's teacher work) is added to the teacher's ledger."""
    manifest = read_manifest(layout.root)
    k_views = manifest["settings"]["views"]["per_tile"]
    teachers = dict(manifest["teachers"])
    known_teacher = teacher_info["fingerprint"] in teachers
    teachers[teacher_info["fingerprint"]] = {**teachers.get(teacher_info["fingerprint"], {}),
                                             **teacher_info}
    if teacher_pass is not None:
        entry = teachers[teacher_info["fingerprint"]]
        entry["ledger"] = [*entry.get("ledger", []), teacher_pass]

    envs, records, shard_states, canaries = ShardEnvs(layout), [], [], {}
    spent: dict[str, dict[str, dict[str, float]]] = {}  # teacher -> device -> time and views committed
    for shard in range(manifest["n_shards"]):
        path = layout.shard(shard)
        state = {"index": shard, "path": str(path.relative_to(layout.root)), "state": "empty",
                 "slides": 0, "tiles": 0, "bytes": 0, "generation": 0}
        if index_path(path).exists():
            env = envs[shard]
            shard_recs = [json.loads(unpack(v, k)) for k, v in iter_prefix(env, b"slide/")]
            records += shard_recs
            ok_here = {r["slide_id"] for r in shard_recs if r["status"] == "ok"}
            for key, value in iter_prefix(env, b"canary/"):
                slide_id = bytes(key).decode().split("/", 1)[1]
                if slide_id in ok_here:
                    canaries[slide_id] = unpack(value, key).decode()
            for fp, devices in read_spent(env).items():
                for device, cost in devices.items():
                    total = spent.setdefault(fp, {}).setdefault(device, {"device_seconds": 0.0, "views": 0})
                    total["device_seconds"] += cost["device_seconds"]
                    total["views"] += cost["views"]
            state.update(state="complete", slides=len(shard_recs),
                         tiles=sum(r["n_tiles"] for r in shard_recs if r["status"] == "ok"),
                         bytes=dir_bytes(path), generation=read_int(env, META_GENERATION))
        shard_states.append(state)
    try:
        old_gens = [s.get("generation") for s in manifest.get("shards", [])]
        unchanged = (known_teacher and old_gens == [s["generation"] for s in shard_states]
                     and all(p.exists() for p in (layout.slides, layout.tiles, layout.views,
                                                  layout.view_index, layout.tile_index)))
        if not unchanged:
            _write_tables(layout, envs, records, teachers, k_views)
    finally:
        envs.close()

    for fp, devices in spent.items():
        if fp in teachers:  # kept with the targets: also the time of builds killed half-way
            teachers[fp]["spent"] = devices
    ok = [r for r in records if r["status"] == "ok"]
    n_views = sum(r["n_views"] for r in ok)
    if unchanged:
        counts = manifest["counts"]
    else:
        counts = {"slides": len(records), "slides_ok": len(ok), "slides_failed": len(records) - len(ok),
                  "tiles": sum(r["n_tiles"] for r in ok), "views": n_views}
    manifest.update(
        status="complete" if teachers[teacher_info["fingerprint"]]["complete"] else "partial",
        teachers=teachers, shards=shard_states, last_world_size=world_size,
        slide_inputs=merged_slide_inputs(manifest, specs), counts=counts, canaries=canaries)
    # a cache made before view versions were recorded: the libraries of its first finalise since
    manifest.setdefault("view_versions", library_versions())
    write_manifest(layout.root, manifest)
    return manifest


def _write_tables(layout: CacheLayout, envs: dict, records: list[dict], teachers: dict,
                  k_views: int) -> None:
    """Concatenate every ok slide's tables (in slide-id order) into Parquet and the index."""
    records = sorted(records, key=lambda r: r["slide_id"])
    ok = [r for r in records if r["status"] == "ok"]
    n_tiles, n_views = sum(r["n_tiles"] for r in ok), sum(r["n_views"] for r in ok)
    layout.index_dir.mkdir(exist_ok=True)
    tmp_views = layout.view_index.with_name("views.npy.tmp")
    tmp_tiles = layout.tile_index.with_name("tiles.npy.tmp")
    view_index = np.lib.format.open_memmap(tmp_views, mode="w+", dtype=VIEW_INDEX_DTYPE, shape=(n_views,))
    tile_index = np.lib.format.open_memmap(tmp_tiles, mode="w+", dtype=TILE_INDEX_DTYPE, shape=(n_tiles,))
    tiles_out = _TableWriter(layout.tiles, pa.schema(list(TILE_SCHEMA) + list(TILE_LOCATION_SCHEMA)))
    views_out = _TableWriter(layout.views, pa.schema(list(VIEW_SCHEMA) + list(VIEW_LOCATION_SCHEMA)))
    targets = {fp: 0 for fp in teachers}
    missing: dict[str, list[str]] = {fp: [] for fp in teachers}
    slide_row = {r["slide_id"]: i for i, r in enumerate(records)}
    t0 = v0 = 0
    for rec in ok:
        sid, shard, env = rec["slide_id"], rec["shard"], envs[rec["shard"]]
        tiles = table_from_bytes(get_value(env, tiles_key(sid)))
        views = table_from_bytes(get_value(env, views_key(sid)))
        tloc = np.frombuffer(get_value(env, tloc_key(sid)), dtype=TLOC_DTYPE)
        nt, nv = tiles.num_rows, views.num_rows
        tiles_out.write(_add_columns(tiles, TILE_LOCATION_SCHEMA, {
            "shard": np.full(nt, shard), "offset": tloc["offset"], "length": tloc["length"],
            "crc32": tloc["crc"]}))
        rows = view_index_rows(views, t0, k_views, rec["row_start"])
        views_out.write(_add_columns(views, VIEW_LOCATION_SCHEMA, {
            "shard": np.full(nv, shard), "tile_index": rows["tile"].astype(np.int64),
            "target_row": rows["row"].astype(np.int64)}))
        view_index[v0:v0 + nv] = rows
        entries = tile_index[t0:t0 + nt]
        entries["shard"], entries["slide"] = shard, slide_row[sid]
        # A tile not stored yet (a partial build) keeps offset -1; reading it names the fix.
        entries["offset"], entries["length"], entries["crc"] = tloc["offset"], tloc["length"], tloc["crc"]
        for fp in teachers:
            have = int(bits_from_bytes(get_value(env, done_key(sid, fp)), nv).sum())
            targets[fp] += have
            if have < nv:
                missing[fp].append(sid)
        t0, v0 = t0 + nt, v0 + nv
    view_index.flush()
    tile_index.flush()
    del view_index, tile_index
    slides_tmp = layout.slides.with_name("slides.parquet.tmp")
    pq.write_table(_slides_table(records), slides_tmp)
    # Tables first, the manifest last: a reader never sees counts the tables do not have.
    for tmp, final in ((tiles_out.close(), layout.tiles), (views_out.close(), layout.views),
                       (tmp_tiles, layout.tile_index), (tmp_views, layout.view_index),
                       (slides_tmp, layout.slides)):
        os.replace(tmp, final)
    for fp, info in teachers.items():
        info.update(n_targets=targets[fp], complete=targets[fp] == n_views,
                    missing_slides=missing[fp])


def _slides_table(records: list[dict]) -> pa.Table:
    rows = [{"slide_id": r["slide_id"], "path": r["path"], "file_size": r["file"]["size"],
             "file_mtime": r["file"]["mtime"], "mpp": r["mpp"], "mpp_source": r["mpp_source"],
             "mpp_override": r.get("mpp_override"), "width": r["width"], "height": r["height"],
             "reader": r["reader"], "status": r["status"], "error": r["error"],
             "n_candidates": r["n_candidates"], "n_tiles": r["n_tiles"] if r["status"] == "ok" else 0,
             "shard": r["shard"], "tissue_share": r.get("tissue_share"),
             "annotation": (r.get("annotation") or {}).get("digest")} for r in records]
    schema = pa.schema([("slide_id", pa.string()), ("path", pa.string()), ("file_size", pa.int64()),
                        ("file_mtime", pa.float64()), ("mpp", pa.float64()), ("mpp_source", pa.string()),
                        ("mpp_override", pa.float64()), ("width", pa.int64()), ("height", pa.int64()),
                        ("reader", pa.string()), ("status", pa.string()), ("error", pa.string()),
                        ("n_candidates", pa.int64()), ("n_tiles", pa.int64()), ("shard", pa.int64()),
                        ("tissue_share", pa.float64()), ("annotation", pa.string())])
    return pa.Table.from_pylist(rows, schema=schema)
