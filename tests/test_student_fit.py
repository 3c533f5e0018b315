"""`g2l student fit` end to end on a small cache: learning, replay, export, resume, 2 processes."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from cli.main import app
from helpers import run_cli, small_config
from g2l_cache import CacheReader, G2LError
from g2l_cache.build import run_build
from g2l_student.config import FitConfig
from g2l_student.data import CachedViews, select_views
from g2l_student.model import build_student
from g2l_student.rundir import RunDir
from g2l_student.train import fit

REPO = Path(__file__).parent.parent
TINY = dict(student="vit_tiny_patch16_224", random_init=True, img_size=32, batch_size=8,
            num_workers=0, val_fraction=0.34, checkpoint_every=5, progress=False)


def fit_config(cache, out, **overrides) -> FitConfig:
    return FitConfig(cache=str(cache), out=str(out), **{**TINY, **overrides})


def _cli_args(cache, out, cfg: dict) -> list[str]:
    args = ["student", "fit", str(cache), "--out", str(out), "--no-progress"]
    for key, value in cfg.items():
        if key == "progress":
            continue
        if value is True:
            args.append(f"--{key.replace('_', '-')}")
        else:
            args += [f"--{key.replace('_', '-')}", str(value)]
    return args


def _losses(run: Path) -> list[float]:
    return [float(r["loss"]) for r in RunDir(run).read_metrics()]


@pytest.fixture(scope="module")
def trained(built_cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "r"
    result = fit(fit_config(built_cache, out, steps=40, lr=1e-3, val_every=20))
    return out, result


def test_fit_writes_a_complete_run_and_learns(trained):
    out, result = trained
    run = RunDir(out)
    assert result.steps == 40 and result.stopped == "steps"
    assert result.steps_per_second > 0 and 0 <= result.data_wait_share < 1
    for path in (run.config, run.run_json, run.metrics, run.loss_png, run.fidelity):
        assert path.exists(), path
    rows = run.read_metrics()
    assert [int(r["step"]) for r in rows] == list(range(1, 41))
    assert all(float(r["data_seconds"]) >= 0 for r in rows)  # loader wait of each step
    # --val-every 20: held-out fidelity on steps 20 and 40; step 40's is the final report's
    assert [r["step"] for r in rows if r["val_projected_r2"]] == ["20", "40"]
    after = json.loads(run.fidelity.read_text())["after"]
    for key in ("projected_r2", "projected_cka_debiased", "backbone_knn10_overlap"):
        assert float(rows[-1][f"val_{key}"]) == pytest.approx(after[key], abs=1e-4)
    assert [p.name for p in run.list_checkpoints()] == ["step_00000035", "step_00000040"]
    assert (run.checkpoints / "step_00000040" / "model.safetensors").exists()
    assert RunDir(out).read_config()["steps"] == 40
    # the normalisation the student was trained with is recorded (vit_tiny's own, 0.5) and exported
    assert RunDir(out).read_config()["student_mean"] == [0.5, 0.5, 0.5]
    assert json.loads((out / "export" / "config.json").read_text())["pretrained_cfg"]["std"] == [0.5] * 3
    fid = json.loads(run.fidelity.read_text())
    assert fid["split"] == "validation" and len(fid["val_slides"]) == 1
    assert fid["after"]["projected_cosine"] > fid["before"]["projected_cosine"] + 0.2
    assert fid["after"]["projected_r2"] > fid["before"]["projected_r2"] and fid["after"]["projected_r2"] <= 1
    assert {"projected_cka_debiased", "backbone_cka_debiased", "backbone_knn10_overlap"} <= set(fid["after"])
    losses = _losses(out)
    assert np.mean(losses[-5:]) < np.mean(losses[:5])
    # each epoch's seeded draw is recorded: one view of each of the 20 training tiles, none dropped
    # (batches of 8 run on into the next epoch): 40 steps x 8 = 320 views = 16 epochs
    epochs = sorted(run.epochs.glob("epoch_*.parquet"))
    assert len(epochs) == 16
    view_ids = pl.read_parquet(Path(run.info()["cache"]) / "views.parquet")["view_id"].to_numpy()
    drawn = [view_ids[pl.read_parquet(p)["view"].to_numpy()].tolist() for p in epochs]
    assert all(len(d) == 20 and len({v.split("#")[0] for v in d}) == 20 for d in drawn)
    assert drawn[0] != drawn[1]
    assert json.loads(run.run_json.read_text())["status"] == "finished"


def test_student_input_is_the_replayed_teacher_input(built_cache):
    reader = CacheReader(str(built_cache))
    fp = reader.teacher()["fingerprint"]
    ds = CachedViews(reader, fp)
    assert len(ds) == reader.views().height and np.array_equal(select_views(reader), np.arange(len(ds)))
    for i in (0, 7, 23):
        view, t_emb, _ = ds[i]
        assert torch.equal(view, reader.replay(i))
        emb, _ = reader.target(fp, i)
        assert torch.equal(t_emb, torch.from_numpy(emb.astype(np.float32)))
    student = build_student("vit_tiny_patch16_224", 48, {"cls": 192}, random_init=True)
    x = ds[0][0][None]
    mean = torch.tensor([0.5, 0.5, 0.5]).view(1, 3, 1, 1)  # vit_tiny's own normalisation
    assert torch.equal(student.preprocess(x), (x - mean) / mean)


def test_export_loads_in_plain_timm_and_reproduces_embeddings(trained, tmp_path):
    out, _ = trained
    export = out / "export"
    cfg = json.loads((export / "config.json").read_text())
    x = torch.rand(3, 3, 32, 32)
    save_file({"x": x}, str(tmp_path / "x.safetensors"))
    code = f"""
