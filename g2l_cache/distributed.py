"""Process-group facts for multi-GPU / multi-node runs (torchrun, accelerate launch), or one process."""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch


@dataclass
class DistContext:
    """Rank, world size and device of this process, with a barrier that is a no-op when alone."""

    rank: int
    world_size: int
    device: torch.device
    _state: object = None

    @classmethod
    def from_env(cls, cpu: bool = False) -> "DistContext":
        """Join the process group that torchrun/accelerate set up in the environment, if any."""
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            from accelerate import PartialState

            # Ranks that finish their shards early wait at the barrier while others work.
            state = PartialState(cpu=cpu, timeout=timedelta(hours=48))
            return cls(state.process_index, state.num_processes, state.device, state)
        device = torch.device("cuda" if torch.cuda.is_available() and not cpu else "cpu")
        return cls(0, 1, device)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self._state is not None:
            self._state.wait_for_everyone()
