"""Real-size slides and real clusters: tiling pieces equal their plain versions, the QC picture stays
small, plan workers import no torch, ranks get equal work, slides staged through a local folder give
the same cache, and the three benchmarks run and write their results."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers import cache_content, small_config
from g2l_cache.assignment import largest_first, max_over_mean
from g2l_cache.build import run_build
from g2l_cache.errors import G2LError
from g2l_cache.slides import SlideSpec, open_slide
from g2l_cache.staging import SlideStager, local_copy
from g2l_cache.tiling import TilingConfig, box_sums, otsu_threshold, plan_tiles, read_tiles
from g2l_cache.wsi import read_region

REPO = Path(__file__).parent.parent


@pytest.fixture(scope="module")
def big_slide(tmp_path_factory) -> Path:
    """A 12,000 x 9,000 px pyramidal JPEG BigTIFF of H&E texture at 0.25 mpp, written tile by tile."""
    from g2l_cache.real_slide import write_real_slide

    path = tmp_path_factory.mktemp("real") / "real-12000x9000.tif"
    write_real_slide(path, 12_000, 9_000)
    return path


# -- 1. tiling and reading ------------------------------------------------------------------------
def test_otsu_equals_skimage_and_box_sums_equal_plain_sums():
    from skimage.filters import threshold_otsu

    rng = np.random.default_rng(0)
    for grey in (rng.integers(0, 256, (300, 200), dtype=np.uint8),
                 np.concatenate([rng.normal(90, 20, 5000), rng.normal(230, 8, 9000)]).clip(0, 255).astype(np.uint8)
                 .reshape(100, 140)):
        assert otsu_threshold(grey) == threshold_otsu(grey)
    mask = rng.random((97, 131)) > 0.6
    y0, x0 = np.array([0, 10, 40, 96]), np.array([0, 7, 50, 130])
    y1, x1 = np.array([10, 40, 97, 97]), np.array([7, 50, 130, 131])
    expected = np.array([[mask[a:b, c:d].sum() for c, d in zip(x0, x1)] for a, b in zip(y0, y1)])
    assert np.array_equal(box_sums(mask, y0, y1, x0, x1), expected)


def test_neighbouring_tiles_read_in_one_region_equal_one_read_each(big_slide):
    opened = open_slide(SlideSpec("s", str(big_slide)))
    tiling = TilingConfig(mpp=0.5, tile_size=224)
    plan = plan_tiles(opened, "s", tiling, 0)
    chunk = plan.tiles[100:140]
    assert len({t.y for t in chunk}) < len(chunk)  # rows of touching tiles, read as runs
    size0 = 224 * 0.5 / opened.mpp
    one_each = [read_region(opened.reader, t.x, t.y, size0, 224) for t in chunk]
    assert all(np.array_equal(a, b) for a, b in zip(read_tiles(opened, chunk, tiling), one_each))


def test_the_qc_picture_of_a_big_slide_is_a_small_jpeg_showing_mask_and_tiles(big_slide, tmp_path):
    from g2l_cache.plan import PlanConfig, run_plan

    run_plan(PlanConfig(out=str(tmp_path / "plan"), slides=[str(big_slide)], teacher="vit_tiny_patch16_224",
                        tile_size=224, progress=False, num_workers=0, sample_tiles=4))
    qc = tmp_path / "plan" / "qc" / f"{big_slide.stem}.jpg"
    assert qc.stat().st_size <= 1_000_000
    with Image.open(qc) as img:
        assert img.format == "JPEG" and max(img.size) <= 2048
        pixels = np.asarray(img.convert("RGB")).reshape(-1, 3).astype(int)
    # the tissue outline (green) and the tile boxes (blue) are both drawn
    green = ((pixels[:, 1] > 120) & (pixels[:, 0] < 90) & (pixels[:, 2] < 90)).mean()
    blue = ((pixels[:, 2] > 170) & (pixels[:, 0] < 90) & (pixels[:, 1] < 140)).mean()
    assert green > 0.001 and blue > 0.002, (green, blue)


_PLAN_IN_A_WORKER = """
import multiprocessing, os, sys
from concurrent.futures import ProcessPoolExecutor
from g2l_cache.planning import plan_one_slide
from g2l_cache.slides import SlideSpec
from g2l_cache.tiling import TilingConfig
from g2l_cache.views import ViewPolicy
from g2l_cache.workers import worker_init

