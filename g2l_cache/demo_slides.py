"""Demo whole-slide images made from the real H&E tile that ships with tiatoolbox.

Each slide is a pyramidal, tiled, JPEG-compressed TIFF with mpp in its resolution tags: a mosaic of
rotated/flipped crops of the H&E image on a white background, styled per "centre" (stain shift,
brightness, blur, JPEG quality, scan resolution) so that tissue detection and robustness metrics
have something real to work on.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from g2l_cache.errors import G2LError


@dataclass(frozen=True)
class CentreStyle:
    """How one centre's stain and scanner differ from the source image."""

    name: str
    hed_shift: tuple[float, float, float]  # added to (H, E, D) optical densities
    brightness: float  # multiplicative
    blur_sigma: float  # scanner focus blur, in level-0 pixels
    jpeg_quality: int
    mpp: float  # scan resolution of level 0


CENTRES: tuple[CentreStyle, ...] = (
    CentreStyle("centre-a", (0.0, 0.0, 0.0), 1.00, 0.0, 90, 0.5),
    CentreStyle("centre-b", (0.08, -0.05, 0.0), 0.93, 0.8, 80, 0.5),
    CentreStyle("centre-c", (-0.05, 0.10, 0.02), 1.05, 0.4, 70, 0.25),
    CentreStyle("centre-d", (0.04, 0.06, -0.02), 0.97, 1.2, 60, 0.5),
)


def source_he_image() -> np.ndarray:
    """The 1000x1000 RGB H&E image shipped inside tiatoolbox."""
    from importlib.util import find_spec

    from PIL import Image

    spec = find_spec("tiatoolbox")  # its file only: importing it would set up its logging
    path = Path(spec.origin if spec and spec.origin else "tiatoolbox/__init__.py").parent / "data" / "target_image.png"
    if not path.exists():
        raise G2LError(f"tiatoolbox's sample image is missing at {path}; reinstall tiatoolbox.")
    return np.asarray(Image.open(path).convert("RGB"))


def apply_centre_style(rgb: np.ndarray, style: CentreStyle) -> np.ndarray:
    """Shift stain in HED space, scale brightness and blur, as one centre's scanner would."""
    from skimage.color import hed2rgb, rgb2hed
    from scipy.ndimage import gaussian_filter

    out = rgb.astype(np.float32) / 255.0
    if any(style.hed_shift):
        hed = rgb2hed(out)
        hed += np.asarray(style.hed_shift, dtype=np.float32) * hed.max(axis=(0, 1), keepdims=True)
        out = hed2rgb(hed).astype(np.float32)
    out = out * style.brightness
    if style.blur_sigma > 0:
        out = gaussian_filter(out, sigma=(style.blur_sigma, style.blur_sigma, 0))
    return (np.clip(out, 0, 1) * 255 + 0.5).astype(np.uint8)


