"""Quality-control picture per slide: thumbnail, tissue outline and the sampled tile boxes.

At most QC_LONG_SIDE px on its long side and written as JPEG: 1,000 slides of QC stay under a GB
(a full 4-mpp thumbnail of an 80,000 px slide as PNG was 26 MB).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from g2l_cache.tiling import TilePlan

QC_LONG_SIDE = 2048
QC_QUALITY = 75
TISSUE_OUTLINE = (0, 170, 0)
TILE_BOX = (0, 60, 255)


def write_qc(path: Path, plan: TilePlan, slide_width: int, title: str) -> None:
    """Draw the plan (tissue outline, kept tiles) on its thumbnail, at most QC_LONG_SIDE px, as JPEG."""
    thumb = plan.thumbnail
    scale = min(1.0, QC_LONG_SIDE / max(thumb.shape[:2]))
    size = (max(1, round(thumb.shape[1] * scale)), max(1, round(thumb.shape[0] * scale)))
    img = Image.fromarray(np.ascontiguousarray(thumb[..., :3]))
    if scale < 1:
        img = img.resize(size, Image.Resampling.BOX)
    mask = plan.mask  # at mask resolution: brought to the picture's size
    if mask.shape != (img.height, img.width):
        mask = np.asarray(Image.fromarray(mask.view(np.uint8) * np.uint8(255)).resize(img.size, Image.Resampling.BOX)) > 127
    edge = mask & ~(np.roll(mask, 1, 0) & np.roll(mask, -1, 0) & np.roll(mask, 1, 1) & np.roll(mask, -1, 1))
    overlay = np.asarray(img).copy()
    overlay[edge] = TISSUE_OUTLINE
    img = Image.fromarray(overlay)
    draw = ImageDraw.Draw(img)
    px = img.width / slide_width  # picture px per level-0 px
    for t in plan.tiles:
        x0, y0 = t.x * px, t.y * px
        draw.rectangle([x0, y0, x0 + t.size0 * px, y0 + t.size0 * px], outline=TILE_BOX)
    draw.text((4, 4), f"{title}: {len(plan.tiles)} tiles (of {plan.n_candidates} with tissue)", fill=(0, 0, 0))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    img.save(tmp, format="JPEG", quality=QC_QUALITY)
    os.replace(tmp, path)
