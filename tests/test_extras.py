"""The example extras in middleware/ composed with the built-ins, over real sockets."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from ds2oai.chain import build_middleware
from ds2oai.config import Config, load_config
from ds2oai.errors import ConfigError
from ds2oai.middleware import BUILTINS
from ds2oai.server import create_app
from tests.conftest import ROOT
from tests.fault_upstream import FaultUpstream, json_response, sse_script, text_events
from tests.sse_client import parse_events, spec_text


def write_config(tmp_path: Path, upstream_url: str, extra: str) -> Config:
    path = tmp_path / "ds2oai.toml"
    path.write_text(
        f"""
[upstream]
base_url = "{upstream_url}"
[retry]
base_delay = 0.01
max_delay = 0.02
{extra}
""",
        encoding="utf-8",
    )
    return load_config(path, env={})


CHAIN = f"""
[auth]
api_keys = ["client-key-1"]
[middleware]
paths = ["{ROOT}"]
chain = ["middleware.access_log:AccessLog", "auth", "middleware.max_tokens_cap:MaxTokensCap",
         "rate_limit", "retry", "reframe"]
[middleware.max_tokens_cap]
limit = 100
default = 50
"""


async def test_extras_compose_with_retry_and_see_the_final_stream(
    tmp_path: Path, fault_upstream: FaultUpstream, aiohttp_server: Any
) -> None:
    log_path = tmp_path / "access.jsonl"
    config = write_config(
        tmp_path, fault_upstream.url, CHAIN + f'[middleware.access_log]\npath = "{log_path}"\n'
    )
    fault_upstream.queue(
        json_response(503, {"error": {"message": "busy"}}),
        sse_script(text_events(["a", "b", "c"])),
    )
    server = await aiohttp_server(create_app(config))
    payload = {"messages": [{"role": "user", "content": "x"}], "stream": True, "max_tokens": 5000}
    async with (
        aiohttp.ClientSession() as client,
        client.post(
            server.make_url("/v1/chat/completions"),
            json=payload,
            headers={"Authorization": "Bearer client-key-1"},
        ) as resp,
    ):
        assert resp.status == 200
        raw = await resp.read()
    assert spec_text(parse_events(raw)) == "abc"
    # every attempt carried the capped body: the replaced exchange survives retries
    assert [r.json["max_tokens"] for r in fault_upstream.requests] == [100, 100]
    (line,) = log_path.read_text().splitlines()
    entry = json.loads(line)
    assert entry["status"] == 200
    assert entry["bytes"] == len(raw)
    assert entry["outcome"] == "completed"


async def test_access_log_placed_first_records_auth_failures(
    tmp_path: Path, fault_upstream: FaultUpstream, aiohttp_server: Any
) -> None:
    log_path = tmp_path / "access.jsonl"
    config = write_config(
        tmp_path, fault_upstream.url, CHAIN + f'[middleware.access_log]\npath = "{log_path}"\n'
    )
    server = await aiohttp_server(create_app(config))
    async with (
        aiohttp.ClientSession() as client,
        client.post(
            server.make_url("/v1/chat/completions"),
            json={"messages": [], "stream": True},
            headers={"Authorization": "Bearer wrong"},
        ) as resp,
    ):
        assert resp.status == 401
    entry = json.loads(log_path.read_text())
    assert (entry["status"], entry["error"]) == (401, "ClientError")
    assert fault_upstream.requests == []


async def test_default_max_tokens_is_set_when_the_client_sends_none(
    tmp_path: Path, fault_upstream: FaultUpstream, aiohttp_server: Any
) -> None:
    config = write_config(tmp_path, fault_upstream.url, CHAIN)
    server = await aiohttp_server(create_app(config))
    async with (
        aiohttp.ClientSession() as client,
        client.post(
            server.make_url("/v1/chat/completions"),
            json={"messages": [], "stream": False, "max_completion_tokens": 70},
            headers={"Authorization": "Bearer client-key-1"},
        ) as resp,
    ):
        assert resp.status == 200
    sent = fault_upstream.requests[0].json
    assert sent["max_tokens"] == 70
    assert "max_completion_tokens" not in sent


@pytest.mark.parametrize(
    ("extra", "named"),
    [
        ("[middleware.max_tokens_cap]\nlimit = 10\nbogus = 1\n", "max_tokens_cap"),
        ("[middleware.max_tokens_cap]\nlimit = 0\n", "max_tokens_cap"),
        ("", "max_tokens_cap"),  # limit is required
    ],
)
def test_bad_extra_options_stop_start_up_naming_the_entry(
    tmp_path: Path, extra: str, named: str
) -> None:
    chain = (
        f'[middleware]\npaths = ["{ROOT}"]\n'
        'chain = ["middleware.max_tokens_cap:MaxTokensCap", "reframe"]\n'
    )
    config = write_config(tmp_path, "http://127.0.0.1:9", chain + extra)
    with pytest.raises(ConfigError, match=named):
        build_middleware(config, BUILTINS)
