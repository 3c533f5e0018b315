"""Helpers the tests share: a small build config, cache digests, running the CLI in a fresh process."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

from g2l_cache.build import BuildConfig
from g2l_cache.reader import CacheReader
from g2l_cache.store import bits_from_bytes, close_env, iter_prefix, shared_env

TEACHER = "vit_tiny_patch16_224"
SMALL = dict(teacher=TEACHER, random_init=True, tile_size=64, crop_size=48, views=2,
             max_tiles_per_slide=10, batch_size=8, num_workers=0, progress=False)


def small_config(out: Path, slides: list, **overrides) -> BuildConfig:
    """A build config that runs in seconds on CPU."""
    return BuildConfig(out=str(out), slides=[str(s) for s in slides], **{**SMALL, **overrides})


LOCATION_COLUMNS = ["shard", "offset", "length", "crc32", "tile_index", "target_row"]


def cache_content(root: Path) -> dict:
    """Every tile's bytes, every view's targets and every table row, keyed by ids: equal for two
    caches that hold the same data wherever in their files it sits."""
    reader = CacheReader(str(root))
    tiles, views = reader.tiles(), reader.views()
    out: dict = {("tile", t): reader.tile_bytes(i) for i, t in enumerate(tiles["tile_id"].to_list())}
    for fp in reader.manifest["teachers"]:
        for i, v in enumerate(views["view_id"].to_list()):
            emb, patch = reader.target(fp, i)
            out[("target", fp, v)] = emb.tobytes() + patch.tobytes()
    out["tiles"] = tiles.drop(LOCATION_COLUMNS, strict=False).sort("tile_id").rows()
    out["views"] = views.drop(LOCATION_COLUMNS, strict=False).sort("view_id").rows()
    out["slides"] = reader.slides().drop("shard").sort("slide_id").rows()
    reader.close()
    return out


def file_digests(root: Path) -> dict[str, str]:
    """A hash of every file of a cache but the manifest (its `updated` time) and LMDB lock files."""
    import hashlib

    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(root).rglob("*"))
            if p.is_file() and p.name not in ("manifest.json", "lock.mdb")}


def committed_targets(root: Path) -> int:
    """Targets committed so far in every shard of a cache (also one being built by another process)."""
    total = 0
    for index in sorted((Path(root) / "shards").glob("*/index.lmdb")):
        if not (index / "data.mdb").exists():
            continue
        try:
            for _, value in iter_prefix(shared_env(index.parent), b"done/"):
                total += int(bits_from_bytes(bytes(value[:-4]), 8 * (len(value) - 4)).sum())
        finally:
            close_env(index.parent)
    return total


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


class _Refs(HTMLParser):
    """Every href and src a page names, and the ids of its slide cards in order."""

    def __init__(self):
        super().__init__()
        self.refs, self.cards, self.lazy = [], [], 0

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.refs += [a[k] for k in ("href", "src") if k in a]
        if tag == "img" and a.get("loading") == "lazy":
            self.lazy += 1
        if tag == "div" and "card" in (a.get("class") or "").split():
            self.cards.append((a["id"], "failed" in a["class"]))


def page_refs(path: Path) -> _Refs:
    parser = _Refs()
    parser.feed(path.read_text())
    return parser


def assert_links_resolve(page: Path) -> _Refs:
    refs = page_refs(page)
    assert refs.refs
    for ref in refs.refs:
        assert "://" not in ref and not ref.startswith("/"), ref  # relative: the page opens from disk
        assert (page.parent / ref).exists(), ref
    return refs
