"""Static instruction counts per tile from a kernel's SASS (no GPU): the cost report's parser.

``python -m clip_fast.kernels.aot_check --sass`` disassembles every sm_90 kernel (Triton's
cubins, and the CUDA extension's kernels compiled from csrc/) with ``nvdisasm`` and hands
the text to ``tile_costs``.  What it derives, and how:

1. Basic blocks and loops.  The SASS is split into basic blocks at labels and after
   branches.  A branch to an earlier address is a loop's back edge; the loop's body is
   the address range [target, last back edge to it].  Compilers lay out loops
   contiguously, so the range is the body.
2. The MMA loop and the tile loop.  The MMA loop is the innermost loop holding the
   kernel's matrix instructions (HGMMA = wgmma, HMMA = mma.sync; FFMA where a kernel has
   neither): one iteration multiplies one BK-wide slice of D.  The tile loop is the
   loop right around it (the forward kernels' sweep over column tiles); a kernel whose
   MMA loop has no loop around it does one tile per program, and then the whole kernel,
   entry to EXIT, is "one tile".  A flattened loop nest (``tl.range(..., flatten=True)``) has
   one loop holding both the matrix instructions and the exponentials: one tile is then
   D / BK - 1 iterations that skip the epilogue and one that runs it.
3. One tile = one path through the tile loop's body, from its first instruction to its
   back edge (or through the kernel, entry to EXIT), with every loop inside it collapsed
   to (trip count x one path through its body).  The MMA loop runs D / BK times (D is
   the report's, 512 by default); when the compiler has unrolled it, the matrix
   instructions of one iteration cover several slices, and the count of slices per
   iteration is read off them (instruction shape x count against BM x BN x BK) and
   divides the trip count.  Other inner loops count once per tile (flagged ``other
   loops``).
4. Branches inside a tile: every path is enumerated (a few hundred at most), except
   that a conditional forward branch over a short branch-free block (at most 24
   instructions: ``if (col < n_cols) psum += exp2f(...)``) is read as a bounds guard and
   its block counts as executed, as in an interior tile.  A block that ptxas placed after
   the loop and that branches back into it is part of the path that enters it.  Two paths
   are reported: the
   COMMON one, with the fewest MUFU.EX2 and then the fewest instructions (for the
   forward and backward kernels: the shared-exponential branch, off the diagonal), and
   the HEAVY one, with the most instructions (a diagonal tile, the two-exp branch, the
   unvectorised loads).  Predicated instructions count as executed.
5. Per warp, per tile, per element.  SASS is the instruction stream of ONE warp; every
   warp of the CTA runs its own copy.  So:
   * HGMMA per tile = per-warp count x warps / 4 (wgmma is issued by a warpgroup of 4
     warps: one instruction per warpgroup); HMMA per tile = per-warp count x warps;
   * MUFU.EX2 per element = per-warp count x 32 lanes x warps / (BM x BN);
   * SHFL, BAR and the epilogue's instructions are per warp per tile (each warp waits at
     each barrier once);
   * epilogue = the instructions of the tile after the MMA loop ends (softmax sums,
     reductions, atomics), per warp.

What a static count cannot tell: which path a tile takes at run time (both bounds are
given), how many iterations a data-dependent loop runs, how long any instruction takes
(latency, issue slots, overlap of MUFU with the tensor cores, memory stalls), and how
many CTAs share an SM.  It tells what the compiler emitted: whether the tensor cores are
driven by wgmma, how many exponentials and reductions each tile pays, where registers
spill.  Only a GPU run gives time.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Dict, List, Optional, Tuple

_INSTR = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;?\s*(?:/\*.*)?$")
_LABEL = re.compile(r"^(\.L_x_\d+|\.L_\w+):")
_FUNC = re.compile(r"^\s*\.text\.([^:\s]+):")
_TARGET = re.compile(r"`\((\.L_\w+)\)")


@dataclasses.dataclass
class Instr:
    addr: int
    pred: str          # "@P0", "@!P1" or ""
    op: str            # full opcode with modifiers, e.g. "HGMMA.64x128x16.F32.BF16"
    text: str


@dataclasses.dataclass
class Counts:
    """Instruction counts along one path (floats: loops multiply them)."""
    total: float = 0.0
    mma: float = 0.0
    ex2: float = 0.0
    shfl: float = 0.0
    bar: float = 0.0
    epilogue: float = 0.0

    def add(self, other: "Counts", times: float = 1.0) -> "Counts":
        return Counts(*(a + times * b for a, b in zip(dataclasses.astuple(self), dataclasses.astuple(other))))


def parse_functions(sass: str) -> Dict[str, List[Tuple[str, object]]]:
    """{function name: [("label", name) | ("instr", Instr), ...]} from nvdisasm text."""
    funcs: Dict[str, List[Tuple[str, object]]] = {}
    cur: Optional[List] = None
    for line in sass.splitlines():
        m = _FUNC.match(line)
        if m:
            cur = funcs.setdefault(m.group(1), [])
            continue
        if cur is None:
            continue
        m = _LABEL.match(line.strip())
        if m:
            cur.append(("label", m.group(1)))
            continue
        m = _INSTR.match(line)
        if m:
            body = m.group(2).strip().rstrip(";").strip()
            pred = ""
            if body.startswith("@"):
                pred, body = body.split(None, 1)
            op = body.split(None, 1)[0] if body else ""
            cur.append(("instr", Instr(int(m.group(1), 16), pred, op, body)))
    return funcs


def mma_kind(ops: List[str]) -> Tuple[str, str]:
    """(kind, shape) of the matrix instructions: HGMMA (wgmma), HMMA (mma.sync) or FFMA."""
    for kind in ("HGMMA", "HMMA"):
        shapes = sorted({o for o in ops if o.startswith(kind + ".")})
        if shapes:
            return kind, ",".join(s[len(kind) + 1:] for s in shapes)
    return "FFMA", "no tensor-core instruction"


def _macs(kind: str, shape: str) -> Optional[int]:
    """Multiply-adds of one instruction of ``shape`` (per warpgroup for HGMMA, warp for HMMA)."""
    first = shape.split(",")[0].split(".")[0]
    if kind == "HGMMA":
        m = re.match(r"(\d+)x(\d+)x(\d+)", first)
        return int(m.group(1)) * int(m.group(2)) * int(m.group(3)) if m else None
    if kind == "HMMA":   # 16816 = m16 n8 k16, 1688 = m16 n8 k8, 1684 = m16 n8 k4
        m = re.match(r"168(\d+)", first)
        return 16 * 8 * int(m.group(1)) if m else None
    return 1   # FFMA: one multiply-add per lane (32 per warp instruction; see tile_costs)


@dataclasses.dataclass
class TileCost:
    kind: str                 # HGMMA / HMMA / FFMA
    shape: str
    structure: str            # "tile loop" or "one tile per program"
    slices_per_iter: float    # BK slices per MMA-loop iteration (unroll seen in SASS)
    light: Counts             # the common tile: fewest MUFU.EX2, then fewest instructions
    heavy: Counts             # the path with the most instructions
    paths: int                # distinct paths through one tile
    other_loops: int          # inner loops besides the MMA loop, counted once per tile
    notes: List[str]


def tile_costs(items: List[Tuple[str, object]], *, D: int, BK: int, BM: int, BN: int,
               warps: int) -> TileCost:
    """Per-tile counts along the light and heavy paths (module doc, steps 1-4).

    Long because the module doc's four steps share the label map, the loop bounds and the
    path enumeration they build in turn; split, each would re-derive them.
    """
    instrs = [x for t, x in items if t == "instr"]
    if not instrs:
        raise ValueError("no instructions")
    label_addr: Dict[str, int] = {}
    for i, (t, x) in enumerate(items):
        if t == "label":
            nxt = next((y for u, y in items[i + 1:] if u == "instr"), None)
            label_addr[x] = nxt.addr if nxt is not None else instrs[-1].addr + 16
    kind, shape = mma_kind([ins.op for ins in instrs])

    def is_mma(ins: Instr) -> bool:
        return ins.op.startswith(kind + ".") if kind != "FFMA" else ins.op.startswith("FFMA")

    def target(ins: Instr) -> Optional[int]:
        m = _TARGET.search(ins.text)
        return label_addr.get(m.group(1)) if (m and ins.op.startswith("BRA")) else None

    # 1. Loops: [header, last back edge] per header.
    loops: Dict[int, int] = {}
    for ins in instrs:
        t = target(ins)
        if t is not None and t <= ins.addr:
            loops[t] = max(loops.get(t, 0), ins.addr)
    # (A branch to itself, the trap SASS ends with after EXIT, is no loop.)
    spans = sorted((h, e) for h, e in loops.items() if e > h)
    # A backward branch whose span crosses a loop's (starts inside it, ends past its back
    # edge) is no loop: it returns from a block laid out after the loop (``_out_of_line``).
    spans = [s for s in spans if not any(o[0] < s[0] <= o[1] < s[1] for o in spans)]

    def inside(a, span):
        return span[0] <= a <= span[1]

    # 2. The MMA loop (innermost loop with the most matrix instructions) and the tile loop.
    mma_addrs = [ins.addr for ins in instrs if is_mma(ins)]
    with_mma = [s for s in spans if any(inside(a, s) for a in mma_addrs)]
    notes: List[str] = []
    if not with_mma:
        raise ValueError(f"no loop holds the {kind} instructions")
    mma_loop = min(with_mma, key=lambda s: s[1] - s[0])
    around = [s for s in spans if s != mma_loop and s[0] <= mma_loop[0] and mma_loop[1] <= s[1]]
    if around:
        region = min(around, key=lambda s: s[1] - s[0])
        structure = "tile loop"
    else:
        region = (instrs[0].addr, instrs[-1].addr)
        structure = "one tile per program"

    # 3. Slices of D per MMA-loop iteration, from the matrix instructions in its body.
    per_iter = sum(1 for a in mma_addrs if inside(a, mma_loop))
    units = max(1, warps // 4) if kind == "HGMMA" else warps
    macs = _macs(kind, shape)
    if kind == "FFMA":
        macs = 32   # lanes
    slice_macs = BM * BN * BK / units
    slices = per_iter * macs / slice_macs if macs else 1.0
    if abs(slices - round(slices)) > 1e-6 or round(slices) < 1:
        notes.append(f"{per_iter} {kind}/iteration is not a whole number of {BK}-wide slices "
                     f"({slices:.3g}); trip count taken as D/BK")
        slices = 1.0
    slices = float(round(slices))
    trip = D / BK / slices

    # 4. Every path through a region, inner loops collapsed (recursive).  ``work`` bounds the
    #    enumeration: a tile whose branches multiply past it (a flattened loop nest, where the
    #    epilogue sits under a branch inside the MMA loop) is reported as not read.
    work = [0]

    def path(lo: int, hi: int, top: bool) -> List[Counts]:
        body = [ins for ins in instrs if lo <= ins.addr <= hi]
        inner = [sp for sp in spans if lo <= sp[0] and sp[1] <= hi and sp != (lo, hi)]
        inner = [sp for sp in inner if not any(o != sp and o[0] <= sp[0] and sp[1] <= o[1] for o in inner)]
        heads = {sp[0]: sp for sp in inner}
        reach: Dict[int, List[Counts]] = {lo: [Counts()]}
        ends: List[Counts] = []
        for k, ins in enumerate(body):
            if ins.addr not in reach:
                continue              # not reached from the region's entry, or inside a collapsed loop
            here = reach.pop(ins.addr)
            work[0] += len(here)
            if work[0] > _MAX_WORK:
                raise ValueError(f"more than {_MAX_WORK} path steps (the MMA loop's {len(mma_addrs)} "
                                 f"{kind} are under branches: a flattened loop nest?)")
            if ins.addr in heads:
                sp = heads[ins.addr]
                times = trip if sp == mma_loop else 1.0
                inner_paths = path(sp[0], sp[1], False)
                work[0] += len(here) * len(inner_paths)
                here = [c.add(b, times) for c in here for b in inner_paths]
                nxt = next((x.addr for x in body[k:] if x.addr > sp[1]), None)
                if nxt is None:
                    ends += here
                else:
                    _merge(reach, nxt, here)
                continue
            one = _one(ins, is_mma, top and ins.addr > mma_loop[1])
            here = [c.add(one) for c in here]
            t = target(ins)
            back = t is not None and t <= ins.addr
            if back and ins.addr == hi:
                ends += here              # the region's own back edge: one pass is done
                continue
            if t is not None and not back and t <= hi and not _guard(ins, t, body, k):
                _merge(reach, t, here)
            elif t is not None and t > hi:
                side = _out_of_line(instrs, t, ins.addr, hi, target)
                if side is not None:   # a block placed after the region that branches back in
                    block, ret = side
                    _merge(reach, ret, [_sum(c, block, is_mma, top and ins.addr > mma_loop[1]) for c in here])
            if ins.op.startswith("EXIT") and top and structure == "one tile per program":
                ends += here
            uncond = ins.pred in ("", "@PT") and ins.op.startswith(("BRA", "EXIT", "RET", "JMP"))
            if not uncond:
                if k + 1 < len(body):
                    _merge(reach, body[k + 1].addr, here)
                else:
                    ends += here
        if top:   # a tile is a pass through the MMA loop (not an early exit or an empty range)
            ends = [e for e in ends if e.mma > 0]
        if not ends:
            raise ValueError(f"no path through [{lo:#x}, {hi:#x}]")
        return _distinct(ends)

    if any(ins.op == "MUFU.EX2" and inside(ins.addr, mma_loop) for ins in instrs):
        # A flattened loop nest (``tl.range(..., flatten=True)``): one loop of D/BK iterations
        # per tile, the epilogue under a branch that one iteration in D/BK takes.  One tile =
        # (D/BK - 1) iterations without it + one with it; its extra instructions are the epilogue.
        structure = "flattened tile loop"
        iters = path(mma_loop[0], mma_loop[1], False)
        plain = min(iters, key=lambda c: (c.ex2, c.total))
        epi = [c for c in iters if c.ex2 > plain.ex2] or [plain]
        tiles = [Counts().add(plain, trip - 1).add(c) for c in epi]
        paths = [dataclasses.replace(t, epilogue=t.total - trip * plain.total) for t in tiles]
        region = mma_loop
    else:
        paths = path(region[0], region[1], True)
    # The common tile: fewest exponentials (the shared-exp branch), then fewest
    # instructions (no diagonal, no masking); the heavy one: most instructions.
    light = min(paths, key=lambda c: (c.ex2, c.total))
    heavy = max(paths, key=lambda c: (c.total, c.ex2))
    others = sum(1 for s in spans if s != mma_loop and region[0] <= s[0] and s[1] <= region[1]
                 and s != region)
    if others:
        notes.append(f"{others} other loop(s) inside the tile counted once")
    return TileCost(kind, shape, structure, slices, light, heavy, len(paths), others, notes)


def _out_of_line(instrs: List[Instr], t: int, src: int, hi: int, target) -> Optional[Tuple[List[Instr], int]]:
    """(block, return address) when the forward branch at ``src`` to ``t`` (past the region's end
    ``hi``) enters a block that the compiler laid out after the loop: branch-free up to an
    unconditional branch back into the region, after ``src``.  ptxas moves the rarer side of
    an if there (the shared-exponential branch of the 128 x 128 forward, for one)."""
    block = []
    for x in instrs:
        if x.addr < t:
            continue
        block.append(x)
        if x.op.startswith(("EXIT", "RET", "JMP")) or len(block) > 4096:
            return None
        if x.op.startswith("BRA"):
            r = target(x)
            if x.pred in ("", "@PT") and r is not None and src < r <= hi:
                return block, r
            return None
    return None


def _sum(c: Counts, block: List[Instr], is_mma, in_epilogue: bool) -> Counts:
    for x in block:
        c = c.add(_one(x, is_mma, in_epilogue))
    return c


_MAX_PATHS = 256
_MAX_WORK = 500_000   # path steps (instructions x live paths) per tile: seconds of Python
_GUARD = 24   # instructions: a conditional branch over fewer, branch-free, is a bounds guard


def _guard(ins: Instr, t: int, body: List[Instr], k: int) -> bool:
    """Whether ``ins`` is a bounds guard whose skipped block counts as executed.

    A conditional forward branch over a short block with no branch inside
    (``if (col < n_cols) psum += exp2f(...)``) is skipped only at a matrix edge; the
    interior tile runs the block, so only the fall-through is followed.
    """
    if ins.pred in ("", "@PT"):
        return False
    skipped = [x for x in body[k + 1:] if x.addr < t]
    return len(skipped) <= _GUARD and not any(x.op.startswith(("BRA", "EXIT", "RET", "JMP", "BSSY", "BSYNC", "WARPSYNC"))
                                             for x in skipped)


def _distinct(paths: List[Counts]) -> List[Counts]:
    """Paths with distinct counts; past _MAX_PATHS only the extremes are kept."""
    out = list({dataclasses.astuple(c): c for c in paths}.values())
    if len(out) > _MAX_PATHS:
        out.sort(key=lambda c: (c.ex2, c.total))
        out = out[:_MAX_PATHS // 2] + sorted(out, key=lambda c: c.total)[-_MAX_PATHS // 2:]
    return out


def _merge(reach: Dict[int, List[Counts]], addr: int, paths: List[Counts]) -> None:
    reach[addr] = _distinct(reach.get(addr, []) + paths)


def _one(ins: Instr, is_mma, in_epilogue: bool) -> Counts:
    if ins.op.startswith("NOP"):
        return Counts()
    return Counts(total=1.0, mma=float(is_mma(ins)), ex2=float(ins.op == "MUFU.EX2"),
                  shfl=float(ins.op.startswith("SHFL")), bar=float(ins.op.startswith("BAR.")),
                  epilogue=float(in_epilogue))
