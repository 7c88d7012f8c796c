"""Tensors on the wire: dtype + shape + raw little-endian bytes, in checksummed chunks.

Shared by the coordinator and the worker (both import this package, never each other). A
payload is a :class:`~rabo_proto.v1.rabo_pb2.PayloadHeader` listing the tensors, followed by
raw gRPC messages carrying the concatenated bytes (each message is the bytes themselves, no
protobuf around them: see ``rabo_proto/stream.py``) and a
:class:`~rabo_proto.v1.rabo_pb2.PayloadTrailer` with their CRC-32C. Receiving checks every
chunk's size as it arrives, the total length, and the checksum against the trailer, and
decodes only after all of that; no pickle, no numpy or torch serialization formats.
"""

from __future__ import annotations

import functools
import math
import sys
import threading
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
from google.protobuf.message import DecodeError, Message
from google_crc32c import extend as _crc32c_extend

from rabo_proto.v1 import rabo_pb2 as pb

if TYPE_CHECKING:
    import torch

# Bytes per element of each wire dtype. Framing, checksums and header checks need only this,
# so that a process moving bytes without tensors (worker.echo) never imports torch; torch is
# imported where tensors are made or read (_dtypes()).
ITEMSIZE = {pb.FLOAT32: 4, pb.FLOAT64: 8, pb.FLOAT16: 2, pb.BFLOAT16: 2, pb.INT64: 8,
            pb.INT32: 4, pb.INT8: 1}


@functools.cache
def _dtypes() -> tuple[dict[Any, Any], dict[Any, Any]]:
    """(torch dtype -> wire dtype, wire dtype -> torch dtype)."""
    import torch

    wire = {torch.float32: pb.FLOAT32, torch.float64: pb.FLOAT64, torch.float16: pb.FLOAT16,
            torch.bfloat16: pb.BFLOAT16, torch.int64: pb.INT64, torch.int32: pb.INT32,
            torch.int8: pb.INT8}
    return wire, {v: k for k, v in wire.items()}

PART_NAMES = {pb.X: "x", pb.Y: "y", pb.V: "v"}
PARTS = {v: k for k, v in PART_NAMES.items()}
GRPC_FRAME_BYTES = 5  # gRPC length-prefixed message framing: 1 flag byte + 4 length bytes

if sys.byteorder != "little":  # pragma: no cover - all supported platforms are little-endian
    raise ImportError("rabo_proto.codec supports little-endian hosts only")


from rabo.errors import RaboError  # noqa: E402 - after the byte-order guard

# What a refusal is about (metric labels, the status code chosen): set where it is raised
WIRE_KINDS = ("checksum", "truncated", "shape", "dtype", "NaN", "chunk", "measurement",
              "client-id", "tensors-do-not-match", "mask", "invalid-payload")


M = TypeVar("M", bound=Message)


class WireError(RaboError, ValueError):
    """A payload does not match what was announced or expected; the message says how and
    ``kind`` (one of :data:`WIRE_KINDS`) says what, for code that acts on it."""

    def __init__(self, message: str, kind: str = "invalid-payload") -> None:
        super().__init__(message)
        if kind not in WIRE_KINDS:
            raise ValueError(f"unknown wire error kind {kind!r}")
        self.kind = kind


@dataclass(frozen=True)
class WireTensor:
    part: str  # "x", "y" or "v"
    name: str
    tensor: torch.Tensor


def _raw(t: torch.Tensor) -> memoryview:
    import torch

    t = t.detach().contiguous().cpu()
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    if t.dtype not in _dtypes()[0] and t.dtype != torch.int16:
        raise WireError(f"dtype {t.dtype} cannot cross the wire", "dtype")
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.reshape(-1).numpy()).cast("B")  # type: ignore[arg-type]


def tensor_meta(part: str, name: str, dtype: torch.dtype, shape: Sequence[int]) -> pb.TensorMeta:
    wire = _dtypes()[0]
    if dtype not in wire:
        raise WireError(f"tensor {part}.{name}: dtype {dtype} cannot cross the wire", "dtype")
    return pb.TensorMeta(part=PARTS[part], name=name,  # type: ignore[arg-type]
                         dtype=wire[dtype],  # type: ignore[arg-type]
                         shape=list(shape))


