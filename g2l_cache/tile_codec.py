"""Encode tile pixels once for storage, and decode the stored bytes back to pixels."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from g2l_cache.errors import G2LError

TILE_FORMATS = ("jpeg", "png")


def encode_tile(pixels: np.ndarray, fmt: str = "jpeg", quality: int = 95) -> bytes:
    """Encode HxWx3 uint8 RGB pixels as JPEG (lossy, default q95) or PNG (lossless)."""
    if fmt not in TILE_FORMATS:
        raise G2LError(f"unknown tile format {fmt!r}; use one of {', '.join(TILE_FORMATS)}.")
    buf = io.BytesIO()
    img = Image.fromarray(np.ascontiguousarray(pixels[..., :3]), mode="RGB")
    if fmt == "jpeg":
        # Fixed subsampling so the bytes do not depend on Pillow's quality-dependent default.
        img.save(buf, format="JPEG", quality=quality, subsampling=0, optimize=False)
    else:
        img.save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def decode_tile(data: bytes) -> np.ndarray:
    """Decode stored tile bytes to HxWx3 uint8 RGB pixels."""
    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img.convert("RGB"))
