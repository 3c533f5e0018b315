"""Phase one of a build, and all of `g2l cache plan`: open each slide, detect tissue, choose its tiles,
draw its QC picture and commit its record (with its tile and view tables) to the slide's shard.

Slides are planned by worker processes that import only what planning uses (numpy, OpenSlide, Pillow,
Arrow): no torch and no tiatoolbox unless a slide needs tiatoolbox's reader. A slide moved to a new
path (or copied) is recognised by its content and keeps its records; nothing is planned twice.
"""

from __future__ import annotations

import hashlib
import os
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

from g2l_cache.annotations import SlideAnnotation, find_annotation, read_regions
from g2l_cache.build_config import BuildConfig
from g2l_cache.environment import library_versions
from g2l_cache.errors import G2LError
from g2l_cache.layout import CACHE_FORMAT, SCHEMA_VERSION, CacheLayout, now_iso, read_manifest, write_manifest
from g2l_cache.plan_pool import map_surviving
from g2l_cache.qc import write_qc, write_qc_geojson
from g2l_cache.slides import SlideSpec, discover_slides, file_fingerprint, open_slide, same_slide_file
from g2l_cache.store import ShardWriter, table_to_bytes
from g2l_cache.tables import slide_tables
from g2l_cache.tiling import TilingConfig, plan_tiles
from g2l_cache.views import ViewPolicy
from g2l_cache.workers import worker_init

PLAN_CACHE_BYTES = 1 << 20  # the plan reads each region once: OpenSlide's default 32 MB tile cache is dead weight

