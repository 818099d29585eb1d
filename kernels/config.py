"""Block sizes for the clip_fast Triton kernels: a rule, a small table, an override.

The rule: one default configuration per GPU architecture (a short table of
choices, Liger-style), a slow-but-cheap configuration for the Triton CPU
interpreter, and a full ``triton.autotune`` sweep only when the environment asks
for it with ``CLIP_FAST_AUTOTUNE=1`` (cut-cross-entropy style), so that tests stay
reproducible and first calls stay fast.

Calibration: a plain Triton row-lse tile loop (no column sums) is reported to reach
0.71 of the bf16 GEMM rate on an H200 with BM=128, BN=256, BK=64, 8 warps, 3 stages.
The forward also reduces columns, so the sm_90 entry uses BN=128 (register pressure,
see the table's comment).  The GPU measurements behind the table, when there are any,
are the files of benchmarks/results/; benchmarks/bench_gpu.py sweeps a few forward
configurations so the table can be corrected from data.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
from typing import Dict, Iterator, Optional

import torch


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    BM: int          # rows of img per tile
    BN: int          # rows of txt per tile
    BK: int          # slice of the feature dimension per tl.dot
    num_warps: int
    num_stages: int


@dataclasses.dataclass(frozen=True)
class Configs:
    forward: KernelConfig
    backward: KernelConfig
    # Programs split the column sweep of the forward into this many ranges when the
    # row blocks alone cannot fill the GPU (None: derive from the SM count).
    col_splits: Optional[int] = None
    # Exponent sharing between the two softmaxes: one exp2 per element on the tiles where
    # docs/numerics.md section 5's precision condition holds (decided per tile at run time),
    # two elsewhere.  Off in the table; the variants "share_exp" and "share_exp+fused_bwd" set it.
    share_exp: bool = False
    # The backward's design: "workspace" (G written in blocks, two cuBLAS GEMMs per block) or
    # "fused" (kernels/fused_backward.py: d_img and d_txt accumulated in-kernel from the
    # recomputed tile, G never leaves the SM).
    backward_kind: str = "workspace"
    # The forward sweep loads its tiles through tensor descriptors (TMA on sm_90).
    use_tma: bool = False
    # Programs per SM of a persistent grid for the forward sweep and the backward's G kernel
    # (0: one program per unit, i.e. per row block and column split, or per G tile): each
    # program walks the units in the grouped order (kernels/tile.py ``grouped_tile``).  Used
    # with the descriptor loads only (the launches fall back to one program per unit).
    persistent: int = 0
    # The backward's G kernel (workspace design) loads its tiles through tensor descriptors too.
    backward_tma: bool = False
    # ptxas register cap per thread for the forward and backward tile kernels (None: the
    # compiler's choice); 65536 / (32 x num_warps x maxnreg) CTAs then fit an SM's registers.
    maxnreg: Optional[int] = None


# Per-architecture table: (major compute capability) -> configs.  The backward uses the
# forward's BM, BN and BK: the same tile shape and D slicing give the same fp32
# accumulation order, so the backward's S is the forward's bit for bit and a row's
# dominant entry gets exactly the P its lse implies (docs in kernels/grad_backward.py).
_TABLE: Dict[int, Configs] = {
    # Hopper (sm_90).  The calibrated row-lse tile (128 x 256) spills once the column
    # sums are added when the last blocks are padded (ptxas, bf16: ~370 B of spill
    # stores at 255 registers; none for whole blocks), 128 x 128 with 8 warps does not
    # spill either way (240-246 registers) -- `python -m clip_fast.kernels.aot_check`.
    # Speed is unmeasured: benchmarks/gpu_check.sh sweeps these forward tiles on a GPU.
    9: Configs(forward=KernelConfig(128, 128, 64, 8, 3),
               backward=KernelConfig(128, 128, 64, 8, 3)),
    # Ampere (sm_80/86/89): smaller shared memory, keep BN at 128.
    8: Configs(forward=KernelConfig(128, 128, 64, 8, 3),
               backward=KernelConfig(128, 128, 64, 8, 3)),
}
_DEFAULT_GPU = Configs(forward=KernelConfig(64, 64, 32, 4, 2),
                       backward=KernelConfig(64, 64, 32, 4, 2))
# The interpreter runs tiles through numpy: fewer, mid-sized tiles are fastest.
_INTERPRETER = Configs(forward=KernelConfig(32, 32, 32, 1, 1),
                       backward=KernelConfig(32, 32, 32, 1, 1), col_splits=1)

_override: Optional[Configs] = None


def interpreter_active() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def autotune_enabled() -> bool:
    return os.environ.get("CLIP_FAST_AUTOTUNE", "0") not in ("", "0") and not interpreter_active()


def table_configs(major: int, dtype: torch.dtype = torch.bfloat16) -> Configs:
    """The table's entry for compute capability ``major`` and input ``dtype``.

    fp32 tiles take twice the shared memory per stage, so BK is halved for fp32
    (3 stages of 128x64 + 64x128 fp32 tiles would exceed sm_80's 164 KiB).
    """
    cfg = _TABLE[9] if major >= 9 else _TABLE.get(major, _DEFAULT_GPU)
    if dtype == torch.float32:
        cfg = dataclasses.replace(
            cfg, forward=dataclasses.replace(cfg.forward, BK=min(cfg.forward.BK, 32)),
            backward=dataclasses.replace(cfg.backward, BK=min(cfg.backward.BK, 32)))
    return cfg


def get_configs(device: torch.device, dtype: torch.dtype = torch.bfloat16) -> Configs:
    """The configuration used for a launch on ``device`` (override > interpreter > table),
    with the selected variant's design switches (``selected_variant``) applied on top."""
    if _override is not None:
        cfg = _override
    elif device.type != "cuda":
        cfg = _INTERPRETER
    else:
        major, _minor = torch.cuda.get_device_capability(device)
        cfg = table_configs(major, dtype)
        name = selected_variant()
        tile = winner_tile(major) or (VARIANT_TILES.get(name) if major == 9 else None)
        if tile is not None:
            if dtype == torch.float32:
                tile = dataclasses.replace(tile, BK=min(tile.BK, 32))
            cfg = dataclasses.replace(cfg, forward=tile, backward=tile)
    return apply_variant(cfg, selected_variant())


# ---- kernel variants: one contract, several designs (docs/gpu_variants.md) ----

# Each variant is a set of Configs switches; every variant computes the same outputs within
# the precision rule.  "share_exp": one exponential per element on the tiles where the
# precision condition of docs/numerics.md section 5 holds (decided per tile at run time);
# "fused_bwd": the backward without a G workspace (kernels/fused_backward.py); "tma": the
# forward's tiles through tensor descriptors (TMA loads on sm_90).
VARIANTS: Dict[str, dict] = {
    "default": dict(share_exp=False, backward_kind="workspace", use_tma=False),
    "share_exp": dict(share_exp=True, backward_kind="workspace", use_tma=False),
    "fused_bwd": dict(share_exp=False, backward_kind="fused", use_tma=False),
    "share_exp+fused_bwd": dict(share_exp=True, backward_kind="fused", use_tma=False),
    "tma": dict(share_exp=False, backward_kind="workspace", use_tma=True),
    # Both sweeps through tensor descriptors on a persistent grid (one program per SM): the
    # forward's programs walk row block x column split units, the backward's G kernel walks
    # each workspace block's tiles, both in the grouped order, so the strips the running
    # programs share stay in L2.
    "tma_persistent": dict(share_exp=False, backward_kind="workspace", use_tma=True, backward_tma=True,
                           persistent=1),
    # Register layouts for two CTAs per SM (VARIANT_TILES): the 128 x 128 tile with ptxas
    # capped at 128 registers (2 x 256 threads x 128 = the 64 K register file), so one CTA's
    # epilogue can overlap the other's MMA.
    "regs128": dict(share_exp=False, backward_kind="workspace", use_tma=False, maxnreg=128),
}
# The sm_90 tile a variant needs, for both sweeps (the backward recomputes S at the forward's
# tile): the fused backward keeps a BM x D fp32 output block in registers, so BM = 64.
VARIANT_TILES: Dict[str, KernelConfig] = {
    "fused_bwd": KernelConfig(64, 128, 64, 8, 2),
    "share_exp+fused_bwd": KernelConfig(64, 128, 64, 8, 2),
    # Two stages: 64 KiB of operand buffers per CTA (2 x 32 KiB), so two CTAs fit 227 KiB.
    "regs128": KernelConfig(128, 128, 64, 8, 2),
}
_variant_override: Optional[str] = None
# The GPU check's winner (benchmarks/gpu_check.sh writes it; committed beside this file).
WINNER_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "winner_sm90.json")


