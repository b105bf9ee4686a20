"""Certificate reload without a restart: a context factory that hands every new TLS
connection the current certificate, and a service that swaps it on SIGHUP or when the
certificate or key file changes.  Loading and checking the files is `docxy.ops.tls`'s job."""
from __future__ import annotations

import os
import signal
from typing import Callable

from twisted.application import service
from twisted.internet.interfaces import IOpenSSLContextFactory
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from zope.interface import implementer

from docxy.ops.tls import ServerTLS, TLSConfigError

log = Logger(namespace="docxy.tls")


def file_stamp(path: str) -> tuple[int, int, int, int, int] | None:
    """The device, inode, size, mtime and ctime of `path`, or None if it cannot be stat'ed:
    a file replaced (inode), rewritten in place (size, mtime) or made readable (ctime
    changes on chmod and chown) gets a new stamp."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def describe(tls: ServerTLS) -> str:
    """One line naming a loaded certificate: its names, expiry and serial number."""
    leaf = tls.chain[0]
    expiry = getattr(leaf, "not_valid_after_utc", None) or leaf.not_valid_after
    until = expiry.strftime("%Y-%m-%d %H:%M:%SZ")
    return f"{','.join(tls.names()) or '-'} until {until} serial {leaf.serial_number:x}"


@implementer(IOpenSSLContextFactory)
class CurrentCertificate:
    """The TLS context factory of every HTTPS listener.  TLSMemoryBIOFactory asks it for a
    context once per new connection, so a swap reaches new connections only; open ones
    keep the context (and certificate) they were made with."""

    def __init__(self, tls: ServerTLS) -> None:
        self.tls = tls

    def getContext(self):
        return self.tls.options.getContext()

    def swap(self, tls: ServerTLS) -> None:
        self.tls = tls


class CertificateReloader(service.Service):
    """Reloads the certificate and key into `current` on SIGHUP and whenever their files
    change (polled every `interval` seconds; 0 polls never).  A file that does not load
    (unreadable, no certificate, a key that does not match, half-written) is logged and the
    certificate in use stays; a later change to either file is tried again."""

    def __init__(
        self,
        current: CurrentCertificate,
        cert_path: str,
        key_path: str,
        reactor,
        interval: float = 60.0,
        load: Callable[[str, str], ServerTLS] = ServerTLS,
        install_signal: bool = True,
    ) -> None:
        self.current = current
        self.cert_path = cert_path
        self.key_path = key_path
        self.reactor = reactor
        self.interval = interval
        self._load = load
        self._install_signal = install_signal
        self._loop: LoopingCall | None = None
        self._previous_handler = None
        # The stamps of the files last tried, loaded or not: a bad file is reported once,
        # not at every poll, and tried again as soon as it changes.
        self._tried = self._stamps()

    def _stamps(self):
        return (file_stamp(self.cert_path), file_stamp(self.key_path))

    def startService(self) -> None:
        super().startService()
        if self.interval > 0:
            self._loop = LoopingCall(self.check)
            self._loop.clock = self.reactor
            self._loop.start(self.interval, now=False).addErrback(
                lambda f: log.failure("docxy: certificate check failed", f))
        if self._install_signal:
            self._previous_handler = signal.signal(signal.SIGHUP, self._on_sighup)
        log.info(
            "docxy: serving certificate {certificate}; reloaded on SIGHUP{poll}",
            certificate=describe(self.current.tls),
            poll=f" and on change (checked every {self.interval:g}s)" if self.interval > 0 else "",
        )

    def stopService(self) -> None:
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
        if self._install_signal:
            signal.signal(signal.SIGHUP, self._previous_handler or signal.SIG_DFL)
            self._previous_handler = None

    def _on_sighup(self, signum, frame) -> None:
        # A signal handler runs between two bytecodes of whatever the reactor is doing:
        # hand the work to the reactor (callFromThread is safe here and wakes it up).
        self.reactor.callFromThread(self.reload, "SIGHUP")
        if callable(self._previous_handler):
            self._previous_handler(signum, frame)

    def check(self) -> None:
        """Reload if either file changed since it was last tried."""
        if self._stamps() != self._tried:
            self.reload("file change")

    def reload(self, reason: str) -> bool:
        """Load the files now; swap the certificate if they are good.  True if swapped."""
        self._tried = self._stamps()
        try:
            tls = self._load(self.cert_path, self.key_path)
        except TLSConfigError as e:
            log.error(
                "docxy: certificate reload ({reason}) failed, still serving the old "
                "certificate {certificate}: {error}",
                reason=reason, error=str(e), certificate=describe(self.current.tls),
            )
            return False
        except Exception as e:  # a reload must never take the daemon down
            log.failure(
                "docxy: certificate reload ({reason}) failed, still serving the old "
                "certificate: {error}", reason=reason, error=str(e),
            )
            return False
        # Reading both files can straddle a renewal (new key, old certificate): the pair was
        # checked to match, and a later change is seen by the next check.
        self.current.swap(tls)
        log.info("docxy: certificate reloaded ({reason}): {certificate}",
                 reason=reason, certificate=describe(tls))
        return True
