"""Extracting a submodel's slices from full parameters and scattering slices back.

Every parameter has a :class:`ParamLayout`: its full shape and, per dimension, the unit group
that indexes it (or ``None`` for a dimension that is never pruned: input features, classes,
kernel taps). A mask gives the kept units of each group; from it :func:`plan` derives, once per
(layout, mask), the flat indices of the kept entries of every tensor. Extracting is one gather,
scattering one ``index_copy_``/``index_add_`` per tensor, and the slices are contiguous tensors
holding only the kept entries: what crosses the wire.

Dual pruning falls out of the layouts: a head whose input dimension is indexed by the
backbone's last group loses the columns of the units the backbone drops, and per-weight
hyperparameters that mirror a network's layout are pruned with the same indices.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from rabo.errors import ShapeError
from rabo.params import Params


@dataclass(frozen=True)
class Axis:
    """A dimension indexed by the units of ``group``; each unit spans ``repeat`` entries
    (e.g. a flattened conv channel spans H*W features)."""

    group: str
    repeat: int = 1


@dataclass(frozen=True)
class ParamLayout:
    shape: tuple[int, ...]
    axes: tuple[Axis | None, ...]

    def __post_init__(self) -> None:
        if len(self.shape) != len(self.axes):
            raise ValueError(f"layout has {len(self.shape)} dims but {len(self.axes)} axes")


Layout = dict[str, ParamLayout]


@dataclass(frozen=True)
class SlicePlan:
    """Flat indices (shaped like the slice) of each tensor's kept entries; ``None`` = whole."""

    index: dict[str, torch.Tensor | None]
    shapes: dict[str, tuple[int, ...]]

    def numel(self) -> int:
        total = 0
        for shape in self.shapes.values():
            n = 1
            for s in shape:
                n *= s
            total += n
        return total

    def to(self, device: torch.device | str) -> SlicePlan:
        return SlicePlan(
            {k: (None if i is None else i.to(device)) for k, i in self.index.items()},
            dict(self.shapes),
        )


def _axis_index(axis: Axis | None, size: int, kept: Mapping[str, torch.Tensor]) -> torch.Tensor:
    if axis is None:
        return torch.arange(size)
    units = kept[axis.group]
    if axis.repeat == 1:
        return units
    return (units[:, None] * axis.repeat + torch.arange(axis.repeat)[None, :]).reshape(-1)


def plan(layout: Mapping[str, ParamLayout], kept: Mapping[str, torch.Tensor]) -> SlicePlan:
    """The slice plan of ``layout`` under the kept units ``kept`` (group -> sorted indices)."""
    index: dict[str, torch.Tensor | None] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    for name, lay in layout.items():
        per_dim = [_axis_index(a, s, kept) for a, s in zip(lay.axes, lay.shape, strict=False)]
        sub_shape = tuple(int(i.numel()) for i in per_dim)
        shapes[name] = sub_shape
        if sub_shape == lay.shape:
            index[name] = None
            continue
        flat = torch.zeros(sub_shape, dtype=torch.int64)
        stride = 1
        for d in range(len(lay.shape) - 1, -1, -1):
            view = [1] * len(lay.shape)
            view[d] = sub_shape[d]
            flat = flat + per_dim[d].view(view) * stride
            stride *= lay.shape[d]
        index[name] = flat.contiguous()
    return SlicePlan(index, shapes)


def extract(full: Mapping[str, torch.Tensor], slice_plan: SlicePlan) -> Params:
    """Contiguous tensors holding only the kept entries of ``full``."""
    out: Params = {}
    for name, idx in slice_plan.index.items():
        t = full[name]
        out[name] = t.detach().clone() if idx is None else t.reshape(-1)[idx.to(t.device)]
    return out


def check_slices(sub: Mapping[str, torch.Tensor], slice_plan: SlicePlan, what: str = "slices"
                 ) -> None:
    """Raise :class:`ShapeError` unless ``sub`` holds exactly the plan's tensors and shapes."""
    if set(sub) != set(slice_plan.shapes):
        missing = sorted(set(slice_plan.shapes) - set(sub))
        extra = sorted(set(sub) - set(slice_plan.shapes))
        raise ShapeError(f"{what}: missing tensors {missing}, unexpected tensors {extra}")
    for name, shape in slice_plan.shapes.items():
        if tuple(sub[name].shape) != shape:
            raise ShapeError(
                f"{what}: tensor {name} has shape {tuple(sub[name].shape)}, expected {shape}"
            )


def scatter(full: Mapping[str, torch.Tensor], slice_plan: SlicePlan,
            sub: Mapping[str, torch.Tensor], *, add: bool = False) -> Params:
    """A copy of ``full`` with the kept entries replaced by (or, ``add``, increased by) ``sub``."""
    check_slices(sub, slice_plan)
    out: Params = {}
    for name, t in full.items():
        if name not in slice_plan.index:
            out[name] = t.clone()
            continue
        idx = slice_plan.index[name]
        s = sub[name].to(device=t.device, dtype=t.dtype)
        if idx is None:
            out[name] = t + s if add else s.clone()
            continue
        flat = t.detach().clone().reshape(-1)
        i = idx.to(t.device).reshape(-1)
        if add:
            flat.index_add_(0, i, s.reshape(-1))
        else:
            flat.index_copy_(0, i, s.reshape(-1))
        out[name] = flat.view(t.shape)
    return out
