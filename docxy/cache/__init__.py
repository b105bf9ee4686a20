"""The pull-through cache: blob answers (blobs.py: hit, join a download, or start the one
upstream download) and manifest answers with tags (manifests.py), over a store of verified
blobs behind `IBlobStore` (interfaces.py; store.py keeps them on local disk).  A cache
download is a `docxy.stream` Download with a file (fill.py)."""
