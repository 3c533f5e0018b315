"""The training loop: move a batch, step, log, checkpoint, until the last step or the early stop.

Everything it uses was built by `fit_setup.set_up_fit`; the task owns the student, heads, loss and any
live teacher, so a step here is the loss of a batch, its backward pass, clipping and the optimiser.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from g2l_cache.errors import G2LError
from g2l_cache.timing import BatchClock, timed_iter
from g2l_student.checkpoint_saver import CheckpointSaver
from g2l_student.fit_setup import FitRun, metric_columns_of
from g2l_student.rundir import RunDir
from g2l_student.sampler import RunSampler


@dataclass
class LoopOutcome:
    """How the loop ended: why ("steps" or "early-stop"), the last loss, and this session's clock
    (from the first batch on: worker start-up left out)."""

    stopped: str
    last_loss: float | None
    first_step: int
    clock: BatchClock
    checkpoints: dict | None = None  # saves, seconds training was held, seconds written in the background


def train_loop(fit: FitRun, loader, sampler: RunSampler) -> LoopOutcome:
    """Run steps from the run's current one to its last, or until the G2L early stop fires."""
    cfg, acc, state = fit.cfg, fit.accelerator, fit.state
    columns, several = metric_columns_of(fit), len(fit.teachers.labels) > 1
    progress = StepProgress(fit.main and cfg.progress, fit.total_steps, state.step)
    outcome = LoopOutcome("steps", None, state.step, BatchClock())
    pending, started, data_wait, unlogged = [], time.time(), 0.0, None
    with CheckpointSaver(fit.run, cfg.keep_checkpoints) as saver:
        for waited, (views, t_cls, t_patch) in timed_iter(loader):
            outcome.clock.arrived(len(views), waited)
            data_wait += waited
            with acc.accumulate(fit.student):
                losses = fit.task.head_losses(views, t_cls, t_patch, model=fit.student)
                loss = fit.task.total(losses)
                acc.backward(loss)
                grad_norm = acc.clip_grad_norm_(fit.student.parameters(), cfg.grad_clip) \
                    if acc.sync_gradients and cfg.grad_clip > 0 else None
                fit.optimizer.step()
                if acc.sync_gradients:
                    fit.scheduler.step()
                fit.optimizer.zero_grad()
            state.micro_batch += 1
            pending.append((loss.detach(), {t: v.detach() for t, v in fit.task.per_teacher(losses).items()}
                            if several else {}))
            if not acc.sync_gradients:
                continue
            state.step += 1
            step = step_metrics(fit, pending, grad_norm, sampler.epoch_of(state.micro_batch - 1),
                                time.time() - started, data_wait)
            pending, data_wait = [], 0.0
            if fit.ema is not None:
                fit.ema.update(fit.plain_student)
            if cfg.val_every and state.step % cfg.val_every == 0 and fit.main:
                step.update({f"val_{k}": v for k, v in fit.measure_fidelity().items() if v is not None and k != "views"})
            # Reading the loss waits for the GPU. Without early stopping, step N is read after step
            # N+1 is queued, so the host never leaves the device idle; the rule needs it at once.
            to_log, unlogged = (step, None) if cfg.early_stop else (unlogged, step)
            stop = False
            if to_log is not None:
                outcome.last_loss = log_step(fit.run, progress, to_log, fit.main, columns)
                stop = cfg.early_stop == "g2l" and fit.early_stop.update(outcome.last_loss)
            if stop or state.step % cfg.checkpoint_every == 0 or state.step == fit.total_steps:
                if unlogged is not None:  # a checkpoint's metrics must be on disk with it
                    outcome.last_loss, unlogged = log_step(fit.run, progress, unlogged, fit.main, columns), None
                saver.save(fit.snapshot, fit.run.checkpoint_dir(state.step))
            if stop:
                outcome.stopped = "early-stop"
                break
    if unlogged is not None:
        outcome.last_loss = log_step(fit.run, progress, unlogged, fit.main, columns)
    progress.close()
    outcome.clock.finished()
    outcome.checkpoints = {"saved": saver.saved, "held_seconds": round(saver.held_seconds, 3),
                           "written_seconds": round(saver.write_seconds, 3)}
    return outcome


def step_metrics(fit: FitRun, pending: list, grad_norm, epoch: int, seconds: float, data_wait: float) -> dict:
    """One optimiser step's metrics row, its losses still on the device (averaged over processes)."""
    reduce = fit.accelerator.reduce
    step = {"step": fit.state.step, "epoch": epoch, "loss": reduce(torch.stack([p[0] for p in pending]).mean(), "mean"),
            "lr": fit.scheduler.get_last_lr()[0], "grad_norm": grad_norm, "seconds": seconds,
            "data_seconds": data_wait}
    for t in pending[0][1]:  # several teachers: each one's share of the loss
        step[f"loss_{t}"] = reduce(torch.stack([p[1][t] for p in pending]).mean(), "mean")
    return step


def log_step(run: RunDir, progress: "StepProgress", step: dict, main: bool, columns: list[str]) -> float:
    """Read one step's loss off the device, write its metrics row; return the loss.

    A non-finite loss or gradient norm stops the run here, before any checkpoint of that step is
    written, so the run folder keeps its last good checkpoint."""
    loss = float(step["loss"].item())
    grad_norm = None if step["grad_norm"] is None else float(step["grad_norm"])
    if main:
        run.log({"step": step["step"], "epoch": step["epoch"], "loss": f"{loss:.7g}",
                 "lr": f"{step['lr']:.6g}", "grad_norm": "" if grad_norm is None else f"{grad_norm:.5g}",
                 "seconds": f"{step['seconds']:.3f}", "data_seconds": f"{step['data_seconds']:.4f}",
                 **{k: f"{float(v):.5g}" for k, v in step.items() if k.startswith(("val_", "loss_"))}},
                columns)
        progress.update(step["step"], loss)
    if not math.isfinite(loss) or grad_norm is not None and not math.isfinite(grad_norm):
        last = run.last_checkpoint()
        if main:
            progress.close()
            run.update_info(status="failed", stopped=f"non-finite loss at step {step['step']}")
        raise G2LError(f"step {step['step']} gave loss {loss} and gradient norm {grad_norm}; the run "
                       f"stopped and keeps its last good checkpoint ({last.name if last else 'none yet'}). "
                       "Lower --lr or raise --warmup-steps, check the cache with `g2l cache verify`, and "
                       "start again (or --resume from that checkpoint).")
    return loss


class StepProgress:
    """A rich progress bar of optimiser steps with the latest loss (or nothing)."""

    def __init__(self, enabled: bool, total: int, start: int):
        self.bar = None
        if enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(TextColumn("fit"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("loss {task.fields[loss]}"), TimeRemainingColumn())
            self.bar.start()
            self.task = self.bar.add_task("fit", total=total, completed=start, loss="-")

    def update(self, step: int, loss: float) -> None:
        if self.bar:
            self.bar.update(self.task, completed=step, loss=f"{loss:.4f}")

    def close(self) -> None:
        if self.bar:
            self.bar.stop()