def apply_variant(cfg: Configs, name: Optional[str]) -> Configs:
    """``cfg`` with variant ``name``'s switches (None: ``cfg`` as it is)."""
    if name is None:
        return cfg
    if name not in VARIANTS:
        raise ValueError(f"clip_fast kernel variant: unknown name {name!r}; known: {sorted(VARIANTS)}")
    return dataclasses.replace(cfg, **VARIANTS[name])


def _read_winner(path: str) -> Optional[dict]:
    """The winner file's contents, checked (it is read from disk: untrusted); None if absent."""
    import json

    if not os.path.exists(path):
        return None
    with open(path) as f:
        data = json.load(f)
    if not isinstance(data, dict) or data.get("variant") not in VARIANTS:
        raise ValueError(f"clip_fast winner file {path}: 'variant' must be one of {sorted(VARIANTS)}, "
                         f"got {data.get('variant') if isinstance(data, dict) else type(data).__name__!r}")
    tile = data.get("tile")
    if tile is not None and not (isinstance(tile, list) and len(tile) == 5
                                 and all(isinstance(x, int) and 0 < x <= 1024 for x in tile)):
        raise ValueError(f"clip_fast winner file {path}: 'tile' must be 5 positive ints "
                         f"[BM, BN, BK, num_warps, num_stages], got {tile!r}")
    return data


