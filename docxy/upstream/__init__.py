"""Talking to upstreams.  proxy.py is what resources ask of one upstream registry (a pull, the
`/v2/` ping, a token request, a resume); auth.py gets and keeps its tokens; access.py
remembers what it allowed, for the cache.  Below them: the one HTTP client (client.py,
behind `IUpstreamClient` in interfaces.py, measured by measured.py) with its endpoints
(endpoints.py) and connection slots per host (slots.py); how bodies are read (bodies.py:
whole or not, small ones read, unwanted ones dropped, streamed ones timed by idle.py and
resumed after a cut); the error for an upstream that gave no usable answer (errors.py)."""
