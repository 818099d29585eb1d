"""Cross-rank agreement: every rank checks its shard, then all ranks see every verdict.

Before any other collective, one ``all_gather`` of a small int64 descriptor (a
:class:`RankDescriptor` per rank) lets every rank raise the same ``ValueError`` when any
shard is bad or the ranks disagree, instead of leaving the others hanging in a collective.
"""
from __future__ import annotations

import dataclasses
import struct
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
import torch.distributed as dist

from ...core.checks import MODES, check_mode
from ..function import LossOptions
from ..functional import Call, prepare_call

_DTYPE_CODES = {torch.float16: 1, torch.bfloat16: 2, torch.float32: 3, torch.float64: 4}
_DTYPE_NAMES = {v: str(k) for k, v in _DTYPE_CODES.items()}
_DEVICE_CODES = {"cpu": 1, "cuda": 2}


@dataclass(frozen=True)
class Layout:
    """Everything the autograd Functions need besides tensors (the same on every rank)."""
    rank: int
    world_size: int
    sizes: Tuple[int, ...]  # rows per rank
    local_loss: bool
    gather_with_grad: bool
    opts: LossOptions       # backend, chunk size, loss dtype and targets (label smoothing, direction weight)
    group: Optional[object]
    nccl: bool
    has_ids: bool = False                 # group_ids given (on every rank)
    neg_txt_sizes: Tuple[int, ...] = ()   # hard-negative texts per rank (empty: not given)
    neg_img_sizes: Tuple[int, ...] = ()   # hard-negative images per rank (empty: not given)

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

    @property
    def n_global(self) -> int:
        return sum(self.sizes)

    @property
    def m_txt(self) -> int:
        """Hard-negative texts over all ranks (0 when none are given)."""
        return sum(self.neg_txt_sizes)

    @property
    def m_img(self) -> int:
        """Hard-negative images over all ranks (0 when none are given)."""
        return sum(self.neg_img_sizes)


@dataclass(frozen=True)
class RankDescriptor:
    """One rank's call, as the int64 row every rank all-gathers (field order = row order)."""
    error: int              # 1 when this rank's own checks failed
    n: int
    d: int
    dtype: int              # _DTYPE_CODES
    device: int             # _DEVICE_CODES (3: other)
    has_bias: int
    local_loss: int
    gather_with_grad: int
    mode: int               # index into MODES, -1 unknown
    rank: int
    world_size: int
    scale_bits: int         # float64 bits of logit_scale
    bias_bits: int
    needs_grad: int
    has_ids: int            # group_ids given
    m_txt: int              # rows of negative_text_features, -1 when not given
    m_img: int              # rows of negative_image_features, -1 when not given
    smoothing_bits: int     # float64 bits of label_smoothing
    weight_bits: int        # float64 bits of image_to_text_weight

    def row(self) -> List[int]:
        return list(dataclasses.astuple(self))

    @classmethod
    def from_row(cls, row: List[int]) -> "RankDescriptor":
        return cls(*row)


def _f64_bits(t: Optional[torch.Tensor]) -> int:
    if t is None:
        return 0
    return struct.unpack("<q", struct.pack("<d", float(t.detach().reshape(()).double().item())))[0]


def _f64(bits: int) -> float:
    return struct.unpack("<d", struct.pack("<q", bits))[0]


def _comm_device(group, img) -> torch.device:
    name = str(dist.get_backend(group)).lower()
    if name == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    if name == "gloo":
        return torch.device("cpu")
    return img.device if isinstance(img, torch.Tensor) else torch.device("cpu")


