"""Transport security for the worker: a TLS channel and the bearer token on every call."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc

from rabo.auth import TlsFiles


class _Bearer(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
              grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    def __init__(self, token: bytes) -> None:
        self.header = ("authorization", "Bearer " + token.decode())

    def _details(self, details: Any) -> Any:
        metadata = [*(details.metadata or ()), self.header]
        return details._replace(metadata=metadata)

    def intercept_unary_unary(self, continuation: Callable, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation: Callable, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation: Callable, details: Any, it: Any) -> Any:
        return continuation(self._details(details), it)

    def intercept_stream_stream(self, continuation: Callable, details: Any, it: Any) -> Any:
        return continuation(self._details(details), it)


def open_channel(target: str, options: list[tuple[str, Any]], tls: TlsFiles,
                 token: bytes | None, server_name: str | None = None) -> grpc.Channel:
    """A channel to the coordinator: TLS when a CA (or client certificate) is configured, and
    the bearer token on every call when one is."""
    if tls.enabled:
        creds = grpc.ssl_channel_credentials(root_certificates=tls.ca, private_key=tls.key,
                                             certificate_chain=tls.cert)
        if server_name:
            options = [*options, ("grpc.ssl_target_name_override", server_name)]
        channel = grpc.secure_channel(target, creds, options=options)
    else:
        channel = grpc.insecure_channel(target, options=options)
    if token:
        channel = grpc.intercept_channel(channel, _Bearer(token))
    return channel
