"""The two datasets a build feeds through DataLoader workers: slide planning and view chunks."""

from __future__ import annotations

import json
import os
from collections import OrderedDict

import numpy as np
import torch
from torch.utils.data import Dataset

from g2l_cache.errors import G2LError
from g2l_cache.layout import CacheLayout
from g2l_cache.qc import write_qc_png
from g2l_cache.slides import OpenedSlide, SlideSpec, file_fingerprint, open_slide
from g2l_cache.canary import view_digest
from g2l_cache.store import (TLOC_DTYPE, get_value, read_stored_tile, shared_env, slide_key, table_from_bytes,
                             table_to_bytes, tiles_key, tloc_key, views_key)
from g2l_cache.tables import slide_tables
from g2l_cache.tile_codec import decode_tile, encode_tile
from g2l_cache.tiling import TileRecord, TilingConfig, plan_tiles, read_tile
from g2l_cache.views import ViewParams, ViewPolicy, apply_view, view_param_names


def spec_of(record: dict) -> SlideSpec:
    return SlideSpec(record["slide_id"], record["path"], record.get("mpp_override"))


class PlanDataset(Dataset):
    """Item i: plan slide i (open, tissue mask, tiles, QC picture) and return its slide record."""

    def __init__(self, specs: list[SlideSpec], tiling: TilingConfig, seed: int, cache_root: str,
                 policy: ViewPolicy, views_per_tile: int):
        self.specs, self.tiling, self.seed, self.cache_root = specs, tiling, seed, cache_root
        self.policy, self.k = policy, views_per_tile

    def __len__(self) -> int:
        return len(self.specs)

    def __getitem__(self, i: int) -> dict:
        spec = self.specs[i]
        record = {"slide_id": spec.slide_id, "path": spec.path, "mpp_override": spec.mpp_override,
                  "file": file_fingerprint(spec.path), "read_mpp": self.tiling.mpp,
                  "tile_px": self.tiling.tile_size, "status": "failed", "error": None,
                  "mpp": None, "mpp_source": None, "width": None, "height": None, "reader": None,
                  "n_candidates": 0, "n_tiles": 0, "n_views": 0, "tables": None}
        try:
            slide = open_slide(spec)
            record.update(mpp=slide.mpp, mpp_source=slide.mpp_source, width=slide.width,
                          height=slide.height, reader=slide.reader_name)
            plan = plan_tiles(slide, spec.slide_id, self.tiling, self.seed)
            write_qc_png(CacheLayout(self.cache_root).qc(spec.slide_id), plan, slide.width,
                         spec.slide_id)
            tiles, views = slide_tables(spec.slide_id, plan.tiles, self.tiling.mpp,
                                        self.tiling.tile_size, self.k, self.seed, self.policy)
            record.update(status="ok", n_candidates=plan.n_candidates, n_tiles=len(plan.tiles),
                          n_views=len(plan.tiles) * self.k,
                          tables=(table_to_bytes(tiles), table_to_bytes(views)))
        except G2LError as exc:
            record["error"] = str(exc)
        except Exception as exc:  # one bad slide never sinks a run
            record["error"] = (f"opening and planning the slide failed ({type(exc).__name__}: {exc}); the "
                               "file may be truncated or damaged")
        return record


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

    def __len__(self) -> int:
        return len(self.chunks)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state.update(_slide_state=None, _slides=OrderedDict(), _fds={})
        return state

    def _get(self, shard: int, key: bytes) -> bytes | None:
        return get_value(shared_env(self.layout.shard(shard)), key)

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
        entry = self._fds.get(shard)
        if entry is None or entry[0] != os.getpid():
            entry = (os.getpid(), os.open(self.layout.tiles_file(shard), os.O_RDONLY))
            self._fds[shard] = entry
        return read_stored_tile(entry[1], int(loc["offset"]), int(loc["length"]), int(loc["crc"]),
                                f"a stored tile in shard {shard}")

    def _slide(self, record: dict) -> OpenedSlide:
        sid = record["slide_id"]
        if sid not in self._slides:
            self._slides[sid] = open_slide(spec_of(record))
            while len(self._slides) > 4:
                self._slides.popitem(last=False)
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
            pixels, new_tiles, tensors = {}, [], []
            for v in indices.tolist():
                t_index, k = divmod(v, self.k)
                tile = tiles[t_index]
                if t_index not in pixels:
                    if tloc["offset"][t_index] >= 0:
                        data = self._stored_tile(shard, tloc[t_index])
                    else:
                        raw = read_tile(self._slide(record), tile, self.tiling)
                        data = encode_tile(raw, self.tile_format, self.jpeg_quality)
                        new_tiles.append((t_index, data))
                    pixels[t_index] = decode_tile(data)
                tensors.append(apply_view(pixels[t_index], self.view_params(stored_params, v)))
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
