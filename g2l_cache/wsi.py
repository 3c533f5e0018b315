"""Reading whole-slide images: OpenSlide where it reads the file, tiatoolbox's WSIReader for the rest.

OpenSlide (SVS, NDPI, MRXS, SCN, BIF, DICOM, generic tiled TIFF, ...) imports in milliseconds and
reads a region with one call, so tissue detection and tile reads need neither torch nor tiatoolbox
(which imports both, ~1 GB per process). tiatoolbox's `WSIReader.open` reads what OpenSlide does
not (plain PNG/JPEG with an explicit mpp, JP2, OME-TIFF variants, Zarr) behind the same interface.

Regions are read from the pyramid level that needs no upsampling; a level whose pixels fall exactly
on the requested grid is read as is, otherwise the region is resized (box filter down, bicubic up).
A run of horizontally adjacent tiles that lie exactly on a level's pixel grid is read in one call
and cut, which gives the same pixels as reading each tile alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from g2l_cache.tiff_metadata import has_hidden_pyramid, mpp_from_properties

BACKGROUND = (255, 255, 255)  # transparent parts of a scan (outside scanned areas) read as white glass
BAND_PIXELS = 1 << 22  # a region larger than this is read in bands of rows


@dataclass(frozen=True)
class Level:
    """One pyramid level: its downsample from level 0 and its size in its own pixels."""

    downsample: float
    width: int
    height: int


class OpenSlideReader:
    """A slide OpenSlide reads."""

    name = "OpenSlide"

    def __init__(self, path: Path, cache_bytes: int = 0):
        import openslide

        self.slide = openslide.OpenSlide(str(path))
        if cache_bytes:
            # decoded JPEG tiles kept for the next reads: a row of 224-px tiles reuses the decoded
            # 512-px tiles of the row above (1.66 -> 1.27 ms a tile on an 80,000 px slide at 128 MB)
            self.slide.set_cache(openslide.OpenSlideCache(cache_bytes))
        self.levels = [Level(float(d), int(w), int(h)) for d, (w, h) in
                       zip(self.slide.level_downsamples, self.slide.level_dimensions)]
        mpp = self.slide.properties.get("openslide.mpp-x")
        # OME-TIFFs open as generic-tiff without openslide.mpp-x: their OME-XML still says it
        self.mpp = float(mpp) if mpp not in (None, "", "0") else mpp_from_properties(self.slide.properties)

    def read_level(self, level: int, x0: int, y0: int, width: int, height: int) -> np.ndarray:
        """RGB pixels of `width` x `height` level-`level` px whose top-left is level-0 (x0, y0); a large
        region (a whole thumbnail level) is read in bands, so no more than a band's RGBA is held twice."""
        rows = max(1, BAND_PIXELS // max(1, int(width)))
        if height <= rows:
            return self._read(level, x0, y0, width, height)
        out = np.empty((int(height), int(width), 3), dtype=np.uint8)
        ds = self.levels[level].downsample
        for top in range(0, int(height), rows):
            band = min(rows, int(height) - top)
            out[top:top + band] = self._read(level, x0, int(round(y0 + top * ds)), width, band)
        return out

    def _read(self, level: int, x0: int, y0: int, width: int, height: int) -> np.ndarray:
        from PIL import Image

        region = self.slide.read_region((int(x0), int(y0)), level, (int(width), int(height)))
        if region.mode == "RGBA" and region.getchannel("A").getextrema()[0] < 255:
            white = Image.new("RGBA", region.size, (*BACKGROUND, 255))
            region = Image.alpha_composite(white, region)
        rgb = region.convert("RGB")
        del region  # a whole level's RGBA is large: keep at most two copies alive
        return np.asarray(rgb)

    def close(self) -> None:
        self.slide.close()


class TiatoolboxReader:
    """A slide only tiatoolbox reads (imported on first use, with its logging kept quiet)."""

    name = "tiatoolbox"

    def __init__(self, path: Path, mpp: float | None):
        from g2l_cache.tia import import_tiatoolbox

        import_tiatoolbox()
        from tiatoolbox.wsicore.wsireader import WSIReader

        self.reader = WSIReader.open(path, mpp=(mpp, mpp) if mpp else None)
        info = self.reader.info
        self.name = type(self.reader).__name__
        self.levels = [Level(float(d), int(w), int(h)) for d, (w, h) in
                       zip(info.level_downsamples, info.level_dimensions)]
        self.mpp = float(info.mpp[0]) if info.mpp is not None and float(info.mpp[0]) > 0 else None

    def read_level(self, level: int, x0: int, y0: int, width: int, height: int) -> np.ndarray:
        region = self.reader.read_rect(location=(int(x0), int(y0)), size=(int(width), int(height)),
                                       resolution=level, units="level")
        region = np.asarray(region)
        if region.ndim == 2:
            region = np.stack([region] * 3, axis=-1)
        return np.ascontiguousarray(region[..., :3]).astype(np.uint8)

    def close(self) -> None:
        pass


def open_reader(path: Path, mpp_override: float | None, cache_bytes: int = 0):
    """OpenSlide's reader when OpenSlide knows the format (with a tile cache of `cache_bytes`) and sees
    all of its levels, else tiatoolbox's."""
    try:
        import openslide

        fmt = Path(path).is_file() and openslide.OpenSlide.detect_format(str(path))
        if fmt:
            reader = OpenSlideReader(Path(path), cache_bytes)
            if fmt != "generic-tiff" or not has_hidden_pyramid(path, len(reader.levels)):
                return reader
            reader.close()  # an OME SubIFD pyramid OpenSlide does not list: tiatoolbox reads its levels
    except Exception:  # OpenSlide refuses a damaged file: tiatoolbox gets its say (and names the problem)
        pass
    return TiatoolboxReader(Path(path), mpp_override)


def best_level(reader, downsample: float) -> int:
    """The coarsest level that is at least as fine as `downsample` (never upsample a coarser level)."""
    candidates = [i for i, lv in enumerate(reader.levels) if lv.downsample <= downsample * (1 + 1e-6)]
    return max(candidates, key=lambda i: reader.levels[i].downsample) if candidates else 0


def _resize(pixels: np.ndarray, width: int, height: int) -> np.ndarray:
    if pixels.shape[1] == width and pixels.shape[0] == height:
        return pixels
    from PIL import Image

    down = pixels.shape[1] >= width and pixels.shape[0] >= height
    img = Image.fromarray(pixels).resize((width, height), Image.Resampling.BOX if down else Image.Resampling.BICUBIC)
    return np.asarray(img)


def read_region(reader, x0: int, y0: int, size0: float, out_px: int) -> np.ndarray:
    """A square level-0 footprint of side `size0` at (x0, y0), as `out_px` x `out_px` RGB pixels."""
    level = best_level(reader, size0 / out_px)
    ds = reader.levels[level].downsample
    side = max(1, int(round(size0 / ds)))
    return _resize(reader.read_level(level, x0, y0, side, side), out_px, out_px)


def thumbnail_size(width0: int, height0: int, downsample: float) -> tuple[int, int]:
    """(width, height) of the whole slide at `downsample` x level 0."""
    return max(1, int(round(width0 / downsample))), max(1, int(round(height0 / downsample)))


def thumbnail_bands(reader, width0: int, height0: int, downsample: float, rows: int = 512):
    """The whole slide at `downsample` x level 0 (from the coarsest level fine enough), as
    (first row, RGB rows) bands of about `rows` rows: no whole level is ever held in memory. A band
    resized from a finer level is read with the rows it covers, so bands meet without a seam."""
    level = best_level(reader, downsample)
    lv = reader.levels[level]
    out_w, out_h = thumbnail_size(width0, height0, downsample)
    fy = lv.height / out_h  # level rows per output row
    for top in range(0, out_h, rows):
        bottom = min(out_h, top + rows)
        y_lo, y_hi = int(np.floor(top * fy)), min(lv.height, int(np.ceil(bottom * fy)))
        pixels = reader.read_level(level, 0, int(round(y_lo * lv.downsample)), lv.width, max(1, y_hi - y_lo))
        yield top, _resize(pixels, out_w, bottom - top)


def read_thumbnail(reader, width0: int, height0: int, downsample: float) -> np.ndarray:
    """The whole slide at `downsample` x level 0, assembled from `thumbnail_bands`."""
    out_w, out_h = thumbnail_size(width0, height0, downsample)
    out = np.empty((out_h, out_w, 3), dtype=np.uint8)
    for top, band in thumbnail_bands(reader, width0, height0, downsample):
        out[top:top + len(band)] = band
    return out


def read_tile_run(reader, xs: list[int], y0: int, size0: float, out_px: int) -> list[np.ndarray]:
    """Tiles at level-0 (x, y0) for x in `xs`, left to right; neighbours that sit exactly on one level's
    pixel grid are read in one call and cut (the same pixels as one read each)."""
    level = best_level(reader, size0 / out_px)
    ds = reader.levels[level].downsample
    side = size0 / ds
    exact = float(side).is_integer() and float(y0 / ds).is_integer() and all(float(x / ds).is_integer() for x in xs)
    if not exact or len(xs) == 1:
        return [read_region(reader, x, y0, size0, out_px) for x in xs]
    side = int(side)
    out, start = [], 0
    while start < len(xs):  # one call per run of touching tiles
        stop = start + 1
        while stop < len(xs) and xs[stop] - xs[stop - 1] == side * ds:
            stop += 1
        strip = reader.read_level(level, xs[start], y0, side * (stop - start), side)
        out += [_resize(np.ascontiguousarray(strip[:, i * side:(i + 1) * side]), out_px, out_px)
                for i in range(stop - start)]
        start = stop
    return out