def _winner_path() -> str:
    return os.environ.get("CLIP_FAST_WINNER_FILE", WINNER_FILE)


def _gpu_winner() -> Optional[dict]:
    """The winner file's contents when it was written by a GPU run; a rehearsal's file
    (``"dry_run": true``, CPU timings) never configures a GPU."""
    data = _read_winner(_winner_path())
    return data if data and not data.get("dry_run") else None


def selected_variant() -> Optional[str]:
    """The variant in force: ``variant_override`` > env CLIP_FAST_VARIANT > the winner file
    (on a GPU) > None (the configuration as the table gives it)."""
    if _variant_override is not None:
        return _variant_override
    env = os.environ.get("CLIP_FAST_VARIANT", "")
    if env:
        if env not in VARIANTS:
            raise ValueError(f"CLIP_FAST_VARIANT={env!r}: unknown variant; known: {sorted(VARIANTS)}")
        return env
    if interpreter_active():
        return None
    data = _gpu_winner()
    return data["variant"] if data else None


def winner_tile(major: int) -> Optional[KernelConfig]:
    """The winner file's tile for sm_90 (both sweeps share it), or None."""
    if major != 9 or os.environ.get("CLIP_FAST_VARIANT", "") or _override is not None:
        return None
    data = _gpu_winner()
    return KernelConfig(*data["tile"]) if data and data.get("tile") else None


@contextlib.contextmanager
def variant_override(name: str) -> Iterator[None]:
    """Test/benchmark hook: variant ``name`` for every launch inside the block."""
    global _variant_override
    apply_variant(_INTERPRETER, name)   # raises on an unknown name
    previous, _variant_override = _variant_override, name
    try:
        yield
    finally:
        _variant_override = previous


