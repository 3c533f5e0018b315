"""The student: a timm backbone plus projection heads into the teacher's embedding space."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from g2l_cache.errors import G2LError
from g2l_cache.teachers import split_embedding
from g2l_cache.weights import create_timm_model, load_state_dict_file
from g2l_student.hf_dinov2 import hf_checkpoint_folder, load_hf_student

# What a user can do when a student's published weights cannot be had.
STUDENT_FIXES = ("log in with `hf auth login`, pass --student-weights (a .safetensors file, or a transformers "
                 "DINOv2 folder with config.json + model.safetensors), or --random-init")


class GlobalBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm1d whose training statistics span the global batch across processes.

    With Accelerate's split batches this makes an N-process step compute exactly what one process
    computes on the whole batch. Its state dict is a plain BatchNorm1d's.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            with torch.autocast(x.device.type, enabled=False):
                return F.batch_norm(x.float(), self.running_mean, self.running_var, self.weight, self.bias,
                                    False, 0.0, self.eps)
        # Two passes (mean, then squared deviations from it) instead of E[x^2] - E[x]^2: features
        # with a large offset (mean 30, sd 0.05) keep their variance in float32.
        x32 = x.float()
        sums = _global_sum(torch.cat([x32.sum(0), torch.tensor([x.shape[0]], dtype=torch.float32,
                                                                device=x.device)]))
        d = x.shape[1]
        n = sums[-1]
        mean = sums[:d] / n
        var = _global_sum(((x32 - mean) ** 2).sum(0)) / n
        with torch.no_grad():
            self.num_batches_tracked += 1
            m = self.momentum
            self.running_mean.mul_(1 - m).add_(m * mean.detach())
            self.running_var.mul_(1 - m).add_(m * var.detach() * n / (n - 1).clamp_min(1))
        # float32 out, also under bf16 autocast: a feature with a large offset and a small spread
        # (mean 30, sd 0.05) has only a few bf16 values, which would cap how well it can be fitted.
        return (x32 - mean) / torch.sqrt(var + self.eps) * self.weight.float() + self.bias.float()


def _global_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over processes (differentiable), or t itself when alone."""
    if torch.distributed.is_available() and torch.distributed.is_initialized() \
            and torch.distributed.get_world_size() > 1:
        from torch.distributed.nn.functional import all_reduce

        return all_reduce(t)
    return t


def projection_head(in_dim: int, out_dim: int) -> nn.Sequential:
    """G2L's projection: Linear(student dim -> teacher dim) + BatchNorm1d."""
    return nn.Sequential(nn.Linear(in_dim, out_dim), GlobalBatchNorm1d(out_dim))


