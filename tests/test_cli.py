"""`ds2oai serve` and `ds2oai check-config` as real processes."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import resource
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import aiohttp
import pytest

from ds2oai.metrics import FLUSH_INTERVAL
from mock_upstream.mock_deepseek_sse import NORMAL_TEXT
from tests.conftest import ROOT, free_port, start_serve, wait_http
from tests.sse_client import parse_events, spec_text

UPSTREAM_KEY = "sk-upstream-PLANTED-7f3a9c"
CLIENT_KEY = "client-PLANTED-b81e44"
# A served gateway's logs go to files, never to a pipe read only at the end: a full pipe
# (about 300 access-log lines) blocks the worker writing to it, and every later request
# routed to that worker hangs. A bounded client timeout turns any such hang into a failure.
CLIENT_TIMEOUT = aiohttp.ClientTimeout(total=30)


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ds2oai", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
        cwd=ROOT,
    )


def test_check_config_accepts_the_example_file() -> None:
    result = run_cli("check-config", str(ROOT / "ds2oai.example.toml"))
    assert result.returncode == 0, result.stderr
    assert "ok" in result.stdout


def test_check_config_names_the_bad_key(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[retry]\nmax_retrys = 3\n")
    result = run_cli("check-config", str(bad))
    assert result.returncode == 1
    assert result.stderr.startswith(f"{bad}: retry.max_retrys")


def test_check_config_blames_the_environment_for_its_own_errors(tmp_path: Path) -> None:
    good = tmp_path / "good.toml"
    good.write_text("")
    result = run_cli("check-config", str(good), env={"PORT": "abc"})
    assert result.returncode == 1
    assert result.stderr.strip() == "environment: PORT: expected an integer"


def test_check_config_names_a_missing_file_once(tmp_path: Path) -> None:
    missing = tmp_path / "missing.toml"
    result = run_cli("check-config", str(missing))
    assert result.returncode == 1
    assert result.stderr == f"{missing}: no such config file\n"


def test_check_config_names_a_bad_chain_entry(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[middleware]\nchain = ["auth", "nosuch.module:Thing", "reframe"]\n')
    result = run_cli("check-config", str(bad))
    assert result.returncode == 1
    assert "nosuch.module:Thing" in result.stderr


def test_serve_refuses_to_start_on_a_bad_config(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[upstream]\nread_timeout = 'soon'\n")
    result = run_cli("serve", "--port", str(free_port()), "--config", str(bad))
    assert result.returncode == 2
    assert "upstream.read_timeout" in result.stderr


def test_python_dash_m_and_console_script_agree() -> None:
    script = Path(sys.executable).parent / "ds2oai"
    result = subprocess.run(
        [str(script), "--version"], capture_output=True, text=True, timeout=30, check=True
    )
    assert result.stdout.startswith("ds2oai ")
    assert run_cli("--version").stdout == result.stdout


async def test_served_gateway_streams_and_never_logs_keys(
    tmp_path: Path, mock_upstream_url: str
) -> None:
    config = tmp_path / "gw.toml"
    config.write_text(f'[auth]\napi_keys = ["{CLIENT_KEY}"]\n')
    port = free_port()
    env = {
        **os.environ,
        "UPSTREAM_BASE_URL": mock_upstream_url,
        "DEEPSEEK_API_KEY": UPSTREAM_KEY,
        "DS2OAI_CONFIG": str(config),
    }
    out_path, err_path = tmp_path / "out.log", tmp_path / "err.log"
    with out_path.open("wb") as out_file, err_path.open("wb") as err_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "ds2oai", "serve", "--host", "127.0.0.1", "--port", str(port)],
            stdout=out_file,
            stderr=err_file,
            env=env,
            cwd=ROOT,
        )
    try:
        wait_http(f"http://127.0.0.1:{port}/healthz", proc)
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        auth = {"Authorization": f"Bearer {CLIENT_KEY}"}
        async with aiohttp.ClientSession(timeout=CLIENT_TIMEOUT) as client:
            for mode in ("normal", "stream_error", "rate_limit", "server_error"):
                payload = {"messages": [{"role": "user", "content": "hi"}], "stream": True}
                async with client.post(
                    url, json={**payload, "test_mode": mode}, headers=auth
                ) as resp:
                    raw = await resp.read()
                    assert UPSTREAM_KEY.encode() not in raw
                    assert CLIENT_KEY.encode() not in raw
                    if mode == "normal":
                        assert spec_text(parse_events(raw)).startswith("Hello")
            async with client.post(
                url, json={"messages": []}, headers={"Authorization": "Bearer wrong"}
            ) as resp:
                assert resp.status == 401
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    out, err = out_path.read_bytes(), err_path.read_bytes()
    assert proc.returncode == 0, err
    output = out + err
    assert UPSTREAM_KEY.encode() not in output
    assert CLIENT_KEY.encode() not in output
    lines = [json.loads(line) for line in out.decode().splitlines() if line.startswith("{")]
    requests = [e for e in lines if e.get("path") == "/v1/chat/completions"]
    assert len(requests) == 5
    assert all(entry["request_id"] for entry in requests)
    assert [entry["status"] for entry in requests] == [200, 200, 429, 502, 401]


async def test_workers_share_one_port_and_aggregate_metrics(
    tmp_path: Path, mock_upstream_url: str
) -> None:
    port = free_port()
    out_path = tmp_path / "out.log"
    proc = start_serve(["--port", str(port), "--workers", "2"], mock_upstream_url, out_path)
    try:
        wait_http(f"http://127.0.0.1:{port}/healthz", proc)
        url = f"http://127.0.0.1:{port}"
        payload = {"messages": [{"role": "user", "content": "hi"}], "stream": True}
        pids: set[int] = set()
        async with aiohttp.ClientSession(timeout=CLIENT_TIMEOUT) as client:
            # both workers up: new connections until two different pids answered
            deadline = asyncio.get_running_loop().time() + 30
            while len(pids) < 2 and asyncio.get_running_loop().time() < deadline:
                async with client.get(url + "/healthz", headers={"Connection": "close"}) as r:
                    pids.add((await r.json())["pid"])
            for _ in range(40):
                async with client.post(
                    url + "/v1/chat/completions", json=payload, headers={"Connection": "close"}
                ) as resp:
                    assert spec_text(parse_events(await resp.read())).startswith("Hello")
            # Each worker hands its counts over every FLUSH_INTERVAL: a scrape sees all 40
            # within a few intervals, whichever worker answers it.
            line = 'ds2oai_requests_total{route="/v1/chat/completions",status="200"} 40.0'
            deadline = asyncio.get_running_loop().time() + 5 * FLUSH_INTERVAL
            while True:
                async with client.get(url + "/metrics") as resp:
                    text = await resp.text()
                if line in text or asyncio.get_running_loop().time() > deadline:
                    break
                await asyncio.sleep(0.1)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    out = out_path.read_bytes()
    assert proc.returncode == 0, out
    assert len(pids) == 2
    assert line in text


def _serve_with_limits(
    tmp_path: Path, upstream: str, soft: int, hard: int
) -> tuple[subprocess.Popen[bytes], int, Path]:
    port = free_port()
    env = {**os.environ, "UPSTREAM_BASE_URL": upstream}
    env.pop("DS2OAI_CONFIG", None)
    out_path = tmp_path / "out.log"

    # The shell sets the limits and execs the gateway: as a user's `ulimit` would.
    serve = f"{shlex.quote(sys.executable)} -m ds2oai serve --port {port}"
    with out_path.open("wb") as out_file:
        proc = subprocess.Popen(
            ["bash", "-c", f"ulimit -Sn {soft} && ulimit -Hn {hard} && exec {serve}"],
            stdout=out_file,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=ROOT,
        )
    return proc, port, out_path


def _open_files(pid: int) -> tuple[int, int]:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            return int(soft), int(hard)
    raise AssertionError("no open-files line in /proc/PID/limits")


async def test_serve_raises_a_low_soft_open_files_limit(
    tmp_path: Path, mock_upstream_url: str
) -> None:
    """A soft limit of 64 descriptors would fail most of 60 concurrent streams (two each)."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    proc, port, out_path = _serve_with_limits(tmp_path, mock_upstream_url, 64, hard)
    try:
        wait_http(f"http://127.0.0.1:{port}/healthz", proc)
        assert _open_files(proc.pid) == (hard, hard)
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        payload = {"messages": [{"role": "user", "content": "hi"}], "stream": True}
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(timeout=CLIENT_TIMEOUT, connector=connector) as client:

            async def one() -> str:
                body = {**payload, "mock_delay": 0.05}
                async with client.post(url, json=body) as resp:
                    assert resp.status == 200
                    return spec_text(parse_events(await resp.read()))

            texts = await asyncio.gather(*(one() for _ in range(60)))
        assert all(text.startswith("Hello") for text in texts)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    assert proc.returncode == 0, out_path.read_bytes()
    # Whether it warns depends only on the hard limit this machine allows.
    assert (b"open-files limit is low" in out_path.read_bytes()) == (hard < 4096)


