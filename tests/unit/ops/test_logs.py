"""The request log in memory: one event per request with the fields an operator greps for,
its text and JSON forms, never a secret, and the observer twistd is handed."""
import io
import json

import pytest
from twisted.application.service import Application
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.logger import ILogObserver, formatEvent, globalLogPublisher
from twisted.python import usage
from twisted.python.failure import Failure

from docxy.ops.logs import (
    DocxyService,
    access_fields,
    access_format,
    endpoint_of,
    log_observer,
    printable,
)
from docxy.tap import Options, makeService

from ..fakes import Exchange, FakeResponse, FakeUpstream, make_site

DIGEST = "sha256:" + "ab" * 32


@pytest.fixture
def access_events():
    events = []

    def observe(event):
        if event.get("log_namespace") == "docxy.access":
            events.append(event)

    globalLogPublisher.addObserver(observe)
    yield events
    globalLogPublisher.removeObserver(observe)


@pytest.mark.parametrize(
    "path, endpoint",
    [(b"/v2/", "ping"), (b"/v2", "ping"), (b"/auth/token", "token"),
     (b"/auth/token/ghcr.io", "token"), (b"/v2/library/alpine/manifests/latest", "manifest"),
     (b"/v2/a/b/c/blobs/" + DIGEST.encode(), "blob"), (b"/v2/org/app/tags/list", "tags"),
     (b"/v2/org/app/referrers/" + DIGEST.encode(), "referrers"),
     (b"/health", "health"), (b"/ready", "health"), (b"/metrics", "metrics"),
     (b"/auth/tokenx", "other"), (b"/v2/manifests/x", "other"), (b"/", "other"),
     (b"/metrics/x", "other")],
)
def test_endpoint_labels_are_a_small_fixed_set(path, endpoint):
    """Every path maps to one of nine endpoint names, never to a repository name."""
    assert endpoint_of(path) == endpoint


def test_printable_escapes_control_bytes_and_cuts():
    """A path cannot inject terminal escapes or newlines into a log line, nor be endless."""
    assert printable(b"/v2/\x1b[31m\n") == "/v2/%1B[31m%0A"
    assert printable(b"/x" * 300).endswith("...") and len(printable(b"/x" * 300)) == 203


def test_one_event_per_request_with_the_fields(access_events):
    """A pull gives one event with client, method, registry, repository, reference,
    status, bytes, source and duration; its text line reads as before."""
    site, _, clock = make_site(upstream=FakeUpstream(
        lambda m, u, h, b: FakeResponse(200, {b"content-type": b"application/json"}, b"{}")))
    Exchange(site).send("GET", "/v2/alpine/manifests/latest")
    [event] = access_events
    assert {k: event[k] for k in ("client", "method", "endpoint", "registry", "repository",
                                  "reference", "status", "error", "bytes", "source", "user",
                                  "aborted")} == {
        "client": "127.0.0.1", "method": "GET", "endpoint": "manifest",
        "registry": "docker.io", "repository": "library/alpine", "reference": "latest",
        "status": 200, "error": None, "bytes": 2, "source": "upstream", "user": None,
        "aborted": False,
    }
    assert formatEvent(event) == "127.0.0.1 GET docker.io/library/alpine latest 200 2B upstream 0.000s"


def test_errors_carry_their_code(access_events):
    """A refused request's event names the registry error code."""
    site, _, _ = make_site()
    Exchange(site).send("GET", "/v2/UPPER/manifests/latest")
    [event] = access_events
    assert event["status"] == 404 and event["error"] == "NAME_INVALID"
    assert "NAME_INVALID" in formatEvent(event)


def test_no_secret_reaches_the_json_line(access_events):
    """Header values (Authorization, cookies, tokens in headers) never reach the JSON log."""
    site, _, _ = make_site(upstream=FakeUpstream(lambda m, u, h, b: FakeResponse(401, body=b"{}")))
    Exchange(site).send("GET", "/v2/alpine/manifests/latest",
                        {"Authorization": "Bearer SECRET-TOKEN", "Cookie": "s=SECRET-COOKIE"})
    Exchange(site).send("GET", "/auth/token?scope=repository:alpine:pull",
                        {"Authorization": "Basic dXNlcjpTRUNSRVQtUEFTUw=="})
    out = io.StringIO()
    observe = log_observer("json", out)
    for event in access_events:
        observe(event)
    lines = out.getvalue().splitlines()
    assert len(lines) == 2
    assert "SECRET" not in out.getvalue() and "dXNlcjpTRUNSRVQtUEFTUw" not in out.getvalue()
    first = json.loads(lines[0])
    assert first["status"] == 401 and first["repository"] == "library/alpine"


