"""A small registry that misbehaves on demand, for fault tests of docxy against a real
process: plain HTTP, no auth, a few fixed repositories, and a mode read from a file on every
request.  Run as `python -m harness.faultserver --port P --mode-file F --log L`.

Repositories: `fault/app` (tags `v1`, `v2`, each a manifest with a config blob and a 2 MiB
layer) and `fault/huge` (tag `v1`: a 5 MiB manifest with its Content-Length; tag `chunked`:
the same without one).  Modes, for every `/v2/<name>/...` request (`/v2/` always answers
200): `ok`; `500` (a JSON error); `429` (TOOMANYREQUESTS with `Retry-After: 42`); `hang`
(HEAD answers normally, GET sends its headers and then nothing, for up to two minutes);
`cut-manifest` (a manifest GET promises its Content-Length, has no Docker-Content-Digest,
sends half and closes); `slow-headers` (every GET waits 3 s before its headers).
Each request is logged as a JSON line: method, path, mode and status (null when the client
went away before the answer could be written).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import random
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

MANIFEST_TYPE = "application/vnd.docker.distribution.manifest.v2+json"
HANG_SECONDS = 120
SLOW_HEADERS = 3.0
RETRY_AFTER = "42"


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _manifest(config: bytes, layer: bytes, padding: int = 0) -> bytes:
    document = {
        "schemaVersion": 2,
        "mediaType": MANIFEST_TYPE,
        "config": {"mediaType": "application/vnd.docker.container.image.v1+json",
                   "size": len(config), "digest": _digest(config)},
        "layers": [{"mediaType": "application/vnd.docker.image.rootfs.diff.tar.gzip",
                    "size": len(layer), "digest": _digest(layer)}],
    }
    if padding:
        document["annotations"] = {"padding": "x" * padding}
    return json.dumps(document, indent=3).encode()


class Content:
    """Everything the server serves, built the same way in the server and in tests."""

    def __init__(self) -> None:
        rng = random.Random(5)
        self.blobs: dict[str, bytes] = {}
        self.manifests: dict[tuple[str, str], bytes] = {}
        for tag in ("v1", "v2"):
            config = json.dumps({"architecture": "amd64", "os": "linux", "tag": tag}).encode()
            layer = rng.randbytes(2 << 20)
            self.blobs[_digest(config)] = config
            self.blobs[_digest(layer)] = layer
            self.manifests[("fault/app", tag)] = _manifest(config, layer)
        config = self.blobs[next(iter(self.blobs))]
        huge = _manifest(config, self.blobs[list(self.blobs)[1]], padding=5 << 20)
        self.manifests[("fault/huge", "v1")] = huge
        self.manifests[("fault/huge", "chunked")] = huge
        for (name, _), body in list(self.manifests.items()):
            self.manifests[(name, _digest(body))] = body

    def layer(self, tag: str = "v1") -> tuple[str, bytes]:
        document = json.loads(self.manifests[("fault/app", tag)])
        digest = document["layers"][0]["digest"]
        return digest, self.blobs[digest]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: "_Server"

    def log_message(self, format: str, *args) -> None:
        pass

    def do_GET(self) -> None:
        self._answer(body=True)

    def do_HEAD(self) -> None:
        self._answer(body=False)

    def _send(self, status: int, headers: dict[str, str], body: bytes, send_body: bool,
              length: bool = True) -> None:
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        if length:
            self.send_header("Content-Length", str(len(body)))
        else:
            self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        if not send_body:
            return
        if length:
            self.wfile.write(body)
        else:
            for start in range(0, len(body), 64 * 1024):
                piece = body[start:start + 64 * 1024]
                self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            self.wfile.write(b"0\r\n\r\n")

    def _error(self, status: int, code: str, message: str, send_body: bool,
               extra: dict[str, str] | None = None) -> None:
        body = json.dumps({"errors": [{"code": code, "message": message}]}).encode()
        self._send(status, {"Content-Type": "application/json", **(extra or {})}, body, send_body)

    def _answer(self, body: bool) -> None:
        mode = self.server.mode()
        status = None  # stays None when the client has gone before the answer is written
        try:
            status = self._route(mode, body)
        finally:
            self.server.record({"method": self.command, "path": self.path, "mode": mode,
                                "status": status})

    def _route(self, mode: str, body: bool) -> int:
        path = self.path.split("?", 1)[0]
        if path in ("/v2", "/v2/"):
            self._send(200, {"Content-Type": "application/json"}, b"{}", body)
            return 200
        if mode == "500":
            self._error(500, "UNKNOWN", "fault injected: internal server error", body)
            return 500
        if mode == "429":
            self._error(429, "TOOMANYREQUESTS", "fault injected: too many requests", body,
                        {"Retry-After": RETRY_AFTER})
            return 429
        content = self.server.content
        parts = path[len("/v2/"):].rsplit("/", 2) if path.startswith("/v2/") else []
        if len(parts) != 3:
            self._error(404, "NAME_UNKNOWN", "no such repository", body)
            return 404
        name, kind, ref = parts
        if kind == "manifests" and (name, ref) in content.manifests:
            data = content.manifests[(name, ref)]
            headers = {"Content-Type": MANIFEST_TYPE, "Docker-Content-Digest": _digest(data)}
        elif kind == "blobs" and ref in content.blobs:
            data = content.blobs[ref]
            headers = {"Content-Type": "application/octet-stream", "Docker-Content-Digest": ref}
        else:
            self._error(404, "MANIFEST_UNKNOWN" if kind == "manifests" else "BLOB_UNKNOWN",
                        "unknown", body)
            return 404
        if mode == "cut-manifest" and kind == "manifests":
            self.send_response(200)
            self.send_header("Content-Type", MANIFEST_TYPE)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if body:
                self.wfile.write(data[: len(data) // 2])
                self.wfile.flush()
            self.close_connection = True
            return 200
        if mode == "slow-headers" and body:
            time.sleep(SLOW_HEADERS)
        if mode == "hang" and body:
            self.send_response(200)
            for key, value in headers.items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.flush()
            self._stall()
            return 200
        self._send(200, headers, data, body, length=ref != "chunked")
        return 200

    def _stall(self) -> None:
        """Send nothing more until the peer leaves (or HANG_SECONDS pass)."""
        self.connection.settimeout(0.2)
        deadline = time.monotonic() + HANG_SECONDS
        while time.monotonic() < deadline:
            try:
                if self.connection.recv(1) == b"":
                    break
            except TimeoutError:
                continue
            except OSError:
                break
        self.close_connection = True


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, port: int, mode_file: str, log_path: str) -> None:
        super().__init__(("127.0.0.1", port), _Handler)
        self.content = Content()
        self.mode_file = Path(mode_file)
        self.log_path = log_path
        self.lock = threading.Lock()

    def mode(self) -> str:
        try:
            return self.mode_file.read_text().strip() or "ok"
        except FileNotFoundError:
            return "ok"

    def record(self, entry: dict) -> None:
        with self.lock, open(self.log_path, "a") as f:
            f.write(json.dumps(entry) + "\n")


class FaultServer:
    """The server as a child process on 127.0.0.1; `set_mode()` changes how it behaves."""

    def __init__(self, workdir: Path) -> None:
        import sys

        from .procs import ManagedProcess, free_port

        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.mode_file = self.workdir / "mode"
        self.log_path = self.workdir / "requests.jsonl"
        self.content = Content()
        tests_dir = str(Path(__file__).resolve().parent.parent)
        self.process = ManagedProcess(
            "faultserver",
            [sys.executable, "-m", "harness.faultserver", "--port", str(self.port),
             "--mode-file", str(self.mode_file), "--log", str(self.log_path)],
            self.workdir / "faultserver.log", env={"PYTHONPATH": tests_dir})

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def set_mode(self, mode: str) -> None:
        self.mode_file.write_text(mode)

    def requests(self) -> list[dict]:
        try:
            text = self.log_path.read_text()
        except FileNotFoundError:
            return []
        return [json.loads(line) for line in text.splitlines() if line.strip()]

    def start(self) -> "FaultServer":
        from .procs import wait_for_port

        self.set_mode("ok")
        self.process.start()
        wait_for_port("127.0.0.1", self.port, 20, self.process)
        return self

    def stop(self) -> None:
        self.process.stop()

    def __enter__(self) -> "FaultServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--mode-file", required=True)
    parser.add_argument("--log", required=True)
    args = parser.parse_args()
    _Server(args.port, args.mode_file, args.log).serve_forever()


if __name__ == "__main__":
    main()
