"""Crash safety (kill -9 + resume), adding a teacher without slides, and 2-process == 1-process."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import polars as pl

from helpers import cache_content, committed_targets, copy_slides, run_cli, small_config
from g2l_cache.build import run_build, shard_of
from g2l_cache.build_config import DEFAULT_SHARDS
from g2l_cache.reader import CacheReader

REPO = Path(__file__).parent.parent
SLOW = dict(teacher="vit_small_patch16_224", crop_size=96, tile_size=112, views=4,
            max_tiles_per_slide=16, batch_size=4)


def _cli_args(slides, out, cfg: dict) -> list[str]:
    args = ["cache", "build", str(slides), "--out", str(out), "--random-init", "--num-workers", "0",
            "--no-progress"]
    for key, value in cfg.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    return args


def test_kill_9_then_resume_equals_an_uninterrupted_build(demo_dir, tmp_path):
    reference = tmp_path / "reference"
    run_build(small_config(reference, [demo_dir], **SLOW))
    total = committed_targets(reference)

    crashed = tmp_path / "crashed"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "cli", *_cli_args(demo_dir, crashed, SLOW)],
                            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and committed_targets(crashed) == 0:
        time.sleep(0.05)
    assert proc.poll() is None, "build finished before it could be killed: " + proc.stderr.read().decode()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = committed_targets(crashed)
    assert 0 < partial < total

    out = run_cli(*_cli_args(demo_dir, crashed, SLOW))
    assert out.returncode == 0, out.stderr
    assert cache_content(crashed) == cache_content(reference)
    for table in ("tiles", "views"):
        a = pl.read_parquet(reference / f"{table}.parquet")
        b = pl.read_parquet(crashed / f"{table}.parquet")
        assert a.equals(b)
    manifest = json.loads((crashed / "manifest.json").read_text())
    assert manifest["status"] == "complete"
    # the ledger: only the resumed pass finished, but the killed pass's batches kept their time
    (teacher,) = manifest["teachers"].values()
    assert [p["views"] for p in teacher["ledger"]] == [total - partial]
    assert sum(d["views"] for d in teacher["spent"].values()) == total


def test_second_teacher_reuses_stored_tiles_without_reading_slides(demo_dir, tmp_path):
    slides = copy_slides(demo_dir, tmp_path / "slides")
    cache = tmp_path / "cache"
    first = run_build(small_config(cache, [slides]))
    tiles_before = {k: v for k, v in cache_content(cache).items() if k[0] == "tile"}
    shutil.rmtree(slides)  # slides are gone: the second teacher must use the stored tiles
    second = run_build(small_config(cache, [], teacher="vit_small_patch16_224"))
    assert second.teacher_fingerprint != first.teacher_fingerprint
    assert second.slides_failed == 0 and second.targets_written == first.views
    items = cache_content(cache)
    assert {k: v for k, v in items.items() if k[0] == "tile"} == tiles_before
    reader = CacheReader(str(cache))
    assert set(reader.manifest["teachers"]) == {first.teacher_fingerprint, second.teacher_fingerprint}
    assert all(t["complete"] for t in reader.manifest["teachers"].values())
    a, _ = reader.target(first.teacher_fingerprint, 0)
    b, _ = reader.target(second.teacher_fingerprint, 0)
    assert a.shape == (192,) and b.shape == (384,)


def _ids_on_both_ranks(n: int, n_shards: int) -> list[str]:
    """n slide ids whose shards (of n_shards) alternate between the two ranks of a 2-process run."""
    ids, i = [], 0
    while len(ids) < n:
        cand, i = f"case-{i:03d}", i + 1
        if shard_of(cand, n_shards) % 2 == len(ids) % 2:
            ids.append(cand)
    return ids


def _slide_csv(slides: list[Path], ids: list[str], path: Path) -> Path:
    path.write_text("path,slide_id\n" + "".join(f"{p},{s}\n" for p, s in zip(slides, ids)))
    return path


CFG2 = {"teacher": "vit_tiny_patch16_224", "tile_size": 64, "crop_size": 48, "views": 2,
        "max_tiles_per_slide": 10, "batch_size": 8}


def _torchrun_build(slides: Path, out: Path, cfg: dict) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "-m", "cli", *_cli_args(slides, out, cfg)],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]


def test_two_process_build_equals_one_process_build(demo_dir, tmp_path):
    slides = sorted(demo_dir.glob("*.tif"))
    ids = _ids_on_both_ranks(len(slides), 2)
    csv = _slide_csv(slides, ids, tmp_path / "slides.csv")
    one = tmp_path / "one"
    out = run_cli(*_cli_args(csv, one, CFG2), env={"OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr
    two = tmp_path / "two"
    _torchrun_build(csv, two, {**CFG2, "shards": 2})
    assert sorted(p.name for p in (two / "shards").iterdir()) == ["00000", "00001"]
    manifest = json.loads((two / "manifest.json").read_text())
    assert all(s["slides"] > 0 for s in manifest["shards"]), "both ranks should own slides"
    assert cache_content(two) == cache_content(one)


def test_a_cache_built_by_one_rank_is_extended_by_two_using_both(demo_dir, tmp_path):
    slides = sorted(demo_dir.glob("*.tif"))
    n = DEFAULT_SHARDS
    ids = _ids_on_both_ranks(len(slides), n)
    first = _slide_csv(slides[:1], ids[:1], tmp_path / "first.csv")
    every = _slide_csv(slides, ids, tmp_path / "all.csv")
    once = tmp_path / "once"
    run_build(small_config(once, [every], **CFG2))
    grown = tmp_path / "grown"
    run_build(small_config(grown, [first], **CFG2))
    _torchrun_build(every, grown, CFG2)
    manifest = json.loads((grown / "manifest.json").read_text())
    assert manifest["n_shards"] == n and manifest["last_world_size"] == 2
    # the shards were shared out by their planned views, and both ranks embedded some
    assignment = manifest["assignment"]
    assert assignment["world_size"] == 2
    owners = {rank for rank, shards in enumerate(assignment["shards_of_rank"]) for i in ids if shard_of(i, n) in shards}
    assert owners == {0, 1}
    assert manifest["status"] == "complete" and manifest["counts"]["slides_ok"] == len(slides)
    assert cache_content(grown) == cache_content(once)
