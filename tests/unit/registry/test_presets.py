"""Declaring upstreams: presets, the TOML configuration file, and the options over it."""
import pytest

from docxy.registry.presets import (
    PRESETS,
    ConfigFileError,
    Upstream,
    build_upstream,
    check_distinct,
    parse_config,
    preset_for_url,
    read_config_file,
)
from docxy.tap import Options, makeService


def parse(argv, environ=None, tmp_path=None):
    environ = {"XDG_CACHE_HOME": "/nonexistent-docxy-test", **(environ or {})}
    options = Options(environ=environ)
    options.parseOptions(argv + ["--no-cache"])
    return options


def write(tmp_path, text):
    path = tmp_path / "docxy.toml"
    path.write_text(text)
    return str(path)


def test_presets_cover_the_registries_operators_ask_for():
    """Each preset is the registry's own URL; only docker.io adds library/."""
    assert set(PRESETS) == {
        "docker.io", "ghcr.io", "quay.io", "gcr.io", "registry.k8s.io", "mcr.microsoft.com"
    }
    assert PRESETS["docker.io"].url == "https://registry-1.docker.io"
    assert [n for n, u in PRESETS.items() if u.library] == ["docker.io"]
    for name, preset in PRESETS.items():
        assert preset.all_prefixes[0] == name and preset.all_names[0] == name


def test_a_one_line_table_enables_a_preset(tmp_path):
    """`[upstream."ghcr.io"]` with nothing in it mirrors ghcr.io with its preset; the
    default stays docker.io."""
    path = write(tmp_path, '[upstream."ghcr.io"]\n')
    config = parse(["--config", path]).config()
    assert [u.name for u in config.upstreams] == ["ghcr.io", "docker.io"]
    assert config.default_upstream == "docker.io"
    assert config.upstreams[0] == PRESETS["ghcr.io"]


def test_file_declares_every_setting_of_an_upstream(tmp_path):
    path = write(tmp_path, '''
default = "corp.example:5000"

[upstream."corp.example:5000"]
url = "https://registry.corp.example:5000/"
ca = "/etc/docxy/corp-ca.pem"
auth_realm = "https://auth.corp.example/token"
auth_service = "corp"
library = true
repositories = ["team/*", "base/**"]
names = ["registry.corp.example:5000"]
prefixes = ["corp"]
hosts = ["Corp.Mirror.Example"]

[upstream."quay.io"]
mirror_mode = true
credentials = "/etc/docxy/quay"
''')
    config = parse(["--config", path]).config()
    corp = config.default
    assert corp == Upstream(
        name="corp.example:5000",
        url="https://registry.corp.example:5000",
        ca="/etc/docxy/corp-ca.pem",
        auth_realm="https://auth.corp.example/token",
        auth_service="corp",
        library=True,
        repositories=("team/*", "base/**"),
        names=("registry.corp.example:5000",),
        prefixes=("corp",),
        hosts=("corp.mirror.example",),
    )
    quay = next(u for u in config.upstreams if u.name == "quay.io")
    assert quay.mirror_mode and quay.credentials == "/etc/docxy/quay"
    assert quay.url == "https://quay.io"


def test_command_line_wins_over_the_file_for_the_default(tmp_path):
    """--upstream and friends set the default upstream, over what the file says."""
    path = write(tmp_path, '[upstream."docker.io"]\nurl = "https://file.example"\nlibrary = false\n')
    config = parse(["--config", path, "--upstream", "https://cli.example", "--library"]).config()
    assert config.default.url == "https://cli.example" and config.default.library is True


def test_registry_option_and_environment(tmp_path):
    """--registry NAME enables a preset, NAME=URL declares any other; DOCXY_REGISTRIES
    and DOCXY_CONFIG do the same from the environment."""
    config = parse(["--registry", "quay.io", "--registry", "harbor.example=https://h.example/"]).config()
    assert [u.name for u in config.upstreams] == ["quay.io", "harbor.example", "docker.io"]
    assert config.upstreams[1].url == "https://h.example"
    path = write(tmp_path, '[upstream."gcr.io"]\n')
    config = parse([], {"DOCXY_REGISTRIES": "ghcr.io", "DOCXY_CONFIG": path}).config()
    assert sorted(u.name for u in config.upstreams) == ["docker.io", "gcr.io", "ghcr.io"]


