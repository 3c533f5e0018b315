"""FitConfig: every option of `g2l student fit`, filled by the CLI or a TOML file."""

from __future__ import annotations

from dataclasses import MISSING, asdict, dataclass, fields
from typing import ClassVar

from g2l_cache.errors import G2LError
from g2l_cache.options import option
from g2l_student.choices import DEFAULT_STUDENT, HEAD_INITS, LOGSUM_OVER, LOSSES, TARGETS, VIEW_CHOICES
from g2l_student.rundir import RunDir

# What a resumed run may change: none of these alters what it computes. The cache may move (the
# run checks the cache's fingerprint instead of its path).
RESUME_MAY_CHANGE = {"cache", "out", "resume", "auto_resume", "overwrite", "num_workers", "progress",
                     "checkpoint_every", "keep_checkpoints", "val_every", "accept_changed_views"}


@dataclass
class FitConfig:
    """Every option of `g2l student fit`. Defaults are the G2L recipe (AdamW 1e-4, weight decay
    0.05, cosine schedule, log-sum loss alpha 4, batch 32); each is written here only."""

    # Options that exclude each other: one given on the command line clears the others from a config file.
    EXCLUSIVE: ClassVar[tuple[tuple[str, ...], ...]] = (("steps", "epochs"), ("student_weights", "random_init"),
                                                         ("online_teacher_weights", "online_random_init"))

    cache: str = option(kind="argument", group="data", help="Cache folder written by `g2l cache build`.")
    out: str = option(short="-o", group="run", help="Run folder (new, or --resume / --overwrite).")
    # -- model
    student: str = option(DEFAULT_STUDENT, group="model", help="timm architecture of the student.")
    student_weights: str | None = option(None, group="model",
                                         help="Initial weights: a .safetensors file (common checkpoint layouts "
                                         "are mapped to timm keys), or a transformers DINOv2 checkpoint "
                                         "(folder or hub id, e.g. histai/hibou-L) mapped onto the timm ViT.")
    random_init: bool = option(False, group="model", help="Random student weights.")
    student_mean: list[float] | None = option(None, group="model", kind="triple",
                                              default_text="the weights' preprocessor_config.json, else timm's",
                                              help="Student input mean R,G,B.")
    student_std: list[float] | None = option(None, group="model", kind="triple",
                                             default_text="as for the mean", help="Student input std R,G,B.")
    img_size: int = option(224, group="model", help="Student input size; views are resized to it.")
    head_weights: str | None = option(None, group="model",
                                      help="Projection heads from an earlier export (head.safetensors).")
    head_init: str = option("targets", group="model",
                            help="'targets': the heads' BatchNorm starts at the training targets' "
                            "per-dimension mean and sd; 'default': torch's 0/1.")
    # -- data
    teacher: list[str] = option(default_factory=list, group="data", kind="repeat",
                                default_text="the first complete one",
                                help="Which of the cache's teachers (fingerprint or name); repeat it to "
                                "distil several into one student, a projection head per teacher.")
    teacher_weight: list[str] = option(default_factory=list, group="data", kind="repeat",
                                       help="NAME=W: loss weight of one of several teachers (repeatable; "
                                       "default 1 each).")
    val_fraction: float = option(0.1, group="data", help="Share of patients (TCGA barcodes or --patient-of), "
                                 "else of slides, held out for validation.")
    patient_of: str | None = option(None, group="data", help="CSV with slide_id,patient_id: a patient's "
                                    "slides stay on one side of the validation split.")
    views_per_epoch: str = option("one", group="data", help="'one' cached view per tile per epoch (K epochs "
                                  "visit all K), or 'all'.")
    slides: str | None = option(None, group="data", help="Only these slides: text file of ids or CSV with slide_id.")
    where: str | None = option(None, group="data", help="SQL condition on view/tile/slide columns, e.g. "
                               "\"slide_id LIKE '%centre-a%'\".")
    online_teacher: list[str] = option(default_factory=list, group="data", kind="repeat",
                                       help="Compute targets live with this teacher (a check, or with "
                                       "--fresh-views the online baseline); repeat it for several.")
    online_teacher_weights: str | None = option(None, group="data",
                                                help="Weights for a single --online-teacher.")
    online_random_init: bool = option(False, group="data", help="Random weights for --online-teacher.")
    fresh_views: bool = option(False, group="data",
                               help="With --online-teacher: every epoch draws a new view of each training "
                               "tile (view index K + epoch, from the stored tile) instead of a cached one.")
    num_workers: int = option(2, group="data", help="DataLoader workers per process.")
    accept_changed_views: bool = option(False, group="data",
                                        help="Train even when the cache's canary views replay differently from "
                                        "what the teacher saw (a Pillow / libjpeg / numpy upgrade); refused by default.")
    # -- optimiser
    steps: int | None = option(None, group="optimiser", help="Optimiser steps (or --epochs).")
    epochs: int | None = option(None, group="optimiser", default_text="1 if no --steps",
                                help="Epochs over the training tiles.")
    batch_size: int = option(32, group="optimiser", help="Global batch per micro-step, split over processes.")
    grad_accum: int = option(1, group="optimiser", help="Micro-batches per optimiser step.")
    lr: float = option(1e-4, group="optimiser", help="AdamW learning rate.")
    weight_decay: float = option(0.05, group="optimiser",
                                 help="AdamW weight decay (weight matrices only: not tokens, position "
                                 "embeddings, norms, biases).")
    grad_clip: float = option(1.0, group="optimiser", help="Clip the gradient norm (0: off).")
    ema_decay: float | None = option(None, group="optimiser", help="Keep an EMA of the student (e.g. 0.999); "
                                     "exported when set.")
    seed: int = option(0, group="optimiser", help="Seed of the split, view choice, order and init.")
    # -- loss
    loss: str = option("logsum", group="loss", help=f"One of {', '.join(LOSSES)} (logsum: G2L's).")
    alpha: float = option(4.0, group="loss", help="Exponent of the log-sum loss.")
    logsum_over: str = option("sample", group="loss", help="Log-sum: 'sample' (log of each sample's sum, then "
                              "the mean) or 'batch' (log of the whole batch's sum).")
    target: str = option("cls", group="loss", help="cls (teacher embedding), mean-patch, or both.")
    cls_weight: float = option(1.0, group="loss", help="Weight of the cls target with --target both.")
    patch_weight: float = option(1.0, group="loss", help="Weight of the mean-patch target with --target both.")
    # -- schedule
    warmup_steps: int | None = option(None, group="schedule", default_text="5% of the steps",
                                      help="Linear warmup steps before the cosine decay.")
    early_stop: str | None = option(None, group="schedule",
                                    help="'g2l': once the smoothed loss exceeds the mean of its previous "
                                    "--early-stop-window values more than --early-stop-patience times in a row, "
                                    "cool the LR down and stop.")
    early_stop_window: int = option(100, group="schedule", help="Steps in the early-stop rule's mean.")
    early_stop_patience: int = option(10, group="schedule", help="Exceedances in a row the rule tolerates.")
    early_stop_smoothing: float = option(0.9, group="schedule",
                                         help="EMA weight of the old smoothed loss the rule reads (0: raw loss).")
    early_stop_min_fraction: float = option(0.1, group="schedule",
                                            help="Never stop in this first share of the steps.")
    early_stop_cooldown: int | None = option(None, group="schedule", default_text="2% of the steps",
                                             help="Steps of the linear LR ramp to 0 after the rule fires.")
    # -- run
    val_every: int | None = option(None, group="run", help="Measure fidelity on the held-out views every N "
                                   "steps (metrics.csv val_* columns, plotted in loss.png).")
    fidelity_views: int = option(2048, group="run", help="Held-out views (every cached view of each validation "
                                 "tile) the fidelity is measured on.")
    checkpoint_every: int = option(500, group="run", help="Checkpoint every N steps.")
    keep_checkpoints: int = option(2, group="run", help="Checkpoints kept (the newest).")
    resume: bool = option(False, group="run", help="Continue the run in --out from its last checkpoint, with "
                          "its config.toml (options given must match it).")
    auto_resume: bool = option(False, group="run", help="Resume the run in --out when there is one (as "
                               "--resume), start it when there is none: one command for the first start and "
                               "every requeue. A folder holding anything else is refused.")
    overwrite: bool = option(False, group="run", help="Replace the run in --out.")
    cpu: bool = option(False, group="run", help="Train on CPU even if a GPU is present.")
    progress: bool = option(True, group="run", help="Progress bar (--no-progress for logs and CI).")

    def __post_init__(self) -> None:
        # a single name (TOML, Python, runs made before teachers could repeat) is a list of one
        for name in ("teacher", "online_teacher", "teacher_weight"):
            value = getattr(self, name)
            setattr(self, name, [] if value is None else [value] if isinstance(value, str) else list(value))
        if len(set(self.teacher)) != len(self.teacher) or len(set(self.online_teacher)) != len(self.online_teacher):
            raise G2LError("a teacher is named twice; name each --teacher / --online-teacher once.")
        if self.teacher and self.online_teacher:
            raise G2LError("give --teacher (cached targets) or --online-teacher (live), not both.")
        if self.online_teacher_weights and len(self.online_teacher) > 1:
            raise G2LError("--online-teacher-weights applies to a single --online-teacher; with several, "
                           "use teachers the cache holds (their recorded weights are used).")
        named = self.teacher or self.online_teacher
        if self.teacher_weight and len(named) == 1:
            raise G2LError("--teacher-weight weighs several teachers against each other; with one teacher "
                           "scale the learning rate instead.")
        for item in self.teacher_weight:
            key, sep, value = item.partition("=")
            try:
                ok = bool(sep) and float(value) >= 0
            except ValueError:
                ok = False
            if not ok:
                raise G2LError(f"--teacher-weight takes NAME=W with W >= 0, got {item!r}.")
            if key not in named:
                raise G2LError(f"--teacher-weight {item!r} names no --teacher / --online-teacher "
                               f"({', '.join(named) or 'none given'}).")
        if self.loss not in LOSSES:
            raise G2LError(f"--loss must be one of {', '.join(LOSSES)}.")
        if self.target not in TARGETS:
            raise G2LError(f"--target must be one of {', '.join(TARGETS)}.")
        if self.logsum_over not in LOGSUM_OVER:
            raise G2LError(f"--logsum-over must be one of {', '.join(LOGSUM_OVER)}.")
        if self.head_init not in HEAD_INITS:
            raise G2LError(f"--head-init must be one of {', '.join(HEAD_INITS)}.")
        if self.views_per_epoch not in VIEW_CHOICES:
            raise G2LError(f"--views-per-epoch must be one of {', '.join(VIEW_CHOICES)}.")
        if self.steps is not None and self.epochs is not None:
            raise G2LError("give --steps or --epochs, not both.")
        if self.val_every is not None and self.val_every < 1:
            raise G2LError("--val-every must be at least 1.")
        for name in ("batch_size", "grad_accum", "checkpoint_every", "keep_checkpoints", "img_size", "fidelity_views"):
            if getattr(self, name) < 1:
                raise G2LError(f"--{name.replace('_', '-')} must be at least 1.")
        if self.steps is not None and self.steps < 1 or self.epochs is not None and self.epochs < 1:
            raise G2LError("--steps / --epochs must be at least 1.")
        if self.early_stop not in (None, "g2l"):
            raise G2LError("--early-stop takes 'g2l' (or nothing).")
        if not 0 <= self.early_stop_smoothing < 1 or not 0 <= self.early_stop_min_fraction <= 1:
            raise G2LError("--early-stop-smoothing must be in [0, 1) and --early-stop-min-fraction in [0, 1].")
        if self.early_stop_cooldown is not None and self.early_stop_cooldown < 0:
            raise G2LError("--early-stop-cooldown must be 0 or more steps.")
        if self.ema_decay is not None and not 0 < self.ema_decay < 1:
            raise G2LError("--ema-decay must be in (0, 1).")
        for name in ("student_mean", "student_std"):
            value = getattr(self, name)
            if value is not None and (len(value) != 3 or (name == "student_std" and min(value) <= 0)):
                raise G2LError(f"--{name.replace('_', '-')} takes three values (R,G,B)"
                               f"{', all positive' if name == 'student_std' else ''}, got {value}.")
        if self.fresh_views and not self.online_teacher:
            raise G2LError("--fresh-views needs --online-teacher NAME: no cache holds targets of views drawn during training.")
        if (self.resume or self.auto_resume) and self.overwrite:
            raise G2LError("give --resume (or --auto-resume) or --overwrite, not both.")

    def to_dict(self) -> dict:
        return asdict(self)

    def teacher_weights(self) -> dict[str, float]:
        """Loss weight of each named teacher (1 unless --teacher-weight says otherwise)."""
        given = {k: float(v) for k, _, v in (w.partition("=") for w in self.teacher_weight)}
        return {name: given.get(name, 1.0) for name in self.teacher or self.online_teacher}

    def check_resumable(self, saved: dict) -> None:
        """Refuse to resume with options that differ from the run's config.toml (`saved`)."""
        mine = self.to_dict()
        # the run's options as this version reads them: options added since take their defaults,
        # and a single --teacher written as a string is a list of one
        saved = FitConfig.from_dict({**saved, "resume": False, "overwrite": False}).to_dict()
        differ = [f"--{k.replace('_', '-')} {mine[k]!r} (the run has {saved.get(k)!r})"
                  for k in mine if k not in RESUME_MAY_CHANGE and mine[k] != saved.get(k)]
        if differ:
            raise G2LError("--resume continues a run with the options it started with; these differ: "
                           + "; ".join(differ) + ". Leave them out (they come from the run's config.toml) "
                           "or start a new run.")

    @classmethod
    def resolved(cls, given: dict) -> "FitConfig":
        """The config a fit runs with: the run's own (`for_resume`) when resuming, which --auto-resume
        does when --out holds a run, else the options given."""
        if given.get("resume") or (given.get("auto_resume") and RunDir(given["out"]).run_json.is_file()):
            return cls.for_resume(given)
        return cls.from_dict(given)

    @classmethod
    def for_resume(cls, given: dict) -> "FitConfig":
        """The config of the run in given['out'], from its config.toml; options in `given` may only
        repeat it (or change what RESUME_MAY_CHANGE lists)."""
        saved = RunDir(given["out"]).read_config()
        cfg = cls.from_dict({**saved, **given, "resume": True, "overwrite": False})
        cfg.check_resumable(saved)
        return cfg

    @classmethod
    def from_dict(cls, values: dict) -> "FitConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise G2LError(f"unknown fit option(s) {', '.join(unknown)}; see `g2l student fit --help`.")
        missing = [f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING
                   and not values.get(f.name)]
        if missing:
            raise G2LError(" and ".join("CACHE" if m == "cache" else f"--{m}" for m in missing)
                           + " is required (on the command line or in --config).")
        return cls(**values)
