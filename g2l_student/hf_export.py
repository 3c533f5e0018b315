"""export/hf/: a DINOv2-architecture student as a transformers checkpoint (the inverse of hf_dinov2).

A student built as a timm `vit_*_dinov2` ViT (or started from a transformers DINOv2 checkpoint such
as Hibou-L) is written back in transformers' Dinov2 / Dinov2WithRegisters layout, so
`transformers.AutoModel.from_pretrained("export/hf")` gives the same CLS embedding as the timm export.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from g2l_student.hf_dinov2 import HF_MODEL_TYPES


def hf_export_blocker(backbone: nn.Module) -> str | None:
    """Why this timm backbone has no transformers DINOv2 equivalent, or None when it has one."""
    blocks = getattr(backbone, "blocks", None)
    if getattr(backbone, "cls_token", None) is None or blocks is None or not len(blocks):
        return "it is not a ViT with a CLS token"
    block = blocks[0]
    if not hasattr(getattr(block, "ls1", None), "gamma"):
        return "its blocks have no layer scale (DINOv2 blocks do)"
    mlp = getattr(block, "mlp", None)
    if not (hasattr(mlp, "fc1") and hasattr(mlp, "fc2")) or not isinstance(getattr(mlp, "act", None), nn.GELU):
        return "its feed-forward is not a GELU MLP (SwiGLU students are not supported by this export)"
    if mlp.fc1.out_features % backbone.embed_dim:
        return "its MLP width is not a whole multiple of its embedding width (transformers' mlp_ratio)"
    if getattr(block.attn, "q_norm", nn.Identity()).__class__ is not nn.Identity:
        return "its attention normalises queries and keys"
    if not isinstance(backbone.norm, nn.LayerNorm) or not isinstance(getattr(backbone, "norm_pre", nn.Identity()),
                                                                     nn.Identity):
        return "its normalisation layers differ from DINOv2's"
    if getattr(backbone, "reg_token", None) is not None and not backbone.no_embed_class:
        return "its registers carry position embeddings (transformers' registers do not)"
    if backbone.patch_embed.proj.bias is None:
        return "its patch embedding has no bias"
    return None


def hf_config(backbone: nn.Module, img_size: int) -> dict:
    """The transformers config.json of this backbone at `img_size`."""
    block = backbone.blocks[0]
    dim = backbone.embed_dim
    registers = int(getattr(backbone, "num_reg_tokens", 0) or 0)
    model_type = HF_MODEL_TYPES[1] if registers else HF_MODEL_TYPES[0]
    config = {
        "model_type": model_type,
        "architectures": ["Dinov2WithRegistersModel" if registers else "Dinov2Model"],
        "hidden_size": dim, "num_hidden_layers": len(backbone.blocks),
        "num_attention_heads": block.attn.num_heads, "mlp_ratio": block.mlp.fc1.out_features // dim,
        "hidden_act": "gelu", "layer_norm_eps": backbone.norm.eps, "image_size": img_size,
        "patch_size": backbone.patch_embed.patch_size[0], "num_channels": 3,
        "qkv_bias": block.attn.qkv.bias is not None,
        "layerscale_value": 1.0, "use_swiglu_ffn": False, "drop_path_rate": 0.0,
        "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0, "torch_dtype": "float32",
    }
    if registers:
        config["num_register_tokens"] = registers
    return config


def hf_state_dict(backbone: nn.Module) -> dict[str, torch.Tensor]:
    """timm ViT tensors -> transformers DINOv2 tensors (base-model keys, as Dinov2Model saves them).

    timm with no_embed_class adds positions to patches only; transformers adds its position 0 to
    CLS, so that position is zero here (the CLS token already holds what timm adds)."""
    sd = {k: v.detach().float().cpu() for k, v in backbone.state_dict().items()}
    pos, cls = sd["pos_embed"], sd["cls_token"]
    if backbone.no_embed_class:
        pos = torch.cat([torch.zeros_like(cls), pos], dim=1)
    dim = cls.shape[-1]
    out = {"embeddings.cls_token": cls, "embeddings.mask_token": torch.zeros(1, dim),
           "embeddings.position_embeddings": pos,
           "embeddings.patch_embeddings.projection.weight": sd["patch_embed.proj.weight"],
           "embeddings.patch_embeddings.projection.bias": sd["patch_embed.proj.bias"],
           "layernorm.weight": sd["norm.weight"], "layernorm.bias": sd["norm.bias"]}
    if "reg_token" in sd:
        out["embeddings.register_tokens"] = sd["reg_token"]
    for i in range(len(backbone.blocks)):
        t, h = f"blocks.{i}.", f"encoder.layer.{i}."
        att = h + "attention.attention."
        for name, part in zip(("query", "key", "value"), sd[t + "attn.qkv.weight"].chunk(3)):
            out[att + name + ".weight"] = part
        if t + "attn.qkv.bias" in sd:
            for name, part in zip(("query", "key", "value"), sd[t + "attn.qkv.bias"].chunk(3)):
                out[att + name + ".bias"] = part
        pairs = {"norm1": "norm1", "attn.proj": "attention.output.dense", "norm2": "norm2",
                 "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
        for src, dst in pairs.items():
            out[h + dst + ".weight"] = sd[t + src + ".weight"]
            out[h + dst + ".bias"] = sd[t + src + ".bias"]
        out[h + "layer_scale1.lambda1"] = sd[t + "ls1.gamma"]
        out[h + "layer_scale2.lambda1"] = sd[t + "ls2.gamma"]
    return {k: v.contiguous() for k, v in out.items()}


def preprocessor_config(img_size: int, mean, std) -> dict:
    """BitImageProcessor settings (DINOv2's) that resize and crop to `img_size` with the run's mean/std."""
    return {"image_processor_type": "BitImageProcessor", "do_convert_rgb": True,
            "do_resize": True, "size": {"shortest_edge": img_size}, "resample": 3,
            "do_center_crop": True, "crop_size": {"height": img_size, "width": img_size},
            "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
            "image_mean": [float(v) for v in mean], "image_std": [float(v) for v in std]}


def write_hf_export(backbone: nn.Module, folder: Path, img_size: int, mean, std) -> Path:
    """Write config.json, model.safetensors and preprocessor_config.json to `folder`."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file(hf_state_dict(backbone), str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(hf_config(backbone, img_size), indent=2))
    (folder / "preprocessor_config.json").write_text(
        json.dumps(preprocessor_config(img_size, mean, std), indent=2))
    return folder
