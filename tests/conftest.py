"""Shared by every test folder (the folders mirror the package: core, clip, siglip, distill,
kernels, train, curate, integrations); tests/reference.py and tests/helpers.py sit beside it."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))  # tests/reference.py

# Without a GPU the Triton kernels run in Triton's interpreter on CPU tensors. The flag is
# read when a kernel is decorated, so it is set before anything imports clip_fast.kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (run by benchmarks/gpu_check.sh)")
    config.addinivalue_line("markers", "slow: takes more than a few seconds on a 2-core CPU")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


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


@pytest.fixture(scope="module")
def spawned(request, tmp_path_factory):
    """The gloo ranks' results of a distributed test module (one that defines ``_cases``,
    ``_run_case``, SEED, SPAWN_DEADLINE_S and GLOO_TIMEOUT_S): ``spawned(world_size)``."""
    from helpers import spawned_cases

    m = request.module
    return spawned_cases(tmp_path_factory, m.__name__, m.SEED, m.SPAWN_DEADLINE_S, m.GLOO_TIMEOUT_S,
                         m.__name__.rsplit(".", 1)[-1])
