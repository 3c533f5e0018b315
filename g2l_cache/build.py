"""`g2l cache build`: slides -> tiles -> views -> teacher -> cache, resumable and sharded by rank.

The build runs in three phases on each rank:
  1. plan (planning.py): open each slide of this rank's shards, detect tissue, pick tiles, write a QC
     picture and commit the slide record (tile list included) to the slide's shard;
  2. embed: the shards are shared out again by their planned views (assignment.py), so every rank
     finishes together; a DataLoader (workers read, encode, decode and augment) feeds the teacher
     chunks of views in a fixed order; each chunk's tile bytes and targets are committed in one LMDB
     transaction by a background writer; committed chunks are skipped on a re-run;
  3. finalise (rank 0, after a barrier): Parquet tables and the manifest are rebuilt from the shards.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from g2l_cache.assignment import largest_first, teacher_assignment
from g2l_cache.build_config import BuildConfig, config_from_dict, existing_cache_options  # noqa: F401
from g2l_cache.cache_report import try_cache_report
from g2l_cache.canary import CANARY_SAMPLE, changed_views_message
from g2l_cache.cpus import usable_cores
from g2l_cache.disk_full import disk_full_error, full_disk_explained, is_disk_full
from g2l_cache.distributed import DistContext
from g2l_cache.environment import library_versions
from g2l_cache.errors import G2LError
from g2l_cache.finalise import finalise_cache
from g2l_cache.layout import CacheLayout, now_iso, read_manifest, write_manifest
from g2l_cache.plan import read_plan
from g2l_cache.planning import ShardWriters, plan_slides, prepare_cache, shard_of, slide_specs
from g2l_cache.progress import BuildProgress, PlanProgress
from g2l_cache.staging import SlideStager
from g2l_cache.store import BackgroundWriter, NonFiniteTargets, canary_key, encode_targets, target_row_bytes
from g2l_cache.teachers import Teacher, load_teacher
from g2l_cache.timing import BatchClock, timed_iter
from g2l_cache.work import ChunkDataset
from g2l_cache.workers import loader_worker_init, share_worker_imports


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


def run_build(cfg: BuildConfig, console=None, teacher: Teacher | None = None) -> BuildSummary:
    """Build or resume a cache as described by cfg; under torchrun the ranks share the shards out.

    `teacher`: a ready Teacher to use instead of building cfg.teacher (its fingerprint keys the targets).
    """
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
    specs = slide_specs(cfg, manifest)
    n_shards = manifest["n_shards"]
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

    failed: dict[str, str] = {}
    with full_disk_explained(layout.root):
        _plan_phase(cfg, layout, specs, n_shards, dist, failed)
    my_shards = _assigned_shards(layout, dist)
    writers = ShardWriters(layout)
    records = _records_of(specs, my_shards, writers, n_shards)
    progress = BuildProgress(enabled=cfg.progress and dist.is_main, console=console,
                             n_slides=len(records), views_per_tile=cfg.views)
    written, clock, embed_seconds = 0, BatchClock(), 0.0
    try:
        with progress:
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
        with full_disk_explained(layout.root):
            finalise_cache(layout, specs, teacher.info(), dist.world_size, teacher_pass)
        if written or failed or not layout.report.exists():  # a resume that did nothing writes nothing
            try_cache_report(layout.root)
    dist.barrier()  # the other ranks read the manifest rank 0 has just written
    manifest = read_manifest(layout.root)
    counts = manifest["counts"]
    all_failed = {s["slide_id"]: s["error"] for s in _failed_slides(layout)}
    return BuildSummary(str(layout.root), fp, counts["slides_ok"], counts["slides_failed"],
                        all_failed, counts["tiles"], counts["views"], written,
                        time.time() - started, my_shards, embed_seconds, clock.steady_rate(), clock.waited,
                        clock.wait_share())


def _plan_phase(cfg: BuildConfig, layout: CacheLayout, specs: list, n_shards: int, dist: DistContext,
                failed: dict[str, str]) -> None:
    """Phase one on this rank: plan the slides of the shards it gets by slide count; then every
    rank's writers are closed, so that phase two may give a shard to another rank."""
    counts = [0] * n_shards
    for spec in specs:
        counts[shard_of(spec.slide_id, n_shards)] += 1
    mine = set(largest_first(counts, dist.world_size)[dist.rank])
    my_specs = [sp for sp in specs if shard_of(sp.slide_id, n_shards) in mine]
    writers = ShardWriters(layout)
    try:
        with PlanProgress(cfg.progress and dist.is_main, len(my_specs)) as progress:
            plan_slides(cfg, layout, my_specs, writers, n_shards, progress, failed)
    finally:
        writers.close()
    dist.barrier()


