"""Who may use the mirror: client networks, docxy's own users and tokens, rate limits, and
the refusal to start as an open relay."""
import base64
import json
import os

import bcrypt
import pytest
from twisted.internet import defer
from twisted.internet.task import Clock

from docxy.admission.networks import NetworkPolicy, is_local_endpoint, parse_networks
from docxy.admission.policy import ClientPolicy
from docxy.admission.ratelimit import RateLimiter, parse_rate, retry_after
from docxy.admission.tokens import TokenIssuer
from docxy.admission.users import Htpasswd, HtpasswdError, parse_htpasswd
from docxy.tap import Options, makeService

from ..fakes import Exchange, FakeResponse, FakeUpstream, hub_config, make_site

CHALLENGE = 'Bearer realm="https://auth.registry.test/token",service="registry.test"'
MANIFEST = b'{"schemaVersion":2}'


def basic(user, password):
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def refusals(metrics_registry, reason):
    return metrics_registry.get_sample_value("docxy_refusals_total", {"reason": reason}) or 0


# --- client networks ----------------------------------------------------------------------

def test_network_policy_deny_wins_and_allow_lists_restrict():
    policy = NetworkPolicy(
        allow=parse_networks(["10.0.0.0/8", "2001:db8::/32"], "allow"),
        deny=parse_networks(["10.6.0.0/16"], "deny"),
    )
    assert policy.permits("10.1.2.3") and policy.permits("2001:db8::1")
    assert not policy.permits("10.6.0.9")  # denied inside an allowed network
    assert not policy.permits("192.0.2.1")  # outside the allow list
    assert policy.permits("::ffff:10.1.2.3")  # IPv4 on a dual-stack socket
    assert NetworkPolicy().permits("203.0.113.7")  # no lists: everyone
    with pytest.raises(ValueError, match="'10.0.0.0/33' is not an IP network"):
        parse_networks(["10.0.0.0/33"], "--allow-net")


@pytest.mark.parametrize(
    "peer, forwarded, client",
    [
        ("127.0.0.1", ["198.51.100.7"], "198.51.100.7"),  # nginx on the same box
        ("127.0.0.1", ["6.6.6.6, 198.51.100.7"], "198.51.100.7"),  # the left one is a claim
        ("127.0.0.1", ["198.51.100.7, 10.0.0.2"], "198.51.100.7"),  # through two proxies
        ("127.0.0.1", [], "127.0.0.1"),
        ("127.0.0.1", ["not-an-ip"], "127.0.0.1"),
        ("203.0.113.9", ["198.51.100.7"], "203.0.113.9"),  # not a trusted proxy: ignored
    ],
)
def test_client_address_behind_trusted_proxies(peer, forwarded, client):
    policy = NetworkPolicy(trusted_proxies=parse_networks(["127.0.0.0/8", "10.0.0.0/8"], "t"))
    assert policy.client_address(peer, forwarded) == client


@pytest.mark.parametrize(
    "description, local",
    [
        ("tcp:5000:interface=127.0.0.1", True),
        ("tcp6:5000:interface=\\:\\:1", True),
        ("tcp:port=5000:interface=localhost", True),
        ("unix:/run/docxy.sock", True),
        ("tcp:5000", False),
        ("tcp:443:interface=0.0.0.0", False),
        ("tcp:443:interface=127.0.0.1.example.com", False),
        ("systemd:domain=INET:index=0", False),
    ],
)
def test_local_endpoints(description, local):
    assert is_local_endpoint(description) is local


# --- rate limits ------------------------------------------------------------------------------

def test_parse_rate():
    assert parse_rate("100/h") == (100, 3600.0)
    assert parse_rate("10/5m") == (10, 300.0)
    assert parse_rate(" 5 / s ") == (5, 1.0)
    for bad in ("0/h", "100", "100/y", "-1/s"):
        with pytest.raises(ValueError):
            parse_rate(bad)


def test_token_bucket_spends_refills_and_says_how_long_to_wait():
    clock = Clock()
    limiter = RateLimiter(3, 60.0, clock)  # 3 a minute: one every 20 s
    assert [limiter.take("a") for _ in range(3)] == [0, 0, 0]
    assert limiter.take("a") == pytest.approx(20.0)
    assert limiter.take("b") == 0  # another client has its own bucket
    clock.advance(10)
    assert limiter.take("a") == pytest.approx(10.0)  # a refused request spends nothing
    clock.advance(10)
    assert limiter.take("a") == 0
    assert retry_after(0.2) == 1 and retry_after(19.1) == 20