def test_default_registry_and_preset_urls():
    """--default-registry picks the default; an --upstream URL of a preset means it."""
    config = parse(["--registry", "ghcr.io", "--default-registry", "ghcr.io"]).config()
    assert [u.name for u in config.upstreams] == ["ghcr.io"]
    assert preset_for_url("https://quay.io/") is PRESETS["quay.io"]
    assert preset_for_url("https://index.docker.io") is PRESETS["docker.io"]
    assert preset_for_url("https://127.0.0.1:5000") is None


def test_global_mirror_mode_applies_unless_a_table_says_otherwise(tmp_path):
    path = write(tmp_path, '[upstream."ghcr.io"]\nmirror_mode = false\n[upstream."quay.io"]\n')
    config = parse(["--config", path, "--mirror-mode"]).config()
    modes = {u.name: u.mirror_mode for u in config.upstreams}
    assert modes == {"ghcr.io": False, "quay.io": True, "docker.io": True}


@pytest.mark.parametrize(
    "text, message",
    [
        ("[upstream.ghcr.io]\n", 'quote names with dots, [upstream."ghcr.io"]'),
        ('[upstream."ghcr.io"]\nurl = 5\n', "url must be a non-empty string"),
        ('[upstream."ghcr.io"]\nurl = "ftp://x"\n', "must be an http:// or https:// URL"),
        ('[upstream."ghcr.io"]\nhost = ["a"]\n', "unknown key(s) host"),
        ('[upstream."ghcr.io"]\nlibrary = "yes"\n', "library must be true or false"),
        ('[upstream."ghcr.io"]\nhosts = "a.example"\n', "hosts must be a list of strings"),
        ('mirrors = 1\n', "unknown setting(s) mirrors"),
        ('default = 1\n', "default must be a string"),
        ('upstream = 1\n', "upstream must be tables"),
        ('[upstream."docker.io"]\nmax_age = 30\n', 'max_age is a string like "30d"'),
        ('[upstream."docker.io"]\nmax_age = "soon"\n', "max_age: a duration is like 30d"),
        ('[upstream."docker.io"]\nkeep = "library/*"\n', "keep must be a list of strings"),
        ('retention_interval = 60\n', 'retention_interval is a string like "1h"'),
        ('[[warm]]\nevery = "6h"\n', "images must be a non-empty list"),
        ('[[warm]]\nimages = ["alpine"]\n', "every is missing"),
        ('[[warm]]\nimages = ["alpine"]\nevery = "10s"\n', "every must be at least a minute"),
        ('[[warm]]\nimages = ["alpine"]\nevery = "1h"\nplatforms = ["linux"]\n',
         "platforms is a list like"),
        ('[[warm]]\nimages = ["alpine"]\nevery = "1h"\nhow = 1\n', "unknown key(s) how"),
        ('warm = 1\n', "warm must be tables"),
    ],
)
def test_bad_files_say_what_is_wrong(tmp_path, text, message):
    with pytest.raises(ConfigFileError) as info:
        read_config_file(write(tmp_path, text))
    assert message in str(info.value) and str(tmp_path) in str(info.value)


def test_unreadable_and_invalid_toml(tmp_path):
    with pytest.raises(ConfigFileError, match="cannot read configuration file"):
        read_config_file(str(tmp_path / "missing.toml"))
    with pytest.raises(ConfigFileError, match="is not valid TOML"):
        read_config_file(write(tmp_path, "[upstream\n"))


