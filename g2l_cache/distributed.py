"""Process-group facts for multi-GPU / multi-node runs (torchrun, accelerate launch), or one process."""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as torch_dist


@dataclass
class DistContext:
    """Rank, world size and device of this process, with a barrier that is a no-op when alone."""

    rank: int
    world_size: int
    device: torch.device

    @classmethod
    def from_env(cls, cpu: bool = False) -> "DistContext":
        """Join the process group that torchrun / accelerate launch describe in the environment."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        use_cuda = torch.cuda.is_available() and not cpu
        if world <= 1:
            return cls(0, 1, torch.device("cuda" if use_cuda else "cpu"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        device = torch.device(f"cuda:{local_rank}") if use_cuda else torch.device("cpu")
        if use_cuda:
            torch.cuda.set_device(device)
        if not torch_dist.is_initialized():
            # Ranks that finish their shards early wait at the barrier while others still work.
            torch_dist.init_process_group(backend="nccl" if use_cuda else "gloo",
                                          timeout=timedelta(hours=48))
        return cls(torch_dist.get_rank(), torch_dist.get_world_size(), device)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            if self.device.type == "cuda":
                torch_dist.barrier(device_ids=[self.device.index])
            else:
                torch_dist.barrier()

    def all_sum(self, value: int) -> int:
        """Sum an integer over all ranks."""
        if self.world_size == 1:
            return value
        t = torch.tensor([value], dtype=torch.int64, device=self.device)
        torch_dist.all_reduce(t)
        return int(t.item())
