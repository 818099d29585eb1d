"""Input checks shared by every entry point.

Each check names the argument and says what it got, so a bad call fails loudly
instead of broadcasting into a silent wrong answer.
"""
from __future__ import annotations

import numbers
from typing import Optional, Tuple, Union

import torch

from .numerics import compute_dtype

ScalarLike = Union[torch.Tensor, float, int]  # logit_scale / logit_bias: a number or a 1-element tensor
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _describe(t: torch.Tensor) -> str:
    return f"shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"


def check_features(image_features: torch.Tensor, text_features: torch.Tensor) -> None:
    """Both towers' embeddings: 2-D, same (N, D), N >= 1, same floating dtype and device."""
    for name, t in (("image_features", image_features), ("text_features", text_features)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor of shape (N, D), got {type(t).__name__}")
        if t.layout != torch.strided:
            raise TypeError(
                f"{name} must be a dense (strided) tensor, got layout {t.layout} with {_describe(t)}; "
                f"call {name}.to_dense() first")
        if t.dim() != 2:
            raise ValueError(f"{name} must be 2-D (N, D), got {t.dim()}-D tensor with shape {tuple(t.shape)}")
        if t.dtype not in _FLOAT_DTYPES:
            raise TypeError(
                f"{name} must be a floating tensor (float16, bfloat16, float32 or float64), got dtype {t.dtype}"
            )
    n_img, d_img = image_features.shape
    n_txt, d_txt = text_features.shape
    if n_img != n_txt:
        raise ValueError(
            "image_features and text_features must have the same batch size N (row i of one is paired with "
            f"row i of the other), got image_features {tuple(image_features.shape)} and text_features "
            f"{tuple(text_features.shape)}"
        )
    if d_img != d_txt:
        raise ValueError(
            "image_features and text_features must have the same embedding dimension D, got image_features "
            f"{tuple(image_features.shape)} and text_features {tuple(text_features.shape)}"
        )
    if n_img == 0:
        raise ValueError(
            f"empty batch: image_features and text_features have N = 0 rows ({tuple(image_features.shape)})"
        )
    if d_img == 0:
        raise ValueError(f"image_features and text_features have D = 0 columns ({tuple(image_features.shape)})")
    if image_features.device != text_features.device:
        raise ValueError(
            f"image_features is on {image_features.device} but text_features is on {text_features.device}; "
            "move both to the same device"
        )
    if image_features.dtype != text_features.dtype:
        raise TypeError(
            f"image_features has dtype {image_features.dtype} but text_features has dtype {text_features.dtype}; "
            f"cast one of them, e.g. text_features.to({image_features.dtype}), or run under torch.autocast"
        )


def as_scalar_tensor(name: str, value: Optional[ScalarLike], ref: torch.Tensor) -> Optional[torch.Tensor]:
    """``logit_scale`` / ``logit_bias``: a Python number, or a 0-d / 1-element floating tensor on ref's device.

    Returns the scalar every backend and kernel reads (None stays None): a 0-d tensor in the
    dtype S is accumulated in (``compute_dtype`` of ref's dtype: float32, float64 for
    float64 features) on ref's device.  This is the one conversion of the scalars: the
    Functions, backends and kernels take it as it is.  A tensor is converted by ``reshape``
    and ``to``, which autograd follows, so the caller's tensor still gets its gradient, in
    its own dtype and shape.
    """
    if value is None:
        return None
    if isinstance(value, bool):
        raise TypeError(f"{name} must be a float or a 1-element floating tensor, got bool {value}")
    dtype = compute_dtype(ref.dtype)
    if isinstance(value, numbers.Real) and not isinstance(value, torch.Tensor):
        # A number takes the precision the loss is computed in: float64 features keep it whole.
        return torch.tensor(float(value), dtype=dtype, device=ref.device)
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a float or a 1-element floating tensor, got {type(value).__name__}")
    if value.numel() != 1:
        raise ValueError(f"{name} must hold exactly one element (0-d or shape (1,)), got {_describe(value)}")
    if value.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor, got {_describe(value)}")
    if value.layout != torch.strided:
        raise TypeError(f"{name} must be a dense (strided) tensor, got layout {value.layout} with {_describe(value)}")
    if value.device != ref.device:
        raise ValueError(
            f"{name} is on {value.device} but the features are on {ref.device}; move {name} to {ref.device}"
        )
    return value.reshape(()).to(dtype)


def check_inputs(image_features, text_features, logit_scale, logit_bias=None
                 ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Validate everything; return (scale, bias) as the backends' 0-d scalars
    (``as_scalar_tensor``; bias may be None)."""
    check_features(image_features, text_features)
    if logit_scale is None:
        raise TypeError("logit_scale is required (a float or a 1-element tensor, already exponentiated)")
    scale = as_scalar_tensor("logit_scale", logit_scale, image_features)
    bias = as_scalar_tensor("logit_bias", logit_bias, image_features)
    return scale, bias


def check_chunk_size(chunk_size) -> Optional[int]:
    """``chunk_size`` (rows per strip, torch backend): a positive int or None."""
    if chunk_size is None:
        return None
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    return chunk_size


MODES = ("gather", "ring")


def aliased(owner: str, name: str, value, alias: str, alias_value, default):
    """An option with one name (``name``) that is also accepted under an older or open_clip
    name (``alias``): the value given, ``default`` when neither is, and an error naming
    both when they are given with different values."""
    if alias_value is None:
        return default if value is None else value
    if value is not None and value != alias_value:
        raise ValueError(f"{owner} got {name}={value!r} and {alias}={alias_value!r} ({alias} is another "
                         f"name for {name}); pass only {name}")
    return alias_value


def check_mode(mode, local_loss: bool, gather_with_grad: bool) -> None:
    """The distributed mode, and ring mode's requirement (the only semantics it computes)."""
    if mode not in MODES:
        raise ValueError(f"distributed must be one of {MODES} (FastClipLoss's and distributed_clip_loss's "
                         f"distributed=; mode= is accepted as another name), got {mode!r}")
    if mode == "ring" and not (local_loss and gather_with_grad):
        raise ValueError(
            "distributed mode='ring' computes the local_loss=True, gather_with_grad=True semantics; "
            f"pass both, or use mode 'gather'; got local_loss={bool(local_loss)}, "
            f"gather_with_grad={bool(gather_with_grad)}")


_ID_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


def check_group_ids(group_ids, features: torch.Tensor, name: str = "group_ids") -> Optional[torch.Tensor]:
    """An (N,) integer tensor on the features' device, as int64; None passes through."""
    if group_ids is None:
        return None
    if not isinstance(group_ids, torch.Tensor):
        raise TypeError(f"{name} must be an (N,) integer torch.Tensor or None, got {type(group_ids).__name__}")
    n = features.shape[0]
    if group_ids.dtype not in _ID_DTYPES:
        raise TypeError(f"{name} must be an integer tensor (int8..int64, uint8), got {_describe(group_ids)}")
    if group_ids.dim() != 1 or group_ids.shape[0] != n:
        raise ValueError(f"{name} must have shape (N,) = ({n},), one id per pair, got {_describe(group_ids)}")
    _check_dense_beside(group_ids, features, name)
    return group_ids.to(torch.int64).contiguous()


def _check_dense_beside(t: torch.Tensor, features: torch.Tensor, name: str) -> None:
    """An extra per-batch tensor: dense, and on the features' device."""
    if t.layout != torch.strided:
        raise TypeError(f"{name} must be a dense (strided) tensor, got layout {t.layout}")
    if t.device != features.device:
        raise ValueError(f"{name} is on {t.device} but the features are on {features.device}; "
                         f"move {name} to {features.device}")


def check_label_smoothing(label_smoothing) -> float:
    """``label_smoothing`` (epsilon, as in ``torch.nn.CrossEntropyLoss``): a float in [0, 1)."""
    if isinstance(label_smoothing, bool) or not isinstance(label_smoothing, numbers.Real) \
            or not 0.0 <= float(label_smoothing) < 1.0:
        raise ValueError(f"label_smoothing must be a float in [0, 1), got {label_smoothing!r}")
    return float(label_smoothing)


def check_direction_weight(image_to_text_weight) -> float:
    """``image_to_text_weight`` (lambda: loss = lam * image->text + (1 - lam) * text->image)."""
    if isinstance(image_to_text_weight, bool) or not isinstance(image_to_text_weight, numbers.Real) \
            or not 0.0 <= float(image_to_text_weight) <= 1.0:
        raise ValueError(f"image_to_text_weight must be a float in [0, 1] (0.5 is CLIP), "
                         f"got {image_to_text_weight!r}")
    return float(image_to_text_weight)


def check_negatives(negatives, features: torch.Tensor, name: str) -> Optional[torch.Tensor]:
    """Hard-negative features: (M, D) with any M >= 0, the features' D, dtype and device."""
    if negatives is None:
        return None
    if not isinstance(negatives, torch.Tensor):
        raise TypeError(f"{name} must be an (M, D) torch.Tensor or None, got {type(negatives).__name__}")
    d = features.shape[1]
    if negatives.dim() != 2 or negatives.shape[1] != d:
        raise ValueError(f"{name} must have shape (M, D) with the features' D = {d}, got {_describe(negatives)}")
    if negatives.dtype != features.dtype:
        raise TypeError(f"{name} must have the features' dtype {features.dtype}, got {_describe(negatives)}")
    _check_dense_beside(negatives, features, name)
    return negatives