import sys, timm, torch
from safetensors.torch import load_file, save_file
model = timm.create_model("{cfg['architecture']}", pretrained=True, num_classes=0, img_size=32,
    pretrained_cfg_overlay=dict(file="{export / 'student.safetensors'}", custom_load=False)).eval()
x = load_file("{tmp_path / 'x.safetensors'}")["x"]
with torch.no_grad():
    y = model.forward_features(x)[:, 0]
assert not any(m.startswith("g2l") for m in sys.modules), "g2l was imported"
save_file({{"y": y.contiguous()}}, "{tmp_path / 'y.safetensors'}")
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    y_timm = load_file(str(tmp_path / "y.safetensors"))["y"]
    student = build_student("vit_tiny_patch16_224", 32, {"cls": 192}, random_init=True)
    student.load_state_dict(load_file(str(out / "checkpoints" / "step_00000040" / "model.safetensors")))
    student.eval()
    with torch.no_grad():
        emb, _ = student._features(x)
    torch.testing.assert_close(y_timm, emb, atol=1e-5, rtol=1e-5)
    heads = load_file(str(export / "head.safetensors"))
    assert heads["cls.0.weight"].shape == (192, 192) and "cls.1.running_var" in heads
    # `g2l student export` redoes it from an older checkpoint
    result = CliRunner().invoke(app, ["student", "export", str(out), "--no-speed", "--checkpoint",
                                      str(out / "checkpoints" / "step_00000035")])
    assert result.exit_code == 0, result.output
    g2l = json.loads((export / "config.json").read_text())["g2l"]
    assert g2l["checkpoint"] == "step_00000035" and g2l["speed"] == []
    # a ViT-Ti is no DINOv2: no transformers folder, and the export says why
    assert not (export / "hf").exists() and "layer scale" in g2l["transformers"]
    assert "Not measured yet" in (export / "README.md").read_text()


def test_report_command(trained):
    out, _ = trained
    result = CliRunner().invoke(app, ["student", "report", str(out)])
    assert result.exit_code == 0 and "cosine" in result.output and "before" in result.output


