"""Quality control per slide: a picture (thumbnail, tissue outline, kept tiles) and the same as GeoJSON.

The picture (tissue outline green, annotated regions yellow, tiles blue) is at most QC_LONG_SIDE px on its long side, as JPEG: 1,000 slides of QC stay under a GB
(a full 4-mpp thumbnail of an 80,000 px slide as PNG was 26 MB). The GeoJSON holds the tissue
contours and the kept tiles in level-0 pixels, as QuPath imports them (File > Import objects):
tissue as annotations of class "Tissue", tiles as tile objects of class "Tile".
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from g2l_cache.annotations import polygons_in
from g2l_cache.layout import write_text_atomic
from g2l_cache.tiling import TilePlan

QC_LONG_SIDE = 2048
QC_QUALITY = 75
TISSUE_OUTLINE = (0, 170, 0)
TILE_BOX = (0, 60, 255)
REGION_OUTLINE = (255, 200, 0)  # --annotations: the annotated regions
TISSUE_CLASS, TILE_CLASS = "Tissue", "Tile"


def write_qc(path: Path, plan: TilePlan, slide_width: int, title: str) -> None:
    """Draw the plan (tissue outline, kept tiles) on its thumbnail, at most QC_LONG_SIDE px, as JPEG."""
    thumb = plan.thumbnail
    scale = min(1.0, QC_LONG_SIDE / max(thumb.shape[:2]))
    size = (max(1, round(thumb.shape[1] * scale)), max(1, round(thumb.shape[0] * scale)))
    img = Image.fromarray(np.ascontiguousarray(thumb[..., :3]))
    if scale < 1:
        img = img.resize(size, Image.Resampling.BOX)
    overlay = np.asarray(img).copy()
    overlay[_outline(plan.mask, img.size)] = TISSUE_OUTLINE
    if plan.region is not None:
        overlay[_outline(plan.region, img.size)] = REGION_OUTLINE
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


def _outline(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """The boundary pixels of a mask (at mask resolution) brought to a picture of `size` (w, h)."""
    if mask.shape != (size[1], size[0]):
        mask = np.asarray(Image.fromarray(mask.view(np.uint8) * np.uint8(255)).resize(size, Image.Resampling.BOX)) > 127
    return mask & ~(np.roll(mask, 1, 0) & np.roll(mask, -1, 0) & np.roll(mask, 1, 1) & np.roll(mask, -1, 1))


def write_qc_geojson(path: Path, plan: TilePlan, slide_width: int, slide_height: int) -> None:
    """The plan's tissue contours and kept tiles as a GeoJSON FeatureCollection in level-0 pixels."""
    features = [{"type": "Feature", "geometry": polygon,
                 "properties": {"objectType": "annotation", "classification": _class(TISSUE_CLASS, TISSUE_OUTLINE)}}
                for polygon in tissue_polygons(plan.mask, slide_width, slide_height)]
    tile_class = _class(TILE_CLASS, TILE_BOX)
    for t in plan.tiles:
        x0, y0, x1, y1 = t.x, t.y, t.x + t.size0, t.y + t.size0
        features.append({"type": "Feature", "id": t.tile_id,
                         "geometry": {"type": "Polygon", "coordinates": [[[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]]},
                         "properties": {"objectType": "tile", "name": t.tile_id, "classification": tile_class,
                                        "measurements": {"tissue_fraction": t.tissue_fraction}}})
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps({"type": "FeatureCollection", "features": features}, separators=(",", ":")))


def tissue_polygons(mask: np.ndarray, slide_width: int, slide_height: int) -> list[dict]:
    """The mask's regions as valid GeoJSON polygons (holes kept) in level-0 pixels."""
    import cv2
    import shapely
    from shapely.geometry import Polygon, mapping

    if not mask.any():
        return []
    sx, sy = slide_width / mask.shape[1], slide_height / mask.shape[0]
    contours, hierarchy = cv2.findContours(mask.astype(np.uint8), cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)

    def ring(contour) -> list[tuple[float, float]]:
        points = contour.reshape(-1, 2).astype(np.float64) + 0.5  # pixel centres
        return [(round(x * sx, 1), round(y * sy, 1)) for x, y in points]

    polygons = []
    for i, contour in enumerate(contours):
        if hierarchy[0][i][3] != -1 or len(contour) < 3:  # a hole: taken with its outer ring
            continue
        holes, child = [], hierarchy[0][i][2]
        while child != -1:
            if len(contours[child]) >= 3:
                holes.append(ring(contours[child]))
            child = hierarchy[0][child][0]
        # contours may touch themselves at a corner; make_valid splits such rings into valid parts
        geometry = shapely.make_valid(Polygon(ring(contour), holes))
        polygons += [mapping(p) for p in polygons_in(geometry) if p.area > 0]
    return polygons


def _class(name: str, colour: tuple[int, int, int]) -> dict:
    return {"name": name, "color": list(colour)}
