"""(3) Cached vs online distillation: time per epoch of `g2l student fit` on the cache vs with
`--online-teacher` on the same data, next to the FLOP ratio theory gives:
(teacher forward + student train step) / (student train step).
"""

import torch

from _common import WORK, bench_cache, device_name, fresh, parser, save, steady_step_seconds
from student_fit import fit_config


def flops(fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def main() -> None:
    args = parser(__doc__).parse_args()
    from g2l_cache import CacheReader
    from g2l_cache.teachers import TeacherSpec, load_teacher
    from g2l_student.model import build_student
    from g2l_student.train import fit, head_dims

    cache = bench_cache(args)
    reader = CacheReader(str(cache))
    info = reader.teacher(args.teacher)
    n_tiles = reader.manifest["counts"]["tiles"]
    steps = max(2, n_tiles // args.batch_size)  # one epoch: one view per tile
    cached_run, online_run = fresh(WORK / "bench-cached"), fresh(WORK / "bench-online")
    fit(fit_config(args, cache, cached_run, steps))
    fit(fit_config(args, cache, online_run, steps, online_teacher=args.teacher))
    cached_epoch = steady_step_seconds(cached_run) * steps
    online_epoch = steady_step_seconds(online_run) * steps

    x = torch.rand(2, 3, args.crop_size, args.crop_size)
    teacher = load_teacher(TeacherSpec(**info["spec"]), img_size=info["input_size"])
    student = build_student(args.student, args.crop_size, head_dims("cls", info["embed_dim"], info["patch_dim"]),
                            random_init=True)
    teacher_fwd = flops(lambda: teacher.embed(x)) / 2
    student_train = flops(lambda: student(x)["cls"].sum().backward()) / 2
    save("cached_vs_online", {
        "ratio": online_epoch / cached_epoch, "device": device_name(args.device),
        "teacher": args.teacher, "student": args.student, "batch_size": args.batch_size,
        "input_px": args.crop_size, "steps_per_epoch": steps,
        "cached_epoch_s": cached_epoch, "online_epoch_s": online_epoch,
        "flop_ratio_theory": (teacher_fwd + student_train) / student_train,
        "teacher_gflops_per_view": teacher_fwd / 1e9, "student_train_gflops_per_view": student_train / 1e9,
    }, args.out)


if __name__ == "__main__":
    main()
