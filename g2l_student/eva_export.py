"""export/eva.yaml + eva.env: the student as a backbone for kaiko-eva's benchmarks (no eva needed).

eva's `TimmModel` wrapper builds `timm.create_model(NAME, **model_kwargs)` and loads a
`checkpoint_path` through timm's pretrained-file route, as LOAD.md does. (Its `timm/NAME` registry
entries keep only a few arguments, so img_size and a converted student's shape would be lost: the
block names the wrapper.) eva's offline patch configs read the head width, resize and normalisation
from the environment: eva.env holds those.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path


def eva_backbone(arch: str, weights: Path, model_args: dict) -> dict:
    """The `backbone:` block of an eva config for this student."""
    return {"class_path": "eva.vision.models.wrappers.TimmModel",
            "init_args": {"model_name": arch, "pretrained": False, "checkpoint_path": str(weights.resolve()),
                          "model_kwargs": {"num_classes": 0, **model_args}}}


def write_eva_files(folder: Path, arch: str, weights: Path, model_args: dict, embed_dim: int, mean, std) -> None:
    """export/eva.yaml (the backbone block) and export/eva.env (what eva's configs read from the environment)."""
    block = eva_backbone(arch, weights, model_args)
    args = block["init_args"]
    lines = ["# kaiko-eva backbone of this g2l student, written by `g2l student export`. Put `backbone:` in",
             "# place of the backbone of an eva patch-classification config and run it with eva.env exported;",
             "# g2l's docs/evaluation.md gives the commands for BACH, CRC, MHIST and PCam.",
             "backbone:", f"  class_path: {block['class_path']}", "  init_args:"]
    lines += [f"    {k}: {json.dumps(v)}" for k, v in args.items() if k != "model_kwargs"]
    lines += ["    model_kwargs:"] + [f"      {k}: {json.dumps(v)}" for k, v in args["model_kwargs"].items()]
    (folder / "eva.yaml").write_text("\n".join(lines) + "\n")
    env = {"IN_FEATURES": str(embed_dim), "RESIZE_DIM": str(model_args["img_size"]),
           "NORMALIZE_MEAN": json.dumps([float(v) for v in mean]),
           "NORMALIZE_STD": json.dumps([float(v) for v in std]),
           "MODEL_NAME": f"g2l-{folder.parent.name}"}  # names eva's output folders
    (folder / "eva.env").write_text("".join(f"{k}={shlex.quote(v)}\n" for k, v in env.items()))
