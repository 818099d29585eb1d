"""The CLIP loss's backend names at the path users import them from
(``clip_fast.backends.preload()``, ``clip_fast.backends.available_backends()``); the backends
themselves are in ``clip_fast.clip.backends``."""
from .clip.backends import (AUTO_ORDER_CUDA, BACKENDS, available_backends, preload,  # noqa: F401
                            resolve_backend, unavailable_reason)
