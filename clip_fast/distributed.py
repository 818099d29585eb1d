"""``distributed_clip_loss`` at the path users import it from; the CLIP loss's distributed
modes are in ``clip_fast.clip.distributed``."""
from .clip.distributed import distributed_clip_loss  # noqa: F401