def overridden() -> bool:
    """Whether a test/benchmark ``override`` is in force."""
    return _override is not None


@contextlib.contextmanager
def override(configs: Configs) -> Iterator[None]:
    """Test/benchmark hook: use ``configs`` for every launch inside the block."""
    global _override
    previous, _override = _override, configs
    try:
        yield
    finally:
        _override = previous


def autotune_candidates(kind: str):
    """Configurations swept by ``CLIP_FAST_AUTOTUNE=1`` (kind: "forward" or "backward")."""
    import triton

    shapes = [(128, 256, 64, 8, 3), (128, 128, 64, 8, 3), (128, 128, 64, 4, 4),
              (64, 128, 64, 4, 3), (128, 64, 64, 4, 3), (256, 128, 64, 8, 3)]
    if kind == "backward":
        shapes = [(128, 128, 64, 8, 3), (128, 128, 32, 4, 4), (64, 128, 64, 4, 3),
                  (128, 256, 64, 8, 3), (64, 64, 64, 4, 3)]
    return [triton.Config({"BM": bm, "BN": bn, "BK": bk}, num_warps=w, num_stages=s)
            for bm, bn, bk, w, s in shapes]


def workspace_bytes() -> int:
    """Budget for the backward's G workspace (env CLIP_FAST_WORKSPACE_MB, default 256 MiB)."""
    mb = float(os.environ.get("CLIP_FAST_WORKSPACE_MB", "256"))
    return max(1, int(mb * 2**20))


def dot_precision(dtype: torch.dtype) -> str:
    """input_precision for tl.dot, following torch's fp32 matmul convention.

    fp32 uses TF32 when torch allows it (allow_tf32 or matmul precision != "highest"),
    else exact ("ieee").  For fp16/bf16 operands the argument has no effect; we pass
    "ieee" so every tl.dot states its precision explicitly.
    """
    if dtype != torch.float32:
        return "ieee"
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        allow = bool(torch.backends.cuda.matmul.allow_tf32)
    if allow or torch.get_float32_matmul_precision() != "highest":
        return "tf32"
    return "ieee"


# ---- ahead-of-time compile variants (``python -m clip_fast.kernels.aot_check``) ----

_TRITON_DTYPE = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def feature_ptr(dtype: torch.dtype) -> str:
    """Triton's pointer type for features of ``dtype`` ("*bf16", "*fp16", "*fp32")."""
    return "*" + _TRITON_DTYPE[dtype]


@dataclasses.dataclass(frozen=True)
class AotVariant:
    """One compile variant of a Triton kernel, declared beside the kernel as its module's
    ``aot_variants(dtype, arch)``: the argument types Triton gives a launch on contiguous
    inputs (unit feature strides as constants, 16-divisible sizes and strides)."""
    kind: str                  # the report's label for the kernel ("forward", "siglip", ...)
    name: str                  # the variant ("sweep", "tile row-only", ...)
    kernel: object             # the @triton.jit function
    tile: KernelConfig         # the tile a launch on this arch and dtype uses
    constexprs: dict           # every constexpr argument but BM, BN, BK (from the tile)
    ints: frozenset            # i32 arguments
    div16: frozenset           # arguments Triton sees as 16-divisible (pointers always are)
    floats: frozenset = frozenset()   # fp32 scalar arguments
    pointers: tuple = ()       # (argument, type) for pointers that are not "*fp32"
    options: tuple = ()        # extra compile options, (name, value) pairs ("maxnreg", 128)


# ---- SigLIP kernel variants (kernels/siglip.py; docs/gpu_variants.md) ----

