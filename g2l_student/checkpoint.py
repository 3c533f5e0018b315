"""A run's checkpoints: taken in a moment, written in the background, resumed without unpickling.

A checkpoint folder holds `model.safetensors` (the plain student), `optimizer.safetensors` (AdamW's
moments), `ema.safetensors` when the run keeps one, and `state.json` (loop, early stop, schedule,
optimiser groups, each process's RNG, and the size of every file). The training thread only copies
the state into CPU buffers kept between saves (`take_snapshot`); `CheckpointSaver`
(checkpoint_saver.py) writes it, fsyncs every file, and renames the folder into place, so the newest
`step_*` folder is always complete. Folders written by earlier g2l versions (Accelerate's
`save_state` plus `loop_state.json`) still resume.
"""

from __future__ import annotations

import base64
import json
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from g2l_cache.errors import G2LError
from g2l_student.schedule import EMA, G2LEarlyStop, TrainState
from g2l_student.tensor_file import fsync_dir, write_safetensors

STATE_FILE = "state.json"
LOOP_STATE = "loop_state.json"  # earlier g2l versions: loop state beside Accelerate's files
CHECKPOINT_FORMAT = 1


@dataclass
class Snapshot:
    """One step's state off the training path: CPU tensors per file, and everything else as JSON."""

    step: int
    files: dict[str, dict[str, torch.Tensor]]
    state: dict


class StagingBuffers:
    """CPU copies kept from one save to the next (pinned when the state lives on a GPU), so a
    snapshot allocates nothing after the first; valid until the next snapshot overwrites them."""

    def __init__(self):
        self.held: dict[str, torch.Tensor] = {}

    def copy(self, key: str, tensor: torch.Tensor) -> torch.Tensor:
        buf = self.held.get(key)
        if buf is None or buf.shape != tensor.shape or buf.dtype != tensor.dtype:
            buf = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=tensor.is_cuda)
            self.held[key] = buf
        buf.copy_(tensor.detach(), non_blocking=tensor.is_cuda)
        return buf


def take_snapshot(accelerator, student, optimizer, scheduler, ema: EMA | None, state: TrainState,
                  early_stop: G2LEarlyStop, buffers: StagingBuffers) -> Snapshot | None:
    """Copy this step's state into `buffers` (main process; every process hands over its RNG state);
    None on the other processes, which write nothing."""
    from accelerate.utils import gather_object

    rngs = gather_object([rng_state()]) if accelerator.num_processes > 1 else [rng_state()]
    if not accelerator.is_main_process:
        return None
    opt_state = optimizer.state_dict()
    moments = {f"{i}.{k}": v for i, s in opt_state["state"].items() for k, v in s.items() if torch.is_tensor(v)}
    sources = {"model.safetensors": accelerator.unwrap_model(student).state_dict(),
               "optimizer.safetensors": moments}
    if ema is not None:
        sources["ema.safetensors"] = ema.shadow
    files = {name: {k: buffers.copy(f"{name}/{k}", v) for k, v in tensors.items()}
             for name, tensors in sources.items()}
    if any(v.is_cuda for tensors in sources.values() for v in tensors.values()):
        torch.cuda.synchronize()  # the copies were queued without waiting
    saved = {"format": CHECKPOINT_FORMAT, "step": state.step, "train": state.state_dict(),
             "early_stop": early_stop.state_dict(), "scheduler": scheduler.state_dict(),
             "optimizer": {"param_groups": opt_state["param_groups"],
                           "state": {str(i): {k: v for k, v in s.items() if not torch.is_tensor(v)}
                                     for i, s in opt_state["state"].items()}},
             "scaler": accelerator.scaler.state_dict() if accelerator.scaler is not None else None,
             "rng": rngs}
    try:
        json.dumps(saved)  # here, not in the writer thread: a state that JSON cannot hold is a bug to see now
    except TypeError as exc:
        raise G2LError(f"the training state at step {state.step} cannot be saved as JSON ({exc}).") from None
    return Snapshot(state.step, files, saved)


