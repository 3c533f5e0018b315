"""What a model costs per view: FLOPs counted on the meta device, and GPU-hours on a named GPU."""

from __future__ import annotations

from g2l_cache.errors import G2LError

# Dense bf16 tensor peaks (TFLOP/s, no sparsity) from the vendors' data sheets.
GPU_PEAK_TFLOPS = {"h100": 989.0, "h200": 989.0, "b200": 2250.0, "a100": 312.0, "l40s": 362.0,
                   "l4": 121.0, "rtx4090": 165.0}
# The one measured figure for the teacher: `cache build` ran H-optimus-0 (608.3 GFLOP per 224 px view)
# at 493.6 views/s steady on one H100 (benchmarks/results-h100/after/cache_build.json), 300 TFLOP/s.
# Plans, the README and worker sizing all derive from it. A ViT-L/14 student step inside `student fit`
# ran 328 views/s x 493.6 GFLOP (benchmarks/results-h100/after/student_fit.json).
H100_BUILD_VIEWS_PER_SECOND = 493.6
HOPTIMUS0_GFLOP_PER_VIEW = 608.349
H100_FIT_VIEWS_PER_SECOND = 328.3
VITL_TRAIN_GFLOP_PER_VIEW = 493.622
TEACHER_EFFICIENCY = round(H100_BUILD_VIEWS_PER_SECOND * HOPTIMUS0_GFLOP_PER_VIEW / GPU_PEAK_TFLOPS["h100"] / 1e3, 4)
STUDENT_EFFICIENCY = round(H100_FIT_VIEWS_PER_SECOND * VITL_TRAIN_GFLOP_PER_VIEW / GPU_PEAK_TFLOPS["h100"] / 1e3, 4)


def _meta_profile(name: str, size: int, train: bool) -> tuple[float, int, int]:
    """(FLOPs per image, embedding size, mean patch size) of a preset or timm model, from one pass
    on the meta device: shapes only, no weights, no time."""
    import timm
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from g2l_cache.presets import get_preset, model_kwargs
    from g2l_cache.teachers import split_embedding

    preset = get_preset(name)
    with torch.device("meta"):
        model = timm.create_model(preset.arch, **model_kwargs(preset, size))
        with FlopCounterMode(display=False) as counter:
            feats = model.forward_features(torch.empty(1, 3, size, size))
            if train:
                feats.float().mean().backward()
        emb, patch = split_embedding(model, feats.detach(), preset.embedding)
    return float(counter.get_total_flops()), emb.shape[1], patch.shape[1]


# (FLOPs per image, embedding size, mean patch size) of the presets and the paper's student at 224 px,
# as `_meta_profile` counts them (a test recounts every entry): a plan of these needs no torch at all.
KNOWN_PROFILES = {
    ("h-optimus-0", 224, False): (608349044736.0, 1536, 1536),
    ("h-optimus-1", 224, False): (608349044736.0, 1536, 1536),
    ("h0-mini", 224, False): (47078313984.0, 1536, 768),
    ("prov-gigapath", 224, False): (456190181376.0, 1536, 1536),
    ("uni", 224, False): (123107377152.0, 1024, 1024),
    ("uni2-h", 224, False): (370940461056.0, 1536, 1536),
    ("virchow2", 224, False): (340131348480.0, 2560, 1280),
    ("vit_large_patch14_reg4_dinov2", 224, True): (493622427648.0, 1024, 1024),
}


def profile(name: str, size: int, train: bool) -> tuple[float, int, int]:
    """`_meta_profile`, or its known value for a preset at 224 px."""
    return KNOWN_PROFILES.get((name, size, train)) or _meta_profile(name, size, train)


def model_flops(name: str, size: int, train: bool) -> float:
    """FLOPs per image of a teacher preset or timm model: forward, or forward + backward if `train`."""
    return profile(name, size, train)[0]


def teacher_flops_and_dims(name: str, size: int) -> tuple[float, int, int]:
    """A teacher's forward FLOPs per view and the (embedding, mean patch) sizes of its targets."""
    return profile(name, size, train=False)


def gpu_peak_tflops(gpu: str) -> float:
    """The dense bf16 peak of a GPU of the table ("H100", "rtx-4090" are read as "h100", "rtx4090")."""
    key = gpu.lower().replace("-", "").replace(" ", "")
    if key not in GPU_PEAK_TFLOPS:
        raise G2LError(f"unknown GPU {gpu!r}: use one of {', '.join(GPU_PEAK_TFLOPS)}, or give "
                       "--views-per-second measured on yours.")
    return GPU_PEAK_TFLOPS[key]


def gpu_views_per_second(flops_per_view: float, gpu: str, efficiency: float) -> float:
    """Views per second on a GPU of the table, at the measured share of its peak."""
    return gpu_peak_tflops(gpu) * 1e12 * efficiency / flops_per_view


def model_costs(teacher: str, teacher_size: int, student: str, student_size: int) -> tuple[float, int, int, float]:
    """(teacher FLOPs per view, its embedding and mean patch sizes, student training FLOPs per view)."""
    flops, embed_dim, patch_dim = teacher_flops_and_dims(teacher, teacher_size)
    return flops, embed_dim, patch_dim, model_flops(student, student_size, train=True)


def costs_known(teacher: str, teacher_size: int, student: str, student_size: int) -> bool:
    """Whether `model_costs` of these needs no model built (both are in KNOWN_PROFILES)."""
    return (teacher, teacher_size, False) in KNOWN_PROFILES and (student, student_size, True) in KNOWN_PROFILES
