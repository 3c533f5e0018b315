"""Scale: a synthetic cache of N views through the real store and finalise code, and what it costs.

No model runs for the cache: tiles are real H&E JPEG bytes (256 px, q95, from tiatoolbox's sample
image) reused in turn, targets are random fp16 of H-optimus-0's dims (1536 + 1536), and a small
stand-in teacher with 1536-d outputs keys them. Measured: finalise, a no-op resume, `cache info`,
checksum verify (MB/s beside the disk's own read rate), `verify --recompute 64`, bytes on disk per
view against raw, and `student fit` start-up and memory (RSS and PSS of the main process and each
worker). Fit memory per view is the growth between a cache of N/8 views and one of N views, so
the fixed cost of Python, torch and the model is not counted per view. Everything is extrapolated
linearly to 8 M views, the real workload (1,000 slides x 2,000 tiles x K = 4).

    python scale.py --views 1000000     # ~13 GB of scratch under --work, deleted afterwards
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from _common import REPO, RESULTS

REAL_VIEWS = 8_000_000
EMBED_DIM = PATCH_DIM = 1536
TILES_PER_SLIDE = 2000
K = 4


def stand_in_teacher():
    """A 1-block ViT with 1536-d CLS and patch tokens: real target dims, no real model cost."""
    import timm
    import torch

    from g2l_cache.teachers import Teacher, TeacherPreset, TeacherSpec

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = timm.models.vision_transformer.VisionTransformer(
            img_size=224, patch_size=32, embed_dim=EMBED_DIM, depth=1, num_heads=8, num_classes=0)
    preset = TeacherPreset("stand-in-1536", "vit-1536-depth1", None)
    return Teacher(model, preset, TeacherSpec("stand-in-1536", random_init=True), 224)


def real_tiles(n: int = 32) -> list[bytes]:
    import tiatoolbox
    from PIL import Image

    from g2l_cache.tile_codec import encode_tile

    img = np.asarray(Image.open(Path(tiatoolbox.__file__).parent / "data" / "target_image.png").convert("RGB"))
    rng = np.random.default_rng(0)
    return [encode_tile(img[y:y + 256, x:x + 256]) for y, x in rng.integers(0, 744, size=(n, 2))]


def write_synthetic_cache(out: Path, n_views: int, teacher) -> dict:
    """Plan synthetic slides and commit their tiles and targets through ShardWriter, then finalise."""
    from g2l_cache.build import BuildConfig, prepare_cache, shard_of
    from g2l_cache.finalise import finalise_cache
    from g2l_cache.layout import CacheLayout
    from g2l_cache.slides import SlideSpec
    from g2l_cache.store import ShardWriter, encode_targets, table_to_bytes
    from g2l_cache.tables import slide_tables
    from g2l_cache.tiling import TileRecord, make_tile_id

    cfg = BuildConfig(out=str(out), teacher="stand-in-1536", random_init=True, views=K,
                      num_workers=0, progress=False)
    prepare_cache(cfg)
    layout = CacheLayout(out)
    tiles = real_tiles()
    rng = np.random.default_rng(0)
    n_tiles_total = n_views // K
    n_slides = max(1, n_tiles_total // TILES_PER_SLIDE)
    fp = teacher.fingerprint()
    writers: dict[int, ShardWriter] = {}
    specs, raw_tile_bytes, t0, plan_s = [], 0, time.perf_counter(), 0.0
    for s in range(n_slides):
        # TCGA-length ids (60 characters): string columns cost what they cost on real slides.
        digest = hashlib.md5(str(s).encode()).hexdigest().upper()
        sid = f"TCGA-S{s:04d}-01Z-00-DX1.{digest[:8]}-{digest[8:12]}-{digest[12:16]}-{digest[16:20]}-{digest[20:]}"
        n_tiles = TILES_PER_SLIDE if s < n_slides - 1 else n_tiles_total - TILES_PER_SLIDE * (n_slides - 1)
        shard = shard_of(sid, cfg.shards)
        writer = writers.setdefault(shard, ShardWriter(layout.shard(shard)))
        records = [TileRecord(make_tile_id(sid, 256 * (i % 100), 256 * (i // 100)), 256 * (i % 100),
                              256 * (i // 100), 256, 1.0) for i in range(n_tiles)]
        p0 = time.perf_counter()
        tile_table, view_table = slide_tables(sid, records, 0.5, 256, K, cfg.seed, cfg.policy())
        plan_s += time.perf_counter() - p0
        path = f"/synthetic/{sid}.svs"
        record = {"slide_id": sid, "path": path, "mpp_override": None,
                  "file": {"size": 0, "mtime": 0.0}, "read_mpp": 0.5, "tile_px": 256,
                  "status": "ok", "error": None, "mpp": 0.25, "mpp_source": "slide", "width": 25600,
                  "height": 256 * (n_tiles // 100 + 1), "reader": "synthetic", "n_candidates": n_tiles,
                  "n_tiles": n_tiles, "n_views": n_tiles * K, "shard": shard}
        record = writer.plan_slide(record, table_to_bytes(tile_table), table_to_bytes(view_table))
        specs.append(SlideSpec(sid, path))
        # Commits of 512 views (128 tiles): a build's teacher batches, coarser to keep this quick.
        for start in range(0, n_tiles * K, 512):
            idx = np.arange(start, min(start + 512, n_tiles * K))
            emb = rng.standard_normal((len(idx), EMBED_DIM), dtype=np.float32)
            patch = rng.standard_normal((len(idx), PATCH_DIM), dtype=np.float32)
            new = [(int(t), tiles[(s * 7 + int(t)) % len(tiles)]) for t in np.unique(idx // K)]
            raw_tile_bytes += sum(len(b) for _, b in new)
            writer.commit(sid, record["row_start"], record["n_views"], fp, idx,
                          encode_targets(emb, patch), new)
    for w in writers.values():
        w.close()
    write_s = time.perf_counter() - t0
    t = time.perf_counter()
    finalise_cache(layout, specs, teacher.info(), 1)
    return {"write_s": write_s, "plan_tables_s": plan_s, "finalise_s": time.perf_counter() - t,
            "raw_tile_bytes": raw_tile_bytes, "slides": n_slides}


def disk_bytes(out: Path) -> dict:
    from g2l_cache.layout import dir_bytes

    shards = out / "shards"
    targets = sum(p.stat().st_blocks * 512 for p in shards.glob("*/targets/*.bin"))
    tiles = sum(p.stat().st_blocks * 512 for p in shards.glob("*/tiles.bin"))
    index = sum(dir_bytes(p) for p in shards.glob("*/index.lmdb"))
    tables = sum(p.stat().st_size for p in out.glob("*.parquet")) + dir_bytes(out / "index")
    return {"targets": targets, "tiles": tiles, "shard_index": index, "tables_and_index": tables}


def drop_page_cache() -> bool:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def disk_read_rate(paths: list[Path], limit: int = 2 << 30) -> float:
    """MB/s of plain sequential reads of these files (page cache dropped first when allowed)."""
    drop_page_cache()
    total, t = 0, time.perf_counter()
    for p in paths:
        with open(p, "rb", buffering=0) as fh:
            while total < limit and (block := fh.read(1 << 24)):
                total += len(block)
        if total >= limit:
            break
    return total / 1e6 / (time.perf_counter() - t)


def timed(fn, *args, repeat: int = 1, **kwargs):
    """(result, best wall time of `repeat` calls)."""
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn(*args, **kwargs)
        best = min(best, time.perf_counter() - t)
    return out, best


def read_rate(cache: Path, fp: str, n: int = 2000) -> dict:
    """Random views per second through CachedViews (decode + view + target) and raw reads only."""
    from g2l_cache import CacheReader
    from g2l_student.data import CachedViews

    reader = CacheReader(str(cache))
    picks = np.random.default_rng(1).choice(reader.n_views, size=n, replace=False)
    ds = CachedViews(reader, fp)
    t = time.perf_counter()
    for v in picks[:n // 4]:
        ds[int(v)]
    items = (n // 4) / (time.perf_counter() - t)
    t = time.perf_counter()
    for v in picks:
        reader.tile_bytes(int(reader.view_index[int(v)]["tile"]))
        reader.target(fp, int(v))
    raw = n / (time.perf_counter() - t)
    # One CPU core's cost per view of what DataLoader workers do: decode the tile, make the view.
    from g2l_cache.tile_codec import decode_tile
    from g2l_cache.views import apply_view

    some = [int(v) for v in picks[:200]]
    blobs = [reader.tile_bytes(int(reader.view_index[v]["tile"])) for v in some]
    t = time.perf_counter()
    pixels = [decode_tile(b) for b in blobs]
    decode_ms = (time.perf_counter() - t) / len(blobs) * 1e3
    t = time.perf_counter()
    for v, px in zip(some, pixels):
        apply_view(px, reader.view_params(v))
    view_ms = (time.perf_counter() - t) / len(some) * 1e3
    reader.close()
    return {"items_per_second": items, "raw_reads_per_second": raw, "decode_ms_per_tile": decode_ms,
            "view_ms_per_view": view_ms}


def _pss_rss(pid: int) -> tuple[int, int]:
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return 0, 0
    vals = {line.split()[0].rstrip(":"): int(line.split()[1]) * 1024 for line in text.splitlines()[1:]}
    return vals.get("Pss", 0), vals.get("Rss", 0)


def measure_fit(cache: Path, work: Path, workers: int, steps: int = 40) -> dict:
    """Run `g2l student fit` on the cache; sample PSS/RSS of main and workers; time to first step."""
    import psutil

    out = work / f"run-{cache.name}"
    cfg = work / "fit.toml"
    cfg.write_text("fidelity_views = 16\nkeep_checkpoints = 1\n")
    cmd = [sys.executable, "-m", "cli", "student", "fit", str(cache), "--out", str(out), "--overwrite",
           "--student", "vit_tiny_patch16_224", "--random-init", "--img-size", "32", "--steps",
           str(steps), "--batch-size", "32", "--num-workers", str(workers), "--val-fraction", "0",
           "--checkpoint-every", "1000", "--no-progress", "--config", str(cfg)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    launched = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    peaks = {"main_pss": 0, "main_rss": 0, "workers_pss": 0, "workers_rss_max": 0, "total_pss": 0}
    steady: list[tuple[int, int, int]] = []  # (main, workers, total) PSS once training runs
    per_child: dict[int, int] = {}  # peak PSS of each child process (fork server and workers)
    first_row_at = None
    metrics = out / "metrics.csv"
    stop = threading.Event()

    def sample():
        main = psutil.Process(proc.pid)
        while not stop.is_set():
            try:
                kids = [p for p in main.children(recursive=True) if "resource_tracker" not in " ".join(p.cmdline())]
            except psutil.Error:
                kids = []
            m_pss, m_rss = _pss_rss(proc.pid)
            w = [_pss_rss(k.pid) for k in kids]
            for k, (pss, _) in zip(kids, w):
                per_child[k.pid] = max(per_child.get(k.pid, 0), pss)
            peaks["main_pss"] = max(peaks["main_pss"], m_pss)
            peaks["main_rss"] = max(peaks["main_rss"], m_rss)
            peaks["workers_pss"] = max(peaks["workers_pss"], sum(p for p, _ in w))
            peaks["workers_rss_max"] = max([peaks["workers_rss_max"]] + [r for _, r in w])
            peaks["total_pss"] = max(peaks["total_pss"], m_pss + sum(p for p, _ in w))
            if first_row_at is not None and m_pss:
                steady.append((m_pss, sum(p for p, _ in w), m_pss + sum(p for p, _ in w)))
            time.sleep(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    while proc.poll() is None:
        if first_row_at is None and metrics.exists() and len(metrics.read_text().splitlines()) > 1:
            first_row_at = time.perf_counter()
        time.sleep(0.05)
    stop.set()
    sampler.join()
    log = proc.stdout.read().decode()
    if proc.returncode != 0:
        raise SystemExit(f"student fit failed:\n{log[-3000:]}")
    import csv

    rows = list(csv.DictReader(metrics.open()))
    # The first row is written once step 2 is queued (deferred loss read): take its own duration off.
    startup = (first_row_at or time.perf_counter()) - launched - float(rows[0]["seconds"])
    speed = [line for line in log.splitlines() if "steps/s" in line]
    shutil.rmtree(out, ignore_errors=True)
    med = np.median(np.array(steady), axis=0) if steady else np.zeros(3)
    return {**{f"peak_{k}": v for k, v in peaks.items()}, "steady_main_pss": float(med[0]),
            "steady_workers_pss": float(med[1]), "steady_total_pss": float(med[2]),
            "steady_samples": len(steady), "startup_s": startup,
            "peak_pss_per_child": sorted(per_child.values(), reverse=True),
            "speed": speed[-1].strip() if speed else None}


TIMINGS = ("finalise_s", "noop_resume_s", "cache_info_s", "verify_s", "verify_recompute_s", "fit_startup_s")
TARGETS = {"finalise_s": 60, "noop_resume_s": 60, "verify_recompute_s": 30, "fit_startup_s": 60,
           "fit_pss_bytes_per_view": 100, "target_disk_ratio": 1.05, "tile_disk_ratio": 1.05}


def measure_cache(cache: Path, n_views: int, teacher, work: Path, workers: int) -> dict:
    """Every timing and the fit's memory on one synthetic cache."""
    from g2l_cache.build import BuildConfig, run_build
    from g2l_cache.inspect import cache_info, verify_cache

    fp = teacher.fingerprint()
    out = write_synthetic_cache(cache, n_views, teacher)
    cfg = BuildConfig(out=str(cache), teacher="stand-in-1536", random_init=True, views=K,
                      num_workers=0, progress=False, cpu=True)
    summary, out["noop_resume_s"] = timed(run_build, cfg, teacher=teacher, repeat=3)
    assert summary.targets_written == 0
    info, out["cache_info_s"] = timed(cache_info, str(cache), repeat=3)
    assert info["status"] == "complete" and info["views"] == n_views - n_views % K
    drop_page_cache()
    report, out["verify_s"] = timed(verify_cache, str(cache))
    assert report["problems"] == [], report["problems"][:5]
    out["verify_mb_per_second"] = report["mb_per_second"]
    # As `g2l cache verify --recompute 64` runs it: no full checksum pass.
    _, out["verify_recompute_s"] = timed(verify_cache, str(cache), recompute=64, teachers={fp: teacher},
                                         checksums=False, repeat=3)
    out["fit"] = measure_fit(cache, work, workers)
    out["fit_startup_s"] = out["fit"]["startup_s"]
    out["views"] = info["views"]
    return out


