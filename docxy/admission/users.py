"""The mirror's own users, from an htpasswd-style file of `user:bcrypt-hash` lines (what
`htpasswd -B` writes).  The file is re-read when it changes, so users are added without a
restart; passwords are checked in a thread, so bcrypt's deliberate slowness never stalls
the reactor."""
from __future__ import annotations

import os
from typing import Awaitable, Callable

import bcrypt
from twisted.logger import Logger

log = Logger()

_BCRYPT_PREFIXES = ("$2a$", "$2b$", "$2y$")
# Checked against when the user is unknown, so that a wrong name costs as long as a
# wrong password and does not tell which users exist.
_DUMMY_HASH = bcrypt.hashpw(b"docxy", bcrypt.gensalt(rounds=10))


class HtpasswdError(Exception):
    """A users file that cannot be used; the message is shown as it is."""


def parse_htpasswd(text: str, path: str) -> dict[str, bytes]:
    """`user:hash` lines (blank lines and `#` comments allowed) into user -> hash."""
    users: dict[str, bytes] = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        user, sep, hashed = line.partition(":")
        if not sep or not user:
            raise HtpasswdError(f"{path} line {number}: expected user:hash")
        if not hashed.startswith(_BCRYPT_PREFIXES):
            raise HtpasswdError(
                f"{path} line {number}: only bcrypt hashes are accepted (htpasswd -B)"
            )
        users[user] = hashed.encode("ascii", "replace")
    if not users:
        raise HtpasswdError(f"{path} has no users")
    return users


def _read(path: str) -> tuple[dict[str, bytes], tuple]:
    try:
        st = os.stat(path)
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise HtpasswdError(f"cannot read users file {path}: {e}") from None
    return parse_htpasswd(text, path), (st.st_ino, st.st_mtime_ns, st.st_size)


class Htpasswd:
    """The users of one file.  `run_in_thread(f)` runs `f` off the reactor and returns an
    awaitable of its result (twisted.internet.threads.deferToThread in the daemon)."""

    def __init__(self, path: str, run_in_thread: Callable[[Callable[[], bool]], Awaitable[bool]]) -> None:
        self.path = path
        self._run = run_in_thread
        self._users, self._stamp = _read(path)

    def _refresh(self) -> None:
        try:
            st = os.stat(self.path)
        except OSError:
            return  # keep the users we have; a file being replaced comes back
        if (st.st_ino, st.st_mtime_ns, st.st_size) == self._stamp:
            return
        try:
            self._users, self._stamp = _read(self.path)
            log.info("users file {path} re-read: {n} users", path=self.path, n=len(self._users))
        except HtpasswdError as e:
            log.error("users file not re-read, the old users stay: {err}", err=str(e))

    def knows(self, user: str) -> bool:
        self._refresh()
        return user in self._users

    async def verify(self, user: str, password: str) -> bool:
        """Whether `password` is `user`'s."""
        self._refresh()
        hashed = self._users.get(user)
        secret = password.encode("utf-8")
        if hashed is None:
            await self._run(lambda: bcrypt.checkpw(secret, _DUMMY_HASH))
            return False
        try:
            return bool(await self._run(lambda: bcrypt.checkpw(secret, hashed)))
        except ValueError:  # a malformed hash in the file
            log.error("users file {path}: the hash of {user} is malformed", path=self.path, user=user)
            return False
