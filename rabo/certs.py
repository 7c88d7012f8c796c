"""``rabo certs --out DIR``: a development CA with coordinator and worker certificates.

For tests and first deployments; production deployments bring their own PKI. Files:
``ca.crt``/``ca.key``, ``coordinator.crt``/``coordinator.key`` (server and client auth; SANs:
localhost, 127.0.0.1, rabo-coordinator and ``--hosts``), ``worker-N.crt``/``worker-N.key``
(client auth, CN worker-N), and ``token`` (a random shared token, mode 0600).

It needs the ``cryptography`` package, an optional dependency (``pip install 'rabo[certs]'``):
TLS itself is grpc's, so a worker or coordinator that is given certificates never imports
this module. Without the package, importing it raises :class:`CertsUnavailable`.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import secrets
from pathlib import Path

from rabo.errors import RaboError

INSTALL_HINT = "pip install 'rabo[certs]'"


class CertsUnavailable(RaboError, ImportError):
    """``rabo certs`` ran where the cryptography package is not installed."""


try:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
except ImportError as exc:
    raise CertsUnavailable(
        f"the cryptography package is not installed ({INSTALL_HINT})"
        if exc.name == "cryptography" else
        f"the cryptography package does not import ({exc}); {INSTALL_HINT}") from exc


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "RABO"),
                      x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write(path: Path, data: bytes, private: bool = False) -> None:
    path.write_bytes(data)
    if private:
        os.chmod(path, 0o600)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def issue(ca_cert: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey, cn: str,
          hosts: list[str], server: bool, days: float, not_before: dt.datetime | None = None
          ) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    start = not_before or dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=5)
    sans: list[x509.GeneralName] = []
    for h in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            sans.append(x509.DNSName(h))
    usages = [ExtendedKeyUsageOID.CLIENT_AUTH] + ([ExtendedKeyUsageOID.SERVER_AUTH]
                                                  if server else [])
    builder = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(ca_cert.subject)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(start).not_valid_after(start + dt.timedelta(days=days))
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.ExtendedKeyUsage(usages), critical=False))
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(ca_key, hashes.SHA256()), key


def make_ca(days: float = 365) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=5)
    cert = (x509.CertificateBuilder().subject_name(_name("RABO development CA"))
            .issuer_name(_name("RABO development CA")).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now)
            .not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .sign(key, hashes.SHA256()))
    return cert, key


def write_bundle(out: str | Path, workers: int = 4, hosts: list[str] | None = None,
                 days: float = 365, force: bool = False) -> Path:
    """A development CA, a coordinator certificate, ``workers`` worker certificates and a
    token in ``out``. An existing CA there is not replaced unless ``force``: every
    certificate it signed (on other machines, in Kubernetes Secrets) would stop verifying."""
    out = Path(out)
    existing = [p.name for p in (out / "ca.crt", out / "ca.key") if p.exists()]
    if existing and not force:
        raise FileExistsError(f"{out} already holds a CA ({', '.join(existing)}); certificates "
                              "it signed would no longer verify against a new one. Use another "
                              "folder, or --force to replace it")
    out.mkdir(parents=True, exist_ok=True)
    ca_cert, ca_key = make_ca(days)
    _write(out / "ca.crt", ca_cert.public_bytes(serialization.Encoding.PEM))
    _write(out / "ca.key", _key_pem(ca_key), private=True)
    server_hosts = ["localhost", "127.0.0.1", "rabo-coordinator", *(hosts or [])]
    cert, key = issue(ca_cert, ca_key, "rabo-coordinator", server_hosts, True, days)
    _write(out / "coordinator.crt", cert.public_bytes(serialization.Encoding.PEM))
    _write(out / "coordinator.key", _key_pem(key), private=True)
    for i in range(workers):
        cert, key = issue(ca_cert, ca_key, f"worker-{i}", [], False, days)
        _write(out / f"worker-{i}.crt", cert.public_bytes(serialization.Encoding.PEM))
        _write(out / f"worker-{i}.key", _key_pem(key), private=True)
    _write(out / "token", (secrets.token_urlsafe(32) + "\n").encode(), private=True)
    return out
