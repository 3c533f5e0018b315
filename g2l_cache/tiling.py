"""Tissue detection at low resolution and a non-overlapping tile grid at a target mpp."""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass

import numpy as np

from g2l_cache.errors import G2LError
from g2l_cache.slides import OpenedSlide, SlideError
from g2l_cache.wsi import read_tile_run, thumbnail_bands, thumbnail_size

TISSUE_METHODS = ("otsu", "morphological")
MIN_TISSUE_CONTRAST = 15.0  # grey levels between background and tissue means
PREVIEW_LONG_SIDE = 2048  # the QC picture's long side at most (the preview kept with the plan)


@dataclass(frozen=True)
class TilingConfig:
    """Where tiles come from: target mpp and size, tissue rule, and optional seeded subsampling."""

    mpp: float = 0.5
    tile_size: int = 256
    tissue_threshold: float = 0.5
    tissue_method: str = "otsu"
    mask_mpp: float = 4.0
    max_tiles_per_slide: int | None = None
    annotations: bool = False  # tiles limited to annotated regions (--annotations)
    annotation_classes: tuple[str, ...] = ()  # of these classes only (empty: every region)

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
        """The settings a cache records (annotation keys only when used: older caches have none)."""
        out = asdict(self)
        if not self.annotations:
            del out["annotations"], out["annotation_classes"]
        else:
            out["annotation_classes"] = list(self.annotation_classes)
        return out


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
    """A slide's selected tiles plus the pictures the QC image is drawn from: a preview of the slide
    (at most PREVIEW_LONG_SIDE px) and the tissue mask (at mask_mpp)."""

    tiles: list[TileRecord]
    thumbnail: np.ndarray
    mask: np.ndarray
    n_candidates: int
    region: np.ndarray | None = None  # the annotated regions at the mask's size (--annotations)


def make_tile_id(slide_id: str, x: int, y: int) -> str:
    """Stable tile id: the same slide and corner give the same id in any run or process."""
    return f"{slide_id}@{x}_{y}"


def tissue_mask(slide: OpenedSlide, cfg: TilingConfig, preview_long_side: int = PREVIEW_LONG_SIDE
                ) -> tuple[np.ndarray, np.ndarray]:
    """A preview of the slide (at most `preview_long_side` px) and its boolean tissue mask at `mask_mpp`:
    Otsu's threshold on grey levels, or that plus small-region removal and dilation ("morphological").
    The slide is read in bands: only the grey levels are kept at mask resolution (an 80,000 px slide
    at 4 mpp: 19 M pixels, one byte each)."""
    mask_mpp = max(cfg.mask_mpp, slide.mpp)
    width, height = thumbnail_size(slide.width, slide.height, mask_mpp / slide.mpp)
    reduce = max(1, -(-max(width, height) // preview_long_side))
    grey = np.empty((height, width), dtype=np.uint8)
    previews = []
    for top, band in thumbnail_bands(slide.reader, slide.width, slide.height, mask_mpp / slide.mpp,
                                     rows=512 * reduce):
        band = np.ascontiguousarray(band[..., :3]).astype(np.uint8)
        grey[top:top + len(band)] = grey_levels(band)
        previews.append(_reduced(band, reduce))
    mask = grey < otsu_threshold(grey)
    if cfg.tissue_method == "morphological":
        mask = _morphological(mask, mask_mpp)
    if mask.any() and (~mask).any():
        # Otsu always splits, even a blank slide's scanner noise: demand real contrast (grey levels).
        import cv2

        n_in, n = int(np.count_nonzero(mask)), mask.size
        tissue = cv2.mean(grey, mask=mask.view(np.uint8))[0]
        glass = (cv2.mean(grey)[0] * n - tissue * n_in) / (n - n_in)
        if glass - tissue < MIN_TISSUE_CONTRAST:
            mask[:] = False
    return np.concatenate(previews, axis=0), mask


def _reduced(rgb: np.ndarray, factor: int) -> np.ndarray:
    """Box-averaged by an integer factor (a band of rows that is a multiple of it reduces exactly)."""
    if factor == 1:
        return rgb
    from PIL import Image

    return np.asarray(Image.fromarray(rgb).reduce(factor))


def grey_levels(rgb: np.ndarray) -> np.ndarray:
    """uint8 grey levels as tiatoolbox's maskers compute them (OpenCV's RGB2GRAY)."""
    import cv2

    return cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2GRAY)


def otsu_threshold(grey: np.ndarray) -> int:
    """Otsu's threshold of uint8 grey levels (the histogram over the image's own range, as skimage's)."""
    import cv2

    full = cv2.calcHist([np.ascontiguousarray(grey)], [0], None, [256], [0, 256]).ravel().astype(np.int64)
    present = np.flatnonzero(full)
    lo, hi = int(present[0]), int(present[-1])
    if lo == hi:
        return lo
    counts = full[lo:hi + 1]
    centres = np.arange(lo, hi + 1)
    w1, w2 = np.cumsum(counts), np.cumsum(counts[::-1])[::-1]
    m1 = np.cumsum(counts * centres) / w1
    m2 = (np.cumsum((counts * centres)[::-1]) / w2[::-1])[::-1]
    between = w1[:-1] * w2[1:] * (m1[:-1] - m2[1:]) ** 2
    return int(centres[np.argmax(between)])


def _morphological(mask: np.ndarray, mpp: float) -> np.ndarray:
    """tiatoolbox's MorphologicalMasker after the threshold: drop regions smaller than an ellipse
    32 um across, then dilate by it."""
    import cv2

    side = max(1, int(round(32 / mpp)))
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (side, side))
    m = mask.astype(np.uint8)
    _, labels, stats, _ = cv2.connectedComponentsWithStats(m, connectivity=8)
    small = np.flatnonzero(stats[1:, -1] < int(kernel.sum())) + 1
    m[np.isin(labels, small)] = 0
    return cv2.morphologyEx(m, cv2.MORPH_DILATE, kernel).astype(bool)


