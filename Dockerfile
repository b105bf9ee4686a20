# docxy in a container: a small image (python:3.11-slim), run as a non-root user, the
# cache in a volume, every setting from DOCXY_* environment variables.
#   docker build -t docxy .
#   docker run -d -p 8080:8080 -v docxy-cache:/var/cache/docxy \
#       -e DOCXY_ALLOW_ANONYMOUS=1 docxy
# compose.yaml is a complete example with TLS.

# The base: Debian with Python 3.11 whose `python -m venv` brings pip.  The test suite
# passes one of its own (--build-arg BASE=...) where the public image cannot be fetched.
ARG BASE=python:3.11-slim

# Stage 1: docxy and its dependencies in a virtual environment; only that is kept.
FROM ${BASE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml setup.cfg README.md ./
COPY docxy ./docxy
COPY twisted ./twisted
# twistd finds plugins through a cache file it writes next to them: write it here, since
# the docxy user cannot write there later (and would log that at every start).
RUN python -m venv /opt/docxy \
    && /opt/docxy/bin/pip install . \
    && /opt/docxy/bin/python -c "from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))"

FROM ${BASE}
ENV PATH=/opt/docxy/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
COPY --from=build /opt/docxy /opt/docxy
RUN groupadd --gid 10001 docxy \
    && useradd --uid 10001 --gid docxy --no-create-home --home-dir /var/cache/docxy \
        --shell /usr/sbin/nologin docxy \
    && install -d -o docxy -g docxy -m 0750 /var/cache/docxy \
    && install -d -m 0755 /etc/docxy

# Plain HTTP on 8080 (the API; with DOCXY_TLS set, only redirects and /health), HTTPS on
# 8443 with DOCXY_TLS=tcp:8443.  Ports above 1024 need no capability: publish them as 80
# and 443 (-p 443:8443) and set DOCXY_PUBLIC_URL to the URL clients use.  A listener
# that is not loopback needs DOCXY_HTPASSWD (docxy's users) or DOCXY_ALLOW_ANONYMOUS=1.
ENV DOCXY_LISTEN=tcp:8080 \
    DOCXY_CACHE_DIR=/var/cache/docxy \
    HEALTHCHECK_URL=http://127.0.0.1:8080/health
EXPOSE 8080 8443
VOLUME ["/var/cache/docxy"]
USER docxy
WORKDIR /var/cache/docxy

# Liveness from /health on the plain listener, with Python's urllib (no curl in the image).
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen(os.environ['HEALTHCHECK_URL'], timeout=4)"]

# SIGTERM (docker stop): no new connections; running pulls get DOCXY_STOP_TIMEOUT (30 s)
# to finish, so stop with `docker stop -t 40` (compose: stop_grace_period: 40s).
# SIGHUP (docker kill -s HUP): reload the certificate.
STOPSIGNAL SIGTERM
CMD ["twistd", "--nodaemon", "--pidfile=", "--logfile=-", "docxy"]
