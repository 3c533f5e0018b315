"""Demo slides are real pyramidal WSIs; the worker data path and map growth give the same cache."""

import numpy as np
import openslide
from typer.testing import CliRunner

import g2l_cache.store as store
from cli.main import app
from helpers import cache_content, small_config
from g2l_cache.build import run_build
from g2l_cache.slides import SlideSpec, open_slide
from g2l_cache.wsi import TiatoolboxReader


def test_demo_slides_are_pyramidal_tiffs_with_mpp(demo_dir):
    slides = sorted(demo_dir.glob("*.tif"))
    assert len(slides) == 3
    for path in slides:
        opened = open_slide(SlideSpec(path.stem, str(path)))
        assert opened.reader_name == "OpenSlide" and opened.mpp in (0.25, 0.5)
        assert len(opened.reader.levels) == 3
        osr = openslide.OpenSlide(str(path))
        assert osr.level_count == 3 and float(osr.properties["openslide.mpp-x"]) == opened.mpp
        # tiatoolbox reads them too, to the same pixels at every level
        tia = TiatoolboxReader(path, None)
        assert tia.mpp == opened.mpp and [lv.width for lv in tia.levels] == [lv.width for lv in opened.reader.levels]
        for level in range(3):
            ds = int(opened.reader.levels[level].downsample)
            assert np.array_equal(tia.read_level(level, 64 * ds, 32 * ds, 96, 80),
                                  opened.reader.read_level(level, 64 * ds, 32 * ds, 96, 80))
    no_mpp = demo_dir / "no_mpp" / "slide-no-mpp.tif"
    assert "openslide.mpp-x" not in openslide.OpenSlide(str(no_mpp)).properties


def test_demo_slides_command(tmp_path):
    result = CliRunner().invoke(app, ["demo", "slides", str(tmp_path / "s"), "--n-slides", "2",
                                      "--centers", "2"])
    assert result.exit_code == 0, result.output
    assert len(list((tmp_path / "s").glob("*.tif"))) == 2
    bad = CliRunner().invoke(app, ["demo", "slides", str(tmp_path / "t"), "--centers", "9"])
    assert bad.exit_code == 2 and "--centers" in bad.output


def test_worker_processes_build_the_same_cache(built_cache, demo_dir, tmp_path):
    out = tmp_path / "workers"
    run_build(small_config(out, [demo_dir], num_workers=2))
    assert cache_content(out) == cache_content(built_cache)


def test_lmdb_map_grows_when_full(demo_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(store, "INITIAL_MAP_SIZE", 32 * 1024)
    out = tmp_path / "tiny-map"
    summary = run_build(small_config(out, [sorted(demo_dir.glob("*.tif"))[0]], max_tiles_per_slide=40))
    assert summary.targets_written == summary.views > 0
    (index,) = (out / "shards").glob("*/index.lmdb")
    assert (index / "data.mdb").stat().st_size > 32 * 1024


def test_every_command_and_option_explains_itself():
    import typer

    def walk(cmd, path):
        yield path, cmd
        for name, sub in getattr(cmd, "commands", {}).items():
            yield from walk(sub, [*path, name])

    commands = list(walk(typer.main.get_command(app), []))
    assert len(commands) > 15
    for path, cmd in commands:
        assert (cmd.help or "").strip(), f"g2l {' '.join(path)} has no help"
        for param in cmd.params:  # options and arguments (typer's arguments carry help too)
            assert (getattr(param, "help", None) or "").strip(), f"g2l {' '.join(path)} {param.name}: no help"
    result = CliRunner().invoke(app, ["cache", "verify", "--help"])
    assert result.exit_code == 0 and "--recompute" in result.output