def test_user_is_logged_when_authentication_names_one():
    """The user client authentication put on the request is a field, and in the text."""

    class Request:
        path = b"/v2/alpine/manifests/latest"
        method = b"GET"
        code = 200
        sentLength = 10
        docxy_what = ("docker.io/library/alpine", "latest")
        docxy_user = "alice"
        docxy_client = "10.0.0.7"
        started = 1.0
        channel = object()  # still connected: logged as finished, not aborted

    fields = access_fields(Request(), 1.25)
    assert fields["user"] == "alice" and fields["client"] == "10.0.0.7"
    assert fields["duration"] == 0.25
    assert access_format(fields).startswith("{client} user={user} {method}")


def test_a_request_cut_short_is_logged_as_aborted(access_events):
    """A client that leaves mid-body still gets its event, marked aborted, with the bytes
    it was sent (twisted.web logs only finished requests)."""
    response = FakeResponse(200, body=b"x" * 100, auto=False)
    site, _, clock = make_site(upstream=FakeUpstream(lambda m, u, h, b: response))
    ex = Exchange(site)
    ex.send("GET", f"/v2/alpine/blobs/{DIGEST}")
    response.protocol.dataReceived(b"x" * 40)
    clock.advance(0)  # the reactor's turn ends: what arrived in it is sent
    assert access_events == []
    ex.channel.connectionLost(Failure(ConnectionDone()))
    [event] = access_events
    assert event["aborted"] is True and event["bytes"] == 40 and event["status"] == 200
    assert formatEvent(event).endswith("aborted")
    assert site.metrics.registry.get_sample_value(
        "docxy_requests_total", {"endpoint": "blob", "status": "200"}) == 1


def test_json_service_hands_twistd_its_observer():
    """twistd asks the Application for an ILogObserver after makeService: with
    --log-format json the service puts a JSON-lines observer there, with text none."""
    out = io.StringIO()
    app = Application("docxy")
    DocxyService(log_observer("json", out)).setServiceParent(app)
    observer = app.getComponent(ILogObserver)
    observer({"log_format": "{x}", "x": 1, "log_namespace": "t", "log_time": 0})
    assert json.loads(out.getvalue())["x"] == 1 and out.getvalue().count("\n") == 1
    app = Application("docxy")
    DocxyService(log_observer("text")).setServiceParent(app)
    assert app.getComponent(ILogObserver) is None


def test_log_format_option_and_environment():
    """--log-format json (or DOCXY_LOG_FORMAT=json) makes the daemon's service log JSON;
    anything but text or json is refused."""
    options = Options(environ={"DOCXY_LOG_FORMAT": "JSON"})
    options.parseOptions(["--listen", "tcp:0:interface=127.0.0.1", "--no-cache"])
    assert options["log-format"] == "json"
    assert makeService(options, reactor=Clock()).observer is not None
    options = Options(environ={})
    options.parseOptions(["--listen", "tcp:0:interface=127.0.0.1", "--no-cache"])
    assert makeService(options, reactor=Clock()).observer is None
    with pytest.raises(usage.UsageError, match="--log-format"):
        Options(environ={}).parseOptions(["--log-format", "xml"])


def test_a_client_leaving_before_the_answer_is_499(access_events):
    """A client that goes away while docxy still waits for the upstream is logged and
    counted as 499, not as the 200 nobody sent."""
    from twisted.internet import defer

    waiting = defer.Deferred()

    class Silent(FakeUpstream):
        async def request(self, method, url, headers, body=None, follow_redirects=True):
            return await waiting

    site, _, _ = make_site(upstream=Silent())
    ex = Exchange(site)
    ex.send("GET", f"/v2/alpine/blobs/{DIGEST}")
    ex.channel.connectionLost(Failure(ConnectionDone()))
    [event] = access_events
    assert event["status"] == 499 and event["aborted"] is True and event["bytes"] == 0
    assert site.metrics.registry.get_sample_value(
        "docxy_requests_total", {"endpoint": "blob", "status": "499"}) == 1
