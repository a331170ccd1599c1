"""nginx (Debian's package) as the reference streaming relay of the benchmark.

`NginxRelay.start()` writes an `nginx.conf` into a temporary prefix directory — one worker
process, `proxy_buffering off`, `proxy_http_version 1.1` with a keep-alive upstream pool,
`access_log off` — and runs `nginx -p <tmp> -c nginx.conf -g 'daemon off;'` under `taskset`
on the cores given (the gateway's core, so both relays get the same CPU). The benchmark skips
nginx with a note when no binary is found.
"""

# ruff: noqa: S603  (fixed argv: the nginx/git binary found on PATH and constant arguments)

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

__all__ = ["NginxRelay", "find_nginx", "nginx_version", "render_config"]

_CANDIDATES = ("/usr/sbin/nginx", "/usr/local/sbin/nginx", "/usr/local/nginx/sbin/nginx")


def find_nginx() -> str | None:
    found = shutil.which("nginx")
    if found:
        return found
    for candidate in _CANDIDATES:
        if os.access(candidate, os.X_OK):
            return candidate
    return None


def nginx_version(binary: str) -> str:
    try:
        out = subprocess.run(
            [binary, "-v"], capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    text = (out.stderr or out.stdout).strip()
    return text.split("version:", 1)[-1].strip() or "unknown"


def render_config(prefix: Path, port: int, upstream_port: int) -> str:
    return f"""\
worker_processes 1;
worker_rlimit_nofile 65536;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;

events {{
    worker_connections 16384;
    multi_accept on;
}}

http {{
    access_log off;
    client_body_temp_path {prefix}/client_body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    keepalive_requests 1000000;
    keepalive_timeout 300s;

    upstream emulator {{
        server 127.0.0.1:{upstream_port};
        keepalive 4096;
        keepalive_requests 1000000;
        keepalive_timeout 300s;
    }}

    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{
            proxy_pass http://emulator;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_read_timeout 300s;
        }}
    }}
}}
"""


class NginxRelay:
    def __init__(self, binary: str, port: int, upstream_port: int) -> None:
        self.binary = binary
        self.port = port
        self.upstream_port = upstream_port
        self.proc: subprocess.Popen[bytes] | None = None
        self._tmp: tempfile.TemporaryDirectory[str] | None = None

    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

    def start(self, cores: Sequence[int] | None) -> subprocess.Popen[bytes]:
        self._tmp = tempfile.TemporaryDirectory(prefix="ds2oai-bench-nginx-")
        prefix = Path(self._tmp.name)
        for sub in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
            (prefix / sub).mkdir()
        conf = prefix / "nginx.conf"
        conf.write_text(render_config(prefix, self.port, self.upstream_port), encoding="utf-8")
        argv = [
            self.binary,
            "-p",
            str(prefix),
            "-e",
            str(prefix / "error.log"),
            "-c",
            str(conf),
            "-g",
            "daemon off;",
        ]
        taskset = shutil.which("taskset")
        if cores and taskset:
            argv = [taskset, "-c", ",".join(map(str, cores)), *argv]
        self.proc = subprocess.Popen(
            argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=prefix
        )
        return self.proc

    def error_log(self) -> str:
        if self._tmp is None:
            return ""
        path = Path(self._tmp.name) / "error.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        proc = self.proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)  # fast shutdown of master and worker
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        self.proc = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None
