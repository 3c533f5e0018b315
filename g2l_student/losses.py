"""Distillation losses between projected student embeddings and teacher targets (per sample, averaged)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from g2l_cache.errors import G2LError

LOSSES = ("logsum", "cosine", "smooth-l1", "mse")
LOGSUM_OVER = ("sample", "batch")


def logsum_loss(student: torch.Tensor, teacher: torch.Tensor, alpha: float = 4.0,
                over: str = "sample") -> torch.Tensor:
    """G2L's loss: mean over samples of log(sum_i |s_i - t_i| ** alpha) (`over="sample"`), or
    log of that sum over the whole batch (`over="batch"`, a few large errors then dominate)."""
    diff = (student.float() - teacher.float()).abs()
    # log-sum-exp form of log(sum |d|^alpha): stable when |d|^alpha under- or overflows.
    logs = alpha * torch.log(diff.clamp_min(1e-30))
    if over == "batch":
        return torch.logsumexp(logs.flatten(), dim=0)
    return torch.logsumexp(logs, dim=1).mean()


def cosine_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """1 - cosine similarity, averaged over samples."""
    return (1 - F.cosine_similarity(student.float(), teacher.float(), dim=1)).mean()


def smooth_l1_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Huber (beta 1) per element, summed over dimensions, averaged over samples."""
    return F.smooth_l1_loss(student.float(), teacher.float(), reduction="none").sum(1).mean()


def mse_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Squared error summed over dimensions, averaged over samples."""
    return ((student.float() - teacher.float()) ** 2).sum(1).mean()


def get_loss(name: str, alpha: float = 4.0, logsum_over: str = "sample"):
    """The loss function called `name` (one of LOSSES)."""
    if name == "logsum":
        if logsum_over not in LOGSUM_OVER:
            raise G2LError(f"logsum_over must be one of {', '.join(LOGSUM_OVER)}, got {logsum_over!r}.")
        return lambda s, t: logsum_loss(s, t, alpha, logsum_over)
    table = {"cosine": cosine_loss, "smooth-l1": smooth_l1_loss, "mse": mse_loss}
    if name not in table:
        raise G2LError(f"unknown loss {name!r}; use one of {', '.join(LOSSES)}.")
    return table[name]
