"""The checkout's top-level ``kernels/`` folder does not pass for the Hub's ``kernels`` package."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _run_from_root(code):
    """Run ``code`` in a fresh interpreter whose sys.path starts with the checkout's root, as
    ``python -m ...`` or ``python -c ...`` from the root does; nothing of clip_fast imported first."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


def test_transformers_model_imports_from_checkout_root():
    """transformers (which probes for the Hub's ``kernels``) imports its models from the checkout
    root and counts ``kernels`` as not installed."""
    pytest.importorskip("transformers", reason="the transformers extra is not installed")
    out = _run_from_root("import sys; assert sys.path[0] == ''; "
                         "from transformers import BertModel, CLIPModel; "
                         "from transformers.utils.import_utils import is_kernels_available; "
                         "print('hub kernels', is_kernels_available())")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "hub kernels False" in out.stdout


def test_top_level_kernels_is_an_empty_shadow_and_clip_fast_kernels_loads():
    """``import kernels`` from the root gives a module with no ``__file__`` and no kernels in it;
    the kernels load as ``clip_fast.kernels``."""
    out = _run_from_root("import kernels; assert kernels.__file__ is None, kernels.__file__; "
                         "assert not hasattr(kernels, 'lse_forward'); "
                         "import clip_fast.kernels as k; print(k.lse_forward.__name__)")
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == "clip_fast.kernels.lse_forward"
