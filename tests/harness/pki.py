"""A throw-away PKI for tests: a root CA, intermediates, server certificates and signing keys.

Everything is written as PEM files. Server keys come in every form the daemon must load:
EC SEC1 (`BEGIN EC PRIVATE KEY`), RSA PKCS#1 (`BEGIN RSA PRIVATE KEY`) and PKCS#8
(`BEGIN PRIVATE KEY`). Nothing here touches the system trust store.
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Literal

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import (
    CertificateIssuerPrivateKeyTypes,
)
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

KeyType = Literal["ec", "rsa"]

DEFAULT_NAMES: tuple[str, ...] = ("localhost", "127.0.0.1")


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def _new_key(key_type: KeyType) -> CertificateIssuerPrivateKeyTypes:
    if key_type == "ec":
        return ec.generate_private_key(ec.SECP256R1())
    if key_type == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    raise ValueError(f"unknown key type {key_type!r}")


def _name(common_name: str) -> x509.Name:
    return x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "docxy tests"),
        x509.NameAttribute(NameOID.COMMON_NAME, common_name),
    ])


def _san(names: Iterable[str]) -> x509.SubjectAlternativeName:
    entries: list[x509.GeneralName] = []
    seen: set[str] = set()
    for n in names:
        if n in seen:
            continue
        seen.add(n)
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(n)))
        except ValueError:
            entries.append(x509.DNSName(n))
    return x509.SubjectAlternativeName(entries)


def _builder(subject: x509.Name, issuer: x509.Name, public_key: object,
             days: int) -> x509.CertificateBuilder:
    """Subject, issuer, key, serial and a validity from an hour ago to `days` ahead."""
    now = _now()
    return (
        x509.CertificateBuilder()
        .subject_name(subject).issuer_name(issuer)
        .public_key(public_key)  # type: ignore[arg-type]
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=days))
    )


def _key_usage(ca: bool) -> x509.KeyUsage:
    """Digital signatures, and certificate and CRL signing for a CA."""
    return x509.KeyUsage(
        digital_signature=True, content_commitment=False, key_encipherment=False,
        data_encipherment=False, key_agreement=False, key_cert_sign=ca, crl_sign=ca,
        encipher_only=False, decipher_only=False)


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def key_pem(key: CertificateIssuerPrivateKeyTypes,
            form: Literal["traditional", "pkcs8"] = "pkcs8") -> bytes:
    """PEM of a private key: `traditional` is SEC1 for EC and PKCS#1 for RSA."""
    fmt = (serialization.PrivateFormat.TraditionalOpenSSL if form == "traditional"
           else serialization.PrivateFormat.PKCS8)
    return key.private_bytes(serialization.Encoding.PEM, fmt, serialization.NoEncryption())


