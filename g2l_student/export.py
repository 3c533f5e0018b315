"""Export a run's student so plain timm loads it (no g2l needed), and the fidelity report."""

from __future__ import annotations

import json
from pathlib import Path

from g2l_cache.errors import G2LError
from g2l_student.checkpoint import checkpoint_weights
from g2l_student.config import FitConfig
from g2l_student.data import CachedViews
from g2l_student.fidelity import measure_fidelity
from g2l_student.model import build_student
from g2l_student.model_card import evaluation_rows, render_card
from g2l_student.provenance import cache_mpp, student_fingerprint
from g2l_student.run_data import cached_slots, fidelity_views, load_fit_data
from g2l_student.rundir import RunDir
from g2l_student.targets import head_targets

LOAD_SNIPPET = """import timm
model = timm.create_model(
    "{arch}", pretrained=True, num_classes=0, img_size={img_size},
    pretrained_cfg_overlay=dict(file="{file}", custom_load=False),
)
"""


def export_run(run_root: str | Path, checkpoint: str | Path | None = None,
               evaluations: list[str | Path] = ()) -> Path:
    """Write RUN/export/: student.safetensors + config.json (timm), head.safetensors, LOAD.md and the
    model card README.md (with the rows of the `g2l eval compare` report folders in `evaluations`
    that embedded this export)."""
    import timm
    from safetensors.torch import save_file

    run = RunDir(run_root)
    info = run.info()
    cfg = FitConfig.from_dict(run.read_config())
    ckpt = Path(checkpoint) if checkpoint else run.last_checkpoint()
    if ckpt is None or not ckpt.is_dir():
        raise G2LError(f"{run.root} has no checkpoint to export yet.")
    sd = checkpoint_weights(ckpt)
    backbone = {k[len("backbone."):]: v.contiguous() for k, v in sd.items() if k.startswith("backbone.")}
    heads = {k[len("heads."):]: v.contiguous() for k, v in sd.items() if k.startswith("heads.")}
    if not backbone:
        raise G2LError(f"checkpoint {ckpt} holds no student backbone weights.")
    run.export.mkdir(parents=True, exist_ok=True)
    save_file(backbone, str(run.export / "student.safetensors"))
    save_file(heads, str(run.export / "head.safetensors"))
    pcfg = timm.get_pretrained_cfg(cfg.student)
    pcfg = pcfg.to_dict() if pcfg is not None else {}
    config = {
        "architecture": cfg.student, "num_classes": 0,
        "model_args": {"img_size": cfg.img_size},
        "pretrained_cfg": {"input_size": [3, cfg.img_size, cfg.img_size],
                           "mean": list(cfg.student_mean or pcfg.get("mean", (0.485, 0.456, 0.406))),
                           "std": list(cfg.student_std or pcfg.get("std", (0.229, 0.224, 0.225))),
                           "interpolation": "bicubic", "crop_pct": 1.0},
        "g2l": {"checkpoint": ckpt.name, "cache": info["cache"], "mpp": cache_mpp(info["cache"]),
                "cache_fingerprint": info["cache_fingerprint"], "target": cfg.target,
                "loss": cfg.loss, "teachers": info.get("teachers", []),
                "head": "head.safetensors: Linear + BatchNorm1d per target (keys 'cls.*', 'mean-patch.*'; "
                "with several teachers 'LABEL:cls.*', 'LABEL:mean-patch.*')"},
    }
    (run.export / "config.json").write_text(json.dumps(config, indent=2))
    (run.export / "LOAD.md").write_text(
        "Load the student with plain timm (no g2l needed):\n\n```python\n"
        + LOAD_SNIPPET.format(arch=cfg.student, img_size=cfg.img_size,
                              file=str((run.export / "student.safetensors").resolve()))
        + "```\n")
    rows = evaluation_rows(list(evaluations), student_fingerprint(run.export)) if evaluations else None
    (run.export / "README.md").write_text(render_card(run.root, config, rows))
    return run.export


def fidelity_report(run_root: str | Path) -> dict:
    """Fidelity before/after training as stored by the fit; recomputed from the last checkpoint if missing."""
    run = RunDir(run_root)
    run.info()
    data = json.loads(run.fidelity.read_text()) if run.fidelity.exists() else {}
    if "after" not in data:
        data.update(recompute_fidelity(run))
    return data


def recompute_fidelity(run: RunDir) -> dict:
    """Fidelity of the run's last checkpoint on its validation views."""
    import torch
    from torch.utils.data import Subset

    cfg = FitConfig.from_dict(run.read_config())
    ckpt = run.last_checkpoint()
    if ckpt is None:
        raise G2LError(f"{run.root} has no checkpoint yet; nothing to report.")
    data = load_fit_data(cfg)
    if not data.teachers:
        raise G2LError(f"{run.root} was trained against a live teacher with no cached targets; its "
                       "fidelity.json holds the report measured at the end of the fit.")
    slots = cached_slots(cfg, data)
    dims = {k: h.stop - h.start for k, h in head_targets(cfg.target, slots).items()}
    student = build_student(cfg.student, cfg.img_size, dims, random_init=True, mean=cfg.student_mean,
                            std=cfg.student_std)
    student.load_state_dict(checkpoint_weights(ckpt))
    views, split = fidelity_views(data, cfg.fidelity_views, cfg.seed)
    dataset = Subset(CachedViews(data.reader, data.fingerprints), views.tolist())
    after = measure_fidelity(student, dataset, torch.device("cpu"), slots=slots)
    return {"split": split, "after": after, "after_checkpoint": ckpt.name}
