"""Where things live inside a cache folder, and the manifest that makes a folder a cache."""

from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from pathlib import Path

from g2l_cache.errors import G2LError

SCHEMA_VERSION = 1
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

    def shard(self, index: int) -> Path:
        return self.shards_dir / f"{index:05d}.lmdb"

    def qc(self, slide_id: str) -> Path:
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in slide_id)
        return self.qc_dir / f"{safe}.png"


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
        raise G2LError(f"cache schema version {manifest.get('schema_version')} is not supported by "
                       f"this g2l (schema {SCHEMA_VERSION}); rebuild the cache or use a matching g2l.")
    return manifest


def write_text_atomic(path: Path, text: str) -> None:
    """Write a file via a temp file + rename, so a crash never leaves half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_manifest(root: str | Path, manifest: dict) -> None:
    """Write the manifest atomically."""
    write_text_atomic(CacheLayout(root).manifest, json.dumps(dict(manifest, updated=now_iso()), indent=2))


def dir_bytes(path: Path) -> int:
    """Bytes of every file below a folder."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())
