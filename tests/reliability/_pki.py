"""A throwaway PKI for the TLS tests: CA, server and client certificates, made at test time.

Everything is generated with ``cryptography`` into a temporary folder; nothing is stored in
the repository. Keys are EC P-256 (fast to make on a 2-core runner).
"""
from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class Pair:
    """PEM bytes of one certificate and its key, and where they were written."""

    cert: bytes
    key: bytes
    cert_path: Path
    key_path: Path


@dataclass(frozen=True)
class Pki:
    ca: Pair             # signs the server and the known clients
    server: Pair         # CN=localhost, SAN 127.0.0.1 + localhost
    client: Pair         # a known client (signed by ca)
    rogue_client: Pair   # signed by another CA the server does not trust
    expired_client: Pair  # signed by ca but no longer valid
    rogue_ca: Pair


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn),
                      x509.NameAttribute(NameOID.ORGANIZATION_NAME, "matcher tests")])


def _write(folder: Path, stem: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey
           ) -> Pair:
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    cert_path, key_path = folder / f"{stem}.crt", folder / f"{stem}.key"
    cert_path.write_bytes(cert_pem)
    key_path.write_bytes(key_pem)
    key_path.chmod(0o600)
    return Pair(cert_pem, key_pem, cert_path, key_path)


def _ca(folder: Path, stem: str, cn: str, now: dt.datetime) -> tuple[Pair, x509.Certificate,
                                                                      ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(_name(cn)).issuer_name(_name(cn))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True,
                                         crl_sign=True, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False,
                                         decipher_only=False), critical=True)
            .sign(key, hashes.SHA256()))
    return _write(folder, stem, cert, key), cert, key


def _leaf(folder: Path, stem: str, cn: str, issuer: x509.Certificate,
          issuer_key: ec.EllipticCurvePrivateKey, *, server: bool,
          not_before: dt.datetime, not_after: dt.datetime) -> Pair:
    key = ec.generate_private_key(ec.SECP256R1())
    builder = (x509.CertificateBuilder()
               .subject_name(_name(cn)).issuer_name(issuer.subject)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(not_before).not_valid_after(not_after)
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.ExtendedKeyUsage(
                   [ExtendedKeyUsageOID.SERVER_AUTH if server else
                    ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False))
    if server:
        builder = builder.add_extension(x509.SubjectAlternativeName([
            x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False)
    return _write(folder, stem, builder.sign(issuer_key, hashes.SHA256()), key)


def make_pki(folder: Path) -> Pki:
    folder.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)
    valid = {"not_before": now - dt.timedelta(hours=1), "not_after": now + dt.timedelta(days=7)}
    ca, ca_cert, ca_key = _ca(folder, "ca", "matcher test CA", now)
    rogue_ca, rogue_cert, rogue_key = _ca(folder, "rogue-ca", "someone else's CA", now)
    return Pki(
        ca=ca,
        server=_leaf(folder, "server", "localhost", ca_cert, ca_key, server=True, **valid),
        client=_leaf(folder, "client", "lane-K03", ca_cert, ca_key, server=False, **valid),
        rogue_client=_leaf(folder, "rogue-client", "lane-K03", rogue_cert, rogue_key,
                           server=False, **valid),
        expired_client=_leaf(folder, "expired-client", "lane-K03", ca_cert, ca_key,
                             server=False, not_before=now - dt.timedelta(days=10),
                             not_after=now - dt.timedelta(days=1)),
        rogue_ca=rogue_ca,
    )