def plan_and_tell(path, root):
    rec = plan_one_slide(SlideSpec("s", path), TilingConfig(tile_size=64), 0, root, ViewPolicy(64, 48), 2)
    return rec["status"], sorted(m for m in ("torch", "tiatoolbox", "timm") if m in sys.modules)

if __name__ == "__main__":
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"), initializer=worker_init,
                             initargs=(os.getpid(),)) as pool:
        print(pool.submit(plan_and_tell, sys.argv[1], sys.argv[2]).result())
"""


def test_a_plan_worker_imports_no_torch(demo_dir, tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(_PLAN_IN_A_WORKER)
    slide = sorted(demo_dir.glob("*.tif"))[0]
    res = subprocess.run([sys.executable, str(script), str(slide), str(tmp_path / "cache")], cwd=REPO,
                         env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip() == "('ok', [])"


# -- 2. every rank finishes together --------------------------------------------------------------
def test_largest_first_balances_skewed_shards_and_is_deterministic():
    loads = np.random.default_rng(3).lognormal(8, 1.0, 1024)
    shards = largest_first(loads.tolist(), 8)
    assert sorted(s for mine in shards for s in mine) == list(range(1024))
    assert max_over_mean(loads, shards) <= 1.02
    round_robin = [list(range(r, 1024, 8)) for r in range(8)]
    assert max_over_mean(loads, round_robin) > 1.05
    assert largest_first(loads.tolist(), 8) == shards
    assert largest_first([5, 0, 0], 4)[3] == []  # more ranks than work: some get none


def test_the_assignment_is_recorded_and_reused_by_a_resume(demo_dir, tmp_path, monkeypatch):
    import g2l_cache.assignment as assignment

    out = tmp_path / "c"
    run_build(small_config(out, [demo_dir]))
    recorded = json.loads((out / "manifest.json").read_text())["assignment"]
    assert recorded["world_size"] == 1 and sum(recorded["loads"]) == \
        json.loads((out / "manifest.json").read_text())["counts"]["views"]

    def refuse(*args):
        raise AssertionError("the recorded assignment should have been reused")

    monkeypatch.setattr(assignment, "largest_first", refuse)
    run_build(small_config(out, [demo_dir], teacher="vit_small_patch16_224"))  # a later teacher
    assert json.loads((out / "manifest.json").read_text())["assignment"] == recorded


# -- 4. slides on slow shared storage -------------------------------------------------------------
def test_a_build_staged_through_a_local_folder_equals_an_unstaged_one(built_cache, demo_dir, tmp_path, monkeypatch):
    import g2l_cache.work as work

    stage = tmp_path / "stage"
    stale = stage / f"g2l-stage-{socket.gethostname()}-999999999"  # left by a killed build
    stale.mkdir(parents=True)
    opened = []
    real_open = work.open_slide
    monkeypatch.setattr(work, "open_slide", lambda spec, **kw: (opened.append(spec.path), real_open(spec, **kw))[1])
    out = tmp_path / "staged"
    run_build(small_config(out, [demo_dir], stage_dir=str(stage), stage_ahead=1))
    assert cache_content(out) == cache_content(built_cache)  # original paths recorded, same bytes
    assert opened and all(p.startswith(str(stage)) for p in opened)  # the teacher pass read the copies
    assert list(stage.iterdir()) == []  # copies and the stale folder gone
    # loader workers (other processes) wait for each copy and read it
    workers = tmp_path / "staged-workers"
    run_build(small_config(workers, [demo_dir], stage_dir=str(stage), stage_ahead=1, num_workers=2))
    assert cache_content(workers) == cache_content(built_cache)
    assert list(stage.iterdir()) == []
    # adding a teacher reads only stored tiles: nothing is staged
    import g2l_cache.staging as staging

    copied = []
    real_copy = staging.copy_file
    monkeypatch.setattr(staging, "copy_file", lambda *a, **kw: (copied.append(a), real_copy(*a, **kw))[1])
    opened.clear()
    second = run_build(small_config(out, [demo_dir], teacher="vit_small_patch16_224", stage_dir=str(stage)))
    assert second.targets_written == second.views and copied == [] and opened == []


def test_a_copy_that_fails_is_read_in_place(built_cache, demo_dir, tmp_path, monkeypatch):
    import g2l_cache.staging as staging

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(staging, "copy_file", disk_full)
    out = tmp_path / "c"
    run_build(small_config(out, [demo_dir], stage_dir=str(tmp_path / "stage")))
    assert cache_content(out) == cache_content(built_cache)


def test_the_stager_keeps_at_most_n_copies_ahead_and_removes_each_once_read(tmp_path):
    sources = []
    for i in range(5):
        sources.append(tmp_path / f"s{i}.tif")
        sources[-1].write_bytes(bytes([i]) * 1000)
    with SlideStager(tmp_path / "stage", [(f"s{i}", str(p)) for i, p in enumerate(sources)], ahead=2) as stager:
        paths = stager.paths()
        assert Path(local_copy(paths["s0"], 10)).read_bytes() == sources[0].read_bytes()
        local_copy(paths["s1"], 10)
        assert local_copy(paths["s2"], 0.3) is None  # two copies ahead: the third waits
        stager.release("s0")
        assert not Path(paths["s0"]).exists()
        assert Path(local_copy(paths["s2"], 10)).read_bytes() == sources[2].read_bytes()
        stager.release("s3")  # released before its turn (a failed slide): skipped, its slot kept
        stager.release("s1")
        assert Path(local_copy(paths["s4"], 10)).read_bytes() == sources[4].read_bytes()
        assert not Path(paths["s3"]).exists()
        folder = stager.folder
    assert not folder.exists()


def test_stage_options_are_checked(tmp_path):
    with pytest.raises(G2LError, match="--stage-ahead must be at least 1"):
        small_config(tmp_path / "c", [], stage_ahead=0)
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(G2LError, match="cannot be created"):
        SlideStager(blocker / "stage", [], ahead=1)


# -- the benchmarks run from the committed code ---------------------------------------------------
def test_the_benchmarks_run_and_write_their_results(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    for script, args in (("balance.py", []), ("checkpoint.py", ["--arch", "vit_tiny_patch16_224", "--saves", "2"]),
                         ("real_slide.py", ["--width", "8000", "--height", "6000", "--repeats", "1", "--slides", "2",
                                            "--read-tiles", "64", "--slide-dir", str(tmp_path / "slide")])):
        res = subprocess.run([sys.executable, script, *args, "--out", str(tmp_path)], cwd=REPO / "benchmarks",
                             env=env, capture_output=True, text=True, timeout=900)
        assert res.returncode == 0, f"{script}: {res.stderr[-3000:]}"
    balance = json.loads((tmp_path / "balance.json").read_text())
    assert all(case["max_over_mean"] <= 1.02 < case["today_max_over_mean"] for case in balance["cases"])  # a simulation: no timing
    checkpoint = json.loads((tmp_path / "checkpoint.json").read_text())
    assert checkpoint["bytes"] > 0 and checkpoint["blocked_s"] >= 0 and checkpoint["sync_s"] > 0
    real = json.loads((tmp_path / "real_slide.json").read_text())
    assert real["qc_long_side_px"] <= 2048 and real["qc_bytes"] <= 1_000_000 and real["plan_workers_with_torch"] == 0
    assert real["tiles"] > 0 and real["read_ms_per_tile"] > 0
