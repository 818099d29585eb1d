"""The core every clip_fast loss uses; it imports nothing from clip_fast above it.

* ``checks``      -- input checks that name the argument (features, scalars, ids, options),
  and the one conversion of ``logit_scale``/``logit_bias`` to the scalar every backend reads.
* ``numerics``    -- the compute dtype and the helpers the backends and the kernels share
  (float-float lse, G's diagonal, d_scale from rows).
* ``registry``    -- ``BackendFamily``: lazy backend imports and the one choice rule.
* ``autograd``    -- the rules every autograd Function follows (fresh output, autocast
  off, first-order only, the backward tail, apply without autocast, needs-grad).
* ``distributed`` -- require-initialised, the rank layout, and the cross-rank agreement
  (one all_gather of a descriptor row; the same verdict on every rank).
* ``collectives`` -- row all-gather and reduce-scatter, cross-rank logsumexp, and the one
  point-to-point exchange (``Ring``, any step around the ring).
* ``matryoshka``  -- the nested-size options and the prefix normalisation (scalings, chain)
  every Matryoshka loss shares.

``clip_fast.kernels`` imports only from here.
"""
