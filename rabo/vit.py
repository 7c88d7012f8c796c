"""A width-prunable vision transformer (Dosovitskiy et al., "An Image is Worth 16x16 Words",
2021) over image patches, pre-norm, mean-pooled, at sizes for small machines.

``model.options``: ``patch`` (patch side in pixels, default 7: a 28x28 image is 16 patches),
``dim`` (embedding width, default 64), ``heads`` (attention heads, default 8), ``mlp``
(hidden width of each block's MLP, default 128) and ``depth`` (blocks, default 2).

Pruning: the embedding width is pruned too, as one unit group (``embed``) shared by the whole
residual stream (patch embedding rows, positional embeddings, every layer norm, every
projection into and out of the stream, the head's columns), so every block adds tensors of
the same kept width and the stream stays consistent. Per block, the attention heads are a
group (``l<i>.heads``: a head's query, key and value rows and its output columns, ``dim /
heads`` of each) and the MLP's hidden units another (``l<i>.mlp``). A ratio r keeps
``ceil(r * n)`` units of every group, so every pruned matrix keeps about r^2 of its entries
(the attention scores, which have no weights, shrink as r: the tokens are never pruned).
Layer norms normalize over the kept embedding units (their affine is pruned with them). The
scaler sits where a pruned group's activations enter a projection: the heads' concatenated
outputs, the MLP hidden units and the pooled features before the head.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F

from rabo.masks import kept_count
from rabo.models import PrunableModel, register_model
from rabo.submodel import Axis, ParamLayout

# 8 heads: every ratio of the ladder down to 1/8 keeps a whole number of them exactly
DEFAULTS = {"patch": 7, "dim": 64, "heads": 8, "mlp": 128, "depth": 2}


class VisionTransformer(PrunableModel):
    has_normalization = True

    def __init__(self, input_shape: tuple[int, ...], classes: int, patch: int = 7,
                 dim: int = 64, heads: int = 8, mlp: int = 128, depth: int = 2,
                 scaler: str = "none") -> None:
        if len(input_shape) != 3:
            raise ValueError(f"a vision transformer needs image inputs (C, H, W); this data "
                             f"has shape {input_shape}")
        c, h, w = input_shape
        if patch < 1 or h % patch or w % patch:
            raise ValueError(f"model.options.patch: {patch} must divide the image size {h}x{w}")
        for name, v in (("dim", dim), ("heads", heads), ("mlp", mlp), ("depth", depth)):
            if v < 1:
                raise ValueError(f"model.options.{name}: must be >= 1, got {v}")
        if dim % heads:
            raise ValueError(f"model.options.dim {dim} must be a multiple of heads {heads}")
        self.input_shape, self.classes, self.scaler = input_shape, classes, scaler
        self.patch, self.dim, self.heads, self.mlp, self.depth = patch, dim, heads, mlp, depth
        self.head_dim = dim // heads
        self.tokens = (h // patch) * (w // patch)
        self.patch_numel = c * patch * patch
        e = Axis("embed")
        self.groups = {"embed": dim}
        lay: dict[str, ParamLayout] = {
            "patch.weight": ParamLayout((dim, self.patch_numel), (e, None)),
            "patch.bias": ParamLayout((dim,), (e,)),
            "pos": ParamLayout((self.tokens, dim), (None, e)),
        }
        for i in range(depth):
            hg, mg = f"l{i}.heads", f"l{i}.mlp"
            self.groups[hg], self.groups[mg] = heads, mlp
            hx = Axis(hg, repeat=self.head_dim)
            lay[f"l{i}.ln1.weight"] = ParamLayout((dim,), (e,))
            lay[f"l{i}.ln1.bias"] = ParamLayout((dim,), (e,))
            for proj in ("q", "k", "v"):
                lay[f"l{i}.{proj}.weight"] = ParamLayout((dim, dim), (hx, e))
                lay[f"l{i}.{proj}.bias"] = ParamLayout((dim,), (hx,))
            lay[f"l{i}.o.weight"] = ParamLayout((dim, dim), (e, hx))
            lay[f"l{i}.o.bias"] = ParamLayout((dim,), (e,))
            lay[f"l{i}.ln2.weight"] = ParamLayout((dim,), (e,))
            lay[f"l{i}.ln2.bias"] = ParamLayout((dim,), (e,))
            lay[f"l{i}.fc1.weight"] = ParamLayout((mlp, dim), (Axis(mg), e))
            lay[f"l{i}.fc1.bias"] = ParamLayout((mlp,), (Axis(mg),))
            lay[f"l{i}.fc2.weight"] = ParamLayout((dim, mlp), (e, Axis(mg)))
            lay[f"l{i}.fc2.bias"] = ParamLayout((dim,), (e,))
        lay["final.weight"] = ParamLayout((dim,), (e,))
        lay["final.bias"] = ParamLayout((dim,), (e,))
        lay["head.weight"] = ParamLayout((classes, dim), (None, e))
        lay["head.bias"] = ParamLayout((classes,), (None,))
        self.layout = lay
        self.head_names = ("head.weight", "head.bias")
        self.backbone_names = tuple(n for n in lay if n not in self.head_names)

    def init(self, seed: int, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        """Linear layers: fan-in uniform; positions: N(0, 0.02^2); norms: weight 1, bias 0."""
        params = super().init(seed, dtype)
        gen = torch.Generator().manual_seed(seed + 1)
        params["pos"] = torch.randn(self.tokens, self.dim, generator=gen, dtype=dtype) * 0.02
        for name in params:
            if ".ln" in name or name.startswith("final."):
                params[name] = (torch.ones_like(params[name]) if name.endswith("weight")
                                else torch.zeros_like(params[name]))
        return params

    # ------------------------------------------------------------------ forward

    def _patches(self, inputs: torch.Tensor) -> torch.Tensor:
        p = self.patch
        x = F.unfold(inputs, kernel_size=p, stride=p)  # (B, C*p*p, tokens)
        return x.transpose(1, 2)

    @staticmethod
    def _ln(params: Mapping[str, torch.Tensor], name: str, h: torch.Tensor) -> torch.Tensor:
        w = params[f"{name}.weight"]
        return F.layer_norm(h, (w.shape[0],), w, params[f"{name}.bias"])

    def features(self, params: Mapping[str, torch.Tensor], inputs: torch.Tensor) -> torch.Tensor:
        h = F.linear(self._patches(inputs), params["patch.weight"], params["patch.bias"])
        h = h + params["pos"]
        b, n, _ = h.shape
        for i in range(self.depth):
            a = self._ln(params, f"l{i}.ln1", h)
            q, k, v = (F.linear(a, params[f"l{i}.{p}.weight"], params[f"l{i}.{p}.bias"])
                       for p in ("q", "k", "v"))
            kept_heads = q.shape[-1] // self.head_dim
            qh, kh, vh = (t.view(b, n, kept_heads, self.head_dim).transpose(1, 2)
                          for t in (q, k, v))
            att = torch.softmax(qh @ kh.transpose(-1, -2) / math.sqrt(self.head_dim), dim=-1)
            z = (att @ vh).transpose(1, 2).reshape(b, n, kept_heads * self.head_dim)
            z = self.scaled(z, self.dim, dim=-1)  # kept heads of all
            h = h + F.linear(z, params[f"l{i}.o.weight"], params[f"l{i}.o.bias"])
            m = F.gelu(F.linear(self._ln(params, f"l{i}.ln2", h), params[f"l{i}.fc1.weight"],
                                params[f"l{i}.fc1.bias"]))
            m = self.scaled(m, self.mlp, dim=-1)
            h = h + F.linear(m, params[f"l{i}.fc2.weight"], params[f"l{i}.fc2.bias"])
        h = self._ln(params, "final", h).mean(dim=1)
        return self.scaled(h, self.dim, dim=-1)

    def head(self, params: Mapping[str, torch.Tensor], features: torch.Tensor) -> torch.Tensor:
        return F.linear(features, params["head.weight"], params["head.bias"])

    # ------------------------------------------------------------------ cost model

    def layer_flops(self, ratio: float = 1.0, batch: int = 1) -> dict[str, int]:
        d = kept_count(ratio, self.dim)
        n, bt = self.tokens, batch
        flops = {"patch": 2 * bt * n * self.patch_numel * d}
        for i in range(self.depth):
            hd = kept_count(ratio, self.heads) * self.head_dim
            m = kept_count(ratio, self.mlp)
            flops[f"l{i}.qkv"] = 3 * 2 * bt * n * d * hd
            flops[f"l{i}.attention"] = 2 * 2 * bt * n * n * hd
            flops[f"l{i}.o"] = 2 * bt * n * hd * d
            flops[f"l{i}.mlp"] = 2 * 2 * bt * n * d * m
        flops["head"] = 2 * bt * self.classes * d
        return flops

    def activation_numel(self, ratio: float = 1.0, batch: int = 1) -> int:
        d = kept_count(ratio, self.dim)
        n, bt = self.tokens, batch
        total = bt * (math.prod(self.input_shape) + n * self.patch_numel + 2 * n * d)
        for _ in range(self.depth):
            hd = kept_count(ratio, self.heads) * self.head_dim
            kh = kept_count(ratio, self.heads)
            m = kept_count(ratio, self.mlp)
            total += bt * n * (2 * d + 3 * hd + hd + d)  # ln1, residual, q k v, context, o
            total += bt * kh * n * n * 2  # scores and softmax
            total += bt * n * (2 * d + 2 * m + d)  # ln2, residual, fc1, gelu, fc2
        total += bt * (2 * n * d + d + self.classes)
        return total


def _build(model_cfg: Any, input_shape: tuple[int, ...], classes: int) -> VisionTransformer:
    unknown = sorted(set(model_cfg.options) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"model.options: the vit takes {', '.join(DEFAULTS)}, got {unknown}")
    opts = {**DEFAULTS, **model_cfg.options}
    for k, v in opts.items():
        if not isinstance(v, int) or isinstance(v, bool):
            raise ValueError(f"model.options.{k}: an integer, got {v!r}")
    return VisionTransformer(input_shape, classes, scaler=model_cfg.scaler, **opts)


register_model("vit", _build)
