"""Image signatures as cosign and notation store them in a registry, built and checked in
Python (neither tool can be installed here: see tests/integration/test_referrers.py).

- `notation_signature`: what notation 1.x pushes, an OCI image manifest with
  `artifactType: application/vnd.cncf.notary.signature`, the empty config
  (`application/vnd.oci.empty.v1+json`, `{}`), one JWS envelope layer (ES256, the signing
  certificate in `x5c`) whose payload names the signed manifest, a `subject` and notation's
  annotations.
- `cosign_referrer`: cosign's OCI 1.1 form, `artifactType:
  application/vnd.dev.cosign.artifact.sig.v1+json`, the empty config, a simple-signing
  payload layer carrying the signature in `dev.cosignproject.cosign/signature`, a `subject`.
- `cosign_tag_signature`: cosign's classic form for registries without the referrers API,
  tagged `sha256-<hex>.sig`: an OCI image config naming the payload, the same layer, no
  subject.  containers/image (skopeo, podman) verifies this form with
  `use-sigstore-attachments` and a `sigstoreSigned` policy.
- `referrers_tag_index`: the referrers tag schema of the OCI distribution spec 1.1 (tag
  `sha256-<hex>`): an image index of referrer descriptors, what notation and oras push where
  a registry has no referrers API.

`verify_cosign` and `verify_notation` check a fetched signature the way those tools do:
the signature over the payload with the public key, and that the payload names the digest.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)
from cryptography.x509.oid import NameOID

from .images import (
    OCI_CONFIG,
    OCI_INDEX,
    OCI_MANIFEST,
    Blob,
    Image,
    Manifest,
    RegistryClient,
    sha256_digest,
)

EMPTY = "application/vnd.oci.empty.v1+json"
NOTATION_ARTIFACT = "application/vnd.cncf.notary.signature"
COSIGN_ARTIFACT = "application/vnd.dev.cosign.artifact.sig.v1+json"
SIMPLE_SIGNING = "application/vnd.dev.cosign.simplesigning.v1+json"
COSIGN_SIGNATURE = "dev.cosignproject.cosign/signature"
JWS = "application/jose+json"
NOTATION_PAYLOAD = "application/vnd.cncf.notary.payload.v1+json"
CREATED = "2024-01-01T00:00:00Z"

EMPTY_CONFIG = Blob(sha256_digest(b"{}"), 2, EMPTY, data=b"{}")


class SignatureInvalid(AssertionError):
    """A fetched signature that does not verify."""


@dataclass(frozen=True)
class Signer:
    """An ECDSA P-256 key with a self-signed certificate (notation's `x5c`)."""

    key: ec.EllipticCurvePrivateKey = field(repr=False)
    certificate: x509.Certificate = field(repr=False)

    @classmethod
    def create(cls, name: str = "docxy test signer") -> "Signer":
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = datetime.datetime(2024, 1, 1, tzinfo=datetime.timezone.utc)
        cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=36500))
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), True)
                .sign(key, hashes.SHA256()))
        return cls(key, cert)

    @property
    def public_key(self) -> ec.EllipticCurvePublicKey:
        return self.key.public_key()

    def public_pem(self) -> bytes:
        """The public key as cosign writes `cosign.pub` (PKIX PEM)."""
        return self.public_key.public_bytes(serialization.Encoding.PEM,
                                            serialization.PublicFormat.SubjectPublicKeyInfo)

    def sign_der(self, data: bytes) -> bytes:
        return self.key.sign(data, ec.ECDSA(hashes.SHA256()))

    def thumbprint(self) -> str:
        return hashlib.sha256(self.certificate.public_bytes(serialization.Encoding.DER)).hexdigest()


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _manifest(doc: dict[str, Any], config: Blob, layers: tuple[Blob, ...]) -> Manifest:
    return Manifest(OCI_MANIFEST, json.dumps(doc, separators=(",", ":")).encode(),
                    config=config, layers=layers)


def subject_descriptor(subject: Manifest) -> dict[str, Any]:
    return {"mediaType": subject.media_type, "digest": subject.digest, "size": subject.size}


def referrers_tag(digest: str) -> str:
    """The tag of the referrers tag schema for a subject: `sha256-<hex>`."""
    algorithm, _, hex_part = digest.partition(":")
    return f"{algorithm}-{hex_part}"


def cosign_tag(digest: str) -> str:
    """cosign's signature tag for a subject: `sha256-<hex>.sig`."""
    return referrers_tag(digest) + ".sig"


