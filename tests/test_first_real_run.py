"""What the first real run needs: state on the model's device, targets that cannot mix, views that
stay the views the teacher saw, a slide folder that can move, fp32 heads under bf16, honest numbers."""

from __future__ import annotations

import json
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from typer.testing import CliRunner

from cli.main import app
from g2l_cache import CacheReader, G2LError
from g2l_cache.build import run_build
from g2l_cache.inspect import verify_cache
from g2l_cache.layout import read_manifest, write_manifest
from g2l_cache.teachers import TeacherSpec, load_teacher
from g2l_student.config import FitConfig
from g2l_student.model import projection_head
from g2l_student.schedule import EMA, G2LEarlyStop, TrainState
from g2l_student.similarity import centred_r2
from g2l_student.checkpoint import LOOP_STATE, load_loop_state
from g2l_student.train import fit
from helpers import cache_content, copy_slides, small_config

runner = CliRunner()
TINY_FIT = dict(student="vit_tiny_patch16_224", random_init=True, img_size=32, batch_size=8, num_workers=0,
                val_fraction=0.34, checkpoint_every=5, progress=False)


# -- 1. resume on a GPU -----------------------------------------------------------------------------
def test_resumed_ema_lands_on_the_device_of_the_model_it_averages(tmp_path):
    from safetensors.torch import save_file

    saved = torch.nn.Linear(4, 3)
    checkpoint = tmp_path / "step_00000010"
    checkpoint.mkdir()
    save_file({k: v.detach().clone() for k, v in saved.state_dict().items()}, str(checkpoint / "ema.safetensors"))
    stop = G2LEarlyStop(window=3)
    stop.update(1.0)
    state = TrainState()
    state.step, state.micro_batch = 10, 20
    (checkpoint / LOOP_STATE).write_text(json.dumps({"train": state.state_dict(), "early_stop": stop.state_dict()}))
    # the model lives on another device than the CPU the file is read onto (a GPU in a real run)
    with torch.device("meta"):
        model = torch.nn.Linear(4, 3)
    ema, resumed, resumed_stop = EMA(model, 0.9), TrainState(), G2LEarlyStop(window=3)
    load_loop_state(checkpoint, resumed, resumed_stop, ema)
    assert {v.device.type for v in ema.shadow.values()} == {"meta"}
    assert all(v.dtype == torch.float32 for v in ema.shadow.values())
    ema.update(model)  # mixing devices would raise here
    assert (resumed.step, resumed.micro_batch) == (10, 20) and resumed_stop.state_dict() == stop.state_dict()


# -- 3. targets that cannot mix ---------------------------------------------------------------------
def test_a_resume_in_another_precision_is_refused_naming_both(demo_dir, tmp_path, monkeypatch):
    from g2l_cache import store

    cache = tmp_path / "cache"
    calls = {"n": 0}
    real_commit = store.ShardWriter.commit

    def commit_then_die(self, *args, **kwargs):  # a build killed after its first batch
        calls["n"] += 1
        if calls["n"] > 1:
            raise KeyboardInterrupt
        return real_commit(self, *args, **kwargs)
    monkeypatch.setattr(store.ShardWriter, "commit", commit_then_die)
    with pytest.raises(G2LError):
        run_build(small_config(cache, [demo_dir], precision="bf16"))
    monkeypatch.setattr(store.ShardWriter, "commit", real_commit)
    bf16 = read_manifest(cache)["teachers"]
    assert len(bf16) == 1 and next(iter(bf16.values()))["precision"] == "bf16"
    with pytest.raises(G2LError) as info:
        run_build(small_config(cache, [demo_dir], precision="fp32"))
    message = str(info.value)
    assert next(iter(bf16)) in message and "never mix" in message
    assert "precision: bf16 there, fp32 here" in message and "--precision bf16" in message
    done = run_build(small_config(cache, [demo_dir], precision="bf16"))  # the same settings finish it
    assert done.teacher_fingerprint == next(iter(bf16)) and read_manifest(cache)["status"] == "complete"


def test_the_fingerprint_covers_precision_and_the_manifest_the_versions(built_cache):
    spec = dict(name="vit_tiny_patch16_224", random_init=True)
    fps = {p: load_teacher(TeacherSpec(**spec, precision=p), img_size=48).fingerprint() for p in ("fp16", "bf16", "fp32")}
    assert len(set(fps.values())) == 3
    manifest = read_manifest(built_cache)
    versions = manifest["view_versions"]
    assert {"numpy", "pillow", "libjpeg", "torch", "timm"} <= set(versions) and versions["pillow"]
    teacher = next(iter(manifest["teachers"].values()))
    assert teacher["ledger"][-1]["versions"]["torch"] == torch.__version__.split("+")[0] or \
        teacher["ledger"][-1]["versions"]["torch"] == torch.__version__
    assert len(manifest["canaries"]) == manifest["counts"]["slides_ok"]


