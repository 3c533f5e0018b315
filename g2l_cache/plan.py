"""`g2l cache plan`: what a build will hold and cost, from tissue detection alone.

The plan runs the build's own first phase (open each slide, detect tissue, pick tiles, QC picture,
commit the slide record) into the cache folder, so a later `g2l cache build` with the same settings
starts from those records instead of detecting tissue again. On top it measures the stored bytes of
a seeded sample of real tiles, counts the teacher's and student's FLOPs on the meta device, and
writes everything to CACHE/plan.json.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np

from g2l_cache.build import BuildConfig, _plan_slides, _slide_specs, _Writers, prepare_cache, shard_of
from g2l_cache.costs import (STUDENT_EFFICIENCY, TEACHER_EFFICIENCY, GPU_PEAK_TFLOPS, gpu_peak_tflops,
                             gpu_views_per_second, model_flops, teacher_flops_and_dims)
from g2l_cache.errors import G2LError
from g2l_cache.layout import CacheLayout, dir_bytes, read_manifest
from g2l_cache.options import option
from g2l_cache.progress import PlanProgress
from g2l_cache.store import table_from_bytes, target_row_bytes, tiles_key

PLAN_FILE = "plan.json"
DEFAULT_PLAN_STUDENT = "vit_large_patch14_reg4_dinov2"  # Hibou-L's architecture, the paper's student


@dataclass
class PlanConfig(BuildConfig):
    """`g2l cache plan`: the build's options (the same settings give the same tiles) plus the costing."""

    gpu: str = option("h100", group="costing", help=f"GPU the build and fits will run on: "
                      f"{', '.join(GPU_PEAK_TFLOPS)} (dense bf16 peak x the share g2l measured on an H100).")
    views_per_second: float | None = option(None, group="costing",
                                            help="Teacher views/s you measured on your GPU (overrides --gpu "
                                            "for the build estimate).")
    student: str = option(DEFAULT_PLAN_STUDENT, group="costing",
                          help="timm architecture of the student whose cost per epoch is estimated.")
    student_img_size: int = option(224, group="costing", help="The student's input size (the fit's --img-size).")
    sample_tiles: int = option(64, group="costing",
                               help="Real tiles read and encoded to measure the stored bytes per tile.")
    fit_batch_size: int = option(32, group="costing", help="The fit's --batch-size: the global batch, split "
                                 "over --fit-gpus (the G2L paper: 32).")
    fit_gpus: int = option(8, group="costing", help="GPUs the student fit will run on.")
    fit_steps: int | None = option(None, group="costing", default_text="one epoch",
                                   help="The fit's --steps, to tell what share of the cached views it will read.")

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("sample_tiles", "fit_batch_size", "fit_gpus"):
            if getattr(self, name) < 1:
                raise G2LError(f"--{name.replace('_', '-')} must be at least 1.")
        if self.fit_steps is not None and self.fit_steps < 1:
            raise G2LError("--fit-steps must be at least 1.")
        if self.views_per_second is not None and self.views_per_second <= 0:
            raise G2LError("--views-per-second must be positive.")
        gpu_peak_tflops(self.gpu)  # an unknown GPU is refused before any slide is read

    def build_config(self) -> BuildConfig:
        """The BuildConfig whose settings this plan shares."""
        return BuildConfig(**{f.name: getattr(self, f.name) for f in fields(BuildConfig)})


def measure_tile_bytes(cfg: BuildConfig, records: list[dict], n: int, tile_table) -> tuple[float, int]:
    """Mean stored bytes of a seeded sample of `n` planned tiles (read from the slides, encoded as the
    build will), and how many were measured. `tile_table(record)`: a planned slide's tile table (read
    only for the slides the sample falls on)."""
    from g2l_cache.slides import open_slide
    from g2l_cache.tile_codec import encode_tile
    from g2l_cache.tiling import TileRecord, read_tile
    from g2l_cache.work import spec_of

    counts = np.array([r["n_tiles"] for r in records])
    if counts.sum() == 0:
        return 0.0, 0
    rng = np.random.default_rng([cfg.seed, 11])
    picks = np.sort(rng.choice(int(counts.sum()), min(n, int(counts.sum())), replace=False))
    starts = np.r_[0, np.cumsum(counts)[:-1]]
    sizes = []
    for slide_i in np.unique(np.searchsorted(starts, picks, side="right") - 1):
        rec = records[slide_i]
        mine = picks[(picks >= starts[slide_i]) & (picks < starts[slide_i] + counts[slide_i])] - starts[slide_i]
        slide = open_slide(spec_of(rec))
        tiles = tile_table(rec)
        for i in mine:
            t = tiles.slice(int(i), 1).to_pylist()[0]
            tile = TileRecord(t["tile_id"], t["x"], t["y"], t["size0"], t["tissue_fraction"])
            pixels = read_tile(slide, tile, cfg.tiling())
            sizes.append(len(encode_tile(pixels, cfg.tile_format, cfg.jpeg_quality)))
    return float(np.mean(sizes)), len(sizes)


