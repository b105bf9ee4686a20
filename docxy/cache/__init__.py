"""The pull-through cache: a content-addressed blob store on disk (store.py), downloads that
fill it while clients follow the bytes as they arrive (fill.py), and the producer that sends
a stored or growing file to a client (follow.py)."""
