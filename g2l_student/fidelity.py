"""How closely the student reproduces the teacher on held-out slides."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader

from g2l_student.similarity import centred_r2, debiased_cka, knn_overlap, linear_cka, mean_cosine


@torch.no_grad()
def measure_fidelity(student, dataset, device, teacher=None, batch_size: int = 64, k: int = 10) -> dict:
    """How close the student is to its teacher over every item of `dataset`: the projected output
    against the head's targets (mean cosine, centred R², linear and debiased CKA, k-NN overlap) and
    the raw backbone embedding against the teacher embedding (the three similarities)."""
    head = "cls" if "cls" in student.heads else "mean-patch"
    was = student.training
    student.eval()
    projected, raw, targets = [], [], []
    head_targets = []
    for views, t_emb, t_patch in DataLoader(dataset, batch_size=batch_size, shuffle=False):
        views = views.to(device)
        if teacher is not None:
            t_emb, t_patch = teacher.embed(views)
        out = student(views)
        projected.append(out[head].float().cpu().numpy())
        raw.append(out["embedding"].float().cpu().numpy())
        targets.append(t_emb.float().cpu().numpy())
        head_targets.append((t_emb if head == "cls" else t_patch).float().cpu().numpy())
    student.train(was)
    p, r, t, ht = (np.concatenate(x) for x in (projected, raw, targets, head_targets))
    return {"views": int(len(t)), "projected_cosine": mean_cosine(p, ht), "projected_r2": centred_r2(p, ht),
            **{f"projected_{name}": v for name, v in _similarities(p, ht, k).items()},
            **{f"backbone_{name}": v for name, v in _similarities(r, t, k).items()}}


def _similarities(a: np.ndarray, b: np.ndarray, k: int) -> dict:
    n = len(a)
    return {"cka": linear_cka(a, b), "cka_debiased": debiased_cka(a, b) if n >= 4 else None,
            f"knn{k}_overlap": knn_overlap(a, b, k=k) if n > 1 else None}