def shard_of(slide_id: str, n_shards: int) -> int:
    """The shard a slide lives in: a stable hash, so it never depends on rank count or order."""
    digest = hashlib.blake2b(slide_id.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % n_shards

def prepare_cache(cfg: BuildConfig) -> dict:
    """Create a new cache or check that an existing one has the same settings; return its manifest."""
    layout = CacheLayout(cfg.out)
    if layout.root.exists() and not layout.root.is_dir():
        raise G2LError(f"--out {layout.root} is a file; pass a folder for the cache.")
    annotations = {"folder": str(Path(cfg.annotations).resolve()), "classes": list(cfg.class_names())} \
        if cfg.annotations else None
    if layout.manifest.exists():
        manifest = read_manifest(layout.root)
        if manifest["settings"] != cfg.settings():
            diffs = _diff(manifest["settings"], cfg.settings())
            raise G2LError(f"{layout.root} was built with other tiling/view settings ({'; '.join(diffs)}); "
                           "use the same settings to resume or add a teacher, or a new --out folder.")
        if annotations and manifest.get("annotations") != annotations:  # the folder moved
            manifest["annotations"] = annotations
            write_manifest(layout.root, manifest)
        return manifest
    if layout.root.is_dir() and any(layout.root.iterdir()):
        raise G2LError(f"--out {layout.root} exists and is not a g2l cache; choose a new or empty folder.")
    layout.root.mkdir(parents=True, exist_ok=True)
    manifest = {"format": CACHE_FORMAT, "schema_version": SCHEMA_VERSION, "created": now_iso(),
                "status": "building", "settings": cfg.settings(), "view_versions": library_versions(),
                "n_shards": cfg.shards, "teachers": {}, "slide_inputs": [],
                "counts": {}, "shards": []}
    if annotations:
        manifest["annotations"] = annotations
    write_manifest(layout.root, manifest)
    return manifest


def _diff(old: dict, new: dict, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _diff(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: cache has {a!r}, asked {b!r}")
    return out

def slide_specs(cfg: BuildConfig, manifest: dict) -> list[SlideSpec]:
    """The slides to work on: SLIDES as given, else the ones the cache knows. A slide given without an
    mpp override keeps the one it was planned with (options left out default to what the cache recorded)."""
    if cfg.slides:
        recorded = {s["slide_id"]: s.get("mpp_override") for s in manifest.get("slide_inputs") or []}
        return [replace(s, mpp_override=recorded[s.slide_id]) if s.mpp_override is None and recorded.get(s.slide_id)
                else s for s in discover_slides(cfg.slides, cfg.mpp_override, cfg.recursive)]
    if manifest["slide_inputs"]:
        # No SLIDES given: work on the slides this cache already knows (e.g. adding a teacher).
        return [SlideSpec(**s) for s in manifest["slide_inputs"]]
    raise G2LError("no SLIDES given and the cache has none yet; pass slide files, folders or a CSV.")

class ShardWriters(OrderedDict):
    """This process's shard writers, opened when first needed and closed when `max_open` are open
    (least recently used first): a cache has up to thousands of shards and each open one holds
    file descriptors. Only the thread that owns it may use it (the build's writer thread closes its
    own through `close_shard`)."""

    def __init__(self, layout: CacheLayout, max_open: int = 32):
        super().__init__()
        self.layout, self.max_open = layout, max_open

    def __getitem__(self, shard: int) -> ShardWriter:
        if shard in self:
            self.move_to_end(shard)
            return super().__getitem__(shard)
        while len(self) >= self.max_open:
            self.close_shard(next(iter(self)))
        writer = ShardWriter(self.layout.shard(shard))
        super().__setitem__(shard, writer)
        return writer

    def close_shard(self, shard: int) -> None:
        writer = self.pop(shard, None)
        if writer is not None:
            writer.close()

    def close(self) -> None:
        for writer in self.values():
            writer.close()
        self.clear()


def plan_slides(cfg, layout, specs, writers, n_shards, progress, failed) -> list[dict]:
    """Phase 1: plan every slide not planned yet; return the ok slide records in a fixed order."""
    records: dict[str, dict] = {}
    todo, to_identify, changed = [], [], {}
    annotation = {s.slide_id: find_annotation(cfg.annotations, s.slide_id) for s in specs}
    for spec in specs:
        writer = writers[shard_of(spec.slide_id, n_shards)]
        rec = writer.record(spec.slide_id)
        if rec is None or rec["status"] != "ok":
            todo.append(spec)
            continue
        reasons = _setting_changes(rec, spec, annotation[spec.slide_id])
        if reasons:
            changed[spec.slide_id] = (spec, rec, writer, reasons)
        elif not os.path.exists(spec.path) or (rec["path"] == spec.path and _unchanged(rec, spec.path)):
            # unchanged, or gone: the stored tiles serve (e.g. adding a teacher after the slides were deleted)
            records[spec.slide_id] = rec
            progress.slide_planned(spec.slide_id)
        else:
            to_identify.append((spec, rec, writer))
    # A slide at a new path (a moved or copied folder) or with a new mtime is the planned slide when
    # its content identity is: its record follows it and nothing is recomputed.
    with ThreadPoolExecutor(max_workers=8) as pool:
        same = list(pool.map(lambda item: same_slide_file(item[1].get("file"), item[0].path), to_identify))
    for (spec, rec, writer), is_same in zip(to_identify, same):
        if not is_same:
            changed[spec.slide_id] = (spec, rec, writer, ["its file's content changed"])
            continue
        rec = dict(rec, path=spec.path, file=file_fingerprint(spec.path))
        writer.put_record(rec)
        records[spec.slide_id] = rec
        progress.slide_planned(spec.slide_id)
    todo += _replans_allowed(cfg, changed)
    for rec in _planned(todo, [annotation[s.slide_id] for s in todo], cfg, str(layout.root)):
        shard = shard_of(rec["slide_id"], n_shards)
        rec["shard"] = shard
        tables = rec.pop("tables")
        rec = writers[shard].plan_slide(rec, *(tables or (None, None)))
        if rec["status"] == "ok":
            records[rec["slide_id"]] = rec
            progress.slide_planned(rec["slide_id"])
        else:
            failed[rec["slide_id"]] = rec["error"]
            progress.slide_done(rec["slide_id"], ok=False, error=rec["error"])
    return [records[s.slide_id] for s in specs if s.slide_id in records]


def _setting_changes(rec: dict, spec: SlideSpec, annotation: SlideAnnotation | None) -> list[str]:
    """What changed since the slide was planned that gives it other tiles: the mpp it is tiled at (an
    override), its annotation."""
    reasons = []
    # the mpp the slide is tiled at: an override equal to it changes nothing
    if spec.mpp_override is not None and abs(float(spec.mpp_override) - float(rec["mpp"])) > 1e-9:
        reasons.append(f"mpp {rec['mpp']:g} -> override {spec.mpp_override:g}")
    elif spec.mpp_override is None and rec.get("mpp_source") == "override":
        reasons.append(f"mpp override {rec['mpp']:g} -> none (the slide's own metadata)")
    recorded = (rec.get("annotation") or {}).get("digest")
    drawn = annotation.digest if annotation else None
    if recorded != drawn:
        reasons.append("its annotation file is gone" if drawn is None else
                       "it has an annotation file now" if recorded is None else "its annotation file changed")
    return reasons


def _replans_allowed(cfg: BuildConfig, changed: dict[str, tuple]) -> list[SlideSpec]:
    """The changed slides to plan again: those with nothing stored yet, and with --replan-changed all of
    them; otherwise a slide with stored tiles or targets is never discarded: refused, listing them."""
    kept = {sid: c for sid, c in changed.items() if _has_stored_work(c[2], sid)}
    if kept and not cfg.replan_changed:
        listed = "; ".join(f"{sid} ({', '.join(reasons)})" for sid, (_, _, _, reasons) in list(kept.items())[:10])
        more = f" and {len(kept) - 10} more" if len(kept) > 10 else ""
        raise G2LError(f"{len(kept)} cached slide(s) would be tiled again, discarding their stored tiles and every "
                       f"teacher's targets of them: {listed}{more}. Give the settings they were cached with (or "
                       "restore their files), or pass --replan-changed to recompute them.")
    return [spec for spec, _, _, _ in changed.values()]


def _has_stored_work(writer: ShardWriter, slide_id: str) -> bool:
    tloc = writer.tile_locations(slide_id)
    return tloc is not None and bool((tloc["offset"] >= 0).any())


def _planned(specs: list[SlideSpec], annotations: list, cfg: BuildConfig, cache_root: str):
    """Each slide's plan record, in the order given: in worker processes that start fresh (spawn) and
    import only what planning needs, or here when --num-workers is 0 or there is one slide."""
    args = (cfg.tiling(), cfg.seed, cache_root, cfg.policy(), cfg.views)
    if cfg.num_workers == 0 or len(specs) <= 1:  # one slide: starting a worker would cost more than it saves
        yield from (plan_one_slide(spec, *args, annotation) for spec, annotation in zip(specs, annotations))
        return
    items = [(spec, *args, annotation) for spec, annotation in zip(specs, annotations)]
    yield from map_surviving(plan_one_slide, items, min(cfg.num_workers, len(specs)), worker_init, (os.getpid(),),
                             _worker_died)


def _worker_died(item: tuple, how: str) -> dict:
    """The failed record of a slide whose plan worker died."""
    spec, tiling, annotation = item[0], item[1], item[-1]
    return dict(_new_record(spec, tiling, annotation),
                error=f"the worker planning this slide died ({how}); the other slides went on")


def plan_one_slide(spec: SlideSpec, tiling: TilingConfig, seed: int, cache_root: str, policy: ViewPolicy,
                   views_per_tile: int, annotation: SlideAnnotation | None = None) -> dict:
    """Plan one slide (open, tissue mask, tiles inside its annotated regions if any, QC picture and
    GeoJSON) and return its record with its tables."""
    record = _new_record(spec, tiling, annotation)
    try:
        regions = read_regions(annotation.path, tiling.annotation_classes) if annotation else None
        slide = open_slide(spec, cache_bytes=PLAN_CACHE_BYTES)
        record.update(mpp=slide.mpp, mpp_source=slide.mpp_source, width=slide.width,
                      height=slide.height, reader=slide.reader_name)
        plan = plan_tiles(slide, spec.slide_id, tiling, seed, regions)
        slide.reader.close()
        layout = CacheLayout(cache_root)
        write_qc(layout.qc(spec.slide_id), plan, slide.width, spec.slide_id)
        write_qc_geojson(layout.qc(spec.slide_id, ".geojson"), plan, slide.width, slide.height)
        tiles, views = slide_tables(spec.slide_id, plan.tiles, tiling.mpp, tiling.tile_size, views_per_tile,
                                    seed, policy)
        record.update(status="ok", n_candidates=plan.n_candidates, n_tiles=len(plan.tiles),
                      tissue_share=round(float(plan.mask.mean()), 4),
                      n_views=len(plan.tiles) * views_per_tile,
                      tables=(table_to_bytes(tiles), table_to_bytes(views)))
    except G2LError as exc:
        record["error"] = str(exc)
    except Exception as exc:  # one bad slide never sinks a run
        record["error"] = (f"opening and planning the slide failed ({type(exc).__name__}: {exc}); the "
                           "file may be truncated or damaged")
    return record


def _new_record(spec: SlideSpec, tiling: TilingConfig, annotation: SlideAnnotation | None) -> dict:
    """A slide's record before it is planned (failed, no error yet)."""
    return {"slide_id": spec.slide_id, "path": spec.path, "mpp_override": spec.mpp_override,
            "file": file_fingerprint(spec.path), "read_mpp": tiling.mpp,
            "tile_px": tiling.tile_size, "status": "failed", "error": None,
            "mpp": None, "mpp_source": None, "width": None, "height": None, "reader": None,
            "n_candidates": 0, "n_tiles": 0, "n_views": 0, "tables": None,
            "annotation": {"file": Path(annotation.path).name, "digest": annotation.digest} if annotation else None}


def _unchanged(record: dict, path: str) -> bool:
    """The file at its recorded path still has its recorded size and mtime."""
    try:
        st = os.stat(path)
    except OSError:
        return False
    recorded = record.get("file") or {}
    return st.st_size == recorded.get("size") and st.st_mtime == recorded.get("mtime")
