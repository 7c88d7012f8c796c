"""Tensors on the wire: chunking, checksums and every way a payload can be wrong."""

from __future__ import annotations

import pytest
import torch

from rabo_proto.codec import (
    Assembler,
    BufferPool,
    Encoded,
    WireError,
    WireTensor,
    check_header,
    crc32c,
    tensor_meta,
)
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
    assert all(isinstance(c, bytes) and 0 < len(c) <= chunk for c in chunks)
    assert sum(len(c) for c in chunks) == enc.total_bytes == 15 * 4 + 7 * 8 + 4 * 2
    assert enc.trailer().crc32c == crc32c(b"".join(chunks))
    asm = Assembler(enc.header, max_chunk_bytes=chunk)
    for c in chunks:
        asm.add(c)
    assert asm.complete
    out = asm.finish(enc.trailer())
    for got, want in zip(out, _tensors(), strict=True):
        assert (got.part, got.name) == (want.part, want.name)
        assert got.tensor.dtype == want.tensor.dtype and torch.equal(got.tensor, want.tensor)


def test_crc32c_is_castagnoli() -> None:
    # the check value of CRC-32C (RFC 3720, appendix B.4): "123456789" -> 0xE3069283
    assert crc32c(b"123456789") == 0xE3069283
    assert crc32c(b"56789", crc32c(b"1234")) == 0xE3069283  # continued over chunks


def test_a_frozen_payload_streams_the_same_bytes_every_time() -> None:
    enc = Encoded(3, "w1", _tensors(), 16)
    fresh = list(Encoded(3, "w1", _tensors(), 16).chunks())
    with pytest.raises(RuntimeError, match="once every chunk"):
        enc.trailer()
    enc.freeze()
    assert list(enc.chunks()) == list(enc.chunks()) == fresh
    assert enc.trailer().crc32c == crc32c(b"".join(fresh))
    assert enc.header_for("w2").worker_id == "w2" and enc.header.worker_id == "w1"


def _assembled(mutate, trailer_crc=None) -> None:
    enc = Encoded(1, "w", _tensors(), 8)
    chunks = list(enc.chunks())
    header = pb.PayloadHeader()
    header.CopyFrom(enc.header)
    chunks = mutate(header, chunks) or chunks
    asm = Assembler(header, max_chunk_bytes=8)
    for c in chunks:
        asm.add(c)
    trailer = enc.trailer()
    if trailer_crc is not None:
        trailer.crc32c = trailer_crc
    asm.finish(trailer)


def test_truncated_payload() -> None:
    with pytest.raises(WireError, match=r"truncated payload: \d+ of 124 bytes") as err:
        _assembled(lambda h, c: c[:-1])
    assert err.value.kind == "truncated"  # what code acts on, not the wording
    asm = Assembler(Encoded(1, "w", _tensors(), 8).header, max_chunk_bytes=1000)
    asm.add(b"".join(Encoded(1, "w", _tensors(), 8).chunks()))
    with pytest.raises(WireError, match="ended before the trailer") as err:
        asm.finish(None)
    assert err.value.kind == "truncated"


def test_bad_checksum() -> None:
    def flip(h, chunks):
        chunks[2] = bytes([chunks[2][0] ^ 1]) + chunks[2][1:]
    with pytest.raises(WireError, match="checksum mismatch") as err:
        _assembled(flip)
    assert err.value.kind == "checksum"  # what code acts on, not the wording
    with pytest.raises(WireError, match="trailer says 0x00003039") as err:
        _assembled(lambda h, c: None, trailer_crc=12345)
    assert err.value.kind == "checksum"


def test_swapped_oversize_empty_and_excess_chunks() -> None:
    # order is the stream's own (gRPC keeps it): swapped chunks are caught by the checksum
    with pytest.raises(WireError, match="checksum mismatch") as err:
        _assembled(lambda h, c: [c[0], c[2], c[1], *c[3:]])
    assert err.value.kind == "checksum"
    with pytest.raises(WireError, match="exceeds the limit of 8") as err:
        _assembled(lambda h, c: [c[0] + c[1], *c[2:]])
    assert err.value.kind == "chunk"  # what code acts on, not the wording
    with pytest.raises(WireError, match="empty chunk") as err:
        _assembled(lambda h, c: [b"", *c])
    assert err.value.kind == "chunk"
    with pytest.raises(WireError, match="more than the 124 bytes announced") as err:
        _assembled(lambda h, c: [*c, b"x"])
    assert err.value.kind == "chunk"


