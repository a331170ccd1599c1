"""Shared fixtures: the real mock upstream process, the fault-injecting upstream, the gateway.

The gateway runs in-process on a real socket (pytest-aiohttp's `aiohttp_server`, which enables
handler cancellation as `ds2oai serve` does); upstreams are a real uvicorn process running
`mock_upstream/` or the raw-asyncio `FaultUpstream`. Clients are plain aiohttp sessions.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from ds2oai import http1
from ds2oai.chain import Exchange
from ds2oai.config import Config, Secret, config_from_mapping
from ds2oai.server import create_app
from tests.fault_upstream import FaultUpstream

ROOT = Path(__file__).resolve().parent.parent

GatewayFactory = Callable[..., Awaitable[TestServer]]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextlib.contextmanager
def blackholed_port() -> Iterator[int]:
    """A loopback port whose connects neither succeed nor fail: its listener's accept queue is
    full, so the kernel drops further SYNs (a host that has gone silent)."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port: int = listener.getsockname()[1]
        fillers = [socket.socket() for _ in range(2)]
        try:
            for filler in fillers:
                filler.setblocking(False)
                with contextlib.suppress(BlockingIOError):
                    filler.connect(("127.0.0.1", port))
            yield port
        finally:
            for filler in fillers:
                filler.close()


def start_serve(
    args: Sequence[str],
    upstream_url: str,
    log_path: Path,
    *,
    cwd: Path = ROOT,
    ignore_hangup: bool = False,
) -> subprocess.Popen[bytes]:
    """`ds2oai serve *args` as a real process, stdout and stderr into `log_path`, the upstream
    from the environment and no `DS2OAI_CONFIG` from the one running the tests;
    `ignore_hangup`: started as `nohup` starts it."""
    env = {**os.environ, "UPSTREAM_BASE_URL": upstream_url}
    env.pop("DS2OAI_CONFIG", None)
    command = [sys.executable, "-m", "ds2oai", "serve", *args]
    if ignore_hangup:
        command = ["nohup", *command]
    with log_path.open("wb") as out:
        return subprocess.Popen(
            command,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=cwd,
        )


def wait_http(url: str, proc: subprocess.Popen[bytes] | None = None, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before {url} answered")
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except (urllib.error.URLError, OSError):
            time.sleep(0.05)
    raise RuntimeError(f"{url} did not answer within {timeout} s")


@pytest.fixture(scope="session")
def mock_upstream_url() -> Iterator[str]:
    """The bundled mock upstream, started as its README says (uvicorn), on a free port."""
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "mock_deepseek_sse:app",
            "--app-dir",
            str(ROOT / "mock_upstream"),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--log-level",
            "critical",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(url + "/", proc)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def make_exchange(**changes: Any) -> Exchange:
    """A streamed spec-dialect exchange for the default model; `changes` replace fields."""
    exchange = Exchange(
        request_id="req-1",
        route="spec",
        dialect="spec",
        stream=True,
        exposed_model="deepseek-chat",
        client_body={},
        upstream_body={"model": "deepseek-chat", "messages": [], "stream": True},
    )
    return dataclasses.replace(exchange, **changes)


def make_config(upstream_url: str, **sections: dict[str, Any]) -> Config:
    """A config for tests: fast retries by default, any section overridable."""
    data: dict[str, Any] = {
        "upstream": {"base_url": upstream_url, "read_timeout": 5.0, "connect_timeout": 2.0},
        "retry": {"base_delay": 0.01, "max_delay": 0.05, "deadline": 10.0},
        "store": {"backend": "memory"},
    }
    for name, values in sections.items():
        data[name] = {**data.get(name, {}), **values}
    return config_from_mapping(data)


@pytest.fixture
async def pool() -> AsyncIterator[http1.Pool]:
    """The upstream HTTP client on its own (tests of `http1` and of the splice)."""
    p = http1.Pool(limit=8, keepalive=30.0)
    try:
        yield p
    finally:
        await p.close()


@pytest.fixture
async def fault_upstream() -> AsyncIterator[FaultUpstream]:
    async with FaultUpstream() as upstream:
        yield upstream


@pytest.fixture
def gateway(aiohttp_server: Any) -> GatewayFactory:
    """`await gateway(upstream_url, retry={...}, ...)` -> a started TestServer."""

    async def start(
        upstream_url: str, *, api_key: str = "", **sections: dict[str, Any]
    ) -> TestServer:
        config = make_config(upstream_url, **sections)
        if api_key:
            upstream = dataclasses.replace(config.upstream, api_key=Secret(api_key))
            config = dataclasses.replace(config, upstream=upstream)
        server: TestServer = await aiohttp_server(create_app(config))
        return server

    return start


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        yield session


def pytest_configure(config: pytest.Config) -> None:
    os.environ.pop("DS2OAI_CONFIG", None)


CLIENT_KEY = "sk-test-client-key"


@pytest.fixture(scope="session")
def served_gateway(
    mock_upstream_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """`ds2oai serve` as a real process in front of the mock upstream; yields its base URL.

    Needed where the client is synchronous (the official SDK's `OpenAI`), which would block an
    in-process gateway's event loop.
    """
    tmp = tmp_path_factory.mktemp("served")
    config = tmp / "gateway.toml"
    config.write_text(
        f'[auth]\napi_keys = ["{CLIENT_KEY}"]\n'
        "[retry]\nbase_delay = 0.01\nmax_delay = 0.02\n"
        f'[store]\ndata_dir = "{tmp / "data"}"\n'
        '[responses]\nsecret = "test-sealing-secret"\n'
        '[models]\naliases = { "gpt-4.1-compatible" = "deepseek-chat" }\n'
    )
    port = free_port()
    env = {**os.environ, "UPSTREAM_BASE_URL": mock_upstream_url, "DS2OAI_CONFIG": str(config)}
    env.pop("DEEPSEEK_API_KEY", None)
    log = open(tmp / "gateway.log", "wb")  # noqa: SIM115 - closed in finally
    proc = subprocess.Popen(
        [sys.executable, "-m", "ds2oai", "serve", "--host", "127.0.0.1", "--port", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        cwd=ROOT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(url + "/healthz", proc)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()