def _assigned_shards(layout: CacheLayout, dist: DistContext) -> list[int]:
    """This rank's shards for the teacher: the main rank shares them out by their planned views
    (largest first onto the least-loaded rank) and records the assignment in the manifest."""
    if dist.is_main:
        manifest = read_manifest(layout.root)
        assignment = teacher_assignment(layout, manifest, dist.world_size)
        if manifest.get("assignment") != assignment:
            manifest["assignment"] = assignment
            write_manifest(layout.root, manifest)
    dist.barrier()
    return read_manifest(layout.root)["assignment"]["shards_of_rank"][dist.rank]


def _records_of(specs: list, shards: list[int], writers, n_shards: int) -> list[dict]:
    """The ok slide records of these shards, shard by shard (each shard's writer is then open once),
    in the order of the slides given within a shard."""
    mine = set(shards)
    records = []
    for spec in specs:
        shard = shard_of(spec.slide_id, n_shards)
        if shard in mine:
            rec = writers[shard].record(spec.slide_id)
            if rec is not None and rec["status"] == "ok":
                records.append(rec)
    return sorted(records, key=lambda r: r["shard"])


def device_label(device: torch.device) -> str:
    """What a cost ran on, for the ledger: the GPU's name, or the CPU and its cores."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({usable_cores()} cores)"


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
        share_worker_imports("torch", "g2l_cache.work")
        kwargs = {"multiprocessing_context": "forkserver", "prefetch_factor": 4,
                  "worker_init_fn": loader_worker_init()}
    return DataLoader(dataset, batch_size=None, shuffle=False, num_workers=cfg.num_workers,
                      pin_memory=pin, collate_fn=_identity, **kwargs)


def _identity(x):
    return x


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

    Records come shard by shard: each shard's writer is opened for its first chunk and closed (by
    the writer thread, after its last commit) once its last chunk is in. `clock` gets each batch's
    arrival and loader wait, and when the last commit ended."""
    chunks, total, remaining, shard_chunks = [], 0, {}, {}
    tiles = {"missing": 0, "stored": 0, "bytes": 0}  # stored tiles: at the start, then added as committed
    read_from_slide = set()  # slides whose missing views need a tile not stored yet: pixels to read
    for rec in records:
        done = writers[rec["shard"]].done(rec["slide_id"], fp, rec["n_views"])
        tloc = writers[rec["shard"]].tile_locations(rec["slide_id"])
        if tloc is not None:
            have = tloc["offset"] >= 0
            tiles["missing"] += int((~have).sum())
            tiles["stored"] += int(have.sum())
            tiles["bytes"] += int(tloc["length"][have].sum())
            if (~have[np.flatnonzero(~done) // cfg.views]).any():
                read_from_slide.add(rec["slide_id"])
        elif not done.all():
            read_from_slide.add(rec["slide_id"])
        slide_chunks = _missing_chunks(rec, done, cfg.batch_size)
        chunks += slide_chunks
        total += int((~done).sum())
        remaining[rec["slide_id"]] = len(slide_chunks)
        shard_chunks[rec["shard"]] = shard_chunks.get(rec["shard"], 0) + len(slide_chunks)
        if not slide_chunks:
            progress.slide_done(rec["slide_id"], ok=True, skipped=True)
    progress.start_views(total)
    if not chunks:
        return 0
    by_id = {r["slide_id"]: r for r in records}
    dataset = ChunkDataset(chunks, str(layout.root), cfg.tiling(), cfg.policy(), cfg.views,
                           cfg.seed, cfg.tile_format, cfg.jpeg_quality)
    _check_stored_canaries(cfg, layout, records, writers, dataset)
    writers.close()  # the read pass's writers; the writer thread gets its own, one shard at a time
    writers = ShardWriters(layout, max_open=len(shard_chunks) + 1)
    stager = _stager(cfg, records, read_from_slide)
    dataset.staged = stager.paths() if stager else {}
    unread = {sid: n for sid, n in remaining.items() if n}  # chunks still to come out of the loader
    bg = BackgroundWriter()
    written = 0

    device, started, charged_ms = device_label(teacher.mean.device), time.monotonic(), 0

    committed = {"views": 0, "tiles": 0}  # by the writer thread, in this pass

    def store(writer, slide_id, row_start, n_views, fp, indices, rows, new_tiles, *rest) -> None:
        writer.commit(slide_id, row_start, n_views, fp, indices, rows, new_tiles, *rest)
        committed["views"] += len(indices)
        committed["tiles"] += len(new_tiles)
        tiles["stored"] += len(new_tiles)
        tiles["bytes"] += sum(len(data) for _, data in new_tiles)

    def commit(batch: _InFlight) -> int:
        nonlocal charged_ms
        item = batch.item
        rec = by_id[item["slide_id"]]
        if item["slide_id"] in failed:  # an earlier batch of the slide failed while this one computed
            shard_done(rec["shard"])
            return 0
        try:
            rows = encode_targets(*batch.result())  # refuses non-finite targets before anything is stored
        except NonFiniteTargets as exc:  # this slide's views (or the teacher on them): the slide fails
            fail_slide(item, f"{exc}")
            return 0
        # This process's time since its last batch is what this batch cost the teacher. Charged in
        # whole ms off one clock so the per-batch charges add up to the pass, with no rounding drift.
        batch_ms = round((time.monotonic() - started) * 1000) - charged_ms
        charged_ms += batch_ms
        bg.put(store, writers[rec["shard"]], rec["slide_id"], rec["row_start"], rec["n_views"], fp,
               item["indices"], rows, item["new_tiles"], (device, batch_ms), item["canary"])
        progress.views_done(len(item["indices"]))
        remaining[item["slide_id"]] -= 1
        if remaining[item["slide_id"]] == 0:
            progress.slide_done(item["slide_id"], ok=True)
        shard_done(rec["shard"])
        return len(item["indices"])

    def fail_slide(item: dict, error: str) -> None:
        failed[item["slide_id"]] = error
        # The slide's tiles and targets are left behind unread: finalise keeps ok slides only.
        bg.put(writers[item["shard"]].put_record, dict(by_id[item["slide_id"]], status="failed", error=error))
        progress.slide_done(item["slide_id"], ok=False, error=error)
        shard_done(item["shard"])

    def shard_done(shard: int) -> None:
        shard_chunks[shard] -= 1
        if shard_chunks[shard] == 0:  # after the shard's last commit, in the writer thread's order
            bg.put(writers.close_shard, shard)

    def still_needed() -> int:
        # what the rest of this pass writes: target rows, and the tiles not stored yet at the mean
        # size of those stored (or of the plan's sample)
        per_tile = tiles["bytes"] / tiles["stored"] if tiles["stored"] else _planned_bytes_per_tile(layout)
        views_left = max(0, total - committed["views"])
        tiles_left = max(0, tiles["missing"] - committed["tiles"])
        return int(views_left * target_row_bytes(teacher.embed_dim, teacher.patch_dim) + tiles_left * per_tile)

    in_flight = None
    try:
        for waited, item in timed_iter(_loader(dataset, cfg, pin=teacher.mean.device.type == "cuda")):
            clock.arrived(len(item["indices"]), waited)
            slide_id = item["slide_id"]
            unread[slide_id] -= 1
            if stager is not None and unread[slide_id] == 0:  # no worker reads this slide again
                stager.release(slide_id)
            if slide_id in failed:
                shard_done(item["shard"])
                continue
            if item["error"] is not None:
                fail_slide(item, item["error"])
                continue
            # Launch this batch, then finish the previous one while the device works on it.
            launched = _InFlight(item, *teacher.embed(item["views"]))
            if in_flight is not None:
                written += commit(in_flight)
            in_flight = launched
        if in_flight is not None:
            written += commit(in_flight)
        bg.close()
    except BaseException as exc:
        try:
            bg.close()  # the commits queued before the failure stay committed
        except BaseException:
            pass
        if is_disk_full(exc):
            raise disk_full_error(layout.root, still_needed()) from exc
        raise
    finally:
        writers.close()
        clock.finished()
        if stager is not None:
            stager.close()
    return written


def _planned_bytes_per_tile(layout: CacheLayout) -> float:
    """Stored bytes per tile that `g2l cache plan` measured, when it was run (else 0)."""
    plan = read_plan(layout.root) or {}
    return float(plan.get("bytes_per_tile") or 0)


def _stager(cfg: BuildConfig, records: list[dict], read_from_slide: set[str]) -> SlideStager | None:
    """With --stage-dir: the copier to local disk of this pass's slides that are read (those whose
    missing views need tiles not stored yet; adding a teacher reads none), in the order they are read."""
    if not cfg.stage_dir:
        return None
    return SlideStager(cfg.stage_dir, [(r["slide_id"], r["path"]) for r in records if r["slide_id"] in read_from_slide],
                       cfg.stage_ahead)


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