def _flip_low_bit(decode):
    def decode_differently(data: bytes) -> np.ndarray:
        return decode(data) ^ np.uint8(1)  # what another JPEG decoder might give
    return decode_differently


def test_views_that_replay_differently_are_caught_by_verify_fit_and_build(built_cache, tmp_path, monkeypatch):
    from g2l_cache import environment, reader, work
    from g2l_cache.tile_codec import decode_tile

    cache = tmp_path / "cache"
    shutil.copytree(built_cache, cache)
    assert verify_cache(str(cache), checksums=False)["problems"] == []
    recorded = read_manifest(cache)["view_versions"]
    newer = {**environment.library_versions(), "pillow": "99.0.0"}
    monkeypatch.setattr(environment, "library_versions", lambda: newer)
    monkeypatch.setattr(reader, "decode_tile", _flip_low_bit(decode_tile))
    report = verify_cache(str(cache), checksums=False)
    assert report["canaries"]["checked"] == 3 and len(report["canaries"]["changed"]) == 3
    assert f"pillow {recorded['pillow']} -> 99.0.0" in report["problems"][0]
    with pytest.raises(G2LError, match="--accept-changed-views") as info:
        fit(FitConfig(cache=str(cache), out=str(tmp_path / "run"), steps=2, **TINY_FIT))
    assert f"pillow {recorded['pillow']} -> 99.0.0" in str(info.value)
    accepted = fit(FitConfig(cache=str(cache), out=str(tmp_path / "run2"), steps=2, accept_changed_views=True,
                             **TINY_FIT))
    assert accepted.steps == 2
    assert json.loads((tmp_path / "run2" / "run.json").read_text())["views_changed"]["accepted"]
    # a teacher added with the changed decoder would be computed on other inputs: refused before any
    monkeypatch.setattr(work, "decode_tile", _flip_low_bit(decode_tile))
    with pytest.raises(G2LError, match="canary views"):
        run_build(small_config(cache, [], teacher="vit_small_patch16_224"))
    assert len(read_manifest(cache)["teachers"]) == 1 or \
        all(t.get("n_targets", 0) == 0 for fp, t in read_manifest(cache)["teachers"].items()
            if t["spec"]["name"] == "vit_small_patch16_224")


def test_a_teacher_added_later_sees_the_stored_views_not_new_draws(demo_dir, tmp_path, monkeypatch):
    from g2l_cache import views

    cache = tmp_path / "cache"
    run_build(small_config(cache, [demo_dir]))
    real_rng = views._view_rng
    # another numpy: the same seed, other random streams
    monkeypatch.setattr(views, "_view_rng", lambda seed, tile_id, k: real_rng(seed + 1, tile_id, k))
    second = run_build(small_config(cache, [], teacher="vit_small_patch16_224", precision="fp32"))
    reader = CacheReader(str(cache))
    teacher = load_teacher(TeacherSpec("vit_small_patch16_224", random_init=True, precision="fp32"), img_size=48)
    assert teacher.fingerprint() == second.teacher_fingerprint
    rows = np.arange(0, reader.n_views, 7)
    emb, _ = teacher.embed(torch.stack([reader.replay(int(r)) for r in rows]))
    stored = np.stack([reader.target(second.teacher_fingerprint, int(r))[0] for r in rows]).astype(np.float32)
    np.testing.assert_allclose(emb.numpy(), stored, rtol=2e-3, atol=2e-3)


def _rewrite_target_row(cache: Path, fp: str, view: int, scale: float) -> None:
    reader = CacheReader(str(cache))
    info = reader.manifest["teachers"][fp]
    entry = reader.view_index[view]
    shard = int(reader.tile_index[entry["tile"]]["shard"])
    size = 2 * (info["embed_dim"] + info["patch_dim"]) + 4
    path = reader.layout.targets_file(shard, fp)
    data = bytearray(path.read_bytes())
    start = int(entry["row"]) * size
    values = np.frombuffer(bytes(data[start:start + size - 4]), dtype="<f2") * np.float16(scale)
    payload = values.astype("<f2").tobytes()
    data[start:start + size] = payload + struct.pack("<I", zlib.crc32(payload))
    path.write_bytes(bytes(data))


def test_verify_recompute_fails_beyond_the_tolerance_and_when_the_teacher_cannot_be_rebuilt(built_cache, tmp_path):
    cache = tmp_path / "cache"
    shutil.copytree(built_cache, cache)
    fp = next(iter(read_manifest(cache)["teachers"]))
    n = CacheReader(str(cache)).n_views
    ok = runner.invoke(app, ["cache", "verify", str(cache), "--recompute", str(n)])
    assert ok.exit_code == 0, ok.output
    assert "recomputed vs stored targets (tolerance 2%)" in ok.output and "{" not in ok.output
    assert ok.output.split("recomputed vs stored targets")[1].count("yes") == 1
    _rewrite_target_row(cache, fp, 3, 1.5)  # checksums still pass: only recomputing can tell
    assert verify_cache(str(cache))["problems"] == []
    bad = runner.invoke(app, ["cache", "verify", str(cache), "--recompute", str(n)])
    assert bad.exit_code == 1 and "cache OK" not in bad.output
    assert "differ from the stored ones by" in bad.output
    manifest = read_manifest(cache)
    manifest["teachers"][fp]["spec"]["init_seed"] = 7  # the recorded teacher is not the one that computed them
    write_manifest(cache, manifest)
    report = verify_cache(str(cache), recompute=8, checksums=False)
    assert any("rebuilt teacher has fingerprint" in p for p in report["problems"])


