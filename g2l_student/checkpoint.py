"""A run's checkpoints: Accelerate's state (weights as safetensors) plus the loop's own state as JSON
and the EMA as safetensors, so resuming unpickles nothing; written under a temp name, renamed whole."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from g2l_cache.errors import G2LError
from g2l_cache.layout import write_text_atomic
from g2l_student.rundir import RunDir
from g2l_student.schedule import EMA, G2LEarlyStop, TrainState

LOOP_STATE = "loop_state.json"


def save_checkpoint(accelerator, run: RunDir, state: TrainState, early_stop: G2LEarlyStop, keep: int,
                    ema: EMA | None) -> None:
    """Accelerate state into a temp folder, the loop's state and EMA beside it, renamed when complete;
    only the newest `keep` checkpoints stay."""
    final = run.checkpoint_dir(state.step)
    tmp = final.with_name(final.name + ".tmp")
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_text_atomic(tmp / LOOP_STATE, json.dumps({"train": state.state_dict(),
                                                        "early_stop": early_stop.state_dict()}))
        if ema is not None:
            save_file({k: v.contiguous() for k, v in ema.shadow.items()}, str(tmp / "ema.safetensors"))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        run.prune_checkpoints(keep)
    accelerator.wait_for_everyone()


def load_loop_state(checkpoint: Path, state: TrainState, early_stop: G2LEarlyStop, ema: EMA | None) -> None:
    """Step counters, early-stop history and EMA weights of a checkpoint (JSON and safetensors); the EMA
    lands on the device of the model it averages."""
    path = checkpoint / LOOP_STATE
    if not path.is_file():
        raise G2LError(f"checkpoint {checkpoint} has no {LOOP_STATE} (written by an older g2l); "
                       "start the run again with --overwrite.")
    saved = json.loads(path.read_text())
    state.load_state_dict(saved["train"])
    early_stop.load_state_dict(saved["early_stop"])
    if ema is not None:
        try:
            ema.load_shadow(load_file(str(checkpoint / "ema.safetensors")))
        except (OSError, ValueError) as exc:
            raise G2LError(f"checkpoint {checkpoint} has no usable ema.safetensors ({exc}); resume from another "
                           "checkpoint or start the run again with --overwrite.") from None


def checkpoint_weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The student's weights in a checkpoint, with the EMA's in place of the trained ones when it kept one."""
    model_file = checkpoint / "model.safetensors"
    if not model_file.exists():
        raise G2LError(f"checkpoint {checkpoint} has no model.safetensors.")
    sd = load_file(str(model_file))
    ema_file = checkpoint / "ema.safetensors"
    if ema_file.exists():
        sd.update(load_file(str(ema_file)))
    return sd
