"""The command line, the environment and the wiring of `twistd docxy`."""
import tempfile

import pytest
from cryptography.hazmat.primitives import serialization
from harness.pki import CertificateAuthority
from twisted.internet.task import Clock
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python import usage

from docxy.service import endpoint_port
from docxy.tap import Options, makeService, parse_size
from docxy.upstream.auth import CredentialsError, read_credentials
from docxy.web.site import DocxySite

_SCRATCH = tempfile.mkdtemp(prefix="docxy-tap-")


def parse(argv, environ=None):
    # the default cache directory goes to a scratch place, never to the real ~/.cache
    environ = {"XDG_CACHE_HOME": _SCRATCH, **(environ or {})}
    options = Options(environ=environ)
    options.parseOptions(argv)
    return options


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
    root = CertificateAuthority.create_root(d)
    inter = root.issue_intermediate()
    return {
        "ec": inter.issue_server("ec", ["mirror.example.com"], key_type="ec"),
        "rsa": root.issue_server("rsa", ["mirror.example.com"], key_type="rsa"),
        "dir": d,
    }


def test_defaults_listen_on_8080_and_hub():
    """With neither --listen nor --tls docxy serves the API on 127.0.0.1:8080 for Docker Hub."""
    config = parse([]).config()
    assert config.listen == ("tcp:8080:interface=127.0.0.1",) and config.tls == ()
    assert [u.name for u in config.upstreams] == ["docker.io"]
    assert config.default.url == "https://registry-1.docker.io"
    assert config.default.library is True


def test_repeatable_listen_and_options():
    config = parse(
        [
            "--listen", "tcp:5000:interface=127.0.0.1",
            "--listen", "tcp:5001:interface=127.0.0.1",
            "--upstream", "https://ghcr.io/",
            "--public-url", "https://m.example.com/",
            "--server-name", "M.example.com",
            "--idle-timeout", "5",
        ]
    ).config()
    assert config.listen == ("tcp:5000:interface=127.0.0.1", "tcp:5001:interface=127.0.0.1")
    # a preset's URL mirrors that preset: ghcr.io is the default, without library/
    assert config.default.name == "ghcr.io" and config.default.url == "https://ghcr.io"
    assert config.default.library is False and len(config.upstreams) == 1
    assert config.public_url == "https://m.example.com"
    assert config.server_names == ("m.example.com",)
    assert config.idle_timeout == 5.0


def test_environment_fills_in_and_command_line_wins(certs):
    env = {
        "DOCXY_LISTEN": "tcp:1 tcp:2",
        "DOCXY_UPSTREAM": "https://env.example",
        "CERT_PATH": str(certs["ec"].chain_path),
        "KEY_PATH": str(certs["ec"].key_path),
        "DOCXY_TLS": "tcp:3",
        "DOCXY_MIRROR_MODE": "yes",
        "DOCXY_LIBRARY": "1",
        "DOCXY_HEADER_TIMEOUT": "7",
    }
    config = parse(["--upstream", "https://cli.example"], env).config()
    assert config.listen == ("tcp:1", "tcp:2") and config.tls == ("tcp:3",)
    assert config.default.name == "docker.io" and config.default.url == "https://cli.example"
    assert config.cert_path == str(certs["ec"].chain_path)
    assert config.default.mirror_mode and config.default.library is True
    assert config.header_timeout == 7.0


