"""The collectives of the distributed losses (contiguous buffers on the features' device:
NCCL-safe), and the ring's point-to-point exchange.

``layout`` is any ``RankLayout`` (``clip_fast.core.distributed``): this rank's place and
every rank's row count, as the distributed losses' agreement builds it."""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from .distributed import RankLayout

# P2P tags: gloo matches messages by (peer, tag); NCCL ignores tags and matches in order.
TAG_TXT, TAG_LSE, TAG_ACC, TAG_IDS = 11, 12, 13, 14
# reduce_scatter is used on NCCL; elsewhere an all_reduce (gloo lacks reduce_scatter in older
# torch).  Tests set this to run the reduce_scatter path on gloo where torch supports it.
FORCE_REDUCE_SCATTER = False


def rank_order(layout: RankLayout, rotate: bool) -> list:
    """The ranks whose rows a gathered tensor holds, in order: 0..w-1, or with ``rotate``
    this rank first (r, r+1, ..., w-1, 0, ..., r-1).

    The gather mode's strips are built rotated: this rank's own pairs then sit on the
    strips' diagonal (row i with column i), where the backends keep the label logits
    exact (the diagonal contract of ``clip_fast.clip.backends``).
    """
    w, r = layout.world_size, layout.rank
    return [(r + k) % w for k in range(w)] if rotate else list(range(w))


def all_gather_rows(x: torch.Tensor, layout: RankLayout, sizes: Optional[Tuple[int, ...]] = None,
                    rotate: bool = False) -> torch.Tensor:
    """Concatenate every rank's (n_q, ...) tensor in ``rank_order``; unequal n_q are padded.

    ``sizes``: the rows of every rank's tensor (default: the features' ``layout.sizes``).
    """
    sizes = layout.sizes if sizes is None else sizes
    n_max, w = max(sizes), layout.world_size
    x = x.contiguous()
    if x.shape[0] < n_max:
        x = torch.cat([x, x.new_zeros((n_max - x.shape[0],) + tuple(x.shape[1:]))])
    out = x.new_empty((w, n_max) + tuple(x.shape[1:]))
    order = rank_order(layout, rotate)
    slots = out.unbind(0)
    # all_gather writes rank q's tensor into list entry q: entry q is q's slot in ``order``.
    dist.all_gather([slots[order.index(q)] for q in range(w)], x, group=layout.group)
    if all(n == n_max for n in sizes):
        return out.reshape((-1,) + tuple(x.shape[1:]))
    return torch.cat([out[k, :sizes[q]] for k, q in enumerate(order)])


def _roll_slots_(t: torch.Tensor, shift: int) -> torch.Tensor:
    """``t.roll(shift, 0)`` in place, with one slot of scratch (three reversals)."""
    w = t.shape[0]
    shift %= w
    tmp = None

    def reverse(lo: int, hi: int) -> None:
        nonlocal tmp
        hi -= 1
        while lo < hi:
            tmp = t[lo].clone() if tmp is None else tmp.copy_(t[lo])
            t[lo].copy_(t[hi])
            t[hi].copy_(tmp)
            lo, hi = lo + 1, hi - 1

    if shift:
        reverse(0, w)
        reverse(0, shift)
        reverse(shift, w)
    return t


def reduce_scatter_rows(full: torch.Tensor, layout: RankLayout, sizes: Optional[Tuple[int, ...]] = None,
                        rotated: bool = False) -> torch.Tensor:
    """Sum an (N, D) tensor over ranks and return this rank's (n_r, D) rows.

    ``sizes``: the rows of every rank's block of ``full`` (default: ``layout.sizes``);
    ``rotated``: ``full``'s blocks are in ``rank_order(layout, True)`` (as ``all_gather_rows``
    with ``rotate`` built them), and ``full`` is reordered in place (no (N, D) copy).
    """
    sizes = layout.sizes if sizes is None else sizes
    n_max, w, n_local = max(sizes), layout.world_size, sizes[layout.rank]
    if all(n == n_max for n in sizes):
        padded = full.contiguous().view(w, n_max, full.shape[1])
        if rotated:  # slot k holds rank (r + k) % w: rolled by r, slot q holds rank q
            _roll_slots_(padded, layout.rank)
    else:
        padded = full.new_zeros(w, n_max, full.shape[1])
        o = 0
        for q in rank_order(layout, rotated):
            padded[q, :sizes[q]] = full[o:o + sizes[q]]
            o += sizes[q]
    if layout.nccl or FORCE_REDUCE_SCATTER:
        out = padded.new_empty(n_max, padded.shape[2])
        dist.reduce_scatter_tensor(out, padded.view(w * n_max, -1), group=layout.group)
    else:  # gloo and others: all_reduce (twice the traffic, supported everywhere)
        dist.all_reduce(padded, group=layout.group)
        return padded[layout.rank, :n_local].clone()  # a copy: lets the (N, D) buffer go
    return out[:n_local]


def unrotate(v: torch.Tensor, layout: RankLayout) -> torch.Tensor:
    """An (N,) vector over a rotated strip's rows or columns, back in rank order (along the
    last axis: a leading axis, one row per loss size, is kept)."""
    return torch.roll(v, layout.offsets[layout.rank], -1) if layout.world_size > 1 else v


def rotate(v: torch.Tensor, layout: RankLayout) -> torch.Tensor:
    """An (N,) vector in rank order, in ``rank_order(layout, True)``'s order (this rank first;
    along the last axis, as ``unrotate``)."""
    return torch.roll(v, -layout.offsets[layout.rank], -1) if layout.world_size > 1 else v


def logsumexp_across_ranks(partial: torch.Tensor, layout: RankLayout) -> torch.Tensor:
    """Elementwise logsumexp over ranks of an (N,) tensor: a max and a sum all_reduce."""
    top = partial.clone()
    dist.all_reduce(top, op=dist.ReduceOp.MAX, group=layout.group)
    total = (partial - top).exp_()
    dist.all_reduce(total, group=layout.group)
    return top + total.log_()


class Ring:
    """Point-to-point exchange with the ranks ``step`` away: send to r + step, receive from
    r - step (the default, 1: the ring neighbours; a negative step sends the other way)."""

    def __init__(self, layout: RankLayout, step: int = 1):
        w, r, group = layout.world_size, layout.rank, layout.group
        nxt, prv = (r + step) % w, (r - step) % w
        if group is not None:
            nxt, prv = dist.get_global_rank(group, nxt), dist.get_global_rank(group, prv)
        self.nxt, self.prv, self.group = nxt, prv, group

    def exchange(self, sends: Sequence[torch.Tensor], recvs: Sequence[torch.Tensor],
                 tags: Sequence[int]) -> list:
        ops = [dist.P2POp(dist.isend, t, self.nxt, self.group, tag) for t, tag in zip(sends, tags)]
        ops += [dist.P2POp(dist.irecv, t, self.prv, self.group, tag) for t, tag in zip(recvs, tags)]
        return dist.batch_isend_irecv(ops)

    def swap(self, send: torch.Tensor, recv_shape, tag: int = TAG_TXT) -> torch.Tensor:
        """Send ``send`` to r + step and return the ``recv_shape`` tensor received from r - step."""
        recv = send.new_empty(recv_shape)
        wait_all(self.exchange([send.contiguous()], [recv], [tag]))
        return recv


def wait_all(works: list) -> None:
    for w in works:
        w.wait()
