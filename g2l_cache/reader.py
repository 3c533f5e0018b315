"""Read-only access to a finished cache: tables, tile bytes, targets, and view replay (stage two's API)."""

from __future__ import annotations

import os

import lmdb
import numpy as np
import polars as pl
import torch

from g2l_cache.errors import G2LError
from g2l_cache.layout import CacheLayout, read_manifest
from g2l_cache.store import decode_target, open_env, target_key, tile_key, unpack
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
        self._envs: dict[int, lmdb.Environment] = {}
        self._pid = os.getpid()

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
    def _env(self, shard: int) -> lmdb.Environment:
        if os.getpid() != self._pid:  # forked worker: never reuse the parent's environments
            self._envs, self._pid = {}, os.getpid()
        if shard not in self._envs:
            self._envs[shard] = open_env(self.layout.shard(shard), readonly=True)
        return self._envs[shard]

    def _get(self, shard: int, key: bytes) -> bytes:
        env = self._env(shard)
        try:
            with env.begin(buffers=False) as txn:
                value = txn.get(key)
        except lmdb.MapResizedError:
            env.set_mapsize(0)
            with env.begin() as txn:
                value = txn.get(key)
        if value is None:
            raise G2LError(f"cache shard {shard} has no value for {key.decode()}; the cache is "
                           "incomplete (re-run `g2l cache build`).")
        return unpack(value, key)

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
        pixels = self.tile_pixels(view_row["tile_id"], view_row["shard"])
        return apply_view(pixels, ViewParams.from_dict(view_row))

    def __getstate__(self) -> dict:
        return dict(self.__dict__, _envs={})

    def close(self) -> None:
        for env in self._envs.values():
            env.close()
        self._envs = {}
