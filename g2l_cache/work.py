"""The two datasets a build feeds through DataLoader workers: slide planning and view chunks."""

from __future__ import annotations

import json
import traceback
from collections import OrderedDict

import torch
from torch.utils.data import Dataset

from g2l_cache.errors import G2LError
from g2l_cache.layout import CacheLayout
from g2l_cache.qc import write_qc_png
from g2l_cache.slides import OpenedSlide, SlideSpec, file_fingerprint, open_slide
from g2l_cache.store import get_value, shared_env, slide_key, tile_key
from g2l_cache.tile_codec import decode_tile, encode_tile
from g2l_cache.tiling import TileRecord, TilingConfig, make_tile_id, plan_tiles, read_tile
from g2l_cache.views import ViewPolicy, apply_view, sample_view


def view_id(record: dict, tile_index: int, k: int) -> str:
    """Stable id of view k of the tile_index-th tile of a slide record."""
    x, y = record["tiles"][tile_index][:2]
    return make_view_id(make_tile_id(record["slide_id"], x, y), k)


def make_view_id(tile_id: str, k: int) -> str:
    return f"{tile_id}#{k}"


def record_tile(record: dict, tile_index: int) -> TileRecord:
    x, y, size0, tissue = record["tiles"][tile_index]
    return TileRecord(make_tile_id(record["slide_id"], x, y), x, y, size0, tissue)


def spec_of(record: dict) -> SlideSpec:
    return SlideSpec(record["slide_id"], record["path"], record.get("mpp_override"))


class PlanDataset(Dataset):
    """Item i: plan slide i (open, tissue mask, tiles, QC picture) and return its slide record."""

    def __init__(self, specs: list[SlideSpec], tiling: TilingConfig, seed: int, cache_root: str):
        self.specs, self.tiling, self.seed, self.cache_root = specs, tiling, seed, cache_root

    def __len__(self) -> int:
        return len(self.specs)

    def __getitem__(self, i: int) -> dict:
        spec = self.specs[i]
        record = {"slide_id": spec.slide_id, "path": spec.path, "mpp_override": spec.mpp_override,
                  "file": file_fingerprint(spec.path), "read_mpp": self.tiling.mpp,
                  "tile_px": self.tiling.tile_size, "status": "failed", "error": None,
                  "mpp": None, "mpp_source": None, "width": None, "height": None, "reader": None,
                  "n_candidates": 0, "tiles": []}
        try:
            slide = open_slide(spec)
            record.update(mpp=slide.mpp, mpp_source=slide.mpp_source, width=slide.width,
                          height=slide.height, reader=slide.reader_name)
            plan = plan_tiles(slide, spec.slide_id, self.tiling, self.seed)
            write_qc_png(CacheLayout(self.cache_root).qc(spec.slide_id), plan, slide.width,
                         spec.slide_id)
            record.update(status="ok", n_candidates=plan.n_candidates,
                          tiles=[[t.x, t.y, t.size0, t.tissue_fraction] for t in plan.tiles])
        except G2LError as exc:
            record["error"] = str(exc)
        except Exception as exc:  # one bad slide never sinks a run
            record["error"] = f"{type(exc).__name__}: {exc}"
        return record


class ChunkDataset(Dataset):
    """Item i: one chunk of a slide's views -> decoded, augmented view tensors and new tile bytes.

    Tile pixels come from the stored bytes when the tile is already in the cache; otherwise the tile
    is read from the slide and encoded, and the view is made from *decoding those bytes*, so the
    teacher sees exactly what a student replaying the cache will see.
    """

    def __init__(self, chunks: list[tuple], cache_root: str, tiling: TilingConfig,
                 policy: ViewPolicy, views_per_tile: int, seed: int, tile_format: str,
                 jpeg_quality: int):
        self.chunks = chunks
        self.layout = CacheLayout(cache_root)
        self.tiling, self.policy, self.k, self.seed = tiling, policy, views_per_tile, seed
        self.tile_format, self.jpeg_quality = tile_format, jpeg_quality
        self._records: dict[str, dict] = {}
        self._slides: OrderedDict[str, OpenedSlide] = OrderedDict()

    def __len__(self) -> int:
        return len(self.chunks)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state.update(_records={}, _slides=OrderedDict())
        return state

    def _get(self, shard: int, key: bytes) -> bytes | None:
        return get_value(shared_env(self.layout.shard(shard)), key)

    def _record(self, shard: int, slide_id: str) -> dict:
        if slide_id not in self._records:
            self._records = {slide_id: json.loads(self._get(shard, slide_key(slide_id)))}
        return self._records[slide_id]

    def _slide(self, record: dict) -> OpenedSlide:
        sid = record["slide_id"]
        if sid not in self._slides:
            self._slides[sid] = open_slide(spec_of(record))
            while len(self._slides) > 4:
                self._slides.popitem(last=False)
        return self._slides[sid]

    def __getitem__(self, i: int) -> dict:
        shard, slide_id, start, stop, subset = self.chunks[i]
        out = {"shard": shard, "slide_id": slide_id, "error": None}
        try:
            record = self._record(shard, slide_id)
            indices = list(range(start, stop)) if subset is None else [int(v) for v in subset]
            pixels, new_tiles = {}, []
            tensors, view_ids = [], []
            for v in indices:
                t_index, k = divmod(v, self.k)
                tile = record_tile(record, t_index)
                if t_index not in pixels:
                    data = self._get(shard, tile_key(tile.tile_id))
                    if data is None:
                        raw = read_tile(self._slide(record), tile, self.tiling)
                        data = encode_tile(raw, self.tile_format, self.jpeg_quality)
                        new_tiles.append((tile.tile_id, data))
                    pixels[t_index] = decode_tile(data)
                params = sample_view(self.seed, tile.tile_id, k, self.policy)
                tensors.append(apply_view(pixels[t_index], params))
                view_ids.append(make_view_id(tile.tile_id, k))
            out.update(views=torch.stack(tensors), view_ids=view_ids, new_tiles=new_tiles)
        except G2LError as exc:
            out["error"] = str(exc)
        except Exception as exc:
            out["error"] = f"{type(exc).__name__}: {exc} ({traceback.format_exc(limit=1).strip().splitlines()[-1]})"
        return out
