"""The node's one connection to Redis (txredisapi underneath): every call bounded by a
timeout, connectivity failures turned into ClusterUnavailable, up/down tracked and
reported, reconnection by itself.  What the keys mean lives in the modules that use it."""
from __future__ import annotations

import hashlib
from typing import Callable
from urllib.parse import unquote, urlsplit

import txredisapi
from twisted.internet import defer, error, task
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.logger import Logger
from zope.interface import implementer

log = Logger()

# Redis answers that mean "not usable now" rather than "wrong command".
_UNAVAILABLE_REPLIES = ("LOADING", "BUSY", "MASTERDOWN", "READONLY", "TRYAGAIN",
                        "CLUSTERDOWN", "NOAUTH", "WRONGPASS", "OOM")
# A caller's cancel (defer.CancelledError) is not one of them: it propagates.
_CONNECTIVITY = (txredisapi.ConnectionError, defer.TimeoutError, error.ConnectError,
                 error.ConnectionDone, error.ConnectionLost, OSError,
                 TimeoutError)

PING_INTERVAL = 1.0  # seconds between pings while down
IDLE_PING = 5.0  # while up, ping when nothing succeeded for this long


class ClusterUnavailable(Exception):
    """Redis did not answer (refused, lost, timed out, or not usable): run degraded."""


def parse_redis_url(url: str) -> tuple[str, int, int, str | None, str | None]:
    """`redis://[[user]:password@]host[:port][/db]` into (host, port, db, user, password);
    ValueError saying what is wrong otherwise."""
    try:
        parts = urlsplit(url)
        port = parts.port or 6379
    except ValueError as e:
        raise ValueError(f"bad Redis URL {url!r}: {e}") from None
    if parts.scheme != "redis":
        raise ValueError(f"a Redis URL is like redis://127.0.0.1:6379/0, not {url!r} "
                         "(only redis:// is supported)")
    if not parts.hostname:
        raise ValueError(f"the Redis URL {url!r} names no host")
    if parts.query or parts.fragment:
        raise ValueError(f"the Redis URL {url!r} has a query or fragment (not supported)")
    path = parts.path.strip("/")
    if path == "":
        db = 0
    elif path.isdigit():
        db = int(path)
    else:
        raise ValueError(f"the Redis URL {url!r}: the path is the database number, not {path!r}")
    user = unquote(parts.username) if parts.username else None
    password = unquote(parts.password) if parts.password is not None else None
    return parts.hostname, port, db, user, password


class _Factory(txredisapi.RedisFactory):
    """txredisapi's factory, telling the link when its connection comes and goes, and
    never giving up on reconnecting while the link runs."""

    initialDelay = 0.25
    maxDelay = 1.0  # retry at least every second, so that Redis coming back is seen soon

    link: "RedisLink"

    def addConnection(self, conn) -> None:
        super().addConnection(conn)
        if conn in self.pool:
            self.link._connected()

    def delConnection(self, conn) -> None:
        super().delConnection(conn)
        if not self.size:
            self.link._disconnected()

    def stopTrying(self):
        # The protocol calls this when AUTH or SELECT fails, also when that is only a
        # timeout or a connection lost mid-handshake (Redis restarting): txredisapi would
        # then never reconnect.  Only RedisLink.stop ends the link.
        if self.link._stopped:
            return super().stopTrying()
        return defer.succeed(None)

    def connectionError(self, why: str) -> None:
        # Instead of failing the (unused) "connected" Deferred of a lazy connection.
        self.link._problem = why


@implementer(IStreamClientEndpoint)
class _Endpoint:
    """Remembers why connecting failed, for the link's `why`."""

    def __init__(self, endpoint, link: "RedisLink") -> None:
        self._endpoint = endpoint
        self._link = link

    def __repr__(self) -> str:  # ClientService logs each retry with it
        return f"<Redis {self._link.host}:{self._link.port}>"

    def connect(self, factory):
        def failed(f):
            self._link._problem = f.getErrorMessage()
            return f

        return self._endpoint.connect(factory).addErrback(failed)


