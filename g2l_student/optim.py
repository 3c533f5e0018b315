"""The student's optimiser: AdamW with weight decay on weight matrices only, fused where torch has it."""

from __future__ import annotations

import torch

# torch's fused AdamW runs one kernel over all parameters: on a ViT-Ti/ViT-S on CPU it is 4-5x
# faster than the default per-tensor loop (benchmarks/RESULTS.md), and fastest on CUDA too.
_FUSED_DEVICES = ("cpu", "cuda")


# Embeddings that are parameters but not weights of a layer: decaying them pulls tokens and
# positions towards zero. timm's no_weight_decay() names some of these (not reg_token).
_EMBEDDING_NAMES = ("cls_token", "reg_token", "dist_token", "mask_token", "pos_embed")


def no_decay_names(model: torch.nn.Module) -> set[str]:
    """Parameter names exempt from weight decay: 1-d (norms, biases, layer scales), tokens and
    position embeddings, and whatever a submodule's `no_weight_decay()` lists."""
    names = {n for n, p in model.named_parameters() if p.ndim <= 1 or n.rsplit(".", 1)[-1] in _EMBEDDING_NAMES}
    for prefix, module in model.named_modules():
        listed = getattr(module, "no_weight_decay", None)
        if callable(listed):
            names |= {f"{prefix}.{n}" if prefix else n for n in listed()}
    return names


def build_optimizer(model: torch.nn.Module, lr: float, weight_decay: float,
                    device: torch.device | str | None = None) -> torch.optim.AdamW:
    """AdamW with decay on weight matrices only (see `no_decay_names`); fused on CPU and CUDA.

    `device` is where the parameters will live when it steps (default: where they are now).
    """
    exempt = no_decay_names(model)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [p for n, p in named if n not in exempt]
    no_decay = [p for n, p in named if n in exempt]
    kind = torch.device(device).type if device is not None else next(model.parameters()).device.type
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}],
                             lr=lr, fused=True if kind in _FUSED_DEVICES else None)