def plan_tiles(slide: OpenedSlide, slide_id: str, cfg: TilingConfig, seed: int, regions: list | None = None
               ) -> TilePlan:
    """Grid the slide at the target mpp and keep tiles with enough tissue (seeded subset if capped);
    with annotated `regions` (shapely polygons, level-0 px), enough tissue inside them."""
    thumb, mask = tissue_mask(slide, cfg)
    region = None
    if regions is not None:
        from g2l_cache.annotations import region_mask

        region = region_mask(regions, mask.shape, slide.width, slide.height)
    covered = mask if region is None else mask & region
    size0 = cfg.tile_size * cfg.mpp / slide.mpp  # level-0 pixels per tile side
    nx, ny = int(slide.width // size0), int(slide.height // size0)
    if nx == 0 or ny == 0:
        raise SlideError(f"slide {slide_id} ({slide.width}x{slide.height} px at {slide.mpp} mpp) is "
                         f"smaller than one {cfg.tile_size}px tile at {cfg.mpp} mpp.")
    sx, sy = mask.shape[1] / slide.width, mask.shape[0] / slide.height
    # every grid cell at once: its level-0 corner, its box on the mask, the tissue share inside
    xs = np.array([int(round(i * size0)) for i in range(nx)], dtype=np.int64)
    ys = np.array([int(round(j * size0)) for j in range(ny)], dtype=np.int64)
    x0, y0 = (xs * sx).astype(np.int64), (ys * sy).astype(np.int64)
    x1 = np.minimum(np.maximum(x0 + 1, np.round((xs + size0) * sx).astype(np.int64)), mask.shape[1])
    y1 = np.minimum(np.maximum(y0 + 1, np.round((ys + size0) * sy).astype(np.int64)), mask.shape[0])
    area = (y1 - y0)[:, None] * (x1 - x0)[None, :]
    inside = box_sums(covered, y0, y1, x0, x1)
    with np.errstate(invalid="ignore", divide="ignore"):
        fraction = np.where(area > 0, inside / np.maximum(area, 1), 0.0)
    keep = (area > 0) & (fraction >= cfg.tissue_threshold) & (fraction > 0)
    rows, cols = np.nonzero(keep)  # row by row, as the plan orders tiles
    side = int(round(size0))
    candidates = [TileRecord(make_tile_id(slide_id, int(xs[i]), int(ys[j])), int(xs[i]), int(ys[j]), side,
                             round(float(fraction[j, i]), 4)) for j, i in zip(rows.tolist(), cols.tolist())]
    if not candidates:
        where = " inside its annotated regions" if region is not None else ""
        raise SlideError(f"no tissue found in {slide_id}{where} at tissue threshold "
                         f"{cfg.tissue_threshold}; check the slide or lower --tissue-threshold.")
    selected = candidates
    if cfg.max_tiles_per_slide is not None and len(candidates) > cfg.max_tiles_per_slide:
        rng = np.random.default_rng(_slide_seed(seed, slide_id))
        keep = np.sort(rng.choice(len(candidates), cfg.max_tiles_per_slide, replace=False))
        selected = [candidates[k] for k in keep]
    return TilePlan(selected, thumb, mask, len(candidates), region)


def box_sums(mask: np.ndarray, y0: np.ndarray, y1: np.ndarray, x0: np.ndarray, x1: np.ndarray) -> np.ndarray:
    """True pixels of `mask` in every box [y0[j], y1[j]) x [x0[i], x1[i]) (a ny x nx int64 array): the
    summed-area table at the boxes' rows only, never a whole mask-sized one (an 80,000 px slide's
    mask at 4 mpp is 19 M pixels: its full int64 table alone would be 150 MB)."""
    rows = np.unique(np.concatenate([y0, y1]))
    segments = [np.zeros(mask.shape[1], dtype=np.int64)]
    previous = 0
    for row in rows[rows > 0].tolist():
        segments.append(mask[previous:row].sum(axis=0, dtype=np.int64))
        previous = row
    prefix = np.cumsum(np.stack(segments), axis=0)  # prefix[k]: column sums of the rows above rows[k]
    if rows[0] != 0:
        prefix = prefix[1:]
    table = np.zeros((len(rows), mask.shape[1] + 1), dtype=np.int64)
    np.cumsum(prefix, axis=1, out=table[:, 1:])
    r0, r1 = np.searchsorted(rows, y0), np.searchsorted(rows, y1)
    return table[r1][:, x1] - table[r0][:, x1] - table[r1][:, x0] + table[r0][:, x0]


def read_tile(slide: OpenedSlide, tile: TileRecord, cfg: TilingConfig) -> np.ndarray:
    """Read one tile at the target mpp (from the pyramid level that needs no upsampling)."""
    return read_tiles(slide, [tile], cfg)[0]


def read_tiles(slide: OpenedSlide, tiles: list[TileRecord], cfg: TilingConfig) -> list[np.ndarray]:
    """Read tiles at the target mpp, in the order given; horizontal neighbours in one read each run."""
    size0 = cfg.tile_size * cfg.mpp / slide.mpp
    out: list[np.ndarray | None] = [None] * len(tiles)
    rows: dict[int, list[int]] = {}
    for i, t in enumerate(tiles):
        rows.setdefault(t.y, []).append(i)
    for y, members in rows.items():
        members.sort(key=lambda i: tiles[i].x)
        pixels = read_tile_run(slide.reader, [tiles[i].x for i in members], y, size0, cfg.tile_size)
        for i, region in zip(members, pixels):
            if region.shape[:2] != (cfg.tile_size, cfg.tile_size):
                raise SlideError(f"tile {tiles[i].tile_id} came back {region.shape[:2]}, not "
                                 f"{cfg.tile_size}x{cfg.tile_size}.")
            out[i] = np.ascontiguousarray(region[..., :3]).astype(np.uint8)
    return out


def _slide_seed(seed: int, slide_id: str) -> int:
    digest = hashlib.blake2b(f"{seed}|tiles|{slide_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")
