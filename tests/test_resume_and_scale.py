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

from conftest import cache_items, copy_slides, run_cli, small_config
from g2l_cache.build import run_build, shard_of
from g2l_cache.reader import CacheReader
from g2l_cache.store import close_env, iter_prefix, shared_env

REPO = Path(__file__).parent.parent
SLOW = dict(teacher="vit_small_patch16_224", crop_size=96, tile_size=112, views=4,
            max_tiles_per_slide=16, batch_size=4)


def _cli_args(slides, out, cfg: dict) -> list[str]:
    args = ["cache", "build", str(slides), "--out", str(out), "--random-init", "--num-workers", "0",
            "--no-progress"]
    for key, value in cfg.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    return args


def _count_targets(cache: Path) -> int:
    shard = cache / "shards" / "00000.lmdb"
    if not (shard / "data.mdb").exists():
        return 0
    try:
        n = sum(1 for _ in iter_prefix(shared_env(shard), b"tgt/", values=False))
    finally:
        close_env(shard)
    return n


def test_kill_9_then_resume_equals_an_uninterrupted_build(demo_dir, tmp_path):
    reference = tmp_path / "reference"
    run_build(small_config(reference, [demo_dir], **SLOW))
    total = _count_targets(reference)

    crashed = tmp_path / "crashed"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "cli", *_cli_args(demo_dir, crashed, SLOW)],
                            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and _count_targets(crashed) == 0:
        time.sleep(0.05)
    assert proc.poll() is None, "build finished before it could be killed: " + proc.stderr.read().decode()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = _count_targets(crashed)
    assert 0 < partial < total

    out = run_cli(*_cli_args(demo_dir, crashed, SLOW))
    assert out.returncode == 0, out.stderr
    assert cache_items(crashed) == cache_items(reference)
    for table in ("tiles", "views"):
        a = pl.read_parquet(reference / f"{table}.parquet")
        b = pl.read_parquet(crashed / f"{table}.parquet")
        assert a.equals(b)
    assert json.loads((crashed / "manifest.json").read_text())["status"] == "complete"


def test_second_teacher_reuses_stored_tiles_without_reading_slides(demo_dir, tmp_path):
    slides = copy_slides(demo_dir, tmp_path / "slides")
    cache = tmp_path / "cache"
    first = run_build(small_config(cache, [slides]))
    tiles_before = {k: v for k, v in cache_items(cache).items() if k.startswith(b"tile/")}
    shutil.rmtree(slides)  # slides are gone: the second teacher must use the stored tiles
    second = run_build(small_config(cache, [], teacher="vit_small_patch16_224"))
    assert second.teacher_fingerprint != first.teacher_fingerprint
    assert second.slides_failed == 0 and second.targets_written == first.views
    items = cache_items(cache)
    assert {k: v for k, v in items.items() if k.startswith(b"tile/")} == tiles_before
    reader = CacheReader(str(cache))
    assert set(reader.manifest["teachers"]) == {first.teacher_fingerprint, second.teacher_fingerprint}
    assert all(t["complete"] for t in reader.manifest["teachers"].values())
    row = reader.views().row(0, named=True)
    a, _ = reader.target(first.teacher_fingerprint, row["view_id"], row["shard"])
    b, _ = reader.target(second.teacher_fingerprint, row["view_id"], row["shard"])
    assert a.shape == (192,) and b.shape == (384,)


def _without_shard(items: dict[bytes, bytes]) -> dict[bytes, bytes]:
    out = {}
    for k, v in items.items():
        if k.startswith(b"slide/"):
            rec = json.loads(v[:-4])
            rec.pop("shard")
            v = json.dumps(rec, sort_keys=True).encode()
        out[k] = v
    return out


def _csv_split_over_two_shards(demo_dir: Path, path: Path) -> Path:
    """Slide ids chosen so that each of two shards owns at least one slide."""
    slides = sorted(demo_dir.glob("*.tif"))
    ids, i = [], 0
    while len(ids) < len(slides):
        cand, i = f"case-{i:03d}", i + 1
        used = {shard_of(x, 2) for x in ids}
        if len(ids) == len(slides) - 1 and used == {shard_of(cand, 2)}:
            continue  # the last slide must go to the shard nobody has yet
        ids.append(cand)
    path.write_text("path,slide_id\n" + "".join(f"{p},{s}\n" for p, s in zip(slides, ids)))
    return path


def test_two_process_build_equals_one_process_build(demo_dir, tmp_path):
    demo_dir = _csv_split_over_two_shards(demo_dir, tmp_path / "slides.csv")
    cfg = {"teacher": "vit_tiny_patch16_224", "tile_size": 64, "crop_size": 48, "views": 2,
           "max_tiles_per_slide": 10, "batch_size": 8}
    env = {"OMP_NUM_THREADS": "1"}
    one = tmp_path / "one"
    out = run_cli(*_cli_args(demo_dir, one, cfg), env=env)
    assert out.returncode == 0, out.stderr
    two = tmp_path / "two"
    full_env = {**os.environ, **env, "PYTHONUNBUFFERED": "1"}
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "-m", "cli", *_cli_args(demo_dir, two, {**cfg, "shards": 2})],
                         cwd=REPO, env=full_env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert sorted(p.name for p in (two / "shards").iterdir()) == ["00000.lmdb", "00001.lmdb"]
    manifest = json.loads((two / "manifest.json").read_text())
    assert all(s["slides"] > 0 for s in manifest["shards"]), "both ranks should own slides"
    assert _without_shard(cache_items(two)) == _without_shard(cache_items(one))
    drop = ["shard"]
    a = pl.read_parquet(one / "views.parquet").drop(drop).sort("view_id")
    b = pl.read_parquet(two / "views.parquet").drop(drop).sort("view_id")
    assert a.equals(b)
