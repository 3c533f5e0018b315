"""Where things live inside a cache folder, and the manifest that makes a folder a cache."""

from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from pathlib import Path

from g2l_cache.errors import G2LError

SCHEMA_VERSION = 2  # 2: tiles and targets in flat files beside a small LMDB index per shard
CACHE_FORMAT = "g2l-cache"


class CacheLayout:
    """Paths of one cache; see docs/cache-format.md for the contract."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.manifest = self.root / "manifest.json"
        self.slides = self.root / "slides.parquet"
        self.tiles = self.root / "tiles.parquet"
        self.views = self.root / "views.parquet"
        self.shards_dir = self.root / "shards"
        self.qc_dir = self.root / "qc"
        self.index_dir = self.root / "index"
        self.view_index = self.index_dir / "views.npy"
        self.tile_index = self.index_dir / "tiles.npy"

    def shard(self, index: int) -> Path:
        return self.shards_dir / f"{index:05d}"

    def tiles_file(self, shard: int) -> Path:
        return self.shard(shard) / "tiles.bin"

    def targets_file(self, shard: int, teacher_fp: str) -> Path:
        return self.shard(shard) / "targets" / f"{teacher_fp}.bin"

    def qc(self, slide_id: str, suffix: str = ".jpg") -> Path:
        """The slide's QC picture (`.jpg`; `.png` in caches before 2026-12) or contours (`.geojson`)."""
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in slide_id)
        return self.qc_dir / f"{safe}{suffix}"

    @property
    def report(self) -> Path:
        return self.root / "report.html"


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def read_manifest(root: str | Path) -> dict:
    """Load and check a cache manifest; G2LError if the folder is not a (compatible) cache."""
    layout = CacheLayout(root)
    if not layout.root.is_dir():
        raise G2LError(f"{layout.root} is not a folder; pass the folder `g2l cache build --out` wrote.")
    if not layout.manifest.is_file():
        raise G2LError(f"{layout.root} is not a g2l cache (no manifest.json); pass the folder "
                       "`g2l cache build --out` wrote.")
    try:
        manifest = json.loads(layout.manifest.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise G2LError(f"{layout.manifest} is unreadable ({exc}); the cache is damaged.") from None
    if manifest.get("format") != CACHE_FORMAT:
        raise G2LError(f"{layout.root} holds a manifest.json that is not a g2l cache's.")
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise G2LError(f"{layout.root} has cache schema version {manifest.get('schema_version')}; this "
                       f"g2l reads schema {SCHEMA_VERSION} (flat tile and target files, see "
                       "docs/cache-format.md). Rebuild the cache into a new --out folder with this g2l "
                       "(tiles are re-read from the slides), or use the g2l that built it.")
    return manifest


def write_text_atomic(path: Path, text: str) -> None:
    """Write a file via a temp file + rename, so a crash never leaves half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_manifest(root: str | Path, manifest: dict) -> None:
    """Write the manifest atomically."""
    write_text_atomic(CacheLayout(root).manifest, json.dumps(dict(manifest, updated=now_iso()), indent=2))


def dir_bytes(path: Path) -> int:
    """Bytes of every file below a folder."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())