# -- cosign ------------------------------------------------------------------------------

def simple_signing_payload(docker_reference: str, digest: str) -> bytes:
    """The payload cosign signs (cosign's "optional": null when no annotations are given)."""
    return json.dumps({
        "critical": {"identity": {"docker-reference": docker_reference},
                     "image": {"docker-manifest-digest": digest},
                     "type": "cosign container image signature"},
        "optional": None}).encode()


def _cosign_layer(signer: Signer, subject: Manifest, docker_reference: str) -> tuple[Blob, dict]:
    payload = simple_signing_payload(docker_reference, subject.digest)
    blob = Blob(sha256_digest(payload), len(payload), SIMPLE_SIGNING, data=payload)
    signature = base64.b64encode(signer.sign_der(payload)).decode()
    return blob, {**blob.descriptor(), "annotations": {COSIGN_SIGNATURE: signature}}


def cosign_referrer(signer: Signer, subject: Manifest, docker_reference: str) -> Manifest:
    """cosign's OCI 1.1 signature: a referrer of `subject`."""
    layer, layer_descriptor = _cosign_layer(signer, subject, docker_reference)
    doc = {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "artifactType": COSIGN_ARTIFACT,
           "config": EMPTY_CONFIG.descriptor(), "layers": [layer_descriptor],
           "subject": subject_descriptor(subject),
           "annotations": {"org.opencontainers.image.created": CREATED}}
    return _manifest(doc, EMPTY_CONFIG, (layer,))


def cosign_tag_signature(signer: Signer, subject: Manifest, docker_reference: str) -> Manifest:
    """cosign's classic signature, pushed under `cosign_tag(subject.digest)`."""
    layer, layer_descriptor = _cosign_layer(signer, subject, docker_reference)
    config_doc = {"architecture": "", "config": {}, "created": "0001-01-01T00:00:00Z",
                  "history": [{"created": "0001-01-01T00:00:00Z"}], "os": "",
                  "rootfs": {"type": "layers", "diff_ids": [layer.digest]}}
    config_data = json.dumps(config_doc, separators=(",", ":")).encode()
    config = Blob(sha256_digest(config_data), len(config_data), OCI_CONFIG, data=config_data)
    doc = {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": config.descriptor(),
           "layers": [layer_descriptor]}
    return _manifest(doc, config, (layer,))


def verify_cosign(public_key: ec.EllipticCurvePublicKey, manifest: dict[str, Any],
                  payloads: dict[str, bytes], digest: str) -> None:
    """What `cosign verify --key` checks: a simple-signing layer whose payload (fetched
    by its digest into `payloads`) is signed by the key and names `digest`."""
    layers = [layer for layer in manifest.get("layers", ()) if layer.get("mediaType") == SIMPLE_SIGNING]
    if not layers:
        raise SignatureInvalid("no simple-signing layer")
    for layer in layers:
        payload = payloads[layer["digest"]]
        if sha256_digest(payload) != layer["digest"]:
            raise SignatureInvalid("payload does not match its digest")
        signature = base64.b64decode(layer["annotations"][COSIGN_SIGNATURE])
        try:
            public_key.verify(signature, payload, ec.ECDSA(hashes.SHA256()))
        except InvalidSignature:
            raise SignatureInvalid("cosign signature does not verify") from None
        named = json.loads(payload)["critical"]["image"]["docker-manifest-digest"]
        if named != digest:
            raise SignatureInvalid(f"payload names {named}, not {digest}")


# -- notation ----------------------------------------------------------------------------

def notation_signature(signer: Signer, subject: Manifest) -> Manifest:
    """notation's signature (JWS envelope, notary.x509 scheme): a referrer of `subject`."""
    protected = {"alg": "ES256", "crit": ["io.cncf.notary.signingScheme"], "cty": NOTATION_PAYLOAD,
                 "io.cncf.notary.signingScheme": "notary.x509",
                 "io.cncf.notary.signingTime": CREATED}
    payload = {"targetArtifact": subject_descriptor(subject)}
    signing_input = f"{_b64url(json.dumps(protected).encode())}.{_b64url(json.dumps(payload).encode())}"
    r, s = decode_dss_signature(signer.sign_der(signing_input.encode()))
    envelope = {
        "payload": signing_input.split(".")[1],
        "protected": signing_input.split(".")[0],
        "header": {"x5c": [base64.b64encode(
            signer.certificate.public_bytes(serialization.Encoding.DER)).decode()]},
        "signature": _b64url(r.to_bytes(32, "big") + s.to_bytes(32, "big")),
    }
    data = json.dumps(envelope).encode()
    layer = Blob(sha256_digest(data), len(data), JWS, data=data)
    doc = {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "artifactType": NOTATION_ARTIFACT,
           "config": EMPTY_CONFIG.descriptor(), "layers": [layer.descriptor()],
           "subject": subject_descriptor(subject),
           "annotations": {"io.cncf.notary.x509chain.thumbprint#S256":
                           json.dumps([signer.thumbprint()]),
                           "org.opencontainers.image.created": CREATED}}
    return _manifest(doc, EMPTY_CONFIG, (layer,))


