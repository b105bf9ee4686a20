"""Running the daemon: metrics, logs, readiness, graceful stop, certificate reload, TLS material
and systemd socket activation."""
