"""FitConfig: every option of `g2l student fit`, filled by the CLI or a TOML file."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from g2l_cache.errors import G2LError
from g2l_student.data import VIEW_CHOICES
from g2l_student.losses import LOGSUM_OVER, LOSSES
from g2l_student.model import DEFAULT_STUDENT
from g2l_student.task import TARGETS

HEAD_INITS = ("targets", "default")
# What a resumed run may change: none of these alters what it computes. The cache may move (the
# run checks the cache's fingerprint instead of its path).
RESUME_MAY_CHANGE = {"cache", "out", "resume", "overwrite", "num_workers", "progress", "checkpoint_every",
                     "keep_checkpoints", "val_every"}


@dataclass
class FitConfig:
    """Defaults are the G2L recipe (AdamW 1e-4, wd 0.05, cosine, log-sum loss alpha 4, batch 32)."""

    cache: str
    out: str
    student: str = DEFAULT_STUDENT
    student_weights: str | None = None
    random_init: bool = False
    head_weights: str | None = None
    # "targets": heads start at the training targets' per-dimension mean/sd; "default": torch's init.
    head_init: str = "targets"
    # The student's input normalisation; None: from the weights (preprocessor_config.json) or timm.
    student_mean: list[float] | None = None
    student_std: list[float] | None = None
    img_size: int = 224
    teacher: str | None = None  # which of the cache's teachers (fingerprint or name)
    steps: int | None = None
    epochs: int | None = None
    batch_size: int = 32
    lr: float = 1e-4
    weight_decay: float = 0.05
    warmup_steps: int | None = None  # default: 5% of the steps
    loss: str = "logsum"
    alpha: float = 4.0
    logsum_over: str = "sample"  # "sample": log per sample, then mean; "batch": one log of the batch's sum
    target: str = "cls"
    cls_weight: float = 1.0
    patch_weight: float = 1.0
    grad_clip: float = 1.0
    grad_accum: int = 1
    ema_decay: float | None = None
    early_stop: str | None = None  # "g2l"
    early_stop_window: int = 100
    early_stop_patience: int = 10
    early_stop_smoothing: float = 0.9  # EMA weight of the old smoothed loss the rule reads
    early_stop_min_fraction: float = 0.1  # never stop in this first share of the steps
    early_stop_cooldown: int | None = None  # LR ramp to 0 after the rule fires (default 2% of steps)
    seed: int = 0
    val_fraction: float = 0.1
    # CSV (slide_id, patient_id): the validation split keeps patients whole. TCGA barcodes need none.
    patient_of: str | None = None
    val_every: int | None = None  # measure fidelity on the held-out views every N steps
    views_per_epoch: str = "one"
    slides: str | None = None
    where: str | None = None
    num_workers: int = 2
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    fidelity_views: int = 2048  # held-out views (all K of each validation tile) for fidelity
    online_teacher: str | None = None
    online_teacher_weights: str | None = None
    online_random_init: bool = False
    fresh_views: bool = False  # with online_teacher: a new view of every tile each epoch (index K + epoch)
    resume: bool = False
    overwrite: bool = False
    cpu: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
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
        if self.resume and self.overwrite:
            raise G2LError("give --resume or --overwrite, not both.")

    def to_dict(self) -> dict:
        return asdict(self)

    def check_resumable(self, saved: dict) -> None:
        """Refuse to resume with options that differ from the run's config.toml (`saved`)."""
        mine = self.to_dict()
        differ = [f"--{k.replace('_', '-')} {mine[k]!r} (the run has {saved.get(k)!r})"
                  for k in mine if k not in RESUME_MAY_CHANGE and mine[k] != saved.get(k)]
        if differ:
            raise G2LError("--resume continues a run with the options it started with; these differ: "
                           + "; ".join(differ) + ". Leave them out (they come from the run's config.toml) "
                           "or start a new run.")

    @classmethod
    def for_resume(cls, given: dict) -> "FitConfig":
        """The config of the run in given['out'], from its config.toml; options in `given` may only
        repeat it (or change what RESUME_MAY_CHANGE lists)."""
        from g2l_student.rundir import RunDir

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
        return cls(**values)
