"""A built cache: tables, replay equality with the teacher input, mpp handling, info and verify."""

import json
import shutil

import numpy as np
import pytest
import torch

from helpers import SMALL, file_digests, run_cli, small_config
from g2l_cache.build import run_build
from g2l_cache.inspect import cache_info, verify_cache
from g2l_cache.reader import CacheReader
from g2l_cache.teachers import TeacherSpec, load_teacher
from g2l_cache.tiling import TilingConfig
from g2l_cache.errors import G2LError
from g2l_cache.views import ViewParams, sample_view


def test_tables_and_manifest_agree(built_cache):
    reader = CacheReader(str(built_cache))
    slides, tiles, views = reader.slides(), reader.tiles(), reader.views()
    m = reader.manifest
    assert m["status"] == "complete" and m["counts"]["slides_ok"] == slides.height == 3
    assert tiles.height == m["counts"]["tiles"] and views.height == tiles.height * 2
    assert tiles.group_by("slide_id").len()["len"].max() <= 10
    assert (tiles["tissue_fraction"] >= 0.5).all()
    teacher = reader.teacher()
    assert teacher["n_targets"] == views.height and teacher["complete"]
    for name in ViewParams.__dataclass_fields__:
        assert name in views.columns
    # every stored view's params are regenerated alone from its key
    for row in views.sample(20, seed=0).to_dicts():
        assert ViewParams.from_dict(row) == sample_view(0, row["tile_id"], row["view_index"],
                                                        reader.policy)
    assert sorted(p.name for p in (built_cache / "qc").glob("*.jpg")) == \
        sorted(f"{s}.jpg" for s in slides["slide_id"].to_list())


def test_mpp_is_read_from_the_slide_and_tiles_cover_the_right_area(built_cache):
    slides = CacheReader(str(built_cache)).slides()
    tiles = CacheReader(str(built_cache)).tiles()
    mpps = dict(zip(slides["slide_id"], slides["mpp"]))
    assert sorted(set(mpps.values())) == [0.25, 0.5]
    assert set(slides["mpp_source"]) == {"slide"}
    for row in tiles.select("slide_id", "size0", "read_mpp").unique().to_dicts():
        # a 64 px tile at 0.5 mpp covers 64 level-0 px at 0.5 mpp, 128 at 0.25 mpp
        assert row["size0"] == round(64 * row["read_mpp"] / mpps[row["slide_id"]])


def test_the_teachers_input_inside_the_build_is_what_the_student_replays(demo_dir, tmp_path):
    """Capture every view the teacher gets during a build; each is bit-for-bit a replayed view."""
    import hashlib

    spec = TeacherSpec(SMALL["teacher"], random_init=True, init_seed=0)
    teacher = load_teacher(spec, img_size=SMALL["crop_size"])
    seen, embed = [], teacher.embed

    def recording_embed(views):
        seen.extend(hashlib.sha1(v.numpy().tobytes()).hexdigest() for v in views)
        return embed(views)

    teacher.embed = recording_embed
    slide = sorted(demo_dir.glob("*.tif"))[0]
    out = tmp_path / "cache"
    run_build(small_config(out, [slide]), teacher=teacher)
    reader = CacheReader(str(out))
    replayed = [hashlib.sha1(reader.replay(v).numpy().tobytes()).hexdigest() for v in range(reader.n_views)]
    assert reader.n_views > 4 and sorted(seen) == sorted(replayed)
    assert len(set(replayed)) == reader.n_views  # distinct views, so the match is one to one
    # and each stored target is the teacher's output on that input (fp16 storage)
    fp = reader.teacher()["fingerprint"]
    emb, patch = embed(torch.stack([reader.replay(v) for v in range(reader.n_views)]))
    for v in range(reader.n_views):
        s_emb, s_patch = reader.target(fp, v)
        np.testing.assert_allclose(s_emb.astype(np.float32), emb[v].numpy(), atol=2e-3, rtol=2e-3)
        np.testing.assert_allclose(s_patch.astype(np.float32), patch[v].numpy(), atol=2e-3, rtol=2e-3)


