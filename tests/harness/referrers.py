"""The OCI 1.1 referrers API in front of distribution 2.8, which does not implement it.

`GET /v2/<name>/referrers/<digest>[?artifactType=T]` answers, as the OCI distribution spec
1.1 says, an image index (`Content-Type: application/vnd.oci.image.index.v1+json`) of a
descriptor for every manifest of the repository whose `subject` is that digest: its media
type, digest and size, its `artifactType` (else its config's media type) and its
annotations; with `artifactType` only those of that type, and `OCI-Filters-Applied:
artifactType`.  A subject without referrers (or unknown) gives an empty index; a digest
that is not one gives 400 DIGEST_INVALID.

Who may read it is the registry's decision: the caller's Authorization goes to the
registry's own `tags/list` of the repository first, and a refusal (401 with the registry's
challenge, 403, 404 NAME_UNKNOWN) is relayed as it came.  The manifests are read from the
registry's storage directory (its filesystem driver's layout), so whatever was pushed
through the registry's API is found.  The harness front (harness.front, `referrers_storage`)
sends only these paths here; everything else still goes to the registry.

Stdlib only; run as `python -m harness.referrers --port P --backend http://127.0.0.1:R
--storage DIR`.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any, Sequence
from urllib.parse import parse_qs, urlsplit

from .stubserver import StubHandler, serve

REFERRERS_PATH = re.compile(r"^/v2/(?P<name>.+)/referrers/(?P<digest>[^/]+)$")
DIGEST = re.compile(r"^sha256:[a-f0-9]{64}$")
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
NAME = re.compile(rf"^{_COMPONENT}(?:/{_COMPONENT})*$")  # never a path out of the storage
INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
RELAYED_HEADERS = ("content-type", "www-authenticate", "docker-distribution-api-version")
MAX_MANIFEST = 4 << 20


def _blob_path(storage: Path, digest: str) -> Path:
    hex_part = digest.split(":", 1)[1]
    return storage / "docker/registry/v2/blobs/sha256" / hex_part[:2] / hex_part / "data"


def referrers(storage: Path, name: str, subject: str) -> list[dict[str, Any]]:
    """Descriptors of the manifests of repository `name` whose subject is `subject`, in
    digest order (the registry's revisions: every manifest pushed there)."""
    revisions = storage / "docker/registry/v2/repositories" / name / "_manifests/revisions/sha256"
    found = []
    for link in sorted(revisions.glob("*/link")):
        digest = link.read_text().strip()
        if not DIGEST.match(digest):
            continue
        path = _blob_path(storage, digest)
        try:
            if path.stat().st_size > MAX_MANIFEST:
                continue
            body = path.read_bytes()
            doc = json.loads(body)
        except (OSError, ValueError):
            continue
        if not isinstance(doc, dict) or (doc.get("subject") or {}).get("digest") != subject:
            continue
        descriptor: dict[str, Any] = {"mediaType": doc.get("mediaType") or OCI_MANIFEST,
                                      "digest": digest, "size": len(body)}
        artifact_type = doc.get("artifactType") or (doc.get("config") or {}).get("mediaType")
        if artifact_type:
            descriptor["artifactType"] = artifact_type
        if doc.get("annotations"):
            descriptor["annotations"] = doc["annotations"]
        found.append(descriptor)
    return found


def make_handler(backend: str, storage: Path) -> type[StubHandler]:
    class Handler(StubHandler):
        server_version = "harness-referrers"
        label = "referrers"

        def _allowed(self, name: str) -> bool:
            """Ask the registry whether the caller may read `name`; relay its refusal."""
            asked = self._ask_registry(f"/v2/{name}/tags/list", ("Authorization", "User-Agent"))
            if asked is None:
                return False
            resp, body = asked
            if resp.status == 200:
                return True
            relayed = [(k, v) for k, v in resp.getheaders() if k.lower() in RELAYED_HEADERS]
            self._send(resp.status, relayed, body)
            return False

        def do_GET(self) -> None:
            url = urlsplit(self.path)
            m = REFERRERS_PATH.match(url.path)
            if not m:
                return self._error(404, "NOT_FOUND", "only referrers are served here")
            name, subject = m.group("name", "digest")
            if not NAME.match(name):
                return self._error(404, "NAME_INVALID", "invalid repository name")
            if not DIGEST.match(subject):
                return self._error(400, "DIGEST_INVALID", "invalid digest")
            if not self._allowed(name):
                return
            descriptors = referrers(storage, name, subject)
            headers = [("Content-Type", INDEX),
                       ("Docker-Distribution-API-Version", "registry/2.0")]
            wanted = parse_qs(url.query).get("artifactType")
            if wanted:
                descriptors = [d for d in descriptors if d.get("artifactType") == wanted[0]]
                headers.append(("OCI-Filters-Applied", "artifactType"))
            body = json.dumps({"schemaVersion": 2, "mediaType": INDEX, "manifests": descriptors})
            self._send(200, headers, body.encode())

        do_HEAD = do_GET

    Handler.backend = backend
    return Handler


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m harness.referrers")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--interface", default="127.0.0.1")
    p.add_argument("--backend", required=True, help="registry base URL (plain HTTP)")
    p.add_argument("--storage", required=True, help="the registry's rootdirectory")
    ns = p.parse_args(argv)
    serve(make_handler(ns.backend, Path(ns.storage)), ns.interface, ns.port,
          f"{ns.backend}, {ns.storage}")


if __name__ == "__main__":
    main()
