"""Teacher registry (timm-style presets) and the teacher wrapper that turns views into targets."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, replace

import torch

from g2l_cache.errors import G2LError
from g2l_cache.weights import create_timm_model, load_state_dict_file, state_dict_digest

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HOPTIMUS_MEAN = (0.707223, 0.578729, 0.703617)
HOPTIMUS_STD = (0.211883, 0.230117, 0.177517)
EMBEDDINGS = ("cls", "cls+mean_patch")
# The dtype the teacher computes in (autocast; weights stay fp32). "auto", the default, is fp16 on a GPU
# and fp32 on a CPU. On tensor-core GPUs fp16 runs as fast as bf16 with 3 more mantissa bits (measured
# on a ViT-S: 8.6x closer to fp32 than bf16), and it is what the teachers' model cards run. On a CPU
# fp16 is emulated: 5x slower than fp32 here, and its last bits depended on the process's history
# (two builds in one process differed in one target), so fp32 there. Targets are stored as fp16.
PRECISIONS = ("auto", "fp16", "bf16", "fp32")
DEFAULT_PRECISION = "auto"
_AUTOCAST_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
# Layers a published timm config cannot name in JSON (the model cards pass them to create_model).
_LAYERS = {"timm.layers.SwiGLUPacked": ("timm.layers", "SwiGLUPacked"), "torch.nn.SiLU": ("torch.nn", "SiLU")}
_SWIGLU = {"mlp_layer": "timm.layers.SwiGLUPacked", "act_layer": "torch.nn.SiLU"}


@dataclass(frozen=True)
class TeacherPreset:
    """How to build one named teacher: timm architecture + its published model arguments (JSON
    values; layer classes by dotted name), weights source, preprocessing and embedding."""

    name: str
    arch: str
    hf_hub_id: str | None
    kwargs: dict = field(default_factory=dict)
    input_size: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    embedding: str = "cls"


def _presets() -> dict[str, TeacherPreset]:
    # Each preset is the published config.json's architecture and model_args plus what its model card
    # passes to timm.create_model; tests/fixtures/teachers/ keeps those files, and a test compares.
    hopt = {"init_values": 1e-5, "dynamic_img_size": False, "global_pool": "token"}
    return {p.name: p for p in [
        TeacherPreset("h-optimus-0", "vit_giant_patch14_reg4_dinov2", "bioptimus/H-optimus-0",
                      hopt, mean=HOPTIMUS_MEAN, std=HOPTIMUS_STD),
        TeacherPreset("h-optimus-1", "vit_giant_patch14_reg4_dinov2", "bioptimus/H-optimus-1",
                      hopt, mean=HOPTIMUS_MEAN, std=HOPTIMUS_STD),
        TeacherPreset("h0-mini", "vit_base_patch14_reg4_dinov2", "bioptimus/H0-mini",
                      {"init_values": 1e-5, "dynamic_img_size": True, "global_pool": "", "mlp_ratio": 5.33334,
                       "reg_tokens": 4, **_SWIGLU},
                      mean=HOPTIMUS_MEAN, std=HOPTIMUS_STD, embedding="cls+mean_patch"),
        TeacherPreset("prov-gigapath", "vit_giant_patch14_dinov2", "prov-gigapath/prov-gigapath",
                      {"in_chans": 3, "patch_size": 16, "embed_dim": 1536, "depth": 40, "num_heads": 24,
                       "init_values": 1e-5, "mlp_ratio": 5.33334}),
        TeacherPreset("uni", "vit_large_patch16_224", "MahmoodLab/uni",
                      {"patch_size": 16, "init_values": 1e-5, "dynamic_img_size": True}),
        TeacherPreset("uni2-h", "vit_giant_patch14_224", "MahmoodLab/UNI2-h",
                      {"patch_size": 14, "depth": 24, "num_heads": 24, "init_values": 1e-5,
                       "embed_dim": 1536, "mlp_ratio": 5.33334, "no_embed_class": True,
                       "reg_tokens": 8, "dynamic_img_size": True, **_SWIGLU}),
        TeacherPreset("virchow2", "vit_huge_patch14_224", "paige-ai/Virchow2",
                      {"init_values": 1e-5, "reg_tokens": 4, "mlp_ratio": 5.3375, "global_pool": "",
                       "dynamic_img_size": True, **_SWIGLU}, embedding="cls+mean_patch"),
    ]}


PRESET_NAMES = ("h-optimus-0", "h-optimus-1", "h0-mini", "prov-gigapath", "uni", "uni2-h", "virchow2")


def get_preset(name: str) -> TeacherPreset:
    """A named preset, or a generic preset for any timm model name (its own mean/std, CLS)."""
    presets = _presets()
    if name in presets:
        return presets[name]
    import timm

    if timm.is_model(name):
        cfg = timm.get_pretrained_cfg(name)
        cfg = cfg.to_dict() if cfg is not None else {}
        size = cfg.get("input_size", (3, 224, 224))[-1]
        return TeacherPreset(name, name, None, {}, input_size=size,
                             mean=tuple(cfg.get("mean", IMAGENET_MEAN)),
                             std=tuple(cfg.get("std", IMAGENET_STD)))
    raise G2LError(f"unknown teacher {name!r}: use a preset ({', '.join(PRESET_NAMES)}) or any "
                   "timm model name.")


def model_kwargs(preset: TeacherPreset, img_size: int) -> dict:
    """timm.create_model keyword arguments of a preset at `img_size` (layer names resolved)."""
    import importlib

    kwargs = {}
    for key, value in preset.kwargs.items():
        if isinstance(value, str) and value in _LAYERS:
            module, name = _LAYERS[value]
            value = getattr(importlib.import_module(module), name)
        kwargs[key] = value
    kwargs["num_classes"] = 0
    if _accepts_img_size(preset.arch):
        kwargs["img_size"] = img_size
    return kwargs


@dataclass(frozen=True)
class TeacherSpec:
    """What the user asked for; recorded in the manifest so `cache verify` can rebuild the teacher."""

    name: str
    weights: str | None = None
    random_init: bool = False
    init_seed: int = 0
    precision: str = DEFAULT_PRECISION

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise G2LError(f"--precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}.")

    def to_dict(self) -> dict:
        return asdict(self)

    def on(self, device: torch.device | str) -> "TeacherSpec":
        """This spec with "auto" precision resolved for `device`: fp16 on a GPU, fp32 elsewhere."""
        if self.precision != "auto":
            return self
        return replace(self, precision="fp16" if torch.device(device).type == "cuda" else "fp32")

    @classmethod
    def from_record(cls, spec: dict) -> "TeacherSpec":
        """The spec a manifest recorded (a cache from before --precision computed bf16 on GPUs, fp32
        on CPUs; its fingerprint covers neither, so a rebuilt teacher never matches it by accident)."""
        return cls(**{k: v for k, v in spec.items() if k in cls.__dataclass_fields__})


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


def _accepts_img_size(arch: str) -> bool:
    return any(k in arch for k in ("vit", "deit", "eva", "beit", "swin"))
