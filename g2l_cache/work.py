"""The dataset a build feeds its teacher through DataLoader workers: chunks of a slide's views."""

from __future__ import annotations

import json
import os
from collections import OrderedDict

import numpy as np
import torch
from torch.utils.data import Dataset

from g2l_cache.errors import G2LError
from g2l_cache.layout import CacheLayout
from g2l_cache.slides import OpenedSlide, SlideSpec, open_slide
from g2l_cache.staging import local_copy
from g2l_cache.canary import view_digest
from g2l_cache.store import (TLOC_DTYPE, close_reader_env, get_value, read_stored_tile, shared_env, slide_key,
                             table_from_bytes, tiles_key, tloc_key, views_key)
from g2l_cache.tile_codec import decode_tile, encode_tile
from g2l_cache.tiling import TileRecord, TilingConfig, read_tiles
from g2l_cache.views import ViewParams, ViewPolicy, apply_view, view_param_names

TILE_CACHE_BYTES = 96 << 20  # OpenSlide's decoded tiles per loader worker (see wsi.OpenSlideReader)


class ChunkDataset(Dataset):
    """Item i: one chunk of a slide's views -> decoded, augmented view tensors and new tile bytes.

    A chunk is (shard, slide_id, start, stop, subset): the slide's views start..stop-1, or the
    listed view indices. Tile pixels come from the stored bytes when the tile is already in the
    cache; otherwise the tile is read from the slide and encoded, and the view is made from
    *decoding those bytes*, so the teacher sees exactly what a student replaying the cache sees.
    """

    def __init__(self, chunks: list[tuple], cache_root: str, tiling: TilingConfig,
                 policy: ViewPolicy, views_per_tile: int, seed: int, tile_format: str,
                 jpeg_quality: int):
        self.chunks = chunks
        self.layout = CacheLayout(cache_root)
        self.tiling, self.policy, self.k, self.seed = tiling, policy, views_per_tile, seed
        self.tile_format, self.jpeg_quality = tile_format, jpeg_quality
        self._slide_state: tuple | None = None
        self._slides: OrderedDict[str, OpenedSlide] = OrderedDict()
        self._fds: dict[int, tuple[int, int]] = {}
        self.staged: dict[str, str] = {}  # slide_id -> its local copy under --stage-dir, once complete

    def __len__(self) -> int:
        return len(self.chunks)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state.update(_slide_state=None, _slides=OrderedDict(), _fds={}, _shard=None)
        return state

    def _get(self, shard: int, key: bytes) -> bytes | None:
        self._use_shard(shard)
        return get_value(shared_env(self.layout.shard(shard)), key)

    def _use_shard(self, shard: int) -> None:
        """Chunks come shard by shard: the previous shard's index and tile file are closed when the
        next begins (a cache has up to thousands of shards; each open one holds descriptors)."""
        for other in [s for s in self._fds if s != shard]:
            pid, fd = self._fds.pop(other)
            if pid == os.getpid():
                os.close(fd)
        previous = getattr(self, "_shard", None)
        if previous is not None and previous != shard:
            close_reader_env(self.layout.shard(previous))
        self._shard = shard

    def _state(self, shard: int, slide_id: str) -> tuple[dict, list[TileRecord], np.ndarray, dict]:
        """The slide's record, tiles, tile locations and stored view parameters (read once per slide)."""
        if self._slide_state is None or self._slide_state[0] != slide_id:
            record = json.loads(self._get(shard, slide_key(slide_id)))
            t = table_from_bytes(self._get(shard, tiles_key(slide_id))).to_pydict()
            tiles = [TileRecord(*row) for row in zip(t["tile_id"], t["x"], t["y"], t["size0"],
                                                     t["tissue_fraction"])]
            tloc = np.frombuffer(self._get(shard, tloc_key(slide_id)), dtype=TLOC_DTYPE)
            # The parameters drawn when the slide was planned, as stored: a teacher added later (with
            # another numpy, whose random streams may differ) sees the same views as the first one.
            params = table_from_bytes(self._get(shard, views_key(slide_id))).select(view_param_names()).to_pydict()
            self._slide_state = (slide_id, record, tiles, tloc, params)
        return self._slide_state[1:]

    def view_params(self, params: dict, view: int) -> ViewParams:
        return ViewParams(**{name: values[view] for name, values in params.items()})

    def _stored_tile(self, shard: int, loc) -> bytes:
        self._use_shard(shard)
        entry = self._fds.get(shard)
        if entry is None or entry[0] != os.getpid():
            entry = (os.getpid(), os.open(self.layout.tiles_file(shard), os.O_RDONLY))
            self._fds[shard] = entry
        return read_stored_tile(entry[1], int(loc["offset"]), int(loc["length"]), int(loc["crc"]),
                                f"a stored tile in shard {shard}")

    def _slide(self, record: dict) -> OpenedSlide:
        sid = record["slide_id"]
        if sid not in self._slides:
            spec = SlideSpec.of_record(record)
            local = local_copy(self.staged[sid]) if sid in self.staged else None
            if local is not None:  # the same bytes, on local disk; the record keeps the original path
                spec = SlideSpec(spec.slide_id, local, spec.mpp_override)
            self._slides[sid] = open_slide(spec, cache_bytes=TILE_CACHE_BYTES)
            while len(self._slides) > 1:  # one cache at a time: a worker reads one slide's chunks after another
                self._slides.popitem(last=False)[1].reader.close()
        return self._slides[sid]

    def __getitem__(self, i: int) -> dict:
        return self.item(self.chunks[i])

    def item(self, chunk: tuple) -> dict:
        """One chunk's views (see the class), tile bytes stored for the first time and canary digest."""
        shard, slide_id, start, stop, subset = chunk
        indices = np.arange(start, stop) if subset is None else np.asarray(subset, dtype=np.int64)
        out = {"shard": shard, "slide_id": slide_id, "error": None, "indices": indices, "canary": None}
        tile = None
        try:
            record, tiles, tloc, stored_params = self._state(shard, slide_id)
            needed = list(dict.fromkeys(int(v) // self.k for v in indices.tolist()))
            data, new_tiles = {}, []
            for t_index in needed:  # stored tiles: their bytes
                if tloc["offset"][t_index] >= 0:
                    tile = tiles[t_index]
                    data[t_index] = self._stored_tile(shard, tloc[t_index])
            unread = [t for t in needed if t not in data]
            if unread:  # the rest from the slide, neighbours in one read, encoded as they are stored
                tile = tiles[unread[0]]
                for t_index, raw in zip(unread, read_tiles(self._slide(record), [tiles[t] for t in unread],
                                                             self.tiling)):
                    data[t_index] = encode_tile(raw, self.tile_format, self.jpeg_quality)
                    new_tiles.append((t_index, data[t_index]))
            # the teacher sees the view made from the stored bytes, decoded
            pixels = {t: decode_tile(data[t]) for t in needed}
            tensors = [apply_view(pixels[int(v) // self.k], self.view_params(stored_params, int(v)))
                       for v in indices.tolist()]
            # The slide's first view is its canary: the digest of exactly what the teacher sees.
            first = np.flatnonzero(indices == 0)
            out.update(views=torch.stack(tensors), new_tiles=new_tiles,
                       canary=view_digest(tensors[int(first[0])]) if len(first) else None)
        except G2LError as exc:
            out["error"] = str(exc)
        except Exception as exc:
            where = f"reading tile {tile.tile_id}" if tile is not None else "reopening the slide"
            out["error"] = (f"{where} failed: {type(exc).__name__}: {exc}; the slide opened and was "
                            "planned, so its pixel data is probably damaged (re-export or drop it)")
        return out
