"""``python -m clip_fast.open_clip_train <open_clip_train arguments>``: open_clip's trainer on clip_fast's losses.

Runs ``open_clip_train.main.main`` with ``clip_fast.integrations.open_clip.use_fast_losses()``
switched on, so ``--model``, ``--distill-*``, ``--siglip``, ``--local-loss``,
``--gather-with-grad`` and the rest keep open_clip's meaning; arguments clip_fast cannot
serve (``--horovod``, ``--siglip`` without ``clip_fast.FastSigLipLoss``) are refused.
The environment variable ``CLIP_FAST_BACKEND`` picks the backend ("auto" by default).
"""
from __future__ import annotations

import sys
from typing import Optional, Sequence


def main(argv: Optional[Sequence[str]] = None):
    try:
        from open_clip_train.main import main as open_clip_main
    except ImportError as exc:
        raise SystemExit(f"clip_fast.open_clip_train needs open_clip's trainer (pip install open_clip_torch "
                         f"webdataset braceexpand pandas): {exc}") from exc
    from .integrations.open_clip import use_fast_losses

    with use_fast_losses():
        return open_clip_main(list(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    main()
