"""TLS material: the server's certificate chain and key, and the trust store for upstreams.

Loading problems raise `TLSConfigError` with one line a person can act on; `docxy.tap` turns
that into a clean exit at start-up.
"""
from __future__ import annotations

from collections import OrderedDict

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID
from OpenSSL import SSL, crypto
from twisted.internet import ssl
from twisted.internet._sslverify import IOpenSSLTrustRoot
from twisted.web.client import BrowserLikePolicyForHTTPS
from twisted.web.iweb import IPolicyForHTTPS
from zope.interface import implementer


class TLSConfigError(Exception):
    """A certificate or key that cannot be used; the message is shown as it is."""


def _read(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise TLSConfigError(f"cannot read {what} {path}: {e.strerror}") from None


def load_certificates(path: str, what: str = "certificate file") -> list[x509.Certificate]:
    data = _read(path, what)
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError:
        certs = []
    if not certs:
        raise TLSConfigError(f"{what} {path} holds no PEM certificate")
    return certs


def load_key(path: str):
    """Load an EC (SEC1), RSA (PKCS#1) or PKCS#8 private key in PEM form."""
    data = _read(path, "key file")
    try:
        return serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise TLSConfigError(
            f"key file {path} is encrypted; docxy needs an unencrypted key"
        ) from None
    except (ValueError, Exception) as e:  # cryptography raises several kinds here
        raise TLSConfigError(f"key file {path} holds no usable private key ({e})") from None


def _public_bytes(key) -> bytes:
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


@implementer(IOpenSSLTrustRoot)
class SystemTrustPlus:
    """The platform's trust store plus extra CA certificates (for `--upstream-ca`)."""

    def __init__(self, extra: list[x509.Certificate]) -> None:
        self._extra = [crypto.X509.from_cryptography(c) for c in extra]

    def _addCACertsToContext(self, context: SSL.Context) -> None:
        context.set_default_verify_paths()
        store = context.get_cert_store()
        for cert in self._extra:
            store.add_cert(cert)


class ServerTLS:
    """The server's chain and key, loaded and checked once, as `CertificateOptions`."""

    def __init__(self, cert_path: str, key_path: str) -> None:
        chain = load_certificates(cert_path)
        key = load_key(key_path)
        if _public_bytes(key.public_key()) != _public_bytes(chain[0].public_key()):
            raise TLSConfigError(
                f"key file {key_path} does not match the first certificate in {cert_path}"
            )
        self.chain = chain
        self.options = ssl.CertificateOptions(
            privateKey=crypto.PKey.from_cryptography_key(key),
            certificate=crypto.X509.from_cryptography(chain[0]),
            # Without the rest of the chain, clients fail to verify a Let's Encrypt leaf.
            extraCertChain=[crypto.X509.from_cryptography(c) for c in chain[1:]],
        )

    def names(self) -> tuple[str, ...]:
        return certificate_names(self.chain[0])


def certificate_names(cert: x509.Certificate) -> tuple[str, ...]:
    """The host names and addresses a certificate is for (SANs, else the CN)."""
    names: list[str] = []
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names += [n.lower() for n in san.get_values_for_type(x509.DNSName)]
        names += [str(ip) for ip in san.get_values_for_type(x509.IPAddress)]
    except x509.ExtensionNotFound:
        pass
    if not names:
        names += [
            str(a.value).lower() for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        ]
    return tuple(dict.fromkeys(names))


@implementer(IPolicyForHTTPS)
class ReusedContextPolicy:
    """Twisted's browser-like TLS policy (verify the chain and the host name), with each
    host's TLS settings built once and reused by every connection to it.  Built per
    connection, each loads the whole system trust store (over a megabyte): 500 concurrent
    upstream requests cost 600 MB of RSS that was never given back."""

    def __init__(self, trust_root, max_hosts: int = 256) -> None:
        self._policy = BrowserLikePolicyForHTTPS(trustRoot=trust_root)
        self._max_hosts = max_hosts
        self._creators: OrderedDict[tuple[bytes, int], object] = OrderedDict()

    def creatorForNetloc(self, hostname: bytes, port: int):
        key = (hostname, port)
        creator = self._creators.pop(key, None)
        if creator is None:
            creator = self._policy.creatorForNetloc(hostname, port)
        self._creators[key] = creator  # the most recently used last
        if len(self._creators) > self._max_hosts:
            self._creators.popitem(last=False)
        return creator


def upstream_trust(ca_path: str | None):
    """The trust root for connections to upstreams and their CDNs."""
    extra = load_certificates(ca_path, "upstream CA file") if ca_path else []
    return SystemTrustPlus(extra)
