"""The teacher: a frozen timm backbone built from a preset (presets.py) that turns views into targets."""

from __future__ import annotations

import hashlib
import json

import torch

from g2l_cache.errors import G2LError
from g2l_cache.presets import (DEFAULT_PRECISION, EMBEDDINGS, HOPTIMUS_MEAN, HOPTIMUS_STD, IMAGENET_MEAN,  # noqa: F401
                               IMAGENET_STD, PRECISIONS, PRESET_NAMES, TeacherPreset, TeacherSpec,
                               get_preset, model_kwargs)
from g2l_cache.weights import create_timm_model, load_state_dict_file, state_dict_digest

_AUTOCAST_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


class Teacher(torch.nn.Module):
    """A frozen timm backbone that maps [0, 1] views to (embedding, mean patch token) targets."""

    def __init__(self, model: torch.nn.Module, preset: TeacherPreset, spec: TeacherSpec,
                 img_size: int):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.preset = preset
        self.spec = spec
        self.img_size = img_size
        self.register_buffer("mean", torch.tensor(preset.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(preset.std).view(1, 3, 1, 1), persistent=False)
        with torch.inference_mode():
            emb, patch = self.embed(torch.zeros(1, 3, img_size, img_size))
        self.embed_dim, self.patch_dim = emb.shape[1], patch.shape[1]
        self.weights_digest = state_dict_digest(self.model)

    @property
    def precision(self) -> str:
        return self.spec.precision

    @torch.inference_mode()
    def embed(self, views: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Targets for a batch of [0, 1] views: (embedding per the preset, mean patch token), fp32."""
        x = (views.to(self.mean.device, non_blocking=True) - self.mean) / self.std
        if x.shape[-1] != self.img_size:
            x = torch.nn.functional.interpolate(x, size=(self.img_size, self.img_size),
                                                mode="bicubic", align_corners=False, antialias=True)
        dtype = _AUTOCAST_DTYPES.get(self.precision)
        with torch.autocast(device_type=x.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            feats = self.model.forward_features(x)
        return split_embedding(self.model, feats, self.preset.embedding)

    def info(self) -> dict:
        """Everything the manifest records about this teacher."""
        return {"fingerprint": self.fingerprint(), "spec": self.spec.to_dict(),
                "arch": self.preset.arch, "hf_hub_id": self.preset.hf_hub_id, "model_args": self.preset.kwargs,
                "weights_digest": self.weights_digest, "embed_dim": self.embed_dim,
                "patch_dim": self.patch_dim, "precision": self.precision, **self.preprocessing()}

    def preprocessing(self) -> dict:
        return {"mean": list(self.preset.mean), "std": list(self.preset.std),
                "input_size": self.img_size, "embedding": self.preset.embedding}

    def fingerprint(self) -> str:
        """Every setting that changes a target: name, architecture and its arguments, weights hash,
        preprocessing and compute precision. Equal fingerprints mean interchangeable targets."""
        blob = json.dumps({"name": self.preset.name, "arch": self.preset.arch, "model_args": self.preset.kwargs,
                           "weights": self.weights_digest, "precision": self.precision,
                           **self.preprocessing()}, sort_keys=True)
        return f"{_slug(self.preset.name)}-{hashlib.blake2b(blob.encode(), digest_size=6).hexdigest()}"


def split_embedding(model: torch.nn.Module, feats: torch.Tensor, embedding: str
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """(embedding, mean patch token) from timm `forward_features` output, for ViTs and CNNs."""
    feats = feats.float()
    if feats.ndim == 4:  # CNN: B, C, H, W
        patch = feats.mean(dim=(2, 3))
        cls = model.forward_head(feats, pre_logits=True).float()
    else:
        npt = getattr(model, "num_prefix_tokens", 1)
        cls = feats[:, 0] if npt > 0 else feats.mean(dim=1)
        patch = feats[:, npt:].mean(dim=1)
    emb = torch.cat([cls, patch], dim=1) if embedding == "cls+mean_patch" else cls
    return emb, patch


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "-" for c in name.lower())


# What a user can do when a teacher's published weights cannot be had.
TEACHER_FIXES = ("log in with `hf auth login` (a token of an account with access), pass a local copy with "
                 "--teacher-weights FILE.safetensors, or --random-init for a test run")


def load_teacher(spec: TeacherSpec, img_size: int | None = None,
                 device: torch.device | str = "cpu") -> Teacher:
    """Build a teacher from a preset or timm name with hub weights, a local file, or random init."""
    spec = spec.on(device)
    preset = get_preset(spec.name)
    size = img_size or preset.input_size
    kwargs = model_kwargs(preset, size)
    if spec.random_init and spec.weights:
        raise G2LError("give either --teacher-weights or --random-init, not both.")
    label = f"teacher {spec.name}" + (f" (hub id {preset.hf_hub_id})" if preset.hf_hub_id else "")
    if spec.random_init:
        # Random weights must be reproducible: every rank and every `cache verify` rebuilds them.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(spec.init_seed)
            model = create_timm_model(preset.arch, what=label, **kwargs)
    elif spec.weights:
        sd = load_state_dict_file(spec.weights)
        model = create_timm_model(preset.arch, state_dict=sd, what=label, **kwargs)
    else:
        # A preset's published repository, else timm's own pretrained tag of the architecture.
        model = create_timm_model(preset.arch, hf_hub_id=preset.hf_hub_id, pretrained=True, what=label,
                                  fixes=TEACHER_FIXES, **kwargs)
    return Teacher(model, preset, spec, size).to(device)
