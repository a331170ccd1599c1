"""The README's copy-paste SDK examples, run as written against `ds2oai serve`."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import CLIENT_KEY, ROOT, free_port, start_serve, wait_http

README = (ROOT / "README.md").read_text(encoding="utf-8")
EXAMPLES = dict(
    re.findall(r"<!-- example: (\w+) -->\n```python\n(.*?)```", README, flags=re.DOTALL)
)


MIDDLEWARE_CONFIG = re.search(
    r"<!-- example: middleware-config -->\n```toml\n(.*?)```", README, flags=re.DOTALL
)


def test_the_readme_has_its_examples() -> None:
    assert set(EXAMPLES) == {"chat", "responses", "middleware"}
    assert MIDDLEWARE_CONFIG is not None


@pytest.mark.parametrize("name", ["chat", "responses"])
def test_readme_example_runs(name: str, served_gateway: str, tmp_path: Path) -> None:
    code = EXAMPLES[name].replace("http://127.0.0.1:8000", served_gateway)
    code = code.replace("your-client-key", CLIENT_KEY)
    script = tmp_path / f"{name}.py"
    script.write_text(code, encoding="utf-8")
    result = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert "Hello! This is a mock DeepSeek stream." in result.stdout


def test_the_worked_middleware_example_runs_as_written(
    mock_upstream_url: str, tmp_path: Path
) -> None:
    """`mytags.py` and its config, copied from the README into a directory `serve` starts in."""
    assert MIDDLEWARE_CONFIG is not None
    (tmp_path / "mytags.py").write_text(EXAMPLES["middleware"], encoding="utf-8")
    config = tmp_path / "mytags.toml"
    config.write_text(MIDDLEWARE_CONFIG.group(1) + '[store]\nbackend = "memory"\n')
    port = free_port()
    log_path = tmp_path / "out.log"
    args = ["--config", str(config), "--port", str(port)]
    # started in the directory holding mytags.py, as the README says
    proc = start_serve(args, mock_upstream_url, log_path, cwd=tmp_path)
    try:
        wait_http(f"http://127.0.0.1:{port}/healthz", proc)
        body = {"messages": [{"role": "user", "content": "hi"}], "stream": True}
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/chat/completions", data=json.dumps(body).encode()
        )
        with urllib.request.urlopen(request, timeout=30) as answer:
            streamed = answer.read()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    lines = [json.loads(line) for line in log_path.read_text().splitlines() if line.startswith("{")]
    counted = [line for line in lines if line.get("logger") == "mytags"]
    assert len(counted) == 1, lines
    assert counted[0]["team"] == "search-frontend"
    assert counted[0]["bytes"] == len(streamed)
