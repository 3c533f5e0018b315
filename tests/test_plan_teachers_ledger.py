"""`g2l cache plan`, several teachers for one student, the cost ledger and the model card."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from cli.main import app
from g2l_cache import CacheReader, G2LError
from g2l_cache.build import run_build
from g2l_cache.costs import TEACHER_EFFICIENCY
from g2l_cache.planning import plan_one_slide
from g2l_student.config import FitConfig
from g2l_student.ledger import reused_text
from g2l_student.rundir import RunDir
from g2l_student.train import fit
from helpers import TEACHER, small_config

runner = CliRunner()
SECOND = "vit_small_patch16_224"  # 384-d beside the 192-d vit_tiny teacher
TINY_FIT = dict(student="vit_tiny_patch16_224", random_init=True, img_size=32, batch_size=8, num_workers=0,
                val_fraction=0.34, checkpoint_every=5, progress=False)
PLAN_ARGS = ["--teacher", TEACHER, "--tile-size", "64", "--crop-size", "48", "--views", "2",
             "--max-tiles-per-slide", "10", "--num-workers", "0", "--no-progress"]


def test_plan_counts_and_costs_a_build_that_then_starts_from_it(demo_dir, tmp_path, monkeypatch):
    cache, broken = tmp_path / "cache", tmp_path / "broken.tif"
    broken.write_bytes(b"II*\x00 not a slide")
    res = runner.invoke(app, ["cache", "plan", str(demo_dir), str(broken), "--out", str(cache), *PLAN_ARGS,
                              "--gpu", "a100", "--sample-tiles", "1000"])
    assert res.exit_code == 0, res.output
    assert "g2l cache plan" in res.output and "failed slides" in res.output
    plan = json.loads((cache / "plan.json").read_text())
    tiles = plan["tiles"]["total"]
    assert plan["slides"]["ok"] == 3 and list(plan["slides"]["failed_slides"]) == ["broken"]
    assert tiles == sum(plan["tiles"]["per_slide"].values()) == 30 and plan["views"] == 60
    # ViT-Ti at 48 px, by hand: 10 tokens, d = 192, 12 blocks of qkv + attention + proj + MLP, plus
    # the patch embedding: 12 * (2*10*192*576 + 4*10*10*192 + 2*10*192*192 + 16*10*192*192) + 2*9*768*192
    assert plan["teacher"]["gflops_per_view"] * 1e9 == 12 * (2211840 + 76800 + 737280 + 5898240) + 2654208
    rate = 312e12 * TEACHER_EFFICIENCY / (plan["teacher"]["gflops_per_view"] * 1e9)
    assert plan["teacher"]["views_per_second"] == pytest.approx(rate)
    assert plan["teacher"]["gpu_hours"] == pytest.approx(60 / rate / 3600)
    assert plan["disk_bytes"]["targets"] == 60 * (2 * (192 + 192) + 4)
    assert plan["tiles_measured"] == 30

    # the build starts from the plan: only the failed slide is tried again
    import g2l_cache.planning as planning

    planned_again = []

    def recording(spec, *args):
        planned_again.append(spec.slide_id)
        return plan_one_slide(spec, *args)

    monkeypatch.setattr(planning, "plan_one_slide", recording)
    res = runner.invoke(app, ["cache", "build", "--out", str(cache), "--teacher", TEACHER, "--random-init",
                              "--num-workers", "0", "--no-progress"])
    assert res.exit_code == 0, res.output
    assert planned_again == ["broken"]
    lengths = pl.read_parquet(cache / "tiles.parquet")["length"]
    assert plan["bytes_per_tile"] == pytest.approx(lengths.mean())  # every tile measured = the stored bytes
    info = runner.invoke(app, ["cache", "info", str(cache)])
    assert info.exit_code == 0 and "plan vs built" in info.output
    data = json.loads(runner.invoke(app, ["cache", "info", str(cache), "--json"]).output)
    assert data["plan"]["tiles"]["total"] == data["tiles"] == 30
    assert data["slides_failed"] == 1  # the build kept the plan's failed slide as failed
    bad = runner.invoke(app, ["cache", "plan", str(demo_dir), "--out", str(tmp_path / "c2"), *PLAN_ARGS,
                              "--gpu", "tpu-v9"])
    assert bad.exit_code == 2 and "unknown GPU" in bad.output
    monkeypatch.setenv("WORLD_SIZE", "2")
    bad = runner.invoke(app, ["cache", "plan", str(demo_dir), "--out", str(tmp_path / "c3"), *PLAN_ARGS])
    assert bad.exit_code == 2 and "one process" in bad.output and not (tmp_path / "c3").exists()


@pytest.fixture(scope="module")
def two_teacher_cache(built_cache, tmp_path_factory):
    cache = tmp_path_factory.mktemp("two") / "cache"
    shutil.copytree(built_cache, cache)
    run_build(small_config(cache, [], teacher=SECOND))
    return cache


def _two_teacher_fit_args(cache, run) -> list[str]:
    return ["student", "fit", str(cache), "--out", str(run), "--teacher", TEACHER, "--teacher", SECOND,
            "--teacher-weight", f"{SECOND}=0.5", "--target", "both", "--student", "vit_tiny_patch16_224",
            "--random-init", "--img-size", "32", "--steps", "6", "--batch-size", "8", "--val-fraction", "0.34",
            "--num-workers", "0", "--no-progress"]


@pytest.fixture(scope="module")
def two_teacher_run(two_teacher_cache, tmp_path_factory):
    run = tmp_path_factory.mktemp("run2") / "run"
    res = runner.invoke(app, _two_teacher_fit_args(two_teacher_cache, run))
    assert res.exit_code == 0, res.output
    return run


def test_two_processes_with_two_teachers_match_one_process(two_teacher_cache, two_teacher_run, tmp_path):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    two = tmp_path / "two"
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "cli",
                          *_two_teacher_fit_args(two_teacher_cache, two)], cwd=Path(__file__).parent.parent,
                         env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    one_rows, two_rows = RunDir(two_teacher_run).read_metrics(), RunDir(two).read_metrics()
    for column in ("loss", f"loss_{TEACHER}", f"loss_{SECOND}"):  # each teacher's loss averaged over ranks
        np.testing.assert_allclose([float(r[column]) for r in two_rows], [float(r[column]) for r in one_rows],
                                   rtol=5e-4)


def test_two_teachers_of_different_dims_train_one_student(two_teacher_run):
    run = RunDir(two_teacher_run)
    heads = load_file(str(run.export / "head.safetensors"))
    for name, dim in ((TEACHER, 192), (SECOND, 384)):
        for kind in ("cls", "mean-patch"):
            assert heads[f"{name}:{kind}.0.weight"].shape == (dim, 192)  # a head per teacher and target
    rows = run.read_metrics()
    assert len(rows) == 6
    for r in rows:  # the logged loss is the teachers' weighted losses added up
        assert float(r["loss"]) == pytest.approx(float(r[f"loss_{TEACHER}"]) + float(r[f"loss_{SECOND}"]), rel=1e-4)
    after = json.loads(run.fidelity.read_text())["after"]
    for name in (TEACHER, SECOND):
        assert -1 <= after[f"{name}:backbone_cka_debiased"] <= 1 and f"{name}:projected_r2" in after
    config = json.loads((run.export / "config.json").read_text())
    assert [t["label"] for t in config["g2l"]["teachers"]] == [TEACHER, SECOND]
    card = (run.export / "README.md").read_text()
    for t in config["g2l"]["teachers"]:
        assert t["fingerprint"] in card


def test_every_head_learns_and_teacher_weights_scale_their_loss(two_teacher_cache):
    from g2l_student.losses import get_loss
    from g2l_student.model import build_student
    from g2l_student.targets import head_targets, teacher_slots
    from g2l_student.task import build_task

    reader = CacheReader(str(two_teacher_cache))
    fps = [reader.teacher(TEACHER)["fingerprint"], reader.teacher(SECOND)["fingerprint"]]
    slots = teacher_slots([("a", 192, 192), ("b", 384, 384)])
    heads = head_targets("cls", slots)
    assert {k: (h.start, h.stop) for k, h in heads.items()} == {"a:cls": (0, 192), "b:cls": (192, 576)}
    student = build_student("vit_tiny_patch16_224", 32, {k: h.stop - h.start for k, h in heads.items()},
                            random_init=True)
    task = build_task(student, "cls", get_loss("mse"), slots=slots, teacher_weights={"a": 1.0, "b": 0.5})
    from g2l_student.data import CachedViews

    items = [CachedViews(reader, fps)[i] for i in range(4)]
    views, emb, patch = (torch.stack(x) for x in zip(*items))
    # targets side by side: teacher a's columns are its own cached targets
    assert torch.equal(emb[:, :192], torch.from_numpy(np.stack([reader.target(fps[0], i)[0] for i in range(4)])).float())
    losses = task.head_losses(views, emb, patch)
    parts = task.per_teacher(losses)
    assert torch.allclose(parts["b"], 0.5 * losses["b:cls"]) and torch.allclose(task.total(losses), parts["a"] + parts["b"])
    task.total(losses).backward()
    for name in ("a:cls", "b:cls"):
        assert student.heads[name][0].weight.grad.abs().sum() > 0


def test_fresh_views_online_with_several_teachers(two_teacher_cache, tmp_path):
    out = tmp_path / "fresh"
    result = fit(FitConfig(cache=str(two_teacher_cache), out=str(out), steps=3, online_teacher=[TEACHER, SECOND],
                           fresh_views=True, **TINY_FIT))
    rows = RunDir(out).read_metrics()
    assert result.steps == 3 and all(np.isfinite(float(r[f"loss_{SECOND}"])) for r in rows)
    assert [t["live"] for t in RunDir(out).info()["teachers"]] == [True, True]


def test_teacher_options_are_checked(two_teacher_cache, tmp_path):
    for kwargs, message in ((dict(teacher=[TEACHER, SECOND], teacher_weight=["nope=1"]), "names no --teacher"),
                            (dict(teacher=[TEACHER, TEACHER]), "named twice"),
                            (dict(teacher=[TEACHER, SECOND], teacher_weight=[f"{TEACHER}=-1"]), "W >= 0"),
                            (dict(teacher=[TEACHER], teacher_weight=[f"{TEACHER}=2"]), "with one teacher"),
                            (dict(teacher=[TEACHER], online_teacher=[SECOND]), "not both")):
        with pytest.raises(G2LError, match=message):
            FitConfig(cache=str(two_teacher_cache), out=str(tmp_path / "x"), **kwargs)
    fp = CacheReader(str(two_teacher_cache)).teacher(TEACHER)["fingerprint"]
    with pytest.raises(G2LError, match="same cached teacher twice"):  # by name and by fingerprint
        fit(FitConfig(cache=str(two_teacher_cache), out=str(tmp_path / "y"), teacher=[TEACHER, fp], steps=1,
                      **TINY_FIT))


def test_the_ledger_adds_up_over_cache_and_runs(two_teacher_cache, two_teacher_run):
    manifest = CacheReader(str(two_teacher_cache)).manifest
    n_views = manifest["counts"]["views"]
    for t in manifest["teachers"].values():
        assert [p["views"] for p in t["ledger"]] == [n_views]  # one pass each, every view once
        assert t["ledger"][0]["device_seconds"] > 0 and t["ledger"][0]["device"].startswith("cpu")
        (device, spent), = t["spent"].items()  # committed with the targets, batch by batch
        assert device == t["ledger"][0]["device"] and spent["views"] == n_views
        assert 0 < spent["device_seconds"] <= t["ledger"][0]["device_seconds"]  # the pass ends after its last commit
    res = runner.invoke(app, ["cache", "info", str(two_teacher_cache), "--runs", str(two_teacher_run), "--json"])
    assert res.exit_code == 0, res.output
    ledger = json.loads(res.output)["ledger"]
    spent = [next(iter(t["spent"].values())) for t in manifest["teachers"].values()]
    assert ledger["teacher_seconds_paid"] == pytest.approx(sum(s["device_seconds"] for s in spent))
    run = ledger["runs"][0]
    assert run["views_trained"] == 6 * 8 and run["sessions"] == 1
    # online, the run's 48 views would have cost each teacher 48 of its per-view seconds
    per_view = sum(s["device_seconds"] / s["views"] for s in spent)
    assert run["online_equivalent_seconds"] == pytest.approx(48 * per_view)
    report = runner.invoke(app, ["student", "report", str(two_teacher_run)])
    assert report.exit_code == 0 and "cost ledger" in report.output
    other = runner.invoke(app, ["cache", "info", str(two_teacher_cache), "--runs", str(two_teacher_cache)])
    assert other.exit_code == 2 and "not a g2l run folder" in other.output


def test_teacher_time_a_cache_never_recorded_is_shown_as_such_not_as_zero(two_teacher_cache, two_teacher_run,
                                                                            tmp_path):
    # a cache built by a g2l older than the ledger: targets, but no teacher time; so is a run of it
    cache, run = tmp_path / "cache", tmp_path / "run"
    shutil.copytree(two_teacher_cache, cache)
    shutil.copytree(two_teacher_run, run)
    manifest = json.loads((cache / "manifest.json").read_text())
    old_fp, kept_fp = sorted(manifest["teachers"])
    old_name = manifest["teachers"][old_fp]["spec"]["name"]
    del manifest["teachers"][old_fp]["spent"], manifest["teachers"][old_fp]["ledger"]
    (cache / "manifest.json").write_text(json.dumps(manifest))
    info = json.loads((run / "run.json").read_text())
    for t in info["teachers"]:
        if t["fingerprint"] == old_fp:
            t.update(cache_device_seconds=0.0, cache_views=0, devices=[])
    (run / "run.json").write_text(json.dumps(info))

    res = runner.invoke(app, ["cache", "info", str(cache), "--runs", str(run), "--json"])
    assert res.exit_code == 0, res.output
    ledger = json.loads(res.output)["ledger"]
    assert ledger["teachers_unrecorded"] == [old_name] and ledger["runs"][0]["teachers_unrecorded"] == [old_name]
    kept = next(iter(manifest["teachers"][kept_fp]["spent"].values()))
    assert ledger["teacher_seconds_paid"] == pytest.approx(kept["device_seconds"])  # the recorded teacher only
    for command in (["cache", "info", str(cache), "--runs", str(run)], ["student", "report", str(run)]):
        res = runner.invoke(app, command)
        assert res.exit_code == 0, res.output
        words = " ".join(res.output.split())  # rich wraps table cells and lines at the terminal width
        assert "recorded" in words.split("cost ledger")[1].split("not recorded for")[0]  # in the run's row
        assert f"teacher time not recorded for {old_name}" in words
    assert reused_text(1.5, [old_name]) == "1.5 s + not recorded" and reused_text(0.0, [old_name]) == "not recorded"
    assert runner.invoke(app, ["student", "export", str(run)]).exit_code == 0
    card = (run / "export" / "README.md").read_text()
    assert f"| teacher {old_name}: inference on the cached views, paid once by `g2l cache build` | not recorded |" in card
    assert f"not recorded for {old_name}" in card


def test_the_model_card_takes_the_evaluation_rows_of_its_own_export(two_teacher_run, tmp_path):
    from g2l_student.evaluation.demo_tiles import write_demo_tiles

    tiles = write_demo_tiles(tmp_path / "tiles", n_crops=8, n_centres=2, tile_px=64)
    for model, name, extra in ((str(two_teacher_run), "student", []),
                               ("vit_tiny_patch16_224", "baseline", ["--random-init", "--img-size", "32"])):
        res = runner.invoke(app, ["embed", model, str(tiles), "--out", str(tmp_path / f"{name}.parquet"), *extra])
        assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["eval", "compare", str(tmp_path / "baseline.parquet"), str(tmp_path / "student.parquet"),
                              "--out", str(tmp_path / "rep"), "--bootstrap", "20", "--map", "pca"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["student", "export", str(two_teacher_run), "--evaluation", str(tmp_path / "rep")])
    assert res.exit_code == 0, res.output
    card = (RunDir(two_teacher_run).export / "README.md").read_text()
    metrics = pl.read_csv(tmp_path / "rep" / "metrics.csv")
    mine = metrics.filter((pl.col("model") == "student") & (pl.col("metric") == "knn_balanced_accuracy")).row(0, named=True)
    assert f"| tiles | knn_balanced_accuracy | 20 | {mine['value']:.4g} |" in card
    section = card.split("## Evaluation")[1].split("## Cost ledger")[0]
    assert section.count("| knn_balanced_accuracy |") == 1  # this export's rows, not the baseline's
    assert section.count("\n| tiles |") == metrics.filter((pl.col("model") == "student")
                                                          & (pl.col("metric") != "ri_curve")).height
    assert "This student reused" in card
    info = RunDir(two_teacher_run).info()["data"]
    assert f"{info['train_slides']} slides, {info['train_tiles']} tiles, {info['train_views']} cached views" in card
    res = runner.invoke(app, ["student", "export", str(two_teacher_run), "--evaluation", str(tmp_path)])
    assert res.exit_code == 2 and "not a `g2l eval compare` report" in res.output
