"""Read-only access to a finished cache: tables, tile bytes, targets, and view replay (stage two's API).

A reader never opens LMDB: it memory-maps the fixed-width index and reads tile bytes and target
rows with positioned reads, so any number of processes read one cache, also from a read-only
folder or another user's, and DataLoader workers share the index pages instead of copying them.
Views and tiles are addressed by their row in views.parquet / tiles.parquet.
"""

from __future__ import annotations

import os
from collections import OrderedDict

import numpy as np
import polars as pl

from g2l_cache.errors import G2LError
from g2l_cache.layout import CacheLayout, read_manifest
from g2l_cache.store import decode_target, read_stored_tile, target_row_bytes
from g2l_cache.tables import params_from_index
from g2l_cache.tile_codec import decode_tile
from g2l_cache.views import ViewParams, ViewPolicy, apply_view

MAX_OPEN_FILES = 256  # data files a reader keeps open per process (least recently used closed first)


class CacheReader:
    """One finished cache; handles open lazily per process and are never pickled to workers."""

    def __init__(self, root: str, require_complete: bool = True):
        self.layout = CacheLayout(root)
        self.manifest = read_manifest(root)
        if require_complete and self.manifest.get("status") not in ("complete", "partial"):
            raise G2LError(f"{root} is a half-built cache (status {self.manifest.get('status')!r}); "
                           "finish it with `g2l cache build` first.")
        for path in (self.layout.slides, self.layout.tiles, self.layout.views,
                     self.layout.view_index, self.layout.tile_index):
            if not path.exists():
                raise G2LError(f"{root} has no {path.relative_to(self.layout.root)}; finish it with "
                               "`g2l cache build`.")
        settings = self.manifest["settings"]
        self.policy = ViewPolicy(**settings["views"]["policy"])
        self.views_per_tile = settings["views"]["per_tile"]
        self.seed = settings["seed"]
        self._pid = None

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_pid"] = None  # a worker maps and opens its own
        for key in ("_views", "_tiles", "_fds"):
            state.pop(key, None)
        return state

    def _own(self) -> None:
        if self._pid != os.getpid():
            self._views = np.load(self.layout.view_index, mmap_mode="r")
            self._tiles = np.load(self.layout.tile_index, mmap_mode="r")
            counts = self.manifest.get("counts", {})
            if (len(self._views), len(self._tiles)) != (counts.get("views"), counts.get("tiles")):
                # A build extending the cache replaced the tables after this manifest was read.
                raise G2LError(f"{self.layout.root} changed while it was opened (a build is finishing "
                               "it); open it again.")
            self._fds: OrderedDict = OrderedDict()
            self._pid = os.getpid()

    # -- tables ------------------------------------------------------------------------------
    def slides(self) -> pl.DataFrame:
        return pl.read_parquet(self.layout.slides)

    def tiles(self) -> pl.DataFrame:
        return pl.read_parquet(self.layout.tiles)

    def views(self) -> pl.DataFrame:
        return pl.read_parquet(self.layout.views)

    # -- the index ---------------------------------------------------------------------------
    @property
    def view_index(self) -> np.ndarray:
        """Per view (row of views.parquet): tile, target row, k and the view parameters."""
        self._own()
        return self._views

    @property
    def tile_index(self) -> np.ndarray:
        """Per tile (row of tiles.parquet): shard, slide row, offset, length and CRC of its bytes."""
        self._own()
        return self._tiles

    @property
    def n_views(self) -> int:
        return len(self.view_index)

    @property
    def n_tiles(self) -> int:
        return len(self.tile_index)

    # -- teachers ----------------------------------------------------------------------------
    def teacher(self, key: str | None = None) -> dict:
        """A teacher's manifest entry by fingerprint or name; the only (or first complete) if None."""
        teachers = self.manifest["teachers"]
        if not teachers:
            raise G2LError(f"{self.layout.root} holds no teacher targets yet.")
        if key is None:
            complete = [t for t in teachers.values() if t.get("complete")]
            return (complete or list(teachers.values()))[0]
        return teachers[resolve_teacher(teachers, key)]

    # -- values ------------------------------------------------------------------------------
    def _fd(self, path) -> int:
        """An open descriptor of a data file, kept for the next read (at most MAX_OPEN_FILES at once:
        a cache of a thousand shards has two thousand data files)."""
        self._own()
        fd = self._fds.get(path)
        if fd is not None:
            self._fds.move_to_end(path)
            return fd
        while len(self._fds) >= MAX_OPEN_FILES:
            os.close(self._fds.popitem(last=False)[1])
        try:
            fd = self._fds[path] = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            raise G2LError(f"{path} is missing; the cache is incomplete (re-run "
                           "`g2l cache build`).") from None
        return fd

    def tile_bytes(self, tile: int) -> bytes:
        """Encoded bytes of tile `tile` (a row of tiles.parquet), checksum verified."""
        entry = self.tile_index[tile]
        if entry["offset"] < 0:
            raise G2LError(f"tile {tile} has no stored pixels yet; finish the cache with `g2l cache build`.")
        shard = int(entry["shard"])
        fd = self._fd(self.layout.tiles_file(shard))
        return read_stored_tile(fd, int(entry["offset"]), int(entry["length"]), int(entry["crc"]),
                                f"tile {tile} in shard {shard}")

    def tile_pixels(self, tile: int) -> np.ndarray:
        """Decoded stored pixels of one tile (HxWx3 uint8)."""
        return decode_tile(self.tile_bytes(tile))

    def target(self, teacher_fp: str, view: int) -> tuple[np.ndarray, np.ndarray]:
        """(embedding, mean patch token) of view `view` (a row of views.parquet), as fp16 arrays."""
        info = self.manifest["teachers"][teacher_fp]
        entry = self.view_index[view]
        shard = int(self.tile_index[entry["tile"]]["shard"])
        size = target_row_bytes(info["embed_dim"], info["patch_dim"])
        row = os.pread(self._fd(self.layout.targets_file(shard, teacher_fp)), size, int(entry["row"]) * size)
        if len(row) != size:
            raise G2LError(f"view {view} has no target of teacher {teacher_fp}; finish the cache with "
                           "`g2l cache build`.")
        return decode_target(row, info["embed_dim"], where=f"view {view} of teacher {teacher_fp} "
                             f"(shard {shard}, row {int(entry['row'])})")

    def view_params(self, view: int) -> ViewParams:
        return params_from_index(self.view_index[view], self.policy)

    def replay(self, view: int):
        """The exact [0, 1] input the teacher saw for view `view` (a row of views.parquet)."""
        return apply_view(self.tile_pixels(int(self.view_index[view]["tile"])), self.view_params(view))

    def close(self) -> None:
        """Close this process's file handles and maps."""
        if self._pid == os.getpid():
            for fd in self._fds.values():
                os.close(fd)
        self._pid = None
        for key in ("_views", "_tiles", "_fds"):
            self.__dict__.pop(key, None)


def resolve_teacher(teachers: dict, key: str) -> str:
    """The fingerprint of the cached teacher `key` names (a fingerprint, or a name only one teacher has)."""
    if key in teachers:
        return key
    named = [fp for fp, info in teachers.items() if info["spec"]["name"] == key]
    if len(named) > 1:
        listed = "; ".join(f"{fp} ({_teacher_summary(teachers[fp])})" for fp in named)
        raise G2LError(f"the cache holds {len(named)} teachers named {key!r}: {listed}. Name one by its "
                       "fingerprint (`g2l cache info` lists them).")
    if not named:
        raise G2LError(f"cache has no teacher {key!r}; it has {', '.join(teachers)}.")
    return named[0]


def _teacher_summary(info: dict) -> str:
    spec = info["spec"]
    source = spec.get("weights") or ("random init" if spec.get("random_init") else "hub weights")
    return f"{source}, {info.get('precision') or spec.get('precision') or 'precision not recorded'}, " \
           f"{info.get('n_targets', 0)} targets"