def test_kill_9_then_resume_gives_the_same_losses(built_cache, tmp_path):
    cfg = {**TINY, "student": "vit_small_patch16_224", "img_size": 64, "steps": 40, "lr": 5e-4,
           "checkpoint_every": 5}
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "2"}
    reference = tmp_path / "reference"
    res = run_cli(*_cli_args(built_cache, reference, cfg), env=env, timeout=600)
    assert res.returncode == 0, res.stderr
    assert "steps/s; waiting for data" in res.stdout
    crashed = tmp_path / "crashed"
    proc = subprocess.Popen([sys.executable, "-m", "cli", *_cli_args(built_cache, crashed, cfg)],
                            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    run = RunDir(crashed)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and \
            not any(p.name >= "step_00000010" for p in run.list_checkpoints()):
        time.sleep(0.05)
    assert proc.poll() is None, "fit finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(run.read_metrics())
    assert 10 <= done < 40
    res = run_cli(*_cli_args(built_cache, crashed, cfg), "--resume", env=env, timeout=600)
    assert res.returncode == 0, res.stderr
    assert [int(r["step"]) for r in run.read_metrics()] == list(range(1, 41))
    np.testing.assert_allclose(_losses(crashed), _losses(reference), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("logsum_over", ["sample", "batch"])
def test_two_processes_match_one_process(built_cache, tmp_path, logsum_over):
    # "batch": one log of the sum over the global batch, whatever the number of processes
    cfg = {**TINY, "steps": 8, "lr": 1e-4, "logsum_over": logsum_over}
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    one = tmp_path / "one"
    res = run_cli(*_cli_args(built_cache, one, cfg), env=env, timeout=600)
    assert res.returncode == 0, res.stderr
    two = tmp_path / "two"
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "-m", "cli", *_cli_args(built_cache, two, cfg)],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    # Same global batch (split over 2 ranks, batch-norm statistics over both): equal up to float
    # summation order, which Adam slowly amplifies.
    assert _losses(two)[:2] == pytest.approx(_losses(one)[:2], rel=1e-6)
    np.testing.assert_allclose(_losses(two), _losses(one), rtol=5e-4)


def test_online_teacher_agrees_with_cached_targets(built_cache, tmp_path):
    name = CacheReader(str(built_cache)).teacher()["spec"]["name"]
    cached = fit(fit_config(built_cache, tmp_path / "cached", steps=6))
    online = fit(fit_config(built_cache, tmp_path / "online", steps=6, online_teacher=name))
    np.testing.assert_allclose(_losses(tmp_path / "online"), _losses(tmp_path / "cached"), rtol=2e-3)
    assert abs(online.fidelity["after"]["projected_cosine"] - cached.fidelity["after"]["projected_cosine"]) < 0.01
    # the library takes a teacher object as well as a name: the same run
    from g2l_cache.teachers import TeacherSpec, load_teacher

    info = CacheReader(str(built_cache)).teacher()
    teacher = load_teacher(TeacherSpec.from_record(info["spec"]), img_size=info["input_size"])
    fit(fit_config(built_cache, tmp_path / "object", steps=6), teacher=teacher)
    assert _losses(tmp_path / "object") == _losses(tmp_path / "online")
    # and a student object, whose heads must fit the target
    wrong = build_student("vit_tiny_patch16_224", 32, {"cls": 5}, random_init=True)
    with pytest.raises(G2LError, match="do not match"):
        fit(fit_config(built_cache, tmp_path / "wrong", steps=2), student=wrong)


def test_subsets_by_where_and_slide_list(built_cache, tmp_path):
    reader = CacheReader(str(built_cache))
    slide = sorted(reader.slides()["slide_id"].to_list())[0]
    only = select_views(reader, where=f"slide_id = '{slide}'")
    views = reader.views()
    assert set(views["slide_id"].to_numpy()[only]) == {slide}
    assert len(only) == (views["slide_id"] == slide).sum()
    lst = tmp_path / "slides.txt"
    lst.write_text(f"{slide}\n")
    assert np.array_equal(select_views(reader, slides_file=str(lst)), only)
    # tile and slide columns are joined for --where
    inner = select_views(reader, where=f"slide_id = '{slide}' AND tissue_fraction >= 0.9 AND mpp_source = 'slide'")
    assert set(inner) <= set(only)
    assert (views[inner.tolist()].join(reader.tiles(), on="tile_id")["tissue_fraction"] >= 0.9).all()
    with pytest.raises(G2LError, match="not a valid condition"):
        select_views(reader, where="no_such_column > 3")
    lst.write_text("ghost-slide\n")
    with pytest.raises(G2LError, match="not ok slides"):
        select_views(reader, slides_file=str(lst))


def test_bad_inputs_are_clear_errors(built_cache, demo_dir, tmp_path):
    with pytest.raises(G2LError, match="not a g2l cache"):
        fit(fit_config(tmp_path, tmp_path / "r"))
    half = tmp_path / "half"
    shutil.copytree(built_cache, half)
    manifest = json.loads((half / "manifest.json").read_text())
    (half / "manifest.json").write_text(json.dumps({**manifest, "status": "building"}))
    with pytest.raises(G2LError, match="half-built"):
        fit(fit_config(half, tmp_path / "r"))
    with pytest.raises(G2LError, match="timm does not know"):
        fit(fit_config(built_cache, tmp_path / "r", student="vit_nonexistent_x"))
    wrong = tmp_path / "wrong.safetensors"
    import timm

    save_file(timm.create_model("vit_small_patch16_224", num_classes=0).state_dict(), str(wrong))
    with pytest.raises(G2LError, match="do not fit"):
        fit(fit_config(built_cache, tmp_path / "r", random_init=False, student_weights=str(wrong)))
    heads = tmp_path / "heads.safetensors"
    save_file({"cls.0.weight": torch.zeros(1536, 192), "cls.0.bias": torch.zeros(1536)}, str(heads))
    with pytest.raises(G2LError, match="another teacher dimension"):
        fit(fit_config(built_cache, tmp_path / "r", head_weights=str(heads)))
    with pytest.raises(G2LError, match="batch-size"):
        fit(fit_config(built_cache, tmp_path / "r", batch_size=0))
    with pytest.raises(G2LError, match="student-std takes three values"):
        fit(fit_config(built_cache, tmp_path / "r", student_std=[0.2, 0.0, 0.2]))
    bad = CliRunner().invoke(app, _cli_args(built_cache, tmp_path / "r", {**TINY, "student_mean": "0.5,0.5"}))
    assert bad.exit_code == 2 and "--student-mean takes three numbers" in bad.output


def test_output_folder_rules_and_changed_cache(built_cache, demo_dir, tmp_path):
    cache = tmp_path / "cache"
    shutil.copytree(built_cache, cache)
    out = tmp_path / "run"
    fit(fit_config(cache, out, steps=2))
    result = CliRunner().invoke(app, _cli_args(cache, out, {**TINY, "steps": 2}))
    assert result.exit_code == 2 and "holds another run" in result.output
    fit(fit_config(cache, out, steps=3, overwrite=True))
    assert len(RunDir(out).read_metrics()) == 3
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "notes.txt").write_text("keep")
    with pytest.raises(G2LError, match="not a g2l run"):
        fit(fit_config(cache, occupied, steps=2, overwrite=True))
    assert (occupied / "notes.txt").read_text() == "keep"
    # the cache gains a slide: resuming the old run must refuse
    no_mpp = demo_dir / "no_mpp" / "slide-no-mpp.tif"
    csv = tmp_path / "more-slides.csv"
    csv.write_text(f"path,slide_id,mpp\n{no_mpp},slide-no-mpp,0.5\n")  # its own mpp: the others keep theirs
    run_build(small_config(cache, [demo_dir, csv]))
    with pytest.raises(G2LError, match="cache changed"):
        fit(fit_config(cache, out, steps=3, resume=True))