def meta_nbytes(meta: pb.TensorMeta) -> int:
    n = 1
    for s in meta.shape:
        n *= s
    return n * ITEMSIZE[meta.dtype]


def crc32c(data: bytes, crc: int = 0) -> int:
    """CRC-32C (Castagnoli) of ``data`` continuing ``crc``: the SSE4.2 / ARMv8 instruction
    through ``google-crc32c`` (about 3x zlib's CRC-32 here), its portable C or pure-Python
    code where the CPU lacks it; the same value everywhere."""
    return int(_crc32c_extend(crc, data))


class Encoded:
    """A payload ready to stream: its header, its bytes as raw chunk messages, and the
    trailer with their CRC-32C (known once every chunk has been produced)."""

    def __init__(self, round: int, worker_id: str, tensors: Sequence[WireTensor],
                 chunk_bytes: int) -> None:
        if chunk_bytes < 1:
            raise ValueError("chunk_bytes must be >= 1")
        self._views = [_raw(t.tensor) for t in tensors]
        self.header = pb.PayloadHeader(
            round=round, worker_id=worker_id,
            tensors=[tensor_meta(t.part, t.name, t.tensor.dtype, t.tensor.shape) for t in tensors],
            total_bytes=sum(v.nbytes for v in self._views))
        self.chunk_bytes = chunk_bytes
        self._crc: int | None = None
        self._frozen: list[bytes] | None = None

    @property
    def total_bytes(self) -> int:
        return int(self.header.total_bytes)

    def header_for(self, worker_id: str) -> pb.PayloadHeader:
        """The header as sent to ``worker_id`` (a shared payload goes to several)."""
        header = pb.PayloadHeader()
        header.CopyFrom(self.header)
        header.worker_id = worker_id
        return header

    def _make_chunks(self) -> Iterator[bytes]:
        """Chunks of at most ``chunk_bytes``, crossing tensor boundaries: each one copy of
        the tensor bytes (gRPC takes ``bytes``), checksummed as it is made."""
        crc = 0
        pending: list[memoryview] = []
        pending_bytes = 0
        for view in self._views:
            pos = 0
            while pos < view.nbytes:
                take = min(self.chunk_bytes - pending_bytes, view.nbytes - pos)
                pending.append(view[pos:pos + take])
                pending_bytes += take
                pos += take
                if pending_bytes == self.chunk_bytes:
                    data = bytes(pending[0]) if len(pending) == 1 else b"".join(pending)
                    crc = crc32c(data, crc)
                    yield data
                    pending, pending_bytes = [], 0
        if pending_bytes:
            data = b"".join(pending)
            crc = crc32c(data, crc)
            yield data
        self._crc = crc

    def freeze(self) -> Encoded:
        """Make every chunk now and keep them (and the checksum), so that the same bytes can
        be streamed to several receivers without slicing, copying or checksumming again."""
        if self._frozen is None:
            self._frozen = list(self._make_chunks())
            self._views = []
        return self

    def chunks(self) -> Iterator[bytes]:
        if self._frozen is not None:
            return iter(self._frozen)
        return self._make_chunks()

    def trailer(self) -> pb.PayloadTrailer:
        if self._crc is None:
            raise RuntimeError("the trailer is known once every chunk has been produced")
        return pb.PayloadTrailer(crc32c=self._crc)


def parse(data: bytes, cls: type[M], what: str) -> M:
    """A streaming message that must be a protobuf ``cls``; a clear WireError otherwise."""
    msg = cls()
    try:
        msg.ParseFromString(data)
    except DecodeError as exc:
        raise WireError(f"{what}: not a valid {cls.__name__} ({exc})") from None
    return msg


def parse_trailer(data: bytes | None, cls: type[pb.AssignmentMessage] | type[pb.UpdateMessage]
                  ) -> pb.PayloadTrailer | None:
    """The trailer a payload's raw chunks end with; None when the stream ended first."""
    if data is None:
        return None
    msg = parse(data, cls, "the message after a payload's bytes")
    if msg.WhichOneof("body") != "trailer":
        raise WireError("a payload's bytes must be followed by its trailer, got "
                        f"{msg.WhichOneof('body') or 'an empty message'}", "chunk")
    return msg.trailer


