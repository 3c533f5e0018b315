"""What OpenSlide leaves out of TIFF-family slides: the mpp recorded in OME-XML, an Aperio-style
description or the TIFF resolution tags, and pyramids stored as OME SubIFDs.

OpenSlide opens an OME-TIFF (as tifffile, bfconvert and QuPath write them) as `generic-tiff`: it
reports no `openslide.mpp-x` and lists only the first level of a SubIFD pyramid. tiatoolbox's
reader takes the mpp from these same sources, so a slide is tiled at one resolution whichever
backend reads its pixels.
"""

from __future__ import annotations

import re
from pathlib import Path
from xml.etree import ElementTree

# µm per unit of OME's PhysicalSizeXUnit (the OME schema's UnitsLength, common ones)
OME_UNITS_UM = {"µm": 1.0, "um": 1.0, "\u03bcm": 1.0, "micron": 1.0, "nm": 1e-3, "Å": 1e-4, "mm": 1e3,
                "cm": 1e4, "m": 1e6, "pm": 1e-6}
TIFF_UNITS_UM = {"centimeter": 1e4, "inch": 25_400.0, "3": 1e4, "2": 25_400.0}  # OpenSlide's tiff.ResolutionUnit
APERIO_MPP = re.compile(r"\|\s*MPP\s*=\s*([0-9.eE+-]+)")


def mpp_from_properties(properties) -> float | None:
    """The slide's mpp from OpenSlide's `tiff.*` properties: OME-XML PhysicalSizeX (with its unit),
    an Aperio `MPP =` in the description, then XResolution with a physical ResolutionUnit."""
    description = properties.get("tiff.ImageDescription") or ""
    for candidate in (_ome_mpp(description), _aperio_mpp(description), _resolution_mpp(properties)):
        if candidate is not None and candidate > 0:
            return candidate
    return None


def _ome_mpp(description: str) -> float | None:
    if "<OME" not in description[:4096]:
        return None
    try:
        root = ElementTree.fromstring(description.encode("utf-8"))
    except ElementTree.ParseError:
        return None
    for element in root.iter():
        if element.tag.rsplit("}", 1)[-1] == "Pixels" and element.get("PhysicalSizeX"):
            unit = OME_UNITS_UM.get(element.get("PhysicalSizeXUnit", "µm"))
            try:
                return float(element.get("PhysicalSizeX")) * unit if unit else None
            except ValueError:
                return None
    return None


def _aperio_mpp(description: str) -> float | None:
    match = APERIO_MPP.search(description)
    try:
        return float(match.group(1)) if match else None
    except ValueError:
        return None


def _resolution_mpp(properties) -> float | None:
    unit = TIFF_UNITS_UM.get(str(properties.get("tiff.ResolutionUnit", "")).lower())
    try:
        resolution = float(properties.get("tiff.XResolution", 0))
    except ValueError:
        return None
    return unit / resolution if unit and resolution > 1 else None


def has_hidden_pyramid(path: str | Path, levels_seen: int) -> bool:
    """Whether the TIFF stores more pyramid levels (OME SubIFDs) than the `levels_seen` OpenSlide lists:
    such a slide is read by tiatoolbox, which reads them (thumbnails from level 0 of a real-size slide
    would decode every pixel)."""
    import tifffile

    try:
        with tifffile.TiffFile(str(path)) as tif:
            return bool(tif.series) and len(tif.series[0].levels) > levels_seen
    except Exception:  # not a TIFF tifffile reads: OpenSlide's view stands
        return False
