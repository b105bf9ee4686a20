"""A small S3 client on Twisted: requests signed by botocore's SigV4 signer, sent by
Twisted's Agent so bodies stream both ways with backpressure (the shared store of a cluster)."""
