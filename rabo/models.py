"""Width-prunable models, written as functions of a ``Params`` dict.

A model is described by a spec of layer widths. Its forward pass reads every size from the
tensors it is given, so the same code runs the full model and any submodel extracted from it.
Hidden units are grouped per layer (``fc0``, ``conv1``, ...); a width ratio keeps
``ceil(r * width)`` units of every group. Input features and classes are never pruned.

The backbone (every layer but the last) and the head (the last linear layer) are reported
separately so that tasks can make one of them x and the other y (task A), or all of it y (B).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from rabo.masks import MaskSpec, kept_units
from rabo.params import Params
from rabo.submodel import Axis, Layout, ParamLayout, SlicePlan, extract, plan

SCALERS = ("none", "forward", "consistent")


@dataclass(frozen=True)
class ModelSpec:
    """kind 'mlp' (dense layers ``hidden``) or 'cnn' (conv blocks ``channels``, each conv +
    ReLU + 2x2 max-pool, then dense layers ``hidden``), for inputs of ``input_shape`` and
    ``classes`` outputs."""

    kind: str
    input_shape: tuple[int, ...]
    classes: int
    hidden: tuple[int, ...] = ()
    channels: tuple[int, ...] = ()
    kernel: int = 3
    scaler: str = "none"  # none | forward | consistent (rabo.config.ModelConfig.scaler)

    def __post_init__(self) -> None:
        if self.scaler not in SCALERS:
            raise ValueError(f"model scaler must be one of {', '.join(SCALERS)}, "
                             f"got {self.scaler!r}")
        if self.kind not in ("mlp", "cnn"):
            raise ValueError(f"model kind must be 'mlp' or 'cnn', got {self.kind!r}")
        if self.kind == "cnn":
            if len(self.input_shape) != 3:
                raise ValueError(
                    f"a CNN needs image inputs (C, H, W); this data has shape {self.input_shape}"
                )
            if not self.channels:
                raise ValueError("a CNN needs at least one conv block")
            if min(self.input_shape[1:]) // 2 ** len(self.channels) < 1:
                raise ValueError(
                    f"{len(self.channels)} pooling blocks shrink a {self.input_shape[1:]} image "
                    "to nothing; use fewer channels entries"
                )
        if self.kind == "mlp" and not self.hidden:
            raise ValueError("an MLP needs at least one hidden layer")


class WidthModel:
    """A width-prunable MLP or CNN over ``Params``."""

    def __init__(self, spec: ModelSpec) -> None:
        self.spec = spec
        self.groups: dict[str, int] = {}
        self.layout: Layout = {}
        prev: Axis | None = None
        if spec.kind == "cnn":
            in_ch, h, w = spec.input_shape
            k = spec.kernel
            for i, ch in enumerate(spec.channels):
                g = f"conv{i}"
                self.groups[g] = ch
                self.layout[f"{g}.weight"] = ParamLayout(
                    (ch, in_ch, k, k), (Axis(g), prev, None, None)
                )
                self.layout[f"{g}.bias"] = ParamLayout((ch,), (Axis(g),))
                prev, in_ch = Axis(g), ch
                h, w = h // 2, w // 2
            assert prev is not None
            prev = Axis(prev.group, repeat=h * w)
            in_features = in_ch * h * w
        else:
            in_features = math.prod(spec.input_shape)
        for i, width in enumerate(spec.hidden):
            g = f"fc{i}"
            self.groups[g] = width
            self.layout[f"{g}.weight"] = ParamLayout((width, in_features), (Axis(g), prev))
            self.layout[f"{g}.bias"] = ParamLayout((width,), (Axis(g),))
            prev, in_features = Axis(g), width
        self.layout["head.weight"] = ParamLayout((spec.classes, in_features), (None, prev))
        self.layout["head.bias"] = ParamLayout((spec.classes,), (None,))
        self.head_names = ("head.weight", "head.bias")
        self.backbone_names = tuple(n for n in self.layout if n not in self.head_names)

    # ------------------------------------------------------------------ parameters

    def init(self, seed: int, dtype: torch.dtype = torch.float32) -> Params:
        """PyTorch's default init (uniform +-1/sqrt(fan_in)), seeded."""
        gen = torch.Generator().manual_seed(seed)
        params: Params = {}
        for name, lay in self.layout.items():
            weight_name = name.replace(".bias", ".weight")
            fan_in = math.prod(self.layout[weight_name].shape[1:])
            bound = 1.0 / math.sqrt(fan_in)
            params[name] = (torch.rand(lay.shape, generator=gen, dtype=dtype) * 2 - 1) * bound
        return params

    def num_params(self) -> int:
        return sum(math.prod(lay.shape) for lay in self.layout.values())

    # ------------------------------------------------------------------ submodels

    def kept(self, mask: MaskSpec) -> dict[str, torch.Tensor]:
        return kept_units(mask, self.groups)

    def slice_plan(self, mask: MaskSpec, names: tuple[str, ...] | None = None) -> SlicePlan:
        layout = self.layout if names is None else {n: self.layout[n] for n in names}
        return plan(layout, self.kept(mask))

    def extract(self, params: Mapping[str, torch.Tensor], ratio: float, policy: str = "static",
                round: int = 0, seed: int = 0) -> Params:
        """The submodel of ``params`` at width ``ratio`` under ``policy``."""
        mask = MaskSpec(policy=policy, ratio=ratio, round=round, seed=seed)
        return extract(params, self.slice_plan(mask, tuple(params)))

    # ------------------------------------------------------------------ forward

    def features(self, params: Mapping[str, torch.Tensor], inputs: torch.Tensor) -> torch.Tensor:
        h = inputs
        if self.spec.kind == "cnn":
            pad = self.spec.kernel // 2
            for i, width in enumerate(self.spec.channels):
                h = F.conv2d(h, params[f"conv{i}.weight"], params[f"conv{i}.bias"], padding=pad)
                h = self._scaled(F.max_pool2d(F.relu(h), 2), width)
        h = h.flatten(1)
        for i, width in enumerate(self.spec.hidden):
            h = self._scaled(F.relu(F.linear(h, params[f"fc{i}.weight"], params[f"fc{i}.bias"])),
                             width)
        return h

    # The built-in models have no normalization layer: the forward scaler on its own then
    # amplifies a small client's gradients (see docs/method.md), so tasks warn about it.
    has_normalization = False

    def _scaled(self, h: torch.Tensor, full_width: int) -> torch.Tensor:
        """HeteroFL's scaler: a submodel keeping k of n units multiplies their outputs by n/k,
        so that the next layer sees the full model's scale (the full model is unchanged)."""
        kept = h.shape[1]
        if self.spec.scaler == "none" or kept == full_width:
            return h
        return h * (full_width / kept)

    def head(self, params: Mapping[str, torch.Tensor], features: torch.Tensor) -> torch.Tensor:
        return F.linear(features, params["head.weight"], params["head.bias"])

    def forward(self, params: Mapping[str, torch.Tensor], inputs: torch.Tensor) -> torch.Tensor:
        return self.head(params, self.features(params, inputs))

    # ------------------------------------------------------------------ cost model

    def layer_flops(self, ratio: float = 1.0, batch: int = 1) -> dict[str, int]:
        """Forward multiply-adds x2 per layer of the submodel at ``ratio`` for ``batch`` inputs."""
        from rabo.masks import kept_count

        def width(axis: Axis | None, size: int) -> int:
            if axis is None:
                return size
            return kept_count(ratio, self.groups[axis.group]) * axis.repeat

        flops: dict[str, int] = {}
        spatial = self.spec.input_shape[1:] if self.spec.kind == "cnn" else ()
        h, w = (spatial[0], spatial[1]) if spatial else (1, 1)
        for name, lay in self.layout.items():
            if not name.endswith(".weight"):
                continue
            dims = [width(a, s) for a, s in zip(lay.axes, lay.shape, strict=False)]
            per_out = math.prod(dims)
            if name.startswith("conv"):
                flops[name[:-7]] = 2 * per_out * h * w * batch
                h, w = h // 2, w // 2
            else:
                flops[name[:-7]] = 2 * per_out * batch
        return flops

    def activation_numel(self, ratio: float = 1.0, batch: int = 1) -> int:
        """Elements of the activations a forward pass keeps for backward, at ``ratio``."""
        from rabo.masks import kept_count

        total = batch * math.prod(self.spec.input_shape)
        if self.spec.kind == "cnn":
            _, h, w = self.spec.input_shape
            for ch in self.spec.channels:
                c = kept_count(ratio, ch)
                total += batch * c * h * w * 2  # conv output and ReLU output
                h, w = h // 2, w // 2
                total += batch * c * h * w  # pooled output
        for width in self.spec.hidden:
            total += 2 * batch * kept_count(ratio, width)
        total += batch * self.spec.classes
        return total


def build_model(kind: str, input_shape: tuple[int, ...], classes: int, hidden: list[int] | tuple,
                channels: list[int] | tuple = (), kernel: int = 3, scaler: str = "none"
                ) -> WidthModel:
    return WidthModel(ModelSpec(kind=kind, input_shape=tuple(input_shape), classes=classes,
                                hidden=tuple(hidden), channels=tuple(channels), kernel=kernel,
                                scaler=scaler))
