"""Flattening parameter dicts for tests that write a step with dense Hessian blocks."""

from __future__ import annotations

import torch


def flat(p):
    return torch.cat([t.reshape(-1) for t in p.values()])


def unflat(vec, like):
    out, i = {}, 0
    for k, t in like.items():
        out[k] = vec[i:i + t.numel()].view(t.shape)
        i += t.numel()
    return out