def write_snapshot(snapshot: Snapshot, final: Path) -> int:
    """Write a snapshot into `final` through a temp folder: every file fsynced, state.json last,
    then one rename; return the bytes written."""
    tmp = final.with_name(final.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    sizes = {name: write_safetensors(tmp / name, tensors) for name, tensors in snapshot.files.items()}
    text = json.dumps({**snapshot.state, "files": sizes})
    with open(tmp / STATE_FILE, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    fsync_dir(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    fsync_dir(final.parent)
    return sum(sizes.values()) + len(text)


def load_checkpoint(checkpoint: Path, accelerator, student, optimizer, scheduler, ema: EMA | None,
                    state: TrainState, early_stop: G2LEarlyStop) -> None:
    """Resume every piece of a run from a checkpoint folder (this format or an earlier g2l's)."""
    if not (checkpoint / STATE_FILE).is_file():
        accelerator.load_state(str(checkpoint))  # an earlier g2l's folder: Accelerate's own files
        load_loop_state(checkpoint, state, early_stop, ema)
        return
    saved = read_state(checkpoint)
    accelerator.unwrap_model(student).load_state_dict(load_file(str(checkpoint / "model.safetensors")))
    optimizer.load_state_dict(optimizer_state(saved["optimizer"], load_file(str(checkpoint / "optimizer.safetensors")),
                                              optimizer))
    scheduler.load_state_dict(saved["scheduler"])
    if accelerator.scaler is not None and saved.get("scaler"):
        accelerator.scaler.load_state_dict(saved["scaler"])
    if accelerator.process_index < len(saved["rng"]):
        restore_rng(saved["rng"][accelerator.process_index])
    restore_loop(saved, state, early_stop, ema, checkpoint)
    accelerator.step = state.micro_batch  # where gradient accumulation stands


def read_state(checkpoint: Path) -> dict:
    """A checkpoint's state.json, after checking that every file it names has the size it recorded."""
    saved = json.loads((checkpoint / STATE_FILE).read_text())
    if saved.get("format", 0) > CHECKPOINT_FORMAT:
        raise G2LError(f"checkpoint {checkpoint} was written by a newer g2l (format {saved['format']}); "
                       "upgrade g2l to resume it.")
    for name, size in saved["files"].items():
        found = (checkpoint / name).stat().st_size if (checkpoint / name).is_file() else None
        if found != size:
            raise G2LError(f"checkpoint {checkpoint} is incomplete: {name} has {found} bytes, not {size} "
                           "(copied in part?). Copy it again, or remove that folder to resume from the one before.")
    return saved


def optimizer_state(saved: dict, moments: dict[str, torch.Tensor], optimizer) -> dict:
    """An optimiser state dict from state.json's groups and scalars and the saved moment tensors."""
    state = {int(i): dict(values) for i, values in saved["state"].items()}
    for key, tensor in moments.items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = tensor
    groups = []
    for group, current in zip(saved["param_groups"], optimizer.param_groups):
        # JSON turned tuples (AdamW's betas) into lists
        groups.append({k: tuple(v) if isinstance(current.get(k), tuple) else v for k, v in group.items()})
    return {"state": state, "param_groups": groups}


def rng_state() -> dict:
    """This process's random generators as JSON: Python's, NumPy's, torch's CPU and CUDA ones."""
    version, words, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": [version, list(words), gauss], "numpy": [name, keys.tolist(), pos, has_gauss, cached],
             "torch": _b64(torch.get_rng_state())}
    if torch.cuda.is_available():
        state["cuda"] = [_b64(s) for s in torch.cuda.get_rng_state_all()]
    return state


def restore_rng(state: dict) -> None:
    """Put back the generators `rng_state` recorded (CUDA's when this machine has as many GPUs)."""
    version, words, gauss = state["python"]
    random.setstate((version, tuple(words), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(_tensor(state["torch"]))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([_tensor(s) for s in state["cuda"]])


def _b64(tensor: torch.Tensor) -> str:
    return base64.b64encode(tensor.numpy().tobytes()).decode()


def _tensor(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)


def restore_loop(saved: dict, state: TrainState, early_stop: G2LEarlyStop, ema: EMA | None, checkpoint: Path) -> None:
    """Step counters, early-stop history and the EMA (onto the device of the model it averages)."""
    state.load_state_dict(saved["train"])
    early_stop.load_state_dict(saved["early_stop"])
    if ema is not None:
        try:
            ema.load_shadow(load_file(str(checkpoint / "ema.safetensors")))
        except (OSError, ValueError) as exc:
            raise G2LError(f"checkpoint {checkpoint} has no usable ema.safetensors ({exc}); resume from another "
                           "checkpoint or start the run again with --overwrite.") from None


def load_loop_state(checkpoint: Path, state: TrainState, early_stop: G2LEarlyStop, ema: EMA | None) -> None:
    """The loop state of an earlier g2l's checkpoint (loop_state.json beside Accelerate's files)."""
    path = checkpoint / LOOP_STATE
    if not path.is_file():
        raise G2LError(f"checkpoint {checkpoint} has neither {STATE_FILE} nor {LOOP_STATE}; resume from another "
                       "checkpoint or start the run again with --overwrite.")
    restore_loop(json.loads(path.read_text()), state, early_stop, ema, checkpoint)


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