@pytest.mark.parametrize(
    "name, settings, message",
    [
        ("registry.corp", {}, "needs a url"),
        ("not a host", {"url": "https://x"}, "not a registry host name"),
        ("ghcr.io", {"prefixes": ("a/b",)}, "one repository name component"),
        ("ghcr.io", {"hosts": ("bad host",)}, "is not a host name"),
        ("ghcr.io", {"credentials": "/x"}, "only in mirror mode"),
    ],
)
def test_unusable_upstreams_are_refused(name, settings, message):
    with pytest.raises(ValueError, match=message):
        build_upstream(name, settings)


def test_two_upstreams_cannot_claim_the_same_word():
    """A name, prefix or host selects one upstream only."""
    ghcr = PRESETS["ghcr.io"]
    with pytest.raises(ValueError, match="'ghcr.io' is claimed by both ghcr.io and other.io"):
        check_distinct((ghcr, Upstream("other.io", "https://o", prefixes=("ghcr.io",))))
    with pytest.raises(ValueError, match="host 'm.example'"):
        check_distinct((
            Upstream("a.io", "https://a", hosts=("m.example",)),
            Upstream("b.io", "https://b", hosts=("m.example",)),
        ))


def test_repository_patterns():
    up = Upstream("a.io", "https://a", repositories=("library/*", "team/app"))
    assert up.allows("library/alpine") and up.allows("team/app")
    assert not up.allows("team/other") and not up.allows("evil/library/x")
    assert Upstream("b.io", "https://b").allows("anything/at/all")


def test_config_errors_stop_start_up_with_one_line(tmp_path):
    """A bad file or --registry stops twistd with `docxy: ...`, not a traceback."""
    for argv in (["--config", write(tmp_path, "[upstream.ghcr.io]\n")],
                 ["--registry", "nopreset.example"],
                 ["--registry", "x.example=ftp://x"]):
        with pytest.raises(SystemExit) as info:
            makeService(parse(argv))
        message = str(info.value.code)
        assert message.startswith("docxy: ") and "\n" not in message


def test_parse_config_keeps_table_order():
    settings = parse_config({"upstream": {"Quay.io": {}, "ghcr.io": {"hosts": ["G.Example"]}}})
    assert settings.upstreams == (("quay.io", {}), ("ghcr.io", {"hosts": ("g.example",)}))


def test_the_example_configuration_file_loads():
    """etc/docxy.toml, which operators copy, is valid and means what it says."""
    from pathlib import Path

    example = Path(__file__).resolve().parents[3] / "etc" / "docxy.toml"
    config = parse(["--config", str(example)]).config()
    assert [u.name for u in config.upstreams] == [
        "docker.io", "ghcr.io", "quay.io", "registry.k8s.io"
    ]
    assert config.default == PRESETS["docker.io"]


def test_retention_and_scheduled_warm_ups_from_the_file(tmp_path):
    settings = read_config_file(write(tmp_path, (
        'retention_interval = "15m"\n'
        '[upstream."docker.io"]\nmax_age = "30d"\nkeep = ["library/*", "Org/Keep"]\n'
        '[[warm]]\nimages = ["docker.io/library/alpine:3.20", "ghcr.io/org/app:1"]\n'
        'every = "6h"\nplatforms = ["linux/arm64"]\n'
        '[[warm]]\nimages = ["busybox"]\nevery = "1d"\n')))
    assert settings.retention_interval == 900
    assert dict(settings.upstreams)["docker.io"] == {"max_age": 30 * 86400,
                                                     "keep": ("library/*", "Org/Keep")}
    first, second = settings.warm
    assert first.images == ("docker.io/library/alpine:3.20", "ghcr.io/org/app:1")
    assert (first.every, first.platforms) == (6 * 3600, ("linux/arm64",))
    assert (second.every, second.platforms) == (86400, ())


@pytest.mark.parametrize("text,seconds", [("90s", 90), ("15m", 900), ("6h", 21600),
                                          ("30d", 2592000), ("2w", 1209600), ("45", 45),
                                          ("1.5h", 5400)])
def test_durations(text, seconds):
    from docxy.registry.units import parse_duration

    assert parse_duration(text) == seconds
