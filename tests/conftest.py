import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))  # tests/reference.py

# Without a GPU the Triton kernels run in Triton's interpreter on CPU tensors. The flag is
# read when a kernel is decorated, so it is set before anything imports clip_fast.kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _hide_top_level_kernels():
    """Keep the repository's ``kernels/`` folder (installed as ``clip_fast.kernels``) from
    answering for the Hub's ``kernels`` package.

    ``python -m pytest`` puts the repository root on ``sys.path``, where ``kernels/`` looks
    like a top-level package; transformers probes ``find_spec("kernels")`` and then imports
    it, which fails.  A ``None`` entry in ``sys.modules`` makes ``find_spec`` answer None and
    ``import kernels`` raise ImportError, as when the package is not installed.  An installed
    Hub package (found outside this repository) is left alone.
    """
    import importlib.util

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.find_spec("kernels") if "kernels" not in sys.modules else None
    if spec is not None and spec.origin and os.path.abspath(spec.origin).startswith(root + os.sep):
        sys.modules["kernels"] = None


_hide_top_level_kernels()


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
