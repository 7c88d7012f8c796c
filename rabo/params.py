"""Parameter sets as ordered ``name -> tensor`` dicts, and the few vector operations on them.

x, y, v, gradients, deltas and submodel slices are all ``Params``. Keeping them plain dicts of
tensors (not ``nn.Module`` state) lets one function act on a full model or on any submodel: the
shapes live in the tensors.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

Params = dict[str, torch.Tensor]


def zeros_like(p: Mapping[str, torch.Tensor]) -> Params:
    return {k: torch.zeros_like(t) for k, t in p.items()}


def clone(p: Mapping[str, torch.Tensor]) -> Params:
    return {k: t.detach().clone() for k, t in p.items()}


def detach(p: Mapping[str, torch.Tensor]) -> Params:
    return {k: t.detach() for k, t in p.items()}


def to(p: Mapping[str, torch.Tensor], device: torch.device | str, dtype: torch.dtype | None = None
       ) -> Params:
    return {k: t.to(device=device, dtype=dtype or t.dtype) for k, t in p.items()}


def add(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor], alpha: float = 1.0
        ) -> Params:
    """a + alpha * b."""
    return {k: a[k].add(b[k], alpha=alpha) for k in a}


def sub(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> Params:
    return {k: a[k] - b[k] for k in a}


def scale(a: Mapping[str, torch.Tensor], s: float) -> Params:
    return {k: t * s for k, t in a.items()}


def norm(p: Mapping[str, torch.Tensor]) -> float:
    """Euclidean norm of all entries together."""
    if not p:
        return 0.0
    return float(torch.linalg.vector_norm(torch.stack([
        torch.linalg.vector_norm(t.detach().float() if t.dtype == torch.bfloat16 else t.detach())
        for t in p.values()
    ])))


def dot(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> torch.Tensor:
    return sum((torch.sum(a[k] * b[k]) for k in a), torch.zeros((), dtype=_dtype(a)))


def numel(p: Mapping[str, torch.Tensor]) -> int:
    return sum(t.numel() for t in p.values())


def nbytes(p: Mapping[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in p.values())


def flatten(p: Mapping[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in p.values()]) if p else torch.zeros(0)


def allclose(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor], atol: float = 0.0,
             rtol: float = 0.0) -> bool:
    return a.keys() == b.keys() and all(
        a[k].shape == b[k].shape and torch.allclose(a[k], b[k], atol=atol, rtol=rtol) for k in a
    )


def max_abs_diff(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> float:
    return max((float((a[k] - b[k]).abs().max()) for k in a if a[k].numel()), default=0.0)


def _dtype(p: Mapping[str, torch.Tensor]) -> torch.dtype:
    for t in p.values():
        return t.dtype
    return torch.float32
