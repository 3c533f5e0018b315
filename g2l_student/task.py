"""What is distilled: the student (backbone + heads), which targets, the loss, optional live teachers.

One `DistillTask` serves `fit`'s steps, the fidelity measurements and the benchmarks' bare step, so
the training loop in `train.py` handles only data, steps, logging and checkpoints. Several teachers:
one head per teacher and target kind (see targets.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from g2l_student.fidelity import measure_fidelity
from g2l_student.model import Student
from g2l_student.targets import HeadTarget, TeacherSlot, head_targets, select_targets



@dataclass
class DistillTask:
    """The student learns `loss_fn(head output, target)` per trained head, weighted; targets come
    with the batch (cached) or from `teacher` run live on the same views."""

    student: Student
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    weights: dict[str, float]  # head name -> loss weight
    heads: dict[str, HeadTarget]
    slots: list[TeacherSlot] = field(default_factory=list)
    teacher: torch.nn.Module | None = None  # live teacher(s): embed(views) -> concatenated targets

    def targets(self, views: torch.Tensor, t_cls: torch.Tensor, t_patch: torch.Tensor) -> dict[str, torch.Tensor]:
        """Each trained head's targets for this batch."""
        if self.teacher is not None:
            t_cls, t_patch = self.teacher.embed(views)
        return select_targets(self.heads, t_cls, t_patch, self.weights)

    def head_losses(self, views: torch.Tensor, t_cls: torch.Tensor, t_patch: torch.Tensor,
                    model: torch.nn.Module | None = None) -> dict[str, torch.Tensor]:
        """The unweighted loss of each trained head on one batch; `model` is the student as wrapped
        for training (DDP)."""
        out = (model or self.student)(views)
        targets = self.targets(views, t_cls, t_patch)
        return {k: self.loss_fn(out[k], targets[k]) for k in self.weights}

    def total(self, losses: dict[str, torch.Tensor]) -> torch.Tensor:
        return sum(w * losses[k] for k, w in self.weights.items())

    def loss(self, views: torch.Tensor, t_cls: torch.Tensor, t_patch: torch.Tensor,
             model: torch.nn.Module | None = None) -> torch.Tensor:
        """The weighted loss of one batch."""
        return self.total(self.head_losses(views, t_cls, t_patch, model))

    def teacher_labels(self) -> list[str]:
        return list(dict.fromkeys(h.teacher for h in self.heads.values()))

    def per_teacher(self, losses: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Each teacher's share of the loss (its heads' weighted losses), for logging."""
        return {t: sum(w * losses[k] for k, w in self.weights.items() if self.heads[k].teacher == t)
                for t in self.teacher_labels()}

    def fidelity(self, dataset, device, model: Student | None = None, live_targets: bool | None = None) -> dict:
        """Fidelity of the student (or `model`) on `dataset`; targets from the dataset, or from the
        live teacher when `live_targets` (default: when there is a teacher)."""
        live = self.teacher is not None if live_targets is None else live_targets
        return measure_fidelity(model or self.student, dataset, device, self.teacher if live else None,
                                slots=self.slots)


def build_task(student: Student, target: str, loss_fn, cls_weight: float = 1.0, patch_weight: float = 1.0,
               teacher: torch.nn.Module | None = None, slots: list[TeacherSlot] | None = None,
               teacher_weights: dict[str, float] | None = None) -> DistillTask:
    """A task from fit's options: `target` picks the heads, each weighted by its kind's weight times
    its teacher's. `slots`: the teachers (default: one, with the student's head sizes)."""
    if slots is None:
        dims = {k: student.heads[k][0].out_features if k in student.heads else 0 for k in ("cls", "mean-patch")}
        slots = [TeacherSlot("teacher", dims["cls"], dims["mean-patch"])]
    heads = {k: h for k, h in head_targets(target, slots).items() if k in student.heads}
    kind_weight = {"cls": cls_weight, "mean-patch": patch_weight}
    weights = {k: kind_weight[h.kind] * (teacher_weights or {}).get(h.teacher, 1.0) for k, h in heads.items()}
    return DistillTask(student, loss_fn, weights, heads, slots, teacher)
