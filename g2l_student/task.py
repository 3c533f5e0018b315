"""What is distilled: the student (backbone + heads), which targets, the loss, an optional live teacher.

One `DistillTask` serves `fit`'s steps, the fidelity measurements and the benchmarks' bare step, so
the training loop in `train.py` handles only data, steps, logging and checkpoints.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from g2l_student.fidelity import measure_fidelity
from g2l_student.model import Student

TARGETS = ("cls", "mean-patch", "both")


def head_dims(target: str, embed_dim: int, patch_dim: int) -> dict[str, int]:
    """Output size of each projection head the target needs."""
    return {k: d for k, d in (("cls", embed_dim), ("mean-patch", patch_dim)) if target in (k, "both")}


@dataclass
class DistillTask:
    """The student learns `loss_fn(head output, target)` per trained head, weighted; targets come
    with the batch (cached) or from `teacher` run live on the same views."""

    student: Student
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    weights: dict[str, float]  # head name ("cls", "mean-patch") -> loss weight
    teacher: torch.nn.Module | None = None

    def targets(self, views: torch.Tensor, t_cls: torch.Tensor, t_patch: torch.Tensor) -> dict[str, torch.Tensor]:
        """Each trained head's targets for this batch."""
        if self.teacher is not None:
            t_cls, t_patch = self.teacher.embed(views)
        both = {"cls": t_cls, "mean-patch": t_patch}
        return {k: both[k] for k in self.weights}

    def loss(self, views: torch.Tensor, t_cls: torch.Tensor, t_patch: torch.Tensor,
             model: torch.nn.Module | None = None) -> torch.Tensor:
        """The weighted loss of one batch; `model` is the student as wrapped for training (DDP)."""
        out = (model or self.student)(views)
        targets = self.targets(views, t_cls, t_patch)
        return sum(w * self.loss_fn(out[k], targets[k]) for k, w in self.weights.items())

    def fidelity(self, dataset, device, model: Student | None = None, live_targets: bool | None = None) -> dict:
        """Fidelity of the student (or `model`) on `dataset`; targets from the dataset, or from the
        live teacher when `live_targets` (default: when there is a teacher)."""
        live = self.teacher is not None if live_targets is None else live_targets
        return measure_fidelity(model or self.student, dataset, device, self.teacher if live else None)


def build_task(student: Student, target: str, loss_fn, cls_weight: float = 1.0, patch_weight: float = 1.0,
               teacher: torch.nn.Module | None = None) -> DistillTask:
    """A task from fit's options: `target` picks the heads, each with its weight."""
    weights = {"cls": cls_weight, "mean-patch": patch_weight}
    return DistillTask(student, loss_fn, {k: weights[k] for k in student.heads if target in (k, "both")}, teacher)
