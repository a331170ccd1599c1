"""A real, throw-away `redis-server` for tests: free loopback port, temp dir, no persistence.

    with RedisServer() as server:
        url = server.url                  # redis://127.0.0.1:<port>/0

`redis-server` must be on PATH. Without it the tests that need it are skipped, unless the
environment sets `DS2OAI_REQUIRE_REDIS=1` (CI does), which turns the skip into a failure so a
missing server cannot silently hide the Redis tests. Stopping terminates the process, waits for
it (killing it after `stop_timeout`) and removes the temp dir: nothing is left running.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

import pytest

__all__ = ["RedisServer", "free_port", "require_redis_server"]

REQUIRE_ENV = "DS2OAI_REQUIRE_REDIS"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def require_redis_server() -> str:
    """The path of `redis-server`; skips the calling test (or fails, under CI) without it."""
    path = shutil.which("redis-server")
    if path is None:
        message = "redis-server is not on PATH (apt-get install redis-server)"
        if os.environ.get(REQUIRE_ENV) == "1":
            pytest.fail(f"{message}, and {REQUIRE_ENV}=1")
        pytest.skip(message)
    return path


def ping(port: int, password: str | None = None, timeout: float = 0.5) -> bool:
    """True when a Redis server on 127.0.0.1:`port` answers PING (raw RESP, no client library)."""
    command = b"PING\r\n"
    if password is not None:
        secret = password.encode()
        command = b"*2\r\n$4\r\nAUTH\r\n$%d\r\n%s\r\n" % (len(secret), secret) + command
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
            sock.sendall(command)
            lines = 1 if password is None else 2  # +OK to AUTH, then +PONG
            reply = b""
            while reply.count(b"\r\n") < lines:
                chunk = sock.recv(256)
                if not chunk:
                    return False
                reply += chunk
            return reply.endswith(b"+PONG\r\n")
    except OSError:
        return False


class RedisServer:
    """A `redis-server` child process; use as a context manager, or `start()` / `stop()`."""

    def __init__(
        self,
        *,
        password: str | None = None,
        startup_timeout: float = 10.0,
        stop_timeout: float = 10.0,
    ) -> None:
        self.password = password
        self.startup_timeout = startup_timeout
        self.stop_timeout = stop_timeout
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self._tmp: tempfile.TemporaryDirectory[str] | None = None

    @property
    def url(self) -> str:
        auth = "" if self.password is None else f":{self.password}@"
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    @property
    def log_path(self) -> Path:
        assert self._tmp is not None
        return Path(self._tmp.name) / "redis.log"

    def start(self) -> None:
        executable = require_redis_server()
        self._tmp = tempfile.TemporaryDirectory(prefix="ds2oai-redis-")
        try:
            # The port is free when we look; another process may take it before redis binds,
            # in which case redis exits at once and we try another.
            for _attempt in range(5):
                if self._launch(executable, free_port()):
                    return
            raise RuntimeError(f"redis-server did not start; log:\n{self._log_tail()}")
        except BaseException:
            self.stop()
            raise

    def _launch(self, executable: str, port: int) -> bool:
        assert self._tmp is not None
        self.port = port
        auth = [] if self.password is None else ["--requirepass", self.password]
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [
                    executable,
                    "--port",
                    str(port),
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--dir",
                    self._tmp.name,
                    "--daemonize",
                    "no",
                    *auth,
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.proc = None
                return False
            if ping(port, self.password):
                return True
            time.sleep(0.02)
        raise RuntimeError(
            f"redis-server on port {port} did not answer PING within {self.startup_timeout} s;"
            f" log:\n{self._log_tail()}"
        )

    def _log_tail(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-2000:]
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=self.stop_timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        tmp, self._tmp = self._tmp, None
        if tmp is not None:
            tmp.cleanup()

    def __enter__(self) -> RedisServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
