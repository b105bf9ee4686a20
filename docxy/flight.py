"""Single flight: concurrent callers asking for the same key share one piece of work."""
from __future__ import annotations

from typing import Any, Callable, Coroutine, Hashable

from twisted.internet import defer
from twisted.python.failure import Failure


class SingleFlight:
    """Runs one coroutine per key at a time; every caller gets its own Deferred with the
    shared result.  Cancelling one caller's Deferred does not cancel the shared work."""

    def __init__(self) -> None:
        self._waiters: dict[Hashable, list[defer.Deferred]] = {}

    def running(self, key: Hashable) -> bool:
        return key in self._waiters

    def run(self, key: Hashable, make: Callable[[], Coroutine[Any, Any, Any]]) -> defer.Deferred:
        waiter: defer.Deferred = defer.Deferred()
        waiting = self._waiters.get(key)
        if waiting is not None:
            waiting.append(waiter)
            return waiter
        self._waiters[key] = [waiter]

        def finish(result: Any) -> None:
            for w in self._waiters.pop(key, []):
                if w.called:  # cancelled by its caller
                    continue
                if isinstance(result, Failure):
                    w.errback(result)
                else:
                    w.callback(result)

        defer.Deferred.fromCoroutine(make()).addBoth(finish)
        return waiter
