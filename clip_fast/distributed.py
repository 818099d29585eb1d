"""The CLIP loss over a ``torch.distributed`` process group, without N x N logits.

``FastClipLoss(rank=r, world_size=w, ...)`` calls :func:`distributed_clip_loss` when
``w > 1``.  Each rank holds its own shard ``img_r, txt_r`` of ``n_r`` rows; the global
batch is the concatenation in rank order (``N = sum n_r``, rank r's rows start at
``o_r = n_0 + ... + n_{r-1}``) and ``S = scale * IMG @ TXT.T + bias`` is never formed.
Every sweep is a backend call (``lse_forward`` / ``grad_backward``) on a rectangular block.

Two modes.

``mode="gather"`` reproduces open_clip's ``ClipLoss`` for all four flag combinations:
the loss value and every rank's gradients are those of ``ClipLoss`` run on the same
shards (``d_logit_scale`` included: the gradient of the loss *that rank* computed).

    forward   all_gather IMG, TXT (N x D)                      open_clip does the same
              row strip (img_r, TXT): lse_row of rank r's rows, column partials (N,)
              lse_col = logsumexp over ranks of the partials   2 all_reduce of N floats
              not local_loss: all_gather lse_row (N floats); every rank forms the global loss
    backward  row strip (img_r, TXT) -> d img_r      column strip (IMG, txt_r) -> d txt_r
              local_loss, gather_with_grad: the strips' other outputs (the gradient that
              rank r's loss sends to the other ranks' features) are reduce-scattered,
              exactly like the backward of open_clip's ``torch.distributed.nn.all_gather``.
              not local_loss: one all_reduce of 2 floats (d_scale of the global loss).

``mode="ring"`` has the ``local_loss=True, gather_with_grad=True`` semantics and never
holds another rank's whole embeddings: text blocks travel around the ring.  At step k
rank r holds ``txt_q`` (q = r - k mod w) and sweeps the block (img_r, txt_q) once:

    forward   the block's row lse partials merge into img_r's running lse_row (kept);
              its column partials merge (logaddexp) into an accumulator that travels
              with txt_q and arrives home complete after w hops.
    backward  the block's G = c_r P_row + c_q P_col (- 2 c_r I on the own block) gives
              d img_r (kept) and d txt_q, which adds into an accumulator that travels
              with txt_q and arrives home complete.  Each tile is swept once per pass
              for both directions; c_q = g_q / (2 n_q) with g_q rank q's upstream gradient.
    per step  forward: txt block (n D elements, input dtype) + n floats;
              backward: txt block + n floats + the n x D float32 gradient accumulator.
    overlap   the next text block is posted (isend/irecv) before the current block's
              sweep; the small accumulators are posted after it and only waited for
              when the next block merges them, one sweep later.
    memory    O(n_max * D) per rank: two text buffers and two accumulators, whatever w is.

Ring-mode ``d_logit_scale``: each block's sweep yields one scalar that mixes rank r's own
loss (rows) and rank q's loss (columns), so a rank cannot isolate the gradient of its own
loss without a second sweep.  Ring mode therefore gives every rank the average
``(1/w) sum_q d loss_q / d scale`` (one all_reduce of one float).  Summed or averaged over
ranks, as DDP does, this equals open_clip's per-rank values exactly; the per-rank values
themselves differ from open_clip's.  Feature gradients match open_clip per rank exactly.

Unequal shard sizes are supported in both modes: labels are offset by ``o_r`` and every
mean is over the rows it covers (open_clip itself cannot gather unequal shards).

Robustness: before any other collective, one ``all_gather`` of a small int64 descriptor
(shapes, dtype, flags, rank, scale and bias bits, grad mode, local errors) lets every rank
raise the same ``ValueError`` when any shard is bad, instead of hanging.  All ranks must
call the loss, and its backward, in the same order (as with open_clip's gather).
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from . import backends
from ._autograd import autocast_off, first_order_only, fresh_output
from ._validation import check_inputs
from .functional import autocast_features

MODES = ("gather", "ring")
_DTYPE_CODES = {torch.float16: 1, torch.bfloat16: 2, torch.float32: 3, torch.float64: 4}
_DTYPE_NAMES = {v: str(k) for k, v in _DTYPE_CODES.items()}
_DEVICE_CODES = {"cpu": 1, "cuda": 2}
# P2P tags: gloo matches messages by (peer, tag); NCCL ignores tags and matches in order.
_TAG_TXT, _TAG_LSE, _TAG_ACC = 11, 12, 13
# reduce_scatter is used on NCCL; elsewhere an all_reduce (gloo lacks reduce_scatter in older
# torch).  Tests set this to run the reduce_scatter path on gloo where torch supports it.
_FORCE_REDUCE_SCATTER = False


@dataclass(frozen=True)
class _Layout:
    """Everything the two autograd Functions need besides tensors (same on every rank)."""
    rank: int
    world_size: int
    sizes: Tuple[int, ...]  # rows per rank
    local_loss: bool
    gather_with_grad: bool
    backend: str  # resolved backend name
    chunk_size: Optional[int]
    loss_dtype: Optional[torch.dtype]
    group: Optional[object]
    nccl: bool

    @property
    def offsets(self) -> Tuple[int, ...]:
        out, acc = [], 0
        for n in self.sizes:
            out.append(acc)
            acc += n
        return tuple(out)

    @property
    def n_local(self) -> int:
        return self.sizes[self.rank]

    def kwargs(self) -> dict:
        return {"chunk_size": self.chunk_size} if self.backend == "torch" and self.chunk_size else {}


def distributed_clip_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale,
                          logit_bias=None, *, rank: int, world_size: int, local_loss: bool = False,
                          gather_with_grad: bool = False, mode: str = "gather", backend: str = "auto",
                          chunk_size: Optional[int] = None, group=None) -> torch.Tensor:
    """The CLIP loss of a batch sharded over ``group`` (default: the world), as a scalar.

    Args:
        image_features, text_features: this rank's (n_r, D) shard; n_r may differ across ranks.
        logit_scale, logit_bias: as in ``clip_loss``; must be bitwise equal on every rank.
        rank, world_size: this process's rank in ``group`` and the group's size (checked).
        local_loss, gather_with_grad: open_clip's meaning (``mode="gather"``).
        mode: "gather" (open_clip's semantics) or "ring" (requires ``local_loss=True`` and
            ``gather_with_grad=True``: those are the semantics it computes).
        backend, chunk_size: as in ``clip_loss``.
        group: a ``torch.distributed`` process group, or None for the default group.

    Every rank must call this (and the backward) collectively.  A bad shard on any rank
    makes every rank raise the same ValueError.
    """
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            f"clip_fast: world_size={world_size} > 1 needs torch.distributed to be initialised "
            "(torch.distributed.init_process_group, e.g. under torchrun)"
        )
    layout, img, txt, scale, bias = _check_across_ranks(
        image_features, text_features, logit_scale, logit_bias, rank=rank, world_size=world_size,
        local_loss=local_loss, gather_with_grad=gather_with_grad, mode=mode, backend=backend,
        chunk_size=chunk_size, group=group)
    fn = _RingClipLoss if mode == "ring" else _GatherClipLoss
    if layout.loss_dtype is not None:  # autocast: features already cast, the loss in float32
        with torch.autocast(img.device.type, enabled=False):
            return fn.apply(img, txt, scale, bias, layout)
    return fn.apply(img, txt, scale, bias, layout)


# --------------------------------------------------------------------------------------
# 1. Validation: one all_gather of a small descriptor, then the same verdict on every rank.
# --------------------------------------------------------------------------------------

def _comm_device(group, img) -> torch.device:
    name = str(dist.get_backend(group)).lower()
    if name == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    if name == "gloo":
        return torch.device("cpu")
    return img.device if isinstance(img, torch.Tensor) else torch.device("cpu")


def _f64_bits(t: Optional[torch.Tensor]) -> int:
    if t is None:
        return 0
    return struct.unpack("<q", struct.pack("<d", float(t.detach().reshape(()).double().item())))[0]


def _check_across_ranks(img, txt, logit_scale, logit_bias, *, rank, world_size, local_loss,
                        gather_with_grad, mode, backend, chunk_size, group):
    group_size = dist.get_world_size(group)
    comm_name = str(dist.get_backend(group)).lower()
    local_error = None
    scale = bias = None
    backend_name = ""
    loss_dtype = None
    try:
        # Local checks; any failure is reported to every rank below, never raised alone.
        scale, bias = check_inputs(img, txt, logit_scale, logit_bias)
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
                                       or chunk_size < 1):
            raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
        if comm_name == "nccl":
            want = torch.device("cuda", torch.cuda.current_device())
            if img.device != want:
                raise ValueError(
                    f"the NCCL process group needs the features on the current CUDA device {want}, got "
                    f"image_features on {img.device}; call torch.cuda.set_device(local_rank) first")
        elif comm_name == "gloo" and img.device.type != "cpu":
            raise ValueError(f"the gloo process group needs CPU features, got image_features on {img.device}; "
                             "use the nccl backend for CUDA tensors")
        img, txt, loss_dtype = autocast_features(img, txt)
        if txt is img:  # one tensor for both towers: two distinct Function inputs (compile)
            txt = txt.view_as(txt)
        backend_name = backends.resolve_backend(backend, img.device, img.dtype).NAME
    except Exception as exc:  # anything raised here alone would leave the other ranks hanging
        local_error = f"{type(exc).__name__}: {exc}"

    ok = local_error is None
    needs_grad = ok and torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (img, txt, scale, bias))
    header = [
        0 if ok else 1,
        img.shape[0] if ok else -1, img.shape[1] if ok else -1,
        _DTYPE_CODES.get(img.dtype, 0) if ok else 0,
        _DEVICE_CODES.get(img.device.type, 3) if ok else 0,
        int(bias is not None), int(bool(local_loss)), int(bool(gather_with_grad)),
        MODES.index(mode) if mode in MODES else -1,
        rank if isinstance(rank, int) else -1, world_size if isinstance(world_size, int) else -1,
        _f64_bits(scale) if ok else 0, _f64_bits(bias) if ok else 0, int(needs_grad),
    ]
    device = _comm_device(group, img)
    table = torch.tensor(header, dtype=torch.int64, device=device)
    gathered = [torch.empty_like(table) for _ in range(group_size)]
    dist.all_gather(gathered, table, group=group)
    rows = [t.tolist() for t in gathered]

    bad = [q for q, row in enumerate(rows) if row[0]]
    if bad:
        messages: List[Optional[str]] = [None] * group_size
        dist.all_gather_object(messages, local_error, group=group)
        detail = "\n".join(f"  rank {q}: {messages[q]}" for q in bad)
        raise ValueError(f"clip_fast distributed loss: invalid input on rank(s) {bad}:\n{detail}")

    def column(i):
        return [row[i] for row in rows]

    def mismatch(what, values, hint=""):
        listing = ", ".join(f"rank {q}: {v}" for q, v in enumerate(values))
        raise ValueError(f"clip_fast distributed loss: {what} differs across ranks ({listing}){hint}")

    if column(9) != list(range(group_size)):
        raise ValueError(
            f"clip_fast distributed loss: the rank= arguments were {column(9)} but the process group's "
            f"ranks are {list(range(group_size))}; pass rank=torch.distributed.get_rank()")
    if column(10) != [group_size] * group_size:
        raise ValueError(
            f"clip_fast distributed loss: the world_size= arguments were {column(10)} but the process "
            f"group has {group_size} ranks; pass world_size=torch.distributed.get_world_size()")
    if len(set(column(2))) > 1:
        mismatch("the embedding dimension D", column(2))
    if len(set(column(3))) > 1:
        mismatch("the features' dtype", [_DTYPE_NAMES.get(c, "?") for c in column(3)])
    if len(set(column(4))) > 1:
        mismatch("the features' device type", column(4), " (codes: 1 cpu, 2 cuda)")
    if len(set(column(6))) > 1 or len(set(column(7))) > 1 or len(set(column(8))) > 1:
        mismatch("(local_loss, gather_with_grad, mode)",
                 [(bool(a), bool(b), MODES[m]) for a, b, m in zip(column(6), column(7), column(8))])
    if len(set(column(5))) > 1:
        mismatch("whether logit_bias is given", [bool(v) for v in column(5)])
    if len(set(column(11))) > 1 or len(set(column(12))) > 1:
        mismatch("(logit_scale, logit_bias)",
                 [(struct.unpack("<d", struct.pack("<q", a))[0], struct.unpack("<d", struct.pack("<q", b))[0])
                  for a, b in zip(column(11), column(12))],
                 "; they must be equal on every rank, as DDP keeps parameters")
    if len(set(column(13))) > 1:
        mismatch("whether the loss needs gradients", [bool(v) for v in column(13)],
                 "; the backward is collective, so every rank must run it")
    if mode == "ring" and not (local_loss and gather_with_grad):
        raise ValueError(
            "clip_fast distributed loss: mode='ring' computes the local_loss=True, gather_with_grad=True "
            f"semantics; got local_loss={bool(local_loss)}, gather_with_grad={bool(gather_with_grad)}. "
            "Pass both as True, or use mode='gather'")

    layout = _Layout(rank=rank, world_size=group_size, sizes=tuple(column(1)),
                     local_loss=bool(local_loss), gather_with_grad=bool(gather_with_grad),
                     backend=backend_name, chunk_size=chunk_size, loss_dtype=loss_dtype,
                     group=group, nccl=comm_name == "nccl")
    return layout, img, txt, scale, bias


# --------------------------------------------------------------------------------------
# 2. Collective helpers (contiguous buffers on the features' device: NCCL-safe).
# --------------------------------------------------------------------------------------

def _all_gather_rows(x: torch.Tensor, layout: _Layout) -> torch.Tensor:
    """Concatenate every rank's (n_q, ...) tensor in rank order; unequal n_q are padded."""
    sizes, n_max = layout.sizes, max(layout.sizes)
    x = x.contiguous()
    if x.shape[0] < n_max:
        x = torch.cat([x, x.new_zeros((n_max - x.shape[0],) + tuple(x.shape[1:]))])
    out = x.new_empty((layout.world_size, n_max) + tuple(x.shape[1:]))
    dist.all_gather(list(out.unbind(0)), x, group=layout.group)
    if all(n == n_max for n in sizes):
        return out.reshape((-1,) + tuple(x.shape[1:]))
    return torch.cat([out[q, :n] for q, n in enumerate(sizes)])