def _local_call(img, txt, logit_scale, logit_bias, mode, local_loss, gather_with_grad, backend,
                chunk_size, comm_name, options) -> Call:
    """This rank's own checks (raising here alone would leave the other ranks hanging)."""
    call = prepare_call(img, txt, logit_scale, logit_bias, backend, chunk_size, **options)
    check_mode(mode, local_loss, gather_with_grad)
    if comm_name == "nccl":
        want = torch.device("cuda", torch.cuda.current_device())
        if call.img.device != want:
            raise ValueError(
                f"the NCCL process group needs the features on the current CUDA device {want}, got "
                f"image_features on {call.img.device}; call torch.cuda.set_device(local_rank) first")
    elif comm_name == "gloo" and call.img.device.type != "cpu":
        raise ValueError(f"the gloo process group needs CPU features, got image_features on "
                         f"{call.img.device}; use the nccl backend for CUDA tensors")
    return call


def _float_bits(x: float) -> int:
    return struct.unpack("<q", struct.pack("<d", float(x)))[0]


def _describe(call: Optional[Call], rank, world_size, local_loss, gather_with_grad, mode) -> RankDescriptor:
    ok = call is not None
    needs_grad = ok and torch.is_grad_enabled() and any(
        t is not None and t.requires_grad
        for t in (call.img, call.txt, call.scale, call.bias, call.neg_txt, call.neg_img))
    targets = call.opts if ok else None
    return RankDescriptor(
        error=0 if ok else 1,
        n=call.img.shape[0] if ok else -1, d=call.img.shape[1] if ok else -1,
        dtype=_DTYPE_CODES.get(call.img.dtype, 0) if ok else 0,
        device=_DEVICE_CODES.get(call.img.device.type, 3) if ok else 0,
        has_bias=int(ok and call.bias is not None), local_loss=int(bool(local_loss)),
        gather_with_grad=int(bool(gather_with_grad)), mode=MODES.index(mode) if mode in MODES else -1,
        rank=rank if isinstance(rank, int) else -1,
        world_size=world_size if isinstance(world_size, int) else -1,
        scale_bits=_f64_bits(call.scale) if ok else 0, bias_bits=_f64_bits(call.bias) if ok else 0,
        needs_grad=int(bool(needs_grad)),
        has_ids=int(ok and call.ids is not None),
        m_txt=call.neg_txt.shape[0] if ok and call.neg_txt is not None else -1,
        m_img=call.neg_img.shape[0] if ok and call.neg_img is not None else -1,
        smoothing_bits=_float_bits(targets.label_smoothing) if ok else 0,
        weight_bits=_float_bits(targets.image_to_text_weight) if ok else 0)


def _mismatch(what, values, hint=""):
    listing = ", ".join(f"rank {q}: {v}" for q, v in enumerate(values))
    raise ValueError(f"clip_fast distributed loss: {what} differs across ranks ({listing}){hint}")


