"""Width-prunable models, written as functions of a ``Params`` dict.

:class:`PrunableModel` is the contract every model meets, the built-in ones and a user's own
(docs/models.md); models are looked up by ``model.kind`` in a registry that user code extends
with :func:`register_model` (from a plugin module named in ``RABO_MODEL_PLUGINS`` or an
installed package's ``rabo.models`` entry point: code a machine's own environment names,
never the wire).

The built-in MLP and CNN are described by a spec of layer widths. Their forward pass reads
every size from the tensors it is given, so the same code runs the full model and any
submodel extracted from it. Hidden units are grouped per layer (``fc0``, ``conv1``, ...); a
width ratio keeps ``ceil(r * width)`` units of every group. Input features and classes are
never pruned.

The backbone (every layer but the last) and the head (the last linear layer) are reported
separately so that tasks can make one of them x and the other y (task A), or all of it y (B).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from rabo.errors import ConfigError
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


class PrunableModel:
    """What RABO needs of a width-prunable model (docs/models.md).

    A subclass sets, in its constructor:

    - ``groups``: prunable unit groups and their full widths (``{"fc0": 200, ...}``); a width
      ratio r keeps ``ceil(r * width)`` units of each group (``rabo.masks``);
    - ``layout``: every parameter tensor's full shape and, per axis, the group it is indexed
      by (``Axis(group, repeat)``) or ``None`` for an axis that is never pruned
      (``rabo.submodel.ParamLayout``); extraction, scattering and coverage follow from it;
    - ``head_names`` / ``backbone_names``: the head (what task A makes y) and the rest (x);
    - ``scaler``: ``none``, ``forward`` or ``consistent`` (``model.scaler``), and
      ``has_normalization`` (whether a normalization layer follows the scaled activations);

    and implements :meth:`features` and :meth:`head` over a parameter dict of the *submodel*
    (every size read from the tensors it is given), :meth:`layer_flops` and
    :meth:`activation_numel` (the ratio policy's cost model; a model with convolutions also
    sets ``convolution`` and, where its first convolution reads the input, overrides
    :meth:`workspace_numel`). :meth:`init` defaults to PyTorch's fan-in uniform; override it
    for anything else.
    """

    groups: dict[str, int]
    layout: Layout
    head_names: tuple[str, ...]
    backbone_names: tuple[str, ...]
    scaler: str = "none"
    has_normalization = False
    # whether a forward pass runs convolutions (the policy then counts the convolution
    # library's resident state, rabo.policy.CONV_RUNTIME_BYTES)
    convolution = False

    def init(self, seed: int, dtype: torch.dtype = torch.float32) -> Params:
        """PyTorch's default init (uniform +-1/sqrt(fan_in); biases by their weight's fan-in,
        1-D tensors without a weight: zeros), seeded."""
        gen = torch.Generator().manual_seed(seed)
        params: Params = {}
        for name, lay in self.layout.items():
            weight = self.layout.get(name.replace(".bias", ".weight"), lay)
            if len(weight.shape) < 2:
                params[name] = torch.zeros(lay.shape, dtype=dtype)
                continue
            bound = 1.0 / math.sqrt(math.prod(weight.shape[1:]))
            params[name] = (torch.rand(lay.shape, generator=gen, dtype=dtype) * 2 - 1) * bound
        return params

    def num_params(self) -> int:
        return sum(math.prod(lay.shape) for lay in self.layout.values())

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

    def features(self, params: Mapping[str, torch.Tensor], inputs: torch.Tensor) -> torch.Tensor:
        """The backbone's output for ``inputs`` (what the head reads)."""
        raise NotImplementedError

    def head(self, params: Mapping[str, torch.Tensor], features: torch.Tensor) -> torch.Tensor:
        """Logits from the features."""
        raise NotImplementedError

    def forward(self, params: Mapping[str, torch.Tensor], inputs: torch.Tensor) -> torch.Tensor:
        return self.head(params, self.features(params, inputs))

    def scaled(self, h: torch.Tensor, full_width: int, dim: int = 1) -> torch.Tensor:
        """HeteroFL's scaler: a submodel keeping k of n units of ``dim`` multiplies their
        outputs by n/k, so that the next layer sees the full model's scale (the full model is
        unchanged). Call it where a group's activations leave their layer."""
        kept = h.shape[dim]
        if self.scaler == "none" or kept == full_width:
            return h
        return h * (full_width / kept)

    def layer_flops(self, ratio: float = 1.0, batch: int = 1) -> dict[str, int]:
        """Forward FLOPs (2 per multiply-add) per layer of the submodel at ``ratio``."""
        raise NotImplementedError

    def activation_numel(self, ratio: float = 1.0, batch: int = 1) -> int:
        """Elements of the activations a forward pass keeps for backward, at ``ratio``."""
        raise NotImplementedError

    def workspace_numel(self, ratio: float = 1.0, batch: int = 1) -> int:
        """Elements of the kernels' own buffers at a backward pass's peak that do not shrink
        with ``ratio`` (0: none; see :func:`conv_input_workspace`)."""
        return 0


