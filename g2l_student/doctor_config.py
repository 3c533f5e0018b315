"""What `g2l doctor` checks, as a config: kept apart from the checks (which need torch) so that the
command line is built without importing torch, and `g2l cache plan` starts in a second less."""

from __future__ import annotations

from dataclasses import dataclass

from g2l_cache.options import option


@dataclass
class DoctorConfig:
    """What `g2l doctor` checks: the run's models and weights, its plan, output folder and GPUs."""

    teacher: list[str] = option(default_factory=list, kind="repeat", group="models",
                                 help="Teacher preset or timm name (repeatable).")
    teacher_weights: list[str] = option(default_factory=list, kind="repeat", group="models", help="Local weights file per --teacher, in "
                                        "the same order (checked for fit, not loaded).")
    student: str | None = option(None, group="models", help="Student timm architecture, e.g. vit_large_patch14_reg4_dinov2.")
    student_weights: str | None = option(None, group="models", help="Student weights: a hub id (histai/hibou-L), a "
                                         "transformers DINOv2 folder or a .safetensors file.")
    plan: str | None = option(None, group="machine", help="A `g2l cache plan` output (OUT/plan.json): free disk is checked "
                              "against its estimate.")
    out: str | None = option(None, group="machine", help="The output folder the run will write (checked for writing; "
                             "default: the plan's folder).")
    gpus: int | None = option(None, group="machine", default_text="those visible",
                              help="GPUs the run will use: fewer visible is an error; also sizes the CPU-worker check.")