def test_buckets_are_bounded():
    limiter = RateLimiter(1, 60.0, Clock(), max_clients=100)
    for i in range(1000):
        limiter.take(f"client-{i}")
    assert len(limiter._buckets) == 100


# --- docxy's tokens ----------------------------------------------------------------------------

def test_tokens_name_their_user_and_expire():
    clock = Clock()
    issuer = TokenIssuer(clock, key=b"k" * 32, lifetime=300)
    token = issuer.issue("alice")
    assert issuer.verify(token) == "alice"
    assert TokenIssuer(clock, key=b"x" * 32).verify(token) is None  # another daemon's key
    payload, signature = token[4:].split(".")
    forged = "dx1." + base64.urlsafe_b64encode(b'{"u":"root","e":9999999999}').decode().rstrip("=")
    assert issuer.verify(f"{forged}.{signature}") is None
    assert issuer.verify("eyJhbGciOi.upstream.jwt") is None
    clock.advance(301)
    assert issuer.verify(token) is None


# --- the users file -----------------------------------------------------------------------

def _hash(password):
    return bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=4)).decode()


def _now(f):
    return defer.succeed(f())


def test_htpasswd_accepts_bcrypt_only():
    users = parse_htpasswd(f"# mirror users\n\nalice:{_hash('pw')}\n", "f")
    assert list(users) == ["alice"]
    for text, message in [
        ("alice:{SHA}abc=\n", "only bcrypt hashes"),
        ("alice:$apr1$x$y\n", "only bcrypt hashes"),
        ("no-colon\n", "expected user:hash"),
        ("# nobody\n", "has no users"),
    ]:
        with pytest.raises(HtpasswdError, match=message):
            parse_htpasswd(text, "f")


def test_htpasswd_checks_passwords_and_rereads_the_file(tmp_path):
    path = tmp_path / "users"
    path.write_text(f"alice:{_hash('wonderland')}\n")
    users = Htpasswd(str(path), _now)

    def verify(user, password):
        return defer.ensureDeferred(users.verify(user, password)).result

    assert verify("alice", "wonderland") is True
    assert verify("alice", "wrong") is False
    assert verify("mallory", "wonderland") is False
    path.write_text(f"alice:{_hash('wonderland')}\nbob:{_hash('builder')}\n")
    os.utime(path, ns=(1, 10**18))  # a different mtime even within the same tick
    assert verify("bob", "builder") is True  # added without a restart
    path.write_text("garbage\n")
    os.utime(path, ns=(1, 2 * 10**18))
    assert verify("bob", "builder") is True  # a broken file keeps the old users


# --- the resources with client authentication ----------------------------------------------

USERS = {"alice": "wonderland", "bob": "builder"}


def _upstream():
    def respond(method, url, headers, body):
        if url.endswith("/v2/"):
            return FakeResponse(401, {b"www-authenticate": CHALLENGE.encode()}, b"{}")
        if url.startswith("https://auth.registry.test/token"):
            return FakeResponse(200, {}, b'{"token":"docxy-own-upstream-token","expires_in":300}')
        return FakeResponse(200, {b"content-type": b"application/json"}, MANIFEST)

    return FakeUpstream(respond)


def _site(tmp_path, rate=None, **networks):
    path = tmp_path / "users"
    path.write_text("".join(f"{u}:{_hash(p)}\n" for u, p in USERS.items()))
    seen = {}

    def policy(metrics, clock):
        seen["metrics"] = metrics
        return ClientPolicy(
            NetworkPolicy(**{k: parse_networks(v, k) for k, v in networks.items()}),
            metrics,
            Htpasswd(str(path), _now),
            TokenIssuer(clock),
            RateLimiter(*rate, clock) if rate else None,
        )

    config = hub_config(upstream={"mirror_mode": True})
    site, upstream, clock = make_site(config, _upstream(), policy=policy)
    return site, upstream, seen["metrics"].registry


def _send(site, method, path, headers=(), body=b""):
    ex = Exchange(site)
    ex.send(method, path, list(headers), body)
    return ex.response()


def _login(site, user="alice"):
    status, _, body = _send(site, "GET", "/auth/token?service=docxy&scope=repository:x:pull",
                            [("Authorization", basic(user, USERS[user]))])
    assert status == 200
    return json.loads(body)["token"]


