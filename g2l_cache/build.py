"""`g2l cache build`: slides -> tiles -> views -> teacher -> cache, resumable and sharded by rank.

The build runs in three phases on each rank:
  1. plan: open each slide of this rank's shards, detect tissue, pick tiles, write a QC picture and
     commit the slide record (tile list included) to the slide's shard;
  2. embed: a DataLoader (workers read, encode, decode and augment) feeds the teacher chunks of views
     in a fixed order; each chunk's tile bytes and targets are committed in one LMDB transaction
     by a background writer; committed chunks are skipped on a re-run;
  3. finalise (rank 0, after a barrier): Parquet tables and the manifest are rebuilt from the shards.
"""

from __future__ import annotations

import hashlib
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields
from typing import ClassVar
from pathlib import Path

import numpy as np
import torch

from g2l_cache.canary import CANARY_SAMPLE, changed_views_message
from g2l_cache.distributed import DistContext
from g2l_cache.environment import library_versions
from g2l_cache.errors import G2LError
from g2l_cache.layout import CACHE_FORMAT, SCHEMA_VERSION, CacheLayout, now_iso, read_manifest, write_manifest
from g2l_cache.slides import SlideSpec, discover_slides, file_fingerprint, same_slide_file, worker_count_hint
from g2l_cache.store import BackgroundWriter, ShardWriter, canary_key, encode_targets
from g2l_cache.options import option
from g2l_cache.teachers import DEFAULT_PRECISION, PRECISIONS, PRESET_NAMES, Teacher, TeacherSpec, load_teacher
from g2l_cache.tile_codec import TILE_FORMATS
from g2l_cache.tiling import TilingConfig
from g2l_cache.timing import BatchClock, timed_iter
from g2l_cache.views import ViewPolicy
from g2l_cache.work import ChunkDataset, PlanDataset
from g2l_cache.workers import loader_worker_init

DEFAULT_SHARDS = 64  # fixed at creation; ranks take shards round-robin, so up to 64 ranks all work