def extrapolate(small: float, big: float, n_small: int, n_big: int, n: int = REAL_VIEWS) -> float:
    """Linear through the two measurements; a negative slope (noise) counts as flat."""
    slope = max(0.0, (big - small) / (n_big - n_small))
    return big + slope * (n - n_big)


def main() -> None:
    import argparse

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--views", type=int, default=200_000)
    p.add_argument("--workers", type=int, default=2, help="fit DataLoader workers")
    p.add_argument("--work", default=None, help="scratch folder (default: a temp folder)")
    p.add_argument("--keep", action="store_true", help="keep the synthetic caches")
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args()
    sys.path.insert(0, str(REPO))
    import torch

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    work = Path(args.work or tempfile.mkdtemp(prefix="g2l-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    teacher = stand_in_teacher()
    small_n = max(2 * K * TILES_PER_SLIDE, args.views // 8)
    res: dict = {"views": args.views, "small_views": small_n, "k": K, "embed_dim": EMBED_DIM,
                 "patch_dim": PATCH_DIM, "tiles_per_slide": TILES_PER_SLIDE}
    try:
        print(f"a synthetic cache of {small_n:,} views ...", flush=True)
        small = measure_cache(work / "small", small_n, teacher, work, args.workers)
        shutil.rmtree(work / "small")
        print(f"a synthetic cache of {args.views:,} views ...", flush=True)
        big = measure_cache(work / "big", args.views, teacher, work, args.workers)
        disk = disk_bytes(work / "big")
        n = big["views"]
        shard_files = sorted(work.glob("big/shards/*/tiles.bin")) + sorted(work.glob("big/shards/*/targets/*.bin"))
        res["disk_read_mb_per_second"] = disk_read_rate(shard_files)
        res["read"] = read_rate(work / "big", teacher.fingerprint())
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    res.update({k: big[k] for k in TIMINGS}, small={k: small[k] for k in (*TIMINGS, "fit")},
               big_fit=big["fit"], write_s=big["write_s"], plan_tables_s=big["plan_tables_s"],
               slides=big["slides"], verify_mb_per_second=big["verify_mb_per_second"], disk=disk,
               target_disk_ratio=disk["targets"] / (n * (EMBED_DIM + PATCH_DIM) * 2),
               tile_disk_ratio=disk["tiles"] / big["raw_tile_bytes"],
               bytes_per_view_on_disk=sum(disk.values()) / n)
    grow = n - small["views"]
    res["fit_pss_bytes_per_view"] = (big["fit"]["steady_total_pss"] - small["fit"]["steady_total_pss"]) / grow
    res["fit_peak_pss_bytes_per_view"] = (big["fit"]["peak_total_pss"] - small["fit"]["peak_total_pss"]) / grow
    res["fit_peak_main_rss_bytes_per_view"] = (big["fit"]["peak_main_rss"] - small["fit"]["peak_main_rss"]) / grow
    ext = {"views": REAL_VIEWS}
    for key in TIMINGS:
        ext[key] = extrapolate(small[key], big[key], small["views"], n)
    ext.update(fit_pss_bytes_per_view=res["fit_pss_bytes_per_view"],
               fit_pss_gb_per_view_table=res["fit_pss_bytes_per_view"] * REAL_VIEWS / 1e9,
               fit_peak_pss_bytes_per_view=res["fit_peak_pss_bytes_per_view"],
               target_disk_ratio=res["target_disk_ratio"], tile_disk_ratio=res["tile_disk_ratio"])
    res["extrapolated_8m"] = ext
    res["targets"] = TARGETS
    res["meets_targets"] = {k: ext[k] <= v for k, v in TARGETS.items()}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "scale.json").write_text(json.dumps(res, indent=2))
    print(f"\n{'':22}{small['views']:>12,}{n:>12,}{'per view':>12}{'at 8 M':>10}{'target':>8}")
    for key in TIMINGS:
        per = max(0.0, (big[key] - small[key]) / grow) * 1e6
        print(f"{key:22}{small[key]:>11.2f}s{big[key]:>11.2f}s{per:>9.2f} µs{ext[key]:>9.1f}s"
              f"{TARGETS.get(key, ''):>8}")
    print(f"{'fit PSS (steady)':22}{small['fit']['steady_total_pss'] / 1e9:>10.3f}GB"
          f"{big['fit']['steady_total_pss'] / 1e9:>10.3f}GB{res['fit_pss_bytes_per_view']:>10.1f} B"
          f"{ext['fit_pss_gb_per_view_table']:>8.2f}GB{100:>7}B")
    print(f"{'fit PSS (peak)':22}{small['fit']['peak_total_pss'] / 1e9:>10.3f}GB"
          f"{big['fit']['peak_total_pss'] / 1e9:>10.3f}GB{res['fit_peak_pss_bytes_per_view']:>10.1f} B")
    print(f"target bytes on disk / raw {res['target_disk_ratio']:.4f}; tiles / encoded {res['tile_disk_ratio']:.4f}; "
          f"{res['bytes_per_view_on_disk']:.0f} B per view in all")
    print(f"verify {res['verify_mb_per_second']:.0f} MB/s vs plain reads {res['disk_read_mb_per_second']:.0f} MB/s")
    r = res["read"]
    print(f"reads: {r['items_per_second']:.0f} items/s (decode+view), {r['raw_reads_per_second']:.0f} raw "
          f"tile+target reads/s; one core: decode {r['decode_ms_per_tile']:.2f} ms/tile + view "
          f"{r['view_ms_per_view']:.2f} ms")
    print("meets targets:", res["meets_targets"])


if __name__ == "__main__":
    main()
