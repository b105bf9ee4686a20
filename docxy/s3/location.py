"""Where the shared store is and who docxy is to it: `parse_store_url` splits
"s3://bucket/prefix", `read_s3_credentials` finds the access and secret key (a file of
"access_key:secret_key", else the AWS_* environment variables)."""
from __future__ import annotations

import re
from typing import Mapping

from docxy.s3.errors import S3ConfigError

__all__ = ["S3ConfigError", "parse_store_url", "read_s3_credentials"]

_BUCKET = re.compile(r"[a-z0-9](?:[a-z0-9.-]*[a-z0-9])?")
ACCESS_ENV = "AWS_ACCESS_KEY_ID"
SECRET_ENV = "AWS_SECRET_ACCESS_KEY"


def parse_store_url(url: str) -> tuple[str, str]:
    """("bucket", "some/prefix") from "s3://bucket/some/prefix"; the prefix has no leading
    or trailing slash and may be "".  ValueError, saying what is wrong, for anything else."""
    if not isinstance(url, str) or not url[:5].lower() == "s3://":
        raise ValueError(f"store URL {url!r} must start with s3:// (s3://bucket/prefix)")
    rest = url[5:]
    if "?" in rest or "#" in rest:
        raise ValueError(f"store URL {url!r} must not have a query or fragment")
    bucket, _, prefix = rest.partition("/")
    if not bucket:
        raise ValueError(f"store URL {url!r} has no bucket name (s3://bucket/prefix)")
    if not _BUCKET.fullmatch(bucket) or ".." in bucket:
        raise ValueError(
            f"bucket name {bucket!r} may only hold lowercase letters, digits, '.' and '-', "
            "and must start and end with a letter or digit")
    return bucket, prefix.strip("/")


def read_s3_credentials(path: str | None, environ: Mapping[str, str]) -> tuple[str, str]:
    """(access_key, secret_key) from the file at `path` ("access_key:secret_key"), or, with
    no path, from AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY.  S3ConfigError otherwise;
    no message ever shows a key."""
    if path:
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError) as e:
            reason = e.strerror if isinstance(e, OSError) and e.strerror else type(e).__name__
            raise S3ConfigError(f"cannot read the S3 credentials file {path}: {reason}") from None
        access, sep, secret = text.strip().partition(":")
        access, secret = access.strip(), secret.strip()
        if not sep or not access or not secret or any(c.isspace() for c in access + secret):
            raise S3ConfigError(
                f"the S3 credentials file {path} must hold one line 'access_key:secret_key'")
        return access, secret
    access = environ.get(ACCESS_ENV, "").strip()
    secret = environ.get(SECRET_ENV, "").strip()
    if access and secret:
        return access, secret
    if access or secret:
        missing = SECRET_ENV if access else ACCESS_ENV
        raise S3ConfigError(f"{missing} is not set (S3 credentials need both {ACCESS_ENV} "
                            f"and {SECRET_ENV}, or a credentials file)")
    raise S3ConfigError(
        "no S3 credentials: give a credentials file holding 'access_key:secret_key', "
        f"or set {ACCESS_ENV} and {SECRET_ENV}")
