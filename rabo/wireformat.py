"""What the x, y and v slices look like on the wire (``wire.dtype``), and error feedback.

Every transport moves a slice dict (:data:`rabo.params.Params`) in its *wire form*:

- ``float32``, ``bfloat16``, ``float16``: each tensor cast to that dtype (rounded to nearest).
- ``int8`` [ext]: each tensor's entries, flattened in row-major order, are cut into blocks of
  ``wire.block``; a block travels as int8 codes ``round(value / scale)`` in [-127, 127] with
  one float32 ``scale = max |value| / 127`` (absmax scaling per block, as in the blockwise
  8-bit optimizers of Dettmers et al., 2022). The codes keep the tensor's name and shape; the
  scales travel as a float32 tensor named ``<name>#scale`` of shape ``[ceil(numel / block)]``
  (``#`` cannot occur in a parameter name). At a block of 256 a slice costs 1 + 4/256 bytes
  per entry: 0.254x of float32.

The coordinator keeps float32 master state and rounds each assignment to the wire from it, so
the error of the down path never accumulates. The up path is a client's update; with int8 and
``wire.error_feedback`` the worker keeps what its quantized update could not carry and adds it
to its next update (error-feedback SGD: Seide et al., 2014; Karimireddy et al., 2019). The
residual is kept in full-model coordinates per client (:class:`ErrorFeedback`), so a mask that
changes between rounds (rolling, random) carries each coordinate's residual until the client
next updates that coordinate.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from rabo.errors import RaboError
from rabo.params import Params
from rabo.submodel import SlicePlan, extract, scatter

SCALE = "#scale"  # suffix of the companion tensor holding an int8 tensor's block scales
FLOAT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16,
                "float16": torch.float16}
DTYPES = (*FLOAT_DTYPES, "int8")
CODE_MAX = 127  # codes are symmetric: -127..127 (-128 is never produced, decoded as is)


class WireFormatError(RaboError, ValueError):
    """Slices that do not hold what their wire format says (an int8 tensor without its
    scales, scales of the wrong length, negative or non-finite scales)."""


def n_blocks(numel: int, block: int) -> int:
    return -(-numel // block)


def quantize(t: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Int8 codes (the shape of ``t``) and float32 per-block scales of ``t``."""
    flat = t.detach().reshape(-1).to(torch.float32)
    n = flat.numel()
    nb = n_blocks(n, block)
    padded = torch.zeros(nb * block, dtype=torch.float32, device=flat.device)
    padded[:n] = flat
    blocks = padded.view(nb, block)
    scales = blocks.abs().amax(dim=1) / CODE_MAX
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))
    codes = torch.round(blocks / safe[:, None]).clamp_(-CODE_MAX, CODE_MAX)
    codes = codes.to(torch.int8).reshape(-1)[:n].reshape(t.shape)
    return codes, scales


def dequantize(codes: torch.Tensor, scales: torch.Tensor, block: int) -> torch.Tensor:
    """The float32 values ``codes`` x their block's scale (the inverse of :func:`quantize` up
    to its rounding)."""
    n = codes.numel()
    nb = n_blocks(n, block)
    if scales.dim() != 1 or scales.numel() != nb:
        raise WireFormatError(f"{nb} block scales expected for {n} int8 codes at a block of "
                              f"{block}, got shape {list(scales.shape)}")
    padded = torch.zeros(nb * block, dtype=torch.float32, device=codes.device)
    padded[:n] = codes.reshape(-1).to(torch.float32)
    values = padded.view(nb, block) * scales.to(torch.float32)[:, None]
    return values.reshape(-1)[:n].reshape(codes.shape)


