"""The distributed primitives every loss shares: the place of this process (``rank``,
``world_size``) checked one way, the check that ``torch.distributed`` is running, what the
collectives (``clip_fast.core.collectives``) read of a layout, and the cross-rank
agreement (``share_verdicts``: one all_gather of a per-rank int64 descriptor row, then the
same verdict, or the same error, on every rank) each loss builds its own descriptor on."""
from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Callable, List, Optional, Protocol, Tuple, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


class RankLayout(Protocol):
    """What the collectives read of a distributed call's layout
    (``clip_fast.clip.distributed.agreement.Layout`` is one)."""
    rank: int
    world_size: int
    group: Optional[object]           # the process group (None: the world)
    nccl: bool                        # whether the group's backend is NCCL
    sizes: Tuple[int, ...]            # every rank's row count
    offsets: Tuple[int, ...]          # every rank's first row in the gathered rows


@dataclass(frozen=True)
class ShardLayout:
    """A ``RankLayout``: this rank's place and every rank's row count, the same on every rank
    (each distributed loss extends it with its own options)."""
    rank: int
    world_size: int
    sizes: Tuple[int, ...]  # rows per rank
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

    @property
    def n_global(self) -> int:
        return sum(self.sizes)


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


# ---- cross-rank agreement: every rank checks its shard, then all ranks see every verdict ----

def comm_device(group, ref) -> torch.device:
    """The device a collective of ``group`` takes its buffers on: the current CUDA device for
    NCCL, the CPU for gloo, else ``ref``'s device (a tensor) or the CPU."""
    name = str(dist.get_backend(group)).lower()
    if name == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    if name == "gloo":
        return torch.device("cpu")
    return ref.device if isinstance(ref, torch.Tensor) else torch.device("cpu")


def float_bits(x) -> int:
    """A float (or a 1-element tensor; None: 0) as the int64 of its float64 bits, for a descriptor row."""
    if x is None:
        return 0
    if isinstance(x, torch.Tensor):
        x = x.detach().reshape(()).double().item()
    return struct.unpack("<q", struct.pack("<d", float(x)))[0]


def bits_float(bits: int) -> float:
    """The float whose float64 bits ``float_bits`` gave."""
    return struct.unpack("<d", struct.pack("<q", bits))[0]


def share_verdicts(check: Callable[[], T], describe: Callable[[Optional[T]], List[int]], group, ref,
                   what: str) -> Tuple[T, List[List[int]]]:
    """Run this rank's ``check()``, all-gather every rank's ``describe(result)`` row (int64;
    ``describe(None)`` after a failed check, whose row starts with a nonzero error flag), and
    raise the same ``ValueError`` on every rank when any rank's check failed.

    Raised alone, one rank's error would leave the others hanging in their next
    collective; here every rank names every bad rank and its message.  ``what`` names the
    loss in the message.  Returns ``(result, rows)``: every rank's row, in rank order.
    """
    result, local_error = None, None
    try:
        result = check()
    except Exception as exc:  # reported to every rank below, never raised alone
        local_error = f"{type(exc).__name__}: {exc}"
    size = dist.get_world_size(group)
    mine = torch.tensor(describe(result), dtype=torch.int64, device=comm_device(group, ref))
    gathered = [torch.empty_like(mine) for _ in range(size)]
    dist.all_gather(gathered, mine, group=group)
    rows = [t.tolist() for t in gathered]
    bad = [q for q, row in enumerate(rows) if row[0]]
    if bad:
        messages: List[Optional[str]] = [None] * size
        dist.all_gather_object(messages, local_error, group=group)
        detail = "\n".join(f"  rank {q}: {messages[q]}" for q in bad)
        raise ValueError(f"{what}: invalid input on rank(s) {bad}:\n{detail}")
    return result, rows


DTYPE_CODES = {torch.float16: 1, torch.bfloat16: 2, torch.float32: 3, torch.float64: 4}
DTYPE_NAMES = {v: str(k) for k, v in DTYPE_CODES.items()}
DEVICE_CODES = {"cpu": 1, "cuda": 2}  # 3: any other device type


