"""Test images built in Python and pushed through the registry's own HTTP API.

Layers are real gzip'd tar archives and configs real image configs (`rootfs.diff_ids` =
sha256 of the uncompressed tar), so docker, podman and containerd can pull and unpack the
linux/amd64 images. `push_test_images()` pushes the standard set and returns an `ImageSet`
describing every image: manifest digest, media type, body, and each blob's digest and size.
The large layer is built streaming to a file (never in memory), cached per size.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import io
import json
import os
import random
import ssl
import tarfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Mapping, Sequence
from urllib.parse import urljoin, urlsplit

DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar.gzip"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"

ALL_MANIFEST_TYPES = (DOCKER_MANIFEST, DOCKER_MANIFEST_LIST, OCI_MANIFEST, OCI_INDEX)
CREATED = "2024-01-01T00:00:00Z"
MTIME = 1704067200  # CREATED, for tar headers: the same input gives the same digests


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class Blob:
    """A blob: small ones carry `data`, large ones live at `path`."""

    digest: str
    size: int
    media_type: str
    data: bytes | None = field(default=None, repr=False)
    path: Path | None = None

    def chunks(self, chunk_size: int = 1 << 20) -> Iterator[bytes]:
        if self.data is not None:
            yield self.data
            return
        assert self.path is not None
        with open(self.path, "rb") as f:
            while chunk := f.read(chunk_size):
                yield chunk

    def descriptor(self) -> dict[str, object]:
        return {"mediaType": self.media_type, "size": self.size, "digest": self.digest}


@dataclass(frozen=True)
class Manifest:
    """An image manifest (with `config` and `layers`) or an index (with `children`)."""

    media_type: str
    body: bytes = field(repr=False)
    config: Blob | None = None
    layers: tuple[Blob, ...] = ()
    children: tuple["Manifest", ...] = ()
    platform: Mapping[str, str] | None = None

    @property
    def digest(self) -> str:
        return sha256_digest(self.body)

    @property
    def size(self) -> int:
        return len(self.body)

    @property
    def is_index(self) -> bool:
        return self.media_type in (DOCKER_MANIFEST_LIST, OCI_INDEX)

    @property
    def blobs(self) -> tuple[Blob, ...]:
        """Config and layers of this manifest and of every child, without duplicates."""
        seen: dict[str, Blob] = {}
        own = ((self.config,) if self.config else ()) + self.layers
        for b in own:
            seen.setdefault(b.digest, b)
        for child in self.children:
            for b in child.blobs:
                seen.setdefault(b.digest, b)
        return tuple(seen.values())

    def child_for(self, architecture: str, os_name: str = "linux") -> "Manifest":
        for c in self.children:
            if c.platform and c.platform.get("architecture") == architecture \
                    and c.platform.get("os") == os_name:
                return c
        raise KeyError(f"no {os_name}/{architecture} child")


@dataclass(frozen=True)
class Image:
    """A pushed repository: its tags all point at `manifest`."""

    repository: str
    tags: tuple[str, ...]
    manifest: Manifest
    private: bool = False

    @property
    def ref(self) -> str:
        return f"{self.repository}:{self.tags[0]}"

    @property
    def tag(self) -> str:
        return self.tags[0]

    @property
    def digest(self) -> str:
        return self.manifest.digest

    @property
    def media_type(self) -> str:
        return self.manifest.media_type

    @property
    def blobs(self) -> tuple[Blob, ...]:
        return self.manifest.blobs

    @property
    def short_name(self) -> str:
        """The name a Docker Hub user types: `library/` removed."""
        return self.repository.removeprefix("library/")


@dataclass(frozen=True)
class ImageSet:
    """The standard test images, by role."""

    alpine: Image        # library/alpine:latest, docker v2, linux/amd64, a few KB
    multiarch: Image     # docker manifest list, linux/amd64 + linux/arm64/v8
    oci_index: Image     # OCI index of OCI manifests, linux/amd64 + linux/arm64/v8
    namespaced: Image    # org/app (OCI image manifest)
    nested: Image        # deep/er/nested/name/x
    private: Image       # private/secret, needs credentials
    paginated: Image     # library/manytags, 120 tags of one manifest
    large: Image         # library/large, one big layer

    def all(self) -> tuple[Image, ...]:
        return (self.alpine, self.multiarch, self.oci_index, self.namespaced, self.nested,
                self.private, self.paginated, self.large)

    def by_ref(self, ref: str) -> Image:
        repo, _, tag = ref.rpartition(":")
        for image in self.all():
            if image.repository == repo and tag in image.tags:
                return image
        raise KeyError(ref)

    def __iter__(self) -> Iterator[Image]:
        return iter(self.all())


# -- building ----------------------------------------------------------------------------

def make_layer(files: Mapping[str, bytes], media_type: str = DOCKER_LAYER) -> tuple[Blob, str]:
    """A gzip'd tar of `files` (parent directories added); returns (blob, diff_id)."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        dirs: set[str] = set()
        for name in sorted(files):
            parts = name.split("/")[:-1]
            for i in range(1, len(parts) + 1):
                d = "/".join(parts[:i])
                if d not in dirs:
                    dirs.add(d)
                    info = tarfile.TarInfo(d)
                    info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, MTIME
                    tar.addfile(info)
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(files[name]), 0o644, MTIME
            tar.addfile(info, io.BytesIO(files[name]))
    uncompressed = raw.getvalue()
    compressed = gzip.compress(uncompressed, compresslevel=6, mtime=0)
    blob = Blob(sha256_digest(compressed), len(compressed), media_type, data=compressed)
    return blob, sha256_digest(uncompressed)


