"""The distributed primitives every loss shares: the place of this process (``rank``,
``world_size``) checked one way, the check that ``torch.distributed`` is running, and
what the collectives (``clip_fast.core.collectives``) read of a layout."""
from __future__ import annotations

from typing import Optional, Protocol, Tuple

import torch.distributed as dist


class RankLayout(Protocol):
    """What the collectives read of a distributed call's layout
    (``clip_fast.clip.distributed.agreement.Layout`` is one)."""
    rank: int
    world_size: int
    group: Optional[object]           # the process group (None: the world)
    nccl: bool                        # whether the group's backend is NCCL
    sizes: Tuple[int, ...]            # every rank's row count
    offsets: Tuple[int, ...]          # every rank's first row in the gathered rows


def check_world_size(world_size, rank) -> None:
    """``world_size``: an int >= 1 (not a bool); ``rank``: an int in [0, world_size)."""
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be an int >= 1, got {world_size!r}")
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"rank must be an int in [0, world_size={world_size}), got {rank!r}")


def require_initialized(world_size: int) -> None:
    """Raise unless ``torch.distributed`` is available and initialised (``world_size > 1``)."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            f"clip_fast: world_size={world_size} > 1 needs torch.distributed to be initialised "
            "(torch.distributed.init_process_group, e.g. under torchrun)")
