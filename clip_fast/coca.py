"""``FastCoCaLoss`` at the path users import it from (``clip_fast.coca``); it lives beside
the CLIP loss it extends, in ``clip_fast.clip.coca``."""
from .clip.coca import FastCoCaLoss  # noqa: F401