def build_large_layer(cache_dir: Path, size: int, media_type: str = DOCKER_LAYER,
                      chunk: int = 1 << 20) -> tuple[Blob, str]:
    """A gzip (level 1) tar holding one file of `size` random bytes, written streaming to
    `cache_dir/large-layer-<size>.tar.gz` while hashing; reused when already there."""
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    path = cache_dir / f"large-layer-{size}.tar.gz"
    meta_path = cache_dir / f"large-layer-{size}.json"
    if path.exists() and meta_path.exists():
        meta = json.loads(meta_path.read_text())
        if path.stat().st_size == meta["size"]:
            return Blob(meta["digest"], meta["size"], media_type, path=path), meta["diff_id"]
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    raw_hash, gz_hash = hashlib.sha256(), hashlib.sha256()
    compressor = zlib.compressobj(1, zlib.DEFLATED, 31)  # wbits 31: gzip container
    written = 0
    with open(tmp, "wb") as out:
        def feed(data: bytes) -> None:
            nonlocal written
            raw_hash.update(data)
            packed = compressor.compress(data)
            if packed:
                gz_hash.update(packed)
                out.write(packed)
                written += len(packed)

        info = tarfile.TarInfo("large/random.bin")
        info.size, info.mode, info.mtime = size, 0o644, MTIME
        dir_info = tarfile.TarInfo("large")
        dir_info.type, dir_info.mode, dir_info.mtime = tarfile.DIRTYPE, 0o755, MTIME
        feed(dir_info.tobuf(tarfile.PAX_FORMAT))
        feed(info.tobuf(tarfile.PAX_FORMAT))
        remaining = size
        while remaining:
            n = min(chunk, remaining)
            feed(os.urandom(n))
            remaining -= n
        feed(b"\0" * ((-size) % tarfile.BLOCKSIZE))
        feed(b"\0" * (2 * tarfile.BLOCKSIZE))  # end-of-archive marker
        tail = compressor.flush()
        gz_hash.update(tail)
        out.write(tail)
        written += len(tail)
    os.replace(tmp, path)
    digest, diff_id = "sha256:" + gz_hash.hexdigest(), "sha256:" + raw_hash.hexdigest()
    meta_path.write_text(json.dumps({"digest": digest, "diff_id": diff_id, "size": written}))
    return Blob(digest, written, media_type, path=path), diff_id


def make_config(diff_ids: Sequence[str], architecture: str = "amd64", os_name: str = "linux",
                variant: str | None = None, oci: bool = False, label: str = "") -> Blob:
    config: dict[str, object] = {
        "architecture": architecture,
        "os": os_name,
        "created": CREATED,
        "config": {
            "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
            "Cmd": ["/bin/sh"],
            "Labels": {"org.opencontainers.image.title": label or "docxy test image"},
        },
        "rootfs": {"type": "layers", "diff_ids": list(diff_ids)},
        "history": [{"created": CREATED, "created_by": f"docxy harness layer {i}"}
                    for i in range(len(diff_ids))],
    }
    if variant:
        config["variant"] = variant
    data = json.dumps(config, sort_keys=True).encode()
    return Blob(sha256_digest(data), len(data), OCI_CONFIG if oci else DOCKER_CONFIG, data=data)


def make_image_manifest(config: Blob, layers: Sequence[Blob], oci: bool = False,
                        platform: Mapping[str, str] | None = None) -> Manifest:
    media_type = OCI_MANIFEST if oci else DOCKER_MANIFEST
    doc = {"schemaVersion": 2, "mediaType": media_type, "config": config.descriptor(),
           "layers": [layer.descriptor() for layer in layers]}
    body = json.dumps(doc, indent=3).encode()
    return Manifest(media_type, body, config=config, layers=tuple(layers), platform=platform)


