"""Cross-rank agreement: every rank checks its shard, then all ranks see every verdict.

Before any other collective, one ``all_gather`` of a small int64 descriptor (a
:class:`RankDescriptor` per rank) lets every rank raise the same ``ValueError`` when any
shard is bad or the ranks disagree, instead of leaving the others hanging in a collective.
The exchange and the fields every loss shares are the core's
(``clip_fast.core.distributed``); this module adds the CLIP loss's options.
"""
from __future__ import annotations

import dataclasses
import zlib
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch.distributed as dist

from ...core.autograd import needs_grad
from ...core.checks import MODES, check_mode
from ...core.distributed import (ShardLayout, agree_features, agree_needs_grad, bits_float, check_comm_device,
                                features_row, float_bits, mismatch, share_verdicts)
from ..function import LossOptions
from ..functional import Call, prepare_call
from ..matryoshka import NestedOptions, check_matryoshka, nested_backend

@dataclass(frozen=True)
class Layout(ShardLayout):
    """Everything the autograd Functions need besides tensors (the same on every rank)."""
    local_loss: bool
    gather_with_grad: bool
    opts: LossOptions       # backend, chunk size, loss dtype and targets (label smoothing, direction weight)
    has_ids: bool = False                 # group_ids given (on every rank)
    neg_txt_sizes: Tuple[int, ...] = ()   # hard-negative texts per rank (empty: not given)
    neg_img_sizes: Tuple[int, ...] = ()   # hard-negative images per rank (empty: not given)
    nested: Optional[NestedOptions] = None  # Matryoshka sizes, weights, renormalize (None: one size)

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
    """One rank's call, as the int64 row every rank all-gathers (field order = row order):
    the fields every loss shares (``clip_fast.core.distributed.FEATURE_FIELDS``), then the
    CLIP loss's options."""
    error: int              # 1 when this rank's own checks failed
    n: int
    d: int
    dtype: int              # core.distributed.DTYPE_CODES
    device: int             # core.distributed.DEVICE_CODES (3: other)
    has_bias: int
    rank: int
    world_size: int
    scale_bits: int         # float64 bits of logit_scale
    bias_bits: int
    needs_grad: int
    has_ids: int            # group_ids given
    local_loss: int
    gather_with_grad: int
    mode: int               # index into MODES, -1 unknown
    m_txt: int              # rows of negative_text_features, -1 when not given
    m_img: int              # rows of negative_image_features, -1 when not given
    smoothing_bits: int     # float64 bits of label_smoothing
    weight_bits: int        # float64 bits of image_to_text_weight
    nested_crc: int         # CRC-32 of the checked Matryoshka options, -1 when not given

    def row(self) -> List[int]:
        return list(dataclasses.astuple(self))

    @classmethod
    def from_row(cls, row: List[int]) -> "RankDescriptor":
        return cls(*row)


def _local_call(img, txt, logit_scale, logit_bias, mode, local_loss, gather_with_grad, backend,
                chunk_size, comm_name, options, matryoshka) -> Tuple[Call, Optional[NestedOptions]]:
    """This rank's own checks (raising here alone would leave the other ranks hanging)."""
    nested = None
    call = prepare_call(img, txt, logit_scale, logit_bias, "torch" if matryoshka[0] is not None else backend,
                        chunk_size, **options)
    if matryoshka[0] is not None:
        # The sizes against this rank's D, and the nested sweep's backend as the single-process
        # loss picks it (auto: the plain loss's choice, Triton on CUDA, torch on CPU).
        nested = check_matryoshka(*matryoshka, call.img.shape[1])
        call = dataclasses.replace(call, opts=dataclasses.replace(
            call.opts, backend=nested_backend(backend, call.img.device, call.img.dtype)))
    check_mode(mode, local_loss, gather_with_grad)
    check_comm_device(comm_name, call.img)
    return call, nested


