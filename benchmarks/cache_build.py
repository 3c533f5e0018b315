"""(1) Cache build efficiency: `g2l cache build` views/s over the bare teacher forward throughput.

Target >= 0.90: reading, decoding, augmenting and writing must hide behind the teacher. The
build's rate is its steady state (first quarter of the batches left out, as the bare timing leaves
out warm-up calls); the whole command's rate, start-up included, is printed beside it. With
--cache, the build adds the teacher's targets to an existing cache (stored tiles, no slide reads).
"""

import time
from pathlib import Path

from _common import WORK, bare_teacher_rate, build_config, device_name, fresh, parser, save


def main() -> None:
    args = parser(__doc__).parse_args()
    from g2l_cache.build import run_build
    from g2l_cache.teachers import TeacherSpec, load_teacher

    teacher = load_teacher(TeacherSpec(args.teacher, random_init=True), img_size=args.crop_size,
                           device=args.device)
    bare = bare_teacher_rate(teacher, args.batch_size, args.crop_size, args.device, iters=10)
    del teacher
    if args.cache:
        out = Path(args.cache)
        source = "stored tiles of an existing cache (adds this teacher)"
    else:
        out = fresh(WORK / "bench-cache-build")
        source = "demo slides (tiatoolbox reads)"
    t = time.time()
    summary = run_build(build_config(args, out))
    wall = time.time() - t
    save("cache_build", {
        "ratio": summary.steady_views_per_second / bare, "target": 0.90,
        "device": device_name(args.device), "teacher": args.teacher, "batch_size": args.batch_size,
        "input_px": args.crop_size, "workers": args.workers, "source": source,
        "views": summary.targets_written, "bare_teacher_views_per_s": bare,
        "build_steady_views_per_s": summary.steady_views_per_second,
        "build_end_to_end_views_per_s": summary.targets_written / wall,
        "ratio_end_to_end": summary.targets_written / wall / bare,
        "build_seconds": wall, "loader_wait_s": summary.loader_wait_seconds,
    }, args.out)


if __name__ == "__main__":
    main()
