"""`g2l student fit`: distil the cached teacher targets into a timm student with Accelerate.

`fit` is four calls: set up (fit_setup.py: inputs checked, run folder, optimiser, task), resume or
measure the untrained student, the loop (loop.py), and the finish: fidelity after training, the
ledger and the export.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from g2l_cache.build import device_label
from g2l_cache.layout import now_iso
from g2l_cache.teachers import Teacher
from g2l_student.config import FitConfig
from g2l_student.export import export_run
from g2l_student.fit_setup import FitRun, build_loader, set_up_fit
from g2l_student.loop import LoopOutcome, train_loop
from g2l_student.model import Student


@dataclass
class FitResult:
    """What a fit did: steps run, why it stopped, final loss, fidelity before/after, export folder."""

    run: str
    steps: int
    stopped: str
    final_loss: float | None
    fidelity: dict
    export: str | None
    # This session's loop from the first batch on (worker start-up left out):
    steps_per_second: float = 0.0
    data_wait_share: float = 0.0  # share of that time spent waiting for the data loader
    checkpoints: dict | None = None  # saves, seconds training was held by them, seconds written behind it


def fit(cfg: FitConfig, student: Student | None = None, teacher: Teacher | list[Teacher] | None = None
        ) -> FitResult:
    """Train the student as configured; resumable from the run folder's last checkpoint.

    `student` / `teacher`: objects to use instead of building cfg.student / cfg.online_teacher
    by name (teacher objects, one or a list, are run live, as --online-teacher)."""
    run = set_up_fit(cfg, student, teacher)
    resume_or_start(run)
    outcome = train_loop(run, *build_loader(run))
    return finish_fit(run, outcome)


def resume_or_start(fit: FitRun) -> None:
    """A resume loads the last checkpoint (weights, optimiser, schedule, RNG, loop state); a new run,
    or a resume with no checkpoint yet, starts from step 0 and measures the untrained student's fidelity."""
    checkpoint = fit.run.last_checkpoint() if fit.cfg.resume else None
    if checkpoint is not None:
        fit.load(checkpoint)
        if fit.main:
            fit.run.truncate_metrics(fit.state.step)
    elif fit.main:
        # a new run, or a resume of one killed before its first checkpoint: that one starts over
        fit.run.clear_metrics()
        fit.run.write_fidelity({"split": fit.fidelity_split, "split_by": fit.data.split_by,
                                "val_slides": fit.data.val_slides, "before": fit.measure_fidelity()})
    fit.accelerator.wait_for_everyone()


def finish_fit(fit: FitRun, outcome: LoopOutcome) -> FitResult:
    """Fidelity after training (of the EMA when kept), the loss plot, the session's ledger entry and
    the export, by the main process."""
    fidelity, export_dir, state = {}, None, fit.state
    fit.accelerator.wait_for_everyone()
    if fit.main:
        model = fit.plain_student
        if fit.ema is not None:
            model.load_state_dict({**model.state_dict(), **fit.ema.shadow}, strict=False)
        fidelity = {**fit.run.read_fidelity(), "after": fit.measure_fidelity(model), "after_step": state.step}
        fit.run.write_fidelity(fidelity)
        fit.run.plot_loss()
        views = (state.step - outcome.first_step) * fit.cfg.batch_size * fit.cfg.grad_accum
        session = {"started": fit.session_started, "finished": now_iso(),
                   "wall_seconds": time.time() - fit.session_clock, "processes": fit.accelerator.num_processes,
                   "device": device_label(fit.accelerator.device), "steps": [outcome.first_step, state.step],
                   "views": views, "checkpoints": outcome.checkpoints}
        fit.run.update_info(status="finished", steps=state.step, stopped=outcome.stopped,
                            ledger=[*fit.run.info().get("ledger", []), session])
        # last: its model card reads the fidelity and the ledger; the speed line is `g2l student
        # export`'s, so that a fit does not stop to time its teachers
        export_dir = str(export_run(fit.run.root, speed=False))
    fit.accelerator.wait_for_everyone()
    seconds = outcome.clock.seconds()
    return FitResult(str(fit.run.root), state.step, outcome.stopped, outcome.last_loss, fidelity, export_dir,
                     (state.step - outcome.first_step) / seconds if seconds else 0.0, outcome.clock.wait_share(),
                     outcome.checkpoints)
