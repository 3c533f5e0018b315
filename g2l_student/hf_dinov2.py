"""Hugging Face transformers DINOv2 checkpoints (Dinov2 / Dinov2WithRegisters, e.g. Hibou-L) as timm ViTs.

G2L's student, Hibou-L (`histai/hibou-L`), is published in transformers format. This maps such a
checkpoint's tensors onto timm's `vit_*_patch14[_reg4]_dinov2` layout without importing
transformers: config.json gives the shape, the safetensors file the weights, and
preprocessor_config.json the mean/std the model was trained with.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from g2l_cache.errors import G2LError
from g2l_cache.hub import hub_failure_message

HF_MODEL_TYPES = ("dinov2", "dinov2_with_registers")
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


@dataclass
class HFStudent:
    """A converted checkpoint: timm state dict, the timm kwargs that fit it, and its preprocessing."""

    state_dict: dict[str, torch.Tensor]
    timm_kwargs: dict
    mean: tuple[float, float, float] | None
    std: tuple[float, float, float] | None
    source: str


def hf_checkpoint_folder(weights: str) -> Path | None:
    """The folder of a transformers DINOv2 checkpoint named by `weights` (folder, file in one, or
    hub id such as histai/hibou-L), or None when it is not one."""
    path = Path(weights)
    folder = path if path.is_dir() else path.parent if path.is_file() else None
    if folder is None:
        if weights.count("/") != 1 or weights.startswith((".", "/")):
            return None
        folder = _download(weights)
    config = folder / "config.json"
    if not config.is_file():
        return None
    try:
        model_type = json.loads(config.read_text()).get("model_type")
    except (OSError, json.JSONDecodeError):
        return None
    return folder if model_type in HF_MODEL_TYPES else None


def _download(repo_id: str) -> Path:
    """Fetch config, preprocessing and safetensors weights of a hub repo (cached by huggingface_hub)."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors"]))
    except Exception as exc:  # network, gated repo, unknown id
        raise G2LError(hub_failure_message(exc, "student weights", repo_id,
                                           "pass a local folder with config.json and model.safetensors "
                                           "(--student-weights FOLDER)")) from None