def _reduce_scatter_rows(full: torch.Tensor, layout: _Layout) -> torch.Tensor:
    """Sum an (N, D) tensor over ranks and return this rank's (n_r, D) rows."""
    sizes, n_max, w = layout.sizes, max(layout.sizes), layout.world_size
    if all(n == n_max for n in sizes):
        padded = full.contiguous().view(w, n_max, -1)
    else:
        padded = full.new_zeros(w, n_max, full.shape[1])
        for q, (o, n) in enumerate(zip(layout.offsets, sizes)):
            padded[q, :n] = full[o:o + n]
    if layout.nccl or _FORCE_REDUCE_SCATTER:
        out = padded.new_empty(n_max, padded.shape[2])
        dist.reduce_scatter_tensor(out, padded.view(w * n_max, -1), group=layout.group)
    else:  # gloo and others: all_reduce (twice the traffic, supported everywhere)
        dist.all_reduce(padded, group=layout.group)
        return padded[layout.rank, :layout.n_local].clone()  # a copy: lets the (N, D) buffer go
    return out[:layout.n_local]


def _logsumexp_across_ranks(partial: torch.Tensor, layout: _Layout) -> torch.Tensor:
    """Elementwise logsumexp over ranks of an (N,) tensor: a max and a sum all_reduce."""
    top = partial.clone()
    dist.all_reduce(top, op=dist.ReduceOp.MAX, group=layout.group)
    total = (partial - top).exp_()
    dist.all_reduce(total, group=layout.group)
    return top + total.log_()