def test_both_targets_ema_accumulation_and_early_stop(built_cache, tmp_path):
    rule = dict(early_stop_window=2, early_stop_patience=0, early_stop_smoothing=0.0,
                early_stop_min_fraction=0.0, early_stop_cooldown=1)
    result = fit(fit_config(built_cache, tmp_path / "r", steps=12, target="both", cls_weight=1.0,
                            patch_weight=0.5, ema_decay=0.9, grad_accum=2, batch_size=4,
                            loss="cosine", early_stop="g2l", **rule))
    heads = load_file(str(tmp_path / "r" / "export" / "head.safetensors"))
    assert {k.split(".")[0] for k in heads} == {"cls", "mean-patch"}
    # the loop stops exactly where the rule, replayed on the logged losses, says it must
    from g2l_student.schedule import G2LEarlyStop

    replay = G2LEarlyStop(window=2, patience=0, smoothing=0.0, min_step=0, cooldown=1)
    losses = _losses(tmp_path / "r")
    expected = next((i for i, v in enumerate(losses, 1) if replay.update(v)), None)
    assert result.steps == (expected or 12) == len(losses)
    assert result.stopped == ("early-stop" if expected else "steps")
    # --grad-accum 2: each optimiser step consumes two micro-batches of the recorded epochs
    first_epoch = pl.read_parquet(RunDir(tmp_path / "r").epochs / "epoch_000000.parquet")
    micro_per_epoch = first_epoch.height // 4
    rows = RunDir(tmp_path / "r").read_metrics()
    assert [int(r["epoch"]) for r in rows] == [(2 * s - 1) // micro_per_epoch for s in range(1, len(rows) + 1)]
    # the EMA weights are what gets exported
    ckpt = RunDir(tmp_path / "r").last_checkpoint()
    ema = load_file(str(ckpt / "ema.safetensors"))
    model = load_file(str(ckpt / "model.safetensors"))
    exported = load_file(str(tmp_path / "r" / "export" / "student.safetensors"))
    key = "blocks.0.attn.qkv.weight"
    assert torch.equal(exported[key], ema[f"backbone.{key}"])
    assert not torch.equal(exported[key], model[f"backbone.{key}"])


def test_two_fits_read_one_cache_at_once(built_cache, tmp_path):
    cfg = {**TINY, "steps": 4}
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    procs = [subprocess.Popen([sys.executable, "-m", "cli", *_cli_args(built_cache, tmp_path / f"r{i}", cfg)],
                              cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
             for i in range(2)]
    for p in procs:
        assert p.wait(timeout=300) == 0, p.stderr.read().decode()[-2000:]
    assert _losses(tmp_path / "r0") == _losses(tmp_path / "r1")


def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(built_cache, tmp_path, monkeypatch):
    import g2l_student.fit_setup as fit_setup

    real = fit_setup.get_loss
    calls = {"n": 0}

    def poisoned(*args):
        loss_fn = real(*args)

        def fn(s, t):
            calls["n"] += 1
            out = loss_fn(s, t)
            return out * float("nan") if calls["n"] >= 5 else out
        return fn

    monkeypatch.setattr(fit_setup, "get_loss", poisoned)
    out = tmp_path / "nan"
    with pytest.raises(G2LError, match=r"step 5 gave loss nan.*keeps its last good checkpoint \(step_00000004\)"):
        fit(fit_config(built_cache, out, steps=12, checkpoint_every=2))
    run = RunDir(out)
    assert [p.name for p in run.list_checkpoints()] == ["step_00000002", "step_00000004"]
    assert run.info()["status"] == "failed"


def test_resume_takes_the_runs_options_refuses_others_and_unpickles_nothing(built_cache, tmp_path):
    out = tmp_path / "run"
    first = fit(fit_config(built_cache, out, steps=4, checkpoint_every=2, ema_decay=0.9,
                           early_stop="g2l", early_stop_window=2, early_stop_patience=50))
    run = RunDir(out)
    # JSON and safetensors only: a resume reads no pickle
    assert sorted(p.name for p in run.last_checkpoint().iterdir()) == \
        ["ema.safetensors", "model.safetensors", "optimizer.safetensors", "state.json"]
    bad = CliRunner().invoke(app, ["student", "fit", "--out", str(out), "--resume", "--steps", "12",
                                   "--lr", "0.5", "--loss", "mse"])
    assert bad.exit_code == 2, bad.output
    text = " ".join(bad.output.split())
    for expected in ("--steps 12 (the run has 4)", "--lr 0.5 (the run has 0.0001)", "--loss 'mse' (the run has 'logsum')"):
        assert expected in text
    assert RunDir(out).read_config()["loss"] == "logsum"
    # drop the last checkpoint: `--resume --out` alone continues from step 2 with the run's options
    # (with the defaults instead it would fetch a ViT-L from the hub) and repeats steps 3-4 exactly
    losses = _losses(out)
    shutil.rmtree(run.last_checkpoint())
    # a run started before teachers could repeat: no teacher lists in its config.toml
    old = [line for line in run.config.read_text().splitlines()
           if not line.startswith(("teacher = ", "teacher_weight = ", "online_teacher = "))]
    run.config.write_text("\n".join(old) + "\n")
    res = CliRunner().invoke(app, ["student", "fit", "--out", str(out), "--resume", "--no-progress",
                                   "--num-workers", "0"])
    assert res.exit_code == 0, res.output
    assert [int(r["step"]) for r in run.read_metrics()] == [1, 2, 3, 4]
    assert [s["steps"] for s in run.info()["ledger"]] == [[0, 4], [2, 4]]  # each session in the ledger
    np.testing.assert_allclose(_losses(out), losses, rtol=1e-5)
    assert first.final_loss == pytest.approx(losses[-1], rel=1e-6)


def test_fresh_views_replay_cached_ones_and_train_a_live_teacher_without_targets(built_cache, tmp_path):
    from g2l_student.data import FreshViews, fresh_item

    reader = CacheReader(str(built_cache))
    fresh, k_cached = FreshViews(reader), reader.views_per_tile
    for view in (0, 5, reader.n_views - 1):  # view k < K drawn afresh is the cached view itself
        entry = reader.view_index[view]
        item = int(fresh_item(np.array([entry["tile"]]), int(entry["k"]))[0])
        assert torch.equal(fresh[item][0], reader.replay(view))
    beyond = fresh[int(fresh_item(np.array([0]), k_cached)[0])][0]
    assert beyond.shape == reader.replay(0).shape and not torch.equal(beyond, reader.replay(0))
    # a teacher the cache has no targets for: every epoch draws view K + epoch of each training tile
    assert "vit_small_patch16_224" not in {t["spec"]["name"] for t in reader.manifest["teachers"].values()}
    out = tmp_path / "fresh"
    result = fit(fit_config(built_cache, out, steps=6, online_teacher="vit_small_patch16_224",
                            online_random_init=True, fresh_views=True))
    assert result.steps == 6 and np.isfinite(_losses(out)).all()
    epochs = sorted(RunDir(out).epochs.glob("epoch_*.parquet"))
    for e, path in enumerate(epochs):
        drawn = pl.read_parquet(path)
        assert drawn.columns == ["tile", "k"] and (drawn["k"] == k_cached + e).all()
        assert drawn["tile"].n_unique() == drawn.height  # one view per tile
    with pytest.raises(G2LError, match="--fresh-views needs --online-teacher"):
        fit_config(built_cache, tmp_path / "x", fresh_views=True)
