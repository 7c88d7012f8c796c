"""Transport security for the coordinator: TLS / mutual TLS, token authentication, limits.

* TLS: ``--tls-cert``/``--tls-key``; with ``--tls-ca`` every client must present a certificate
  signed by that CA (mutual TLS). A worker's registration records its certificate's
  fingerprint, and every later call of that worker id must come with the same certificate, so
  one worker cannot act as another even with a stolen credential.
* Tokens: a server interceptor requires ``authorization: Bearer <token>`` on every call except
  the standard health service, compared in constant time against the accepted tokens.
* Registration rate: a token bucket per peer address.
"""

from __future__ import annotations

import hashlib
import hmac
import threading
import time
from collections.abc import Callable
from typing import Any

import grpc

from rabo.auth import TlsFiles

HEALTH_PREFIX = "/grpc.health.v1.Health/"


def server_credentials(tls: TlsFiles) -> grpc.ServerCredentials:
    assert tls.cert is not None and tls.key is not None
    return grpc.ssl_server_credentials([(tls.key, tls.cert)], root_certificates=tls.ca,
                                       require_client_auth=tls.ca is not None)


def peer_identity(context: grpc.aio.ServicerContext) -> str:
    """SHA-256 of the client certificate of this call ('' without mutual TLS)."""
    pem = context.auth_context().get("x509_pem_cert")
    if not pem:
        return ""
    return hashlib.sha256(pem[0]).hexdigest()


def _aborting(handler: grpc.RpcMethodHandler, code: grpc.StatusCode, details: str
              ) -> grpc.RpcMethodHandler:
    """A handler that ends the call at once. For a streaming request it reads nothing; for
    a unary one gRPC has read the request (at most the receive limit) before any handler."""
    async def refuse(_request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(code, details)

    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(refuse)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(refuse)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(refuse)
    return grpc.unary_unary_rpc_method_handler(refuse)


class TokenInterceptor(grpc.aio.ServerInterceptor):
    """Refuses every non-health call without one of the accepted bearer tokens, from the
    call's metadata alone: before its handler starts and before it reads a streamed message."""

    def __init__(self, tokens: list[bytes], on_refusal: Callable[[str], None] | None = None
                 ) -> None:
        if not tokens:
            raise ValueError("TokenInterceptor needs at least one token")
        self.tokens = tokens
        self.on_refusal = on_refusal

    def _ok(self, presented: bytes) -> bool:
        # compare with every token, always, so timing says nothing about which one matched
        return sum(hmac.compare_digest(presented, t) for t in self.tokens) > 0

    async def intercept_service(self, continuation: Callable[[Any], Any],
                                handler_call_details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(HEALTH_PREFIX):
            return handler
        value = ""
        for key, v in handler_call_details.invocation_metadata or ():
            if key == "authorization":
                value = v if isinstance(v, str) else v.decode(errors="replace")
                break
        if not value:
            why = "missing token: send 'authorization: Bearer <token>' (RABO_TOKEN_FILE)"
        elif not value.startswith("Bearer ") or not self._ok(value[7:].strip().encode()):
            why = "wrong token"
        else:
            return handler
        if self.on_refusal:
            self.on_refusal(why.split(":")[0])
        return _aborting(handler, grpc.StatusCode.UNAUTHENTICATED, why)


class RateLimiter:
    """A token bucket per key (peer address): ``rate`` per second, bursts of ``burst``."""

    def __init__(self, rate: float, burst: float, clock: Callable[[], float] = time.monotonic
                 ) -> None:
        self.rate, self.burst, self.clock = rate, burst, clock
        self._buckets: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()

    def allow(self, key: str) -> bool:
        now = self.clock()
        with self._lock:
            tokens, last = self._buckets.get(key, (self.burst, now))
            tokens = min(self.burst, tokens + (now - last) * self.rate)
            ok = tokens >= 1.0
            self._buckets[key] = (tokens - 1.0 if ok else tokens, now)
            if len(self._buckets) > 10_000:  # forget idle peers
                self._buckets = {k: v for k, v in self._buckets.items() if now - v[1] < 60}
            return ok


def peer_host(peer: str) -> str:
    """'ipv4:1.2.3.4:5678' -> '1.2.3.4' (the port changes with every connection)."""
    if peer.startswith(("ipv4:", "ipv6:")):
        return peer[5:].rpartition(":")[0]
    return peer