def test_v2_challenges_for_docxy_itself_and_never_asks_upstream(tmp_path):
    """With users, /v2/ answers docxy's own Bearer challenge; the upstream is not asked."""
    site, upstream, metrics = _site(tmp_path)
    status, headers, body = _send(site, "GET", "/v2/")
    assert status == 401
    assert headers[b"www-authenticate"] == [
        b'Bearer realm="http://127.0.0.1:5000/auth/token",service="docxy"'
    ]
    token = _login(site)
    status, _, _ = _send(site, "GET", "/v2/", [("Authorization", f"Bearer {token}")])
    assert status == 200
    assert upstream.calls == []
    assert refusals(metrics, "unauthorized") == 1


def test_login_with_basic_or_containerd_form(tmp_path):
    """docker login's Basic credentials and containerd's password grant get a docxy token;
    wrong or missing credentials get 401, and no upstream hears of it."""
    site, upstream, metrics = _site(tmp_path)
    status, headers, body = _send(site, "GET", "/auth/token?service=docxy",
                                  [("Authorization", basic("alice", "wonderland"))])
    answer = json.loads(body)
    assert status == 200 and answer["token"].startswith("dx1.") and answer["expires_in"] == 300
    assert headers[b"cache-control"] == [b"no-store"]
    form = b"grant_type=password&username=alice&password=wonderland&service=docxy&client_id=c"
    status, _, body = _send(site, "POST", "/auth/token",
                            [("Content-Type", "application/x-www-form-urlencoded")], form)
    assert status == 200 and json.loads(body)["access_token"].startswith("dx1.")
    for headers in ([("Authorization", basic("alice", "nope"))],
                    [("Authorization", basic("mallory", "wonderland"))], []):
        status, _, body = _send(site, "GET", "/auth/token?service=docxy", headers)
        assert status == 401 and json.loads(body)["errors"][0]["code"] == "UNAUTHORIZED"
    assert upstream.calls == []
    assert refusals(metrics, "login") == 3


def test_pulls_need_a_docxy_token_and_go_upstream_as_docxy(tmp_path):
    """A pull without docxy's token is challenged (with its scope, prefix included); with
    it, the pull goes upstream with docxy's own upstream token, never the client's."""
    site, upstream, _ = _site(tmp_path)
    status, headers, _ = _send(site, "GET", "/v2/docker.io/redis/manifests/7")
    assert status == 401 and upstream.calls == []
    assert b'scope="repository:docker.io/redis:pull"' in headers[b"www-authenticate"][0]
    token = _login(site)
    status, _, body = _send(site, "GET", "/v2/redis/manifests/7", [("Authorization", f"Bearer {token}")])
    assert status == 200 and body == MANIFEST
    pulls = [c for c in upstream.calls if "/manifests/" in c[1]]
    assert [c[2].getRawHeaders(b"authorization") for c in pulls] == [[b"Bearer docxy-own-upstream-token"]]
    status, _, _ = _send(site, "GET", "/v2/redis/manifests/7", [("Authorization", "Bearer dx1.forged.x")])
    assert status == 401


def test_denied_networks_get_403_but_health_answers(tmp_path):
    """A client outside the allowed networks is refused everywhere but /health, and the
    refusal is counted."""
    site, upstream, metrics = _site(tmp_path, allow=["10.0.0.0/8"])  # the test client is 127.0.0.1
    for path in ("/v2/", "/auth/token?service=docxy", "/v2/redis/manifests/7"):
        status, _, body = _send(site, "GET", path)
        assert status == 403 and json.loads(body)["errors"][0]["code"] == "DENIED"
    assert _send(site, "GET", "/health")[0] == 200
    assert upstream.calls == [] and refusals(metrics, "network") == 3


def test_forwarded_client_of_a_trusted_proxy_is_the_one_checked(tmp_path):
    site, _, _ = _site(tmp_path, deny=["198.51.100.0/24"], trusted_proxies=["127.0.0.1/32"])
    assert _send(site, "GET", "/v2/", [("X-Forwarded-For", "198.51.100.7")])[0] == 403
    assert _send(site, "GET", "/v2/", [("X-Forwarded-For", "192.0.2.1")])[0] == 401


