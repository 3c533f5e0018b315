"""The QC GeoJSON costs what the mask is worth (simplified rings, specks left out, repairs bounded by
the vertices), and OME-TIFF slides are tiled at the resolution their OME-XML records, flat or as a
SubIFD pyramid, whichever backend reads the pixels."""

import json

import numpy as np
import pytest
import tifffile
from shapely.geometry import shape

from g2l_cache.qc import MIN_RING_PX, tissue_polygons
from g2l_cache.slides import SlideSpec, open_slide
from g2l_cache.tiff_metadata import mpp_from_properties
from g2l_cache.tiling import TilingConfig, plan_tiles


def _islands(side: int, n: int, rng) -> np.ndarray:
    """Thousands of tiny islands (1-3 px) and a few that matter."""
    mask = np.zeros((side, side), dtype=bool)
    for y, x, h, w in zip(*(rng.integers(0, side - 4, n) for _ in range(2)), *(rng.integers(1, 4, n) for _ in range(2))):
        mask[y:y + h, x:x + w] = True
    mask[side // 4: side // 2, side // 4: side // 2] = True
    return mask


def _fractal(side: int, rng) -> np.ndarray:
    """Tissue whose long edge is pixel noise, pierced by thousands of holes of every size."""
    from scipy.ndimage import gaussian_filter

    field = gaussian_filter(rng.standard_normal((side, side)), 1.0) * 3
    slope = (0.5 - np.arange(side) / side)[None, :] * 10
    return field + slope > 0


@pytest.mark.parametrize("make", [_islands, _fractal], ids=["islands", "fractal edge"])
def test_geojson_work_is_bounded_by_the_mask_and_linear_in_it(make):
    rng = np.random.default_rng(0)
    counts = {}
    side = 600
    small = make(side, 3000, rng) if make is _islands else make(side, rng)
    big = np.tile(small, (2, 2))  # the same mask four times over: every count should grow ~4x
    small_polys = tissue_polygons(small, side * 16, side * 16, counts)
    small_counts = dict(counts)
    big_polys = tissue_polygons(big, 2 * side * 16, 2 * side * 16, counts)
    for polys, c, mask in ((small_polys, small_counts, small), (big_polys, counts, big)):
        assert all(shape(p).is_valid and shape(p).area > 0 for p in polys)
        written = sum(len(ring) for p in polys for ring in p["coordinates"])
        assert written == c["written"]
        # every step sees at most what the step before it handed on, and that is bounded by the mask
        assert c["found"] <= 2 * mask.size ** 0.5 * 1 + 4 * np.count_nonzero(mask)
        assert c["kept"] <= c["found"] and c["repaired"] <= c["kept"]
        assert c["written"] <= c["kept"] + 2 * (c["contours"] - c["rings_dropped"]) + 4 * c["holes_filled"]
    for key in ("found", "kept", "written"):
        assert small_counts[key] > 0 and counts[key] <= 4.6 * small_counts[key], key
    # the specks are gone: no ring written encloses less than MIN_RING_PX mask pixels (256 level-0 px each)
    areas = [shape({"type": "Polygon", "coordinates": [r]}).area for p in big_polys for r in p["coordinates"]]
    assert min(areas) >= MIN_RING_PX * 16 * 16 * 0.5


def test_holes_larger_than_a_speck_are_kept_and_the_outline_follows_the_mask():
    mask = np.zeros((400, 500), dtype=bool)
    mask[50:350, 60:440] = True
    mask[100:160, 100:200] = False  # a hole
    mask[250:252, 300:302] = False  # a speck of glass: filled
    (polygon,) = tissue_polygons(mask, 5000, 4000)
    assert len(polygon["coordinates"]) == 2  # the shell and the one hole
    geom = shape(polygon)
    assert geom.is_valid
    assert abs(geom.area - mask.sum() * 100) / (mask.sum() * 100) < 0.02


# -- OME-TIFF resolution --------------------------------------------------------------------------
OME_METADATA = {"axes": "YXS", "PhysicalSizeX": 0.25, "PhysicalSizeXUnit": "µm", "PhysicalSizeY": 0.25,
                "PhysicalSizeYUnit": "µm"}


def _he(height: int, width: int) -> np.ndarray:
    from g2l_cache.demo_slides import source_he_image

    texture = source_he_image()
    reps = (-(-height // texture.shape[0]), -(-width // texture.shape[1]), 1)
    return np.ascontiguousarray(np.tile(texture, reps)[:height, :width])


@pytest.fixture(scope="module")
def ome_slides(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ome")
    pixels = _he(2048, 3072)
    flat = folder / "flat.ome.tif"
    tifffile.imwrite(flat, pixels, tile=(256, 256), photometric="rgb", compression="jpeg", metadata=OME_METADATA)
    pyramid = folder / "pyramid.ome.tif"
    with tifffile.TiffWriter(pyramid, bigtiff=True, ome=True) as tif:
        tif.write(pixels, subifds=2, tile=(256, 256), photometric="rgb", compression="jpeg", metadata=OME_METADATA)
        for f in (2, 4):
            tif.write(pixels[::f, ::f], subfiletype=1, tile=(256, 256), photometric="rgb", compression="jpeg")
    return flat, pyramid


def test_ome_tiffs_are_read_at_their_recorded_resolution(ome_slides):
    flat, pyramid = ome_slides
    opened = open_slide(SlideSpec("flat", str(flat)))
    assert (opened.mpp, opened.mpp_source, opened.reader_name) == (0.25, "slide", "OpenSlide")
    # a SubIFD pyramid OpenSlide lists as one level is read by tiatoolbox, with all of its levels
    opened = open_slide(SlideSpec("pyramid", str(pyramid)))
    assert (opened.mpp, opened.mpp_source) == (0.25, "slide")
    assert [round(lv.downsample) for lv in opened.reader.levels] == [1, 2, 4]
    for slide, spec in ((flat, "flat"), (pyramid, "pyramid")):
        plan = plan_tiles(open_slide(SlideSpec(spec, str(slide))), spec, TilingConfig(mpp=0.5, tile_size=128), 0)
        assert plan.tiles and all(t.size0 == 256 for t in plan.tiles)  # 128 px at 0.5 mpp from 0.25 mpp


def test_mpp_from_every_source_the_tiff_can_record():
    ome = ('<?xml version="1.0"?><OME xmlns="http://www.openmicroscopy.org/Schemas/OME/2016-06"><Image>'
           '<Pixels PhysicalSizeX="{x}" PhysicalSizeXUnit="{u}" SizeX="1"/></Image></OME>')
    assert mpp_from_properties({"tiff.ImageDescription": ome.format(x=0.25, u="µm")}) == 0.25
    assert mpp_from_properties({"tiff.ImageDescription": ome.format(x=500, u="nm")}) == 0.5
    assert mpp_from_properties({"tiff.ImageDescription": "Aperio Image Library |AppMag = 40|MPP = 0.2527"}) == 0.2527
    assert mpp_from_properties({"tiff.XResolution": "40000", "tiff.ResolutionUnit": "centimeter"}) == 0.25
    assert mpp_from_properties({"tiff.XResolution": "1", "tiff.ResolutionUnit": "none"}) is None
    assert mpp_from_properties({"tiff.ImageDescription": "<OME broken"}) is None


def test_a_plan_of_an_ome_tiff_records_its_mpp(ome_slides, tmp_path):
    from g2l_cache.plan import PlanConfig, run_plan

    flat, _ = ome_slides
    plan = run_plan(PlanConfig(out=str(tmp_path / "cache"), slides=[str(flat)], teacher="vit_tiny_patch16_224",
                               tile_size=128, crop_size=112, mpp=0.5, progress=False, num_workers=0))
    assert plan["tiles"]["total"] > 0 and not plan.get("failed")
    qc = json.loads((tmp_path / "cache" / "qc" / "flat.ome.geojson").read_text())
    assert any(f["properties"]["objectType"] == "tile" for f in qc["features"])


def test_ome_tiffs_build_into_a_cache_and_its_page(ome_slides, tmp_path):
    from helpers import small_config
    from g2l_cache.build import run_build
    from g2l_cache.reader import CacheReader

    summary = run_build(small_config(tmp_path / "cache", list(ome_slides), mpp=0.5, max_tiles_per_slide=4))
    assert summary.slides_ok == 2 and summary.slides_failed == 0
    slides = CacheReader(str(tmp_path / "cache")).slides()
    assert slides["mpp"].to_list() == [0.25, 0.25] and set(slides["mpp_source"]) == {"slide"}
    page = (tmp_path / "cache" / "report.html").read_text()
    assert "flat.ome" in page and "pyramid.ome" in page
