"""Faults at scale: a slide that breaks mid-read, non-finite targets, partial caches, killed runs,
and finished caches read from read-only storage."""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import tifffile
import torch

from helpers import committed_targets, copy_slides, small_config
from g2l_cache import CacheReader, G2LError
from g2l_cache.build import run_build
from g2l_cache.inspect import verify_cache
from g2l_cache.store import encode_targets
from g2l_cache.teachers import load_teacher

REPO = Path(__file__).parent.parent


def _corrupt_past_first_rows(path: Path, rows: int = 2) -> None:
    """Overwrite every level-0 TIFF tile below the first rows of tiles with bytes no codec reads."""
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        per_row = -(-page.imagewidth // page.tilewidth)
        spans = list(zip(page.dataoffsets, page.databytecounts))[rows * per_row:]
    rng = np.random.default_rng(0)
    with open(path, "r+b") as fh:
        for offset, count in spans:
            fh.seek(offset)
            fh.write(rng.integers(0, 256, count, dtype=np.uint8).tobytes())


def test_a_slide_failing_while_its_tiles_are_read_is_dropped_and_the_cache_completes(demo_dir, tmp_path):
    slides = copy_slides(demo_dir, tmp_path / "slides")
    broken = sorted(slides.glob("*.tif"))[0]
    _corrupt_past_first_rows(broken)
    cache = tmp_path / "cache"
    # Small batches so that the broken slide's first tiles (intact rows) commit before it fails.
    summary = run_build(small_config(cache, [slides], batch_size=2, max_tiles_per_slide=12))
    assert summary.slides_failed == 1 and summary.slides_ok == 2
    assert broken.stem in summary.failed and summary.failed[broken.stem]
    reader = CacheReader(str(cache))
    status = dict(zip(reader.slides()["slide_id"], reader.slides()["status"]))
    assert status[broken.stem] == "failed"
    assert reader.manifest["status"] == "complete" and reader.teacher()["complete"]
    views = reader.views()
    assert broken.stem not in set(views["slide_id"]) and broken.stem not in set(reader.tiles()["slide_id"])
    assert reader.teacher()["n_targets"] == views.height
    # it did fail in the embed phase: some of its targets had been committed, and are ignored
    assert committed_targets(cache) > views.height
    assert verify_cache(str(cache))["problems"] == []
    # a resume retries the broken slide; it fails again and the cache stays complete
    again = run_build(small_config(cache, [slides], batch_size=2, max_tiles_per_slide=12))
    assert again.slides_failed == 1 and CacheReader(str(cache)).manifest["status"] == "complete"


def test_non_finite_targets_are_refused_and_never_stored(demo_dir, tmp_path):
    with pytest.raises(G2LError, match="non-finite"):
        encode_targets(np.array([[1.0, np.nan]]), np.zeros((1, 2)))
    with pytest.raises(G2LError, match="fp16"):
        encode_targets(np.array([[1e6, 0.0]]), np.zeros((1, 2)))  # beyond fp16's range
    cfg = small_config(tmp_path / "c", [demo_dir], batch_size=4)
    teacher = load_teacher(cfg.teacher_spec(), img_size=cfg.crop_size)
    embed, calls = teacher.embed, []

    def nan_on_the_second_batch(views):  # a batch holds one slide's views: that slide fails, not the build
        emb, patch = embed(views)
        calls.append(len(views))
        return (emb * float("nan"), patch) if len(calls) == 2 else (emb, patch)

    teacher.embed = nan_on_the_second_batch
    summary = run_build(cfg, teacher=teacher)
    assert summary.slides_failed == 1 and summary.slides_ok == 2
    ((slide, error),) = summary.failed.items()
    assert "non-finite targets" in error and "fp16" in error
    reader = CacheReader(str(tmp_path / "c"))
    assert reader.manifest["status"] == "complete" and slide not in set(reader.views()["slide_id"])
    assert verify_cache(str(tmp_path / "c"))["problems"] == []


def test_fit_on_a_partial_cache_names_teacher_slides_and_the_command(demo_dir, tmp_path):
    from g2l_student.config import FitConfig
    from g2l_student.train import fit

    slides = sorted(demo_dir.glob("*.tif"))
    cache = tmp_path / "c"
    first = run_build(small_config(cache, slides[:2]))
    # A second teacher over one more slide: the first teacher lacks that slide's targets.
    run_build(small_config(cache, slides, teacher="vit_small_patch16_224"))
    reader = CacheReader(str(cache))
    info = reader.teacher(first.teacher_fingerprint)
    assert not info["complete"] and info["missing_slides"] == [slides[2].stem]
    cfg = FitConfig(cache=str(cache), out=str(tmp_path / "run"), teacher=first.teacher_fingerprint,
                    student="vit_tiny_patch16_224", random_init=True, img_size=32, batch_size=8,
                    num_workers=0, progress=False)
    with pytest.raises(G2LError) as err:
        fit(cfg)
    msg = str(err.value)
    assert first.teacher_fingerprint in msg and slides[2].stem in msg
    assert f"g2l cache build --out {cache} --teacher vit_tiny_patch16_224 --random-init" in msg
    assert not (tmp_path / "run").exists()


def _tree(pid: int) -> list[int]:
    return [p.pid for p in psutil.Process(pid).children(recursive=True)]


def _alive(pids: list[int]) -> list[int]:
    out = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                out.append(pid)
        except psutil.NoSuchProcess:
            pass
    return out


def _kill_when(cmd: list[str], ready, min_children: int) -> None:
    """Start cmd, wait until ready() and its workers run, kill -9 it; its workers must be gone in 10 s."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline, kids = time.time() + 240, []
    while time.time() < deadline and proc.poll() is None:
        kids = _tree(proc.pid)
        if ready() and len(kids) >= min_children:
            break
        time.sleep(0.1)
    assert proc.poll() is None, "finished before it could be killed: " + proc.stderr.read().decode()[-2000:]
    kids = _tree(proc.pid)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 10
    while time.time() < deadline and _alive(kids):
        time.sleep(0.2)
    assert _alive(kids) == [], [psutil.Process(p).cmdline() for p in _alive(kids)]


def test_kill_9_of_a_build_or_a_fit_takes_its_workers_with_it(demo_dir, built_cache, tmp_path):
    cache = tmp_path / "cache"
    build = [sys.executable, "-m", "cli", "cache", "build", str(demo_dir), "--out", str(cache),
             "--teacher", "vit_small_patch16_224", "--random-init", "--tile-size", "112", "--crop-size",
             "96", "--views", "4", "--max-tiles-per-slide", "16", "--batch-size", "4",
             "--num-workers", "2", "--no-progress"]
    _kill_when(build, lambda: committed_targets(cache) > 0, min_children=3)
    run = tmp_path / "run"
    fit = [sys.executable, "-m", "cli", "student", "fit", str(built_cache), "--out", str(run),
           "--student", "vit_tiny_patch16_224", "--random-init", "--img-size", "32", "--steps", "5000",
           "--batch-size", "8", "--num-workers", "2", "--val-fraction", "0", "--no-progress"]
    _kill_when(fit, lambda: (run / "metrics.csv").exists(), min_children=3)


def test_a_finished_cache_is_read_from_read_only_storage_without_lock_files(built_cache, tmp_path):
    ro_src = tmp_path / "src"
    shutil.copytree(built_cache, ro_src)
    for lock in ro_src.glob("shards/*/index.lmdb/lock.mdb"):
        lock.unlink()  # as a cache copied to shared storage without them
    script = f"""
import sys, numpy as np
sys.path.insert(0, {str(REPO)!r})
from torch.utils.data import DataLoader
from g2l_cache import CacheReader
from g2l_cache.inspect import verify_cache
from g2l_student.data import CachedViews
def main(root):
    reader = CacheReader(root)
    fp = reader.teacher()["fingerprint"]
    batch = next(iter(DataLoader(CachedViews(reader, fp), batch_size=8, num_workers=2,
                                 multiprocessing_context="forkserver")))
    assert batch[0].shape[0] == 8 and np.isfinite(batch[1].numpy()).all()
    report = verify_cache(root)
    assert report["problems"] == [] and sum(report["target_counts"].values()) == reader.n_views, report
    print("read-only OK", reader.n_views)


if __name__ == "__main__":
    main(sys.argv[1])
"""
    (tmp_path / "read.py").write_text(script)
    if os.geteuid() == 0 and shutil.which("unshare"):
        ro = tmp_path / "ro"
        ro.mkdir()
        cmd = ["unshare", "-m", "sh", "-c", f"mount --bind {ro_src} {ro} && mount -o remount,ro,bind {ro} "
               f"&& touch {ro}/probe 2>/dev/null && exit 3; {sys.executable} {tmp_path / 'read.py'} {ro}"]
    else:
        subprocess.run(["chmod", "-R", "a-w", str(ro_src)], check=True)
        cmd = [sys.executable, str(tmp_path / "read.py"), str(ro_src)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "read-only OK" in res.stdout, res.stdout + res.stderr[-3000:]
    assert not list(ro_src.glob("shards/*/index.lmdb/lock.mdb"))
