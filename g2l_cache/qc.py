"""Quality-control picture per slide: thumbnail, tissue outline and the sampled tile boxes."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from g2l_cache.tiling import TilePlan


def write_qc_png(path: Path, plan: TilePlan, slide_width: int, title: str) -> None:
    """Draw the plan onto its thumbnail and write it atomically as PNG."""
    img = Image.fromarray(plan.thumbnail).convert("RGB")
    mask = plan.mask
    edge = mask & ~(np.roll(mask, 1, 0) & np.roll(mask, -1, 0) & np.roll(mask, 1, 1) & np.roll(mask, -1, 1))
    overlay = np.asarray(img).copy()
    overlay[edge] = (0, 170, 0)
    img = Image.fromarray(overlay)
    draw = ImageDraw.Draw(img)
    scale = plan.thumbnail.shape[1] / slide_width
    for t in plan.tiles:
        x0, y0 = t.x * scale, t.y * scale
        draw.rectangle([x0, y0, x0 + t.size0 * scale, y0 + t.size0 * scale], outline=(0, 60, 255))
    draw.text((4, 4), f"{title}: {len(plan.tiles)} tiles (of {plan.n_candidates} with tissue)",
              fill=(0, 0, 0))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    img.save(tmp)
    os.replace(tmp, path)