def run_plan(cfg: PlanConfig) -> dict:
    """Detect tissue on every slide (resumable, reused by the build), estimate disk and GPU cost,
    write CACHE/plan.json and return it."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # every rank would plan every slide into the same shards
        raise G2LError("g2l cache plan runs as one process (it only detects tissue); run it without "
                       "torchrun / accelerate launch.")
    started = time.time()
    build_cfg = cfg.build_config()
    manifest = prepare_cache(build_cfg)
    layout = CacheLayout(cfg.out)
    specs = _slide_specs(build_cfg, manifest)
    writers = _Writers(layout)
    failed: dict[str, str] = {}
    try:
        with PlanProgress(cfg.progress, len(specs)) as progress:
            records = _plan_slides(build_cfg, layout, specs, writers, manifest["n_shards"], progress, failed)

        def tile_table(rec: dict):
            return table_from_bytes(writers[shard_of(rec["slide_id"], manifest["n_shards"])].get(tiles_key(rec["slide_id"])))

        tile_bytes, measured = measure_tile_bytes(build_cfg, records, cfg.sample_tiles, tile_table)
    finally:
        writers.close()
    _remember_slide_inputs(layout, specs)
    plan = estimate(cfg, records, failed, tile_bytes, measured)
    plan["seconds"] = time.time() - started
    (layout.root / PLAN_FILE).write_text(json.dumps(plan, indent=2))
    return plan


def estimate(cfg: PlanConfig, records: list[dict], failed: dict[str, str], tile_bytes: float,
             measured: int) -> dict:
    """The plan's numbers from the planned slide records and the measured bytes per tile."""
    tiles = sum(r["n_tiles"] for r in records)
    views = tiles * cfg.views
    teacher_flops, embed_dim, patch_dim = teacher_flops_and_dims(cfg.teacher, cfg.crop_size)
    student_flops = model_flops(cfg.student, cfg.student_img_size, train=True)
    if cfg.views_per_second:
        teacher_rate, rate_source = cfg.views_per_second, "--views-per-second"
    else:
        teacher_rate = gpu_views_per_second(teacher_flops, cfg.gpu, TEACHER_EFFICIENCY)
        rate_source = f"{cfg.gpu}: {gpu_peak_tflops(cfg.gpu):.0f} TFLOP/s x {TEACHER_EFFICIENCY}"
    student_rate = gpu_views_per_second(student_flops, cfg.gpu, STUDENT_EFFICIENCY)
    # one student epoch visits one view per tile (--views-per-epoch one, the default)
    root = CacheLayout(cfg.out).root
    # measured, not estimated: the plan has already written the QC pictures and each shard's index
    # (slide records, tile and view tables); the build only adds its done-bits
    qc = sum(f.stat().st_size for f in root.joinpath("qc").glob("*.png"))
    index = sum(dir_bytes(d) for d in root.joinpath("shards").glob("*/index.lmdb"))
    disk = {"tiles": tile_bytes * tiles, "targets": target_row_bytes(embed_dim, patch_dim) * views,
            "tables": TABLE_BYTES_PER_VIEW * views, "shard_index": index, "qc_images": qc}
    disk["total"] = sum(disk.values())
    return {
        "settings": cfg.build_config().settings(),
        "slides": {"ok": len(records), "failed": len(failed), "failed_slides": failed},
        "tiles": {"total": tiles, "per_slide": {r["slide_id"]: r["n_tiles"] for r in records}},
        "views": views,
        "bytes_per_tile": tile_bytes, "tiles_measured": measured,
        "disk_bytes": disk,
        "teacher": {"name": cfg.teacher, "embed_dim": embed_dim, "patch_dim": patch_dim,
                    "gflops_per_view": teacher_flops / 1e9, "views_per_second": teacher_rate,
                    "rate_from": rate_source, "gpu_hours": views / teacher_rate / 3600},
        "student": {"name": cfg.student, "train_gflops_per_view": student_flops / 1e9,
                    "views_per_epoch": tiles, "views_per_second": student_rate,
                    "gpu_hours_per_epoch": tiles / student_rate / 3600,
                    "fit": fit_reading(cfg.fit_batch_size, cfg.fit_gpus, cfg.fit_steps, tiles, views)},
        "gpu": cfg.gpu,
    }


def fit_reading(batch_size: int, gpus: int, steps: int | None, tiles: int, views: int) -> dict:
    """What a fit with this global batch on `gpus` reads of the cache: per-GPU batch, steps per epoch
    (one view per tile), and for `steps` (default one epoch) the epochs and share of the cached views."""
    steps_per_epoch = tiles // batch_size
    steps = steps or steps_per_epoch
    read = steps * batch_size
    return {"batch_size": batch_size, "gpus": gpus, "per_gpu": batch_size / gpus, "steps_per_epoch": steps_per_epoch,
            "steps": steps, "views_read": read, "epochs": read / tiles if tiles else 0.0,
            "share_of_cached_views": min(1.0, read / views) if views else 0.0}


# slides/tiles/views Parquet + the memory-mapped index, per view: 111 bytes measured on an 8-slide
# cache of 3,072 views (the per-slide part shrinks per view on bigger slides: an upper bound)
TABLE_BYTES_PER_VIEW = 112


def read_plan(root: str | Path) -> dict | None:
    """CACHE/plan.json if `g2l cache plan` wrote one."""
    path = Path(root) / PLAN_FILE
    return json.loads(path.read_text()) if path.exists() else None


def _remember_slide_inputs(layout: CacheLayout, specs) -> None:
    """Record the planned slides in the manifest so the build can be run without SLIDES."""
    from g2l_cache.finalise import merged_slide_inputs
    from g2l_cache.layout import write_manifest

    manifest = read_manifest(layout.root)
    manifest["slide_inputs"] = merged_slide_inputs(manifest, specs)
    write_manifest(layout.root, manifest)