def test_rate_limit_answers_429_with_retry_after(tmp_path):
    """Past the per-user rate, manifest requests get 429 TOOMANYREQUESTS with Retry-After;
    blobs are not counted; another user is not affected."""
    site, _, metrics = _site(tmp_path, rate=(3, 60.0))
    alice = [("Authorization", f"Bearer {_login(site, 'alice')}")]  # logins count per address
    bob = [("Authorization", f"Bearer {_login(site, 'bob')}")]
    assert _send(site, "GET", "/v2/redis/manifests/7", alice)[0] == 200
    assert _send(site, "HEAD", "/v2/redis/manifests/7", alice)[0] == 200
    assert _send(site, "GET", "/v2/redis/manifests/8", alice)[0] == 200
    assert _send(site, "GET", "/v2/redis/blobs/sha256:" + "a" * 64, alice)[0] == 200  # free
    status, headers, body = _send(site, "GET", "/v2/redis/manifests/7", alice)
    assert status == 429 and headers[b"retry-after"] == [b"20"]
    assert json.loads(body)["errors"][0]["code"] == "TOOMANYREQUESTS"
    assert _send(site, "GET", "/v2/redis/manifests/7", bob)[0] == 200
    assert refusals(metrics, "rate") == 1
    logins = [_send(site, "GET", "/auth/token?service=docxy",
                    [("Authorization", basic("bob", "builder"))])[0] for _ in range(2)]
    assert logins == [200, 429]  # the address's bucket: the third login fits, the fourth not


def test_a_warm_up_is_not_held_to_a_client_s_rate(tmp_path):
    """Requests of docxy's own warm-ups (docxy.admin.local) do not spend a client's budget:
    an operator's scheduled warm-up of many images is never refused with 429."""
    from types import SimpleNamespace

    from docxy.ops.metrics import Metrics

    policy = ClientPolicy(NetworkPolicy(), Metrics(), limiter=RateLimiter(1, 60.0, Clock()))
    warm = SimpleNamespace(docxy_warm=True, docxy_client="-", docxy_user=None)
    assert all([defer.ensureDeferred(policy.admit_rate(warm)).result for _ in range(5)])
    client = SimpleNamespace(docxy_warm=False, docxy_client="-", docxy_user=None)
    assert defer.ensureDeferred(policy.admit_rate(client)).result is True
    assert policy.limiter.take("-") > 0  # the client's budget is spent, not the warm-up's


# --- start-up ---------------------------------------------------------------------------------

def _start(argv, tmp_path):
    options = Options(environ={"XDG_CACHE_HOME": str(tmp_path)})
    options.parseOptions(argv + ["--no-cache"])
    return makeService(options, Clock())


def test_an_open_relay_does_not_start(tmp_path):
    """Without --htpasswd, a listener that is not loopback stops start-up with one line;
    loopback, --allow-anonymous or a users file let it start."""
    assert _start([], tmp_path)  # the default listener is 127.0.0.1:8080
    with pytest.raises(SystemExit) as info:
        _start(["--listen", "tcp:8080"], tmp_path)  # every interface
    message = str(info.value.code)
    assert message.startswith("docxy: tcp:8080 is not a loopback address") and "--allow-anonymous" in message
    assert _start(["--listen", "tcp:0:interface=127.0.0.1"], tmp_path)
    assert _start(["--listen", "tcp:0", "--allow-anonymous"], tmp_path)
    users = tmp_path / "users"
    users.write_text(f"alice:{_hash('pw')}\n")
    assert _start(["--listen", "tcp:0", "--htpasswd", str(users)], tmp_path)


def test_users_file_problems_and_contradictions_stop_start_up(tmp_path):
    bad = tmp_path / "users"
    bad.write_text("alice:plaintext\n")
    with pytest.raises(SystemExit, match="only bcrypt hashes"):
        _start(["--listen", "tcp:0", "--htpasswd", str(bad)], tmp_path)
    with pytest.raises(SystemExit, match="cannot read users file"):
        _start(["--listen", "tcp:0", "--htpasswd", str(tmp_path / "missing")], tmp_path)
    from twisted.python.usage import UsageError
    with pytest.raises(UsageError, match="contradict"):
        Options(environ={}).parseOptions(["--htpasswd", str(bad), "--allow-anonymous"])
    with pytest.raises(UsageError, match="--rate-limit"):
        Options(environ={}).parseOptions(["--rate-limit", "lots"])


def test_client_authentication_puts_every_upstream_in_mirror_mode(tmp_path):
    """docxy's users never see an upstream challenge: every registry is pulled as docxy."""
    users = tmp_path / "users"
    users.write_text(f"alice:{_hash('pw')}\n")
    options = Options(environ={"XDG_CACHE_HOME": str(tmp_path)})
    options.parseOptions(["--htpasswd", str(users), "--registry", "ghcr.io"])
    assert all(u.mirror_mode for u in options.config().upstreams)
    config_file = tmp_path / "docxy.toml"
    config_file.write_text('[upstream."ghcr.io"]\nmirror_mode = false\n')
    with pytest.raises(SystemExit, match="cannot be combined with client authentication"):
        _start(["--htpasswd", str(users), "--config", str(config_file)], tmp_path)
