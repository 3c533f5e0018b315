"""Where each teacher's targets sit in a batch, and which projection head learns which of them.

A batch carries every teacher's targets side by side (embeddings concatenated, mean patch tokens
concatenated, in teacher order); each teacher has its own projection heads, named "LABEL:cls" /
"LABEL:mean-patch". With one teacher the heads are plain "cls" / "mean-patch".
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TeacherSlot:
    """One teacher's place in a batch's concatenated targets."""

    label: str
    embed_dim: int
    patch_dim: int
    embed_start: int = 0
    patch_start: int = 0


@dataclass(frozen=True)
class HeadTarget:
    """What one projection head is trained on: a teacher's embedding ("cls") or mean patch token."""

    teacher: str
    kind: str  # "cls" or "mean-patch"
    start: int
    stop: int


def teacher_slots(teachers: list[tuple[str, int, int]]) -> list[TeacherSlot]:
    """Slots of (label, embed_dim, patch_dim) teachers laid side by side in teacher order."""
    slots, e, p = [], 0, 0
    for label, embed_dim, patch_dim in teachers:
        slots.append(TeacherSlot(label, embed_dim, patch_dim, e, p))
        e, p = e + embed_dim, p + patch_dim
    return slots


def head_targets(target: str, slots: list[TeacherSlot]) -> dict[str, HeadTarget]:
    """The heads `target` (cls, mean-patch, both) needs for these teachers, and their targets."""
    heads = {}
    for slot in slots:
        prefix = slot_prefix(slot, slots)
        if target in ("cls", "both"):
            heads[prefix + "cls"] = HeadTarget(slot.label, "cls", slot.embed_start, slot.embed_start + slot.embed_dim)
        if target in ("mean-patch", "both"):
            heads[prefix + "mean-patch"] = HeadTarget(slot.label, "mean-patch", slot.patch_start,
                                                      slot.patch_start + slot.patch_dim)
    return heads


def head_dims(target: str, embed_dim: int, patch_dim: int) -> dict[str, int]:
    """Output size of each projection head the target needs, for one teacher."""
    return {k: h.stop - h.start for k, h in head_targets(target, teacher_slots([("", embed_dim, patch_dim)])).items()}


def slot_prefix(slot: TeacherSlot, slots: list[TeacherSlot]) -> str:
    """How this teacher's heads and fidelity keys are prefixed: nothing when it is the only one."""
    return "" if len(slots) == 1 else f"{slot.label}:"


def select_targets(heads: dict[str, HeadTarget], t_emb: torch.Tensor, t_patch: torch.Tensor,
                   names=None) -> dict[str, torch.Tensor]:
    """Each head's columns of a batch's concatenated (embedding, mean patch) targets."""
    return {k: (t_emb if heads[k].kind == "cls" else t_patch)[:, heads[k].start:heads[k].stop]
            for k in (names or heads)}
