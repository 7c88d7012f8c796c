"""Bare gRPC with the coordinator's shape: one asyncio gRPC server in this process, one client
process per worker, rounds in lock step, each client receiving then sending its share of the
round's bytes as raw messages, nothing else done with them (no checksum, no tensors, no
checks). Its wall time and the server's CPU per round are the floor gRPC Python sets under
``rabo bench transport``'s coordinator, measured with the same processes and cores.

Run as a client: ``python -m bench.floor PORT DOWN_BYTES UP_BYTES CHUNK_BYTES ROUNDS``.
"""

from __future__ import annotations

import asyncio
import resource
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

import grpc


def _ident(data: bytes) -> bytes:
    return data


def _pieces(total: int, chunk_bytes: int) -> Iterator[bytes]:
    block = bytes(chunk_bytes)
    off = 0
    while off < total:
        n = min(chunk_bytes, total - off)
        yield block if n == chunk_bytes else block[:n]
        off += n


def _cpu() -> float:
    use = resource.getrusage(resource.RUSAGE_SELF)  # every thread of this process
    return use.ru_utime + use.ru_stime


def _options(chunk_bytes: int) -> list[tuple[str, int]]:
    return [("grpc.max_send_message_length", 4 * chunk_bytes + (1 << 20)),
            ("grpc.max_receive_message_length", 4 * chunk_bytes + (1 << 20))]


def grpc_floor_processes(down: Sequence[int], up: Sequence[int], chunk_bytes: int,
                         rounds: int = 3, timeout_s: float = 300.0) -> tuple[float, float]:
    """(wall seconds, server CPU seconds) per round for client ``i`` receiving ``down[i]`` and
    sending ``up[i]`` bytes each round; median over ``rounds`` rounds."""
    return asyncio.run(_serve(list(down), list(up), chunk_bytes, rounds, timeout_s))


async def _serve(down: list[int], up: list[int], chunk_bytes: int, rounds: int,
                 timeout_s: float) -> tuple[float, float]:
    n = len(down)
    ready = asyncio.Event()
    hellos = 0
    submitted = [0] * (rounds + 1)  # per round, the clients whose upload is in
    round_done = [asyncio.Event() for _ in range(rounds + 1)]
    marks: list[tuple[float, float]] = []  # (wall, cpu) when each round opens, and at the end

    async def hello(request: bytes, context: Any) -> bytes:
        nonlocal hellos
        hellos += 1
        if hellos == n:
            marks.append((time.perf_counter(), _cpu()))
            ready.set()
        await ready.wait()
        return b""

    async def fetch(request: bytes, context: Any) -> AsyncIterator[bytes]:
        client, q = (int(v) for v in request.decode().split())
        if q > 0:
            await round_done[q - 1].wait()  # rounds in lock step, as the coordinator's
        for piece in _pieces(down[client], chunk_bytes):
            yield piece

    async def submit(request_iterator: AsyncIterator[bytes], context: Any) -> bytes:
        q = -1
        async for data in request_iterator:
            if q < 0:
                q = int(data.decode())  # the first message names the round
        submitted[q] += 1
        if submitted[q] == n:
            marks.append((time.perf_counter(), _cpu()))
            round_done[q].set()
        return b""

    handler = grpc.method_handlers_generic_handler("rabo.bench.Floor", {
        "Hello": grpc.unary_unary_rpc_method_handler(
            hello, request_deserializer=_ident, response_serializer=_ident),
        "Fetch": grpc.unary_stream_rpc_method_handler(
            fetch, request_deserializer=_ident, response_serializer=_ident),
        "Submit": grpc.stream_unary_rpc_method_handler(
            submit, request_deserializer=_ident, response_serializer=_ident)})
    server = grpc.aio.server(options=_options(chunk_bytes))
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    procs = []
    try:
        for i in range(n):
            procs.append(await asyncio.create_subprocess_exec(
                sys.executable, "-m", "bench.floor", str(port), str(i), str(down[i]),
                str(up[i]), str(chunk_bytes), str(rounds),
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        await asyncio.wait_for(asyncio.gather(*(p.wait() for p in procs)), timeout_s)
        bad = [p.returncode for p in procs if p.returncode]
        if bad or len(marks) != rounds + 1:
            raise RuntimeError(f"bare gRPC floor: clients exited with {bad}, "
                               f"{len(marks) - 1} of {rounds} rounds done")
    finally:
        for p in procs:
            if p.returncode is None:
                p.kill()
                await p.wait()
        await server.stop(0)
    walls = sorted(b[0] - a[0] for a, b in zip(marks, marks[1:], strict=False))
    cpus = sorted(b[1] - a[1] for a, b in zip(marks, marks[1:], strict=False))
    return walls[len(walls) // 2], cpus[len(cpus) // 2]


def _client(port: int, client: int, down: int, up: int, chunk_bytes: int, rounds: int) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{port}", options=_options(chunk_bytes)) as ch:
        hello = ch.unary_unary("/rabo.bench.Floor/Hello", request_serializer=_ident,
                               response_deserializer=_ident)
        fetch = ch.unary_stream("/rabo.bench.Floor/Fetch", request_serializer=_ident,
                                response_deserializer=_ident)
        submit = ch.stream_unary("/rabo.bench.Floor/Submit", request_serializer=_ident,
                                 response_deserializer=_ident)
        hello(b"", wait_for_ready=True, timeout=120)
        for q in range(rounds):
            got = sum(len(d) for d in fetch(f"{client} {q}".encode(), timeout=120))
            if got != down:
                raise SystemExit(f"received {got} of {down} bytes")

            def upload(q: int = q) -> Iterator[bytes]:
                yield str(q).encode()
                yield from _pieces(up, chunk_bytes)

            submit(upload(), timeout=120)


if __name__ == "__main__":
    _client(*(int(a) for a in sys.argv[1:7]))
