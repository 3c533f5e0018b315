"""Teacher presets as data: each is the published model's timm architecture and arguments, its
preprocessing and embedding, and what a user asked for (TeacherSpec). No torch: `g2l cache plan` and
the options read these without loading a model.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

from g2l_cache.errors import G2LError

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

    def on(self, device) -> "TeacherSpec":
        """This spec with "auto" precision resolved for `device`: fp16 on a GPU, fp32 elsewhere."""
        if self.precision != "auto":
            return self
        kind = getattr(device, "type", None) or str(device).split(":")[0]
        return replace(self, precision="fp16" if kind == "cuda" else "fp32")

    @classmethod
    def from_record(cls, spec: dict) -> "TeacherSpec":
        """The spec a manifest recorded (a cache from before --precision computed bf16 on GPUs, fp32
        on CPUs; its fingerprint covers neither, so a rebuilt teacher never matches it by accident)."""
        return cls(**{k: v for k, v in spec.items() if k in cls.__dataclass_fields__})


def _accepts_img_size(arch: str) -> bool:
    return any(k in arch for k in ("vit", "deit", "eva", "beit", "swin"))