def make_index(children: Sequence[Manifest], oci: bool = False) -> Manifest:
    media_type = OCI_INDEX if oci else DOCKER_MANIFEST_LIST
    entries = []
    for c in children:
        if c.platform is None:
            raise ValueError("index children need a platform")
        entries.append({"mediaType": c.media_type, "size": c.size, "digest": c.digest,
                        "platform": dict(c.platform)})
    body = json.dumps({"schemaVersion": 2, "mediaType": media_type, "manifests": entries},
                      indent=3).encode()
    return Manifest(media_type, body, children=tuple(children))


def simple_image(label: str, architecture: str = "amd64", variant: str | None = None,
                 oci: bool = False, extra_files: Mapping[str, bytes] | None = None) -> Manifest:
    """A one-layer image whose files name it, so every image has its own digests."""
    files = {
        "etc/os-release": f'NAME="docxy test"\nID=docxytest\nPRETTY_NAME="{label}"\n'.encode(),
        "hello.txt": f"hello from {label} ({architecture})\n".encode(),
    }
    files.update(extra_files or {})
    layer, diff_id = make_layer(files, OCI_LAYER if oci else DOCKER_LAYER)
    config = make_config([diff_id], architecture, variant=variant, oci=oci, label=label)
    platform = {"architecture": architecture, "os": "linux"}
    if variant:
        platform["variant"] = variant
    return make_image_manifest(config, [layer], oci=oci, platform=platform)


# -- pushing -----------------------------------------------------------------------------

class RegistryPushError(RuntimeError):
    pass