@dataclass
class BuildConfig:
    """Every option of `g2l cache build`: its default, help and group are written here only."""

    # Options that exclude each other: one given on the command line clears the others from a config file.
    EXCLUSIVE: ClassVar[tuple[tuple[str, ...], ...]] = (("teacher_weights", "random_init"),)

    out: str = option(help="Cache folder (created, resumed, or extended).", group="input and output", short="-o",
                      help_in={"plan": "Cache folder to plan into: tissue detection and tile choice are stored "
                               "there with plan.json, and a later `g2l cache build` with the same --out starts "
                               "from them."})
    teacher: str = option(help=f"Teacher preset ({', '.join(PRESET_NAMES)}) or any timm model name.",
                          group="teacher", help_in={"plan": f"Teacher preset ({', '.join(PRESET_NAMES)}) or any "
                                                    "timm model name, whose FLOPs and target size are costed "
                                                    "(no weights are loaded)."})
    slides: list[str] = option(default_factory=list, kind="arguments", group="input and output",
                               help="Slide files, folders of slides, or a CSV with a 'path' column (optional "
                               "'slide_id', 'mpp'). May be omitted when resuming or adding a teacher.",
                               help_in={"plan": "Slide files, folders of slides, or a CSV with a 'path' column "
                                        "(optional 'slide_id', 'mpp'). May be omitted to re-plan the slides "
                                        "the cache knows."})
    recursive: bool = option(False, group="input and output", help="Search slide folders recursively.")
    teacher_weights: str | None = option(None, group="teacher", commands=("build",),
                                         help="Local weights (.safetensors) instead of the hub.")
    random_init: bool = option(False, group="teacher", commands=("build",),
                               help="Random teacher weights (tests, demo).")
    precision: str = option(DEFAULT_PRECISION, group="teacher", commands=("build",),
                            help=f"Compute precision of the teacher: {', '.join(PRECISIONS)} (autocast; part of "
                            "the teacher's fingerprint, so targets of two precisions never mix). auto: fp16 on a "
                            "GPU (as fast as bf16 there, 8x closer to fp32), fp32 on a CPU (where fp16 is emulated).")
    mpp: float = option(0.5, group="tiling", help="Microns per pixel the tiles are read at.")
    mpp_override: float | None = option(None, group="tiling",
                                        help="Level-0 mpp to use for every slide, whatever its metadata "
                                        "says (a CSV 'mpp' column still wins for its slide).")
    tile_size: int = option(256, group="tiling", help="Tile side in px at --mpp.")
    max_tiles_per_slide: int | None = option(None, group="tiling",
                                             help="Keep a seeded random subset of this many tiles per slide.")
    tissue_threshold: float = option(0.5, group="tiling", help="Minimum tissue fraction of a kept tile.")
    tissue_method: str = option("otsu", group="tiling", help="Tissue mask: otsu or morphological.")
    crop_size: int = option(224, group="views", help="View crop side in px = the teacher's input size.")
    views: int = option(4, group="views", help="Augmented views (K) per tile.")
    seed: int = option(0, group="views", help="Seed of tile subsets, views and random init.")
    tile_format: str = option("jpeg", group="encoding", help="Stored tile encoding: jpeg, or png (lossless).")
    jpeg_quality: int = option(95, group="encoding", help="JPEG quality of stored tiles.")
    shards: int = option(DEFAULT_SHARDS, group="encoding",
                         help="Shards of a new cache: processes take them round-robin, so up to this "
                         "many share a build.")
    batch_size: int = option(32, group="runtime", commands=("build",), help="Views per teacher batch.")
    num_workers: int = option(default_factory=worker_count_hint, group="runtime",
                              default_text="cores per process - 1, at most 8",
                              help="DataLoader workers reading, encoding and augmenting tiles.",
                              help_in={"plan": "Worker processes detecting tissue, one slide each."})
    strict: bool = option(False, group="runtime", commands=("build",), help="Exit non-zero if any slide failed.")
    accept_changed_views: bool = option(False, group="runtime", commands=("build",),
                                        help="Go on when stored tiles now decode into other views than the "
                                        "teacher saw (a Pillow / libjpeg / numpy upgrade); refused by default.")
    cpu: bool = option(False, group="runtime", commands=("build",), help="Run on CPU even if a GPU is present.")
    progress: bool = option(True, group="runtime", help="Progress bars (--no-progress for logs and CI).")

    def __post_init__(self) -> None:
        if self.views < 1:
            raise G2LError(f"--views must be at least 1, got {self.views}.")
        if self.batch_size < 1:
            raise G2LError(f"--batch-size must be at least 1, got {self.batch_size}.")
        if self.num_workers < 0:
            raise G2LError("--num-workers cannot be negative.")
        if self.tile_format not in TILE_FORMATS:
            raise G2LError(f"--tile-format must be one of {', '.join(TILE_FORMATS)}.")
        if not 1 <= self.jpeg_quality <= 100:
            raise G2LError("--jpeg-quality must be in 1..100.")
        if self.shards < 1:
            raise G2LError("--shards must be at least 1.")

    def tiling(self) -> TilingConfig:
        return TilingConfig(mpp=self.mpp, tile_size=self.tile_size,
                            tissue_threshold=self.tissue_threshold,
                            tissue_method=self.tissue_method,
                            max_tiles_per_slide=self.max_tiles_per_slide)

    def policy(self) -> ViewPolicy:
        return ViewPolicy(tile_size=self.tile_size, crop_size=self.crop_size)

    def settings(self) -> dict:
        """What fixes the cache's keys and pixels: a resume must match it exactly."""
        return {"tiling": self.tiling().to_dict(),
                "views": {"per_tile": self.views, "policy": self.policy().to_dict()},
                "seed": self.seed,
                "tile_encoding": {"format": self.tile_format,
                                  "quality": self.jpeg_quality if self.tile_format == "jpeg" else None}}

    def teacher_spec(self) -> TeacherSpec:
        return TeacherSpec(self.teacher, self.teacher_weights, self.random_init, self.seed, self.precision)


@dataclass
class BuildSummary:
    """What one build did; `failed` maps slide id to its error."""

    cache: str
    teacher_fingerprint: str
    slides_ok: int
    slides_failed: int
    failed: dict[str, str]
    tiles: int
    views: int
    targets_written: int
    seconds: float
    shards: list[int]
    teacher_seconds: float = 0.0  # this rank's teacher pass (what `cache info` sums over processes)
    steady_views_per_second: float = 0.0  # this rank, after warm-up (BatchClock.steady_rate)
    loader_wait_seconds: float = 0.0  # this rank: time the teacher loop waited for its loader
    loader_wait_share: float = 0.0  # of the teacher loop after its first batch (start-up left out)

    @property
    def views_per_second(self) -> float:
        """Targets written per second of the teacher pass (slide planning and start-up left out)."""
        return self.targets_written / self.teacher_seconds if self.teacher_seconds > 0 else 0.0

    def succeeded(self, strict: bool) -> bool:
        """At least one slide is cached, and with `strict` none failed (the CLI's exit status)."""
        return self.slides_ok > 0 and not (strict and self.slides_failed)