def _rowdot(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """<a_i, b_i> for every row, accumulated in ``dtype``."""
    return (a.to(dtype) * b.to(dtype)).sum(dim=1)


def _scalar(t: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
    return None if t is None else t.detach().reshape(()).to(dtype)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _backend_args(layout: _Layout, scale, bias, acc: torch.dtype):
    """The backend module, its keyword arguments, and scale as a 0-d ``acc`` tensor.

    The bias is returned as None: it shifts every logit equally, so it cancels from every
    softmax of this loss and is kept out of the arithmetic.
    """
    return backends.get_loaded(layout.backend), layout.kwargs(), _scalar(scale, acc), None


def _finish(d_img, d_txt, d_scale, img, txt, scale, bias, needs):
    """Cast the float32/64 gradients back to the inputs' dtypes and shapes."""
    return (d_img.to(img.dtype) if needs[0] else None,
            d_txt.to(txt.dtype) if needs[1] else None,
            d_scale.to(scale.dtype).reshape(scale.shape) if needs[2] else None,
            torch.zeros_like(bias) if bias is not None and needs[3] else None,
            None)


# --------------------------------------------------------------------------------------
# 3. Gather mode: open_clip's semantics, strips of the global logits.
# --------------------------------------------------------------------------------------

class _GatherClipLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, img, txt, scale, bias, layout: _Layout):
        acc = _acc_dtype(img.dtype)
        impl, kw, s, b = _backend_args(layout, scale, bias, acc)
        n, o = layout.n_local, layout.offsets[layout.rank]
        img, txt = img.contiguous(), txt.contiguous()
        # 1. Everyone's features (the no-grad copies of open_clip's gather).
        all_img, all_txt = _all_gather_rows(img, layout), _all_gather_rows(txt, layout)
        # 2. Row strip: complete lse for this rank's rows, column partials over them.
        lse_row, col_partial, _ = impl.lse_forward(img, all_txt, s, b, **kw)
        # 3. Complete column lse: logsumexp of every rank's partials.
        lse_col = _logsumexp_across_ranks(col_partial, layout)
        dot = _rowdot(img, txt, acc)  # <img_i, txt_i>: the label logits are s * dot + b
        if layout.local_loss:
            diag = s * dot + (b if b is not None else 0.0)
            loss = ((lse_row - diag).mean() + (lse_col[o:o + n] - diag).mean()) / 2
            lse_row_all = None
        else:  # every rank forms the same global loss from the same gathered values
            lse_row_all = _all_gather_rows(lse_row, layout)
            diag_all = s * _rowdot(all_img, all_txt, acc) + (b if b is not None else 0.0)
            loss = ((lse_row_all - diag_all).mean() + (lse_col - diag_all).mean()) / 2
        ctx.save_for_backward(img, txt, scale, bias, all_img, all_txt, lse_row, lse_col, lse_row_all, dot)
        ctx.layout = layout
        return fresh_output(loss, layout.loss_dtype or img.dtype)

    @staticmethod
    @autocast_off
    def backward(ctx, grad_loss):
        img, txt, scale, bias, all_img, all_txt, lse_row, lse_col, lse_row_all, dot = ctx.saved_tensors
        layout: _Layout = ctx.layout
        acc = _acc_dtype(img.dtype)
        impl, kw, s, b = _backend_args(layout, scale, bias, acc)
        g = grad_loss.detach().reshape(()).to(acc)
        n, o = layout.n_local, layout.offsets[layout.rank]
        if layout.local_loss:
            # loss_r = (mean_i CE(S[o+i, :]) + mean_j CE(S[:, o+j])) / 2 over this rank's rows/columns.
            # The strips' (N, D) outputs are the gradient of this rank's loss w.r.t. the other
            # ranks' gathered features; with gather_with_grad they are summed on their owners
            # (the backward of open_clip's all_gather), else dropped.  One lives at a time.
            c = 1.0 / (2 * n)
            d_img, d_all, ds_row = impl.grad_backward(img, all_txt, s, b, lse_row, None, c, 0.0, 0.0, **kw)
            from_others_txt = _reduce_scatter_rows(d_all.mul_(g), layout) if layout.gather_with_grad else None
            del d_all
            d_all, d_txt, ds_col = impl.grad_backward(all_img, txt, s, b, None, lse_col[o:o + n].contiguous(),
                                                      0.0, c, 0.0, **kw)
            from_others_img = _reduce_scatter_rows(d_all.mul_(g), layout) if layout.gather_with_grad else None
            del d_all
            d_scale = (ds_row + ds_col - 2 * c * dot.sum()) * g
            d_img, d_txt = d_img.mul_(g), d_txt.mul_(g)
            if layout.gather_with_grad:
                d_img, d_txt = d_img.add_(from_others_img), d_txt.add_(from_others_txt)
                label = 2 * c  # both label logits reach both own features
            else:
                label = c  # the gathered copies are constants: one label logit each
            d_img.sub_(txt.to(acc) * (label * g * s))
            d_txt.sub_(img.to(acc) * (label * g * s))
        else:
            # The global loss L with G = (P_row + P_col - 2I) / (2N): this rank's row and column strips.
            # Each strip's other (N, D) output belongs to other ranks' rows: dropped at once.
            c = 1.0 / (2 * sum(layout.sizes))
            d_img, unused, ds_part = impl.grad_backward(img, all_txt, s, b, lse_row, lse_col, c, c, 0.0, **kw)
            del unused
            unused, d_txt, _ = impl.grad_backward(all_img, txt, s, b, lse_row_all, lse_col[o:o + n].contiguous(),
                                                  c, c, 0.0, **kw)
            del unused
            d_img.sub_(txt.to(acc) * (2 * c * s))
            d_txt.sub_(img.to(acc) * (2 * c * s))
            # Row strips partition the logits: summing them gives dL/dscale; the same
            # all_reduce sums the upstream gradients (gather_with_grad sends every rank's
            # dL_q/dfeatures to the owner).
            pair = torch.stack([ds_part - 2 * c * dot.sum(), g])
            dist.all_reduce(pair, group=layout.group)
            d_scale = pair[0] * g
            feat = pair[1] if layout.gather_with_grad else g
            d_img, d_txt = d_img.mul_(feat), d_txt.mul_(feat)
        return first_order_only("clip_fast's distributed CLIP loss",
                                _finish(d_img, d_txt, d_scale, img, txt, scale, bias, ctx.needs_input_grad))


# --------------------------------------------------------------------------------------
# 4. Ring mode: text blocks and their accumulators travel; O(n * D) memory per rank.
# --------------------------------------------------------------------------------------

class _Ring:
    """Point-to-point exchange with the ring neighbours (send to r+1, receive from r-1)."""

    def __init__(self, layout: _Layout):
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


def _wait(works: list) -> None:
    for w in works:
        w.wait()


class _RingClipLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, img, txt, scale, bias, layout: _Layout):
        acc = _acc_dtype(img.dtype)
        impl, kw, s, b = _backend_args(layout, scale, bias, acc)
        w, r, sizes = layout.world_size, layout.rank, layout.sizes
        n_max, dim = max(sizes), img.shape[1]
        img, txt = img.contiguous(), txt.contiguous()
        ring = _Ring(layout)
        txt_buf = [txt.new_empty(n_max, dim) for _ in range(2)]
        lse_buf = [torch.empty(n_max, dtype=torch.float64, device=img.device) for _ in range(2)]
        cur_txt, lse_row, col_acc, col_in, col_works = txt, None, None, None, []
        for k in range(w):
            q_next = (r - k - 1) % w  # the block this rank holds at step k + 1
            # 1. Post the next text block's transfer; it runs during this block's sweep.
            txt_works, nxt_txt = [], None
            if k < w - 1:
                nxt_txt = txt_buf[k % 2][:sizes[q_next]]
                txt_works = ring.exchange([cur_txt], [nxt_txt], [_TAG_TXT])
            # 2. Sweep the block (img_r, txt_q): rows of img_r, columns of txt_q.
            row_part, col_part, _ = impl.lse_forward(img, cur_txt, s, b, **kw)
            lse_row = row_part if lse_row is None else torch.logaddexp(lse_row, row_part)
            # 3. Merge the column partials into the accumulator travelling with txt_q,
            #    then pass it on (after the last step it arrives home, complete).
            if k > 0:
                _wait(col_works)
                col_part = torch.logaddexp(col_in, col_part)
            col_acc = col_part
            col_in = lse_buf[k % 2][:sizes[q_next]]
            col_works = ring.exchange([col_acc], [col_in], [_TAG_LSE])
            _wait(txt_works)
            cur_txt = nxt_txt
        _wait(col_works)
        lse_col = col_in.clone()  # this rank's columns, over all N rows
        diag = s * _rowdot(img, txt, acc) + (b if b is not None else 0.0)
        loss = ((lse_row - diag).mean() + (lse_col - diag).mean()) / 2
        ctx.save_for_backward(img, txt, scale, bias, lse_row, lse_col)
        ctx.layout = layout
        return fresh_output(loss, layout.loss_dtype or img.dtype)

    @staticmethod
    @autocast_off
    def backward(ctx, grad_loss):
        img, txt, scale, bias, lse_row, lse_col = ctx.saved_tensors
        layout: _Layout = ctx.layout
        acc = _acc_dtype(img.dtype)
        impl, kw, s, b = _backend_args(layout, scale, bias, acc)
        w, r, sizes = layout.world_size, layout.rank, layout.sizes
        n_max, dim = max(sizes), img.shape[1]
        # Every rank's upstream gradient: the column term of block (r, q) belongs to loss_q.
        g = grad_loss.detach().reshape(1).to(acc).contiguous()
        g_all = torch.empty(w, 1, dtype=acc, device=img.device)
        dist.all_gather(list(g_all.unbind(0)), g, group=layout.group)
        coef = [gq / (2 * nq) for gq, nq in zip(g_all.reshape(-1).tolist(), sizes)]
        ring = _Ring(layout)
        txt_buf = [txt.new_empty(n_max, dim) for _ in range(2)]
        lse_buf = [torch.empty(n_max, dtype=torch.float64, device=img.device) for _ in range(2)]
        acc_buf = [torch.empty(n_max, dim, dtype=acc, device=img.device) for _ in range(2)]
        d_img = torch.zeros(img.shape, dtype=acc, device=img.device)
        d_scale = torch.zeros((), dtype=acc, device=img.device)
        cur_txt, cur_lse, acc_in, acc_works = txt, lse_col, None, []
        for k in range(w):
            q, q_next = (r - k) % w, (r - k - 1) % w
            # 1. Post the next text block and its column lse.
            works, nxt_txt, nxt_lse = [], None, None
            if k < w - 1:
                nxt_txt = txt_buf[k % 2][:sizes[q_next]]
                nxt_lse = lse_buf[k % 2][:sizes[q_next]]
                works = ring.exchange([cur_txt, cur_lse], [nxt_txt, nxt_lse], [_TAG_TXT, _TAG_LSE])
            # 2. One sweep of the block for both directions: rows belong to loss_r,
            #    columns to loss_q; the labels (diagonal) only in the own block.
            di, dt, ds = impl.grad_backward(img, cur_txt, s, b, lse_row, cur_lse, coef[r], coef[q],
                                            2 * coef[r] if q == r else 0.0, **kw)
            d_img += di
            d_scale += ds
            # 3. Add d txt_q into the accumulator travelling with txt_q and pass it on.
            if k > 0:
                _wait(acc_works)
                dt = acc_in.add_(dt)
            acc_in = acc_buf[k % 2][:sizes[q_next]]
            acc_works = ring.exchange([dt], [acc_in], [_TAG_ACC])
            _wait(works)
            cur_txt, cur_lse = nxt_txt, nxt_lse
        _wait(acc_works)
        d_txt = acc_in  # d txt_r from every rank's block, complete
        # d_scale: the average over ranks of d loss_q / d scale (see the module docstring).
        dist.all_reduce(d_scale, group=layout.group)
        d_scale = d_scale / w
        return first_order_only("clip_fast's distributed CLIP loss",
                                _finish(d_img, d_txt, d_scale, img, txt, scale, bias, ctx.needs_input_grad))
