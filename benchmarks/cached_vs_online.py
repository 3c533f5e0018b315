"""(3) Cached vs online distillation: time per epoch of `g2l student fit` on the cache vs with
`--online-teacher` on the same data, next to the FLOP ratio theory gives:
(teacher forward + student train step) / (student train step).
"""

from _common import WORK, bench_cache, device_name, fresh, parser, save, steady_step_seconds
from g2l_cache.costs import model_flops
from student_fit import fit_config


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--steps", type=int, default=20, help="steps timed per mode")
    args = p.parse_args()
    from g2l_cache import CacheReader
    from g2l_student.train import fit

    cache = bench_cache(args)
    n_tiles = CacheReader(str(cache)).manifest["counts"]["tiles"]
    steps_per_epoch = n_tiles / args.batch_size  # an epoch: one view of every tile
    cached_run, online_run = fresh(WORK / "bench-cached"), fresh(WORK / "bench-online")
    fit(fit_config(args, cache, cached_run, args.steps))
    fit(fit_config(args, cache, online_run, args.steps, online_teacher=args.teacher))
    cached_epoch = steady_step_seconds(cached_run) * steps_per_epoch
    online_epoch = steady_step_seconds(online_run) * steps_per_epoch
    teacher_fwd = model_flops(args.teacher, args.crop_size, train=False)
    student_train = model_flops(args.student, args.crop_size, train=True)
    save("cached_vs_online", {
        "ratio": online_epoch / cached_epoch, "device": device_name(args.device),
        "teacher": args.teacher, "student": args.student, "batch_size": args.batch_size,
        "input_px": args.crop_size, "steps_per_epoch": steps_per_epoch,
        "cached_epoch_s": cached_epoch, "online_epoch_s": online_epoch,
        "flop_ratio_theory": (teacher_fwd + student_train) / student_train,
        "teacher_gflops_per_view": teacher_fwd / 1e9, "student_train_gflops_per_view": student_train / 1e9,
    }, args.out)


if __name__ == "__main__":
    main()
