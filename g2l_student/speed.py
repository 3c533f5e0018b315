"""The model card's speed line: images per second at batch 64, parameters and GFLOPs per image of the
student and its teachers, on the device the export ran on.

A teacher whose batch would take longer than a minute here (a 1.1 B ViT-g on a CPU) is not run: its
rate is the student's measured FLOP rate divided by the teacher's FLOPs, and the card says so.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch
from torch import nn

from g2l_cache.cpus import usable_cores

BATCH = 64
BUDGET_SECONDS = 60.0  # longest timed batch the export waits for


@dataclass
class Speed:
    """One model's row: what it is, its size, and how fast it embedded on `device`."""

    model: str
    role: str
    img_size: int
    params_m: float
    gflops: float
    images_per_second: float
    batch: int
    measured: bool
    device: str
    precision: str


def count_flops(model: nn.Module, img_size: int, device: torch.device) -> float:
    """Forward FLOPs of one image through `model.forward_features`."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        model.forward_features(torch.zeros(1, 3, img_size, img_size, device=device))
    return float(counter.get_total_flops())


def _autocast(device: torch.device):
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast(
        "cpu", enabled=False)


def images_per_second(model: nn.Module, img_size: int, device: torch.device, batch: int = BATCH,
                      budget_s: float = BUDGET_SECONDS) -> tuple[float, int]:
    """(images per second, batch timed): one warm-up batch of 4, then batches of `batch` for about a
    second; a smaller batch (4) when a batch of `batch` would outlast `budget_s`."""
    def run(n: int) -> float:
        x = torch.rand(n, 3, img_size, img_size, device=device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        with torch.inference_mode(), _autocast(device):
            model.forward_features(x)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    warm = run(min(4, batch))
    if warm * batch / 4 > budget_s:
        batch = min(4, batch)
    run(batch)  # the first full batch pays for kernel selection and allocation
    times = [run(batch)]
    while sum(times) < 1.0 and len(times) < 10:
        times.append(run(batch))
    return batch * len(times) / sum(times), batch


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's model and its cores."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "CPU")
    except OSError:
        model = "CPU"
    return f"{model} ({usable_cores()} cores)"


def measure_model(model: nn.Module, name: str, role: str, img_size: int, device: torch.device) -> Speed:
    """Time and size `model` (moved to `device`, in eval mode) at `img_size`."""
    model = model.eval().to(device)
    rate, batch = images_per_second(model, img_size, device)
    return Speed(name, role, img_size, sum(p.numel() for p in model.parameters()) / 1e6,
                 count_flops(model, img_size, device) / 1e9, rate, batch, True, device_name(device),
                 "bf16" if device.type == "cuda" else "fp32")


def teacher_speed(name: str, img_size: int, device: torch.device, student: Speed) -> Speed:
    """A teacher's row: built with random weights and timed when a batch fits the budget, else its
    rate estimated from the student's measured FLOP rate."""
    import timm

    from g2l_cache.costs import teacher_flops_and_dims
    from g2l_cache.presets import get_preset, model_kwargs
    from g2l_cache.weights import create_timm_model

    preset = get_preset(name)
    kwargs = model_kwargs(preset, img_size)
    flops = teacher_flops_and_dims(name, img_size)[0]
    flop_rate = student.images_per_second * student.gflops * 1e9
    if BATCH * flops / flop_rate <= BUDGET_SECONDS:
        with torch.random.fork_rng(devices=[]):
            model = create_timm_model(preset.arch, what=f"teacher {name}", **kwargs)
        return measure_model(model, name, "teacher", img_size, device)
    with torch.device("meta"):
        params = sum(p.numel() for p in timm.create_model(preset.arch, **kwargs).parameters())
    return Speed(name, "teacher", img_size, params / 1e6, flops / 1e9, flop_rate / flops, BATCH, False,
                 student.device, student.precision)


def speed_rows(backbone: nn.Module, student_name: str, img_size: int, teachers: list[tuple[str, int]],
               device: torch.device) -> list[dict]:
    """Rows for the student and each (teacher name, input size), student first."""
    student = measure_model(backbone, student_name, "student", img_size, device)
    rows = [student] + [teacher_speed(name, size, device, student) for name, size in teachers]
    return [asdict(r) for r in rows]
