"""How closely the student reproduces the teacher(s) on held-out slides."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader

from g2l_student.similarity import centred_r2, debiased_cka, knn_overlap, linear_cka, mean_cosine
from g2l_student.targets import TeacherSlot, slot_prefix


@torch.no_grad()
def measure_fidelity(student, dataset, device, teacher=None, batch_size: int = 64, k: int = 10,
                     slots: list[TeacherSlot] | None = None) -> dict:
    """How close the student is to each teacher over every item of `dataset`: the projected output
    against the head's targets (mean cosine, centred R², linear and debiased CKA, k-NN overlap) and
    the raw backbone embedding against the teacher embedding (the three similarities).

    `slots`: the teachers whose targets the items carry side by side (default: one); with several,
    every key is prefixed "LABEL:"."""
    was = student.training
    student.eval()
    outputs: dict[str, list] = {name: [] for name in student.heads}
    raw, embs, patches = [], [], []
    for views, t_emb, t_patch in DataLoader(dataset, batch_size=batch_size, shuffle=False):
        views = views.to(device)
        if teacher is not None:
            t_emb, t_patch = teacher.embed(views)
        out = student(views)
        for name in outputs:
            outputs[name].append(out[name].float().cpu().numpy())
        raw.append(out["embedding"].float().cpu().numpy())
        embs.append(t_emb.float().cpu().numpy())
        patches.append(t_patch.float().cpu().numpy())
    student.train(was)
    r, emb, patch = (np.concatenate(x) for x in (raw, embs, patches))
    slots = slots or [TeacherSlot("", emb.shape[1], patch.shape[1])]
    result: dict = {"views": int(len(r))}
    for slot in slots:
        prefix = slot_prefix(slot, slots)
        head = prefix + ("cls" if prefix + "cls" in student.heads else "mean-patch")
        t = emb[:, slot.embed_start:slot.embed_start + slot.embed_dim]
        ht = t if head.endswith("cls") else patch[:, slot.patch_start:slot.patch_start + slot.patch_dim]
        p = np.concatenate(outputs[head])
        result.update({f"{prefix}projected_cosine": mean_cosine(p, ht), f"{prefix}projected_r2": centred_r2(p, ht),
                       **{f"{prefix}projected_{name}": v for name, v in _similarities(p, ht, k).items()},
                       **{f"{prefix}backbone_{name}": v for name, v in _similarities(r, t, k).items()}})
    return result


def _similarities(a: np.ndarray, b: np.ndarray, k: int) -> dict:
    n = len(a)
    return {"cka": linear_cka(a, b), "cka_debiased": debiased_cka(a, b) if n >= 4 else None,
            f"knn{k}_overlap": knn_overlap(a, b, k=k) if n > 1 else None}
