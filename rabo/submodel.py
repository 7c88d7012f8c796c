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

import hashlib
import itertools
import math
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


MAX_BLOCKS = 16  # beyond this many rectangular blocks a tensor uses one flat gather instead

Block = tuple[tuple[slice, ...], tuple[slice, ...]]  # (slices of the full tensor, of the slice)


class SlicePlan:
    """How to cut each tensor of a layout down to a submodel, and put it back.

    Per tensor: the slice's shape and either ``None`` (the whole tensor is kept), a short list
    of rectangular blocks (static and rolling masks keep contiguous runs of units, so their
    slices are a few dense sub-rectangles that copy and accumulate at memory speed), or, when
    the kept units are scattered (random masks), the flat indices of the kept entries.
    """

    def __init__(self, layout: Mapping[str, ParamLayout], per_dim: dict[str, list[torch.Tensor]],
                 blocks: dict[str, list[Block] | None]) -> None:
        self._layout = {k: layout[k] for k in per_dim}
        self._per_dim = per_dim
        self.blocks = blocks
        self.shapes: dict[str, tuple[int, ...]] = {
            k: tuple(int(i.numel()) for i in dims) for k, dims in per_dim.items()}
        self.whole = {k: self.shapes[k] == self._layout[k].shape for k in per_dim}
        self._flat: dict[str, torch.Tensor | None] | None = None
        self._key: str | None = None

    def numel(self) -> int:
        return sum(math.prod(shape) for shape in self.shapes.values())

    @property
    def full_shapes(self) -> dict[str, tuple[int, ...]]:
        """Each tensor's shape in the full model."""
        return {k: tuple(lay.shape) for k, lay in self._layout.items()}

    def key(self) -> str:
        """Equal for two plans that keep the same entries of the same tensors (a digest of
        the kept indices): their slices of one state hold the same values."""
        if self._key is None:
            h = hashlib.blake2b(digest_size=16)
            for name, dims in self._per_dim.items():
                h.update(name.encode() + b"\0")
                for i in dims:
                    h.update(str(i.numel()).encode() + b":")
                    h.update(i.to(torch.int64).contiguous().numpy().tobytes())
            self._key = h.hexdigest()
        return self._key

    @property
    def index(self) -> dict[str, torch.Tensor | None]:
        """Flat indices (shaped like the slice) of each tensor's kept entries; None = whole."""
        if self._flat is None:
            self._flat = {k: None if self.whole[k] else _flat_index(self._layout[k].shape, dims)
                          for k, dims in self._per_dim.items()}
        return self._flat


def _flat_index(shape: tuple[int, ...], per_dim: list[torch.Tensor]) -> torch.Tensor:
    sub_shape = [int(i.numel()) for i in per_dim]
    flat = torch.zeros(sub_shape, dtype=torch.int64)
    stride = 1
    for d in range(len(shape) - 1, -1, -1):
        view = [1] * len(shape)
        view[d] = sub_shape[d]
        flat = flat + per_dim[d].view(view) * stride
        stride *= shape[d]
    return flat.contiguous()


def _runs(idx: torch.Tensor) -> list[tuple[int, int, int]]:
    """(full start, slice start, length) of each run of consecutive indices."""
    n = int(idx.numel())
    if n == 0:
        return []
    breaks = (torch.nonzero(idx[1:] != idx[:-1] + 1).flatten() + 1).tolist()
    starts, ends = [0, *breaks], [*breaks, n]
    return [(int(idx[a]), a, b - a) for a, b in zip(starts, ends, strict=True)]


def _blocks(per_dim: list[torch.Tensor]) -> list[Block] | None:
    runs = [_runs(i) for i in per_dim]
    if math.prod(len(r) for r in runs) > MAX_BLOCKS:
        return None
    out: list[Block] = []
    for combo in itertools.product(*runs):
        out.append((tuple(slice(f, f + n) for f, _, n in combo),
                    tuple(slice(s, s + n) for _, s, n in combo)))
    return out


def _axis_index(axis: Axis | None, size: int, kept: Mapping[str, torch.Tensor]) -> torch.Tensor:
    if axis is None:
        return torch.arange(size)
    units = kept[axis.group]
    if axis.repeat == 1:
        return units
    return (units[:, None] * axis.repeat + torch.arange(axis.repeat)[None, :]).reshape(-1)


def plan(layout: Mapping[str, ParamLayout], kept: Mapping[str, torch.Tensor]) -> SlicePlan:
    """The slice plan of ``layout`` under the kept units ``kept`` (group -> sorted indices)."""
    per_dim: dict[str, list[torch.Tensor]] = {}
    blocks: dict[str, list[Block] | None] = {}
    for name, lay in layout.items():
        dims = [_axis_index(a, s, kept) for a, s in zip(lay.axes, lay.shape, strict=True)]
        per_dim[name] = dims
        blocks[name] = _blocks(dims)
    return SlicePlan(layout, per_dim, blocks)


def extract(full: Mapping[str, torch.Tensor], slice_plan: SlicePlan, copy: bool = True
            ) -> Params:
    """Contiguous tensors holding only the kept entries of ``full``.

    ``copy=False`` returns a whole kept tensor as itself rather than a copy: for read-only use
    (encoding for the wire) of a state that is not modified meanwhile.
    """
    out: Params = {}
    for name, shape in slice_plan.shapes.items():
        t = full[name].detach()
        blocks = slice_plan.blocks[name]
        if slice_plan.whole[name]:
            out[name] = t.clone() if copy else t
        elif blocks is not None:
            sub = torch.empty(shape, dtype=t.dtype, device=t.device)
            for full_sl, sub_sl in blocks:
                sub[sub_sl] = t[full_sl]
            out[name] = sub
        else:
            idx = slice_plan.index[name]
            assert idx is not None
            out[name] = t.reshape(-1)[idx.to(t.device)]
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
        if name not in slice_plan.shapes:
            out[name] = t.clone()
            continue
        s = sub[name].to(device=t.device, dtype=t.dtype)
        if slice_plan.whole[name]:
            out[name] = t + s if add else s.clone()
            continue
        res = t.detach().clone()
        blocks = slice_plan.blocks[name]
        if blocks is not None:
            for full_sl, sub_sl in blocks:
                if add:
                    res[full_sl] += s[sub_sl]
                else:
                    res[full_sl] = s[sub_sl]
        else:
            idx = slice_plan.index[name]
            assert idx is not None
            flat, i = res.view(-1), idx.to(t.device).reshape(-1)
            if add:
                flat.index_add_(0, i, s.reshape(-1))
            else:
                flat.index_copy_(0, i, s.reshape(-1))
        out[name] = res
    return out