class Student(nn.Module):
    """Backbone + heads; takes [0, 1] views, normalises with the student's own mean/std."""

    def __init__(self, backbone: nn.Module, arch: str, img_size: int, mean, std,
                 head_dims: dict[str, int]):
        super().__init__()
        self.backbone = backbone
        self.arch = arch
        self.img_size = img_size
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        with torch.no_grad():
            was = backbone.training
            backbone.eval()
            cls, patch = self._features(torch.zeros(2, 3, img_size, img_size))
            backbone.train(was)
        self.embed_dim, self.patch_dim = cls.shape[1], patch.shape[1]
        # Only heads whose target is trained: an unused head would stall DDP's gradient reduction.
        in_dims = {"cls": self.embed_dim, "mean-patch": self.patch_dim}
        self.heads = nn.ModuleDict({k: projection_head(in_dims[head_kind(k)], d) for k, d in head_dims.items()})

    def preprocess(self, views: torch.Tensor) -> torch.Tensor:
        x = (views - self.mean) / self.std
        if x.shape[-1] != self.img_size:
            x = F.interpolate(x, size=(self.img_size, self.img_size), mode="bicubic",
                              align_corners=False, antialias=True)
        return x

    def _features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feats = self.backbone.forward_features(x)
        return split_embedding(self.backbone, feats, "cls")

    def embed(self, views: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(CLS embedding, mean patch token) of the backbone: what users take downstream."""
        return self._features(self.preprocess(views))

    def forward(self, views: torch.Tensor) -> dict[str, torch.Tensor]:
        """Projected output per trained target kind, plus the raw backbone embedding."""
        cls, patch = self.embed(views)
        inputs = {"cls": cls, "mean-patch": patch}
        return {"embedding": cls, **{k: head(inputs[head_kind(k)]) for k, head in self.heads.items()}}


def head_kind(name: str) -> str:
    """What a head projects: "cls" or "mean-patch" ("LABEL:cls" with several teachers)."""
    return name.rsplit(":", 1)[-1]


@torch.no_grad()
def init_heads_from_targets(student: Student, targets: dict[str, torch.Tensor]) -> None:
    """Start each head's BatchNorm at its targets' per-dimension mean and standard deviation.

    A BatchNorm head starts at mean 0, sd 1 per dimension; teacher embeddings sit far from that
    (a random ViT-S: median |mean| 0.57, sd 0.46), and Adam moves the affine by about the learning
    rate per step, so the offset dominates the loss for thousands of steps and the backbone is
    pushed to chase it. `targets`: head name -> (n, d) sample of that head's targets."""
    for name, values in targets.items():
        bn = student.heads[name][1]
        values = values.float()
        bn.bias.copy_(values.mean(0))
        bn.weight.copy_(values.std(0).clamp_min(1e-6))


def build_student(arch: str, img_size: int, head_dims: dict[str, int], weights: str | None = None,
                  random_init: bool = False, head_weights: str | None = None,
                  mean: list[float] | None = None, std: list[float] | None = None,
                  model_args: dict | None = None) -> Student:
    """Create the student backbone (timm) and one head per entry of `head_dims` (name -> output size;
    "cls" / "mean-patch", or "LABEL:cls" / "LABEL:mean-patch" per teacher).

    `weights`: a timm-layout weights file, or a transformers DINOv2 checkpoint (folder, its weights
    file, or hub id such as histai/hibou-L) mapped onto the timm ViT. Mean/std: `mean`/`std` if
    given, else the checkpoint's preprocessor_config.json, else timm's pretrained config.
    `model_args`: timm arguments a run recorded (`student_model_args`) to rebuild its backbone."""
    import timm

    kwargs = {"num_classes": 0}
    if any(k in arch for k in ("vit", "deit", "eva", "beit")):
        kwargs["img_size"] = img_size
    kwargs.update({k: v for k, v in (model_args or {}).items() if k != "img_size"})
    if weights and random_init:
        raise G2LError("give either --student-weights or --random-init, not both.")
    cfg = timm.get_pretrained_cfg(arch)
    cfg = cfg.to_dict() if cfg is not None else {}
    own_mean, own_std = cfg.get("mean", (0.485, 0.456, 0.406)), cfg.get("std", (0.229, 0.224, 0.225))
    hf, model_args = None, {k: v for k, v in kwargs.items() if k != "num_classes"}
    if weights and (Path(weights).exists() or not _is_weights_file_name(str(weights))):
        hf = hf_checkpoint_folder(str(weights))  # a folder, a file in one, or a hub id
    if hf is not None:
        converted = load_hf_student(hf, img_size, str(weights) if Path(weights).is_file() else None)
        model_args.update(converted.timm_kwargs)
        backbone = create_timm_model(arch, state_dict=converted.state_dict, what="student",
                                     num_classes=0, **model_args)
        own_mean, own_std = converted.mean or own_mean, converted.std or own_std
    elif weights:
        backbone = create_timm_model(arch, state_dict=load_state_dict_file(weights), what="student",
                                     **kwargs)
    elif random_init:
        backbone = create_timm_model(arch, what="student", **kwargs)
    else:
        backbone = create_timm_model(arch, pretrained=True, what=f"student {arch}", fixes=STUDENT_FIXES, **kwargs)
    student = Student(backbone, arch, img_size, mean or own_mean, std or own_std, head_dims)
    student.model_args = model_args  # what timm needs besides the name to rebuild this backbone
    if head_weights:
        load_heads(student, head_weights)
    return student


def _is_weights_file_name(name: str) -> bool:
    return name.endswith((".safetensors", ".pth", ".pt", ".bin", ".ckpt"))


def load_heads(student: Student, path: str) -> None:
    """Load projection heads saved by an export; clear error if their teacher dims differ."""
    sd = load_state_dict_file(path)
    own = student.heads.state_dict()
    for key, value in sd.items():
        if key in own and own[key].shape != value.shape:
            raise G2LError(f"head weights {path} were trained for another teacher dimension "
                           f"({key}: {tuple(value.shape)} vs {tuple(own[key].shape)} here).")
    missing = student.heads.load_state_dict(sd, strict=False)
    if missing.missing_keys and len(missing.missing_keys) == len(own):
        raise G2LError(f"{path} holds no projection-head weights.")
