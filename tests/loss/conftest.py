import pytest
import torch


@pytest.fixture
def kernel_blocks(backend):
    """Large Triton tiles under the interpreter, which pays per tile, not per element (the same
    tile shape forward and backward, so the recompute stays bit-exact); a no-op on a GPU."""
    if torch.cuda.is_available() or backend != "triton":
        yield
        return
    from clip_fast.kernels import config as kconfig

    big = kconfig.Configs(forward=kconfig.KernelConfig(256, 256, 128, 4, 1),
                          backward=kconfig.KernelConfig(256, 256, 128, 4, 1), col_splits=1)
    with kconfig.override(big):
        yield
