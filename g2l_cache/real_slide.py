"""A real-size test slide: a pyramidal, tiled, JPEG BigTIFF of H&E texture, written tile by tile.

80,000 x 60,000 px at 0.25 mpp (what a 40x scanner writes) with ~40 % tissue is the size the
real-size benchmark measures; no level is ever held whole in memory. The texture is the real H&E
image that ships with tiatoolbox, mirrored into a seamless field; tissue is a smooth random field
thresholded at the requested share, and every pyramid level is rendered from the same fields.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from g2l_cache.demo_slides import source_he_image

TILE = 512
BACKGROUND = 242


def _tissue_field(width: int, height: int, share: float, seed: int, step: int = 256) -> tuple[np.ndarray, int]:
    """A coarse smooth field (one value per `step` level-0 px) whose positive part covers `share` of the
    slide; tiles sample it bilinearly, so tissue edges are smooth at every level."""
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(seed)
    h, w = -(-height // step), -(-width // step)
    noise = gaussian_filter(rng.standard_normal((h, w)), sigma=max(h, w) / 18, mode="reflect")
    yy, xx = np.mgrid[0:h, 0:w]
    border = np.minimum.reduce([yy, xx, h - 1 - yy, w - 1 - xx]) / (0.06 * max(h, w))
    noise = noise - 2 * noise.std() * np.clip(1 - border, 0, 1)  # glass around the edges
    return noise - np.quantile(noise, 1 - share), step


def _bilinear(field: np.ndarray, y: np.ndarray, x: np.ndarray) -> np.ndarray:
    y0 = np.clip(np.floor(y).astype(int), 0, field.shape[0] - 2)
    x0 = np.clip(np.floor(x).astype(int), 0, field.shape[1] - 2)
    wy, wx = np.clip(y - y0, 0, 1)[:, None], np.clip(x - x0, 0, 1)[None, :]
    top = field[y0][:, x0] * (1 - wx) + field[y0][:, x0 + 1] * wx
    bottom = field[y0 + 1][:, x0] * (1 - wx) + field[y0 + 1][:, x0 + 1] * wx
    return top * (1 - wy) + bottom * wy


def _mirrored(texture: np.ndarray, y: np.ndarray, x: np.ndarray) -> np.ndarray:
    th, tw = texture.shape[:2]
    yy, xx = y % (2 * th), x % (2 * tw)
    yy = np.where(yy >= th, 2 * th - 1 - yy, yy)
    xx = np.where(xx >= tw, 2 * tw - 1 - xx, xx)
    return texture[yy[:, None], xx[None, :]]


def _level_tiles(width: int, height: int, factor: int, texture: np.ndarray, tissue: np.ndarray, step: int,
                 seed: int):
    """The tiles of the level `factor` times smaller than level 0, row by row."""
    from PIL import Image

    lw, lh = -(-width // factor), -(-height // factor)
    # the source image is ~0.5 mpp: at level 0 (0.25 mpp) one source pixel spans 2 px
    scale = 2.0 / factor
    tex = texture if scale == 1 else np.asarray(Image.fromarray(texture).resize(
        (max(8, round(texture.shape[1] * scale)), max(8, round(texture.shape[0] * scale))), Image.Resampling.LANCZOS))
    rng = np.random.default_rng([seed, factor])
    for ty in range(0, lh, TILE):
        for tx in range(0, lw, TILE):
            ys, xs = np.arange(ty, ty + TILE), np.arange(tx, tx + TILE)
            inside = _bilinear(tissue, (ys + 0.5) * factor / step - 0.5, (xs + 0.5) * factor / step - 0.5) > 0
            tile = np.full((TILE, TILE, 3), BACKGROUND, np.uint8)
            if inside.any():
                tile[inside] = _mirrored(tex, ys, xs)[inside]
            noise = rng.integers(-3, 4, (TILE, TILE, 1), dtype=np.int16)
            yield np.clip(tile.astype(np.int16) + noise, 0, 255).astype(np.uint8)


def write_real_slide(path: str | Path, width: int = 80_000, height: int = 60_000, mpp: float = 0.25,
                     tissue_share: float = 0.4, seed: int = 0, jpeg_quality: int = 85) -> Path:
    """Write the slide (levels down to ~2,000 px on the long side), tile by tile; returns its path."""
    import tifffile

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    texture = source_he_image()
    tissue, step = _tissue_field(width, height, tissue_share, seed)
    factors = [1]
    while max(width, height) // (factors[-1] * 2) >= 2000:
        factors.append(factors[-1] * 2)
    tmp = path.with_name(path.name + ".tmp")
    with tifffile.TiffWriter(tmp, bigtiff=True) as tif:
        for i, f in enumerate(factors):
            shape = (-(-height // f), -(-width // f), 3)
            level_mpp = mpp * f
            tif.write(_level_tiles(width, height, f, texture, tissue, step, seed), shape=shape, dtype=np.uint8,
                      tile=(TILE, TILE), compression="jpeg", compressionargs={"level": jpeg_quality},
                      photometric="rgb", subfiletype=1 if i else 0, metadata=None,
                      resolution=(1e4 / level_mpp, 1e4 / level_mpp), resolutionunit="CENTIMETER")
    tmp.replace(path)
    return path
