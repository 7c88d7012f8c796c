"""The worker's resource profile as a wire message (measured by ``rabo.resources``)."""

from __future__ import annotations

import dataclasses

import torch

from rabo.resources import CgroupLimits, measure
from rabo_proto.v1 import rabo_pb2 as pb


def build_profile(device: torch.device, memory_limit: int | None = None, threads: int = 0,
                  limits: CgroupLimits | None = None, flops_per_s: float | None = None,
                  held_bytes: int = 0) -> pb.ResourceProfile:
    """``rabo.resources.measure`` as a ``rabo.v1.ResourceProfile``."""
    profile = measure(device, memory_limit, threads, limits, flops_per_s, held_bytes)
    return pb.ResourceProfile(**dataclasses.asdict(profile))
