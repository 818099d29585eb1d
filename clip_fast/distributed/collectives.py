"""The collectives of the distributed losses (contiguous buffers on the features' device:
NCCL-safe), and the ring's point-to-point exchange."""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from .agreement import Layout

# P2P tags: gloo matches messages by (peer, tag); NCCL ignores tags and matches in order.
TAG_TXT, TAG_LSE, TAG_ACC, TAG_IDS = 11, 12, 13, 14
# reduce_scatter is used on NCCL; elsewhere an all_reduce (gloo lacks reduce_scatter in older
# torch).  Tests set this to run the reduce_scatter path on gloo where torch supports it.
FORCE_REDUCE_SCATTER = False


def all_gather_rows(x: torch.Tensor, layout: Layout, sizes: Optional[Tuple[int, ...]] = None) -> torch.Tensor:
    """Concatenate every rank's (n_q, ...) tensor in rank order; unequal n_q are padded.

    ``sizes``: the rows of every rank's tensor (default: the features' ``layout.sizes``).
    """
    sizes = layout.sizes if sizes is None else sizes
    n_max = max(sizes)
    x = x.contiguous()
    if x.shape[0] < n_max:
        x = torch.cat([x, x.new_zeros((n_max - x.shape[0],) + tuple(x.shape[1:]))])
    out = x.new_empty((layout.world_size, n_max) + tuple(x.shape[1:]))
    dist.all_gather(list(out.unbind(0)), x, group=layout.group)
    if all(n == n_max for n in sizes):
        return out.reshape((-1,) + tuple(x.shape[1:]))
    return torch.cat([out[q, :n] for q, n in enumerate(sizes)])


def reduce_scatter_rows(full: torch.Tensor, layout: Layout, sizes: Optional[Tuple[int, ...]] = None
                        ) -> torch.Tensor:
    """Sum an (N, D) tensor over ranks and return this rank's (n_r, D) rows.

    ``sizes``: the rows of every rank's block of ``full`` (default: ``layout.sizes``).
    """
    sizes = layout.sizes if sizes is None else sizes
    n_max, w, n_local = max(sizes), layout.world_size, sizes[layout.rank]
    if all(n == n_max for n in sizes):
        padded = full.contiguous().view(w, n_max, full.shape[1])
    else:
        padded = full.new_zeros(w, n_max, full.shape[1])
        o = 0
        for q, n in enumerate(sizes):
            padded[q, :n] = full[o:o + n]
            o += n
    if layout.nccl or FORCE_REDUCE_SCATTER:
        out = padded.new_empty(n_max, padded.shape[2])
        dist.reduce_scatter_tensor(out, padded.view(w * n_max, -1), group=layout.group)
    else:  # gloo and others: all_reduce (twice the traffic, supported everywhere)
        dist.all_reduce(padded, group=layout.group)
        return padded[layout.rank, :n_local].clone()  # a copy: lets the (N, D) buffer go
    return out[:n_local]


def logsumexp_across_ranks(partial: torch.Tensor, layout: Layout) -> torch.Tensor:
    """Elementwise logsumexp over ranks of an (N,) tensor: a max and a sum all_reduce."""
    top = partial.clone()
    dist.all_reduce(top, op=dist.ReduceOp.MAX, group=layout.group)
    total = (partial - top).exp_()
    dist.all_reduce(total, group=layout.group)
    return top + total.log_()


class Ring:
    """Point-to-point exchange with the ring neighbours (send to r+1, receive from r-1)."""

    def __init__(self, layout: Layout):
        w, r, group = layout.world_size, layout.rank, layout.group
        nxt, prv = (r + 1) % w, (r - 1) % w
        if group is not None:
            nxt, prv = dist.get_global_rank(group, nxt), dist.get_global_rank(group, prv)
        self.nxt, self.prv, self.group = nxt, prv, group

    def exchange(self, sends: Sequence[torch.Tensor], recvs: Sequence[torch.Tensor],
                 tags: Sequence[int]) -> list:
        ops = [dist.P2POp(dist.isend, t, self.nxt, self.group, tag) for t, tag in zip(sends, tags)]
        ops += [dist.P2POp(dist.irecv, t, self.prv, self.group, tag) for t, tag in zip(recvs, tags)]
        return dist.batch_isend_irecv(ops)


def wait_all(works: list) -> None:
    for w in works:
        w.wait()