def check_header(header: pb.PayloadHeader, expected: Sequence[pb.TensorMeta] | None,
                 max_total_bytes: int) -> None:
    """Validate a header on its own, and against the expected tensor list when given."""
    total = 0
    seen = set()
    for meta in header.tensors:
        key = (meta.part, meta.name)
        label = f"{PART_NAMES.get(meta.part, '?')}.{meta.name}"
        if meta.part not in PART_NAMES:
            raise WireError(f"tensor {meta.name!r}: unknown part {meta.part}")
        if key in seen:
            raise WireError(f"tensor {label} appears twice")
        seen.add(key)
        if meta.dtype not in ITEMSIZE:
            raise WireError(f"tensor {label}: unknown dtype {meta.dtype}", "dtype")
        if any(s < 0 for s in meta.shape):
            raise WireError(f"tensor {label}: negative dimension in shape {list(meta.shape)}",
                            "shape")
        total += meta_nbytes(meta)
    if total != header.total_bytes:
        raise WireError(f"header announces {header.total_bytes} bytes but its tensors hold "
                        f"{total}")
    if total > max_total_bytes:
        raise WireError(f"payload of {total} bytes exceeds the limit of {max_total_bytes}")
    if expected is None:
        return
    want = {(m.part, m.name): m for m in expected}
    got = {(m.part, m.name): m for m in header.tensors}
    missing = sorted(f"{PART_NAMES[p]}.{n}" for p, n in want.keys() - got.keys())
    extra = sorted(f"{PART_NAMES.get(p, '?')}.{n}" for p, n in got.keys() - want.keys())
    if missing or extra:
        raise WireError(f"tensors do not match the assignment: missing {missing}, "
                        f"unexpected {extra}", "tensors-do-not-match")
    for key, meta in got.items():
        w = want[key]
        label = f"{PART_NAMES[key[0]]}.{key[1]}"
        if list(meta.shape) != list(w.shape):
            raise WireError(f"tensor {label}: shape {list(meta.shape)}, expected "
                            f"{list(w.shape)}", "shape")
        if meta.dtype != w.dtype:
            raise WireError(f"tensor {label}: dtype {pb.DType.Name(meta.dtype)}, expected "
                            f"{pb.DType.Name(w.dtype)}", "dtype")