def test_info_reports_counts_and_sizes(built_cache):
    info = cache_info(str(built_cache))
    assert info["slides_ok"] == 3 and info["views"] == info["tiles"] * 2
    assert info["bytes_per_view"] > 0 and info["bytes_on_disk"] >= info["bytes_in_shards"]
    out = run_cli("cache", "info", str(built_cache), "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["views"] == info["views"]


def test_verify_passes_then_catches_a_corrupted_value(built_cache, tmp_path):
    report = verify_cache(str(built_cache), recompute=4)
    assert report["problems"] == []
    (rec,) = report["recompute"].values()
    assert rec["max_abs_diff_embedding"] < 5e-3 and rec["min_cosine"] > 0.999
    bad = tmp_path / "bad"
    shutil.copytree(built_cache, bad)
    reader = CacheReader(str(bad))
    view = 5
    info = reader.teacher()
    shard = int(reader.tile_index[reader.view_index[view]["tile"]]["shard"])
    stride = 2 * (info["embed_dim"] + info["patch_dim"]) + 4
    with open(reader.layout.targets_file(shard, info["fingerprint"]), "r+b") as fh:
        fh.seek(int(reader.view_index[view]["row"]) * stride + 3)
        byte = fh.read(1)
        fh.seek(-1, 1)
        fh.write(bytes([byte[0] ^ 0xFF]))  # flip bits inside the payload, keep the stored checksum
    problems = verify_cache(str(bad))["problems"]
    assert len(problems) == 1 and "checksum mismatch" in problems[0] and f"view {view} " in problems[0]
    with pytest.raises(G2LError, match="checksum mismatch"):
        reader.target(info["fingerprint"], view)
    out = run_cli("cache", "verify", str(bad))
    assert out.returncode == 1 and "checksum mismatch" in out.stdout


def test_mpp_override_and_csv(demo_dir, tmp_path):
    no_mpp = demo_dir / "no_mpp" / "slide-no-mpp.tif"
    csv = tmp_path / "slides.csv"
    csv.write_text(f"path,slide_id,mpp\n{no_mpp},nompp,0.5\n")
    out = tmp_path / "c"
    summary = run_build(small_config(out, [csv], max_tiles_per_slide=3))
    assert summary.slides_ok == 1 and summary.slides_failed == 0
    slides = CacheReader(str(out)).slides()
    assert slides["mpp_source"].to_list() == ["override"] and slides["mpp"].to_list() == [0.5]
    out2 = tmp_path / "c2"
    summary = run_build(small_config(out2, [no_mpp], mpp_override=0.5, max_tiles_per_slide=3))
    assert summary.slides_ok == 1


def test_resume_of_a_complete_cache_writes_nothing(built_cache, demo_dir, tmp_path):
    cache = tmp_path / "cache"  # a copy: the shared cache stays untouched whatever happens here
    shutil.copytree(built_cache, cache)
    before = file_digests(cache)
    summary = run_build(small_config(cache, [demo_dir]))
    assert summary.targets_written == 0 and summary.slides_ok == 3
    assert file_digests(cache) == before


def test_png_tiles_are_lossless(demo_dir, tmp_path):
    out = tmp_path / "png"
    run_build(small_config(out, [sorted(demo_dir.glob("*.tif"))[0]], tile_format="png",
                           max_tiles_per_slide=2))
    reader = CacheReader(str(out))
    row = reader.tiles().row(0, named=True)
    assert reader.tile_bytes(0)[:4] == b"\x89PNG"
    from g2l_cache.slides import open_slide, SlideSpec
    from g2l_cache.tiling import TileRecord, read_tile

    slide_row = reader.slides().row(0, named=True)
    slide = open_slide(SlideSpec(slide_row["slide_id"], slide_row["path"]))
    raw = read_tile(slide, TileRecord(row["tile_id"], row["x"], row["y"], row["size0"], 1.0),
                    TilingConfig(tile_size=64))
    assert np.array_equal(reader.tile_pixels(0), raw)




def test_plain_png_slide_needs_and_takes_an_mpp(tmp_path):
    from PIL import Image
    from typer.testing import CliRunner

    from cli.main import app
    from g2l_cache.demo_slides import make_mosaic, source_he_image

    folder = tmp_path / "png"
    folder.mkdir()
    mosaic = make_mosaic(source_he_image(), (600, 800), np.random.default_rng(0), 6)
    Image.fromarray(mosaic).save(folder / "plain.png")
    out = tmp_path / "c"
    args = ["cache", "build", str(folder), "--out", str(out), "--teacher", "vit_tiny_patch16_224",
            "--random-init", "--tile-size", "64", "--crop-size", "48", "--views", "2",
            "--max-tiles-per-slide", "3", "--num-workers", "0", "--no-progress"]
    first = CliRunner().invoke(app, args)
    assert first.exit_code == 1 and "--mpp-override" in first.output
    # the retry leaves the tiling/view options out: they default to the cache's settings
    second = CliRunner().invoke(app, ["cache", "build", str(folder), "--out", str(out), "--teacher",
                                      "vit_tiny_patch16_224", "--random-init", "--mpp-override", "0.5",
                                      "--num-workers", "0", "--no-progress"])
    assert second.exit_code == 0, second.output
    reader = CacheReader(str(out))
    assert reader.slides()["status"].to_list() == ["ok"] and reader.tiles().height == 3
    assert reader.policy.tile_size == 64 and reader.views_per_tile == 2


def test_a_tile_whose_views_span_two_batches_is_stored_once(demo_dir, tmp_path):
    out = tmp_path / "odd"
    run_build(small_config(out, [sorted(demo_dir.glob("*.tif"))[0]], views=2, batch_size=3,
                           max_tiles_per_slide=6))
    reader = CacheReader(str(out))
    tiles = reader.tiles()
    (blob,) = out.glob("shards/*/tiles.bin")
    assert blob.stat().st_size == tiles["length"].sum() and tiles["offset"].n_unique() == tiles.height
    assert verify_cache(str(out))["problems"] == []


def test_tables_that_do_not_match_the_manifest_are_refused(built_cache, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(built_cache, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["counts"]["views"] += 1  # as if a build replaced the tables after this manifest
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(G2LError, match="changed while it was opened"):
        CacheReader(str(copy)).replay(0)
