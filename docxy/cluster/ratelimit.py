"""The clients' rate budget shared by every node: one token bucket per client in a Redis
hash, spent and refilled by one Lua script on Redis's clock.  Without Redis each node
falls back to its own docxy.admission.ratelimit.RateLimiter; parsing rates lives there."""
from __future__ import annotations

from twisted.logger import Logger

from docxy.admission.ratelimit import RateLimiter
from docxy.cluster.link import ClusterUnavailable, RedisLink

log = Logger()

# KEYS[1] the client's bucket; ARGV capacity, period (s).  Returns the wait as a string
# (Lua numbers would come back truncated to integers).
_TAKE = """
if redis.replicate_commands then pcall(redis.replicate_commands) end
local capacity = tonumber(ARGV[1])
local period = tonumber(ARGV[2])
local rate = capacity / period
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local state = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens = tonumber(state[1]) or capacity
local since = tonumber(state[2]) or now
local elapsed = now - since
if elapsed < 0 then elapsed = 0 end
tokens = math.min(capacity, tokens + elapsed * rate)
local wait = 0
if tokens >= 1 then
  tokens = tokens - 1
else
  wait = (1 - tokens) / rate
end
redis.call('HSET', KEYS[1], 'tokens', string.format('%.17g', tokens),
           'ts', string.format('%.17g', now))
redis.call('PEXPIRE', KEYS[1], math.ceil(period * 2000))
return string.format('%.17g', wait)
"""


class SharedRateLimiter:
    """RateLimiter's contract (`take`), with the bucket in Redis."""

    def __init__(self, link: RedisLink, capacity: int, period: float, local: RateLimiter,
                 prefix: str = "docxy:") -> None:
        self.capacity = capacity
        self.period = period
        self.local = local
        self._link = link
        self.prefix = prefix
        self.degraded = False  # the last take fell back to the local bucket

    def key(self, client: str) -> str:
        return f"{self.prefix}rate:{client}"

    async def take(self, client: str) -> float:
        """Spend one request of `client`'s shared bucket: 0 if it may go ahead, else how
        many seconds until it may (nothing is spent then).  Without Redis, the node's own
        bucket answers."""
        try:
            answer = await self._link.eval(_TAKE, [self.key(client)],
                                           [self.capacity, repr(float(self.period))])
            wait = max(0.0, float(answer))
        except ClusterUnavailable as e:
            if not self.degraded:
                log.warn("rate limits are per node while Redis is unavailable ({err})",
                         err=str(e))
                self.degraded = True
            return self.local.take(client)
        except Exception:  # noqa: BLE001 - a broken script must not refuse every client
            log.failure("the shared rate limit failed; using this node's")
            return self.local.take(client)
        if self.degraded:
            log.info("rate limits are shared by the cluster again")
            self.degraded = False
        return wait
