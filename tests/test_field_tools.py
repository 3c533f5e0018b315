"""The field's tools: report pages a browser opens from disk, QC GeoJSON that QuPath imports,
annotations that limit where tiles are taken, students exported for transformers and eva, the speed
line of the model card, and `g2l doctor`."""

import json
import shutil
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from shapely.geometry import Polygon, box, shape
from typer.testing import CliRunner

from cli.main import app
from helpers import assert_links_resolve, small_config
from g2l_cache import G2LError
from g2l_cache.build import run_build
from g2l_cache.plan import PlanConfig, run_plan
from g2l_cache.reader import CacheReader

runner = CliRunner()


@pytest.fixture(scope="module")
def reported_cache(demo_dir, tmp_path_factory):
    """Demo slides plus a truncated one, planned then built."""
    folder = tmp_path_factory.mktemp("slides")
    for slide in sorted(demo_dir.glob("*.tif")):
        shutil.copy(slide, folder / slide.name)
    data = (folder / sorted(p.name for p in folder.glob("*.tif"))[0]).read_bytes()
    (folder / "broken.tif").write_bytes(data[: len(data) // 3])
    out = tmp_path_factory.mktemp("cache") / "c"
    cfg = small_config(out, [folder])
    run_plan(PlanConfig(**{**cfg.__dict__, "sample_tiles": 4}))
    run_build(cfg)
    return out


# -- 1. QC a person can browse and correct ---------------------------------------------------------
def test_the_cache_report_opens_from_disk_with_failed_slides_first(reported_cache):
    page = reported_cache / "report.html"
    refs = assert_links_resolve(page)
    slides = pl.read_parquet(reported_cache / "slides.parquet")
    assert [c[0] for c in refs.cards][:1] == ["broken"] and refs.cards[0][1]  # the failed slide first
    assert sorted(c[0] for c in refs.cards) == sorted(slides["slide_id"].to_list())
    assert refs.lazy == slides.filter(pl.col("status") == "ok").height  # every picture loads lazily
    text = page.read_text()
    error = slides.filter(pl.col("slide_id") == "broken")["error"][0]
    assert error.split(";")[0].replace("'", "&#x27;") in text
    for expected in ("Plan beside what was built", "Cost ledger", "vit_tiny_patch16_224", "GeoJSON for QuPath"):
        assert expected in text
    # refreshed by the command, also for a cache made before the page existed
    page.unlink()
    result = runner.invoke(app, ["cache", "report", str(reported_cache)])
    assert result.exit_code == 0 and page.exists()


def test_the_qc_geojson_holds_tissue_and_every_kept_tile_in_level0_pixels(reported_cache):
    reader = CacheReader(str(reported_cache))
    tiles = reader.tiles()
    for slide in reader.slides().filter(pl.col("status") == "ok").iter_rows(named=True):
        data = json.loads((reported_cache / "qc" / f"{slide['slide_id']}.geojson").read_text())
        assert data["type"] == "FeatureCollection"
        geometries = [shape(f["geometry"]) for f in data["features"]]
        assert all(g.is_valid and g.area > 0 for g in geometries)
        classes = [f["properties"]["classification"]["name"] for f in data["features"]]
        assert set(classes) == {"Tissue", "Tile"}
        whole = box(0, 0, slide["width"], slide["height"])
        tissue = [g for g, c in zip(geometries, classes) if c == "Tissue"]
        assert all(whole.buffer(1).contains(g) for g in tissue)
        # each kept tile, where the tile table has it, and mostly on the drawn tissue
        mine = tiles.filter(pl.col("slide_id") == slide["slide_id"])
        boxes = {f["properties"]["name"]: g for f, g in zip(data["features"], geometries)
                 if f["properties"]["objectType"] == "tile"}
        assert sorted(boxes) == sorted(mine["tile_id"].to_list())
        for t in mine.iter_rows(named=True):
            assert boxes[t["tile_id"]].equals(box(t["x"], t["y"], t["x"] + t["size0"], t["y"] + t["size0"]))
        union = tissue[0].union_all(tissue[1:]) if hasattr(tissue[0], "union_all") else \
            __import__("shapely").union_all(tissue)
        inside = np.mean([union.intersection(b).area / b.area for b in boxes.values()])
        assert inside > 0.5


# -- 2. annotations in ---------------------------------------------------------------------------
TUMOUR = Polygon([(300, 300), (1900, 250), (2100, 1500), (400, 1700)], [[(900, 800), (1300, 800), (1300, 1150), (900, 1150)]])
STROMA = Polygon([(2300, 1700), (3100, 1700), (3100, 2300), (2300, 2300)])


def _feature(polygon: Polygon, cls: str | None) -> dict:
    from shapely.geometry import mapping

    props = {"objectType": "annotation"}
    if cls:
        props["classification"] = {"name": cls, "color": [200, 0, 0]}
    return {"type": "Feature", "geometry": mapping(polygon), "properties": props}


@pytest.fixture(scope="module")
def annotated(demo_dir, tmp_path_factory):
    """Three demo slides: the first annotated (a tumour region with a hole, and stroma), the second with
    a malformed file, the third without a file; built keeping tumour tiles only, fully inside."""
    notes = tmp_path_factory.mktemp("annotations")
    slides = sorted(demo_dir.glob("*.tif"))
    (notes / f"{slides[0].stem}.geojson").write_text(json.dumps(
        {"type": "FeatureCollection", "features": [_feature(TUMOUR, "Tumor"), _feature(STROMA, "Stroma")]}))
    (notes / f"{slides[1].stem}.geojson").write_text('{"type": "FeatureCollection", "features": [')
    out = tmp_path_factory.mktemp("cache") / "c"
    run_build(small_config(out, slides, annotations=str(notes), annotation_classes="Tumor",
                           tissue_threshold=1.0, max_tiles_per_slide=None))
    return out, notes, slides


def test_annotated_slides_keep_tiles_inside_their_regions_only(annotated, demo_dir, tmp_path):
    out, notes, slides = annotated
    reader = CacheReader(str(out))
    status = dict(reader.slides().select("slide_id", "status").iter_rows())
    assert status == {slides[0].stem: "ok", slides[1].stem: "failed", slides[2].stem: "ok"}
    tiles = reader.tiles().filter(pl.col("slide_id") == slides[0].stem)
    assert tiles.height > 10
    grid = 8  # one mask pixel (4 um) in level-0 pixels of this 0.5-mpp slide: the edge's rasterisation
    for t in tiles.iter_rows(named=True):
        tile = box(t["x"], t["y"], t["x"] + t["size0"], t["y"] + t["size0"])
        assert TUMOUR.buffer(grid).contains(tile), t["tile_id"]  # inside the tumour, never in its hole
    # the slide without a file is tiled whole: the same tiles as a cache without annotations
    plain = tmp_path / "plain"
    run_build(small_config(plain, [slides[2]], tissue_threshold=1.0, max_tiles_per_slide=None))
    whole = CacheReader(str(plain)).tiles()["tile_id"].to_list()
    assert reader.tiles().filter(pl.col("slide_id") == slides[2].stem)["tile_id"].to_list() == whole
    # the manifest and slides.parquet say which slides had annotations, and with what
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["settings"]["tiling"]["annotations"] is True
    assert manifest["settings"]["tiling"]["annotation_classes"] == ["Tumor"]
    assert manifest["annotations"]["folder"] == str(notes.resolve())
    digests = dict(reader.slides().select("slide_id", "annotation").iter_rows())
    assert digests[slides[0].stem] and digests[slides[2].stem] is None
    # the QC picture draws the region in yellow beside the tissue outline
    from PIL import Image

    qc = np.asarray(Image.open(out / "qc" / f"{slides[0].stem}.jpg").convert("RGB")).reshape(-1, 3).astype(int)
    assert ((qc[:, 0] > 180) & (qc[:, 1] > 130) & (qc[:, 2] < 110)).sum() > 100


def test_a_malformed_annotation_is_that_slides_error_with_the_fix(annotated):
    out, _, slides = annotated
    error = CacheReader(str(out)).slides().filter(pl.col("slide_id") == slides[1].stem)["error"][0]
    assert error.startswith(f"annotation file {slides[1].stem}.geojson is not readable JSON")
    assert "Export objects as GeoJSON" in error


def test_a_changed_annotation_is_refused_then_replans_that_slide_only_when_asked(annotated, tmp_path):
    out, notes, slides = annotated
    cache = tmp_path / "c"
    shutil.copytree(out, cache)
    moved = tmp_path / "notes"
    shutil.copytree(notes, moved)
    before = CacheReader(str(cache)).tiles()
    # another folder with the same files: recorded, nothing planned again
    run_build(small_config(cache, slides, annotations=str(moved), annotation_classes="Tumor",
                           tissue_threshold=1.0, max_tiles_per_slide=None))
    assert CacheReader(str(cache)).tiles().equals(before)
    assert json.loads((cache / "manifest.json").read_text())["annotations"]["folder"] == str(moved.resolve())
    # a smaller tumour region on the first slide: its tiles change, the third slide's stay
    smaller = Polygon([(300, 300), (1100, 300), (1100, 700), (300, 700)])
    (moved / f"{slides[0].stem}.geojson").write_text(json.dumps([_feature(smaller, "Tumor")]))  # a bare list
    # resumed without repeating --annotations (nor the tiling): the cache's own folder and classes are used
    from g2l_cache.build_config import config_from_dict

    resume = {"out": str(cache), "teacher": "vit_tiny_patch16_224", "random_init": True, "num_workers": 0,
              "progress": False, "batch_size": 8}
    # its stored tiles and targets are never discarded unasked: refused, naming the slide and why
    with pytest.raises(G2LError, match="--replan-changed") as refused:
        run_build(config_from_dict(resume))
    assert f"{slides[0].stem} (its annotation file changed)" in str(refused.value)
    assert CacheReader(str(cache)).tiles().equals(before)
    run_build(config_from_dict({**resume, "replan_changed": True}))
    after = CacheReader(str(cache)).tiles()
    first = after.filter(pl.col("slide_id") == slides[0].stem)
    assert 0 < first.height < before.filter(pl.col("slide_id") == slides[0].stem).height
    assert all(smaller.buffer(8).contains(box(t["x"], t["y"], t["x"] + t["size0"], t["y"] + t["size0"]))
               for t in first.iter_rows(named=True))
    third = slides[2].stem
    assert after.filter(pl.col("slide_id") == third).equals(before.filter(pl.col("slide_id") == third))
    assert json.loads((cache / "manifest.json").read_text())["status"] == "complete"


def test_annotation_options_are_checked(tmp_path, demo_dir):
    from g2l_cache import G2LError

    with pytest.raises(G2LError, match="--annotation-classes needs --annotations"):
        small_config(tmp_path / "a", [], annotation_classes="Tumor")
    with pytest.raises(G2LError, match="is not a folder"):
        small_config(tmp_path / "b", [], annotations=str(tmp_path / "nowhere"))
    notes = tmp_path / "notes"
    notes.mkdir()
    slide = sorted(demo_dir.glob("*.tif"))[0]
    (notes / f"{slide.stem}.geojson").write_text(json.dumps([_feature(STROMA, "Stroma")]))
    out = tmp_path / "c"
    summary = run_build(small_config(out, [slide], annotations=str(notes), annotation_classes="Tumor"))
    assert summary.failed[slide.stem].startswith(f"annotation file {slide.stem}.geojson has no polygon of class "
                                                 "Tumor (its classes: Stroma)")
    # a cache planned without annotations refuses them later: the tiling would differ
    plain = tmp_path / "plain"
    run_build(small_config(plain, [slide]))
    with pytest.raises(G2LError, match="tiling.annotations"):
        run_build(small_config(plain, [slide], annotations=str(notes)))


def test_the_region_mask_is_each_polygon_less_its_holes_also_across_the_slide_edge():
    from shapely import contains_xy

    from g2l_cache.annotations import region_mask

    # one region with a hole, one reaching past the slide's top-left corner, one wholly outside it
    regions = [Polygon([(100, 100), (700, 120), (650, 600), (120, 560)], [[(300, 300), (400, 300), (400, 400), (300, 400)]]),
               Polygon([(-200, -100), (250, -50), (200, 180), (-100, 220)]),
               Polygon([(900, 900), (1200, 900), (1200, 1200)]),
               box(350, 350, 450, 450)]  # covers part of the first region's hole: the hole cuts only its own
    mask = region_mask(regions, (40, 50), 1000, 800)
    ys, xs = np.mgrid[0:40, 0:50]
    centres_x, centres_y = (xs + 0.5) * 20, (ys + 0.5) * 20  # 20 level-0 px per mask px
    expected = np.zeros((40, 50), dtype=bool)
    for region in regions:
        expected |= contains_xy(region, centres_x, centres_y)
    # rasterisation and containment disagree only on pixels the outlines cross
    assert (mask != expected).mean() < 0.06 and mask[0, 0] and mask[18, 30] and not mask[15, 15]
    assert mask[18, 18] and not mask[16, 16]  # the box fills part of the hole; the rest stays empty
