"""The trainer's process group: rank, world size and device under ``torchrun``, or one process.

This is the trainer's process setup (DistributedDataParallel, barriers); the loss's
own collectives live in :mod:`clip_fast.clip.distributed`.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist


class ProcessGroup:
    """Process-group facts; world_size 1 when not launched by torchrun."""

    def __init__(self, device_arg: str):
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        want_cuda = device_arg.startswith("cuda") or (device_arg == "auto" and torch.cuda.is_available())
        if want_cuda:
            idx = self.local_rank if self.world_size > 1 else torch.cuda.current_device()
            if device_arg.startswith("cuda:") and self.world_size == 1:
                idx = int(device_arg.split(":")[1])
            torch.cuda.set_device(idx)
            self.device = torch.device("cuda", idx)
        else:
            self.device = torch.device(device_arg if device_arg not in ("auto",) else "cpu")
        if self.world_size > 1 and not dist.is_initialized():
            dist.init_process_group(backend="nccl" if self.device.type == "cuda" else "gloo")
            self.rank, self.world_size = dist.get_rank(), dist.get_world_size()

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