def features_row(features: Optional[torch.Tensor], scale, bias, rank, world_size, grad: bool,
                 has_ids: bool) -> List[int]:
    """The descriptor fields every loss shares, in ``FEATURE_FIELDS`` order: this rank's
    shard (rows, D, dtype, device), ``logit_scale``/``logit_bias`` bits, its ``rank=`` and
    ``world_size=`` arguments, whether it needs gradients and has group ids.  ``features``
    None: the rank's own checks failed (its error flag is set)."""
    ok = features is not None
    as_int = lambda v: v if isinstance(v, int) and not isinstance(v, bool) else -1  # noqa: E731
    return [0 if ok else 1,
            features.shape[0] if ok else -1, features.shape[1] if ok else -1,
            DTYPE_CODES.get(features.dtype, 0) if ok else 0,
            DEVICE_CODES.get(features.device.type, 3) if ok else 0,
            int(ok and bias is not None), as_int(rank), as_int(world_size),
            float_bits(scale) if ok else 0, float_bits(bias) if ok else 0,
            int(bool(ok and grad)), int(bool(ok and has_ids))]


FEATURE_FIELDS = ("error", "n", "d", "dtype", "device", "has_bias", "rank", "world_size", "scale_bits",
                  "bias_bits", "needs_grad", "has_ids")


def agree_features(field: Callable[[str], list], group_size: int, loss: str) -> None:
    """The checks of ``features_row``'s fields but ``needs_grad`` (the caller checks it last,
    after its own options): the same verdict on every rank.  ``field(name)`` gives every
    rank's value of one field."""
    check_ranks(field("rank"), field("world_size"), group_size, loss)
    if len(set(field("d"))) > 1:
        mismatch("the embedding dimension D", field("d"), loss=loss)
    if len(set(field("dtype"))) > 1:
        mismatch("the features' dtype", [DTYPE_NAMES.get(c, "?") for c in field("dtype")], loss=loss)
    if len(set(field("device"))) > 1:
        mismatch("the features' device type", field("device"), " (codes: 1 cpu, 2 cuda)", loss=loss)
    if len(set(field("has_bias"))) > 1:
        mismatch("whether logit_bias is given", [bool(v) for v in field("has_bias")], loss=loss)
    if len(set(zip(field("scale_bits"), field("bias_bits")))) > 1:
        mismatch("(logit_scale, logit_bias)",
                 [(bits_float(a), bits_float(b)) for a, b in zip(field("scale_bits"), field("bias_bits"))],
                 "; they must be equal on every rank, as DDP keeps parameters", loss=loss)
    if len(set(field("has_ids"))) > 1:
        mismatch("whether group_ids is given", [bool(v) for v in field("has_ids")],
                 "; pass group_ids on every rank or on none", loss=loss)


def agree_needs_grad(field: Callable[[str], list], loss: str) -> None:
    """Every rank needs gradients or none does: the backward is collective."""
    if len(set(field("needs_grad"))) > 1:
        mismatch("whether the loss needs gradients", [bool(v) for v in field("needs_grad")],
                 "; the backward is collective, so every rank must run it", loss=loss)


def mismatch(what: str, values, hint: str = "", loss: str = "clip_fast distributed loss") -> None:
    """Raise the error for a value that must agree across ranks but does not (``values``: one per rank)."""
    listing = ", ".join(f"rank {q}: {v}" for q, v in enumerate(values))
    raise ValueError(f"{loss}: {what} differs across ranks ({listing}){hint}")


def check_ranks(ranks: List[int], world_sizes: List[int], group_size: int, loss: str) -> None:
    """Every rank's ``rank=`` and ``world_size=`` arguments against the process group's."""
    if ranks != list(range(group_size)):
        raise ValueError(
            f"{loss}: the rank= arguments were {ranks} but the process group's ranks are "
            f"{list(range(group_size))}; pass rank=torch.distributed.get_rank()")
    if world_sizes != [group_size] * group_size:
        raise ValueError(
            f"{loss}: the world_size= arguments were {world_sizes} but the process group has "
            f"{group_size} ranks; pass world_size=torch.distributed.get_world_size()")


def check_comm_device(comm_name: str, features: torch.Tensor) -> None:
    """The features' device against the process group's backend (NCCL: the current CUDA
    device; gloo: the CPU)."""
    if comm_name == "nccl":
        want = torch.device("cuda", torch.cuda.current_device())
        if features.device != want:
            raise ValueError(
                f"the NCCL process group needs the features on the current CUDA device {want}, got "
                f"image_features on {features.device}; call torch.cuda.set_device(local_rank) first")
    elif comm_name == "gloo" and features.device.type != "cpu":
        raise ValueError(f"the gloo process group needs CPU features, got image_features on "
                         f"{features.device}; use the nccl backend for CUDA tensors")