def load_hf_student(folder: Path, img_size: int, weights_file: str | None = None) -> HFStudent:
    """Convert the DINOv2 checkpoint in `folder` for a timm ViT at `img_size`."""
    cfg = json.loads((folder / "config.json").read_text())
    files = [Path(weights_file)] if weights_file and Path(weights_file).is_file() else \
        [folder / f for f in _WEIGHT_FILES if (folder / f).is_file()]
    if not files:
        raise G2LError(f"{folder} has a DINOv2 config.json but no model.safetensors.")
    sd = _read_tensors(files[0])
    sd = {k[len("dinov2."):] if k.startswith("dinov2.") else k: v for k, v in sd.items()}
    patch = int(cfg.get("patch_size", 14))
    if img_size % patch:
        raise G2LError(f"--img-size {img_size} must be a multiple of the student's patch size {patch}.")
    converted = convert_state_dict(sd, cfg, img_size // patch)
    mean, std = _preprocessing(folder)
    return HFStudent(converted, timm_kwargs(cfg, img_size), mean, std, str(folder))


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors under their own names (transformers' `encoder.` prefix is kept)."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise G2LError(f"cannot read student weights {path} ({type(exc).__name__}: {exc}).") from None


def timm_kwargs(cfg: dict, img_size: int) -> dict:
    """timm VisionTransformer arguments that give the layout of a transformers DINOv2 config."""
    if cfg.get("use_swiglu_ffn"):
        raise G2LError("DINOv2 checkpoints with SwiGLU feed-forward layers are not supported as "
                       "students yet; use a checkpoint with an MLP feed-forward (e.g. Hibou-L).")
    if cfg.get("hidden_act", "gelu") != "gelu":
        raise G2LError(f"DINOv2 activation {cfg.get('hidden_act')!r} is not supported (gelu only).")
    return {"img_size": img_size, "patch_size": int(cfg.get("patch_size", 14)),
            "embed_dim": int(cfg["hidden_size"]), "depth": int(cfg["num_hidden_layers"]),
            "num_heads": int(cfg["num_attention_heads"]), "mlp_ratio": float(cfg.get("mlp_ratio", 4)),
            "init_values": float(cfg.get("layerscale_value", 1.0)),
            "reg_tokens": int(cfg.get("num_register_tokens", 0)), "no_embed_class": True,
            "qkv_bias": bool(cfg.get("qkv_bias", True))}


def convert_state_dict(sd: dict[str, torch.Tensor], cfg: dict, grid: int) -> dict[str, torch.Tensor]:
    """transformers DINOv2 tensors -> timm ViT tensors, position embeddings resampled to grid x grid.

    transformers adds position 0 to the CLS token and none to registers; timm (no_embed_class) adds
    positions to patches only, so CLS's position is folded into the timm cls_token."""
    def take(key: str) -> torch.Tensor:
        if key not in sd:
            raise G2LError(f"the DINOv2 checkpoint has no tensor {key!r}; is it a Dinov2Model?")
        return sd[key]

    pos = take("embeddings.position_embeddings").float()
    out = {"cls_token": take("embeddings.cls_token") + pos[:, :1].to(sd["embeddings.cls_token"].dtype),
           "pos_embed": _resample(pos[:, 1:], grid).to(pos.dtype),
           "patch_embed.proj.weight": take("embeddings.patch_embeddings.projection.weight"),
           "patch_embed.proj.bias": take("embeddings.patch_embeddings.projection.bias"),
           "norm.weight": take("layernorm.weight"), "norm.bias": take("layernorm.bias")}
    if int(cfg.get("num_register_tokens", 0)):
        out["reg_token"] = take("embeddings.register_tokens")
    for i in range(int(cfg["num_hidden_layers"])):
        h, t = f"encoder.layer.{i}.", f"blocks.{i}."
        att = h + "attention.attention."
        out[t + "attn.qkv.weight"] = torch.cat([take(att + f"{n}.weight") for n in ("query", "key", "value")])
        if att + "query.bias" in sd:
            out[t + "attn.qkv.bias"] = torch.cat([take(att + f"{n}.bias") for n in ("query", "key", "value")])
        pairs = {"norm1": "norm1", "attention.output.dense": "attn.proj", "norm2": "norm2",
                 "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
        for src, dst in pairs.items():
            out[t + dst + ".weight"] = take(h + src + ".weight")
            out[t + dst + ".bias"] = take(h + src + ".bias")
        out[t + "ls1.gamma"] = take(h + "layer_scale1.lambda1")
        out[t + "ls2.gamma"] = take(h + "layer_scale2.lambda1")
    return out


def _resample(patch_pos: torch.Tensor, grid: int) -> torch.Tensor:
    """Patch position embeddings (1, n*n, D) to (1, grid*grid, D) as transformers interpolates them."""
    n = int(round(patch_pos.shape[1] ** 0.5))
    if n == grid:
        return patch_pos
    x = patch_pos.reshape(1, n, n, -1).permute(0, 3, 1, 2)
    x = torch.nn.functional.interpolate(x, size=(grid, grid), mode="bicubic", align_corners=False,
                                        antialias=True)
    return x.permute(0, 2, 3, 1).reshape(1, grid * grid, -1)


def _preprocessing(folder: Path) -> tuple[tuple | None, tuple | None]:
    path = folder / "preprocessor_config.json"
    if not path.is_file():
        return None, None
    data = json.loads(path.read_text())
    mean, std = data.get("image_mean"), data.get("image_std")
    if mean is None or std is None or len(mean) != 3 or len(std) != 3:
        return None, None
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)
