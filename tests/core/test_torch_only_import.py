"""The loss library needs torch alone: ``import clip_fast`` with numpy, tqdm, matplotlib,
Pillow and Triton made unimportable, then the loss on CPU against the float64 reference.

The trainer (``clip_fast.train``) and the curation tools (``clip_fast.curate``) bring
those packages through their extras; importing the library must not load them.
"""
import os
import subprocess
import sys
import textwrap

import torch

from reference import reference_clip_loss

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BLOCKED = ("numpy", "tqdm", "matplotlib", "PIL", "triton")

# Runs in a fresh interpreter: a meta-path finder placed first makes every blocked
# top-level package (and its submodules) raise ModuleNotFoundError, as if not installed.
_CHILD = textwrap.dedent("""
    import importlib.abc
    import sys

    BLOCKED = set(sys.argv[2].split(","))

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ModuleNotFoundError(f"No module named {name!r} (blocked)", name=name)
            return None

    sys.meta_path.insert(0, Block())

    import torch
    import clip_fast
    import clip_fast.gradcache
    import clip_fast.zero_shot

    g = torch.Generator().manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(24, 16, generator=g), dim=-1).requires_grad_()
    txt = torch.nn.functional.normalize(torch.randn(24, 16, generator=g), dim=-1).requires_grad_()
    scale = torch.tensor(14.3, requires_grad=True)
    loss = clip_fast.clip_loss(img, txt, scale)
    loss.backward()
    mod = clip_fast.FastClipLoss()(img.detach(), txt.detach(), scale.detach())
    loaded = sorted(m for m in sys.modules
                    if m.split(".")[0] in BLOCKED or m.startswith(("clip_fast.train",
                                                                   "clip_fast.curate")))
    torch.save({"img": img.detach(), "txt": txt.detach(), "scale": scale.detach(),
                "loss": loss.detach(), "module_loss": mod, "d_img": img.grad,
                "d_txt": txt.grad, "d_scale": scale.grad, "loaded": loaded,
                "backends": clip_fast.available_backends()}, sys.argv[1])
""")


def test_import_clip_fast_needs_torch_alone(tmp_path):
    out = tmp_path / "result.pt"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [REPO] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(out), ",".join(BLOCKED)],
                          cwd=str(tmp_path), env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = torch.load(out, weights_only=False)
    assert res["loaded"] == [], f"import clip_fast loaded {res['loaded']}"
    assert res["backends"]["torch"] is None, res["backends"]
    assert "triton is not importable" in res["backends"]["triton"], res["backends"]

    ref_loss, ref_img, ref_txt, ref_scale, _ = reference_clip_loss(res["img"], res["txt"],
                                                                   res["scale"])
    torch.testing.assert_close(res["loss"].double(), ref_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(res["module_loss"].double(), ref_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(res["d_img"].double(), ref_img, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(res["d_txt"].double(), ref_txt, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(res["d_scale"].double(), ref_scale, rtol=1e-4, atol=1e-6)