def make_mosaic(source: np.ndarray, size: tuple[int, int], rng: np.random.Generator,
                n_pieces: int) -> np.ndarray:
    """Scatter rotated/flipped elliptical crops of the source on a white, slightly noisy background."""
    h, w = size
    canvas = np.full((h, w, 3), 242, np.uint8)
    canvas = np.clip(canvas.astype(np.int16) + rng.integers(-4, 5, (h, w, 1)), 0, 255).astype(np.uint8)
    sh, sw = source.shape[:2]
    for _ in range(n_pieces):
        ph = int(rng.integers(min(h, sh) // 3, min(h, sh) * 2 // 3))
        pw = int(rng.integers(min(w, sw) // 3, min(w, sw) * 2 // 3))
        sy, sx = int(rng.integers(0, sh - ph + 1)), int(rng.integers(0, sw - pw + 1))
        piece = source[sy:sy + ph, sx:sx + pw]
        piece = np.rot90(piece, int(rng.integers(0, 4)))
        if rng.random() < 0.5:
            piece = piece[:, ::-1]
        ph, pw = piece.shape[:2]
        if ph > h or pw > w:
            continue
        y0, x0 = int(rng.integers(0, h - ph + 1)), int(rng.integers(0, w - pw + 1))
        yy, xx = np.mgrid[0:ph, 0:pw]
        inside = ((yy - ph / 2) / (ph / 2)) ** 2 + ((xx - pw / 2) / (pw / 2)) ** 2 <= 1.0
        region = canvas[y0:y0 + ph, x0:x0 + pw]
        region[inside] = piece[inside]
    return canvas


def write_pyramid_tiff(path: Path, level0: np.ndarray, mpp: float | None, *, levels: int = 3,
                       jpeg_quality: int = 90, tile: int = 256) -> None:
    """Write a tiled, JPEG-compressed pyramidal TIFF; mpp goes into the resolution tags (cm)."""
    import tifffile
    from PIL import Image

    img = level0
    # BigTIFF with levels in the main IFD chain: both tiatoolbox (TIFFWSIReader) and OpenSlide
    # (generic-tiff) then read all pyramid levels; a classic multi-page TIFF is not a WSI to tiatoolbox.
    with tifffile.TiffWriter(path, bigtiff=True) as tif:
        for level in range(levels):
            kwargs = {}
            if mpp is not None:
                level_mpp = mpp * 2**level
                kwargs = {"resolution": (1e4 / level_mpp, 1e4 / level_mpp), "resolutionunit": "CENTIMETER"}
            else:
                kwargs = {"resolution": None, "resolutionunit": "NONE"}
            tif.write(img, tile=(tile, tile), compression="jpeg",
                      compressionargs={"level": jpeg_quality}, photometric="rgb",
                      subfiletype=1 if level else 0, metadata=None, **kwargs)
            img = np.asarray(Image.fromarray(img).resize((img.shape[1] // 2, img.shape[0] // 2),
                                                          Image.Resampling.LANCZOS))


def write_demo_slides(out_dir: Path, n_slides: int = 4, n_centres: int = 2, seed: int = 0,
                      size_um: tuple[float, float] = (1600.0, 1200.0)) -> list[Path]:
    """Write N demo slides (round-robin over centres) and one slide without mpp in `no_mpp/`."""
    if n_slides < 1:
        raise G2LError("--n-slides must be at least 1.")
    if not 1 <= n_centres <= len(CENTRES):
        raise G2LError(f"--centers must be between 1 and {len(CENTRES)}.")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    source = source_he_image()
    paths = []
    for i in range(n_slides):
        style = CENTRES[i % n_centres]
        rng = np.random.default_rng([seed, i])
        # Source pixels are ~0.5 mpp; a 0.25-mpp centre gets an upsampled source.
        scale = 0.5 / style.mpp
        size = (int(size_um[1] / style.mpp), int(size_um[0] / style.mpp))
        src = source if scale == 1 else _resize(source, scale)
        mosaic = make_mosaic(src, size, rng, n_pieces=10)
        styled = apply_centre_style(mosaic, style)
        path = out_dir / f"slide-{i:02d}-{style.name}.tif"
        write_pyramid_tiff(path, styled, style.mpp, jpeg_quality=style.jpeg_quality)
        paths.append(path)
    no_mpp_dir = out_dir / "no_mpp"
    no_mpp_dir.mkdir(exist_ok=True)
    rng = np.random.default_rng([seed, 10_000])
    mosaic = make_mosaic(source, (1200, 1600), rng, n_pieces=4)
    write_pyramid_tiff(no_mpp_dir / "slide-no-mpp.tif", mosaic, None)
    return paths


def _resize(img: np.ndarray, scale: float) -> np.ndarray:
    from PIL import Image

    h, w = img.shape[:2]
    return np.asarray(Image.fromarray(img).resize((int(w * scale), int(h * scale)),
                                                  Image.Resampling.BICUBIC))
