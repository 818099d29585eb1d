"""The kernel cost report (``python -m clip_fast.kernels.aot_check --sass``): no GPU needed."""
import re

import pytest
from helpers import aot_check_report

from clip_fast.kernels import sass

# A made-up kernel in nvdisasm's layout: a tile loop (.L_x_0) around an MMA loop (.L_x_1)
# with one HGMMA per iteration, then an if/else: 2 EX2 on one side, 4 on the other.
_TOY = """
.text.toy:
        /*0000*/                   MOV R1, c[0x0][0x28] ;
.L_x_0:
        /*0010*/                   MOV R2, RZ ;
.L_x_1:
        /*0020*/                   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR4], R24 ;
        /*0030*/                   IADD3 R2, R2, 0x1, RZ ;
        /*0040*/              @!P0 BRA `(.L_x_1) ;
        /*0050*/                   SHFL.BFLY PT, R3, R4, 0x1, 0x1f ;
        /*0060*/               @P1 BRA `(.L_x_2) ;
        /*0070*/                   MUFU.EX2 R5, R5 ;
        /*0080*/                   MUFU.EX2 R6, R6 ;
        /*0090*/                   BRA `(.L_x_3) ;
.L_x_2:
        /*00a0*/                   MUFU.EX2 R5, R5 ;
        /*00b0*/                   MUFU.EX2 R6, R6 ;
        /*00c0*/                   MUFU.EX2 R7, R7 ;
        /*00d0*/                   MUFU.EX2 R8, R8 ;
        /*00e0*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;
.L_x_3:
        /*00f0*/              @!P2 BRA `(.L_x_0) ;
        /*0100*/                   EXIT ;
.L_x_4:
        /*0110*/                   BRA `(.L_x_4);
"""


def test_static_counts_on_a_toy_kernel():
    """Loops found from back edges, the MMA loop weighted by D/BK, both branch sides kept."""
    items = sass.parse_functions(_TOY)["toy"]
    # 64 x 128 x 16 per HGMMA, one warpgroup: BK = 16 is one HGMMA per slice; D = 64: 4 slices.
    c = sass.tile_costs(items, D=64, BK=16, BM=64, BN=128, warps=4)
    assert (c.kind, c.structure, c.slices_per_iter) == ("HGMMA", "tile loop", 1.0)
    assert c.light.mma == 4 and c.heavy.mma == 4
    assert (c.light.ex2, c.heavy.ex2) == (2, 4)
    assert (c.light.bar, c.heavy.bar) == (0, 1)
    assert c.light.shfl == 1
    # per tile: MOV + 4 x (HGMMA, IADD3, BRA) + SHFL, BRA + 2 EX2 + BRA + back edge.
    assert c.light.total == 1 + 12 + 2 + 3 + 1
    assert c.light.epilogue == 1 + 1 + 3 + 1


# The same tile loop where the compiler placed one side of the if AFTER the loop's back edge
# (ptxas does this to the shared-exponential branch of the 128 x 128 forward): a conditional
# branch out to .L_x_5, one EX2 there, and an unconditional branch back into the loop.
_OUT_OF_LINE = """
.text.ool:
        /*0000*/                   MOV R1, c[0x0][0x28] ;
.L_x_0:
        /*0010*/                   MOV R2, RZ ;
.L_x_1:
        /*0020*/                   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR4], R24 ;
        /*0030*/                   IADD3 R2, R2, 0x1, RZ ;
        /*0040*/              @!P0 BRA `(.L_x_1) ;
        /*0050*/               @P1 BRA `(.L_x_5) ;
        /*0060*/                   MUFU.EX2 R5, R5 ;
        /*0070*/                   MUFU.EX2 R6, R6 ;
        /*0080*/                   MUFU.EX2 R7, R7 ;
        /*0090*/                   MUFU.EX2 R8, R8 ;
.L_x_3:
        /*00a0*/                   SHFL.BFLY PT, R3, R4, 0x1, 0x1f ;
        /*00b0*/              @!P2 BRA `(.L_x_0) ;
        /*00c0*/                   EXIT ;
.L_x_5:
        /*00d0*/                   MUFU.EX2 R5, R5 ;
        /*00e0*/                   BRA `(.L_x_3) ;
.L_x_4:
        /*00f0*/                   BRA `(.L_x_4);
"""


