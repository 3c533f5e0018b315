"""Read-only access to a finished cache: tables, tile bytes, targets, and view replay (stage two's API)."""

from __future__ import annotations

import numpy as np
import polars as pl
import torch

from g2l_cache.errors import G2LError
from g2l_cache.layout import CacheLayout, read_manifest
from g2l_cache.store import close_env, decode_target, get_value, shared_env, target_key, tile_key
from g2l_cache.tile_codec import decode_tile
from g2l_cache.views import ViewParams, ViewPolicy, apply_view


class CacheReader:
    """Opens shards read-only and lazily per process, so many readers (and workers) can share one cache."""

    def __init__(self, root: str, require_complete: bool = True):
        self.layout = CacheLayout(root)
        self.manifest = read_manifest(root)
        if require_complete and self.manifest.get("status") not in ("complete", "partial"):
            raise G2LError(f"{root} is a half-built cache (status {self.manifest.get('status')!r}); "
                           "finish it with `g2l cache build` first.")
        for name in ("slides", "tiles", "views"):
            if not getattr(self.layout, name).exists():
                raise G2LError(f"{root} has no {name}.parquet; finish it with `g2l cache build`.")
        settings = self.manifest["settings"]
        self.policy = ViewPolicy(**settings["views"]["policy"])
        self.views_per_tile = settings["views"]["per_tile"]
        self.seed = settings["seed"]

    # -- tables ------------------------------------------------------------------------------
    def slides(self) -> pl.DataFrame:
        return pl.read_parquet(self.layout.slides)

    def tiles(self) -> pl.DataFrame:
        return pl.read_parquet(self.layout.tiles)

    def views(self) -> pl.DataFrame:
        return pl.read_parquet(self.layout.views)

    # -- teachers ----------------------------------------------------------------------------
    def teacher(self, key: str | None = None) -> dict:
        """A teacher's manifest entry by fingerprint or name; the only (or first complete) if None."""
        teachers = self.manifest["teachers"]
        if not teachers:
            raise G2LError(f"{self.layout.root} holds no teacher targets yet.")
        if key is None:
            complete = [t for t in teachers.values() if t.get("complete")]
            return (complete or list(teachers.values()))[0]
        for fp, info in teachers.items():
            if key in (fp, info["spec"]["name"]):
                return info
        raise G2LError(f"cache has no teacher {key!r}; it has {', '.join(teachers)}.")

    # -- values ------------------------------------------------------------------------------
    def _get(self, shard: int, key: bytes) -> bytes:
        value = get_value(shared_env(self.layout.shard(shard)), key)
        if value is None:
            raise G2LError(f"cache shard {shard} has no value for {key.decode()}; the cache is "
                           "incomplete (re-run `g2l cache build`).")
        return value

    def tile_bytes(self, tile_id: str, shard: int) -> bytes:
        return self._get(shard, tile_key(tile_id))

    def tile_pixels(self, tile_id: str, shard: int) -> np.ndarray:
        """Decoded stored pixels of one tile (HxWx3 uint8)."""
        return decode_tile(self.tile_bytes(tile_id, shard))

    def target(self, teacher_fp: str, view_id: str, shard: int) -> tuple[np.ndarray, np.ndarray]:
        """(embedding, mean patch token) of one view, as fp16 arrays."""
        info = self.manifest["teachers"][teacher_fp]
        return decode_target(self._get(shard, target_key(teacher_fp, view_id)), info["embed_dim"])

    def replay(self, view_row: dict) -> torch.Tensor:
        """The exact [0, 1] input the teacher saw for a views.parquet row."""
        return self.replay_view(view_row["tile_id"], view_row["shard"], ViewParams.from_dict(view_row))

    def replay_view(self, tile_id: str, shard: int, params: ViewParams) -> torch.Tensor:
        """Stored pixels of a tile with one view applied: what teacher and student both see."""
        return apply_view(self.tile_pixels(tile_id, shard), params)

    def close(self) -> None:
        """Close this process's handles on the cache's shards."""
        for shard in range(self.manifest["n_shards"]):
            close_env(self.layout.shard(shard))