@pytest.mark.parametrize(
    "argv, env, message",
    [
        (["--tls", "tcp:5443"], {}, "--tls needs --cert and --key"),
        (["--upstream", "ftp://x"], {}, "--upstream must be an http"),
        (["--public-url", "https://x/?a=b"], {}, "must not have a query"),
        (["--idle-timeout", "0"], {}, "--idle-timeout must be a positive"),
        (["--upstream-credentials", "/x"], {}, "only with --mirror-mode"),
        (["--library", "--no-library"], {}, "contradict"),
        ([], {"DOCXY_MIRROR_MODE": "maybe"}, "DOCXY_MIRROR_MODE must be"),
        ([], {"DOCXY_IDLE_TIMEOUT": "soon"}, "DOCXY_IDLE_TIMEOUT must be a number"),
        (["extra"], {}, "unexpected arguments"),
        (["--accel-redirect", "/_blobs", "--no-cache"], {}, "needs the cache"),
        (["--accel-redirect", "_blobs"], {}, "is not a URL path"),
        ([], {"DOCXY_ACCEL_REDIRECT": "/a b"}, "is not a URL path"),
        (["--admin-listen", "tcp:5002"], {}, "is not a loopback address"),
        ([], {"DOCXY_ADMIN_LISTEN": "tcp:5002:interface=0.0.0.0"}, "give --admin-htpasswd"),
        (["--admin-htpasswd", "/etc/docxy/admins"], {}, "needs --admin-listen"),
    ],
)
def test_bad_options_are_usage_errors(argv, env, message):
    """Bad options stop start-up with a message a person can act on."""
    with pytest.raises(usage.UsageError, match=message.replace("?", r"\?")):
        parse(argv, env)


@pytest.mark.parametrize(
    "description, port",
    [("tcp:5443:interface=127.0.0.1", 5443), ("tcp:port=443", 443), ("8443", 8443),
     ("systemd:domain=INET:index=0", None), ("unix:/run/docxy.sock", None)],
)
def test_endpoint_port(description, port):
    assert endpoint_port(description) == port


def _services(options):
    return list(makeService(options, reactor=Clock()))


def test_tls_wiring_sends_plain_listeners_to_https(certs):
    """--tls endpoints serve the API under TLS; --listen endpoints only redirect."""
    options = parse(
        [
            "--tls", "tcp:5443:interface=127.0.0.1",
            "--listen", "tcp:5080:interface=127.0.0.1",
            "--cert", str(certs["ec"].chain_path),
            "--key", str(certs["ec"].key_path),
        ]
    )
    services = _services(options)
    tls, plain = services[0], services[1]
    assert isinstance(tls.factory, TLSMemoryBIOFactory)
    assert isinstance(tls.factory.wrappedFactory, DocxySite)
    assert isinstance(plain.factory, DocxySite)
    assert plain.factory is not tls.factory.wrappedFactory
    assert "HTTPSRedirect" in repr(plain.factory.resource._fallback)


def test_plain_wiring_serves_the_api():
    services = _services(parse(["--listen", "tcp:5000:interface=127.0.0.1"]))
    assert isinstance(services[0].factory, DocxySite)
    assert b"/v2/" in services[0].factory.resource._prefixes


@pytest.mark.parametrize("kind, key_attr", [("ec", "key_path"), ("rsa", "key_path"), ("ec", "pkcs8_key_path"), ("rsa", "pkcs8_key_path")])
def test_every_key_form_loads(certs, kind, key_attr):
    """EC (SEC1), RSA (PKCS#1) and PKCS#8 keys load with their certificate."""
    server = certs[kind]
    head = getattr(server, key_attr).read_bytes().splitlines()[0]
    assert head in (b"-----BEGIN EC PRIVATE KEY-----", b"-----BEGIN RSA PRIVATE KEY-----", b"-----BEGIN PRIVATE KEY-----")
    options = parse(["--tls", "tcp:0:interface=127.0.0.1", "--cert", str(server.chain_path), "--key", str(getattr(server, key_attr))])
    assert _services(options)


def test_whole_chain_is_offered(certs):
    """Every certificate of a fullchain file is sent: the intermediate rides along."""
    from docxy.ops.tls import ServerTLS

    server = ServerTLS(str(certs["ec"].chain_path), str(certs["ec"].key_path))
    assert len(server.chain) == 2
    assert len(server.options.extraCertChain) == 1
    assert "mirror.example.com" in server.names() and "127.0.0.1" in server.names()


def _start_error(capsys, argv):
    with pytest.raises(SystemExit) as info:
        _services(parse(argv))
    message = str(info.value.code)
    assert message.startswith("docxy: ") and "\n" not in message
    return message


