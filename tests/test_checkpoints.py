"""Checkpoints written behind training: one in flight, fsynced before they count, a failed write
stops the run, kill -9 mid-write resumes from the previous one to the same run, and folders of
earlier g2l versions (Accelerate's save_state) still resume."""

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from g2l_cache import G2LError
from g2l_student import checkpoint as checkpoint_module
from g2l_student import checkpoint_saver
from g2l_student.checkpoint import Snapshot, StagingBuffers, write_snapshot
from g2l_student.checkpoint_saver import CheckpointSaver
from g2l_student.config import FitConfig
from g2l_student.fit_setup import set_up_fit
from g2l_student.rundir import RunDir
from g2l_student.train import fit

REPO = Path(__file__).parent.parent
TINY = dict(student="vit_tiny_patch16_224", random_init=True, img_size=32, batch_size=8, num_workers=0,
            val_fraction=0.34, progress=False, steps=6, checkpoint_every=2, lr=1e-3, ema_decay=0.9)


def _snapshot(step: int, value: float) -> Snapshot:
    return Snapshot(step, {"model.safetensors": {"w": torch.full((4, 3), value)}}, {"format": 1, "step": step})


def _losses(run: Path) -> list[float]:
    return [float(r["loss"]) for r in RunDir(run).read_metrics()]


def test_one_save_in_flight_and_the_training_thread_is_not_held_by_the_write(tmp_path, monkeypatch):
    spans, lock = [], threading.Lock()

    def slow_write(snapshot, folder):
        start = time.perf_counter()
        time.sleep(0.4)
        write_snapshot(snapshot, folder)
        with lock:
            spans.append((start, time.perf_counter()))

    monkeypatch.setattr(checkpoint_saver, "write_snapshot", slow_write)
    run = RunDir(tmp_path / "run")
    saver = CheckpointSaver(run, keep=2)
    begun = time.perf_counter()
    saver.save(lambda: _snapshot(1, 1.0), run.checkpoint_dir(1))
    assert time.perf_counter() - begun < 0.2  # the write goes on behind
    saver.save(lambda: _snapshot(2, 2.0), run.checkpoint_dir(2))  # waits for the first
    saver.save(lambda: _snapshot(3, 3.0), run.checkpoint_dir(3))
    saver.close()
    assert len(spans) == 3 and all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))  # never two at once
    assert [p.name for p in run.list_checkpoints()] == ["step_00000002", "step_00000003"]  # keep=2
    assert load_file(str(run.checkpoint_dir(3) / "model.safetensors"))["w"].eq(3.0).all()
    assert saver.held_seconds >= 0.7 and saver.write_seconds >= 1.2


def test_every_file_is_fsynced_before_the_folder_is_renamed_into_place(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("replace", Path(b).name)), real_replace(a, b))[1])
    snapshot = Snapshot(7, {"model.safetensors": {"w": torch.ones(3)}, "optimizer.safetensors": {"0.m": torch.ones(3)}},
                        {"format": 1, "step": 7})
    write_snapshot(snapshot, tmp_path / "step_00000007")
    rename = events.index(("replace", "step_00000007"))
    # two tensor files, state.json and the folder itself, then the parent after the rename
    assert events[:rename].count("fsync") == 4 and events[rename + 1:] == ["fsync"]
    saved = json.loads((tmp_path / "step_00000007" / "state.json").read_text())
    assert saved["files"] == {n: (tmp_path / "step_00000007" / n).stat().st_size
                              for n in ("model.safetensors", "optimizer.safetensors")}


def test_a_failed_background_write_stops_the_run_naming_the_checkpoint(built_cache, tmp_path, monkeypatch):
    def disk_full(path, tensors, metadata=None):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint_module, "write_safetensors", disk_full)
    with pytest.raises(G2LError, match=r"checkpoint step_00000002 could not be written .*No space left on device"):
        fit(FitConfig(cache=str(built_cache), out=str(tmp_path / "run"), **TINY))
    assert RunDir(tmp_path / "run").list_checkpoints() == []


def test_a_checkpoint_copied_in_part_is_refused_on_resume(built_cache, tmp_path):
    out = tmp_path / "run"
    fit(FitConfig(cache=str(built_cache), out=str(out), **{**TINY, "steps": 2}))
    last = RunDir(out).last_checkpoint()
    with open(last / "optimizer.safetensors", "r+b") as fh:
        fh.truncate(1000)
    with pytest.raises(G2LError, match="is incomplete: optimizer.safetensors has 1000 bytes"):
        fit(FitConfig(cache=str(built_cache), out=str(out), **{**TINY, "steps": 2, "resume": True}))


