"""Talking to upstreams: the one HTTP client (client.py), how their bodies are read
(bodies.py: whole or not, small ones read, unwanted ones dropped, streamed ones timed and
resumed after a cut), connection slots per upstream host (slots.py), and the error for an
upstream that gave no usable answer (errors.py)."""