def _describe(checked, rank, world_size, local_loss, gather_with_grad, mode) -> RankDescriptor:
    call, nested = checked if checked is not None else (None, None)
    ok = call is not None
    grad = ok and needs_grad(call.img, call.txt, call.scale, call.bias, call.neg_txt, call.neg_img)
    shared = features_row(call.img if ok else None, call.scale if ok else None, call.bias if ok else None,
                          rank, world_size, grad, ok and call.ids is not None)
    return RankDescriptor(
        *shared, local_loss=int(bool(local_loss)), gather_with_grad=int(bool(gather_with_grad)),
        mode=MODES.index(mode) if mode in MODES else -1,
        m_txt=call.neg_txt.shape[0] if ok and call.neg_txt is not None else -1,
        m_img=call.neg_img.shape[0] if ok and call.neg_img is not None else -1,
        smoothing_bits=float_bits(call.opts.label_smoothing) if ok else 0,
        weight_bits=float_bits(call.opts.image_to_text_weight) if ok else 0,
        nested_crc=-1 if nested is None else zlib.crc32(repr(nested).encode()))


_LOSS = "clip_fast distributed loss"


def _agree(descs: List[RankDescriptor], group_size: int) -> None:
    """The same verdict on every rank, from every rank's descriptor."""
    def field(name):
        return [getattr(d, name) for d in descs]

    agree_features(field, group_size, _LOSS)
    flags = list(zip(field("local_loss"), field("gather_with_grad"), field("mode")))
    if len(set(flags)) > 1:
        mismatch("(local_loss, gather_with_grad, mode)",
                 [(bool(a), bool(b), MODES[m]) for a, b, m in flags])
    for name, key in (("negative_text_features", "m_txt"), ("negative_image_features", "m_img")):
        given = [m >= 0 for m in field(key)]
        if len(set(given)) > 1:
            mismatch(f"whether {name} is given", given,
                     "; pass it on every rank or on none (an (0, D) tensor counts as given)")
    if len(set(field("smoothing_bits"))) > 1:
        mismatch("label_smoothing", [bits_float(v) for v in field("smoothing_bits")])
    if len(set(field("weight_bits"))) > 1:
        mismatch("image_to_text_weight", [bits_float(v) for v in field("weight_bits")])
    if len(set(field("nested_crc"))) > 1:
        mismatch("the Matryoshka options (matryoshka_dims, matryoshka_weights, matryoshka_renormalize: "
                 "CRC-32 of each rank's, -1 when not given)", field("nested_crc"))
    agree_needs_grad(field, _LOSS)


def check_across_ranks(img, txt, logit_scale, logit_bias, *, rank, world_size, local_loss,
                       gather_with_grad, mode, backend, chunk_size, group, group_ids=None,
                       label_smoothing=0.0, image_to_text_weight=0.5, negative_text_features=None,
                       negative_image_features=None, matryoshka=(None, None, True)) -> Tuple[Layout, Call]:
    """Check this rank's call, share the verdicts, and raise the same error on every rank.
    ``matryoshka``: (matryoshka_dims, matryoshka_weights, matryoshka_renormalize)."""
    group_size = dist.get_world_size(group)
    comm_name = str(dist.get_backend(group)).lower()
    options = dict(group_ids=group_ids, label_smoothing=label_smoothing,
                   image_to_text_weight=image_to_text_weight,
                   negative_text_features=negative_text_features,
                   negative_image_features=negative_image_features)
    (call, nested), rows = share_verdicts(
        lambda: _local_call(img, txt, logit_scale, logit_bias, mode, local_loss, gather_with_grad,
                            backend, chunk_size, comm_name, options, matryoshka),
        lambda call: _describe(call, rank, world_size, local_loss, gather_with_grad, mode).row(),
        group, img, _LOSS)
    descs = [RankDescriptor.from_row(row) for row in rows]
    _agree(descs, group_size)
    layout = Layout(rank=rank, world_size=group_size, sizes=tuple(d.n for d in descs),
                    local_loss=bool(local_loss), gather_with_grad=bool(gather_with_grad),
                    opts=call.opts, group=group, nccl=comm_name == "nccl",
                    has_ids=bool(descs[0].has_ids),
                    neg_txt_sizes=tuple(d.m_txt for d in descs) if descs[0].m_txt >= 0 else (),
                    neg_img_sizes=tuple(d.m_img for d in descs) if descs[0].m_img >= 0 else (),
                    nested=nested)
    return layout, call