def shard_of(slide_id: str, n_shards: int) -> int:
    """The shard a slide lives in: a stable hash, so it never depends on rank count or order."""
    digest = hashlib.blake2b(slide_id.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % n_shards


def prepare_cache(cfg: BuildConfig) -> dict:
    """Create a new cache or check that an existing one has the same settings; return its manifest."""
    layout = CacheLayout(cfg.out)
    if layout.root.exists() and not layout.root.is_dir():
        raise G2LError(f"--out {layout.root} is a file; pass a folder for the cache.")
    if layout.manifest.exists():
        manifest = read_manifest(layout.root)
        if manifest["settings"] != cfg.settings():
            diffs = _diff(manifest["settings"], cfg.settings())
            raise G2LError(f"{layout.root} was built with other tiling/view settings ({'; '.join(diffs)}); "
                           "use the same settings to resume or add a teacher, or a new --out folder.")
        return manifest
    if layout.root.is_dir() and any(layout.root.iterdir()):
        raise G2LError(f"--out {layout.root} exists and is not a g2l cache; choose a new or empty folder.")
    layout.root.mkdir(parents=True, exist_ok=True)
    manifest = {"format": CACHE_FORMAT, "schema_version": SCHEMA_VERSION, "created": now_iso(),
                "status": "building", "settings": cfg.settings(), "view_versions": library_versions(),
                "n_shards": cfg.shards, "teachers": {}, "slide_inputs": [],
                "counts": {}, "shards": []}
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


# What a teacher's targets depend on besides its name (manifest keys), for naming what differs.
TEACHER_SETTINGS = ("precision", "weights_digest", "arch", "model_args", "mean", "std", "input_size", "embedding")


def refuse_mixed_targets(root: Path, manifest: dict, info: dict) -> None:
    """Refuse to start a teacher's targets beside another fingerprint's unfinished targets of the same
    teacher: a resume on other hardware, with --cpu or another --precision would otherwise leave the
    cache with two half sets. Names both and what differs."""
    for other_fp, other in manifest.get("teachers", {}).items():
        if other_fp == info["fingerprint"] or other.get("complete") or other["spec"]["name"] != info["spec"]["name"]:
            continue
        differ = [f"{k}: {_setting(other, k)} there, {_setting(info, k)} here" for k in TEACHER_SETTINGS
                  if _setting(other, k) != _setting(info, k)]
        views = manifest.get("counts", {}).get("views", "?")
        raise G2LError(
            f"{root} holds unfinished targets of teacher {info['spec']['name']} with fingerprint {other_fp} "
            f"({other.get('n_targets', 0)} of {views} views); this build computes fingerprint {info['fingerprint']} "
            f"({'; '.join(differ) or 'other settings'}). Targets of two fingerprints never mix: finish {other_fp} "
            f"with its settings (e.g. --precision {other.get('precision') or other['spec'].get('precision', 'bf16')}), "
            "or build into a new --out folder.")


def _setting(info: dict, key: str):
    if key == "precision" and "precision" not in info:
        return "not recorded (a cache from before --precision: bf16 on GPUs, fp32 on CPUs)"
    return info.get(key)


def _slide_specs(cfg: BuildConfig, manifest: dict) -> list[SlideSpec]:
    if cfg.slides:
        return discover_slides(cfg.slides, cfg.mpp_override, cfg.recursive)
    if manifest["slide_inputs"]:
        # No SLIDES given: work on the slides this cache already knows (e.g. adding a teacher).
        return [SlideSpec(**s) for s in manifest["slide_inputs"]]
    raise G2LError("no SLIDES given and the cache has none yet; pass slide files, folders or a CSV.")


class _Writers(dict):
    """This rank's shard writers, opened when first needed (a shard no slide maps to stays absent)."""

    def __init__(self, layout: CacheLayout):
        super().__init__()
        self.layout = layout

    def __missing__(self, shard: int) -> ShardWriter:
        self[shard] = ShardWriter(self.layout.shard(shard))
        return self[shard]

    def close(self) -> None:
        for writer in self.values():
            writer.close()
        self.clear()


def run_build(cfg: BuildConfig, console=None, teacher: Teacher | None = None) -> BuildSummary:
    """Build or resume a cache as described by cfg; under torchrun each rank builds its shards.

    `teacher`: a ready Teacher to use instead of building cfg.teacher (its fingerprint keys the targets).
    """
    from g2l_cache.finalise import finalise_cache
    from g2l_cache.progress import BuildProgress

    started = time.time()
    dist = DistContext.from_env(cpu=cfg.cpu)
    layout = CacheLayout(cfg.out)
    error = None
    if dist.is_main:
        try:
            prepare_cache(cfg)
        except G2LError as exc:
            error = exc
    dist.barrier()
    if error is not None:
        raise error
    manifest = read_manifest(layout.root)
    specs = _slide_specs(cfg, manifest)
    n_shards = manifest["n_shards"]
    my_shards = [s for s in range(n_shards) if s % dist.world_size == dist.rank]
    if teacher is None:
        teacher = load_teacher(cfg.teacher_spec(), img_size=cfg.crop_size, device=dist.device)
    fp = teacher.fingerprint()
    refuse_mixed_targets(layout.root, manifest, teacher.info())
    if dist.is_main and fp not in manifest["teachers"]:
        # Registered before any target is written: a build killed before it finalises still tells
        # the next one which teacher its targets belong to.
        manifest["teachers"][fp] = {**teacher.info(), "n_targets": 0, "complete": False}
        write_manifest(layout.root, manifest)
    dist.barrier()

    writers = _Writers(layout)
    mine = set(my_shards)
    my_specs = [sp for sp in specs if shard_of(sp.slide_id, n_shards) in mine]
    progress = BuildProgress(enabled=cfg.progress and dist.is_main, console=console,
                             n_slides=len(my_specs), views_per_tile=cfg.views)
    failed: dict[str, str] = {}
    written, clock = 0, BatchClock()
    try:
        with progress:
            records = _plan_slides(cfg, layout, my_specs, writers, n_shards, progress, failed)
            embed_started = time.monotonic()
            written = _embed_views(cfg, layout, records, writers, teacher, fp, progress, failed, clock)
            embed_seconds = time.monotonic() - embed_started
    finally:
        writers.close()
    # the cost ledger: teacher time summed over processes (device-seconds), paid once per view
    spent_ms = dist.all_sum(round(embed_seconds * 1000))
    written = dist.all_sum(written)
    teacher_pass = {"finished": now_iso(), "device_seconds": spent_ms / 1000,
                    "wall_seconds": embed_seconds, "processes": dist.world_size,
                    "device": device_label(dist.device), "views": written,
                    "versions": library_versions()} if written else None
    dist.barrier()
    if dist.is_main:
        finalise_cache(layout, specs, teacher.info(), dist.world_size, teacher_pass)
    dist.barrier()  # the other ranks read the manifest rank 0 has just written
    manifest = read_manifest(layout.root)
    counts = manifest["counts"]
    all_failed = {s["slide_id"]: s["error"] for s in _failed_slides(layout)}
    return BuildSummary(str(layout.root), fp, counts["slides_ok"], counts["slides_failed"],
                        all_failed, counts["tiles"], counts["views"], written,
                        time.time() - started, my_shards, embed_seconds, clock.steady_rate(), clock.waited,
                        clock.wait_share())


def device_label(device: torch.device) -> str:
    """What a cost ran on, for the ledger: the GPU's name, or the CPU and its cores."""
    import os

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({os.cpu_count()} cores)"


def _failed_slides(layout: CacheLayout) -> list[dict]:
    import pyarrow.parquet as pq

    if not layout.slides.exists():
        return []
    rows = pq.read_table(layout.slides, columns=["slide_id", "status", "error"]).to_pylist()
    return [r for r in rows if r["status"] == "failed"]


def _loader(dataset, cfg: BuildConfig, pin: bool):
    from torch.utils.data import DataLoader

    # forkserver: workers never inherit the writer's open LMDB environment (unsafe after fork).
    kwargs = {}
    if cfg.num_workers > 0:
        kwargs = {"multiprocessing_context": "forkserver", "prefetch_factor": 4,
                  "worker_init_fn": loader_worker_init()}
    return DataLoader(dataset, batch_size=None, shuffle=False, num_workers=cfg.num_workers,
                      pin_memory=pin, collate_fn=_identity, **kwargs)


def _identity(x):
    return x


def _plan_slides(cfg, layout, specs, writers, n_shards, progress, failed) -> list[dict]:
    """Phase 1: plan every slide not planned yet; return the ok slide records in a fixed order."""
    records: dict[str, dict] = {}
    todo, to_identify = [], []
    for spec in specs:
        writer = writers[shard_of(spec.slide_id, n_shards)]
        rec = writer.record(spec.slide_id)
        if rec is None or rec["status"] != "ok" or rec.get("mpp_override") != spec.mpp_override:
            todo.append(spec)
        elif rec["path"] == spec.path and (_unchanged(rec, spec.path) or not os.path.exists(spec.path)):
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
            todo.append(spec)
            continue
        rec = dict(rec, path=spec.path, file=file_fingerprint(spec.path))
        writer.put_record(rec)
        records[spec.slide_id] = rec
        progress.slide_planned(spec.slide_id)
    if todo:
        dataset = PlanDataset(todo, cfg.tiling(), cfg.seed, str(layout.root), cfg.policy(), cfg.views)
        for rec in _loader(dataset, cfg, pin=False):
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


def _unchanged(record: dict, path: str) -> bool:
    """The file at its recorded path still has its recorded size and mtime."""
    try:
        st = os.stat(path)
    except OSError:
        return False
    recorded = record.get("file") or {}
    return st.st_size == recorded.get("size") and st.st_mtime == recorded.get("mtime")


def _missing_chunks(rec: dict, done: np.ndarray, batch_size: int) -> list[tuple]:
    """Chunks of at most batch_size views of one slide that have no target yet."""
    missing = np.flatnonzero(~done)
    chunks = []
    for i in range(0, len(missing), batch_size):
        part = missing[i:i + batch_size]
        if part[-1] - part[0] + 1 == len(part):
            chunks.append((rec["shard"], rec["slide_id"], int(part[0]), int(part[-1]) + 1, None))
        else:
            chunks.append((rec["shard"], rec["slide_id"], None, None, part))
    return chunks


def _embed_views(cfg, layout, records, writers, teacher, fp, progress, failed, clock: BatchClock) -> int:
    """Phase 2: run the teacher on every view that has no target yet; return targets written.

    `clock` gets each batch's arrival and loader wait, and when the last commit ended."""
    chunks, total, remaining = [], 0, {}
    for rec in records:
        done = writers[rec["shard"]].done(rec["slide_id"], fp, rec["n_views"])
        slide_chunks = _missing_chunks(rec, done, cfg.batch_size)
        chunks += slide_chunks
        total += int((~done).sum())
        remaining[rec["slide_id"]] = len(slide_chunks)
        if not slide_chunks:
            progress.slide_done(rec["slide_id"], ok=True, skipped=True)
    progress.start_views(total)
    if not chunks:
        return 0
    by_id = {r["slide_id"]: r for r in records}
    dataset = ChunkDataset(chunks, str(layout.root), cfg.tiling(), cfg.policy(), cfg.views,
                           cfg.seed, cfg.tile_format, cfg.jpeg_quality)
    _check_stored_canaries(cfg, layout, records, writers, dataset)
    bg = BackgroundWriter()
    written = 0

    device, started, charged_ms = device_label(teacher.mean.device), time.monotonic(), 0

    def commit(batch: _InFlight) -> int:
        nonlocal charged_ms
        item = batch.item
        rec = by_id[item["slide_id"]]
        rows = encode_targets(*batch.result())  # refuses non-finite targets before anything is stored
        # This process's time since its last batch is what this batch cost the teacher. Charged in
        # whole ms off one clock so the per-batch charges add up to the pass, with no rounding drift.
        batch_ms = round((time.monotonic() - started) * 1000) - charged_ms
        charged_ms += batch_ms
        bg.put(writers[rec["shard"]].commit, rec["slide_id"], rec["row_start"], rec["n_views"], fp,
               item["indices"], rows, item["new_tiles"], (device, batch_ms), item["canary"])
        progress.views_done(len(item["indices"]))
        remaining[item["slide_id"]] -= 1
        if remaining[item["slide_id"]] == 0:
            progress.slide_done(item["slide_id"], ok=True)
        return len(item["indices"])

    in_flight = None
    try:
        for waited, item in timed_iter(_loader(dataset, cfg, pin=teacher.mean.device.type == "cuda")):
            clock.arrived(len(item["indices"]), waited)
            slide_id = item["slide_id"]
            if slide_id in failed:
                continue
            if item["error"] is not None:
                failed[slide_id] = item["error"]
                # The slide's tiles and targets are left behind unread: finalise keeps ok slides only.
                bg.put(writers[item["shard"]].put_record,
                       dict(by_id[slide_id], status="failed", error=item["error"]))
                progress.slide_done(slide_id, ok=False, error=item["error"])
                continue
            # Launch this batch, then finish the previous one while the device works on it.
            launched = _InFlight(item, *teacher.embed(item["views"]))
            if in_flight is not None:
                written += commit(in_flight)
            in_flight = launched
        if in_flight is not None:
            written += commit(in_flight)
    finally:
        bg.close()
        clock.finished()
    return written


def _check_stored_canaries(cfg: BuildConfig, layout: CacheLayout, records: list[dict], writers,
                           dataset: ChunkDataset, n: int = CANARY_SAMPLE) -> None:
    """Before any target is computed: the canary views of up to `n` of these slides, made again from
    their stored tiles, must equal what the teacher saw when they were cached (or --accept-changed-views)."""
    stored = [(rec, writers[rec["shard"]].get(canary_key(rec["slide_id"]))) for rec in records]
    stored = [(rec, digest.decode()) for rec, digest in stored if digest is not None]
    if len(stored) > n:
        picks = np.random.default_rng([cfg.seed, 17]).choice(len(stored), n, replace=False)
        stored = [stored[i] for i in sorted(picks)]
    changed = []
    for rec, digest in stored:
        item = dataset.item((rec["shard"], rec["slide_id"], 0, 1, None))
        if item["error"] is None and not item["new_tiles"] and item["canary"] != digest:
            changed.append(rec["slide_id"])
    if changed and not cfg.accept_changed_views:
        raise G2LError(changed_views_message(layout.root, changed, len(stored),
                                             read_manifest(layout.root).get("view_versions")))


class _InFlight:
    """A batch whose targets may still be computing on the GPU, copied back asynchronously."""

    def __init__(self, item: dict, emb: torch.Tensor, patch: torch.Tensor):
        self.item = item
        self.event = None
        if emb.device.type == "cuda":
            emb, patch = emb.to("cpu", non_blocking=True), patch.to("cpu", non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
        self.emb, self.patch = emb, patch

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        if self.event is not None:
            self.event.synchronize()
        return self.emb.numpy(), self.patch.numpy()


def existing_cache_options(out: str | Path) -> dict:
    """The tiling/view options an existing cache was built with ({} if `out` is no cache yet).

    Options a user leaves out when resuming or adding a teacher default to these, so the
    settings match without repeating them.
    """
    from g2l_cache.layout import CacheLayout

    if not CacheLayout(out).manifest.exists():
        return {}
    s = read_manifest(out)["settings"]
    t, v, e = s["tiling"], s["views"], s["tile_encoding"]
    values = {"mpp": t["mpp"], "tile_size": t["tile_size"], "tissue_threshold": t["tissue_threshold"],
              "tissue_method": t["tissue_method"], "max_tiles_per_slide": t["max_tiles_per_slide"],
              "crop_size": v["policy"]["crop_size"], "views": v["per_tile"], "seed": s["seed"],
              "tile_format": e["format"]}
    if e.get("quality") is not None:
        values["jpeg_quality"] = e["quality"]
    return values


def config_from_dict(values: dict, cls: type = BuildConfig) -> BuildConfig:
    """A BuildConfig (or `cls`, e.g. PlanConfig) from a plain mapping (TOML file + CLI options);
    unknown keys are an error.

    Options left out take the existing cache's tiling/view settings when `out` is a cache, so
    resuming or adding a teacher needs neither the slides nor those options again."""
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        command = "plan" if cls is not BuildConfig else "build"
        raise G2LError(f"unknown {command} option(s) {', '.join(unknown)}; see `g2l cache {command} --help`.")
    for required in ("out", "teacher"):
        if not values.get(required):
            raise G2LError(f"--{required} is required (on the command line or in --config).")
    return cls(**{**existing_cache_options(values["out"]), **values})