@dataclass(frozen=True)
class WireFormat:
    """``dtype`` and, for int8, the block size and whether updates carry error feedback."""

    dtype: str = "float32"
    block: int = 256
    error_feedback: bool = True

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"wire dtype {self.dtype!r}: expected one of {list(DTYPES)}")
        if self.block < 1:
            raise ValueError(f"wire block {self.block}: must be >= 1")

    @property
    def quantized(self) -> bool:
        return self.dtype == "int8"

    @property
    def feedback(self) -> bool:
        """Whether a worker keeps residuals (int8 with error feedback)."""
        return self.quantized and self.error_feedback

    @property
    def element_dtype(self) -> torch.dtype:
        """The dtype of a slice's entries on the wire (the codes, for int8)."""
        return torch.int8 if self.quantized else FLOAT_DTYPES[self.dtype]

    @property
    def bytes_per_element(self) -> float:
        """Wire bytes per slice entry (int8: the block scales spread over the block)."""
        if self.quantized:
            return 1.0 + 4.0 / self.block
        return float(FLOAT_DTYPES[self.dtype].itemsize)

    # ------------------------------------------------------------------ layout

    def layout(self, shapes: Mapping[str, Sequence[int]]
               ) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
        """The tensors (name, dtype, shape) that a slice of ``shapes`` is on the wire, in
        order: what a receiver checks a payload against."""
        out = []
        for name, shape in shapes.items():
            out.append((name, self.element_dtype, tuple(shape)))
            if self.quantized:
                out.append((name + SCALE, torch.float32,
                            (n_blocks(math.prod(shape), self.block),)))
        return out

    def nbytes(self, shapes: Mapping[str, Sequence[int]]) -> int:
        return sum(math.prod(s) * d.itemsize for _, d, s in self.layout(shapes))

    # ------------------------------------------------------------------ conversion

    def encode(self, params: Mapping[str, torch.Tensor]) -> Params:
        """The wire form of float ``params`` (rounded once, from float32 values)."""
        if not self.quantized:
            dtype = FLOAT_DTYPES[self.dtype]
            return {k: t if t.dtype == dtype else t.to(dtype) for k, t in params.items()}
        out: Params = {}
        for name, t in params.items():
            out[name], out[name + SCALE] = quantize(t, self.block)
        return out

    def decode(self, wire: Mapping[str, torch.Tensor]) -> Params:
        """Slices in the wire form of any dtype, as float32 tensors (int8: dequantized; a
        float tensor passes through). Raises :class:`WireFormatError` on int8 codes without
        their scales, scales without codes, or scales that are negative or not finite."""
        out: Params = {}
        for name, t in wire.items():
            if name.endswith(SCALE):
                if name[:-len(SCALE)] not in wire:
                    raise WireFormatError(f"tensor {name}: block scales of no tensor")
                continue
            if t.dtype == torch.int8:
                scales = wire.get(name + SCALE)
                if scales is None:
                    raise WireFormatError(f"tensor {name}: int8 codes without their scales "
                                          f"({name}{SCALE})")
                if scales.numel() and not bool(torch.isfinite(scales).all()):
                    raise WireFormatError(f"tensor {name}: a block scale is not finite")
                if scales.numel() and bool((scales < 0).any()):
                    raise WireFormatError(f"tensor {name}: a block scale is negative")
                out[name] = dequantize(t, scales, self.block)
            else:
                out[name] = t if t.dtype == torch.float32 else t.to(torch.float32)
        return out

    def received(self, wire: Mapping[str, torch.Tensor]) -> Params:
        """What a receiver keeps of a payload: int8 decoded to float32, 16-bit tensors as they
        are (they become float32 where they are averaged, at half the memory meanwhile)."""
        if not self.quantized:
            return dict(wire)
        return self.decode(wire)


FLOAT32 = WireFormat()


@dataclass
class ErrorFeedback:
    """One client's residuals of int8 updates, per part (x, y, v), in full-model coordinates:
    a worker keeps one per client it runs, for as long as it runs (a restarted worker starts
    from zero residuals, as a new one would)."""

    residuals: dict[str, Params] = field(default_factory=dict)

    def encode(self, fmt: WireFormat, part: str, values: Mapping[str, torch.Tensor],
               slice_plan: SlicePlan) -> Params:
        """The wire form of update ``values`` (float32, on the CPU, the slices of
        ``slice_plan``) plus this client's residual on those coordinates; the residual becomes
        what the wire form leaves out."""
        full = self.residuals.get(part)
        if full is None or any(n not in full for n in slice_plan.shapes):
            full = {**{n: torch.zeros(shape, dtype=torch.float32)
                       for n, shape in slice_plan.full_shapes.items()}, **(full or {})}
        carried = extract(full, slice_plan, copy=False)
        corrected = {n: values[n] + carried[n] for n in values}
        wire = fmt.encode(corrected)
        sent = fmt.decode(wire)
        self.residuals[part] = scatter(full, slice_plan,
                                       {n: corrected[n] - sent[n] for n in corrected})
        return wire

    def norm(self) -> float:
        """The L2 norm of every residual (what the worker still owes the coordinator)."""
        total = sum(float(t.double().pow(2).sum()) for p in self.residuals.values()
                    for t in p.values())
        return math.sqrt(total)


class ClientResiduals:
    """The :class:`ErrorFeedback` of each client a process runs (the simulator for all its
    clients, a gRPC worker for its session, a torch.distributed rank for its run)."""

    def __init__(self) -> None:
        self._by_client: dict[int, ErrorFeedback] = {}

    def of(self, fmt: WireFormat, client_id: int) -> ErrorFeedback | None:
        """Client ``client_id``'s residuals; None unless ``fmt`` is int8 with error feedback."""
        if not fmt.feedback:
            return None
        return self._by_client.setdefault(client_id, ErrorFeedback())

    def clear(self) -> None:
        self._by_client.clear()