# -- 4. a moved slide folder ------------------------------------------------------------------------
def test_a_moved_slide_folder_costs_nothing(demo_dir, tmp_path):
    slides = copy_slides(demo_dir, tmp_path / "mount-a" / "slides")
    cache = tmp_path / "cache"
    run_build(small_config(cache, [slides]))
    run_build(small_config(cache, [slides], teacher="vit_small_patch16_224"))
    before = cache_content(cache)
    moved = tmp_path / "mount-b" / "slides"
    moved.parent.mkdir()
    shutil.copytree(slides, moved)  # a copy: new path, new mtimes, same content
    shutil.rmtree(slides)
    for teacher in ("vit_tiny_patch16_224", "vit_small_patch16_224"):
        again = run_build(small_config(cache, [moved], teacher=teacher))
        assert again.targets_written == 0 and again.slides_failed == 0
    after = cache_content(cache)
    paths = pl.read_parquet(cache / "slides.parquet")["path"].to_list()
    assert all(p.startswith(str(moved)) for p in paths)
    assert {s["path"] for s in read_manifest(cache)["slide_inputs"]} == set(paths)
    strip = {k: v for k, v in before.items() if k != "slides"}
    assert strip == {k: v for k, v in after.items() if k != "slides"}
    # a slide whose content changed at its old name: its stored work is kept unless a re-plan is asked for
    victim = sorted(moved.glob("*.tif"))[0]
    victim.write_bytes(victim.read_bytes()[:-1] + b"\x00")
    with pytest.raises(G2LError, match=f"{victim.stem} \\(its file's content changed\\)"):
        run_build(small_config(cache, [moved], teacher="vit_tiny_patch16_224"))
    again = run_build(small_config(cache, [moved], teacher="vit_tiny_patch16_224", replan_changed=True))
    assert again.targets_written > 0


# -- 5. numerics under bf16 -------------------------------------------------------------------------
def test_the_head_output_stays_float32_under_bf16_autocast():
    torch.manual_seed(0)
    head = projection_head(16, 256)
    with torch.no_grad():
        head[1].bias.fill_(30.0)  # a target dimension with a large offset and a small spread
        head[1].weight.fill_(0.05)
    x = torch.randn(256, 16)
    expected = head(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = head(x)
    assert out.dtype == torch.float32
    assert len(torch.unique(out[:, 0])) > 200  # bf16 has 3 values in 30 +- 0.15
    assert centred_r2(out.detach().numpy(), expected.detach().numpy()) > 0.99
    head.eval()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert head(x).dtype == torch.float32


# -- 6. numbers a user acts on ----------------------------------------------------------------------
def test_one_measured_teacher_rate_is_used_by_the_plan_and_the_readme():
    from g2l_cache.costs import H100_BUILD_VIEWS_PER_SECOND, TEACHER_EFFICIENCY, gpu_views_per_second

    rate = gpu_views_per_second(608.349e9, "h100", TEACHER_EFFICIENCY)
    assert rate == pytest.approx(H100_BUILD_VIEWS_PER_SECOND, rel=1e-3)
    measured = json.loads((Path(__file__).parent.parent / "benchmarks" / "results-h100" / "after" /
                           "cache_build.json").read_text())["build_steady_views_per_s"]
    assert H100_BUILD_VIEWS_PER_SECOND == pytest.approx(measured, abs=0.05)
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    assert "~900 views/s" not in readme and f"{round(H100_BUILD_VIEWS_PER_SECOND)} views/s" in readme


def test_fit_and_plan_state_the_batch_per_process_and_the_share_of_views_read(built_cache, tmp_path):
    out = tmp_path / "run"
    fit(FitConfig(cache=str(built_cache), out=str(out), steps=3, **TINY_FIT))
    reading = json.loads((out / "run.json").read_text())["reading"]
    n_train = json.loads((out / "run.json").read_text())["data"]["train_views"]
    assert reading["per_process"] == 8 and reading["views_read"] == 24
    assert reading["share_of_cached_views"] == pytest.approx(24 / n_train)
    assert "8 per process x 1 process(es)" in reading["text"]
    from g2l_cache.plan import fit_reading

    real = fit_reading(32, 8, 50_000, tiles=2_000_000, views=8_000_000)
    assert real["per_gpu"] == 4 and real["epochs"] == pytest.approx(0.8) and real["share_of_cached_views"] == 0.2
