"""Running the daemon: metrics (metrics.py), the request log (logs.py), readiness
(readiness.py), graceful stop (lifecycle.py), certificate reload (certreload.py), TLS
material and upstream trust (tls.py) and systemd socket activation (activation.py)."""
