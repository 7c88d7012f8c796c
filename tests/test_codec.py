"""Tensors on the wire: chunking, checksums and every way a payload can be wrong."""

from __future__ import annotations

import pytest
import torch

from rabo_proto.codec import Assembler, Encoded, WireError, WireTensor, check_header, tensor_meta
from rabo_proto.v1 import rabo_pb2 as pb


def _tensors():
    gen = torch.Generator().manual_seed(0)
    return [WireTensor("x", "a", torch.randn(3, 5, generator=gen)),
            WireTensor("y", "b", torch.randn(7, generator=gen).double()),
            WireTensor("v", "c", torch.randn(2, 2, generator=gen).bfloat16()),
            WireTensor("v", "empty", torch.zeros(0, 4))]


@pytest.mark.parametrize("chunk", [1, 7, 16, 1000])
def test_roundtrip_across_chunk_sizes(chunk: int) -> None:
    enc = Encoded(3, "w1", _tensors(), chunk)
    chunks = list(enc.chunks())
    assert all(len(c.data) <= chunk for c in chunks)
    assert sum(len(c.data) for c in chunks) == enc.total_bytes == 15 * 4 + 7 * 8 + 4 * 2
    asm = Assembler(enc.header, max_chunk_bytes=chunk)
    for c in chunks:
        asm.add(c)
    out = asm.finish()
    for got, want in zip(out, _tensors(), strict=True):
        assert (got.part, got.name) == (want.part, want.name)
        assert got.tensor.dtype == want.tensor.dtype and torch.equal(got.tensor, want.tensor)


def _assembled(mutate) -> None:
    enc = Encoded(1, "w", _tensors(), 8)
    chunks = list(enc.chunks())
    header = pb.PayloadHeader()
    header.CopyFrom(enc.header)
    chunks = mutate(header, chunks) or chunks
    asm = Assembler(header, max_chunk_bytes=8)
    for c in chunks:
        asm.add(c)
    asm.finish()


def test_truncated_payload() -> None:
    with pytest.raises(WireError, match=r"truncated payload: \d+ of 124 bytes") as err:
        _assembled(lambda h, c: c[:-1])
    assert err.value.kind == "truncated"  # what code acts on, not the wording


def test_bad_checksum() -> None:
    def flip(h, chunks):
        chunks[2] = pb.Chunk(offset=chunks[2].offset, data=bytes([chunks[2].data[0] ^ 1])
                             + chunks[2].data[1:])
    with pytest.raises(WireError, match="checksum mismatch") as err:
        _assembled(flip)
    assert err.value.kind == "checksum"  # what code acts on, not the wording


def test_out_of_order_and_oversize_chunks() -> None:
    with pytest.raises(WireError, match="expected 8") as err:
        _assembled(lambda h, c: [c[0], c[2], c[1], *c[3:]])
    assert err.value.kind == "chunk"  # what code acts on, not the wording
    with pytest.raises(WireError, match="exceeds the limit of 8") as err:
        _assembled(lambda h, c: [pb.Chunk(offset=0, data=c[0].data + c[1].data), *c[2:]])
    assert err.value.kind == "chunk"  # what code acts on, not the wording


def test_nan_is_refused() -> None:
    enc = Encoded(1, "w", [WireTensor("x", "a", torch.tensor([1.0, float("nan")]))], 64)
    asm = Assembler(enc.header, 64)
    for c in enc.chunks():
        asm.add(c)
    with pytest.raises(WireError, match="x.a holds NaN or infinite values") as err:
        asm.finish()
    assert err.value.kind == "NaN"  # what code acts on, not the wording


def test_header_checks() -> None:
    enc = Encoded(1, "w", _tensors(), 64)
    check_header(enc.header, list(enc.header.tensors), 1 << 20)
    h = pb.PayloadHeader()
    h.CopyFrom(enc.header)
    h.total_bytes += 4
    with pytest.raises(WireError, match="announces 128 bytes but its tensors hold 124") as err:
        check_header(h, None, 1 << 20)
    assert err.value.kind == "invalid-payload"  # what code acts on, not the wording
    with pytest.raises(WireError, match="exceeds the limit"):
        check_header(enc.header, None, 100)
    expected = list(enc.header.tensors)
    expected[0] = tensor_meta("x", "a", torch.float32, [5, 3])
    with pytest.raises(WireError, match=r"x.a: shape \[3, 5\], expected \[5, 3\]") as err:
        check_header(enc.header, expected, 1 << 20)
    assert err.value.kind == "shape"  # what code acts on, not the wording
    expected[0] = tensor_meta("x", "a", torch.float64, [3, 5])
    with pytest.raises(WireError, match="x.a: dtype FLOAT32, expected FLOAT64") as err:
        check_header(enc.header, expected, 1 << 20)
    assert err.value.kind == "dtype"  # what code acts on, not the wording
    with pytest.raises(WireError, match=r"missing \['x.zz'\]") as err:
        check_header(enc.header, [*enc.header.tensors, tensor_meta("x", "zz", torch.float32, [1])],
                     1 << 20)
    assert err.value.kind == "tensors-do-not-match"  # what code acts on, not the wording
    bad = pb.PayloadHeader(tensors=[pb.TensorMeta(part=pb.X, name="n", dtype=pb.FLOAT32,
                                                   shape=[-1])])
    with pytest.raises(WireError, match="negative dimension") as err:
        check_header(bad, None, 1 << 20)
    assert err.value.kind == "shape"  # what code acts on, not the wording
