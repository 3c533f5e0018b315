"""Small stateful pieces of training: LR schedule, G2L early stop, EMA, and the step counters."""

from __future__ import annotations

import math
from collections import deque

import torch


def cosine_with_warmup(optimizer: torch.optim.Optimizer, warmup: int, total: int,
                       early_stop: "G2LEarlyStop | None" = None):
    """Linear warmup to the base LR over `warmup` steps, then cosine decay to 0 at `total`; once
    `early_stop` has fired, also its linear cool-down to 0."""
    def factor(step: int) -> float:
        if step < warmup:
            base = (step + 1) / warmup
        else:
            progress = (step - warmup) / max(1, total - warmup)
            base = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return base * (early_stop.lr_factor(step) if early_stop is not None else 1.0)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class G2LEarlyStop:
    """The G2L paper's rule on a smoothed loss, with a cool-down before the stop.

    The loss is smoothed by an exponential moving average (`smoothing`: weight of the old value);
    the rule fires once the smoothed loss has been above the mean of its previous `window` values
    more than `patience` times in a row, but never before `min_step` (a noisy loss that is still
    falling early on is no reason to stop). Then the learning rate falls linearly to 0 over
    `cooldown` steps and training stops (`update` returns True) at the end of that tail.
    """

    def __init__(self, window: int = 100, patience: int = 10, smoothing: float = 0.9, min_step: int = 0,
                 cooldown: int = 0):
        self.window, self.patience, self.smoothing = window, patience, smoothing
        self.min_step, self.cooldown = min_step, cooldown
        self.history: deque = deque(maxlen=window)
        self.exceeded = 0
        self.smoothed: float | None = None
        self.step = 0
        self.fired_at: int | None = None

    def update(self, loss: float) -> bool:
        """Record one step's loss; True when training should stop (the cool-down is over)."""
        self.step += 1
        self.smoothed = loss if self.smoothed is None else \
            self.smoothing * self.smoothed + (1 - self.smoothing) * loss
        if self.fired_at is None:
            if len(self.history) == self.window:
                mean = sum(self.history) / self.window
                self.exceeded = self.exceeded + 1 if self.smoothed > mean else 0
            self.history.append(self.smoothed)
            if self.exceeded > self.patience and self.step >= self.min_step:
                self.fired_at = self.step
        return self.fired_at is not None and self.step >= self.fired_at + self.cooldown

    def lr_factor(self, step: int) -> float:
        """Multiplier of the learning rate at scheduler step `step`: 1, then the cool-down ramp."""
        if self.fired_at is None:
            return 1.0
        return max(0.0, 1 - (step - self.fired_at) / max(1, self.cooldown))

    def state_dict(self) -> dict:
        return {"history": list(self.history), "exceeded": self.exceeded, "smoothed": self.smoothed,
                "step": self.step, "fired_at": self.fired_at}

    def load_state_dict(self, state: dict) -> None:
        self.history = deque(state["history"], maxlen=self.window)
        self.exceeded, self.smoothed = state["exceeded"], state["smoothed"]
        self.step, self.fired_at = state["step"], state["fired_at"]


class EMA:
    """Exponential moving average of a model's floating-point weights."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.shadow = {k: v.detach().clone().float() for k, v in model.state_dict().items()
                       if v.dtype.is_floating_point}

    def load_shadow(self, tensors: dict[str, torch.Tensor]) -> None:
        """Take saved shadow weights (read onto the CPU), each onto the device of the weight it averages."""
        missing = sorted(set(self.shadow) - set(tensors))
        if missing:
            raise ValueError(f"the saved EMA lacks {len(missing)} weights, e.g. {missing[0]}")
        self.shadow = {k: tensors[k].to(device=v.device, dtype=torch.float32) for k, v in self.shadow.items()}

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        """shadow <- decay * shadow + (1 - decay) * weights, for every float tensor at once."""
        current = model.state_dict()
        # One multi-tensor kernel instead of two launches per tensor (hundreds on a ViT-L).
        torch._foreach_lerp_(list(self.shadow.values()),
                             [current[k].detach().float() for k in self.shadow], 1 - self.decay)


class TrainState:
    """Where training is: optimiser steps done and micro-batches consumed (epochs follow from it)."""

    def __init__(self):
        self.step = 0
        self.micro_batch = 0

    def state_dict(self) -> dict:
        return {"step": self.step, "micro_batch": self.micro_batch}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.micro_batch = state["step"], state["micro_batch"]
