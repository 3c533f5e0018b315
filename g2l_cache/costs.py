"""What a model costs per view: FLOPs counted on the meta device, and GPU-hours on a named GPU."""

from __future__ import annotations

import torch

from g2l_cache.errors import G2LError

# Dense bf16 tensor peaks (TFLOP/s, no sparsity) from the vendors' data sheets.
GPU_PEAK_TFLOPS = {"h100": 989.0, "h200": 989.0, "b200": 2250.0, "a100": 312.0, "l40s": 362.0,
                   "l4": 121.0, "rtx4090": 165.0}
# Share of that peak g2l reaches, measured on an H100 (benchmarks/results-h100): the teacher inside
# `cache build` (h-optimus-0, 224 px: 275 of 989 TFLOP/s) and a ViT-L student step inside `student
# fit` (328 views/s x 494 GFLOP).
TEACHER_EFFICIENCY = 0.278
STUDENT_EFFICIENCY = 0.164


def model_flops(name: str, size: int, train: bool) -> float:
    """FLOPs per image of a teacher preset or timm model: forward, or forward + backward if `train`.

    Counted on the meta device: shapes only, no weights, no time."""
    import timm
    from torch.utils.flop_counter import FlopCounterMode

    from g2l_cache.teachers import get_preset

    preset = get_preset(name)
    with torch.device("meta"):
        model = timm.create_model(preset.arch, num_classes=0, img_size=size, **preset.kwargs)
        x = torch.empty(1, 3, size, size)
        with FlopCounterMode(display=False) as counter:
            out = model.forward_features(x)
            if train:
                out.float().mean().backward()
    return float(counter.get_total_flops())


def teacher_dims(name: str, size: int) -> tuple[int, int]:
    """(embedding, mean patch) sizes a teacher's targets have, from its shapes on the meta device."""
    import timm

    from g2l_cache.teachers import get_preset, split_embedding

    preset = get_preset(name)
    with torch.device("meta"):
        model = timm.create_model(preset.arch, num_classes=0, img_size=size, **preset.kwargs)
        emb, patch = split_embedding(model, model.forward_features(torch.empty(1, 3, size, size)),
                                     preset.embedding)
    return emb.shape[1], patch.shape[1]


def gpu_views_per_second(flops_per_view: float, gpu: str, efficiency: float) -> float:
    """Views per second on a GPU of the table, at the measured share of its peak."""
    key = gpu_key(gpu)
    if key not in GPU_PEAK_TFLOPS:
        raise G2LError(f"unknown GPU {gpu!r}: use one of {', '.join(GPU_PEAK_TFLOPS)}, or give "
                       "--views-per-second measured on yours.")
    return GPU_PEAK_TFLOPS[key] * 1e12 * efficiency / flops_per_view


def gpu_key(gpu: str) -> str:
    """A GPU name as the peak table spells it ("H100", "rtx-4090" -> "h100", "rtx4090")."""
    return gpu.lower().replace("-", "").replace(" ", "")
