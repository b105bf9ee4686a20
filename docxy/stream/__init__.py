"""The one way bytes stream to clients.  An upstream body is a `Download` (download.py): it
keeps its newest bytes in a bounded window in memory and, for the cache, also hands them to
a `FileSink` (sink.py) that writes and hashes them off the reactor.  Each client is a
`Follower` (follower.py): it takes bytes from the window while it keeps up and from the
file when it lags, at its own pace.  Without a file (`--no-cache`, manifests, errors) the
same pair is the relay: the slowest follower holds the upstream back.  clients.py says
whether a client request is still there and how to cut it."""
