"""FitConfig: every option of `g2l student fit`, filled by the CLI or a TOML file."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from g2l_cache.errors import G2LError
from g2l_student.data import VIEW_CHOICES
from g2l_student.losses import LOSSES
from g2l_student.model import DEFAULT_STUDENT

TARGETS = ("cls", "mean-patch", "both")
HEAD_INITS = ("targets", "default")


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
    target: str = "cls"
    cls_weight: float = 1.0
    patch_weight: float = 1.0
    grad_clip: float = 1.0
    grad_accum: int = 1
    ema_decay: float | None = None
    early_stop: str | None = None  # "g2l"
    early_stop_window: int = 100
    early_stop_patience: int = 10
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
    resume: bool = False
    overwrite: bool = False
    cpu: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise G2LError(f"--loss must be one of {', '.join(LOSSES)}.")
        if self.target not in TARGETS:
            raise G2LError(f"--target must be one of {', '.join(TARGETS)}.")
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
        if self.ema_decay is not None and not 0 < self.ema_decay < 1:
            raise G2LError("--ema-decay must be in (0, 1).")
        for name in ("student_mean", "student_std"):
            value = getattr(self, name)
            if value is not None and (len(value) != 3 or (name == "student_std" and min(value) <= 0)):
                raise G2LError(f"--{name.replace('_', '-')} takes three values (R,G,B)"
                               f"{', all positive' if name == 'student_std' else ''}, got {value}.")
        if self.resume and self.overwrite:
            raise G2LError("give --resume or --overwrite, not both.")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "FitConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise G2LError(f"unknown fit option(s) {', '.join(unknown)}; see `g2l student fit --help`.")
        return cls(**values)
