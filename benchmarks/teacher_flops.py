"""Teacher achieved TFLOP/s (model FLOPs x views/s) against the card's dense bf16 peak,
from the views/s that cache_build.py measured (results/cache_build.json)."""

import argparse
import json
from pathlib import Path

from _common import save
from g2l_cache.costs import model_flops


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--teacher", default="h-optimus-0")
    p.add_argument("--results", default=str(Path(__file__).parent / "results"))
    p.add_argument("--peak-tflops", type=float, default=989.0, help="H100 SXM dense bf16")
    args = p.parse_args()
    build = json.loads((Path(args.results) / "cache_build.json").read_text())
    flops = model_flops(args.teacher, build["input_px"], train=False)
    out = {"device": build["device"], "teacher": args.teacher, "gflops_per_view": flops / 1e9}
    for key in ("bare_teacher_views_per_s", "build_steady_views_per_s"):
        tflops = flops * build[key] / 1e12
        out[key.replace("views_per_s", "tflops")] = tflops
        out[key.replace("views_per_s", "share_of_peak")] = tflops / args.peak_tflops
    out["ratio"] = out["build_steady_share_of_peak"]
    out["peak_tflops"] = args.peak_tflops
    save("teacher_flops", out, args.results)


if __name__ == "__main__":
    main()
