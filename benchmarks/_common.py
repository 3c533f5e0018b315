"""Shared helpers for the benchmark scripts: arguments, demo data, bare-model timings, results."""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
REPO = ROOT.parent
WORK = ROOT / "work"
RESULTS = ROOT / "results"
sys.path.insert(0, str(REPO))


def parser(description: str) -> argparse.ArgumentParser:
    """Options every benchmark takes, so the same script runs at real scale on a GPU."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--teacher", default="vit_small_patch16_224", help="teacher preset or timm name (random weights)")
    p.add_argument("--student", default="vit_tiny_patch16_224", help="student timm name (random weights)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--tile-size", type=int, default=128, help="tile px (real runs: 256)")
    p.add_argument("--crop-size", type=int, default=112, help="view px = model input (real runs: 224)")
    p.add_argument("--slides", type=int, default=4, help="demo slides to build")
    p.add_argument("--tiles-per-slide", type=int, default=64)
    p.add_argument("--views", type=int, default=4)
    p.add_argument("--workers", type=int, default=1, help="DataLoader workers")
    p.add_argument("--cache", default=None, help="reuse this cache (its tiles) instead of building from slides")
    p.add_argument("--out", default=str(RESULTS), help="folder for NAME.json")
    return p


def device_name(device: str) -> str:
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"CPU {platform.processor() or platform.machine()} x{torch.get_num_threads()} threads"


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def demo_slides(n: int) -> Path:
    """n demo slides under benchmarks/work (made once)."""
    from g2l_cache.demo_slides import write_demo_slides

    folder = WORK / f"slides-{n}"
    if not (folder / ".done").exists():
        write_demo_slides(folder, n_slides=n, n_centres=min(n, 4), seed=0)
        (folder / ".done").write_text("ok")
    return folder


def build_config(args, out: Path, teacher: str | None = None, **overrides):
    """Build from demo slides, or (with --cache) add the teacher to that cache's stored tiles."""
    from g2l_cache.build import BuildConfig, existing_cache_options

    common = dict(out=str(out), teacher=teacher or args.teacher, random_init=True,
                  batch_size=args.batch_size, num_workers=args.workers, progress=False,
                  cpu=not args.device.startswith("cuda"), **overrides)
    if args.cache:
        return BuildConfig(**existing_cache_options(out), **common)
    return BuildConfig(slides=[str(demo_slides(args.slides))], tile_size=args.tile_size,
                       crop_size=args.crop_size, views=args.views,
                       max_tiles_per_slide=args.tiles_per_slide, **common)


def fresh(path: Path) -> Path:
    if path.exists():
        shutil.rmtree(path)
    return path


def bench_cache(args) -> Path:
    """A cache with the benchmark teacher's targets: --cache if given, else built once in work/."""
    from g2l_cache.build import run_build
    from g2l_cache.layout import read_manifest

    if args.cache:
        if not _has_teacher(args):
            run_build(build_config(args, Path(args.cache)))
        return Path(args.cache)
    out = WORK / f"cache-{args.teacher}-{args.slides}x{args.tiles_per_slide}-{args.tile_size}-{args.crop_size}-{args.views}"
    if not (out / "manifest.json").exists() or read_manifest(out).get("status") != "complete":
        run_build(build_config(args, out))
    return out


def _has_teacher(args) -> bool:
    from g2l_cache.layout import read_manifest

    m = read_manifest(args.cache)
    return any(t["spec"]["name"] == args.teacher and t.get("complete") for t in m["teachers"].values())


def timed(fn, iters: int, device: str, warmup: int = 3, repeats: int = 3) -> float:
    """Seconds per call of fn after warm-up: the best of `repeats` runs of `iters` calls.

    The best run is the machine's limit without interference (timeit's rule), so ratios against
    it are conservative.
    """
    for _ in range(warmup):
        fn()
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        for _ in range(iters):
            fn()
        sync(device)
        best = min(best, (time.perf_counter() - t) / iters)
    return best


def bare_teacher_rate(teacher, batch: int, size: int, device: str, iters: int) -> float:
    """Views/s of the teacher alone on random tensors already on the device (same dtype path)."""
    x = torch.rand(batch, 3, size, size, device=device)
    return batch / timed(lambda: teacher.embed(x), iters, device)


def bare_train_step_rate(student, batch: int, size: int, device: str, iters: int) -> float:
    """Steps/s of forward + backward + clip + AdamW on random tensors in memory (bf16 autocast on GPU)."""
    from g2l_student.losses import get_loss
    from g2l_student.optim import build_optimizer
    from g2l_student.task import build_task

    student = student.to(device).train()
    task = build_task(student, "both", get_loss("logsum"))  # the fit's loss, over the student's heads
    opt = build_optimizer(student, lr=1e-4, weight_decay=0.05)  # the fit's optimiser
    x = torch.rand(batch, 3, size, size, device=device)
    dims = {k: h[0].out_features for k, h in student.heads.items()}
    t_cls, t_patch = (torch.randn(batch, dims.get(k, 1), device=device) for k in ("cls", "mean-patch"))

    def step():
        with torch.autocast(device_type="cuda" if device.startswith("cuda") else "cpu",
                            dtype=torch.bfloat16, enabled=device.startswith("cuda")):
            loss = task.loss(x, t_cls, t_patch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return 1.0 / timed(step, iters, device)


def step_timing(run: Path) -> dict:
    """Seconds per optimiser step from a run's metrics.csv, and the loader's share of it.

    `steady` leaves out the warm-up steps by the build's rule (`warmup_count`: worker start-up,
    device warm-up; the bare timings leave out warm-up calls too), `all_steps` only the first step; `step_ms` is
    the timeline (milliseconds between consecutive steps) for finding where a run lost time.
    """
    from g2l_cache.timing import warmup_count
    from g2l_student.rundir import RunDir

    rows = RunDir(run).read_metrics()
    t = [float(r["seconds"]) for r in rows]
    skip = warmup_count(len(t))
    wait = [float(r["data_seconds"]) for r in rows[skip + 1:]]
    steady = (t[-1] - t[skip]) / (len(t) - 1 - skip)
    return {"steady": steady, "all_steps": (t[-1] - t[0]) / (len(t) - 1),
            "data_wait_share": sum(wait) / len(wait) / steady,
            "step_ms": [round(1e3 * (b - a), 1) for a, b in zip(t, t[1:])]}


def steady_step_seconds(run: Path) -> float:
    """Seconds per optimiser step once warmed up (see step_timing)."""
    return step_timing(run)["steady"]


def save(name: str, data: dict, out: str | Path = RESULTS) -> Path:
    """Write NAME.json and print its figures as a table."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    path.write_text(json.dumps({"name": name, **data}, indent=2, default=float))
    width = max(len(k) for k in data)
    print(f"\n== {name} ==")
    for k, v in data.items():
        shown = f"{v:.4g}" if isinstance(v, float) else f"{len(v)} values (in the JSON)" if isinstance(v, list) else v
        print(f"  {k:<{width}}  {shown}")
    print(f"  -> {path}")
    return path