def _write(path: Path, data: bytes, private: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    if private:
        path.chmod(0o600)
    return path


@dataclass(frozen=True)
class ServerCert:
    """A server certificate and its key, in files.

    `chain_path` is what a server sends (leaf, then intermediates; acme.sh's fullchain.cer),
    `cert_path` the leaf alone, `intermediates_path` the chain without the leaf (may be
    empty), `key_path` the key in its traditional form (SEC1 for EC, PKCS#1 for RSA),
    `pkcs8_key_path` the same key as PKCS#8, `ca_path` the root a client must trust.
    """

    name: str
    key_type: KeyType
    names: tuple[str, ...]
    cert_path: Path
    chain_path: Path
    intermediates_path: Path
    key_path: Path
    pkcs8_key_path: Path
    ca_path: Path
    certificate: x509.Certificate = field(repr=False)


@dataclass(frozen=True)
class SigningCert:
    """A self-signed RSA certificate and key for signing JWTs (the token service's x5c)."""

    cert_path: Path
    key_path: Path
    certificate: x509.Certificate = field(repr=False)
    key: rsa.RSAPrivateKey = field(repr=False)


@dataclass
class CertificateAuthority:
    """A CA that can issue intermediates and server certificates into `directory`.

    `parents` holds the certificates above this one up to and including the root, nearest
    first; a root has none.
    """

    directory: Path
    name: str
    key: CertificateIssuerPrivateKeyTypes = field(repr=False)
    certificate: x509.Certificate = field(repr=False)
    parents: tuple[x509.Certificate, ...] = ()

    @property
    def cert_path(self) -> Path:
        return self.directory / f"{self.name}.crt"

    @property
    def root_path(self) -> Path:
        """The PEM of the root at the top of this CA's chain (the trust anchor)."""
        return self.directory / f"{self.name}.root.crt"

    @property
    def root(self) -> x509.Certificate:
        return self.parents[-1] if self.parents else self.certificate

    @classmethod
    def create_root(cls, directory: Path, name: str = "root-ca",
                    key_type: KeyType = "ec", days: int = 30) -> "CertificateAuthority":
        key = _new_key(key_type)
        subject = _name(f"docxy test {name}")
        cert = (
            _builder(subject, subject, key.public_key(), days)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(_key_usage(ca=True), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                           critical=False)
            .sign(key, hashes.SHA256())
        )
        ca = cls(Path(directory), name, key, cert)
        ca._write()
        return ca

    def _write(self) -> None:
        _write(self.cert_path, cert_pem(self.certificate))
        _write(self.root_path, cert_pem(self.root))
        _write(self.directory / f"{self.name}.key", key_pem(self.key), private=True)

    def _builder(self, subject: x509.Name, public_key: object, days: int) -> x509.CertificateBuilder:
        return (
            _builder(subject, self.certificate.subject, public_key, days)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                self.key.public_key()), critical=False)  # type: ignore[arg-type]
        )

    def issue_intermediate(self, name: str = "intermediate-ca", key_type: KeyType = "ec",
                           days: int = 30) -> "CertificateAuthority":
        key = _new_key(key_type)
        cert = (
            self._builder(_name(f"docxy test {name}"), key.public_key(), days)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(_key_usage(ca=True), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                           critical=False)
            .sign(self.key, hashes.SHA256())
        )
        ca = CertificateAuthority(self.directory, name, key, cert,
                                  (self.certificate,) + self.parents)
        ca._write()
        return ca

    def issue_server(self, name: str, names: Iterable[str] = (), key_type: KeyType = "ec",
                     days: int = 30, include_defaults: bool = True) -> ServerCert:
        """Issue a server certificate for `names` (plus localhost and 127.0.0.1 unless
        `include_defaults` is false) and write `<name>.crt`, `<name>.chain.pem`,
        `<name>.intermediates.pem`, `<name>.key` (SEC1/PKCS#1) and `<name>.pkcs8.key`."""
        all_names = tuple(dict.fromkeys(
            list(names) + (list(DEFAULT_NAMES) if include_defaults else [])))
        if not all_names:
            raise ValueError("a server certificate needs at least one name")
        key = _new_key(key_type)
        cert = (
            self._builder(_name(all_names[0]), key.public_key(), days)
            .add_extension(_san(all_names), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                  ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                           critical=False)
            .sign(self.key, hashes.SHA256())
        )
        # Intermediates between the leaf and the root: this CA (unless it is the root) and
        # every parent except the root itself.
        above = (self.certificate,) + self.parents
        intermediates = above[:-1]
        d = self.directory
        leaf = cert_pem(cert)
        inter = b"".join(cert_pem(c) for c in intermediates)
        return ServerCert(
            name=name, key_type=key_type, names=all_names,
            cert_path=_write(d / f"{name}.crt", leaf),
            chain_path=_write(d / f"{name}.chain.pem", leaf + inter),
            intermediates_path=_write(d / f"{name}.intermediates.pem", inter),
            key_path=_write(d / f"{name}.key", key_pem(key, "traditional"), private=True),
            pkcs8_key_path=_write(d / f"{name}.pkcs8.key", key_pem(key, "pkcs8"),
                                  private=True),
            ca_path=self.root_path,
            certificate=cert,
        )


def create_signing_cert(directory: Path, name: str = "token-signer",
                        days: int = 30) -> SigningCert:
    """A self-signed RSA certificate for RS256 JWTs. Put the certificate itself in the
    registry's `rootcertbundle`; the tokens carry it in their `x5c` header."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    subject = _name(f"docxy test {name}")
    cert = (
        _builder(subject, subject, key.public_key(), days)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(ca=False), critical=True)
        .sign(key, hashes.SHA256())
    )
    directory = Path(directory)
    return SigningCert(
        cert_path=_write(directory / f"{name}.crt", cert_pem(cert)),
        key_path=_write(directory / f"{name}.key", key_pem(key, "pkcs8"), private=True),
        certificate=cert, key=key,
    )


def cert_dir_for(ca_path: Path, directory: Path) -> Path:
    """A directory with `ca.crt` in it, as skopeo/podman/containerd `--cert-dir` expect."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    _write(directory / "ca.crt", Path(ca_path).read_bytes())
    return directory
