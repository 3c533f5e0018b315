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
        # the tile id is the object's name (QuPath reads a feature id as a UUID, which it is not)
        features.append({"type": "Feature",
                         "geometry": {"type": "Polygon", "coordinates": [[[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]]},
                         "properties": {"objectType": "tile", "name": t.tile_id, "classification": tile_class,
                                        "measurements": {"tissue_fraction": round(t.tissue_fraction, 4)}}})
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps({"type": "FeatureCollection", "features": features}, separators=(",", ":")))


SIMPLIFY_PX = 1.0  # Douglas-Peucker tolerance in mask pixels: finer than the mask itself says nothing
MIN_RING_PX = 16  # rings enclosing fewer mask pixels (16 um square at 4 mpp, a few cells) are specks


def tissue_polygons(mask: np.ndarray, slide_width: int, slide_height: int,
                    counts: dict[str, int] | None = None) -> list[dict]:
    """The mask's regions as valid GeoJSON polygons (holes kept) in level-0 pixels. The mask is smoothed
    by one mask pixel, rings are simplified (Douglas-Peucker at SIMPLIFY_PX) before any repair, specks
    under MIN_RING_PX are left out, and a polygon that is not valid is repaired ring by ring, so the
    work and the vertices written are bounded by the mask's size, not by how ragged its edges are (one
    GEOS repair of an 80,000 px slide's tissue, 80,000 holes, took 300 s). `counts`, when given, receives what each step saw."""
    import cv2
    import shapely

    tally = dict.fromkeys(("contours", "found", "kept", "repaired", "holes_filled", "written", "rings_dropped"), 0)
    polygons: list[dict] = []
    if mask.any():
        contours, hierarchy = cv2.findContours(_smoothed(mask), cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
        tally["contours"], tally["found"] = len(contours), sum(len(c) for c in contours)
        rings = [_simplified_ring(c) for c in contours]
        tally["kept"] = sum(len(r) for r in rings if r is not None)
        tally["rings_dropped"] = sum(r is None for r in rings)
        regions = [(rings[i], _holes(rings, hierarchy[0], i)) for i in range(len(rings))
                   if hierarchy[0][i][3] == -1 and rings[i] is not None]  # holes come with their outer ring
        whole = _polygons(regions)
        valid = shapely.is_valid(whole)
        to_slide = np.array([slide_width / mask.shape[1], slide_height / mask.shape[0]])
        for (shell, holes), ok in zip(regions, valid):
            parts = [[shell, *holes]] if ok else [
                [np.asarray(r.coords)[:-1] for r in (p.exterior, *p.interiors)] for p in _repaired(shell, holes, tally)]
            for part in parts:
                polygons.append({"type": "Polygon", "coordinates": [_closed(r * to_slide) for r in part]})
                tally["written"] += sum(len(r) + 1 for r in part)
    if counts is not None:
        counts.update(tally)
    return polygons


def _smoothed(mask: np.ndarray) -> np.ndarray:
    """The mask closed then opened by one mask pixel (3 x 3): Otsu's speckle (an 80,000 px slide's
    mask: 118,000 holes under 16 px, one-pixel bridges that make rings touch themselves) is gone
    before contours are traced, 128,000 contours become 6,700 and none needs a repair."""
    import cv2

    kernel = np.ones((3, 3), dtype=np.uint8)
    closed = cv2.morphologyEx(mask.astype(np.uint8), cv2.MORPH_CLOSE, kernel, borderType=cv2.BORDER_CONSTANT,
                              borderValue=0)
    return cv2.morphologyEx(closed, cv2.MORPH_OPEN, kernel, borderType=cv2.BORDER_CONSTANT, borderValue=0)


def _holes(rings: list, hierarchy: np.ndarray, i: int) -> list[np.ndarray]:
    holes, child = [], hierarchy[i][2]
    while child != -1:
        if rings[child] is not None:
            holes.append(rings[child])
        child = hierarchy[child][0]
    return holes


def _simplified_ring(contour: np.ndarray) -> np.ndarray | None:
    """A contour simplified at SIMPLIFY_PX (mask px, pixel centres, open); None for a speck."""
    import cv2

    if len(contour) < 3 or cv2.contourArea(contour) < MIN_RING_PX:
        return None
    simple = cv2.approxPolyDP(contour, SIMPLIFY_PX, True).reshape(-1, 2)
    return simple.astype(np.float64) + 0.5 if len(simple) >= 3 else None


def _polygons(regions: list[tuple[np.ndarray, list[np.ndarray]]]) -> np.ndarray:
    """(shell, holes) rings (open) as shapely polygons, built in one call."""
    import shapely

    rings = [_closed_array(r) for shell, holes in regions for r in (shell, *holes)]
    if not rings:
        return np.array([], dtype=object)
    ring_ends = np.cumsum([0, *(len(r) for r in rings)])
    polygon_ends = np.cumsum([0, *(1 + len(holes) for _, holes in regions)])
    return shapely.from_ragged_array(shapely.GeometryType.POLYGON, np.concatenate(rings), (ring_ends, polygon_ends))


def _repaired(shell: np.ndarray, holes: list[np.ndarray], tally: dict[str, int]) -> list:
    """The region as valid polygons. Simplified pixel contours touch themselves at corners and let a
    hole graze its shell or a neighbour; a whole-polygon repair (GEOS make_valid) costs far more than
    linear in the holes, so the shell is repaired alone, each hole alone, and a hole that still meets
    the shell or another hole is filled (counted in holes_filled)."""
    import shapely
    from shapely.geometry import Polygon

    tally["repaired"] += len(shell) + sum(len(h) for h in holes)
    parts = [p for p in polygons_in(shapely.make_valid(Polygon(shell))) if p.area >= MIN_RING_PX / 2]
    hole_polys = _polygons([(h, []) for h in holes])
    bad = ~shapely.is_valid(hole_polys)
    hole_polys = np.array([*hole_polys[~bad], *(p for g in shapely.make_valid(hole_polys[bad]) for p in polygons_in(g))],
                          dtype=object)
    keep = shapely.area(hole_polys) >= MIN_RING_PX / 2 if len(hole_polys) else np.zeros(0, dtype=bool)
    if len(hole_polys):
        tree = shapely.STRtree(hole_polys)
        a, b = tree.query(hole_polys, predicate="intersects")
        keep[a[a != b]] = False  # holes meeting each other
        for part in parts:
            boundary = part.boundary
            shapely.prepare(boundary)
            keep[tree.query(boundary, predicate="intersects")] = False  # holes grazing the shell
    tally["holes_filled"] += int((~keep).sum())
    kept = hole_polys[keep]
    tree = shapely.STRtree(kept) if len(kept) else None
    out = []
    for part in parts:
        inside = kept[tree.query(part, predicate="contains_properly")] if tree is not None else []
        own = [r for r in part.interiors if Polygon(r).area >= MIN_RING_PX / 2]
        polygon = Polygon(part.exterior, [*own, *(h.exterior for h in inside)])
        if not polygon.is_valid:  # not seen on real masks: the whole repair, counted like the rest
            tally["repaired"] += len(polygon.exterior.coords)
            out += [p for p in polygons_in(shapely.make_valid(polygon)) if p.area >= MIN_RING_PX / 2]
        else:
            out.append(polygon)
    return out


def _closed_array(ring: np.ndarray) -> np.ndarray:
    return np.vstack([ring, ring[:1]])


def _closed(ring: np.ndarray) -> list[list[float]]:
    """A ring as GeoJSON coordinates at 0.1 px, first point repeated."""
    return np.round(_closed_array(ring), 1).tolist()


def _class(name: str, colour: tuple[int, int, int]) -> dict:
    return {"name": name, "color": list(colour)}
