"""Shared fixtures: small demo slides and small caches built with a tiny random-weight teacher."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from g2l_cache.build import BuildConfig, run_build
from g2l_cache.demo_slides import write_demo_slides
from g2l_cache.store import iter_prefix, shared_env

TEACHER = "vit_tiny_patch16_224"
SMALL = dict(teacher=TEACHER, random_init=True, tile_size=64, crop_size=48, views=2,
             max_tiles_per_slide=10, batch_size=8, num_workers=0, progress=False)


def small_config(out: Path, slides: list, **overrides) -> BuildConfig:
    """A build config that runs in seconds on CPU."""
    return BuildConfig(out=str(out), slides=[str(s) for s in slides], **{**SMALL, **overrides})


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("slides")
    write_demo_slides(out, n_slides=3, n_centres=3, seed=1, size_um=(800.0, 600.0))
    return out


@pytest.fixture(scope="session")
def built_cache(tmp_path_factory, demo_dir) -> Path:
    out = tmp_path_factory.mktemp("cache") / "c"
    run_build(small_config(out, [demo_dir]))
    return out


def cache_items(root: Path) -> dict[bytes, bytes]:
    """Every key/value pair of every shard, regardless of which shard holds it."""
    items = {}
    for shard in sorted((Path(root) / "shards").glob("*.lmdb")):
        for k, v in iter_prefix(shared_env(shard), b""):
            items[bytes(k)] = bytes(v)
    return items


def run_cli(*args: str, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run `python -m cli ...` in a fresh process."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "cli", *args], capture_output=True, text=True,
                          env=full_env, timeout=timeout, cwd=Path(__file__).parent.parent)


def copy_slides(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    for p in src.glob("*.tif"):
        shutil.copy(p, dst / p.name)
    return dst
