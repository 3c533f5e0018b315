"""(2) Student fit efficiency: `g2l student fit` steps/s over a bare train step on random tensors.

Target >= 0.90. Same student, same batch, same device, dtype and optimiser (fused AdamW). The
fit's rate is its steady state from metrics.csv (first quarter of the steps left out, as the bare
timing leaves out warm-up calls); the rate over all steps and the share of a step spent waiting
for the data loader are printed beside it.
"""

from _common import WORK, bare_train_step_rate, bench_cache, device_name, fresh, parser, save, step_timing


def fit_config(args, cache, out, steps: int, **extra):
    from g2l_student.config import FitConfig

    return FitConfig(cache=str(cache), out=str(out), student=args.student, random_init=True,
                     img_size=args.crop_size, steps=steps, batch_size=args.batch_size,
                     num_workers=args.workers, val_fraction=0.0, checkpoint_every=10**9,
                     fidelity_views=64, progress=False, cpu=not args.device.startswith("cuda"), **extra)


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--steps", type=int, default=40)
    args = p.parse_args()
    from g2l_cache import CacheReader
    from g2l_student.model import build_student
    from g2l_student.targets import head_dims
    from g2l_student.train import fit

    cache = bench_cache(args)
    info = CacheReader(str(cache)).teacher(args.teacher)
    student = build_student(args.student, args.crop_size, head_dims("cls", info["embed_dim"], info["patch_dim"]),
                            random_init=True)
    bare = bare_train_step_rate(student, args.batch_size, args.crop_size, args.device, iters=10)
    run = fresh(WORK / "bench-student-fit")
    fit(fit_config(args, cache, run, args.steps))
    timing = step_timing(run)
    rate = 1.0 / timing["steady"]
    save("student_fit", {
        "ratio": rate / bare, "target": 0.90, "device": device_name(args.device),
        "student": args.student, "batch_size": args.batch_size, "input_px": args.crop_size,
        "workers": args.workers, "bare_steps_per_s": bare, "fit_steps_per_s": rate,
        "fit_samples_per_s": rate * args.batch_size, "steps": args.steps,
        "ratio_all_steps": 1.0 / timing["all_steps"] / bare, "data_wait_share": timing["data_wait_share"],
        "step_ms": timing["step_ms"],
    }, args.out)


if __name__ == "__main__":
    main()