class BufferPool:
    """Receive buffers kept between payloads, so that the next payload of a size lands in
    memory already mapped.

    Writing a fresh buffer costs a page fault per 4 KiB page (the kernel maps and zeroes each
    on first touch): chunks were copied into fresh buffers at 1.2 GB/s here, into buffers
    written before at 7.8 GB/s (8 updates of 38 MB: 0.32 s of copying into fresh buffers).
    A buffer is handed out again only once nothing refers
    to what it was handed out as (the tensors decoded from a payload hold it, through
    ``torch.frombuffer``), which a weak reference tells; so a buffer in use is never
    overwritten, whoever keeps its tensors. Buffers beyond ``max_bytes`` are not kept.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._slots: list[list[Any]] = []  # [buffer, weakref to the view handed out or None]
        self._kept = 0

    @property
    def kept_bytes(self) -> int:
        return self._kept

    def take(self, nbytes: int) -> Any:
        """A writable uint8 array of ``nbytes`` (contents undefined)."""
        with self._lock:
            best = None
            for slot in self._slots:
                buf, ref = slot
                if buf.nbytes >= nbytes and (ref is None or ref() is None) and \
                        (best is None or buf.nbytes < best[0].nbytes):
                    best = slot
            if best is None:
                buf = np.empty(nbytes, dtype=np.uint8)
                if self._kept + nbytes > self.max_bytes:
                    return buf  # not kept: freed with its last user
                best = [buf, None]
                self._slots.append(best)
                self._kept += nbytes
            view = best[0][:nbytes]
            best[1] = weakref.ref(view)
            return view


class Assembler:
    """Receives the raw chunks of one payload, then its trailer, and decodes its tensors once
    complete. Every chunk is checked as it arrives (size, not past the announced total) and
    checksummed then, so nothing is read twice at the end. ``pool``: where the receive buffer
    comes from (none: a fresh one)."""

    def __init__(self, header: pb.PayloadHeader, max_chunk_bytes: int,
                 pool: BufferPool | None = None) -> None:
        self.header = header
        self.max_chunk_bytes = max_chunk_bytes
        # uninitialised memory: every byte is written by a chunk before anything reads it
        # (bytearray(n) would first zero all of it, a whole extra pass over the payload)
        total = int(header.total_bytes)
        self._buf = (pool.take(total) if pool is not None
                     else np.empty(total, dtype=np.uint8))
        self._view = memoryview(self._buf)  # type: ignore[arg-type]
        self._received = 0
        self._crc = 0
        self.chunks = 0
        self.trailer: pb.PayloadTrailer | None = None  # set by accept()

    @property
    def received(self) -> int:
        return self._received

    @property
    def complete(self) -> bool:
        """Every announced byte has arrived (the trailer comes next)."""
        return self._received == len(self._buf)

    def add(self, data: bytes) -> None:
        size = len(data)
        if size > self.max_chunk_bytes:
            raise WireError(f"chunk of {size} bytes exceeds the limit of "
                            f"{self.max_chunk_bytes}", "chunk")
        if size == 0:
            raise WireError("empty chunk (a payload's raw messages carry at least one byte)",
                            "chunk")
        if self._received + size > len(self._buf):
            raise WireError(f"chunks carry more than the {len(self._buf)} bytes announced",
                            "chunk")
        self._view[self._received:self._received + size] = data
        self._crc = crc32c(data, self._crc)
        self._received += size
        self.chunks += 1

    def accept(self, data: bytes,
               cls: type[pb.AssignmentMessage] | type[pb.UpdateMessage]) -> None:
        """The stream's next message after the header: a raw chunk until every announced
        byte has arrived, then the trailer (a ``cls`` message, kept in :attr:`trailer`),
        then nothing."""
        if not self.complete:
            self.add(data)
        elif self.trailer is None:
            self.trailer = parse_trailer(data, cls)
        else:
            raise WireError("messages after the payload's trailer", "chunk")

    def finish(self, trailer: pb.PayloadTrailer | None, check_finite: bool = True,
               decode: bool = True) -> list[WireTensor]:
        """The tensors, once every byte and the trailer (``None``: the stream ended without
        one) have arrived and the checksum matches (``decode=False``: only those checks, and
        no tensors)."""
        if self._received != len(self._buf):
            raise WireError(f"truncated payload: {self._received} of {len(self._buf)} bytes "
                            "arrived", "truncated")
        if trailer is None:
            raise WireError("truncated payload: the stream ended before the trailer",
                            "truncated")
        if self._crc != trailer.crc32c:
            raise WireError(f"checksum mismatch: CRC-32C {self._crc:#010x}, trailer says "
                            f"{trailer.crc32c:#010x}", "checksum")
        if not decode:
            return []
        import torch

        out: list[WireTensor] = []
        offset = 0
        for meta in self.header.tensors:
            dtype = _dtypes()[1][meta.dtype]
            n = meta_nbytes(meta)
            count = n // dtype.itemsize
            if count == 0:
                t = torch.empty(list(meta.shape), dtype=dtype)
            elif offset % dtype.itemsize:  # after int8 codes: copied out to an aligned start
                t = torch.frombuffer(self._buf, dtype=torch.uint8, count=n, offset=offset
                                     ).clone().view(dtype).view(list(meta.shape))
            else:
                t = torch.frombuffer(self._buf, dtype=dtype, count=count, offset=offset
                                     ).view(list(meta.shape))
            offset += n
            label = f"{PART_NAMES[meta.part]}.{meta.name}"
            # a sum is non-finite when any entry is: a finite one (one float32 pass at memory
            # speed, no temporary) settles it; only a non-finite sum needs the exact test,
            # which tells a float32 overflow of finite entries apart from NaN / inf ones
            if (check_finite and t.is_floating_point() and t.numel()
                    and not math.isfinite(float(t.sum()))
                    and not bool(torch.isfinite(t).all())):
                raise WireError(f"tensor {label} holds NaN or infinite values", "NaN")
            out.append(WireTensor(PART_NAMES[meta.part], meta.name, t))
        return out


def message_bytes(msg: object) -> int:
    """Size of one gRPC message on the stream including its 5-byte length prefix: a raw chunk
    (``bytes``) or a protobuf message."""
    if isinstance(msg, (bytes, bytearray, memoryview)):
        return len(msg) + GRPC_FRAME_BYTES
    return int(msg.ByteSize()) + GRPC_FRAME_BYTES  # type: ignore[attr-defined]
