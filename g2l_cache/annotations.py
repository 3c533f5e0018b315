"""`--annotations DIR`: regions drawn in QuPath (one GeoJSON per slide) that limit where tiles are taken.

A slide's file is `DIR/<slide id>.geojson` (or `.json`), as QuPath exports annotations (File >
Export objects as GeoJSON): a FeatureCollection, a list of features or one feature, polygons in
level-0 pixels, each feature's class under `properties.classification` (`name`, or `names` for
derived classes). `--annotation-classes Tumor,Stroma` keeps the regions of those classes only.
Tiles are then kept where annotated tissue covers at least the tissue threshold; a slide without a
file is tiled as without annotations.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from g2l_cache.slides import SlideError

SUFFIXES = (".geojson", ".json")


@dataclass(frozen=True)
class SlideAnnotation:
    """A slide's annotation file and the digest of its bytes (a changed file re-plans the slide)."""

    path: str
    digest: str


def find_annotation(folder: str | Path | None, slide_id: str) -> SlideAnnotation | None:
    """The slide's annotation file in `folder`, if it has one."""
    if not folder:
        return None
    for suffix in SUFFIXES:
        path = Path(folder) / f"{slide_id}{suffix}"
        if path.is_file():
            return SlideAnnotation(str(path), hashlib.blake2b(path.read_bytes(), digest_size=16).hexdigest())
    return None


def feature_classes(feature: dict) -> list[str]:
    """A QuPath feature's class names (none for an unclassified region)."""
    c = (feature.get("properties") or {}).get("classification")
    if isinstance(c, str):
        return [c]
    if isinstance(c, dict):
        if isinstance(c.get("names"), list):
            return [str(n) for n in c["names"]]
        if c.get("name") is not None:
            return [str(c["name"])]
    return []


def read_regions(path: str | Path, classes: tuple[str, ...] = ()) -> list:
    """The file's polygons (shapely, level-0 px) of `classes` (all when empty); a SlideError that
    names the file and the problem when it is not usable."""
    import shapely
    from shapely.geometry import shape

    name = Path(path).name
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SlideError(f"annotation file {name} is not readable JSON ({exc}); export it again from QuPath "
                         "(File > Export objects as GeoJSON).") from None
    features = data.get("features") if isinstance(data, dict) and data.get("type") == "FeatureCollection" \
        else data if isinstance(data, list) else [data] if isinstance(data, dict) and data.get("type") == "Feature" \
        else None
    if features is None:
        raise SlideError(f"annotation file {name} is JSON but not GeoJSON (no FeatureCollection, feature "
                         "list or Feature); export it again from QuPath (File > Export objects as GeoJSON).")
    regions, seen = [], set()
    for i, feature in enumerate(features):
        if not isinstance(feature, dict) or not isinstance(feature.get("geometry"), dict):
            raise SlideError(f"annotation file {name}: feature {i} has no geometry.")
        names = feature_classes(feature)
        seen.update(names or ["(unclassified)"])
        if classes and not set(names) & set(classes):
            continue
        try:
            geometry = shapely.make_valid(shape(feature["geometry"]))
        except Exception as exc:  # shapely's errors for bad coordinates differ between versions
            raise SlideError(f"annotation file {name}: feature {i} has a malformed geometry ({exc}).") from None
        regions += [g for g in polygons_in(geometry) if g.area > 0]
    if not regions:
        wanted = f" of class {', '.join(classes)}" if classes else ""
        raise SlideError(f"annotation file {name} has no polygon{wanted} (its classes: "
                         f"{', '.join(sorted(seen)) or 'none'}); check --annotation-classes or the file.")
    return regions


def region_mask(regions: list, shape: tuple[int, int], slide_width: int, slide_height: int) -> np.ndarray:
    """The regions as a boolean mask of `shape` (rows, columns) covering the slide (holes left out)."""
    import cv2

    sx, sy = shape[1] / slide_width, shape[0] / slide_height
    mask = np.zeros(shape, dtype=np.uint8)
    for polygon in regions:
        # each polygon drawn on its own so its holes never cut another region, in its bounding box
        # only: a QuPath export may hold thousands of small regions on a 5,000-px mask
        exterior = _pixels(polygon.exterior.coords, sx, sy)
        x0, y0 = np.maximum(exterior.min(0), 0)
        x1, y1 = np.minimum(exterior.max(0) + 1, [shape[1], shape[0]])
        if x1 <= x0 or y1 <= y0:
            continue
        one = np.zeros((y1 - y0, x1 - x0), dtype=np.uint8)
        offset = (-int(x0), -int(y0))
        cv2.fillPoly(one, [exterior], 1, offset=offset)
        for hole in polygon.interiors:
            cv2.fillPoly(one, [_pixels(hole.coords, sx, sy)], 0, offset=offset)
        mask[y0:y1, x0:x1] |= one
    return mask.astype(bool)


def _pixels(coords, sx: float, sy: float) -> np.ndarray:
    points = np.asarray(coords, dtype=np.float64)[:, :2]
    return np.round(points * [sx, sy] - 0.5).astype(np.int32)


def polygons_in(geometry) -> list:
    """The polygons of a shapely geometry (a multi-polygon's or a collection's parts)."""
    if geometry.geom_type == "Polygon":
        return [geometry]
    return [p for part in getattr(geometry, "geoms", []) for p in polygons_in(part)]
