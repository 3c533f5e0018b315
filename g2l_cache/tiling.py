"""Tissue detection at low resolution and a non-overlapping tile grid at a target mpp."""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass

import numpy as np

from g2l_cache.errors import G2LError
from g2l_cache.tia import import_tiatoolbox
from g2l_cache.slides import OpenedSlide, SlideError

TISSUE_METHODS = ("otsu", "morphological")
MIN_TISSUE_CONTRAST = 15.0  # grey levels between background and tissue means


@dataclass(frozen=True)
class TilingConfig:
    """Where tiles come from: target mpp and size, tissue rule, and optional seeded subsampling."""

    mpp: float = 0.5
    tile_size: int = 256
    tissue_threshold: float = 0.5
    tissue_method: str = "otsu"
    mask_mpp: float = 4.0
    max_tiles_per_slide: int | None = None

    def __post_init__(self) -> None:
        if self.mpp <= 0:
            raise G2LError(f"--mpp must be positive, got {self.mpp}.")
        if self.tile_size < 8:
            raise G2LError(f"--tile-size must be at least 8 px, got {self.tile_size}.")
        if not 0 <= self.tissue_threshold <= 1:
            raise G2LError(f"--tissue-threshold must be in [0, 1], got {self.tissue_threshold}.")
        if self.tissue_method not in TISSUE_METHODS:
            raise G2LError(f"--tissue-method must be one of {', '.join(TISSUE_METHODS)}.")
        if self.max_tiles_per_slide is not None and self.max_tiles_per_slide < 1:
            raise G2LError("--max-tiles-per-slide must be at least 1.")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class TileRecord:
    """One tile: level-0 top-left corner, level-0 footprint, and the tissue share under it."""

    tile_id: str
    x: int
    y: int
    size0: int
    tissue_fraction: float


@dataclass
class TilePlan:
    """A slide's selected tiles plus the pictures the QC image is drawn from."""

    tiles: list[TileRecord]
    thumbnail: np.ndarray
    mask: np.ndarray
    n_candidates: int


def make_tile_id(slide_id: str, x: int, y: int) -> str:
    """Stable tile id: the same slide and corner give the same id in any run or process."""
    return f"{slide_id}@{x}_{y}"


def tissue_mask(slide: OpenedSlide, cfg: TilingConfig) -> tuple[np.ndarray, np.ndarray]:
    """Thumbnail at `mask_mpp` and its boolean tissue mask (tiatoolbox maskers)."""
    import_tiatoolbox()
    from tiatoolbox.tools import tissuemask

    mask_mpp = max(cfg.mask_mpp, slide.mpp)
    thumb = slide.reader.slide_thumbnail(resolution=mask_mpp, units="mpp")
    if thumb.ndim == 2:
        thumb = np.stack([thumb] * 3, axis=-1)
    thumb = np.ascontiguousarray(thumb[..., :3]).astype(np.uint8)
    if cfg.tissue_method == "morphological":
        masker = tissuemask.MorphologicalMasker(mpp=mask_mpp)
    else:
        masker = tissuemask.OtsuTissueMasker()
    mask = masker.fit_transform([thumb])[0].astype(bool)
    gray = thumb.astype(np.float32).mean(axis=2)
    if mask.any() and (~mask).any():
        # Otsu always splits, even a blank slide's scanner noise: demand real contrast.
        if gray[~mask].mean() - gray[mask].mean() < MIN_TISSUE_CONTRAST:
            mask[:] = False
    return thumb, mask


def plan_tiles(slide: OpenedSlide, slide_id: str, cfg: TilingConfig, seed: int) -> TilePlan:
    """Grid the slide at the target mpp and keep tiles with enough tissue (seeded subset if capped)."""
    thumb, mask = tissue_mask(slide, cfg)
    size0 = cfg.tile_size * cfg.mpp / slide.mpp  # level-0 pixels per tile side
    nx, ny = int(slide.width // size0), int(slide.height // size0)
    if nx == 0 or ny == 0:
        raise SlideError(f"slide {slide_id} ({slide.width}x{slide.height} px at {slide.mpp} mpp) is "
                         f"smaller than one {cfg.tile_size}px tile at {cfg.mpp} mpp.")
    sx, sy = mask.shape[1] / slide.width, mask.shape[0] / slide.height
    integral = np.pad(mask.astype(np.float64).cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    candidates = []
    for j in range(ny):
        for i in range(nx):
            x, y = int(round(i * size0)), int(round(j * size0))
            x0, x1 = int(x * sx), max(int(x * sx) + 1, int(round((x + size0) * sx)))
            y0, y1 = int(y * sy), max(int(y * sy) + 1, int(round((y + size0) * sy)))
            x1, y1 = min(x1, mask.shape[1]), min(y1, mask.shape[0])
            area = (x1 - x0) * (y1 - y0)
            if area <= 0:
                continue
            inside = integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]
            fraction = float(inside / area)
            if fraction >= cfg.tissue_threshold and fraction > 0:
                candidates.append(TileRecord(make_tile_id(slide_id, x, y), x, y,
                                             int(round(size0)), round(fraction, 4)))
    if not candidates:
        raise SlideError(f"no tissue found in {slide_id} at tissue threshold "
                         f"{cfg.tissue_threshold}; check the slide or lower --tissue-threshold.")
    selected = candidates
    if cfg.max_tiles_per_slide is not None and len(candidates) > cfg.max_tiles_per_slide:
        rng = np.random.default_rng(_slide_seed(seed, slide_id))
        keep = np.sort(rng.choice(len(candidates), cfg.max_tiles_per_slide, replace=False))
        selected = [candidates[k] for k in keep]
    return TilePlan(selected, thumb, mask, len(candidates))


def read_tile(slide: OpenedSlide, tile: TileRecord, cfg: TilingConfig) -> np.ndarray:
    """Read one tile at the target mpp; tiatoolbox picks the best pyramid level and resizes the rest."""
    region = slide.reader.read_rect(location=(tile.x, tile.y), size=(cfg.tile_size, cfg.tile_size),
                                    resolution=cfg.mpp, units="mpp")
    region = np.asarray(region)
    if region.ndim == 2:
        region = np.stack([region] * 3, axis=-1)
    if region.shape[:2] != (cfg.tile_size, cfg.tile_size):
        raise SlideError(f"tile {tile.tile_id} came back {region.shape[:2]}, not "
                         f"{cfg.tile_size}x{cfg.tile_size}.")
    return np.ascontiguousarray(region[..., :3]).astype(np.uint8)


def _slide_seed(seed: int, slide_id: str) -> int:
    digest = hashlib.blake2b(f"{seed}|tiles|{slide_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")
