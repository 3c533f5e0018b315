"""Teachers run during a fit (`--online-teacher`, or teacher objects handed to `fit`): each view's
targets are computed on the spot instead of read from the cache."""

from __future__ import annotations

import torch

from g2l_cache import CacheReader
from g2l_cache.teachers import Teacher, TeacherSpec, load_teacher
from g2l_student.config import FitConfig
from g2l_student.run_data import cached_teacher_entry


class LiveTeachers(torch.nn.Module):
    """Several teachers run live on the same views; targets concatenated in order, as cached ones are."""

    def __init__(self, teachers: list[Teacher]):
        super().__init__()
        self.members = torch.nn.ModuleList(teachers)
        self.embed_dim = sum(t.embed_dim for t in teachers)
        self.patch_dim = sum(t.patch_dim for t in teachers)

    def embed(self, views: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pairs = [t.embed(views) for t in self.members]
        return torch.cat([p[0] for p in pairs], dim=1), torch.cat([p[1] for p in pairs], dim=1)


def build_online_teacher(cfg: FitConfig, reader: CacheReader, device) -> list[Teacher]:
    """The teachers to run live: the cache's recorded spec when a NAME is one of its teachers."""
    teachers = []
    for name in cfg.online_teacher:
        info = cached_teacher_entry(cfg, reader, name)
        if info is not None:
            teachers.append(load_teacher(TeacherSpec.from_record(info["spec"]), img_size=info["input_size"],
                                         device=device))
        else:
            spec = TeacherSpec(name, cfg.online_teacher_weights, cfg.online_random_init, cfg.seed)
            teachers.append(load_teacher(spec, img_size=reader.policy.crop_size, device=device))
    return teachers