class RegistryClient:
    """A small blocking client for the push side of the registry API (auth off)."""

    def __init__(self, base_url: str, ssl_context: ssl.SSLContext | None = None,
                 chunk_size: int = 32 << 20, timeout: float = 300.0) -> None:
        u = urlsplit(base_url)
        self.scheme, self.host, self.port = u.scheme, u.hostname or "127.0.0.1", u.port
        self.ssl_context = ssl_context
        self.chunk_size = chunk_size
        self.timeout = timeout
        self._conn: http.client.HTTPConnection | None = None

    def _connection(self) -> http.client.HTTPConnection:
        if self._conn is None:
            if self.scheme == "https":
                self._conn = http.client.HTTPSConnection(
                    self.host, self.port, timeout=self.timeout, context=self.ssl_context,
                    blocksize=1 << 20)
            else:
                self._conn = http.client.HTTPConnection(self.host, self.port,
                                                        timeout=self.timeout, blocksize=1 << 20)
        return self._conn

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def request(self, method: str, path: str, body: bytes | None = None,
                headers: Mapping[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
        conn = self._connection()
        try:
            conn.request(method, path, body=body, headers=dict(headers or {}))
            resp = conn.getresponse()
            data = resp.read()
        except (http.client.HTTPException, OSError):
            self.close()
            raise
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, data

    @staticmethod
    def _path(location: str) -> str:
        u = urlsplit(urljoin("http://x/", location))
        return u.path + ("?" + u.query if u.query else "")

    def blob_exists(self, repository: str, digest: str) -> bool:
        status, _, _ = self.request("HEAD", f"/v2/{repository}/blobs/{digest}")
        return status == 200

    def push_blob(self, repository: str, blob: Blob) -> None:
        if self.blob_exists(repository, blob.digest):
            return
        status, headers, body = self.request("POST", f"/v2/{repository}/blobs/uploads/",
                                             headers={"Content-Length": "0"})
        if status != 202:
            raise RegistryPushError(f"upload start for {repository}: {status} {body!r}")
        location = self._path(headers["location"])
        if blob.data is not None:
            sep = "&" if "?" in location else "?"
            status, headers, body = self.request(
                "PUT", f"{location}{sep}digest={blob.digest}", body=blob.data,
                headers={"Content-Type": "application/octet-stream",
                         "Content-Length": str(blob.size)})
        else:
            # Chunked upload: PATCH pieces of chunk_size, then PUT with the digest.
            offset = 0
            buf = bytearray()
            for piece in blob.chunks():
                buf += piece
                while len(buf) >= self.chunk_size:
                    location = self._patch(location, bytes(buf[:self.chunk_size]), offset)
                    offset += self.chunk_size
                    del buf[:self.chunk_size]
            if buf:
                location = self._patch(location, bytes(buf), offset)
                offset += len(buf)
            sep = "&" if "?" in location else "?"
            status, headers, body = self.request(
                "PUT", f"{location}{sep}digest={blob.digest}", body=b"",
                headers={"Content-Length": "0"})
        if status != 201:
            raise RegistryPushError(f"upload of {blob.digest} to {repository}: "
                                    f"{status} {body[:300]!r}")
        if headers.get("docker-content-digest", blob.digest) != blob.digest:
            raise RegistryPushError(f"registry stored {headers['docker-content-digest']}, "
                                    f"expected {blob.digest}")

    def _patch(self, location: str, data: bytes, offset: int) -> str:
        status, headers, body = self.request(
            "PATCH", location, body=data,
            headers={"Content-Type": "application/octet-stream",
                     "Content-Range": f"{offset}-{offset + len(data) - 1}",
                     "Content-Length": str(len(data))})
        if status != 202:
            raise RegistryPushError(f"PATCH at {offset}: {status} {body[:300]!r}")
        return self._path(headers["location"])

    def put_manifest(self, repository: str, reference: str, manifest: Manifest) -> None:
        status, headers, body = self.request(
            "PUT", f"/v2/{repository}/manifests/{reference}", body=manifest.body,
            headers={"Content-Type": manifest.media_type,
                     "Content-Length": str(manifest.size)})
        if status != 201:
            raise RegistryPushError(f"manifest {repository}:{reference}: {status} {body!r}")
        got = headers.get("docker-content-digest")
        if got and got != manifest.digest:
            raise RegistryPushError(f"manifest digest {got} != {manifest.digest}")

    def push_manifest_tree(self, repository: str, manifest: Manifest) -> None:
        """Push blobs and children (by digest) before the manifest itself (by digest)."""
        for child in manifest.children:
            self.push_manifest_tree(repository, child)
        for blob in ((manifest.config,) if manifest.config else ()) + manifest.layers:
            self.push_blob(repository, blob)
        self.put_manifest(repository, manifest.digest, manifest)

    def push_image(self, image: Image) -> Image:
        self.push_manifest_tree(image.repository, image.manifest)
        for tag in image.tags:
            self.put_manifest(image.repository, tag, image.manifest)
        return image

    def __enter__(self) -> "RegistryClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _padding(label: str, architecture: str, size: int) -> dict[str, bytes]:
    """`size` bytes that do not compress, the same for the same image on every run."""
    if not size:
        return {}
    seed = hashlib.sha256(f"{label}/{architecture}".encode()).digest()
    out = bytearray()
    while len(out) < size:
        seed = hashlib.sha256(seed).digest()
        out += _random_block(seed)
    return {"padding.bin": bytes(out[:size])}


def _random_block(seed: bytes, size: int = 1 << 16) -> bytes:
    return random.Random(seed).randbytes(size)


def build_test_images(cache_dir: Path, large_layer_size: int = 300 << 20,
                      private_repository: str = "private/secret",
                      padding: int = 0) -> ImageSet:
    """The standard set (see `ImageSet`); only the large layer touches the disk.  With
    `padding`, every small image's layer also holds that many incompressible bytes (a
    layer large enough to be cut mid-body)."""
    amd = lambda label, oci=False: simple_image(
        label, "amd64", oci=oci, extra_files=_padding(label, "amd64", padding))
    arm = lambda label, oci=False: simple_image(
        label, "arm64", "v8", oci=oci, extra_files=_padding(label, "arm64", padding))
    big_blob, big_diff = build_large_layer(cache_dir, large_layer_size)
    small, small_diff = make_layer({"etc/os-release": b'NAME="docxy large"\n'})
    large_manifest = make_image_manifest(
        make_config([small_diff, big_diff], label="library/large"), [small, big_blob],
        platform={"architecture": "amd64", "os": "linux"})
    return ImageSet(
        alpine=Image("library/alpine", ("latest", "3.19"), amd("library/alpine")),
        multiarch=Image("library/multiarch", ("latest",), make_index(
            [amd("library/multiarch"), arm("library/multiarch")])),
        oci_index=Image("library/ocimulti", ("latest",), make_index(
            [amd("library/ocimulti", True), arm("library/ocimulti", True)], oci=True)),
        namespaced=Image("org/app", ("latest", "1.0"), amd("org/app", True)),
        nested=Image("deep/er/nested/name/x", ("latest",), amd("deep/er/nested/name/x")),
        private=Image(private_repository, ("latest",), amd(private_repository), private=True),
        paginated=Image("library/manytags", tuple(f"v{i:03d}" for i in range(120)),
                        amd("library/manytags")),
        large=Image("library/large", ("latest",), large_manifest),
    )


def push_test_images(registry_url: str, cache_dir: Path, large_layer_size: int = 300 << 20,
                     ssl_context: ssl.SSLContext | None = None,
                     private_repository: str = "private/secret",
                     padding: int = 0) -> ImageSet:
    """Build the standard set and push it to a registry that has auth off."""
    images = build_test_images(cache_dir, large_layer_size, private_repository, padding)
    with RegistryClient(registry_url, ssl_context) as client:
        for image in images:
            client.push_image(image)
    return images
