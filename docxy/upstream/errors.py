"""The one exception for an upstream that could not be asked, or answered so that no
client can be given its answer; `status` and `code` make the client's registry error."""
from __future__ import annotations


class UpstreamError(Exception):
    """The upstream could not be asked; `status` and `code` make the client's error."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
