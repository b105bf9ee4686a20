"""A Docker-Hub-like upstream built from real parts, on 127.0.0.1, for tests and benchmarks.

`harness.upstream.Upstream` composes everything: a test CA (`pki`), a token service
(`tokenserver`), the CNCF distribution registry behind an nginx TLS front (`registry`,
`front`, `tagpager`), an nginx "CDN" for blob redirects (`cdn`) and pushed test images
(`images`). Each module does one job and can be used on its own.
"""
