"""What a run trains on: the cache, its teachers (cached targets, by name or fingerprint), the
train / validation views split by slide or patient, and the held-out views fidelity is measured on.

`fit`, the fidelity report of `g2l student report` and the export read a run's data through here.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from g2l_cache import CacheReader, G2LError
from g2l_cache.inspect import teacher_devices, teacher_seconds, teacher_views_paid
from g2l_cache.reader import resolve_teacher
from g2l_student.config import FitConfig
from g2l_student.data import patients_of_slides, select_views, split_by_slide, view_slides, whole_group_sample
from g2l_student.targets import TeacherSlot, teacher_slots


@dataclass
class FitData:
    """The cache, the chosen teacher's targets and the train / validation views (rows of views.parquet)."""

    reader: CacheReader
    teachers: list[dict]  # the cached teachers whose targets train (in order); []: only live teachers
    train: np.ndarray
    val: np.ndarray
    val_slides: list[str]
    split_by: str = "slide"  # what the validation split keeps whole: "slide", or patients ("tcga", "csv")

    def tiles_of(self, views: np.ndarray) -> np.ndarray:
        return self.reader.view_index["tile"][views]

    @property
    def fingerprints(self) -> list[str]:
        return [t["fingerprint"] for t in self.teachers]


def load_fit_data(cfg: FitConfig) -> FitData:
    """Open the cache, pick the teacher(s), select views and split them by slide."""
    reader = CacheReader(cfg.cache)
    if cfg.online_teacher:  # cached targets of those teachers, if complete, only seed the heads
        cached = [cached_teacher_entry(cfg, reader, name) for name in cfg.online_teacher]
        teachers = cached if all(t is not None and t.get("complete") for t in cached) else []
    else:
        teachers = [reader.teacher(name) for name in cfg.teacher or [None]]
        fps = [t["fingerprint"] for t in teachers]
        if len(set(fps)) != len(fps):
            raise G2LError(f"--teacher names the same cached teacher twice ({', '.join(cfg.teacher)}).")
        for teacher in teachers:
            if not teacher.get("complete"):
                raise G2LError(partial_cache_message(reader, teacher))
    views = select_views(reader, cfg.slides, cfg.where)
    slide_of = view_slides(reader, views)
    names = reader.slides()["slide_id"].to_numpy()
    present = np.unique(slide_of)
    patients, split_by = patients_of_slides(names[present].tolist(), cfg.patient_of)
    train_ids, val_ids = split_by_slide(names[present].tolist(), cfg.val_fraction, cfg.seed,
                                        patients if split_by != "slide" else None)
    is_val = np.isin(slide_of, np.flatnonzero(np.isin(names, val_ids)))
    return FitData(reader, teachers, views[~is_val], views[is_val], val_ids, split_by)


def cached_teacher_entry(cfg: FitConfig, reader: CacheReader, name: str) -> dict | None:
    """The cache's entry of an --online-teacher (by fingerprint or name), unless other weights are given."""
    if cfg.online_teacher_weights:
        return None
    teachers = reader.manifest["teachers"]
    if name not in teachers and not any(info["spec"]["name"] == name for info in teachers.values()):
        return None
    return teachers[resolve_teacher(teachers, name)]


def cached_slots(cfg: FitConfig, data: FitData) -> list[TeacherSlot]:
    """Where each cached teacher's targets sit in a batch, labelled by the names the user gave."""
    labels = teacher_labels(cfg.teacher or [t["spec"]["name"] for t in data.teachers])
    return teacher_slots([(label, t["embed_dim"], t["patch_dim"]) for label, t in zip(labels, data.teachers)])


def teacher_labels(names: list[str]) -> list[str]:
    """Short labels for several teachers' heads and metrics: their names, made unique."""
    slugs = ["".join(c if c.isalnum() or c in "-_" else "-" for c in n) for n in names]
    return [s if slugs.count(s) == 1 else f"{s}-{i}" for i, s in enumerate(slugs)]


def teacher_records(slots: list[TeacherSlot], cached: list[dict], live: list) -> list[dict]:
    """What run.json says of each teacher: label, name, dims, and for cached targets their
    fingerprint and the teacher time the cache paid for them (the ledger of reuse)."""
    out = []
    for i, slot in enumerate(slots):
        record = {"label": slot.label, "embed_dim": slot.embed_dim, "patch_dim": slot.patch_dim}
        if cached:
            t = cached[i]
            record.update(name=t["spec"]["name"], fingerprint=t["fingerprint"], live=False,
                          cache_device_seconds=teacher_seconds(t), cache_views=teacher_views_paid(t),
                          devices=teacher_devices(t))
        else:
            record.update(name=live[i].preset.name, fingerprint=live[i].fingerprint(), live=True)
        out.append(record)
    return out


def partial_cache_message(reader: CacheReader, teacher: dict) -> str:
    """Which teacher lacks targets, for which slides, and the command that finishes them."""
    missing = teacher.get("missing_slides", [])
    shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
    spec = teacher["spec"]
    extra = (f" --teacher-weights {spec['weights']}" if spec.get("weights") else "") + \
        (" --random-init" if spec.get("random_init") else "")
    return (f"teacher {teacher['fingerprint']} has targets for only {teacher.get('n_targets')} of "
            f"{reader.manifest['counts']['views']} views; slides without all their targets: "
            f"{shown or 'none recorded'}. Finish them with `g2l cache build --out {reader.layout.root} "
            f"--teacher {spec['name']}{extra}` (the slides and options default to the cache's).")


def fidelity_views(data: FitData, n_views: int, seed: int) -> tuple[np.ndarray, str]:
    """Up to n validation views, every cached view of each held-out tile (training views when
    there is no validation split); a seeded sample of whole tiles when there are more."""
    split, views = ("validation", data.val) if len(data.val) else ("training", data.train)
    if len(views) > n_views:
        tile_of = np.unique(data.tiles_of(views), return_inverse=True)[1]
        views = views[whole_group_sample(tile_of, n_views, np.random.default_rng([seed, 5]))]
    return views, split
