"""Distillation losses between projected student embeddings and teacher targets (per sample, averaged)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from g2l_cache.errors import G2LError
from g2l_student.choices import LOGSUM_OVER, LOSSES



def logsum_loss(student: torch.Tensor, teacher: torch.Tensor, alpha: float = 4.0,
                over: str = "sample") -> torch.Tensor:
    """G2L's loss: mean over samples of log(sum_i |s_i - t_i| ** alpha) (`over="sample"`), or
    log of that sum over the whole batch (`over="batch"`, a few large errors then dominate)."""
    diff = (student.float() - teacher.float()).abs()
    # log-sum-exp form of log(sum |d|^alpha): stable when |d|^alpha under- or overflows.
    logs = alpha * torch.log(diff.clamp_min(1e-30))
    if over == "batch":
        # The batch is the global one: under several processes each holds a part, so the parts'
        # log-sums are gathered (differentiably) and combined, and N processes compute what one does.
        return torch.logsumexp(_gather(torch.logsumexp(logs.flatten(), dim=0)), dim=0)
    return torch.logsumexp(logs, dim=1).mean()


def _gather(value: torch.Tensor) -> torch.Tensor:
    """A scalar from every process, stacked (gradients flow back to each process's own), or itself alone."""
    if torch.distributed.is_available() and torch.distributed.is_initialized() \
            and torch.distributed.get_world_size() > 1:
        from torch.distributed.nn.functional import all_gather

        return torch.stack(all_gather(value.reshape(1))).reshape(-1)
    return value.reshape(1)


def cosine_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """1 - cosine similarity, averaged over samples."""
    return (1 - F.cosine_similarity(student.float(), teacher.float(), dim=1)).mean()


def smooth_l1_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Huber (beta 1) per element, summed over dimensions, averaged over samples."""
    return F.smooth_l1_loss(student.float(), teacher.float(), reduction="none").sum(1).mean()


def mse_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Squared error summed over dimensions, averaged over samples."""
    return ((student.float() - teacher.float()) ** 2).sum(1).mean()


# The one registry of losses: name -> function(student, teacher, alpha, logsum_over).
LOSS_FUNCTIONS = {
    "logsum": logsum_loss,
    "cosine": lambda s, t, alpha, over: cosine_loss(s, t),
    "smooth-l1": lambda s, t, alpha, over: smooth_l1_loss(s, t),
    "mse": lambda s, t, alpha, over: mse_loss(s, t),
}
assert tuple(LOSS_FUNCTIONS) == LOSSES, "g2l_student.choices.LOSSES names every loss"


def get_loss(name: str, alpha: float = 4.0, logsum_over: str = "sample"):
    """The loss function called `name` (one of LOSSES), as f(student, teacher)."""
    if name not in LOSS_FUNCTIONS:
        raise G2LError(f"unknown loss {name!r}; use one of {', '.join(LOSSES)}.")
    if logsum_over not in LOGSUM_OVER:
        raise G2LError(f"logsum_over must be one of {', '.join(LOGSUM_OVER)}, got {logsum_over!r}.")
    fn = LOSS_FUNCTIONS[name]
    return lambda s, t: fn(s, t, alpha, logsum_over)
