"""The core every clip_fast loss uses; it imports nothing from clip_fast above it.

* ``checks``      -- input checks that name the argument (features, scalars, ids, options).
* ``numerics``    -- the compute dtype, the one scalar conversion, and the helpers the
  backends and the kernels share (float-float lse, G's diagonal, d_scale from rows).
* ``registry``    -- ``BackendFamily``: lazy backend imports and the one choice rule.
* ``autograd``    -- the rules every autograd Function follows (fresh output, autocast
  off, first-order only, the backward tail, apply without autocast, needs-grad).
* ``distributed`` -- require-initialised and the other primitives the distributed losses share.

``clip_fast.kernels`` imports only from here.
"""