def test_block_placed_after_the_loop_is_part_of_the_tile():
    """The branch back from the out-of-line block is no loop, and the path through that block
    is a path of the tile: 1 EX2 on the common path, 4 on the heavy one."""
    c = sass.tile_costs(sass.parse_functions(_OUT_OF_LINE)["ool"], D=64, BK=16, BM=64, BN=128, warps=4)
    assert c.structure == "tile loop" and c.paths == 2 and c.other_loops == 0
    assert (c.light.ex2, c.heavy.ex2) == (1, 4)
    # MOV + 4 x (HGMMA, IADD3, BRA) + branch out, EX2, branch back + SHFL + back edge.
    assert c.light.total == 1 + 12 + 3 + 2


# A flattened loop nest (tl.range(..., flatten=True)): one loop, one HGMMA per iteration, and
# the epilogue (2 EX2) under a branch that one iteration per tile takes.
_FLATTENED = """
.text.flat:
        /*0000*/                   MOV R1, c[0x0][0x28] ;
.L_x_0:
        /*0010*/                   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR4], R24 ;
        /*0020*/                   IADD3 R2, R2, 0x1, RZ ;
        /*0030*/               @P1 BRA `(.L_x_2) ;
        /*0040*/                   MUFU.EX2 R5, R5 ;
        /*0050*/                   MUFU.EX2 R6, R6 ;
        /*0060*/                   BRA `(.L_x_2) ;
.L_x_2:
        /*0070*/              @!P0 BRA `(.L_x_0) ;
        /*0080*/                   EXIT ;
.L_x_3:
        /*0090*/                   BRA `(.L_x_3);
"""


def test_flattened_loop_counts_one_epilogue_per_tile():
    """D/BK = 4 iterations a tile: three without the epilogue (4 instructions each) and one
    with it (7), so 4 HGMMA, 2 EX2 and 3 epilogue instructions per tile."""
    c = sass.tile_costs(sass.parse_functions(_FLATTENED)["flat"], D=64, BK=16, BM=64, BN=128, warps=4)
    assert c.structure == "flattened tile loop"
    assert (c.light.mma, c.light.ex2, c.light.total, c.light.epilogue) == (4, 2, 19, 3)


@pytest.mark.slow
def test_cost_report_reads_a_bf16_sm90_forward():
    """`aot_check --sass` on one variant: wgmma (HGMMA) at 64 per tile for D = 512, sane counts."""
    rc, report = aot_check_report("--sass", "--dtype", "bf16", "--only", "forward:sweep", "--no-cuda", "--d", "512")
    if "ptxas not found" in report or "nvdisasm not found" in report:
        pytest.skip("Triton's bundled ptxas/nvdisasm is missing: " + report[-300:])
    assert rc == 0, report
    row = next((line for line in report.splitlines() if line.startswith("triton bf16 forward sweep ")), None)
    assert row is not None, report
    cols = re.split(r"\s{2,}", row.strip())
    kernel, tile, mma, per_tile, ex2 = cols[:5]
    assert tile == "128x128x64 w8" and mma.startswith("HGMMA."), row
    # 128 x 128 x 512 / (64 x N x 16 per wgmma) with N the wgmma width: 64 when N = 128.
    n = int(re.match(r"HGMMA\.64x(\d+)x16", mma).group(1))
    assert int(per_tile) == 128 * 128 * 512 // (64 * n * 16), row
    # One exp per element at least (shared path), at most two plus the per-column weights.
    assert 1.0 <= float(ex2.split("/")[0]) <= 2.6, row
    regs = int(cols[9].split(",")[0])
    assert 0 < regs <= 255 and cols[10].split(",")[0] == "0", row
