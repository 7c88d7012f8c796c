"""Shared secrets and certificates for the coordinator and its workers.

Tokens never come from a command-line flag (a flag shows in ``ps``): from a file named by
``--token-file`` / ``RABO_TOKEN_FILE`` (one token per line, so a deployment can rotate by
listing old and new), or from the ``RABO_TOKEN`` environment variable.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from rabo.errors import ConfigError

TOKEN_ENV = "RABO_TOKEN"
TOKEN_FILE_ENV = "RABO_TOKEN_FILE"


def load_tokens(token_file: str | None = None) -> list[bytes]:
    """Accepted tokens ([] when none is configured); ConfigError names an unusable file."""
    path = token_file or os.environ.get(TOKEN_FILE_ENV)
    if path:
        try:
            lines = Path(path).read_text().splitlines()
        except OSError as exc:
            raise ConfigError(f"token file {path}: cannot read: {exc.strerror}") from None
        tokens = [t.strip().encode() for t in lines if t.strip() and not t.startswith("#")]
        if not tokens:
            raise ConfigError(f"token file {path}: holds no token")
        return tokens
    env = os.environ.get(TOKEN_ENV, "").strip()
    return [env.encode()] if env else []


@dataclass(frozen=True)
class TlsFiles:
    """PEM files: own certificate and key, and the CA that signs the peer."""

    cert: bytes | None = None
    key: bytes | None = None
    ca: bytes | None = None

    @property
    def enabled(self) -> bool:
        return self.cert is not None or self.ca is not None


def _read(path: str | None, what: str) -> bytes | None:
    if not path:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"{what} {path}: cannot read: {exc.strerror}") from None


def load_tls(cert: str | None, key: str | None, ca: str | None) -> TlsFiles:
    """Read the PEM files named by flags or RABO_TLS_CERT / RABO_TLS_KEY / RABO_TLS_CA."""
    cert = cert or os.environ.get("RABO_TLS_CERT")
    key = key or os.environ.get("RABO_TLS_KEY")
    ca = ca or os.environ.get("RABO_TLS_CA")
    if bool(cert) != bool(key):
        raise ConfigError("TLS needs both a certificate (--tls-cert) and its key (--tls-key)")
    return TlsFiles(_read(cert, "TLS certificate"), _read(key, "TLS key"), _read(ca, "TLS CA"))