# oneDNN (PyTorch's CPU convolutions) computes a convolution's weight gradient in a channel-
# blocked layout (nChw16c with AVX-512, nChw8c with AVX2): a tensor's channels are padded up to
# a whole block. The first convolution's input (1 to 3 channels) is padded to one block whatever
# the ratio; measured on a 1x28x28 conv to 4 channels at batch 128 (torch 2.13 CPU, AVX-512):
# 9.1 MiB above the step's start against 3.1 MiB of output and its gradient, i.e. one
# 16-channel copy of the input (6.1 MiB).
CONV_CHANNEL_BLOCK = 16


def conv_input_workspace(input_shape: tuple[int, ...], batch: int) -> int:
    """Elements of the first convolution's input reordered into one channel block (or more,
    for an input of more channels): what its backward holds whatever the kept channels."""
    channels, *spatial = input_shape
    blocks = max(1, math.ceil(channels / CONV_CHANNEL_BLOCK))
    return batch * blocks * CONV_CHANNEL_BLOCK * math.prod(spatial)


class WidthModel(PrunableModel):
    """A width-prunable MLP or CNN over ``Params``."""

    def __init__(self, spec: ModelSpec) -> None:
        self.spec = spec
        self.scaler = spec.scaler
        self.convolution = spec.kind == "cnn"
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

    # ------------------------------------------------------------------ forward

    def features(self, params: Mapping[str, torch.Tensor], inputs: torch.Tensor) -> torch.Tensor:
        h = inputs
        if self.spec.kind == "cnn":
            pad = self.spec.kernel // 2
            for i, width in enumerate(self.spec.channels):
                h = F.conv2d(h, params[f"conv{i}.weight"], params[f"conv{i}.bias"], padding=pad)
                h = self.scaled(F.max_pool2d(F.relu(h), 2), width)
        h = h.flatten(1)
        for i, width in enumerate(self.spec.hidden):
            h = self.scaled(F.relu(F.linear(h, params[f"fc{i}.weight"], params[f"fc{i}.bias"])),
                             width)
        return h

    # The built-in MLP and CNN have no normalization layer: the forward scaler on its own
    # then amplifies a small client's gradients (see docs/method.md), so tasks warn about it.
    has_normalization = False

    def head(self, params: Mapping[str, torch.Tensor], features: torch.Tensor) -> torch.Tensor:
        return F.linear(features, params["head.weight"], params["head.bias"])

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

    def workspace_numel(self, ratio: float = 1.0, batch: int = 1) -> int:
        """The first convolution's input in oneDNN's channel-blocked layout (CNN; 0 for an
        MLP): follows the input, not the kept channels."""
        if self.spec.kind != "cnn":
            return 0
        return conv_input_workspace(self.spec.input_shape, batch)


def build_model(kind: str, input_shape: tuple[int, ...], classes: int, hidden: list[int] | tuple,
                channels: list[int] | tuple = (), kernel: int = 3, scaler: str = "none"
                ) -> WidthModel:
    """A built-in MLP or CNN."""
    return WidthModel(ModelSpec(kind=kind, input_shape=tuple(input_shape), classes=classes,
                                hidden=tuple(hidden), channels=tuple(channels), kernel=kernel,
                                scaler=scaler))


# --------------------------------------------------------------------------- the registry

ModelFactory = Callable[[Any, tuple[int, ...], int], PrunableModel]
PLUGINS_ENV = "RABO_MODEL_PLUGINS"  # comma-separated modules that register models
ENTRY_POINTS = "rabo.models"  # installed packages: name = "module:factory"
_FACTORIES: dict[str, ModelFactory] = {}
_plugins_loaded = False


