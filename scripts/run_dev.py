"""`make run`: the bundled mock upstream plus the gateway.

The mock is left out when an upstream is given: `UPSTREAM_BASE_URL`, or `[upstream] base_url`
in the file `DS2OAI_CONFIG` names (a user who wrote DeepSeek's URL there must not get the mock's
answers). The gateway listens on `--host`/`--port` (the Makefile's HOST and PORT), whatever the
file says.

Starts both as child processes, waits until each answers, prints a ready line and a curl to
try, and stops both cleanly on Ctrl-C (or when either exits).
"""

# ruff: noqa: S603  (argv built here from sys.executable and fixed module names)

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
import tomllib
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _wait_http(url: str, proc: subprocess.Popen[bytes], timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            with urllib.request.urlopen(url, timeout=1.0):  # noqa: S310 - loopback URL we built
                return True
        except (urllib.error.URLError, OSError):
            time.sleep(0.1)
    return False


def _port_taken(host: str, port: int) -> bool:
    """Whether something already listens there (a server started earlier answers in its place,
    so waiting for our own would wrongly succeed)."""
    try:
        socket.create_connection((host, port), timeout=0.5).close()
    except OSError:  # refused, unreachable, or a name that does not resolve: not taken
        return False
    return True


def _stop(proc: subprocess.Popen[bytes] | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)  # both servers shut down gracefully on SIGTERM
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _configured_upstream(path: str | None) -> str | None:
    """`[upstream] base_url` of the config file, if it sets one (read as the gateway will; a
    file it cannot read is the gateway's to report)."""
    if not path:
        return None
    try:
        with (ROOT / path).open("rb") as file:
            data = tomllib.load(file)
    except (OSError, tomllib.TOMLDecodeError):
        return None
    upstream = data.get("upstream")
    url = upstream.get("base_url") if isinstance(upstream, dict) else None
    return url if isinstance(url, str) and url else None


def _interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt


def main() -> int:
    # Explicit handlers: a shell may start us with SIGINT ignored (background jobs).
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--mock-port", type=int, default=9001)
    args = parser.parse_args()
    env = dict(os.environ)
    mock: subprocess.Popen[bytes] | None = None
    gateway: subprocess.Popen[bytes] | None = None
    upstream = env.get("UPSTREAM_BASE_URL") or _configured_upstream(env.get("DS2OAI_CONFIG"))
    own_mock = not upstream
    if own_mock and _port_taken("127.0.0.1", args.mock_port):
        print(
            f"make run: port {args.mock_port} is in use (a mock upstream already running?). "
            f"Stop it, use it with UPSTREAM_BASE_URL=http://127.0.0.1:{args.mock_port} make run, "
            "or pick another port with make run MOCK_PORT=9002.",
            file=sys.stderr,
        )
        return 1
    if _port_taken(args.host, args.port):
        print(
            f"make run: port {args.port} is in use. Stop what listens there, or pick another "
            "port with make run PORT=8001.",
            file=sys.stderr,
        )
        return 1
    try:
        if own_mock:
            mock = subprocess.Popen(
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
                    str(args.mock_port),
                    "--log-level",
                    "warning",
                ],
                cwd=ROOT,
            )
            upstream = env["UPSTREAM_BASE_URL"] = f"http://127.0.0.1:{args.mock_port}"
            if not _wait_http(upstream + "/", mock):
                print("make run: the mock upstream did not start", file=sys.stderr)
                return 1
        gateway = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "ds2oai",
                "serve",
                "--host",
                args.host,
                "--port",
                str(args.port),
            ],
            cwd=ROOT,
            env=env,
        )
        base = f"http://{args.host}:{args.port}"
        if not _wait_http(base + "/healthz", gateway):
            print("make run: the gateway did not start", file=sys.stderr)
            return 1
        print(
            f"\nds2oai ready on {base} (upstream {upstream}). Try:\n\n"
            f"  curl -N {base}/v1/chat/completions -H 'Content-Type: application/json' \\\n"
            '    -d \'{"model": "deepseek-chat", "messages": [{"role": "user", '
            '"content": "Hello"}], "stream": true}\'\n\n'
            f"Ctrl-C stops {'both' if mock is not None else 'it'}.\n",
            flush=True,
        )
        while True:
            if gateway.poll() is not None or (mock is not None and mock.poll() is not None):
                print("make run: a process exited; stopping", file=sys.stderr)
                return 1
            time.sleep(0.5)
    except KeyboardInterrupt:
        print("\nstopping…", flush=True)
        return 0
    finally:
        _stop(gateway)
        _stop(mock)


if __name__ == "__main__":
    raise SystemExit(main())
