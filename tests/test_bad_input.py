"""Bad input gets a clear one-line error, and one bad slide never sinks a build."""

import shutil

import numpy as np
import polars as pl
import pytest
import timm
from safetensors.torch import save_file
from typer.testing import CliRunner

from cli.main import app
from helpers import small_config
from g2l_cache import G2LError
from g2l_cache.build import run_build
from g2l_cache.demo_slides import write_pyramid_tiff
from g2l_cache.reader import CacheReader

runner = CliRunner()
ARGS = ["--teacher", "vit_tiny_patch16_224", "--random-init", "--tile-size", "64", "--crop-size",
        "48", "--views", "2", "--max-tiles-per-slide", "4", "--num-workers", "0", "--no-progress"]


@pytest.fixture(scope="module")
def bad_slides(demo_dir, tmp_path_factory):
    """One good slide plus every kind of bad one, in one folder."""
    folder = tmp_path_factory.mktemp("bad")
    good = sorted(demo_dir.glob("*.tif"))[0]
    shutil.copy(good, folder / "good.tif")
    data = good.read_bytes()
    (folder / "truncated.tif").write_bytes(data[: len(data) // 3])
    (folder / "not-a-slide.tif").write_text("this is a text file, not a slide\n")
    (folder / "empty.svs").write_bytes(b"")
    shutil.copy(demo_dir / "no_mpp" / "slide-no-mpp.tif", folder / "no-mpp.tif")
    blank = np.full((1200, 1600, 3), 246, np.uint8)
    blank += np.random.default_rng(0).integers(0, 4, blank.shape, dtype=np.uint8)
    write_pyramid_tiff(folder / "blank.tif", blank, 0.5)
    write_pyramid_tiff(folder / "at-72-dpi.tif", blank, 25_400 / 72)  # resolution tags of a plain 72-dpi TIFF
    # opens and plans (header and low-resolution levels intact), but its full-resolution tiles are
    # zeros: it fails when the build reads its tiles, not when it opens the slide
    import tifffile

    with tifffile.TiffFile(good) as tif:
        page = tif.pages[0]
        spans = list(zip(page.dataoffsets, page.databytecounts))
    damaged = bytearray(data)
    for offset, count in spans:
        damaged[offset:offset + count] = bytes(count)
    (folder / "damaged-tiles.tif").write_bytes(bytes(damaged))
    return folder


def test_each_bad_slide_is_recorded_with_its_reason(bad_slides, tmp_path):
    out = tmp_path / "cache"
    result = runner.invoke(app, ["cache", "build", str(bad_slides), "--out", str(out), *ARGS])
    assert result.exit_code == 0, result.output  # one slide worked: not a failure without --strict
    slides = CacheReader(str(out)).slides()
    status = dict(zip(slides["slide_id"], slides["status"]))
    errors = dict(zip(slides["slide_id"], slides["error"]))
    assert status == {"good": "ok", "truncated": "failed", "not-a-slide": "failed", "empty": "failed",
                      "no-mpp": "failed", "blank": "failed", "damaged-tiles": "failed", "at-72-dpi": "failed"}
    assert errors["at-72-dpi"].startswith("at-72-dpi.tif: 352.778 µm per pixel, from its metadata")
    assert "--mpp-override" in errors["at-72-dpi"]
    assert "--mpp-override" in errors["no-mpp"]
    assert "no tissue" in errors["blank"] and "--tissue-threshold" in errors["blank"]
    assert "is empty" in errors["empty"]
    assert errors["not-a-slide"].startswith("cannot read not-a-slide.tif as a slide (TiffFileError")
    # the truncated file opens (its header is whole) and fails while its levels are read
    assert errors["truncated"].startswith("opening and planning the slide failed") and "truncated" in errors["truncated"]
    assert errors["damaged-tiles"].startswith("reading tile damaged-tiles@") and "damaged" in errors["damaged-tiles"]
    assert CacheReader(str(out)).slides().filter(pl.col("status") == "ok")["n_tiles"].to_list() == [4]
    assert "failed slides" in result.output and "no-mpp" in result.output
    assert "teacher waiting for data" in result.output
    # --strict turns any failed slide into a non-zero exit (and resumes the same cache)
    strict = runner.invoke(app, ["cache", "build", str(bad_slides), "--out", str(out), *ARGS, "--strict"])
    assert strict.exit_code == 1


def test_all_slides_failing_exits_non_zero(bad_slides, tmp_path):
    result = runner.invoke(app, ["cache", "build", str(bad_slides / "no-mpp.tif"),
                                 "--out", str(tmp_path / "c"), *ARGS])
    assert result.exit_code == 1


@pytest.mark.parametrize("args, message", [
    (["--teacher", "no-such-teacher"], "unknown teacher 'no-such-teacher'"),
    (["--views", "0"], "--views must be at least 1"),
    (["--mpp", "-1"], "--mpp must be positive"),
    (["--tissue-method", "magic"], "--tissue-method must be one of"),
])
def test_bad_options_are_one_line_errors(demo_dir, tmp_path, args, message):
    result = runner.invoke(app, ["cache", "build", str(demo_dir), "--out", str(tmp_path / "c"),
                                 *ARGS, *args])
    assert result.exit_code == 2
    assert message in result.output and "Traceback" not in result.output


def test_weights_that_do_not_fit_the_architecture(demo_dir, tmp_path):
    weights = tmp_path / "vit_small.safetensors"
    save_file(timm.create_model("vit_small_patch16_224", num_classes=0).state_dict(), str(weights))
    cfg = small_config(tmp_path / "c", [demo_dir], random_init=False, teacher_weights=str(weights))
    with pytest.raises(G2LError, match="do not fit vit_tiny_patch16_224"):
        run_build(cfg)


def test_weights_file_that_fits_is_loaded(demo_dir, tmp_path):
    model = timm.create_model("vit_tiny_patch16_224", num_classes=0, img_size=48)
    weights = tmp_path / "tiny.safetensors"
    save_file({f"module.{k}": v for k, v in model.state_dict().items()}, str(weights))
    out = tmp_path / "c"
    summary = run_build(small_config(out, [sorted(demo_dir.glob("*.tif"))[0]], random_init=False,
                                     teacher_weights=str(weights), max_tiles_per_slide=2))
    assert summary.slides_ok == 1
    info = CacheReader(str(out)).teacher()
    assert info["spec"]["weights"] == str(weights)


def test_output_folder_that_is_not_a_cache(demo_dir, tmp_path):
    out = tmp_path / "occupied"
    out.mkdir()
    (out / "thesis.docx").write_text("precious")
    with pytest.raises(G2LError, match="not a g2l cache"):
        run_build(small_config(out, [demo_dir]))
    assert (out / "thesis.docx").read_text() == "precious"
    result = runner.invoke(app, ["cache", "info", str(out)])
    assert result.exit_code == 2 and "not a g2l cache" in result.output


def test_other_settings_on_an_existing_cache_are_refused(built_cache, demo_dir):
    with pytest.raises(G2LError, match="tile_size: cache has 64, asked 96"):
        run_build(small_config(built_cache, [demo_dir], tile_size=96, crop_size=64))
    with pytest.raises(G2LError, match="per_tile"):
        run_build(small_config(built_cache, [demo_dir], views=3))


def test_missing_slide_input_and_empty_folder(tmp_path):
    with pytest.raises(G2LError, match="does not exist"):
        run_build(small_config(tmp_path / "c", [tmp_path / "nowhere"]))
    (tmp_path / "empty").mkdir()
    with pytest.raises(G2LError, match="no slides found"):
        run_build(small_config(tmp_path / "c2", [tmp_path / "empty"]))


def test_csv_without_path_column(tmp_path):
    csv = tmp_path / "s.csv"
    csv.write_text("file,mpp\na.svs,0.5\n")
    with pytest.raises(G2LError, match="'path' column"):
        run_build(small_config(tmp_path / "c", [csv]))


def test_config_file_feeds_the_same_options(demo_dir, tmp_path):
    one = sorted(demo_dir.glob("*.tif"))[0]
    toml = tmp_path / "build.toml"
    toml.write_text('[build]\nteacher = "vit_tiny_patch16_224"\nrandom_init = true\ntile_size = 64\n'
                    'crop_size = 48\nviews = 3\nmax_tiles_per_slide = 2\nnum_workers = 0\n')
    out = tmp_path / "c"
    result = runner.invoke(app, ["cache", "build", str(one), "--out", str(out), "--config", str(toml),
                                 "--no-progress"])
    assert result.exit_code == 0, result.output
    assert CacheReader(str(out)).manifest["settings"]["views"]["per_tile"] == 3
    bad = tmp_path / "bad.toml"
    bad.write_text("views = 'four'\n[[[")
    result = runner.invoke(app, ["cache", "build", str(one), "--out", str(tmp_path / "c3"),
                                 "--config", str(bad)])
    assert result.exit_code == 2 and "not valid TOML" in result.output