async def test_serve_warns_when_even_the_hard_open_files_limit_is_low(
    tmp_path: Path, mock_upstream_url: str
) -> None:
    proc, port, out_path = _serve_with_limits(tmp_path, mock_upstream_url, 256, 1000)
    try:
        wait_http(f"http://127.0.0.1:{port}/healthz", proc)
        assert _open_files(proc.pid) == (1000, 1000)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    lines = [json.loads(x) for x in out_path.read_text().splitlines() if x.startswith("{")]
    warned = [e for e in lines if "open-files limit is low" in e["msg"]]
    assert len(warned) == 1
    assert warned[0]["open_files"] == 1000
    assert warned[0]["level"] == "warning"


def _run_dev(port: int, mock_port: int, config: Path | None = None) -> subprocess.Popen[str]:
    drop = ("UPSTREAM_BASE_URL", "DS2OAI_CONFIG")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    if config is not None:
        env["DS2OAI_CONFIG"] = str(config)
    argv = [sys.executable, "scripts/run_dev.py", "--port", str(port)]
    return subprocess.Popen(
        [*argv, "--mock-port", str(mock_port)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.parametrize("config_names_upstream", [False, True])
def test_make_run_starts_answers_and_stops_on_ctrl_c(
    tmp_path: Path, mock_upstream_url: str, config_names_upstream: bool
) -> None:
    # With a config that names an upstream, that one and no mock: a config written for the
    # real upstream must not quietly get the mock's answers.
    port, mock_port = free_port(), free_port()
    config = None
    upstream = f"http://127.0.0.1:{mock_port}"
    if config_names_upstream:
        config = tmp_path / "ds2oai.toml"
        config.write_text(f'[upstream]\nbase_url = "{mock_upstream_url}"\n')
        upstream = mock_upstream_url
    with _run_dev(port, mock_port, config) as proc:
        try:
            assert proc.stdout is not None
            ready = next(line for line in proc.stdout if "ds2oai ready" in line)
            assert f"upstream {upstream})" in ready
            with socket.socket() as probe:  # its own mock runs only when none was named
                assert (probe.connect_ex(("127.0.0.1", mock_port)) == 0) != config_names_upstream
            body = {"messages": [{"role": "user", "content": "hi"}], "stream": True}
            url = f"http://127.0.0.1:{port}/v1/chat/completions"
            request = urllib.request.Request(url, data=json.dumps(body).encode())
            with urllib.request.urlopen(request, timeout=30) as answer:
                assert spec_text(parse_events(answer.read())) == NORMAL_TEXT
        finally:
            proc.send_signal(signal.SIGINT)
            proc.communicate(timeout=30)
    assert proc.returncode == 0


def test_make_run_refuses_a_mock_port_already_in_use() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with _run_dev(free_port(), taken.getsockname()[1]) as proc:
            _, err = proc.communicate(timeout=30)
    assert proc.returncode == 1
    assert "is in use" in err
    assert "ds2oai ready" not in err


def _workers_of(pid: int) -> set[int]:
    """The `--workers` processes of `pid` (its spawned children, not the resource tracker)."""
    found: set[int] = set()
    for task in os.listdir(f"/proc/{pid}/task"):
        for child in Path(f"/proc/{pid}/task/{task}/children").read_text().split():
            with contextlib.suppress(OSError):
                if "spawn_main" in Path(f"/proc/{child}/cmdline").read_text():
                    found.add(int(child))
    return found


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def test_a_killed_worker_is_replaced_and_workers_end_with_their_parent(tmp_path: Path) -> None:
    port = free_port()
    out_path = tmp_path / "out.log"
    upstream = f"http://127.0.0.1:{free_port()}"
    proc = start_serve(["--port", str(port), "--workers", "2"], upstream, out_path)
    workers: set[int] = set()
    try:
        wait_http(f"http://127.0.0.1:{port}/healthz", proc)
        time.sleep(5.5)  # past the quick-exit window: a worker dying now is replaced
        first = _workers_of(proc.pid)
        assert len(first) == 2
        victim = min(first)
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            workers = _workers_of(proc.pid)
            if len(workers) == 2 and victim not in workers:
                break
            time.sleep(0.1)
        assert len(workers) == 2
        assert victim not in workers
        wait_http(f"http://127.0.0.1:{port}/healthz", proc)
        # The parent killed outright: its workers drain and go, none keeps the port.
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and any(_alive(w) for w in workers):
            time.sleep(0.1)
        assert not any(_alive(w) for w in workers)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for worker in workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(worker, signal.SIGKILL)
    log_lines = out_path.read_text().splitlines()
    assert any("a worker exited while serving; starting another" in line for line in log_lines)


@pytest.mark.parametrize("workers", ["1", "2"])
def test_serve_on_a_port_in_use_says_so_in_one_line(workers: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        result = run_cli(
            "serve",
            "--port",
            port,
            "--workers",
            workers,
            env={"UPSTREAM_BASE_URL": "http://127.0.0.1:9"},
        )
    assert result.returncode == 1
    output = result.stdout + result.stderr
    assert f"cannot serve on 127.0.0.1:{port}" in output
    assert "address already in use" in output
    assert "Traceback" not in output


def test_a_sigterm_while_workers_start_is_a_clean_stop(tmp_path: Path) -> None:
    upstream = f"http://127.0.0.1:{free_port()}"
    proc = start_serve(["--port", str(free_port()), "--workers", "2"], upstream, tmp_path / "log")
    try:
        deadline = time.monotonic() + 20
        while not _workers_of(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.01)
        proc.send_signal(signal.SIGTERM)  # the workers were just spawned: still importing
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_hang_up_drains_the_workers_and_stops_cleanly(
    tmp_path: Path, mock_upstream_url: str
) -> None:
    # The terminal that ran `serve --workers 2` closed: by default SIGHUP killed the parent.
    port = free_port()
    proc = start_serve(["--port", str(port), "--workers", "2"], mock_upstream_url, tmp_path / "log")
    try:
        wait_http(f"http://127.0.0.1:{port}/healthz", proc)
        workers = _workers_of(proc.pid)
        assert len(workers) == 2
        proc.send_signal(signal.SIGHUP)
        assert proc.wait(timeout=30) == 0
        assert not any(_alive(worker) for worker in workers)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("workers", ["1", "2"])
def test_under_nohup_a_hang_up_is_still_ignored(
    tmp_path: Path, mock_upstream_url: str, workers: str
) -> None:
    port = free_port()
    args = ["--port", str(port), "--workers", workers]
    proc = start_serve(args, mock_upstream_url, tmp_path / "log", ignore_hangup=True)
    try:
        wait_http(f"http://127.0.0.1:{port}/healthz", proc)
        proc.send_signal(signal.SIGHUP)
        time.sleep(1.0)
        assert proc.poll() is None
        wait_http(f"http://127.0.0.1:{port}/healthz", proc)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_workers_have_their_own_process_group(tmp_path: Path) -> None:
    # A terminal's Ctrl-C goes to the foreground group: only the supervisor may get it (it
    # passes one SIGTERM on), or a worker gets two signals and skips its drain.
    port = free_port()
    upstream = f"http://127.0.0.1:{free_port()}"
    proc = start_serve(["--port", str(port), "--workers", "2"], upstream, tmp_path / "log")
    try:
        wait_http(f"http://127.0.0.1:{port}/healthz", proc)

        def own_groups() -> list[bool]:
            return [os.getpgid(w) == w != os.getpgid(proc.pid) for w in _workers_of(proc.pid)]

        # Each worker moves to its own group as its first step, which the second one to start
        # may not have taken yet when the first already answers.
        deadline = time.monotonic() + 20
        while own_groups() != [True, True] and time.monotonic() < deadline:
            time.sleep(0.1)
        assert own_groups() == [True, True]
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