def register_model(kind: str, factory: ModelFactory) -> None:
    """Make ``model.kind: <kind>`` build ``factory(model_cfg, input_shape, classes)``: the
    config's ``model`` section (``hidden``, ``channels``, ``scaler``, ``options``, ...), the
    data's input shape (e.g. ``(1, 28, 28)``) and class count; it returns a
    :class:`PrunableModel`."""
    if not kind or not isinstance(kind, str):
        raise ValueError("a model kind is a non-empty string")
    if kind in _FACTORIES and _FACTORIES[kind] is not factory:
        raise ValueError(f"model kind {kind!r} is registered already")
    _FACTORIES[kind] = factory


def _load_plugins() -> None:
    """Import the modules named in ``RABO_MODEL_PLUGINS`` and the ``rabo.models`` entry
    points, once: what this machine's environment installs, not what a peer sends."""
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    import importlib
    import os
    from importlib.metadata import entry_points

    for name in filter(None, (m.strip() for m in os.environ.get(PLUGINS_ENV, "").split(","))):
        try:
            importlib.import_module(name)
        except Exception as exc:  # noqa: BLE001 - any failure of user code, named
            raise ConfigError(f"{PLUGINS_ENV}: cannot import model plugin {name!r}: "
                              f"{type(exc).__name__}: {exc}") from None
    for ep in entry_points(group=ENTRY_POINTS):
        if ep.name not in _FACTORIES:
            try:
                register_model(ep.name, ep.load())
            except Exception as exc:  # noqa: BLE001
                raise ConfigError(f"entry point {ENTRY_POINTS}:{ep.name} ({ep.value}) cannot "
                                  f"be loaded: {type(exc).__name__}: {exc}") from None


def model_kinds() -> list[str]:
    _load_plugins()
    return sorted(_FACTORIES)


def model_from_config(model_cfg: Any, input_shape: tuple[int, ...], classes: int
                      ) -> PrunableModel:
    """The model ``model_cfg.kind`` names, for data of ``input_shape`` and ``classes``."""
    _load_plugins()
    factory = _FACTORIES.get(model_cfg.kind)
    if factory is None:
        raise ConfigError(f"model.kind: unknown model {model_cfg.kind!r}; known: "
                          f"{', '.join(model_kinds())} (a model of your own: "
                          f"docs/models.md)")
    try:
        model = factory(model_cfg, tuple(input_shape), classes)
    except (ValueError, TypeError, KeyError) as exc:
        raise ConfigError(f"model.kind {model_cfg.kind!r}: {exc}") from None
    if not isinstance(model, PrunableModel):
        raise ConfigError(f"model.kind {model_cfg.kind!r}: the factory returned a "
                          f"{type(model).__name__}, not a rabo.models.PrunableModel")
    check_model(model)
    model.scaler = model_cfg.scaler
    return model


def check_model(model: PrunableModel) -> None:
    """The contract's structural parts: every axis names a known group and matches its width
    (times its repeat), head and backbone split the layout."""
    for name, lay in model.layout.items():
        for i, (axis, size) in enumerate(zip(lay.axes, lay.shape, strict=True)):
            if axis is None:
                continue
            if axis.group not in model.groups:
                raise ConfigError(f"model: {name} axis {i} is indexed by unknown group "
                                  f"{axis.group!r}; groups: {sorted(model.groups)}")
            if model.groups[axis.group] * axis.repeat != size:
                raise ConfigError(f"model: {name} axis {i} has size {size}, but group "
                                  f"{axis.group!r} x repeat {axis.repeat} is "
                                  f"{model.groups[axis.group] * axis.repeat}")
    names = set(model.layout)
    if set(model.head_names) | set(model.backbone_names) != names or (
            set(model.head_names) & set(model.backbone_names)):
        raise ConfigError("model: head_names and backbone_names must split the layout")


def _width_model(model_cfg: Any, input_shape: tuple[int, ...], classes: int) -> PrunableModel:
    return build_model(model_cfg.kind, input_shape, classes, model_cfg.hidden,
                       model_cfg.channels, model_cfg.kernel, model_cfg.scaler)


register_model("mlp", _width_model)
register_model("cnn", _width_model)


# the ResNet and the ViT build on PrunableModel and register themselves
from rabo import resnet, vit  # noqa: E402,F401
