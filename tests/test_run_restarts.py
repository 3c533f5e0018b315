"""A fit under Slurm requeues: a resume before the first checkpoint is a new run (same head start,
fresh metrics, the same result as an uninterrupted run), and --auto-resume is one command for the
first start and every requeue that refuses a folder holding anything else."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from helpers import run_cli
from g2l_student.config import FitConfig
from g2l_student.rundir import RunDir
from g2l_student.train import fit

REPO = Path(__file__).parent.parent
# no checkpoint before the end: the kill lands before the first one
CFG = ["--student", "vit_tiny_patch16_224", "--random-init", "--img-size", "64", "--batch-size", "8",
       "--num-workers", "0", "--val-fraction", "0.34", "--steps", "60", "--lr", "5e-4",
       "--checkpoint-every", "1000", "--no-progress"]
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "2"}


def _fit(cache, out, *extra):
    return run_cli("student", "fit", str(cache), "--out", str(out), *CFG, *extra, env=ENV, timeout=600)


def _losses(run: Path) -> list[float]:
    return [float(r["loss"]) for r in RunDir(run).read_metrics()]


def test_a_run_killed_before_its_first_checkpoint_resumes_as_a_new_run(built_cache, tmp_path):
    reference = tmp_path / "reference"
    fit(FitConfig(cache=str(built_cache), out=str(reference), auto_resume=True, student="vit_tiny_patch16_224",
                  random_init=True, img_size=64, batch_size=8, num_workers=0, val_fraction=0.34, steps=60,
                  lr=5e-4, checkpoint_every=1000, progress=False))  # nothing there yet: a new run
    crashed = tmp_path / "crashed"
    proc = subprocess.Popen([sys.executable, "-m", "cli", "student", "fit", str(built_cache), "--out", str(crashed),
                             *CFG, "--auto-resume"], cwd=REPO, env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    run = RunDir(crashed)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and len(run.read_metrics() if run.metrics.exists() else []) < 5:
        time.sleep(0.05)
    assert proc.poll() is None, "fit finished before it could be killed: " + proc.stderr.read().decode()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert run.last_checkpoint() is None and len(run.read_metrics()) >= 5

    res = run_cli("student", "fit", "--out", str(crashed), "--resume", "--no-progress", env=ENV, timeout=600)
    assert res.returncode == 0, res.stderr
    assert [int(r["step"]) for r in run.read_metrics()] == list(range(1, 61))  # no step twice
    np.testing.assert_allclose(_losses(crashed), _losses(reference), rtol=1e-5, atol=1e-6)
    before = [json.loads((r / "fidelity.json").read_text())["before"] for r in (reference, crashed)]
    assert before[0] == before[1]  # the same head start (initialised from the targets), measured again

    # --auto-resume on a run: resumes it (from its last checkpoint: nothing left to train)
    res = _fit(built_cache, reference, "--auto-resume")
    assert res.returncode == 0, res.stderr
    assert [int(r["step"]) for r in RunDir(reference).read_metrics()] == list(range(1, 61))
    # ... and refuses a run of other options, or a folder that holds something else
    res = _fit(built_cache, reference, "--auto-resume", "--lr", "1e-3")
    assert res.returncode != 0 and "--lr" in res.stderr and "Traceback" not in res.stderr
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("not a run")
    res = _fit(built_cache, other, "--auto-resume")
    assert res.returncode != 0 and "not a g2l run" in res.stderr and "Traceback" not in res.stderr
