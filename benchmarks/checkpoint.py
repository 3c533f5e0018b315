"""Checkpoints that do not stall training: one ViT-L state (model + AdamW + EMA) saved both ways.

  sync_s        g2l's save before this change: Accelerate's save_state, the loop state and the EMA,
                written by the training process while training waits (no fsync);
  sync_fsync_s  the new format written in the caller, every file fsynced (what a synchronous save
                costs once it is made durable);
  blocked_s     the new asynchronous save: the time training is held (waiting for the previous save,
                then copying the state into CPU buffers kept between saves), median of --saves (the
                first of which also allocates those buffers);
  write_s       the background write of each (files fsynced, folder renamed into place);
  compute_during_write  a training-like matmul loop's speed while a save is written behind it,
                over its speed alone (1.0: no slowdown).
Target: blocked_s <= 0.25 x sync_s. Writes results/checkpoint.json.
"""

from __future__ import annotations

import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))

import torch  # noqa: E402

from g2l_student.checkpoint import LOOP_STATE, StagingBuffers, take_snapshot  # noqa: E402
from g2l_student.checkpoint_saver import CheckpointSaver  # noqa: E402
from g2l_student.optim import build_optimizer  # noqa: E402
from g2l_student.rundir import RunDir  # noqa: E402
from g2l_student.schedule import EMA, G2LEarlyStop, TrainState, cosine_with_warmup  # noqa: E402

TARGET = 0.25


def training_state(arch: str):
    """A student with AdamW moments, an EMA and a schedule, prepared by Accelerate as a fit does."""
    import timm
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    model = timm.create_model(arch, pretrained=False, num_classes=0).to(accelerator.device)
    optimizer = build_optimizer(model, 1e-4, 0.05, accelerator.device)
    for p in model.parameters():  # one step gives AdamW its two moments per weight
        p.grad = torch.randn_like(p) * 1e-3
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    early_stop = G2LEarlyStop()
    scheduler = cosine_with_warmup(optimizer, 10, 1000, early_stop)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    ema = EMA(accelerator.unwrap_model(model), 0.999)
    return accelerator, model, optimizer, scheduler, ema, early_stop


def compute_rate(seconds: float, busy=lambda: True) -> float:
    """Iterations per second of a training-like matmul loop, for `seconds` or while busy()."""
    a = torch.randn(768, 768)
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds and busy():
        a = torch.tanh(a @ a * 1e-3)
        done += 1
    return done / (time.perf_counter() - start)


def main() -> None:
    import argparse

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="vit_large_patch16_224", help="timm student (random weights)")
    p.add_argument("--saves", type=int, default=3, help="asynchronous saves to time")
    p.add_argument("--scratch", default=None, help="folder for the checkpoints (default: a temp folder)")
    p.add_argument("--out", default=str(ROOT / "results"))
    args = p.parse_args()
    accelerator, model, optimizer, scheduler, ema, early_stop = training_state(args.arch)
    state = TrainState()
    scratch = Path(tempfile.mkdtemp(prefix="g2l-ckpt-", dir=args.scratch))
    try:
        # before: Accelerate's save_state + loop state + EMA, synchronous
        started = time.perf_counter()
        old = scratch / "sync"
        accelerator.save_state(str(old))
        (old / LOOP_STATE).write_text(json.dumps({"train": state.state_dict(), "early_stop": early_stop.state_dict()}))
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in ema.shadow.items()}, str(old / "ema.safetensors"))
        sync_s = time.perf_counter() - started
        sync_bytes = sum(f.stat().st_size for f in old.iterdir())
        shutil.rmtree(old)

        buffers = StagingBuffers()
        take = lambda: take_snapshot(accelerator, model, optimizer, scheduler, ema, state, early_stop, buffers)  # noqa: E731
        run = RunDir(scratch / "run")
        started = time.perf_counter()
        with CheckpointSaver(run, keep=1, background=False) as saver:
            saver.save(take, run.checkpoint_dir(0))
        sync_fsync_s = time.perf_counter() - started

        alone = compute_rate(3.0)
        buffers = StagingBuffers()  # afresh: the first save of a run allocates them (blocked_each_s[0])
        blocked, writes, during = [], [], []
        for i in range(1, args.saves + 1):
            state.step = i
            saver = CheckpointSaver(run, keep=1)
            started = time.perf_counter()
            saver.save(take, run.checkpoint_dir(i))
            blocked.append(time.perf_counter() - started)
            during.append(compute_rate(1e9, busy=lambda: saver.thread is not None and saver.thread.is_alive()))
            saver.close()
            writes.append(saver.write_seconds)
        folder = run.last_checkpoint()
        nbytes = sum(f.stat().st_size for f in folder.iterdir())
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    result = {
        "arch": args.arch, "device": str(accelerator.device),
        "params": sum(p.numel() for p in accelerator.unwrap_model(model).parameters()),
        "bytes": nbytes, "sync_bytes": sync_bytes,
        "sync_s": round(sync_s, 3), "sync_fsync_s": round(sync_fsync_s, 3),
        "blocked_s": round(statistics.median(blocked), 3), "blocked_each_s": [round(b, 3) for b in blocked],
        "write_s": [round(w, 3) for w in writes],
        "compute_during_write": round(statistics.median(during) / alone, 3),
        "blocked_over_sync": round(statistics.median(blocked) / sync_s, 3), "target_blocked_over_sync": TARGET,
    }
    result["meets_target"] = result["blocked_over_sync"] <= TARGET
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "checkpoint.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