_STALL_THE_SECOND_SAVE = """
import json, os, sys, time
from pathlib import Path
import g2l_student.checkpoint as checkpoint
from g2l_student.config import FitConfig
from g2l_student.train import fit

real = checkpoint.write_safetensors
def stalled(path, tensors, metadata=None):  # the step-4 save: one file written, then the machine dies
    written = real(path, tensors, metadata)
    if path.parent.name == "step_00000004.tmp":
        Path(sys.argv[2]).write_text("stalled")
        time.sleep(600)
    return written
checkpoint.write_safetensors = stalled
fit(FitConfig(**json.loads(sys.argv[1])))
"""


def test_kill_9_during_a_background_save_resumes_from_the_previous_one_to_the_same_run(built_cache, tmp_path):
    reference = tmp_path / "reference"
    fit(FitConfig(cache=str(built_cache), out=str(reference), **TINY))
    crashed, marker = tmp_path / "crashed", tmp_path / "stalled"
    cfg = json.dumps({"cache": str(built_cache), "out": str(crashed), **TINY})
    proc = subprocess.Popen([sys.executable, "-c", _STALL_THE_SECOND_SAVE, cfg, str(marker)], cwd=REPO,
                            env={**os.environ, "OMP_NUM_THREADS": "2"}, stderr=subprocess.PIPE)
    run = RunDir(crashed)
    deadline = time.time() + 300
    # training goes on while step 4 is being written: steps 5 and 6 are logged before the kill
    while time.time() < deadline and proc.poll() is None and not (marker.exists() and len(run.read_metrics()) >= 6):
        time.sleep(0.05)
    assert proc.poll() is None, "fit ended before it could be killed: " + proc.stderr.read().decode()[-2000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert [p.name for p in run.list_checkpoints()] == ["step_00000002"]
    assert (run.checkpoints / "step_00000004.tmp" / "model.safetensors").exists()  # the half-written one
    fit(FitConfig(cache=str(built_cache), out=str(crashed), **{**TINY, "resume": True}))
    assert [int(r["step"]) for r in run.read_metrics()] == list(range(1, 7))
    np.testing.assert_allclose(_losses(crashed), _losses(reference), rtol=1e-5, atol=1e-7)
    assert [p.name for p in run.list_checkpoints()] == ["step_00000004", "step_00000006"]  # the .tmp is gone
    for name in ("model.safetensors", "ema.safetensors", "optimizer.safetensors"):
        ours, theirs = (load_file(str(r.checkpoint_dir(6) / name)) for r in (run, RunDir(reference)))
        assert ours.keys() == theirs.keys()
        for key in ours:
            torch.testing.assert_close(ours[key], theirs[key], rtol=1e-5, atol=1e-6)


def test_a_checkpoint_of_an_earlier_g2l_still_resumes_to_the_same_run(built_cache, tmp_path):
    reference = tmp_path / "reference"
    fit(FitConfig(cache=str(built_cache), out=str(reference), **TINY))
    # the step-2 checkpoint as g2l wrote it before this format: Accelerate's save_state, the loop
    # state in loop_state.json and the EMA beside them
    old = tmp_path / "old"
    shutil.copytree(reference, old)
    run = RunDir(old)
    for later in run.list_checkpoints()[1:]:
        shutil.rmtree(later)
    fit_run = set_up_fit(FitConfig(cache=str(built_cache), out=str(old), **{**TINY, "resume": True}))
    step2 = run.last_checkpoint()
    fit_run.load(step2)
    legacy = run.checkpoints / "legacy"
    fit_run.accelerator.save_state(str(legacy))
    (legacy / "loop_state.json").write_text(json.dumps({"train": fit_run.state.state_dict(),
                                                        "early_stop": fit_run.early_stop.state_dict()}))
    save_file({k: v.contiguous() for k, v in fit_run.ema.shadow.items()}, str(legacy / "ema.safetensors"))
    shutil.rmtree(step2)
    legacy.rename(step2)
    assert not (step2 / "state.json").exists() and (step2 / "optimizer.bin").exists()
    fit(FitConfig(cache=str(built_cache), out=str(old), **{**TINY, "resume": True}))
    assert [int(r["step"]) for r in run.read_metrics()] == list(range(1, 7))
    np.testing.assert_allclose(_losses(old), _losses(reference), rtol=1e-5, atol=1e-7)
    assert (run.last_checkpoint() / "state.json").exists()  # new saves in the new format


def test_staging_buffers_are_reused_and_hold_a_copy():
    buffers, weight = StagingBuffers(), torch.zeros(5)
    first = buffers.copy("w", weight)
    weight += 1  # training goes on in place
    assert first.eq(0).all()
    assert buffers.copy("w", weight) is first and first.eq(1).all()