def test_nan_is_refused() -> None:
    enc = Encoded(1, "w", [WireTensor("x", "a", torch.tensor([1.0, float("nan")]))], 64)
    asm = Assembler(enc.header, 64)
    for c in enc.chunks():
        asm.add(c)
    with pytest.raises(WireError, match="x.a holds NaN or infinite values") as err:
        asm.finish(enc.trailer())
    assert err.value.kind == "NaN"  # what code acts on, not the wording


def test_stream_codecs_pass_raw_chunks_and_parse_trailers() -> None:
    from rabo_proto.stream import parse, parse_trailer, receive_payload, serialize

    enc = Encoded(1, "w", _tensors(), 16)
    msgs = [serialize(m) for m in
            [pb.AssignmentMessage(assignment=pb.Assignment(payload=enc.header)),
             *enc.chunks(), pb.AssignmentMessage(trailer=enc.trailer())]]
    first = parse(msgs[0], pb.AssignmentMessage, "first")
    out, asm = receive_payload(first.assignment.payload, iter(msgs[1:]), 16,
                               pb.AssignmentMessage)
    assert [torch.equal(a.tensor, b.tensor) for a, b in zip(out, _tensors(), strict=True)]
    assert asm.chunks == len(msgs) - 2
    with pytest.raises(WireError, match="messages after the payload's trailer"):
        receive_payload(first.assignment.payload, iter([*msgs[1:], msgs[-1]]), 16,
                        pb.AssignmentMessage)
    with pytest.raises(WireError, match="followed by its trailer, got assignment") as err:
        parse_trailer(msgs[0], pb.AssignmentMessage)
    assert err.value.kind == "chunk"
    assert parse_trailer(None, pb.AssignmentMessage) is None
    with pytest.raises(WireError, match="not a valid UpdateMessage"):
        parse(b"\xff\xff\xff", pb.UpdateMessage, "x")


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


def _receive(enc: Encoded, pool: BufferPool) -> list[WireTensor]:
    asm = Assembler(enc.header, max_chunk_bytes=16, pool=pool)
    for c in enc.chunks():
        asm.add(c)
    return asm.finish(enc.trailer())


def test_a_pooled_buffer_is_reused_only_once_nothing_holds_its_tensors() -> None:
    pool = BufferPool(max_bytes=1 << 20)
    enc = Encoded(1, "w", _tensors(), 16)
    first = _receive(enc, pool)
    kept = pool.kept_bytes
    assert kept == enc.total_bytes
    # the first payload's tensors are alive: the second lands in a buffer of its own, and
    # neither overwrites the other
    other = [WireTensor(t.part, t.name, t.tensor + 1) for t in _tensors()]
    second = _receive(Encoded(2, "w", other, 16), pool)
    assert pool.kept_bytes == 2 * kept
    for got, want in zip(first, _tensors(), strict=True):
        assert torch.equal(got.tensor, want.tensor)
    a_view = first[0].tensor[1:2]  # a view of a decoded tensor holds the buffer too
    del first
    third = _receive(Encoded(3, "w", other, 16), pool)  # the only free buffer is none
    assert pool.kept_bytes == 3 * kept
    assert torch.equal(a_view, _tensors()[0].tensor[1:2])
    del a_view, second
    fourth = _receive(Encoded(4, "w", _tensors(), 16), pool)  # reuses a freed buffer
    assert pool.kept_bytes == 3 * kept
    for got, want in zip(fourth, _tensors(), strict=True):
        assert torch.equal(got.tensor, want.tensor)
    for got, want in zip(third, other, strict=True):
        assert torch.equal(got.tensor, want.tensor)


def test_a_pool_takes_the_smallest_free_buffer_and_keeps_at_most_its_budget() -> None:
    pool = BufferPool(max_bytes=300)
    big, small = pool.take(200), pool.take(100)
    assert pool.kept_bytes == 300
    extra = pool.take(50)  # over the budget: handed out, not kept
    assert pool.kept_bytes == 300 and extra.nbytes == 50
    big_base, small_base = big.base, small.base
    del big, small
    got = pool.take(80)
    assert got.nbytes == 80 and got.base is small_base  # the 100-byte one fits best
    assert pool.take(150).base is big_base