def _agree(descs: List[RankDescriptor], group_size: int) -> None:
    """The same verdict on every rank, from every rank's descriptor."""
    def field(name):
        return [getattr(d, name) for d in descs]

    if field("rank") != list(range(group_size)):
        raise ValueError(
            f"clip_fast distributed loss: the rank= arguments were {field('rank')} but the process group's "
            f"ranks are {list(range(group_size))}; pass rank=torch.distributed.get_rank()")
    if field("world_size") != [group_size] * group_size:
        raise ValueError(
            f"clip_fast distributed loss: the world_size= arguments were {field('world_size')} but the "
            f"process group has {group_size} ranks; pass world_size=torch.distributed.get_world_size()")
    if len(set(field("d"))) > 1:
        _mismatch("the embedding dimension D", field("d"))
    if len(set(field("dtype"))) > 1:
        _mismatch("the features' dtype", [_DTYPE_NAMES.get(c, "?") for c in field("dtype")])
    if len(set(field("device"))) > 1:
        _mismatch("the features' device type", field("device"), " (codes: 1 cpu, 2 cuda)")
    flags = list(zip(field("local_loss"), field("gather_with_grad"), field("mode")))
    if len(set(flags)) > 1:
        _mismatch("(local_loss, gather_with_grad, mode)",
                  [(bool(a), bool(b), MODES[m]) for a, b, m in flags])
    if len(set(field("has_bias"))) > 1:
        _mismatch("whether logit_bias is given", [bool(v) for v in field("has_bias")])
    if len(set(zip(field("scale_bits"), field("bias_bits")))) > 1:
        _mismatch("(logit_scale, logit_bias)",
                  [(_f64(a), _f64(b)) for a, b in zip(field("scale_bits"), field("bias_bits"))],
                  "; they must be equal on every rank, as DDP keeps parameters")
    if len(set(field("has_ids"))) > 1:
        _mismatch("whether group_ids is given", [bool(v) for v in field("has_ids")],
                  "; pass group_ids on every rank or on none")
    for name, key in (("negative_text_features", "m_txt"), ("negative_image_features", "m_img")):
        given = [m >= 0 for m in field(key)]
        if len(set(given)) > 1:
            _mismatch(f"whether {name} is given", given,
                      "; pass it on every rank or on none (an (0, D) tensor counts as given)")
    if len(set(field("smoothing_bits"))) > 1:
        _mismatch("label_smoothing", [_f64(v) for v in field("smoothing_bits")])
    if len(set(field("weight_bits"))) > 1:
        _mismatch("image_to_text_weight", [_f64(v) for v in field("weight_bits")])
    if len(set(field("needs_grad"))) > 1:
        _mismatch("whether the loss needs gradients", [bool(v) for v in field("needs_grad")],
                  "; the backward is collective, so every rank must run it")


def check_across_ranks(img, txt, logit_scale, logit_bias, *, rank, world_size, local_loss,
                       gather_with_grad, mode, backend, chunk_size, group, group_ids=None,
                       label_smoothing=0.0, image_to_text_weight=0.5, negative_text_features=None,
                       negative_image_features=None) -> Tuple[Layout, Call]:
    """Check this rank's call, share the verdicts, and raise the same error on every rank."""
    group_size = dist.get_world_size(group)
    comm_name = str(dist.get_backend(group)).lower()
    options = dict(group_ids=group_ids, label_smoothing=label_smoothing,
                   image_to_text_weight=image_to_text_weight,
                   negative_text_features=negative_text_features,
                   negative_image_features=negative_image_features)
    call, local_error = None, None
    try:
        call = _local_call(img, txt, logit_scale, logit_bias, mode, local_loss, gather_with_grad,
                           backend, chunk_size, comm_name, options)
    except Exception as exc:  # reported to every rank below, never raised alone
        local_error = f"{type(exc).__name__}: {exc}"
    mine = _describe(call, rank, world_size, local_loss, gather_with_grad, mode)
    table = torch.tensor(mine.row(), dtype=torch.int64, device=_comm_device(group, img))
    gathered = [torch.empty_like(table) for _ in range(group_size)]
    dist.all_gather(gathered, table, group=group)
    descs = [RankDescriptor.from_row(t.tolist()) for t in gathered]

    bad = [q for q, d in enumerate(descs) if d.error]
    if bad:
        messages: List[Optional[str]] = [None] * group_size
        dist.all_gather_object(messages, local_error, group=group)
        detail = "\n".join(f"  rank {q}: {messages[q]}" for q in bad)
        raise ValueError(f"clip_fast distributed loss: invalid input on rank(s) {bad}:\n{detail}")
    _agree(descs, group_size)
    layout = Layout(rank=rank, world_size=group_size, sizes=tuple(d.n for d in descs),
                    local_loss=bool(local_loss), gather_with_grad=bool(gather_with_grad),
                    opts=call.opts, group=group, nccl=comm_name == "nccl",
                    has_ids=bool(descs[0].has_ids),
                    neg_txt_sizes=tuple(d.m_txt for d in descs) if descs[0].m_txt >= 0 else (),
                    neg_img_sizes=tuple(d.m_img for d in descs) if descs[0].m_img >= 0 else ())
    return layout, call
