"""The exceptions of docxy.s3: `S3Error` for an answer S3 refused (with its HTTP status and
S3 error code), `S3Unreachable` when no answer came, `S3ConfigError` for a store setting or
credentials a person must fix."""
from __future__ import annotations


class S3Error(Exception):
    """S3 answered with an error (`status`, the S3 `code` such as "NoSuchKey") or could not
    be asked (`S3Unreachable`, status None).  Never carries credentials."""

    def __init__(self, status: int | None, code: str, message: str) -> None:
        super().__init__(f"S3 {status if status is not None else '-'} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message


class S3Unreachable(S3Error):
    """No answer: connection refused, name not resolved, connect or response timeout, or
    the connection broke before the answer was whole."""

    def __init__(self, message: str, code: str = "Unreachable") -> None:
        super().__init__(None, code, message)


class S3ConfigError(Exception):
    """A store URL or S3 credentials that cannot be used; the message says what to fix."""
