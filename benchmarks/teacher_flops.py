"""Teacher achieved TFLOP/s (model FLOPs x views/s) against the card's dense bf16 peak,
from the views/s that cache_build.py measured (results/cache_build.json)."""

import argparse
import json
from pathlib import Path

import torch

from _common import save


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--teacher", default="h-optimus-0")
    p.add_argument("--results", default=str(Path(__file__).parent / "results"))
    p.add_argument("--peak-tflops", type=float, default=989.0, help="H100 SXM dense bf16")
    args = p.parse_args()
    from torch.utils.flop_counter import FlopCounterMode

    build = json.loads((Path(args.results) / "cache_build.json").read_text())
    # FLOPs need shapes only: build the architecture on the meta device (no memory, no init).
    with torch.device("meta"):
        import timm

        from g2l_cache.teachers import get_preset

        preset = get_preset(args.teacher)
        model = timm.create_model(preset.arch, num_classes=0, img_size=build["input_px"], **preset.kwargs)
        x = torch.empty(1, 3, build["input_px"], build["input_px"])
        with FlopCounterMode(display=False) as counter:
            model.forward_features(x)
    flops = counter.get_total_flops()
    out = {"device": build["device"], "teacher": args.teacher, "gflops_per_view": flops / 1e9,
           "params_b": sum(p.numel() for p in model.parameters()) / 1e9}
    for key in ("bare_teacher_views_per_s", "build_steady_views_per_s"):
        tflops = flops * build[key] / 1e12
        out[key.replace("views_per_s", "tflops")] = tflops
        out[key.replace("views_per_s", "share_of_peak")] = tflops / args.peak_tflops
    out["ratio"] = out["build_steady_share_of_peak"]
    out["peak_tflops"] = args.peak_tflops
    save("teacher_flops", out, args.results)


if __name__ == "__main__":
    main()