# The CLIP variants' ideas where they apply to the sigmoid loss.  "tma": the tile's img and txt
# slices through tensor descriptors (TMA loads on sm_90); "tma_persistent": the same on a
# persistent grid.  "fused_bwd": d_img and d_txt
# accumulated in-kernel from the recomputed tile (G never reaches device memory) instead of G
# written to the workspace and read back by two cuBLAS GEMMs.  Exponent sharing has no SigLIP
# counterpart: there is no softmax, each element needs exactly one exp2 already.
# Selected like the CLIP variants: ``siglip_variant_override`` > env CLIP_FAST_SIGLIP_VARIANT >
# the winner file's "siglip" entry (on a GPU, never a dry run's) > "default".
SIGLIP_VARIANTS: Dict[str, dict] = {
    "default": dict(use_tma=False, fused_bwd=False, persistent=0),
    "tma": dict(use_tma=True, fused_bwd=False, persistent=0),
    "fused_bwd": dict(use_tma=False, fused_bwd=True, persistent=0),
    # The tile kernel through tensor descriptors on a persistent grid (one program per SM, fewer
    # when a workspace block has fewer tiles) walking each block's tiles in the grouped order, as
    # CLIP's "tma_persistent" runs its G kernel.
    "tma_persistent": dict(use_tma=True, fused_bwd=False, persistent=1),
}
# The GPU tile of a SigLIP variant that needs its own (others: kernels/siglip.tile_config's 64 x 128
# x 64 w8 s3): the fused backward keeps a BM x DV fp32 output block in registers beside the
# epilogue, so two stages (aot_check, sm_90 bf16, DV = 256: 255 registers, 44 B of spill stores
# in the row launch, none in the column launch).
SIGLIP_VARIANT_TILES: Dict[str, KernelConfig] = {
    "fused_bwd": KernelConfig(64, 128, 64, 8, 2),
}
_siglip_variant_override: Optional[str] = None


@dataclasses.dataclass(frozen=True)
class SiglipDesign:
    name: str
    use_tma: bool
    fused_bwd: bool
    # Programs per SM of a persistent grid for the tile kernel (0: one program per tile); with the
    # descriptor loads only (kernels/siglip.py falls back to one program per tile without them).
    persistent: int = 0


def _siglip_name_ok(name, where: str) -> str:
    if name not in SIGLIP_VARIANTS:
        raise ValueError(f"{where}: unknown SigLIP variant {name!r}; known: {sorted(SIGLIP_VARIANTS)}")
    return name


def _siglip_winner() -> Optional[str]:
    """The winner file's SigLIP variant (GPU runs only), checked: ``"siglip": {"variant": name}``."""
    data = _gpu_winner()
    entry = data.get("siglip") if data else None
    if entry is None:
        return None
    if not isinstance(entry, dict):
        raise ValueError(f"clip_fast winner file {_winner_path()}: 'siglip' must be an object "
                         f"with a 'variant', got {type(entry).__name__}")
    return _siglip_name_ok(entry.get("variant"), f"clip_fast winner file {_winner_path()} 'siglip'")


def selected_siglip_variant() -> str:
    """The SigLIP variant in force (see ``SIGLIP_VARIANTS``)."""
    if _siglip_variant_override is not None:
        return _siglip_variant_override
    env = os.environ.get("CLIP_FAST_SIGLIP_VARIANT", "")
    if env:
        return _siglip_name_ok(env, f"CLIP_FAST_SIGLIP_VARIANT={env!r}")
    if interpreter_active():
        return "default"
    return _siglip_winner() or "default"


def siglip_design() -> SiglipDesign:
    name = selected_siglip_variant()
    return SiglipDesign(name, **SIGLIP_VARIANTS[name])


@contextlib.contextmanager
def siglip_variant_override(name: str) -> Iterator[None]:
    """Test/benchmark hook: SigLIP variant ``name`` for every launch inside the block."""
    global _siglip_variant_override
    _siglip_name_ok(name, "siglip_variant_override")
    previous, _siglip_variant_override = _siglip_variant_override, name
    try:
        yield
    finally:
        _siglip_variant_override = previous