def test_missing_certificate_is_one_clear_line(certs, capsys):
    message = _start_error(capsys, ["--tls", "tcp:0:interface=127.0.0.1", "--cert", "/nonexistent.pem", "--key", str(certs["ec"].key_path)])
    assert "cannot read certificate file /nonexistent.pem" in message


def test_mismatched_key_is_one_clear_line(certs, capsys):
    message = _start_error(capsys, ["--tls", "tcp:0:interface=127.0.0.1", "--cert", str(certs["ec"].chain_path), "--key", str(certs["rsa"].key_path)])
    assert "does not match" in message


def test_encrypted_key_is_one_clear_line(certs, capsys, tmp_path):
    key = serialization.load_pem_private_key(certs["ec"].key_path.read_bytes(), None)
    encrypted = tmp_path / "enc.key"
    encrypted.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                            serialization.BestAvailableEncryption(b"pw")))
    message = _start_error(capsys, ["--tls", "tcp:0:interface=127.0.0.1", "--cert", str(certs["ec"].chain_path), "--key", str(encrypted)])
    assert "encrypted" in message


def test_garbage_certificate_is_one_clear_line(certs, capsys, tmp_path):
    bad = tmp_path / "bad.pem"
    bad.write_text("not a certificate")
    message = _start_error(capsys, ["--tls", "tcp:0:interface=127.0.0.1", "--cert", str(bad), "--key", str(certs["ec"].key_path)])
    assert "holds no PEM certificate" in message


def test_credentials_file_forms(tmp_path):
    plain = tmp_path / "plain"
    plain.write_text("bob:s3cret:with:colons\n")
    assert read_credentials(str(plain)) == ("bob", "s3cret:with:colons")
    js = tmp_path / "js"
    js.write_text('{"username": "amy", "password": "pw"}')
    assert read_credentials(str(js)) == ("amy", "pw")
    bad = tmp_path / "bad"
    bad.write_text("nocolon")
    with pytest.raises(CredentialsError, match="username:password"):
        read_credentials(str(bad))
    with pytest.raises(CredentialsError, match="cannot read"):
        read_credentials(str(tmp_path / "missing"))


def test_unreadable_credentials_stop_startup(capsys, tmp_path):
    message = _start_error(capsys, ["--mirror-mode", "--upstream-credentials", str(tmp_path / "none")])
    assert "cannot read upstream credentials file" in message


def test_cache_is_on_by_default_in_the_xdg_or_systemd_directory():
    """With no option the cache lives in systemd's CacheDirectory, else the XDG cache dir."""
    assert parse([], {"XDG_CACHE_HOME": "/x/cache"}).config().cache_dir == "/x/cache/docxy"
    assert parse([], {"CACHE_DIRECTORY": "/var/cache/docxy"}).config().cache_dir == "/var/cache/docxy"
    assert parse(["--cache-dir", "/srv/c"]).config().cache_dir == "/srv/c"
    assert parse(["--no-cache"]).config().cache_dir is None
    assert parse([], {"DOCXY_NO_CACHE": "1"}).config().cache_dir is None


@pytest.mark.parametrize("text, size", [("123", 123), ("500M", 500 * 2**20), ("20G", 20 * 2**30),
                                        ("1.5T", int(1.5 * 2**40)), ("10GiB", 10 * 2**30), ("64kb", 64 * 1024)])