def verify_notation(public_key: ec.EllipticCurvePublicKey, envelope: bytes,
                    digest: str) -> None:
    """What `notation verify` checks of the envelope (trust store aside): the JWS
    signature with the key, and that its payload's targetArtifact is `digest`."""
    doc = json.loads(envelope)
    signature = _unb64url(doc["signature"])
    der = encode_dss_signature(int.from_bytes(signature[:32], "big"),
                               int.from_bytes(signature[32:], "big"))
    try:
        public_key.verify(der, f"{doc['protected']}.{doc['payload']}".encode(),
                          ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise SignatureInvalid("notation signature does not verify") from None
    target = json.loads(_unb64url(doc["payload"]))["targetArtifact"]
    if target["digest"] != digest:
        raise SignatureInvalid(f"envelope names {target['digest']}, not {digest}")


# -- the referrers tag schema ------------------------------------------------------------

def referrer_descriptor(manifest: Manifest) -> dict[str, Any]:
    """A referrer as the referrers API lists it: its artifactType (else its config's media
    type) and its annotations (OCI distribution spec 1.1)."""
    doc = json.loads(manifest.body)
    descriptor: dict[str, Any] = {"mediaType": manifest.media_type, "digest": manifest.digest,
                                  "size": manifest.size}
    artifact_type = doc.get("artifactType") or doc.get("config", {}).get("mediaType")
    if artifact_type:
        descriptor["artifactType"] = artifact_type
    if doc.get("annotations"):
        descriptor["annotations"] = doc["annotations"]
    return descriptor


def referrers_tag_index(referrers: list[Manifest]) -> Manifest:
    """The index pushed as `referrers_tag(subject)` where the registry has no API."""
    doc = {"schemaVersion": 2, "mediaType": OCI_INDEX,
           "manifests": [referrer_descriptor(m) for m in referrers]}
    return Manifest(OCI_INDEX, json.dumps(doc, separators=(",", ":")).encode(),
                    children=tuple(referrers))


# -- pushing -----------------------------------------------------------------------------

@dataclass(frozen=True)
class Signed:
    """An image and the signatures pushed for it."""

    image: Image
    notation: Manifest  # a referrer (subject: the image)
    cosign: Manifest  # a referrer too, cosign's OCI 1.1 form
    cosign_tagged: Manifest | None = None  # cosign's classic form, under cosign_tag(digest)
    tag_index: Manifest | None = None  # the referrers tag schema's index

    @property
    def referrers(self) -> tuple[Manifest, ...]:
        return (self.notation, self.cosign)


def push_signatures(client: RegistryClient, image: Image, signer: Signer,
                    docker_reference: str, tag_schema: bool) -> Signed:
    """Sign `image` as notation and cosign do (its manifest named `docker_reference` in
    cosign's payload).  Both push referrers with a subject; `tag_schema` is a registry
    without the referrers API, where they also push the tags clients fall back to: the
    `sha256-<hex>` index of the referrers (notation, oras) and `sha256-<hex>.sig` (cosign)."""
    notation = notation_signature(signer, image.manifest)
    cosign = cosign_referrer(signer, image.manifest, docker_reference)
    for signature in (notation, cosign):
        client.push_manifest_tree(image.repository, signature)
    if not tag_schema:
        return Signed(image, notation, cosign)
    tagged = cosign_tag_signature(signer, image.manifest, docker_reference)
    client.push_manifest_tree(image.repository, tagged)
    client.put_manifest(image.repository, cosign_tag(image.digest), tagged)
    index = referrers_tag_index([notation, cosign])
    client.push_manifest_tree(image.repository, index)
    client.put_manifest(image.repository, referrers_tag(image.digest), index)
    return Signed(image, notation, cosign, tagged, index)
