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

from g2l_cache.build_config import BuildConfig
from g2l_cache.costs import (STUDENT_EFFICIENCY, TEACHER_EFFICIENCY, GPU_PEAK_TFLOPS, gpu_peak_tflops,
                             costs_known, gpu_views_per_second, model_costs)
from g2l_cache.planning import ShardWriters, plan_slides, prepare_cache, shard_of, slide_specs
from g2l_cache.errors import G2LError
from g2l_cache.layout import CacheLayout, dir_bytes, read_manifest
from g2l_cache.options import option
from g2l_cache.progress import PlanProgress
from g2l_cache.store import table_from_bytes, target_row_bytes, tiles_key
from g2l_cache.units import hours, size

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
    from g2l_cache.slides import SlideSpec, open_slide
    from g2l_cache.tile_codec import encode_tile
    from g2l_cache.tiling import TileRecord, read_tiles

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
        slide = open_slide(SlideSpec.of_record(rec))
        rows = tile_table(rec).take(mine.tolist()).to_pylist()
        tiles = [TileRecord(t["tile_id"], t["x"], t["y"], t["size0"], t["tissue_fraction"]) for t in rows]
        sizes += [len(encode_tile(pixels, cfg.tile_format, cfg.jpeg_quality))
                  for pixels in read_tiles(slide, tiles, cfg.tiling())]
        slide.reader.close()
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
    specs = slide_specs(build_cfg, manifest)
    costs = _CostsInBackground(cfg)  # FLOPs need torch and timm: counted apart while slides are planned
    writers = ShardWriters(layout)
    failed: dict[str, str] = {}
    try:
        with PlanProgress(cfg.progress, len(specs)) as progress:
            records = plan_slides(build_cfg, layout, specs, writers, manifest["n_shards"], progress, failed)

        def tile_table(rec: dict):
            return table_from_bytes(writers[shard_of(rec["slide_id"], manifest["n_shards"])].get(tiles_key(rec["slide_id"])))

        tile_bytes, measured = measure_tile_bytes(build_cfg, records, cfg.sample_tiles, tile_table)
    finally:
        writers.close()
    _remember_slide_inputs(layout, specs)
    plan = estimate(cfg, records, failed, tile_bytes, measured, costs.result())
    plan["seconds"] = time.time() - started
    (layout.root / PLAN_FILE).write_text(json.dumps(plan, indent=2))
    from g2l_cache.cache_report import try_cache_report  # it reads plan.json: imported here, not at the top

    try_cache_report(layout.root)
    return plan


class _CostsInBackground:
    """`costs.model_costs` for the plan's teacher and student in a process of its own (spawned, so this
    one never imports torch), or here when the plan runs without workers."""

    def __init__(self, cfg: PlanConfig):
        self.args = (cfg.teacher, cfg.crop_size, cfg.student, cfg.student_img_size)
        self.pool = self.future = None
        if cfg.num_workers > 0 and not costs_known(*self.args):
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            self.pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
            self.future = self.pool.submit(model_costs, *self.args)

    def result(self) -> tuple[float, int, int, float]:
        if self.future is None:
            return model_costs(*self.args)
        try:
            return self.future.result()
        finally:
            self.pool.shutdown()


def estimate(cfg: PlanConfig, records: list[dict], failed: dict[str, str], tile_bytes: float,
             measured: int, costs: tuple[float, int, int, float]) -> dict:
    """The plan's numbers from the planned slide records, the measured bytes per tile and the models'
    costs (`costs.model_costs`)."""
    tiles = sum(r["n_tiles"] for r in records)
    views = tiles * cfg.views
    teacher_flops, embed_dim, patch_dim, student_flops = costs
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
    qc = sum(f.stat().st_size for f in root.joinpath("qc").glob("*") if f.suffix in (".jpg", ".png"))  # .png: older caches
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


def plan_rows(plan: dict, built: dict | None = None) -> list[tuple[str, str, str | None]]:
    """(what, planned, built) rows of a plan's estimate, with what was built when `built` (a
    `cache_info` dict) is given: for `cache info`, `cache plan` and the cache's report page."""
    t, s, d = plan["teacher"], plan["student"], plan["disk_bytes"]
    teacher = next((v for v in (built or {}).get("teachers", {}).values() if v["name"] == t["name"]), None)
    rows = [
        ("slides ok / failed", f"{plan['slides']['ok']} / {plan['slides']['failed']}",
         built and f"{built['slides_ok']} / {built['slides_failed']}"),
        ("tiles", str(plan["tiles"]["total"]), built and str(built["tiles"])),
        ("views", str(plan["views"]), built and str(built["views"])),
        (f"bytes per tile ({plan['tiles_measured']} measured)", f"{plan['bytes_per_tile']:.0f}",
         built and built.get("bytes_per_tile") and f"{built['bytes_per_tile']:.0f}"),
        ("disk: tiles, targets, tables, index, QC", size(d["total"]), built and size(built["bytes_on_disk"])),
        (f"teacher {t['name']}: GFLOP per view", f"{t['gflops_per_view']:.1f}", None),
        (f"build on {plan['gpu']} ({t['rate_from']})",
         f"{hours(t['gpu_hours'] * 3600, 'GPU-')} at {t['views_per_second']:.0f} views/s",
         teacher and teacher["devices"] and f"{hours(teacher['teacher_seconds'])} on {', '.join(teacher['devices'])}"),
        (f"student {s['name']}: GFLOP per training view", f"{s['train_gflops_per_view']:.1f}", None),
        ("student epoch (one view per tile)", hours(s["gpu_hours_per_epoch"] * 3600, "GPU-"), None),
    ]
    fit = s.get("fit")
    if fit:
        rows += [
            (f"fit batch {fit['batch_size']} on {fit['gpus']} GPUs", f"{fit['per_gpu']:g} per GPU, "
             f"{fit['steps_per_epoch']} steps per epoch", None),
            (f"{fit['steps']} steps read", f"{fit['epochs']:.2f} epochs, {fit['share_of_cached_views']:.0%} of the views",
             None),
        ]
    return rows


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
