"""How closely the student reproduces the teacher on held-out slides."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader

from g2l_student.similarity import centred_r2, debiased_cka, knn_overlap, linear_cka, mean_cosine


@torch.no_grad()
def measure_fidelity(student, dataset, device, teacher=None, batch_size: int = 64, k: int = 10) -> dict:
    """Mean cosine and centred R² (projected student vs its teacher target), linear and debiased
    CKA and k-NN overlap (raw student embedding vs teacher embedding) over every item of `dataset`."""
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
    return {"tiles": int(len(t)), "cosine": mean_cosine(p, ht), "r2": centred_r2(p, ht),
            "cka": linear_cka(r, t), "cka_debiased": debiased_cka(r, t) if len(t) >= 4 else None,
            f"knn{k}_overlap": knn_overlap(r, t, k=k)}