def test_sizes(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("argv, message", [
    (["--cache-max-size", "lots"], "cannot read a size"),
    (["--no-cache", "--cache-dir", "/x"], "contradicts"),
    (["--tag-ttl", "-1"], "must not be negative"),
])
def test_bad_cache_options(argv, message):
    with pytest.raises(usage.UsageError, match=message):
        parse(argv)


def test_unusable_cache_dir_is_one_clear_line(capsys, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    message = _start_error(capsys, ["--cache-dir", str(blocker / "cache")])
    assert "cannot use cache directory" in message


def test_accel_redirect_reaches_the_config():
    """--accel-redirect (or DOCXY_ACCEL_REDIRECT) becomes the config's prefix, without a
    trailing slash."""
    assert parse(["--accel-redirect", "/_docxy_blobs/"]).config().accel_redirect == "/_docxy_blobs"
    assert parse([], {"DOCXY_ACCEL_REDIRECT": "/x"}).config().accel_redirect == "/x"
    assert parse([]).config().accel_redirect is None


# --- the shared store and the cluster -----------------------------------------------------

_CLUSTER = ["--cluster", "redis://127.0.0.1:6379/0", "--cluster-secret", "/etc/docxy/key",
            "--node-listen", "tcp:5001:interface=127.0.0.1", "--node-url", "http://10.0.0.5:5001"]


@pytest.mark.parametrize("argv, message", [
    (["--store", "http://bucket"], "--store"),
    (["--store", "s3://"], "--store"),
    (["--store", "s3://b/p", "--no-cache"], "first level"),
    (["--s3-endpoint", "http://127.0.0.1:7480"], "need --store"),
    (["--cluster", "redis://127.0.0.1:6379/0"], "--cluster-secret and --node-listen and --node-url"),
    (["--cluster", "http://127.0.0.1:6379"], "Redis URL"),
    (_CLUSTER + ["--no-cache"], "--no-cache"),
    (["--node-url", "http://10.0.0.5:5001"], "need --cluster"),
    (_CLUSTER + ["--lease-ttl", "0.5"], "--lease-ttl"),
])
def test_bad_cluster_options_are_usage_errors(argv, message):
    """A store or cluster setting that cannot work stops docxy with a line saying why."""
    with pytest.raises(usage.UsageError, match=message.replace("-", r"\-")):
        parse(argv).config()


def test_cluster_options_from_command_line_environment_and_file(tmp_path):
    """Every cluster option comes from the command line, else DOCXY_*, else the TOML
    file's key of the same name."""
    config_file = tmp_path / "docxy.toml"
    config_file.write_text('store = "s3://from-file/p"\ns3_endpoint = "http://127.0.0.1:7480"\n'
                           'cluster = "redis://file:6379/0"\ncluster_secret = "/file/key"\n'
                           'node_listen = "tcp:5001"\nnode_url = "http://file:5001"\n'
                           'lease_ttl = 7\n')
    config = parse(["--config", str(config_file), "--node-url", "http://cli:5001"],
                   {"DOCXY_CLUSTER": "redis://env:6379/1", "AWS_REGION": "eu-west-1"}).config()
    assert config.store == "s3://from-file/p"
    assert config.s3_endpoint == "http://127.0.0.1:7480"
    assert config.cluster == "redis://env:6379/1"
    assert config.cluster_secret == "/file/key"
    assert config.node_listen == "tcp:5001"
    assert config.node_url == "http://cli:5001"
    assert config.s3_region == "eu-west-1"
    assert config.lease_ttl == 7.0
    plain = parse([]).config()
    assert plain.store is None and plain.cluster is None


def test_admin_options_and_the_file_s_tools_reach_the_config(tmp_path):
    users = tmp_path / "admins"
    users.write_text("ops:$2b$12$abcdefghijklmnopqrstuuMQ0oPD1kEoKQ0o0Hh6fKZzJkqWTuv3u\n")
    config = tmp_path / "docxy.toml"
    config.write_text('retention_interval = "10m"\n[[warm]]\nimages = ["alpine"]\n'
                      'every = "1h"\n')
    options = parse(["--admin-listen", "tcp:5002", "--admin-htpasswd", str(users),
                     "--config", str(config)])
    built = options.config()
    assert (built.admin_listen, built.admin_htpasswd) == ("tcp:5002", str(users))
    assert built.retention_interval == 600 and built.warm[0].images == ("alpine",)
    local = parse([], {"DOCXY_ADMIN_LISTEN": "tcp:5002:interface=127.0.0.1"}).config()
    assert local.admin_listen == "tcp:5002:interface=127.0.0.1" and local.admin_htpasswd is None


def test_warm_ups_and_retention_need_the_cache(tmp_path):
    config = tmp_path / "docxy.toml"
    config.write_text('[upstream."docker.io"]\nmax_age = "30d"\n')
    with pytest.raises(usage.UsageError, match="need the cache"):
        parse(["--no-cache", "--config", str(config)]).config()
