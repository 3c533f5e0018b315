"""A labelled, multi-centre demo tile set from the real H&E image shipped with tiatoolbox.

Label: nuclei-dense vs sparse, from the haematoxylin channel of the *unaltered* crop (median split).
Centre: the stain/scanner styles of the demo slides. Group: the source crop, so the same tissue
seen through different centres is one group (never on both sides of a split, never its own neighbour).
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from PIL import Image

from g2l_cache.demo_slides import CENTRES, apply_centre_style, source_he_image
from g2l_cache.errors import G2LError


def write_demo_tiles(out_dir: Path, n_crops: int = 40, n_centres: int = 3, tile_px: int = 224,
                     seed: int = 0, test_fraction: float = 0.3) -> Path:
    """Write tiles into OUT/<label>/ and OUT/tiles.csv (path,label,split,center,group)."""
    from skimage.color import rgb2hed

    if not 2 <= n_centres <= len(CENTRES):
        raise G2LError(f"--centers must be between 2 and {len(CENTRES)}.")
    if n_crops < 8:
        raise G2LError("--n-crops must be at least 8.")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    source = source_he_image()
    rng = np.random.default_rng(seed)
    crops = []
    for _ in range(n_crops):
        y, x = rng.integers(0, source.shape[0] - tile_px), rng.integers(0, source.shape[1] - tile_px)
        crop = np.rot90(source[y:y + tile_px, x:x + tile_px], int(rng.integers(0, 4)))
        crops.append(np.ascontiguousarray(crop))
    haem = np.array([rgb2hed(c)[..., 0].mean() for c in crops])
    labels = np.where(haem > np.median(haem), "dense", "sparse")
    groups = [f"crop{i:03d}" for i in range(n_crops)]
    test = set(rng.permutation(n_crops)[: max(2, round(test_fraction * n_crops))].tolist())
    rows = []
    for c in range(n_centres):
        style = CENTRES[c]
        for i, crop in enumerate(crops):
            tile = apply_centre_style(crop, style)
            path = out / labels[i] / f"{groups[i]}-{style.name}.png"
            path.parent.mkdir(exist_ok=True)
            Image.fromarray(tile).save(path)
            rows.append({"path": str(path.relative_to(out)), "label": labels[i],
                         "split": "test" if i in test else "train", "center": style.name,
                         "group": groups[i]})
    manifest = out / "tiles.csv"
    with manifest.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["path", "label", "split", "center", "group"])
        writer.writeheader()
        writer.writerows(rows)
    return manifest
