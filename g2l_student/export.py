"""Export a run's student so plain timm loads it (no g2l needed), and the fidelity report."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from g2l_cache.errors import G2LError
from g2l_student.checkpoint import checkpoint_weights
from g2l_student.config import FitConfig
from g2l_student.data import CachedViews
from g2l_student.eva_export import write_eva_files
from g2l_student.fidelity import measure_fidelity
from g2l_student.hf_export import hf_export_blocker, write_hf_export
from g2l_student.model import build_student
from g2l_student.model_card import evaluation_rows, render_card
from g2l_student.provenance import cache_mpp, student_fingerprint
from g2l_student.run_data import cached_slots, fidelity_views, load_fit_data
from g2l_student.rundir import RunDir
from g2l_student.speed import speed_rows
from g2l_student.targets import head_targets

LOAD_SNIPPET = """import timm
model = timm.create_model(
    "{arch}", pretrained=True, num_classes=0, {args},
    pretrained_cfg_overlay=dict(file="{file}", custom_load=False),
)
"""
HF_SNIPPET = """from transformers import AutoImageProcessor, AutoModel
processor = AutoImageProcessor.from_pretrained("{folder}")
model = AutoModel.from_pretrained("{folder}")
embedding = model(**processor(images, return_tensors="pt")).pooler_output  # the CLS embedding
"""


def load_instructions(export: Path, arch: str, model_args: dict, hf: bool) -> str:
    """LOAD.md: how plain timm (and transformers, when hf/ was written) load this export."""
    args = ", ".join(f"{k}={v!r}" for k, v in model_args.items())
    text = ("Load the student with plain timm (no g2l needed):\n\n```python\n"
            + LOAD_SNIPPET.format(arch=arch, args=args, file=str((export / "student.safetensors").resolve()))
            + "```\n")
    if hf:
        text += ("\nOr with transformers (same CLS embedding; the processor resizes, crops and "
                 "normalises with the run's mean/std):\n\n```python\n"
                 + HF_SNIPPET.format(folder=str((export / "hf").resolve())) + "```\n")
    return text


def teacher_inputs(info: dict) -> list[tuple[str, int]]:
    """(name, input size) of each teacher of the run, sizes as the cache recorded them."""
    from g2l_cache import CacheReader
    from g2l_cache.presets import get_preset

    try:
        recorded = CacheReader(info["cache"]).manifest.get("teachers", {})
    except G2LError:
        recorded = {}
    return [(t["name"], int(recorded.get(t.get("fingerprint"), {}).get("input_size")
                            or get_preset(t["name"]).input_size)) for t in info.get("teachers", [])]


def export_run(run_root: str | Path, checkpoint: str | Path | None = None,
               evaluations: list[str | Path] = (), device: str | None = None, speed: bool = True) -> Path:
    """Write RUN/export/: student.safetensors + config.json (timm), head.safetensors, LOAD.md, hf/ (a
    transformers checkpoint, for a DINOv2-architecture student), eva.yaml + eva.env (kaiko-eva) and the model card README.md (with
    the rows of the `g2l eval compare` report folders in `evaluations` that embedded this export,
    and, if `speed`, the student's and teachers' images per second on `device`, default a GPU if any)."""
    import timm
    import torch
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
    mean = list(cfg.student_mean or pcfg.get("mean", (0.485, 0.456, 0.406)))
    std = list(cfg.student_std or pcfg.get("std", (0.229, 0.224, 0.225)))
    model_args = {**(info.get("student_model_args") or {}), "img_size": cfg.img_size}
    net = timm.create_model(cfg.student, num_classes=0, **model_args)
    net.load_state_dict(backbone)
    blocker = hf_export_blocker(net)
    if blocker is None:
        write_hf_export(net, run.export / "hf", cfg.img_size, mean, std)
    elif (run.export / "hf").is_dir():  # an earlier export's, of another student
        shutil.rmtree(run.export / "hf")
    write_eva_files(run.export, cfg.student, run.export / "student.safetensors", model_args, net.num_features,
                    mean, std)
    target = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    speeds = speed_rows(net, cfg.student, cfg.img_size, teacher_inputs(info), target) if speed else []
    config = {
        "architecture": cfg.student, "num_classes": 0, "model_args": model_args,
        "pretrained_cfg": {"input_size": [3, cfg.img_size, cfg.img_size], "mean": mean, "std": std,
                           "interpolation": "bicubic", "crop_pct": 1.0},
        "g2l": {"checkpoint": ckpt.name, "cache": info["cache"], "mpp": cache_mpp(info["cache"]),
                "cache_fingerprint": info["cache_fingerprint"], "target": cfg.target,
                "loss": cfg.loss, "teachers": info.get("teachers", []),
                "head": "head.safetensors: Linear + BatchNorm1d per target (keys 'cls.*', 'mean-patch.*'; "
                "with several teachers 'LABEL:cls.*', 'LABEL:mean-patch.*')",
                "transformers": "hf/ (Dinov2 checkpoint, AutoModel.from_pretrained)" if blocker is None
                else f"not exported: {blocker}", "speed": speeds},
    }
    (run.export / "config.json").write_text(json.dumps(config, indent=2))
    (run.export / "LOAD.md").write_text(load_instructions(run.export, cfg.student, model_args, blocker is None))
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
                            std=cfg.student_std, model_args=run.info().get("student_model_args"))
    student.load_state_dict(checkpoint_weights(ckpt))
    views, split = fidelity_views(data, cfg.fidelity_views, cfg.seed)
    dataset = Subset(CachedViews(data.reader, data.fingerprints), views.tolist())
    after = measure_fidelity(student, dataset, torch.device("cpu"), slots=slots)
    return {"split": split, "after": after, "after_checkpoint": ckpt.name}