class RedisLink:
    def __init__(self, url: str, reactor, timeout: float = 2.0,
                 on_change: Callable[[bool, str], None] = lambda up, why: None) -> None:
        self.host, self.port, self.db, self._user, self._password = parse_redis_url(url)
        self.timeout = timeout
        self._reactor = reactor
        self._on_change = on_change
        self.up = False
        self.why = "not connected yet"
        self.errors = 0  # calls that failed for want of Redis
        self._factory: _Factory | None = None
        self._stopped = False
        self._settled = False  # a first call or ping succeeded or failed
        self._problem = ""  # the last connecting error txredisapi reported
        self._pinger: task.LoopingCall | None = None
        self._pinging: defer.Deferred | None = None
        self._last_ok = float("-inf")
        self._shas: dict[str, str] = {}  # script -> its SHA1

    def __repr__(self) -> str:
        return f"<RedisLink {self.host}:{self.port}/{self.db} {'up' if self.up else 'down'}>"

    # --- life ------------------------------------------------------------------------------
    def start(self) -> None:
        """Connect in the background (the first ping tells when Redis answers)."""
        if self._factory is not None:
            return
        self._stopped = False
        # No SELECT for database 0: one handshake step fewer that can fail.
        factory = _Factory(f"{self.host}:{self.port}", self.db or None, 1, isLazy=True,
                           password=self._password, username=self._user,
                           replyTimeout=self.timeout, convertNumbers=False)
        factory.link = self
        factory.reconnect = True
        self._factory = factory
        endpoint = txredisapi._makeEndpoint(self.host, self.port, self.timeout)
        factory.startConnecting(_Endpoint(endpoint, self))
        self._pinger = task.LoopingCall(self._tick)
        self._pinger.clock = self._reactor
        self._pinger.start(PING_INTERVAL, now=True)

    async def stop(self) -> None:
        """Close the connection and stop reconnecting; calls fail from now on."""
        self._stopped = True
        if self._pinger is not None and self._pinger.running:
            self._pinger.stop()
        self._pinger = None
        if self._pinging is not None and not self._pinging.called:
            self._pinging.cancel()
        factory, self._factory = self._factory, None
        if factory is not None:
            d = factory.disconnect()
            d.addTimeout(self.timeout, self._reactor)
            try:
                await d
            except Exception as e:  # noqa: BLE001 - closing is best effort
                log.debug("closing the Redis connection: {err!r}", err=e)
        self.up, self.why = False, "stopped"

    # --- calls -----------------------------------------------------------------------------
    async def call(self, command: str, *args: object):
        """One Redis command and its reply (strings as str, integers as int).  Raises
        ClusterUnavailable when Redis cannot be reached or does not answer within the
        timeout (at once while it is known to be down); other Redis errors (a wrong
        command) as txredisapi.ResponseError."""
        factory = self._factory
        if factory is None or self._stopped:
            raise ClusterUnavailable("the Redis link is not started")
        if not self.up and self._settled and not factory.size:
            # Known down and no connection: fail at once; the pinger sees Redis return.
            self.errors += 1
            raise ClusterUnavailable(f"Redis is unavailable: {self.why}")
        try:
            reply = await self._execute(factory, command, *args)
        except ClusterUnavailable as e:
            self.errors += 1
            self._failed(str(e))
            raise
        self._succeeded()
        return reply

    async def eval(self, script: str, keys: list, args: list):
        """Run a Lua script: EVALSHA, falling back to EVAL when Redis does not know it
        (the first time, after a restart); errors as for `call`."""
        sha = self._shas.get(script)
        if sha is None:
            sha = self._shas[script] = hashlib.sha1(script.encode()).hexdigest()
        try:
            return await self.call("EVALSHA", sha, len(keys), *keys, *args)
        except txredisapi.ResponseError as e:
            if not str(e).startswith("NOSCRIPT"):
                raise
        return await self.call("EVAL", script, len(keys), *keys, *args)

    async def _execute(self, factory: _Factory, command: str, *args: object):
        """execute_command bounded by the timeout; connectivity errors as ClusterUnavailable."""
        try:
            d = factory.handler.execute_command(command, *args)
            d.addTimeout(self.timeout, self._reactor)
            return await d
        except txredisapi.ResponseError as e:
            text = str(e)
            if text.split(" ", 1)[0].upper() in _UNAVAILABLE_REPLIES:
                raise ClusterUnavailable(f"Redis answers {text}") from None
            raise
        except _CONNECTIVITY as e:
            raise ClusterUnavailable(self._describe(e)) from None

    # --- state -----------------------------------------------------------------------------
    def _describe(self, e: BaseException) -> str:
        where = f"{self.host}:{self.port}"
        if isinstance(e, (defer.TimeoutError, TimeoutError)):
            problem = f" ({self._problem})" if self._problem and not self._factory_size() else ""
            return f"no answer from {where} within {self.timeout:g}s{problem}"
        return f"{where}: {e}"

    def _factory_size(self) -> int:
        return self._factory.size if self._factory is not None else 0

    def _succeeded(self) -> None:
        self._settled = True
        self._problem = ""
        self._last_ok = self._reactor.seconds()
        if not self.up:
            self._change(True, "")

    def _failed(self, why: str) -> None:
        self._settled = True
        if self.up:
            self._change(False, why)
        elif not self._stopped:
            self.why = why

    def _change(self, up: bool, why: str) -> None:
        if self._stopped:
            return
        was, self.up, self.why = self.up, up, why
        if up == was:
            return
        if up:
            log.info("Redis at {where} answers", where=f"{self.host}:{self.port}/{self.db}")
        else:
            log.warn("Redis at {where} is unavailable ({why}): running degraded",
                     where=f"{self.host}:{self.port}/{self.db}", why=why)
        try:
            self._on_change(up, why)
        except Exception:  # noqa: BLE001 - a listener must not break the link
            log.failure("on_change of the Redis link")

    def _connected(self) -> None:
        if not self._stopped and not self.up:
            self._ping()

    def _disconnected(self) -> None:
        if not self._stopped and self.up:
            self._change(False, f"lost the connection to {self.host}:{self.port}")

    def _tick(self) -> None:
        if not self.up or self._reactor.seconds() - self._last_ok >= IDLE_PING:
            self._ping()

    def _ping(self) -> None:
        if self._pinging is not None and not self._pinging.called:
            return
        self._pinging = defer.ensureDeferred(self._ping_once())
        self._pinging.addErrback(lambda f: f.trap(defer.CancelledError) and None)

    async def _ping_once(self) -> None:
        factory = self._factory
        if factory is None or self._stopped:
            return
        try:
            # Not through call(): this one waits for the connection even while down,
            # and a failed ping is not a failed call.
            await self._execute(factory, "PING")
        except ClusterUnavailable as e:
            if not self._stopped:
                self._failed(str(e))
        except Exception as e:  # noqa: BLE001 - a Redis answer all the same
            log.debug("ping answered {err}", err=str(e))
            self._succeeded()
        else:
            self._succeeded()
