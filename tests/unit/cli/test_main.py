"""The `docxy` command's contract with scripts: exit codes, JSON output, and progress
that never redraws where no terminal reads it."""
from __future__ import annotations

import io
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from docxy.cli.main import FAILED, OK, UNREACHABLE, USAGE, run
from docxy.cli.progress import Progress, bar, human


class _Admin(BaseHTTPRequestHandler):
    answers: dict = {}
    seen: list = []

    def _answer(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        body = self.rfile.read(length) if length else b""
        self.seen.append((self.command, self.path, body, self.headers.get("authorization")))
        status, payload, kind = self.answers[(self.command, self.path.split("?")[0])]
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("content-type", kind)
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = _answer

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def admin():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Admin)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    _Admin.seen = []
    yield f"http://127.0.0.1:{server.server_port}", _Admin
    server.shutdown()


def _run(*argv):
    out, err = io.StringIO(), io.StringIO()
    return run(list(argv), out, err), out.getvalue(), err.getvalue()


def test_usage_errors_exit_2_and_help_exits_0(capsys):
    assert _run("frobnicate")[0] == USAGE
    assert _run("cache")[0] == USAGE
    assert _run("warm", "--platform", "linux", "x")[0] == USAGE
    assert _run("--help")[0] == OK
    assert "warm" in capsys.readouterr().out


def test_an_unreachable_admin_api_exits_3():
    code, _, err = _run("--admin", "http://127.0.0.1:9", "cache", "ls")
    assert code == UNREACHABLE and "cannot reach" in err


def test_ls_table_and_json(admin):
    url, handler = admin
    row = {"registry": "docker.io", "repository": "library/alpine", "tag": "latest",
           "digest": "sha256:" + "a" * 64, "media_type": "x", "size": 3_400_000,
           "stored": 3_400_000, "pulls": 7, "last_pull": None, "platforms": []}
    handler.answers = {("GET", "/api/v1/cache"): (200, {"images": [row]}, "application/json")}
    code, out, _ = _run("--admin", url, "cache", "ls")
    assert code == OK
    header, line = out.splitlines()
    assert header.split()[:3] == ["REGISTRY", "REPOSITORY", "TAG"]
    assert line.split()[:3] == ["docker.io", "library/alpine", "latest"] and "3.4MB" in line
    code, out, _ = _run("--admin", url, "cache", "ls", "--json", "--registry", "docker.io")
    assert json.loads(out)["images"][0]["pulls"] == 7
    assert handler.seen[-1][1] == "/api/v1/cache?registry=docker.io"


def test_rm_nothing_matching_exits_1_and_credentials_go_as_basic(admin):
    url, handler = admin
    handler.answers = {("POST", "/api/v1/cache/rm"): (404, {"error": "nothing cached matches x"},
                                                      "application/json")}
    code, _, err = _run("--admin", url, "--user", "ops:secret", "cache", "rm", "x")
    assert code == FAILED and "nothing cached matches x" in err
    method, _, body, auth = handler.seen[-1]
    assert json.loads(body) == {"ref": "x"} and auth == "Basic b3BzOnNlY3JldA=="


def test_a_refused_login_exits_3(admin):
    url, handler = admin
    handler.answers = {("POST", "/api/v1/cache/gc"): (401, {"error": "no"}, "application/json")}
    code, _, err = _run("--admin", url, "cache", "gc")
    assert code == UNREACHABLE and "--admin-htpasswd" in err


def test_warm_streams_events_and_fails_on_an_error_event(admin):
    url, handler = admin
    events = [{"event": "start", "ref": "a", "registry": "docker.io", "repository": "library/a",
               "reference": "latest"},
              {"event": "blobs", "count": 1, "bytes": 10},
              {"event": "blob", "id": "abc", "digest": "sha256:x", "size": 10,
               "status": "Downloading", "done": 5},
              {"event": "error", "error": "blob sha256:x was cut after 5 bytes"}]
    body = b"".join(json.dumps(e).encode() + b"\n" for e in events)
    handler.answers = {("POST", "/api/v1/warm"): (200, body, "application/x-ndjson")}
    code, out, err = _run("--admin", url, "warm", "a")
    assert code == FAILED and "was cut after 5 bytes" in err and "\x1b[" not in err
    code, out, err = _run("--admin", url, "warm", "--json", "a")
    assert code == FAILED and [json.loads(x)["event"] for x in out.splitlines()][-1] == "error"
    done = body.replace(b'{"event": "error", "error": "blob sha256:x was cut after 5 bytes"}',
                        b'{"event": "done", "digest": "sha256:d", "blobs": 1, '
                        b'"downloaded": 10, "already_cached": 0}')
    handler.answers = {("POST", "/api/v1/warm"): (200, done, "application/x-ndjson")}
    code, _, err = _run("--admin", url, "warm", "a")
    assert code == OK and "Digest: sha256:d" in err


def test_progress_on_a_terminal_redraws_bars():
    out = io.StringIO()
    progress = Progress(out, tty=True)
    progress.event({"event": "blobs", "count": 2, "bytes": 2000})
    progress.event({"event": "blob", "id": "aaa", "size": 1000, "status": "Downloading",
                    "done": 500})
    progress.event({"event": "blob", "id": "bbb", "size": 1000, "status": "Already exists"})
    text = out.getvalue()
    assert "\x1b[" in text and "aaa: Downloading [" in text and "1/2 layers" in text
    assert human(1_500_000) == "1.5MB" and bar(0, 0) == "0B"
