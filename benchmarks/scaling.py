"""(6) Scaling: 1 vs 2 processes (torchrun, gloo on CPU) for both stages; throughput ratios.

Stage one: views/s of a whole `g2l cache build` (process start-up included, same for both).
Stage two: samples/s of `g2l student fit` at the same global batch (steady state).
"""

import os
import subprocess
import sys
import time

from _common import REPO, WORK, bench_cache, demo_slides, device_name, fresh, parser, save, steady_step_seconds


def run(nproc: int, args: list[str]) -> float:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "-m", "cli", *args]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    t = time.time()
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(res.stderr[-3000:])
    return time.time() - t


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--steps", type=int, default=30)
    args = p.parse_args()
    from g2l_cache.layout import read_manifest

    slides = demo_slides(args.slides)
    build = ["cache", "build", str(slides), "--teacher", args.teacher, "--random-init",
             "--tile-size", str(args.tile_size), "--crop-size", str(args.crop_size), "--views", str(args.views),
             "--max-tiles-per-slide", str(args.tiles_per_slide), "--batch-size", str(args.batch_size),
             "--num-workers", "0", "--no-progress"]
    rates = {}
    for n in (1, 2):
        out = fresh(WORK / f"bench-scale-cache-{n}")
        seconds = run(n, [*build, "--out", str(out), "--shards", str(n)])
        rates[f"build_{n}"] = read_manifest(out)["counts"]["views"] / seconds
    cache = bench_cache(args)
    fit = ["student", "fit", str(cache), "--student", args.student, "--random-init",
           "--img-size", str(args.crop_size), "--steps", str(args.steps), "--batch-size", str(args.batch_size),
           "--num-workers", "0", "--val-fraction", "0", "--checkpoint-every", "1000000", "--no-progress"]
    for n in (1, 2):
        out = fresh(WORK / f"bench-scale-fit-{n}")
        run(n, [*fit, "--out", str(out)])
        rates[f"fit_{n}"] = args.batch_size / steady_step_seconds(out)
    save("scaling", {
        "ratio": rates["build_2"] / rates["build_1"], "device": device_name("cpu"),
        "cpu_cores": os.cpu_count(), "build_views_per_s_1proc": rates["build_1"],
        "build_views_per_s_2proc": rates["build_2"], "fit_samples_per_s_1proc": rates["fit_1"],
        "fit_samples_per_s_2proc": rates["fit_2"], "fit_ratio": rates["fit_2"] / rates["fit_1"],
    }, args.out)


if __name__ == "__main__":
    main()
