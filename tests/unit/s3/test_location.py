"""docxy.s3.location: the store URL split into bucket and prefix, and the S3 credentials
found in a file or the environment, with messages a person can act on and no key in them."""
from __future__ import annotations

import pytest

from docxy.s3.errors import S3ConfigError
from docxy.s3.location import parse_store_url, read_s3_credentials


@pytest.mark.parametrize("url, expected", [
    ("s3://bucket", ("bucket", "")),
    ("s3://bucket/", ("bucket", "")),
    ("s3://bucket/some/prefix", ("bucket", "some/prefix")),
    ("s3://bucket//some/prefix//", ("bucket", "some/prefix")),
    ("s3://my-bucket.example/docxy", ("my-bucket.example", "docxy")),
    ("S3://bucket/p", ("bucket", "p")),
    ("s3://b/p", ("b", "p")),  # short names are the service's to refuse, not docxy's
    ("s3://abc/a b/ü", ("abc", "a b/ü")),
])
def test_parse_store_url_splits_bucket_and_prefix(url, expected):
    """A valid URL gives its bucket and its prefix without slashes at either end."""
    assert parse_store_url(url) == expected


@pytest.mark.parametrize("url, says", [
    ("http://bucket/prefix", "must start with s3://"),
    ("bucket/prefix", "must start with s3://"),
    ("", "must start with s3://"),
    ("s3://", "no bucket name"),
    ("s3:///prefix", "no bucket name"),
    ("s3://Bucket/prefix", "lowercase letters"),
    ("s3://bu_cket", "lowercase letters"),
    ("s3://user@bucket", "lowercase letters"),
    ("s3://-bucket", "start and end"),
    ("s3://bucket-", "start and end"),
    ("s3://a..b", "lowercase letters"),
    ("s3://bucket/p?x=1", "query"),
])
def test_parse_store_url_refuses_bad_input_saying_why(url, says):
    """A bad URL is a ValueError whose message names what is wrong."""
    with pytest.raises(ValueError, match=says):
        parse_store_url(url)


@pytest.mark.parametrize("content", [
    "AKIDEXAMPLE:wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY",
    "AKIDEXAMPLE:wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY\n",
    "  AKIDEXAMPLE:wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY \r\n\n",
])
def test_credentials_file_gives_both_keys(tmp_path, content):
    """A file holding access_key:secret_key gives both keys, surrounding whitespace dropped."""
    path = tmp_path / "s3-credentials"
    path.write_text(content)
    env = {"AWS_ACCESS_KEY_ID": "envkey", "AWS_SECRET_ACCESS_KEY": "envsecret"}
    assert read_s3_credentials(str(path), env) == (
        "AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY")


def test_credentials_come_from_the_environment_without_a_file():
    """With no file, AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY are the keys."""
    env = {"AWS_ACCESS_KEY_ID": "envkey", "AWS_SECRET_ACCESS_KEY": "envsecret\n"}
    assert read_s3_credentials(None, env) == ("envkey", "envsecret")


@pytest.mark.parametrize("env, says", [
    ({}, "no S3 credentials"),
    ({"AWS_ACCESS_KEY_ID": ""}, "no S3 credentials"),
    ({"AWS_ACCESS_KEY_ID": "envkey"}, "AWS_SECRET_ACCESS_KEY is not set"),
    ({"AWS_SECRET_ACCESS_KEY": "envsecret"}, "AWS_ACCESS_KEY_ID is not set"),
])
def test_missing_credentials_say_what_to_set(env, says):
    """Without a file and without both variables, the error names what to provide."""
    with pytest.raises(S3ConfigError, match=says) as raised:
        read_s3_credentials(None, env)
    assert "envkey" not in str(raised.value) and "envsecret" not in str(raised.value)


@pytest.mark.parametrize("content", [
    "", "\n", "nocolon", ":secretonly", "keyonly:", "key:sec ret", "key part:secret",
])
def test_malformed_credentials_file_is_refused_without_showing_it(tmp_path, content):
    """A file that is not access_key:secret_key is an S3ConfigError that does not quote it."""
    path = tmp_path / "s3-credentials"
    path.write_text(content)
    with pytest.raises(S3ConfigError, match="access_key:secret_key") as raised:
        read_s3_credentials(str(path), {})
    for word in ("secretonly", "keyonly", "sec ret", "nocolon"):
        assert word not in str(raised.value)


def test_unreadable_credentials_file_names_the_file(tmp_path):
    """A file that cannot be read is an S3ConfigError naming it, not a fallback to env."""
    path = tmp_path / "missing"
    env = {"AWS_ACCESS_KEY_ID": "envkey", "AWS_SECRET_ACCESS_KEY": "envsecret"}
    with pytest.raises(S3ConfigError, match="cannot read the S3 credentials file .*missing"):
        read_s3_credentials(str(path), env)


def test_credentials_file_that_is_a_directory_is_refused(tmp_path):
    """A directory given as the credentials file is an S3ConfigError, not an OSError."""
    with pytest.raises(S3ConfigError, match="cannot read"):
        read_s3_credentials(str(tmp_path), {})
