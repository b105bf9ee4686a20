"""Run a private nginx: its own prefix, config, pid file and logs in a work directory.

Started in the foreground (`-g 'daemon off;'`) as a `ManagedProcess`; it never reads or
touches /etc/nginx or the system service. `NginxProcess` takes the body of the `http {}`
block; the common settings (temp paths, logs, MIME default) are filled in here.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from .procs import ManagedProcess, wait_for_port, wait_for_port_closed

NGINX_BINARY = shutil.which("nginx") or "/usr/sbin/nginx"

# One JSON object per request; `auth` says whether an Authorization header was present,
# never its value. `completion` is "OK" when the whole response was sent.
JSON_LOG_FORMAT = (
    "log_format harness_json escape=json '{"
    '"time":"$time_iso8601","remote":"$remote_addr","host":"$host",'
    '"method":"$request_method","uri":"$request_uri","request":"$request",'
    '"status":$status,"body_bytes_sent":$body_bytes_sent,"bytes_sent":$bytes_sent,'
    '"completion":"$request_completion","auth":"$harness_auth_present",'
    '"range":"$http_range","user_agent":"$http_user_agent",'
    '"request_time":$request_time'
    "}';"
)


class NginxProcess:
    """One nginx master (+1 worker) with its config in `workdir`; listens on `port`."""

    def __init__(self, name: str, workdir: Path, port: int, http_body: str,
                 interface: str = "127.0.0.1") -> None:
        self.name = name
        self.workdir = Path(workdir)
        self.port = port
        self.interface = interface
        self.http_body = http_body
        self.conf_path = self.workdir / "nginx.conf"
        self.access_log_path = self.workdir / "access.log"
        self.error_log_path = self.workdir / "error.log"
        self.process: ManagedProcess | None = None

    def config_text(self) -> str:
        d = self.workdir
        # Workers run as root only when we are root: tmp dirs from pytest are 0700.
        user = "user root;\n" if os.geteuid() == 0 else ""
        return f"""{user}worker_processes 1;
pid {d}/nginx.pid;
error_log {self.error_log_path} info;
events {{ worker_connections 1024; }}
http {{
    default_type application/octet-stream;
    client_body_temp_path {d}/tmp/client;
    proxy_temp_path {d}/tmp/proxy;
    fastcgi_temp_path {d}/tmp/fastcgi;
    uwsgi_temp_path {d}/tmp/uwsgi;
    scgi_temp_path {d}/tmp/scgi;
    sendfile on;
    tcp_nopush on;
    keepalive_timeout 65;
    server_tokens off;
    map $http_authorization $harness_auth_present {{ "" no; default yes; }}
    {JSON_LOG_FORMAT}
    access_log {self.access_log_path} harness_json;
{self.http_body}
}}
"""

    def start(self, timeout: float = 30.0) -> "NginxProcess":
        if self.process is not None and self.process.running():
            raise RuntimeError(f"{self.name} is already running")
        (self.workdir / "tmp").mkdir(parents=True, exist_ok=True)
        self.conf_path.write_text(self.config_text())
        self.process = ManagedProcess(
            self.name,
            [NGINX_BINARY, "-p", str(self.workdir), "-c", str(self.conf_path),
             "-e", str(self.error_log_path), "-g", "daemon off;"],
            self.workdir / "nginx.out")
        self.process.start()
        wait_for_port(self.interface, self.port, timeout, self.process)
        return self

    def stop(self) -> None:
        if self.process is not None:
            # SIGTERM is nginx's fast shutdown: open connections are closed at once.
            self.process.stop()
            self.process = None
            wait_for_port_closed(self.interface, self.port)

    def running(self) -> bool:
        return self.process is not None and self.process.running()

    def access_log_lines(self) -> list[str]:
        try:
            return self.access_log_path.read_text(errors="replace").splitlines()
        except FileNotFoundError:
            return []

    def __enter__(self) -> "NginxProcess":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def accel_front_locations(docxy_port: int, cache_dir, prefix: str) -> str:
    """The `server {}` body of an nginx in front of a docxy started with
    `--accel-redirect prefix`, as the README configures it: everything is proxied to docxy,
    and the internal location sends docxy's cache files (re-adding Docker-Content-Digest,
    which nginx drops on an internal redirect)."""
    return f"""
        proxy_buffering off;
        proxy_http_version 1.1;
        proxy_set_header Connection "";
        location / {{
            proxy_pass http://127.0.0.1:{docxy_port};
            proxy_set_header Host $http_host;
        }}
        location {prefix}/ {{
            internal;
            alias {cache_dir}/blobs/;
            default_type application/octet-stream;
            add_header Docker-Content-Digest $upstream_http_docker_content_digest always;
        }}"""
